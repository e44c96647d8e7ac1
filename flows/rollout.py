"""Flow ``mlflow-rollout``: the runbook's rollout as retried, observable stages.

Order (the runbook's, corrected where it is wrong about MLflow — DESIGN §2, §4):

1. terraform-outputs  read and validate the infrastructure's outputs
2. preflight          cheap checks before anything changes
   approval           (``approval: required``) pause with a plan for a typed approve/reject
3. secrets            resolve secret references, write the target's secret store
4. deploy-no-auth     first install with auth off (skipped once auth runs)
5. admin-bootstrap    migrate the auth DB; the admin exists with the stored password
6. deploy-auth        auth on; the admin can log in
7. dns                point the name at the load balancer (skipped for local)
8. smoke-*            https, auth, tracking, artifacts, logging
9. report             markdown + table artifacts and an event

Every stage is safe to run again; a re-run after success changes nothing that
matters. The flow takes only the environment *name* as a parameter: secrets
never pass through parameters (they would show in the UI).
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger, pause_flow_run
from prefect.artifacts import create_markdown_artifact
from prefect.input import RunInput
from prefect.runtime import flow_run
from prefect.states import Cancelled
from pydantic import Field

from flows.smoke import SMOKE_STAGES, run_smoke_checks
from mlflow_rollout import diagnosis
from mlflow_rollout.errors import PermanentError, TransientError
from mlflow_rollout.locks import operation_lock
from mlflow_rollout.redact import install_log_redaction, redact
from mlflow_rollout.secrets import resolve_secret, validate_admin_password
from mlflow_rollout.server_spec import SecretBundle, ServerSpec, render_auth_ini
from mlflow_rollout.settings import EnvironmentSettings, load_environment
from mlflow_rollout.stages import Skip, ledger, stage_task
from targets import Revision, Target, get_target, status_or_error
from targets.base import findings
from tasks import checks, report, s3, terraform

__all__ = ["rollout", "STAGES"]

STAGES = [
    "terraform-outputs", "preflight", "approval", "secrets", "deploy-no-auth", "admin-bootstrap",
    "deploy-auth", "dns", *SMOKE_STAGES, "report",
]


@stage_task("terraform-outputs", retries=2, retry_delay_seconds=[2, 5])
def terraform_outputs(settings: EnvironmentSettings) -> terraform.TerraformOutputs:
    outputs = terraform.read_outputs(settings.terraform)
    get_run_logger().info(
        "outputs from %s: bucket=%s role=%s db=%s", outputs.source, outputs.s3_bucket_name,
        outputs.mlflow_irsa_role_arn, terraform.redacted_connection_string(outputs),
    )
    return outputs


@stage_task("preflight", retries=2, retry_delay_seconds=[2, 5])
def preflight(settings: EnvironmentSettings, target: Target, outputs: terraform.TerraformOutputs) -> str:
    notes = target.preflight(outputs)
    spec = target.server_spec(outputs, auth=False)
    if spec.artifacts_destination.startswith("s3://"):
        notes.append(s3.check_bucket(outputs.s3_bucket_name, settings.aws.region, spec.s3_endpoint_url))
    for n in notes:
        get_run_logger().info("preflight: %s", n)
    return "; ".join(notes[-2:])


@stage_task("secrets", retries=2, retry_delay_seconds=[2, 5])
def secrets(settings: EnvironmentSettings, target: Target, outputs: terraform.TerraformOutputs) -> SecretBundle:
    refs = settings.secrets
    admin = resolve_secret(
        refs.admin_password, label="secrets.admin_password",
        generated=lambda: target.generated_secret("admin-password"),
    )
    validate_admin_password(admin, refs.admin_password)
    flask_key = resolve_secret(
        refs.flask_secret_key, label="secrets.flask_secret_key",
        generated=lambda: target.generated_secret("flask-secret-key"),
    )
    backend, auth_db = target.database_uris(outputs)
    bundle = SecretBundle(
        admin_password=admin, flask_secret_key=flask_key, backend_store_uri=backend, auth_database_uri=auth_db
    )
    changed = target.store_secrets(bundle, render_auth_ini(target.server_spec(outputs, auth=True), auth_db))
    get_run_logger().info(
        "secrets: admin password from %s, Flask key from %s; store %s",
        refs.admin_password.describe(), refs.flask_secret_key.describe(), "updated" if changed else "unchanged",
    )
    return bundle


@stage_task("deploy-no-auth", retries=1, retry_delay_seconds=5)
def deploy_no_auth(target: Target, spec: ServerSpec) -> str:
    """The first install's bootstrap, with auth off — only while auth has never been on.

    Whether auth has been on is read from the data (DESIGN §4.18), not from the
    revision history, so a lost revision file or release history cannot
    reopen the auth-off window.
    """
    current = target.current_revision()
    if current is not None and current.spec.auth:
        raise Skip(f"revision {current.number} already runs with auth on")
    if target.auth_ever_enabled():
        raise Skip("auth has been on for this environment (its auth data has users): no auth-off bootstrap")
    result = target.deploy(spec)
    return result.detail


@stage_task("admin-bootstrap", retries=2, retry_delay_seconds=[2, 5])
def admin_bootstrap(target: Target, username: str) -> str:
    return target.bootstrap_admin(username)


@stage_task("deploy-auth", retries=1, retry_delay_seconds=5)
def deploy_auth(target: Target, spec: ServerSpec, bundle: SecretBundle) -> str:
    result = target.deploy(spec)
    checks.check_admin_login(target.access_endpoint(), spec.admin_username, bundle.admin_password)
    target.mark_auth_enabled()  # the one-way switch: from now on nothing serves this environment without auth
    return f"{result.detail}; admin login verified" + ("" if result.changed else " (unchanged)")


@stage_task("dns", retries=2, retry_delay_seconds=[10, 30])
def dns(settings: EnvironmentSettings, target: Target) -> str:
    result = target.publish_dns()
    if result is None:
        raise Skip(f"{settings.target} target has no DNS record: the server answers at {target.endpoint().url}")
    return result


class _Diagnosed:
    """The diagnostics stage's result: the findings, and the stage's one-line summary."""

    def __init__(self, found: list[diagnosis.Finding], key: str):
        self.findings, self.key = found, key
        self.summary = (f"{diagnosis.summary_line(found)}; artifact {key}" if found
                        else f"no known cause recognised; artifact {key}")


@stage_task("diagnostics")
def diagnostics(settings: EnvironmentSettings, target: Target, failed: str) -> _Diagnosed:
    """What helps after a failure: the runbook's diagnoses by name, then events, statuses, log tails (redacted)."""
    key = f"mlflow-rollout-{settings.name}-diagnostics"
    found = findings(target)
    create_markdown_artifact(
        key=key, markdown=redact(f"# Diagnostics: `{failed}` failed\n\n" + diagnosis.markdown(found) + "\n"
                                 + target.diagnostics()),
        description=f"Diagnostics of a failed MLflow rollout of {settings.name}",
    )
    return _Diagnosed(found, key)


