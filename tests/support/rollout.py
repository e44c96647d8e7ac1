"""Drive the ``mlflow-rollout`` CLI the way a user does, in a sandbox per test.

Each :class:`Sandbox` has its own environments directory (YAML written by the
test), its own state directory and a free port, and runs the real CLI in a
subprocess against the session's Prefect test server.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from tests.support.services import free_port

ROOT = Path(__file__).resolve().parents[2]
CLI = [str(Path(sys.executable).parent / "mlflow-rollout")]

DEFAULT_OUTPUTS = {
    "mlflow_irsa_role_arn": {"value": "arn:aws:iam::000000000000:role/mlflow-test", "type": "string", "sensitive": False},
    "rds_connection_string": {"value": "postgresql://mlflow@127.0.0.1:5432/mlflow", "type": "string", "sensitive": True},
    "s3_bucket_name": {"value": "mlflow-test-artifacts", "type": "string", "sensitive": False},
}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass
class Sandbox:
    root: Path
    api_url: str
    port: int = field(default_factory=free_port)
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def env_dir(self) -> Path:
        return self.root / "environments"

    @property
    def state_root(self) -> Path:
        return self.root / "state"

    def write_environment(self, name: str, overrides: dict | None = None, outputs: dict | None = None) -> Path:
        """Write ``<name>.yaml`` (+ its outputs file) and return the YAML path."""
        self.env_dir.mkdir(parents=True, exist_ok=True)
        out_file = self.env_dir / name / "terraform-outputs.json"
        out_file.parent.mkdir(exist_ok=True)
        out_file.write_text(json.dumps(outputs if outputs is not None else DEFAULT_OUTPUTS))
        data = {
            "target": "local",
            "terraform": {"source": "file", "path": str(out_file)},
            "mlflow": {"host": "localhost", "workers": 2, "startup_timeout_seconds": 240},
            "local": {"port": self.port},
            "secrets": {"admin_password": {"generate": True}, "flask_secret_key": {"generate": True}},
        }
        data = _merge(data, overrides or {})
        path = self.env_dir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update({
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_ROLLOUT_ENVIRONMENTS_DIR": str(self.env_dir),
            "MLFLOW_ROLLOUT_STATE_DIR": str(self.state_root),
            "COLUMNS": "200",
        })
        env.update(self.extra_env)
        return env

    def cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, *args], cwd=self.root, env=self.env(), capture_output=True, text=True, timeout=timeout
        )

    def status(self, name: str) -> dict[str, Any]:
        r = self.cli("status", "--env", name, "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        return json.loads(r.stdout)

    def stop(self, name: str) -> None:
        self.cli("stop", "--env", name)


@contextlib.contextmanager
def prefect_worker(box: Sandbox, pool: str, worker_type: str, log_path: Path) -> Iterator[subprocess.Popen]:
    """``prefect worker start`` on ``pool`` with the sandbox's environment, output to ``log_path``;
    its whole process group is stopped afterwards (SIGTERM, then SIGKILL after 20 s)."""
    with open(log_path, "w") as log:
        worker = subprocess.Popen(
            [str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", pool, "--type", worker_type],
            cwd=box.root, env=box.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            yield worker
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(20)
