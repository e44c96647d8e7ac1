"""Flow ``mlflow-users``: users, admin flags and permissions, declared or one at a time.

``reconcile`` (the default) makes the server match ``users:`` in the
environment file: it plans typed actions, shows them as a table artifact,
applies them and re-plans to prove nothing is left (a second run plans
nothing). ``dry_run`` stops after the plan. Single actions (``create``,
``delete``, ``set-password``, ``grant``, ``revoke``) go through the same
plan → apply → verify stages; ``rotate-admin-password`` changes the bootstrap
admin's password with the update-password API, then in the target's secret
store (``Target.replace_admin_password``) and in the Prefect Secret block the
environment's ``secrets.admin_password`` names, undoing what it did when a
step fails (see "admin password rotation" below).

Rules:

- The bootstrap admin (``mlflow.admin_username``) is the rollout's: declaring
  it is refused, and nothing here deletes or demotes it (the REST client
  refuses too). Its password changes only through ``rotate-admin-password``.
- Passwords never pass as parameters: ``password_secret`` *names* an
  environment variable (``env:NAME``) or a Prefect Secret block
  (``block:NAME``). Values are SecretStr from resolution to the HTTP request
  and registered for log redaction; plans and artifacts show only sources.
- A declared experiment or registered model that does not exist is created
  (shown in the plan as ``create-resource``): a permission on a missing
  resource would silently do nothing. Single ``grant``/``revoke`` actions do
  not create resources: a typo there is an error.
- Reconcile owns, for each declared user, the *direct* grants on the
  managed resources: those named anywhere in ``users:``, plus those the last
  successful reconcile named (kept in the Prefect Variable
  ``mlflow-users-<env>-managed-resources``), so removing the last mention of
  a resource still revokes its grants. Other grants (e.g. the MANAGE MLflow
  gives a user on an experiment they create) are left alone. Declared
  ``NO_PERMISSIONS`` is written as ``DENY`` (3.17 rejects NO_PERMISSIONS
  grants, and an absent grant means ``default_permission``).
- Undeclared users are kept (and named in the plan's notes) unless
  ``users_prune`` is on.
"""

from __future__ import annotations

import datetime as dt
import secrets as _stdlib_secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run, task_run
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from mlflow_rollout.errors import AuthError, BadInputError, PermanentError, TransientError
from mlflow_rollout.locks import operation_lock
from mlflow_rollout.redact import install_log_redaction, redact, register_secret
from mlflow_rollout.secrets import check_password, resolve_secret
from mlflow_rollout.settings import EnvironmentSettings, SecretRef, UserDeclaration, load_environment
from mlflow_rollout.stages import ledger, stage_task
from mlflow_rollout.types import Endpoint
from targets import get_target
from targets.base import Target
from tasks import mlflow_users as mu

__all__ = ["users", "mlflow_users", "UsersRequest", "STAGES", "admin_password_reference", "parse_password_secret"]

STAGES = ["users-plan", "users-apply", "users-verify", "users-report"]
SINGLE_ACTIONS = ("create", "delete", "set-password", "grant", "revoke")


