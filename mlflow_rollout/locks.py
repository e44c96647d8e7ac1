"""One rollout, rollback or password rotation per environment at a time — with locks that heal.

Two operators starting a rollout of the same environment would race on the
same release (helm answers "another operation is in progress", the local
target on the same port and files). :func:`operation_lock` serialises them
with two locks, taken in this order and released in reverse:

1. **The target's own lock** (``target.operation_lock(holder, wait)``): an OS
   file lock in the local state directory (:func:`file_lock`), a
   ``coordination.k8s.io`` Lease on Kubernetes. It guards the target itself,
   also between runners that talk to *different* Prefect databases (two CLIs
   with two ``PREFECT_HOME`` values), and it frees itself when its holder dies.
   It is taken first so that, for a given target, at most one process ever
   competes for the Prefect slot below — which is why the few races left in the
   Prefect slot's healing (see :func:`prefect_lock`) cannot let two runs touch
   the same target.
2. **A Prefect global concurrency limit** ``mlflow-rollout-<env>`` with one
   slot, held with a *lease* (:func:`prefect_lock`). It is what the Prefect UI
   shows and what serialises runs of one environment across every worker and
   CLI that share a Prefect API.

Why the Prefect slot needs more than Prefect's own lease
--------------------------------------------------------
Prefect 3 frees the slot of an expired lease (the server's "repossessor"),
but only on a server whose lease storage and repossessor survive the holder:
Prefect's default lease storage is in memory, the CLI's temporary server
(:mod:`mlflow_rollout.prefect_server`) dies with the CLI it serves, and a
shared server may be another version or configured otherwise. The server also
refuses leases shorter than 60 s. So the holder additionally writes a **holder
record** — the Prefect Variable ``mlflow-rollout-lock-<env>``, JSON with the
:class:`~mlflow_rollout.types.LockHolder`, the lease id and a heartbeat
timestamp — refreshed every ``lease/4`` seconds, and deleted on release. A
waiter that finds the slot taken reads the record and *heals* a slot whose
holder stopped renewing — under a heal claim (the Variable
``mlflow-rollout-lock-<env>-heal``, created atomically) so that two waiters
never heal at once. See :func:`prefect_lock` for the exact rules and what is
guaranteed. Bounds with the defaults (lease 60 s, beats every 15 s): a
``kill -9``'d CLI's file lock is free at once; its Prefect slot is healed by a
waiter on the same host 30 s after the last heartbeat (so ≤ 30 s after the
kill), by a waiter elsewhere at the later of 60 s after the last heartbeat and
30 s after that waiter started watching (≤ 90 s after the kill for a waiter
that starts within a minute).

A waiting run says so, once and then at most every 15 s, naming the holder
(operation, flow run, pid, host, since when); giving up raises
:class:`EnvironmentBusyError` with the same facts and what to do.

Errors::

    PermanentError
    ├── EnvironmentBusyError   the lock stayed taken for the whole wait
    └── BadInputError          the lock file cannot be created (read-only
                               or unwritable state directory), naming the path
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import errno
import fcntl
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ValidationError

from mlflow_rollout.errors import BadInputError, PermanentError
from mlflow_rollout.types import LockHolder

__all__ = [
    "operation_lock",
    "prefect_lock",
    "file_lock",
    "environment_lock",
    "lock_name",
    "record_name",
    "claim_name",
    "read_holder_record",
    "EnvironmentBusyError",
    "PREFECT_MIN_LEASE_SECONDS",
    "WAIT_LOG_EVERY_SECONDS",
]

#: The Prefect server refuses ``lease_duration`` below this (``ge=60`` on the API).
PREFECT_MIN_LEASE_SECONDS = 60.0
#: A waiting run repeats its "waiting for the lock" line at most this often.
WAIT_LOG_EVERY_SECONDS = 15.0


class EnvironmentBusyError(PermanentError):
    """Another rollout, rollback or rotation of the environment holds the lock."""


def lock_name(env: str) -> str:
    """The Prefect global concurrency limit of environment ``env``."""
    return f"mlflow-rollout-{env}"


def record_name(env: str) -> str:
    """The Prefect Variable holding the current holder's record.

    Variable names allow only lowercase letters, digits, ``-`` and ``_``;
    environment names are already ``[a-z0-9-]+`` (settings), anything else is
    folded to ``-`` so an odd name can never make the lock unusable.
    """
    return "mlflow-rollout-lock-" + re.sub(r"[^a-z0-9_-]", "-", env.lower())


# --------------------------------------------------------------------------- logging


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a flow/task run (so the UI shows it), else ``mlflow_rollout``."""
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:  # MissingContextError outside a run
        return logging.getLogger("mlflow_rollout")


