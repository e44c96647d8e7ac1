"""MLflow's databases: schema migrations and the bootstrap admin.

Why here and not in the server: MLflow replicas migrate on start with no
cross-process lock and refuse to start on an out-of-date schema (DESIGN
§4.13). So a deploy migrates *once* before starting anything — the chart does
it in a pre-upgrade hook Job, the local target through :func:`migrate`. Both
decide what a database needs (new, current, upgrade, refused) with the same
code: the chart's ``files/migrate.py``, which must run standalone in the Job,
is loaded here (:func:`chart_migrate`) rather than copied.

The admin: MLflow creates it at the auth app's first start from
``MLFLOW_AUTH_ADMIN_PASSWORD`` and ignores the variable afterwards (§4.2).
:func:`ensure_admin` makes that explicit and observable: create the admin if
absent, and if present, prove the stored password still opens it — a
mismatch is a permanent error that says how to rotate, instead of a confusing
401 later.

URIs arrive as :class:`SecretStr` and never reach argv or a message.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Literal

from pydantic import SecretStr

from mlflow_rollout.diagnosis import DatabaseProbe
from mlflow_rollout.errors import PermanentError, TransientError
from mlflow_rollout.redact import redact
from mlflow_rollout.settings import PROJECT_ROOT

__all__ = ["migrate", "ensure_admin", "AdminState", "auth_db_has_users", "probe_connection", "chart_migrate", "CHART_MIGRATE"]

#: The chart's migration script: the one copy of the schema decision.
CHART_MIGRATE = PROJECT_ROOT / "charts" / "mlflow" / "files" / "migrate.py"


@functools.cache
def chart_migrate(path: Path = CHART_MIGRATE) -> ModuleType:
    """``charts/mlflow/files/migrate.py`` as a module (it stays a standalone script inside the chart)."""
    if not path.is_file():
        raise PermanentError(f"{path} is missing: the checkout's chart holds the schema migration code")
    spec = importlib.util.spec_from_file_location("mlflow_rollout_chart_migrate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: What :func:`migrate` and :func:`ensure_admin` import on first use: ~3 s together (MLflow's store and auth app).
HEAVY_IMPORTS = ("mlflow.store.db.utils", "mlflow.server.auth.sqlalchemy_store")


def preload() -> None:
    """Import now what this module's calls would import on first use; any error is left to those calls.

    For a thread of the CLI while it waits for its temporary Prefect server (issue 12): the deploy and
    admin-bootstrap stages then find MLflow imported.
    """
    for name in HEAVY_IMPORTS:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the stage that needs it imports it again and reports
            pass


def _engine(uri: SecretStr, *, connect_timeout: float | None = None):
    """MLflow's engine (it retries a failing connection for minutes); with ``connect_timeout``,
    one bounded attempt without a pool instead."""
    raw = uri.get_secret_value()
    if connect_timeout is None:
        from mlflow.store.db.utils import create_sqlalchemy_engine_with_retry

        return create_sqlalchemy_engine_with_retry(raw)
    import sqlalchemy

    bounded = raw.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "postgres", "mysql", "mariadb")
    connect_args = {"connect_timeout": max(1, math.ceil(connect_timeout))} if bounded else {}
    return sqlalchemy.create_engine(raw, connect_args=connect_args, poolclass=sqlalchemy.pool.NullPool)


def _db_error(what: str, exc: Exception) -> Exception:
    import sqlalchemy.exc

    msg = redact(f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    if isinstance(exc, sqlalchemy.exc.OperationalError):
        return TransientError(msg)
    return PermanentError(msg)


def migrate(backend_store_uri: SecretStr, auth_database_uri: SecretStr | None) -> str:
    """Bring the tracking schema (and the auth schema) to head as the chart's Job does; idempotent.

    A database no migration may start from (see ``migrate.py``'s ``tracking_action``) is a
    :class:`PermanentError` that says what to do. Returns what was done.
    """
    m = chart_migrate()
    try:
        engine = _engine(backend_store_uri)
        try:
            done = m.migrate_tracking_engine(engine)
        finally:
            engine.dispose()
    except m.SchemaRefused as exc:
        raise PermanentError(redact(f"tracking database migration refused: {exc}")) from None
    except Exception as exc:
        raise _db_error("tracking database migration failed", exc) from None
    if auth_database_uri is not None:
        try:
            engine = _engine(auth_database_uri)
            try:
                m.migrate_auth_engine(engine)
            finally:
                engine.dispose()
        except Exception as exc:
            raise _db_error("auth database migration failed", exc) from None
    return f"tracking store {done}" + ("; auth store at head" if auth_database_uri is not None else "")


@dataclass(frozen=True)
class AdminState:
    username: str
    action: Literal["created", "verified"]


def ensure_admin(auth_database_uri: SecretStr, username: str, password: SecretStr) -> AdminState:
    """Create the admin with ``password`` if absent; else check the password opens it."""
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore()
    try:
        store.init_db(auth_database_uri.get_secret_value())
        try:
            if not store.has_user(username, use_primary=True):
                store.create_user(username, password.get_secret_value(), is_admin=True)
                return AdminState(username, "created")
            if not store.authenticate_user(username, password.get_secret_value(), use_primary=True):
                raise PermanentError(
                    f"admin user {username!r} exists but the stored admin password does not open it; "
                    "MLflow ignores MLFLOW_AUTH_ADMIN_PASSWORD once the admin exists. Put the current "
                    "password back into the secret, or rotate it with PATCH "
                    "/api/2.0/mlflow/users/update-password and then update the secret"
                )
            if not store.get_user(username).is_admin:
                raise PermanentError(f"user {username!r} exists but is not an admin")
            return AdminState(username, "verified")
        finally:
            store.engine.dispose()
    except PermanentError:
        raise
    except Exception as exc:
        raise _db_error("admin bootstrap failed", exc) from None


def auth_db_has_users(auth_database_uri: SecretStr, *, connect_timeout: float | None = None) -> bool:
    """True when the auth database holds at least one user: auth has been bootstrapped.

    This is the fact DESIGN §4.18 rests on: it survives a lost revision file or
    release history. A database without the ``users`` table has no users; a
    SQLite file that does not exist neither. ``connect_timeout`` (seconds):
    one bounded connection attempt instead of MLflow's minutes of retries —
    for a runner that may not reach the database at all.
    """
    import sqlalchemy

    raw = auth_database_uri.get_secret_value()
    if raw.startswith("sqlite:///"):
        from pathlib import Path

        if not Path(raw.removeprefix("sqlite:///")).is_file():
            return False
    try:
        engine = _engine(auth_database_uri, connect_timeout=connect_timeout)
        try:
            if not sqlalchemy.inspect(engine).has_table("users"):
                return False
            with engine.connect() as conn:
                return conn.execute(sqlalchemy.text("SELECT 1 FROM users LIMIT 1")).first() is not None
        finally:
            engine.dispose()
    except Exception as exc:
        raise _db_error("reading the auth database's users failed", exc) from None


def probe_connection(uri: SecretStr, *, connect_timeout: float = 5) -> DatabaseProbe:
    """One bounded connection attempt to ``uri`` from here, classified the way the diagnosis tells causes apart.

    ``credentials-refused``: the server answered and refused the user, password or database;
    ``unreachable``: nothing answered (refused, timed out, unknown host); ``error``: anything else.
    Never raises; the result names host, port and database, never the password.
    """
    import sqlalchemy
    from sqlalchemy.engine import make_url

    from mlflow_rollout.diagnosis import DB_CREDENTIALS, DB_UNREACHABLE

    try:
        url = make_url(uri.get_secret_value())
        where = f"{url.host or 'localhost'}:{url.port or 5432}/{url.database or ''}"
    except Exception as exc:  # noqa: BLE001 - an unparsable URI is itself the finding
        return DatabaseProbe(where="(unparsable URI)", outcome="error", detail=type(exc).__name__)
    try:
        engine = _engine(uri, connect_timeout=connect_timeout)
        try:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT 1"))
        finally:
            engine.dispose()
    except Exception as exc:  # noqa: BLE001 - classified below
        text = redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)[:200]
        full = str(exc)
        if DB_CREDENTIALS.search(full):
            return DatabaseProbe(where=where, outcome="credentials-refused", detail=text)
        if DB_UNREACHABLE.search(full):
            return DatabaseProbe(where=where, outcome="unreachable", detail=text)
        return DatabaseProbe(where=where, outcome="error", detail=text)
    return DatabaseProbe(where=where, outcome="ok", detail="connected")
