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

Start time (issue 12). The child prepares the database before it serves:

- A fresh ``PREFECT_HOME`` (no ``prefect.db`` yet) would spend most of the
  start on Prefect's ~100 Alembic migrations (~7 s of ~11 s). It gets a copy
  of a *template* instead: an empty database that Prefect itself migrated and
  registered its blocks in, kept per Prefect version and set of installed
  collections outside any home (``$MLFLOW_ROLLOUT_PREFECT_DB_TEMPLATE_DIR``,
  default ``${XDG_CACHE_HOME:-~/.cache}/mlflow-rollout/``). The first fresh
  start on a machine builds it (Prefect's ``create_db()`` and
  ``run_block_auto_registration()``, then an SQLite online backup). Never over
  an existing file.
- Prefect's block registration imports every installed collection at every
  start, only to find (memo) that nothing changed: ~1.5 s, the Kubernetes
  worker's collection. A database is marked once it holds the registration
  (``prefect.db.mlflow-rollout-blocks.json``: Prefect's version and the
  collections' versions, and the block rows it then held); a marked database
  whose rows are still there starts with registration off. An unmarked one
  (an older home, a reset) is migrated and registered by the child with
  Prefect's own calls, then marked.

Prefect's start-up still runs its migration check (a no-op at head, ~0.1 s),
so the result is what Prefect would have built. Only for the default kind of
database (an SQLite file). ``MLFLOW_ROLLOUT_PREFECT_DB_TEMPLATE=0`` turns
both off (Prefect's own start-up: the benchmark's baseline).

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
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["temporary_api", "start_early", "stop_early", "TemporaryPrefectServer", "SERVER_ENV", "LOG_NAME"]

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
        self._spawned = 0.0

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> str:
        """Start the server and wait until ``/api/health`` answers; its API URL.

        The server gets this process's Prefect settings as environment
        variables (also those set in code, e.g. ``temporary_settings``).
        """
        from prefect.settings import get_current_settings

        self.spawn(get_current_settings().to_environment_variables(exclude_unset=True))
        return self.wait()

    def spawn(self, settings_env: Mapping[str, str] | None = None) -> None:
        """Start the server process and return at once (see :meth:`wait`).

        ``settings_env``: Prefect settings to hand over on top of this
        process's environment; without it the child reads its settings from
        the same places this process would (environment, profile, ``.env``),
        which lets the CLI start it before Prefect is imported here.
        """
        self.home.mkdir(parents=True, exist_ok=True)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
            sock.listen(128)
            self.port = sock.getsockname()[1]
            env = {**os.environ, **(settings_env or {}), **SERVER_ENV}
            env.pop("PREFECT_API_URL", None)
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", __name__, "--parent", str(os.getpid()), "--fd", str(sock.fileno())],
                    env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    pass_fds=(sock.fileno(),), start_new_session=True, close_fds=True,
                )
        finally:
            sock.close()  # the child has its own copy
        self._spawned = time.monotonic()

    def wait(self) -> str:
        """Wait until the spawned server answers ``/api/health``; its API URL (stops it on failure)."""
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        with contextlib.suppress(OSError):  # for benchmarks/cli_start.py and anyone reading the log
            with open(self.log_path, "a") as log:
                log.write(f"mlflow-rollout: server healthy after {time.monotonic() - self._spawned:.3f}s\n")
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


#: The server :func:`start_early` started; :func:`temporary_api` takes it over.
_early: TemporaryPrefectServer | None = None


def default_home() -> Path:
    """Prefect's home without importing Prefect: ``PREFECT_HOME``, else Prefect's default ``~/.prefect``."""
    return Path(os.path.expandvars(os.environ.get("PREFECT_HOME") or "~/.prefect")).expanduser()


def start_early() -> None:
    """Start this process's temporary server now, before Prefect is imported here.

    The CLI's first step (issue 12): the child's start — mostly importing
    Prefect's server, 3–4 s — then runs beside this process's own imports
    (~1.5–2 s) instead of after them. The child is started without exported
    settings and reads them from where this process would (environment,
    profile, ``.env``), so this is only for a process that sets none in code:
    the CLI. :func:`temporary_api` takes the server over when its own checks
    agree (no API URL, temporary servers allowed, the same home), else stops
    it; :func:`stop_early` stops one that nobody took. Nothing happens when
    ``PREFECT_API_URL`` is set.
    """
    global _early
    if _early is not None or os.environ.get("PREFECT_API_URL") or _profile_sets_api_url():
        return
    server = TemporaryPrefectServer(default_home())
    try:
        server.spawn()
    except OSError:
        return  # temporary_api() starts one the usual way, and reports what fails
    _early = server


