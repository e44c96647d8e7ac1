"""``pods/portforward`` over WebSocket, as kube-apiserver and the kubelet serve it to the Python client.

``kubernetes.stream.portforward(core.connect_get_namespaced_pod_portforward,
name, ns, ports="5000")`` sends ``GET .../pods/{name}/portforward?ports=5000``
with ``Upgrade: websocket`` and offers ``v5.channel.k8s.io,v4.channel.k8s.io``.
api.py authorizes it and finds the pod (:class:`PortForwardRequest`); this
module does the rest, the part a real cluster's kubelet does behind the
apiserver's upgrade-aware proxy:

- the handshake of golang.org/x/net/websocket (RFC 6455): ``GET`` only (405),
  ``Sec-WebSocket-Key`` and version 13 (400), the first offered subprotocol
  among ``v4.channel.k8s.io`` (binary), ``v4.base64.channel.k8s.io`` (text
  frames: channel digit + base64) and none (binary); no match is 403;
- the port-forward protocol (kubelet ``portforward/websocket.go``): port i has
  data channel 2i and error channel 2i+1; the first frame on each is the port,
  2 bytes little-endian; then each frame is the channel byte + payload. Each
  port is one TCP connection to the pod, opened at once; a refused connect is
  the kubelet's message on the error channel. When every port is done (the pod
  closed its end, or the connect failed) the server closes the WebSocket; when
  the client closes it, the pod connections are closed;
- frames: masked client frames (unmasked is 1002), fragmentation, ping/pong,
  close (echoed), 32 MiB per message at most (1009, as x/net/websocket).

One thread per session, non-blocking sockets and ``select``, so a full TLS
buffer in one direction never stalls the other. The pod is dialled at its pod
IP from the emulator's network namespace (the kubelet dials ``localhost``
inside the pod's: a server bound to 127.0.0.1 in a pod is not reached here).
A close is a handshake: the server's Close goes after the last data frame and
the TCP connection ends once the client answered (or after
:data:`CLOSE_TIMEOUT`), so the Python client, which stops reading when it
gets a Close, has every byte before it sees the end.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import select
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from .errors import bad_request

__all__ = ["PortForwardRequest", "parse_ports", "wants_upgrade", "serve"]

BINARY, BASE64 = "v4.channel.k8s.io", "v4.base64.channel.k8s.io"
#: Subprotocols the kubelet's port-forward accepts; True = base64 text frames.
PROTOCOLS = {"": False, BINARY: False, BASE64: True}
_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_CONT, _TEXT, _BIN, _CLOSE, _PING, _PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
MAX_MESSAGE = 32 << 20  # x/net/websocket DefaultMaxPayloadBytes
CONNECT_TIMEOUT = 5.0
CLOSE_TIMEOUT = 5.0  # for the client's answer to our Close
_HIGH_WATER = 1 << 20  # stop reading a side while this much waits for the other
_CHUNK = 64 << 10


@dataclass
class PortForwardRequest:
    """An authorized port-forward to a pod whose sandbox runs: what the session needs."""

    namespace: str
    pod: str
    uid: str
    ports: list[int]
    #: The pod's IP (process kubelet); None for a painted pod, which runs nothing.
    ip: str | None


def parse_ports(raw_query: str) -> list[int]:
    """``ports`` query values, each comma-separated (``Convert_Slice_string_To_Slice_int32``)."""
    ports: list[int] = []
    for value in parse_qs(raw_query, keep_blank_values=True).get("ports", []):
        for part in value.split(","):
            try:
                port = int(part, 10)
                if not 0 <= port <= 65535:
                    raise ValueError
            except ValueError:
                raise bad_request(f'cannot convert to []int32: strconv.ParseUint: parsing "{part}": invalid syntax') from None
            ports.append(port)
    return ports


def wants_upgrade(headers: dict[str, str]) -> bool:
    """``Connection: Upgrade`` + ``Upgrade: websocket`` (wsstream.IsWebSocketRequest)."""
    connection = [t.strip().lower() for t in headers.get("connection", "").split(",")]
    return "upgrade" in connection and headers.get("upgrade", "").strip().lower() == "websocket"


def _handshake(method: str, headers: dict[str, str]) -> tuple[int, str, str]:
    """(status, detail, protocol): 101 with the chosen subprotocol, or the error x/net/websocket answers."""
    if method != "GET":
        return 405, "bad method", ""
    key = headers.get("sec-websocket-key", "").strip()
    if not key:
        return 400, "mismatch challenge/response", ""
    if headers.get("sec-websocket-version", "").strip() != "13":
        return 400, "missing or bad WebSocket Version", ""
    offered = [p.strip() for p in headers.get("sec-websocket-protocol", "").split(",") if p.strip()] or [""]
    for protocol in offered:
        if protocol in PROTOCOLS:
            accept = base64.b64encode(hashlib.sha1((key + _GUID).encode()).digest()).decode()
            return 101, accept, protocol
    return 403, "", ""


def serve(handler: Any, req: Any, pf: PortForwardRequest, started: float) -> None:
    """Answer the upgrade on ``handler``'s connection, record it, and run the session to its end."""
    status, detail, protocol = _handshake(handler.command, req.headers)
    handler.server.api.record(req, status)
    handler._log(req, status, started)
    handler.close_connection = True
    if status != 101:
        handler.send_response(status)
        if status == 400 and "Version" in detail:
            handler.send_header("Sec-WebSocket-Version", "13")
        handler.send_header("Content-Length", "0")
        handler.send_header("Connection", "close")  # the kubelet writes the answer and drops the connection
        handler.end_headers()
        return
    handler.send_response(101, "Switching Protocols")
    handler.send_header("Upgrade", "websocket")
    handler.send_header("Connection", "Upgrade")
    handler.send_header("Sec-WebSocket-Accept", detail)
    if protocol:
        handler.send_header("Sec-WebSocket-Protocol", protocol)
    handler.end_headers()
    handler.wfile.flush()
    session = Session(handler.connection, pf, base64_codec=PROTOCOLS[protocol], stopping=handler.server.stopping)
    try:
        session.run()
    finally:
        print(f"{time.strftime('%H:%M:%S')} portforward {pf.namespace}/{pf.pod} ports {pf.ports} ended: "
              f"{session.to_pod} bytes to the pod, {session.from_pod} from it", flush=True)


