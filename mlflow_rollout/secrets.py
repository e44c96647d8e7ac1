"""Resolve :class:`~mlflow_rollout.settings.SecretRef` into values.

A value is read from an environment variable, a Prefect Secret block, or
(``local`` only) generated once and kept in a 0600 file. Every value is
registered with :mod:`mlflow_rollout.redact` the moment it is read, and is
handed on as :class:`pydantic.SecretStr` so a stray ``repr`` prints ``**********``.
"""

from __future__ import annotations

import os
import secrets as _stdlib_secrets
from collections.abc import Callable
from pathlib import Path

from pydantic import SecretStr

from mlflow_rollout.errors import BadInputError
from mlflow_rollout.redact import register_secret
from mlflow_rollout.settings import SecretRef

__all__ = [
    "resolve_secret",
    "MIN_PASSWORD_LENGTH",
    "LEGACY_ADMIN_PASSWORD",
    "password_problem",
    "check_password",
    "validate_admin_password",
    "write_private",
    "read_private",
    "new_secret_value",
]

#: The one password rule (DESIGN §4.2), MLflow's own: every password has at
#: least this many characters (``mlflow.utils.validation._validate_password``),
#: and an admin's is never the legacy default (MLflow refuses to bootstrap an
#: admin with it and rejects admin logins with it). The chart repeats the rule
#: in ``charts/mlflow/templates/_helpers.tpl`` (Helm cannot import it).
MIN_PASSWORD_LENGTH = 12
LEGACY_ADMIN_PASSWORD = "password1234"


def new_secret_value() -> str:
    """A fresh random secret (32 URL-safe characters)."""
    return _stdlib_secrets.token_urlsafe(24)


def write_private(path: Path, value: str) -> None:
    """Write ``value`` to ``path`` with mode 0600 from the first byte on."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value)
    os.chmod(path, 0o600)


def read_private(path: Path) -> str:
    value = path.read_text()
    register_secret(value)
    return value


def resolve_secret(ref: SecretRef, *, label: str, generated: Callable[[], str] | None = None) -> SecretStr:
    """Return the secret ``ref`` points at.

    ``label`` names the secret in errors (``secrets.admin_password``);
    ``generated`` gives a ``generate: true`` secret: the value the target's
    secret store already keeps, or a new one (the target stores it later).
    """
    if ref.env:
        value = os.environ.get(ref.env)
        if not value:
            raise BadInputError(f"{label}: environment variable {ref.env} is not set or empty")
    elif ref.prefect_secret:
        from prefect.blocks.system import Secret

        try:
            value = Secret.load(ref.prefect_secret).get()
        except ValueError as exc:
            raise BadInputError(
                f"{label}: Prefect Secret block {ref.prefect_secret!r} could not be loaded ({type(exc).__name__})"
            ) from None
        if not isinstance(value, str) or not value:
            raise BadInputError(f"{label}: Prefect Secret block {ref.prefect_secret!r} holds no string value")
    else:
        if generated is None:
            raise BadInputError(f"{label}: 'generate: true' is not supported by this target")
        value = generated()
    register_secret(value)
    return SecretStr(value)


def password_problem(value: SecretStr | str, *, admin: bool = False) -> str | None:
    """Why MLflow would refuse ``value`` as a password (``admin``: of an admin), or None.

    The reason never contains the value, only its length.
    """
    raw = value.get_secret_value() if isinstance(value, SecretStr) else value
    if len(raw) < MIN_PASSWORD_LENGTH:
        return f"too short, MLflow requires at least {MIN_PASSWORD_LENGTH} characters (got {len(raw)})"
    if admin and raw == LEGACY_ADMIN_PASSWORD:
        return "MLflow refuses its old default password for an admin"
    return None


def check_password(value: SecretStr | str, label: str, *, admin: bool = False) -> None:
    """:class:`BadInputError` naming ``label`` when :func:`password_problem` finds one."""
    problem = password_problem(value, admin=admin)
    if problem:
        raise BadInputError(f"{label}: {problem}")


def validate_admin_password(value: SecretStr, ref: SecretRef) -> None:
    """MLflow's own bootstrap rules, checked before anything is started."""
    check_password(value, f"secrets.admin_password ({ref.describe()})", admin=True)
