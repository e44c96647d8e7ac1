"""A small DNS server for tests: Route53 in moto, answered over real DNS.

A :mod:`dnslib` server on a free loopback port (UDP and TCP on the same port)
that answers like a recursive resolver would for our names:

* the record sets of **every hosted zone in moto**, read with boto3
  (``list_resource_record_sets``) on each query, so an UPSERT shows up at
  once;
* plus ``static`` records, a dict the test may change at any time, e.g. the
  load balancer's name: ``{"k8s-…elb.amazonaws.com": {"A": ["127.0.0.1"]}}``;
* CNAME chains are followed within that data (the answer carries the chain
  and the final records, as from a recursive resolver);
* an alias A record answers with the A records of its target;
* anything else is NXDOMAIN (NOERROR with no answer when the name exists with
  other types).

Use it as a context manager::

    with dns_server(moto.endpoint_url) as dns:
        dns.static["lb.example"] = {"A": ["127.0.0.1"]}
        wait_resolves("mlflow.example.com", "lb.example", resolvers=[dns.address], timeout=3)
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Iterator

from dnslib import AAAA, CNAME, QTYPE, RCODE, RR, TXT, A, DNSRecord
from dnslib.server import DNSLogger, DNSServer

__all__ = ["Records", "TestDnsServer", "dns_server"]

#: name → type → values (names lower case, no trailing dot).
Records = dict[str, dict[str, list[str]]]

_SUPPORTED = {"A": A, "AAAA": AAAA, "CNAME": CNAME, "TXT": TXT}
_MAX_CHAIN = 16


def _norm(name: str) -> str:
    return str(name).strip().rstrip(".").lower().replace("\\052", "*")


class _Route53Resolver:
    """dnslib resolver over moto's Route53 plus the static records."""

    def __init__(self, endpoint_url: str | None, region: str, static: Records) -> None:
        import boto3

        self._route53 = (
            boto3.client("route53", region_name=region, endpoint_url=endpoint_url) if endpoint_url else None
        )
        self.static = static
        self.queries: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    # -- data ---------------------------------------------------------------

    def _snapshot(self) -> tuple[Records, dict[str, str]]:
        """(records, aliases) now: moto's zones first, static records on top."""
        records: Records = {}
        aliases: dict[str, str] = {}  # name → alias target (A records)
        if self._route53 is not None:
            for page in self._route53.get_paginator("list_hosted_zones").paginate():
                for zone in page["HostedZones"]:
                    pages = self._route53.get_paginator("list_resource_record_sets").paginate(HostedZoneId=zone["Id"])
                    for rs_page in pages:
                        for rs in rs_page["ResourceRecordSets"]:
                            name, rtype = _norm(rs["Name"]), rs["Type"]
                            if "AliasTarget" in rs and rtype == "A":
                                aliases[name] = _norm(rs["AliasTarget"]["DNSName"])
                            elif rtype in _SUPPORTED:
                                values = [rr["Value"] for rr in rs.get("ResourceRecords", [])]
                                records.setdefault(name, {}).setdefault(rtype, []).extend(values)
        for name, types in list(self.static.items()):
            entry = records.setdefault(_norm(name), {})
            for rtype, values in types.items():
                entry[rtype.upper()] = list(values)
        return records, aliases

    @staticmethod
    def _rdata(rtype: str, value: str):
        if rtype == "TXT":
            return TXT(value.strip('"'))
        if rtype == "CNAME":
            return CNAME(_norm(value) + ".")
        return _SUPPORTED[rtype](value)

    # -- dnslib interface ----------------------------------------------------

    def resolve(self, request: DNSRecord, handler) -> DNSRecord:
        reply = request.reply()
        qname = _norm(str(request.q.qname))
        qtype = QTYPE[request.q.qtype]
        with self._lock:
            self.queries.append((qname, qtype))
        try:
            records, aliases = self._snapshot()
        except Exception:  # moto down or misconfigured: tell the client, keep serving
            reply.header.rcode = RCODE.SERVFAIL
            return reply

        def exists(name: str) -> bool:
            return name in records or name in aliases

        current = qname
        for _ in range(_MAX_CHAIN):
            entry = records.get(current, {})
            if qtype in entry:
                for value in entry[qtype]:
                    reply.add_answer(RR(current + ".", QTYPE.reverse[qtype], rdata=self._rdata(qtype, value), ttl=5))
                return reply
            if qtype == "A" and current in aliases:
                # Alias: the target's A records under this name (following the target's CNAMEs).
                target = aliases[current]
                for _ in range(_MAX_CHAIN):
                    t_entry = records.get(target, {})
                    if "A" in t_entry:
                        for value in t_entry["A"]:
                            reply.add_answer(RR(current + ".", QTYPE.A, rdata=A(value), ttl=5))
                        break
                    if "CNAME" in t_entry:
                        target = _norm(t_entry["CNAME"][0])
                        continue
                    break
                return reply
            if "CNAME" in entry and qtype != "CNAME":
                target = _norm(entry["CNAME"][0])
                reply.add_answer(RR(current + ".", QTYPE.CNAME, rdata=CNAME(target + "."), ttl=5))
                current = target
                continue
            break
        if not exists(current):
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


