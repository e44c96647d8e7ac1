"""The chart's files themselves: documentation, production values, schema,
the migration script, and the helm install script."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import sqlalchemy
import yaml

import values_doc
from chart_support import CHART, HELM_VERSIONS, PRODUCTION_VALUES, REPO, TOOLS_BIN


def test_every_value_is_documented_where_declared() -> None:
    assert values_doc.undocumented() == []


def test_readme_values_table_is_current() -> None:
    readme = (CHART / "README.md").read_text()
    match = re.search(r"<!-- values-table:.*?-->\n(.*?)\n<!-- /values-table -->", readme, re.S)
    assert match, "README.md lacks the values-table markers"
    assert match.group(1).strip() == values_doc.values_table().strip(), (
        "README values table is stale: regenerate with .venv/bin/python tests/chart/values_doc.py"
    )


def test_readme_documents_contract_values() -> None:
    readme = (CHART / "README.md").read_text()
    for key in ("auth.enabled", "existingSecret", "image.tag", "replicaCount", "autoscaling.enabled",
                "ingress.hosts", "ingress.certificateArn", "serviceAccount.irsaRoleArn",
                "artifacts.destination", "mlflow.workers", "mlflow.jobExecution"):
        assert f"`{key}`" in readme, key


def test_production_values_hold_no_secret() -> None:
    text = PRODUCTION_VALUES.read_text()
    values = yaml.safe_load(text)
    assert values["existingSecret"]
    assert "secret" not in values  # no chart-made Secret values
    assert not re.search(r"(postgres(ql)?|mysql|sqlite)(\+\w+)?://", text)
    assert not re.search(r"://[^/\s:@]+:[^@\s]+@", text)  # user:password@
    assert not re.search(r"(?i)^\s*[\w.-]*(password|secretkey|secret_key|token)[\w.-]*\s*:\s*\S", text, re.M)
    # The seed's production settings.
    assert values["autoscaling"]["minReplicas"] == 3 and values["autoscaling"]["maxReplicas"] == 10
    assert values["ingress"]["hosts"] == ["mlflow.mdpg.ai"]
    assert values["ingress"]["className"] == "alb"
    assert values["aws"]["region"] == "us-west-2"
    assert values["artifacts"]["destination"].startswith("s3://")


def test_schema_is_valid_json_and_covers_every_top_level_value() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert schema["additionalProperties"] is False
    assert set(values) <= set(schema["properties"])


def test_chart_has_the_expected_files() -> None:
    for path in ("Chart.yaml", "values.yaml", "values-production.yaml", "values.schema.json", "README.md",
                 "templates/NOTES.txt", "templates/_helpers.tpl", "templates/tests/test-connection.yaml",
                 "files/migrate.py"):
        assert (CHART / path).is_file(), path


def _load_migrate():
    spec = importlib.util.spec_from_file_location("chart_migrate", CHART / "files" / "migrate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_migrate_script_migrates_empty_sqlite_databases(tmp_path) -> None:
    migrate = _load_migrate()
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    auth = f"sqlite:///{tmp_path / 'auth.db'}"
    for _ in range(2):  # idempotent
        migrate.upgrade_tracking_store(tracking)
        migrate.upgrade_auth_store(auth)
    from mlflow.store.db.utils import _get_latest_schema_revision, _get_schema_version

    engine = sqlalchemy.create_engine(tracking)
    assert _get_schema_version(engine) == _get_latest_schema_revision()
    assert "experiments" in sqlalchemy.inspect(engine).get_table_names()
    engine.dispose()
    engine = sqlalchemy.create_engine(auth)
    tables = sqlalchemy.inspect(engine).get_table_names()
    assert "users" in tables and "alembic_version_auth" in tables
    engine.dispose()


def test_migrate_script_main_reads_env_and_redacts(tmp_path) -> None:
    script = CHART / "files" / "migrate.py"
    run = lambda env: subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    skipped = run({"MLFLOW_BACKEND_STORE_URI": "sqlite:////nonexistent/x.db", "MLFLOW_AUTH_DATABASE_URI": ""})
    assert skipped.returncode == 0, skipped.stderr
    assert "tracking store: sqlite" in skipped.stdout and "auth store: no URI given" in skipped.stdout
    missing = run({})
    assert missing.returncode == 1 and "MLFLOW_BACKEND_STORE_URI is not set" in missing.stderr
    migrate = _load_migrate()
    uri = "postgresql+psycopg2://u:S3cr%40t%25pw@db.invalid:5432/m"
    assert migrate._redact(f"could not connect {uri} S3cr@t%pw S3cr%40t%25pw", uri) == "could not connect *** *** ***"


def test_install_helm_script_is_idempotent() -> None:
    result = subprocess.run(["bash", str(REPO / "scripts" / "install-helm.sh")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    for name, version in HELM_VERSIONS.items():
        got = subprocess.run([str(TOOLS_BIN / name), "version", "--short"], capture_output=True, text=True).stdout
        assert got.startswith(version)
    assert (TOOLS_BIN / "helm").resolve() == (TOOLS_BIN / "helm4").resolve()
    assert (TOOLS_BIN / "kubectl").is_file()
