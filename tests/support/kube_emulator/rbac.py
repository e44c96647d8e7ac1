"""Authentication and RBAC authorization, as kube-apiserver does them (the parts a namespaced runner meets).

Identities: the admin token written to ``<dir>/token`` is ``kubernetes-admin``
in group ``system:masters`` (allowed everything, as on a real cluster).
ServiceAccount tokens are minted by the test (``POST /_emulator/token``,
:meth:`EmulatorControl.service_account_token`): user
``system:serviceaccount:<ns>:<name>``, groups ``system:serviceaccounts``,
``system:serviceaccounts:<ns>``, ``system:authenticated``. A token whose
ServiceAccount no longer exists answers 401.

Request attributes (k8s.io/apiserver ``RequestInfo``): verb from the method
(``get``/``list``/``watch`` for GET on an object / a collection / with
``watch``, ``create``, ``update``, ``patch``, ``delete``,
``deletecollection``), API group, resource, subresource (``pods/log``,
``deployments/status``), name and namespace. A server-side apply that creates
its object also needs ``create`` (the API server's ``withAuthorization`` on the
patch handler's create path). A WebSocket upgrade to ``pods/portforward``
is a GET (``get``) and also needs ``create``, as kube-apiserver 1.35+ checks
(``AuthorizePodWebsocketUpgradeCreatePermission``; api.py).

Rules (``rbac.authorization.k8s.io/v1``): ClusterRoleBindings grant their
ClusterRole everywhere; RoleBindings grant a Role (or a ClusterRole) in their
own namespace. A rule matches on ``apiGroups``, ``verbs``, ``resources``
(``*``, ``res/sub``, ``*/sub``, ``res/*``) and, when set, ``resourceNames``
(never for ``create``/``list``/``watch``/``deletecollection``, which have no
name). Built in (the bootstrap policy ``system:discovery``,
``system:public-info-viewer``, ``system:basic-user``): every authenticated
user may GET the discovery/OpenAPI/version paths and create
``selfsubjectaccessreviews`` / ``selfsubjectrulesreviews``.

A denial is a ``metav1.Status`` 403 worded as kube-apiserver words it::

    secrets "x" is forbidden: User "system:serviceaccount:ns:sa" cannot get resource
    "secrets" in API group "" in the namespace "ns"
"""

from __future__ import annotations

import secrets as _secrets
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable

from .errors import ApiError

__all__ = ["User", "ADMIN", "Attributes", "Authorizer", "Tokens", "forbidden", "request_verb"]


@dataclass(frozen=True)
class User:
    name: str
    groups: tuple[str, ...] = ()

    @property
    def admin(self) -> bool:
        return "system:masters" in self.groups


ADMIN = User("kubernetes-admin", ("system:masters", "system:authenticated"))


def service_account_user(namespace: str, name: str) -> User:
    return User(f"system:serviceaccount:{namespace}:{name}",
                ("system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"))


@dataclass(frozen=True)
class Attributes:
    """What a request does, in the authorizer's terms."""

    verb: str
    resource: str = ""
    group: str = ""
    namespace: str = ""
    name: str = ""
    subresource: str = ""
    #: Set for a non-resource request (``/api``, ``/version``, ...): its path.
    path: str = ""

    @property
    def resource_request(self) -> bool:
        return not self.path


def request_verb(method: str, *, named: bool, watch: bool) -> str:
    method = method.upper()
    if method in ("GET", "HEAD"):
        return "watch" if watch else ("get" if named else "list")
    if method == "POST":
        return "create"
    if method == "PUT":
        return "update"
    if method == "PATCH":
        return "patch"
    if method == "DELETE":
        return "delete" if named else "deletecollection"
    return method.lower()


#: Non-resource paths every authenticated user may GET (system:discovery, system:public-info-viewer).
_DISCOVERY_PREFIXES = ("/api", "/apis", "/openapi", "/version", "/healthz", "/livez", "/readyz")
#: Resources every authenticated user may create (system:basic-user).
_SELF_REVIEWS = {("authorization.k8s.io", "selfsubjectaccessreviews"), ("authorization.k8s.io", "selfsubjectrulesreviews")}

_NAMELESS_VERBS = {"create", "list", "watch", "deletecollection"}


def _matches(values: Iterable[str] | None, value: str) -> bool:
    values = list(values or [])
    return "*" in values or value in values


def _resource_matches(resources: Iterable[str] | None, resource: str, subresource: str) -> bool:
    combined = f"{resource}/{subresource}" if subresource else resource
    for r in resources or []:
        if r == "*" or r == combined:
            return True
        if subresource and (r == f"*/{subresource}" or r == f"{resource}/*"):
            return True
    return False


