"""Real services for tests, started as subprocesses on loopback ports.

The tests talk to the same kinds of servers the product talks to (DESIGN §7):
``moto_server`` for the AWS APIs and a real PostgreSQL 15 for MLflow's
backend store. These are plain context managers, usable from pytest fixtures
(``tests/conftest.py``) or from a script.

Each service writes its log to a file in a temporary directory (never to the
test output); when a service fails to start, the error carries its log tail.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

__all__ = [
    "ServiceError",
    "free_port",
    "MotoServer",
    "moto_server",
    "PostgresServer",
    "postgres_server",
    "postgres_bin",
]


class ServiceError(RuntimeError):
    """A test service could not be started (missing binary, crashed at start)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now.

    There is a small window before the caller binds it; the starters below
    retry with a new port when a server dies at start.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    """Terminate, wait, then kill: never leave a server behind."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


# --------------------------------------------------------------------------
# moto


@dataclass(frozen=True)
class MotoServer:
    """A running ``moto_server``: every AWS service on one endpoint."""

    endpoint_url: str
    port: int
    log_path: Path

    def client(self, service: str, region: str = "us-west-2"):
        """A boto3 client for ``service`` pointed at this server."""
        import boto3

        return boto3.client(service, region_name=region, endpoint_url=self.endpoint_url)

    def reset(self) -> None:
        """Forget every resource (moto's reset API)."""
        req = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(req, timeout=10):
            pass


def _http_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer means the server is up
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def moto_server(startup_timeout: float = 30, attempts: int = 3) -> Iterator[MotoServer]:
    """Run ``moto_server -H 127.0.0.1 -p PORT`` from this interpreter's bin dir.

    ``MOTO_ACM_VALIDATION_WAIT=1`` so ACM certificates become ISSUED at once
    instead of after 60 s (DESIGN §7).
    """
    binary = Path(sys.executable).parent / "moto_server"
    if not binary.exists():
        found = shutil.which("moto_server")
        if not found:
            raise ServiceError(f"moto_server not found next to {sys.executable} or on PATH; install moto[server]")
        binary = Path(found)
    workdir = Path(tempfile.mkdtemp(prefix="moto-"))
    log_path = workdir / "moto.log"
    env = {**os.environ, "MOTO_ACM_VALIDATION_WAIT": "1"}
    proc: subprocess.Popen | None = None
    try:
        for _ in range(attempts):
            port = free_port()
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(
                    [str(binary), "-H", "127.0.0.1", "-p", str(port)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    cwd=workdir,
                )
            endpoint = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + startup_timeout
            while time.monotonic() < deadline and proc.poll() is None:
                if _http_answers(f"{endpoint}/moto-api/"):
                    break
                time.sleep(0.1)
            if proc.poll() is None and _http_answers(f"{endpoint}/moto-api/"):
                break
            _stop(proc)  # died (port taken?) or too slow: try another port
            proc = None
        if proc is None:
            raise ServiceError(f"moto_server did not start; log {log_path}:\n{_log_tail(log_path)}")
        yield MotoServer(endpoint_url=endpoint, port=port, log_path=log_path)
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------
# PostgreSQL


def postgres_bin(name: str) -> str:
    """Path of a PostgreSQL program: on PATH, else ``/usr/lib/postgresql/<ver>/bin``."""
    found = shutil.which(name)
    if found:
        return found
    for bindir in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        candidate = bindir / name
        if candidate.exists():
            return str(candidate)
    raise ServiceError(
        f"PostgreSQL program {name!r} not found on PATH or in /usr/lib/postgresql/*/bin "
        "(install postgresql-15; scripts/setup.sh does it)"
    )


@dataclass(frozen=True)
class PostgresServer:
    """A running PostgreSQL with a role ``mlflow`` owning a database ``mlflow``.

    ``mlflow`` authenticates over TCP with its password (scram-sha-256), as an
    RDS user would. The superuser ``postgres`` connects over the Unix socket
    in ``socket_dir`` without a password (``admin_connect``).
    """

    host: str
    port: int
    user: str
    password: str
    database: str
    socket_dir: Path
    data_dir: Path

    @property
    def uri(self) -> str:
        return self.uri_for(self.database)

    def uri_for(self, database: str) -> str:
        """The URI of ``database`` as the ``mlflow`` role."""
        return (
            f"postgresql://{quote(self.user, safe='')}:{quote(self.password, safe='')}"
            f"@{self.host}:{self.port}/{quote(database, safe='')}"
        )

    def admin_connect(self, database: str = "postgres"):
        """A psycopg2 connection as the superuser (autocommit on)."""
        import psycopg2

        conn = psycopg2.connect(host=str(self.socket_dir), port=self.port, user="postgres", dbname=database)
        conn.autocommit = True
        return conn

    def create_database(self, name: str) -> str:
        """Create a database owned by ``mlflow`` (fresh per test) and return its URI."""
        from psycopg2 import sql

        conn = self.admin_connect()
        try:
            with conn.cursor() as cur:
                cur.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(self.user))
                )
        finally:
            conn.close()
        return self.uri_for(name)

    def drop_database(self, name: str) -> None:
        """Drop a database made by :meth:`create_database`, disconnecting its users."""
        from psycopg2 import sql

        conn = self.admin_connect()
        try:
            with conn.cursor() as cur:
                cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        finally:
            conn.close()