class _WaitLog:
    """One "waiting" line at once, then at most every :data:`WAIT_LOG_EVERY_SECONDS` (or when the holder changes)."""

    def __init__(self) -> None:
        self._last_at: float | None = None
        self._last_text: str | None = None

    def __call__(self, text: str) -> None:
        now = time.monotonic()
        if self._last_at is None or text != self._last_text or now - self._last_at >= WAIT_LOG_EVERY_SECONDS:
            _logger().info(text)
            self._last_at, self._last_text = now, text


def _flow_run_id() -> str | None:
    try:
        from prefect.runtime import flow_run

        return flow_run.id
    except Exception:
        return None


def _ago(moment: dt.datetime) -> float:
    return (dt.datetime.now(dt.timezone.utc) - moment).total_seconds()


# --------------------------------------------------------------------------- operation_lock

#: The environment whose target lock :func:`operation_lock` is entering: lets
#: :func:`file_lock` name the environment when its caller (a target) did not
#: pass ``env``.
_LOCKING_ENV: contextvars.ContextVar[str | None] = contextvars.ContextVar("mlflow_rollout_locking_env", default=None)


@contextlib.contextmanager
def operation_lock(settings: Any, target: Any, *, operation: str) -> Iterator[LockHolder]:
    """The environment's lock for one rollout/rollback/rotation: the target's lock, then Prefect's slot.

    ``settings`` is the :class:`~mlflow_rollout.settings.EnvironmentSettings`
    (``name``, ``lock_wait_seconds``, ``lock_lease_seconds``); ``target`` any
    object; when it has an ``operation_lock(holder, wait_seconds)`` method that
    lock is entered first (see the module docstring for why first). Both are
    released on the way out, also on an exception or ``KeyboardInterrupt``.
    Each lock waits up to ``settings.lock_wait_seconds`` and then raises
    :class:`EnvironmentBusyError`. Yields the :class:`LockHolder` written for
    this run.
    """
    holder = LockHolder.here(operation, _flow_run_id())
    with contextlib.ExitStack() as stack:
        target_lock = getattr(target, "operation_lock", None)
        if target_lock is not None:
            token = _LOCKING_ENV.set(settings.name)  # names the environment in file_lock's messages
            try:
                stack.enter_context(target_lock(holder, settings.lock_wait_seconds))
            finally:
                _LOCKING_ENV.reset(token)
        stack.enter_context(
            prefect_lock(
                settings.name, holder, wait_seconds=settings.lock_wait_seconds,
                lease_seconds=settings.lock_lease_seconds,
            )
        )
        yield holder


@contextlib.contextmanager
def environment_lock(env: str, *, operation: str, wait_seconds: float, lease_seconds: float = 60) -> Iterator[None]:
    """The Prefect half of :func:`operation_lock` alone (kept for callers that have no target)."""
    with prefect_lock(env, LockHolder.here(operation, _flow_run_id()), wait_seconds=wait_seconds,
                      lease_seconds=lease_seconds):
        yield


# --------------------------------------------------------------------------- Prefect slot + holder record


class _Record(BaseModel):
    """The holder record (value of the Variable :func:`record_name`)."""

    holder: LockHolder
    lease_id: str | None = None
    heartbeat: dt.datetime
    lease_seconds: float

    @property
    def fingerprint(self) -> tuple[str | None, str]:
        """Changes with every heartbeat and every new holder."""
        return self.lease_id, self.heartbeat.isoformat()


