"""Defaulting and the validation a chart could trip on, per kind.

What a real API server does on write and that clients notice: defaults
(``Service.spec.clusterIP`` allocated — helm 3's wait needs it —,
``Deployment.spec.replicas``/``strategy``, pod and container defaults, Job
selectors and labels), ``Secret.stringData`` folded into ``data``, a fresh
``status`` for new pods and workloads, and the errors a broken chart gets
from a real cluster: non-string labels, bad base64 in Secret data, a
Deployment selector that does not match its template labels, an immutable
Deployment selector or Job template changed by an upgrade. Anything else is
accepted as sent.
"""

from __future__ import annotations

import base64
import binascii
import copy
import ipaddress
import itertools
import re
import threading
from typing import Any

from .errors import ApiError, bad_request, invalid
from .resources import ResourceType
from .store import label_selector_from_spec

__all__ = ["admit", "spec_changed", "pod_spec_defaults"]

_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
_ip_lock = threading.Lock()
_service_ips = itertools.count(10)


def _next_cluster_ip() -> str:
    with _ip_lock:
        n = next(_service_ips)
    return str(ipaddress.IPv4Address("10.100.0.0") + n)


def spec_changed(old: dict, new: dict) -> bool:
    """True when anything but metadata and status differs (generation bump)."""
    strip = lambda o: {k: v for k, v in o.items() if k not in ("metadata", "status")}  # noqa: E731
    return strip(old) != strip(new)


def _check_meta(rt: ResourceType, obj: dict) -> None:
    meta = obj.get("metadata") or {}
    name = meta.get("name", "")
    if not name or len(name) > 253 or not _NAME.fullmatch(name):
        raise invalid(rt.kind, name, [f'metadata.name: Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, \'-\' or \'.\''], rt.group)
    for field in ("labels", "annotations"):
        values = meta.get(field)
        if values is None:
            continue
        if not isinstance(values, dict):
            raise bad_request(f"json: cannot unmarshal {type(values).__name__} into Go struct field ObjectMeta.metadata.{field} of type map[string]string")
        for key, value in values.items():
            if not isinstance(value, str):
                raise bad_request(
                    f"json: cannot unmarshal {type(value).__name__} into Go struct field ObjectMeta.metadata.{field} of type string"
                )
            if field == "labels" and len(value) > 63:
                raise invalid(rt.kind, name, [f'metadata.labels: Invalid value: "{value}": must be no more than 63 characters'], rt.group)


# --------------------------------------------------------------------------
# pods and templates


def _probe_defaults(probe: dict | None) -> None:
    if not isinstance(probe, dict):
        return
    probe.setdefault("timeoutSeconds", 1)
    probe.setdefault("periodSeconds", 10)
    probe.setdefault("successThreshold", 1)
    probe.setdefault("failureThreshold", 3)
    if isinstance(probe.get("httpGet"), dict):
        probe["httpGet"].setdefault("scheme", "HTTP")


def _container_defaults(container: dict) -> None:
    image = container.get("image", "")
    tag = image.rsplit("/", 1)[-1]
    latest = "@" not in image and (":" not in tag or tag.endswith(":latest"))
    container.setdefault("imagePullPolicy", "Always" if latest else "IfNotPresent")
    container.setdefault("terminationMessagePath", "/dev/termination-log")
    container.setdefault("terminationMessagePolicy", "File")
    container.setdefault("resources", {})
    for port in container.get("ports") or []:
        if isinstance(port, dict):
            port.setdefault("protocol", "TCP")
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        _probe_defaults(container.get(probe))


def pod_spec_defaults(spec: dict, *, is_pod: bool) -> None:
    """The defaults a real server writes into a pod spec (or a template's)."""
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("securityContext", {})
    spec.setdefault("terminationGracePeriodSeconds", 30)
    for group in ("initContainers", "containers"):
        for container in spec.get(group) or []:
            if isinstance(container, dict):
                _container_defaults(container)
    for volume in spec.get("volumes") or []:
        if isinstance(volume, dict):
            for source in ("secret", "configMap"):
                if isinstance(volume.get(source), dict):
                    volume[source].setdefault("defaultMode", 420)
    if is_pod:
        spec.setdefault("serviceAccountName", "default")
        spec.setdefault("serviceAccount", spec["serviceAccountName"])
        spec.setdefault("enableServiceLinks", True)
        spec.setdefault("preemptionPolicy", "PreemptLowerPriority")
        spec.setdefault("priority", 0)
        spec.setdefault(
            "tolerations",
            [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
            ],
        )