class UsersRequest(BaseModel):
    """What to do (the deployment's parameter form). Never a password: only where one is."""

    model_config = ConfigDict(extra="forbid")

    environment: str = Field(default="local", description="environments/<name>.yaml")
    action: Literal["reconcile", "create", "delete", "set-password", "grant", "revoke", "rotate-admin-password"] = Field(
        default="reconcile", description="reconcile the declared users, or one single action"
    )
    dry_run: bool = Field(default=False, description="plan and show the changes, change nothing")
    username: str | None = Field(default=None, description="the user of a single action")
    resource_type: Literal["experiment", "registered_model"] | None = Field(default=None, description="grant/revoke")
    resource: str | None = Field(default=None, description="experiment or registered model name (grant/revoke)")
    permission: Literal["READ", "EDIT", "MANAGE", "NO_PERMISSIONS"] | None = Field(default=None, description="grant")
    password_secret: str | None = Field(
        default=None, pattern=r"^(env|block):[A-Za-z0-9_.\-]+$",
        description="create/set-password/rotate-admin-password: 'env:NAME' (environment variable) or "
        "'block:NAME' (Prefect Secret block) holding the password; never the password itself",
    )

    def check(self, settings: EnvironmentSettings) -> None:
        """Cross-field rules, as BadInputError before anything is read from the server."""
        a, admin = self.action, settings.mlflow.admin_username
        if a in ("reconcile", "rotate-admin-password"):
            extra = [f for f in ("username", "resource_type", "resource", "permission") if getattr(self, f)]
            if extra:
                raise BadInputError(f"action {a!r} takes no {', '.join(extra)}")
            if a == "reconcile" and self.password_secret:
                raise BadInputError("action 'reconcile' takes no password_secret: passwords come from the users section")
            return
        if not self.username:
            raise BadInputError(f"action {a!r} needs a username")
        if self.username == admin:
            raise BadInputError(
                f"{admin!r} is the bootstrap admin (mlflow.admin_username): it can never be deleted, demoted or "
                "changed by a single action; use action 'rotate-admin-password' to change its password"
            )
        need = {"grant": ("resource_type", "resource", "permission"), "revoke": ("resource_type", "resource")}.get(a, ())
        missing = [f for f in need if not getattr(self, f)]
        if missing:
            raise BadInputError(f"action {a!r} needs {', '.join(missing)}")
        unused = [f for f in ("resource_type", "resource", "permission") if f not in need and getattr(self, f)]
        if unused:
            raise BadInputError(f"action {a!r} takes no {', '.join(unused)}")
        if self.password_secret and a not in ("create", "set-password"):
            raise BadInputError(f"action {a!r} takes no password_secret")


# ------------------------------------------------------------------ secrets
def parse_password_secret(spec: str) -> SecretRef:
    """``env:NAME`` → environment variable, ``block:NAME`` → Prefect Secret block."""
    kind, _, name = spec.partition(":")
    if kind == "env" and name:
        return SecretRef(env=name)
    if kind == "block" and name:
        return SecretRef(prefect_secret=name)
    raise BadInputError("password_secret must be 'env:NAME' or 'block:NAME' (got a value of another form)")


def _declared(settings: EnvironmentSettings, username: str | None) -> UserDeclaration | None:
    return next((u for u in settings.users if u.username == username), None)


def _declared_passwords(settings: EnvironmentSettings) -> dict[str, SecretStr]:
    out = {}
    for i, u in enumerate(settings.users):
        if u.password.generate:
            raise BadInputError(f"users[{i}] ({u.username!r}).password: 'generate' is not supported; use env or prefect_secret")
        label = f"users[{i}] ({u.username!r}).password"
        value = resolve_secret(u.password, label=label)
        check_password(value, f"{label} ({u.password.describe()})", admin=u.admin)
        out[u.username] = value
    return out


def _single_password(settings: EnvironmentSettings, request: UsersRequest) -> tuple[SecretStr, str]:
    """The password of a create/set-password: the named secret, else the declared one."""
    if request.password_secret:
        ref = parse_password_secret(request.password_secret)
        label = f"password_secret ({ref.describe()})"
    else:
        decl = _declared(settings, request.username)
        if decl is None:
            raise BadInputError(
                f"action {request.action!r}: {request.username!r} is not declared in environment {settings.name!r}; "
                "name its password with password_secret ('env:NAME' or 'block:NAME')"
            )
        ref, label = decl.password, f"declared password of {request.username!r} ({decl.password.describe()})"
    value = resolve_secret(ref, label=label)
    check_password(value, label)
    return value, ref.describe()


def admin_password_reference(settings: EnvironmentSettings) -> str | None:
    """The Prefect Secret block the next rollout reads the admin password from.

    None for ``generate: true``: then the target's secret store is the only
    copy. Raises BadInputError when the environment takes it from an
    environment variable: this flow cannot change that variable at its source.
    """
    ref = settings.secrets.admin_password
    if ref.env:
        raise BadInputError(
            f"secrets.admin_password comes from the environment variable {ref.env}: rotate-admin-password "
            "cannot change it at its source (the next rollout would put the old value back). Change the password "
            "with the update-password API and the variable together, or point secrets.admin_password at a Prefect "
            "Secret block (prefect_secret) or 'generate: true'"
        )
    return ref.prefect_secret


# ------------------------------------------------------- last reconciled scope
def _scope_variable(env: str) -> str:
    return f"mlflow-users-{env}-managed-resources"


