"""Flow ``mlflow-users`` on the kubernetes target: the emulated cluster of ``tests/support/k8s_world.py``.

Real parts as there: helm 4 into the Kubernetes API emulator, moto, the DNS
server that serves the Route53 records, PostgreSQL, and a real MLflow with
basic-auth behind the load balancer's name (a test-started process that
shares the auth database the environment's rollout bootstraps). The
environment takes its admin password from a Prefect Secret block, so a
rotation has three places to keep in step: MLflow, the existingSecret's
``admin-password`` key and the block. The users flow runs in this process.

The public name ``mlflow.example.com`` resolves only through the
environment's DNS resolvers, never through the system resolver: every call
the flow makes goes to the load balancer's address (``connect_address``)
with the public name as SNI and Host.
"""

from __future__ import annotations

import base64
import socket
import ssl

import httpx
import pytest
from pydantic import SecretStr

from mlflow_rollout.errors import AuthError
from mlflow_rollout.settings import load_environment
from mlflow_rollout.types import Endpoint
from targets.kubernetes import KubernetesTarget
from tests.support.kube_emulator import kube_emulator
from tests.support.k8s_world import (  # noqa: F401  (world is a fixture)
    ADMIN_PW,
    FLASK_KEY,
    HOST,
    LB,
    NS,
    STARTUP_LOG,
    _environment,
    _sandbox,
    world,
)

pytestmark = pytest.mark.e2e

ENV = "prod"
BLOCK = "k8s-users-admin-pw"
SECRET = "mlflow-credentials"
ALICE_PW = "K8s-Alice-Pw-5b7e1c93"
#: A rotation's new password named with password_secret (so the test knows it); never stored when it fails.
REFUSED_PW = "K8s-Refused-Admin-Pw-0c4d8e2a"
SEEN: list[str] = [ADMIN_PW]


class Cluster:
    def __init__(self, kube, box, world):
        self.kube, self.box = kube, box
        self.server = world[1]

    def target(self) -> KubernetesTarget:
        return KubernetesTarget(load_environment(ENV, self.box.env_dir))

    def secret(self, name: str = SECRET) -> dict[str, str]:
        obj = self.kube.control.object("Secret", name, NS)
        assert obj is not None, name
        return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}

    def block(self) -> str:
        from prefect.blocks.system import Secret

        return Secret.load(BLOCK).get()

    def login(self, user: str, password: str) -> int:
        """``/users/current`` at the load balancer's address, as a client that knows the name's address."""
        ctx = ssl.create_default_context(cafile=str(self.server.ca))
        with httpx.Client(verify=ctx, timeout=30, auth=(user, password)) as c:
            r = c.get(f"https://127.0.0.1:{self.server.port}/api/2.0/mlflow/users/current",
                      headers={"Host": f"{HOST}:{self.server.port}"}, extensions={"sni_hostname": HOST})
        return r.status_code

    def rollout(self) -> str:
        r = self.box.cli("rollout", "--env", ENV)
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-6000:] + "\n--- emulator ---\n" + self.kube.log_tail()
        return out


@pytest.fixture(scope="module")
def cluster(world, tmp_path_factory: pytest.TempPathFactory):  # noqa: F811
    from prefect.blocks.system import Secret

    _, _, _, _, api = world
    tmp = tmp_path_factory.mktemp("users-k8s")
    Secret(value=ADMIN_PW).save(BLOCK, overwrite=True)
    with kube_emulator(tmp / "kube") as kube:
        kube.control.set_ingress_hostname(LB)
        kube.control.set_logs(STARTUP_LOG, deployment="mlflow", namespace=NS)
        box = _sandbox(tmp, api)
        _environment(box, ENV, kube, world, helm="helm4", extra={
            "mlflow": {"auth_cache_ttl_seconds": 0},
            "secrets": {"admin_password": {"prefect_secret": BLOCK, "generate": False}},
            "users": [{"username": "alice", "password": {"env": "K8S_USERS_ALICE_PW"}, "permissions": [
                {"resource_type": "experiment", "resource": "k8s-exp", "permission": "EDIT"}]}],
        })
        c = Cluster(kube, box, world)
        c.rollout()
        assert c.secret()["admin-password"] == ADMIN_PW
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_ROLLOUT_ENVIRONMENTS_DIR", str(box.env_dir))
            mp.setenv("K8S_USERS_ALICE_PW", ALICE_PW)
            mp.setenv("K8S_USERS_REFUSED_PW", REFUSED_PW)
            yield c


def run(**params):
    from flows.users import UsersRequest, users

    return users(UsersRequest(environment=ENV, **params))


