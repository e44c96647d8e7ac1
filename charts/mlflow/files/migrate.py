"""Schema migrations for the MLflow tracking store and the basic-auth store.

Run once per install/upgrade by the chart's pre-install/pre-upgrade hook Job,
before any server pod starts (servers refuse to start on an out-of-date schema
and race each other on an empty one).

It does what ``mlflow db upgrade URL`` and
``python -m mlflow.server.auth db upgrade --url URL`` do, but reads the URIs
from the environment so that no database password ever appears in a process's
argv:

  MLFLOW_BACKEND_STORE_URI   tracking store (required)
  MLFLOW_AUTH_DATABASE_URI   auth store (optional; skipped when unset/empty)

A ``sqlite:`` URI is skipped: such a file lives in one server pod and that pod
creates and migrates it itself at start (the chart allows sqlite only with one
replica). Exit status 0 on success, 1 on failure; the URIs and passwords are never
printed (error messages are redacted).
"""

from __future__ import annotations

import os
import sys


def _is_sqlite(uri: str) -> bool:
    return uri.strip().lower().startswith("sqlite:")


def _redact(text: str, uri: str) -> str:
    """``text`` with the URI and its password (raw and percent-decoded) masked."""
    from urllib.parse import unquote, urlsplit

    secrets = {uri}
    try:
        password = urlsplit(uri).password
    except ValueError:
        password = None
    if password:
        secrets |= {password, unquote(password)}
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def upgrade_tracking_store(uri: str) -> None:
    """Create (empty DB) or upgrade (existing DB) the tracking schema to head."""
    from mlflow.store.db import utils as db_utils

    engine = db_utils.create_sqlalchemy_engine_with_retry(uri)
    try:
        if db_utils._is_empty_database(engine):
            db_utils._initialize_tables(engine)
        else:
            db_utils._upgrade_db(engine)
    finally:
        engine.dispose()


def upgrade_auth_store(uri: str) -> None:
    """Create or upgrade the basic-auth schema (version table alembic_version_auth)."""
    import sqlalchemy
    from mlflow.server.auth.db import utils as auth_db_utils

    engine = sqlalchemy.create_engine(uri)
    try:
        auth_db_utils.migrate(engine, "head")
    finally:
        engine.dispose()


def main() -> int:
    steps = [
        ("tracking store", "MLFLOW_BACKEND_STORE_URI", upgrade_tracking_store, True),
        ("auth store", "MLFLOW_AUTH_DATABASE_URI", upgrade_auth_store, False),
    ]
    for label, env_name, upgrade, required in steps:
        uri = os.environ.get(env_name, "").strip()
        if not uri:
            if required:
                print(f"migrate: {env_name} is not set", file=sys.stderr, flush=True)
                return 1
            print(f"migrate: {label}: no URI given, skipped", flush=True)
            continue
        if _is_sqlite(uri):
            print(f"migrate: {label}: sqlite, migrated by the server pod itself, skipped", flush=True)
            continue
        print(f"migrate: {label}: upgrading schema", flush=True)
        try:
            upgrade(uri)
        except Exception as exc:
            detail = _redact(f"{type(exc).__name__}: {exc}", uri)
            print(f"migrate: {label}: failed: {detail}", file=sys.stderr, flush=True)
            return 1
        print(f"migrate: {label}: schema at head", flush=True)
    print("migrate: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
