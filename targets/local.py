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

Crash safety (issue 8). Every server process carries ``MLFLOW_ROLLOUT_SERVER=<state
dir>`` in its environment, so the target finds *all* its processes — also
uvicorn workers orphaned by a ``kill -9`` of the parent, or after
``server.json`` was lost — and ``stop`` ends every one of them. The first
install's auth-off bootstrap server listens on a private loopback port, never
on the environment's port (DESIGN §4.18); once the auth database has users,
nothing here starts a server without auth. Revision numbers are never
reused (a high-water mark beside the files); a deploy that never finished is
marked ``interrupted`` by the next run; a corrupt state file is named in a
:class:`BadInputError` with the way out.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pydantic import SecretStr, ValidationError
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

from mlflow_rollout.diagnosis import ContainerEvidence, Evidence, PodEvidence
from mlflow_rollout.errors import BadInputError, PermanentError, RolloutError, TransientError
from mlflow_rollout.redact import redact
from mlflow_rollout.secrets import new_secret_value, read_private, write_private
from mlflow_rollout.server_spec import SECRET_ENV, SecretBundle, ServerSpec
from mlflow_rollout.settings import EnvironmentSettings
from mlflow_rollout.types import DeployResult, Endpoint, LockHolder, LogSource, ProcessState, Revision
from targets.base import good_earlier_revisions, read_auth_evidence
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


#: Set in every server process's environment (inherited by its workers): the
#: state directory that owns it. How orphans are recognised as ours.
OWNER_ENV = "MLFLOW_ROLLOUT_SERVER"


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


