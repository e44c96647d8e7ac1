"""Stage bookkeeping: one record per stage, shared by the report and the CLI.

Prefect knows each task run's state; the people reading the report and the
terminal want one line per *stage* — status, duration, attempts, a message.
:func:`stage_task` builds a Prefect task whose body also writes that line,
and retries only :class:`~mlflow_rollout.errors.TransientError`.

Listeners (the CLI's live view) are told of every change. Tasks run in
threads of the flow's process, so the ledger is a lock-guarded object keyed
by flow run id.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, ParamSpec, TypeVar

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run, task_run

from mlflow_rollout.errors import TransientError, is_transient
from mlflow_rollout.redact import redact

__all__ = ["StageRecord", "Ledger", "ledger", "stage_task", "add_listener", "remove_listener", "Skip"]

Status = Literal["pending", "running", "completed", "skipped", "failed"]
P = ParamSpec("P")
R = TypeVar("R")


@dataclass
class StageRecord:
    name: str
    status: Status = "pending"
    attempts: int = 0
    started: float | None = None
    finished: float | None = None
    message: str = ""

    @property
    def duration(self) -> float | None:
        if self.started is None:
            return None
        return (self.finished or time.monotonic()) - self.started


@dataclass
class Ledger:
    stages: dict[str, StageRecord] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def plan(self, names: list[str]) -> None:
        with self.lock:
            for n in names:
                self.stages.setdefault(n, StageRecord(n))
        _notify(self)

    def update(self, name: str, **changes: Any) -> None:
        with self.lock:
            rec = self.stages.setdefault(name, StageRecord(name))
            for k, v in changes.items():
                setattr(rec, k, v)
        _notify(self)

    def skip_pending(self, message: str, *, keep: str) -> None:
        """Mark every stage not reached as skipped, except ``keep`` (the report, still to run)."""
        for rec in self.records():
            if rec.status == "pending" and rec.name != keep:
                self.update(rec.name, status="skipped", message=message)

    def records(self) -> list[StageRecord]:
        with self.lock:
            return [StageRecord(**{k: getattr(r, k) for k in r.__dataclass_fields__}) for r in self.stages.values()]


_ledgers: dict[str, Ledger] = {}
_ledgers_lock = threading.Lock()
_listeners: list[Callable[[Ledger], None]] = []


def ledger(run_id: str | None = None) -> Ledger:
    """The ledger of the current (or the given) flow run."""
    key = run_id or str(flow_run.id or "no-flow-run")
    with _ledgers_lock:
        return _ledgers.setdefault(key, Ledger())


def add_listener(fn: Callable[[Ledger], None]) -> None:
    _listeners.append(fn)


def remove_listener(fn: Callable[[Ledger], None]) -> None:
    if fn in _listeners:
        _listeners.remove(fn)


def _notify(led: Ledger) -> None:
    for fn in list(_listeners):
        try:
            fn(led)
        except Exception:  # a display problem must never fail a rollout
            pass


class Skip(Exception):
    """Raised by a stage body to end it as Skipped (with the reason) — not a failure."""


def _failure_message(exc: BaseException) -> str:
    """The stage's one-line failure; an interruption says so instead of a bare signal number."""
    if isinstance(exc, Exception):
        return redact(str(exc)) or type(exc).__name__
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (SIGINT)"
    number = getattr(exc, "signal", None)
    return f"interrupted (signal {number})" if number else f"interrupted ({type(exc).__name__})"


def _retry_transient(task, task_run_obj, state) -> bool:
    """Prefect retry predicate: only transient errors get another attempt."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as e:  # result not retrievable: the exception itself
        exc = e
    return isinstance(exc, BaseException) and is_transient(exc)


def stage_task(
    name: str, *, retries: int = 0, retry_delay_seconds: float | list[float] = 2
) -> Callable[[Callable[P, R]], Any]:
    """Decorator: a Prefect task named ``name`` that records itself in the ledger.

    Results are not persisted and not cached: stage results may hold secrets
    (as SecretStr), and a stage must really run every time.
    """

    def decorate(fn: Callable[P, R]):
        @functools.wraps(fn)
        def body(*args: P.args, **kwargs: P.kwargs):
            led = ledger()
            rec = led.stages.get(name)
            led.update(
                name, status="running", attempts=task_run.run_count or 1,
                started=rec.started if rec and rec.started else time.monotonic(),
                finished=None, message="" if not rec else rec.message,
            )
            try:
                result = fn(*args, **kwargs)
            except Skip as s:
                from prefect.states import Completed

                led.update(name, status="skipped", finished=time.monotonic(), message=str(s))
                return Completed(name="Skipped", message=str(s))
            except TransientError as exc:
                final = (task_run.run_count or 1) > retries
                led.update(
                    name, status="failed" if final else "running",
                    finished=time.monotonic() if final else None, message=redact(str(exc)),
                )
                raise
            except BaseException as exc:
                led.update(name, status="failed", finished=time.monotonic(), message=_failure_message(exc))
                raise
            summary = result if isinstance(result, str) else getattr(result, "summary", "")
            led.update(name, status="completed", finished=time.monotonic(), message=redact(str(summary or "")))
            return result

        return task(
            body, name=name, task_run_name=name, retries=retries, retry_delay_seconds=retry_delay_seconds,
            retry_condition_fn=_retry_transient, persist_result=False, cache_policy=NO_CACHE,
            log_prints=False,
        )

    return decorate

