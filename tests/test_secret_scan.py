"""A rollout with known canary secrets leaks none of them anywhere it writes.

Scanned: the CLI's output, the Prefect logs, artifacts and flow-run
parameters read back from the Prefect API, the argv of every server process,
and the non-secret files of the state directory (revisions, server log).
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.support.rollout import DEFAULT_OUTPUTS, Sandbox

pytestmark = pytest.mark.e2e

ADMIN_PW = "Canary-Admin-Pw-7f3a9c1e"
FLASK_KEY = "Canary-Flask-Key-2b8d4e6f"


def _forms(secret: str) -> set[str]:
    return {secret, quote(secret, safe="")}


def _process_group_argv(pgid: int) -> list[str]:
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.getpgid(int(proc.name)) != pgid:
                continue
            out.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, ProcessLookupError):
            continue
    return out


def _rollout_events(env_name: str) -> str:
    """The ``mlflow.rollout.*`` events of this environment, via the events API."""
    import time

    import httpx
    from prefect.settings import PREFECT_API_URL

    body = {
        "filter": {
            "event": {"prefix": ["mlflow.rollout."]},
            "resource": {"id": [f"mlflow-rollout.environment.{env_name}"]},
            "any_resource": None,
        },
        "limit": 50,
    }
    deadline = time.monotonic() + 20
    while True:  # events are written asynchronously by the server
        r = httpx.post(f"{PREFECT_API_URL.value()}/events/filter", json=body, timeout=10)
        r.raise_for_status()
        events = r.json()["events"]
        if events or time.monotonic() > deadline:
            return repr(events)
        time.sleep(0.5)


def _prefect_records(env_name: str) -> dict[str, str]:
    """Everything the Prefect API stored for the flow runs of ``env_name``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, LogFilter, LogFilterFlowRunId,
    )

    stored: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        runs = [r for r in client.read_flow_runs(limit=200) if r.parameters.get("env") == env_name]
        assert runs, f"no flow run for {env_name} found in the Prefect API"
        ids = [r.id for r in runs]
        stored["parameters"] = repr([r.parameters for r in runs]) + repr([r.state.message for r in runs if r.state])
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)), limit=200)
        stored["logs"] = "\n".join(log.message for log in logs)
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids)))
        stored["artifacts"] = "\n".join(f"{a.key} {a.data} {a.description}" for a in arts)
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": ids}))
        stored["task_runs"] = repr([(t.name, t.task_inputs, t.state.message if t.state else "") for t in task_runs])
    stored["events"] = _rollout_events(env_name)
    assert "mlflow.rollout.succeeded" in stored["events"]
    assert "mlflow-rollout-scan-report" in stored["artifacts"]
    assert "smoke-logging" in stored["artifacts"]
    assert len(stored["logs"]) > 200  # the run really logged
    return stored


def test_no_secret_leaks(tmp_path: Path, prefect_api: str, postgres) -> None:
    db_uri = postgres.create_database("mlflow_scan")
    db_pw = postgres.password
    box = Sandbox(tmp_path, prefect_api, extra_env={"SCAN_ADMIN_PW": ADMIN_PW, "SCAN_FLASK_KEY": FLASK_KEY})
    box.write_environment(
        "scan",
        {
            "local": {"backend_store": "terraform"},
            "secrets": {
                "admin_password": {"env": "SCAN_ADMIN_PW", "generate": False},
                "flask_secret_key": {"env": "SCAN_FLASK_KEY", "generate": False},
            },
        },
        outputs=dict(DEFAULT_OUTPUTS, rds_connection_string={"value": db_uri, "type": "string", "sensitive": True}),
    )
    try:
        r = box.cli("rollout", "--env", "scan")
        assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
        status = box.status("scan")
        places: dict[str, str] = {"cli output": r.stdout + r.stderr}
        places["status --json"] = repr(status)
        places.update(_prefect_records("scan"))
        argv = _process_group_argv(status["pid"])
        assert len(argv) >= 3  # the mlflow CLI, uvicorn and its workers
        assert any("--app-name basic-auth" in a for a in argv)
        places["server argv"] = "\n".join(argv)
        state = Path(status["state_dir"])
        for f in [*sorted((state / "revisions").glob("*.json")), state / "server.json", state / "server.log"]:
            places[str(f.relative_to(state))] = f.read_text()

        # the secrets really were used: the admin logs in with the canary password
        import httpx, ssl

        ctx = ssl.create_default_context(cafile=status["ca_bundle"])
        with httpx.Client(base_url=status["url"], verify=ctx, auth=("admin", ADMIN_PW)) as c:
            assert c.get("/api/2.0/mlflow/users/current").status_code == 200
        assert (state / "secrets" / "flask-secret-key").read_text() == FLASK_KEY

        leaks = [
            f"{label} in {where}"
            for label, secret in (("admin password", ADMIN_PW), ("Flask key", FLASK_KEY), ("DB password", db_pw))
            for where, text in places.items()
            for form in _forms(secret)
            if form in text
        ]
        assert not leaks, leaks
    finally:
        box.stop("scan")
