"""Keep secret values out of everything a run prints or stores.

The first line of defence is structural: secrets travel as
:class:`pydantic.SecretStr`, are never flow parameters, never argv, never
helm values. This module is the second line: every secret value resolved in
this process is registered here, and :func:`redact` replaces any occurrence
(also the URL-encoded form, which is how a password sits inside a DB URI)
with ``***``. A logging filter applies it to Prefect's run loggers and to our
own, and error messages built from third-party exceptions pass through it.
"""

from __future__ import annotations

import logging
import threading
from urllib.parse import quote, quote_plus

__all__ = ["register_secret", "redact", "RedactingFilter", "install_log_redaction"]

_lock = threading.Lock()
_secrets: set[str] = set()
#: Shorter strings are too likely to match innocent text; our secrets are >= 12.
_MIN_LEN = 6


def register_secret(value: str | None) -> None:
    """Remember ``value`` (and its URL-encoded forms) so :func:`redact` hides it."""
    if not value or len(value) < _MIN_LEN:
        return
    with _lock:
        _secrets.update({value, quote(value, safe=""), quote_plus(value)})


def redact(text: str) -> str:
    """``text`` with every registered secret replaced by ``***``."""
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for s in secrets:
        if s in text:
            text = text.replace(s, "***")
    return text


class RedactingFilter(logging.Filter):
    """Rewrites a record's message with secrets removed (never drops a record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is logging's problem, not ours
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        return True


_installed = False


def install_log_redaction() -> None:
    """Attach :class:`RedactingFilter` to the loggers that carry run output.

    Filters on a logger apply to records logged *to that logger*; Prefect's
    run loggers are ``prefect.flow_runs`` and ``prefect.task_runs`` (what
    ``get_run_logger`` returns), and ours live under ``mlflow_rollout``.
    """
    global _installed
    if _installed:
        return
    flt = RedactingFilter()
    for name in ("prefect.flow_runs", "prefect.task_runs", "prefect", "mlflow_rollout"):
        logging.getLogger(name).addFilter(flt)
    _installed = True
