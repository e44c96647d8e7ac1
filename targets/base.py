"""The one interface the flows drive; ``local`` and ``kubernetes`` implement it.

Flows never ask which target they hold, and never probe it (no ``hasattr``):
everything a stage needs from "where MLflow runs" is a method here — put the
secrets in place, deploy a spec as a new revision, keep the auth posture
one-way, make sure the admin exists, say how to reach the server, hand over
the server logs since a mark, list past revisions, stop, verify DNS. A
capability a target lacks is a method that says so (``verify_dns`` → None,
``stop`` → BadInputError naming why). Rules that are the same everywhere live
here once (:func:`good_earlier_revisions`, :func:`status_or_error`).
``targets/README.md`` walks through adding a third target.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pydantic import SecretStr

from mlflow_rollout.server_spec import SecretBundle, ServerSpec
from mlflow_rollout.types import DeployResult, Endpoint, LockHolder, LogSource, ProcessState, Revision

if TYPE_CHECKING:
    from mlflow_rollout.diagnosis import Evidence, Finding
    from tasks.terraform import TerraformOutputs

__all__ = [
    "Revision",
    "DeployResult",
    "Endpoint",
    "LogSource",
    "ProcessState",
    "LockHolder",
    "Target",
    "STATUS_KEYS",
    "good_earlier_revisions",
    "status_or_error",
    "findings",
    "read_auth_evidence",
]


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
        """Every revision, oldest first; one whose spec cannot be read counts as auth off (never a candidate)."""

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

    # Where the admin password lives and how it is replaced. The target's secret store
    # (local: ``<state>/secrets/admin-password``; kubernetes: key ``admin-password`` of the
    # chart's existingSecret) holds the password every flow logs in with and the next rollout
    # checks the admin against. Only the users flow's ``rotate-admin-password`` replaces it,
    # after MLflow's update-password; it records the new value as *pending* first, so a run
    # that dies between the server change and the store write leaves it stored.

    def admin_password(self) -> SecretStr:
        """The admin password from the target's secret store (registered for redaction)."""

    def admin_password_store(self) -> str:
        """Where :meth:`admin_password` reads from, for plans and messages (never the value)."""

    def replace_admin_password(self, password: SecretStr) -> None:
        """Make ``password`` the stored admin password; nothing else in the store changes.

        Does not touch the server (the caller has changed it with update-password).
        One write: afterwards :meth:`admin_password` returns the old or the new value,
        never a mix. Raises the store's errors (Transient/Permanent/AuthError).
        """

    def pending_admin_password(self) -> SecretStr | None:
        """The new admin password of a rotation still in flight, or None.

        Kept beside the admin password (local: ``admin-password.pending``;
        kubernetes: the Secret ``<existingSecret>-rotation``), never where the
        chart or the rollout's secrets stage write, so it survives them.
        """

    def set_pending_admin_password(self, password: SecretStr | None) -> None:
        """Record ``password`` as the pending admin password; None forgets it."""

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
        """Server output since ``mark``, one :class:`LogSource` per process (local) or pod (kubernetes)."""

    def processes(self) -> list[ProcessState]:
        """The server's processes or pods: ready or not, restarts."""

    def stop(self) -> bool:
        """Stop the server this runner runs itself; True if one was running.

        Only a target whose server is a process of this machine can (local);
        others raise :class:`~mlflow_rollout.errors.BadInputError` naming why.
        """

    def verify_dns(self) -> str | None:
        """The public name still points at this server (raises when not); None: no DNS record here."""

    def evidence(self) -> "Evidence":
        """What the runbook's troubleshooting looks at (pods, logs, database, IAM, load balancer, auth).

        Read-only and best effort: what cannot be read is a note in it, never an error.
        :func:`findings` turns it into named causes and fixes (:mod:`mlflow_rollout.diagnosis`).
        """

    def status(self) -> dict:
        """Facts for ``mlflow-rollout status``, the reports and the flows' results (no secret values).

        Always the keys of :data:`STATUS_KEYS` — ``environment``, ``target``,
        ``url``, ``revision`` (number or None), ``auth`` (bool; None when
        nothing serves), ``healthy`` (bool), ``admin_username``, ``ca_bundle``
        — plus facts of the target's own (``pid``, ``namespace``, …).
        """


#: The keys every ``Target.status()`` has (the flows, the report and the CLI read them).
STATUS_KEYS = ("environment", "target", "url", "revision", "auth", "healthy", "admin_username", "ca_bundle")


def good_earlier_revisions(revisions: Iterable[Revision], current: int | None) -> list[Revision]:
    """Rollback candidates, newest first: revisions that ran healthy once (``superseded``) with auth on,
    other than the current one. The one rule both targets apply (DESIGN §4.18: never the auth-off
    bootstrap, never a revision that failed, was interrupted or cannot be read)."""
    good = [r for r in revisions if r.status == "superseded" and r.spec.auth and r.number != current]
    return sorted(good, key=lambda r: r.number, reverse=True)


def status_or_error(target: Target) -> dict[str, Any]:
    """``target.status()`` for a report, or what made it unreadable.

    A report runs after failures too; an unreadable status (the cluster's API
    is the thing that failed) must not replace the run's own error.
    """
    try:
        return target.status()
    except Exception as exc:  # noqa: BLE001 - reported, the run's own error stays the one raised
        from mlflow_rollout.redact import redact

        return {"status_unavailable": redact(f"{type(exc).__name__}: {exc}")[:300]}


def findings(target: Target) -> "list[Finding]":
    """The diagnosis of ``target`` now: named causes and fixes, most fundamental first ([] = none found).

    Never raises: it runs after failures, where the run's own error is the one to keep; a diagnosis
    that cannot be made is one finding-less log line.
    """
    from mlflow_rollout.diagnosis import diagnose

    try:
        return diagnose(target.evidence())
    except Exception as exc:  # noqa: BLE001
        import logging

        from mlflow_rollout.redact import redact

        logging.getLogger(__name__).warning("diagnosis unavailable: %s", redact(f"{type(exc).__name__}: {exc}")[:300])
        return []


def read_auth_evidence(target: Target, ev: "Evidence") -> None:
    """The authentication rule's evidence, the same for every target: an anonymous tracking call, the stored
    admin password's login and, when it is refused, the pending password of an interrupted rotation."""
    from tasks.checks import status_of
    from tasks.mlflow_users import login_status

    endpoint, user = target.access_endpoint(), ev.admin_username or "admin"
    ev.anonymous_status = status_of(endpoint, "/api/2.0/mlflow/experiments/search?max_results=1")
    ev.admin_status = login_status(endpoint, user, target.admin_password())
    pending = target.pending_admin_password() if ev.admin_status == 401 else None
    if pending is not None:
        ev.pending_status = login_status(endpoint, user, pending)
