"""The error hierarchy, split the way kopf splits it: permanent vs transient.

::

    RolloutError
    ├── PermanentError        never retried: the same call will fail again
    │   ├── BadInputError     the user's input is wrong (settings, outputs, CLI
    │   │                     arguments); found before anything changes; CLI exit 2
    │   └── AuthError         401/403 where we expected access, or no credentials
    └── TransientError        retried with backoff: 5xx, timeouts, resets, 409,
                              throttling

Which outside failure (an AWS error code, a botocore or dnspython exception,
an HTTP status) becomes which of these is decided in one place, the tables of
:mod:`mlflow_rollout.error_policy`.

Messages never contain secret values: callers build them from names and
sources, and :func:`mlflow_rollout.redact.redact` scrubs anything that slipped
in from a third-party exception.
"""

from __future__ import annotations

__all__ = [
    "RolloutError",
    "PermanentError",
    "BadInputError",
    "AuthError",
    "TransientError",
    "is_transient",
]


class RolloutError(Exception):
    """Base class of every error this project raises on purpose."""


class PermanentError(RolloutError):
    """Retrying cannot help; fail the stage at once."""


class BadInputError(PermanentError):
    """The input (settings file, Terraform outputs, CLI arguments) is wrong."""


class AuthError(PermanentError):
    """The server refused credentials we expected to work, or there are none to present."""


class TransientError(RolloutError):
    """Worth another attempt after a pause (5xx, timeout, connection reset)."""


def is_transient(exc: BaseException) -> bool:
    """Retry predicate: only our transient errors are retried, never anything else."""
    return isinstance(exc, TransientError)
