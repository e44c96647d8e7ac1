"""The temporary Prefect API server of one CLI run, owned by the CLI process.

Without ``PREFECT_API_URL`` Prefect starts a temporary server on the first
flow call (``SubprocessASGIServer``) and stops it from ``atexit`` — which
never runs when the CLI is killed with SIGKILL, so the server kept running
(issue 8). The CLI therefore starts that server itself, as a child it owns:

- the child asks the kernel for ``SIGKILL`` when its parent dies
  (``prctl(PR_SET_PDEATHSIG)``), checked right after for the race where the
  parent died first, and a watchdog thread exits when the parent pid goes
  away (belt and braces: also covers a parent that is not Linux-threaded the
  usual way);
- it runs in its own session, so a Ctrl-C in the terminal reaches only the
  CLI: the server stays up while the run records its failed stage and
  releases its lock, and the CLI stops it after;
- its socket is bound by the parent (``127.0.0.1``, a free port) and handed
  over as a file descriptor: no port race, and the URL is known at once.

Settings are those of Prefect's own temporary server (UI off, the API only,
analytics off — else SQLite "database is locked" noise — a 90 s start
timeout), with two differences that make concurrency leases heal: leases are
kept on disk (``PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=…filesystem``, under
``PREFECT_HOME``), so a lease taken by a killed run survives into the next
run's server, and the *repossessor* service runs (Prefect's ephemeral mode
leaves it out), so an expired lease is revoked and its slot freed. The other
background services a full server runs (scheduler, late runs, foreman,
cancellation cleanup, …) stay off, as in ephemeral mode.

A fresh ``PREFECT_HOME`` (no ``prefect.db`` yet) would spend most of the
server's start on Prefect's ~100 Alembic migrations (issue 12: ~7 s of ~11 s).
So the child, before it serves, copies in a *template*: an empty database that
Prefect itself migrated, kept per Prefect version outside any home
(``$MLFLOW_ROLLOUT_PREFECT_DB_TEMPLATE_DIR``, default
``${XDG_CACHE_HOME:-~/.cache}/mlflow-rollout/``). The first fresh start on a
machine builds it: Prefect's own ``create_db()`` on the new home's database,
then an SQLite online backup of that (still empty) database into the cache.
Prefect's start-up still runs its migration step on the copy (a no-op at
head: ~0.1 s) and its block registration, so the result is what Prefect would
have built. Only for the default kind of database (an SQLite file); never
over an existing file. ``MLFLOW_ROLLOUT_PREFECT_DB_TEMPLATE=0`` turns it off.

When ``PREFECT_API_URL`` is set nothing is started and nothing changes.

Server output goes to ``$PREFECT_HOME/mlflow-rollout-prefect-server.log``, not
the terminal.

Run as ``python -m mlflow_rollout.prefect_server --parent PID --fd FD`` it is
the child side. That side imports only the standard library before it has
armed the parent-death signal.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["temporary_api", "TemporaryPrefectServer", "SERVER_ENV", "LOG_NAME"]

#: Environment of the server process (on top of the CLI's own).
SERVER_ENV: dict[str, str] = {
    "PREFECT_UI_ENABLED": "0",
    "PREFECT__SERVER_FINAL": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
    # Not ephemeral mode (which would leave the repossessor out); the services a
    # CLI run has no use for are switched off one by one instead.
    "PREFECT_SERVER_SERVICES_REPOSSESSOR_ENABLED": "true",
    "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "5",
    "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_FOREMAN_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_PAUSE_EXPIRATIONS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_CLEANUP_RECONCILER_ENABLED": "false",
}
LOG_NAME = "mlflow-rollout-prefect-server.log"
DEFAULT_STARTUP_TIMEOUT = 90.0
_PR_SET_PDEATHSIG = 1


class TemporaryPrefectServer:
    """One Prefect API server process, a child of this process; ``start()``, ``stop()``."""

    def __init__(self, home: Path, *, startup_timeout: float = DEFAULT_STARTUP_TIMEOUT):
        self.home = home
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self.log_path = home / LOG_NAME

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> str:
        """Start the server and wait until ``/api/health`` answers; its API URL."""
        from prefect.settings import get_current_settings

        self.home.mkdir(parents=True, exist_ok=True)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
            sock.listen(128)
            self.port = sock.getsockname()[1]
            env = {
                **os.environ,
                **get_current_settings().to_environment_variables(exclude_unset=True),
                **SERVER_ENV,
            }
            env.pop("PREFECT_API_URL", None)
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", __name__, "--parent", str(os.getpid()), "--fd", str(sock.fileno())],
                    env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    pass_fds=(sock.fileno(),), start_new_session=True, close_fds=True,
                )
        finally:
            sock.close()  # the child has its own copy
        started = time.monotonic()
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        with contextlib.suppress(OSError):  # for benchmarks/cli_start.py and anyone reading the log
            with open(self.log_path, "a") as log:
                log.write(f"mlflow-rollout: server healthy after {time.monotonic() - started:.3f}s\n")
        return self.api_url

    def _wait_healthy(self) -> None:
        import httpx

        deadline = time.monotonic() + self.startup_timeout
        with httpx.Client(timeout=5) as client:
            while True:
                code = self.process.poll() if self.process else -1
                if code is not None:
                    raise RuntimeError(
                        f"the temporary Prefect server exited with code {code} while starting; "
                        f"its log: {self.log_path}"
                    )
                try:
                    if client.get(f"{self.api_url}/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the temporary Prefect server did not answer within {self.startup_timeout:.0f}s; "
                        f"its log: {self.log_path}"
                    )
                time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``); safe to call twice."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()


def _api_url_configured() -> bool:
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


@contextlib.contextmanager
def temporary_api() -> Iterator[str | None]:
    """Make sure the flows of this block have a Prefect API.

    With ``PREFECT_API_URL`` set (or ephemeral servers disabled) this does
    nothing and yields ``None``. Otherwise a :class:`TemporaryPrefectServer`
    is started, every thread of this process is pointed at it for the block
    (the process-wide settings context), and it is stopped at the end.
    """
    if _api_url_configured():
        yield None
        return
    import prefect.context
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        get_current_settings,
    )

    if not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        yield None  # Prefect itself says that an API URL is needed
        return
    settings = get_current_settings()
    timeout = max(float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value() or 0), DEFAULT_STARTUP_TIMEOUT)
    server = TemporaryPrefectServer(Path(settings.home), startup_timeout=timeout)
    try:
        url = server.start()
        current = prefect.context.get_settings_context()
        pointed = prefect.context.SettingsContext(
            profile=current.profile, settings=current.settings.copy_with_update(updates={PREFECT_API_URL: url})
        )
        saved_global = prefect.context.GLOBAL_SETTINGS_CONTEXT
        prefect.context.GLOBAL_SETTINGS_CONTEXT = pointed  # threads without a context of their own
        try:
            with pointed:
                try:
                    yield url
                finally:
                    _drain_prefect_workers()
        finally:
            prefect.context.GLOBAL_SETTINGS_CONTEXT = saved_global
    finally:
        server.stop()


def _drain_prefect_workers(timeout: float = 10.0) -> None:
    """Send the logs and events still queued before the server goes away."""
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=timeout)
        EventsWorker.drain_all(timeout=timeout)
    except Exception:  # nothing to drain, or already stopped
        pass


# --- the child side -----------------------------------------------------------------------------


def _arm_parent_death_signal(parent: int) -> None:
    """SIGKILL this process when the parent dies; exit now if it already has."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the watchdog alone
    if os.getppid() != parent:
        os._exit(0)


