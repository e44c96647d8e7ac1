"""The Kubernetes API through the official client: what the rollout needs of it.

Permissions (a SelfSubjectAccessReview per entry of :data:`RUNNER_RULES`),
the ``existingSecret`` the chart reads (and its auth marker annotation), the
Deployment's rollout, pods (ready, restarts, logs), the
Ingress's load-balancer name, events for a diagnostics artifact, and the
``coordination.k8s.io/v1`` Lease that serves as the environment's operation
lock (:class:`LeaseLock`). Configuration comes from a kubeconfig file and
context, or from the in-cluster service account when the flow runs as a Job
in the cluster.

Namespaced only: the runner's identity has a Role in the target namespace
(charts/mlflow-rollout-runner) and nothing cluster-wide, so nothing here
reads or creates Namespaces. A missing namespace is a :class:`BadInputError`
naming it and the ``kubectl create namespace`` that makes it.

Names are read, never re-derived: the Deployment, its pod selector and the
Ingress come from the release's rendered manifest (:class:`Workload`, which
the target builds from ``helm get manifest``), so ``nameOverride`` and
``fullnameOverride`` in the chart values work end to end.

Error split: 401/403 → :class:`AuthError`; 404 handled where absence is
normal; 409 (conflict), 429, 5xx and connection errors → :class:`TransientError`.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import hashlib
import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_fixed
from urllib3.exceptions import HTTPError as Urllib3Error

from mlflow_rollout.errors import AuthError, BadInputError, PermanentError, TransientError
from mlflow_rollout.redact import redact
from mlflow_rollout.diagnosis import ContainerEvidence, PodEvidence
from mlflow_rollout.types import LogSource, ProcessState

__all__ = ["Kube", "LeaseLock", "LeaseBusy", "Workload", "deployment_rollout", "RUNNER_RULES"]

#: Everything the rollout (helm included) does in its namespace, as RBAC rules ``(apiGroup, resource, verbs)``.
#: The runner chart's Role (charts/mlflow-rollout-runner) grants exactly these (a test keeps them equal);
#: preflight checks each with a SelfSubjectAccessReview. Nothing cluster-wide: the namespace is a prerequisite.
#: Recorded on the emulator from helm 4 and helm 3 rollouts (tests/test_runner_rbac.py proves each verb is used).
_CHART_VERBS = ("get", "create", "patch", "delete", "watch")  # helm: apply (get, patch+create), wait, uninstall
_HOOK_VERBS = ("get", "create", "patch", "delete", "watch")  # helm hooks (the migration Job and its ConfigMap)
RUNNER_RULES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("", "secrets", ("get", "list", "create", "update", "patch", "delete")),  # helm storage, existingSecret
    ("coordination.k8s.io", "leases", ("get", "create", "update", "delete")),  # the operation lock
    ("", "pods", ("list",)),
    ("", "pods/log", ("get",)),
    ("", "events", ("list",)),  # diagnostics
    ("apps", "replicasets", ("list",)),  # helm 4's Deployment readiness
    ("", "configmaps", _HOOK_VERBS),
    ("", "services", _CHART_VERBS),
    ("", "serviceaccounts", _CHART_VERBS),
    ("apps", "deployments", _CHART_VERBS),
    ("batch", "jobs", (*_HOOK_VERBS, "list")),  # helm 3 waits for a hook Job with an informer (list + watch)
    ("autoscaling", "horizontalpodautoscalers", _CHART_VERBS),
    ("policy", "poddisruptionbudgets", _CHART_VERBS),
    ("networking.k8s.io", "ingresses", _CHART_VERBS),
    ("networking.k8s.io", "networkpolicies", _CHART_VERBS),
)


def _classify(exc: Exception, what: str) -> Exception:
    if isinstance(exc, ApiException):
        status = exc.status or 0
        reason = redact(str(exc.reason or ""))
        if status in (401, 403):
            message = _status_message(exc)  # a 403 names the user and the permission it lacks
            return AuthError(f"{what}: {status} {reason}" + (f": {redact(message)[:400]}" if message else ""))
        if status in (409, 429) or status >= 500:
            return TransientError(f"{what}: {status} {reason}")
        return PermanentError(f"{what}: {status} {reason}")
    if isinstance(exc, (Urllib3Error, OSError)):
        return TransientError(f"{what}: cannot reach the Kubernetes API ({type(exc).__name__})")
    return exc


def _status_message(exc: ApiException) -> str:
    """The ``message`` of the API's ``metav1.Status`` answer, if it sent one."""
    try:
        return str((json.loads(exc.body or "{}") or {}).get("message") or "")
    except (ValueError, TypeError, AttributeError):
        return ""