def _owned_pids(state_dir: Path) -> list[int]:
    """Live processes whose environment says ``state_dir`` owns them (workers included)."""
    marker = f"{OWNER_ENV}={state_dir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
        except OSError:
            continue
        found.append(int(entry.name))
    return sorted(found)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fingerprint(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
            raise BadInputError(
                f"state directory {self.dir} is not writable ({exc.strerror}): make it writable "
                "(or point MLFLOW_ROLLOUT_STATE_DIR / local.state_dir elsewhere) and run again"
            ) from None
        notes.append(f"state directory {self.dir}")
        notes.append(f"mlflow at {_mlflow_executable()}")
        interrupted = self.mark_interrupted()
        if interrupted:
            notes.append(f"revision(s) {', '.join(map(str, interrupted))} marked interrupted (an earlier run died)")
        running = self._running_pid()
        owned = _owned_pids(self.dir)
        if running is None and owned:
            notes.append(f"port {self.port}: orphaned server processes of this state directory "
                         f"(pids {', '.join(map(str, owned[:6]))}) will be replaced")
        elif running is None and not self._port_free():
            raise BadInputError(
                f"port {self.port} on {self.settings.local.bind_host} is in use by another program "
                "(not an MLflow server of this state directory); stop it or set local.port in the environment file"
            )
        else:
            notes.append(f"port {self.port}: " + (f"our server (pid {running})" if running else "free"))
        tls = self.tls()
        notes.append(f"CA {tls.ca_cert}")
        return notes

    def _port_free(self, port: int | None = None) -> bool:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((self.settings.local.bind_host, port or self.port))
            except OSError:
                return False
        return True

    def operation_lock(self, holder: LockHolder, wait_seconds: float) -> contextlib.AbstractContextManager[None]:
        """An OS file lock in the state directory: the kernel frees it when the holder dies."""
        from mlflow_rollout.locks import file_lock

        try:
            self.ensure_dirs()
        except OSError as exc:
            raise BadInputError(f"state directory {self.dir} cannot be created ({exc.strerror})") from None
        return file_lock(self.dir / "operation.lock", holder, wait_seconds, env=self.settings.name)

    # ---------------------------------------------------------------- secrets
    def store_secrets(self, secrets: SecretBundle, auth_ini: str) -> bool:
        self.ensure_dirs()
        changed = False
        for key, value in secrets.store_items(auth_ini).items():
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

    # ------------------------------------------------------------ auth posture
    @property
    def _auth_marker(self) -> Path:
        return self.dir / "auth-enabled"

    def auth_ever_enabled(self) -> bool:
        """The marker written after deploy-auth, or an auth database that has users (DESIGN §4.18)."""
        if self._auth_marker.exists():
            return True
        uri_file = self.secrets_dir / "auth-database-uri"
        if uri_file.is_file():
            uri = SecretStr(read_private(uri_file))
        elif (self.dir / "auth.db").is_file():
            uri = SecretStr(self.sqlite_uri("auth.db"))
        else:
            return False
        return mlflow_db.auth_db_has_users(uri)

    def mark_auth_enabled(self) -> None:
        """Record that this environment now serves with auth (the one-way switch)."""
        if not self._auth_marker.exists():
            self._auth_marker.write_text(dt.datetime.now(dt.timezone.utc).isoformat() + "\n")

    def discard_bootstrap(self) -> str | None:
        """Stop an auth-off bootstrap server left by a first install that did not finish."""
        info = self._read_server_file()
        if info.get("auth") is False and (self._running_pid() or _owned_pids(self.dir)):
            self.stop()
            return "stopped the auth-off bootstrap server of the unfinished first install"
        return None

    # -------------------------------------------------------------- revisions
    def _revision_files(self) -> list[Path]:
        if not self.revisions_dir.is_dir():
            return []
        return sorted(self.revisions_dir.glob("[0-9]*.json"))

    def history(self) -> list[Revision]:
        revs = []
        for path in self._revision_files():
            try:
                revs.append(Revision.model_validate_json(path.read_bytes()))
            except (ValidationError, ValueError) as exc:
                if isinstance(exc, ValidationError) and exc.errors():
                    err = exc.errors()[0]
                    first = f"{'.'.join(map(str, err.get('loc', ()))) or 'file'}: {err.get('msg', '')}"
                else:
                    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise BadInputError(
                    f"revision file {path} is corrupt ({redact(first)[:120]}); move it aside "
                    f"(mv {path} {path}.corrupt) and run again: revision numbers are never reused and "
                    "whether auth has been on is read from the auth database, so only that record is lost"
                ) from None
            except OSError as exc:
                raise BadInputError(f"revision file {path} cannot be read ({exc.strerror})") from None
        return sorted(revs, key=lambda r: r.number)

    def current_revision(self) -> Revision | None:
        deployed = [r for r in self.history() if r.status == "deployed"]
        return deployed[-1] if deployed else None

    def _save_revision(self, rev: Revision) -> None:
        """Atomically: a crash leaves the old file or the new one, never half of one."""
        path = self.revisions_dir / f"{rev.number:04d}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w") as fh:
            fh.write(rev.model_dump_json(indent=2))
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)

    def _next_number(self) -> int:
        """Never reused: a high-water mark survives a deleted newest revision file."""
        mark = self.revisions_dir / "high-water"
        try:
            high = int(mark.read_text().strip() or 0)
        except (OSError, ValueError):
            high = 0
        files = [int(p.name.split(".")[0]) for p in self._revision_files() if p.name.split(".")[0].isdigit()]
        number = max([high, *files]) + 1
        tmp = mark.with_name(".high-water.tmp")
        tmp.write_text(f"{number}\n")
        tmp.replace(mark)
        return number

    def mark_interrupted(self) -> list[int]:
        """``pending`` revisions whose deploy died with its runner become ``interrupted``.

        Called under the environment lock, so no other deploy is in flight.
        """
        marked = []
        for rev in self.history():
            if rev.status == "pending":
                self._save_revision(rev.model_copy(update={
                    "status": "interrupted", "description": (rev.description + "; interrupted").lstrip("; "),
                }))
                marked.append(rev.number)
        return marked

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
            data = json.loads(self.server_file.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _running_pid(self) -> int | None:
        """The server parent recorded in ``server.json``, if it is alive and ours."""
        pid = self._read_server_file().get("pid")
        if isinstance(pid, int) and _pid_alive(pid):
            return pid
        return None

    def _command(self, spec: ServerSpec, tls: TlsFiles, host: str, port: int) -> list[str]:
        return [
            _mlflow_executable(), "server",
            "--host", host,
            "--port", str(port),
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
        env[OWNER_ENV] = str(self.dir)
        return env

    def _start(self, revision: Revision) -> int:
        """Start ``revision``: auth on at the environment's port; the auth-off bootstrap on a private one."""
        if not revision.spec.auth and self.auth_ever_enabled():
            raise PermanentError(
                f"refusing to start revision {revision.number} without auth: environment "
                f"{self.settings.name!r} has served with auth (its auth database has users)"
            )
        tls = self.tls()
        if revision.spec.auth:
            host, port = self.settings.local.bind_host, self.port
        else:  # DESIGN §4.18: only the rollout reaches the bootstrap server
            host, port = "127.0.0.1", _free_loopback_port()
        cmd = self._command(revision.spec, tls, host, port)
        env = self._environment(revision.spec)
        self.log_file.touch(exist_ok=True)
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
        info = {
            "pid": proc.pid, "pgid": proc.pid, "revision": revision.number, "port": port, "host": host,
            "auth": revision.spec.auth, "log_offset": offset, "started_at": time.time(),
            "workers": revision.spec.workers, "tls_fingerprint": _fingerprint(tls.server_cert),
        }
        tmp = self.server_file.with_name(".server.json.tmp")
        tmp.write_text(json.dumps(info))
        tmp.replace(self.server_file)
        return proc.pid

    def verify_dns(self) -> None:
        return None  # the local target publishes no DNS record

    def stop(self, timeout: float = 30) -> bool:
        """Stop every process of this state directory (the group, and orphans); True if any ran."""
        pid = self._running_pid()
        owned = _owned_pids(self.dir)
        if pid is None and not owned:
            self.pid_file.unlink(missing_ok=True)
            return False
        groups = {g for g in ([pid] if pid else []) + [_pgid(p) for p in owned] if g}
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for group in groups:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(group, sig)
            for p in _owned_pids(self.dir):  # anything that left its group
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(p, sig)
            deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 10)
            while time.monotonic() < deadline and ((pid and _pid_alive(pid)) or _owned_pids(self.dir)):
                time.sleep(0.2)
            if not ((pid and _pid_alive(pid)) or _owned_pids(self.dir)):
                break
        if pid is not None:
            child = _children.pop(pid, None)
            if child is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(timeout=10)
        self.pid_file.unlink(missing_ok=True)
        info = self._read_server_file()
        info["pid"] = None
        with contextlib.suppress(OSError):
            self.server_file.write_text(json.dumps(info))
        return True

    def _log_tail(self, offset: int, lines: int = 25) -> str:
        with open(self.log_file, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
        return redact("\n".join(text.splitlines()[-lines:]))

    def _serving_endpoint(self) -> Endpoint:
        """Where the recorded server listens: the environment's URL, or the bootstrap's private port."""
        info = self._read_server_file()
        if info.get("auth") is False and isinstance(info.get("port"), int):
            return Endpoint(url=f"https://127.0.0.1:{info['port']}", ca_bundle=self.dir / "tls" / "ca.pem")
        return self.endpoint()

    def _probe_health(self, endpoint: Endpoint | None = None) -> None:
        """``/health`` answers 200 over verified TLS; else a TransientError saying why."""
        try:
            with ServerClient(endpoint or self._serving_endpoint(), timeout=5) as client:
                status = client.get("/health").status_code
        except RolloutError:
            raise
        except Exception as exc:  # connection refused, TLS handshake against a half-started server
            raise TransientError(f"/health unreachable: {type(exc).__name__}") from None
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

    def served_auth(self) -> bool | None:
        """Auth as the server itself answers it: anonymous API call 401 → True, 200 → False."""
        try:
            with ServerClient(self._serving_endpoint(), timeout=5) as client:
                code = client.get("/api/2.0/mlflow/experiments/search?max_results=1").status_code
        except Exception:
            return None
        return {401: True, 200: False}.get(code)

    # ----------------------------------------------------------------- deploy
    def deploy(self, spec: ServerSpec) -> DeployResult:
        self.ensure_dirs()
        current = self.current_revision()
        running = self._running_pid()
        info = self._read_server_file()
        if current is not None and current.spec == spec:
            fingerprint = _fingerprint(self.tls().server_cert)  # renews a certificate near expiry
            same = info.get("revision") == current.number and info.get("tls_fingerprint") == fingerprint
            if running is not None and same and self._healthy_now():
                return DeployResult(revision=current.number, changed=False, detail="already running this spec")
            why = "certificate renewed" if running is not None and info.get("tls_fingerprint") != fingerprint else "restarted"
            self.stop()
            pid = self._start(current)
            self._wait_healthy(pid)
            return DeployResult(revision=current.number, changed=True, detail=f"{why}: revision {current.number}")
        return self._roll_to(spec, description="deploy")

    def _roll_to(self, spec: ServerSpec, description: str) -> DeployResult:
        if not spec.auth and self.auth_ever_enabled():
            raise PermanentError(
                f"refusing to deploy a spec with auth off: environment {self.settings.name!r} has served "
                "with auth (its auth database has users)"
            )
        self.mark_interrupted()
        history = self.history()
        number = self._next_number()
        rev = Revision(
            number=number, spec=spec, created_at=dt.datetime.now(dt.timezone.utc),
            status="pending", description=description,
        )
        self._save_revision(rev)
        try:
            # The equivalent of the chart's pre-upgrade hook Job: migrate once, before start.
            mlflow_db.migrate(
                SecretStr(self._secret("backend-store-uri")),
                SecretStr(self._secret("auth-database-uri")) if spec.auth else None,
            )
            self.stop()
            pid = self._start(rev)
            self._wait_healthy(pid)
        except Exception:
            self._save_revision(rev.model_copy(update={"status": "failed"}))
            raise
        for old in history:
            if old.status == "deployed":
                self._save_revision(old.model_copy(update={"status": "superseded"}))
        self._save_revision(rev.model_copy(update={"status": "deployed"}))
        where = f"port {self.port}" if spec.auth else f"private port {self._read_server_file().get('port')} (bootstrap)"
        return DeployResult(revision=number, changed=True, detail=f"revision {number} running (pid {pid}, {where})")

    def rollback_candidates(self) -> list[Revision]:
        """Auth-on revisions that ran healthy once and are not the current one, newest first."""
        current = self.current_revision()
        return good_earlier_revisions(self.history(), current.number if current else None)

    def rollback(self, revision: int, reason: str) -> DeployResult:
        """Deploy revision ``revision``'s spec again, as a new revision (as helm does)."""
        history = self.history()
        old = next((r for r in history if r.number == revision), None)
        valid = ", ".join(str(r.number) for r in self.rollback_candidates()) or "none"
        if old is None:
            raise BadInputError(f"revision {revision} does not exist; valid revisions: {valid}")
        if old.bootstrap:
            raise BadInputError(
                f"revision {revision} ran with auth off (the first install's bootstrap); rolling back to it "
                f"would serve MLflow without authentication; valid revisions: {valid}"
            )
        result = self._roll_to(old.spec, description=f"rollback to {revision}: {reason}")
        return result.model_copy(update={"detail": f"rolled back to revision {revision} as revision {result.revision}"})

    def admin_password(self) -> SecretStr:
        """The admin password from the secret store (what the server was bootstrapped with)."""
        return SecretStr(self._secret("admin-password"))

    def admin_password_store(self) -> str:
        return f"file {self.admin_password_file()}"

    def replace_admin_password(self, password: SecretStr) -> None:
        """A 0600 file beside ``admin-password``, renamed over it (atomic)."""
        self._replace_private(self.admin_password_file(), password)

    def _pending_admin_password_file(self) -> Path:
        return self.secrets_dir / "admin-password.pending"

    def pending_admin_password(self) -> SecretStr | None:
        path = self._pending_admin_password_file()
        return SecretStr(read_private(path)) if path.is_file() else None

    def set_pending_admin_password(self, password: SecretStr | None) -> None:
        if password is None:
            self._pending_admin_password_file().unlink(missing_ok=True)
        else:
            self._replace_private(self._pending_admin_password_file(), password)

    @staticmethod
    def _replace_private(path: Path, value: SecretStr) -> None:
        tmp = path.with_name(path.name + ".tmp")
        write_private(tmp, value.get_secret_value())
        os.replace(tmp, path)

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
        try:
            rev = self.current_revision()
            current = str(rev.number) if rev else "none"
        except RolloutError as exc:
            current = f"unknown ({exc})"
        pid = self._running_pid()
        tail = self._log_tail(0, lines=60) if self.log_file.exists() else "(no log)"
        return "\n".join([
            f"## local target `{self.settings.name}`",
            f"- state directory: {self.dir}",
            f"- current revision: {current}; server pid: {pid}; processes of this state directory: "
            f"{', '.join(map(str, _owned_pids(self.dir))) or 'none'}",
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
            orphans = _owned_pids(self.dir)
            if orphans:
                return [ProcessState(
                    name="mlflow server", ready=False,
                    detail=f"parent gone, orphaned processes {', '.join(map(str, orphans[:6]))}: run a rollout to replace them",
                )]
            return [ProcessState(name="mlflow server", ready=False, detail="not running")]
        return [ProcessState(name=f"mlflow server pid {pid}", ready=self._healthy_now())]

    def evidence(self) -> Evidence:
        """The server process, its log tail, the backend database and the server's answers (best effort).

        The rules about a cluster (S3 through IRSA, the load balancer) have no evidence here and stay silent.
        """
        s = self.settings
        ev = Evidence(environment=s.name, target=self.name, secret=f"files in {self.dir / 'secrets'}",
                      admin_username=s.mlflow.admin_username, admin_store=self.admin_password_store())
        try:
            current = self.current_revision()
            if current is not None:
                ev.revision, ev.revision_auth = current.number, current.spec.auth
            state = self.processes()[0]
            tail = self._log_tail(0, lines=60) if self.log_file.exists() else ""
            ev.pods = [PodEvidence(name=state.name, phase="Running" if self._running_pid() else "Stopped",
                                   ready=state.ready, log=redact(tail),
                                   containers=[ContainerEvidence(name="mlflow", ready=state.ready)])]
            if not state.ready:
                ev.database = mlflow_db.probe_connection(SecretStr(self._secret("backend-store-uri")))
            if state.ready:
                read_auth_evidence(self, ev)
        except Exception as exc:  # noqa: BLE001 - evidence that cannot be read is a note
            ev.notes.append(redact(f"{type(exc).__name__}: {exc}")[:200])
        return ev

    def status(self) -> dict:
        """What actually serves: the live processes, the revision they run, auth as the server answers it."""
        rev = self.current_revision()
        info = self._read_server_file()
        pid = self._running_pid()
        owned = _owned_pids(self.dir)
        serving = info.get("revision") if (pid is not None and isinstance(info.get("revision"), int)) else None
        return {
            "environment": self.settings.name,
            "target": self.name,
            "url": self.endpoint().url,
            "revision": rev.number if rev else None,
            "serving_revision": serving,
            "auth": self.served_auth() if (pid is not None or owned) else None,
            "running": pid is not None,
            "orphaned_pids": owned if pid is None else [],
            "healthy": pid is not None and self._healthy_now(),
            "pid": pid,
            "ca_bundle": str(self.dir / "tls" / "ca.pem"),
            "admin_username": self.settings.mlflow.admin_username,
            "admin_password_file": str(self.admin_password_file()),
            "state_dir": str(self.dir),
            "log_file": str(self.log_file),
        }
