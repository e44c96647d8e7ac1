"""Kubernetes REST semantics: routes, verbs, bodies, watches, logs, control API.

``Api.handle(Request)`` returns a :class:`Response` or, for a watch, a
:class:`WatchStream` the HTTP layer streams as chunked JSON lines. Nothing
here knows about sockets or TLS.

Verbs per path (``/api/v1/...`` and ``/apis/{group}/{version}/...``, with
the old ``/watch/`` prefix accepted too):

- collection: GET list (or watch with ``?watch=true``), POST create, DELETE
  deletecollection (label/field selectors);
- object: GET, PUT (update; ``status`` kept from the stored object for
  resources with a status subresource), PATCH (json-patch, merge-patch,
  strategic-merge-patch, apply-patch+yaml — apply creates a missing object),
  DELETE (background cascading through ownerReferences unless
  ``propagationPolicy=Orphan``; a namespace takes its contents with it);
- subresources: ``status`` (GET/PUT/PATCH of status only), ``scale``
  (autoscaling/v1 Scale), ``log`` (text/plain; ``container``, ``tailLines``,
  ``previous``, ``timestamps``, ``limitBytes``; ``follow`` returns what there
  is and ends), ``portforward`` (a WebSocket upgrade, see portforward.py).

Request bodies may be JSON, YAML or Kubernetes protobuf (``protobuf.py``);
answers are JSON (or a ``meta.k8s.io/v1`` Table when the Accept header asks,
as ``kubectl get`` does). ``dryRun=All`` is honoured; ``fieldValidation``
and ``fieldManager`` are accepted (apply requires a field manager).

Watches: ``resourceVersion`` unset or ``0`` starts with synthetic ADDED
events for the current objects; a resourceVersion replays the history after
it (an ERROR event with a 410 Status when it is too old);
``sendInitialEvents=true`` sends the current objects then a BOOKMARK
annotated ``k8s.io/initial-events-end: "true"`` (helm 4's watcher needs it);
``allowWatchBookmarks`` adds periodic bookmarks; ``timeoutSeconds`` ends the
stream.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import secrets
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import parse_qs

import yaml

from . import protobuf
from .admission import admit, spec_changed
from .controllers import Controllers, pod_owners, seed
from .errors import ApiError, already_exists, bad_request, conflict, invalid, not_found
from .knobs import Knobs
from .patch import PatchError, apply_patch, json_patch, merge_patch, strategic_merge_patch
from .portforward import PortForwardRequest, parse_ports, wants_upgrade
from .rbac import ADMIN, Attributes, Authorizer, Tokens, User, request_verb, service_account_user
from .resources import (
    RESOURCES,
    SERVER_VERSION,
    ResourceType,
    api_group,
    api_group_list,
    api_resource_list,
    api_versions,
    find_resource,
    openapi_group_version,
    openapi_root,
    resource_for_kind,
)
from .store import Expired, SelectorError, Store, WatchEvent, Watcher, now, parse_field_selector, parse_label_selector
from .tables import table

__all__ = ["Api", "Request", "Response", "WatchStream"]

NAMESPACES = resource_for_kind("namespaces")
SERVICEACCOUNTS = resource_for_kind("serviceaccounts")
PODS = resource_for_kind("pods")

_JSON = "application/json"
_PROTOBUF = "application/vnd.kubernetes.protobuf"
_PATCH_TYPES = {
    "application/json-patch+json",
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
    "application/apply-patch+yaml",
}
_SAFE = "bcdfghjklmnpqrstvwxz2456789"


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes = b""
    #: Who sent it (authenticated by the HTTP layer); the admin token is all-powerful.
    user: User = ADMIN
    #: The query as sent (``query`` keeps the last value of a repeated name; ``ports`` may repeat).
    raw_query: str = ""

    @classmethod
    def build(cls, method: str, target: str, headers: dict[str, str], body: bytes = b"") -> "Request":
        path, _, raw_query = target.partition("?")
        query = {k: v[-1] for k, v in parse_qs(raw_query, keep_blank_values=True).items()}
        return cls(method.upper(), path, query, {k.lower(): v for k, v in headers.items()}, body, raw_query=raw_query)

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = _JSON
    headers: dict[str, str] | None = None  # extra headers (``Retry-After`` of an injected fault)

    @classmethod
    def json(cls, obj: Any, status: int = 200) -> "Response":
        return cls(status, json.dumps(obj, separators=(",", ":")).encode())

    @classmethod
    def text(cls, text: str, status: int = 200) -> "Response":
        return cls(status, text.encode(), "text/plain; charset=utf-8")


@dataclass
class WatchStream:
    """An open watch for the HTTP layer to stream."""

    rt: ResourceType
    initial: list[WatchEvent]
    watcher: Watcher | None
    store: Store
    bookmarks: bool
    deadline: float  # monotonic

    def bookmark(self, annotations: dict[str, str] | None = None, rv: int | None = None) -> WatchEvent | None:
        """A BOOKMARK at the store's rv, only when nothing is queued for this watcher."""
        with self.store.lock:
            if rv is None:
                if self.watcher is not None and not self.watcher.events.empty():
                    return None
                rv = self.store.resource_version
            meta: dict[str, Any] = {"resourceVersion": str(rv)}
            if annotations:
                meta["annotations"] = annotations
            return WatchEvent("BOOKMARK", {"kind": self.rt.kind, "apiVersion": self.rt.api_version, "metadata": meta})

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()


