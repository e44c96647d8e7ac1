"""The emulated ALB (tests/support/kube_emulator/alb.py) over real sockets, no mocks.

A ``trustme`` CA issues the listener certificate for the ingress hosts; two
tiny HTTP backends on loopback stand in for pods (``/health`` answers their
``health_status``, other paths echo the request as JSON); raw sockets stand
in for a target that answers garbage and one that never answers. Clients
are ``httpx`` (TLS verified against the CA, SNI set per request) and
``ssl``/``socket`` where the handshake itself is checked.

Covered: TLS certificate and SNI; Host and longest-prefix routing, 404 for
unknown hosts; round-robin; an unhealthy target taken out of rotation and
back; fail-open; 503 without targets; 502 (port closed, garbage answer);
504 (no answer within the idle timeout) while a hung target delays no other
health check; ssl-redirect 301 and plain proxying on the HTTP listener;
X-Forwarded-* and Host; hop-by-hop headers dropped; JSON and chunked request
bodies, chunked responses; set_routes replacing targets (health state kept)
and racing with traffic; stop() releasing ports and threads.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import socketserver
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator

import httpx
import pytest
import trustme

from tests.support.kube_emulator.alb import (
    SERVER,
    LoadBalancer,
    Route,
    parse_success_codes,
    redirect_location,
    status_matches,
)

HOST = "mlflow.example.com"
API_HOST = "api.example.com"
INTERVAL = 0.05


# -- certificates -------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca_file: str
    cert_file: str
    key_file: str

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("alb-pki")
    ca = trustme.CA(organization_name="alb-test")
    cert = ca.issue_cert(HOST, API_HOST)
    ca_file, cert_file, key_file = directory / "ca.pem", directory / "chain.pem", directory / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key_file))
    return Pki(str(ca_file), str(cert_file), str(key_file))


# -- backends -----------------------------------------------------------------


class Backend:
    """A pod: ``/health`` → ``health_status``; ``/stream`` → chunked; else the request echoed as JSON."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.health_status = 200
        self.health_hits = 0
        self.hits = 0
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    raise AssertionError("the ALB must not forward chunked request bodies")
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _answer(self) -> None:
                body = self._body()
                if self.path == "/health":
                    backend.health_hits += 1
                    self._send(backend.health_status, b"ok", "text/plain")
                    return
                backend.hits += 1
                if self.path == "/stream":
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.send_header("X-Backend", backend.name)
                    self.end_headers()
                    for part in (b"first,", b"second,", b"third"):
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                    self.wfile.write(b"0\r\n\r\n")
                    return
                echo = {
                    "backend": backend.name,
                    "method": self.command,
                    "path": self.path,
                    "headers": [[k, v] for k, v in self.headers.items()],
                    "body": body.decode(),
                }
                self._send(200, json.dumps(echo).encode(), "application/json")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("X-Backend", backend.name)
                self.send_header("Set-Cookie", "a=1")
                self.send_header("Set-Cookie", "b=2")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.target = ("127.0.0.1", self.port)
        self.address = f"127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       name=f"backend-{name}", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


