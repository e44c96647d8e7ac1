"""A local port carried to a pod's port through the Kubernetes API, as ``kubectl port-forward`` does.

Why: a runner on a laptop has to reach the new MLflow before anything else
can — before the Ingress's DNS name resolves and before the load balancer
exists (or while it is the thing being debugged). The API server is the one
endpoint the runner always reaches, and its ``pods/portforward`` subresource
carries TCP to a pod's port without any Service, DNS or load balancer.

:class:`PortForward` listens on ``127.0.0.1:<ephemeral>``; each accepted
connection gets its own port-forward WebSocket
(``kubernetes.stream.portforward``) to the first pod of ``pods()`` that
opens (the caller lists Ready pods), and bytes are relayed both ways until
either side closes. A pod that does not listen on the port shows up as the
kubelet's message on the error channel (logged; the local connection is
closed, nothing hangs). A 401/403 from the API server is logged with its
status and stops trying further pods — the same identity would be refused
again. Nothing here logs request headers, so the bearer token never reaches a
log line.

RBAC: a WebSocket upgrade is a GET, authorized as ``get pods/portforward``;
kube-apiserver 1.35+ also requires ``create pods/portforward`` (the verb of
the SPDY POST). Grant both.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
from typing import Any, Callable

import kubernetes
from kubernetes.client.exceptions import ApiException
from kubernetes.stream import portforward

from mlflow_rollout.redact import redact

__all__ = ["PortForward"]

_log = logging.getLogger(__name__)
_HANDSHAKE = re.compile(r"Handshake status (\d{3})")
_BUFFER = 64 << 10


def _status(exc: ApiException) -> int:
    """The HTTP status of a refused port-forward.

    The client wraps a refused WebSocket handshake as ``ApiException(status=0)``;
    the handshake's status is on the websocket-client exception it was raised from.
    """
    if exc.status:
        return int(exc.status)
    code = getattr(exc.__context__, "status_code", None)
    if isinstance(code, int):
        return code
    match = _HANDSHAKE.search(str(exc.reason or ""))
    return int(match.group(1)) if match else 0


def _message(exc: ApiException) -> str:
    """The API's own words (a Status message or the kubelet's text), never the headers."""
    body: Any = getattr(exc.__context__, "resp_body", None) or exc.body
    if isinstance(body, bytes):
        body = body.decode(errors="replace")
    if isinstance(body, str) and body.strip():
        try:
            parsed = json.loads(body)
        except ValueError:
            return redact(body.strip()[:300])
        if isinstance(parsed, dict) and parsed.get("message"):
            return redact(str(parsed["message"])[:300])
    reason = str(exc.reason or "").split(" -+-+- ")[0]  # websocket-client appends headers and body
    return redact(reason[:300])


def _shutdown(sock: Any) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # not connected any more


class PortForward:
    """A local TCP listener on 127.0.0.1 whose connections are carried to a pod's port through the API's port-forward."""

    def __init__(self, core: kubernetes.client.CoreV1Api, namespace: str, pods: Callable[[], list[str]], port: int,
                 *, log: logging.Logger | None = None) -> None:
        self.core = core
        self.namespace = namespace
        self.pods = pods
        self.port = port
        self.log = log or _log
        self._listener: socket.socket | None = None
        self._accepting: threading.Thread | None = None
        self._relays: set[threading.Thread] = set()
        self._open: set[Any] = set()  # sockets of live relays, closed by close()
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def __enter__(self) -> "PortForward":
        if self._listener is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def local_port(self) -> int:
        if self._listener is None:
            raise RuntimeError("PortForward is not started")
        return int(self._listener.getsockname()[1])

    def start(self) -> int:
        """Bind 127.0.0.1:0, accept in a daemon thread; return the local port."""
        if self._listener is not None or self._closed.is_set():
            raise RuntimeError("PortForward can be started once")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        self._listener = listener
        self._accepting = threading.Thread(target=self._accept, name=f"port-forward-{self.port}-accept", daemon=True)
        self._accepting.start()
        self.log.info("port-forward 127.0.0.1:%d -> %s pods, port %d", self.local_port, self.namespace, self.port)
        return self.local_port

    def close(self) -> None:
        """Stop accepting, close open relays (their pod connections close with them); idempotent."""
        self._closed.set()
        if self._listener is not None:
            _shutdown(self._listener)  # wakes the blocked accept()
            self._listener.close()
        with self._lock:
            for sock in self._open:
                _shutdown(sock)
            relays = list(self._relays)
        for thread in [self._accepting, *relays]:
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout=10)

    # -- threads

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            thread = threading.Thread(target=self._serve, args=(conn,), name=f"port-forward-{self.port}-relay", daemon=True)
            with self._lock:
                if self._closed.is_set():
                    conn.close()
                    return
                self._relays.add(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            opened = self._forward()
            if opened is None or self._closed.is_set():
                if opened is not None:
                    opened[1].close()
                return
            name, pf = opened
            remote = pf.socket(self.port)
            with self._lock:
                self._open.update((conn, remote))
            if self._closed.is_set():
                _shutdown(conn)
            try:
                self._relay(conn, remote)
            finally:
                with self._lock:
                    self._open.difference_update((conn, remote))
                pf.close()
            error = pf.error(self.port)
            if error:
                self.log.warning("port-forward to pod %s/%s port %d: %s", self.namespace, name, self.port, redact(error))
        finally:
            conn.close()
            with self._lock:
                self._relays.discard(threading.current_thread())

    def _forward(self) -> tuple[str, Any] | None:
        """The first pod whose port-forward opens, with it; None (logged) when none does."""
        names = list(self.pods())
        if not names:
            self.log.warning("port-forward to %s port %d: no ready pod", self.namespace, self.port)
            return None
        for name in names:
            try:
                pf = portforward(self.core.connect_get_namespaced_pod_portforward, name, self.namespace,
                                 ports=str(self.port))
            except ApiException as exc:
                status = _status(exc)
                self.log.warning("port-forward to pod %s/%s port %d refused: %s %s", self.namespace, name, self.port,
                                 status or "no answer", _message(exc))
                if status in (401, 403):
                    return None  # the same identity is refused for every pod
                continue
            return name, pf
        return None

    def _relay(self, local: socket.socket, remote: Any) -> None:
        """Bytes both ways until either side closes; then both are shut down."""
        back = threading.Thread(target=self._pipe, args=(remote, local), name=f"port-forward-{self.port}-back", daemon=True)
        back.start()
        self._pipe(local, remote)
        back.join()

    @staticmethod
    def _pipe(source: Any, sink: Any) -> None:
        try:
            while True:
                data = source.recv(_BUFFER)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass  # reset, or shut down by close()
        finally:  # one direction ending ends both: the port-forward protocol has no half-close
            _shutdown(source)
            _shutdown(sink)