def _profile_sets_api_url() -> bool:
    """The active Prefect profile has ``PREFECT_API_URL`` (``prefect config set …``): no temporary server then.

    Read with the standard library, as Prefect would find it (``PREFECT_PROFILES_PATH``, else
    ``$PREFECT_HOME/profiles.toml``; ``PREFECT_PROFILE``, else the file's ``active``). An API URL set some
    other way (``.env``, ``prefect.toml``) only costs a server started and stopped for nothing.
    """
    import tomllib

    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or default_home() / "profiles.toml").expanduser()
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, ValueError):
        return False
    active = os.environ.get("PREFECT_PROFILE") or data.get("active") or "ephemeral"
    profile = (data.get("profiles") or {}).get(active) or {}
    return isinstance(profile, dict) and bool(profile.get("PREFECT_API_URL"))


def stop_early() -> None:
    """Stop the server :func:`start_early` started if :func:`temporary_api` did not take it over."""
    global _early
    server, _early = _early, None
    if server is not None:
        server.stop()


@contextlib.contextmanager
def temporary_api() -> Iterator[str | None]:
    """Make sure the flows of this block have a Prefect API.

    With ``PREFECT_API_URL`` set (or ephemeral servers disabled) this does
    nothing and yields ``None``. Otherwise a :class:`TemporaryPrefectServer`
    is started (or the one :func:`start_early` started is taken over), every
    thread of this process is pointed at it for the block (the process-wide
    settings context), and it is stopped at the end.
    """
    global _early
    early, _early = _early, None
    try:
        if _api_url_configured():
            early = _discard(early)
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
            early = _discard(early)
            yield None  # Prefect itself says that an API URL is needed
            return
        settings = get_current_settings()
        timeout = max(float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value() or 0), DEFAULT_STARTUP_TIMEOUT)
        home = Path(settings.home)
        if early is not None and early.home.resolve() == home.resolve():
            server, early = early, None
            server.startup_timeout = timeout
            url = server.wait()
        else:
            early = _discard(early)
            server = TemporaryPrefectServer(home, startup_timeout=timeout)
            url = server.start()
        try:
            pointed = _with_updates(prefect.context.get_settings_context(), {PREFECT_API_URL: url})
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
    finally:
        _discard(early)  # an interrupt while deciding


def _discard(server: TemporaryPrefectServer | None) -> None:
    if server is not None:
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
#: Next to the database: the block registration it holds (see :func:`_prepare_database`).
BLOCKS_MARK_SUFFIX = ".mlflow-rollout-blocks.json"


def _sqlite_file() -> Path | None:
    """The server's database file when it is an SQLite file (the default), else ``None``."""
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    url = PREFECT_API_DATABASE_CONNECTION_URL.value()
    url = url.get_secret_value() if hasattr(url, "get_secret_value") else url
    prefix = "sqlite+aiosqlite:///"
    if not url or not url.startswith(prefix) or "?" in url or ":memory:" in url or url[len(prefix):].startswith("file:"):
        return None
    return Path(url[len(prefix):])


def _blocks_key() -> str:
    """What Prefect's block registration depends on: its version and the installed collections.

    The input of Prefect's own memo (``memo_store.toml``) minus the block
    registry itself, which only importing every collection would give (the
    Kubernetes worker's collection alone: ~1.5 s at every start).
    """
    import hashlib
    import json
    from importlib.metadata import entry_points

    import prefect

    collections = sorted(
        (ep.name, ep.value, ep.dist.name if ep.dist else "", ep.dist.version if ep.dist else "")
        for ep in entry_points(group="prefect.collections")
    )
    return hashlib.sha256(json.dumps([prefect.__version__, collections]).encode()).hexdigest()[:16]


def _block_rows(db: Path) -> list[int] | None:
    """How many block types and schemas ``db`` holds (``None``: unreadable)."""
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return [con.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in ("block_type", "block_schema")]
        finally:
            con.close()
    except sqlite3.Error:
        return None


def _blocks_mark(db: Path) -> Path:
    return db.with_name(db.name + BLOCKS_MARK_SUFFIX)


def _blocks_registered(db: Path, key: str) -> bool:
    """``db`` holds what Prefect's registration would write: marked for this key, and the rows still there."""
    import json

    try:
        mark = json.loads(_blocks_mark(db).read_text())
    except (OSError, ValueError):
        return False
    rows = _block_rows(db)
    return isinstance(mark, dict) and mark.get("key") == key and rows is not None and mark.get("rows") == rows