def _previously_managed(env: str) -> list[tuple[str, str]]:
    """The resources the last successful reconcile of ``env`` managed (a Prefect Variable)."""
    from prefect.variables import Variable

    value = Variable.get(_scope_variable(env), default=None)
    if not isinstance(value, list):
        return []
    return [(str(v[0]), str(v[1])) for v in value if isinstance(v, list | tuple) and len(v) == 2]


def _record_managed(env: str, resources: list[tuple[str, str]]) -> None:
    from prefect.variables import Variable

    Variable.set(_scope_variable(env), [list(r) for r in resources], overwrite=True)


# -------------------------------------------------------------------- context
@dataclass
class _Ctx:
    settings: EnvironmentSettings
    target: Target
    endpoint: Endpoint
    admin: str

    def client(self, password: SecretStr | None = None) -> mu.MlflowAuthClient:
        """The auth API as the bootstrap admin, with ``password`` or the one in the target's secret store."""
        return mu.MlflowAuthClient(self.endpoint, self.admin, password or self.target.admin_password())


def _context(settings: EnvironmentSettings) -> _Ctx:
    target = get_target(settings)
    return _Ctx(settings, target, target.access_endpoint(), settings.mlflow.admin_username)


def _plan(ctx: _Ctx, request: UsersRequest) -> tuple[mu.Plan, dict[str, SecretStr]]:
    """The plan and the passwords it needs (kept out of the plan itself)."""
    settings = ctx.settings
    if request.action == "reconcile":
        mu.validate_declarations(settings)
        passwords = _declared_passwords(settings)
        with ctx.client() as client:
            client.current_user()
            plan = mu.plan_reconcile(
                client, settings, passwords, lambda d: d.password.describe(),
                previously_managed=_previously_managed(settings.name),
            )
            return plan, passwords
    plan = mu.Plan(environment=settings.name, operation=request.action)
    if request.action == "rotate-admin-password":
        block = admin_password_reference(settings)
        unfinished = _unfinished_rotation(ctx, block)
        with ctx.client(unfinished) as client:  # the password the server has now
            me = client.current_user()
        if not me.is_admin:
            raise AuthError(f"{ctx.admin!r} is not an admin on the server")
        stores = [ctx.target.admin_password_store()] + ([f"Prefect Secret block {block!r}"] if block else [])
        if unfinished is not None:
            source = "kept from an interrupted rotation, which the server already has"
        elif request.password_secret:
            source = f"from {parse_password_secret(request.password_secret).describe()}"
        else:
            source = "generated, 32 characters"
        plan.actions = [mu.RotateAdminPassword(username=ctx.admin, password_source=source, stores=stores)]
        return plan, {}

    username = request.username or ""
    passwords: dict[str, SecretStr] = {}
    if _declared(settings, username) is not None:
        plan.notes.append(
            f"{username!r} is declared in environment {settings.name!r}: the next reconcile restores the declaration"
        )
    with ctx.client() as client:
        user = client.get_user(username)
        if request.action == "create":
            password, source = _single_password(settings, request)
            passwords[username] = password
            decl = _declared(settings, username)
            if user is None:
                plan.actions.append(mu.CreateUser(username=username, admin=bool(decl and decl.admin), password_source=source))
            elif mu.login_status(ctx.endpoint, username, password) == 200:
                plan.notes.append(f"user {username!r} already exists and the password opens it")
            else:
                raise BadInputError(f"user {username!r} already exists with another password; use action 'set-password'")
            return plan, passwords
        if user is None and request.action != "delete":
            raise BadInputError(f"user {username!r} does not exist on the server")
        if request.action == "delete":
            if user is None:
                plan.notes.append(f"user {username!r} does not exist: nothing to delete")
            else:
                plan.actions.append(mu.DeleteUser(username=username, reason="requested"))
            return plan, passwords
        if request.action == "set-password":
            password, source = _single_password(settings, request)
            passwords[username] = password
            if mu.login_status(ctx.endpoint, username, password) == 200:
                plan.notes.append(f"the password of {username!r} already is the one from {source}")
            else:
                plan.actions.append(mu.SetPassword(username=username, password_source=source))
            return plan, passwords
        rtype, res = request.resource_type, request.resource or ""
        index = mu.ResourceIndex(client)
        rid = index.resource_id(rtype, res)
        current = None
        if rid is not None:
            current = next(
                (g.permission for g in client.list_permissions(username)
                 if g.is_direct(user) and g.resource_type == rtype and g.resource_pattern == rid),
                None,
            )
        if request.action == "grant":
            if rid is None:
                raise BadInputError(f"{rtype} {res!r} does not exist (a single grant does not create it)")
            if current == mu.server_permission(request.permission or ""):
                plan.notes.append(f"{username!r} already has {request.permission} on {rtype} {res!r}")
            else:
                plan.actions.append(mu.GrantPermission(
                    username=username, resource_type=rtype, resource=res, permission=request.permission,
                    previous=current,
                ))
        else:  # revoke
            if current is None:
                plan.notes.append(f"{username!r} has no direct grant on {rtype} {res!r}: nothing to revoke")
            else:
                plan.actions.append(mu.RevokePermission(username=username, resource_type=rtype, resource=res, previous=current))
    return plan, passwords


