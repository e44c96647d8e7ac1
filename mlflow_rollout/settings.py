"""Per-environment settings: ``environments/<name>.yaml`` → a validated model.

The file holds *no secret values*. Where a secret is needed the file names a
:class:`SecretRef`: an environment variable, a Prefect Secret block, or (for
the ``local`` target only) "generate once and keep in the state directory".

A file that does not validate raises :class:`BadInputError` naming the file,
the key path and what was expected, before any stage runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mlflow_rollout.errors import BadInputError

__all__ = [
    "PROJECT_ROOT",
    "SecretRef",
    "TerraformFileSource",
    "TerraformCliSource",
    "TerraformS3StateSource",
    "TerraformSource",
    "MlflowSettings",
    "LocalSettings",
    "SecretsSettings",
    "SmokeSettings",
    "AwsSettings",
    "KubernetesSettings",
    "PermissionGrant",
    "UserDeclaration",
    "EnvironmentSettings",
    "environments_dir",
    "load_environment",
]

#: The checkout (or installed tree) this package lives in; relative paths in
#: environment files are resolved against the directory of the file's parent.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class _Model(BaseModel):
    # Unknown keys are typos: reject them rather than ignore a setting.
    model_config = ConfigDict(extra="forbid", frozen=True)


class SecretRef(_Model):
    """Where a secret value comes from. Exactly one of the fields is set.

    ``env``: the name of an environment variable.
    ``prefect_secret``: the name of a ``prefect.blocks.system.Secret`` block.
    ``generate``: make a random value once and keep it in the state directory
    (mode 0600); only the ``local`` target accepts it.
    """

    env: str | None = None
    prefect_secret: str | None = None
    generate: bool = False

    @model_validator(mode="after")
    def _exactly_one(self) -> "SecretRef":
        chosen = [bool(self.env), bool(self.prefect_secret), self.generate]
        if sum(chosen) != 1:
            raise ValueError("set exactly one of 'env', 'prefect_secret' or 'generate: true'")
        return self

    def describe(self) -> str:
        """A human description that never contains the value."""
        if self.env:
            return f"environment variable {self.env}"
        if self.prefect_secret:
            return f"Prefect Secret block {self.prefect_secret!r}"
        return "generated once, kept in the state directory"


class TerraformFileSource(_Model):
    """An outputs JSON file (``terraform output -json`` format, or a flat map)."""

    source: Literal["file"] = "file"
    path: Path


class TerraformCliSource(_Model):
    """``terraform -chdir=DIR output -json`` with the real terraform binary."""

    source: Literal["cli"] = "cli"
    dir: Path
    binary: str = "terraform"
    timeout_seconds: float = 120


class TerraformS3StateSource(_Model):
    """The state object of an S3 backend, read with boto3 (no terraform binary)."""

    source: Literal["s3"] = "s3"
    bucket: str
    key: str
    region: str = "us-west-2"
    #: S3-compatible or test endpoint (moto); None means AWS itself.
    endpoint_url: str | None = None


TerraformSource = Annotated[
    TerraformFileSource | TerraformCliSource | TerraformS3StateSource,
    Field(discriminator="source"),
]


class MlflowSettings(_Model):
    """How the MLflow server is configured; the same for every target."""

    #: The public name of the server (certificate SAN, allowed host, DNS name).
    host: str = "localhost"
    workers: int = Field(default=2, ge=1, le=64)
    admin_username: str = Field(default="admin", min_length=1)
    default_permission: Literal["READ", "EDIT", "MANAGE", "NO_PERMISSIONS"] = "READ"
    #: basic-auth verifies a PBKDF2 hash per request; the cache is a 5x
    #: throughput difference (DESIGN §4.14). 0 disables it.
    auth_cache_ttl_seconds: int = Field(default=60, ge=0)
    #: GenAI job runner + huey consumers: 3x memory and 5x start time; off
    #: unless a shared queue exists (DESIGN §4.16).
    job_execution: bool = False
    #: Seconds to wait for ``/health`` 200 after a (re)start.
    startup_timeout_seconds: float = Field(default=180, gt=0)


class LocalSettings(_Model):
    """The ``local`` target: MLflow processes on this machine."""

    bind_host: str = "127.0.0.1"
    port: int = Field(default=5443, ge=1, le=65535)
    #: ``sqlite``: a database in the state directory; ``terraform``: the
    #: PostgreSQL URI from the ``rds_connection_string`` output.
    backend_store: Literal["sqlite", "terraform"] = "sqlite"
    #: ``local``: a directory in the state directory; ``s3``: the bucket from
    #: the ``s3_bucket_name`` output (``s3_endpoint_url`` for S3-compatible stores).
    artifacts: Literal["local", "s3"] = "local"
    s3_endpoint_url: str | None = None
    #: Prefix inside the bucket for proxied artifacts.
    s3_prefix: str = "mlflow-artifacts"
    #: Default ``.mlflow-rollout/<env>`` under the working directory, or
    #: ``$MLFLOW_ROLLOUT_STATE_DIR/<env>`` when that variable is set.
    state_dir: Path | None = None


class SecretsSettings(_Model):
    """References to the secrets a rollout needs (never the values)."""

    admin_password: SecretRef
    flask_secret_key: SecretRef


class SmokeSettings(_Model):
    """The smoke checks' own footprint on the server."""

    experiment_name: str = "mlflow-rollout-smoke"
    #: Fail the https check when the certificate expires within this many days.
    min_certificate_days: int = Field(default=14, ge=0)