def _watchdog(parent: int, interval: float = 0.5) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(0)
        time.sleep(interval)


TEMPLATE_ENV = "MLFLOW_ROLLOUT_PREFECT_DB_TEMPLATE"
TEMPLATE_DIR_ENV = "MLFLOW_ROLLOUT_PREFECT_DB_TEMPLATE_DIR"


def _sqlite_file() -> Path | None:
    """The server's database file when it is an SQLite file (the default), else ``None``."""
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    url = PREFECT_API_DATABASE_CONNECTION_URL.value()
    url = url.get_secret_value() if hasattr(url, "get_secret_value") else url
    prefix = "sqlite+aiosqlite:///"
    if not url or not url.startswith(prefix) or "?" in url or ":memory:" in url or url[len(prefix):].startswith("file:"):
        return None
    return Path(url[len(prefix):])


def _template_file() -> Path | None:
    if os.environ.get(TEMPLATE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    import prefect

    base = os.environ.get(TEMPLATE_DIR_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mlflow-rollout"
    )
    return Path(base) / f"prefect-{prefect.__version__}-empty.db"


def _prepare_database() -> None:
    """Give a fresh home its database from the template (or build the template); see the module docstring."""
    db, template = _sqlite_file(), _template_file()
    if db is None or template is None:
        return
    if any(Path(f"{db}{suffix}").exists() for suffix in ("", "-wal", "-shm", "-journal")):
        return  # not fresh: Prefect's own start-up as always
    db.parent.mkdir(parents=True, exist_ok=True)
    if template.is_file():
        tmp = db.with_name(f".{db.name}.{os.getpid()}.tmp")
        try:
            import shutil

            shutil.copyfile(template, tmp)
            os.link(tmp, db)  # never over a database another server created meanwhile
            print(f"mlflow-rollout: database copied from {template}", flush=True)
        except OSError as exc:
            print(f"mlflow-rollout: database template not used ({exc!r})", flush=True)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        return
    # No template yet: migrate this home's (empty) database the way Prefect's start-up would, keep a copy.
    import asyncio
    import sqlite3

    from prefect.server.database import provide_database_interface

    asyncio.run(provide_database_interface().create_db())
    tmp = template.with_name(f".{template.name}.{os.getpid()}.tmp")
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        src, dst = sqlite3.connect(db), sqlite3.connect(tmp)
        try:
            src.backup(dst)  # a consistent snapshot, WAL included
        finally:
            dst.close()
            src.close()
        os.replace(tmp, template)
        print(f"mlflow-rollout: database template saved to {template}", flush=True)
    except (OSError, sqlite3.Error) as exc:
        print(f"mlflow-rollout: database template not saved ({exc!r})", flush=True)
        with contextlib.suppress(OSError):
            tmp.unlink()


def _serve(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m mlflow_rollout.prefect_server")
    p.add_argument("--parent", type=int, required=True)
    p.add_argument("--fd", type=int, required=True)
    args = p.parse_args(argv)
    _arm_parent_death_signal(args.parent)
    threading.Thread(target=_watchdog, args=(args.parent,), name="parent-watchdog", daemon=True).start()

    _prepare_database()
    import uvicorn

    sock = socket.socket(fileno=args.fd)
    config = uvicorn.Config(
        "prefect.server.api.server:create_app", factory=True, log_level="error", lifespan="on",
        timeout_graceful_shutdown=5,
    )
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    raise SystemExit(_serve(sys.argv[1:]))
