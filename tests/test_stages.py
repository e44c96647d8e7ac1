"""Stage tasks: transient errors are retried, permanent ones are not, Skip is visible.

Runs real Prefect task runs against the session's test server and reads the
task-run states back from its API.
"""

from __future__ import annotations

import pytest

from mlflow_rollout.errors import PermanentError, TransientError
from mlflow_rollout.stages import Skip, ledger, stage_task

calls: dict[str, int] = {}


@stage_task("flaky", retries=3, retry_delay_seconds=0)
def flaky() -> str:
    calls["flaky"] = calls.get("flaky", 0) + 1
    if calls["flaky"] < 3:
        raise TransientError("connection reset")
    return "ok after retries"


@stage_task("broken", retries=3, retry_delay_seconds=0)
def broken() -> str:
    calls["broken"] = calls.get("broken", 0) + 1
    raise PermanentError("validation failed")


@stage_task("skippy")
def skippy() -> str:
    raise Skip("not for this target")


def _flow():
    from prefect import flow
    from prefect.runtime import flow_run

    @flow(name="stage-semantics")
    def stage_semantics() -> tuple[str, list]:
        flaky()
        skip_state = skippy(return_state=True)
        with pytest.raises(PermanentError):
            broken()
        return str(flow_run.id), [skip_state.name, skip_state.message]

    return stage_semantics


def test_retry_only_transient(prefect_api: str) -> None:
    calls.clear()
    run_id, (skip_name, skip_message) = _flow()()
    assert calls == {"flaky": 3, "broken": 1}
    records = {r.name: r for r in ledger(run_id).records()}
    assert (records["flaky"].status, records["flaky"].attempts) == ("completed", 3)
    assert records["flaky"].message == "ok after retries"
    assert (records["broken"].status, records["broken"].attempts) == ("failed", 1)
    assert records["broken"].message == "validation failed"
    assert records["skippy"].status == "skipped" and records["skippy"].message == "not for this target"
    assert skip_name == "Skipped" and skip_message == "not for this target"

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter

    with get_client(sync_client=True) as client:
        runs = {t.name: t for t in client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [run_id]}))}
    assert runs["flaky"].run_count == 3 and runs["flaky"].state.is_completed()
    assert runs["broken"].run_count == 1 and runs["broken"].state.is_failed()
    assert runs["skippy"].state.name == "Skipped"
