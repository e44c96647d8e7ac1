"""The Kubernetes API emulator (tests/support/kube_emulator) against the real clients.

Real binaries only: both pinned helm majors (``.tools/bin/helm3`` v3.19.0,
``.tools/bin/helm4`` v4.1.4), ``.tools/bin/kubectl`` and the ``kubernetes``
Python client. A missing binary is a failure ("run scripts/setup.sh"), not a
skip. Every helm test gets a fresh emulator (it starts in well under a
second); the pure unit tests (protobuf, patches, selectors) need none.

What is covered, by client:

- kubectl: version, get (server-side table printing), apply create + apply
  update (client-side strategic merge), get -o json;
- helm, each major: install of ``charts/mlflow`` with ``--wait``, status,
  upgrade to revision 2, history, rollback ``--wait`` (revision 3), get
  values, uninstall (objects and release records gone); the production
  values with ``existingSecret`` (migration hook Job, HPA, PDB, Ingress);
  a stuck rollout timing out (release ``failed``); a killed upgrade leaving
  ``pending-upgrade`` that ``helm rollback`` recovers; a failing hook Job;
- Python client: pods, pod logs (knob text, ``tailLines``, ``previous``),
  Secrets create/patch, Deployment, Ingress load-balancer hostname, Events,
  ``watch.Watch().stream``; crash-loop and progress-deadline knobs;
- status subresource vs main resource writes, generation bumps, the Ingress
  knob left to the test, deletecollection, 404/409 answers;
- raw HTTP: the bearer token is required, discovery and OpenAPI documents,
  ``sendInitialEvents`` ends with the annotated BOOKMARK, a watch from a
  resourceVersion with a label selector (an object leaving it is DELETED).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.support.kube_emulator import KubeEmulator, kube_emulator
from tests.support.kube_emulator import patch as kpatch
from tests.support.kube_emulator import protobuf
from tests.support.kube_emulator.knobs import DEFAULT_INGRESS_HOSTNAME
from tests.support.kube_emulator.store import parse_field_selector, parse_label_selector

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "mlflow"
TOOLS = REPO / ".tools" / "bin"
NS = "ml-platform"
RELEASE = "mlflow"
ADMIN_PASSWORD = "Emulator-Admin-Pw-1"
FLASK_KEY = "emulator-flask-key-12345"
#: values that satisfy the chart's validateValues with a chart-made Secret
CHART_SECRET_VALUES = ["--set", f"secret.adminPassword={ADMIN_PASSWORD}", "--set", f"secret.flaskSecretKey={FLASK_KEY}"]
PROTOBUF = "application/vnd.kubernetes.protobuf"
#: `helm --wait` timeout of the stuck-rollout test (long enough to reach the wait, short for the suite)
STUCK_TIMEOUT = "10s"


# --------------------------------------------------------------------------
# fixtures and helpers


def _tool(name: str) -> Path:
    path = TOOLS / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"{path} is missing: run scripts/setup.sh (or bash scripts/install-helm.sh)")
    return path


@pytest.fixture(params=["helm3", "helm4"])
def helm(request: pytest.FixtureRequest) -> Path:
    """Each pinned helm major in turn."""
    return _tool(request.param)


@pytest.fixture
def kubectl() -> Path:
    return _tool("kubectl")


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[KubeEmulator]:
    """A fresh emulator per test; its log is printed when the test fails."""
    with kube_emulator(tmp_path / "kube") as emulator:
        yield emulator
        assert emulator.control.controller_errors() == [], "a fake controller raised; see the emulator log"


def run(kube: KubeEmulator, *cmd: Any, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run a client against the emulator; on an unexpected exit code fail with both logs."""
    proc = subprocess.run(
        [str(c) for c in cmd], env=kube.env(), cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, cmd))} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
            f"stderr:\n{proc.stderr[-3000:]}\nemulator log tail:\n{kube.log_tail(40)}"
        )
    return proc


def helm_json(kube: KubeEmulator, helm: Path, *args: str) -> Any:
    return json.loads(run(kube, helm, *args, "-n", NS, "-o", "json").stdout)


def install(kube: KubeEmulator, helm: Path, *values: str, timeout: str = "2m", check: bool = True) -> subprocess.CompletedProcess:
    return run(
        kube, helm, "upgrade", "--install", RELEASE, CHART, "-n", NS, "--create-namespace",
        "--wait", "--timeout", timeout, *values, check=check,
    )


