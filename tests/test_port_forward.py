"""Pod port-forward: the emulator's ``pods/portforward`` WebSocket and tasks.port_forward.PortForward over it.

One emulator with the process kubelet for the module (needs root; skipped
elsewhere with the reason). Pod ``web`` runs a small Python program: HTTP on
8080 (HTTP/1.0: the pod closes each connection after its answer, so the
WebSocket is closed from the pod's side) and a TCP "hold" server on 9000 that
counts the connections it saw open and closed (``/stats``), so a test can see
the pod side of a forwarded connection end. Everything goes through the real
``kubernetes`` client (``kubernetes.stream.portforward``).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import kubernetes
import pytest
from kubernetes.client.exceptions import ApiException
from kubernetes.stream import portforward

from tasks.port_forward import PortForward
from tests.support.kube_emulator import KubeEmulator, PodRuntime, kube_emulator, pods_unavailable, python_image

_REASON = pods_unavailable()
pytestmark = [pytest.mark.pods, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

IMAGE = "example.org/python:3.11"
NS = "fwd"

POD_PROGRAM = r"""
import http.server, os, socket, threading, json
stats = {"opened": 0, "closed": 0}
lock = threading.Lock()
barrier = threading.Barrier(2, timeout=20)

class H(http.server.BaseHTTPRequestHandler):
    def _answer(self, body, code=200):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        if self.path == "/hello":
            self._answer(("hello from " + os.environ["HOSTNAME"]).encode())
        elif self.path == "/barrier":  # answers only when two requests are in at once
            barrier.wait()
            self._answer(b"together")
        elif self.path == "/stats":
            with lock:
                self._answer(json.dumps(stats).encode())
        else:
            self._answer(b"no", 404)
    def do_POST(self):
        self._answer(self.rfile.read(int(self.headers["Content-Length"])))
    def log_message(self, *a):
        pass

def hold(conn):
    with lock:
        stats["opened"] += 1
    try:
        while conn.recv(65536):
            pass
    except OSError:
        pass
    with lock:
        stats["closed"] += 1
    conn.close()

def holder():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 9000))
    s.listen()
    while True:
        conn, _ = s.accept()
        threading.Thread(target=hold, args=(conn,), daemon=True).start()

threading.Thread(target=holder, daemon=True).start()
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
"""


def _pod(name: str, code: str, **spec: Any) -> dict[str, Any]:
    container = {"name": "main", "image": IMAGE, "command": ["python", "-u", "-c", code],
                 "env": [{"name": "HOSTNAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]}
    container.update(spec.pop("container", {}))
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS, "labels": {"app": name}},
            "spec": {"containers": [container], **spec}}


def _ready(pod: dict[str, Any] | None) -> bool:
    conditions = ((pod or {}).get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeEmulator]:
    runtime = PodRuntime(images={IMAGE: python_image()}, backoff_seconds=1.0, max_grace_seconds=2.0)
    with kube_emulator(tmp_path_factory.mktemp("port-forward"), pods=runtime) as emulator:
        emulator.control.create_namespace(NS)
        emulator.control.create(_pod("web", POD_PROGRAM, container={
            "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}))
        emulator.control.create(_pod("done", "print('bye')", restartPolicy="Never"))
        emulator.control.wait_for(lambda: _ready(emulator.control.object("Pod", "web", NS)), timeout=40,
                                  what="pod web Ready")
        emulator.control.wait_for(
            lambda: ((emulator.control.object("Pod", "done", NS) or {}).get("status") or {}).get("phase") == "Succeeded",
            timeout=40, what="pod done Succeeded")
        yield emulator


def _core(kubeconfig: Path) -> kubernetes.client.CoreV1Api:
    cfg = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    return kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(cfg))


@pytest.fixture()
def core(kube: KubeEmulator) -> Iterator[kubernetes.client.CoreV1Api]:
    api = _core(kube.kubeconfig)
    yield api
    api.api_client.close()


def _proxy_threads() -> list[threading.Thread]:
    """The kubernetes client's per-port-forward proxy threads (they end once the WebSocket is closed)."""
    return [t for t in threading.enumerate() if t.name.startswith("Kubernetes port forward proxy")]