def _qos_class(spec: dict) -> str:
    containers = spec.get("containers") or []
    requests_any = False
    guaranteed = bool(containers)
    for c in containers:
        res = c.get("resources") or {}
        req, lim = res.get("requests") or {}, res.get("limits") or {}
        if req or lim:
            requests_any = True
        if not (lim.get("cpu") and lim.get("memory")) or any(req.get(k, lim.get(k)) != lim.get(k) for k in ("cpu", "memory")):
            guaranteed = False
    if guaranteed:
        return "Guaranteed"
    return "Burstable" if requests_any else "BestEffort"


def _template_spec(obj: dict) -> dict:
    template = obj.setdefault("spec", {}).setdefault("template", {})
    template.setdefault("metadata", {})
    return template.setdefault("spec", {})


# --------------------------------------------------------------------------
# per kind


def _secret(rt: ResourceType, obj: dict, old: dict | None) -> None:
    data = obj.get("data") or {}
    for key, value in data.items():
        if not isinstance(value, str):
            raise bad_request(f"json: cannot unmarshal {type(value).__name__} into Go struct field Secret.data of type []uint8")
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise bad_request(f"illegal base64 data in Secret data key {key!r}") from None
    string_data = obj.pop("stringData", None) or {}
    for key, value in string_data.items():
        data[key] = base64.b64encode(str(value).encode()).decode()
    if data:
        obj["data"] = data
    obj.setdefault("type", "Opaque")
    if old is not None and old.get("immutable") and (old.get("data") != obj.get("data")):
        raise invalid("Secret", obj["metadata"]["name"], ["data: Forbidden: field is immutable when `immutable` is set"])


def _configmap(rt: ResourceType, obj: dict, old: dict | None) -> None:
    for key, value in (obj.get("data") or {}).items():
        if not isinstance(value, str):
            raise bad_request(f"json: cannot unmarshal {type(value).__name__} into Go struct field ConfigMap.data of type string")
    if old is not None and old.get("immutable") and old.get("data") != obj.get("data"):
        raise invalid("ConfigMap", obj["metadata"]["name"], ["data: Forbidden: field is immutable when `immutable` is set"])


def _namespace(rt: ResourceType, obj: dict, old: dict | None) -> None:
    name = obj["metadata"]["name"]
    obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = name
    obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
    obj["status"] = (old or {}).get("status") or {"phase": "Active"}


def _service(rt: ResourceType, obj: dict, old: dict | None) -> None:
    spec = obj.setdefault("spec", {})
    spec.setdefault("type", "ClusterIP")
    old_spec = (old or {}).get("spec") or {}
    if spec["type"] == "ExternalName":
        spec.pop("clusterIP", None)
    else:
        if not spec.get("clusterIP"):
            spec["clusterIP"] = old_spec.get("clusterIP") or _next_cluster_ip()
        spec["clusterIPs"] = [spec["clusterIP"]] if spec["clusterIP"] != "None" else ["None"]
        spec.setdefault("ipFamilies", ["IPv4"])
        spec.setdefault("ipFamilyPolicy", "SingleStack")
        spec.setdefault("internalTrafficPolicy", "Cluster")
    spec.setdefault("sessionAffinity", "None")
    for port in spec.get("ports") or []:
        port.setdefault("protocol", "TCP")
        port.setdefault("targetPort", port.get("port"))
    if old is None:
        obj["status"] = {"loadBalancer": {}}


def _pod(rt: ResourceType, obj: dict, old: dict | None) -> None:
    spec = obj.setdefault("spec", {})
    pod_spec_defaults(spec, is_pod=True)
    if old is None:
        obj["status"] = {"phase": "Pending", "qosClass": _qos_class(spec)}


def _check_selector(rt: ResourceType, obj: dict, old: dict | None) -> None:
    name = obj["metadata"]["name"]
    spec = obj.get("spec") or {}
    selector = spec.get("selector")
    if not selector or not (selector.get("matchLabels") or selector.get("matchExpressions")):
        raise invalid(rt.kind, name, ["spec.selector: Required value"], rt.group)
    labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
    if not label_selector_from_spec(selector)({"metadata": {"labels": labels}}):
        raise invalid(
            rt.kind,
            name,
            [f"spec.template.metadata.labels: Invalid value: {labels!r}: `selector` does not match template `labels`"],
            rt.group,
        )
    if old is not None and (old.get("spec") or {}).get("selector") != selector:
        raise invalid(rt.kind, name, [f"spec.selector: Invalid value: {selector!r}: field is immutable"], rt.group)