def read_holder_record(env: str) -> dict[str, Any] | None:
    """The current holder record of ``env`` as plain JSON (None: no record) — for status and tests."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        record = _read_record(client, env)
    return None if record is None else record.model_dump(mode="json")


def _read_record(client: Any, env: str) -> _Record | None:
    variable = client.read_variable_by_name(record_name(env))
    if variable is None or variable.value is None:
        return None
    try:
        return _Record.model_validate(variable.value)
    except ValidationError:
        # Not ours or from an incompatible version: treat as "no record", so a
        # slot behind it is healed after a full lease like any record-less slot.
        return None


def _write_record(client: Any, env: str, record: _Record) -> None:
    from prefect.client.schemas.actions import VariableCreate, VariableUpdate
    from prefect.exceptions import ObjectAlreadyExists

    name, value = record_name(env), record.model_dump(mode="json")
    try:
        client.create_variable(VariableCreate(name=name, value=value))
    except ObjectAlreadyExists:
        client.update_variable(VariableUpdate(name=name, value=value))


def _delete_record_if(client: Any, env: str, fingerprint: tuple[str | None, str] | None = None,
                      lease_id: str | None = None) -> None:
    """Delete the record only if it is still the one we mean (same fingerprint, or same lease id)."""
    from prefect.exceptions import ObjectNotFound

    current = _read_record(client, env)
    if current is None:
        return
    if fingerprint is not None and current.fingerprint != fingerprint:
        return
    if lease_id is not None and current.lease_id != lease_id:
        return
    with contextlib.suppress(ObjectNotFound):
        client.delete_variable_by_name(record_name(env))


def _ensure_limit(client: Any, name: str) -> None:
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    try:
        limit = client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        with contextlib.suppress(ObjectAlreadyExists):
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        return
    if limit.limit != 1 or not limit.active or limit.slot_decay_per_second:
        raise PermanentError(
            f"concurrency limit {name!r} exists with limit {limit.limit} (active={limit.active}, "
            f"slot decay {limit.slot_decay_per_second}/s); it must be an active limit of 1 without decay. "
            f"Fix it with `prefect gcl update {name} --limit 1 --enable` or delete it (it is re-created)."
        )


def _slot_taken(client: Any, name: str) -> bool:
    limit = client.read_global_concurrency_limit_by_name(name)
    return limit.active_slots >= limit.limit


def _try_acquire(client: Any, name: str, server_lease: float, holder: LockHolder) -> str | None:
    """One attempt: the lease id, or None when the slot is taken (HTTP 423)."""
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder

    lease_holder = None
    if holder.flow_run_id:
        with contextlib.suppress(ValueError):
            lease_holder = ConcurrencyLeaseHolder(type="flow_run", id=uuid.UUID(holder.flow_run_id))
    try:
        response = client.increment_concurrency_slots_with_lease(
            names=[name], slots=1, mode="concurrency", lease_duration=server_lease, holder=lease_holder,
        )
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code == 423:
            return None
        raise
    data = response.json()
    if not data.get("limits"):  # the limit vanished between _ensure_limit and now
        raise PermanentError(f"concurrency limit {name!r} does not exist (deleted while acquiring?); retry")
    return str(data["lease_id"])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, someone else's
        return True
    return True


@dataclass
class _Watch:
    """What a waiter has seen of the holder record, on its own monotonic clock.

    Staleness never relies on one clock alone (hosts may disagree): a record
    is stale when

    * its holder ran on *this* host, that pid no longer exists, and the
      heartbeat is older than ``lease/2`` (two missed beats — this host's clock
      wrote it, and the age guard keeps a live holder in another pid namespace
      with the same hostname safe); or
    * its heartbeat is older than the lease by the wall clock *and* this
      waiter has seen it unchanged for at least ``lease/2``; or
    * this waiter has seen it unchanged for a full lease (any clock skew).

    A slot taken with no (readable) record is stale once this waiter has seen
    it so for a full lease.
    """

    lease: float
    seen: tuple[str | None, str] | None = None
    seen_since: float = 0.0
    no_record_since: float | None = None
    claim_seen: str | None = None
    claim_since: float = 0.0

    def claim_expired(self, claim: str | None) -> bool:
        """Has another healer's claim stayed unchanged for a full lease (it died mid-heal)?"""
        now = time.monotonic()
        if claim is None or claim != self.claim_seen:
            self.claim_seen, self.claim_since = claim, now
            return False
        return now - self.claim_since >= self.lease

    def observe(self, record: _Record | None) -> None:
        now = time.monotonic()
        if record is None:
            self.seen = None
            if self.no_record_since is None:
                self.no_record_since = now
            return
        self.no_record_since = None
        if record.fingerprint != self.seen:
            self.seen, self.seen_since = record.fingerprint, now

    def stale_reason(self, record: _Record | None) -> str | None:
        now = time.monotonic()
        if record is None:
            if self.no_record_since is not None and now - self.no_record_since >= self.lease:
                return f"the slot has been taken without any holder record for {now - self.no_record_since:.0f}s"
            return None
        unchanged = now - self.seen_since if record.fingerprint == self.seen else 0.0
        age = _ago(record.heartbeat)
        h = record.holder
        if h.host == socket.gethostname() and not _pid_alive(h.pid) and age >= self.lease / 2:
            return f"its process {h.pid} on this host no longer exists (last heartbeat {age:.0f}s ago)"
        if age >= self.lease and unchanged >= self.lease / 2:
            return f"its last heartbeat was {age:.0f}s ago (lease {self.lease:g}s)"
        if unchanged >= self.lease:
            return f"its heartbeat has not changed for {unchanged:.0f}s (lease {self.lease:g}s)"
        return None