class AwsSettings(_Model):
    """AWS APIs (boto3 credential chain) and the DNS stage."""

    region: str = "us-west-2"
    #: One endpoint for every AWS API (S3, ACM, IAM, Route53, STS): an
    #: S3-compatible store or a test endpoint such as moto. None: AWS itself.
    endpoint_url: str | None = None
    #: Hosted zone that holds ``mlflow.host``; None: the longest matching zone.
    hosted_zone_name: str | None = None
    #: Preflight fails when the ACM certificate expires within this many days.
    certificate_min_days: int = Field(default=30, ge=0)
    #: ``cname`` to the load balancer's name, or an ``alias`` A record to the ALB.
    dns_record: Literal["cname", "alias"] = "cname"
    dns_ttl: int = Field(default=60, ge=1)
    #: Resolvers (``ip`` or ``ip:port``) the dns stage asks; empty: the system's.
    dns_resolvers: list[str] = []
    dns_timeout_seconds: float = Field(default=600, gt=0)
    #: Seconds before the dns stage's second and third attempts: time for a
    #: throttled Route53 or a slow resolver to recover before trying again.
    dns_retry_delay_seconds: tuple[float, float] = (10.0, 30.0)


class KubernetesSettings(_Model):
    """The ``kubernetes`` target: helm + the Kubernetes API."""

    #: kubeconfig file and context; both None and ``in_cluster`` false: the default kubeconfig.
    kubeconfig: Path | None = None
    context: str | None = None
    in_cluster: bool = False
    namespace: str = "ml-platform"
    release: str = "mlflow"
    chart: Path = PROJECT_ROOT / "charts" / "mlflow"
    values_files: list[Path] = []
    #: Name of the Secret the chart reads (``existingSecret``); the secrets stage writes it.
    existing_secret: str = "mlflow-credentials"
    helm_binary: str = "helm"
    helm_timeout_seconds: int = Field(default=600, ge=30)
    #: How the runner reaches the server before DNS points at it (the
    #: deploy-auth login check): ``ingress`` — the load balancer's name,
    #: resolved with ``aws.dns_resolvers``, with the public host as TLS name
    #: and Host header; ``service`` — the in-cluster Service URL (the worker
    #: runs in the cluster; plain HTTP inside the cluster); ``port-forward`` —
    #: a runner on a laptop: a local port carried to a Ready server pod through
    #: the Kubernetes API (as ``kubectl port-forward`` does; needs ``create
    #: pods/portforward``), so a first install is verified before DNS and
    #: before the load balancer exists. The admin login after deploy-auth, the
    #: smoke checks but smoke-https (the public name's certificate), and the
    #: users flow go this way.
    access: Literal["ingress", "service", "port-forward"] = "ingress"
    #: Public HTTPS port of the load balancer (443; tests use another).
    public_port: int = Field(default=443, ge=1, le=65535)
    #: CA bundle for the public certificate; None: the system trust store (ACM certificates).
    ca_bundle: Path | None = None
    #: ``database``: the runner migrates the auth DB and creates/verifies the
    #: admin itself (it must reach the database, e.g. an in-cluster worker);
    #: ``first-start``: MLflow creates the admin at the auth app's first start
    #: and the runner only verifies the login after deploy-auth.
    admin_bootstrap: Literal["database", "first-start"] = "database"
    #: Prefix inside the bucket for proxied artifacts.
    artifacts_prefix: str = "mlflow-artifacts"
    #: Roll a release stuck in ``pending-*`` back to its last deployed revision in preflight.
    recover_stuck_release: bool = True
    #: Seconds to wait for the Ingress to get its load-balancer name.
    ingress_timeout_seconds: float = Field(default=600, gt=0)


class PermissionGrant(_Model):
    """One permission of a declared user on an experiment or a registered model."""

    resource_type: Literal["experiment", "registered_model"]
    #: Experiment name or registered model name.
    resource: str = Field(min_length=1)
    permission: Literal["READ", "EDIT", "MANAGE", "NO_PERMISSIONS"]


