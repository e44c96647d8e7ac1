"""An emulated AWS Application Load Balancer for Ingresses of class ``alb``.

Stands in for the ALB that the AWS Load Balancer Controller builds for an
Ingress in IP target mode (targets are pod IP:port, the Ready endpoints).
One :class:`LoadBalancer` serves every route, like one IngressGroup: an
HTTPS listener (TLS terminated with the given PEM chain and key) and an
optional HTTP listener, both on 127.0.0.1 by default.

What is emulated, after the AWS docs:

- **Routing**: by ``Host`` (port stripped, case-insensitive), then the
  longest path prefix (pathType ``Prefix``: ``/api`` matches ``/api`` and
  ``/api/x``, not ``/apix``). Exact hosts win over wildcard hosts
  (``*.example.com``, ``*`` matches any characters), which win over rules
  without a host (``""``); among equal matches the first route wins.
  No match → the controller's default action: fixed-response ``404``,
  ``text/plain``, empty body.
- **ssl-redirect**: on the HTTP listener a matching route with
  ``ssl_redirect`` answers ``301`` to
  ``https://#{host}:#{port}/#{path}?#{query}`` (the port is left out when it
  is 443, ``?`` when there is no query).
- **Targets**: round-robin over the healthy targets of the route; when none
  is healthy (all ``initial``/``unhealthy``) the ALB fails open and
  round-robins over all registered targets. No registered target → ``503``.
  Connection refused/reset or an invalid answer → ``502``; no connection
  within 10 s or no data within ``idle_timeout`` → ``504``. Responses the ALB
  makes itself carry ``Server: awselb/2.0`` and awselb's HTML bodies.
- **Health checks**: every target of every route is probed every
  ``interval`` seconds (each on its own schedule and thread, so a hung target
  delays no other) with ``GET health_path`` over plain HTTP
  (``User-Agent: ELB-HealthChecker/2.0``); a status in ``success_codes``
  within ``timeout`` is a success. ``initial`` → ``healthy`` after
  ``healthy_threshold`` consecutive successes, → ``unhealthy`` after
  ``unhealthy_threshold`` consecutive failures, and back. A target group is
  (route name, health path, success codes); a target that stays across
  :meth:`LoadBalancer.set_routes` keeps its health state.
- **Proxying**: HTTP/1.1, one upstream connection per request; method,
  path and query, body and end-to-end headers are forwarded, ``Host`` is
  kept; ``X-Forwarded-For`` is appended to, ``X-Forwarded-Proto`` and
  ``X-Forwarded-Port`` are set, ``X-Amzn-Trace-Id`` is added when absent;
  hop-by-hop headers (and those named in ``Connection``) are dropped both
  ways. Request bodies need ``Content-Length`` or are chunked (decoded and
  sent with a ``Content-Length``). Responses are streamed: with the
  target's ``Content-Length`` when it gave one, else chunked (HTTP/1.0
  clients: until close). Client connections are kept alive and closed after
  ``idle_timeout`` without a request.

Not emulated: HTTP/2, WebSockets/``Upgrade``, gRPC, authentication actions,
other listener rules (headers, methods, query, source IP, weighted target
groups, fixed responses from annotations), stickiness, slow start,
least-outstanding-requests, deregistration delay (removed targets go at
once), SNI certificate selection (one certificate), TLS policies, access
logs to S3 (lines go to the ``kube_emulator.alb`` logger at INFO instead),
request size limits, ``400`` for malformed headers beyond what
:mod:`http.server` rejects.

Use::

    with LoadBalancer(https_port=0, http_port=0, cert_file=chain, key_file=key) as lb:
        lb.set_routes([Route("mlflow.example.com", "/", (("10.0.0.5", 5000),),
                             health_path="/health", name="ml-platform/mlflow")])
        lb.target_health()  # {"ml-platform/mlflow": {"10.0.0.5:5000": "initial"}}
"""

from __future__ import annotations

import http.client
import logging
import secrets
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from types import TracebackType
from typing import Any, Iterable
from urllib.parse import urlsplit

__all__ = [
    "CONNECT_TIMEOUT",
    "HEALTH_USER_AGENT",
    "LoadBalancer",
    "Route",
    "SERVER",
    "parse_success_codes",
    "redirect_location",
    "status_matches",
]

