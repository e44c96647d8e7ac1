"""The runbook's troubleshooting ("문제 해결"), proven on running pods: each failure is made for real and
``mlflow-rollout diagnose`` (and health's degraded event) must name its cause.

One emulated cluster (the process kubelet: the chart's pods run the pinned MLflow, PostgreSQL stands for
RDS, moto for IAM/S3/STS, the emulated ALB in front) with one good rollout. Each test breaks one thing the
way it breaks in production — a wrong password in the existingSecret, a database port nobody listens on,
the IRSA annotation gone, a role policy without ``s3:PutObject``, a broken ``basic_auth.ini``, a Service
selector that matches nothing, a stored admin password that no longer opens the admin, auth turned off
by hand — lets the pods meet it, asserts the named cause, and puts the cluster back (a healthy diagnosis).

Needs root (network namespaces); elsewhere the module is skipped with the reason.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.support.kube_emulator import pods_unavailable
from tests.support.k8s_world import ADMIN_PW, FLASK_KEY, NS, _helm, _sandbox
from tests.support.pod_cluster import Cluster, environment, kubectl, pod_world, running_cluster
from tests.support.rollout import Sandbox

_REASON = pods_unavailable()
pytestmark = [pytest.mark.e2e, pytest.mark.pods, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

SECRET = "mlflow-credentials"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, moto, postgres, prefect_api: str):
    with pod_world(tmp_path_factory.mktemp("diag"), moto, postgres, prefect_api) as w:
        yield w


@pytest.fixture(scope="module")
def cluster(world, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Sandbox]]:
    """One pod, one worker, a good rollout (auth on, DNS, smoke), and a healthy diagnosis to start from."""
    tmp = tmp_path_factory.mktemp("diag-cluster")
    with running_cluster(tmp, world, "diag") as running:
        box = _sandbox(tmp, world[4])
        environment(box, "prod", running, world, helm="helm4", small=True)
        r = box.cli("rollout", "--env", "prod")
        assert r.returncode == 0, (r.stdout + r.stderr)[-5000:] + "\n--- emulator ---\n" + running.kube.log_tail()
        yield running, box


def _diagnose(box: Sandbox) -> tuple[int, dict]:
    r = box.cli("diagnose", "--env", "prod", "--json", timeout=180)
    assert r.returncode in (0, 1), (r.stdout + r.stderr)[-4000:]
    for secret in (ADMIN_PW, FLASK_KEY):
        assert secret not in r.stdout + r.stderr
    return r.returncode, json.loads(r.stdout)


def _healthy(box: Sandbox, timeout: float = 120) -> None:
    """The diagnosis finds nothing (the cluster is back), within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        code, report = _diagnose(box)
        if code == 0:
            assert report["findings"] == [], report
            return
        assert time.monotonic() < deadline, f"still not healthy: {report}"
        time.sleep(3)


def _until(box: Sandbox, rule: str, timeout: float = 150) -> dict:
    """Diagnose until a finding of ``rule`` appears; that finding (with the whole report)."""
    deadline = time.monotonic() + timeout
    while True:
        code, report = _diagnose(box)
        found = [f for f in report["findings"] if f["rule"] == rule]
        if found:
            assert code == 1
            return {**found[0], "report": report}
        assert time.monotonic() < deadline, f"no {rule} finding: {report}"
        time.sleep(3)


def _server_pods(c: Cluster) -> list[dict]:
    return [p for p in c.kube.control.objects("Pod", NS)
            if p["metadata"]["name"].startswith("mlflow-") and not p["metadata"]["name"].startswith("mlflow-migrate")]


def _restart_pods(c: Cluster) -> None:
    """Delete the server pods: the ReplicaSet makes new ones, which read the Secret and ServiceAccount again."""
    for pod in _server_pods(c):
        kubectl(c.kube, "delete", "pod", pod["metadata"]["name"], "-n", NS, "--wait=false")


