"""The smoke-check stages, shared by the rollout and the rollback flows.

Each stage is a retried Prefect task (transient errors only). They check the
server *as deployed by* ``spec``: smoke-https through the public name (its
certificate), the others through the target's access endpoint (the load
balancer, the in-cluster Service, or a port-forward — see
``kubernetes.access``), so a first install is verified before DNS. The auth stage is never skipped: a server
answering without auth fails it, whatever the revision says (DESIGN §4.18).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr

from mlflow_rollout.errors import AuthError
from mlflow_rollout.server_spec import ServerSpec
from mlflow_rollout.settings import EnvironmentSettings
from mlflow_rollout.stages import stage_task
from targets import Target
from tasks import checks, s3

__all__ = ["SMOKE_STAGES", "run_smoke_checks", "artifact_probe"]

SMOKE_STAGES = ["smoke-https", "smoke-auth", "smoke-tracking", "smoke-artifacts", "smoke-logging"]


def artifact_probe(settings: EnvironmentSettings, spec: ServerSpec) -> checks.ArtifactProbe:
    """Where a proxied artifact lands: a bucket (found with boto3) or a directory."""
    dest = spec.artifacts_destination
    if dest.startswith("s3://"):
        bucket, _, prefix = dest.removeprefix("s3://").partition("/")
        return s3.s3_artifact_probe(bucket, prefix, settings.aws.region, spec.s3_endpoint_url)
    return checks.local_artifact_probe(Path(dest))


@stage_task("smoke-https", retries=3, retry_delay_seconds=[2, 5, 10])
def smoke_https(settings: EnvironmentSettings, target: Target) -> str:
    return checks.check_https(target.endpoint(), settings.smoke.min_certificate_days)


@stage_task("smoke-auth", retries=3, retry_delay_seconds=[2, 5, 10])
def smoke_auth(target: Target, spec: ServerSpec, password: SecretStr) -> str:
    if not spec.auth:
        raise AuthError("this revision runs with auth off: MLflow must never serve without auth")
    return checks.check_auth(target.access_endpoint(), spec.admin_username, password)


@stage_task("smoke-tracking", retries=3, retry_delay_seconds=[2, 5, 10])
def smoke_tracking(settings: EnvironmentSettings, target: Target, spec: ServerSpec, password: SecretStr) -> str:
    return checks.check_tracking(target.access_endpoint(), spec.admin_username, password,
                                 settings.smoke.experiment_name)


@stage_task("smoke-artifacts", retries=3, retry_delay_seconds=[2, 5, 10])
def smoke_artifacts(settings: EnvironmentSettings, target: Target, spec: ServerSpec, password: SecretStr) -> str:
    return checks.check_artifacts(
        target.access_endpoint(), spec.admin_username, password, settings.smoke.experiment_name,
        artifact_probe(settings, spec),
    )


@stage_task("smoke-logging", retries=2, retry_delay_seconds=[3, 5])
def smoke_logging(target: Target, spec: ServerSpec, mark: str) -> str:
    return checks.check_logs(target.logs_since(mark), spec.workers)


def run_smoke_checks(
    settings: EnvironmentSettings, target: Target, spec: ServerSpec, password: SecretStr, mark: str
) -> None:
    """All smoke stages in order; the first failure raises."""
    smoke_https(settings, target)
    smoke_auth(target, spec, password)
    smoke_tracking(settings, target, spec, password)
    smoke_artifacts(settings, target, spec, password)
    smoke_logging(target, spec, mark)
