"""Pod networks for the process kubelet: a bridge, one network namespace per pod.

Every name this module makes starts with the emulator's *prefix* (given by
the test that started it), so :func:`sweep` can remove whatever a killed
emulator left behind: processes inside the pod namespaces, the namespaces
(their veth ends go with them) and the bridge.

Layout for subnet ``10.X.Y.0/24``::

    host:  bridge <prefix>br  10.X.Y.1/24   (the pods' gateway; host ports are relayed here)
    pod:   netns  <prefix>-<n>  eth0 10.X.Y.<n>/24, lo, default route via .1
           veth   <prefix>h<n> (host end, on the bridge)

Host services the pods need (PostgreSQL as "RDS", moto as S3, the API
server) listen on 127.0.0.1; :class:`HostRelay` accepts on the gateway
address and relays to 127.0.0.1, so pods and the host reach them at the
same ``10.X.Y.1:PORT``.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from typing import Callable

__all__ = ["PodNetwork", "HostRelay", "ServiceProxy", "sweep", "unavailable_reason", "free_subnet"]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def unavailable_reason() -> str | None:
    """Why pods cannot run here (None when they can): root, ``ip``, ``unshare``."""
    if os.geteuid() != 0:
        return "running pods needs root (network and mount namespaces); CI runs as root"
    for tool in ("ip", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"running pods needs the `{tool}` command (iproute2/util-linux)"
    return None


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 under 10.240.0.0/12 that no interface here uses."""
    used = _ip("-4", "-o", "addr", "show").stdout
    routes = _ip("-4", "route", "show").stdout
    seed = (os.getpid() * 7919 + int(time.time() * 1000)) % 4096
    for i in range(4096):
        n = (seed + i) % 4096
        net = ipaddress.IPv4Network(f"10.{240 + n // 256}.{n % 256}.0/24")
        prefix = str(net.network_address).rsplit(".", 1)[0] + "."
        if prefix not in used and prefix not in routes:
            return net
    raise RuntimeError("no free 10.240.0.0/12 subnet")


def sweep(prefix: str) -> list[str]:
    """Kill the processes in, and remove, every namespace and link named with ``prefix``."""
    removed: list[str] = []
    listing = _ip("netns", "list", check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(prefix):
            continue
        kill_namespace_processes(name)
        _ip("netns", "delete", name, check=False)
        removed.append(f"netns {name}")
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":")
        if len(parts) < 2:
            continue
        link = parts[1].strip().split("@")[0]
        if link.startswith(prefix):
            _ip("link", "delete", link, check=False)
            removed.append(f"link {link}")
    return removed


def namespace_pids(name: str) -> list[int]:
    out = _ip("netns", "pids", name, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def kill_namespace_processes(name: str, sig: int = signal.SIGKILL, wait: float = 5.0) -> None:
    deadline = time.monotonic() + wait
    while True:
        pids = namespace_pids(name)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)