def _ours() -> set[threading.Thread]:
    return set(_proxy_threads()) | {t for t in threading.enumerate() if t.name.startswith("port-forward-")}


def _settled(before: set[threading.Thread], timeout: float = 10) -> list[str]:
    """Wait for the client's proxy threads and our relay threads started since ``before`` to end; what is still
    alive after ``timeout`` (threads of another module in this process are not this test's)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [t.name for t in _ours() - before]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


@pytest.fixture(autouse=True)
def _no_threads_left() -> Iterator[None]:
    before = _ours()
    yield
    assert _settled(before) == []


def _stats(kube: KubeEmulator) -> dict[str, int]:
    """The hold server's counters, read at the pod's IP (the host reaches pods directly)."""
    ip = kube.control.object("Pod", "web", NS)["status"]["podIP"]
    return httpx.get(f"http://{ip}:8080/stats", timeout=10).json()


def _refusal(exc: ApiException) -> tuple[int, str]:
    """(status, message) of a refused upgrade: the client raises ApiException(0) from websocket-client's error."""
    import json

    cause = exc.__context__
    body = getattr(cause, "resp_body", b"") or b""
    try:
        message = json.loads(body)["message"]
    except (ValueError, KeyError, TypeError):
        message = body.decode(errors="replace")
    return getattr(cause, "status_code", exc.status), message


def _read_all(sock: Any, timeout: float = 10) -> bytes:
    sock.settimeout(timeout)
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


# ----------------------------------------------------------------- the protocol, with the client alone

def test_raw_portforward_reaches_the_pod_and_reports_a_refused_port(kube: KubeEmulator, core: Any) -> None:
    """Two ports on one WebSocket: 8080 answers HTTP; nothing listens on 7070, so its error channel says so."""
    pf = portforward(core.connect_get_namespaced_pod_portforward, "web", NS, ports="8080,7070")
    try:
        web = pf.socket(8080)
        web.sendall(b"GET /hello HTTP/1.0\r\nHost: web\r\n\r\n")
        answer = _read_all(web)  # the pod closes after answering: the WebSocket ends, the socket reads EOF
        assert answer.startswith(b"HTTP/1.0 200") and answer.endswith(b"hello from web"), answer
        assert pf.error(8080) is None
        assert _read_all(pf.socket(7070)) == b""
        error = pf.error(7070)
        uid = kube.control.object("Pod", "web", NS)["metadata"]["uid"]
        assert error is not None and error.startswith(f"error forwarding port 7070 to pod {uid}, uid : "), error
        assert "failed to connect to localhost:7070" in error and "connection refused" in error
    finally:
        pf.close()
    request = [r for r in kube.control.requests() if r["path"].endswith("/pods/web/portforward")][-1]
    assert request["method"] == "GET" and request["status"] == 101 and request["query"] == {"ports": "8080,7070"}


def test_missing_and_finished_pods_are_refused_before_the_upgrade(kube: KubeEmulator, core: Any) -> None:
    with pytest.raises(ApiException) as missing:
        portforward(core.connect_get_namespaced_pod_portforward, "nope", NS, ports="8080")
    assert _refusal(missing.value) == (404, 'pods "nope" not found')
    with pytest.raises(ApiException) as finished:  # Succeeded: no running sandbox, as the runtime lists pods
        portforward(core.connect_get_namespaced_pod_portforward, "done", NS, ports="8080")
    assert _refusal(finished.value) == (500, f'pod not found ("done_{NS}")')


