"""The resource table, discovery documents and OpenAPI v3 of the emulator.

Every resource the emulator serves is one :class:`ResourceType`. Discovery is
the plain (non-aggregated) JSON form: client-go asks for the aggregated
``apidiscovery.k8s.io/v2`` form first and falls back to the legacy documents
when the answer's ``Content-Type`` is plain ``application/json``.

OpenAPI v3 exists for one reason: helm and kubectl validate manifests on the
client unless the server's OpenAPI says that the PATCH operation of a kind
takes the ``fieldValidation`` query parameter (then validation is left to the
server, which here accepts any field). Every path therefore declares it, and
every PATCH operation carries ``x-kubernetes-group-version-kind``. The
operations declare no request body media types, so ``kubectl apply`` computes
strategic merge patches from its built-in types rather than from the schema.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ResourceType",
    "RESOURCES",
    "SERVER_VERSION",
    "find_resource",
    "resource_for_kind",
    "group_versions",
    "api_versions",
    "api_group_list",
    "api_group",
    "api_resource_list",
    "openapi_root",
    "openapi_group_version",
]

#: What ``/version`` answers (an EKS-like 1.34 server).
SERVER_VERSION: dict[str, str] = {
    "major": "1",
    "minor": "34",
    "gitVersion": "v1.34.2",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2025-11-11T00:00:00Z",
    "goVersion": "go1.24.9",
    "compiler": "gc",
    "platform": "linux/amd64",
    "emulationMajor": "1",
    "emulationMinor": "34",
    "minCompatibilityMajor": "1",
    "minCompatibilityMinor": "33",
}

_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


@dataclass(frozen=True)
class ResourceType:
    """One REST resource (``group/version``, plural name) and its behaviour."""

    group: str
    version: str
    kind: str
    plural: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    #: Subresources served: ``status``, ``scale``, ``log``, ``finalize``, ``portforward``.
    subresources: frozenset[str] = field(default_factory=frozenset)
    categories: tuple[str, ...] = ()

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_version(self) -> str:
        return self.api_version

    @property
    def key(self) -> str:
        """Identity of the resource in the store: ``plural.group``."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    @property
    def has_status(self) -> bool:
        return "status" in self.subresources

    def base_path(self, namespace: str | None = None) -> str:
        prefix = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            return f"{prefix}/namespaces/{namespace}/{self.plural}"
        return f"{prefix}/{self.plural}"


def _r(group: str, version: str, kind: str, plural: str, namespaced: bool = True, short=(), sub=(), cat=()):
    return ResourceType(group, version, kind, plural, namespaced, tuple(short), frozenset(sub), tuple(cat))


RESOURCES: tuple[ResourceType, ...] = (
    _r("", "v1", "Namespace", "namespaces", False, ["ns"], ["status", "finalize"]),
    _r("", "v1", "Node", "nodes", False, ["no"], ["status"]),
    _r("", "v1", "Secret", "secrets"),
    _r("", "v1", "ConfigMap", "configmaps", short=["cm"]),
    _r("", "v1", "Service", "services", short=["svc"], sub=["status"], cat=["all"]),
    _r("", "v1", "ServiceAccount", "serviceaccounts", short=["sa"]),
    _r("", "v1", "Pod", "pods", short=["po"], sub=["status", "log", "portforward"], cat=["all"]),
    _r("", "v1", "Event", "events", short=["ev"]),
    _r("", "v1", "Endpoints", "endpoints", short=["ep"]),
    _r("", "v1", "PersistentVolumeClaim", "persistentvolumeclaims", short=["pvc"], sub=["status"]),
    _r("apps", "v1", "Deployment", "deployments", short=["deploy"], sub=["status", "scale"], cat=["all"]),
    _r("apps", "v1", "ReplicaSet", "replicasets", short=["rs"], sub=["status", "scale"], cat=["all"]),
    _r("apps", "v1", "StatefulSet", "statefulsets", short=["sts"], sub=["status", "scale"], cat=["all"]),
    _r("apps", "v1", "DaemonSet", "daemonsets", short=["ds"], sub=["status"], cat=["all"]),
    _r("batch", "v1", "Job", "jobs", sub=["status"], cat=["all"]),
    _r("batch", "v1", "CronJob", "cronjobs", short=["cj"], sub=["status"], cat=["all"]),
    _r("networking.k8s.io", "v1", "Ingress", "ingresses", short=["ing"], sub=["status"]),
    _r("networking.k8s.io", "v1", "IngressClass", "ingressclasses", False),
    _r("networking.k8s.io", "v1", "NetworkPolicy", "networkpolicies", short=["netpol"]),
    _r("autoscaling", "v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers", short=["hpa"], sub=["status"], cat=["all"]),
    _r("policy", "v1", "PodDisruptionBudget", "poddisruptionbudgets", short=["pdb"], sub=["status"]),
    # Leases: the rollout's operation lock (create → 409 when held, resourceVersion-guarded takeover).
    _r("coordination.k8s.io", "v1", "Lease", "leases"),
    _r("rbac.authorization.k8s.io", "v1", "Role", "roles"),
    _r("rbac.authorization.k8s.io", "v1", "RoleBinding", "rolebindings"),
    _r("rbac.authorization.k8s.io", "v1", "ClusterRole", "clusterroles", False),
    _r("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding", "clusterrolebindings", False),
)