def _register_blocks(db: Path, key: str) -> None:
    """Migrate ``db`` and register Prefect's blocks in it — what the server's start-up does — and mark it."""
    import asyncio
    import json

    import prefect.plugins
    from prefect.server.database import provide_database_interface
    from prefect.server.models.block_registration import run_block_auto_registration

    async def register() -> None:
        database = provide_database_interface()
        await database.create_db()
        prefect.plugins.load_prefect_collections()  # their blocks join the registry, as in Prefect's start-up
        async with await database.session() as session:
            await run_block_auto_registration(session=session)

    asyncio.run(register())
    rows = _block_rows(db)
    if rows is not None:
        tmp = _blocks_mark(db).with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "rows": rows}))
        os.replace(tmp, _blocks_mark(db))


def _prepared_start_enabled() -> bool:
    """``MLFLOW_ROLLOUT_PREFECT_DB_TEMPLATE=0``: Prefect's own start-up, nothing prepared (a baseline)."""
    return os.environ.get(TEMPLATE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _template_file(key: str) -> Path:
    import prefect

    base = os.environ.get(TEMPLATE_DIR_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mlflow-rollout"
    )
    return Path(base) / f"prefect-{prefect.__version__}-{key}.db"


def _prepare_database() -> None:
    """Have the server's database ready before the server starts; see the module docstring.

    A fresh home gets a copy of the template (or builds it). A database that
    holds this key's block registration gets ``…BLOCKS_REGISTER_ON_START=false``;
    one that does not is migrated and registered here, the same calls
    Prefect's start-up makes, and marked. The server's own start-up then
    only checks migrations.
    """
    from prefect.settings import (
        PREFECT_API_BLOCKS_REGISTER_ON_START,
        PREFECT_API_DATABASE_MIGRATE_ON_START,
        PREFECT_MEMOIZE_BLOCK_AUTO_REGISTRATION,
    )

    db = _sqlite_file()
    if db is None or not _prepared_start_enabled():
        return  # another database, or turned off: Prefect's own start-up, untouched
    if not (PREFECT_API_DATABASE_MIGRATE_ON_START.value() and PREFECT_API_BLOCKS_REGISTER_ON_START.value()):
        return  # start-up steps someone turned off: not ours to do either
    key = _blocks_key()
    template = _template_file(key)
    fresh = not any(Path(f"{db}{suffix}").exists() for suffix in ("", "-wal", "-shm", "-journal"))
    db.parent.mkdir(parents=True, exist_ok=True)
    if fresh and template.is_file():
        _copy_template(template, db)
    if not _blocks_registered(db, key):
        _register_blocks(db, key)
        if fresh and not template.is_file():
            _save_template(db, template)
    if _blocks_registered(db, key):
        # Both: with the memo on, Prefect imports every collection just to hash the registry.
        _update_settings({PREFECT_API_BLOCKS_REGISTER_ON_START: False, PREFECT_MEMOIZE_BLOCK_AUTO_REGISTRATION: False})


def _update_settings(updates: dict) -> None:
    """Change this process's Prefect settings (built when Prefect was imported, so not via the environment)."""
    import prefect.context

    prefect.context.GLOBAL_SETTINGS_CONTEXT = _with_updates(prefect.context.GLOBAL_SETTINGS_CONTEXT, updates)


def _with_updates(current: Any, updates: dict) -> Any:
    """A copy of the settings context ``current`` (a ``prefect.context.SettingsContext``) with ``updates``."""
    import prefect.context

    return prefect.context.SettingsContext(
        profile=current.profile, settings=current.settings.copy_with_update(updates=updates)
    )


def _copy_template(template: Path, db: Path) -> None:
    import shutil

    tmp = db.with_name(f".{db.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(template, tmp)
        os.link(tmp, db)  # never over a database another server created meanwhile
        mark = Path(f"{template}{BLOCKS_MARK_SUFFIX}")
        if mark.is_file():
            shutil.copyfile(mark, _blocks_mark(db))
        print(f"mlflow-rollout: database copied from {template}", flush=True)
    except OSError as exc:
        print(f"mlflow-rollout: database template not used ({exc!r})", flush=True)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _save_template(db: Path, template: Path) -> None:
    """Keep a copy of a just-built database (migrated, blocks registered, nothing else) as the template."""
    import shutil
    import sqlite3

    tmp = template.with_name(f".{template.name}.{os.getpid()}.tmp")
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        src, dst = sqlite3.connect(db), sqlite3.connect(tmp)
        try:
            src.backup(dst)  # a consistent snapshot, WAL included
        finally:
            dst.close()
            src.close()
        shutil.copyfile(_blocks_mark(db), Path(f"{template}{BLOCKS_MARK_SUFFIX}"))
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