def test_handshake_errors_as_the_kubelet_answers(kube: KubeEmulator) -> None:
    """No upgrade → 400; an unsupported subprotocol → 403; the base64 subprotocol works."""
    import base64

    import websocket

    url = f"{kube.url}/api/v1/namespaces/{NS}/pods/web/portforward?ports=8080"
    auth = {"Authorization": f"Bearer {kube.token}"}
    plain = httpx.get(url, headers=auth, verify=ssl.create_default_context(cafile=str(kube.ca_path)), timeout=10)
    assert plain.status_code == 400 and plain.json()["message"] == "Upgrade request required"
    ssl_opts = {"ca_certs": str(kube.ca_path)}
    ws = websocket.WebSocket(sslopt=ssl_opts)
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        ws.connect(url.replace("https", "wss"), header=[f"Authorization: Bearer {kube.token}"],
                   subprotocols=["v5.channel.k8s.io", "channel.k8s.io"])
    assert refused.value.status_code == 403
    ws = websocket.WebSocket(sslopt=ssl_opts)
    ws.connect(url.replace("https", "wss"), header=[f"Authorization: Bearer {kube.token}"],
               subprotocols=["v4.base64.channel.k8s.io"], timeout=10)
    try:
        assert ws.getsubprotocol() == "v4.base64.channel.k8s.io"
        port = base64.b64encode((8080).to_bytes(2, "little")).decode()
        assert [ws.recv(), ws.recv()] == ["0" + port, "1" + port]
        ws.send("0" + base64.b64encode(b"GET /hello HTTP/1.0\r\n\r\n").decode())
        received = b""
        while True:
            frame = ws.recv()
            if not frame:
                break
            assert frame[0] == "0"
            received += base64.b64decode(frame[1:])
        assert received.endswith(b"hello from web")
    finally:
        ws.close()


# ----------------------------------------------------------------- PortForward

def test_http_through_port_forward_concurrent_and_large(kube: KubeEmulator, core: Any) -> None:
    """A GET, two requests that the pod answers only when both are in (so they ran at once), a 1 MiB echo."""
    with PortForward(core, NS, lambda: ["web"], 8080) as forward, \
            httpx.Client(base_url=f"http://127.0.0.1:{forward.local_port}", timeout=20) as http:
        hello = http.get("/hello")
        assert hello.status_code == 200 and hello.text == "hello from web"
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda _: http.get("/barrier").text, range(2)))
        assert answers == ["together", "together"]
        body = os.urandom(1 << 20)
        echo = http.post("/echo", content=body)
        assert echo.status_code == 200 and hashlib.sha256(echo.content).digest() == hashlib.sha256(body).digest()


