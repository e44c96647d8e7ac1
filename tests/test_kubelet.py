"""The emulator's process kubelet: pods run as real processes, fail as a real kubelet shows it.

One emulator with ``PodRuntime`` for the module; each test its own namespace.
The "image" is this virtualenv (``python_image``); containers are small
Python programs, so every behaviour here is the kubelet's, not MLflow's.
Needs root (network and mount namespaces); skipped elsewhere with the reason.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.support.kube_emulator import KubeEmulator, PodRuntime, kube_emulator, pods_unavailable, python_image

_REASON = pods_unavailable()
pytestmark = [pytest.mark.pods, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

ROOT = Path(__file__).resolve().parents[1]
KUBECTL = ROOT / ".tools" / "bin" / "kubectl"
IMAGE = "example.org/python:3.11"


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeEmulator]:
    runtime = PodRuntime(images={IMAGE: python_image()}, backoff_seconds=1.0, max_grace_seconds=5.0)
    with kube_emulator(tmp_path_factory.mktemp("kubelet"), pods=runtime) as emulator:
        yield emulator
    # everything the kubelet made is gone once the emulator stopped
    assert runtime.prefix not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert runtime.prefix not in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout


def _kubectl(kube: KubeEmulator, *args: str, stdin: str | None = None, check: bool = True) -> str:
    r = subprocess.run([str(KUBECTL), *args], input=stdin, capture_output=True, text=True, env=kube.env(), timeout=60)
    if check:
        assert r.returncode == 0, r.stderr
    return r.stdout + (r.stderr if not check else "")


def _apply(kube: KubeEmulator, *objects: dict[str, Any]) -> None:
    _kubectl(kube, "apply", "-f", "-", stdin=yaml.safe_dump_all(objects))


def _pod(name: str, ns: str, code: str, **spec: Any) -> dict[str, Any]:
    container = {"name": "main", "image": IMAGE, "command": ["python", "-u", "-c", code]}
    container.update(spec.pop("container", {}))
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
            "spec": {"containers": [container], **spec}}


def _ns(kube: KubeEmulator, name: str) -> str:
    _apply(kube, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    return name


def _get(kube: KubeEmulator, kind: str, name: str, ns: str) -> dict[str, Any]:
    return kube.control.object(kind, name, ns) or {}


def _wait(kube: KubeEmulator, what: str, predicate, timeout: float = 30) -> Any:
    return kube.control.wait_for(predicate, timeout=timeout, interval=0.2, what=what)


def _container(pod: dict[str, Any]) -> dict[str, Any]:
    return ((pod.get("status") or {}).get("containerStatuses") or [{}])[0]


def _ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in (pod.get("status") or {}).get("conditions", []))


SERVER = (
    "import http.server, os, sys\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        code = 200 if self.path == '/ok' else 404\n"
    "        self.send_response(code); self.end_headers(); self.wfile.write(b'hi')\n"
    "    def log_message(self, *a): pass\n"
    "print('serving as', os.getuid(), os.getgid(), sorted(os.getgroups()), flush=True)\n"
    "http.server.HTTPServer(('0.0.0.0', 8080), H).serve_forever()\n"
)


def _web_service(ns: str) -> dict[str, Any]:
    """Service ``web``: port 80 to the named port ``http`` of the pods labelled ``app: web``."""
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": ns},
            "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}


def test_container_runs_as_the_spec_says(kube: KubeEmulator) -> None:
    """uid/gid/fsGroup, workingDir, $(VAR) expansion, env from Secret/ConfigMap/fieldRef, volumes, read-only root."""
    ns = _ns(kube, "spec")
    code = (
        "import os, sys\n"
        "print('uid', os.getuid(), os.getgid(), 'groups', sorted(os.getgroups()))\n"
        "print('cwd', os.getcwd())\n"
        "print('argv', sys.argv[1:])\n"
        "print('env', os.environ['TOKEN'], os.environ['MODE'], os.environ['POD'], os.environ['IP'] != '')\n"
        "print('ini', open('/etc/app/conf.ini').read().strip(), oct(os.stat('/etc/app/conf.ini').st_mode & 0o777))\n"
        "open('/work-dir/out.txt', 'w').write('ok'); print('emptyDir writable')\n"
        "try:\n    open('/root-write', 'w')\nexcept OSError as e:\n    print('root', e.strerror)\n"
        "print('hosts', open('/etc/hostname').read().strip())\n"
    )
    _apply(
        kube,
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds", "namespace": ns},
         "stringData": {"token": "s3cr3t", "conf.ini": "[app]\nkey = 1"}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings", "namespace": ns}, "data": {"mode": "fast"}},
        _pod("spec", ns, code, restartPolicy="Never",
             securityContext={"runAsUser": 1000, "runAsGroup": 2000, "fsGroup": 3000, "runAsNonRoot": True},
             volumes=[{"name": "work", "emptyDir": {}},
                      {"name": "conf", "secret": {"secretName": "creds", "defaultMode": 0o440,
                                                  "items": [{"key": "conf.ini", "path": "conf.ini"}]}}],
             container={
                 "args": ["$(MODE)", "$$(MODE)"], "workingDir": "/work-dir",
                 "securityContext": {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False},
                 "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                         {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
                         {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                         {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                 "volumeMounts": [{"name": "work", "mountPath": "/work-dir"},
                                  {"name": "conf", "mountPath": "/etc/app", "readOnly": True}]}),
    )
    pod = _wait(kube, "the pod to finish", lambda: (p := _get(kube, "Pod", "spec", ns)).get("status", {}).get("phase")
                in ("Succeeded", "Failed") and p)
    log = _kubectl(kube, "logs", "spec", "-n", ns)
    assert pod["status"]["phase"] == "Succeeded", log
    assert "uid 1000 2000 groups [3000]" in log
    assert "cwd /work-dir" in log and "argv ['fast', '$(MODE)']" in log
    assert "env s3cr3t fast spec True" in log
    assert "ini [app]\nkey = 1 0o440" in log
    assert "emptyDir writable" in log and "root Read-only file system" in log and "hosts spec" in log
    assert not Path("/work-dir").exists() and not Path("/etc/app").exists()  # nothing made on the host
    assert _container(pod)["state"]["terminated"]["exitCode"] == 0


def test_missing_secret_key_is_create_container_config_error(kube: KubeEmulator) -> None:
    ns = _ns(kube, "badkey")
    _apply(kube,
           {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds", "namespace": ns}, "stringData": {"a": "1"}},
           _pod("badkey", ns, "print('never')", container={
               "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "backend-store-uri"}}}]}))
    pod = _wait(kube, "CreateContainerConfigError",
                lambda: (p := _get(kube, "Pod", "badkey", ns)) and
                (_container(p).get("state", {}).get("waiting", {}).get("reason") == "CreateContainerConfigError") and p)
    waiting = _container(pod)["state"]["waiting"]
    assert waiting["message"] == f"couldn't find key backend-store-uri in Secret {ns}/creds"
    assert not _ready(pod) and pod["status"]["phase"] == "Pending"
    events = [e["message"] for e in kube.control.objects("Event", ns) if e["involvedObject"]["name"] == "badkey"]
    assert any("couldn't find key backend-store-uri" in m for m in events), events
    # the key appears: the kubelet retries and the container starts
    _apply(kube, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds", "namespace": ns},
                  "stringData": {"a": "1", "backend-store-uri": "x"}})
    _wait(kube, "the container to start", lambda: "running" in _container(_get(kube, "Pod", "badkey", ns)).get("state", {})
          or "terminated" in _container(_get(kube, "Pod", "badkey", ns)).get("state", {}))


def test_missing_secret_volume_keeps_the_pod_creating(kube: KubeEmulator) -> None:
    ns = _ns(kube, "novol")
    _apply(kube, _pod("novol", ns, "print('never')", volumes=[{"name": "ini", "secret": {"secretName": "absent"}}],
                      container={"volumeMounts": [{"name": "ini", "mountPath": "/etc/ini"}]}))
    _wait(kube, "FailedMount", lambda: [e for e in kube.control.objects("Event", ns) if e["reason"] == "FailedMount"
                                        and 'secret "absent" not found' in e["message"]])
    pod = _get(kube, "Pod", "novol", ns)
    assert pod["status"]["phase"] == "Pending" and not pod["status"].get("podIP")


def test_unknown_image_and_root_under_run_as_non_root(kube: KubeEmulator) -> None:
    ns = _ns(kube, "refused")
    _apply(kube, _pod("pull", ns, "print(1)", container={"image": "example.org/nope:1"}),
           _pod("root", ns, "print(1)", securityContext={"runAsNonRoot": True, "runAsUser": 0}))
    _wait(kube, "ErrImagePull", lambda: _container(_get(kube, "Pod", "pull", ns)).get("state", {})
          .get("waiting", {}).get("reason") == "ErrImagePull")
    pod = _wait(kube, "non-root refusal", lambda: (p := _get(kube, "Pod", "root", ns)) and
                _container(p).get("state", {}).get("waiting", {}).get("reason") == "CreateContainerConfigError" and p)
    assert "runAsUser breaks non-root policy" in _container(pod)["state"]["waiting"]["message"]


def test_probes_drive_ready_endpoints_and_restarts(kube: KubeEmulator) -> None:
    """Readiness on a path that answers → Ready and an endpoint; liveness on one that 404s → restarts."""
    ns = _ns(kube, "probes")
    probe = {"periodSeconds": 1, "timeoutSeconds": 1, "failureThreshold": 2}
    _apply(
        kube,
        _web_service(ns),
        _pod("web", ns, SERVER, container={
            "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/ok", "port": "http"}, **probe},
            "startupProbe": {"tcpSocket": {"port": 8080}, **probe, "failureThreshold": 20}}),
        _pod("sick", ns, SERVER, container={"livenessProbe": {"httpGet": {"path": "/missing", "port": 8080}, **probe}}),
    )
    pod = _wait(kube, "web Ready", lambda: (p := _get(kube, "Pod", "web", ns)) and _ready(p) and p)
    ip = pod["status"]["podIP"]
    with urllib.request.urlopen(f"http://{ip}:8080/ok", timeout=5) as resp:  # the pod's own address
        assert resp.read() == b"hi"
    endpoints = _wait(kube, "an endpoint", lambda: (e := _get(kube, "Endpoints", "web", ns)).get("subsets") and e)
    assert endpoints["subsets"][0]["addresses"][0]["ip"] == ip and endpoints["subsets"][0]["ports"][0]["port"] == 8080
    sick = _wait(kube, "a liveness restart", lambda: (p := _get(kube, "Pod", "sick", ns)) and
                 _container(p).get("restartCount", 0) >= 1 and p, timeout=40)
    assert _container(sick)["lastState"]["terminated"]["exitCode"] == 143  # SIGTERM'd by the kubelet
    events = [e["message"] for e in kube.control.objects("Event", ns) if e["involvedObject"]["name"] == "sick"]
    assert any("Liveness probe failed: HTTP probe failed with statuscode: 404" in m for m in events), events
    assert any("failed liveness probe, will be restarted" in m for m in events), events
    assert "serving as 0 0" in _kubectl(kube, "logs", "sick", "-n", ns, "--previous")


def test_services_route_by_name_to_ready_pods(kube: KubeEmulator) -> None:
    """A ClusterIP Service: other pods reach it by name (their /etc/hosts), only through Ready endpoints."""
    ns = _ns(kube, "svc")
    _apply(
        kube,
        _web_service(ns),
        _pod("web", ns, SERVER, container={
            "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/ok", "port": "http"}, "periodSeconds": 1}}),
    )
    _wait(kube, "web Ready", lambda: _ready(_get(kube, "Pod", "web", ns)))
    client = ("import urllib.request\n"
              "for url in ('http://web/ok', 'http://web.svc.svc.cluster.local/ok'):\n"
              "    print(url, urllib.request.urlopen(url, timeout=5).read().decode(), flush=True)\n")
    _apply(kube, _pod("client", ns, client, restartPolicy="Never"))
    pod = _wait(kube, "the client to finish", lambda: (p := _get(kube, "Pod", "client", ns)).get("status", {})
                .get("phase") in ("Succeeded", "Failed") and p)
    log = _kubectl(kube, "logs", "client", "-n", ns)
    assert pod["status"]["phase"] == "Succeeded", log
    assert "http://web/ok hi" in log and "http://web.svc.svc.cluster.local/ok hi" in log


def test_crash_loop_back_off_and_previous_logs(kube: KubeEmulator) -> None:
    ns = _ns(kube, "crash")
    _apply(kube, _pod("crash", ns, "import sys; print('run', flush=True); sys.exit(3)"))
    pod = _wait(kube, "CrashLoopBackOff", lambda: (p := _get(kube, "Pod", "crash", ns)) and
                _container(p).get("restartCount", 0) >= 2 and
                _container(p)["state"].get("waiting", {}).get("reason") == "CrashLoopBackOff" and p, timeout=40)
    status = _container(pod)
    assert status["lastState"]["terminated"]["exitCode"] == 3 and status["lastState"]["terminated"]["reason"] == "Error"
    assert "run" in _kubectl(kube, "logs", "crash", "-n", ns, "--previous")
    assert any(e["reason"] == "BackOff" for e in kube.control.objects("Event", ns))


def test_job_backoff_limit_and_success(kube: KubeEmulator) -> None:
    ns = _ns(kube, "jobs")

    def job(name: str, code: str, **spec: Any) -> dict[str, Any]:
        return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": ns},
                "spec": {**spec, "template": {"spec": {"restartPolicy": "Never", "containers": [
                    {"name": "main", "image": IMAGE, "command": ["python", "-c", code]}]}}}}

    _apply(kube, job("ok", "print('migrated')", backoffLimit=1), job("bad", "raise SystemExit(2)", backoffLimit=2),
           job("slow", "import time; time.sleep(60)", activeDeadlineSeconds=2))
    done = _wait(kube, "the jobs to finish", lambda: all(
        any(c["type"] in ("Complete", "Failed") for c in (_get(kube, "Job", n, ns).get("status") or {}).get("conditions", []))
        for n in ("ok", "bad", "slow")), timeout=60)
    assert done
    conditions = {n: {c["type"]: c.get("reason") for c in _get(kube, "Job", n, ns)["status"]["conditions"]}
                  for n in ("ok", "bad", "slow")}
    assert "Complete" in conditions["ok"]
    assert conditions["bad"]["Failed"] == "BackoffLimitExceeded" and _get(kube, "Job", "bad", ns)["status"]["failed"] == 3
    assert conditions["slow"]["Failed"] == "DeadlineExceeded"
    ok_pod = [p for p in kube.control.objects("Pod", ns) if p["metadata"]["name"].startswith("ok-")][0]
    assert _kubectl(kube, "logs", ok_pod["metadata"]["name"], "-n", ns).strip() == "migrated"


def test_deleted_pod_gets_sigterm_then_sigkill_and_leaves_nothing(kube: KubeEmulator) -> None:
    ns = _ns(kube, "term")
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(600)"
    _apply(kube, _pod("stubborn", ns, stubborn, terminationGracePeriodSeconds=2))
    pod = _wait(kube, "running", lambda: (p := _get(kube, "Pod", "stubborn", ns)) and _ready(p) and p)
    netns = f"{kube.pods.prefix}-{pod['status']['podIP'].rsplit('.', 1)[1]}"
    assert subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split()
    started = time.monotonic()
    _kubectl(kube, "delete", "pod", "stubborn", "-n", ns, "--wait=false")
    _wait(kube, "the namespace to go", lambda: netns not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                                              text=True).stdout, timeout=20)
    assert time.monotonic() - started >= 1.5  # the grace period was honoured before SIGKILL


def test_a_killed_emulator_leaves_nothing_behind(tmp_path: Path) -> None:
    """SIGKILL the emulator with a pod running: the fixture's sweep removes processes, namespaces and links."""
    runtime = PodRuntime(images={IMAGE: python_image()})
    with kube_emulator(tmp_path / "k", pods=runtime) as kube:
        _apply(kube, _pod("long", "default", "import time; print('up', flush=True); time.sleep(600)"))
        pod = _wait(kube, "running", lambda: (p := _get(kube, "Pod", "long", "default")) and _ready(p) and p)
        netns = f"{runtime.prefix}-{pod['status']['podIP'].rsplit('.', 1)[1]}"
        pids = [int(p) for p in subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split()]
        assert pids
        emulator_pid = int(subprocess.run(["pgrep", "-f", f"kube_emulator --port {kube.port}"], capture_output=True,
                                          text=True).stdout.split()[0])
        os.kill(emulator_pid, signal.SIGKILL)
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert runtime.prefix not in listing
    assert runtime.prefix not in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    for pid in pids:
        _wait_gone(pid)


def _wait_gone(pid: int, timeout: float = 10) -> None:
    """A process is gone once it has no /proc entry or is a zombie (dead, waiting for its reaper)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return
        if state in ("Z", "X"):
            return
        assert time.monotonic() < deadline, f"pod process {pid} survived (state {state})"
        time.sleep(0.1)