def release_secrets(kube: KubeEmulator, namespace: str = NS) -> dict[str, dict[str, str]]:
    """``{secret name: labels}`` of helm's release records."""
    return {
        s["metadata"]["name"]: s["metadata"].get("labels", {})
        for s in kube.objects("Secret", namespace)
        if s["metadata"]["name"].startswith(f"sh.helm.release.v1.{RELEASE}.")
    }


def server_args(kube: KubeEmulator, namespace: str = NS) -> list[str]:
    deployment = kube.control.object("Deployment", RELEASE, namespace)
    assert deployment is not None
    return deployment["spec"]["template"]["spec"]["containers"][0]["args"]


def ready_server_pods(kube: KubeEmulator, namespace: str = NS) -> list[dict]:
    return [
        p for p in kube.objects("Pod", namespace)
        if p["metadata"]["labels"].get("app.kubernetes.io/component") == "server"
        and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
    ]


def credentials_secret(name: str = "mlflow-credentials") -> dict:
    """The Secret the rollout's secrets stage makes for ``existingSecret``."""
    db = "postgresql+psycopg2://mlflow:db-pass-123@mlflow-db.abc.us-west-2.rds.amazonaws.com:5432/mlflow"
    ini = (
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = {db.replace('%', '%%')}\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\nauth_cache_ttl_seconds = 60\n"
    )
    data = {
        "backend-store-uri": db,
        "auth-database-uri": db,
        "admin-password": ADMIN_PASSWORD,
        "flask-secret-key": FLASK_KEY,
        "basic_auth.ini": ini,
    }
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NS},
        "type": "Opaque",
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def http(kube: KubeEmulator, path: str, *, token: str | None = None, timeout: float = 10) -> tuple[int, bytes]:
    context = ssl.create_default_context(cafile=str(kube.ca_path))
    req = urllib.request.Request(kube.url + path)
    req.add_header("Authorization", f"Bearer {kube.token if token is None else token}")
    try:
        with urllib.request.urlopen(req, context=context, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# --------------------------------------------------------------------------
# unit tests: protobuf, patches, selectors (no server)


def test_protobuf_secret_round_trip() -> None:
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": "sh.helm.release.v1.mlflow.v1",
            "namespace": NS,
            "labels": {"owner": "helm", "name": "mlflow", "status": "deployed", "version": "1"},
            "annotations": {"note": "ünïcode"},
            "creationTimestamp": "2025-01-02T03:04:05Z",
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "u-1", "controller": True}],
            "finalizers": ["a", "b"],
            "generation": 300,
        },
        "data": {"release": base64.b64encode(bytes(range(256)) * 40).decode(), "empty": ""},
        "type": "helm.sh/release.v1",
        "immutable": False,
    }
    body = protobuf.encode_object(secret)
    assert body.startswith(b"k8s\x00")
    assert protobuf.decode_object(body) == secret


def test_protobuf_decoder_reads_hand_made_wire_bytes() -> None:
    """Bytes written by hand from the spec, independent of the encoder."""

    def ld(field: int, payload: bytes) -> bytes:  # length-delimited field, short payloads
        assert len(payload) < 128
        return bytes([(field << 3) | 2, len(payload)]) + payload

    meta = ld(1, b"cfg") + ld(3, b"default") + ld(11, ld(1, b"app") + ld(2, b"web"))
    secret = ld(1, meta) + ld(2, ld(1, b"k") + ld(2, b"\x00\xff")) + ld(3, b"Opaque") + bytes([5 << 3, 1])
    unknown = ld(1, ld(1, b"v1") + ld(2, b"Secret")) + ld(2, secret)
    decoded = protobuf.decode_object(b"k8s\x00" + unknown)
    assert decoded == {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "cfg", "namespace": "default", "labels": {"app": "web"}},
        "data": {"k": base64.b64encode(b"\x00\xff").decode()},
        "type": "Opaque",
        "immutable": True,
    }
    with pytest.raises(protobuf.ProtobufError, match="magic"):
        protobuf.decode_object(unknown)
    with pytest.raises(protobuf.ProtobufError, match="Pod"):
        protobuf.decode_object(b"k8s\x00" + ld(1, ld(1, b"v1") + ld(2, b"Pod")))