# ---------------------------------------------------------------------- stages
@stage_task("users-plan", retries=2, retry_delay_seconds=[2, 5])
def plan_stage(settings: EnvironmentSettings, request: UsersRequest) -> mu.Plan:
    ctx = _context(settings)
    plan, _ = _plan(ctx, request)
    logger = get_run_logger()
    for a in plan.actions:
        logger.info("plan: %s", a.describe())
    for n in plan.notes:
        logger.info("note: %s", n)
    if not plan.actions:
        logger.info("plan: no changes")
    return plan


@dataclass
class Applied:
    """What the apply stage did; the rotated passwords stay in memory only (never persisted)."""

    plan: mu.Plan
    done: list[str] = field(default_factory=list)
    #: (the replaced password, None when not known; the new one)
    rotated: tuple[SecretStr | None, SecretStr] | None = None

    @property
    def summary(self) -> str:
        return f"{len(self.done)} change(s) applied" if self.done else "nothing to apply"


# ------------------------------------------------------ admin password rotation
#
# Three places hold the admin password: the server (MLflow's auth database), the
# target's secret store (what every flow logs in with and the next rollout checks
# the admin against) and, for ``prefect_secret``, the Prefect Secret block the next
# rollout copies into that store. No write spans them, so the rotation goes
#
#   1. record the new password as the target's *pending* admin password
#   2. server: update-password (old → new)
#   3. the target's secret store ← new
#   4. the Prefect Secret block ← new
#   5. forget the pending password
#
# and a failed step undoes the ones before it (each store that may hold the new
# password ← old, newest first, then the server ← old), so the three agree again
# on the old password. Whatever cannot be undone is
# left to the pending record: the server's password is always stored somewhere,
# and the next rotate-admin-password run finishes an interrupted rotation.


def _same(a: SecretStr | None, b: SecretStr | None) -> bool:
    return a is not None and b is not None and a.get_secret_value() == b.get_secret_value()


def _read_block(block: str) -> SecretStr:
    return resolve_secret(SecretRef(prefect_secret=block), label=f"Prefect Secret block {block!r}")


def _save_block(block: str, password: SecretStr) -> None:
    from prefect.blocks.system import Secret

    Secret(value=password.get_secret_value()).save(block, overwrite=True)


def _unfinished_rotation(ctx: _Ctx, block: str | None) -> SecretStr | None:
    """The pending password of an interrupted rotation that still has to reach a store; None otherwise.

    It counts when it opens the admin login (the server took it) and the
    store or the block does not hold it yet. Anything else is stale: the
    server never took it, or a failed rotation set the server back.
    """
    pending = ctx.target.pending_admin_password()
    if pending is None or mu.login_status(ctx.endpoint, ctx.admin, pending) != 200:
        return None
    if _same(pending, ctx.target.admin_password()) and (block is None or _same(pending, _read_block(block))):
        return None
    return pending


def _forget_pending(ctx: _Ctx) -> str:
    try:
        ctx.target.set_pending_admin_password(None)
    except Exception as exc:  # noqa: BLE001 - reported; a stale pending password is harmless
        return f" (the pending copy could not be removed: {type(exc).__name__}: {redact(str(exc))[:200]})"
    return ""