# ------------------------------------------------------------------ connect_address
def test_users_flow_reaches_the_server_through_connect_address(cluster: Cluster) -> None:
    with pytest.raises(socket.gaierror):  # the runner's own resolver does not know the public name
        socket.getaddrinfo(HOST, cluster.server.port)
    endpoint = cluster.target().endpoint()
    assert endpoint.url == f"https://{HOST}:{cluster.server.port}" and endpoint.connect_address == "127.0.0.1"

    result = run()
    assert [(r["action"], r["user"]) for r in result["plan"]] == [("create-resource", ""), ("create-user", "alice"),
                                                                  ("grant", "alice")]
    assert cluster.login("alice", ALICE_PW) == 200
    assert run()["plan"] == []

    # The auth client on its own: the URL's name for TLS and Host, the address for the connection.
    from tasks.mlflow_users import MlflowAuthClient, login_status

    pinned = Endpoint(url=f"https://{HOST}:{cluster.server.port}", ca_bundle=cluster.server.ca,
                      connect_address="127.0.0.1")
    with MlflowAuthClient(pinned, "admin", SecretStr(cluster.secret()["admin-password"])) as client:
        assert {u.username for u in client.list_users()} >= {"admin", "alice"}
    assert login_status(pinned, "alice", SecretStr(ALICE_PW)) == 200


# ------------------------------------------------------------------ admin rotation
def test_rotation_updates_server_existing_secret_and_block(cluster: Cluster) -> None:
    before = cluster.secret()
    assert before["admin-password"] == ADMIN_PW == cluster.block()

    result = run(action="rotate-admin-password")
    new = cluster.secret()["admin-password"]
    SEEN.append(new)
    assert new != ADMIN_PW and len(new) >= 12
    assert result["changed"] and f"secret {NS}/{SECRET} key 'admin-password'" in result["applied"][0]
    assert cluster.block() == new
    assert {k: v for k, v in cluster.secret().items() if k != "admin-password"} == {
        k: v for k, v in before.items() if k != "admin-password"}
    assert cluster.secret(f"{SECRET}-rotation") == {}  # no rotation in flight
    assert cluster.login("admin", new) == 200 and cluster.login("admin", ADMIN_PW) == 401
    assert cluster.target().admin_password().get_secret_value() == new

    # The next rollout reads the block, writes the existingSecret and verifies the admin with it.
    out = cluster.rollout()
    assert "admin 'admin' verified" in out and "completed smoke-auth" in out
    assert cluster.secret()["admin-password"] == new
    assert all(p not in out for p in SEEN)
    assert run()["plan"] == []  # the users flow logs in with the stored password


def test_existing_secret_write_failing_is_undone(cluster: Cluster) -> None:
    current = cluster.secret()["admin-password"]
    assert cluster.login("admin", current) == 200
    fault = {"status": 403, "count": -1, "methods": ["PUT"],
             "path_regex": rf"^/api/v1/namespaces/{NS}/secrets/{SECRET}$"}  # the existingSecret only
    cluster.kube.control._call("POST", "faults", fault)  # EmulatorControl has no helper for faults
    try:
        with pytest.raises(AuthError) as failed:
            run(action="rotate-admin-password", password_secret="env:K8S_USERS_REFUSED_PW")
    finally:
        cluster.kube.control._call("POST", "faults", {"clear": True})
    message = str(failed.value)
    assert "storing the new admin password failed after the server took it" in message
    assert "undone: the server and every store have the old admin password again" in message
    assert REFUSED_PW not in message and current not in message
    # A working admin login with the password the next run reads.
    assert cluster.secret()["admin-password"] == current == cluster.block()
    assert cluster.login("admin", current) == 200 and cluster.login("admin", REFUSED_PW) == 401
    assert cluster.secret(f"{SECRET}-rotation") == {}
    assert run()["plan"] == []


def test_an_interrupted_rotation_is_finished_by_the_next_run(cluster: Cluster) -> None:
    """The runner died after MLflow took the new password (recorded as pending), before any store write."""
    current = cluster.secret()["admin-password"]
    target = cluster.target()
    target.set_pending_admin_password(SecretStr(REFUSED_PW))
    from tasks.mlflow_users import MlflowAuthClient

    with MlflowAuthClient(target.endpoint(), "admin", SecretStr(current)) as client:
        client.update_password("admin", SecretStr(REFUSED_PW), current_password=SecretStr(current))
    assert cluster.login("admin", REFUSED_PW) == 200 and cluster.login("admin", current) == 401
    SEEN.append(REFUSED_PW)

    dry = run(action="rotate-admin-password", dry_run=True)
    assert "interrupted rotation" in dry["plan"][0]["detail"]
    result = run(action="rotate-admin-password")
    assert "an interrupted rotation finished" in result["applied"][0]
    assert cluster.secret()["admin-password"] == REFUSED_PW == cluster.block()
    assert cluster.secret(f"{SECRET}-rotation") == {}
    assert cluster.login("admin", REFUSED_PW) == 200
    out = cluster.rollout()
    assert "admin 'admin' verified" in out and all(p not in out for p in SEEN)


def test_no_admin_password_in_prefect_records(cluster: Cluster) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["mlflow-users"])), limit=200)
        ids = [r.id for r in runs]
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)), limit=200)
        text = "\n".join(log.message for log in logs) + repr([(r.parameters, r.state.message if r.state else "")
                                                              for r in runs])
    assert "rotate-admin-password" in text
    leaks = [i for i, p in enumerate([*SEEN, ALICE_PW, FLASK_KEY]) if p in text]
    assert not leaks, leaks