@dataclass
class TestDnsServer:
    """A running server: ``address`` (``127.0.0.1:PORT``) for ``resolvers``, ``static`` to change."""

    __test__ = False  # not a pytest test class

    host: str
    port: int
    static: Records
    _resolver: _Route53Resolver = field(repr=False)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def queries(self) -> list[tuple[str, str]]:
        """(name, type) of every query received so far."""
        return list(self._resolver.queries)

    def set(self, name: str, rtype: str, *values: str) -> None:
        """Set (or with no values, remove) a static record set."""
        key, rtype = _norm(name), rtype.upper()
        if values:
            self.static.setdefault(key, {})[rtype] = list(values)
        else:
            self.static.get(key, {}).pop(rtype, None)
            if key in self.static and not self.static[key]:
                del self.static[key]


class _QuietLogger(DNSLogger):
    def __init__(self) -> None:
        super().__init__(log="-request,-reply,-truncated,-data,-recv,-send", logf=lambda _msg: None)


@contextlib.contextmanager
def dns_server(
    endpoint_url: str | None,
    *,
    region: str = "us-west-2",
    static: Records | None = None,
    host: str = "127.0.0.1",
    tcp: bool = True,
    attempts: int = 5,
) -> Iterator[TestDnsServer]:
    """Serve Route53 from moto at ``endpoint_url`` (None: static records only) on a free port."""
    static_records: Records = {_norm(k): dict(v) for k, v in (static or {}).items()}
    resolver = _Route53Resolver(endpoint_url, region, static_records)
    servers: list[DNSServer] = []
    port = 0
    for _ in range(attempts):
        udp = DNSServer(resolver, address=host, port=0, logger=_QuietLogger())
        port = udp.server.server_address[1]
        servers = [udp]
        if tcp:
            try:
                servers.append(DNSServer(resolver, address=host, port=port, tcp=True, logger=_QuietLogger()))
            except OSError:  # the TCP port of that number is taken: try another
                udp.server.server_close()
                servers = []
                continue
        break
    if not servers:
        raise RuntimeError(f"no free loopback port for a UDP+TCP DNS server after {attempts} attempts")
    threads = [
        # A short poll interval: ``shutdown()`` waits for it, twice per test otherwise.
        threading.Thread(target=s.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        for s in servers
    ]
    for thread in threads:
        thread.start()
    try:
        yield TestDnsServer(host=host, port=port, static=static_records, _resolver=resolver)
    finally:
        for server in servers:
            server.server.shutdown()
            server.server.server_close()
        for thread in threads:
            thread.join(timeout=5)