def _holds(read: Callable[[], SecretStr], value: SecretStr) -> bool | None:
    """Does ``read()`` give ``value``? None when it cannot be read."""
    try:
        return _same(read(), value)
    except Exception:  # noqa: BLE001 - "unknown" is an answer here
        return None


def _opens(ctx: _Ctx, password: SecretStr) -> bool | None:
    """Does ``password`` open the admin login? None when the server cannot tell now."""
    try:
        return mu.login_status(ctx.endpoint, ctx.admin, password) == 200
    except Exception:  # noqa: BLE001
        return None


def _failure(exc: BaseException, message: str) -> PermanentError | TransientError:
    """``exc``'s kind (a TransientError lets the stage try again) with ``message``, secrets redacted."""
    kind = next((k for k in (TransientError, AuthError) if isinstance(exc, k)), PermanentError)
    return kind(redact(f"{message} ({type(exc).__name__}: {str(exc)[:300]})"))


def _undo(ctx: _Ctx, old: SecretStr, new: SecretStr, touched: list[tuple[str, Callable[[SecretStr], None]]]) -> str:
    """Set the stores that may hold ``new`` back to ``old``, newest first, then the server; the state, in words.

    The server goes back only once no store can hold the new password any
    more; otherwise it keeps the new one, which the pending record keeps.
    """
    kept = (
        f"the new password is kept as the pending admin password beside {ctx.target.admin_password_store()}; "
        "run rotate-admin-password again to finish the rotation"
    )
    for name, write in reversed(touched):
        try:
            write(old)
        except Exception as exc:  # noqa: BLE001 - the state is reported to the caller
            return f"setting {name} back failed too ({type(exc).__name__}): the server has the NEW password; {kept}"
    try:
        with ctx.client(new) as client:
            client.update_password(ctx.admin, old, current_password=new)
    except Exception as exc:  # noqa: BLE001
        if not _opens(ctx, old):
            return (
                f"setting the server back failed too ({type(exc).__name__}): the server has (or may have) the NEW "
                f"password, the stores the old one; {kept}"
            )
    return "undone: the server and every store have the old admin password again" + _forget_pending(ctx)


def _rotate(ctx: _Ctx, request: UsersRequest) -> tuple[str, tuple[SecretStr | None, SecretStr]]:
    target, store = ctx.target, ctx.target.admin_password_store()
    block = admin_password_reference(ctx.settings)
    old = target.admin_password()
    requested = (
        resolve_secret(parse_password_secret(request.password_secret), label="password_secret")
        if request.password_secret else None
    )
    unfinished = _unfinished_rotation(ctx, block)
    if unfinished is not None:
        if requested is not None and not _same(requested, unfinished):
            raise BadInputError(
                f"an interrupted rotation left the server on another password (kept as the pending admin password "
                f"beside {store}); run rotate-admin-password without password_secret to finish it first"
            )
        new, replaced = unfinished, (None if _same(old, unfinished) else old)
    else:
        if target.pending_admin_password() is not None:
            target.set_pending_admin_password(None)  # stale: the server never took it
        new = requested or SecretStr(_stdlib_secrets.token_urlsafe(24))
        register_secret(new.get_secret_value())
        check_password(new, "new admin password", admin=True)
        if _same(new, old):
            raise BadInputError("the new admin password is the current one")
        replaced = old
        target.set_pending_admin_password(new)  # 1: stored before the server has it
        try:  # 2
            with ctx.client(old) as client:
                client.update_password(ctx.admin, new, current_password=old)
        except Exception as exc:
            took = _opens(ctx, new)
            if took is False:
                unchanged = "update-password failed; the admin password is unchanged" + _forget_pending(ctx)
                raise _failure(exc, unchanged) from None
            if took is None:
                raise _failure(exc, (
                    "update-password failed and the server cannot tell now whether it took the new password; it "
                    f"is kept as the pending admin password beside {store}: run rotate-admin-password again"
                )) from None

    # 3, 4: the stores, each written and read back (an answer lost after a write that happened is a success).
    places: list[tuple[str, Callable[[SecretStr], None], Callable[[], SecretStr]]] = [
        (store, target.replace_admin_password, target.admin_password)
    ]
    if block is not None:
        places.append((
            f"Prefect Secret block {block!r}",
            lambda pw: _save_block(block, pw), lambda: _read_block(block),
        ))
    stored: list[str] = []
    touched: list[tuple[str, Callable[[SecretStr], None]]] = []  # places that may hold the new password
    try:
        for name, write, read in places:
            if not _holds(read, new):
                touched.append((name, write))
                try:
                    write(new)
                except Exception:
                    holds = _holds(read, new)
                    if holds is False:
                        touched.pop()
                    if not holds:
                        raise
            stored.append(name)
    except Exception as exc:
        if replaced is None:  # finishing a rotation: the old password no longer opens the server
            state = (
                f"the server has the new password; stored in {' and '.join(stored) or 'no store yet'}; it is kept "
                f"as the pending admin password beside {store}: run rotate-admin-password again to finish"
            )
        else:
            state = _undo(ctx, replaced, new, touched)
        raise _failure(exc, f"storing the new admin password failed after the server took it; {state}") from None
    finished = " (an interrupted rotation finished)" if unfinished is not None else ""
    return f"admin password rotated{finished}; stored in {', '.join(stored)}" + _forget_pending(ctx), (replaced, new)