def test_strategic_merge_patch_with_helm_directives() -> None:
    live = {
        "spec": {
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%"}},
            "template": {"spec": {"containers": [{
                "name": "mlflow",
                "image": "img:1",
                "args": ["--a", "--app-name", "basic-auth"],
                "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
                "ports": [{"containerPort": 5000, "name": "http"}],
            }]}},
            "finalizers": ["x"],
        }
    }
    patch = {
        "spec": {
            "strategy": {"$retainKeys": ["type"], "type": "Recreate", "rollingUpdate": None},
            "template": {"spec": {
                "$setElementOrder/containers": [{"name": "mlflow"}],
                "containers": [{
                    "name": "mlflow",
                    "args": ["--a"],
                    "$setElementOrder/env": [{"name": "B"}, {"name": "C"}],
                    "env": [{"name": "A", "$patch": "delete"}, {"name": "C", "value": "3"}],
                }],
            }},
            "finalizers": ["y"],
        }
    }
    out = kpatch.strategic_merge_patch(live, patch)
    container = out["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "img:1"  # merged by name, not replaced
    assert container["args"] == ["--a"]  # scalar list replaced
    assert container["env"] == [{"name": "B", "value": "2"}, {"name": "C", "value": "3"}]
    assert container["ports"] == [{"containerPort": 5000, "name": "http"}]
    assert out["spec"]["strategy"] == {"type": "Recreate"}
    assert out["spec"]["finalizers"] == ["x", "y"]


def test_merge_json_and_apply_patches() -> None:
    live = {"metadata": {"labels": {"a": "1", "b": "2"}}, "data": {"x": "1"}, "list": [1, 2]}
    assert kpatch.merge_patch(live, {"metadata": {"labels": {"a": None}}, "list": [3]}) == {
        "metadata": {"labels": {"b": "2"}}, "data": {"x": "1"}, "list": [3]}
    ops = [
        {"op": "add", "path": "/data/y", "value": "2"},
        {"op": "remove", "path": "/metadata/labels/b"},
        {"op": "replace", "path": "/list/0", "value": 9},
        {"op": "add", "path": "/list/-", "value": 10},
        {"op": "test", "path": "/data/x", "value": "1"},
        {"op": "move", "from": "/data/x", "path": "/data/z"},
    ]
    assert kpatch.json_patch(live, ops) == {
        "metadata": {"labels": {"a": "1"}}, "data": {"y": "2", "z": "1"}, "list": [9, 2, 10]}
    with pytest.raises(kpatch.PatchError):
        kpatch.json_patch(live, [{"op": "test", "path": "/data/x", "value": "2"}])
    with pytest.raises(kpatch.PatchError):
        kpatch.json_patch(live, {"op": "add"})
    # server-side apply: what the manager applied before and dropped now is removed,
    # what someone else set stays
    live = {"metadata": {"annotations": {"mine": "1", "theirs": "2"}}, "spec": {"a": 1, "b": 2}}
    before = {"metadata": {"annotations": {"mine": "1"}}, "spec": {"a": 1, "b": 2}}
    now = {"spec": {"a": 5}}
    assert kpatch.apply_patch(live, now, before) == {"metadata": {"annotations": {"theirs": "2"}}, "spec": {"a": 5}}


def test_selectors() -> None:
    obj = {"metadata": {"name": "p1", "namespace": "ns", "labels": {"owner": "helm", "name": "mlflow", "tier": "web"}},
           "status": {"phase": "Running"}}
    assert parse_label_selector("name=mlflow,owner=helm")(obj)
    assert parse_label_selector("owner==helm,tier in (web, api),!missing")(obj)
    assert not parse_label_selector("tier notin (web)")(obj)
    assert not parse_label_selector("name!=mlflow")(obj)
    assert parse_label_selector("tier")(obj)
    assert parse_field_selector("metadata.name=p1,status.phase!=Failed")(obj)
    assert not parse_field_selector("metadata.namespace==other")(obj)


# --------------------------------------------------------------------------
# raw HTTP


def test_auth_discovery_openapi_and_watch_protocol(kube: KubeEmulator) -> None:
    assert http(kube, "/api/v1/namespaces", token="wrong")[0] == 401
    assert http(kube, "/version", token="")[0] == 200
    status, body = http(kube, "/apis/apps/v1")
    resources = {r["name"]: r for r in json.loads(body)["resources"]}
    assert resources["deployments/scale"]["kind"] == "Scale" and resources["deployments"]["namespaced"]
    root = json.loads(http(kube, "/openapi/v3")[1])
    doc = json.loads(http(kube, root["paths"]["apis/apps/v1"]["serverRelativeURL"])[1])
    patch_op = doc["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"]["patch"]
    assert "fieldValidation" in {p["name"] for p in patch_op["parameters"]}
    assert patch_op["x-kubernetes-group-version-kind"] == {"group": "apps", "version": "v1", "kind": "Deployment"}

    # sendInitialEvents: current objects, then the BOOKMARK that ends them (read up to it)
    events = watch_lines(kube, "/api/v1/namespaces?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan"
                               "&allowWatchBookmarks=true&timeoutSeconds=30", until="BOOKMARK")
    assert {e["object"]["metadata"]["name"] for e in events if e["type"] == "ADDED"} >= {"default", "kube-system"}
    bookmark = events[-1]
    assert bookmark["type"] == "BOOKMARK"
    assert bookmark["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}
    assert bookmark["object"]["kind"] == "Namespace"

    # from a resourceVersion: only what changed after it, with label selector transitions
    listed = json.loads(http(kube, "/api/v1/namespaces/default/configmaps")[1])
    rv = listed["metadata"]["resourceVersion"]
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "labels": {"app": "x"}}, "data": {"k": "1"}}
    assert request(kube, "POST", "/api/v1/namespaces/default/configmaps", cm)[0] == 201
    assert request(kube, "PATCH", "/api/v1/namespaces/default/configmaps/c", {"metadata": {"labels": {"app": "y"}}},
                   "application/merge-patch+json")[0] == 200
    events = watch_lines(kube, f"/api/v1/namespaces/default/configmaps?watch=true&resourceVersion={rv}"
                               "&labelSelector=app%3Dx&timeoutSeconds=30", until="DELETED")
    assert [e["type"] for e in events] == ["ADDED", "DELETED"]  # stopped matching: DELETED for this watch
    status, body = http(kube, "/api/v1/namespaces/default/configmaps/c")
    assert json.loads(body)["metadata"]["labels"] == {"app": "y"}


