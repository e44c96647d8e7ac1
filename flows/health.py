"""Flow ``mlflow-health``: one verification pass, scheduled by its deployment.

Unlike the rollout's smoke stages, a health pass does not stop at the first
failure: every check runs, the pass is a table artifact, and the outcome is
an event — ``mlflow.health.ok`` or ``mlflow.health.degraded`` with the failing
checks and the diagnosis (:mod:`mlflow_rollout.diagnosis`: named causes and
fixes) in its payload — that automations key on (a repeated ``degraded`` can
start a notification or the rollback deployment). A degraded pass ends the
flow run Failed so it is red in the UI too.

Checks: HTTPS and certificate days left, auth posture, a tracking read, an
optional artifact round trip, processes/pods ready and restarts, DNS still
pointing at the current load balancer (kubernetes only), and new
ERROR/Traceback lines in the server logs since the previous pass (the log
position is kept in a Prefect Variable per environment).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.events import emit_event
from prefect.variables import Variable
from pydantic import BaseModel, Field

from flows.smoke import artifact_probe
from mlflow_rollout.errors import PermanentError, RolloutError
from mlflow_rollout.redact import install_log_redaction, redact
from mlflow_rollout.settings import EnvironmentSettings, load_environment
from mlflow_rollout.diagnosis import summary_line
from targets import Target, get_target
from targets.base import findings
from tasks import checks

__all__ = ["HealthRequest", "health", "CheckResult"]


class HealthRequest(BaseModel):
    environment: str = Field(default="local", description="Environment name (environments/<name>.yaml)")
    artifact_round_trip: bool = Field(default=False, description="Also upload and find an artifact")


class CheckResult(BaseModel):
    check: str
    ok: bool | None  # None: not applicable (skipped)
    detail: str


def _run(name: str, fn, *args) -> CheckResult:
    try:
        return CheckResult(check=name, ok=True, detail=fn(*args))
    except RolloutError as exc:
        return CheckResult(check=name, ok=False, detail=redact(str(exc))[:500])
    except Exception as exc:  # a health pass reports, it does not crash
        return CheckResult(check=name, ok=False, detail=redact(f"{type(exc).__name__}: {exc}")[:500])


def _mark_variable(env: str) -> str:
    return f"mlflow_health_{env.replace('-', '_')}_log_mark"


def _processes(target: Target) -> str:
    states = target.processes()
    bad = [p for p in states if not p.ready or p.restarts]
    if bad:
        raise PermanentError(
            "; ".join(f"{p.name}: {'ready' if p.ready else 'not ready'}, {p.restarts} restarts {p.detail}".strip() for p in bad)
        )
    return f"{len(states)} ready, no restarts"


def _artifact_canary(settings: EnvironmentSettings, endpoint, user: str, password) -> str:
    """Read back the canary an earlier pass logged (kept in a Prefect Variable); log one on the first pass."""
    var = f"mlflow_health_{settings.name.replace('-', '_')}_canary"
    canary = Variable.get(var, default=None)
    if not canary:
        Variable.set(var, checks.create_artifact_canary(endpoint, user, password, settings.smoke.experiment_name),
                     overwrite=True)
        return "first pass: canary artifact logged; later passes read it back"
    return checks.check_artifact_canary(endpoint, user, password, canary)


def _new_log_errors(target: Target, env: str) -> str:
    var = _mark_variable(env)
    previous = Variable.get(var, default=None)
    now = target.log_mark()
    sources = target.logs_since(previous if previous is not None else now)
    Variable.set(var, now, overwrite=True)
    if previous is None:
        return "first pass: log position recorded"
    errors = [line for src in sources for line in checks.error_lines(src.text)]
    if errors:
        raise PermanentError(f"{len(errors)} new error line(s) since the previous pass, first: {redact(errors[0])[:300]}")
    return "no new ERROR/Traceback lines since the previous pass"


@flow(name="mlflow-health", log_prints=False, validate_parameters=True)
def health(request: HealthRequest = HealthRequest()) -> dict[str, Any]:
    """One health pass over ``request.environment``.

    Everything that reads the outside world — the endpoint, the current
    revision, the admin password — is read inside a check: a Kubernetes or
    helm API that fails is an outage like any other, so it becomes a failing
    check and a ``degraded`` event, never a run that ends without one.
    """
    install_log_redaction()
    settings = load_environment(request.environment)
    target = get_target(settings)
    logger = get_run_logger()
    results: list[CheckResult] = []
    seen: dict[str, Any] = {}

    def read_server() -> str:
        seen["endpoint"] = target.endpoint()
        seen["current"] = current = target.current_revision()
        if current is None:
            raise PermanentError("nothing is deployed")
        seen["password"] = target.admin_password()
        return f"revision {current.number} ({'auth on' if current.spec.auth else 'auth OFF'}) at {seen['endpoint'].url}"

    results.append(_run("revision", read_server))
    endpoint, current = seen.get("endpoint"), seen.get("current")
    if endpoint is not None:
        results.append(_run("https", checks.check_https, endpoint, settings.smoke.min_certificate_days))
    if current is not None and "password" in seen:
        password = seen["password"]
        user = current.spec.admin_username
        if current.spec.auth:
            results.append(_run("auth", checks.check_auth, endpoint, user, password))
        else:
            results.append(CheckResult(check="auth", ok=False, detail=f"revision {current.number} runs with auth OFF"))
        results.append(_run("tracking-read", checks.check_tracking_read, endpoint, user, password))
        if request.artifact_round_trip:
            results.append(_run(
                "artifacts", checks.check_artifacts, endpoint, user, password, settings.smoke.experiment_name,
                artifact_probe(settings, current.spec),
            ))
            results.append(_run("artifact-canary", _artifact_canary, settings, endpoint, user, password))
    results.append(_run("processes", _processes, target))
    results.append(_dns(settings, target))
    results.append(_run("log-errors", _new_log_errors, target, settings.name))

    failing = [r for r in results if r.ok is False]
    label = {True: "ok", False: "failed", None: "n/a"}
    for r in results:
        logger.info("%-14s %s  %s", r.check, label[r.ok], r.detail)
    create_table_artifact(
        key=f"mlflow-health-{settings.name}",
        table=[{"check": r.check, "status": label[r.ok], "detail": r.detail} for r in results],
        description=f"MLflow health pass for {settings.name}",
    )
    outcome = "degraded" if failing else "ok"
    found = findings(target) if failing else []  # what the runbook's troubleshooting would name, by rule
    for f in found:
        logger.warning("diagnosis %s", f.line())
    emit_event(
        event=f"mlflow.health.{outcome}",
        resource={"prefect.resource.id": f"mlflow-rollout.environment.{settings.name}", "prefect.resource.name": settings.name},
        payload={
            "environment": settings.name,
            "url": endpoint.url if endpoint is not None else None,
            "revision": current.number if current else None,
            "failing_checks": [{"check": r.check, "detail": r.detail} for r in failing],
            "diagnosis": [{"rule": f.rule, "cause": f.cause, "fix": f.fix} for f in found],
        },
    )
    summary = {"environment": settings.name, "outcome": outcome, "checks": [r.model_dump() for r in results]}
    if failing:
        line = summary_line(found)
        raise PermanentError(
            f"{settings.name} is degraded: " + "; ".join(f"{r.check}: {r.detail}" for r in failing)
            + (f"\n{line}" if line else "")
        )
    return summary


def _dns(settings: EnvironmentSettings, target: Target) -> CheckResult:
    """The public name still points at the server; not applicable where the target publishes none."""
    result: dict[str, str | None] = {}

    def verify() -> str:
        result["detail"] = target.verify_dns()
        return result["detail"] or ""

    checked = _run("dns", verify)
    if checked.ok and result.get("detail") is None:
        return CheckResult(check="dns", ok=None, detail=f"{settings.target} target has no DNS record")
    return checked


#: The entrypoint name ``prefect deploy -n mlflow-health/<env>`` looks for (flow name, ``-`` → ``_``).
mlflow_health = health
