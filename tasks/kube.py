"""The Kubernetes API through the official client: what the rollout needs of it.

Namespace, the ``existingSecret`` the chart reads, the Deployment's rollout,
pods (ready, restarts, logs), the Ingress's load-balancer name, and events
for a diagnostics artifact. Configuration comes from a kubeconfig file and
context, or from the in-cluster service account when the flow runs as a Job
in the cluster.

Error split: 401/403 → :class:`AuthError`; 404 handled where absence is
normal; 409 (conflict), 429, 5xx and connection errors → :class:`TransientError`.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from pathlib import Path

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_fixed
from urllib3.exceptions import HTTPError as Urllib3Error

from mlflow_rollout.errors import AuthError, PermanentError, TransientError
from mlflow_rollout.redact import redact
from targets.base import LogSource, ProcessState

__all__ = ["Kube"]


def _classify(exc: Exception, what: str) -> Exception:
    if isinstance(exc, ApiException):
        status = exc.status or 0
        reason = redact(str(exc.reason or ""))
        if status in (401, 403):
            return AuthError(f"{what}: {status} {reason}")
        if status in (409, 429) or status >= 500:
            return TransientError(f"{what}: {status} {reason}")
        return PermanentError(f"{what}: {status} {reason}")
    if isinstance(exc, (Urllib3Error, OSError)):
        return TransientError(f"{what}: cannot reach the Kubernetes API ({type(exc).__name__})")
    return exc


class Kube:
    """A namespace-scoped view of the cluster for one MLflow release."""

    def __init__(
        self, *, namespace: str, release: str, kubeconfig: Path | None = None, context: str | None = None,
        in_cluster: bool = False,
    ):
        self.namespace = namespace
        self.release = release
        if in_cluster:
            config.load_incluster_config()
            api = client.ApiClient()
        else:
            cfg = client.Configuration()
            config.load_kube_config(
                config_file=str(kubeconfig) if kubeconfig else None, context=context, client_configuration=cfg
            )
            api = client.ApiClient(cfg)
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.net = client.NetworkingV1Api(api)
        self.selector = f"app.kubernetes.io/name=mlflow,app.kubernetes.io/instance={release}"

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # classified, never swallowed
            raise _classify(exc, what) from None

    # -------------------------------------------------------------- namespace
    def reachable(self) -> str:
        self._call("list namespaces", self.core.list_namespace, limit=1)
        return "Kubernetes API reachable"

    def ensure_namespace(self) -> bool:
        try:
            self.core.read_namespace(self.namespace)
            return False
        except ApiException as exc:
            if exc.status != 404:
                raise _classify(exc, f"namespace {self.namespace}") from None
        body = client.V1Namespace(metadata=client.V1ObjectMeta(name=self.namespace))
        try:
            self.core.create_namespace(body)
        except ApiException as exc:
            if exc.status != 409:
                raise _classify(exc, f"create namespace {self.namespace}") from None
        return True

    # ----------------------------------------------------------------- secret
    def read_secret(self, name: str) -> dict[str, str] | None:
        """The Secret's data, decoded; None when it does not exist."""
        try:
            secret = self.core.read_namespaced_secret(name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise _classify(exc, f"secret {self.namespace}/{name}") from None
        return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}

    def apply_secret(self, name: str, data: dict[str, str]) -> bool:
        """Create or replace the Secret with exactly ``data``; True when it changed."""
        current = self.read_secret(name)
        if current == data:
            return False
        body = client.V1Secret(
            metadata=client.V1ObjectMeta(
                name=name, namespace=self.namespace,
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
    def deployment_name(self) -> str | None:
        items = self._call("list deployments", self.apps.list_namespaced_deployment, self.namespace,
                           label_selector=self.selector).items
        return items[0].metadata.name if items else None

    def rollout_status(self) -> str:
        """The Deployment has rolled out: observed, updated, available (kubectl rollout status)."""
        name = self.deployment_name()
        if name is None:
            raise PermanentError(f"no Deployment with {self.selector} in {self.namespace}")
        d = self._call(f"deployment {name}", self.apps.read_namespaced_deployment, name, self.namespace)
        want = d.spec.replicas or 0
        st = d.status
        if (st.observed_generation or 0) < (d.metadata.generation or 0):
            raise TransientError(f"deployment {name}: generation not observed yet")
        if (st.updated_replicas or 0) < want or (st.available_replicas or 0) < want:
            raise TransientError(
                f"deployment {name}: {st.updated_replicas or 0} updated, {st.available_replicas or 0} available of {want}"
            )
        return f"deployment {name}: {want}/{want} updated and available"

    def pods(self) -> list[client.V1Pod]:
        return self._call("list pods", self.core.list_namespaced_pod, self.namespace, label_selector=self.selector).items

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

        def read() -> str:
            items = self._call("list ingresses", self.net.list_namespaced_ingress, self.namespace,
                               label_selector=self.selector).items
            if not items:
                raise PermanentError(f"no Ingress with {self.selector} in {self.namespace} (ingress.enabled?)")
            lb = (items[0].status.load_balancer.ingress or []) if items[0].status and items[0].status.load_balancer else []
            names = [i.hostname or i.ip for i in lb if (i.hostname or i.ip)]
            if not names:
                raise TransientError(f"ingress {items[0].metadata.name}: no load-balancer address yet")
            return names[0]

        try:
            for attempt in Retrying(stop=stop_after_delay(timeout), wait=wait_fixed(2),
                                    retry=retry_if_exception_type(TransientError), reraise=True):
                with attempt:
                    return read()
        except TransientError as exc:
            raise TransientError(f"{exc} after {timeout:.0f}s") from None
        raise AssertionError("unreachable")

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
                          f"restarts {sum(s.restart_count or 0 for s in statuses)})", "", "```"]
                try:
                    text = self.core.read_namespaced_pod_log(pod.metadata.name, self.namespace, tail_lines=tail_lines)
                except Exception as exc:
                    text = f"(log unavailable: {type(exc).__name__})"
                parts += [redact(text or "").rstrip(), "```"]
        except Exception as exc:
            parts.append(f"pods unavailable: {type(exc).__name__}")
        return "\n".join(parts)
