"""Flow ``mlflow-users`` against a real MLflow server with basic-auth.

One local server per module, rolled out with the real ``mlflow-rollout`` CLI;
the flow runs in this process against the session's Prefect test server.
Every access claim is checked independently with httpx as the user in
question. The tests share the server and run in file order.

``auth_cache_ttl_seconds`` is 5 here: MLflow caches good credentials per
worker, so an old password (or a deleted user) keeps working on some worker
for up to that long; the checks below wait for it, as the flow does.
"""

from __future__ import annotations

import ssl
import time
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from mlflow_rollout.errors import AuthError, BadInputError, PermanentError
from tests.support.rollout import Sandbox

pytestmark = pytest.mark.e2e

ENV = "users"
CACHE_TTL = 5
PASSWORDS = {
    "alice": "Canary-Alice-Pw-4d1c7a90",
    "bob": "Canary-Bob-Pw-8e2f6b13",
    "carol": "Canary-Carol-Pw-0a9d5e77",
    "dora": "Canary-Dora-Pw-6c3b1f02",
}
FRANK_PW = "Canary-Frank-Pw-19ab27cd"
FRANK_PW2 = "Canary-Frank-Pw2-5e8f0a36"
#: The new admin password of a rotation whose store write fails (never stored), and of an interrupted one.
ADMIN_REFUSED_PW = "Canary-Admin-Refused-Pw-7d2e91b4"
ADMIN_RESUMED_PW = "Canary-Admin-Resumed-Pw-3a6c05f8"
#: Every admin password this module saw (the first one and each rotation), for the secret scan.
ADMIN_PASSWORDS: list[str] = []


def declared_users(**replace: dict | None) -> list[dict]:
    """The module's declaration; ``name=None`` drops a user, ``name={...}`` replaces it."""
    base = {
        "alice": {"permissions": [{"resource_type": "experiment", "resource": "exp-a", "permission": "READ"}]},
        "bob": {"permissions": [
            {"resource_type": "experiment", "resource": "exp-a", "permission": "EDIT"},
            {"resource_type": "registered_model", "resource": "model-b", "permission": "MANAGE"},
        ]},
        "carol": {"admin": True},
        "dora": {"permissions": [{"resource_type": "experiment", "resource": "exp-a", "permission": "NO_PERMISSIONS"}]},
    }
    base.update(replace)
    return [
        {"username": name, "password": {"env": f"USERS_TEST_{name.upper()}_PW"}, **spec}
        for name, spec in base.items() if spec is not None
    ]


class Server:
    def __init__(self, box: Sandbox):
        self.box = box
        self.state = box.state_root / ENV
        self.url = f"https://localhost:{box.port}"
        self.ca = str(self.state / "tls" / "ca.pem")

    @property
    def admin_file(self) -> Path:
        return self.state / "secrets" / "admin-password"

    def admin(self) -> tuple[str, str]:
        return "admin", self.admin_file.read_text()

    def http(self, auth: tuple[str, str] | None) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=ssl.create_default_context(cafile=self.ca), auth=auth, timeout=30)

    def as_user(self, name: str, password: str | None = None) -> httpx.Client:
        return self.http((name, password or PASSWORDS[name]))

    def login(self, name: str, password: str) -> int:
        with self.as_user(name, password) as c:
            return c.get("/api/2.0/mlflow/users/current").status_code

    def eventually_refused(self, name: str, password: str, within: float = CACHE_TTL + 20) -> None:
        """Fresh connections in a row all refuse (the per-worker auth cache expires)."""
        deadline = time.monotonic() + within
        while True:
            codes = [self.login(name, password) for _ in range(6)]
            if all(c == 401 for c in codes):
                return
            assert time.monotonic() < deadline, f"{name}: still accepted after {within}s: {codes}"
            time.sleep(1)

    def usernames(self) -> dict[str, bool]:
        with self.http(self.admin()) as c:
            r = c.get("/api/2.0/mlflow/users/list")
            r.raise_for_status()
            return {u["username"]: u["is_admin"] for u in r.json()["users"]}

    def experiment_id(self, name: str) -> str | None:
        with self.http(self.admin()) as c:
            r = c.get("/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": name})
        return r.json()["experiment"]["experiment_id"] if r.status_code == 200 else None

    def write(self, users: list[dict], **more) -> None:
        self.box.write_environment(ENV, {
            "mlflow": {"auth_cache_ttl_seconds": CACHE_TTL, "workers": 2},
            "users": users, **more,
        })


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, prefect_api: str):
    box = Sandbox(tmp_path_factory.mktemp("users"), prefect_api)
    srv = Server(box)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ROLLOUT_ENVIRONMENTS_DIR", str(box.env_dir))
        mp.setenv("MLFLOW_ROLLOUT_STATE_DIR", str(box.state_root))
        for name, pw in PASSWORDS.items():
            mp.setenv(f"USERS_TEST_{name.upper()}_PW", pw)
        mp.setenv("USERS_TEST_FRANK_PW", FRANK_PW)
        mp.setenv("USERS_TEST_FRANK_PW2", FRANK_PW2)
        mp.setenv("USERS_TEST_ADMIN_REFUSED_PW", ADMIN_REFUSED_PW)
        srv.write(declared_users())
        try:
            r = box.cli("rollout", "--env", ENV)
            assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
            ADMIN_PASSWORDS.append(srv.admin()[1])
            yield srv
        finally:
            for path in box.env_dir.glob("*.yaml"):
                box.stop(path.stem)