def claim_name(env: str) -> str:
    """The Prefect Variable a healer creates while it frees and re-takes a dead holder's slot."""
    return record_name(env) + "-heal"


def _read_claim(client: Any, env: str) -> str | None:
    variable = client.read_variable_by_name(claim_name(env))
    if variable is None or not isinstance(variable.value, dict):
        return None
    return str(variable.value.get("id"))


def _try_claim(client: Any, env: str, me: LockHolder) -> str | None:
    """Create the heal claim; None when another healer has it. Creation is atomic (409 for the second)."""
    from prefect.client.schemas.actions import VariableCreate
    from prefect.exceptions import ObjectAlreadyExists

    claim = uuid.uuid4().hex
    value = {"id": claim, "holder": me.model_dump(mode="json"), "at": dt.datetime.now(dt.timezone.utc).isoformat()}
    try:
        client.create_variable(VariableCreate(name=claim_name(env), value=value))
    except ObjectAlreadyExists:
        return None
    return claim


def _drop_claim(client: Any, env: str, claim: str) -> None:
    from prefect.exceptions import ObjectNotFound

    if _read_claim(client, env) == claim:
        with contextlib.suppress(ObjectNotFound):
            client.delete_variable_by_name(claim_name(env))


def _take(client: Any, env: str, name: str, holder: LockHolder, server_lease: float,
          lease_seconds: float) -> _Record | None:
    """One attempt to take the slot and, if taken, write our record (our record, or None when busy)."""
    lease_id = _try_acquire(client, name, server_lease, holder)
    if lease_id is None:
        return None
    try:
        # A record of someone else means its holder ended without releasing
        # (killed; the server's repossessor freed its slot).
        previous = _read_record(client, env)
        if previous is not None and previous.lease_id != lease_id:
            _logger().warning(
                "took over the lock of environment %s from %s, which did not release it "
                "(last heartbeat %.0fs ago)", env, previous.holder.describe(), _ago(previous.heartbeat),
            )
        record = _Record(holder=holder, lease_id=lease_id, heartbeat=dt.datetime.now(dt.timezone.utc),
                         lease_seconds=float(lease_seconds))
        _write_record(client, env, record)
    except BaseException:
        with contextlib.suppress(Exception):
            client.release_concurrency_slots_with_lease(uuid.UUID(lease_id))
        raise
    return record


def _heal_and_take(client: Any, env: str, name: str, stale: _Record | None, reason: str, holder: LockHolder,
                   server_lease: float, lease_seconds: float, watch: "_Watch") -> tuple[_Record | None, bool]:
    """Under the heal claim: free a presumed-dead holder's slot, then take it ourselves.

    The dead lease is released through Prefect first (a proper decrement that
    also keeps the server's repossessor from decrementing it a second time
    later); only if the slot is *still* taken and the record is still the
    stale one is the count set to 0 (the lease was lost with a restarted
    server, or never recorded). The claim is dropped only once our record is
    written (or someone else's appeared), so the next healer never mistakes
    the gap between "freed" and "re-taken" for a dead holder. Returns our
    record (or None) and whether we held the claim.
    """
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    claim = _try_claim(client, env, holder)
    if claim is None:  # another waiter is healing; a healer that died leaves a claim: expire it
        other = _read_claim(client, env)
        if watch.claim_expired(other):
            _logger().warning("removing the heal claim of environment %s left for %gs by a waiter that died",
                              env, lease_seconds)
            _drop_claim(client, env, other or "")
        return None, False
    try:
        current = _read_record(client, env)
        if (current is None) != (stale is None) or (current and stale and current.fingerprint != stale.fingerprint):
            return None, True  # it changed under us: alive after all, or already healed and re-taken
        who = stale.holder.describe() if stale else "an unknown holder"
        _logger().warning("freeing the lock of environment %s held by %s: %s; it is presumed dead", env, who, reason)
        if stale is not None and stale.lease_id:
            with contextlib.suppress(Exception):  # unknown/expired lease: nothing to release
                client.release_concurrency_slots_with_lease(uuid.UUID(stale.lease_id))
        if _slot_taken(client, name):
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=0))
        if stale is not None:
            _delete_record_if(client, env, fingerprint=stale.fingerprint)
        # Take it while holding the claim. A plain waiter may win the slot
        # first (legitimately); then wait briefly for its record to appear.
        until = time.monotonic() + 2.0
        while True:
            record = _take(client, env, name, holder, server_lease, lease_seconds)
            if record is not None or _read_record(client, env) is not None or time.monotonic() > until:
                return record, True
            time.sleep(0.1)
    finally:
        with contextlib.suppress(Exception):
            _drop_claim(client, env, claim)


