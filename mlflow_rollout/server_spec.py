"""What MLflow server to run, independent of where it runs.

A :class:`ServerSpec` holds every *non-secret* choice (auth on/off, workers,
artifact destination, allowed hosts …). It is what a revision records, what a
rollback restores, and what both targets turn into a process: the local
target into ``mlflow server`` argv + env, the chart into the container's
``args`` + ``env`` (a test renders the chart and compares the two).

Secrets never enter the spec: they reach the server as environment variables
from the target's secret store (a Kubernetes Secret, or 0600 files locally),
under the names in :data:`SECRET_ENV`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, SecretStr

__all__ = [
    "ServerSpec",
    "SecretBundle",
    "SECRET_ENV",
    "SECRET_KEYS",
    "render_auth_ini",
]

#: Environment variable the server reads → key in the target's secret store
#: (the keys are the chart's ``existingSecret`` contract).
SECRET_ENV: dict[str, str] = {
    "MLFLOW_BACKEND_STORE_URI": "backend-store-uri",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask-secret-key",
    "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-password",
}
#: Every key of the secret store; ``basic_auth.ini`` is mounted as a file
#: because ``database_uri`` can only be set in the ini (DESIGN §4.6).
SECRET_KEYS = ("backend-store-uri", "auth-database-uri", "admin-password", "flask-secret-key", "basic_auth.ini")


class SecretBundle(BaseModel):
    """The secret values a deploy needs; produced by the secrets stage, never logged."""

    model_config = ConfigDict(frozen=True)

    admin_password: SecretStr
    flask_secret_key: SecretStr
    backend_store_uri: SecretStr
    auth_database_uri: SecretStr

    def store_items(self, auth_ini: str) -> dict[str, str]:
        """What a target's secret store holds, by :data:`SECRET_KEYS` (the chart's existingSecret contract).

        Both targets write exactly this map — files under ``secrets/`` locally,
        the keys of the existingSecret on Kubernetes — so the contract is
        written once.
        """
        items = {
            "backend-store-uri": self.backend_store_uri.get_secret_value(),
            "auth-database-uri": self.auth_database_uri.get_secret_value(),
            "admin-password": self.admin_password.get_secret_value(),
            "flask-secret-key": self.flask_secret_key.get_secret_value(),
            "basic_auth.ini": auth_ini,
        }
        assert tuple(items) == SECRET_KEYS
        return items


class ServerSpec(BaseModel):
    """The non-secret description of one MLflow server deployment."""

    model_config = ConfigDict(frozen=True)

    auth: bool
    workers: int
    artifacts_destination: str
    allowed_hosts: tuple[str, ...]
    cors_allowed_origins: tuple[str, ...]
    admin_username: str
    default_permission: str
    auth_cache_ttl_seconds: int
    job_execution: bool
    #: Display form of the backend store (password replaced by ``***``); a
    #: change of database shows as a change of spec.
    backend_store: str
    s3_endpoint_url: str | None = None
    #: Target-specific, non-secret facts of the deployment (e.g. the IRSA role
    #: and certificate ARN on Kubernetes); part of the spec so a change shows.
    platform: dict[str, str] = {}

    def server_args(self) -> list[str]:
        """``mlflow server`` flags shared by every target (host/port/TLS excluded)."""
        args = [
            "--workers", str(self.workers),
            "--serve-artifacts",
            "--artifacts-destination", self.artifacts_destination,
        ]
        if self.auth:
            args += ["--app-name", "basic-auth"]
        args += [
            "--allowed-hosts", ",".join(self.allowed_hosts),
            "--cors-allowed-origins", ",".join(self.cors_allowed_origins),
        ]
        return args

    def plain_env(self) -> dict[str, str]:
        """Non-secret environment for the server process."""
        env = {
            "MLFLOW_AUTH_ADMIN_USERNAME": self.admin_username,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "true" if self.job_execution else "false",
        }
        if self.s3_endpoint_url:
            env["MLFLOW_S3_ENDPOINT_URL"] = self.s3_endpoint_url
        return env


def render_auth_ini(spec: ServerSpec, auth_database_uri: SecretStr) -> str:
    """The basic-auth ini. It holds the auth DB URI, so it is a secret itself.

    ``configparser`` interpolates ``%``: a percent-encoded password must be
    written ``%%`` (DESIGN §4.6). No admin password here: it comes from
    ``MLFLOW_AUTH_ADMIN_PASSWORD`` and only matters at the first start.
    """
    uri = auth_database_uri.get_secret_value().replace("%", "%%")
    return (
        "[mlflow]\n"
        f"default_permission = {spec.default_permission}\n"
        f"database_uri = {uri}\n"
        f"admin_username = {spec.admin_username}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        f"auth_cache_ttl_seconds = {spec.auth_cache_ttl_seconds}\n"
    )