def _missing_namespace(exc: ApiException) -> str | None:
    """The namespace a 404 says is missing (``namespaces "x" not found``, as on a create in it); else None."""
    try:
        details = (json.loads(exc.body or "{}") or {}).get("details") or {}
    except (ValueError, TypeError, AttributeError):
        return None
    return details.get("name") if details.get("kind") == "namespaces" else None


def _api_retries():
    """Bursts of 429/5xx are the API server's way to say "later": honour Retry-After, back off briefly.

    Bounded (8 tries, ≤ 2 s apart) so a persistent failure still surfaces within seconds
    and reaches our own TransientError/PermanentError split.
    """
    from urllib3.util import Retry

    return Retry(
        total=8, connect=3, read=2, status=8, backoff_factor=0.2, backoff_max=2,
        status_forcelist=(429, 500, 502, 503, 504), respect_retry_after_header=True, raise_on_status=False,
        allowed_methods=None,
    )


@dataclass(frozen=True)
class Workload:
    """The objects a release's rendered manifest names: the server Deployment, its pod selector, Service, Ingress.

    Read from the manifest (``helm get manifest``) rather than re-derived from
    the release name, so the chart's ``nameOverride``/``fullnameOverride``
    (and any label the chart puts in its selector) are honoured. A release
    that is not installed has no Deployment and an empty selector.
    """

    deployment: str | None = None
    #: The Deployment's ``spec.selector.matchLabels``: its pods (old and new ReplicaSets).
    selector: dict[str, str] = field(default_factory=dict)
    service: str | None = None
    service_port: int | None = None
    ingress: str | None = None
    #: The pods' ServiceAccount (IRSA's role annotation lives on it) and the server container's port.
    service_account: str | None = None
    container_port: int | None = None

    @property
    def label_selector(self) -> str:
        return ",".join(f"{k}={v}" for k, v in sorted(self.selector.items()))

    @classmethod
    def from_manifest(cls, objects: Iterable[dict[str, Any]]) -> "Workload":
        """The server's objects among a manifest's (hooks are not part of ``helm get manifest``)."""
        objects = [o for o in objects if isinstance(o, dict) and o.get("kind")]

        def named(kind: str) -> list[dict[str, Any]]:
            return [o for o in objects if o["kind"] == kind and (o.get("metadata") or {}).get("name")]

        deployments = named("Deployment")
        servers = [d for d in deployments
                   if ((d["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == "server")]
        if not (servers or deployments):
            return cls()
        d = (servers or deployments)[0]
        selector = {str(k): str(v) for k, v in
                    (((d.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}).items()}
        # The Service whose selector picks the server's pods (it may add labels of its own, e.g. mlflow/auth).
        services = [s for s in named("Service")
                    if selector.items() <= {str(k): str(v) for k, v in
                                            ((s.get("spec") or {}).get("selector") or {}).items()}.items()]
        service = services[0] if services else None
        ports = ((service or {}).get("spec") or {}).get("ports") or []
        ingresses = named("Ingress")
        pod_spec = (((d.get("spec") or {}).get("template") or {}).get("spec") or {})
        container_ports = [p.get("containerPort") for c in (pod_spec.get("containers") or [])[:1]
                           for p in (c.get("ports") or []) if p.get("containerPort")]
        return cls(
            deployment=d["metadata"]["name"], selector=selector,
            service=service["metadata"]["name"] if service else None,
            service_port=int(ports[0]["port"]) if ports and ports[0].get("port") else None,
            ingress=ingresses[0]["metadata"]["name"] if ingresses else None,
            service_account=pod_spec.get("serviceAccountName") or "default",
            container_port=int(container_ports[0]) if container_ports else None,
        )


#: ``status.conditions[Progressing].reason`` once ``progressDeadlineSeconds`` passed (deploymentutil.TimedOutReason).
PROGRESS_DEADLINE_EXCEEDED = "ProgressDeadlineExceeded"


def deployment_rollout(d: client.V1Deployment) -> tuple[str, bool]:
    """``(message, done)`` for a Deployment, exactly as ``kubectl rollout status`` decides it.

    kubectl's ``DeploymentStatusViewer.Status`` (pkg/polymorphichelpers/rollout_status.go),
    in its order: spec not observed yet → waiting; Progressing condition with
    reason ProgressDeadlineExceeded → error (raised as :class:`PermanentError`);
    ``spec.replicas > status.updatedReplicas`` → "N out of M new replicas have
    been updated"; ``status.replicas > status.updatedReplicas`` → "N old
    replicas are pending termination"; ``status.availableReplicas <
    status.updatedReplicas`` → "N of M updated replicas are available"; else
    done.
    """
    name = d.metadata.name
    st = d.status or client.V1DeploymentStatus()
    if (d.metadata.generation or 0) > (st.observed_generation or 0):
        return "Waiting for deployment spec update to be observed...", False
    progressing = [c for c in (st.conditions or []) if c.type == "Progressing"]
    if progressing and progressing[0].reason == PROGRESS_DEADLINE_EXCEEDED:
        raise PermanentError(f'deployment "{name}" exceeded its progress deadline'
                             + (f": {redact(progressing[0].message)}" if progressing[0].message else ""))
    updated, replicas, available = st.updated_replicas or 0, st.replicas or 0, st.available_replicas or 0
    if d.spec.replicas is not None and updated < d.spec.replicas:
        return (f'Waiting for deployment "{name}" rollout to finish: '
                f"{updated} out of {d.spec.replicas} new replicas have been updated..."), False
    if replicas > updated:
        return (f'Waiting for deployment "{name}" rollout to finish: '
                f"{replicas - updated} old replicas are pending termination..."), False
    if available < updated:
        return (f'Waiting for deployment "{name}" rollout to finish: '
                f"{available} of {updated} updated replicas are available..."), False
    return f'deployment "{name}" successfully rolled out', True


def pod_ready(pod: client.V1Pod) -> bool:
    """The pod's ``Ready`` condition is true: it passes its readiness probe and is an endpoint of its Services."""
    return any(c.type == "Ready" and c.status == "True" for c in ((pod.status and pod.status.conditions) or []))


def _no_workload() -> Workload:
    raise PermanentError("no source for the release's object names: pass Kube(workload=...) "
                         "(the target reads them from `helm get manifest`)")


class Kube:
    """A namespace-scoped view of the cluster for one MLflow release.

    ``workload`` returns the release's :class:`Workload` (the names in its
    rendered manifest); it is called whenever a name is needed, so a revision
    that renamed the Deployment is followed.
    """

    def __init__(
        self, *, namespace: str, release: str, kubeconfig: Path | None = None, context: str | None = None,
        in_cluster: bool = False, workload: Callable[[], Workload] = _no_workload,
    ):
        self.namespace = namespace
        self.release = release
        self.workload = workload
        if in_cluster:
            config.load_incluster_config()
            cfg = client.Configuration.get_default_copy()
        else:
            cfg = client.Configuration()
            config.load_kube_config(
                config_file=str(kubeconfig) if kubeconfig else None, context=context, client_configuration=cfg
            )
        cfg.retries = _api_retries()
        api = client.ApiClient(cfg)
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.net = client.NetworkingV1Api(api)
        self.coordination = client.CoordinationV1Api(api)
        self.authorization = client.AuthorizationV1Api(api)

    def _call(self, what: str, fn, *args, absent_on: tuple[int, ...] = (), absent: Any = None, **kwargs):
        """``fn(*args, **kwargs)``; ``absent`` when the API answers a status in ``absent_on``
        (where absence or a lost race is normal: 404, 409); every other error classified, never swallowed."""
        try:
            return fn(*args, **kwargs)
        except ApiException as exc:
            if exc.status == 404 and _missing_namespace(exc) == self.namespace:
                raise BadInputError(
                    f"namespace {self.namespace} does not exist; it is a prerequisite the rollout does not create "
                    f"(the runner may not touch Namespaces): create it with `kubectl create namespace "
                    f"{self.namespace}`, then install the runner's permissions in it (charts/mlflow-rollout-runner)"
                ) from None
            if exc.status in absent_on:
                return absent
            raise _classify(exc, what) from None
        except Exception as exc:
            raise _classify(exc, what) from None

    # ------------------------------------------------------------ permissions
    def missing_permissions(self, rules: Iterable[tuple[str, str, tuple[str, ...]]] = ()) -> list[str]:
        """The ``(group, resource, verbs)`` of ``rules`` (default :data:`RUNNER_RULES`) this identity may not use
        in the namespace, as ``"verb group/resource"`` — one ``SelfSubjectAccessReview`` per verb.

        A namespaced question: it needs no cluster-wide read (every authenticated
        user may create SelfSubjectAccessReviews), and it reaches the API.
        """
        missing = []
        for group, resource, verbs in (rules or RUNNER_RULES):
            res, _, sub = resource.partition("/")
            for verb in verbs:
                body = client.V1SelfSubjectAccessReview(spec=client.V1SelfSubjectAccessReviewSpec(
                    resource_attributes=client.V1ResourceAttributes(
                        namespace=self.namespace, group=group, resource=res, subresource=sub or None, verb=verb)))
                review = self._call("access review", self.authorization.create_self_subject_access_review, body)
                if not (review.status and review.status.allowed):
                    missing.append(f"{verb} {group + '/' if group else ''}{resource}")
        return missing

    def check_access(self) -> str:
        """Preflight: this identity may do everything the rollout does in the namespace (:data:`RUNNER_RULES`)."""
        missing = self.missing_permissions()
        if missing:
            raise AuthError(
                f"the Kubernetes credentials lack {len(missing)} permission(s) the rollout needs in namespace "
                f"{self.namespace}: {', '.join(missing)}; grant them with the runner chart "
                f"(helm upgrade --install mlflow-rollout-runner charts/mlflow-rollout-runner "
                f"--set targetNamespace={self.namespace})"
            )
        n = sum(len(v) for _, _, v in RUNNER_RULES)
        return f"Kubernetes API reachable; the {n} permissions the rollout needs in namespace {self.namespace} are granted"

    # ----------------------------------------------------------------- secret
    def _secret(self, name: str) -> client.V1Secret | None:
        return self._call(f"secret {self.namespace}/{name}", self.core.read_namespaced_secret, name, self.namespace,
                          absent_on=(404,))

    def read_secret(self, name: str) -> dict[str, str] | None:
        """The Secret's data, decoded; None when it does not exist."""
        secret = self._secret(name)
        if secret is None:
            return None
        return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}

    def secret_annotations(self, name: str) -> dict[str, str] | None:
        """The Secret's annotations ({} when it has none); None when it does not exist."""
        secret = self._secret(name)
        return None if secret is None else dict(secret.metadata.annotations or {})

    def annotate_secret(self, name: str, annotations: dict[str, str]) -> None:
        """Add (or overwrite) annotations on the Secret with a merge patch; its data is not touched."""
        body = {"metadata": {"annotations": annotations}}
        self._call(f"annotate secret {name}", self.core.patch_namespaced_secret, name, self.namespace, body,
                   _content_type="application/merge-patch+json")

    def apply_secret(self, name: str, data: dict[str, str]) -> bool:
        """Create or replace the Secret with exactly ``data``; True when it changed.

        Annotations already on the Secret (e.g. the auth marker) are kept.
        """
        current = self.read_secret(name)
        if current == data:
            return False
        annotations = (self.secret_annotations(name) or None) if current is not None else None
        body = client.V1Secret(
            metadata=client.V1ObjectMeta(
                name=name, namespace=self.namespace, annotations=annotations,
                labels={"app.kubernetes.io/managed-by": "mlflow-rollout", "app.kubernetes.io/instance": self.release},
            ),
            type="Opaque",
            data={k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        )
        if current is None:
            self._call(f"create secret {name}", self.core.create_namespaced_secret, self.namespace, body)
        else:
            self._call(f"replace secret {name}", self.core.replace_namespaced_secret, name, self.namespace, body)
        return True

    @staticmethod
    def checksum(data: dict[str, str]) -> str:
        """A digest of the Secret's content, put on the pod template so a change rolls the pods."""
        h = hashlib.sha256()
        for k in sorted(data):
            h.update(k.encode() + b"\0" + data[k].encode() + b"\0")
        return h.hexdigest()

    # -------------------------------------------------------------- workloads
    def rollout_status(self) -> str:
        """The release's Deployment has rolled out, decided as ``kubectl rollout status`` does.

        Not done yet → :class:`TransientError` with kubectl's waiting message;
        progress deadline exceeded (or no Deployment at all) → :class:`PermanentError`.
        """
        w = self.workload()
        if w.deployment is None:
            raise PermanentError(f"release {self.release} has no Deployment in its manifest (is it installed?)")
        d = self._call(f"deployment {self.namespace}/{w.deployment}", self.apps.read_namespaced_deployment,
                       w.deployment, self.namespace)
        message, done = deployment_rollout(d)
        if not done:
            raise TransientError(message)
        return message

    def pods(self) -> list[client.V1Pod]:
        """The pods the release's Deployment selects (its old and new ReplicaSets'); [] when not installed."""
        w = self.workload()
        if not w.selector:
            return []
        return self._call("list pods", self.core.list_namespaced_pod, self.namespace,
                          label_selector=w.label_selector).items

    def processes(self) -> list[ProcessState]:
        out = []
        for pod in self.pods():
            statuses = pod.status.container_statuses or []
            ready = bool(statuses) and all(s.ready for s in statuses)
            restarts = sum(s.restart_count or 0 for s in statuses)
            waiting = [s.state.waiting.reason for s in statuses if s.state and s.state.waiting]
            out.append(ProcessState(
                name=f"pod {pod.metadata.name}", ready=ready, restarts=restarts,
                detail=", ".join(w for w in waiting if w) or (pod.status.phase or ""),
            ))
        return out

    def logs_since(self, since: dt.datetime) -> list[LogSource]:
        """Each pod's log since ``since`` and since its container started."""
        out = []
        now = dt.datetime.now(dt.timezone.utc)
        for pod in self.pods():
            name = pod.metadata.name
            full = self._call(f"logs of {name}", self.core.read_namespaced_pod_log, name, self.namespace) or ""
            seconds = max(1, int((now - since).total_seconds()) + 1)
            recent = self._call(
                f"logs of {name}", self.core.read_namespaced_pod_log, name, self.namespace, since_seconds=seconds
            ) or ""
            restarts = sum(s.restart_count or 0 for s in (pod.status.container_statuses or []))
            out.append(LogSource(name=f"pod {name}", text=recent, since_start=full, restarts=restarts))
        return out

    # ---------------------------------------------------------------- ingress
    def ingress_hostname(self, timeout: float) -> str:
        """Wait for the Ingress's load balancer to get a hostname (the ALB's DNS name)."""

        name = self.workload().ingress
        if name is None:
            raise PermanentError(f"release {self.release} has no Ingress in its manifest (ingress.enabled?)")

        def read() -> str:
            ing = self._call(f"ingress {self.namespace}/{name}", self.net.read_namespaced_ingress, name,
                             self.namespace, absent_on=(404,))
            if ing is None:
                raise PermanentError(f"ingress {self.namespace}/{name} of release {self.release} does not exist")
            lb = (ing.status.load_balancer.ingress or []) if ing.status and ing.status.load_balancer else []
            names = [i.hostname or i.ip for i in lb if (i.hostname or i.ip)]
            if not names:
                raise TransientError(f"ingress {name}: no load-balancer address yet")
            return names[0]

        try:
            for attempt in Retrying(stop=stop_after_delay(timeout), wait=wait_fixed(2),
                                    retry=retry_if_exception_type(TransientError), reraise=True):
                with attempt:
                    return read()
        except TransientError as exc:
            raise TransientError(f"{exc} after {timeout:.0f}s") from None
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ lease
    def read_lease(self, name: str, *, timeout: float = 10) -> client.V1Lease | None:
        """The Lease; None when it does not exist."""
        return self._call(f"lease {self.namespace}/{name}", self.coordination.read_namespaced_lease, name,
                          self.namespace, _request_timeout=timeout, absent_on=(404,))

    def create_lease(self, name: str, spec: client.V1LeaseSpec, *, timeout: float = 10) -> client.V1Lease | None:
        """Create the Lease; None when it already exists (409: someone holds it)."""
        body = client.V1Lease(
            metadata=client.V1ObjectMeta(
                name=name, namespace=self.namespace,
                labels={"app.kubernetes.io/managed-by": "mlflow-rollout", "app.kubernetes.io/instance": self.release},
            ),
            spec=spec,
        )
        return self._call(f"create lease {self.namespace}/{name}", self.coordination.create_namespaced_lease,
                          self.namespace, body, _request_timeout=timeout, absent_on=(409,))

    def replace_lease(self, lease: client.V1Lease, *, timeout: float = 10) -> client.V1Lease | None:
        """Replace the Lease, guarded by its ``resourceVersion``; None on 409 (it changed since it was read)."""
        name = lease.metadata.name
        return self._call(f"replace lease {self.namespace}/{name}", self.coordination.replace_namespaced_lease,
                          name, self.namespace, lease, _request_timeout=timeout, absent_on=(404, 409))

    def delete_lease(self, name: str, resource_version: str | None, *, timeout: float = 10) -> bool:
        """Delete the Lease if it still has ``resource_version``; False when it changed or is gone."""
        options = client.V1DeleteOptions(
            preconditions=client.V1Preconditions(resource_version=resource_version) if resource_version else None
        )
        gone = object()
        result = self._call(f"delete lease {self.namespace}/{name}", self.coordination.delete_namespaced_lease,
                            name, self.namespace, body=options, _request_timeout=timeout,
                            absent_on=(404, 409), absent=gone)
        return result is not gone

    # ------------------------------------------------------------ diagnosis
    def pod_evidence(self, tail_lines: int = 60) -> list[PodEvidence]:
        """The server's pods as the runbook's ``kubectl get pods`` / ``kubectl logs [--previous]`` show them."""
        out = []
        for pod in self.pods():
            name = pod.metadata.name
            containers, restarted = [], False
            for s in pod.status.container_statuses or []:
                waiting = s.state.waiting if s.state else None
                last = s.last_state.terminated if s.last_state else None
                restarted = restarted or bool(s.restart_count)
                containers.append(ContainerEvidence(
                    name=s.name, ready=bool(s.ready), restarts=s.restart_count or 0,
                    waiting_reason=waiting.reason if waiting else None,
                    waiting_message=redact(str(waiting.message))[:400] if waiting and waiting.message else None,
                    last_exit_code=last.exit_code if last else None,
                ))
            logs = []
            for previous in ((True, False) if restarted else (False,)):
                try:
                    logs.append(self.core.read_namespaced_pod_log(name, self.namespace, tail_lines=tail_lines,
                                                                  previous=previous) or "")
                except Exception:  # noqa: BLE001 - a container that never started has no log: evidence, not error
                    continue
            out.append(PodEvidence(
                name=name, phase=pod.status.phase or "", ready=bool(containers) and all(c.ready for c in containers),
                containers=containers, log=redact("\n".join(logs)),
            ))
        return out

    def selected_ready_pods(self, service: str) -> tuple[dict[str, str], int] | None:
        """``(selector, Ready pods it selects)`` of a Service — its endpoints, as ``kubectl get endpoints`` counts
        them; None when the Service does not exist."""
        svc = self._call(f"service {self.namespace}/{service}", self.core.read_namespaced_service, service,
                         self.namespace, absent_on=(404,))
        if svc is None:
            return None
        selector = dict(svc.spec.selector or {})
        if not selector:
            return selector, 0
        pods = self._call("list pods", self.core.list_namespaced_pod, self.namespace,
                          label_selector=",".join(f"{k}={v}" for k, v in sorted(selector.items()))).items
        return selector, sum(1 for p in pods if pod_ready(p))

    def annotations(self, kind: str, name: str) -> dict[str, str] | None:
        """The annotations of this namespace's ``ServiceAccount`` or ``Ingress`` ``name``; None when it is absent."""
        read = {"ServiceAccount": self.core.read_namespaced_service_account,
                "Ingress": self.net.read_namespaced_ingress}[kind]
        obj = self._call(f"{kind.lower()} {self.namespace}/{name}", read, name, self.namespace, absent_on=(404,))
        return None if obj is None else dict(obj.metadata.annotations or {})

    def ready_pods(self) -> list[client.V1Pod]:
        """The release's pods whose ``Ready`` condition is true (those a Service sends traffic to)."""
        return [pod for pod in self.pods() if pod_ready(pod)]

    def ready_pod(self) -> client.V1Pod | None:
        """A Ready pod of the release (for a probe of the pod itself), or None."""
        return next(iter(self.ready_pods()), None)

    # ------------------------------------------------------------ diagnostics
    def diagnostics(self, tail_lines: int = 40) -> str:
        """Events and log tails of the release's pods, as markdown (best effort)."""
        parts = [f"## Kubernetes `{self.namespace}` / release `{self.release}`"]
        try:
            events = self.core.list_namespaced_event(self.namespace).items
            events = sorted(events, key=lambda e: str(e.last_timestamp or e.event_time or ""))[-30:]
            parts += ["", "### Events", "", "| object | type | reason | message |", "|---|---|---|---|"]
            for e in events:
                obj = f"{e.involved_object.kind}/{e.involved_object.name}"
                parts.append(f"| {obj} | {e.type} | {e.reason} | {redact(str(e.message or ''))[:200]} |")
        except Exception as exc:
            parts.append(f"events unavailable: {type(exc).__name__}")
        try:
            for pod in self.pods():
                statuses = pod.status.container_statuses or []
                parts += ["", f"### pod `{pod.metadata.name}` ({pod.status.phase}, "
                          f"restarts {sum(s.restart_count or 0 for s in statuses)})", ""]
                parts += [f"- container `{s.name}`: {_container_state(s)}" for s in statuses]
                parts += ["", "```"]
                try:
                    text = self.core.read_namespaced_pod_log(pod.metadata.name, self.namespace, tail_lines=tail_lines)
                except Exception as exc:
                    text = f"(log unavailable: {type(exc).__name__})"
                parts += [redact(text or "").rstrip(), "```"]
        except Exception as exc:
            parts.append(f"pods unavailable: {type(exc).__name__}")
        return "\n".join(parts)


def _container_state(status: client.V1ContainerStatus) -> str:
    """What the kubelet says about a container: ``waiting: CreateContainerConfigError — couldn't find key …``."""
    state = status.state
    if state and state.waiting:
        text = f"waiting: {state.waiting.reason or '?'}"
        return text + (f" — {redact(str(state.waiting.message))[:300]}" if state.waiting.message else "")
    if state and state.terminated:
        t = state.terminated
        return f"terminated: {t.reason or '?'} (exit code {t.exit_code})"
    if state and state.running:
        return "running, " + ("ready" if status.ready else "not ready")
    return "unknown"


# --------------------------------------------------------------------------
# the operation lock


class LeaseBusy(Exception):
    """The Lease is held by a live holder; ``holder`` is its ``holderIdentity``."""

    def __init__(self, holder: str, expires: dt.datetime | None):
        super().__init__(holder)
        self.holder = holder
        self.expires = expires


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _aware(t: dt.datetime | None) -> dt.datetime | None:
    if t is None:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


class LeaseLock:
    """A ``coordination.k8s.io/v1`` Lease as a lock that frees itself when its holder dies.

    Acquire: create the Lease (409: someone holds it). A Lease whose
    ``renewTime + leaseDurationSeconds`` is past — or that this waiter has
    watched stay unchanged for a whole lease duration by its own clock, so a
    holder whose clock runs ahead cannot pin it — is taken over with a
    ``resourceVersion``-guarded replace (a 409 means another waiter won).
    While held, a daemon thread renews ``renewTime`` every third of the lease;
    a renewal that finds the Lease taken over marks the lock ``lost``.
    Release stops the renewals and deletes the Lease, guarded by its
    ``resourceVersion`` so a lock taken over meanwhile is left alone.

    The API's transient errors (5xx, 429, resets) while waiting or renewing
    are retried; the lease itself bounds how long a dead holder blocks
    others.
    """

    #: Seconds between two "still waiting" lines.
    WAIT_LOG_EVERY = 15.0

    def __init__(
        self, kube: Kube, name: str, identity: str, lease_seconds: float, *,
        describe: Callable[[str], str] = lambda identity: identity,
        log: logging.Logger | logging.LoggerAdapter | None = None,
        poll_seconds: float = 1.0,
    ):
        self.kube = kube
        self.name = name
        self.identity = identity
        self.duration = max(1, math.ceil(lease_seconds))
        self.describe = describe
        self.log = log or logging.getLogger(__name__)
        self.poll_seconds = poll_seconds
        self.lost = False
        self.note = ""
        self._lease: client.V1Lease | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._api_timeout = max(2.0, self.duration / 3)

    # ------------------------------------------------------------- acquiring
    def _spec(self, transitions: int = 0) -> client.V1LeaseSpec:
        now = _utcnow()
        return client.V1LeaseSpec(
            holder_identity=self.identity, lease_duration_seconds=self.duration,
            acquire_time=now, renew_time=now, lease_transitions=transitions,
        )

    def expires_at(self, lease: client.V1Lease) -> dt.datetime:
        spec = lease.spec or client.V1LeaseSpec()
        last = _aware(spec.renew_time) or _aware(spec.acquire_time) or _aware(lease.metadata.creation_timestamp) or _utcnow()
        return last + dt.timedelta(seconds=spec.lease_duration_seconds or self.duration)

    def acquire(self, wait_seconds: float) -> str:
        """Take the lock, waiting up to ``wait_seconds``; raise :class:`LeaseBusy` naming the holder."""
        deadline = time.monotonic() + max(0.0, wait_seconds)
        #: (resourceVersion, monotonic time first seen) of the holder's Lease, for the local expiry clock.
        seen: tuple[str, float] | None = None
        next_log = 0.0
        last_error: Exception | None = None
        while True:
            try:
                created = self.kube.create_lease(self.name, self._spec(), timeout=self._api_timeout)
                if created is not None:
                    self._hold(created, f"lock {self.kube.namespace}/{self.name} acquired")
                    return self.note
                current = self.kube.read_lease(self.name, timeout=self._api_timeout)
                if current is None:
                    continue  # released between our create and our read: try again at once
                holder = (current.spec.holder_identity if current.spec else None) or ""
                if holder == self.identity:  # our own create went through though its answer was lost
                    self._hold(current, f"lock {self.kube.namespace}/{self.name} acquired")
                    return self.note
                rv = current.metadata.resource_version
                if seen is None or seen[0] != rv:
                    seen = (rv, time.monotonic())
                expires = self.expires_at(current)
                unchanged_for = time.monotonic() - seen[1]
                if not holder or expires < _utcnow() or unchanged_for > (current.spec.lease_duration_seconds or self.duration):
                    taken = self._take_over(current)
                    if taken is not None:
                        why = "released" if not holder else f"expired at {expires.isoformat(timespec='seconds')}"
                        self._hold(taken, f"lock {self.kube.namespace}/{self.name} taken over from "
                                          f"{self.describe(holder) if holder else 'nobody'} (its lease {why})")
                        return self.note
                    continue  # another waiter won the race; look again
                last_error = None
            except TransientError as exc:
                last_error = exc
                holder, expires = "", None
            now = time.monotonic()
            if now >= deadline:
                if last_error is not None and not holder:
                    raise last_error
                raise LeaseBusy(holder, expires)
            if now >= next_log and holder:
                self.log.warning(
                    "waiting for the lock %s/%s: held by %s; its lease runs until %s unless renewed",
                    self.kube.namespace, self.name, self.describe(holder),
                    expires.isoformat(timespec="seconds") if expires else "?",
                )
                next_log = now + self.WAIT_LOG_EVERY
            time.sleep(min(self.poll_seconds, max(0.0, deadline - now)))

    def _take_over(self, current: client.V1Lease) -> client.V1Lease | None:
        body = copy.deepcopy(current)  # keeps metadata.resourceVersion: the replace is guarded by it
        body.spec = self._spec(transitions=((current.spec.lease_transitions or 0) if current.spec else 0) + 1)
        return self.kube.replace_lease(body, timeout=self._api_timeout)

    def _hold(self, lease: client.V1Lease, note: str) -> None:
        self._lease = lease
        self.note = note
        self.log.info("%s (lease %ss, renewed every %.0fs)", note, self.duration, self.duration / 3)
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.name}", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------- renewing
    def _renew_once(self) -> None:
        assert self._lease is not None
        body = copy.deepcopy(self._lease)
        body.spec.renew_time = _utcnow()
        renewed = self.kube.replace_lease(body, timeout=self._api_timeout)
        if renewed is not None:
            self._lease = renewed
            return
        current = self.kube.read_lease(self.name, timeout=self._api_timeout)
        if current is not None and current.spec and current.spec.holder_identity == self.identity:
            self._lease = current  # changed by someone else but still ours: renew on the next tick
            return
        self.lost = True
        holder = current.spec.holder_identity if current is not None and current.spec else None
        self.log.error(
            "lost the lock %s/%s: %s; this operation is no longer protected against a concurrent one",
            self.kube.namespace, self.name,
            f"taken over by {self.describe(holder)}" if holder else "the Lease was deleted",
        )

    def _renew_loop(self) -> None:
        interval = self.duration / 3
        while not self._stop.wait(interval):
            try:
                self._renew_once()
            except Exception as exc:  # keep renewing: the lease bounds the damage of a missed tick
                self.log.warning("renewing the lock %s/%s failed (%s); retrying",
                                 self.kube.namespace, self.name, redact(str(exc))[:200])
            if self.lost:
                return

    # ------------------------------------------------------------- releasing
    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self._api_timeout + 5)
            self._thread = None
        lease, self._lease = self._lease, None
        if lease is None or self.lost:
            return
        try:
            if not self.kube.delete_lease(self.name, lease.metadata.resource_version, timeout=self._api_timeout):
                current = self.kube.read_lease(self.name, timeout=self._api_timeout)
                if current is not None and current.spec and current.spec.holder_identity == self.identity:
                    self.kube.delete_lease(self.name, current.metadata.resource_version, timeout=self._api_timeout)
        except Exception as exc:  # the lease expires on its own
            self.log.warning("releasing the lock %s/%s failed (%s); it expires within %ss",
                             self.kube.namespace, self.name, redact(str(exc))[:200], self.duration)