@dataclass
class _Route:
    rt: ResourceType
    namespace: str | None
    name: str | None
    sub: str | None
    watch_path: bool


class Api:
    """All HTTP semantics above the socket; see the module docstring."""

    def __init__(self, store: Store, knobs: Knobs, controllers: Controllers, server_address: str) -> None:
        self.store = store
        self.knobs = knobs
        self.controllers = controllers
        self.server_address = server_address
        self.requests: deque[dict[str, Any]] = deque(maxlen=5000)
        self._requests_lock = threading.Lock()
        self.tokens = Tokens()
        self.authorizer = Authorizer(
            objects=lambda kind, ns: self.store.list(resource_for_kind(kind), ns)[0],
            lookup=lambda kind, ns, name: self.store.get(resource_for_kind(kind), ns, name),
        )

    def authenticate(self, token: str) -> User | None:
        """The ServiceAccount a minted token belongs to; None (401) for an unknown token or a deleted account."""
        ref = self.tokens.resolve(token)
        if ref is None or self.store.get(SERVICEACCOUNTS, ref[0], ref[1]) is None:
            return None
        return service_account_user(*ref)

    # -- entry point

    def handle(self, req: Request) -> Response | WatchStream | PortForwardRequest:
        fault = self.knobs.take_fault(
            req.method, req.path, "&".join(f"{k}={v}" for k, v in req.query.items())
        )
        if fault is not None:  # an injected failure (POST /_emulator/faults), answered before anything happens
            response = Response.json(fault.body, fault.status)
            response.headers = dict(fault.headers)
            return response
        try:
            return self._dispatch(req)
        except ApiError as exc:
            return Response.json(exc.status(), exc.code)
        except (protobuf.ProtobufError,) as exc:
            return Response.json(ApiError(415, "UnsupportedMediaType", str(exc)).status(), 415)

    def record(self, req: Request, status: int) -> None:
        with self._requests_lock:
            self.requests.append({
                "method": req.method,
                "path": req.path,
                "query": dict(req.query),
                "content_type": req.content_type,
                "accept": req.headers.get("accept", ""),
                "user_agent": req.headers.get("user-agent", ""),
                "user": req.user.name,
                "status": status,
            })

    def _dispatch(self, req: Request) -> Response | WatchStream | PortForwardRequest:
        path = req.path.rstrip("/") or "/"
        if path in ("/healthz", "/livez", "/readyz"):
            return Response.text("ok")
        if path == "/version":
            return Response.json(SERVER_VERSION)
        if path.startswith("/_emulator"):
            if not req.user.admin:
                raise ApiError(403, "Forbidden", f'forbidden: User "{req.user.name}" cannot {req.method.lower()} path "{path}"')
            return self._control(req, path[len("/_emulator"):].strip("/"))
        parts = path.strip("/").split("/")
        if not ((parts[0] == "api" and len(parts) >= 3) or (parts[0] == "apis" and len(parts) >= 4)):
            self.authorizer.check(req.user, Attributes(verb=req.method.lower().replace("head", "get"), path=path))
        if parts == ["apis", "authorization.k8s.io", "v1", "selfsubjectaccessreviews"]:
            self.authorizer.check(req.user, Attributes(verb=request_verb(req.method, named=False, watch=False),
                                                       resource="selfsubjectaccessreviews", group="authorization.k8s.io"))
            return self._self_subject_access_review(req)
        if path == "/api":
            return Response.json(api_versions(self.server_address))
        if path == "/apis":
            return Response.json(api_group_list())
        if path == "/openapi/v3":
            return Response.json(openapi_root())
        if path.startswith("/openapi/v3/"):
            gv = path[len("/openapi/v3/"):].split("/")
            doc = None
            if gv[0] == "api" and len(gv) == 2:
                doc = openapi_group_version("", gv[1])
            elif gv[0] == "apis" and len(gv) == 3:
                doc = openapi_group_version(gv[1], gv[2])
            if doc is None:
                raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
            return Response.json(doc)
        parts = path.strip("/").split("/")
        if parts[0] == "api" and len(parts) == 2:
            doc = api_resource_list("", parts[1])
            if doc is None:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return Response.json(doc)
        if parts[0] == "apis" and len(parts) == 2:
            doc = api_group(parts[1])
            if doc is None:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return Response.json(doc)
        if parts[0] == "apis" and len(parts) == 3:
            doc = api_resource_list(parts[1], parts[2])
            if doc is None:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return Response.json(doc)
        route = self._route(parts)
        self.authorizer.check(req.user, self._attributes(req, route))
        return self._resource(req, route)

    @staticmethod
    def _attributes(req: Request, route: _Route, verb: str | None = None) -> Attributes:
        watch = route.watch_path or req.query.get("watch") in ("true", "1")
        namespace = route.namespace or ""
        if route.rt is NAMESPACES and route.name:
            namespace = route.name  # as RequestInfo: a namespace's own requests are in that namespace
        return Attributes(
            verb=verb or request_verb(req.method, named=route.name is not None, watch=watch),
            resource=route.rt.plural, group=route.rt.group, namespace=namespace,
            name=route.name or "", subresource=route.sub or "",
        )

    def _self_subject_access_review(self, req: Request) -> Response:
        """``authorization.k8s.io/v1`` SelfSubjectAccessReview: may the caller do this?"""
        if req.method != "POST":
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        body = self._body(req)
        spec = (body or {}).get("spec") or {}
        ra, nra = spec.get("resourceAttributes"), spec.get("nonResourceAttributes")
        if ra:
            a = Attributes(verb=ra.get("verb", ""), resource=ra.get("resource", ""), group=ra.get("group", ""),
                           namespace=ra.get("namespace", ""), name=ra.get("name", ""),
                           subresource=ra.get("subresource", ""))
        elif nra:
            a = Attributes(verb=nra.get("verb", ""), path=nra.get("path", ""))
        else:
            raise invalid("SelfSubjectAccessReview", "", ["spec.resourceAttributes: Required value: "
                                                          "exactly one of nonResourceAttributes or resourceAttributes must be specified"],
                          "authorization.k8s.io")
        allowed = self.authorizer.allowed(req.user, a)
        status = {"allowed": allowed}
        if allowed and not req.user.admin:
            status["reason"] = "RBAC: allowed"
        return Response.json({
            "kind": "SelfSubjectAccessReview", "apiVersion": "authorization.k8s.io/v1",
            "metadata": {"creationTimestamp": None}, "spec": spec, "status": status,
        }, 201)

    def _route(self, parts: list[str]) -> _Route:
        unknown = ApiError(404, "NotFound", "the server could not find the requested resource")
        if parts[0] == "api" and len(parts) >= 3:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[0] == "apis" and len(parts) >= 4:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise unknown
        watch_path = False
        if rest and rest[0] == "watch":
            watch_path, rest = True, rest[1:]
        namespace = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            candidate = find_resource(group, version, rest[2])
            if candidate is not None and candidate.namespaced:
                namespace, rest = rest[1], rest[2:]
        if not rest:
            raise unknown
        rt = find_resource(group, version, rest[0])
        if rt is None or len(rest) > 3:
            raise unknown
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if sub is not None and sub not in rt.subresources:
            raise unknown
        if rt.namespaced and name is not None and namespace is None:
            raise unknown
        return _Route(rt, namespace, name, sub, watch_path)

    # -- bodies

    def _body(self, req: Request) -> Any:
        ctype = req.content_type
        if not req.body:
            raise bad_request("request body is empty")
        if ctype == _PROTOBUF:
            return protobuf.decode_object(req.body)
        try:
            if ctype in ("application/yaml", "application/apply-patch+yaml", "text/yaml"):
                return yaml.safe_load(req.body)
            return json.loads(req.body)
        except (ValueError, yaml.YAMLError) as exc:
            raise bad_request(f"the body of the request was in an unknown format ({ctype}): {exc}") from None

    def _object_body(self, req: Request, route: _Route) -> dict:
        obj = self._body(req)
        if not isinstance(obj, dict):
            raise bad_request("the body must be an object")
        rt = route.rt
        api_version, kind = obj.get("apiVersion"), obj.get("kind")
        if api_version and api_version != rt.api_version and kind != "Scale":
            raise bad_request(
                f"the API version in the data ({api_version}) does not match the expected API version ({rt.api_version})"
            )
        if kind and kind not in (rt.kind, "Scale"):
            raise bad_request(f"the kind in the data ({kind}) does not match the expected kind ({rt.kind})")
        meta = obj.setdefault("metadata", {}) or {}
        obj["metadata"] = meta
        if rt.namespaced:
            if meta.get("namespace") and route.namespace and meta["namespace"] != route.namespace:
                raise bad_request("the namespace of the provided object does not match the namespace sent on the request")
            meta["namespace"] = route.namespace
        else:
            meta.pop("namespace", None)
        return obj

    # -- resources

    def _resource(self, req: Request, route: _Route) -> Response | WatchStream | PortForwardRequest:
        m = req.method
        if route.name is None:
            if m == "GET":
                if route.watch_path or req.query.get("watch") in ("true", "1"):
                    return self._watch(req, route)
                return self._list(req, route)
            if m == "POST":
                return self._create(req, route)
            if m == "DELETE":
                return self._delete_collection(req, route)
        elif route.sub is None:
            if m == "GET":
                if route.watch_path or req.query.get("watch") in ("true", "1"):
                    req.query["fieldSelector"] = ",".join(
                        x for x in (req.query.get("fieldSelector"), f"metadata.name={route.name}") if x
                    )
                    return self._watch(req, route)
                obj = self._get(route)
                if self._wants_table(req):
                    rv = int(obj["metadata"]["resourceVersion"])
                    return Response.json(table(route.rt, [obj], rv, req.query.get("includeObject", "Metadata")))
                return Response.json(obj)
            if m == "PUT":
                return self._update(req, route)
            if m == "PATCH":
                return self._patch(req, route)
            if m == "DELETE":
                return self._delete(req, route)
        elif route.sub == "status":
            if m == "GET":
                return Response.json(self._get(route))
            if m == "PUT":
                return self._update(req, route)
            if m == "PATCH":
                return self._patch(req, route)
        elif route.sub == "scale":
            if m == "GET":
                return Response.json(self._scale_of(self._get(route)))
            if m in ("PUT", "PATCH"):
                return self._scale_write(req, route)
        elif route.sub == "log":
            if m == "GET":
                return self._logs(req, route)
        elif route.sub == "finalize":
            if m == "PUT":
                return Response.json(self._get(route))
        elif route.sub == "portforward":
            if m in ("GET", "POST"):
                return self._portforward(req, route)
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    def _get(self, route: _Route) -> dict:
        obj = self.store.get(route.rt, route.namespace, route.name or "")
        if obj is None:
            raise not_found(route.rt.plural, route.name or "", route.rt.group)
        return obj

    def _selector(self, req: Request) -> Callable[[dict], bool]:
        try:
            labels = parse_label_selector(req.query.get("labelSelector"))
            fields = parse_field_selector(req.query.get("fieldSelector"))
        except SelectorError as exc:
            raise bad_request(str(exc)) from None
        return lambda obj: labels(obj) and fields(obj)

    def _list(self, req: Request, route: _Route) -> Response:
        items, rv = self.store.list(route.rt, route.namespace, self._selector(req))
        if self._wants_table(req):
            return Response.json(table(route.rt, items, rv, req.query.get("includeObject", "Metadata")))
        return Response.json({
            "kind": route.rt.list_kind,
            "apiVersion": route.rt.api_version,
            "metadata": {"resourceVersion": str(rv)},
            "items": items,
        })

    @staticmethod
    def _wants_table(req: Request) -> bool:
        return "as=table" in req.headers.get("accept", "").lower().replace(" ", "")

    def _dry_run(self, req: Request) -> bool:
        return req.query.get("dryRun", "") == "All"

    def _ensure_namespace(self, route: _Route) -> None:
        if route.rt.namespaced:
            ns = self.store.get(NAMESPACES, None, route.namespace or "")
            if ns is None:
                raise not_found("namespaces", route.namespace or "")
            if (ns.get("status") or {}).get("phase") == "Terminating":
                raise ApiError(403, "Forbidden", f'{route.rt.plural} "" is forbidden: unable to create new content in namespace {route.namespace} because it is being terminated')

    def _create(self, req: Request, route: _Route, obj: dict | None = None) -> Response:
        obj = obj if obj is not None else self._object_body(req, route)
        rt = route.rt
        meta = obj["metadata"]
        if not meta.get("name"):
            if meta.get("generateName"):
                meta["name"] = meta["generateName"] + "".join(secrets.choice(_SAFE) for _ in range(5))
            else:
                raise invalid(rt.kind, "", ["metadata.name: Required value: name or generateName is required"], rt.group)
        for system in ("resourceVersion", "uid", "creationTimestamp", "deletionTimestamp", "generation", "selfLink"):
            meta.pop(system, None)
        meta["uid"] = str(uuid.uuid4())
        if rt.has_status and rt.kind != "Node":
            obj.pop("status", None)
        self._ensure_namespace(route)
        admit(rt, obj)
        if self.store.get(rt, meta.get("namespace"), meta["name"]) is not None:
            raise already_exists(rt.plural, meta["name"], rt.group)
        if self._dry_run(req):
            meta["creationTimestamp"] = now()
            return Response.json(obj, 201)
        try:
            created = self.store.create(rt, obj)
        except KeyError:
            raise already_exists(rt.plural, meta["name"], rt.group) from None
        return Response.json(created, 201)

    def _write(self, req: Request, route: _Route, old: dict, new: dict) -> Response:
        """Common tail of PUT and PATCH: status rules, admission, generation, store."""
        rt = route.rt
        meta = new.setdefault("metadata", {})
        if meta.get("name", route.name) != route.name:
            raise bad_request(f"the name of the object ({meta.get('name')}) does not match the name on the URL ({route.name})")
        meta["name"] = route.name
        if rt.namespaced:
            if meta.get("namespace") and meta["namespace"] != route.namespace:
                raise bad_request("the namespace of the provided object does not match the namespace sent on the request")
            meta["namespace"] = route.namespace
        rv = meta.get("resourceVersion")
        if rv and rv != old["metadata"]["resourceVersion"]:
            raise conflict(rt.plural, route.name or "", "the object has been modified; please apply your changes to the latest version and try again", rt.group)
        if route.sub == "status":
            status = new.get("status")
            new = copy.deepcopy(old)
            if status is None:
                new.pop("status", None)
            else:
                new["status"] = status
        elif rt.has_status:
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
            else:
                new.pop("status", None)
        for system in ("uid", "creationTimestamp", "generation", "deletionTimestamp", "managedFields"):
            if system in old["metadata"]:
                meta[system] = old["metadata"][system]
            else:
                meta.pop(system, None)
        admit(rt, new, old)
        bump = route.sub is None and spec_changed(old, new)
        if self._dry_run(req):
            return Response.json(new)
        return Response.json(self.store.update(rt, new, bump_generation=bump))

    def _update(self, req: Request, route: _Route) -> Response:
        new = self._object_body(req, route)
        with self.store.lock:
            old = self._get(route)
            return self._write(req, route, old, new)

    def _patch(self, req: Request, route: _Route) -> Response:
        ptype = req.content_type
        if ptype not in _PATCH_TYPES:
            raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - accepted media types include: {', '.join(sorted(_PATCH_TYPES))}")
        body = self._body(req)
        with self.store.lock:
            old = self.store.get(route.rt, route.namespace, route.name or "")
            if ptype == "application/apply-patch+yaml":
                manager = req.query.get("fieldManager")
                if not manager:
                    raise bad_request("PATCH, application/apply-patch+yaml: fieldManager is required")
                if not isinstance(body, dict):
                    raise bad_request("an apply configuration must be an object")
                if old is None:
                    if route.sub is not None:
                        raise not_found(route.rt.plural, route.name or "", route.rt.group)
                    # an apply that creates needs `create` too (the patch handler's withAuthorization)
                    self.authorizer.check(req.user, self._attributes(req, route, verb="create"))
                    obj = apply_patch(None, body, None)
                    meta = obj.setdefault("metadata", {}) or {}
                    obj["metadata"] = meta
                    if meta.get("name", route.name) != route.name:
                        raise bad_request(f"the name of the object ({meta.get('name')}) does not match the name on the URL ({route.name})")
                    meta["name"] = route.name
                    if route.rt.namespaced:
                        if meta.get("namespace") and meta["namespace"] != route.namespace:
                            raise bad_request("the namespace of the provided object does not match the namespace sent on the request")
                        meta["namespace"] = route.namespace
                    response = self._create(req, route, obj)
                    if not self._dry_run(req):
                        created = json.loads(response.body)
                        self.store.applied[(created["metadata"]["uid"], manager)] = copy.deepcopy(body)
                    return response
                previous = self.store.applied.get((old["metadata"]["uid"], manager))
                new = apply_patch(old, body, previous)
                new.setdefault("metadata", {})["resourceVersion"] = old["metadata"]["resourceVersion"]
                response = self._write(req, route, old, new)
                if response.status == 200 and not self._dry_run(req):
                    self.store.applied[(old["metadata"]["uid"], manager)] = copy.deepcopy(body)
                return response
            if old is None:
                raise not_found(route.rt.plural, route.name or "", route.rt.group)
            try:
                if ptype == "application/json-patch+json":
                    new = json_patch(old, body)
                elif ptype == "application/merge-patch+json":
                    new = merge_patch(old, body)
                else:
                    new = strategic_merge_patch(old, body)
            except PatchError as exc:
                raise ApiError(422, "Invalid", str(exc)) from None
            if not isinstance(new, dict):
                raise bad_request("the patch did not produce an object")
            return self._write(req, route, old, new)

    # -- delete

    def _delete_options(self, req: Request) -> dict:
        options: dict[str, Any] = {}
        if req.body:
            try:
                parsed = self._body(req)
                if isinstance(parsed, dict):
                    options = parsed
            except (ApiError, protobuf.ProtobufError):
                options = {}
        for name in ("propagationPolicy", "gracePeriodSeconds"):
            if name in req.query:
                options[name] = req.query[name]
        if req.query.get("orphanDependents") == "true":
            options["orphanDependents"] = True
        return options

    def _remove(self, rt: ResourceType, obj: dict, policy: str) -> dict | None:
        """Delete one object; cascade to dependents (and a namespace's contents)."""
        meta = obj["metadata"]
        gone = self.store.delete(rt, meta.get("namespace"), meta["name"])
        if gone is None:
            return None
        if rt.key == "namespaces":
            for other in RESOURCES:
                if other.namespaced:
                    items, _ = self.store.list(other, meta["name"])
                    for item in items:
                        self._remove(other, item, "Background")
        if policy != "Orphan":
            for dep_rt, dependent in self.store.dependents(meta["uid"]):
                self._remove(dep_rt, dependent, policy)
        else:
            for dep_rt, dependent in self.store.dependents(meta["uid"]):
                dependent["metadata"]["ownerReferences"] = [
                    r for r in dependent["metadata"].get("ownerReferences", []) if r.get("uid") != meta["uid"]
                ]
                self.store.update(dep_rt, dependent)
        return gone

    def _delete(self, req: Request, route: _Route) -> Response:
        options = self._delete_options(req)
        rt = route.rt
        with self.store.lock:
            obj = self._get(route)
            pre = options.get("preconditions") or {}
            if pre.get("uid") and pre["uid"] != obj["metadata"]["uid"]:
                raise conflict(rt.plural, route.name or "", f"Precondition failed: UID in precondition: {pre['uid']}, UID in object meta: {obj['metadata']['uid']}", rt.group)
            if pre.get("resourceVersion") and pre["resourceVersion"] != obj["metadata"]["resourceVersion"]:
                raise conflict(rt.plural, route.name or "", "the object has been modified; please apply your changes to the latest version and try again", rt.group)
            policy = options.get("propagationPolicy") or ("Orphan" if options.get("orphanDependents") else "Background")
            if not self._dry_run(req):
                gone = self._remove(rt, obj, policy)
                if gone is not None:
                    obj = gone
        if rt.kind in ("Pod", "Namespace"):
            obj["metadata"]["deletionTimestamp"] = now()
            if rt.kind == "Namespace":
                obj.setdefault("status", {})["phase"] = "Terminating"
            else:
                obj["metadata"]["deletionGracePeriodSeconds"] = 0
            return Response.json(obj)
        details: dict[str, Any] = {"name": route.name, "kind": rt.plural, "uid": obj["metadata"]["uid"]}
        if rt.group:
            details["group"] = rt.group
        return Response.json({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details})

    def _delete_collection(self, req: Request, route: _Route) -> Response:
        options = self._delete_options(req)
        policy = options.get("propagationPolicy") or "Background"
        with self.store.lock:
            items, _ = self.store.list(route.rt, route.namespace, self._selector(req))
            deleted = []
            if not self._dry_run(req):
                for obj in items:
                    gone = self._remove(route.rt, obj, policy)
                    if gone is not None:
                        deleted.append(gone)
            else:
                deleted = items
            rv = self.store.resource_version
        return Response.json({"kind": route.rt.list_kind, "apiVersion": route.rt.api_version,
                              "metadata": {"resourceVersion": str(rv)}, "items": deleted})

    # -- scale

    def _scale_of(self, obj: dict) -> dict:
        meta = obj["metadata"]
        selector = ((obj.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        return {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp") if k in meta},
            "spec": {"replicas": (obj.get("spec") or {}).get("replicas", 1)},
            "status": {
                "replicas": (obj.get("status") or {}).get("replicas", 0),
                "selector": ",".join(f"{k}={v}" for k, v in sorted(selector.items())),
            },
        }

    def _scale_write(self, req: Request, route: _Route) -> Response:
        body = self._body(req)
        with self.store.lock:
            obj = self._get(route)
            scale = self._scale_of(obj)
            if req.method == "PUT":
                new_scale = body
            elif req.content_type == "application/json-patch+json":
                new_scale = json_patch(scale, body)
            else:
                new_scale = merge_patch(scale, body)
            try:
                replicas = int(((new_scale or {}).get("spec") or {}).get("replicas"))
            except (TypeError, ValueError):
                raise invalid("Scale", route.name or "", ["spec.replicas: Required value"], "autoscaling") from None
            if replicas < 0:
                raise invalid("Scale", route.name or "", ["spec.replicas: Invalid value: must be greater than or equal to 0"], "autoscaling")
            if obj["spec"].get("replicas") != replicas:
                obj["spec"]["replicas"] = replicas
                obj = self.store.update(route.rt, obj, bump_generation=True)
            return Response.json(self._scale_of(obj))

    # -- logs

    def _logs(self, req: Request, route: _Route) -> Response:
        pod = self._get(route)
        name = route.name or ""
        spec = pod.get("spec") or {}
        names = [c.get("name") for c in spec.get("containers") or []]
        all_names = names + [c.get("name") for c in spec.get("initContainers") or []]
        container = req.query.get("container")
        if not container:
            default = ((pod["metadata"].get("annotations") or {}).get("kubectl.kubernetes.io/default-container"))
            if default in all_names:
                container = default
            elif len(names) == 1:
                container = names[0]
            else:
                raise bad_request(f"a container name must be specified for pod {name}, choose one of: [{' '.join(names)}]")
        if container not in all_names:
            raise bad_request(f"container {container} is not valid for pod {name}")
        statuses = (pod.get("status") or {}).get("containerStatuses") or []
        statuses += (pod.get("status") or {}).get("initContainerStatuses") or []
        cstatus = next((s for s in statuses if s.get("name") == container), None)
        if cstatus is None:
            raise bad_request(f'container "{container}" in pod "{name}" is waiting to start: ContainerCreating')
        previous = req.query.get("previous") in ("true", "1")
        if previous and not cstatus.get("restartCount"):
            raise bad_request(f'previous terminated container "{container}" in pod "{name}" not found')
        kubelet = self.controllers.kubelet
        if kubelet is not None and kubelet.knows(pod["metadata"]["uid"]):
            return self._process_logs(req, kubelet.log_lines(pod["metadata"]["uid"], container, previous=previous) or [])
        owners = pod_owners(self.store, pod)
        text = self.knobs.log_text(pod["metadata"].get("namespace", ""), owners, container, previous)
        if text is None:
            if previous:
                text = f"[kube-emulator] container {container} of pod {name} exited with code 1\n"
            else:
                text = f"[kube-emulator] container {container} of pod {name} started\n"
        lines = text.splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        if "tailLines" in req.query:
            try:
                tail = int(req.query["tailLines"])
            except ValueError:
                raise bad_request("tailLines must be an integer") from None
            lines = lines[-tail:] if tail > 0 else []
        if req.query.get("timestamps") in ("true", "1"):
            stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f000Z")
            lines = [f"{stamp} {line}" for line in lines]
        out = "".join(lines)
        if "limitBytes" in req.query:
            out = out.encode()[: int(req.query["limitBytes"])].decode(errors="ignore")
        return Response.text(out)

    def _process_logs(self, req: Request, entries: list[tuple[str, str]]) -> Response:
        """A running container's log: ``sinceSeconds``/``sinceTime``, ``tailLines``, ``timestamps``, ``limitBytes``."""
        since = None
        if "sinceSeconds" in req.query:
            try:
                seconds = int(req.query["sinceSeconds"])
            except ValueError:
                raise bad_request("sinceSeconds must be an integer") from None
            since = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(seconds=seconds)
        elif "sinceTime" in req.query:
            since = _dt.datetime.fromisoformat(req.query["sinceTime"].replace("Z", "+00:00"))
        if since is not None:
            entries = [(t, line) for t, line in entries
                       if _dt.datetime.fromisoformat(t.replace("Z", "+00:00")) >= since]
        if "tailLines" in req.query:
            try:
                tail = int(req.query["tailLines"])
            except ValueError:
                raise bad_request("tailLines must be an integer") from None
            entries = entries[-tail:] if tail > 0 else []
        stamps = req.query.get("timestamps") in ("true", "1")
        out = "".join(f"{t} {line}\n" if stamps else f"{line}\n" for t, line in entries)
        if "limitBytes" in req.query:
            out = out.encode()[: int(req.query["limitBytes"])].decode(errors="ignore")
        return Response.text(out)

    # -- port-forward

    def _portforward(self, req: Request, route: _Route) -> Response | PortForwardRequest:
        """What kube-apiserver and then the kubelet check before a port-forward's WebSocket upgrade.

        The RBAC filter authorized the verb of the method (``get`` for the
        WebSocket's GET); kube-apiserver 1.35+ (``AuthorizePodWebsocketUpgradeCreatePermission``,
        on by default) also requires ``create``, the verb of SPDY's POST.
        """
        if req.method == "GET":
            self.authorizer.check(req.user, self._attributes(req, route, verb="create"))
        ports = parse_ports(req.raw_query)  # the connect options' conversion: 400 on a bad number
        pod = self._get(route)
        name, namespace = route.name or "", route.namespace or ""
        if not (pod.get("spec") or {}).get("nodeName"):
            raise bad_request(f"pod {name} does not have a host assigned")
        if not wants_upgrade(req.headers):
            if req.headers.get("upgrade"):  # SPDY/3.1 (kubectl's fallback)
                raise bad_request(f"kube-emulator: port-forward over {req.headers['upgrade']} is not emulated; "
                                  "only the WebSocket protocol (v4.channel.k8s.io) is")
            raise bad_request("Upgrade request required")  # the upgrade-aware proxy
        # from here on the kubelet answers (text, as the apiserver's proxy passes it on)
        if not ports:
            return Response.text('query parameter "ports" is required', 400)
        if 0 in ports:
            return Response.text('port "0" must be > 0', 400)
        uid = pod["metadata"]["uid"]
        status = pod.get("status") or {}
        kubelet = self.controllers.kubelet
        if kubelet is not None:
            ip = kubelet.pod_ip(uid)
            running = ip is not None
        else:  # painted: a Running pod with an IP "has a sandbox", but nothing runs in it
            ip = None
            running = status.get("phase") == "Running" and bool(status.get("podIP"))
        if not running:  # the container runtime lists running sandboxes only
            return Response.text(f'pod not found ("{name}_{namespace}")', 500)
        return PortForwardRequest(namespace, name, uid, ports, ip)

    # -- watch

    def _watch(self, req: Request, route: _Route) -> Response | WatchStream:
        q = req.query
        match = self._selector(req)
        timeout = float(q.get("timeoutSeconds") or 1800)
        send_initial = q.get("sendInitialEvents") == "true"
        rv_text = q.get("resourceVersion", "")
        since: int | None = None
        if not send_initial and rv_text not in ("", "0"):
            try:
                since = int(rv_text)
            except ValueError:
                raise bad_request(f"invalid resource version: {rv_text!r}") from None
        bookmarks = q.get("allowWatchBookmarks") == "true"
        try:
            initial, rv, watcher = self.store.watch(route.rt, route.namespace, match, since)
        except Expired as exc:
            status = ApiError(410, "Expired", str(exc)).status()
            stream = WatchStream(route.rt, [WatchEvent("ERROR", status)], None, self.store, False, time.monotonic())
            return stream
        events = [WatchEvent("ADDED", obj) for obj in initial]
        stream = WatchStream(route.rt, events, watcher, self.store, bookmarks, time.monotonic() + timeout)
        if send_initial:
            marker = stream.bookmark({"k8s.io/initial-events-end": "true"}, rv=rv)
            assert marker is not None
            events.append(marker)
        return stream

    # -- control API

    def _control(self, req: Request, action: str) -> Response:
        if req.method == "GET":
            if action == "health":
                return Response.json({"ok": True, "resourceVersion": self.store.resource_version,
                                      "controllerErrors": len(self.controllers.errors)})
            if action == "knobs":
                return Response.json(self.knobs.snapshot())
            if action == "requests":
                with self._requests_lock:
                    return Response.json(list(self.requests))
            if action == "objects":
                try:
                    rt = resource_for_kind(req.query.get("kind", ""))
                except KeyError as exc:
                    raise bad_request(str(exc)) from None
                ns = req.query.get("namespace") or None
                if req.query.get("name"):
                    obj = self.store.get(rt, ns, req.query["name"])
                    if obj is None:
                        raise not_found(rt.plural, req.query["name"], rt.group)
                    return Response.json(obj)
                items, _ = self.store.list(rt, ns if rt.namespaced else None)
                return Response.json(items)
            if action == "errors":
                return Response.json(list(self.controllers.errors))
        if req.method == "POST":
            body = json.loads(req.body or b"{}")
            if not isinstance(body, dict):
                raise bad_request("the body must be a JSON object")
            if action == "token":
                ns, name = str(body.get("namespace") or ""), str(body.get("serviceaccount") or "")
                if self.store.get(SERVICEACCOUNTS, ns, name) is None:
                    raise not_found("serviceaccounts", name)
                return Response.json({"token": self.tokens.mint(ns, name),
                                      "user": service_account_user(ns, name).name})
            if action == "reset":
                self.knobs.reset()
                if body.get("objects"):
                    with self.store.lock:
                        self.store.clear()
                        seed(self.store)
                with self._requests_lock:
                    self.requests.clear()
                return Response.json(self.knobs.snapshot())
            try:
                self.knobs.apply(action, body)
            except LookupError:
                raise ApiError(404, "NotFound", f"no control action {action!r}") from None
            except (ValueError, TypeError) as exc:
                raise bad_request(str(exc)) from None
            self.controllers.wake()
            return Response.json(self.knobs.snapshot())
        raise ApiError(404, "NotFound", f"no control endpoint {req.method} /_emulator/{action}")
