"""MLflow's auth REST API (3.17) as a small typed client, and the users plan.

Routes and payloads, checked against the mlflow 3.17.2 source
(``mlflow/server/auth/__init__.py``, ``routes.py``) and a running server:

=======================================================  ===============================================
``POST   /api/2.0/mlflow/users/create``                  ``{username, password}`` → ``{user}``;
                                                         400 RESOURCE_ALREADY_EXISTS, 400 password < 12
``GET    /api/2.0/mlflow/users/get?username=``           ``{user: {id, username, is_admin}}``; 404 absent
``GET    /api/2.0/mlflow/users/list``                    ``{users: [{id, username, is_admin, roles}]}``
``GET    /api/2.0/mlflow/users/current``                 the caller; 401 for a wrong password
``PATCH  /api/2.0/mlflow/users/update-password``         ``{username, password}``; for *yourself* also
                                                         ``current_password`` (else 400)
``PATCH  /api/2.0/mlflow/users/update-admin``            ``{username, is_admin}``
``DELETE /api/2.0/mlflow/users/delete``                  JSON ``{username}``; 404 absent; 400 for yourself
``POST   /api/3.0/mlflow/users/permissions/grant``       ``{username, resource_type, resource_id,
                                                         permission}``; 400 RESOURCE_ALREADY_EXISTS when a
                                                         grant exists (no in-place update: revoke + grant)
``POST   /api/3.0/mlflow/users/permissions/revoke``      ``{username, resource_type, resource_id}``; 404 absent
``GET    /api/3.0/mlflow/users/permissions/get``         effective ``{allowed, permission}``
``GET    /api/3.0/mlflow/users/permissions/list``        ``{is_admin, permissions: [{role_name, workspace,
                                                         resource_type, resource_pattern, permission}]}``;
                                                         direct grants sit on the role ``__user_<id>__``
=======================================================  ===============================================

Grantable per-resource permissions are READ, USE, EDIT, MANAGE and DENY; the
server *rejects* ``NO_PERMISSIONS`` (an absent grant means
``default_permission``, READ by default), so a declared ``NO_PERMISSIONS`` is
written as ``DENY``. ``resource_id`` is the experiment *id* or the registered
model *name*; the server does not check that the resource exists.

The auth cache (``auth_cache_ttl_seconds``) is per worker process: after a
password change or a delete, another worker keeps accepting the old
credential until its cache entry expires (reproduced with 2 workers). Checks
that an old credential is refused poll for that long.

Every request goes through :class:`tasks.checks.ServerClient`, the product's
one HTTP stack towards MLflow: the endpoint's CA bundle, ``connect_address``,
SNI and Host header hold here as in the smoke checks.

Errors::

    401/403                → AuthError (permanent)
    404 where absence is   → handled (None / False)
      expected, else       → NotFoundError (permanent)
    400 and other 4xx      → PermanentError with the server's message
                             (first line only: MLflow appends SQL parameters,
                             i.e. the password hash, to some messages)
    409/429/5xx/transport  → TransientError

No password is ever part of a message, a log line or a model field here:
they travel as :class:`SecretStr` and only reach the HTTP basic-auth header or
a request body.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from mlflow_rollout.errors import AuthError, BadInputError, PermanentError, RolloutError, TransientError
from mlflow_rollout.redact import redact
from mlflow_rollout.settings import EnvironmentSettings, UserDeclaration
from mlflow_rollout.types import Endpoint
from tasks.checks import ServerClient

__all__ = [
    "MlflowAuthClient",
    "NotFoundError",
    "User",
    "Grant",
    "ResourceType",
    "DeclaredPermission",
    "server_permission",
    "login_status",
    "wait_login_refused",
    "CreateResource",
    "CreateUser",
    "SetAdmin",
    "SetPassword",
    "GrantPermission",
    "RevokePermission",
    "DeleteUser",
    "RotateAdminPassword",
    "Action",
    "Plan",
    "validate_declarations",
    "plan_reconcile",
    "apply_action",
    "ResourceIndex",
]

ResourceType = Literal["experiment", "registered_model"]
DeclaredPermission = Literal["READ", "EDIT", "MANAGE", "NO_PERMISSIONS"]

USERS = "/api/2.0/mlflow/users"
PERMISSIONS = "/api/3.0/mlflow/users/permissions"


def server_permission(declared: str) -> str:
    """The permission written on the server for a declared one (NO_PERMISSIONS → DENY)."""
    return "DENY" if declared == "NO_PERMISSIONS" else declared


def _declared_permission(server: str) -> str:
    return "NO_PERMISSIONS" if server == "DENY" else server


class NotFoundError(PermanentError):
    """The server answered 404 where the object was expected to exist."""


class User(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    username: str
    is_admin: bool = False


class Grant(BaseModel):
    """One row of ``permissions/list``."""

    model_config = ConfigDict(frozen=True)

    role_name: str
    workspace: str = "default"
    resource_type: str
    resource_pattern: str
    permission: str

    def is_direct(self, user: User) -> bool:
        """A grant made with ``permissions/grant`` (the user's synthetic role), not via an RBAC role."""
        return self.role_name == f"__user_{user.id}__"


# ----------------------------------------------------------------------------- HTTP
def _server_message(r: httpx.Response) -> str:
    try:
        body = r.json()
        msg = str(body.get("message") or body.get("error_code") or "") if isinstance(body, dict) else str(body)
    except ValueError:
        msg = r.text
    # MLflow appends "Error: (IntegrityError) ... [parameters: (..., '<hash>', ...)]".
    msg = msg.split("\n", 1)[0].split(" Error: (", 1)[0].strip()
    return redact(msg)[:300]


def _raise_for(r: httpx.Response, what: str) -> None:
    code = r.status_code
    if code < 400:
        return
    msg = _server_message(r)
    if code == 401:
        raise AuthError(f"{what}: 401 unauthenticated ({msg[:120]})")
    if code == 403:
        raise AuthError(f"{what}: 403 permission denied")
    if code == 404:
        raise NotFoundError(f"{what}: 404 {msg}")
    if code in (408, 409, 429) or code >= 500:
        raise TransientError(f"{what}: {code} {msg}")
    raise PermanentError(f"{what}: {code} {msg}")


def _request(client: ServerClient, method: str, path: str, what: str, **kwargs: Any) -> httpx.Response:
    """``client.request`` with ``what`` in front of its transport/5xx errors."""
    try:
        return client.request(method, path, **kwargs)
    except RolloutError as exc:
        raise type(exc)(f"{what}: {exc}") from None


def login_status(endpoint: Endpoint, username: str, password: SecretStr, *, timeout: float = 20) -> int:
    """``GET /users/current`` as ``username`` on a fresh connection: 200 opens, 401 refused.

    Returns the status code (200, 401, 403, 404); raises TransientError for
    5xx and connection problems. Through :class:`ServerClient`, so the
    endpoint's CA bundle and ``connect_address`` hold here too.
    """
    what = f"login check for {username!r}"
    with ServerClient(endpoint, auth=(username, password.get_secret_value()), timeout=timeout) as c:
        r = _request(c, "GET", f"{USERS}/current", what)
    return r.status_code


def wait_login_refused(
    endpoint: Endpoint, username: str, password: SecretStr, *, within: float, probes: int = 6,
    sleep: Callable[[float], None] = time.sleep,
) -> float:
    """Wait until ``probes`` fresh connections in a row refuse the credential.

    Each worker process caches good credentials for ``auth_cache_ttl_seconds``,
    so an old password can keep working on some workers for that long after
    it was changed. Returns the seconds it took; PermanentError after ``within``.
    """
    start = time.monotonic()
    while True:
        codes = [login_status(endpoint, username, password) for _ in range(probes)]
        if all(c != 200 for c in codes):
            return time.monotonic() - start
        if time.monotonic() - start > within:
            raise PermanentError(
                f"the old credential of {username!r} is still accepted by some worker after {within:.0f}s "
                f"({codes.count(200)}/{probes} probes)"
            )
        sleep(1.0)


class MlflowAuthClient:
    """The auth API as the bootstrap admin.

    ``protected_username`` (the bootstrap admin, by default the caller) can
    never be deleted or demoted through this client.
    """

    def __init__(
        self, endpoint: Endpoint, admin_username: str, admin_password: SecretStr, *,
        timeout: float = 30, protected_username: str | None = None, transport: httpx.BaseTransport | None = None,
    ):
        self.endpoint = endpoint
        self.admin_username = admin_username
        self.protected_username = protected_username or admin_username
        self._http = ServerClient(
            endpoint, auth=(admin_username, admin_password.get_secret_value()), timeout=timeout, transport=transport,
        )

    def __enter__(self) -> "MlflowAuthClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, what: str, **kwargs: Any) -> httpx.Response:
        r = _request(self._http, method, path, what, **kwargs)
        _raise_for(r, what)
        return r

    # ------------------------------------------------------------------ users
    def current_user(self) -> User:
        r = self._call("GET", f"{USERS}/current", f"admin login as {self.admin_username!r}")
        return User.model_validate(r.json()["user"])

    def list_users(self) -> list[User]:
        r = self._call("GET", f"{USERS}/list", "list users")
        return [User.model_validate(u) for u in r.json().get("users", [])]

    def get_user(self, username: str) -> User | None:
        try:
            r = self._call("GET", f"{USERS}/get", f"get user {username!r}", params={"username": username})
        except NotFoundError:
            return None
        return User.model_validate(r.json()["user"])

    def create_user(self, username: str, password: SecretStr) -> User:
        r = self._call(
            "POST", f"{USERS}/create", f"create user {username!r}",
            json={"username": username, "password": password.get_secret_value()},
        )
        return User.model_validate(r.json()["user"])

    def update_password(self, username: str, password: SecretStr, *, current_password: SecretStr | None = None) -> None:
        """Set ``username``'s password; ``current_password`` is required when that is the caller."""
        body = {"username": username, "password": password.get_secret_value()}
        if current_password is not None:
            body["current_password"] = current_password.get_secret_value()
        self._call("PATCH", f"{USERS}/update-password", f"update password of {username!r}", json=body)

    def update_admin(self, username: str, is_admin: bool) -> None:
        if username == self.protected_username and not is_admin:
            raise PermanentError(f"refusing to demote the bootstrap admin {username!r}")
        self._call(
            "PATCH", f"{USERS}/update-admin", f"set admin={is_admin} on {username!r}",
            json={"username": username, "is_admin": is_admin},
        )

    def delete_user(self, username: str) -> bool:
        """Delete ``username``; False when it did not exist."""
        if username == self.protected_username:
            raise PermanentError(f"refusing to delete the bootstrap admin {username!r}")
        try:
            self._call("DELETE", f"{USERS}/delete", f"delete user {username!r}", json={"username": username})
        except NotFoundError:
            return False
        return True

    # ------------------------------------------------------------ permissions
    def list_permissions(self, username: str) -> list[Grant]:
        r = self._call("GET", f"{PERMISSIONS}/list", f"list permissions of {username!r}", params={"username": username})
        return [Grant.model_validate(p) for p in r.json().get("permissions", [])]

    def grant(self, username: str, resource_type: str, resource_id: str, permission: str) -> None:
        self._call(
            "POST", f"{PERMISSIONS}/grant", f"grant {permission} on {resource_type} {resource_id} to {username!r}",
            json={"username": username, "resource_type": resource_type, "resource_id": resource_id, "permission": permission},
        )

    def revoke(self, username: str, resource_type: str, resource_id: str) -> bool:
        """Remove the direct grant; False when there was none."""
        try:
            self._call(
                "POST", f"{PERMISSIONS}/revoke", f"revoke {resource_type} {resource_id} from {username!r}",
                json={"username": username, "resource_type": resource_type, "resource_id": resource_id},
            )
        except NotFoundError:
            return False
        return True

    # -------------------------------------------------------------- resources
    def experiment_id(self, name: str) -> str | None:
        """The id of the active experiment ``name``; None if absent; error if deleted."""
        try:
            r = self._call(
                "GET", "/api/2.0/mlflow/experiments/get-by-name", f"experiment {name!r}",
                params={"experiment_name": name},
            )
        except NotFoundError:
            return None
        exp = r.json()["experiment"]
        if exp.get("lifecycle_stage") == "deleted":
            raise PermanentError(
                f"experiment {name!r} ({exp['experiment_id']}) is deleted; restore it or choose another name"
            )
        return str(exp["experiment_id"])

    def create_experiment(self, name: str) -> str:
        r = self._call("POST", "/api/2.0/mlflow/experiments/create", f"create experiment {name!r}", json={"name": name})
        return str(r.json()["experiment_id"])

    def registered_model_exists(self, name: str) -> bool:
        try:
            self._call("GET", "/api/2.0/mlflow/registered-models/get", f"registered model {name!r}", params={"name": name})
        except NotFoundError:
            return False
        return True

    def create_registered_model(self, name: str) -> None:
        self._call("POST", "/api/2.0/mlflow/registered-models/create", f"create registered model {name!r}", json={"name": name})


# ------------------------------------------------------------------ resources
@dataclass
class ResourceIndex:
    """Names ↔ the ``resource_id`` the permission API wants (experiment id, model name)."""

    client: MlflowAuthClient
    _exp_ids: dict[str, str | None] = field(default_factory=dict)
    _models: dict[str, bool] = field(default_factory=dict)

    def resource_id(self, resource_type: str, name: str) -> str | None:
        """None when the resource does not exist (yet)."""
        if resource_type == "experiment":
            if name not in self._exp_ids:
                self._exp_ids[name] = self.client.experiment_id(name)
            return self._exp_ids[name]
        if name not in self._models:
            self._models[name] = self.client.registered_model_exists(name)
        return name if self._models[name] else None

    def name_of(self, resource_type: str, resource_id: str) -> str | None:
        """The declared name for a resource id seen in a grant (only resources looked up before)."""
        if resource_type == "experiment":
            return next((n for n, i in self._exp_ids.items() if i == resource_id), None)
        return resource_id if self._models.get(resource_id) else None

    def create(self, resource_type: str, name: str) -> str:
        if self.resource_id(resource_type, name) is not None:
            return self.resource_id(resource_type, name)  # type: ignore[return-value]
        if resource_type == "experiment":
            self._exp_ids[name] = self.client.create_experiment(name)
            return self._exp_ids[name]  # type: ignore[return-value]
        self.client.create_registered_model(name)
        self._models[name] = True
        return name


# -------------------------------------------------------------------- actions
class _Action(BaseModel):
    model_config = ConfigDict(frozen=True)

    def describe(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def row(self) -> dict[str, str]:
        data = self.model_dump()
        return {
            "action": data.pop("kind"),
            "user": str(data.pop("username", "") or ""),
            "detail": self.describe(),
        }


class CreateResource(_Action):
    kind: Literal["create-resource"] = "create-resource"
    resource_type: ResourceType
    resource: str

    def describe(self) -> str:
        what = "experiment" if self.resource_type == "experiment" else "registered model"
        return f"create {what} {self.resource!r} (declared in a permission, does not exist yet)"


class CreateUser(_Action):
    kind: Literal["create-user"] = "create-user"
    username: str
    admin: bool = False
    password_source: str

    def describe(self) -> str:
        return f"create user {self.username!r}{' as admin' if self.admin else ''} (password from {self.password_source})"


class SetAdmin(_Action):
    kind: Literal["set-admin"] = "set-admin"
    username: str
    admin: bool

    def describe(self) -> str:
        return f"{'make' if self.admin else 'demote'} {self.username!r} {'an admin' if self.admin else 'to a regular user'}"


class SetPassword(_Action):
    kind: Literal["set-password"] = "set-password"
    username: str
    password_source: str

    def describe(self) -> str:
        return f"set the password of {self.username!r} (the declared one does not open the account; from {self.password_source})"


class GrantPermission(_Action):
    kind: Literal["grant"] = "grant"
    username: str
    resource_type: ResourceType
    resource: str
    permission: DeclaredPermission
    #: The server's current direct grant (READ/USE/EDIT/MANAGE/DENY) when it is replaced.
    previous: str | None = None

    def describe(self) -> str:
        perm = self.permission + (" (written as DENY)" if self.permission == "NO_PERMISSIONS" else "")
        change = f", replacing {_declared_permission(self.previous)}" if self.previous else ""
        return f"grant {perm} on {self.resource_type} {self.resource!r} to {self.username!r}{change}"


class RevokePermission(_Action):
    kind: Literal["revoke"] = "revoke"
    username: str
    resource_type: ResourceType
    resource: str
    previous: str | None = None

    def describe(self) -> str:
        was = f" (was {_declared_permission(self.previous)})" if self.previous else ""
        return f"revoke {self.username!r}'s grant on {self.resource_type} {self.resource!r}{was}"


class DeleteUser(_Action):
    kind: Literal["delete-user"] = "delete-user"
    username: str
    reason: str = "not declared and users_prune is on"

    def describe(self) -> str:
        return f"delete user {self.username!r} ({self.reason})"


class RotateAdminPassword(_Action):
    kind: Literal["rotate-admin-password"] = "rotate-admin-password"
    username: str
    password_source: str
    stores: list[str]

    def describe(self) -> str:
        return (
            f"rotate the password of the bootstrap admin {self.username!r} (new one {self.password_source}); "
            f"update-password API, then store it in {', '.join(self.stores)}"
        )


Action = Annotated[
    CreateResource | CreateUser | SetAdmin | SetPassword | GrantPermission | RevokePermission | DeleteUser
    | RotateAdminPassword,
    Field(discriminator="kind"),
]


class Plan(BaseModel):
    """What a run will change, in order; empty means the server already matches."""

    environment: str
    operation: str
    actions: list[Action] = []
    #: Things seen and deliberately left alone (never secrets).
    notes: list[str] = []
    #: (resource_type, name) the declaration names: the grant scope the next reconcile inherits.
    managed_resources: list[tuple[str, str]] = []

    @property
    def summary(self) -> str:
        if not self.actions:
            return f"{self.operation}: no changes" + (f" ({len(self.notes)} note(s))" if self.notes else "")
        kinds: dict[str, int] = {}
        for a in self.actions:
            kinds[a.kind] = kinds.get(a.kind, 0) + 1
        return f"{self.operation}: {len(self.actions)} change(s): " + ", ".join(f"{n} {k}" for k, n in kinds.items())

    def rows(self) -> list[dict[str, str]]:
        return [{"step": str(i), **a.row()} for i, a in enumerate(self.actions, 1)]


# ---------------------------------------------------------------------- planning
def validate_declarations(settings: EnvironmentSettings) -> None:
    """Refuse declarations that cannot be reconciled, before anything is read or changed."""
    admin = settings.mlflow.admin_username
    seen: set[str] = set()
    problems: list[str] = []
    for i, u in enumerate(settings.users):
        where = f"users[{i}] ({u.username!r})"
        if u.username == admin:
            problems.append(
                f"{where}: {admin!r} is the bootstrap admin (mlflow.admin_username); it is managed by the rollout "
                "and cannot be declared here (rotate its password with action rotate-admin-password)"
            )
        if u.username in seen:
            problems.append(f"{where}: declared twice")
        seen.add(u.username)
        grants: set[tuple[str, str]] = set()
        for p in u.permissions:
            key = (p.resource_type, p.resource)
            if key in grants:
                problems.append(f"{where}: two permissions on {p.resource_type} {p.resource!r}")
            grants.add(key)
    if problems:
        raise BadInputError(f"environment {settings.name!r}: invalid users section:\n  " + "\n  ".join(problems))


def plan_reconcile(
    client: MlflowAuthClient,
    settings: EnvironmentSettings,
    passwords: dict[str, SecretStr],
    describe_source: Callable[[UserDeclaration], str],
    index: ResourceIndex | None = None,
    previously_managed: Iterable[tuple[str, str]] = (),
) -> Plan:
    """Compare the declared users with the server; the actions that make them equal.

    Owned by the declaration: the users it names (existence, admin flag,
    password), and their *direct* grants on the managed resources: those named
    anywhere in ``users`` now, plus ``previously_managed`` (named by the last
    successful reconcile, so dropping the last mention of a resource still
    revokes its grants — kubectl's last-applied idea). Grants on other
    resources, e.g. the MANAGE MLflow gives a user on an experiment they
    create, are left alone. Undeclared users are deleted only with
    ``users_prune``; the bootstrap admin is never touched.
    """
    validate_declarations(settings)
    admin = settings.mlflow.admin_username
    index = index or ResourceIndex(client)
    plan = Plan(environment=settings.name, operation="reconcile")
    actions: list[Any] = []

    managed: list[tuple[str, str]] = list(dict.fromkeys(
        (p.resource_type, p.resource) for u in settings.users for p in u.permissions
    ))
    for rtype, name in managed:
        if index.resource_id(rtype, name) is None:
            actions.append(CreateResource(resource_type=rtype, resource=name))
    plan.managed_resources = managed
    scope = list(dict.fromkeys([*managed, *((str(t), str(n)) for t, n in previously_managed)]))
    managed_ids = {
        (rtype, rid) for rtype, name in scope
        if rtype in ("experiment", "registered_model") and (rid := index.resource_id(rtype, name)) is not None
    }

    existing = {u.username: u for u in client.list_users()}
    for decl in settings.users:
        source = describe_source(decl)
        user = existing.get(decl.username)
        wanted = {(p.resource_type, p.resource): p.permission for p in decl.permissions}
        if user is None:
            actions.append(CreateUser(username=decl.username, admin=decl.admin, password_source=source))
            actions += [
                GrantPermission(username=decl.username, resource_type=rt, resource=res, permission=perm)
                for (rt, res), perm in wanted.items()
            ]
            continue
        if user.is_admin != decl.admin:
            actions.append(SetAdmin(username=decl.username, admin=decl.admin))
        if login_status(client.endpoint, decl.username, passwords[decl.username]) != 200:
            actions.append(SetPassword(username=decl.username, password_source=source))
        current: dict[tuple[str, str], str] = {}
        for g in client.list_permissions(decl.username):
            if not g.is_direct(user) or (g.resource_type, g.resource_pattern) not in managed_ids:
                continue
            name = index.name_of(g.resource_type, g.resource_pattern)
            if name is not None:
                current[(g.resource_type, name)] = g.permission
        for (rt, res), perm in wanted.items():
            have = current.get((rt, res))
            if have != server_permission(perm):
                actions.append(GrantPermission(
                    username=decl.username, resource_type=rt, resource=res, permission=perm, previous=have,
                ))
        for (rt, res), have in current.items():
            if (rt, res) not in wanted:
                actions.append(RevokePermission(username=decl.username, resource_type=rt, resource=res, previous=have))

    declared = {u.username for u in settings.users}
    for name in sorted(existing):
        if name == admin or name in declared:
            continue
        if settings.users_prune:
            actions.append(DeleteUser(username=name))
        else:
            plan.notes.append(f"user {name!r} exists but is not declared; kept (users_prune is off)")
    plan.actions = _ordered(actions)
    return plan


_ORDER = {
    "create-resource": 0, "create-user": 1, "set-admin": 2, "set-password": 3, "revoke": 4, "grant": 5,
    "delete-user": 6, "rotate-admin-password": 7,
}


def _ordered(actions: Iterable[Any]) -> list[Any]:
    return sorted(actions, key=lambda a: _ORDER[a.kind])  # stable: declaration order within a kind


# ---------------------------------------------------------------------- applying
def apply_action(
    client: MlflowAuthClient, action: Any, passwords: dict[str, SecretStr], index: ResourceIndex,
) -> str:
    """Carry out one planned action (not the admin rotation); returns what was done."""
    protected = client.protected_username
    username = getattr(action, "username", None)
    if username == protected and not isinstance(action, RotateAdminPassword):
        raise PermanentError(f"refusing to change the bootstrap admin {protected!r} with {action.kind}")
    if isinstance(action, CreateResource):
        rid = index.create(action.resource_type, action.resource)
        return f"created {action.resource_type} {action.resource!r} ({rid})"
    if isinstance(action, CreateUser):
        client.create_user(action.username, passwords[action.username])
        if action.admin:
            client.update_admin(action.username, True)
        return f"created user {action.username!r}" + (" (admin)" if action.admin else "")
    if isinstance(action, SetAdmin):
        client.update_admin(action.username, action.admin)
        return f"{action.username!r} admin={action.admin}"
    if isinstance(action, SetPassword):
        client.update_password(action.username, passwords[action.username])
        return f"password of {action.username!r} set"
    if isinstance(action, GrantPermission):
        rid = index.resource_id(action.resource_type, action.resource)
        if rid is None:
            raise PermanentError(f"{action.resource_type} {action.resource!r} does not exist")
        if action.previous is not None:
            # No in-place update in the per-user API: a grant on an existing row is a 400.
            client.revoke(action.username, action.resource_type, rid)
        client.grant(action.username, action.resource_type, rid, server_permission(action.permission))
        return action.describe()
    if isinstance(action, RevokePermission):
        rid = index.resource_id(action.resource_type, action.resource)
        done = rid is not None and client.revoke(action.username, action.resource_type, rid)
        return action.describe() + ("" if done else " (already absent)")
    if isinstance(action, DeleteUser):
        done = client.delete_user(action.username)
        return f"deleted user {action.username!r}" + ("" if done else " (already absent)")
    raise PermanentError(f"action {action.kind!r} is not applied here")
