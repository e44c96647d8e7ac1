"""One rollout or rollback per environment at a time.

Two operators starting a rollout of the same environment would race on the
same release (helm answers "another operation is in progress", the local
target on the same port and files). A Prefect global concurrency limit named
``mlflow-rollout-<env>`` with one slot serialises them across every worker
and CLI that talks to the same Prefect API; the second one waits up to
``wait_seconds`` and is then refused with a message that says what holds the
slot. The limit is created on first use (limit 1).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from mlflow_rollout.errors import PermanentError

__all__ = ["operation_lock", "environment_lock", "lock_name", "EnvironmentBusyError"]


class EnvironmentBusyError(PermanentError):
    """Another rollout or rollback of the environment holds the lock."""


def lock_name(env: str) -> str:
    return f"mlflow-rollout-{env}"


def _ensure_limit(name: str) -> None:
    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass
            return
        if limit.limit != 1 or not limit.active:
            raise PermanentError(
                f"concurrency limit {name!r} exists with limit {limit.limit} (active={limit.active}); "
                "it must be an active limit of 1"
            )


@contextlib.contextmanager
def environment_lock(env: str, *, operation: str, wait_seconds: float) -> Iterator[None]:
    """Hold the environment's single slot for the duration of the block."""
    name = lock_name(env)
    _ensure_limit(name)
    stack = contextlib.ExitStack()
    try:  # only the acquisition's timeout means "busy", not one raised inside the block
        stack.enter_context(concurrency(name, occupy=1, timeout_seconds=wait_seconds, strict=True))
    except TimeoutError:
        raise EnvironmentBusyError(
            f"another rollout or rollback of environment {env!r} is running (concurrency limit {name!r} "
            f"is taken); this {operation} waited {wait_seconds:.0f}s and gave up. Retry when it has finished."
        ) from None
    with stack:
        yield


@contextlib.contextmanager
def operation_lock(settings, target, *, operation: str) -> Iterator[None]:
    """The environment's lock for one rollout/rollback/rotation (target lock, then Prefect's slot)."""
    with environment_lock(settings.name, operation=operation, wait_seconds=settings.lock_wait_seconds):
        yield