class GarbageTarget:
    """Answers every connection with something that is not HTTP."""

    def __init__(self) -> None:
        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.recv(65536)
                self.request.sendall(b"NOT HTTP AT ALL\r\n\r\n")

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.target = ("127.0.0.1", self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


class HungTarget:
    """Listens but never accepts: connections succeed, no answer ever comes."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.target = ("127.0.0.1", self.sock.getsockname()[1])

    def stop(self) -> None:
        self.sock.close()


@pytest.fixture
def backends() -> Iterator[tuple[Backend, Backend]]:
    a, b = Backend("a"), Backend("b")
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- load balancers -----------------------------------------------------------


@pytest.fixture
def make_lb(pki: Pki) -> Iterator[Callable[..., LoadBalancer]]:
    made: list[LoadBalancer] = []

    def make(routes: list[Route] | None = None, **kwargs: Any) -> LoadBalancer:
        options: dict[str, Any] = {"https_port": 0, "interval": INTERVAL, "timeout": 1.0, **kwargs}
        lb = LoadBalancer(cert_file=pki.cert_file, key_file=pki.key_file, **options)
        made.append(lb)
        lb.start()
        if routes is not None:
            lb.set_routes(routes)
        return lb

    try:
        yield make
    finally:
        for lb in made:
            lb.stop()


@pytest.fixture
def client(pki: Pki) -> Iterator[httpx.Client]:
    with httpx.Client(verify=pki.client_context(), timeout=5.0) as c:
        yield c


def get(client: httpx.Client, lb: LoadBalancer, path: str = "/", host: str = HOST, method: str = "GET",
        **kwargs: Any) -> httpx.Response:
    headers = {"Host": host, **kwargs.pop("headers", {})}
    return client.request(method, f"https://127.0.0.1:{lb.https_port}{path}", headers=headers,
                          extensions={"sni_hostname": HOST}, **kwargs)


def wait_for(condition: Callable[[], bool], timeout: float = 3.0, what: str = "condition") -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)
    return time.monotonic() - started


def wait_health(lb: LoadBalancer, name: str, expected: dict[str, str], timeout: float = 3.0) -> float:
    return wait_for(lambda: lb.target_health().get(name) == expected, timeout,
                    f"{name} to be {expected} (now {lb.target_health()})")


def route(host: str, *targets: tuple[str, int], name: str = "ml-platform/mlflow", **kwargs: Any) -> Route:
    return Route(host, kwargs.pop("path", "/"), tuple(targets), health_path="/health", name=name, **kwargs)


# -- tests --------------------------------------------------------------------


def test_tls_serves_the_ca_issued_certificate_for_the_sni_host(make_lb: Callable[..., LoadBalancer], pki: Pki,
                                                               backends: tuple[Backend, Backend],
                                                               client: httpx.Client) -> None:
    a, _ = backends
    lb = make_lb([route(HOST, a.target)])
    with socket.create_connection(("127.0.0.1", lb.https_port), timeout=3) as raw:
        with pki.client_context().wrap_socket(raw, server_hostname=HOST) as tls:
            names = [value for kind, value in tls.getpeercert()["subjectAltName"] if kind == "DNS"]
            assert names == [HOST, API_HOST]
            assert tls.selected_alpn_protocol() in (None, "http/1.1")
    with socket.create_connection(("127.0.0.1", lb.https_port), timeout=3) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            pki.client_context().wrap_socket(raw, server_hostname="other.example.org")
    with pytest.raises(httpx.ConnectError):  # a CA the client does not trust
        with httpx.Client(verify=ssl.create_default_context(), timeout=3) as untrusting:
            get(untrusting, lb)
    response = get(client, lb, "/hello")
    assert response.status_code == 200
    assert response.json()["backend"] == "a"
    assert response.headers["server"] != SERVER  # the target's own Server header passes through


def test_routes_by_host_then_longest_prefix_and_404s_unknown_hosts(make_lb: Callable[..., LoadBalancer],
                                                                   backends: tuple[Backend, Backend],
                                                                   client: httpx.Client) -> None:
    a, b = backends
    lb = make_lb([
        route(HOST, a.target),
        route(HOST, b.target, path="/api/2.0", name="ml-platform/api"),
        route(API_HOST, b.target, name="ml-platform/api"),
    ])
    assert get(client, lb, "/").json()["backend"] == "a"
    assert get(client, lb, "/api/2.0").json()["backend"] == "b"
    listed = get(client, lb, "/api/2.0/mlflow/experiments/list?x=1").json()
    assert (listed["backend"], listed["path"]) == ("b", "/api/2.0/mlflow/experiments/list?x=1")
    assert get(client, lb, "/api/2.0/mlflow").json()["backend"] == "b"
    assert get(client, lb, "/api/2.0x").json()["backend"] == "a"  # element-wise prefix
    assert get(client, lb, "/", host=API_HOST).json()["backend"] == "b"
    assert get(client, lb, "/", host="MLflow.Example.com:443").json()["backend"] == "a"  # case, port stripped

    missing = get(client, lb, "/", host="unknown.example.com")
    assert missing.status_code == 404
    assert missing.headers["server"] == SERVER
    assert missing.headers["content-type"].startswith("text/plain")
    assert missing.content == b""
    # keep-alive survives ALB-made answers
    assert get(client, lb, "/").status_code == 200

    lb.set_routes([route("", a.target, name="any"), route("*.example.com", b.target, name="wild")])
    assert get(client, lb, "/", host="x.example.com").json()["backend"] == "b"
    assert get(client, lb, "/", host="elsewhere.test").json()["backend"] == "a"


def test_round_robin_over_two_healthy_targets(make_lb: Callable[..., LoadBalancer],
                                              backends: tuple[Backend, Backend], client: httpx.Client) -> None:
    a, b = backends
    lb = make_lb([route(HOST, a.target, b.target)])
    wait_health(lb, "ml-platform/mlflow", {a.address: "healthy", b.address: "healthy"})
    seen = [get(client, lb, f"/r{i}").json()["backend"] for i in range(6)]
    assert sorted(seen) == ["a", "a", "a", "b", "b", "b"]
    assert all(seen[i] != seen[i + 1] for i in range(5)), seen
    assert a.health_hits >= 2 and b.health_hits >= 2


def test_unhealthy_target_gets_no_traffic_and_returns_when_healthy(make_lb: Callable[..., LoadBalancer],
                                                                   backends: tuple[Backend, Backend],
                                                                   client: httpx.Client) -> None:
    a, b = backends
    b.health_status = 503
    lb = make_lb([route(HOST, a.target, b.target)])
    wait_health(lb, "ml-platform/mlflow", {a.address: "healthy", b.address: "unhealthy"})
    b_hits = b.hits
    assert {get(client, lb, f"/r{i}").json()["backend"] for i in range(6)} == {"a"}
    assert b.hits == b_hits

    b.health_status = 200
    wait_health(lb, "ml-platform/mlflow", {a.address: "healthy", b.address: "healthy"})
    assert {get(client, lb, f"/r{i}").json()["backend"] for i in range(4)} == {"a", "b"}


def test_fails_open_when_no_target_is_healthy(make_lb: Callable[..., LoadBalancer],
                                              backends: tuple[Backend, Backend], client: httpx.Client) -> None:
    a, b = backends
    a.health_status = b.health_status = 500
    lb = make_lb([route(HOST, a.target, b.target)])
    initial = get(client, lb, "/first")  # before any probe result: "initial" targets serve too
    assert initial.status_code == 200
    wait_health(lb, "ml-platform/mlflow", {a.address: "unhealthy", b.address: "unhealthy"})
    assert sorted(get(client, lb, f"/r{i}").json()["backend"] for i in range(4)) == ["a", "a", "b", "b"]


def test_success_codes_accept_ranges(make_lb: Callable[..., LoadBalancer],
                                     backends: tuple[Backend, Backend]) -> None:
    a, b = backends
    a.health_status = b.health_status = 302
    lb = make_lb([route(HOST, a.target, success_codes="200-399"),
                  route(API_HOST, b.target, name="strict", success_codes="200,204")])
    wait_health(lb, "ml-platform/mlflow", {a.address: "healthy"})
    wait_health(lb, "strict", {b.address: "unhealthy"})

    assert parse_success_codes("200") == ((200, 200),)
    assert parse_success_codes("200, 302") == ((200, 200), (302, 302))
    assert status_matches(parse_success_codes("200-399"), 302)
    assert not status_matches(parse_success_codes("200,302"), 301)
    for bad in ("", "abc", "200-", "399-200", "600", "200;302"):
        with pytest.raises(ValueError):
            parse_success_codes(bad)
    with pytest.raises(ValueError):
        Route(HOST, success_codes="ok")


def test_503_when_no_target_is_registered(make_lb: Callable[..., LoadBalancer], client: httpx.Client) -> None:
    lb = make_lb([route(HOST)])
    response = get(client, lb, "/")
    assert response.status_code == 503
    assert response.reason_phrase == "Service Temporarily Unavailable"
    assert response.headers["server"] == SERVER
    assert b"<h1>503 Service Temporarily Unavailable</h1>" in response.content
    assert lb.target_health() == {"ml-platform/mlflow": {}}


def test_502_when_the_target_refuses_or_answers_garbage(make_lb: Callable[..., LoadBalancer],
                                                         client: httpx.Client) -> None:
    garbage = GarbageTarget()
    try:
        port = closed_port()
        lb = make_lb([route(HOST, ("127.0.0.1", port)), route(API_HOST, garbage.target, name="garbage")])
        refused = get(client, lb, "/")
        assert refused.status_code == 502
        assert refused.headers["server"] == SERVER
        assert b"502 Bad Gateway" in refused.content
        invalid = get(client, lb, "/", host=API_HOST)
        assert invalid.status_code == 502
        wait_health(lb, "ml-platform/mlflow", {f"127.0.0.1:{port}": "unhealthy"})
        wait_health(lb, "garbage", {f"{garbage.target[0]}:{garbage.target[1]}": "unhealthy"})
    finally:
        garbage.stop()


def test_504_on_idle_timeout_and_a_hung_target_delays_no_other_check(make_lb: Callable[..., LoadBalancer],
                                                                      backends: tuple[Backend, Backend],
                                                                      client: httpx.Client) -> None:
    a, _ = backends
    hung = HungTarget()
    try:
        lb = make_lb([route(HOST, hung.target, a.target), route(API_HOST, hung.target, name="hung")],
                     timeout=1.0, idle_timeout=0.4)
        took = wait_health(lb, "ml-platform/mlflow",
                           {f"127.0.0.1:{hung.target[1]}": "initial", a.address: "healthy"})
        assert took < 0.9  # less than the 1 s health-check timeout of the hung target
        assert {get(client, lb, f"/r{i}").json()["backend"] for i in range(3)} == {"a"}
        started = time.monotonic()
        response = get(client, lb, "/", host=API_HOST)
        assert response.status_code == 504
        assert response.headers["server"] == SERVER
        assert b"504 Gateway Time-out" in response.content
        assert 0.3 < time.monotonic() - started < 2.0
    finally:
        hung.stop()


def test_http_listener_redirects_to_https_or_proxies(make_lb: Callable[..., LoadBalancer],
                                                     backends: tuple[Backend, Backend]) -> None:
    a, b = backends
    lb = make_lb([route(HOST, a.target, ssl_redirect=True), route(API_HOST, b.target, name="plain")], http_port=0)
    assert lb.http_port not in (None, 0)
    with httpx.Client(timeout=5) as plain:
        url = f"http://127.0.0.1:{lb.http_port}"
        moved = plain.get(f"{url}/some/path?x=1&y=two", headers={"Host": f"{HOST}:{lb.http_port}"})
        assert moved.status_code == 301
        assert moved.headers["location"] == f"https://{HOST}:{lb.https_port}/some/path?x=1&y=two"
        assert moved.headers["server"] == SERVER
        assert plain.get(f"{url}/", headers={"Host": HOST}).headers["location"] == f"https://{HOST}:{lb.https_port}/"
        proxied = plain.get(f"{url}/p", headers={"Host": API_HOST})
        assert proxied.status_code == 200
        headers = dict((k.lower(), v) for k, v in proxied.json()["headers"])
        assert headers["x-forwarded-proto"] == "http"
        assert headers["x-forwarded-port"] == str(lb.http_port)
        assert plain.get(f"{url}/", headers={"Host": "nobody.example.com"}).status_code == 404
    assert redirect_location(HOST, 443, "/a", "b=1") == f"https://{HOST}/a?b=1"
    assert redirect_location(HOST, 8443, "/", "") == f"https://{HOST}:8443/"


def test_forwarded_headers_host_and_hop_by_hop(make_lb: Callable[..., LoadBalancer],
                                               backends: tuple[Backend, Backend], client: httpx.Client) -> None:
    a, _ = backends
    lb = make_lb([route(HOST, a.target)])
    response = get(client, lb, "/h?q=1", host=f"{HOST}:{lb.https_port}", headers={
        "X-Forwarded-For": "203.0.113.7",
        "X-Forwarded-Proto": "spoofed",
        "X-Custom": "kept",
        "Keep-Alive": "timeout=5",
        "Proxy-Authorization": "Basic c2VjcmV0",
        "Connection": "keep-alive, X-Dropped",
        "X-Dropped": "named in Connection",
        "TE": "trailers",
    })
    assert response.status_code == 200
    echo = response.json()
    headers = {k.lower(): v for k, v in echo["headers"]}
    assert echo["path"] == "/h?q=1"
    assert headers["host"] == f"{HOST}:{lb.https_port}"
    assert headers["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "https"
    assert headers["x-forwarded-port"] == str(lb.https_port)
    assert headers["x-amzn-trace-id"].startswith("Root=1-")
    assert headers["x-custom"] == "kept"
    for dropped in ("keep-alive", "proxy-authorization", "x-dropped", "te", "connection", "transfer-encoding"):
        assert dropped not in headers, dropped
    # response headers pass through, duplicates included; the ALB sets the framing
    assert response.headers["x-backend"] == "a"
    assert response.headers.get_list("set-cookie") == ["a=1", "b=2"]
    assert response.headers["content-length"] == str(len(response.content))
    head = get(client, lb, "/h", method="HEAD")
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) > 0


def test_request_bodies_and_streamed_responses_pass_through(make_lb: Callable[..., LoadBalancer],
                                                            backends: tuple[Backend, Backend],
                                                            client: httpx.Client) -> None:
    a, _ = backends
    lb = make_lb([route(HOST, a.target)])
    payload = {"name": "exp-1", "tags": [{"key": "k", "value": "v" * 5000}]}
    posted = get(client, lb, "/api/2.0/mlflow/experiments/create", method="POST", json=payload)
    assert posted.status_code == 200
    echo = posted.json()
    assert echo["method"] == "POST" and json.loads(echo["body"]) == payload
    assert dict((k.lower(), v) for k, v in echo["headers"])["content-type"] == "application/json"

    def chunks() -> Iterator[bytes]:
        yield b"part one, "
        yield b"part two"

    chunked = get(client, lb, "/upload", method="PUT", content=chunks())  # Transfer-Encoding: chunked
    assert chunked.json()["body"] == "part one, part two"
    assert dict((k.lower(), v) for k, v in chunked.json()["headers"])["content-length"] == "18"

    streamed = get(client, lb, "/stream")
    assert streamed.status_code == 200
    assert streamed.content == b"first,second,third"
    assert streamed.headers["transfer-encoding"] == "chunked"
    assert get(client, lb, "/after-stream").status_code == 200  # same keep-alive connection still usable


def test_set_routes_replaces_targets_and_keeps_health_of_those_that_stay(make_lb: Callable[..., LoadBalancer],
                                                                         backends: tuple[Backend, Backend],
                                                                         client: httpx.Client) -> None:
    a, b = backends
    lb = make_lb([route(HOST, a.target)])
    wait_health(lb, "ml-platform/mlflow", {a.address: "healthy"})
    lb.set_routes([route(HOST, a.target, b.target)])
    assert lb.target_health() == {"ml-platform/mlflow": {a.address: "healthy", b.address: "initial"}}
    lb.set_routes([route(HOST, b.target)])
    assert lb.target_health() == {"ml-platform/mlflow": {b.address: "initial"}}
    assert {get(client, lb, f"/r{i}").json()["backend"] for i in range(3)} == {"b"}
    wait_health(lb, "ml-platform/mlflow", {b.address: "healthy"})
    lb.set_routes([])
    assert lb.target_health() == {}
    assert get(client, lb, "/").status_code == 404


def test_set_routes_from_another_thread_while_serving(make_lb: Callable[..., LoadBalancer],
                                                      backends: tuple[Backend, Backend], client: httpx.Client) -> None:
    a, b = backends
    lb = make_lb([route(HOST, a.target)])
    done = threading.Event()
    errors: list[BaseException] = []

    def flip() -> None:
        try:
            i = 0
            while not done.is_set():
                lb.set_routes([route(HOST, (a.target, b.target)[i % 2])])
                i += 1
                time.sleep(0.005)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    flipper = threading.Thread(target=flip, daemon=True)
    flipper.start()
    try:
        seen = {get(client, lb, f"/r{i}").json()["backend"] for i in range(40)}
    finally:
        done.set()
        flipper.join()
    assert not errors
    assert seen <= {"a", "b"} and seen


def test_start_fails_cleanly_when_a_port_is_taken(make_lb: Callable[..., LoadBalancer], pki: Pki) -> None:
    first = make_lb(http_port=0)
    threads_before = set(threading.enumerate())
    for ports in ({"https_port": first.https_port}, {"https_port": 0, "http_port": first.http_port}):
        second = LoadBalancer(cert_file=pki.cert_file, key_file=pki.key_file, **ports)
        with pytest.raises(OSError):
            second.start()
        second.stop()
    assert [t for t in threading.enumerate() if t not in threads_before] == []
    with socket.create_connection(("127.0.0.1", first.https_port), timeout=2):
        pass  # the first one still serves


def _socket_fds() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                count += 1
        except OSError:
            pass
    return count


def test_stop_releases_ports_sockets_and_threads(pki: Pki, backends: tuple[Backend, Backend]) -> None:
    a, _ = backends
    gc.collect()
    sockets_before = _socket_fds()
    threads_before = set(threading.enumerate())
    lb = LoadBalancer(https_port=0, http_port=0, cert_file=pki.cert_file, key_file=pki.key_file,
                      interval=INTERVAL, timeout=1.0)
    try:
        lb.start()
        lb.set_routes([route(HOST, a.target)])
        with httpx.Client(verify=pki.client_context(), timeout=5) as c:
            assert get(c, lb, "/").status_code == 200
            idle = socket.create_connection(("127.0.0.1", lb.http_port), timeout=3)  # idle keep-alive connection
            try:
                wait_for(lambda: any(t.name.startswith("alb-http-conn") for t in threading.enumerate()),
                         what="the HTTP connection thread")
                started = time.monotonic()
                lb.stop()
                assert time.monotonic() - started < 2.0
                assert idle.recv(1) == b""  # the ALB closed it
            finally:
                idle.close()
        lb.stop()  # idempotent
        for port in (lb.https_port, lb.http_port):
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
        leftover = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        assert not [t for t in leftover if t.name.startswith("alb")], leftover
        assert not [t for t in leftover if not t.daemon], leftover
        def sockets_closed() -> bool:  # the backends close their ends of the LB's connections asynchronously
            gc.collect()
            return _socket_fds() <= sockets_before

        wait_for(sockets_closed, timeout=2.0, what="sockets to be closed")
    finally:
        lb.stop()
