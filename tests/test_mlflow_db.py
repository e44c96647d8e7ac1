"""The two migration paths decide alike: the chart's Job (charts/mlflow/files/migrate.py) and the local target (tasks/mlflow_db.py).

The decision lives once, in migrate.py (it must run standalone in the Job's
pod); mlflow_db loads that file. Each database state below is given to both
paths, on SQLite and on the tests' PostgreSQL, and both must end the same
way: created, left alone, upgraded, or refused with a message that says what
to do. The pure decision is also checked case by case without a database.
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import sqlalchemy
from pydantic import SecretStr

from mlflow_rollout.errors import PermanentError
from tasks import mlflow_db

CHART_MIGRATE = Path(__file__).resolve().parent.parent / "charts" / "mlflow" / "files" / "migrate.py"
#: A revision a few migrations after the first: a database an old MLflow left behind.
OLD_REVISION = "89d4b8295536"
UNKNOWN_REVISION = "ffffffffffff"


def _load_chart_migrate():
    spec = importlib.util.spec_from_file_location("chart_migrate_under_test", CHART_MIGRATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


chart = _load_chart_migrate()


# ------------------------------------------------------------------ the pure decision
def _decide(tables, revision):
    return chart.tracking_action(
        tables, revision, head="h3", known_revisions={"h1", "h2", "h3"},
        initial_tables={"experiments", "runs"}, mlflow_tables={"experiments", "runs", "metrics", "trace_info"},
    )[0]


@pytest.mark.parametrize("tables, revision, action", [
    ([], None, "new"),
    (["alembic_version"], None, "new"),  # an earlier attempt left only alembic's table
    (["inventory", "users", "alembic_version_auth"], None, "new"),  # someone else's tables, e.g. the auth store's
    (["experiments"], None, "new"),  # an initialization that stopped before its first migration
    (["experiments", "runs", "metrics", "alembic_version"], "h3", "current"),
    (["experiments", "runs", "metrics", "alembic_version"], "h1", "upgrade"),
])
def test_decision(tables, revision, action) -> None:
    assert _decide(tables, revision) == action


@pytest.mark.parametrize("tables, revision, words", [
    (["experiments", "runs", "metrics"], None, "alembic stamp"),  # MLflow tables beyond the initial ones, no revision
    (["experiments", "alembic_version"], "zz", "newer MLflow"),  # a revision this MLflow does not know
])
def test_decision_refuses(tables, revision, words) -> None:
    with pytest.raises(chart.SchemaRefused, match=words):
        _decide(tables, revision)


def test_local_path_uses_the_charts_copy() -> None:
    m = mlflow_db.chart_migrate()
    assert Path(m.__file__) == CHART_MIGRATE and m.tracking_action.__code__.co_filename == str(CHART_MIGRATE)


# ------------------------------------------------------------------ both paths, real databases
class Databases:
    """Fresh databases of one kind, and copies of prepared ones (SQLite files, PostgreSQL templates)."""

    def __init__(self, kind: str, tmp: Path, postgres=None):
        self.kind, self.tmp, self.postgres, self.n = kind, tmp, postgres, 0

    def fresh(self) -> str:
        self.n += 1
        name = f"mig_{int(time.time())}_{self.n}"
        if self.kind == "sqlite":
            return f"sqlite:///{self.tmp / (name + '.db')}"
        return self.postgres.create_database(name).replace("postgresql://", "postgresql+psycopg2://")

    def copy(self, uri: str) -> str:
        self.n += 1
        name = f"mig_{int(time.time())}_{self.n}"
        if self.kind == "sqlite":
            target = self.tmp / (name + ".db")
            shutil.copyfile(uri.removeprefix("sqlite:///"), target)
            return f"sqlite:///{target}"
        source = uri.rsplit("/", 1)[1]
        conn = self.postgres.admin_connect()
        try:
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}" TEMPLATE "{source}" OWNER "{self.postgres.user}"')
        finally:
            conn.close()
        return self.postgres.uri_for(name).replace("postgresql://", "postgresql+psycopg2://")


def _engine(uri: str) -> sqlalchemy.Engine:
    return sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool)


def _sql(uri: str, *statements: str) -> None:
    engine = _engine(uri)
    with engine.begin() as conn:
        for s in statements:
            conn.execute(sqlalchemy.text(s))
    engine.dispose()


def _state(uri: str) -> tuple[str | None, set[str]]:
    from mlflow.store.db.utils import _get_schema_version

    engine = _engine(uri)
    try:
        tables = set(sqlalchemy.inspect(engine).get_table_names())
        return (_get_schema_version(engine) if "alembic_version" in tables else None), tables
    finally:
        engine.dispose()


def _initial_only(uri: str) -> None:
    from mlflow.store.db.utils import InitialBase

    engine = _engine(uri)
    InitialBase.metadata.create_all(engine)
    engine.dispose()


def _at_old_revision(uri: str) -> None:
    from alembic import command
    from mlflow.store.db.utils import _get_alembic_config

    _initial_only(uri)
    engine = _engine(uri)
    config = _get_alembic_config(str(engine.url))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, OLD_REVISION)
    engine.dispose()


def _auth_store(uri: str) -> None:
    chart.upgrade_auth_store(uri)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def dbs(request, tmp_path_factory) -> Iterator[tuple[Databases, dict[str, str]]]:
    """Databases of one kind, with prepared originals to copy: one at head, one at an old revision."""
    postgres = request.getfixturevalue("postgres") if request.param == "postgresql" else None
    d = Databases(request.param, tmp_path_factory.mktemp(f"mig-{request.param}"), postgres)
    head, old = d.fresh(), d.fresh()
    chart.upgrade_tracking_store(head)
    _at_old_revision(old)
    yield d, {"head": head, "old": old}


#: case -> (how to make it from a fresh database or a prepared one, expected action)
CASES: dict[str, tuple[Callable[[Databases, dict[str, str]], str], str]] = {
    "empty": (lambda d, p: d.fresh(), "new"),
    "foreign-table": (lambda d, p: _with(d.fresh(), lambda u: _sql(u, "CREATE TABLE inventory (id INTEGER PRIMARY KEY)")), "new"),
    "auth-store-first": (lambda d, p: _with(d.fresh(), _auth_store), "new"),
    "initial-tables-only": (lambda d, p: _with(d.fresh(), _initial_only), "new"),
    "at-head": (lambda d, p: d.copy(p["head"]), "current"),
    "old-revision": (lambda d, p: d.copy(p["old"]), "upgrade"),
    "tables-without-revision": (lambda d, p: _with(d.copy(p["head"]), lambda u: _sql(u, "DELETE FROM alembic_version")), "refused"),
    "unknown-revision": (lambda d, p: _with(d.copy(p["head"]), lambda u: _sql(
        u, f"UPDATE alembic_version SET version_num = '{UNKNOWN_REVISION}'")), "refused"),
}


def _with(uri: str, prepare: Callable[[str], None]) -> str:
    prepare(uri)
    return uri


def _chart_path(uri: str) -> str:
    try:
        return chart.upgrade_tracking_store(uri).split(":", 1)[0]
    except chart.SchemaRefused as exc:
        return f"refused: {exc}"


def _local_path(uri: str) -> str:
    try:
        done = mlflow_db.migrate(SecretStr(uri), None)
    except PermanentError as exc:
        assert "refused" in str(exc) and uri not in str(exc)
        return f"refused: {str(exc).split('refused: ', 1)[1]}"
    return done.removeprefix("tracking store ").split(":", 1)[0]


@pytest.mark.parametrize("case", list(CASES))
def test_both_paths_decide_alike(dbs, case: str, monkeypatch, capsys) -> None:
    d, prepared = dbs
    make, expected = CASES[case]
    outcomes, states = {}, {}
    for path, run in (("chart", _chart_path), ("local", _local_path)):
        uri = make(d, prepared)
        before = _state(uri)
        engine = _engine(uri)
        planned = _plan(engine)
        engine.dispose()
        outcomes[path] = run(uri)
        states[path] = (before, _state(uri))
        assert planned == expected
    assert outcomes["chart"] == outcomes["local"], outcomes
    words = {"new": "created", "current": "unchanged", "upgrade": "upgraded"}
    if expected == "refused":
        assert outcomes["chart"].startswith("refused: ")
        for before, after in states.values():
            assert after == before  # refused: nothing touched
        if d.kind == "postgresql":  # the Job's entry point: exit 1, the reason, no password
            uri = make(d, prepared)
            monkeypatch.setenv("MLFLOW_BACKEND_STORE_URI", uri)
            monkeypatch.delenv("MLFLOW_AUTH_DATABASE_URI", raising=False)
            assert chart.main() == 1
            err = capsys.readouterr().err
            assert "tracking store: refused:" in err and d.postgres.password not in err
        return
    assert outcomes["chart"] == words[expected]
    from mlflow.store.db.utils import _get_latest_schema_revision

    for before, after in states.values():
        revision, tables = after
        assert revision == _get_latest_schema_revision() and "experiments" in tables
        assert before[1] <= tables  # nobody's tables were dropped


def _plan(engine) -> str:
    try:
        return chart.plan_tracking_store(engine)[0]
    except chart.SchemaRefused:
        return "refused"


# ------------------------------------------------------------------ auth_db_has_users, bounded
def test_auth_db_has_users_with_a_connect_timeout(postgres) -> None:
    uri = postgres.create_database(f"authusers_{int(time.time())}").replace("postgresql://", "postgresql+psycopg2://")
    assert mlflow_db.auth_db_has_users(SecretStr(uri), connect_timeout=5) is False  # no users table
    chart.upgrade_auth_store(uri)
    assert mlflow_db.auth_db_has_users(SecretStr(uri), connect_timeout=5) is False  # no user
    mlflow_db.ensure_admin(SecretStr(uri), "admin", SecretStr("Admin-Pw-1234567"))
    assert mlflow_db.auth_db_has_users(SecretStr(uri), connect_timeout=5) is True


def test_auth_db_has_users_gives_up_after_the_connect_timeout() -> None:
    """A database that accepts TCP but never answers: one bounded attempt, not MLflow's minutes of retries."""
    import socket

    from mlflow_rollout.errors import TransientError

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        uri = SecretStr(f"postgresql+psycopg2://u:Secret-Pw-1@127.0.0.1:{port}/auth")
        started = time.monotonic()
        with pytest.raises(TransientError) as err:
            mlflow_db.auth_db_has_users(uri, connect_timeout=1)
        assert time.monotonic() - started < 10
        assert "Secret-Pw-1" not in str(err.value)