_BY_PATH: dict[tuple[str, str, str], ResourceType] = {(r.group, r.version, r.plural): r for r in RESOURCES}
_BY_KIND: dict[str, ResourceType] = {}
for _rt in RESOURCES:
    for _name in (_rt.kind, _rt.plural, _rt.singular, *_rt.short_names, _rt.key):
        _BY_KIND.setdefault(_name.lower(), _rt)


def find_resource(group: str, version: str, plural: str) -> ResourceType | None:
    return _BY_PATH.get((group, version, plural))


def resource_for_kind(name: str) -> ResourceType:
    """A resource by kind, plural, singular, short name or ``plural.group`` (any case)."""
    try:
        return _BY_KIND[name.lower()]
    except KeyError:
        raise KeyError(f"unknown kind or resource {name!r}") from None


def group_versions() -> dict[str, list[str]]:
    """``{group: [versions]}`` for the named groups (not core), in table order."""
    out: dict[str, list[str]] = {}
    for rt in RESOURCES:
        if rt.group:
            versions = out.setdefault(rt.group, [])
            if rt.version not in versions:
                versions.append(rt.version)
    return out


def api_versions(server_address: str) -> dict[str, Any]:
    """``GET /api``."""
    return {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    }


def api_group(group: str) -> dict[str, Any] | None:
    """``GET /apis/{group}``."""
    versions = group_versions().get(group)
    if not versions:
        return None
    gvs = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": gvs, "preferredVersion": gvs[0]}


def api_group_list() -> dict[str, Any]:
    """``GET /apis``."""
    groups = []
    for group in group_versions():
        doc = api_group(group)
        assert doc is not None
        doc = {k: v for k, v in doc.items() if k not in ("kind", "apiVersion")}
        groups.append(doc)
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def _storage_hash(rt: ResourceType) -> str:
    import base64

    return base64.b64encode(hashlib.sha256(rt.key.encode()).digest()[:8]).decode()


def api_resource_list(group: str, version: str) -> dict[str, Any] | None:
    """``GET /api/v1`` or ``GET /apis/{group}/{version}``."""
    members = [rt for rt in RESOURCES if rt.group == group and rt.version == version]
    if not members:
        return None
    resources: list[dict[str, Any]] = []
    for rt in members:
        entry: dict[str, Any] = {
            "name": rt.plural,
            "singularName": rt.singular,
            "namespaced": rt.namespaced,
            "kind": rt.kind,
            "verbs": list(_VERBS),
            "storageVersionHash": _storage_hash(rt),
        }
        if rt.short_names:
            entry["shortNames"] = list(rt.short_names)
        if rt.categories:
            entry["categories"] = list(rt.categories)
        resources.append(entry)
        for sub in sorted(rt.subresources):
            sub_entry: dict[str, Any] = {
                "name": f"{rt.plural}/{sub}",
                "singularName": "",
                "namespaced": rt.namespaced,
                "kind": rt.kind,
                "verbs": ["get", "patch", "update"],
            }
            if sub == "scale":
                sub_entry.update(group="autoscaling", version="v1", kind="Scale")
            elif sub == "log":
                sub_entry["verbs"] = ["get"]
            elif sub == "finalize":
                sub_entry["verbs"] = ["update"]
            elif sub == "portforward":
                sub_entry.update(kind="PodPortForwardOptions", verbs=["create", "get"])
            resources.append(sub_entry)
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{group}/{version}" if group else version,
        "resources": resources,
    }


# --------------------------------------------------------------------------
# OpenAPI v3


def _gv_path(group: str, version: str) -> str:
    return f"apis/{group}/{version}" if group else f"api/{version}"


def _all_group_versions() -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    for rt in RESOURCES:
        if (rt.group, rt.version) not in seen:
            seen.append((rt.group, rt.version))
    return seen


def openapi_gv_hash(group: str, version: str) -> str:
    return hashlib.sha512(json.dumps(openapi_group_version(group, version), sort_keys=True).encode()).hexdigest()[:64].upper()