def request(kube: KubeEmulator, method: str, path: str, body: Any, content_type: str = "application/json") -> tuple[int, Any]:
    context = ssl.create_default_context(cafile=str(kube.ca_path))
    req = urllib.request.Request(kube.url + path, data=json.dumps(body).encode(), method=method)
    req.add_header("Authorization", f"Bearer {kube.token}")
    req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, context=context, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def watch_lines(kube: KubeEmulator, path: str, *, until: str) -> list[dict]:
    """Watch events up to and including the first of type ``until``."""
    context = ssl.create_default_context(cafile=str(kube.ca_path))
    req = urllib.request.Request(kube.url + path)
    req.add_header("Authorization", f"Bearer {kube.token}")
    events = []
    with urllib.request.urlopen(req, context=context, timeout=10) as resp:
        for line in resp:
            events.append(json.loads(line))
            if events[-1]["type"] == until:
                return events
    pytest.fail(f"the watch ended without a {until} event: {events}")


# --------------------------------------------------------------------------
# kubectl


def test_kubectl_version_get_apply(kube: KubeEmulator, kubectl: Path, tmp_path: Path) -> None:
    version = json.loads(run(kube, kubectl, "version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"].startswith("v1.34")
    namespaces = run(kube, kubectl, "get", "ns").stdout
    assert "kube-system" in namespaces and "Active" in namespaces

    manifest = tmp_path / "cm.yaml"
    manifest.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  namespace: default\n"
                        "data:\n  mode: blue\n  keep: 'yes'\n")
    assert "created" in run(kube, kubectl, "apply", "-f", manifest).stdout
    manifest.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  namespace: default\n"
                        "data:\n  mode: green\n")
    assert "configured" in run(kube, kubectl, "apply", "-f", manifest).stdout
    cm = json.loads(run(kube, kubectl, "get", "cm", "settings", "-n", "default", "-o", "json").stdout)
    assert cm["data"] == {"mode": "green"}  # the three-way patch removed `keep`
    assert "kubectl.kubernetes.io/last-applied-configuration" in cm["metadata"]["annotations"]
    assert int(cm["metadata"]["resourceVersion"]) > 0 and cm["metadata"]["uid"]


# --------------------------------------------------------------------------
# helm, both majors


