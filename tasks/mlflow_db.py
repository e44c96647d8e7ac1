"""MLflow's databases: schema migrations and the bootstrap admin.

Why here and not in the server: MLflow replicas migrate on start with no
cross-process lock and refuse to start on an out-of-date schema (DESIGN
§4.13). So a deploy migrates *once* before starting anything — the chart does
it in a pre-upgrade hook Job, the local target through :func:`migrate`.

The admin: MLflow creates it at the auth app's first start from
``MLFLOW_AUTH_ADMIN_PASSWORD`` and ignores the variable afterwards (§4.2).
:func:`ensure_admin` makes that explicit and observable: create the admin if
absent, and if present, prove the stored password still opens it — a
mismatch is a permanent error that says how to rotate, instead of a confusing
401 later.

URIs arrive as :class:`SecretStr` and never reach argv or a message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import SecretStr

from mlflow_rollout.errors import PermanentError, TransientError
from mlflow_rollout.redact import redact

__all__ = ["migrate", "ensure_admin", "AdminState", "auth_db_has_users"]


def _engine(uri: SecretStr):
    from mlflow.store.db.utils import create_sqlalchemy_engine_with_retry

    return create_sqlalchemy_engine_with_retry(uri.get_secret_value())


def _db_error(what: str, exc: Exception) -> Exception:
    import sqlalchemy.exc

    msg = redact(f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    if isinstance(exc, sqlalchemy.exc.OperationalError):
        return TransientError(msg)
    return PermanentError(msg)


def migrate(backend_store_uri: SecretStr, auth_database_uri: SecretStr | None) -> None:
    """Bring the tracking schema (and the auth schema) to head; idempotent."""
    from mlflow.store.db import utils as dbutils

    try:
        engine = _engine(backend_store_uri)
        try:
            if dbutils._all_tables_exist(engine):
                dbutils._upgrade_db(engine)
            else:
                dbutils._initialize_tables(engine)
        finally:
            engine.dispose()
    except Exception as exc:
        raise _db_error("tracking database migration failed", exc) from None
    if auth_database_uri is not None:
        from mlflow.server.auth.db import utils as authdb

        try:
            engine = _engine(auth_database_uri)
            try:
                authdb.migrate(engine, "head")
            finally:
                engine.dispose()
        except Exception as exc:
            raise _db_error("auth database migration failed", exc) from None


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


def auth_db_has_users(auth_database_uri: SecretStr) -> bool:
    """True when the auth database holds at least one user: auth has been bootstrapped.

    This is the fact DESIGN §4.18 rests on: it survives a lost revision file or
    release history. A database without the ``users`` table has no users.
    """
    import sqlalchemy

    raw = auth_database_uri.get_secret_value()
    if raw.startswith("sqlite:///"):
        from pathlib import Path

        if not Path(raw.removeprefix("sqlite:///")).is_file():
            return False
    try:
        engine = _engine(auth_database_uri)
        try:
            if not sqlalchemy.inspect(engine).has_table("users"):
                return False
            with engine.connect() as conn:
                return conn.execute(sqlalchemy.text("SELECT 1 FROM users LIMIT 1")).first() is not None
        finally:
            engine.dispose()
    except Exception as exc:
        raise _db_error("reading the auth database's users failed", exc) from None
