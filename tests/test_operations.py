"""Operating a rolled-out local server: rollback, health passes, approval, one-at-a-time.

One real MLflow server per module (rolled out with the real CLI); the flows
run in-process against the session's Prefect test server, and what they
leave behind (states, events, revisions) is read back from its API and the
target.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.rollout import Sandbox

pytestmark = pytest.mark.e2e

ENV = "ops"


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory, prefect_api: str):
    box = Sandbox(tmp_path_factory.mktemp("ops"), prefect_api)
    box.write_environment(ENV, {"lock_wait_seconds": 2})
    r = box.cli("rollout", "--env", ENV)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    saved = {k: os.environ.get(k) for k in ("MLFLOW_ROLLOUT_ENVIRONMENTS_DIR", "MLFLOW_ROLLOUT_STATE_DIR")}
    os.environ["MLFLOW_ROLLOUT_ENVIRONMENTS_DIR"] = str(box.env_dir)
    os.environ["MLFLOW_ROLLOUT_STATE_DIR"] = str(box.state_root)
    yield box
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    box.stop(ENV)


def _target():
    from mlflow_rollout.settings import load_environment
    from targets import get_target

    return get_target(load_environment(ENV))


def _edit_env(box: Sandbox, **changes) -> None:
    path = box.env_dir / f"{ENV}.yaml"
    data = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        data.setdefault(section, {})[key] = value
    path.write_text(yaml.safe_dump(data))


def _events(name: str) -> list[dict]:
    from prefect.settings import PREFECT_API_URL

    body = {"filter": {"event": {"name": [name]}, "resource": {"id": [f"mlflow-rollout.environment.{ENV}"]}}, "limit": 50}
    deadline = time.monotonic() + 20
    while True:
        events = httpx.post(f"{PREFECT_API_URL.value()}/events/filter", json=body, timeout=10).json()["events"]
        if events or time.monotonic() > deadline:
            return events
        time.sleep(0.5)


def test_rollback_refuses_unknown_revision_naming_valid_ones(ops: Sandbox) -> None:
    from flows.rollback import RollbackRequest, rollback
    from mlflow_rollout.errors import BadInputError

    before = _target().current_revision().number
    with pytest.raises(BadInputError) as err:
        rollback(RollbackRequest(environment=ENV, revision=99, reason="test unknown"))
    # revision 1 is the auth-off bootstrap: never a rollback target (DESIGN §4.18)
    assert "revision 99: it does not exist; valid revisions: none" in str(err.value)
    with pytest.raises(BadInputError, match="current revision"):
        rollback(RollbackRequest(environment=ENV, revision=before, reason="test current"))
    assert _target().current_revision().number == before
    with pytest.raises(Exception):  # the reason is required
        RollbackRequest(environment=ENV, revision=1, reason="")


def test_rollout_then_rollback_restores_previous_settings(ops: Sandbox) -> None:
    from flows.rollback import RollbackRequest, rollback
    from flows.rollout import rollout

    target = _target()
    good = target.current_revision()
    assert good.spec.workers == 2

    _edit_env(ops, mlflow__workers=1)
    status = rollout(env=ENV)
    changed = _target().current_revision()
    assert changed.number == good.number + 1 and changed.spec.workers == 1 and status["healthy"]

    result = rollback(RollbackRequest(environment=ENV, reason="workers=1 was a mistake"))
    after = _target().current_revision()
    assert result["revision"] == after.number == changed.number + 1
    assert after.spec == good.spec  # the previous settings are back
    assert "rollback to " + str(good.number) in after.description
    assert result["healthy"] and result["auth"] is True
    assert _events("mlflow.rollback.succeeded")
    _edit_env(ops, mlflow__workers=2)  # the file now matches what runs again


def test_health_ok_then_degraded_when_server_down(ops: Sandbox) -> None:
    from flows.health import HealthRequest, health
    from mlflow_rollout.errors import PermanentError

    first = health(HealthRequest(environment=ENV, artifact_round_trip=True))
    assert first["outcome"] == "ok"
    checks = {c["check"]: c for c in first["checks"]}
    assert checks["https"]["ok"] and checks["auth"]["ok"] and checks["artifacts"]["ok"]
    assert checks["dns"]["ok"] is None  # not applicable locally
    second = health(HealthRequest(environment=ENV))
    assert {c["check"]: c["ok"] for c in second["checks"]}["log-errors"] is True
    ok_events = _events("mlflow.health.ok")
    assert len(ok_events) >= 2

    _target().stop()
    try:
        with pytest.raises(PermanentError, match="degraded"):
            health(HealthRequest(environment=ENV))
        degraded = _events("mlflow.health.degraded")
        assert degraded
        failing = {c["check"] for c in degraded[0]["payload"]["failing_checks"]}
        assert {"https", "processes"} <= failing
    finally:
        r = ops.cli("rollout", "--env", ENV)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]


def test_diagnose_on_the_local_target(ops: Sandbox) -> None:
    """``mlflow-rollout diagnose``: exit 0 on a healthy server; a stored admin password that no longer opens the
    admin is named with the safe way out; a stopped server is not called healthy."""
    import json

    r = ops.cli("diagnose", "--env", ENV, "--json")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    report = json.loads(r.stdout)
    assert report["healthy"] is True and report["findings"] == [] and report["revision"] is not None

    stored = Path(ops.status(ENV)["admin_password_file"])
    original = stored.read_text()
    stored.write_text("Changed-By-Hand-Not-The-Admin-1")
    try:
        r = ops.cli("diagnose", "--env", ENV)
        out = r.stdout + r.stderr
        assert r.returncode == 1, out[-3000:]
        assert "authentication" in out and "does not open 'admin'" in out and "do not recreate the admin" in out, out
        assert "Changed-By-Hand-Not-The-Admin-1" not in out and original not in out
    finally:
        stored.write_text(original)

    _target().stop()
    try:
        r = ops.cli("diagnose", "--env", ENV, "--json")
        assert r.returncode == 1, (r.stdout + r.stderr)[-3000:]
        report = json.loads(r.stdout)
        assert report["healthy"] is False and "not Ready" in report["unexplained"], report
    finally:
        r = ops.cli("rollout", "--env", ENV)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]


def _paused_run_id(timeout: float = 60) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateName

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(name=FlowRunFilterStateName(any_=["Paused"])))
            )
            runs = [r for r in runs if r.parameters.get("env") == ENV]
            if runs:
                return str(runs[0].id)
            time.sleep(0.5)
    raise AssertionError("no paused rollout appeared")


def test_approval_gate_and_one_rollout_at_a_time(ops: Sandbox) -> None:
    from prefect.flow_runs import resume_flow_run

    from flows.rollout import rollout
    from mlflow_rollout.locks import EnvironmentBusyError

    _edit_env(ops, mlflow__workers=2)
    data = yaml.safe_load((ops.env_dir / f"{ENV}.yaml").read_text())
    data["approval"] = "required"
    (ops.env_dir / f"{ENV}.yaml").write_text(yaml.safe_dump(data))
    before = _target().current_revision().number
    secrets_dir = Path(_target().status()["state_dir"]) / "secrets"
    secrets_before = {p.name: p.stat().st_mtime_ns for p in secrets_dir.iterdir()}

    def run_in_thread(results: dict) -> threading.Thread:
        def go():
            try:
                results["value"] = rollout(env=ENV, return_state=True)
            except BaseException as exc:  # pragma: no cover - reported by the assertion below
                results["error"] = exc
        t = threading.Thread(target=go)
        t.start()
        return t

    try:
        # 1. a rollout pauses for approval; meanwhile a second rollout of the same env is refused
        first: dict = {}
        t1 = run_in_thread(first)
        run_id = _paused_run_id()
        with pytest.raises(EnvironmentBusyError, match="another rollout or rollback of environment 'ops'"):
            rollout(env=ENV)
        # 2. reject: the run ends, nothing changed
        resume_flow_run(run_id, run_input={"approve": False, "comment": "not today"})
        t1.join(120)
        state = first["value"]
        assert state.is_cancelled() and "not today" in state.message
        assert _target().current_revision().number == before
        assert {p.name: p.stat().st_mtime_ns for p in secrets_dir.iterdir()} == secrets_before

        # 3. approve: the run continues and completes
        second: dict = {}
        t2 = run_in_thread(second)
        run_id = _paused_run_id()
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            plan = [a for a in client.read_artifacts() if a.key == f"mlflow-rollout-{ENV}-plan"]
        assert plan and "Stages:" in plan[0].data
        resume_flow_run(run_id, run_input={"approve": True, "comment": "go"})
        t2.join(300)
        assert "error" not in second, second.get("error")
        assert second["value"].is_completed()
    finally:
        data["approval"] = "none"
        (ops.env_dir / f"{ENV}.yaml").write_text(yaml.safe_dump(data))