def test_the_next_pod_is_tried_when_one_does_not_open(kube: KubeEmulator, core: Any,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tasks.port_forward")
    with PortForward(core, NS, lambda: ["gone", "web"], 8080) as forward:
        assert httpx.get(f"http://127.0.0.1:{forward.local_port}/hello", timeout=20).text == "hello from web"
    assert 'port-forward to pod fwd/gone port 8080 refused: 404 pods "gone" not found' in caplog.text


def test_a_port_nobody_listens_on_closes_the_local_connection(kube: KubeEmulator, core: Any,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tasks.port_forward")
    with PortForward(core, NS, lambda: ["web"], 7070) as forward:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", forward.local_port), timeout=10) as conn:
            conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert _read_all(conn) == b""  # closed, no answer, no hang
        assert time.monotonic() - started < 5
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{forward.local_port}/", timeout=10)
    assert "port-forward to pod fwd/web port 7070: error forwarding port 7070" in caplog.text
    assert "connection refused" in caplog.text


def test_closing_port_forward_closes_the_pod_side_and_leaves_nothing(kube: KubeEmulator, core: Any) -> None:
    """Open connections are held by the pod; close() ends them there, frees the port, leaves no thread or fd."""
    fds_before = len(os.listdir("/proc/self/fd"))
    threads_before = _ours()
    before = _stats(kube)
    forward = PortForward(core, NS, lambda: ["web"], 9000)
    port = forward.start()
    clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
    try:
        kube.control.wait_for(lambda: _stats(kube)["opened"] == before["opened"] + 2, timeout=10,
                              what="two connections open in the pod")
        assert _stats(kube)["closed"] == before["closed"]
        forward.close()
        forward.close()  # idempotent
        kube.control.wait_for(lambda: _stats(kube)["closed"] == before["closed"] + 2, timeout=10,
                              what="the pod to see both connections closed")
        for c in clients:
            assert _read_all(c, timeout=5) == b""  # the local side is closed too
    finally:
        forward.close()
        for c in clients:
            c.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    assert _settled(threads_before) == []
    assert len(os.listdir("/proc/self/fd")) <= fds_before


# ----------------------------------------------------------------- RBAC

def _role(kube: KubeEmulator, name: str, verbs: list[str]) -> Path:
    """ServiceAccount ``name`` with ``verbs`` on pods/portforward (and get on pods); its kubeconfig."""
    kube.control.create({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": NS}})
    kube.control.create({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                         "metadata": {"name": name, "namespace": NS},
                         "rules": [{"apiGroups": [""], "resources": ["pods/portforward"], "verbs": verbs}]})
    kube.control.create({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                         "metadata": {"name": name, "namespace": NS},
                         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": NS}]})
    return kube.kubeconfig_for(NS, name)


@pytest.mark.parametrize("verbs, missing", [(["get"], "create"), (["create"], "get")])
def test_rbac_needs_get_and_create_on_pods_portforward(kube: KubeEmulator, verbs: list[str], missing: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """The upgrade is a GET (``get``), and kube-apiserver 1.35+ also wants ``create``: one alone is 403."""
    caplog.set_level(logging.INFO, logger="tasks.port_forward")
    kubeconfig = _role(kube, f"only-{verbs[0]}", verbs)
    token = kubeconfig.read_text().split("token: ")[1].split()[0]
    core = _core(kubeconfig)
    try:
        with pytest.raises(ApiException) as refused:
            portforward(core.connect_get_namespaced_pod_portforward, "web", NS, ports="8080")
        status, message = _refusal(refused.value)
        assert status == 403 and message == (f'pods "web" is forbidden: User "system:serviceaccount:{NS}:only-{verbs[0]}" '
                                             f'cannot {missing} resource "pods/portforward" in API group "" '
                                             f'in the namespace "{NS}"')
        with PortForward(core, NS, lambda: ["web", "web"], 8080) as forward:
            with socket.create_connection(("127.0.0.1", forward.local_port), timeout=10) as conn:
                conn.sendall(b"GET /hello HTTP/1.0\r\n\r\n")
                try:  # closed unread: the kernel resets it
                    assert _read_all(conn) == b""
                except ConnectionResetError:
                    pass
    finally:
        core.api_client.close()
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1, "a 403 is not retried on the next pod"
    assert f"refused: 403 pods \"web\" is forbidden: User \"system:serviceaccount:{NS}:only-{verbs[0]}\" " \
           f"cannot {missing} resource \"pods/portforward\"" in caplog.text
    assert token not in caplog.text


def test_rbac_with_get_and_create_forwards(kube: KubeEmulator) -> None:
    core = _core(_role(kube, "forwarder", ["get", "create"]))
    try:
        with PortForward(core, NS, lambda: ["web"], 8080) as forward:
            assert httpx.get(f"http://127.0.0.1:{forward.local_port}/hello", timeout=20).text == "hello from web"
    finally:
        core.api_client.close()
    users = {r["user"] for r in kube.control.requests() if r["path"].endswith("/portforward") and r["status"] == 101}
    assert f"system:serviceaccount:{NS}:forwarder" in users


# ----------------------------------------------------------------- a painted pod

def test_a_painted_pod_says_nothing_runs_in_it(tmp_path: Path) -> None:
    with kube_emulator(tmp_path) as painted:
        painted.control.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "default"},
                                "spec": {"containers": [{"name": "c", "image": "x"}]}})
        painted.control.wait_for(
            lambda: ((painted.control.object("Pod", "p", "default") or {}).get("status") or {}).get("phase") == "Running",
            timeout=20, what="painted pod Running")
        core = _core(painted.kubeconfig)
        threads_before = _ours()
        try:
            pf = portforward(core.connect_get_namespaced_pod_portforward, "p", "default", ports="5000")
            try:
                assert _read_all(pf.socket(5000)) == b""
                assert "is painted (the default kubelet runs no processes)" in (pf.error(5000) or "")
            finally:
                pf.close()
        finally:
            core.api_client.close()
        assert _settled(threads_before) == []