def test_helm_release_lifecycle(kube: KubeEmulator, helm: Path) -> None:
    """install → upgrade (revision 2) → history → rollback --wait (revision 3) → get values → uninstall."""
    install(kube, helm, *CHART_SECRET_VALUES)
    status = helm_json(kube, helm, "status", RELEASE)
    assert status["info"]["status"] == "deployed" and status["version"] == 1
    assert len(ready_server_pods(kube)) == 1
    assert "basic-auth" in server_args(kube)
    kube.control.set_logs("test-pod-log: health 200\nOK\n", pod=f"{RELEASE}-test", namespace=NS)
    # the test pod runs to Succeeded. helm 3 deletes it (hook-succeeded) before
    # reading logs, so `--logs` fails there as on real clusters (helm/helm#9098)
    logs = ["--logs"] if helm.name == "helm4" else []
    tested = run(kube, helm, "test", RELEASE, "-n", NS, *logs)
    assert "Phase:          Succeeded" in tested.stdout
    assert ("test-pod-log: health 200" in tested.stdout) == bool(logs)
    # helm writes its release record as protobuf; the emulator decoded it
    assert any(r["method"] == "POST" and r["path"].endswith("/secrets") and r["content_type"] == PROTOBUF
               for r in kube.control.requests())
    assert release_secrets(kube)[f"sh.helm.release.v1.{RELEASE}.v1"]["status"] == "deployed"

    install(kube, helm, *CHART_SECRET_VALUES, "--set", "auth.enabled=false")
    assert helm_json(kube, helm, "status", RELEASE)["version"] == 2
    assert "basic-auth" not in server_args(kube)
    history = helm_json(kube, helm, "history", RELEASE)
    assert [(h["revision"], h["status"]) for h in history] == [(1, "superseded"), (2, "deployed")]
    rs = kube.objects("ReplicaSet", NS)
    assert len(rs) == 2 and sorted(r["spec"]["replicas"] for r in rs) == [0, 1]

    run(kube, helm, "rollback", RELEASE, "1", "-n", NS, "--wait", "--timeout", "1m")
    history = helm_json(kube, helm, "history", RELEASE)
    assert [(h["revision"], h["status"]) for h in history][-1] == (3, "deployed")
    assert "basic-auth" in server_args(kube)
    assert len(kube.objects("ReplicaSet", NS)) == 2  # the first template's ReplicaSet came back
    assert len(ready_server_pods(kube)) == 1
    values = helm_json(kube, helm, "get", "values", RELEASE)
    assert values["secret"]["flaskSecretKey"] == FLASK_KEY and "auth" not in values

    run(kube, helm, "uninstall", RELEASE, "-n", NS)
    for kind in ("Deployment", "ReplicaSet", "Pod", "Service", "Endpoints"):
        assert kube.objects(kind, NS) == [], kind
    assert [sa["metadata"]["name"] for sa in kube.objects("ServiceAccount", NS)] == ["default"]
    assert release_secrets(kube) == {}
    assert [s["metadata"]["name"] for s in kube.objects("Secret", NS)] == []


def test_helm_production_values_with_existing_secret(kube: KubeEmulator, helm: Path) -> None:
    """values-production.yaml: existingSecret, migration hook Job, HPA (3 pods), PDB, ALB Ingress."""
    run(kube, helm, "version")  # keep the binary in the error output if anything below fails
    kube_ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}
    for obj in (kube_ns, credentials_secret()):
        run_apply(kube, obj)
    install(kube, helm, "-f", CHART / "values-production.yaml", "--set", "ingress.hosts[0]=mlflow.example.com")
    assert helm_json(kube, helm, "status", RELEASE)["info"]["status"] == "deployed"
    assert len(ready_server_pods(kube)) == 3  # the HPA raised replicas to minReplicas
    deployment = kube.control.object("Deployment", RELEASE, NS)
    assert deployment["status"]["readyReplicas"] == 3
    assert "checksum/secret" in deployment["spec"]["template"]["metadata"]["annotations"]  # lookup saw the Secret
    # the hook Job ran and was deleted on success (hook-delete-policy)
    created_jobs = [r for r in kube.control.requests() if "/jobs" in r["path"] and r["method"] in ("POST", "PATCH")]
    assert created_jobs, "the migration hook Job was never created"
    assert kube.objects("Job", NS) == []
    assert any(e["reason"] == "Completed" and e["involvedObject"]["kind"] == "Job" for e in kube.objects("Event", NS))
    pdb = kube.objects("PodDisruptionBudget", NS)[0]
    assert pdb["status"]["currentHealthy"] == 3 and pdb["status"]["disruptionsAllowed"] == 1
    ingress = kube.objects("Ingress", NS)[0]
    assert ingress["status"]["loadBalancer"]["ingress"][0]["hostname"] == DEFAULT_INGRESS_HOSTNAME
    endpoints = kube.control.object("Endpoints", RELEASE, NS)
    assert len(endpoints["subsets"][0]["addresses"]) == 3 and endpoints["subsets"][0]["ports"][0]["port"] == 5000