@dataclass
class _Port:
    index: int
    number: int
    sock: socket.socket | None = None
    to_pod: bytearray = field(default_factory=bytearray)
    done: bool = False  # the pod closed its end, or the connect failed


def _frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return head + payload


def _unmask(data: bytes, mask: bytes) -> bytes:
    n = len(data)
    if not n:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def _reason(exc: OSError) -> str:
    """Go's wording of a dial error."""
    if isinstance(exc, TimeoutError):
        return "i/o timeout"
    return os.strerror(exc.errno).lower() if exc.errno else str(exc)


class Session:
    """One WebSocket connection: its ports' pod connections, until either side ends."""

    def __init__(self, ws: socket.socket, pf: PortForwardRequest, *, base64_codec: bool, stopping: threading.Event) -> None:
        self.ws = ws
        self.pf = pf
        self.base64 = base64_codec
        self.stopping = stopping
        self.ports = [_Port(i, n) for i, n in enumerate(pf.ports)]
        self.inbuf = bytearray()
        self.out = bytearray()  # encoded frames for the client
        self.message: bytearray | None = None  # a fragmented message being assembled
        self.ws_eof = False
        self.close_sent = False
        self.close_received = False
        self.close_deadline = 0.0
        self.abort = False  # protocol error: close without waiting for the client
        self.to_pod = 0
        self.from_pod = 0

    # -- frames out

    def _send(self, opcode: int, payload: bytes) -> None:
        if not self.close_sent:
            self.out += _frame(opcode, payload)

    def _send_channel(self, channel: int, data: bytes) -> None:
        if self.base64:
            self._send(_TEXT, bytes([ord("0") + channel]) + base64.b64encode(data))
        else:
            self._send(_BIN, bytes([channel]) + data)

    def _close(self, code: int, reason: str = "") -> None:
        if not self.close_sent:
            self.out += _frame(_CLOSE, struct.pack("!H", code) + reason.encode()[:120])
            self.close_sent = True
            self.close_deadline = time.monotonic() + CLOSE_TIMEOUT

    # -- the pod side

    def _connect(self, port: _Port) -> None:
        prefix = f"error forwarding port {port.number} to pod {self.pf.uid}, uid : "
        if self.pf.ip is None:
            message = (f"kube-emulator: pod {self.pf.namespace}/{self.pf.pod} is painted (the default kubelet runs "
                       f"no processes): nothing listens on port {port.number}; run pods with "
                       f"kube_emulator(pods=PodRuntime(...))")
        else:
            try:
                sock = socket.create_connection((self.pf.ip, port.number), timeout=CONNECT_TIMEOUT)
            except OSError as exc:
                message = (f'failed to connect to localhost:{port.number} inside namespace "{self.pf.uid}": '
                           f"dial tcp4 {self.pf.ip}:{port.number}: connect: {_reason(exc)}")
            else:
                sock.setblocking(False)
                port.sock = sock
                return
        self._send_channel(2 * port.index + 1, (prefix + message).encode())
        port.done = True

    def _pod_gone(self, port: _Port) -> None:
        port.done = True
        port.to_pod.clear()
        if port.sock is not None:
            _close_socket(port.sock)
            port.sock = None

    # -- the loop

    def run(self) -> None:
        try:
            self.ws.settimeout(CONNECT_TIMEOUT)
            for port in self.ports:  # the kubelet writes the port on both channels first
                number = struct.pack("<H", port.number)
                self._send_channel(2 * port.index, number)
                self._send_channel(2 * port.index + 1, number)
            self.ws.sendall(bytes(self.out))
            self.out.clear()
            for port in self.ports:
                self._connect(port)
            self.ws.setblocking(False)
            self._loop()
        except (OSError, ValueError):
            pass  # the client went away
        finally:
            for port in self.ports:
                self._pod_gone(port)
            try:
                self.ws.settimeout(2.0)
            except OSError:
                pass

    def _loop(self) -> None:
        while True:
            now = time.monotonic()
            if self.stopping.is_set() and not self.close_sent:
                self._close(1001, "emulator stopping")
                self.abort = True
            if not self.close_sent and all(p.done for p in self.ports):
                self._close(1000)  # every forward ended: the kubelet closes the connection
            if self.ws_eof:
                return
            if self.close_sent and (now >= self.close_deadline or not self.out and (self.close_received or self.abort)):
                return  # the close handshake is over (RFC 6455 7.1.1: the server closes the TCP connection)
            rlist: list[Any] = []
            wlist: list[Any] = []
            if all(len(p.to_pod) < _HIGH_WATER for p in self.ports):
                rlist.append(self.ws)
            if self.out:
                wlist.append(self.ws)
            for p in self.ports:
                if p.sock is None:
                    continue
                if not self.close_sent and len(self.out) < _HIGH_WATER:
                    rlist.append(p.sock)
                if p.to_pod:
                    wlist.append(p.sock)
            deadline = min(x for x in (self.close_deadline, now + 0.5) if x) - now
            select.select(rlist, wlist, [], max(0.0, deadline))
            if self.ws in rlist:
                self._read_ws()
            for p in self.ports:
                self._write_pod(p)
            for p in self.ports:
                if p.sock is not None and p.sock in rlist:
                    self._read_pod(p)
            self._write_ws()

    def _read_ws(self) -> None:
        while len(self.inbuf) < MAX_MESSAGE + 16:
            try:
                chunk = self.ws.recv(_CHUNK)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError):
                break
            except OSError:
                self.ws_eof = True
                break
            if not chunk:
                self.ws_eof = True
                break
            self.inbuf += chunk
        self._parse()

    def _write_ws(self) -> None:
        while self.out:
            try:
                n = self.ws.send(self.out[:_CHUNK])  # a retry always starts with the same bytes, as TLS needs
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError):
                return
            except OSError:
                self.ws_eof = True
                self.out.clear()
                return
            del self.out[:n]

    def _read_pod(self, port: _Port) -> None:
        assert port.sock is not None
        try:
            data = port.sock.recv(32 << 10)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._pod_gone(port)
            return
        self.from_pod += len(data)
        self._send_channel(2 * port.index, data)

    def _write_pod(self, port: _Port) -> None:
        if port.sock is None or not port.to_pod:
            return
        try:
            n = port.sock.send(port.to_pod)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._pod_gone(port)
            return
        self.to_pod += n
        del port.to_pod[:n]

    # -- frames in

    def _protocol_error(self, code: int, reason: str) -> None:
        self._close(code, reason)
        self.abort = True
        self.inbuf.clear()

    def _parse(self) -> None:
        while len(self.inbuf) >= 2 and not self.abort:
            b0, b1 = self.inbuf[0], self.inbuf[1]
            fin, opcode, length, pos = b0 & 0x80, b0 & 0x0F, b1 & 0x7F, 2
            if length == 126:
                if len(self.inbuf) < 4:
                    return
                length, pos = struct.unpack_from("!H", self.inbuf, 2)[0], 4
            elif length == 127:
                if len(self.inbuf) < 10:
                    return
                length, pos = struct.unpack_from("!Q", self.inbuf, 2)[0], 10
            if b0 & 0x70 or not b1 & 0x80:
                self._protocol_error(1002, "reserved bits set" if b0 & 0x70 else "client frames must be masked")
                return
            if length > MAX_MESSAGE:
                self._protocol_error(1009, "message too big")
                return
            if len(self.inbuf) < pos + 4 + length:
                return
            payload = _unmask(bytes(self.inbuf[pos + 4:pos + 4 + length]), bytes(self.inbuf[pos:pos + 4]))
            del self.inbuf[:pos + 4 + length]
            self._frame_in(bool(fin), opcode, payload)

    def _frame_in(self, fin: bool, opcode: int, payload: bytes) -> None:
        if self.close_received:
            return
        if opcode >= 0x8:
            if not fin or len(payload) > 125:
                self._protocol_error(1002, "bad control frame")
            elif opcode == _CLOSE:
                self.close_received = True
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1000
                self._close(code if code in (1000, 1001) else 1000)  # echoed, after what is queued
            elif opcode == _PING:
                self._send(_PONG, payload)
            elif opcode != _PONG:
                self._protocol_error(1002, f"unknown opcode {opcode}")
            return
        if opcode == _CONT:
            if self.message is None:
                self._protocol_error(1002, "continuation without a message")
                return
            self.message += payload
        elif opcode in (_TEXT, _BIN):
            if self.message is not None:
                self._protocol_error(1002, "new message inside a fragmented one")
                return
            self.message = bytearray(payload)
        else:
            self._protocol_error(1002, f"unknown opcode {opcode}")
            return
        if len(self.message) > MAX_MESSAGE:
            self._protocol_error(1009, "message too big")
            return
        if fin:
            message, self.message = bytes(self.message), None
            self._deliver(message)

    def _deliver(self, message: bytes) -> None:
        """A whole message from the client: channel byte (or digit) + data, to that port's pod connection."""
        if self.close_sent or not message:
            return
        channel = message[0] - (ord("0") if self.base64 else 0)
        data = message[1:]
        if self.base64:
            try:
                data = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                return  # wsstream drops a frame it cannot decode
        if channel % 2 or not 0 <= channel < 2 * len(self.ports):
            return  # the error channels are write-only; unknown channels are dropped (wsstream)
        port = self.ports[channel // 2]
        if port.sock is not None and not port.done:
            port.to_pod += data


def _close_socket(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # the pod already reset it
    sock.close()