class UserDeclaration(_Model):
    """A user the ``mlflow-users`` flow keeps in place."""

    username: str = Field(min_length=1)
    password: SecretRef
    admin: bool = False
    permissions: list[PermissionGrant] = []


class EnvironmentSettings(_Model):
    """One ``environments/<name>.yaml`` file."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    target: Literal["local", "kubernetes"]
    terraform: TerraformSource
    mlflow: MlflowSettings = MlflowSettings()
    local: LocalSettings = LocalSettings()
    secrets: SecretsSettings
    smoke: SmokeSettings = SmokeSettings()
    aws: AwsSettings = AwsSettings()
    kubernetes: KubernetesSettings = KubernetesSettings()
    #: Users, admin flags and permissions the ``mlflow-users`` flow reconciles.
    users: list[UserDeclaration] = []
    #: Delete users that exist on the server but are not declared (never the admin).
    users_prune: bool = False
    #: ``required``: the rollout pauses for a typed approval before its first change.
    approval: Literal["none", "required"] = "none"
    approval_timeout_seconds: int = Field(default=3600, ge=10)
    #: When a stage after a deploy fails: roll back to the previous good
    #: revision, verify it, and end the run Failed with a diagnostics artifact.
    auto_rollback: bool = True
    #: How long a rollout/rollback waits for another one of this environment to finish.
    #: Long enough to outlast a dead holder's lease (lock_lease_seconds) and take over.
    lock_wait_seconds: float = Field(default=90, ge=0)
    #: A lock holder that stops renewing (killed, partitioned) loses the lock after this long.
    lock_lease_seconds: float = Field(default=60, ge=10, le=90)

    @model_validator(mode="after")
    def _generate_only_local(self) -> "EnvironmentSettings":
        # The Flask key may be generated on any target (kept in the target's
        # secret store); the admin password of a shared server must come from
        # a secret the team controls.
        if self.target != "local" and self.secrets.admin_password.generate:
            raise ValueError(
                "secrets.admin_password: 'generate: true' is only allowed for the local target; "
                "use 'env' or 'prefect_secret'"
            )
        return self


def environments_dir() -> Path:
    """Where ``--env NAME`` is looked up.

    ``$MLFLOW_ROLLOUT_ENVIRONMENTS_DIR`` if set, else ``./environments`` when it
    exists in the working directory, else the project's own ``environments/``.
    """
    override = os.environ.get("MLFLOW_ROLLOUT_ENVIRONMENTS_DIR")
    if override:
        return Path(override)
    cwd = Path.cwd() / "environments"
    if cwd.is_dir():
        return cwd
    return PROJECT_ROOT / "environments"


def _format_validation_error(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid settings"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-")) or "(top level)"
        # Drop the discriminator tag pydantic adds to union locations.
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def _resolve_paths(data: dict, base: Path) -> None:
    """Make relative paths in the file relative to the project dir it sits in."""
    tf = data.get("terraform")
    if isinstance(tf, dict):
        for key in ("path", "dir"):
            if isinstance(tf.get(key), str) and not Path(tf[key]).is_absolute():
                tf[key] = str(base / tf[key])
    kube = data.get("kubernetes")
    if isinstance(kube, dict):
        for key in ("chart", "kubeconfig", "ca_bundle"):
            if isinstance(kube.get(key), str) and not Path(kube[key]).is_absolute():
                kube[key] = str(base / kube[key])
        if isinstance(kube.get("values_files"), list):
            kube["values_files"] = [
                str(base / v) if isinstance(v, str) and not Path(v).is_absolute() else v
                for v in kube["values_files"]
            ]


def load_environment(name: str, directory: Path | None = None) -> EnvironmentSettings:
    """Load and validate ``<directory>/<name>.yaml``.

    Raises :class:`BadInputError` for an unknown name (listing the known ones),
    a YAML syntax error (with line and column) or a validation error (with the
    key path and what was expected).
    """
    directory = directory or environments_dir()
    path = directory / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in directory.glob("*.yaml")) if directory.is_dir() else []
        raise BadInputError(
            f"unknown environment {name!r}: no file {path}"
            + (f"; known environments: {', '.join(known)}" if known else "")
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc)
        raise BadInputError(f"{path}: YAML syntax error{where}: {problem}") from None
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: expected a mapping of settings at the top level")
    data.setdefault("name", name)
    if data["name"] != name:
        raise BadInputError(f"{path}: name: is {data['name']!r} but the file is for {name!r}")
    # Relative paths are relative to the directory that holds environments/.
    _resolve_paths(data, directory.parent)
    try:
        return EnvironmentSettings.model_validate(data)
    except ValidationError as err:
        raise BadInputError(_format_validation_error(path, err)) from None