@stage_task("users-apply", retries=2, retry_delay_seconds=[2, 5])
def apply_stage(settings: EnvironmentSettings, request: UsersRequest, plan: mu.Plan) -> Applied:
    ctx = _context(settings)
    logger = get_run_logger()
    if request.action == "rotate-admin-password":
        message, rotated = _rotate(ctx, request)
        logger.info("%s", message)
        return Applied(plan=plan, done=[message], rotated=rotated)
    if (task_run.run_count or 1) > 1:
        # A retry after a transient failure: some actions may have happened; plan again from the server.
        plan, passwords = _plan(ctx, request)
        logger.info("re-planned after a failed attempt: %s", plan.summary)
    else:
        passwords = (
            _declared_passwords(settings) if request.action == "reconcile"
            else ({request.username: _single_password(settings, request)[0]}
                  if request.action in ("create", "set-password") else {})
        )
    applied = Applied(plan=plan)
    with ctx.client() as client:
        index = mu.ResourceIndex(client)
        for action in plan.actions:
            done = mu.apply_action(client, action, passwords, index)
            logger.info("applied: %s", done)
            applied.done.append(done)
    return applied


@stage_task("users-verify", retries=2, retry_delay_seconds=[3, 5])
def verify_stage(settings: EnvironmentSettings, request: UsersRequest, applied: Applied) -> str:
    ctx = _context(settings)
    logger = get_run_logger()
    if request.action == "rotate-admin-password":
        assert applied.rotated is not None
        old, new = applied.rotated
        if mu.login_status(ctx.endpoint, ctx.admin, new) != 200:
            raise AuthError(f"the new password of {ctx.admin!r} does not log in")
        if not _same(ctx.target.admin_password(), new):
            raise PermanentError(f"{ctx.target.admin_password_store()} does not hold the new admin password")
        block = admin_password_reference(settings)
        if block is not None and not _same(_read_block(block), new):
            raise PermanentError(f"Prefect Secret block {block!r} does not hold the new admin password")
        if old is None or _same(old, new):
            return "new admin password logs in and every store holds it"
        ttl = settings.mlflow.auth_cache_ttl_seconds
        took = mu.wait_login_refused(ctx.endpoint, ctx.admin, old, within=ttl + 15, probes=2 * settings.mlflow.workers + 2)
        logger.info("old admin password refused by every probe after %.1fs (auth cache ttl %ss)", took, ttl)
        return f"new admin password logs in, every store holds it, the old one is refused ({took:.0f}s)"
    if applied.done:
        again, _ = _plan(ctx, request)
        if again.actions:
            raise PermanentError(
                "the server still differs after apply: " + "; ".join(a.describe() for a in again.actions)
            )
        message = f"re-plan after apply: no changes ({len(applied.done)} applied)"
    else:
        message = "nothing was applied: the server already matched"
    if request.action == "reconcile":
        _record_managed(settings.name, applied.plan.managed_resources)
        logger.info("managed resources recorded: %d", len(applied.plan.managed_resources))
    return message