class _Heartbeat:
    """A daemon thread: renews the Prefect lease and the record's heartbeat every ``lease/4`` s.

    It never overwrites another holder's record: if the record names another
    lease (a healer took the slot away, e.g. after this process was frozen for
    longer than the lease) or Prefect answers 410 for our lease, it stops and
    logs once that the lock was lost.
    """

    def __init__(self, env: str, record: _Record, server_lease: float, interval: float) -> None:
        self.env, self.record, self.server_lease, self.interval = env, record, server_lease, interval
        self.stop = threading.Event()
        self.lost = False
        ctx = contextvars.copy_context()  # the run logger works in the thread too
        self.thread = threading.Thread(target=lambda: ctx.run(self._run), daemon=True,
                                       name=f"lock-heartbeat-{env}")

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)

    def _lose(self, why: str) -> None:
        self.lost = True
        _logger().warning(
            "lost the Prefect lock of environment %s: %s. The target's own lock still guards it; "
            "this run continues", self.env, why,
        )

    def _run(self) -> None:
        from prefect.client.orchestration import get_client

        log = logging.getLogger("mlflow_rollout")
        lease_id = uuid.UUID(self.record.lease_id) if self.record.lease_id else None
        with get_client(sync_client=True) as client:
            while not self.stop.wait(self.interval) and not self.lost:
                try:
                    if lease_id is not None:
                        client.renew_concurrency_lease(lease_id=lease_id, lease_duration=self.server_lease)
                except httpx.HTTPStatusError as exc:
                    if exc.response.status_code in (404, 410):
                        self._lose("its lease was revoked (a waiter presumed this run dead?)")
                        return
                    log.debug("lock lease renewal failed: %s", exc)
                except Exception as exc:  # transient: the next beat tries again
                    log.debug("lock lease renewal failed: %s", exc)
                try:
                    current = _read_record(client, self.env)
                    if current is not None and current.lease_id != self.record.lease_id:
                        self._lose(f"the holder record now names {current.holder.describe()}")
                        return
                    self.record = self.record.model_copy(update={"heartbeat": dt.datetime.now(dt.timezone.utc)})
                    _write_record(client, self.env, self.record)
                except Exception as exc:
                    log.debug("lock heartbeat failed: %s", exc)