def _as_postgres_user() -> tuple[list[str], int, int] | None:
    """``(runuser prefix, uid, gid)`` when running as root, else None.

    PostgreSQL refuses to run as root; as root we run its programs as the
    ``postgres`` OS user and hand it the directories it needs.
    """
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        raise ServiceError("running as root but there is no 'postgres' OS user to run PostgreSQL as") from None
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    return [runuser, "-u", "postgres", "--"], entry.pw_uid, entry.pw_gid


@contextlib.contextmanager
def postgres_server(
    password: str | None = None, startup_timeout: float = 60, attempts: int = 3
) -> Iterator[PostgresServer]:
    """Run a throw-away PostgreSQL 15 on a free loopback port.

    ``password`` is the ``mlflow`` role's password (random when omitted).
    Stopped with ``pg_ctl stop -m immediate`` and its directory removed after.
    """
    import psycopg2
    from psycopg2 import sql

    initdb, pg_ctl = postgres_bin("initdb"), postgres_bin("pg_ctl")
    password = password or secrets.token_urlsafe(18)
    as_pg = _as_postgres_user()
    prefix = as_pg[0] if as_pg else []

    base = Path(tempfile.mkdtemp(prefix="pg-test-"))
    data_dir, socket_dir, log_path = base / "data", base / "sock", base / "postgres.log"
    pwfile = base / "superuser-password"
    socket_dir.mkdir()
    pwfile.write_text(secrets.token_urlsafe(18) + "\n")
    if as_pg:
        _, uid, gid = as_pg
        # The postgres user must own the data dir's parent (initdb creates
        # data/), the socket dir and the log; mkdtemp made them 0700 root.
        for path in (base, socket_dir, pwfile):
            os.chown(path, uid, gid)
    os.chmod(base, 0o700)

    def run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            prefix + argv, cwd=base, capture_output=True, text=True, timeout=timeout, check=False,
            stdin=subprocess.DEVNULL,
        )

    started = False
    try:
        result = run(
            [initdb, "-D", str(data_dir), "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync",
             "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
        )
        if result.returncode != 0:
            raise ServiceError(f"initdb failed ({result.returncode}):\n{result.stderr or result.stdout}")

        for _ in range(attempts):
            port = free_port()
            options = " ".join(
                [
                    "-c listen_addresses=127.0.0.1",
                    f"-c port={port}",
                    f"-k {shlex.quote(str(socket_dir))}",
                    # A test database: durability is not the point, speed is.
                    "-c fsync=off -c synchronous_commit=off -c full_page_writes=off",
                ]
            )
            result = run(
                [pg_ctl, "-D", str(data_dir), "-l", str(log_path), "-o", options, "-w",
                 "-t", str(int(startup_timeout)), "start"],
                timeout=startup_timeout + 30,
            )
            if result.returncode == 0:
                started = True
                break
        if not started:
            raise ServiceError(f"PostgreSQL did not start; log {log_path}:\n{_log_tail(log_path)}")

        server = PostgresServer(
            host="127.0.0.1", port=port, user="mlflow", password=password, database="mlflow",
            socket_dir=socket_dir, data_dir=data_dir,
        )
        conn = server.admin_connect()
        try:
            with conn.cursor() as cur:
                cur.execute(
                    sql.SQL("CREATE ROLE {} LOGIN PASSWORD %s").format(sql.Identifier(server.user)), (password,)
                )
                cur.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(server.database), sql.Identifier(server.user)
                    )
                )
        finally:
            conn.close()
        # Ready for clients: the role logs in over TCP with its password.
        psycopg2.connect(server.uri, connect_timeout=10).close()
        yield server
    finally:
        if started:
            run([pg_ctl, "-D", str(data_dir), "stop", "-m", "immediate", "-w"], timeout=60)
        shutil.rmtree(base, ignore_errors=True)
