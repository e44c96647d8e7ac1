"""Flow ``mlflow-rollback``: go back to an earlier revision, verified, from the UI.

The parameters are one pydantic model, so the Prefect UI renders a form with
the environment, the revision (empty: the previous good one) and a required
reason for the audit trail. The flow shows the revision history as a table
artifact, refuses an unknown revision before anything changes (naming the
valid ones), rolls back (``helm rollback --wait`` on Kubernetes, the revision's
spec again on the local target — both as a *new* revision), re-runs the smoke
checks against what now runs, and reports.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel, Field

from flows.smoke import SMOKE_STAGES, run_smoke_checks
from mlflow_rollout.errors import BadInputError
from mlflow_rollout.locks import operation_lock
from mlflow_rollout.redact import install_log_redaction, redact
from mlflow_rollout.settings import EnvironmentSettings, load_environment
from mlflow_rollout.stages import ledger, stage_task
from targets import Revision, Target, get_target, status_or_error
from tasks import report

__all__ = ["RollbackRequest", "rollback", "choose_revision", "STAGES"]

STAGES = ["history", "rollback", *SMOKE_STAGES, "report"]


class RollbackRequest(BaseModel):
    """What to roll back, to where, and why."""

    environment: str = Field(default="local", description="Environment name (environments/<name>.yaml)")
    revision: int | None = Field(
        default=None, ge=1, description="Revision to go back to; empty: the previous good revision"
    )
    reason: str = Field(min_length=3, description="Why (kept in the revision history and the report)")


@stage_task("history")
def history(settings: EnvironmentSettings, target: Target, wanted: int | None) -> Revision:
    """Publish the history; pick and validate the revision to go back to."""
    revisions = target.history()
    current = target.current_revision()
    candidates = target.rollback_candidates()
    create_table_artifact(
        key=f"mlflow-revisions-{settings.name}",
        table=[
            {
                "revision": r.number, "status": r.status, "auth": r.spec.auth, "workers": r.spec.workers,
                "created": r.created_at.isoformat(timespec="seconds"), "description": redact(r.description)[:200],
                "current": bool(current and r.number == current.number),
            }
            for r in revisions
        ],
        description=f"MLflow revision history of {settings.name}",
    )
    return choose_revision(settings.name, revisions, current, candidates, wanted)


def choose_revision(
    env: str, revisions: list[Revision], current: Revision | None, candidates: list[Revision], wanted: int | None
) -> Revision:
    """The revision to go back to, or a :class:`BadInputError` that names why not and the valid ones.

    Never an auth-off revision (DESIGN §4.18): the first install's bootstrap
    is not a rollback target, by default or on request.
    """
    valid = [r.number for r in candidates]
    valid_text = ", ".join(str(v) for v in valid) or "none"
    if wanted is None:
        if not candidates:
            bootstrap = [r.number for r in revisions if r.bootstrap]
            note = (f" (revision {', '.join(map(str, bootstrap))} ran with auth off and is never a rollback target)"
                    if bootstrap else "")
            raise BadInputError(f"environment {env!r} has no earlier good revision with auth on to roll back to{note}")
        return candidates[0]
    if wanted in valid:
        return next(r for r in candidates if r.number == wanted)
    known = {r.number: r for r in revisions}
    rev = known.get(wanted)
    if rev is None:
        why = "it does not exist"
    elif current is not None and wanted == current.number:
        why = "it is the current revision"
    elif rev.bootstrap:
        why = ("it ran with auth off (the first install's bootstrap): rolling back to it would serve MLflow "
               "without authentication")
    elif rev.status in ("failed", "interrupted", "pending"):
        why = f"it never deployed successfully ({rev.status})"
    else:
        why = "it is not a good earlier revision"
    raise BadInputError(f"cannot roll back {env!r} to revision {wanted}: {why}; valid revisions: {valid_text}")


@stage_task("rollback", retries=1, retry_delay_seconds=5)
def do_rollback(target: Target, revision: Revision, reason: str) -> str:
    get_run_logger().info("rolling back to revision %s: %s", revision.number, reason)
    return target.rollback(revision.number, reason).detail


@stage_task("report")
def report_stage(settings: EnvironmentSettings, target: Target, ok: bool, error: str | None, extra: dict) -> str:
    return report.publish(settings, status_or_error(target), ledger().records(), ok=ok, error=error, operation="rollback", extra=extra)


@flow(name="mlflow-rollback", log_prints=False, validate_parameters=True)
def rollback(request: RollbackRequest) -> dict[str, Any]:
    """Roll ``request.environment`` back to ``request.revision`` (default: the previous good one)."""
    install_log_redaction()
    settings = load_environment(request.environment)
    target = get_target(settings)
    with operation_lock(settings, target, operation="rollback"):
        led = ledger()
        led.plan(STAGES)
        mark = target.log_mark()
        error: BaseException | None = None
        extra = {"reason": request.reason}
        try:
            chosen = history(settings, target, request.revision)
            extra["to_revision"] = str(chosen.number)
            do_rollback(target, chosen, request.reason)
            run_smoke_checks(settings, target, chosen.spec, target.admin_password(), mark)
        except BaseException as exc:
            error = exc
        led.skip_pending("not reached", keep="report")
        report_stage(settings, target, ok=error is None, error=redact(str(error)) if error else None, extra=extra)
        if error is not None:
            raise error
        return target.status()

#: The entrypoint name ``prefect deploy -n mlflow-rollback/<env>`` looks for (flow name, ``-`` → ``_``).
mlflow_rollback = rollback