def _deployment(rt: ResourceType, obj: dict, old: dict | None) -> None:
    spec = obj.setdefault("spec", {})
    spec.setdefault("replicas", 1)
    spec.setdefault("revisionHistoryLimit", 10)
    spec.setdefault("progressDeadlineSeconds", 600)
    strategy = spec.setdefault("strategy", {})
    strategy.setdefault("type", "RollingUpdate")
    if strategy["type"] == "RollingUpdate":
        rolling = strategy.setdefault("rollingUpdate", {})
        rolling.setdefault("maxSurge", "25%")
        rolling.setdefault("maxUnavailable", "25%")
    pod_spec_defaults(_template_spec(obj), is_pod=False)
    _check_selector(rt, obj, old)
    if old is None:
        obj["status"] = {}


def _replicaset(rt: ResourceType, obj: dict, old: dict | None) -> None:
    spec = obj.setdefault("spec", {})
    spec.setdefault("replicas", 1)
    pod_spec_defaults(_template_spec(obj), is_pod=False)
    if old is None:
        obj["status"] = {"replicas": 0}


def _job(rt: ResourceType, obj: dict, old: dict | None) -> None:
    spec = obj.setdefault("spec", {})
    meta = obj["metadata"]
    uid = meta.get("uid") or (old or {}).get("metadata", {}).get("uid")
    spec.setdefault("parallelism", 1)
    spec.setdefault("completions", 1)
    spec.setdefault("backoffLimit", 6)
    spec.setdefault("completionMode", "NonIndexed")
    spec.setdefault("suspend", False)
    spec.setdefault("podReplacementPolicy", "TerminatingOrFailed")
    if uid and not spec.get("selector"):
        spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
    labels = spec.setdefault("template", {}).setdefault("metadata", {}).setdefault("labels", {})
    if uid:
        labels.setdefault("batch.kubernetes.io/controller-uid", uid)
        labels.setdefault("controller-uid", uid)
    labels.setdefault("batch.kubernetes.io/job-name", meta["name"])
    labels.setdefault("job-name", meta["name"])
    tspec = _template_spec(obj)
    if tspec.get("restartPolicy") not in ("Never", "OnFailure"):
        raise invalid(
            "Job",
            meta["name"],
            ['spec.template.spec.restartPolicy: Required value: valid values: "OnFailure", "Never"'],
            "batch",
        )
    pod_spec_defaults(tspec, is_pod=False)
    if old is not None and (old.get("spec") or {}).get("template") != spec.get("template"):
        raise invalid("Job", meta["name"], ["spec.template: Invalid value: field is immutable"], "batch")
    if old is None:
        obj["status"] = {}


def _status_only_if_new(obj: dict, old: dict | None, empty: Any) -> None:
    if old is None:
        obj["status"] = copy.deepcopy(empty)


_HANDLERS = {
    "secrets": _secret,
    "configmaps": _configmap,
    "namespaces": _namespace,
    "services": _service,
    "pods": _pod,
    "deployments.apps": _deployment,
    "replicasets.apps": _replicaset,
    "jobs.batch": _job,
    "ingresses.networking.k8s.io": lambda rt, o, old: _status_only_if_new(o, old, {"loadBalancer": {}}),
    "horizontalpodautoscalers.autoscaling": lambda rt, o, old: _status_only_if_new(o, old, {}),
    "poddisruptionbudgets.policy": lambda rt, o, old: _status_only_if_new(o, old, {}),
}


def admit(rt: ResourceType, obj: dict, old: dict | None = None) -> dict:
    """Default and validate ``obj`` for a create (``old=None``) or an update.

    Raises :class:`~.errors.ApiError` (400 or 422). Returns ``obj`` changed in place.
    """
    obj["apiVersion"] = rt.api_version
    obj["kind"] = rt.kind
    _check_meta(rt, obj)
    handler = _HANDLERS.get(rt.key)
    if handler is not None:
        try:
            handler(rt, obj, old)
        except ApiError:
            raise
        except (AttributeError, TypeError) as exc:  # a field of the wrong type
            raise bad_request(f"malformed {rt.kind}: {exc}") from None
    return obj