def run(**params):
    from flows.users import UsersRequest, users

    return users(UsersRequest(environment=ENV, **params))


def kinds(result: dict) -> list[tuple[str, str]]:
    return [(row["action"], row["user"]) for row in result["plan"]]


# ------------------------------------------------------------ client error mapping
def test_client_error_mapping_never_carries_a_password_or_hash() -> None:
    """Pure unit test (httpx.MockTransport): how server answers become our errors."""
    from pydantic import SecretStr

    from mlflow_rollout.errors import AuthError, PermanentError, TransientError
    from targets.base import Endpoint
    from tasks.mlflow_users import MlflowAuthClient

    duplicate = (
        "User (username=alice) already exists. Error: (sqlite3.IntegrityError) UNIQUE constraint failed\n"
        "[SQL: INSERT INTO users (username, password_hash, is_admin) VALUES (?, ?, ?)]\n"
        "[parameters: ('alice', 'scrypt:32768:8:1$SALT$HASH', 0)]"
    )

    def answer(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith("/users/create"):
            return httpx.Response(400, json={"error_code": "RESOURCE_ALREADY_EXISTS", "message": duplicate})
        if path.endswith("/users/get"):
            return httpx.Response(404, json={"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "not found"})
        if path.endswith("/users/list"):
            return httpx.Response(503, text="unavailable")
        if path.endswith("/users/current"):
            return httpx.Response(401, text="You are not authenticated.")
        if path.endswith("/permissions/grant"):
            return httpx.Response(403, text="Permission denied")
        if path.endswith("/permissions/revoke"):
            return httpx.Response(404, json={"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "absent"})
        if path.endswith("/update-admin"):
            return httpx.Response(409, json={"error_code": "ABORTED", "message": "conflict"})
        if path.endswith("/experiments/get-by-name"):
            return httpx.Response(200, json={"experiment": {"experiment_id": "7", "lifecycle_stage": "deleted"}})
        raise httpx.ConnectError("connection refused", request=request)

    pw = SecretStr("Canary-Unit-Pw-3f9e2a71")
    with MlflowAuthClient(
        Endpoint(url="https://mlflow.invalid"), "admin", pw, transport=httpx.MockTransport(answer),
    ) as client:
        with pytest.raises(PermanentError) as exc:
            client.create_user("alice", pw)
        assert "already exists" in str(exc.value)
        assert "scrypt" not in str(exc.value) and "parameters" not in str(exc.value)
        assert pw.get_secret_value() not in str(exc.value)
        assert client.get_user("nobody") is None
        with pytest.raises(TransientError):
            client.list_users()
        with pytest.raises(AuthError, match="401"):
            client.current_user()
        with pytest.raises(AuthError, match="403"):
            client.grant("alice", "experiment", "1", "READ")
        assert client.revoke("alice", "experiment", "1") is False
        with pytest.raises(TransientError):
            client.update_admin("alice", True)
        with pytest.raises(PermanentError, match="is deleted"):
            client.experiment_id("old")
        with pytest.raises(TransientError, match="cannot connect"):
            client.create_experiment("x")
        with pytest.raises(PermanentError, match="bootstrap admin"):
            client.delete_user("admin")
        with pytest.raises(PermanentError, match="bootstrap admin"):
            client.update_admin("admin", False)


# --------------------------------------------------------------------- reconcile
def test_dry_run_changes_nothing_then_reconcile_is_idempotent(server: Server) -> None:
    assert server.usernames() == {"admin": True}
    dry = run(dry_run=True)
    assert dry["dry_run"] and dry["applied"] == [] and not dry["changed"]
    planned = kinds(dry)
    for name in PASSWORDS:
        assert ("create-user", name) in planned
    assert ("create-resource", "") in planned
    details = " ".join(r["detail"] for r in dry["plan"])
    assert "'exp-a'" in details and "'model-b'" in details and "written as DENY" in details
    assert server.usernames() == {"admin": True}, "a dry run must not change the server"
    assert server.experiment_id("exp-a") is None

    applied = run()
    assert applied["changed"] and len(applied["applied"]) == len(applied["plan"]) == len(dry["plan"])
    assert server.usernames() == {"admin": True, "alice": False, "bob": False, "carol": True, "dora": False}

    again = run()
    assert again["plan"] == [] and again["applied"] == [] and not again["changed"]


def test_declared_users_have_the_declared_permission_and_nothing_more(server: Server) -> None:
    exp = server.experiment_id("exp-a")
    assert exp is not None
    with server.http(server.admin()) as admin:
        run_id = admin.post("/api/2.0/mlflow/runs/create", json={"experiment_id": exp}).json()["run"]["info"]["run_id"]
    metric = {"run_id": run_id, "key": "m", "value": 1.0, "timestamp": 0, "step": 0}

    for name, pw in PASSWORDS.items():
        assert server.login(name, pw) == 200
        assert server.login(name, pw + "-wrong") == 401

    with server.as_user("alice") as alice:  # READ on exp-a
        assert alice.get("/api/2.0/mlflow/experiments/get", params={"experiment_id": exp}).status_code == 200
        assert alice.get("/api/2.0/mlflow/runs/get", params={"run_id": run_id}).status_code == 200
        assert alice.post("/api/2.0/mlflow/runs/create", json={"experiment_id": exp}).status_code == 403
        assert alice.post("/api/2.0/mlflow/runs/log-metric", json=metric).status_code == 403
        assert alice.patch(
            "/api/2.0/mlflow/registered-models/update", json={"name": "model-b", "description": "alice"}
        ).status_code == 403
        # cannot change anyone's permissions, nor her own
        for who, perm in (("bob", "READ"), ("alice", "MANAGE")):
            r = alice.post("/api/3.0/mlflow/users/permissions/grant", json={
                "username": who, "resource_type": "experiment", "resource_id": exp, "permission": perm})
            assert r.status_code == 403, r.text
        assert alice.patch("/api/2.0/mlflow/users/update-admin", json={"username": "alice", "is_admin": True}).status_code == 403

    with server.as_user("bob") as bob:  # EDIT on exp-a, MANAGE on model-b
        r = bob.post("/api/2.0/mlflow/runs/create", json={"experiment_id": exp})
        assert r.status_code == 200, r.text
        assert bob.post("/api/2.0/mlflow/runs/log-metric", json=metric).status_code == 200
        assert bob.patch(
            "/api/2.0/mlflow/registered-models/update", json={"name": "model-b", "description": "bob"}
        ).status_code == 200
        # EDIT does not include managing exp-a's permissions; MANAGE on model-b does
        assert bob.post("/api/3.0/mlflow/users/permissions/grant", json={
            "username": "alice", "resource_type": "experiment", "resource_id": exp, "permission": "EDIT"}).status_code == 403
        assert bob.post("/api/3.0/mlflow/users/permissions/grant", json={
            "username": "alice", "resource_type": "registered_model", "resource_id": "model-b", "permission": "EDIT"}).status_code == 200

    with server.as_user("dora") as dora:  # NO_PERMISSIONS (DENY) on exp-a, default READ elsewhere
        assert dora.get("/api/2.0/mlflow/experiments/get", params={"experiment_id": exp}).status_code == 403
        assert dora.get("/api/2.0/mlflow/registered-models/get", params={"name": "model-b"}).status_code == 200

    with server.as_user("carol") as carol:  # admin
        assert carol.get("/api/2.0/mlflow/users/current").json()["user"]["is_admin"] is True
        assert carol.get("/api/2.0/mlflow/users/get", params={"username": "bob"}).status_code == 200

    # The grant bob made to alice is on a declared resource but not declared: reconcile revokes it.
    plan = run(dry_run=True)
    assert kinds(plan) == [("revoke", "alice")] and "'model-b'" in plan["plan"][0]["detail"]
    run()
    with server.as_user("alice") as alice:
        assert alice.patch(
            "/api/2.0/mlflow/registered-models/update", json={"name": "model-b", "description": "alice"}
        ).status_code == 403
    assert run()["plan"] == []


def test_reconcile_updates_permissions_and_admin_flags(server: Server) -> None:
    exp = server.experiment_id("exp-a")
    server.write(declared_users(
        bob={"permissions": [{"resource_type": "experiment", "resource": "exp-a", "permission": "READ"}]},
        carol={"admin": False},
    ))
    try:
        result = run()
        assert sorted(kinds(result)) == [("grant", "bob"), ("revoke", "bob"), ("set-admin", "carol")]
        grant = next(r for r in result["plan"] if r["action"] == "grant")
        assert "replacing EDIT" in grant["detail"]
        with server.as_user("bob") as bob:
            assert bob.post("/api/2.0/mlflow/runs/create", json={"experiment_id": exp}).status_code == 403
        assert server.usernames()["carol"] is False
        assert run()["plan"] == []
    finally:
        server.write(declared_users())
    restored = run()
    assert sorted(kinds(restored)) == [("grant", "bob"), ("grant", "bob"), ("set-admin", "carol")]
    assert run()["plan"] == []


def test_password_drift_is_repaired_without_storing_hashes(server: Server) -> None:
    with server.http(server.admin()) as admin:
        r = admin.patch("/api/2.0/mlflow/users/update-password", json={"username": "dora", "password": "Changed-Out-Of-Band-1"})
        assert r.status_code == 200
    # Until the per-worker auth cache forgets it, some worker still accepts the declared password.
    server.eventually_refused("dora", PASSWORDS["dora"])
    result = run()
    assert kinds(result) == [("set-password", "dora")]
    assert server.login("dora", PASSWORDS["dora"]) == 200
    assert run()["plan"] == []


def test_prune_deletes_undeclared_user_and_its_access(server: Server) -> None:
    server.write(declared_users(alice=None))
    try:
        kept = run()
        assert kept["plan"] == []
        assert any("'alice'" in n and "users_prune is off" in n for n in kept["notes"])

        server.write(declared_users(alice=None), users_prune=True)
        pruned = run()
        assert kinds(pruned) == [("delete-user", "alice")], "only alice: never the bootstrap admin"
        assert "alice" not in server.usernames() and server.usernames()["admin"] is True
        server.eventually_refused("alice", PASSWORDS["alice"])
        assert run()["plan"] == []
    finally:
        server.write(declared_users())
    back = run()
    assert ("create-user", "alice") in kinds(back)
    assert server.login("alice", PASSWORDS["alice"]) == 200


def test_the_bootstrap_admin_is_protected(server: Server) -> None:
    before = server.usernames()
    server.write(declared_users(admin={"admin": False}))
    try:
        with pytest.raises(BadInputError, match="bootstrap admin"):
            run()
        with pytest.raises(BadInputError, match="bootstrap admin"):
            run(dry_run=True)
    finally:
        server.write(declared_users())
    # even with prune on and the admin undeclared, it is never planned for deletion
    server.write(declared_users(), users_prune=True)
    try:
        assert run(dry_run=True)["plan"] == []
    finally:
        server.write(declared_users())
    with pytest.raises(BadInputError, match="bootstrap admin"):
        run(action="delete", username="admin")
    with pytest.raises(BadInputError, match="rotate-admin-password"):
        run(action="set-password", username="admin", password_secret="env:USERS_TEST_FRANK_PW")
    with pytest.raises(BadInputError, match="bootstrap admin"):
        run(action="grant", username="admin", resource_type="experiment", resource="exp-a", permission="READ")
    assert server.usernames() == before
    assert server.login(*server.admin()) == 200


def test_single_actions(server: Server) -> None:
    exp = server.experiment_id("exp-a")
    with pytest.raises(ValidationError):  # a password value is not a secret reference
        from flows.users import UsersRequest

        UsersRequest(environment=ENV, action="create", username="frank", password_secret=FRANK_PW)

    created = run(action="create", username="frank", password_secret="env:USERS_TEST_FRANK_PW")
    assert kinds(created) == [("create-user", "frank")]
    assert server.login("frank", FRANK_PW) == 200
    assert run(action="create", username="frank", password_secret="env:USERS_TEST_FRANK_PW")["plan"] == []

    grant = dict(action="grant", username="frank", resource_type="experiment", resource="exp-a")
    assert kinds(run(**grant, permission="EDIT", dry_run=True)) == [("grant", "frank")]
    with server.as_user("frank", FRANK_PW) as frank:
        assert frank.post("/api/2.0/mlflow/runs/create", json={"experiment_id": exp}).status_code == 403
    run(**grant, permission="EDIT")
    with server.as_user("frank", FRANK_PW) as frank:
        assert frank.post("/api/2.0/mlflow/runs/create", json={"experiment_id": exp}).status_code == 200
    assert run(**grant, permission="EDIT")["plan"] == []
    downgraded = run(**grant, permission="READ")
    assert "replacing EDIT" in downgraded["plan"][0]["detail"]
    with server.as_user("frank", FRANK_PW) as frank:
        assert frank.post("/api/2.0/mlflow/runs/create", json={"experiment_id": exp}).status_code == 403
    run(**grant, permission="NO_PERMISSIONS")
    with server.as_user("frank", FRANK_PW) as frank:
        assert frank.get("/api/2.0/mlflow/experiments/get", params={"experiment_id": exp}).status_code == 403

    revoke = dict(action="revoke", username="frank", resource_type="experiment", resource="exp-a")
    assert kinds(run(**revoke)) == [("revoke", "frank")]
    with server.as_user("frank", FRANK_PW) as frank:  # back to default_permission READ
        assert frank.get("/api/2.0/mlflow/experiments/get", params={"experiment_id": exp}).status_code == 200
    assert run(**revoke)["plan"] == []

    with pytest.raises(BadInputError, match="does not exist"):
        run(action="grant", username="frank", resource_type="experiment", resource="no-such-exp", permission="READ")
    with pytest.raises(BadInputError, match="needs"):
        run(action="grant", username="frank", resource_type="experiment", resource="exp-a")

    changed = run(action="set-password", username="frank", password_secret="env:USERS_TEST_FRANK_PW2")
    assert kinds(changed) == [("set-password", "frank")]
    assert server.login("frank", FRANK_PW2) == 200
    server.eventually_refused("frank", FRANK_PW)

    deleted = run(action="delete", username="frank")
    assert kinds(deleted) == [("delete-user", "frank")]
    server.eventually_refused("frank", FRANK_PW2)
    assert "frank" not in server.usernames()
    assert run(action="delete", username="frank")["plan"] == []


# ----------------------------------------------------------------- admin rotation
def test_rotate_admin_password(server: Server, tmp_path: Path) -> None:
    user, old = server.admin()
    dry = run(action="rotate-admin-password", dry_run=True)
    assert kinds(dry) == [("rotate-admin-password", "admin")]
    assert server.admin_file.read_text() == old and server.login(user, old) == 200

    # An environment that takes the admin password from an env var: refused, nothing changed.
    server.box.write_environment("users-envref", {
        "local": {"port": server.box.port, "state_dir": str(server.state)},
        "secrets": {"admin_password": {"env": "USERS_TEST_ADMIN_PW", "generate": False}},
    })
    with pytest.raises(BadInputError, match="environment variable USERS_TEST_ADMIN_PW"):
        from flows.users import UsersRequest, users

        users(UsersRequest(environment="users-envref", action="rotate-admin-password"))
    assert server.admin_file.read_text() == old and server.login(user, old) == 200
    (server.box.env_dir / "users-envref.yaml").unlink()

    result = run(action="rotate-admin-password")
    new = server.admin_file.read_text()
    ADMIN_PASSWORDS.append(new)
    assert new != old and len(new) >= 12
    assert server.admin_file.stat().st_mode & 0o777 == 0o600
    assert not list(server.admin_file.parent.glob("admin-password.*")), "no pending or temp file left"
    assert result["changed"] and "rotated" in result["applied"][0]
    assert server.login(user, new) == 200
    assert server.login(user, old) == 401  # the flow's verify stage already waited out the auth cache

    # The next rollout reads the stored password and its admin-bootstrap stage verifies it.
    r = server.box.cli("rollout", "--env", ENV)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    assert "admin 'admin' verified" in out
    assert server.login(user, new) == 200


def test_rotate_admin_password_into_a_prefect_secret_block(server: Server) -> None:
    from prefect.blocks.system import Secret

    from flows.users import UsersRequest, users

    _, current = server.admin()
    Secret(value=current).save("users-test-admin-pw", overwrite=True)
    server.box.write_environment("users-block", {
        "mlflow": {"auth_cache_ttl_seconds": CACHE_TTL, "workers": 2},
        "local": {"port": server.box.port, "state_dir": str(server.state)},
        "secrets": {"admin_password": {"prefect_secret": "users-test-admin-pw", "generate": False}},
    })
    try:
        users(UsersRequest(environment="users-block", action="rotate-admin-password"))
    finally:
        (server.box.env_dir / "users-block.yaml").unlink()
    new = server.admin_file.read_text()
    ADMIN_PASSWORDS.append(new)
    assert new != current
    assert Secret.load("users-test-admin-pw").get() == new
    assert server.login("admin", new) == 200 and server.login("admin", current) == 401
    # the declared users were never touched by the rotations
    for name, pw in PASSWORDS.items():
        assert server.login(name, pw) == 200


def test_rotate_admin_password_undoes_the_server_change_when_the_store_write_fails(server: Server) -> None:
    _, current = server.admin()
    blocker = server.admin_file.with_name("admin-password.tmp")
    blocker.mkdir()  # the atomic replace writes this file first: now it cannot (also as root)
    try:
        with pytest.raises(PermanentError) as failed:
            run(action="rotate-admin-password", password_secret="env:USERS_TEST_ADMIN_REFUSED_PW")
    finally:
        blocker.rmdir()
    message = str(failed.value)
    assert "storing the new admin password failed after the server took it" in message
    assert "undone: the server and every store have the old admin password again" in message
    assert ADMIN_REFUSED_PW not in message and current not in message
    assert server.admin_file.read_text() == current and server.login("admin", current) == 200
    server.eventually_refused("admin", ADMIN_REFUSED_PW)
    assert not list(server.admin_file.parent.glob("admin-password.*")), "no pending or temp file left"


def test_rotate_admin_password_finishes_an_interrupted_rotation(server: Server) -> None:
    """The runner died after MLflow took the new password (recorded as pending), before the store write."""
    from mlflow_rollout.settings import load_environment
    from pydantic import SecretStr
    from targets.local import LocalTarget

    _, current = server.admin()
    LocalTarget(load_environment(ENV)).set_pending_admin_password(SecretStr(ADMIN_RESUMED_PW))
    with server.http(server.admin()) as admin:
        r = admin.patch("/api/2.0/mlflow/users/update-password",
                        json={"username": "admin", "password": ADMIN_RESUMED_PW, "current_password": current})
        assert r.status_code == 200, r.text
    ADMIN_PASSWORDS.append(ADMIN_RESUMED_PW)
    server.eventually_refused("admin", current)
    with pytest.raises(AuthError, match="401"):  # the stored password no longer opens the server
        run()
    result = run(action="rotate-admin-password")
    assert "an interrupted rotation finished" in result["applied"][0]
    assert server.admin_file.read_text() == ADMIN_RESUMED_PW
    assert not list(server.admin_file.parent.glob("admin-password.*"))
    assert server.login("admin", ADMIN_RESUMED_PW) == 200
    assert run()["plan"] == []


# -------------------------------------------------------------------- secret scan
def test_no_user_or_admin_password_in_prefect_records(server: Server) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter, ArtifactFilterFlowRunId, FlowFilter, FlowFilterName, FlowRunFilter, LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["mlflow-users"])), limit=200)
        assert len(runs) >= 20
        ids = [r.id for r in runs]
        places = {
            "parameters": repr([r.parameters for r in runs]),
            "states": repr([(r.state.name, r.state.message) for r in runs if r.state]),
        }
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)), limit=200)
        places["logs"] = "\n".join(log.message for log in logs)
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids)))
        places["artifacts"] = "\n".join(f"{a.key} {a.data} {a.description}" for a in arts)
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": ids}))
        places["task runs"] = repr([(t.name, t.task_inputs, t.state.message if t.state else "") for t in task_runs])
    assert "plan:" in places["logs"] and "applied:" in places["logs"]
    assert "mlflow-users-users-plan" in places["artifacts"] and "create-user" in places["artifacts"]
    assert "environment variable USERS_TEST_ALICE_PW" in places["artifacts"]
    canaries = {**{f"{n} password": p for n, p in PASSWORDS.items()}, "frank password": FRANK_PW,
                "frank 2nd password": FRANK_PW2, "refused admin password": ADMIN_REFUSED_PW}
    canaries.update({f"admin password #{i}": p for i, p in enumerate(ADMIN_PASSWORDS)})
    assert len(ADMIN_PASSWORDS) == 4
    leaks = [f"{label} in {where}" for label, secret in canaries.items() for where, text in places.items() if secret in text]
    assert not leaks, leaks