@stage_task("auto-rollback", retries=1, retry_delay_seconds=10)
def auto_rollback(settings: EnvironmentSettings, target: Target, previous: Revision, failed: str) -> str:
    """Back to the auth-on revision that ran before this rollout, then verify it answers as it should."""
    if not previous.spec.auth:
        raise PermanentError(f"revision {previous.number} ran with auth off: never a rollback target")
    result = target.rollback(previous.number, f"automatic: stage {failed} failed")
    endpoint, spec = target.endpoint(), previous.spec
    password = target.admin_password()
    verified = [checks.check_https(endpoint, settings.smoke.min_certificate_days)]
    verified.append(checks.check_auth(endpoint, spec.admin_username, password))
    verified.append(checks.check_tracking(endpoint, spec.admin_username, password, settings.smoke.experiment_name))
    get_run_logger().warning("rolled back after %s failed: %s; %s", failed, result.detail, "; ".join(verified))
    return f"{result.detail}; verified (https, auth, tracking)"


@stage_task("report")
def report_stage(settings: EnvironmentSettings, target: Target, ok: bool, error: str | None, extra: dict) -> str:
    return report.publish(settings, status_or_error(target), ledger().records(), ok=ok, error=error, extra=extra)


class Approval(RunInput):
    """The approver's answer to a paused rollout (rendered as a form in the UI)."""

    approve: bool = Field(default=False, description="Approve this rollout (false rejects it; nothing will have changed)")
    comment: str = Field(default="", description="Recorded in the run log")


class RolloutRejected(PermanentError):
    """The approver said no; nothing was changed."""


@stage_task("approval")
def approval(settings: EnvironmentSettings, target: Target, outputs: terraform.TerraformOutputs) -> str:
    """Pause before the first change with a plan artifact, for a typed approve/reject."""
    if settings.approval != "required":
        raise Skip("approval is not required for this environment")
    current = target.current_revision()
    new = target.server_spec(outputs, auth=True)
    report.plan_artifact(settings, STAGES, current, new)
    answer = pause_flow_run(wait_for_input=Approval, timeout=settings.approval_timeout_seconds, poll_interval=2)
    logger = get_run_logger()
    if not answer.approve:
        logger.warning("rollout rejected: %s", answer.comment or "(no comment)")
        raise RolloutRejected(f"rollout rejected by the approver: {answer.comment or 'no comment'}")
    logger.info("rollout approved: %s", answer.comment or "(no comment)")
    return f"approved: {answer.comment}" if answer.comment else "approved"


@flow(name="mlflow-rollout", log_prints=False, validate_parameters=True)
def rollout(env: str = "local") -> dict[str, Any]:
    """Roll out MLflow for environment ``env`` (``environments/<env>.yaml``)."""
    install_log_redaction()
    settings = load_environment(env)
    target = get_target(settings)
    with operation_lock(settings, target, operation="rollout"):
        return _rollout(settings, target)


