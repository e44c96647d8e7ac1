"""End to end: the real ``mlflow-rollout`` CLI rolls out real MLflow servers.

Three backends (SQLite; PostgreSQL 15 with 2 workers; S3 artifacts on
moto_server), each followed by independent checks with httpx against the
running server and a second rollout that must succeed and change nothing
that matters.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import psycopg2
import pytest

from tests.support.rollout import DEFAULT_OUTPUTS, Sandbox
from tests.support.services import free_port

pytestmark = pytest.mark.e2e

PROTECTED = "/api/2.0/mlflow/experiments/search?max_results=5"


def _https(status: dict, auth: tuple[str, str] | None = None) -> httpx.Client:
    ctx = ssl.create_default_context(cafile=status["ca_bundle"])
    return httpx.Client(base_url=status["url"], verify=ctx, auth=auth, timeout=15)


def _admin(status: dict) -> tuple[str, str]:
    return status["admin_username"], Path(status["admin_password_file"]).read_text()


def assert_server_posture(status: dict) -> None:
    """What a user sees: health open, API closed, admin in, wrong password out."""
    assert status["running"] and status["healthy"] and status["auth"] is True
    with _https(status) as anon:
        assert anon.get("/health").status_code == 200
        r = anon.get(PROTECTED)
        assert r.status_code == 401
        assert "basic" in r.headers["www-authenticate"].lower()
    user, password = _admin(status)
    with _https(status, auth=(user, password + "x")) as wrong:
        assert wrong.get(PROTECTED).status_code == 401
    with _https(status, auth=(user, password)) as admin:
        assert admin.get(PROTECTED).status_code == 200
        me = admin.get("/api/2.0/mlflow/users/current").json()
        assert me["user"]["username"] == user and me["user"]["is_admin"] is True
    # plain http on the TLS port must not work
    with pytest.raises(httpx.HTTPError):
        httpx.get(status["url"].replace("https://", "http://") + "/health", timeout=5)


def _users_and_smoke_experiments(status: dict) -> tuple[list[str], list[str]]:
    with _https(status, auth=_admin(status)) as admin:
        users = [u["username"] for u in admin.get("/api/2.0/mlflow/users/list").json().get("users", [])]
        exps = admin.post("/api/2.0/mlflow/experiments/search", json={"max_results": 100, "view_type": "ALL"}).json()
    names = [e["name"] for e in exps.get("experiments", []) if e["name"].startswith("mlflow-rollout-smoke")]
    return users, names


@pytest.fixture
def sandbox(tmp_path: Path, prefect_api: str):
    box = Sandbox(tmp_path, prefect_api)
    yield box
    for path in box.env_dir.glob("*.yaml"):
        box.stop(path.stem)


def _rollout_ok(box: Sandbox, name: str) -> str:
    r = box.cli("rollout", "--env", name)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    # Piped output too (issue 12): no traceback, no third-party warning (e.g. Starlette's, via MLflow's auth app).
    assert "Traceback" not in out and "Warning" not in out, out[-6000:]
    return out


def test_local_rollout_sqlite_and_rerun(sandbox: Sandbox) -> None:
    sandbox.write_environment("lite")
    out = _rollout_ok(sandbox, "lite")
    for stage in ("terraform-outputs", "preflight", "secrets", "deploy-no-auth", "admin-bootstrap",
                  "deploy-auth", "smoke-https", "smoke-auth", "smoke-tracking", "smoke-artifacts",
                  "smoke-logging", "report"):
        assert f"completed {stage}" in out, stage
    assert "skipped dns" in out and "local target has no DNS record" in out

    status = sandbox.status("lite")
    from targets.base import STATUS_KEYS

    assert set(STATUS_KEYS) <= set(status), set(STATUS_KEYS) - set(status)  # the protocol's status contract
    assert status["revision"] == 2 and status["healthy"] is True  # no-auth revision 1, then auth revision 2
    assert status["url"] == f"https://localhost:{sandbox.port}"
    pw_file = Path(status["admin_password_file"])
    assert pw_file.stat().st_mode & 0o777 == 0o600
    assert isinstance(status["pid"], int)
    assert_server_posture(status)
    password_before = pw_file.read_text()
    users_before, exps_before = _users_and_smoke_experiments(status)
    assert users_before == ["admin"] and exps_before == ["mlflow-rollout-smoke"]

    # A second rollout: succeeds, same revision, same process, same password, no new users.
    out2 = _rollout_ok(sandbox, "lite")
    assert "skipped deploy-no-auth" in out2 and "already runs with auth on" in out2
    assert "admin 'admin' verified" in out2
    again = sandbox.status("lite")
    assert (again["revision"], again["pid"]) == (2, status["pid"])
    assert pw_file.read_text() == password_before
    assert _users_and_smoke_experiments(again) == (users_before, exps_before)
    assert_server_posture(again)

    # stop, then a rollout brings the same revision back
    r = sandbox.cli("stop", "--env", "lite")
    assert r.returncode == 0 and "stopped" in r.stdout
    stopped = sandbox.status("lite")
    assert stopped["running"] is False and stopped["pid"] is None
    with pytest.raises(httpx.ConnectError):
        httpx.get(status["url"] + "/health", verify=False, timeout=5)
    _rollout_ok(sandbox, "lite")
    back = sandbox.status("lite")
    assert back["revision"] == 2 and back["pid"] != status["pid"]
    assert_server_posture(back)


def test_local_rollout_postgres_two_workers(sandbox: Sandbox, postgres) -> None:
    uri = postgres.create_database("mlflow_e2e")
    outputs = dict(DEFAULT_OUTPUTS, rds_connection_string={"value": uri, "type": "string", "sensitive": True})
    sandbox.write_environment(
        "pg", {"local": {"backend_store": "terraform"}, "mlflow": {"workers": 2}}, outputs=outputs
    )
    _rollout_ok(sandbox, "pg")
    status = sandbox.status("pg")
    assert_server_posture(status)

    # Tracking data and the auth users live in PostgreSQL, not in a per-process SQLite file.
    with psycopg2.connect(uri) as conn, conn.cursor() as cur:
        cur.execute("SELECT username, is_admin FROM users")
        assert cur.fetchall() == [("admin", True)]
        cur.execute("SELECT name FROM experiments WHERE name = 'mlflow-rollout-smoke'")
        assert cur.fetchall() == [("mlflow-rollout-smoke",)]
        cur.execute("SELECT version_num FROM alembic_version_auth")
        assert cur.fetchone() is not None
    state = Path(status["state_dir"])
    assert not list(state.glob("*.db")), "no SQLite database may be created for a PostgreSQL backend"

    # A user created through one request is seen by every worker (shared auth DB).
    user, password = _admin(status)
    with _https(status, auth=(user, password)) as admin:
        r = admin.post("/api/2.0/mlflow/users/create", json={"username": "alice", "password": "alice-password-123"})
        assert r.status_code == 200, r.text
    for _ in range(8):  # spread over both workers
        with _https(status, auth=("alice", "alice-password-123")) as alice:
            assert alice.get(PROTECTED).status_code == 200

    _rollout_ok(sandbox, "pg")
    assert sandbox.status("pg")["revision"] == status["revision"]


def test_local_rollout_s3_artifacts(sandbox: Sandbox, moto) -> None:
    s3 = moto.client("s3")
    s3.create_bucket(Bucket="mlflow-e2e-artifacts", CreateBucketConfiguration={"LocationConstraint": "us-west-2"})
    outputs = dict(DEFAULT_OUTPUTS, s3_bucket_name={"value": "mlflow-e2e-artifacts", "type": "string"})
    sandbox.write_environment(
        "s3", {"local": {"artifacts": "s3", "s3_endpoint_url": moto.endpoint_url, "s3_prefix": "mlruns"}},
        outputs=outputs,
    )
    out = _rollout_ok(sandbox, "s3")
    assert "s3://mlflow-e2e-artifacts/mlruns/" in out  # the smoke check found the object in the bucket
    status = sandbox.status("s3")
    assert_server_posture(status)

    # Independently: an artifact logged through the server lands in the bucket.
    user, password = _admin(status)
    with _https(status, auth=(user, password)) as admin:
        exp = admin.post("/api/2.0/mlflow/experiments/create", json={"name": "s3-check"}).json()["experiment_id"]
        run = admin.post("/api/2.0/mlflow/runs/create", json={"experiment_id": exp}).json()["run"]["info"]
        put = admin.put(
            f"/api/2.0/mlflow-artifacts/artifacts/{exp}/{run['run_id']}/artifacts/model.txt", content=b"weights"
        )
        assert put.status_code == 200, put.text
    key = f"mlruns/{exp}/{run['run_id']}/artifacts/model.txt"
    assert s3.get_object(Bucket="mlflow-e2e-artifacts", Key=key)["Body"].read() == b"weights"
    # no artifacts were written to the local disk
    assert not (Path(status["state_dir"]) / "artifacts").exists()

    # a bucket that does not exist: preflight refuses, nothing changes
    sandbox.write_environment(
        "s3missing",
        {"local": {"artifacts": "s3", "s3_endpoint_url": moto.endpoint_url, "port": free_port()}},
        outputs=dict(DEFAULT_OUTPUTS, s3_bucket_name={"value": "no-such-bucket-here", "type": "string"}),
    )
    r = sandbox.cli("rollout", "--env", "s3missing")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no-such-bucket-here" in r.stdout and "s3_bucket_name" in r.stdout