log = logging.getLogger("kube_emulator.alb")

#: ``Server`` header of responses the load balancer makes itself.
SERVER = "awselb/2.0"
#: ``User-Agent`` of health checks.
HEALTH_USER_AGENT = "ELB-HealthChecker/2.0"
#: Seconds the ALB waits for a connection to a target before answering 504.
CONNECT_TIMEOUT = 10.0

HEALTHY, UNHEALTHY, INITIAL = "healthy", "unhealthy", "initial"

_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
})
#: Request headers the load balancer sets itself (or answers, for ``Expect``).
_REPLACED = frozenset({"content-length", "expect", "x-forwarded-proto", "x-forwarded-port"})
_CHUNK = 64 * 1024
_REASONS = {
    301: "Moved Permanently",
    400: "Bad Request",
    404: "Not Found",
    413: "Request Entity Too Large",
    414: "Request-URI Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Temporarily Unavailable",
    504: "Gateway Time-out",
    505: "HTTP Version Not Supported",
}


def parse_success_codes(spec: str) -> tuple[tuple[int, int], ...]:
    """``"200"``, ``"200,302"``, ``"200-399"`` → inclusive ranges; ValueError if malformed.

    As for ALB HTTP target groups, codes must lie within 200–499.
    """
    ranges: list[tuple[int, int]] = []
    for part in str(spec).split(","):
        low, dash, high = part.strip().partition("-")
        low, high = low.strip(), high.strip()
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"invalid success codes {spec!r}")
        first = int(low)
        last = int(high) if dash else first
        if not 200 <= first <= last <= 499:
            raise ValueError(f"invalid success codes {spec!r}: codes must be within 200-499")
        ranges.append((first, last))
    return tuple(ranges)


def status_matches(ranges: Iterable[tuple[int, int]], status: int) -> bool:
    """True when ``status`` lies in one of ``ranges`` (from :func:`parse_success_codes`)."""
    return any(first <= status <= last for first, last in ranges)


def redirect_location(host: str, https_port: int, path: str, query: str = "") -> str:
    """The ``Location`` of the ssl-redirect: ``https://host[:port]/path[?query]``."""
    netloc = host if https_port == 443 else f"{host}:{https_port}"
    return f"https://{netloc}{path or '/'}{'?' + query if query else ''}"


def _host_only(header: str) -> str:
    """``Host`` header value without port, lower case (``[v6]:443`` → ``[v6]``)."""
    host = header.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end >= 0 else host
    return host.rsplit(":", 1)[0] if ":" in host else host


def _path_prefix(path: str) -> str:
    """A Prefix path without trailing slashes (``/`` → ``""``, matching everything)."""
    return path.rstrip("/")


def _prefix_matches(prefix: str, path: str) -> bool:
    return not prefix or path == prefix or path.startswith(prefix + "/")


def _html(code: int, reason: str) -> bytes:
    line = f"{code} {reason}"
    return (f"<html>\r\n<head><title>{line}</title></head>\r\n<body>\r\n"
            f"<center><h1>{line}</h1></center>\r\n</body>\r\n</html>\r\n").encode()


def _trace_id() -> str:
    return f"Root=1-{int(time.time()):08x}-{secrets.token_hex(12)}"


def _connection_tokens(values: Iterable[str]) -> set[str]:
    return {token.strip().lower() for value in values for token in value.split(",") if token.strip()}


def _is_hop_by_hop(name: str, named: set[str]) -> bool:
    low = name.lower()
    return low in _HOP_BY_HOP or low.startswith("proxy-") or low in named