def _rollout(settings: EnvironmentSettings, target: Target) -> Any:
    led = ledger()
    led.plan(STAGES)
    mark = target.log_mark()
    previous = _read_with_retry(target.current_revision)
    error: BaseException | None = None
    started = time.monotonic()
    deploying = False
    extra: dict[str, str] = {}
    try:
        outputs = terraform_outputs(settings)
        preflight(settings, target, outputs)
        approval(settings, target, outputs)
        bundle = secrets(settings, target, outputs)
        no_auth = target.server_spec(outputs, auth=False)
        with_auth = target.server_spec(outputs, auth=True)
        deploying = True
        deploy_no_auth(target, no_auth)
        admin_bootstrap(target, with_auth.admin_username)
        deploy_auth(target, with_auth, bundle)
        dns.with_options(retry_delay_seconds=list(settings.aws.dns_retry_delay_seconds))(settings, target)
        run_smoke_checks(settings, target, with_auth, bundle.admin_password, mark)
    except BaseException as exc:
        error = exc
    failed = next((r.name for r in led.records() if r.status == "failed"), None)
    if failed is None:
        failed = next((r.name for r in led.records() if r.status == "running"), "rollout")
        if error is not None:
            led.update(failed, status="failed", finished=time.monotonic(),
                       message=_interrupted(error) or redact(str(error)) or type(error).__name__)
    if error is not None and deploying:
        _after_failed_deploy(settings, target, previous, failed, extra, interrupted=_interrupted(error) is not None)
    led.skip_pending("not reached" if error else "", keep="report")
    report_stage(settings, target, ok=error is None, error=_interrupted(error) or (redact(str(error)) if error else None),
                 extra=extra)
    if isinstance(error, RolloutRejected):
        return Cancelled(message=str(error))
    if isinstance(error, Exception) and extra.get("diagnosis") and error.args and isinstance(error.args[0], str):
        # what happened, then — its last line, where the CLI's failure message and the run's state end — what to do
        error.args = (f"{error.args[0]}\n{extra['diagnosis']}", *error.args[1:])
    if error is not None:
        raise error
    status = target.status()
    status["duration_seconds"] = round(time.monotonic() - started, 1)
    status["flow_run_id"] = str(flow_run.id) if flow_run.id else None
    return status


def _read_with_retry(read):
    """A read before the first stage (what runs now), retried on transient errors for up to a minute."""
    from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

    for attempt in Retrying(stop=stop_after_delay(60), wait=wait_exponential(multiplier=1, max=10),
                            retry=retry_if_exception_type(TransientError), reraise=True):
        with attempt:
            return read()
    raise AssertionError("unreachable")


def _interrupted(error: BaseException | None) -> str | None:
    """A one-line description when ``error`` is an interruption (Ctrl-C, SIGTERM), else None."""
    if error is None or isinstance(error, Exception):
        return None
    return f"interrupted ({type(error).__name__})"

#: The entrypoint name ``prefect deploy -n mlflow-rollout/<env>`` looks for (flow name, ``-`` → ``_``).
mlflow_rollout = rollout


def _after_failed_deploy(
    settings: EnvironmentSettings, target: Target, previous: Revision | None, failed: str, extra: dict[str, str],
    *, interrupted: bool = False,
) -> None:
    """Leave a known state: no auth-off server, diagnostics, then (when possible) the previous revision.

    Failures here are recorded, never raised: the run already fails with the
    original error, which is the one the operator must see. An interrupted
    run (Ctrl-C, SIGTERM) only removes an auth-off bootstrap and ends: the
    operator asked it to stop, and the next rollout finishes the job.
    """
    logger = get_run_logger()
    try:
        done = target.discard_bootstrap()
        if done:
            extra["bootstrap"] = done
    except Exception as exc:
        extra["bootstrap"] = f"FAILED to remove the auth-off bootstrap: {redact(str(exc))[:300]}"
        logger.error("could not remove the auth-off bootstrap: %s", redact(str(exc)))
    if interrupted:
        extra["auto_rollback"] = "not attempted: the run was interrupted; run the rollout again"
        return
    try:
        diagnosed = diagnostics(settings, target, failed)
        line = diagnosis.summary_line(diagnosed.findings)
        if line:
            extra["diagnosis"] = line
    except Exception as exc:
        extra["diagnostics"] = f"unavailable: {redact(str(exc))[:200]}"
        logger.warning("diagnostics unavailable: %s", redact(str(exc)))
    try:
        history = target.history()
    except Exception as exc:
        extra["auto_rollback"] = f"not attempted: the revision history is unreadable ({redact(str(exc))[:200]})"
        return
    latest = history[-1].number if history else None
    if not settings.auto_rollback:
        extra["auto_rollback"] = "off for this environment"
    elif previous is None:
        extra["auto_rollback"] = "nothing to roll back to (first install)"
    elif not previous.spec.auth:
        extra["auto_rollback"] = f"nothing to roll back to: revision {previous.number} is the auth-off bootstrap"
    elif latest == previous.number:
        extra["auto_rollback"] = f"not needed: this run made no new revision, {previous.number} still runs"
    else:
        try:
            extra["auto_rollback"] = auto_rollback(settings, target, previous, failed)
        except Exception as exc:
            extra["auto_rollback"] = f"FAILED: {redact(str(exc))[:300]}"


if __name__ == "__main__":
    rollout()

