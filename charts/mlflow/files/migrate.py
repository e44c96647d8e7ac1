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

What a tracking database needs is decided in one place, :func:`tracking_action`
(the local target's ``tasks/mlflow_db.py`` loads this file and uses the same
functions, so the Job and the local rollout never disagree):

  no MLflow table, no revision          new: create the initial tables, upgrade to head
                                        (other tables, e.g. the auth store's, may stay)
  only initial tables, no revision      new: an initialization that stopped before
                                        its first migration; finish it
  MLflow tables beyond the initial      refused: the revision is unknown, so no
  ones, no revision                     migration can start; stamp it (alembic stamp)
  revision == head                      current: nothing to do
  revision known, older than head       upgrade
  revision unknown to this MLflow       refused: a newer MLflow migrated it; run
                                        that version (or restore a backup)

This file must stay standalone: in the Job it runs with only mlflow installed.
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


# -- what a tracking database needs: the one decision --------------------------

NEW = "new"
CURRENT = "current"
UPGRADE = "upgrade"


class SchemaRefused(Exception):
    """The tracking database is in a state no migration may start from; the message says what to do."""


def tracking_action(tables, revision, *, head, known_revisions, initial_tables, mlflow_tables):
    """``(action, why)`` for a tracking database: :data:`NEW`, :data:`CURRENT` or :data:`UPGRADE`.

    Pure: ``tables`` are the database's table names, ``revision`` its
    ``alembic_version`` (None when absent or empty); ``head`` and
    ``known_revisions`` come from this MLflow's migrations,
    ``initial_tables`` are the tables its first migration starts from and
    ``mlflow_tables`` every table MLflow defines. Raises :class:`SchemaRefused`.
    """
    own = {t for t in tables if not t.startswith("alembic_")}
    if revision is not None:
        if revision not in known_revisions:
            raise SchemaRefused(
                f"the database's schema revision {revision} is unknown to this MLflow (its head is {head}): "
                "a newer MLflow migrated it; run that MLflow version, or restore a backup taken before"
            )
        if revision == head:
            return CURRENT, f"schema at head ({head})"
        return UPGRADE, f"schema revision {revision}, head {head}"
    present = own & set(mlflow_tables)
    others = len(own - present)
    note = f" ({others} other table{'s' if others != 1 else ''} left alone)" if others else ""
    if not present:
        return NEW, "no MLflow tables" + note
    if present <= set(initial_tables):
        return NEW, f"only initial tables ({', '.join(sorted(present))}) and no schema revision: " \
                    f"finishing an initialization{note}"
    raise SchemaRefused(
        f"the database has MLflow tables ({len(present)}, e.g. {', '.join(sorted(present - set(initial_tables))[:3])}) "
        "but no schema revision (no alembic_version row), so no migration can start from it; "
        "stamp it with the revision it was created at (alembic stamp), or restore a backup"
    )


def _known_revisions(db_utils):
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(db_utils._get_alembic_config(db_url=""))
    return {r.revision for r in script.walk_revisions()}


def plan_tracking_store(engine):
    """``(action, why)`` for the database behind ``engine``, read from it (see :func:`tracking_action`)."""
    import sqlalchemy
    from mlflow.store.db import utils as db_utils

    tables = sqlalchemy.inspect(engine).get_table_names()
    revision = db_utils._get_schema_version(engine) if "alembic_version" in tables else None
    return tracking_action(
        tables, revision, head=db_utils._get_latest_schema_revision(), known_revisions=_known_revisions(db_utils),
        initial_tables=set(db_utils.InitialBase.metadata.tables), mlflow_tables=set(db_utils.Base.metadata.tables),
    )


def migrate_tracking_engine(engine) -> str:
    """Bring the tracking schema behind ``engine`` to head as :func:`plan_tracking_store` decides; what was done."""
    from mlflow.store.db import utils as db_utils

    action, why = plan_tracking_store(engine)
    if action == NEW:
        db_utils._initialize_tables(engine)
        return f"created: {why}"
    if action == UPGRADE:
        db_utils._upgrade_db(engine)
        return f"upgraded: {why}"
    return f"unchanged: {why}"


def migrate_auth_engine(engine) -> str:
    """Create or upgrade the basic-auth schema (version table alembic_version_auth) behind ``engine``."""
    from mlflow.server.auth.db import utils as auth_db_utils

    auth_db_utils.migrate(engine, "head")
    return "at head"


def upgrade_tracking_store(uri: str) -> str:
    """Create, upgrade or leave the tracking schema at ``uri`` (see :func:`tracking_action`)."""
    from mlflow.store.db import utils as db_utils

    engine = db_utils.create_sqlalchemy_engine_with_retry(uri)
    try:
        return migrate_tracking_engine(engine)
    finally:
        engine.dispose()


def upgrade_auth_store(uri: str) -> str:
    """Create or upgrade the basic-auth schema at ``uri``."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(uri)
    try:
        return migrate_auth_engine(engine)
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
            done = upgrade(uri)
        except SchemaRefused as exc:
            print(f"migrate: {label}: refused: {_redact(str(exc), uri)}", file=sys.stderr, flush=True)
            return 1
        except Exception as exc:
            detail = _redact(f"{type(exc).__name__}: {exc}", uri)
            print(f"migrate: {label}: failed: {detail}", file=sys.stderr, flush=True)
            return 1
        print(f"migrate: {label}: schema at head ({done})", flush=True)
    print("migrate: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