@stage_task("users-report")
def report_stage(
    settings: EnvironmentSettings, request: UsersRequest, plan: mu.Plan | None, applied: Applied | None,
    ok: bool, error: str | None,
) -> str:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact
    from prefect.events import emit_event

    env = settings.name
    outcome = "succeeded" if ok else "failed"
    mode = "dry run" if request.dry_run else "apply"
    plan = applied.plan if applied else plan  # a retried apply re-plans: report what it executed
    rows = plan.rows() if plan else []
    done = applied.done if applied else []
    for i, row in enumerate(rows):
        row["status"] = "planned" if request.dry_run else ("done" if i < len(done) else "not done")
    lines = [
        f"# MLflow users `{env}`: {request.action} ({mode}) {outcome}",
        "",
        f"- finished: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}",
        f"- plan: {plan.summary if plan else 'not made'}",
    ]
    if request.action != "reconcile" and request.username:
        lines.append(f"- user: `{request.username}`")
    if error:
        lines += ["", f"**Error:** {redact(error)[:1000]}"]
    if rows:
        lines += ["", "| step | action | user | detail | status |", "|---|---|---|---|---|"]
        for r in rows:
            detail = r["detail"].replace("|", "\\|")
            lines.append(f"| {r['step']} | {r['action']} | {r['user']} | {detail} | {r['status']} |")
    elif plan:
        lines += ["", "No changes: the server matches."]
    if plan and plan.notes:
        lines += ["", "Notes:", *(f"- {n}" for n in plan.notes)]
    lines += ["", "| stage | status | message |", "|---|---|---|"]
    for rec in ledger().records():
        if rec.name != "users-report":
            lines.append(f"| {rec.name} | {rec.status} | {redact(rec.message)[:200].replace('|', '/')} |")
    markdown = redact("\n".join(lines))
    create_markdown_artifact(key=f"mlflow-users-{env}-report", markdown=markdown, description=f"mlflow-users report for {env}")
    create_table_artifact(
        key=f"mlflow-users-{env}-plan",
        table=[{k: redact(str(v)) for k, v in r.items()} for r in rows] or [{"step": "", "action": "none", "user": "", "detail": "no changes", "status": ""}],
        description=f"mlflow-users plan for {env} ({request.action}, {mode})",
    )
    emit_event(
        event=f"mlflow.users.{outcome}",
        resource={"prefect.resource.id": f"mlflow-rollout.environment.{env}", "prefect.resource.name": env},
        payload={"environment": env, "action": request.action, "dry_run": request.dry_run, "changes": len(rows)},
    )
    return f"report published ({outcome}), event mlflow.users.{outcome}"


# ------------------------------------------------------------------------ flow
@flow(name="mlflow-users", log_prints=False, validate_parameters=True)
def users(request: UsersRequest = UsersRequest()) -> dict[str, Any]:
    """Reconcile the declared MLflow users (or run one single action) for ``request.environment``."""
    install_log_redaction()
    led = ledger()
    led.plan(STAGES)
    settings = load_environment(request.environment)
    request.check(settings)
    plan: mu.Plan | None = None
    applied: Applied | None = None
    error: BaseException | None = None
    try:
        plan = plan_stage(settings, request)
        if request.dry_run:
            for name in ("users-apply", "users-verify"):
                led.update(name, status="skipped", message="dry run: nothing changed")
        elif request.action == "rotate-admin-password":
            # The admin password is what a rollout bootstraps and verifies: not at the same time.
            with operation_lock(settings, get_target(settings), operation="admin password rotation"):
                applied = apply_stage(settings, request, plan)
                verify_stage(settings, request, applied)
        else:
            applied = apply_stage(settings, request, plan)
            verify_stage(settings, request, applied)
    except BaseException as exc:
        error = exc
    led.skip_pending("not reached", keep="users-report")
    report_stage(settings, request, plan, applied, ok=error is None, error=redact(str(error)) if error else None)
    if error is not None:
        raise error
    return {
        "environment": settings.name,
        "action": request.action,
        "dry_run": request.dry_run,
        "plan": [a.row() for a in plan.actions] if plan else [],
        "notes": list(plan.notes) if plan else [],
        "applied": list(applied.done) if applied else [],
        "changed": bool(applied and applied.done),
        "flow_run_id": str(flow_run.id) if flow_run.id else None,
    }


#: The name prefect.yaml's entrypoint uses (``flows/users.py:mlflow_users``).
mlflow_users = users


if __name__ == "__main__":
    users()