def run_apply(kube: KubeEmulator, obj: dict) -> None:
    """kubectl apply of one object (as the rollout's secrets stage might, without argv secrets)."""
    proc = subprocess.run(
        [str(_tool("kubectl")), "apply", "-f", "-"], input=json.dumps(obj), env=kube.env(), cwd=REPO,
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


def test_helm_stuck_rollout_times_out_and_fails_release(kube: KubeEmulator, helm: Path) -> None:
    kube.control.stuck_rollout(RELEASE, NS)
    proc = install(kube, helm, *CHART_SECRET_VALUES, timeout=STUCK_TIMEOUT, check=False)
    assert proc.returncode != 0
    assert any(word in proc.stderr for word in ("timed out", "context deadline exceeded")), proc.stderr
    assert helm_json(kube, helm, "status", RELEASE)["info"]["status"] == "failed"
    pods = kube.objects("Pod", NS)
    assert pods and not ready_server_pods(kube)
    reasons = {e["reason"] for e in kube.objects("Event", NS)}
    assert {"Scheduled", "Started", "Unhealthy"} <= reasons


def test_helm_killed_upgrade_leaves_pending_upgrade_and_rollback_recovers(kube: KubeEmulator, helm: Path, tmp_path: Path) -> None:
    install(kube, helm, *CHART_SECRET_VALUES)
    kube.control.stuck_rollout(RELEASE, NS)
    log = tmp_path / "upgrade.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(helm), "upgrade", RELEASE, str(CHART), "-n", NS, "--wait", "--timeout", "5m",
             *CHART_SECRET_VALUES, "--set", "auth.enabled=false"],
            env=kube.env(), cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        def upgrade_waiting() -> bool:
            labels = release_secrets(kube).get(f"sh.helm.release.v1.{RELEASE}.v2", {})
            deployment = kube.control.object("Deployment", RELEASE, NS)
            return labels.get("status") == "pending-upgrade" and deployment["metadata"]["generation"] == 2
        kube.control.wait_for(upgrade_waiting, timeout=60, what="helm to apply revision 2 and wait")
        time.sleep(1)  # well inside --wait
        assert proc.poll() is None, log.read_text()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)  # an interrupted client: no chance to record failure
        proc.wait(timeout=30)

    assert helm_json(kube, helm, "status", RELEASE)["info"]["status"] == "pending-upgrade"
    history = helm_json(kube, helm, "history", RELEASE)
    assert [(h["revision"], h["status"]) for h in history] == [(1, "deployed"), (2, "pending-upgrade")]
    blocked = install(kube, helm, *CHART_SECRET_VALUES, check=False)
    assert blocked.returncode != 0 and "another operation" in blocked.stderr

    run(kube, helm, "rollback", RELEASE, "1", "-n", NS, "--wait", "--timeout", "1m")
    history = helm_json(kube, helm, "history", RELEASE)
    assert history[-1]["revision"] == 3 and history[-1]["status"] == "deployed"
    assert helm_json(kube, helm, "status", RELEASE)["info"]["status"] == "deployed"
    assert "basic-auth" in server_args(kube)
    kube.control.wait_for(lambda: len(kube.objects("Pod", NS)) == 1, timeout=10, what="the stuck pod to go")