@dataclass(frozen=True)
class Route:
    """One Ingress rule path and its registered targets (the route's target group)."""

    #: Ingress rule host, matched against the Host header without port; ``""`` matches any host.
    host: str
    #: pathType Prefix; the longest match wins.
    path: str = "/"
    #: Registered targets (pod IP, port): the Ready endpoints.
    targets: tuple[tuple[str, int], ...] = ()
    #: ``alb.ingress.kubernetes.io/healthcheck-path``.
    health_path: str = "/"
    #: ``alb.ingress.kubernetes.io/success-codes``: ``"200"``, ``"200,302"``, ``"200-399"``.
    success_codes: str = "200"
    #: ``alb.ingress.kubernetes.io/ssl-redirect`` present: the HTTP listener answers 301 to https.
    ssl_redirect: bool = False
    #: ``namespace/ingress``, for logs and :meth:`LoadBalancer.target_health` keys.
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "host", (self.host or "").strip().lower())
        object.__setattr__(self, "path", self.path or "/")
        object.__setattr__(self, "targets", tuple((str(ip), int(port)) for ip, port in self.targets))
        object.__setattr__(self, "health_path", self.health_path or "/")
        if not self.path.startswith("/"):
            raise ValueError(f"route {self.name or self.host!r}: path {self.path!r} must start with '/'")
        if not self.health_path.startswith("/"):
            raise ValueError(f"route {self.name or self.host!r}: health path {self.health_path!r} must start with '/'")
        parse_success_codes(self.success_codes)


#: Identity of a target's health state: (route name, health path, success codes, ip, port).
_TargetKey = tuple[str, str, str, str, int]


@dataclass
class _Target:
    key: _TargetKey
    codes: tuple[tuple[int, int], ...]
    state: str = INITIAL
    successes: int = 0
    failures: int = 0
    next_due: float = 0.0
    probing: bool = False
    reason: str = ""

    @property
    def address(self) -> str:
        return f"{self.key[3]}:{self.key[4]}"


@dataclass(frozen=True)
class _Rule:
    route: Route
    prefix: str
    keys: tuple[_TargetKey, ...]
    rr_key: tuple[str, str, str]


@dataclass
class _Tracked:
    """Sockets and threads to close and join at stop()."""

    sockets: set[socket.socket] = field(default_factory=set)
    threads: set[threading.Thread] = field(default_factory=set)


