"""HTTPS plumbing: certificates, kubeconfig, the threaded HTTP/1.1 server.

``serve(port, directory)`` generates a CA and a server certificate for
``127.0.0.1``/``localhost`` (``trustme``), a random bearer token, writes
``<dir>/kubeconfig`` (cluster, user and context all named ``emulator``),
``<dir>/ca.pem`` and ``<dir>/token``, starts the controllers and serves
until SIGTERM/SIGINT or until its parent process goes away.

Each connection gets a thread (``ThreadingHTTPServer``); the TLS handshake
happens in that thread, not in the accept loop. ALPN offers only
``http/1.1``, so Go clients do not try HTTP/2. Responses carry a
``Content-Length`` (keep-alive works); watches are sent with
``Transfer-Encoding: chunked``, one JSON event per line, and end at their
timeout, when the client goes away, or at shutdown.

A port-forward (``pods/{name}/portforward``) upgrades its connection to a
WebSocket: portforward.py serves it in the connection's thread.

Every request needs ``Authorization: Bearer <token>`` except ``/healthz``,
``/livez``, ``/readyz`` and ``/version`` (public on real clusters too): the
admin token (``system:masters``) or a token minted for a ServiceAccount,
whose requests RBAC authorizes (rbac.py); anything else answers 401.
"""

from __future__ import annotations

import argparse
import base64
import hmac
import json
import os
import secrets
import select
import signal
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from . import portforward
from .api import Api, Request, Response, WatchStream
from .controllers import Controllers, seed
from .errors import ApiError
from .knobs import Knobs
from .rbac import ADMIN, User
from .store import Store

__all__ = ["serve", "write_credentials", "main"]

_PUBLIC = {"/healthz", "/livez", "/readyz", "/version"}