def test_helm_failing_hook_job_fails_the_install(kube: KubeEmulator, helm: Path) -> None:
    run_apply(kube, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    run_apply(kube, credentials_secret())
    kube.control.fail_jobs()
    proc = install(kube, helm, "--set", "existingSecret=mlflow-credentials", timeout="1m", check=False)
    assert proc.returncode != 0
    assert "failed" in proc.stderr.lower() and "migrate" in proc.stderr, proc.stderr
    assert helm_json(kube, helm, "status", RELEASE)["info"]["status"] == "failed"
    job = kube.objects("Job", NS)[0]
    assert {c["type"]: c["reason"] for c in job["status"]["conditions"]}["Failed"] == "BackoffLimitExceeded"
    assert kube.objects("Deployment", NS) == []  # pre-install hook failed: nothing else applied


# --------------------------------------------------------------------------
# Python client


@pytest.fixture
def k8s(kube: KubeEmulator):
    """The ``kubernetes`` package configured from the emulator's kubeconfig."""
    try:
        from kubernetes import client, config
    except ImportError:
        pytest.fail("the kubernetes Python client is missing: run scripts/setup.sh (pip install -e '.[test]')")

    api_client = config.new_client_from_config(config_file=str(kube.kubeconfig))
    yield client, api_client
    api_client.close()


def test_python_client(kube: KubeEmulator, k8s, tmp_path: Path) -> None:
    client, api_client = k8s
    from kubernetes import watch

    core = client.CoreV1Api(api_client)
    apps = client.AppsV1Api(api_client)
    net = client.NetworkingV1Api(api_client)

    # secrets, as the rollout's secrets stage writes them
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NS)))
    created = core.create_namespaced_secret(NS, client.V1Secret(
        metadata=client.V1ObjectMeta(name="mlflow-credentials", labels={"app": "mlflow"}),
        string_data={"admin-password": ADMIN_PASSWORD}, type="Opaque"))
    assert base64.b64decode(created.data["admin-password"]).decode() == ADMIN_PASSWORD
    patched = core.patch_namespaced_secret("mlflow-credentials", NS, {
        "data": {"flask-secret-key": base64.b64encode(FLASK_KEY.encode()).decode()},
        "metadata": {"labels": {"rotated": "yes"}}})
    assert set(patched.data) == {"admin-password", "flask-secret-key"}
    assert patched.metadata.labels == {"app": "mlflow", "rotated": "yes"}
    assert int(patched.metadata.resource_version) > int(created.metadata.resource_version)

    # a release with an Ingress, installed by helm 4 as the rollout does
    kube.control.set_logs("mlflow startup complete\nline 2\nline 3\n", deployment=RELEASE, namespace=NS)
    install(kube, _tool("helm4"), *CHART_SECRET_VALUES, "--set", "ingress.enabled=true",
            "--set", "ingress.hosts[0]=mlflow.example.com")

    pods = core.list_namespaced_pod(NS, label_selector="app.kubernetes.io/component=server").items
    assert len(pods) == 1
    pod = pods[0]
    assert pod.status.phase == "Running"
    status = pod.status.container_statuses[0]
    assert status.ready and status.restart_count == 0 and status.image_id and status.state.running
    assert core.read_namespaced_pod_log(pod.metadata.name, NS) == "mlflow startup complete\nline 2\nline 3\n"
    assert core.read_namespaced_pod_log(pod.metadata.name, NS, tail_lines=1, container="mlflow") == "line 3\n"

    deployment = apps.read_namespaced_deployment(RELEASE, NS)
    assert deployment.status.ready_replicas == 1 and deployment.status.observed_generation == deployment.metadata.generation
    conditions = {c.type: (c.status, c.reason) for c in deployment.status.conditions}
    assert conditions == {"Available": ("True", "MinimumReplicasAvailable"), "Progressing": ("True", "NewReplicaSetAvailable")}
    ingress = net.read_namespaced_ingress(RELEASE, NS)
    assert ingress.status.load_balancer.ingress[0].hostname == DEFAULT_INGRESS_HOSTNAME

    events = core.list_namespaced_event(NS, field_selector=f"involvedObject.name={pod.metadata.name}").items
    assert {"Scheduled", "Pulled", "Created", "Started"} <= {e.reason for e in events}

    seen = [(e["type"], e["object"].metadata.name) for e in watch.Watch().stream(core.list_namespaced_pod, NS, timeout_seconds=2)]
    assert ("ADDED", pod.metadata.name) in seen

    # knobs: the ingress hostname, crash loop and previous logs
    kube.control.set_ingress_hostname("internal-lb.example.com", name=RELEASE, namespace=NS)
    kube.control.wait_for(
        lambda: net.read_namespaced_ingress(RELEASE, NS).status.load_balancer.ingress[0].hostname == "internal-lb.example.com",
        what="the new hostname")
    kube.control.set_timing(restart_seconds=0.2)
    kube.control.set_logs("Traceback (most recent call last):\nboom\n", deployment=RELEASE, previous=True)
    kube.control.crashloop(RELEASE, NS)
    crashing = kube.control.wait_for(
        lambda: [p for p in core.list_namespaced_pod(NS, label_selector="app.kubernetes.io/component=server").items
                 if p.status.container_statuses[0].restart_count >= 2],
        what="restarts")[0]
    state = crashing.status.container_statuses[0]
    assert state.state.waiting.reason == "CrashLoopBackOff" and not state.ready
    assert state.last_state.terminated.exit_code == 1
    assert "boom" in core.read_namespaced_pod_log(crashing.metadata.name, NS, previous=True)
    kube.control.wait_for(lambda: not apps.read_namespaced_deployment(RELEASE, NS).status.ready_replicas, what="unready")
    warnings = [e for e in core.list_namespaced_event(NS).items if e.type == "Warning" and e.reason == "BackOff"]
    assert warnings and warnings[0].count >= 1