@contextlib.contextmanager
def prefect_lock(
    env: str,
    holder: LockHolder,
    *,
    wait_seconds: float,
    lease_seconds: float = 60,
    poll_seconds: float | None = None,
) -> Iterator[None]:
    """Hold the one slot of ``mlflow-rollout-<env>`` with a lease, healing a dead holder's slot.

    Acquisition uses Prefect's leased slots through the client
    (``increment_concurrency_slots_with_lease`` / ``renew_concurrency_lease`` /
    ``release_concurrency_slots_with_lease``) rather than
    ``prefect.concurrency.sync.concurrency``: the waiter needs single attempts
    (to look at the holder between them) and the lease id (to revoke exactly a
    dead holder's lease), neither of which that context manager exposes. The
    server lease is ``max(lease_seconds, 60)`` (the API's minimum); the
    heartbeat/healing bound is ``lease_seconds`` itself (tests use a few
    seconds).

    Waiting: one attempt every ``poll_seconds`` (default ``min(1, lease/4)``);
    in between, one line "waiting for the lock of environment X: held by …"
    (then at most every 15 s), and healing per :class:`_Watch`. After
    ``wait_seconds`` without the slot: :class:`EnvironmentBusyError`.

    What is guaranteed
    ------------------
    * A holder that dies (``kill -9``, lost host) stops heartbeating; a waiter
      frees its slot at most ``lease_seconds`` after the last heartbeat it
      could have seen (``lease/2`` when the dead pid was on the waiter's host),
      plus one poll — whichever Prefect database or lease storage is used.
      A slot with no record at all is freed after a waiter has watched it for a
      full lease.
    * A live holder is never healed away while its heartbeats reach Prefect:
      a waiter needs the same heartbeat unchanged for ``lease/2`` or more,
      and the holder beats every ``lease/4``.
    * Healers are serialised: healing happens only under a *heal claim*, the
      Variable :func:`claim_name`, whose creation is atomic (the server
      answers 409 to the second creator). Under the claim the healer re-reads
      the record and gives up if it changed, revokes the dead lease, resets
      the count only if the slot is still taken, takes the slot itself and
      writes its record — and only then drops the claim. So two healers never
      both free one dead holder's slot, and no healer frees a slot that
      another healer has just re-taken. A waiter that is not healing may win
      the freed slot first; that is fine (one holder), and the healer waits up
      to 2 s for that winner's record before dropping the claim.
    * A healer that dies mid-heal leaves its claim; other waiters remove a
      claim they have seen unchanged for a full lease (the bound then grows by
      one lease for that double fault).
    * Not guaranteed: Prefect has no compare-and-set on the count, so a run
      that increments the slot and then stalls for more than 2 s before
      writing its record, while another waiter has already watched a
      record-less slot for a full lease, can be healed away. A holder whose
      lease is revoked notices on its next beat and logs "lost the Prefect
      lock" (it does not stop the operation). Hence :func:`operation_lock`
      takes the target's own lock first: with it, two runs of one target never
      both compete for this slot.
    """
    from prefect.client.orchestration import get_client

    name = lock_name(env)
    server_lease = max(float(lease_seconds), PREFECT_MIN_LEASE_SECONDS)
    poll = poll_seconds if poll_seconds is not None else min(1.0, lease_seconds / 4)
    deadline = time.monotonic() + wait_seconds
    watch = _Watch(lease=float(lease_seconds))
    wait_log = _WaitLog()
    with get_client(sync_client=True) as client:
        _ensure_limit(client, name)
        while True:
            record = _take(client, env, name, holder, server_lease, lease_seconds)
            if record is not None:
                break
            current = _read_record(client, env)
            if not _slot_taken(client, name) and time.monotonic() < deadline:
                time.sleep(0.05)  # released between our attempt and the read: try again
                continue
            watch.observe(current)
            reason = watch.stale_reason(current)
            if reason is not None:
                record, claimed = _heal_and_take(client, env, name, current, reason, holder, server_lease,
                                                 lease_seconds, watch)
                if record is not None:
                    break
                if claimed:  # judged afresh from now on: never heal the same gap twice
                    watch = _Watch(lease=float(lease_seconds), claim_seen=watch.claim_seen,
                                   claim_since=watch.claim_since)
                    continue
                # another waiter is healing it: wait like anyone else
            who = current.holder.describe() if current else _unknown_holder(name, lease_seconds)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EnvironmentBusyError(_busy_message(env, name, holder, wait_seconds, current, lease_seconds))
            wait_log(f"waiting for the lock of environment {env}: held by {who}")
            time.sleep(min(poll, remaining))
        lease_id = record.lease_id

    beat = _Heartbeat(env, record, server_lease, interval=lease_seconds / 4)
    beat.start()
    try:
        yield
    finally:
        beat.close()
        try:
            with get_client(sync_client=True) as client:
                # Record first: a waiter then sees "taken, no record" for a moment
                # (harmless: that needs a full lease to heal), never our stale record.
                if not beat.lost:
                    _delete_record_if(client, env, lease_id=lease_id)
                client.release_concurrency_slots_with_lease(uuid.UUID(lease_id))
        except Exception as exc:  # never hide the block's own error; a waiter heals it
            _logger().warning(
                "could not release the Prefect lock of environment %s (%s); the next run frees it after "
                "%gs", env, type(exc).__name__, lease_seconds,
            )


