"""The ``kubernetes`` target: the chart in ``charts/mlflow`` on EKS, driven by helm.

=======================  =============================================
interface                here
=======================  =============================================
secret store             the chart's ``existingSecret`` (Kubernetes API)
revisions                helm revisions (``helm history``); a revision's
                         spec is read back from ``helm get values``
deploy                   ``helm upgrade --install --wait`` with the full
                         values, then the Deployment's rollout status
rollback                 ``helm rollback --wait``
logs / processes         pod logs, container statuses
dns                      Ingress LB name → Route53 UPSERT → INSYNC →
                         resolved through the configured resolvers
=======================  =============================================

A re-run that would change nothing (the deployed revision already has the
same values and the release is healthy) makes no new helm revision.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import yaml
from pydantic import SecretStr

from mlflow_rollout.errors import BadInputError, PermanentError, TransientError
from mlflow_rollout.secrets import new_secret_value
from mlflow_rollout.server_spec import SecretBundle, ServerSpec
from mlflow_rollout.settings import EnvironmentSettings
from targets.base import DeployResult, Endpoint, LogSource, ProcessState, Revision
from tasks import aws, dns, mlflow_db
from tasks.helm import PENDING, Helm, HelmRevision
from tasks.kube import Kube
from tasks.terraform import TerraformOutputs, redacted_connection_string

__all__ = ["KubernetesTarget", "values_for", "spec_from_values"]

_BACKEND_ANNOTATION = "mlflow-rollout/backend-store"
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
        "ingress": {"enabled": True, "hosts": [settings.mlflow.host], "certificateArn": p.get("certificate_arn", "")},
        "aws": {"region": settings.aws.region},
        # The secret's digest rolls the pods when a credential changes; the
        # backend's display form (password ***) records which database a revision used.
        "podAnnotations": {"checksum/existing-secret": secret_checksum, _BACKEND_ANNOTATION: spec.backend_store},
    }


def spec_from_values(values: dict[str, Any], settings: EnvironmentSettings) -> ServerSpec:
    """The spec a revision ran, read back from its values (``helm get values``)."""
    auth = values.get("auth", {})
    m = values.get("mlflow", {})
    art = values.get("artifacts", {})
    host = settings.mlflow.host
    return ServerSpec(
        auth=bool(auth.get("enabled", True)),
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

    @property
    def kube(self) -> Kube:
        if self._kube is None:  # connects lazily: status/--help must not need a cluster
            k = self.settings.kubernetes
            self._kube = Kube(
                namespace=k.namespace, release=k.release, kubeconfig=k.kubeconfig, context=k.context,
                in_cluster=k.in_cluster,
            )
        return self._kube

    def _aws(self) -> dict[str, Any]:
        return {"region": self.settings.aws.region, "endpoint_url": self.settings.aws.endpoint_url}

    # -------------------------------------------------------------- preflight
    def preflight(self, outputs: TerraformOutputs) -> list[str]:
        s, a = self.settings, self.settings.aws
        notes = [self.kube.reachable(), f"helm {self.helm.version()}"]
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
            notes.append(f"release was stuck ({stuck.status}): {self.helm.recover(self.release)}")
        spec = self.server_spec(outputs, auth=True)
        self.helm.template(self.release, s.kubernetes.chart, values_for(spec, s, "preflight"),
                           values_files=s.kubernetes.values_files)
        notes.append("chart renders with these values")
        return notes

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
        self.kube.ensure_namespace()
        return self.kube.apply_secret(self.settings.kubernetes.existing_secret, {
            "backend-store-uri": secrets.backend_store_uri.get_secret_value(),
            "auth-database-uri": secrets.auth_database_uri.get_secret_value(),
            "admin-password": secrets.admin_password.get_secret_value(),
            "flask-secret-key": secrets.flask_secret_key.get_secret_value(),
            "basic_auth.ini": auth_ini,
        })

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

    # -------------------------------------------------------------- revisions
    def _revision(self, h: HelmRevision) -> Revision:
        """One helm revision as a :class:`Revision` (its spec read from ``helm get values``)."""
        try:
            values = self.helm.values(self.release, h.revision)
        except PermanentError:
            values = {}
        return Revision(
            number=h.revision, spec=spec_from_values(values, self.settings),
            created_at=_parse_time(h.updated),
            status="pending" if h.status in PENDING else _STATUS.get(h.status, "failed"),  # type: ignore[arg-type]
            description=h.description,
        )

    def history(self) -> list[Revision]:
        return [self._revision(h) for h in self.helm.history(self.release)]

    def current_revision(self) -> Revision | None:
        # Only the newest deployed revision's values are needed: one `helm get values`, not one per revision.
        deployed = [h for h in self.helm.history(self.release) if h.status == "deployed"]
        return self._revision(deployed[-1]) if deployed else None

    def rollback_candidates(self) -> list[Revision]:
        current = self.current_revision()
        good = [r for r in self.history() if r.status == "superseded" and (current is None or r.number != current.number)]
        return sorted(good, key=lambda r: r.number, reverse=True)

    # ----------------------------------------------------------------- deploy
    def deploy(self, spec: ServerSpec) -> DeployResult:
        k = self.settings.kubernetes
        secret = self.kube.read_secret(k.existing_secret)
        if secret is None:
            raise PermanentError(f"secret {k.namespace}/{k.existing_secret} does not exist; run the secrets stage")
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
        known = {r.revision for r in self.helm.history(self.release)}
        if revision not in known:
            raise BadInputError(f"revision {revision} does not exist")
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
        if k.access == "service":
            fullname = self.release if "mlflow" in self.release else f"{self.release}-mlflow"
            return Endpoint(url=f"http://{fullname}.{k.namespace}.svc")
        lb = self.kube.ingress_hostname(k.ingress_timeout_seconds)
        return Endpoint(url=self._host_url(), ca_bundle=k.ca_bundle, connect_address=self._resolve(lb))

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

    def status(self) -> dict:
        rev = self.current_revision()
        k = self.settings.kubernetes
        return {
            "environment": self.settings.name,
            "target": self.name,
            "url": self._host_url(),
            "revision": rev.number if rev else None,
            "auth": bool(rev and rev.spec.auth),
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