def write_credentials(directory: Path, port: int, host: str = "127.0.0.1") -> tuple[ssl.SSLContext, str]:
    """Make the CA, server certificate, token and kubeconfig; return (TLS context, token)."""
    import trustme

    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="kube-emulator")
    cert = ca.issue_cert(host, "localhost", "kubernetes", "kubernetes.default.svc")
    ca_pem = ca.cert_pem.bytes()
    (directory / "ca.pem").write_bytes(ca_pem)
    key_path = directory / "server.pem"
    key_path.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems) + cert.private_key_pem.bytes())
    os.chmod(key_path, 0o600)
    token = secrets.token_urlsafe(32)
    token_path = directory / "token"
    token_path.write_text(token)
    os.chmod(token_path, 0o600)
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "emulator",
            "cluster": {
                "server": f"https://{host}:{port}",
                "certificate-authority-data": base64.b64encode(ca_pem).decode(),
            },
        }],
        "users": [{"name": "emulator", "user": {"token": token}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "emulator", "namespace": "default"}}],
        "current-context": "emulator",
        "preferences": {},
    }
    path = directory / "kubeconfig"
    path.write_text(yaml.safe_dump(kubeconfig, sort_keys=False))
    os.chmod(path, 0o600)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(key_path))
    context.set_alpn_protocols(["http/1.1"])
    return context, token


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    api: Api
    token: str
    stopping: threading.Event
    log: Any


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    timeout = 600  # idle keep-alive connections are closed after this

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (BaseHTTPRequestHandler API)
        pass  # one line per request is written by _serve

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (ConnectionError, ssl.SSLError, TimeoutError, OSError):
            self.close_connection = True

    def _serve(self) -> None:
        started = time.monotonic()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = self._read_chunked()
        req = Request.build(self.command, self.path, dict(self.headers.items()), body)
        path = req.path.rstrip("/") or "/"
        user = self._user()
        if user is not None:
            req.user = user
        if path not in _PUBLIC and user is None:
            result: Response | WatchStream | portforward.PortForwardRequest = Response.json(
                ApiError(401, "Unauthorized", "Unauthorized").status(), 401)
        else:
            result = self.server.api.handle(req)
        if isinstance(result, portforward.PortForwardRequest):
            portforward.serve(self, req, result, started)  # the WebSocket upgrade; records and logs the request
            return
        if isinstance(result, WatchStream):
            self.server.api.record(req, 200)
            self._log(req, 200, started, watch=True)
            self._stream(result)
            return
        self.server.api.record(req, result.status)
        self._log(req, result.status, started)
        self.send_response(result.status)
        self.send_header("Content-Type", result.content_type)
        self.send_header("Content-Length", str(len(result.body)))
        self.send_header("Cache-Control", "no-cache, private")
        for name, value in (result.headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(result.body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _serve

    def _read_chunked(self) -> bytes:
        out = bytearray()
        while True:
            size = int(self.rfile.readline().strip().split(b";")[0] or b"0", 16)
            if size == 0:
                self.rfile.readline()
                return bytes(out)
            out += self.rfile.read(size)
            self.rfile.readline()

    def _user(self) -> User | None:
        """The admin for the admin token, a ServiceAccount for a token minted for it, else None (401)."""
        header = self.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":  # the Python client's in-cluster config sends "bearer …"
            return None
        token = token.strip()
        if hmac.compare_digest(token, self.server.token):
            return ADMIN
        return self.server.api.authenticate(token)

    def _log(self, req: Request, status: int, started: float, watch: bool = False) -> None:
        query = "&".join(f"{k}={v}" for k, v in req.query.items())
        ms = (time.monotonic() - started) * 1000
        line = (
            f"{time.strftime('%H:%M:%S')} {req.method} {req.path}{'?' + query if query else ''} -> {status}"
            f"{' (watch)' if watch else ''} {ms:.0f}ms ct={req.content_type or '-'}"
            f" ua={req.headers.get('user-agent', '-')[:40]}"
        )
        print(line, flush=True)

    def _client_gone(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
        except (OSError, ValueError):
            return True
        if not readable:
            return False
        try:
            self.connection.setblocking(False)
            try:
                data = self.connection.recv(1)
            finally:
                self.connection.setblocking(True)
        except (ssl.SSLWantReadError, BlockingIOError):
            return False
        except (OSError, ssl.SSLError):
            return True
        return not data

    def _stream(self, stream: WatchStream) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        self.close_connection = True

        def send(event: Any) -> None:
            line = json.dumps({"type": event.type, "object": event.object}, separators=(",", ":")).encode() + b"\n"
            self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
            self.wfile.flush()

        try:
            for event in stream.initial:
                send(event)
            last_bookmark = time.monotonic()
            last_check = time.monotonic()
            while not self.server.stopping.is_set():
                remaining = stream.deadline - time.monotonic()
                if remaining <= 0 or stream.watcher is None:
                    break
                try:
                    event = stream.watcher.events.get(timeout=min(0.5, remaining))
                except Exception:  # queue.Empty
                    event = None
                if event is not None:
                    send(event)
                    continue
                now_ = time.monotonic()
                if stream.bookmarks and now_ - last_bookmark >= 5:
                    marker = stream.bookmark()
                    if marker is not None:
                        send(marker)
                        last_bookmark = now_
                if now_ - last_check >= 1:
                    last_check = now_
                    if self._client_gone():
                        break
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (ConnectionError, ssl.SSLError, OSError):
            pass
        finally:
            stream.close()


def serve(port: int, directory: Path, host: str = "127.0.0.1", ready: threading.Event | None = None,
          pods: Path | None = None) -> None:
    """Run the emulator in this process until SIGTERM/SIGINT or until the parent process exits.

    ``pods``: a kubelet configuration (kubelet.KubeletConfig as JSON); with
    it, pods run as processes instead of being painted Ready.
    """
    context, token = write_credentials(directory, port, host)
    store = Store()
    knobs = Knobs()
    seed(store)
    controllers = Controllers(store, knobs)
    if pods is not None:
        from .kubelet import KubeletConfig, ProcessKubelet

        config = KubeletConfig.load(pods)
        if config.api_port:
            config.api_port = port
            config.host_ports = sorted(set(config.host_ports) | {port})
        config.token = config.token or token
        controllers.kubelet = ProcessKubelet(
            store, config, record=controllers.record, conditions=controllers._pod_conditions,
            ca_pem=(directory / "ca.pem").read_bytes(),
            # a pod's projected token is its ServiceAccount's: the API authorizes it with RBAC
            token_for=lambda namespace, account: httpd.api.tokens.mint(namespace, account),
        )
        controllers.kubelet.start()
    httpd = _Server((host, port), _Handler, bind_and_activate=True)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)
    httpd.api = Api(store, knobs, controllers, f"{host}:{port}")
    httpd.token = token
    httpd.stopping = threading.Event()
    controllers.start()

    def stop(signum: int, frame: Any) -> None:
        httpd.stopping.set()
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    parent = os.getppid()

    def orphan_watch() -> None:  # a killed test run must not leave the server behind
        while not httpd.stopping.wait(1):
            if os.getppid() != parent:
                print("kube-emulator: parent process gone, stopping", flush=True)
                stop(0, None)
                return

    threading.Thread(target=orphan_watch, name="orphan-watch", daemon=True).start()
    print(f"kube-emulator listening on https://{host}:{port} (kubeconfig {directory / 'kubeconfig'})", flush=True)
    if ready is not None:
        ready.set()
    try:
        httpd.serve_forever(poll_interval=0.2)
    finally:
        httpd.stopping.set()
        controllers.stop()
        if controllers.kubelet is not None:
            controllers.kubelet.stop()
        httpd.server_close()
        print("kube-emulator stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.kube_emulator", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    parser.add_argument("--dir", type=Path, required=True, help="directory for kubeconfig, ca.pem, token")
    parser.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("--pods", type=Path, default=None, help="kubelet configuration (JSON): run pods as processes")
    args = parser.parse_args(argv)
    try:
        serve(args.port, args.dir, args.host, pods=args.pods)
    except OSError as exc:
        print(f"kube-emulator: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0