class LoadBalancer:
    """The emulated ALB: HTTPS (and optional HTTP) listener, routing, health checks."""

    def __init__(self, *, host: str = "127.0.0.1", https_port: int, http_port: int | None = None,
                 cert_file: str, key_file: str, interval: float = 1.0, timeout: float = 2.0,
                 healthy_threshold: int = 2, unhealthy_threshold: int = 2, idle_timeout: float = 60.0) -> None:
        if interval <= 0 or timeout <= 0 or idle_timeout <= 0:
            raise ValueError("interval, timeout and idle_timeout must be positive")
        if healthy_threshold < 1 or unhealthy_threshold < 1:
            raise ValueError("thresholds must be at least 1")
        self.host = host
        self.https_port = int(https_port)
        self.http_port = None if http_port is None else int(http_port)
        self.cert_file = str(cert_file)
        self.key_file = str(key_file)
        self.interval = float(interval)
        self.timeout = float(timeout)
        self.healthy_threshold = int(healthy_threshold)
        self.unhealthy_threshold = int(unhealthy_threshold)
        self.idle_timeout = float(idle_timeout)

        self._lock = threading.Lock()
        self._rules: tuple[_Rule, ...] = ()
        self._targets: dict[_TargetKey, _Target] = {}
        self._rr: dict[tuple[str, str, str], int] = {}
        self._tracked = _Tracked()
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._servers: list[_Listener] = []
        self._serve_threads: list[threading.Thread] = []
        self._checker: threading.Thread | None = None
        self._started = False
        self._stopped = False

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> LoadBalancer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        """Bind the listeners (port 0: a free one, see ``https_port``/``http_port``), start serving and checking."""
        if self._started:
            raise RuntimeError("LoadBalancer already started")
        self._started = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        context.set_alpn_protocols(["http/1.1"])
        try:
            https = _Listener(self, (self.host, self.https_port), "https", context)
            self._servers.append(https)
            self.https_port = https.server_address[1]
            if self.http_port is not None:
                plain = _Listener(self, (self.host, self.http_port), "http", None)
                self._servers.append(plain)
                self.http_port = plain.server_address[1]
            for server in self._servers:
                thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                          name=f"alb-{server.scheme}-accept", daemon=True)
                self._serve_threads.append(thread)
                thread.start()
            self._checker = threading.Thread(target=self._check_loop, name="alb-health-checker", daemon=True)
            self._checker.start()
        except BaseException:
            self.stop()
            raise
        log.info("ALB listening: https://%s:%s%s", self.host, self.https_port,
                 f", http://{self.host}:{self.http_port}" if self.http_port is not None else "")

    def stop(self) -> None:
        """Close the listeners and every connection, join all threads. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._stopping.set()
        self._wake.set()
        for server in self._servers[: len(self._serve_threads)]:
            server.shutdown()  # only those whose serve_forever thread was started
        for server in self._servers:
            server.server_close()
        for thread in self._serve_threads:
            thread.join()
        if self._checker is not None:
            self._checker.join()
        with self._lock:
            sockets = list(self._tracked.sockets)
        for sock in sockets:
            _shutdown(sock)
        deadline = time.monotonic() + max(5.0, self.timeout + 1.0)
        while True:
            with self._lock:
                threads = [t for t in self._tracked.threads if t.is_alive()]
            if not threads:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning("ALB stop: %d thread(s) still running: %s", len(threads), [t.name for t in threads])
                break
            threads[0].join(timeout=remaining)
            with self._lock:  # sockets opened meanwhile (connect in progress at stop)
                sockets = list(self._tracked.sockets)
            for sock in sockets:
                _shutdown(sock)
        self._servers.clear()
        self._serve_threads.clear()
        log.info("ALB stopped")

    # -- routing table -----------------------------------------------------

    def set_routes(self, routes: list[Route]) -> None:
        """Replace the routing table atomically; targets that stay keep their health state."""
        rules: list[_Rule] = []
        with self._lock:
            targets: dict[_TargetKey, _Target] = {}
            for route in routes:
                codes = parse_success_codes(route.success_codes)
                keys: list[_TargetKey] = []
                for ip, port in route.targets:
                    key: _TargetKey = (route.name, route.health_path, route.success_codes, ip, port)
                    if key not in keys:
                        keys.append(key)
                    if key not in targets:
                        targets[key] = self._targets.get(key) or _Target(key, codes)
                rules.append(_Rule(route, _path_prefix(route.path), tuple(keys), (route.name, route.host, route.path)))
            self._targets = targets
            self._rules = tuple(rules)
            self._rr = {rule.rr_key: self._rr.get(rule.rr_key, 0) for rule in rules}
        self._wake.set()

    def routes(self) -> list[Route]:
        """The current routing table."""
        return [rule.route for rule in self._rules]

    def target_health(self) -> dict[str, dict[str, str]]:
        """``{route.name: {"ip:port": "healthy" | "unhealthy" | "initial"}}``.

        Routes without targets are included (empty dict); routes sharing a
        name share one dict.
        """
        with self._lock:
            out: dict[str, dict[str, str]] = {}
            for rule in self._rules:
                states = out.setdefault(rule.route.name, {})
                for key in rule.keys:
                    target = self._targets[key]
                    states[target.address] = target.state
            return out

    def _match(self, host: str, path: str) -> _Rule | None:
        rules = self._rules  # one atomic read; set_routes swaps the tuple
        tiers = (
            [r for r in rules if r.route.host and not r.route.host.startswith("*") and r.route.host == host],
            [r for r in rules if r.route.host.startswith("*") and host.endswith(r.route.host[1:])],
            [r for r in rules if not r.route.host],
        )
        for tier in tiers:
            best: _Rule | None = None
            for rule in tier:
                if _prefix_matches(rule.prefix, path) and (best is None or len(rule.prefix) > len(best.prefix)):
                    best = rule
            if best is not None:
                return best
        return None

    def _pick(self, rule: _Rule) -> tuple[str, int] | None:
        with self._lock:
            keys = [key for key in rule.keys if key in self._targets]
            if not keys:
                return None
            pool = [key for key in keys if self._targets[key].state == HEALTHY] or keys  # fail open
            turn = self._rr.get(rule.rr_key, 0)
            self._rr[rule.rr_key] = turn + 1
            key = pool[turn % len(pool)]
            return key[3], key[4]

    # -- health checks -----------------------------------------------------

    def _check_loop(self) -> None:
        while not self._stopping.is_set():
            now = time.monotonic()
            wake_at = now + self.interval
            due: list[_Target] = []
            with self._lock:
                for target in self._targets.values():
                    if target.probing:
                        continue
                    if target.next_due <= now:
                        target.probing = True
                        target.next_due = now + self.interval
                        due.append(target)
                    else:
                        wake_at = min(wake_at, target.next_due)
            for target in due:
                thread = threading.Thread(target=self._probe, args=(target,),
                                          name=f"alb-probe-{target.address}", daemon=True)
                if not self._track_thread(thread):
                    return
                thread.start()
            self._wake.wait(max(0.005, wake_at - time.monotonic()))
            self._wake.clear()

    def _probe(self, target: _Target) -> None:
        _name, health_path, _codes, ip, port = target.key
        started = time.monotonic()
        ok, reason = False, ""
        sock: socket.socket | None = None
        try:
            sock = self._connect(ip, port, self.timeout)
            conn = http.client.HTTPConnection(ip, port, timeout=self.timeout)
            conn.sock = sock
            conn.putrequest("GET", health_path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")
            conn.putheader("User-Agent", HEALTH_USER_AGENT)
            conn.putheader("Connection", "close")
            conn.endheaders()
            response = conn.getresponse()
            response.read(_CHUNK)
            if time.monotonic() - started > self.timeout:
                reason = "Target.Timeout"
            elif status_matches(target.codes, response.status):
                ok = True
            else:
                reason = f"Target.ResponseCodeMismatch ({response.status})"
        except TimeoutError:
            reason = "Target.Timeout"
        except (OSError, http.client.HTTPException, ValueError) as exc:
            reason = f"Target.FailedHealthChecks ({type(exc).__name__})"
        finally:
            if sock is not None:
                self._close(sock)
            self._record(target, ok, reason)
            with self._lock:
                self._tracked.threads.discard(threading.current_thread())

    def _record(self, target: _Target, ok: bool, reason: str) -> None:
        with self._lock:
            target.probing = False
            if self._targets.get(target.key) is not target or self._stopping.is_set():
                return  # deregistered meanwhile
            before = target.state
            if ok:
                target.successes, target.failures = target.successes + 1, 0
                if target.state != HEALTHY and target.successes >= self.healthy_threshold:
                    target.state = HEALTHY
            else:
                target.failures, target.successes = target.failures + 1, 0
                if target.state != UNHEALTHY and target.failures >= self.unhealthy_threshold:
                    target.state = UNHEALTHY
            target.reason = reason
            after = target.state
        if before != after:
            log.info("target %s of %s: %s -> %s%s", target.address, target.key[0] or "-", before, after,
                     f" ({reason})" if reason else "")
        self._wake.set()  # its next probe may be due already

    # -- sockets and threads -----------------------------------------------

    def _track_thread(self, thread: threading.Thread) -> bool:
        with self._lock:
            if self._stopped:
                return False
            self._tracked.threads.add(thread)
            return True

    def _track_socket(self, sock: socket.socket) -> None:
        with self._lock:
            self._tracked.sockets.add(sock)

    def _forget(self, sock: socket.socket | None = None, thread: threading.Thread | None = None) -> None:
        with self._lock:
            if sock is not None:
                self._tracked.sockets.discard(sock)
            if thread is not None:
                self._tracked.threads.discard(thread)

    def _connect(self, ip: str, port: int, timeout: float) -> socket.socket:
        """A connected socket to a target, tracked so that stop() can break it."""
        if self._stopping.is_set():
            raise ConnectionAbortedError("load balancer stopping")
        sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
        self._track_socket(sock)
        try:
            sock.settimeout(timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.connect((ip, port))
        except BaseException:
            self._close(sock)
            raise
        return sock

    def _close(self, sock: socket.socket) -> None:
        self._forget(sock)
        try:
            sock.close()
        except OSError:
            pass


def _shutdown(sock: socket.socket) -> None:
    """Break a socket other threads block on (SSL sockets: the TCP socket beneath)."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


