"""The ``local`` target: MLflow server processes on this machine.

It plays the cluster's part for one machine, so the same flows run without
Kubernetes or a cloud:

===============================  =========================================
Kubernetes                       local
===============================  =========================================
``existingSecret``               ``<state>/secrets/`` (dir 0700, files 0600)
helm revision                    ``<state>/revisions/NNNN.json``
Deployment + pods                one ``mlflow server`` process group that
                                 outlives the command (``server.pid``)
pod logs                         ``<state>/server.log``
ALB + ACM certificate            uvicorn TLS with a CA made on first use
pre-upgrade migration Job        :func:`tasks.mlflow_db.migrate` before start
===============================  =========================================

The state directory is ``.mlflow-rollout/<env>`` under the working directory,
``$MLFLOW_ROLLOUT_STATE_DIR/<env>`` when that variable is set, or the
environment file's ``local.state_dir``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pydantic import SecretStr
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

from mlflow_rollout.errors import BadInputError, PermanentError, RolloutError, TransientError
from mlflow_rollout.redact import redact
from mlflow_rollout.secrets import new_secret_value, read_private, write_private
from mlflow_rollout.server_spec import SECRET_ENV, SecretBundle, ServerSpec
from mlflow_rollout.settings import EnvironmentSettings
from targets.base import DeployResult, Endpoint, LogSource, ProcessState, Revision
from tasks import mlflow_db
from tasks.checks import ServerClient
from tasks.terraform import TerraformOutputs, redacted_connection_string
from tasks.tls import TlsFiles, ensure_certificates

__all__ = ["LocalTarget", "state_dir_for"]

#: Our own processes we started in this interpreter, so they can be reaped.
_children: dict[int, subprocess.Popen] = {}


def state_dir_for(settings: EnvironmentSettings) -> Path:
    if settings.local.state_dir is not None:
        return settings.local.state_dir.resolve()
    root = os.environ.get("MLFLOW_ROLLOUT_STATE_DIR")
    base = Path(root) if root else Path.cwd() / ".mlflow-rollout"
    return (base / settings.name).resolve()


def _mlflow_executable() -> str:
    beside = Path(sys.executable).parent / "mlflow"
    if beside.is_file():
        return str(beside)
    found = shutil.which("mlflow")
    if not found:
        raise BadInputError("the 'mlflow' command was not found next to this Python or on PATH")
    return found


def _pid_alive(pid: int) -> bool:
    child = _children.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie or a reused pid is not our server
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        return any(b"mlflow" in part for part in cmdline)
    except OSError:
        return False


class LocalTarget:
    """MLflow on this machine, with revisions, TLS and a secret store on disk."""

    name = "local"

    def __init__(self, settings: EnvironmentSettings):
        self.settings = settings
        self.dir = state_dir_for(settings)
        self.secrets_dir = self.dir / "secrets"
        self.revisions_dir = self.dir / "revisions"
        self.log_file = self.dir / "server.log"
        self.pid_file = self.dir / "server.pid"
        self.server_file = self.dir / "server.json"

    # ----------------------------------------------------------------- layout
    @property
    def port(self) -> int:
        return self.settings.local.port

    @property
    def public_host(self) -> str:
        return self.settings.mlflow.host

    def ensure_dirs(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self.secrets_dir.mkdir(exist_ok=True, mode=0o700)
        self.revisions_dir.mkdir(exist_ok=True)

    def sqlite_uri(self, name: str) -> str:
        return f"sqlite:///{self.dir / name}"

    def local_artifacts_dir(self) -> Path:
        return self.dir / "artifacts"

    def admin_password_file(self) -> Path:
        return self.secrets_dir / "admin-password"

    def generated_secret(self, key: str) -> str:
        """A ``generate: true`` secret: kept (0600) in the secret store the server reads."""
        path = self.secrets_dir / key
        if path.is_file():
            return path.read_text()
        value = new_secret_value()
        write_private(path, value)
        return value

    def tls(self) -> TlsFiles:
        names = list(dict.fromkeys([self.public_host, "localhost", "127.0.0.1", self.settings.local.bind_host]))
        return ensure_certificates(self.dir / "tls", names)

    # -------------------------------------------------------------- preflight
    def preflight(self, outputs: TerraformOutputs) -> list[str]:
        notes = []
        try:
            self.ensure_dirs()
            probe = self.dir / ".write-probe"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise BadInputError(f"state directory {self.dir} is not writable: {exc.strerror}") from None
        notes.append(f"state directory {self.dir}")
        notes.append(f"mlflow at {_mlflow_executable()}")
        running = self._running_pid()
        if running is None and not self._port_free():
            raise BadInputError(
                f"port {self.port} on {self.settings.local.bind_host} is in use by another program; "
                "set local.port in the environment file"
            )
        notes.append(f"port {self.port}: " + (f"our server (pid {running})" if running else "free"))
        tls = self.tls()
        notes.append(f"CA {tls.ca_cert}")
        return notes

    def _port_free(self) -> bool:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((self.settings.local.bind_host, self.port))
            except OSError:
                return False
        return True

    # ---------------------------------------------------------------- secrets
    def store_secrets(self, secrets: SecretBundle, auth_ini: str) -> bool:
        self.ensure_dirs()
        wanted = {
            "backend-store-uri": secrets.backend_store_uri.get_secret_value(),
            "auth-database-uri": secrets.auth_database_uri.get_secret_value(),
            "admin-password": secrets.admin_password.get_secret_value(),
            "flask-secret-key": secrets.flask_secret_key.get_secret_value(),
            "basic_auth.ini": auth_ini,
        }
        changed = False
        for key, value in wanted.items():
            path = self.secrets_dir / key
            if not path.is_file() or path.read_text() != value:
                write_private(path, value)
                changed = True
        return changed

    def _secret(self, key: str) -> str:
        path = self.secrets_dir / key
        if not path.is_file():
            raise PermanentError(f"secret {key!r} is missing from {self.secrets_dir}; run the secrets stage")
        return read_private(path)

    # -------------------------------------------------------------- revisions
    def history(self) -> list[Revision]:
        if not self.revisions_dir.is_dir():
            return []
        revs = [Revision.model_validate_json(p.read_text()) for p in sorted(self.revisions_dir.glob("*.json"))]
        return sorted(revs, key=lambda r: r.number)

    def current_revision(self) -> Revision | None:
        deployed = [r for r in self.history() if r.status == "deployed"]
        return deployed[-1] if deployed else None

    def _save_revision(self, rev: Revision) -> None:
        path = self.revisions_dir / f"{rev.number:04d}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(rev.model_dump_json(indent=2))
        tmp.replace(path)

    # ------------------------------------------------------------------- spec
    def database_uris(self, outputs: TerraformOutputs) -> tuple[SecretStr, SecretStr]:
        """(backend store URI, auth DB URI): SQLite files here, or the RDS URI for both."""
        if self.settings.local.backend_store == "terraform":
            return outputs.rds_connection_string, outputs.rds_connection_string
        return SecretStr(self.sqlite_uri("mlflow.db")), SecretStr(self.sqlite_uri("auth.db"))

    def server_spec(self, outputs: TerraformOutputs, *, auth: bool) -> ServerSpec:
        s, m = self.settings, self.settings.mlflow
        if s.local.artifacts == "s3":
            prefix = s.local.s3_prefix.strip("/")
            destination = f"s3://{outputs.s3_bucket_name}" + (f"/{prefix}" if prefix else "")
        else:
            destination = str(self.local_artifacts_dir())
        if s.local.backend_store == "terraform":
            backend = redacted_connection_string(outputs)
        else:
            backend = self.sqlite_uri("mlflow.db")
        hosts = list(dict.fromkeys([m.host, "localhost", "127.0.0.1"]))
        return ServerSpec(
            auth=auth,
            workers=m.workers,
            artifacts_destination=destination,
            allowed_hosts=tuple(h for host in hosts for h in (host, f"{host}:*")),
            cors_allowed_origins=tuple(dict.fromkeys([f"https://{m.host}:{self.port}", f"https://{m.host}"])),
            admin_username=m.admin_username,
            default_permission=m.default_permission,
            auth_cache_ttl_seconds=m.auth_cache_ttl_seconds,
            job_execution=m.job_execution,
            backend_store=backend,
            s3_endpoint_url=s.local.s3_endpoint_url if s.local.artifacts == "s3" else None,
        )

    # ---------------------------------------------------------------- process
    def _read_server_file(self) -> dict:
        try:
            return json.loads(self.server_file.read_text())
        except (OSError, ValueError):
            return {}

    def _running_pid(self) -> int | None:
        info = self._read_server_file()
        pid = info.get("pid")
        if isinstance(pid, int) and _pid_alive(pid):
            return pid
        return None

    def _command(self, spec: ServerSpec, tls: TlsFiles) -> list[str]:
        return [
            _mlflow_executable(), "server",
            "--host", self.settings.local.bind_host,
            "--port", str(self.port),
            *spec.server_args(),
            "--uvicorn-opts", f"--ssl-certfile {tls.server_cert} --ssl-keyfile {tls.server_key}",
        ]

    def _environment(self, spec: ServerSpec) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "MLFLOW_AUTH_"))}
        env.pop("MLFLOW_BACKEND_STORE_URI", None)
        env.update(spec.plain_env())
        for var, key in SECRET_ENV.items():
            env[var] = self._secret(key)
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(self.secrets_dir / "basic_auth.ini")
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _start(self, revision: Revision) -> int:
        tls = self.tls()
        cmd = self._command(revision.spec, tls)
        env = self._environment(revision.spec)
        self.log_file.touch(exist_ok=True)
        offset = self.log_file.stat().st_size
        with open(self.log_file, "ab") as log:
            log.write(f"--- mlflow-rollout: starting revision {revision.number} at {dt.datetime.now(dt.timezone.utc).isoformat()}\n".encode())
            log.flush()
            offset = log.tell()
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.dir, env=env, start_new_session=True,
            )
        _children[proc.pid] = proc
        self.pid_file.write_text(f"{proc.pid}\n")
        self.server_file.write_text(json.dumps({
            "pid": proc.pid, "revision": revision.number, "port": self.port,
            "log_offset": offset, "started_at": time.time(), "workers": revision.spec.workers,
        }))
        return proc.pid

    def stop(self, timeout: float = 30) -> bool:
        """Stop the server's whole process group; True if something was running."""
        pid = self._running_pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _pid_alive(pid):
            time.sleep(0.2)
        try:  # whatever is left of the group (workers, a hung process)
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        child = _children.pop(pid, None)
        if child is not None:
            child.wait(timeout=10)
        self.pid_file.unlink(missing_ok=True)
        info = self._read_server_file()
        info["pid"] = None
        self.server_file.write_text(json.dumps(info))
        return True

    def _log_tail(self, offset: int, lines: int = 25) -> str:
        with open(self.log_file, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
        return redact("\n".join(text.splitlines()[-lines:]))

    def _probe_health(self) -> None:
        """``/health`` answers 200 over verified TLS; else a TransientError saying why."""
        with ServerClient(self.endpoint(), timeout=5) as client:
            status = client.get("/health").status_code
        if status != 200:
            raise TransientError(f"/health answered {status}")

    def _wait_healthy(self, pid: int) -> None:
        offset = self._read_server_file().get("log_offset", 0)
        timeout = self.settings.mlflow.startup_timeout_seconds

        def probe() -> None:
            if not _pid_alive(pid):
                raise PermanentError(
                    f"mlflow server exited during startup; last log lines:\n{self._log_tail(offset)}"
                )
            self._probe_health()

        try:
            for attempt in Retrying(
                stop=stop_after_delay(timeout), wait=wait_fixed(0.5),
                retry=retry_if_exception_type(TransientError), reraise=True,
            ):
                with attempt:
                    probe()
        except TransientError as exc:
            raise TransientError(
                f"mlflow server not healthy after {timeout:.0f}s ({exc}); last log lines:\n{self._log_tail(offset)}"
            ) from None

    def _healthy_now(self) -> bool:
        try:
            self._probe_health()
        except RolloutError:
            return False
        return True

    # ----------------------------------------------------------------- deploy
    def deploy(self, spec: ServerSpec) -> DeployResult:
        self.ensure_dirs()
        current = self.current_revision()
        running = self._running_pid()
        serving = self._read_server_file().get("revision")
        if current is not None and current.spec == spec:
            if running is not None and serving == current.number and self._healthy_now():
                return DeployResult(revision=current.number, changed=False, detail="already running this spec")
            self.stop()
            pid = self._start(current)
            self._wait_healthy(pid)
            return DeployResult(revision=current.number, changed=True, detail=f"restarted revision {current.number}")
        return self._roll_to(spec, description="deploy")

    def _roll_to(self, spec: ServerSpec, description: str) -> DeployResult:
        history = self.history()
        number = (history[-1].number + 1) if history else 1
        rev = Revision(
            number=number, spec=spec, created_at=dt.datetime.now(dt.timezone.utc),
            status="pending", description=description,
        )
        self._save_revision(rev)
        # The equivalent of the chart's pre-upgrade hook Job: migrate once, before start.
        mlflow_db.migrate(
            SecretStr(self._secret("backend-store-uri")),
            SecretStr(self._secret("auth-database-uri")) if spec.auth else None,
        )
        self.stop()
        pid = self._start(rev)
        try:
            self._wait_healthy(pid)
        except Exception:
            self._save_revision(rev.model_copy(update={"status": "failed"}))
            raise
        for old in history:
            if old.status == "deployed":
                self._save_revision(old.model_copy(update={"status": "superseded"}))
        self._save_revision(rev.model_copy(update={"status": "deployed"}))
        return DeployResult(revision=number, changed=True, detail=f"revision {number} running (pid {pid})")

    def rollback_candidates(self) -> list[Revision]:
        """Revisions that ran healthy once and are not the current one, newest first."""
        current = self.current_revision()
        good = [r for r in self.history() if r.status == "superseded" and (current is None or r.number != current.number)]
        return sorted(good, key=lambda r: r.number, reverse=True)

    def rollback(self, revision: int, reason: str) -> DeployResult:
        """Deploy revision ``revision``'s spec again, as a new revision (as helm does)."""
        old = next((r for r in self.history() if r.number == revision), None)
        if old is None:
            raise BadInputError(f"revision {revision} does not exist")
        result = self._roll_to(old.spec, description=f"rollback to {revision}: {reason}")
        return result.model_copy(update={"detail": f"rolled back to revision {revision} as revision {result.revision}"})

    def admin_password(self) -> SecretStr:
        """The admin password from the secret store (what the server was bootstrapped with)."""
        return SecretStr(self._secret("admin-password"))

    def bootstrap_admin(self, username: str) -> str:
        state = mlflow_db.ensure_admin(
            SecretStr(self._secret("auth-database-uri")), username, SecretStr(self._secret("admin-password"))
        )
        return f"admin {state.username!r} {state.action}"

    # ---------------------------------------------------------------- observe
    def endpoint(self) -> Endpoint:
        return Endpoint(url=f"https://{self.public_host}:{self.port}", ca_bundle=self.dir / "tls" / "ca.pem")

    def access_endpoint(self) -> Endpoint:
        """Before DNS: the same loopback URL (there is no DNS stage locally)."""
        return self.endpoint()

    def publish_dns(self) -> str | None:
        """No DNS record for a loopback server: the stage is skipped (None)."""
        return None

    def diagnostics(self) -> str:
        rev = self.current_revision()
        pid = self._running_pid()
        tail = self._log_tail(0, lines=60) if self.log_file.exists() else "(no log)"
        return "\n".join([
            f"## local target `{self.settings.name}`",
            f"- state directory: {self.dir}",
            f"- current revision: {rev.number if rev else None}; server pid: {pid}",
            "", "### server log (tail)", "", "```", tail, "```",
        ])

    def log_mark(self) -> str:
        return str(self.log_file.stat().st_size if self.log_file.exists() else 0)

    def logs_since(self, mark: str) -> list[LogSource]:
        if not self.log_file.exists():
            return []
        info = self._read_server_file()
        start = int(info.get("log_offset", 0))
        with open(self.log_file, "rb") as fh:
            data = fh.read()
        return [
            LogSource(
                name=f"mlflow server pid {info.get('pid')}",
                text=data[int(mark):].decode(errors="replace"),
                since_start=data[start:].decode(errors="replace"),
            )
        ]

    def processes(self) -> list[ProcessState]:
        pid = self._running_pid()
        if pid is None:
            return [ProcessState(name="mlflow server", ready=False, detail="not running")]
        return [ProcessState(name=f"mlflow server pid {pid}", ready=self._healthy_now())]

    def status(self) -> dict:
        rev = self.current_revision()
        pid = self._running_pid()
        return {
            "environment": self.settings.name,
            "target": self.name,
            "url": self.endpoint().url,
            "revision": rev.number if rev else None,
            "auth": bool(rev and rev.spec.auth),
            "running": pid is not None,
            "healthy": pid is not None and self._healthy_now(),
            "pid": pid,
            "ca_bundle": str(self.dir / "tls" / "ca.pem"),
            "admin_username": self.settings.mlflow.admin_username,
            "admin_password_file": str(self.admin_password_file()),
            "state_dir": str(self.dir),
            "log_file": str(self.log_file),
        }