def _wait_ready(c: Cluster, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        pods = [p for p in _server_pods(c) if not p["metadata"].get("deletionTimestamp")]
        if pods and all(all(s.get("ready") for s in p["status"].get("containerStatuses") or [{}]) for p in pods):
            return
        assert time.monotonic() < deadline, "server pods never Ready again"
        time.sleep(1)


def _secret(c: Cluster) -> dict[str, str]:
    obj = c.kube.control.object("Secret", SECRET, NS)
    return {k: base64.b64decode(v).decode() for k, v in obj["data"].items()}


def _write_secret(c: Cluster, tmp: Path, data: dict[str, str]) -> None:
    obj = json.loads(kubectl(c.kube, "get", "secret", SECRET, "-n", NS, "-o", "json"))
    obj["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    path = tmp / f"secret-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(obj))
    kubectl(c.kube, "replace", "-f", str(path))


@contextlib.contextmanager
def _secret_changed(c: Cluster, tmp: Path, edit) -> Iterator[None]:
    """The existingSecret edited by ``edit(data)`` and the pods restarted on it; put back (and restarted) after."""
    original = _secret(c)
    _write_secret(c, tmp, edit(dict(original)))
    _restart_pods(c)
    try:
        yield
    finally:
        _write_secret(c, tmp, original)
        _restart_pods(c)
        _wait_ready(c)


def _db_uri(uri: str, *, password: str | None = None, host: str | None = None, port: int | None = None) -> str:
    m = re.match(r"^(?P<scheme>[^:]+://)(?P<user>[^:@]+):(?P<pw>[^@]*)@(?P<host>[^:/]+):(?P<port>\d+)(?P<rest>/.*)$", uri)
    assert m, "unexpected URI shape"
    return (f"{m['scheme']}{m['user']}:{password if password is not None else m['pw']}@"
            f"{host or m['host']}:{port or m['port']}{m['rest']}")


def _everywhere(data: dict[str, str], **change) -> dict[str, str]:
    """A database URI changed in the Secret's backend-store-uri, auth-database-uri and basic_auth.ini alike."""
    old = data["backend-store-uri"]
    new = _db_uri(old, **change)
    out = {k: v.replace(old, new) for k, v in data.items()}
    old_ini = re.search(r"database_uri = (.*)", data["basic_auth.ini"]).group(1)
    out["basic_auth.ini"] = data["basic_auth.ini"].replace(old_ini, _db_uri(old_ini.replace("%%", "%"), **change)
                                                           .replace("%", "%%"))
    return out


# ----------------------------------------------------------------------------- 1. the database
def test_wrong_database_password_is_named_credentials_refused(cluster, tmp_path: Path) -> None:
    c, box = cluster
    _healthy(box)
    with _secret_changed(c, tmp_path, lambda d: _everywhere(d, password="not-the-password")):
        found = _until(box, "database")
        assert "refuses the credentials" in found["cause"] and f"secret {NS}/{SECRET} key backend-store-uri" in found["cause"]
        assert "rds_connection_string" in found["fix"]
        assert any("password authentication failed" in e for e in found["evidence"]), found  # the pod's own log
        assert any("from this runner: credentials-refused" in e for e in found["evidence"]), found
        assert "not-the-password" not in json.dumps(found["report"])
    _healthy(box)


@pytest.mark.parametrize("where, cause", [
    # the pods' 127.0.0.1 is their own: nothing listens there, while this runner reaches PostgreSQL on it
    ("runner-only", "the pods cannot reach the database"),
    ("nobody", "nothing answers at"),
])
def test_unreachable_database_is_told_apart_by_the_runner_s_own_attempt(cluster, tmp_path: Path, postgres,
                                                                        where: str, cause: str) -> None:
    c, box = cluster
    change = {"host": "127.0.0.1", "port": postgres.port} if where == "runner-only" else {"port": 1}
    with _secret_changed(c, tmp_path, lambda d: _everywhere(d, **change)):
        found = _until(box, "database")
        assert cause in found["cause"], found
        assert any("Connection refused" in e or "connection to server" in e for e in found["evidence"]), found
        if where == "runner-only":
            assert "security group" in found["fix"] and "from this runner: ok" in " ".join(found["evidence"])
        else:
            assert "rds_endpoint" in found["fix"] and "from this runner: unreachable" in " ".join(found["evidence"])
    _healthy(box)


# ----------------------------------------------------------------------------- 2. S3 through IRSA
def test_irsa_annotation_missing_is_named_and_health_reports_it(cluster, world) -> None:
    c, box = cluster
    cloud = world[0]
    sa = json.loads(kubectl(c.kube, "get", "sa", "-n", NS, "-o", "json"))["items"]
    name = next(s["metadata"]["name"] for s in sa if (s["metadata"].get("annotations") or {}).get("eks.amazonaws.com/role-arn"))
    kubectl(c.kube, "annotate", "sa", name, "-n", NS, "eks.amazonaws.com/role-arn-")
    _restart_pods(c)  # new pods without the web identity token: no AWS credentials at all
    try:
        _wait_ready(c)
        found = _until(box, "s3-access")
        assert f"ServiceAccount {NS}/{name} has no eks.amazonaws.com/role-arn annotation" in found["cause"], found
        assert cloud.role_arn in found["fix"]
        # health with an artifact round trip: the server's S3 call fails for real, the degraded event names it
        r = box.cli("health", "--env", "prod", "--artifacts")
        out = r.stdout + r.stderr
        assert r.returncode == 1, out[-4000:]
        assert "diagnosis: s3-access: the IRSA role is not on the server's ServiceAccount" in out, out[-4000:]
        events = _health_events("degraded")
        assert events and any(d["rule"] == "s3-access" for d in events[0]["payload"]["diagnosis"]), events[:1]
        assert ADMIN_PW not in out
    finally:
        kubectl(c.kube, "annotate", "sa", name, "-n", NS, f"eks.amazonaws.com/role-arn={cloud.role_arn}", "--overwrite")
        _restart_pods(c)
        _wait_ready(c)
    _healthy(box)


def test_role_policy_without_put_object_is_named(cluster, world) -> None:
    c, box = cluster
    cloud = world[0]
    iam = cloud.moto.client("iam")
    iam.put_role_policy(RoleName=cloud.role_name, PolicyName="mlflow-artifacts",
                        PolicyDocument=json.dumps(cloud.artifact_policy(without=("s3:PutObject",))))
    try:
        found = _until(box, "s3-access", timeout=30)
        assert "does not allow s3:PutObject" in found["cause"] and cloud.role_arn in found["cause"], found
        assert f"s3://{cloud.bucket}" in found["cause"]
    finally:
        iam.put_role_policy(RoleName=cloud.role_name, PolicyName="mlflow-artifacts",
                            PolicyDocument=json.dumps(cloud.artifact_policy()))
    _healthy(box)


# ----------------------------------------------------------------------------- 3. configuration
def test_broken_auth_ini_is_named(cluster, tmp_path: Path) -> None:
    c, box = cluster
    with _secret_changed(c, tmp_path, lambda d: {**d, "basic_auth.ini": "[mlflow]\ndefault_permission = READ\n"}):
        found = _until(box, "configuration")
        assert "basic_auth.ini" in found["cause"], found
        assert any("database_uri" in e or "basic_auth" in e or "configparser" in e for e in found["evidence"]), found
    _healthy(box)


# ----------------------------------------------------------------------------- 4. 502 from the load balancer
def test_service_selecting_no_pod_is_named_from_its_endpoints(cluster) -> None:
    c, box = cluster
    svc = json.loads(kubectl(c.kube, "get", "svc", "mlflow", "-n", NS, "-o", "json"))
    selector = svc["spec"]["selector"]
    patch = json.dumps([{"op": "replace", "path": "/spec/selector", "value": {**selector, "app.kubernetes.io/name": "typo"}}])
    kubectl(c.kube, "patch", "svc", "mlflow", "-n", NS, "--type=json", "-p", patch)
    try:
        found = _until(box, "load-balancer", timeout=60)
        assert f"Service {NS}/mlflow selects no Ready pod" in found["cause"], found
        assert any("0 Ready endpoints" in e for e in found["evidence"])
        assert any(re.search(r"answered 50[234]", e) for e in found["evidence"]), found  # the ALB's own answer
    finally:
        restore = json.dumps([{"op": "replace", "path": "/spec/selector", "value": selector}])
        kubectl(c.kube, "patch", "svc", "mlflow", "-n", NS, "--type=json", "-p", restore)
    _healthy(box)


def test_health_check_path_that_answers_401_is_named(cluster) -> None:
    c, box = cluster
    key = "alb.ingress.kubernetes.io/healthcheck-path"
    kubectl(c.kube, "annotate", "ingress", "mlflow", "-n", NS, f"{key}=/api/2.0/mlflow/experiments/search", "--overwrite")
    try:
        found = _until(box, "load-balancer", timeout=60)
        assert "health check fails" in found["cause"] and "answers 401" in found["cause"], found
        assert "/health" in found["fix"]
    finally:
        kubectl(c.kube, "annotate", "ingress", "mlflow", "-n", NS, f"{key}=/health", "--overwrite")
    _healthy(box)


# ----------------------------------------------------------------------------- 5. authentication
def test_stored_admin_password_that_does_not_open_the_admin(cluster, tmp_path: Path) -> None:
    """The Secret's admin-password changed by hand: the running pods keep the old admin (it lives in the
    auth database), so the stored one is refused; the fix is never "recreate the admin"."""
    c, box = cluster
    original = _secret(c)
    _write_secret(c, tmp_path, {**original, "admin-password": "Someone-Else-Changed-It-1"})
    try:
        found = _until(box, "authentication", timeout=60)
        assert "does not open 'admin'" in found["cause"] and "auth database" in found["cause"], found
        assert "rotate-admin-password" in found["fix"] and "do not recreate the admin" in found["fix"]
        # an interrupted rotation: the server took the password the rotation Secret holds
        kubectl(c.kube, "create", "secret", "generic", f"{SECRET}-rotation", "-n", NS,
                f"--from-literal=admin-password-pending={ADMIN_PW}")
        found = _until(box, "authentication", timeout=60)
        assert "rotation was interrupted" in found["cause"], found
    finally:
        _write_secret(c, tmp_path, original)
        kubectl(c.kube, "delete", "secret", f"{SECRET}-rotation", "-n", NS, "--ignore-not-found")
    _healthy(box)


def test_auth_turned_off_by_hand_is_named_with_the_way_back(cluster) -> None:
    """Last in the module: someone upgraded the release with auth off; the diagnosis names it, and its fix
    (the rollback to the last auth-on revision) ends it."""
    c, box = cluster
    # the chart refuses auth off behind an Ingress, so whoever did it also took the Ingress away
    _helm(c.kube, "helm4", "upgrade", "mlflow", str(Path(__file__).parents[1] / "charts" / "mlflow"), "-n", NS,
          "--reuse-values", "--set", "auth.enabled=false", "--set", "ingress.enabled=false", "--wait", "--timeout", "240s")
    found = _until(box, "authentication", timeout=60)
    assert "authentication is not enabled" in found["cause"], found
    assert "mlflow-rollout rollback --env prod" in found["fix"]
    r = box.cli("rollback", "--env", "prod", "--reason", "diagnosis: auth off by hand")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    _healthy(box)


# ----------------------------------------------------------------------------- access: port-forward
def test_laptop_rollout_through_port_forward_passes_every_stage(cluster, world, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A runner on a laptop (``kubernetes.access: port-forward``): the admin login after deploy-auth, the
    smoke checks and the users flow reach the pods through the API's pod port-forward, not the load balancer."""
    c, box = cluster
    environment(box, "laptop", c, world, helm="helm4", namespace="laptop", release="mlflow-laptop", small=True,
                extra={"kubernetes": {"access": "port-forward"},
                       "users": [{"username": "bob", "password": {"env": "LAPTOP_BOB_PW"}}]})
    before = len([r for r in c.kube.control.requests() if r["path"].endswith("/portforward")])
    r = box.cli("rollout", "--env", "laptop")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:] + "\n--- emulator ---\n" + c.kube.log_tail()
    # its auth database is prod's (the same Terraform outputs), which has the admin: no auth-off bootstrap
    assert "skipped deploy-no-auth" in out
    for stage in ("admin-bootstrap", "deploy-auth", "dns", "smoke-https", "smoke-auth",
                  "smoke-tracking", "smoke-artifacts", "smoke-logging"):
        assert f"completed {stage}" in out, stage
    forwards = [r for r in c.kube.control.requests() if r["path"].endswith("/portforward")][before:]
    assert forwards and all(r["path"].startswith("/api/v1/namespaces/laptop/pods/mlflow-laptop-") for r in forwards)
    assert all(r["status"] == 101 for r in forwards), forwards[:3]
    assert ADMIN_PW not in out

    # the users flow (in this process, as a worker runs it) through the port-forward too
    from flows.users import UsersRequest, users
    from mlflow_rollout.settings import load_environment
    from targets.kubernetes import KubernetesTarget
    from tasks.mlflow_users import login_status

    bob_pw = "Laptop-Bob-Pw-5e1d"
    for name, value in {**box.env(), "LAPTOP_BOB_PW": bob_pw}.items():
        if name.startswith(("MLFLOW_ROLLOUT_", "PROD_", "LAPTOP_")):
            monkeypatch.setenv(name, value)
    from pydantic import SecretStr

    from tasks.port_forward import PortForward

    target = KubernetesTarget(load_environment("laptop", box.env_dir))
    try:
        before = len([r for r in c.kube.control.requests() if r["path"].endswith("/portforward")])
        result = users(UsersRequest(environment="laptop"))
        assert ("create-user", "bob") in [(a["action"], a["user"]) for a in result["plan"]], result
        assert len([r for r in c.kube.control.requests() if r["path"].endswith("/portforward")]) > before
        endpoint = target.access_endpoint()
        assert endpoint.url.startswith("http://127.0.0.1:")
        assert login_status(endpoint, "bob", SecretStr(bob_pw)) == 200
    finally:
        target.close()
        import gc

        for forward in [o for o in gc.get_objects() if isinstance(o, PortForward)]:
            forward.close()  # the flow's own target's, kept for the process as in a flow-run process


def _health_events(outcome: str) -> list[dict]:
    import httpx
    from prefect.settings import PREFECT_API_URL

    body = {"filter": {"event": {"name": [f"mlflow.health.{outcome}"]},
                       "resource": {"id": ["mlflow-rollout.environment.prod"]}}, "limit": 5}
    deadline = time.monotonic() + 20
    while True:
        events = httpx.post(f"{PREFECT_API_URL.value()}/events/filter", json=body, timeout=10).json()["events"]
        if events or time.monotonic() > deadline:
            return sorted(events, key=lambda e: e["occurred"], reverse=True)
        time.sleep(0.5)
