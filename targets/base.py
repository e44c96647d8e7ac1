"""The one small interface the flows drive; ``local`` and ``kubernetes`` implement it.

Flows never ask which target they hold. Everything a stage needs from "where
MLflow runs" is here: put the secrets in place, deploy a spec as a new
revision, make sure the admin exists, say how to reach the server, hand over
the server logs since a mark, and list past revisions.
"""

from __future__ import annotations

import datetime as dt
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, SecretStr

from mlflow_rollout.server_spec import SecretBundle, ServerSpec
from mlflow_rollout.types import LockHolder

if TYPE_CHECKING:
    from tasks.terraform import TerraformOutputs

__all__ = [
    "Revision",
    "DeployResult",
    "Endpoint",
    "LogSource",
    "ProcessState",
    "LockHolder",
    "Target",
]


class Revision(BaseModel):
    """One deploy: a number, the spec it ran, and what became of it."""

    number: int
    spec: ServerSpec
    created_at: dt.datetime
    #: ``interrupted``: a deploy whose runner died before it could say how it ended.
    status: Literal["deployed", "superseded", "failed", "pending", "interrupted"]
    description: str = ""

    @property
    def bootstrap(self) -> bool:
        """The first install's auth-off revision: never a rollback target (DESIGN §4.18)."""
        return not self.spec.auth


class DeployResult(BaseModel):
    revision: int
    #: False when the running server already matched the spec (a re-run).
    changed: bool
    detail: str


class Endpoint(BaseModel):
    """How the runner reaches the server."""

    model_config = ConfigDict(frozen=True)

    url: str
    #: CA bundle that verifies the server's certificate; None: system trust store.
    ca_bundle: Path | None = None
    #: Connect to this address instead of resolving the URL's host (e.g. the
    #: address the configured DNS resolvers gave); TLS still verifies the
    #: URL's host name (SNI) and the Host header carries it.
    connect_address: str | None = None


class LogSource(BaseModel):
    """Server output since a mark, one per process (or pod)."""

    name: str
    #: Text logged since the mark (for error scanning).
    text: str
    #: Text logged since this process started (for startup messages).
    since_start: str
    restarts: int = 0


class ProcessState(BaseModel):
    name: str
    ready: bool
    restarts: int = 0
    detail: str = ""


@runtime_checkable
class Target(Protocol):
    name: str

    def preflight(self, outputs: "TerraformOutputs") -> list[str]:
        """Cheap checks before anything changes; raise Bad input / Permanent errors."""

    def database_uris(self, outputs: "TerraformOutputs") -> tuple[SecretStr, SecretStr]:
        """(backend store URI, auth DB URI) for these Terraform outputs."""

    def server_spec(self, outputs: "TerraformOutputs", *, auth: bool) -> ServerSpec:
        """The spec to deploy, with auth on or off."""

    def generated_secret(self, key: str) -> str:
        """A ``generate: true`` secret: the value the secret store keeps, or a new one."""

    def store_secrets(self, secrets: SecretBundle, auth_ini: str) -> bool:
        """Put the secrets where the server reads them; True when something changed."""

    def current_revision(self) -> Revision | None:
        """The revision now deployed (None before the first deploy)."""

    def history(self) -> list[Revision]:
        ...

    def deploy(self, spec: ServerSpec) -> DeployResult:
        """Run ``spec``; a no-op when it already runs healthy."""

    def rollback_candidates(self) -> list[Revision]:
        """Revisions a rollback may go to, newest first (the first is the default).

        Only good revisions that ran with auth on: the bootstrap (auth-off)
        revision is never a candidate (DESIGN §4.18).
        """

    def rollback(self, revision: int, reason: str) -> DeployResult:
        """Run revision ``revision``'s spec again (as a new revision), wait until healthy.

        Refuses (BadInputError, naming why) a revision that does not exist or
        that ran with auth off — defence in depth behind the flow's own check.
        """

    def auth_ever_enabled(self) -> bool:
        """Has this environment ever served with auth on? A fact of the *data*.

        Read from what survives a lost revision file or release history: the
        auth database has users (local), the existingSecret's marker annotation
        or the auth database (kubernetes). True means deploy-no-auth must never
        run again and nothing may serve without auth.
        """

    def mark_auth_enabled(self) -> object:
        """Record, where the data lives, that the environment now serves with auth (after deploy-auth)."""

    def discard_bootstrap(self) -> str | None:
        """Remove an auth-off bootstrap left by an unfinished first install; what was done, or None."""

    def operation_lock(self, holder: LockHolder, wait_seconds: float) -> AbstractContextManager[None]:
        """A lock of the target's own that frees itself when its holder dies.

        Local: an OS file lock in the state directory (released by the kernel on
        ``kill -9``). Kubernetes: a ``coordination.k8s.io/v1`` Lease in the
        namespace, renewed while held and taken over once expired. It guards
        the environment also when two runners use different Prefect databases.
        Waiting says so (naming the holder); giving up raises
        :class:`mlflow_rollout.locks.EnvironmentBusyError`.
        """

    def admin_password(self) -> SecretStr:
        """The admin password from the target's secret store."""

    def bootstrap_admin(self, username: str) -> str:
        """Migrate the auth DB and make sure the admin exists with the stored password."""

    def endpoint(self) -> Endpoint:
        """The public URL (what users use, after DNS)."""

    def access_endpoint(self) -> Endpoint:
        """How the runner reaches the server before DNS points at it."""

    def publish_dns(self) -> str | None:
        """Point the public name at the server and wait until it resolves; None: no DNS here."""

    def diagnostics(self) -> str:
        """Markdown with what helps after a failure (events, log tails); best effort."""

    def log_mark(self) -> str:
        """An opaque position in the server logs; :meth:`logs_since` reads from it."""

    def logs_since(self, mark: str) -> list[LogSource]:
        ...

    def processes(self) -> list[ProcessState]:
        ...

    def status(self) -> dict:
        """Facts for ``mlflow-rollout status`` (no secret values)."""