def test_progress_deadline_knob(kube: KubeEmulator, k8s) -> None:
    client, api_client = k8s
    apps = client.AppsV1Api(api_client)
    kube.control.stuck_rollout("web", "default", deadline_seconds=1)
    apps.create_namespaced_deployment("default", {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]}}}})

    def progressing() -> tuple[str, str] | None:
        conds = {c.type: c for c in apps.read_namespaced_deployment("web", "default").status.conditions or []}
        c = conds.get("Progressing")
        return (c.status, c.reason) if c and c.reason == "ProgressDeadlineExceeded" else None

    assert kube.control.wait_for(progressing, timeout=10, what="ProgressDeadlineExceeded") == ("False", "ProgressDeadlineExceeded")
    status = apps.read_namespaced_deployment("web", "default").status
    assert status.replicas == 2 and not status.ready_replicas
    # deleting the Deployment deletes its ReplicaSet and pods
    apps.delete_namespaced_deployment("web", "default")
    kube.control.wait_for(lambda: not kube.objects("Pod", "default") and not kube.objects("ReplicaSet", "default"),
                          timeout=5, what="cascading delete")
    with pytest.raises(client.ApiException) as err:
        apps.read_namespaced_deployment("web", "default")
    assert err.value.status == 404


def test_status_subresource_generation_and_ingress_knob(kube: KubeEmulator, k8s) -> None:
    """Ingress status left to the test; status vs main resource writes; deletecollection."""
    client, api_client = k8s
    net = client.NetworkingV1Api(api_client)
    core = client.CoreV1Api(api_client)
    kube.control.set_ingress_hostname(None)
    backend = {"service": {"name": "web", "port": {"number": 80}}}
    ingress = net.create_namespaced_ingress("default", {
        "metadata": {"name": "web"},
        "spec": {"ingressClassName": "alb", "rules": [{"host": "a.example.com", "http": {"paths": [
            {"path": "/", "pathType": "Prefix", "backend": backend}]}}]}})
    assert ingress.metadata.generation == 1
    time.sleep(0.3)  # a controller tick: nothing may be written
    assert net.read_namespaced_ingress("web", "default").status.load_balancer.ingress is None

    patched = net.patch_namespaced_ingress_status("web", "default", {"status": {"loadBalancer": {"ingress": [{"hostname": "lb.test"}]}}})
    assert patched.status.load_balancer.ingress[0].hostname == "lb.test" and patched.metadata.generation == 1
    # a write to the main resource keeps the status and bumps generation only for spec changes
    relabeled = net.patch_namespaced_ingress("web", "default", {"metadata": {"labels": {"x": "y"}}, "status": {"loadBalancer": {}}})
    assert relabeled.metadata.generation == 1 and relabeled.status.load_balancer.ingress[0].hostname == "lb.test"
    respec = net.patch_namespaced_ingress("web", "default", {"spec": {"rules": [{"host": "b.example.com", "http": {"paths": [
        {"path": "/", "pathType": "Prefix", "backend": backend}]}}]}})
    assert respec.metadata.generation == 2

    for n in range(3):
        core.create_namespaced_config_map("default", {"metadata": {"name": f"cm{n}", "labels": {"batch": "a" if n < 2 else "b"}}})
    core.delete_collection_namespaced_config_map("default", label_selector="batch=a")
    assert [c.metadata.name for c in core.list_namespaced_config_map("default").items] == ["cm2"]
    with pytest.raises(client.ApiException) as err:
        core.create_namespaced_config_map("default", {"metadata": {"name": "cm2"}})
    assert err.value.status == 409 and json.loads(err.value.body)["reason"] == "AlreadyExists"
    with pytest.raises(client.ApiException) as err:
        core.create_namespaced_config_map("nowhere", {"metadata": {"name": "x"}})
    assert err.value.status == 404