def openapi_root() -> dict[str, Any]:
    """``GET /openapi/v3``: where each group-version's document is."""
    paths = {}
    for group, version in _all_group_versions():
        path = _gv_path(group, version)
        paths[path] = {"serverRelativeURL": f"/openapi/v3/{path}?hash={openapi_gv_hash(group, version)}"}
    return {"paths": paths}


def _schema_name(rt: ResourceType) -> str:
    group = rt.group or "core"
    if group.endswith(".k8s.io"):
        group = group[: -len(".k8s.io")]
    return f"io.k8s.api.{group.replace('.', '_')}.{rt.version}.{rt.kind}"


def _param(name: str, kind: str = "string", where: str = "query", required: bool = False) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": kind, "uniqueItems": True}
    param: dict[str, Any] = {"name": name, "in": where, "schema": schema}
    if required:
        param["required"] = True
    return param


_WRITE_PARAMS = [_param("dryRun"), _param("fieldManager"), _param("fieldValidation")]


def _op(rt: ResourceType, action: str, op_id: str, params: list[dict[str, Any]], sub: str = "") -> dict[str, Any]:
    gvk = {"group": rt.group, "version": rt.version, "kind": rt.kind}
    if sub == "scale":
        gvk = {"group": "autoscaling", "version": "v1", "kind": "Scale"}
    return {
        "description": f"{action} {rt.kind}{' ' + sub if sub else ''}",
        "operationId": op_id,
        "parameters": params,
        "responses": {"200": {"description": "OK"}, "401": {"description": "Unauthorized"}},
        "tags": [_gv_path(rt.group, rt.version).replace("/", "_")],
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": gvk,
    }


def openapi_group_version(group: str, version: str) -> dict[str, Any] | None:
    """``GET /openapi/v3/{api/v1 | apis/g/v}``: paths with verbs and parameters."""
    members = [rt for rt in RESOURCES if rt.group == group and rt.version == version]
    if not members:
        return None
    paths: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    for rt in members:
        name = rt.kind
        ns_param = [_param("namespace", where="path", required=True)] if rt.namespaced else []
        name_param = [_param("name", where="path", required=True)]
        collection = rt.base_path("{namespace}") if rt.namespaced else rt.base_path()
        item = collection + "/{name}"
        paths[collection] = {
            "get": _op(rt, "list", f"list{name}", [_param("labelSelector"), _param("fieldSelector"), _param("watch", "boolean")]),
            "post": _op(rt, "post", f"create{name}", list(_WRITE_PARAMS)),
            "delete": _op(rt, "deletecollection", f"deleteCollection{name}", [_param("labelSelector")]),
            "parameters": ns_param + [_param("pretty")],
        }
        paths[item] = {
            "get": _op(rt, "get", f"read{name}", []),
            "put": _op(rt, "put", f"replace{name}", list(_WRITE_PARAMS)),
            "patch": _op(rt, "patch", f"patch{name}", [*_WRITE_PARAMS, _param("force", "boolean")]),
            "delete": _op(rt, "delete", f"delete{name}", [_param("gracePeriodSeconds", "integer"), _param("propagationPolicy")]),
            "parameters": name_param + ns_param + [_param("pretty")],
        }
        for sub in sorted(rt.subresources):
            if sub == "log":
                paths[f"{item}/log"] = {
                    "get": _op(rt, "get", f"read{name}Log", [_param("container"), _param("tailLines", "integer")], sub),
                    "parameters": name_param + ns_param,
                }
                continue
            if sub == "finalize":
                continue
            if sub == "portforward":
                ports = [_param("ports", "integer")]
                paths[f"{item}/portforward"] = {
                    "get": _op(rt, "connect", f"connectGet{name}Portforward", ports, sub),
                    "post": _op(rt, "connect", f"connectPost{name}Portforward", ports, sub),
                    "parameters": name_param + ns_param,
                }
                continue
            suffix = sub.capitalize()
            paths[f"{item}/{sub}"] = {
                "get": _op(rt, "get", f"read{name}{suffix}", [], sub),
                "put": _op(rt, "put", f"replace{name}{suffix}", list(_WRITE_PARAMS), sub),
                "patch": _op(rt, "patch", f"patch{name}{suffix}", [*_WRITE_PARAMS, _param("force", "boolean")], sub),
                "parameters": name_param + ns_param + [_param("pretty")],
            }
        schemas[_schema_name(rt)] = {
            "description": f"{rt.kind} (emulated: any field is accepted)",
            "type": "object",
            "x-kubernetes-group-version-kind": [{"group": rt.group, "version": rt.version, "kind": rt.kind}],
        }
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": SERVER_VERSION["gitVersion"]},
        "paths": paths,
        "components": {"schemas": schemas},
    }
