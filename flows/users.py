"""Flow ``mlflow-users``: users, admin flags and permissions, declared or one at a time.

``reconcile`` (the default) makes the server match ``users:`` in the
environment file: it plans typed actions, shows them as a table artifact,
applies them and re-plans to prove nothing is left (a second run plans
nothing). ``dry_run`` stops after the plan. Single actions (``create``,
``delete``, ``set-password``, ``grant``, ``revoke``) go through the same
plan → apply → verify stages; ``rotate-admin-password`` changes the bootstrap
admin's password with the update-password API and then the stored secret.

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
import os
import secrets as _stdlib_secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run, task_run
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from mlflow_rollout.errors import AuthError, BadInputError, PermanentError, TransientError
from mlflow_rollout.locks import operation_lock
from mlflow_rollout.redact import install_log_redaction, redact, register_secret
from mlflow_rollout.secrets import read_private, resolve_secret, write_private
from mlflow_rollout.settings import EnvironmentSettings, SecretRef, UserDeclaration, load_environment
from mlflow_rollout.stages import ledger, stage_task
from targets import get_target
from targets.base import Endpoint
from tasks import mlflow_users as mu

__all__ = ["users", "mlflow_users", "UsersRequest", "STAGES", "admin_password_stores", "parse_password_secret"]

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
        mu.check_password(value, f"{label} ({u.password.describe()})")
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
    mu.check_password(value, label)
    return value, ref.describe()


def admin_password_stores(settings: EnvironmentSettings, target: Any) -> tuple[Path | None, str | None]:
    """Where the admin password is stored: (the target's secret file, a Prefect Secret block name).

    Raises BadInputError when the environment takes it from an environment
    variable: this flow cannot change that variable at its source.
    """
    ref = settings.secrets.admin_password
    if ref.env:
        raise BadInputError(
            f"secrets.admin_password comes from the environment variable {ref.env}: rotate-admin-password "
            "cannot change it at its source (the next rollout would put the old value back). Change the password "
            "with the update-password API and the variable together, or point secrets.admin_password at a Prefect "
            "Secret block (prefect_secret) or 'generate: true'"
        )
    file = target.admin_password_file() if hasattr(target, "admin_password_file") else None
    return file, ref.prefect_secret


def _admin_password(settings: EnvironmentSettings, target: Any) -> SecretStr:
    """The admin password from the target's secret store (local: ``<state>/secrets/admin-password``)."""
    file = target.admin_password_file() if hasattr(target, "admin_password_file") else None
    if file is not None:
        if not file.is_file():
            raise PermanentError(
                f"no admin password in {file.parent}: environment {settings.name!r} has not been rolled out yet"
            )
        return SecretStr(read_private(file))
    if callable(getattr(target, "admin_password", None)):  # a target that keeps it elsewhere (a Secret)
        return target.admin_password()
    ref = settings.secrets.admin_password
    return resolve_secret(ref, label="secrets.admin_password")


def _write_atomically(path: Path, value: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write_private(tmp, value)
    os.replace(tmp, path)


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
    target: Any
    endpoint: Endpoint
    admin: str

    def client(self, password: SecretStr | None = None) -> mu.MlflowAuthClient:
        return mu.MlflowAuthClient(self.endpoint, self.admin, password or _admin_password(self.settings, self.target))


def _context(settings: EnvironmentSettings) -> _Ctx:
    target = get_target(settings)
    return _Ctx(settings, target, target.endpoint(), settings.mlflow.admin_username)


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
        file, block = admin_password_stores(settings, ctx.target)
        with ctx.client() as client:
            me = client.current_user()
        if not me.is_admin:
            raise AuthError(f"{ctx.admin!r} is not an admin on the server")
        stores = ([f"file {file}"] if file else []) + ([f"Prefect Secret block {block!r}"] if block else [])
        if not stores:
            raise BadInputError("no store to write a new admin password to (no secret file, no Prefect Secret block)")
        source = (
            f"from {parse_password_secret(request.password_secret).describe()}" if request.password_secret
            else "generated, 32 characters"
        )
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
    rotated: tuple[SecretStr, SecretStr] | None = None

    @property
    def summary(self) -> str:
        return f"{len(self.done)} change(s) applied" if self.done else "nothing to apply"


def _rotate(ctx: _Ctx, request: UsersRequest) -> tuple[str, tuple[SecretStr, SecretStr]]:
    file, block = admin_password_stores(ctx.settings, ctx.target)
    pending = file.with_name(file.name + ".pending") if file else None
    old = _admin_password(ctx.settings, ctx.target)
    if request.password_secret:
        new = resolve_secret(parse_password_secret(request.password_secret), label="password_secret")
    elif pending is not None and pending.is_file():
        # An earlier attempt may have changed the password on the server and then failed to store it.
        new = SecretStr(read_private(pending))
    else:
        new = SecretStr(_stdlib_secrets.token_urlsafe(24))
    register_secret(new.get_secret_value())
    mu.check_password(new, "new admin password")
    if new.get_secret_value() == old.get_secret_value():
        raise BadInputError("the new admin password is the current one")
    if pending is not None:
        write_private(pending, new.get_secret_value())
    already = mu.login_status(ctx.endpoint, ctx.admin, new) == 200
    if not already:
        with ctx.client(old) as client:
            try:
                client.update_password(ctx.admin, new, current_password=old)
            except TransientError:
                if mu.login_status(ctx.endpoint, ctx.admin, new) != 200:
                    raise
    stored = []
    try:
        if file is not None:
            _write_atomically(file, new.get_secret_value())
            stored.append(f"file {file}")
        if block:
            from prefect.blocks.system import Secret

            Secret(value=new.get_secret_value()).save(block, overwrite=True)
            stored.append(f"Prefect Secret block {block!r}")
    except Exception as exc:
        where = f"; it is kept in {pending}" if pending is not None else ""
        raise PermanentError(
            f"the admin password was changed on the server but storing it failed ({type(exc).__name__}: "
            f"{redact(str(exc))[:200]}){where}. Store it by hand before the next rollout"
        ) from None
    if pending is not None:
        pending.unlink(missing_ok=True)
    return f"admin password rotated; stored in {', '.join(stored)}", (old, new)


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
        stored = _admin_password(settings, ctx.target)
        if stored.get_secret_value() != new.get_secret_value():
            raise PermanentError("the target's secret store does not hold the new admin password")
        ttl = settings.mlflow.auth_cache_ttl_seconds
        took = mu.wait_login_refused(ctx.endpoint, ctx.admin, old, within=ttl + 15, probes=2 * settings.mlflow.workers + 2)
        logger.info("old admin password refused by every probe after %.1fs (auth cache ttl %ss)", took, ttl)
        return f"new admin password logs in, the stored one is the new one, the old one is refused ({took:.0f}s)"
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