class _Listener(ThreadingHTTPServer):
    """One listener; a daemon thread per connection, tracked by the load balancer."""

    daemon_threads = True
    allow_reuse_address = True  # a restarted emulator gets its port back despite TIME_WAIT
    allow_reuse_port = False  # but two load balancers never share one
    request_queue_size = 128

    def __init__(self, lb: LoadBalancer, address: tuple[str, int], scheme: str, tls: ssl.SSLContext | None) -> None:
        self.lb = lb
        self.scheme = scheme
        super().__init__(address, _Handler)
        if tls is not None:  # the handshake happens in the connection's thread
            self.socket = tls.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def server_bind(self) -> None:
        TCPServer.server_bind(self)  # no getfqdn() lookup
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(target=self._connection, args=(request, client_address),
                                  name=f"alb-{self.scheme}-conn-{client_address[1]}", daemon=True)
        if not self.lb._track_thread(thread):
            self.shutdown_request(request)
            return
        self.lb._track_socket(request)
        thread.start()

    def _connection(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception as exc:  # handshake failures, clients going away
            log.debug("%s connection from %s: %s", self.scheme, client_address, exc)
        finally:
            self.shutdown_request(request)
            self.lb._forget(request, threading.current_thread())

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("%s connection from %s failed", self.scheme, client_address, exc_info=True)


class _BadRequest(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes
    server: _Listener

    def version_string(self) -> str:
        return SERVER

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (BaseHTTPRequestHandler API)
        log.debug("%s %s", self.client_address[0], format % args)

    def setup(self) -> None:
        self.timeout = self.server.lb.idle_timeout  # idle keep-alive connections close after it
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.settimeout(min(self.server.lb.idle_timeout, CONNECT_TIMEOUT))
            self.connection.do_handshake()
            self.connection.settimeout(self.timeout)

    def handle_one_request(self) -> None:
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.requestline = self.request_version = self.command = ""
                self.send_error(414)
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():
                return
            self._serve()
            self.wfile.flush()
        except (OSError, ssl.SSLError, http.client.HTTPException, ValueError) as exc:
            log.debug("connection from %s closed: %s", self.client_address[0], exc)
            self.close_connection = True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        code = int(code)
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # unparsable request line: answer with a status line anyway
            self.request_version = "HTTP/1.1"
        try:
            self._fixed(code, _html(code, _REASONS.get(code, message or "Error")), "text/html",
                        [("Connection", "close")])
        except OSError:
            pass

    # -- one request ---------------------------------------------------------

    def _serve(self) -> None:
        started = time.monotonic()
        lb = self.server.lb
        try:
            body = self._read_body()
        except _BadRequest:
            self.send_error(400)
            self._log(400, started, None)
            return
        target_uri = self.path
        if not target_uri.startswith("/"):  # absolute-form
            parts = urlsplit(target_uri)
            target_uri = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        path, _, query = target_uri.partition("?")
        host = _host_only(self.headers.get("Host", ""))
        rule = lb._match(host, path)
        if rule is None:
            self._fixed(404, b"", "text/plain; charset=utf-8")
            self._log(404, started, None)
            return
        if self.server.scheme == "http" and rule.route.ssl_redirect:
            location = redirect_location(host or lb.host, lb.https_port, path, query)
            self._fixed(301, _html(301, _REASONS[301]), "text/html", [("Location", location)])
            self._log(301, started, rule)
            return
        target = lb._pick(rule)
        if target is None:
            self._fixed(503, _html(503, _REASONS[503]), "text/html")
            self._log(503, started, rule)
            return
        status = self._proxy(target, target_uri, body)
        self._log(status, started, rule, target)

    def _read_body(self) -> bytes | None:
        encoding = ",".join(self.headers.get_all("Transfer-Encoding") or []).strip().lower()
        if encoding:
            if encoding != "chunked":
                raise _BadRequest(f"unsupported Transfer-Encoding {encoding!r}")
            self.close_connection = self.close_connection or "Content-Length" in self.headers
            return self._read_chunked()
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            return None
        if len(set(v.strip() for v in lengths)) != 1 or not lengths[0].strip().isdigit():
            raise _BadRequest("invalid Content-Length")
        length = int(lengths[0])
        body = self.rfile.read(length) if length else b""
        if len(body) != length:
            raise ConnectionResetError("client closed the connection mid-body")
        return body

    def _read_chunked(self) -> bytes:
        out = bytearray()
        while True:
            line = self.rfile.readline(65537)
            if not line:
                raise ConnectionResetError("client closed the connection mid-body")
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise _BadRequest("invalid chunk size") from None
            if size == 0:
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass  # trailers are dropped
                return bytes(out)
            chunk = self.rfile.read(size)
            if len(chunk) != size:
                raise ConnectionResetError("client closed the connection mid-body")
            out += chunk
            self.rfile.readline(65537)

    def _fixed(self, code: int, body: bytes, content_type: str,
               headers: Iterable[tuple[str, str]] = ()) -> None:
        """A response made by the load balancer itself (Server: awselb/2.0, Date)."""
        self.send_response(code, _REASONS.get(code))
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _upstream_headers(self, body: bytes | None) -> list[tuple[str, str]]:
        named = _connection_tokens(self.headers.get_all("Connection") or [])
        headers: list[tuple[str, str]] = []
        forwarded_for: list[str] = []
        has_trace = False
        for name, value in self.headers.items():
            low = name.lower()
            if _is_hop_by_hop(low, named) or low in _REPLACED:
                continue
            if low == "x-forwarded-for":
                forwarded_for.append(value.strip())
                continue
            has_trace = has_trace or low == "x-amzn-trace-id"
            headers.append((name, value))
        forwarded_for.append(self.client_address[0])
        headers.append(("X-Forwarded-For", ", ".join(v for v in forwarded_for if v)))
        headers.append(("X-Forwarded-Proto", self.server.scheme))
        headers.append(("X-Forwarded-Port", str(self.server.server_address[1])))
        if not has_trace:
            headers.append(("X-Amzn-Trace-Id", _trace_id()))
        if body is not None:
            headers.append(("Content-Length", str(len(body))))
        return headers

    def _proxy(self, target: tuple[str, int], target_uri: str, body: bytes | None) -> int:
        lb = self.server.lb
        ip, port = target
        sock: socket.socket | None = None
        try:
            try:
                sock = lb._connect(ip, port, min(CONNECT_TIMEOUT, lb.idle_timeout))
                sock.settimeout(lb.idle_timeout)
                conn = http.client.HTTPConnection(ip, port, timeout=lb.idle_timeout)
                conn.sock = sock
                conn.putrequest(self.command, target_uri, skip_host=True, skip_accept_encoding=True)
                for name, value in self._upstream_headers(body):
                    conn.putheader(name, value)
                conn.endheaders(body)
                response = conn.getresponse()
            except TimeoutError:
                self._fixed(504, _html(504, _REASONS[504]), "text/html")
                return 504
            except (OSError, http.client.HTTPException, ValueError) as exc:
                log.debug("target %s:%s: %s: %s", ip, port, type(exc).__name__, exc)
                self._fixed(502, _html(502, _REASONS[502]), "text/html")
                return 502
            self._relay(response)
            return response.status
        finally:
            if sock is not None:
                lb._close(sock)

    def _relay(self, response: http.client.HTTPResponse) -> None:
        status = response.status
        no_body = self.command == "HEAD" or status in (204, 304) or 100 <= status < 200
        named = _connection_tokens(response.msg.get_all("Connection") or [])
        self.send_response_only(status, response.reason)
        for name, value in response.getheaders():
            if _is_hop_by_hop(name, named) or name.lower() == "content-length":
                continue
            self.send_header(name, value)
        if no_body:
            length = response.getheader("Content-Length")
            if length is not None and status != 204 and status >= 200:
                self.send_header("Content-Length", length)
            self.end_headers()
            return
        if response.length is not None:  # the target gave a Content-Length
            self.send_header("Content-Length", str(response.length))
            self.end_headers()
            remaining = response.length
            while remaining > 0:
                chunk = response.read(min(_CHUNK, remaining))
                if not chunk:
                    raise http.client.IncompleteRead(b"", remaining)
                self.wfile.write(chunk)
                remaining -= len(chunk)
        elif self.request_version == "HTTP/1.1":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            while chunk := response.read1(_CHUNK):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
        else:  # HTTP/1.0 client: the end of the connection ends the body
            self.close_connection = True
            self.send_header("Connection", "close")
            self.end_headers()
            while chunk := response.read1(_CHUNK):
                self.wfile.write(chunk)

    def _log(self, status: int, started: float, rule: _Rule | None, target: tuple[str, int] | None = None) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        log.info('%s %s:%s %s "%s %s %s" %s %s %.1fms host=%s', self.server.scheme, self.client_address[0],
                 self.client_address[1], rule.route.name or "-" if rule else "-", self.command, self.path,
                 self.request_version, status, f"{target[0]}:{target[1]}" if target else "-",
                 (time.monotonic() - started) * 1000, self.headers.get("Host", "-"))