def _unknown_holder(name: str, lease_seconds: float) -> str:
    return (f"an unknown holder (slot {name!r} is taken and there is no holder record; "
            f"it is freed once it has stayed so for {lease_seconds:g}s)")


def _busy_message(env: str, name: str, me: LockHolder, waited: float, record: _Record | None,
                  lease_seconds: float) -> str:
    if record is None:
        held = (f"the slot of concurrency limit {name!r} is taken by an unknown holder (no holder record; "
                f"an older version or a run killed while acquiring). It is freed automatically once it has "
                f"stayed so for {lease_seconds:g}s; retry then, or free it now with "
                f"`prefect gcl update {name} --active-slots 0` if you are sure nothing runs")
    else:
        age = _ago(record.heartbeat)
        held = (f"{record.holder.describe()} holds it (concurrency limit {name!r}, last heartbeat "
                f"{age:.0f}s ago). Retry when it has finished; if that run is dead, the lock frees itself "
                f"{lease_seconds:g}s after its last heartbeat")
    return (f"another rollout or rollback of environment {env!r} is running: {held}. "
            f"This {me.operation} waited {waited:.0f}s and gave up.")


# --------------------------------------------------------------------------- OS file lock


def _open_lock_file(path: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # O_CLOEXEC by default: children never inherit it
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise BadInputError(
                f"cannot take the lock file {path}: {exc.strerror}. The state directory {path.parent} must be "
                f"writable (a read-only mount?); make it writable or point the state directory elsewhere"
            ) from None
        raise PermanentError(f"cannot take the lock file {path}: {exc.strerror}") from None


def _read_file_holder(fd: int) -> LockHolder | None:
    try:
        data = os.pread(fd, 8192, 0)
    except OSError:
        return None
    if not data.strip():
        return None
    try:
        return LockHolder.model_validate(json.loads(data))
    except (ValueError, ValidationError):
        return None  # being written, or not ours


@contextlib.contextmanager
def file_lock(
    path: Path,
    holder: LockHolder,
    wait_seconds: float,
    *,
    env: str | None = None,
    poll_seconds: float = 0.2,
) -> Iterator[None]:
    """Hold an exclusive OS lock (``flock``) on ``path``; the kernel frees it when the holder dies.

    No lease is needed: ``kill -9`` closes the descriptor and frees the lock
    at once. Works between processes whatever their ``PREFECT_HOME`` and also
    between threads of one process (each call opens its own descriptor). The
    descriptor is close-on-exec, so a server started while holding it does not
    keep the lock alive. The holder's JSON is written into the file for
    waiters; a clean release empties it, so content found on acquiring names a
    holder that died without releasing (logged as a warning). The file is never
    deleted (deleting a flock'ed file lets two processes lock two inodes).

    ``env`` only names the environment in messages (default: the one
    :func:`operation_lock` is locking, else the directory is named).
    Waiting logs "waiting for the lock of …: held by …" once and then at most
    every 15 s; after ``wait_seconds``: :class:`EnvironmentBusyError` naming
    the holder. A state directory that is read-only or not writable raises
    :class:`BadInputError` naming the path.
    """
    path = Path(path)
    env = env or _LOCKING_ENV.get()
    what = f"environment {env}" if env else f"state directory {path.parent}"
    fd = _open_lock_file(path)
    try:
        deadline = time.monotonic() + wait_seconds
        wait_log = _WaitLog()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                current = _read_file_holder(fd)
                who = current.describe() if current else f"an unknown holder (lock file {path})"
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    subject = f"of environment {env!r}" if env else f"using the state directory {path.parent}"
                    raise EnvironmentBusyError(
                        f"another rollout or rollback {subject} is running: {who} holds the lock file {path}. "
                        f"This {holder.operation} waited {wait_seconds:.0f}s and gave up; retry when it has "
                        f"finished (the lock frees itself the moment that process ends)."
                    ) from None
                wait_log(f"waiting for the lock of {what}: held by {who}")
                time.sleep(min(poll_seconds, remaining))
        try:
            previous = _read_file_holder(fd)
            if previous is not None and previous != holder:
                _logger().warning(
                    "took over the lock of %s from %s, which ended without releasing it (killed?)",
                    what, previous.describe(),
                )
            data = holder.model_dump_json().encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        except OSError as exc:
            raise BadInputError(f"cannot write the lock file {path}: {exc.strerror}") from None
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
