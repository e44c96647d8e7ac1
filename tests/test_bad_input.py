"""Bad input: a clear, specific error, exit code 2, and no server started."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.rollout import DEFAULT_OUTPUTS, Sandbox

SECRET_PW = "s3cr3t-Canary-Pw"


@pytest.fixture
def box(tmp_path: Path, prefect_api: str) -> Sandbox:
    return Sandbox(tmp_path, prefect_api)


def assert_nothing_started(box: Sandbox, name: str) -> None:
    state = box.state_root / name
    assert not (state / "server.pid").exists()
    assert not (state / "revisions").exists() or not list((state / "revisions").glob("*.json"))
    assert not (state / "server.log").exists()
    import socket

    with socket.socket() as s:  # nobody listens on the environment's port
        assert s.connect_ex(("127.0.0.1", box.port)) != 0


def _bad(box: Sandbox, name: str) -> str:
    r = box.cli("rollout", "--env", name)
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-4000:]
    assert_nothing_started(box, name)
    return r.stdout


def test_missing_output_names_output_and_source(box: Sandbox) -> None:
    outputs = {k: v for k, v in DEFAULT_OUTPUTS.items() if k != "s3_bucket_name"}
    box.write_environment("noout", outputs=outputs)
    out = _bad(box, "noout")
    assert "bad input" in out
    assert "missing output 's3_bucket_name'" in out
    assert "terraform-outputs.json" in out  # the source


def test_malformed_connection_string_is_named_not_echoed(box: Sandbox) -> None:
    outputs = dict(DEFAULT_OUTPUTS, rds_connection_string={"value": f"mysql://mlflow:{SECRET_PW}@db/mlflow"})
    box.write_environment("badconn", outputs=outputs)
    r = box.cli("rollout", "--env", "badconn")
    assert r.returncode == 2
    assert "rds_connection_string" in r.stdout
    assert SECRET_PW not in r.stdout + r.stderr
    assert_nothing_started(box, "badconn")


def test_unknown_environment_lists_known_ones(box: Sandbox) -> None:
    box.write_environment("alpha")
    r = box.cli("rollout", "--env", "nosuchenv")
    assert r.returncode == 2
    assert "unknown environment 'nosuchenv'" in r.stdout and "alpha" in r.stdout
    assert "Starting temporary server" not in r.stdout + r.stderr  # refused before Prefect


def test_yaml_syntax_error_names_file_and_line(box: Sandbox) -> None:
    path = box.write_environment("broken")
    path.write_text(path.read_text() + "mlflow: [unclosed\n")
    r = box.cli("rollout", "--env", "broken")
    assert r.returncode == 2
    assert "broken.yaml" in r.stdout and "YAML syntax error" in r.stdout and "line" in r.stdout
    assert_nothing_started(box, "broken")


def test_invalid_setting_names_key_and_expectation(box: Sandbox) -> None:
    box.write_environment("wrongtype", {"mlflow": {"workers": "many"}, "local": {"artifacts": "ftp"}})
    r = box.cli("rollout", "--env", "wrongtype")
    assert r.returncode == 2
    assert "wrongtype.yaml" in r.stdout
    assert "mlflow.workers" in r.stdout and "integer" in r.stdout
    assert "local.artifacts" in r.stdout and "'s3'" in r.stdout


def test_too_short_admin_password(box: Sandbox) -> None:
    box.extra_env["TEST_ADMIN_PW"] = "short-pw"
    box.write_environment("shortpw", {"secrets": {"admin_password": {"env": "TEST_ADMIN_PW", "generate": False}}})
    r = box.cli("rollout", "--env", "shortpw")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "secrets.admin_password" in r.stdout and "too short" in r.stdout and "12" in r.stdout
    assert "TEST_ADMIN_PW" in r.stdout  # names the reference, never the value
    assert "short-pw" not in r.stdout + r.stderr
    assert_nothing_started(box, "shortpw")


def test_unset_secret_env_var(box: Sandbox) -> None:
    box.write_environment("unset", {"secrets": {"flask_secret_key": {"env": "NOT_SET_ANYWHERE_123", "generate": False}}})
    r = box.cli("rollout", "--env", "unset")
    assert r.returncode == 2
    assert "secrets.flask_secret_key" in r.stdout and "NOT_SET_ANYWHERE_123" in r.stdout
    assert_nothing_started(box, "unset")


def test_secret_value_in_settings_file_is_rejected(box: Sandbox) -> None:
    box.write_environment("inline", {"secrets": {"admin_password": "hunter2-hunter2"}})
    r = box.cli("rollout", "--env", "inline")
    assert r.returncode == 2
    assert "secrets.admin_password" in r.stdout
    assert "hunter2-hunter2" not in r.stdout + r.stderr


def test_status_of_unknown_env_is_bad_input(box: Sandbox) -> None:
    box.env_dir.mkdir(parents=True)
    r = box.cli("status", "--env", "ghost", "--json")
    assert r.returncode == 2 and "unknown environment 'ghost'" in r.stdout
    assert not r.stdout.lstrip().startswith("{")
