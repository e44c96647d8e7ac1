"""The ``kubernetes`` target: the chart in ``charts/mlflow`` on EKS, driven by helm.

=======================  =============================================
interface                here
=======================  =============================================
secret store             the chart's ``existingSecret`` (Kubernetes API)
revisions                helm revisions (``helm history``); a revision's
                         spec is read back from ``helm get values``
deploy                   ``helm upgrade --install --wait`` with the full
                         values, then the Deployment's rollout status
rollback                 ``helm rollback --wait``, only to a revision that
                         ran with auth on
auth posture             the ``existingSecret``'s annotation
                         ``mlflow-rollout/auth-enabled-at``, else the auth
                         database's users (DESIGN §4.18)
operation lock           a ``coordination.k8s.io/v1`` Lease
                         ``<release>-rollout-lock``, renewed while held
logs / processes         pod logs, container statuses
object names             read from the release's manifest
                         (``helm get manifest``): the Deployment, its
                         pod selector, Service and Ingress, so
                         ``nameOverride``/``fullnameOverride`` work
dns                      Ingress LB name → Route53 UPSERT → INSYNC →
                         resolved through the configured resolvers
=======================  =============================================

A re-run that would change nothing (the deployed revision already has the
same values and the release is healthy) makes no new helm revision.

Auth posture is one-way (DESIGN §4.18). The first install's auth-off
revision has no Ingress (``ingress.enabled`` follows ``auth.enabled``): the
bootstrap is reached only inside the cluster. It is never a rollback target,
nor is a revision whose values cannot be read (its auth setting is unknown,
so it counts as off). Once the environment has served with auth, nothing —
not a lost release history, not ``helm uninstall`` — lets this target deploy
it with auth off again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections.abc import Iterator
from typing import Any

import yaml
from pydantic import SecretStr, ValidationError

from mlflow_rollout.errors import BadInputError, PermanentError, TransientError
from mlflow_rollout.redact import redact
from mlflow_rollout.secrets import new_secret_value
from mlflow_rollout.server_spec import SecretBundle, ServerSpec
from mlflow_rollout.settings import EnvironmentSettings
from mlflow_rollout.types import DeployResult, Endpoint, LockHolder, LogSource, ProcessState, Revision
from mlflow_rollout.diagnosis import Evidence
from targets.base import good_earlier_revisions, read_auth_evidence
from tasks import aws, checks, dns, mlflow_db
from tasks.helm import PENDING, Helm, HelmRevision
from tasks.kube import Kube, LeaseBusy, LeaseLock, Workload
from tasks.terraform import TerraformOutputs, redacted_connection_string

__all__ = ["KubernetesTarget", "values_for", "spec_from_values", "AUTH_MARKER_ANNOTATION"]

_BACKEND_ANNOTATION = "mlflow-rollout/backend-store"
#: On the existingSecret: when deploy-auth first verified the admin login (the one-way switch).
AUTH_MARKER_ANNOTATION = "mlflow-rollout/auth-enabled-at"
_STATUS = {"deployed": "deployed", "superseded": "superseded", "failed": "failed", "uninstalled": "superseded"}


def _psycopg2(uri: SecretStr) -> SecretStr:
    """The image's driver: name it, so SQLAlchemy 2.1's psycopg-3 default never applies."""
    raw = uri.get_secret_value()
    if raw.startswith("postgresql://"):
        return SecretStr("postgresql+psycopg2://" + raw.removeprefix("postgresql://"))
    return uri


def values_for(spec: ServerSpec, settings: EnvironmentSettings, secret_checksum: str) -> dict[str, Any]:
    """The complete chart values for ``spec`` (layered over the environment's values files)."""
    k, p = settings.kubernetes, spec.platform
    return {
        "existingSecret": k.existing_secret,
        "secret": {"create": False},
        "auth": {
            "enabled": spec.auth,
            "adminUsername": spec.admin_username,
            "defaultPermission": spec.default_permission,
            "cacheTtlSeconds": spec.auth_cache_ttl_seconds,
        },
        "mlflow": {"workers": spec.workers, "jobExecution": spec.job_execution},
        "artifacts": {"destination": spec.artifacts_destination, "s3EndpointUrl": spec.s3_endpoint_url or ""},
        "serviceAccount": {"irsaRoleArn": p.get("irsa_role_arn", "")},
        # No Ingress while auth is off: the bootstrap revision is reached only inside the cluster.
        "ingress": {"enabled": spec.auth, "hosts": [settings.mlflow.host], "certificateArn": p.get("certificate_arn", "")},
        "aws": {"region": settings.aws.region},
        # The secret's digest rolls the pods when a credential changes; the
        # backend's display form (password ***) records which database a revision used.
        "podAnnotations": {"checksum/existing-secret": secret_checksum, _BACKEND_ANNOTATION: spec.backend_store},
    }


def spec_from_values(values: dict[str, Any], settings: EnvironmentSettings) -> ServerSpec:
    """The spec a revision ran, read back from its values (``helm get values --all``).

    An ``auth.enabled`` that is missing counts as off: auth is never assumed.
    """
    auth = values.get("auth") or {}
    m = values.get("mlflow") or {}
    art = values.get("artifacts") or {}
    host = settings.mlflow.host
    return ServerSpec(
        auth=auth.get("enabled") is True,
        workers=int(m.get("workers", 2)),
        artifacts_destination=str(art.get("destination", "")),
        allowed_hosts=(host,),
        cors_allowed_origins=(f"https://{host}",),
        admin_username=str(auth.get("adminUsername", "admin")),
        default_permission=str(auth.get("defaultPermission", "READ")),
        auth_cache_ttl_seconds=int(auth.get("cacheTtlSeconds", 60)),
        job_execution=bool(m.get("jobExecution", False)),
        backend_store=str(values.get("podAnnotations", {}).get(_BACKEND_ANNOTATION, "")),
        s3_endpoint_url=art.get("s3EndpointUrl") or None,
        platform={
            "irsa_role_arn": values.get("serviceAccount", {}).get("irsaRoleArn", ""),
            "certificate_arn": values.get("ingress", {}).get("certificateArn", ""),
        },
    )


class KubernetesTarget:
    """MLflow from ``charts/mlflow`` in one namespace of a cluster."""

    name = "kubernetes"

    def __init__(self, settings: EnvironmentSettings):
        self.settings = settings
        k = settings.kubernetes
        self.release = k.release
        self.helm = Helm(
            binary=k.helm_binary, namespace=k.namespace, kubeconfig=k.kubeconfig, context=k.context,
            timeout_seconds=k.helm_timeout_seconds,
        )
        self._kube: Kube | None = None
        self._lb_hostname: str | None = None
        self._forward: Any = None  # tasks.port_forward.PortForward, for access: port-forward
        #: Revisions whose values could not be read (number → why): auth unknown, never a rollback target.
        self._unreadable: dict[int, str] = {}
        #: While a read-only look runs (:meth:`_one_manifest`): the workload read once for all of it.
        self._pinned: list[Workload] | None = None

    @property
    def kube(self) -> Kube:
        if self._kube is None:  # connects lazily: status/--help must not need a cluster
            k = self.settings.kubernetes
            self._kube = Kube(
                namespace=k.namespace, release=k.release, kubeconfig=k.kubeconfig, context=k.context,
                in_cluster=k.in_cluster, workload=self.workload,
            )
        return self._kube

    def workload(self) -> Workload:
        """The release's Deployment, pod selector, Service and Ingress as its newest revision rendered them."""
        if self._pinned:
            return self._pinned[0]
        w = Workload.from_manifest(self.helm.manifest(self.release))
        if self._pinned is not None:
            self._pinned.append(w)
        return w

    @contextlib.contextmanager
    def _one_manifest(self) -> Iterator[None]:
        """Within a read-only look (``evidence``) the release's manifest is read once, not by every piece that
        needs the workload (pods, the port-forward, the Service, the Ingress): nothing changes it meanwhile."""
        self._pinned = []
        try:
            yield
        finally:
            self._pinned = None

    def _aws(self) -> dict[str, Any]:
        return {"region": self.settings.aws.region, "endpoint_url": self.settings.aws.endpoint_url}

    # -------------------------------------------------------------- preflight
    def preflight(self, outputs: TerraformOutputs) -> list[str]:
        s, a = self.settings, self.settings.aws
        notes = [self.kube.check_access(), f"helm {self.helm.version()}"]
        if not s.kubernetes.chart.is_dir():
            raise BadInputError(f"chart directory {s.kubernetes.chart} not found (kubernetes.chart)")
        for f in s.kubernetes.values_files:
            if not f.is_file():
                raise BadInputError(f"values file {f} not found (kubernetes.values_files)")
        if outputs.acm_certificate_arn:
            notes.append(aws.check_certificate(
                outputs.acm_certificate_arn, s.mlflow.host, min_days=a.certificate_min_days, **self._aws()
            ))
        notes.append(aws.check_role(outputs.mlflow_irsa_role_arn, **self._aws()))
        zone = aws.find_hosted_zone(s.mlflow.host, zone_name=a.hosted_zone_name, **self._aws())
        notes.append(f"hosted zone {zone.name} ({zone.id}) holds {s.mlflow.host}")
        stuck = self.helm.stuck(self.release)
        if stuck is not None:
            if not s.kubernetes.recover_stuck_release:
                raise PermanentError(
                    f"release {self.release} is stuck in {stuck.status} (revision {stuck.revision}); "
                    f"recover with: helm rollback {self.release} <last deployed revision> -n {s.kubernetes.namespace}"
                )
            notes.append(f"release was stuck ({stuck.status}): "
                         f"{self.helm.recover(self.release, acceptable=self._recoverable)}")
        spec = self.server_spec(outputs, auth=True)
        self.helm.template(self.release, s.kubernetes.chart, values_for(spec, s, "preflight"),
                           values_files=s.kubernetes.values_files)
        notes.append("chart renders with these values")
        return notes

    def _recoverable(self, h: HelmRevision) -> bool:
        """A stuck release may go back to ``h`` unless that would turn auth off over data that had it."""
        return self._revision(h).spec.auth or not self.auth_ever_enabled()

    # ------------------------------------------------------------------- spec
    def database_uris(self, outputs: TerraformOutputs) -> tuple[SecretStr, SecretStr]:
        uri = _psycopg2(outputs.rds_connection_string)
        return uri, uri

    def server_spec(self, outputs: TerraformOutputs, *, auth: bool) -> ServerSpec:
        s, m = self.settings, self.settings.mlflow
        prefix = s.kubernetes.artifacts_prefix.strip("/")
        return ServerSpec(
            auth=auth,
            workers=m.workers,
            artifacts_destination=f"s3://{outputs.s3_bucket_name}" + (f"/{prefix}" if prefix else ""),
            allowed_hosts=(m.host,),
            cors_allowed_origins=(f"https://{m.host}",),
            admin_username=m.admin_username,
            default_permission=m.default_permission,
            auth_cache_ttl_seconds=m.auth_cache_ttl_seconds,
            job_execution=m.job_execution,
            backend_store=redacted_connection_string(outputs),
            s3_endpoint_url=s.aws.endpoint_url,
            platform={
                "irsa_role_arn": outputs.mlflow_irsa_role_arn,
                "certificate_arn": outputs.acm_certificate_arn or "",
            },
        )

    # ---------------------------------------------------------------- secrets
    def generated_secret(self, key: str) -> str:
        existing = self.kube.read_secret(self.settings.kubernetes.existing_secret) or {}
        return existing.get(key) or new_secret_value()

    def store_secrets(self, secrets: SecretBundle, auth_ini: str) -> bool:
        return self.kube.apply_secret(self.settings.kubernetes.existing_secret, secrets.store_items(auth_ini))

    def _secret(self, key: str) -> str:
        data = self.kube.read_secret(self.settings.kubernetes.existing_secret)
        if not data or key not in data:
            raise PermanentError(
                f"secret {self.settings.kubernetes.namespace}/{self.settings.kubernetes.existing_secret} "
                f"has no {key!r}; run the secrets stage"
            )
        from mlflow_rollout.redact import register_secret

        register_secret(data[key])
        return data[key]

    def admin_password(self) -> SecretStr:
        return SecretStr(self._secret("admin-password"))

    def admin_password_store(self) -> str:
        k = self.settings.kubernetes
        return f"secret {k.namespace}/{k.existing_secret} key 'admin-password'"

    def replace_admin_password(self, password: SecretStr) -> None:
        """Key ``admin-password`` of the existingSecret; its other keys and annotations are kept (one replace).

        Running pods need nothing: MLflow reads the admin password only when it first creates the admin.
        """
        k = self.settings.kubernetes
        data = self.kube.read_secret(k.existing_secret)
        if data is None:
            raise PermanentError(f"secret {k.namespace}/{k.existing_secret} does not exist; run the secrets stage")
        self.kube.apply_secret(k.existing_secret, {**data, "admin-password": password.get_secret_value()})

    def _rotation_secret(self) -> str:
        """A Secret of its own: the rollout's secrets stage rewrites the existingSecret with exactly its keys."""
        return f"{self.settings.kubernetes.existing_secret}-rotation"

    def pending_admin_password(self) -> SecretStr | None:
        value = (self.kube.read_secret(self._rotation_secret()) or {}).get("admin-password-pending")
        if not value:
            return None
        from mlflow_rollout.redact import register_secret

        register_secret(value)
        return SecretStr(value)

    def set_pending_admin_password(self, password: SecretStr | None) -> None:
        """None empties the Secret (it stays, without data, until the next rotation)."""
        name = self._rotation_secret()
        if password is None:
            if self.kube.read_secret(name):
                self.kube.apply_secret(name, {})
            return
        self.kube.apply_secret(name, {"admin-password-pending": password.get_secret_value()})

    # -------------------------------------------------------------- revisions
    def _revision(self, h: HelmRevision) -> Revision:
        """One helm revision as a :class:`Revision` (its spec read from ``helm get values --all``).

        Values that cannot be read give a spec with auth **off** and say so in
        the description: an unknown revision is never taken for an auth-on one.
        """
        status = "pending" if h.status in PENDING else _STATUS.get(h.status, "failed")
        try:
            values = self.helm.values(self.release, h.revision, all_values=True)
            spec = spec_from_values(values, self.settings)
            description = h.description
            self._unreadable.pop(h.revision, None)
        except (PermanentError, TransientError, ValidationError, ValueError) as exc:
            why = redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)[:160]
            spec = spec_from_values({}, self.settings)
            description = f"{h.description} [values unreadable ({why}): auth unknown, counted as off]".strip()
            self._unreadable[h.revision] = why
        return Revision(
            number=h.revision, spec=spec, created_at=_parse_time(h.updated),
            status=status,  # type: ignore[arg-type]
            description=description,
        )

    def history(self) -> list[Revision]:
        return [self._revision(h) for h in self.helm.history(self.release)]

    def current_revision(self) -> Revision | None:
        # Only the newest deployed revision's values are needed: one `helm get values`, not one per revision.
        deployed = [h for h in self.helm.history(self.release) if h.status == "deployed"]
        return self._revision(deployed[-1]) if deployed else None

    def _candidates(self, history: list[HelmRevision]) -> list[Revision]:
        deployed = [h.revision for h in history if h.status == "deployed"]
        current = deployed[-1] if deployed else None
        # Only superseded revisions can be good earlier ones: read values for those alone.
        superseded = [h for h in history if h.status == "superseded" and h.revision != current]
        return good_earlier_revisions([self._revision(h) for h in superseded], current)

    def rollback_candidates(self) -> list[Revision]:
        """Good earlier revisions that ran with auth on, newest first (never the bootstrap, never an unreadable one)."""
        return self._candidates(self.helm.history(self.release))

    # ----------------------------------------------------------- auth posture
    def auth_ever_enabled(self) -> bool:
        """Has this environment served with auth? Read from the data, never from the release history.

        True when the existingSecret carries :data:`AUTH_MARKER_ANNOTATION`
        (written by :meth:`mark_auth_enabled` after deploy-auth's admin login),
        or when the auth database named by its ``auth-database-uri`` has users.
        An auth database this runner cannot read counts as "has been on"
        (fail-safe: the auth-off bootstrap is skipped, never wrongly run).
        No existingSecret at all: False (nothing was ever installed with it).
        """
        name = self.settings.kubernetes.existing_secret
        annotations = self.kube.secret_annotations(name)
        if annotations is None:
            return False
        if annotations.get(AUTH_MARKER_ANNOTATION):
            return True
        uri = (self.kube.read_secret(name) or {}).get("auth-database-uri")
        if not uri:
            return False
        from mlflow_rollout.redact import register_secret

        register_secret(uri)
        try:
            if uri.startswith("sqlite:"):  # a file inside the pod, not here: unknown
                raise PermanentError("the auth database is SQLite inside the pod; this runner cannot read it")
            return mlflow_db.auth_db_has_users(SecretStr(uri), connect_timeout=10)
        except Exception as exc:
            _log().warning(
                "cannot read the auth database from this runner (%s); counting auth as having been on, so no "
                "auth-off bootstrap runs", redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)[:200],
            )
            return True

    def mark_auth_enabled(self) -> str:
        """Record on the existingSecret that this environment now serves with auth (the one-way switch).

        Call right after deploy-auth verified the admin login. Idempotent: the
        first time is kept. The secrets stage keeps the annotation when it
        rewrites the Secret.
        """
        k = self.settings.kubernetes
        annotations = self.kube.secret_annotations(k.existing_secret)
        if annotations is None:
            raise PermanentError(f"secret {k.namespace}/{k.existing_secret} does not exist; run the secrets stage")
        if annotations.get(AUTH_MARKER_ANNOTATION):
            return f"auth on since {annotations[AUTH_MARKER_ANNOTATION]}"
        when = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.kube.annotate_secret(k.existing_secret, {AUTH_MARKER_ANNOTATION: when})
        return f"auth on since {when} (recorded on secret {k.existing_secret})"

    def discard_bootstrap(self) -> str | None:
        """Remove the auth-off bootstrap left by a first install that did not finish; None when there is none.

        The flow calls this after a failed or interrupted rollout. When what
        the release would run is auth off — its newest deployed revision, or
        with none deployed its newest one (``pending-install``, ``failed``) —
        the release is uninstalled (``helm uninstall --wait``; the
        existingSecret, databases and bucket are not the release's and stay).
        The next rollout starts over — with auth on straight away once the
        auth database has its admin.
        """
        history = self.helm.history(self.release)
        deployed = [h for h in history if h.status == "deployed"]
        newest = deployed[-1] if deployed else (history[-1] if history else None)
        if newest is None:
            return None
        rev = self._revision(newest)
        if rev.spec.auth:
            return None
        self.helm.uninstall(self.release)
        return (f"uninstalled release {self.release}: revision {newest.revision} ({newest.status}) ran with auth off, "
                "the bootstrap of a first install that did not finish; the next rollout starts over")

    # ------------------------------------------------------------------- lock
    @property
    def lock_name(self) -> str:
        return f"{self.release}-rollout-lock"[:253]

    @contextlib.contextmanager
    def operation_lock(self, holder: LockHolder, wait_seconds: float) -> Iterator[None]:
        """The environment's Lease lock (see :class:`tasks.kube.LeaseLock`) for the duration of the block."""
        from mlflow_rollout.locks import EnvironmentBusyError

        k, lease = self.settings.kubernetes, self.settings.lock_lease_seconds
        # The namespace is a prerequisite (the runner's Role cannot create Namespaces): creating the Lease
        # in a missing one is the first call, and it fails as a BadInputError naming the namespace.
        lock = LeaseLock(self.kube, self.lock_name, holder.model_dump_json(), lease,
                         describe=_describe_holder, log=_log())
        try:
            lock.acquire(wait_seconds)
        except LeaseBusy as busy:
            until = f"; its lease runs until {busy.expires.isoformat(timespec='seconds')} unless renewed" if busy.expires else ""
            raise EnvironmentBusyError(
                f"another operation on environment {self.settings.name!r} holds the lock "
                f"(Lease {k.namespace}/{self.lock_name}): {_describe_holder(busy.holder)}{until}. This "
                f"{holder.operation} waited {wait_seconds:.0f}s and gave up; retry when it has finished "
                f"(a holder that died frees the lock {lease:.0f}s after its last renewal)"
            ) from None
        try:
            yield
        finally:
            lock.release()

    # ----------------------------------------------------------------- deploy
    def deploy(self, spec: ServerSpec) -> DeployResult:
        k = self.settings.kubernetes
        secret = self.kube.read_secret(k.existing_secret)
        if secret is None:
            raise PermanentError(f"secret {k.namespace}/{k.existing_secret} does not exist; run the secrets stage")
        if not spec.auth and self.auth_ever_enabled():  # defence in depth behind the flow's own skip
            raise PermanentError(
                f"refusing to deploy {self.settings.name!r} with auth off: it has served with auth before "
                f"(secret {k.existing_secret} annotation {AUTH_MARKER_ANNOTATION}, or users in its auth database)"
            )
        values = values_for(spec, self.settings, self.kube.checksum(secret))
        history = self.helm.history(self.release)
        if history and history[-1].status == "deployed":
            # `helm get values` gives the user-supplied values: the values files and ours, merged.
            supplied: dict[str, Any] = {}
            for f in k.values_files:
                supplied = _deep_merge(supplied, yaml.safe_load(f.read_text()) or {})
            if self.helm.values(self.release, history[-1].revision) == _deep_merge(supplied, values):
                try:
                    self.kube.rollout_status()
                    return DeployResult(revision=history[-1].revision, changed=False,
                                        detail=f"revision {history[-1].revision} already runs these values")
                except TransientError:
                    pass  # not healthy: upgrade again below
        rev = self.helm.upgrade_install(
            self.release, k.chart, values, values_files=k.values_files,
            description=f"mlflow-rollout: auth {'on' if spec.auth else 'off'}",
        )
        status = self._wait_rolled_out()
        return DeployResult(revision=rev.revision, changed=True, detail=f"helm revision {rev.revision} {rev.status}; {status}")

    def _wait_rolled_out(self, timeout: float = 120) -> str:
        from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

        for attempt in Retrying(stop=stop_after_delay(timeout), wait=wait_fixed(2),
                                retry=retry_if_exception_type(TransientError), reraise=True):
            with attempt:
                return self.kube.rollout_status()
        raise AssertionError("unreachable")

    def rollback(self, revision: int, reason: str) -> DeployResult:
        """``helm rollback`` to ``revision``; refuses one that does not exist or did not run with auth on."""
        history = self.helm.history(self.release)
        known = {h.revision: h for h in history}

        def valid() -> str:
            return ", ".join(str(r.number) for r in self._candidates(history)) or "none"

        if revision not in known:
            raise BadInputError(f"revision {revision} does not exist; valid revisions: {valid()}")
        old = self._revision(known[revision])
        if revision in self._unreadable:
            raise BadInputError(
                f"revision {revision}'s values cannot be read ({self._unreadable[revision]}), so whether it ran "
                f"with auth is unknown; it is not a rollback target; valid revisions: {valid()}"
            )
        if not old.spec.auth:
            what = ("the first install's bootstrap revision with auth off" if revision == history[0].revision
                    else "a revision that ran with auth off")
            raise BadInputError(
                f"revision {revision} is {what}; rolling back to it would serve MLflow without "
                f"authentication; valid revisions: {valid()}"
            )
        rev = self.helm.rollback(self.release, revision)
        status = self._wait_rolled_out()
        return DeployResult(revision=rev.revision, changed=True,
                            detail=f"rolled back to revision {revision} as revision {rev.revision}; {status}")

    def bootstrap_admin(self, username: str) -> str:
        mode = self.settings.kubernetes.admin_bootstrap
        if mode == "first-start":
            return "admin is created by MLflow at the auth app's first start; verified after deploy-auth"
        state = mlflow_db.ensure_admin(SecretStr(self._secret("auth-database-uri")), username, self.admin_password())
        return f"admin {state.username!r} {state.action} in the auth database"

    # -------------------------------------------------------------------- dns
    def _host_url(self) -> str:
        k = self.settings.kubernetes
        host = self.settings.mlflow.host
        return f"https://{host}" if k.public_port == 443 else f"https://{host}:{k.public_port}"

    def _resolve(self, name: str) -> str | None:
        resolvers = self.settings.aws.dns_resolvers
        if not resolvers:
            return None  # the system resolver will do, at connect time
        addresses = dns.resolve_once(name, resolvers)
        if not addresses:
            raise TransientError(f"{name} does not resolve (via {', '.join(resolvers)})")
        return addresses[0]

    def endpoint(self) -> Endpoint:
        return Endpoint(
            url=self._host_url(), ca_bundle=self.settings.kubernetes.ca_bundle,
            connect_address=self._resolve(self.settings.mlflow.host),
        )

    def access_endpoint(self) -> Endpoint:
        k = self.settings.kubernetes
        if k.access == "port-forward":
            return Endpoint(url=f"http://127.0.0.1:{self._port_forward()}")
        if k.access == "service":
            w = self.workload()
            if w.service is None:
                raise PermanentError(f"release {self.release} has no Service in its manifest (is it installed?)")
            port = f":{w.service_port}" if w.service_port and w.service_port != 80 else ""
            return Endpoint(url=f"http://{w.service}.{k.namespace}.svc{port}")
        try:
            lb = self.kube.ingress_hostname(k.ingress_timeout_seconds)
        except PermanentError:
            current = self.current_revision()
            if current is not None and not current.spec.auth:
                raise PermanentError(
                    f"revision {current.number} is the auth-off bootstrap: it has no Ingress by design and is "
                    "reachable only inside the cluster (kubernetes.access: service, or kubectl port-forward)"
                ) from None
            raise
        return Endpoint(url=self._host_url(), ca_bundle=k.ca_bundle, connect_address=self._resolve(lb))

    def _port_forward(self) -> int:
        """The local port of this target's port-forward to the server's Ready pods (started once, kept for the
        process: every check of a run reuses it; each connection picks a Ready pod when it opens)."""
        if self._forward is None:
            from tasks.port_forward import PortForward

            w = self.workload()
            if w.deployment is None or not w.container_port:
                raise PermanentError(f"release {self.release} has no Deployment with a container port in its "
                                     "manifest (is it installed?)")
            self._forward = PortForward(self.kube.core, self.settings.kubernetes.namespace,
                                        self._ready_pod_names, w.container_port)
            self._forward.start()
        return self._forward.local_port

    def close(self) -> None:
        """Stop this target's port-forward, if one runs (a flow-run process ends with it anyway)."""
        if self._forward is not None:
            self._forward.close()
            self._forward = None

    def _ready_pod_names(self) -> list[str]:
        return [p.metadata.name for p in self.kube.ready_pods()]  # none: the port-forward logs it and closes the connection

    def publish_dns(self) -> str:
        s, a = self.settings, self.settings.aws
        host = s.mlflow.host
        lb = self.kube.ingress_hostname(s.kubernetes.ingress_timeout_seconds)
        zone = aws.find_hosted_zone(host, zone_name=a.hosted_zone_name, **self._aws())
        change = aws.upsert_record(zone.id, host, lb, kind=a.dns_record, ttl=a.dns_ttl, **self._aws())
        aws.wait_insync(change, timeout=min(a.dns_timeout_seconds, 300), **self._aws())
        resolved = dns.wait_resolves(host, lb, resolvers=a.dns_resolvers, timeout=a.dns_timeout_seconds)
        return f"{a.dns_record} {host} → {lb} in zone {zone.name}: INSYNC; {resolved}"

    def verify_dns(self) -> str:
        """Health: the record still points at the current load balancer, and resolves to it."""
        s, a = self.settings, self.settings.aws
        lb = self.kube.ingress_hostname(30)
        zone = aws.find_hosted_zone(s.mlflow.host, zone_name=a.hosted_zone_name, **self._aws())
        if not aws.record_points_at(zone.id, s.mlflow.host, lb, **self._aws()):
            raise PermanentError(f"Route53 record {s.mlflow.host} does not point at the current load balancer {lb}")
        return dns.wait_resolves(s.mlflow.host, lb, resolvers=a.dns_resolvers, timeout=15)

    def stop(self) -> bool:
        raise BadInputError(
            f"'stop' is for the local target; {self.settings.name!r} runs on Kubernetes, where the release "
            "is changed by a rollout or a rollback (or removed with `helm uninstall`), not stopped by this tool"
        )

    # ---------------------------------------------------------------- observe
    def log_mark(self) -> str:
        return dt.datetime.now(dt.timezone.utc).isoformat()

    def logs_since(self, mark: str) -> list[LogSource]:
        return self.kube.logs_since(dt.datetime.fromisoformat(mark))

    def processes(self) -> list[ProcessState]:
        return self.kube.processes()

    def diagnostics(self) -> str:
        parts = [f"## helm release `{self.release}`", ""]
        try:
            parts += ["| revision | status | description |", "|---|---|---|"]
            parts += [f"| {h.revision} | {h.status} | {h.description} |" for h in self.helm.history(self.release)]
        except Exception as exc:
            parts.append(f"helm history unavailable: {type(exc).__name__}")
        return "\n".join(parts) + "\n\n" + self.kube.diagnostics()

    def evidence(self) -> Evidence:
        """What the runbook's troubleshooting looks at, read from the cluster, IAM, the database and the server.

        Read-only and best effort: each piece that cannot be read is a note, never an error (a diagnosis runs
        when things are broken). The database is probed from this runner only when a pod is in trouble.
        """
        s, k = self.settings, self.settings.kubernetes
        ev = Evidence(environment=s.name, target=self.name, namespace=k.namespace,
                      secret=f"secret {k.namespace}/{k.existing_secret}", admin_username=s.mlflow.admin_username,
                      admin_store=self.admin_password_store())

        def gather(what: str, read: Any) -> None:
            try:
                read()
            except Exception as exc:  # noqa: BLE001 - evidence that cannot be read is a note
                ev.notes.append(f"{what}: {redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)[:200]}")

        w = Workload()

        def revision() -> None:
            nonlocal w
            w = self.workload()
            current = self.current_revision()
            if current is not None:
                ev.revision, ev.revision_auth = current.number, current.spec.auth
                ev.expected_role = current.spec.platform.get("irsa_role_arn") or None
                ev.artifacts_destination = current.spec.artifacts_destination

        def pods() -> None:
            ev.pods = self.kube.pod_evidence()

        def database() -> None:
            if any(p.troubled for p in ev.pods):
                uri = (self.kube.read_secret(k.existing_secret) or {}).get("backend-store-uri")
                if uri:
                    from mlflow_rollout.redact import register_secret

                    register_secret(uri)
                    ev.database = mlflow_db.probe_connection(SecretStr(uri))

        def service_account() -> None:
            if w.service_account:
                ev.service_account = w.service_account
                annotations = self.kube.annotations("ServiceAccount", w.service_account)
                ev.service_account_role = (annotations or {}).get("eks.amazonaws.com/role-arn", "")

        def iam() -> None:
            dest = ev.artifacts_destination or ""
            if ev.expected_role and dest.startswith("s3://"):
                bucket, _, prefix = dest.removeprefix("s3://").partition("/")
                ev.iam_denied = aws.s3_actions_denied(ev.expected_role, bucket, prefix, **self._aws())

        def service() -> None:
            if w.service:
                selected = self.kube.selected_ready_pods(w.service)
                ev.service = w.service
                if selected is not None:
                    ev.service_selector, ev.service_ready_pods = selected

        def ingress() -> None:
            if w.ingress:
                annotations = self.kube.annotations("Ingress", w.ingress) or {}
                ev.ingress = w.ingress
                ev.healthcheck_path = annotations.get("alb.ingress.kubernetes.io/healthcheck-path")
                ev.healthcheck_codes = annotations.get("alb.ingress.kubernetes.io/success-codes")
                if ev.healthcheck_path:
                    ev.healthcheck_status = self._pod_status(w, ev.healthcheck_path)
                ev.public_status = checks.status_of(self.endpoint(), "/health")

        def authentication() -> None:
            read_auth_evidence(self, ev)

        with self._one_manifest():
            for what, read in (("revision", revision), ("pods", pods), ("database", database),
                               ("service account", service_account), ("IAM", iam), ("service", service),
                               ("ingress", ingress), ("authentication", authentication)):
                gather(what, read)
        return ev

    def _pod_status(self, w: Workload, path: str) -> int | None:
        """What a Ready server pod itself answers on ``path`` — as the load balancer's health check asks it.

        In the cluster (``access: service`` or ``in_cluster``) the pod's IP; elsewhere a port-forward to that pod.
        """
        pod = self.kube.ready_pod()
        if pod is None or not w.container_port:
            return None
        k = self.settings.kubernetes
        if k.access == "service" or k.in_cluster:
            return checks.status_of(Endpoint(url=f"http://{pod.status.pod_ip}:{w.container_port}"), path)
        from tasks.port_forward import PortForward

        with PortForward(self.kube.core, self.settings.kubernetes.namespace, lambda: [pod.metadata.name],
                         w.container_port) as forward:
            return checks.status_of(Endpoint(url=f"http://127.0.0.1:{forward.local_port}"), path)

    def _pods_ready(self) -> bool:
        """Every server pod is Ready and there is at least one (what `status` calls healthy)."""
        pods = self.kube.processes()
        return bool(pods) and all(p.ready for p in pods)

    def status(self) -> dict:
        rev = self.current_revision()
        k = self.settings.kubernetes
        return {
            "environment": self.settings.name,
            "target": self.name,
            "url": self._host_url(),
            "revision": rev.number if rev else None,
            "auth": bool(rev and rev.spec.auth),
            "healthy": self._pods_ready(),
            "namespace": k.namespace,
            "release": self.release,
            "ca_bundle": str(k.ca_bundle) if k.ca_bundle else None,
            "admin_username": self.settings.mlflow.admin_username,
            "existing_secret": k.existing_secret,
        }


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Helm's coalescing of values files: maps merge, everything else is replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _parse_time(text: str) -> dt.datetime:
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return dt.datetime.now(dt.timezone.utc)


def _log() -> logging.Logger | logging.LoggerAdapter:
    """The flow run's logger inside a run, else the module's."""
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:
        return logging.getLogger(__name__)


def _describe_holder(identity: str) -> str:
    """A Lease's holderIdentity (a :class:`LockHolder` as JSON) in words."""
    try:
        return LockHolder.model_validate_json(identity).describe()
    except (ValidationError, ValueError):
        return repr(identity[:200])