class PodNetwork:
    """The bridge and the pod namespaces of one emulator."""

    def __init__(self, prefix: str, subnet: str) -> None:
        if len(prefix) > 8:
            raise ValueError("prefix must be at most 8 characters (Linux names are 15)")
        self.prefix = prefix
        self.subnet = ipaddress.IPv4Network(subnet)
        hosts = list(self.subnet.hosts())
        self.gateway = str(hosts[0])
        self._free = [str(h) for h in hosts[1:]]
        self._lock = threading.Lock()
        self.bridge = f"{prefix}br"
        self._pods: dict[str, str] = {}  # netns -> ip

    def start(self) -> None:
        sweep(self.prefix)
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def add_pod(self) -> tuple[str, str]:
        """A new namespace with its address: (netns name, pod IP)."""
        with self._lock:
            if not self._free:
                raise RuntimeError("pod subnet exhausted")
            ip = self._free.pop(0)
        n = ip.rsplit(".", 1)[1]
        netns, host_end = f"{self.prefix}-{n}", f"{self.prefix}h{n}"
        _ip("netns", "delete", netns, check=False)
        _ip("link", "delete", host_end, check=False)
        _ip("netns", "add", netns)
        _ip("link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _ip("link", "set", host_end, "master", self.bridge, "up")
        _ip("-n", netns, "addr", "add", f"{ip}/{self.subnet.prefixlen}", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        _ip("-n", netns, "route", "add", "default", "via", self.gateway)
        with self._lock:
            self._pods[netns] = ip
        return netns, ip

    def remove_pod(self, netns: str) -> None:
        kill_namespace_processes(netns)
        _ip("netns", "delete", netns, check=False)
        with self._lock:
            ip = self._pods.pop(netns, None)
            if ip is not None:
                self._free.append(ip)

    def stop(self) -> None:
        for netns in list(self._pods):
            self.remove_pod(netns)
        sweep(self.prefix)


class HostRelay:
    """Accept on ``gateway:port`` and relay to ``127.0.0.1:port``, for each port (TCP; UDP for ``udp_ports``)."""

    def __init__(self, gateway: str, ports: list[int], udp_ports: list[int] | None = None) -> None:
        self.gateway = gateway
        self.ports = ports
        self.udp_ports = list(udp_ports or [])
        self._servers: list[socket.socket] = []
        self._stop = threading.Event()

    def start(self) -> None:
        for port in self.udp_ports:
            server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            server.bind((self.gateway, port))
            server.settimeout(0.5)
            self._servers.append(server)
            threading.Thread(target=self._datagrams, args=(server, port), name=f"relay-udp-{port}", daemon=True).start()
        for port in self.ports:
            server = _listener(self.gateway, port)
            self._servers.append(server)
            threading.Thread(target=_relay, args=(server, self._stop, functools.partial(tuple, ("127.0.0.1", port))),
                             name=f"relay-{port}", daemon=True).start()

    def _datagrams(self, server: socket.socket, port: int) -> None:
        """One upstream socket per query: the answer goes back to whoever asked."""
        while not self._stop.is_set():
            try:
                data, client = server.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._answer, args=(server, client, data, port), daemon=True).start()

    @staticmethod
    def _answer(server: socket.socket, client: tuple[str, int], data: bytes, port: int) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as upstream:
            upstream.settimeout(5)
            try:
                upstream.sendto(data, ("127.0.0.1", port))
                answer, _ = upstream.recvfrom(65535)
                server.sendto(answer, client)
            except OSError:
                pass

    def stop(self) -> None:
        self._stop.set()
        for server in self._servers:
            server.close()
        self._servers.clear()


class _Pair:
    """Two relayed sockets, closed when both directions are done."""

    def __init__(self, a: socket.socket, b: socket.socket) -> None:
        self._sockets = (a, b)
        self._open = 2
        self._lock = threading.Lock()

    def pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        with self._lock:
            self._open -= 1
            last = self._open == 0
        if last:
            for s in self._sockets:
                s.close()


class ServiceProxy:
    """ClusterIP Services for pods: an address per Service on the bridge, relayed to its Ready endpoints.

    Each Service gets ``subnet .200+`` (added to the bridge as a /32), and for
    each port a TCP listener there that connects every accepted connection to
    the next Ready endpoint (round-robin), as kube-proxy does. Pods find the
    address by name in their ``/etc/hosts``.
    """

    def __init__(self, network: PodNetwork) -> None:
        self.network = network
        base = network.subnet.network_address
        self._pool = [str(base + n) for n in range(200, 251)]
        self._lock = threading.Lock()
        self.addresses: dict[tuple[str, str], str] = {}  # (ns, name) -> ip
        self._listeners: dict[tuple[str, str, int], socket.socket] = {}
        self._targets: dict[tuple[str, str, int], list[tuple[str, int]]] = {}
        self._next: dict[tuple[str, str, int], int] = {}
        self._stop = threading.Event()

    def update(self, services: dict[tuple[str, str], dict[int, list[tuple[str, int]]]]) -> bool:
        """services: (ns, name) → {service port: [(pod ip, target port)]}; True when names changed."""
        changed = False
        with self._lock:
            for key in [k for k in self.addresses if k not in services]:
                ip = self.addresses.pop(key)
                for lk in [lk for lk in self._listeners if lk[:2] == key]:
                    self._listeners.pop(lk).close()
                    self._targets.pop(lk, None)
                _ip("addr", "del", f"{ip}/32", "dev", self.network.bridge, check=False)
                self._pool.append(ip)
                changed = True
            for key, ports in services.items():
                if key not in self.addresses:
                    if not self._pool:
                        continue
                    ip = self._pool.pop(0)
                    _ip("addr", "add", f"{ip}/32", "dev", self.network.bridge, check=False)
                    self.addresses[key] = ip
                    changed = True
                ip = self.addresses[key]
                for port, targets in ports.items():
                    lk = (key[0], key[1], port)
                    self._targets[lk] = list(targets)
                    if lk not in self._listeners:
                        server = _listener(ip, port)
                        self._listeners[lk] = server
                        threading.Thread(target=_relay, args=(server, self._stop, lambda lk=lk: self._pick(lk)),
                                         daemon=True).start()
        return changed

    def snapshot(self) -> dict[tuple[str, str], str]:
        with self._lock:
            return dict(self.addresses)

    def _pick(self, lk: tuple[str, str, int]) -> tuple[str, int] | None:
        with self._lock:
            targets = self._targets.get(lk) or []
            if not targets:
                return None
            n = self._next.get(lk, 0)
            self._next[lk] = n + 1
            return targets[n % len(targets)]

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            for server in self._listeners.values():
                server.close()
            self._listeners.clear()


def _listener(ip: str, port: int) -> socket.socket:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((ip, port))
    server.listen(64)
    server.settimeout(0.5)
    return server


def _relay(server: socket.socket, stop: threading.Event, target: Callable[[], tuple[str, int] | None]) -> None:
    """Accept on ``server`` until ``stop``; pipe each connection to ``target()`` (None or unreachable: closed,
    as kube-proxy resets a connection to a Service without endpoints)."""
    while not stop.is_set():
        try:
            client, _ = server.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        address = target()
        try:
            if address is None:
                raise OSError("no target")
            upstream = socket.create_connection(address, timeout=5)
        except OSError:
            client.close()
            continue
        client.settimeout(None)
        upstream.settimeout(None)
        pair = _Pair(client, upstream)
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=pair.pipe, args=(a, b), daemon=True).start()
