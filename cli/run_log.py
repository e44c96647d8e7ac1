"""Keep a terminal clean while a flow runs: everything but the stage view goes to a run log.

In a terminal the live stage table is the only thing drawn while a rollout,
rollback or health pass runs (issue 12). Prefect's console logs, MLflow's own
output, warnings, tracebacks and the output of every child process are
written instead to one file per run, ``<state dir>/logs/<command>-<UTC time>.log``.

It works at the file-descriptor level: fds 1 and 2 are pointed at the log file
for the run (so also output that bypasses Python — a child process, a C
library, a handler that captured ``sys.stderr`` at import time — lands
there), and the CLI draws on a duplicate of the terminal's original stdout.
Everything is put back on the way out, also when the run raises.

``--verbose`` (or output that is not a terminal: a pipe, a CI log) keeps
today's behaviour: logs are shown as they come, one line per finished stage.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

__all__ = ["RunLog", "run_log_path", "quiet_third_party_warnings"]


def run_log_path(state_dir: Path, command: str) -> Path:
    """Where this run's full log goes: the environment's state directory, one file per run."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return state_dir / "logs" / f"{command}-{stamp}-{os.getpid()}.log"


def quiet_third_party_warnings() -> None:
    """Third-party deprecation warnings (Starlette via MLflow, alembic, SQLAlchemy) are not the user's business."""
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    with contextlib.suppress(ImportError):
        from sqlalchemy.exc import SADeprecationWarning

        warnings.filterwarnings("ignore", category=SADeprecationWarning)
    with contextlib.suppress(ImportError):  # a UserWarning: "starlette.middleware.wsgi is deprecated" (MLflow's auth app)
        from starlette.exceptions import StarletteDeprecationWarning

        warnings.filterwarnings("ignore", category=StarletteDeprecationWarning)


@dataclass
class RunLog:
    """Output of one run, redirected to ``path`` while it is active.

    ``terminal`` is what the CLI draws on meanwhile (the original stdout).
    """

    path: Path
    terminal: TextIO

    @classmethod
    @contextlib.contextmanager
    def redirect(cls, path: Path) -> Iterator["RunLog"]:
        path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        saved_out, saved_err = os.dup(1), os.dup(2)
        log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        terminal = os.fdopen(os.dup(saved_out), "w", buffering=1, encoding=sys.stdout.encoding or "utf-8",
                             errors="replace")
        try:
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            yield cls(path=path, terminal=terminal)
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            for fd in (saved_out, saved_err, log_fd):
                os.close(fd)
            with contextlib.suppress(Exception):
                terminal.flush()
            terminal.close()
