"""The ``mlflow-rollout`` command: the top of the house.

It sits above ``flows/`` (which it runs) and never below it, so the ground
package ``mlflow_rollout`` imports nothing upward. See :mod:`cli.main`.

:func:`main` is the console script; :func:`run` does the work and returns the
exit code. Before Prefect is imported, ``run`` settles what Prefect reads at
import: in a terminal without ``--verbose`` the logs go to the run's log file
(:mod:`cli.run_log`), where colour codes would only be noise; without
``PREFECT_API_URL`` (the CLI's own temporary server, analytics off) Prefect's
client telemetry is off too (``DO_NOT_TRACK=1`` unless set), so a first run
on a fresh machine shows no telemetry notice.

Start time (issue 12). For a flow command (``rollout``, ``rollback``,
``health``) whose environment file is valid, the temporary Prefect server is
started first (:func:`mlflow_rollout.prefect_server.start_early`), so its
3–4 s start overlaps this process's own imports of Prefect, MLflow and the
flows. And :func:`main` leaves without the interpreter's teardown of those
few thousand modules (0.5–2 s): by the time :func:`run` returns every
cleanup of the run has happened (lock released, server stopped, logs and
events sent); the exit handlers still run, the streams are flushed, then
``os._exit``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import NoReturn

__all__ = ["main", "run"]


def run(argv: Sequence[str] | None = None) -> int:
    """Run one ``mlflow-rollout`` command; its exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if sys.stdout.isatty() and not {"-v", "--verbose"} & set(args):
        os.environ.setdefault("PREFECT_LOGGING_COLORS", "false")
    if not os.environ.get("PREFECT_API_URL"):
        # Self-contained: the run's temporary Prefect server has analytics off (mlflow_rollout.prefect_server),
        # and the SDK's client side follows it — no first-run telemetry notice on the screen, no usage event.
        # DO_NOT_TRACK=0 in the environment keeps Prefect's default.
        os.environ.setdefault("DO_NOT_TRACK", "1")
    from mlflow_rollout import prefect_server

    _note_signals()  # until cli.main.main() installs its own handling, which then asks for what came meanwhile
    try:
        if _needs_prefect_api(args):
            prefect_server.start_early()
        from cli.main import main as run_command

        return run_command(args)
    finally:
        prefect_server.stop_early()  # one the command never took over (bad input, an early interrupt)


_early_signal: int | None = None


def _note_early(signum: int, frame: object) -> None:
    global _early_signal
    _early_signal = _early_signal or signum


def _note_signals() -> None:
    """SIGINT/SIGTERM while the heavy imports run are noted, not raised: an exception raised inside some
    library's import can be swallowed by its ``except:``; :func:`take_early_signal` hands them over."""
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _note_early)


def take_early_signal() -> int | None:
    """The first SIGINT/SIGTERM that came before :mod:`cli.main` handled signals itself (and forget it)."""
    global _early_signal
    signum, _early_signal = _early_signal, None
    return signum


def _needs_prefect_api(args: list[str]) -> bool:
    """A flow command with a valid environment file: worth starting the Prefect server for, now."""
    if os.environ.get("PREFECT_API_URL") or {"-h", "--help"} & set(args):
        return False
    from cli.arguments import FLOW_COMMANDS, parse
    from mlflow_rollout.errors import BadInputError
    from mlflow_rollout.settings import load_environment

    try:
        parsed = parse(args)
    except SystemExit:  # a usage error: cli.main reports it
        return False
    if parsed.command not in FLOW_COMMANDS:
        return False
    try:
        load_environment(parsed.env)
    except BadInputError:  # reported by the command before anything starts
        return False
    return True


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The console script (and ``python -m cli``): :func:`run`, then leave at once (see the module docstring)."""
    code = run(argv)
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)  # a thread still at work: the usual exit, which waits for it
    import atexit

    atexit._run_exitfuncs()  # Prefect's drains (with a remote API), logging.shutdown, …
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