def rule_allows(rule: dict[str, Any], a: Attributes) -> bool:
    """One PolicyRule against the request's attributes (pkg/apis/rbac/v1/evaluation_helpers.go)."""
    if not _matches(rule.get("verbs"), a.verb):
        return False
    if not a.resource_request:
        for url in rule.get("nonResourceURLs") or []:
            if url == "*" or url == a.path or (url.endswith("*") and a.path.startswith(url[:-1])):
                return True
        return False
    if not _matches(rule.get("apiGroups"), a.group):
        return False
    if not _resource_matches(rule.get("resources"), a.resource, a.subresource):
        return False
    names = rule.get("resourceNames") or []
    if names:
        return bool(a.name) and a.verb not in _NAMELESS_VERBS and a.name in names
    return True


def _subject_matches(subject: dict[str, Any], user: User, binding_namespace: str) -> bool:
    kind = subject.get("kind")
    if kind == "ServiceAccount":
        ns = subject.get("namespace") or binding_namespace
        return user.name == f"system:serviceaccount:{ns}:{subject.get('name')}"
    if kind == "User":
        return user.name == subject.get("name")
    if kind == "Group":
        return subject.get("name") in user.groups
    return False


@dataclass
class Authorizer:
    """RBAC over the objects a store holds: ``lookup(kind, namespace, name)`` and ``objects(kind, namespace)``."""

    objects: Any  # Callable[[str, str | None], list[dict]]
    lookup: Any  # Callable[[str, str | None, str], dict | None]

    def rules_for(self, user: User, namespace: str) -> list[dict[str, Any]]:
        """Every rule that applies to ``user`` in ``namespace`` ("" = cluster scope only)."""
        rules: list[dict[str, Any]] = []
        for crb in self.objects("ClusterRoleBinding", None):
            if any(_subject_matches(s, user, "") for s in crb.get("subjects") or []):
                ref = crb.get("roleRef") or {}
                if ref.get("kind") == "ClusterRole":
                    role = self.lookup("ClusterRole", None, ref.get("name", ""))
                    rules += (role or {}).get("rules") or []
        if namespace:
            for rb in self.objects("RoleBinding", namespace):
                if not any(_subject_matches(s, user, namespace) for s in rb.get("subjects") or []):
                    continue
                ref = rb.get("roleRef") or {}
                if ref.get("kind") == "Role":
                    role = self.lookup("Role", namespace, ref.get("name", ""))
                elif ref.get("kind") == "ClusterRole":
                    role = self.lookup("ClusterRole", None, ref.get("name", ""))
                else:
                    role = None
                rules += (role or {}).get("rules") or []
        return rules

    def allowed(self, user: User, a: Attributes) -> bool:
        if user.admin:
            return True
        if "system:authenticated" in user.groups:
            if not a.resource_request and a.verb in ("get", "head") and any(
                a.path == p or a.path.startswith(p + "/") for p in _DISCOVERY_PREFIXES
            ):
                return True
            if a.resource_request and a.verb == "create" and (a.group, a.resource) in _SELF_REVIEWS:
                return True
        return any(rule_allows(r, a) for r in self.rules_for(user, a.namespace))

    def check(self, user: User, a: Attributes) -> None:
        """Raise the API server's 403 when ``user`` may not do ``a``."""
        if not self.allowed(user, a):
            raise forbidden(user, a)


def forbidden(user: User, a: Attributes) -> ApiError:
    """kube-apiserver's Forbidden Status (responsewriters.Forbidden + rbac's forbiddenMessage)."""
    if not a.resource_request:
        return ApiError(403, "Forbidden", f'forbidden: User "{user.name}" cannot {a.verb} path "{a.path}"')
    resource = f"{a.resource}/{a.subresource}" if a.subresource else a.resource
    scope = f'in the namespace "{a.namespace}"' if a.namespace else "at the cluster scope"
    reason = f'User "{user.name}" cannot {a.verb} resource "{resource}" in API group "{a.group}" {scope}'
    qualified = f"{a.resource}.{a.group}" if a.group else a.resource
    message = f'{qualified} "{a.name}" is forbidden: {reason}' if a.name else f"{qualified} is forbidden: {reason}"
    details: dict[str, Any] = {"name": a.name, "kind": a.resource} if a.name else {"kind": a.resource}
    if a.group:
        details["group"] = a.group
    return ApiError(403, "Forbidden", message, details)


@dataclass
class Tokens:
    """Bearer tokens of ServiceAccounts minted by the test: token → (namespace, name)."""

    _tokens: dict[str, tuple[str, str]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def mint(self, namespace: str, name: str) -> str:
        token = "sa." + _secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = (namespace, name)
        return token

    def resolve(self, token: str) -> tuple[str, str] | None:
        with self._lock:
            return self._tokens.get(token)
