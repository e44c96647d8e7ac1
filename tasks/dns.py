"""DNS lookups with dnspython: wait until the public name reaches the load balancer.

Resolvers are given as ``ip`` or ``ip:port`` (``[v6]:port`` for IPv6); an
empty list means the system's resolver (``/etc/resolv.conf``). Names are
compared case-insensitively without the trailing dot.

``wait_resolves`` succeeds when either

* the CNAME chain of the name reaches the expected target (the ``cname``
  record kind), or
* the A records of the name equal the A records of the expected target (an
  alias A record, which hides the target's name).

Errors: a malformed resolver spec is :class:`BadInputError`; a name that does
not resolve as expected within the timeout is :class:`TransientError` naming
the name, the expected target and what the name last resolved to (the flow
may retry the stage; DNS propagation is slow, not wrong). Single lookups
follow the table in :mod:`mlflow_rollout.error_policy`: a resolver timeout or
SERVFAIL (``NoNameservers``) is transient, NXDOMAIN and "no answer" are
answers (:func:`resolve_once` returns ``[]``), a malformed name is bad input.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field

import dns.exception
import dns.name
import dns.nameserver
import dns.resolver
from tenacity import RetryError, Retrying, retry_if_exception_type

from mlflow_rollout.error_policy import dns_error, dns_rule
from mlflow_rollout.errors import BadInputError, TransientError

__all__ = ["parse_resolver", "make_resolver", "resolve_once", "wait_resolves"]

#: Longest CNAME chain we follow (a loop or a misconfiguration beyond that).
_MAX_CHAIN = 16


def _norm(name: str) -> str:
    return name.strip().rstrip(".").lower()


def parse_resolver(spec: str) -> dns.nameserver.Do53Nameserver:
    """``ip``, ``ip:port`` or ``[ipv6]:port`` → a dnspython nameserver (UDP, TCP on truncation)."""
    text = spec.strip()
    host, port = text, 53
    try:
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            if rest:
                if not rest.startswith(":"):
                    raise ValueError(spec)
                port = int(rest[1:])
        elif text.count(":") == 1:
            host, port_text = text.split(":")
            port = int(port_text)
        ipaddress.ip_address(host)
        if not 0 < port < 65536:
            raise ValueError(spec)
    except ValueError:
        raise BadInputError(
            f"DNS resolver {spec!r} (aws.dns_resolvers) is not 'ip', 'ip:port' or '[ipv6]:port'"
        ) from None
    return dns.nameserver.Do53Nameserver(host, port)


def make_resolver(resolvers: list[str], lifetime: float = 5.0) -> dns.resolver.Resolver:
    """A resolver asking ``resolvers`` (or the system's when empty), no cache, no search list."""
    if resolvers:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [parse_resolver(r) for r in resolvers]
    else:
        try:
            resolver = dns.resolver.Resolver(configure=True)
        except dns.resolver.NoResolverConfiguration as exc:
            raise dns_rule(exc).error(f"DNS: {dns_rule(exc).reason}") from None
    resolver.cache = None
    resolver.timeout = min(2.0, lifetime)
    resolver.lifetime = lifetime
    return resolver


@dataclass
class _Lookup:
    """What one round of lookups saw for a name."""

    chain: list[str] = field(default_factory=list)  # CNAME targets in order
    addresses: list[str] = field(default_factory=list)  # A records of the name
    problem: str | None = None  # NXDOMAIN / no answer / timeout / SERVFAIL …

    def describe(self) -> str:
        parts = [f"CNAME {t}" for t in self.chain]
        if self.addresses:
            parts.append("A " + ", ".join(self.addresses))
        if self.problem:
            parts.append(self.problem)
        return " → ".join(parts) if parts else "no answer"


def _problem(exc: Exception, name: str) -> str:
    """What a failed lookup saw, in the words of the error policy's table."""
    reason = dns_rule(exc).reason
    if isinstance(exc, dns.resolver.NXDOMAIN) and name:
        return f"{reason} ({name})"
    return reason


_DNS_ERRORS = (dns.exception.DNSException,)


def _addresses(resolver: dns.resolver.Resolver, name: str, lifetime: float) -> tuple[list[str], str | None]:
    try:
        answer = resolver.resolve(dns.name.from_text(name), "A", search=False, lifetime=lifetime)
    except _DNS_ERRORS as exc:
        return [], _problem(exc, "")
    return sorted({rr.address for rr in answer}), None


def _lookup(resolver: dns.resolver.Resolver, name: str, lifetime: float, expected: str | None = None) -> _Lookup:
    """Follow the CNAME chain of ``name`` (stopping at ``expected``), then ask for its A records."""
    seen = _Lookup()
    current = _norm(name)
    for _ in range(_MAX_CHAIN):
        if expected is not None and current == expected:
            return seen
        try:
            answer = resolver.resolve(dns.name.from_text(current), "CNAME", search=False, lifetime=lifetime)
        except dns.resolver.NoAnswer:
            break  # not an alias: ``current`` is the end of the chain
        except _DNS_ERRORS as exc:
            seen.problem = _problem(exc, current if current != _norm(name) else "")
            return seen
        target = _norm(answer[0].target.to_text())
        if target in seen.chain:
            seen.problem = f"CNAME loop at {target}"
            return seen
        seen.chain.append(target)
        current = target
    seen.addresses, seen.problem = _addresses(resolver, name, lifetime)
    return seen


def resolve_once(name: str, resolvers: list[str], *, timeout: float = 5.0) -> list[str]:
    """The A records of ``name`` (following CNAMEs), sorted; ``[]`` for NXDOMAIN or no answer.

    A resolver that does not answer within ``timeout`` is a TransientError.
    """
    resolver = make_resolver(resolvers, lifetime=timeout)
    name_n = _norm(name)
    try:
        answer = resolver.resolve(dns.name.from_text(name_n), "A", search=False, lifetime=timeout)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []  # an answer: the name (or its A record) is not there (yet)
    except _DNS_ERRORS as exc:
        raise dns_error(exc, name_n, via=", ".join(resolvers) or "the system resolver") from None
    return sorted({rr.address for rr in answer})


class _NotYet(Exception):
    pass


def wait_resolves(
    name: str,
    expected: str,
    *,
    resolvers: list[str],
    timeout: float,
    interval: float = 2,
) -> str:
    """Wait until ``name`` resolves to ``expected`` (CNAME chain or equal A records).

    Polls every ``interval`` seconds for up to ``timeout`` seconds; each query
    is bounded by the time left. Returns a one-line summary of what matched.
    """
    name_n, expected_n = _norm(name), _norm(expected)
    if not name_n or not expected_n:
        raise BadInputError(f"cannot wait for DNS: name {name!r} → expected {expected!r}")
    where = ", ".join(resolvers) if resolvers else "the system resolver"
    make_resolver(resolvers)  # bad specs fail now, not after the timeout
    deadline = time.monotonic() + timeout
    seen_before: list[str] = []  # what each round saw, most recent last

    def attempt_once() -> str:
        # Bounded by the time left, but never so short that a live resolver
        # on a busy machine looks like a dead one (at most ~1 s past the deadline).
        lifetime = max(1.0, min(5.0, deadline - time.monotonic()))
        resolver = make_resolver(resolvers, lifetime=lifetime)
        seen = _lookup(resolver, name_n, lifetime, expected=expected_n)
        if expected_n in seen.chain:
            return f"{name_n} → " + " → ".join(f"CNAME {t}" for t in seen.chain) + f" (via {where})"
        described = seen.describe()
        if seen.addresses:
            target_addresses, problem = _addresses(resolver, expected_n, lifetime)
            if target_addresses and target_addresses == seen.addresses:
                return f"{name_n} → A {', '.join(seen.addresses)}, the A records of {expected_n} (via {where})"
            described += (
                f" (while {expected_n} is A {', '.join(target_addresses)})"
                if target_addresses
                else f" (while {expected_n}: {problem or 'no A records'})"
            )
        seen_before.append(described)
        raise _NotYet(described)

    def wait_until_next(_state) -> float:
        # Never sleep past the deadline: the last look happens at the deadline.
        return max(0.0, min(interval, deadline - time.monotonic()))

    try:
        for attempt in Retrying(
            stop=lambda _state: time.monotonic() >= deadline,
            wait=wait_until_next,
            retry=retry_if_exception_type(_NotYet),
        ):
            with attempt:
                return attempt_once()
    except RetryError:
        pass
    last = seen_before[-1] if seen_before else "nothing (no lookup finished)"
    earlier = next((s for s in reversed(seen_before) if s != last), None)
    if earlier and last.startswith("timeout"):
        last += f"; before that: {earlier}"
    raise TransientError(
        f"DNS: {name_n} does not resolve to {expected_n} after {timeout:g} s via {where}; "
        f"it last resolved to: {last}"
    )
