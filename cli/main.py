"""``mlflow-rollout``: a thin command line over the same flows the deployments run.

Exit codes: 0 success, 1 a run that failed, 2 bad input (found before
anything changed), 130 interrupted by SIGINT (Ctrl-C), 143 by SIGTERM. The
``rollout`` command shows the stages live in a terminal, and one line per
finished stage when output is not a terminal.

Interrupts. SIGINT and SIGTERM become exceptions in the main thread
(``KeyboardInterrupt``, Prefect's ``TerminationSignal`` — inside a flow
Prefect's own SIGTERM bridge does the same), so the run ends the way any
failure does: the running stage is recorded as failed, the flow's ``with``
blocks release the environment's lock, the flow run ends Crashed. Only the
first signal interrupts; later ones (a second Ctrl-C, the SIGTERM Prefect
re-sends after its bridge) are noted and ignored while that cleanup runs —
except a second SIGTERM while the flow still runs, which meets Prefect's
bridge again and cuts the flow's cleanup short (still no traceback).
The last line then names the stage and the way on, and the exit code is
130/143 — no traceback.

Without ``PREFECT_API_URL`` the flows run against a temporary Prefect server
that the CLI starts itself and that cannot outlive it, also on SIGKILL
(:mod:`mlflow_rollout.prefect_server`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from prefect.exceptions import TerminationSignal

from mlflow_rollout.errors import BadInputError, RolloutError
from mlflow_rollout.prefect_server import temporary_api
from mlflow_rollout.redact import install_log_redaction, redact
from mlflow_rollout.settings import EnvironmentSettings, load_environment

from cli.arguments import FLOW_COMMANDS, parse
from cli.run_log import RunLog, quiet_third_party_warnings, run_log_path
from mlflow_rollout.stages import Ledger, StageRecord, add_listener, remove_listener

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM
#: Stages that run after a failure; never "the stage that was interrupted".
_AFTERMATH = ("diagnostics", "auto-rollback", "report")
_STYLE = {"completed": "green", "failed": "bold red", "skipped": "yellow", "running": "cyan", "pending": "dim"}


def _table(records: list[StageRecord], title: str) -> Table:
    table = Table(title=title, expand=False)
    for col in ("stage", "status", "time", "tries", "detail"):
        table.add_column(col, overflow="fold" if col == "detail" else "ellipsis")
    for r in records:
        style = _STYLE.get(r.status, "")
        table.add_row(
            r.name, f"[{style}]{r.status}[/]",
            f"{r.duration:.1f}s" if r.duration is not None else "",
            str(r.attempts or ""), redact(r.message)[:160],
        )
    return table


class _StageView:
    """Live table on a terminal; a line per finished stage elsewhere."""

    def __init__(self, console: Console, title: str):
        self.console, self.title = console, title
        self.live: Live | None = None
        self.printed: set[str] = set()
        self.lock = threading.Lock()
        self.last: list[StageRecord] = []

    def __call__(self, led: Ledger) -> None:
        records = led.records()
        with self.lock:
            self.last = records
            if self.live is not None:
                self.live.update(_table(records, self.title))
                return
            for r in records:
                if r.status in ("completed", "failed", "skipped") and r.name not in self.printed:
                    self.printed.add(r.name)
                    style = _STYLE[r.status]
                    dur = f" {r.duration:.1f}s" if r.duration is not None else ""
                    tries = f" ({r.attempts} attempts)" if r.attempts > 1 else ""
                    self.console.print(
                        f"[{style}]{r.status:>9}[/] {r.name}{dur}{tries}  {redact(r.message)[:200]}",
                        highlight=False, soft_wrap=True,
                    )

    def __enter__(self) -> "_StageView":
        if self.console.is_terminal:
            # Drawing on a run log's terminal (cli.run_log): sys.stdout/stderr are the log, never the screen.
            on_screen = self.console.file in (sys.stdout, sys.stderr)
            self.live = Live(_table([], self.title), console=self.console, refresh_per_second=4,
                             redirect_stdout=on_screen, redirect_stderr=on_screen)
            self.live.__enter__()
        add_listener(self)
        return self

    def __exit__(self, *exc: object) -> None:
        remove_listener(self)
        if self.live is not None:
            self.live.update(_table(self.last, self.title))
            self.live.__exit__(None, None, None)

    def records(self) -> list[StageRecord]:
        with self.lock:
            return list(self.last)


class _Interrupts:
    """SIGINT/SIGTERM → an exception in the main thread, once.

    The first signal raises (``KeyboardInterrupt`` / ``TerminationSignal``)
    while ``raising`` is on; every later one, and any that arrives after the
    flow has ended (``raising`` off), is only remembered, so cleanup is never
    cut short and never prints a traceback.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.stage: str | None = None  # the stage running when our handler saw the signal
        self.raising = True
        self.view: _StageView | None = None
        self.installed = False

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (an embedding caller): leave signals alone
                return
        self.installed = True

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None or not self.raising:
            if self.signum is None:
                self.signum = signum
            return
        self.signum = signum
        if self.view is not None:  # no lock here: the main thread may hold the view's lock right now
            self.stage = next((r.name for r in list(self.view.last) if r.status == "running"), None)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise TerminationSignal(signum)

    def note(self, exc: BaseException) -> int:
        """The signal behind ``exc`` (Prefect's SIGTERM bridge may have raised it, not us)."""
        if self.signum is None:
            self.signum = getattr(exc, "signal", None) or (
                signal.SIGINT if isinstance(exc, KeyboardInterrupt) else signal.SIGTERM
            )
        return self.signum


_interrupts = _Interrupts()


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _exit_code(signum: int) -> int:
    return EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM if signum == signal.SIGTERM else 128 + signum


def _where(records: list[StageRecord], seen: str | None) -> str:
    """Where the run was when interrupted, from the ledger: "during stage X", "after stage Y", …"""
    main = [r for r in records if r.name not in _AFTERMATH]
    stage = seen or next((r.name for r in main if r.status == "failed"), None) or next(
        (r.name for r in main if r.status == "running"), None
    )
    if stage:
        return f"during stage {stage}"
    done = [r.name for r in main if r.status in ("completed", "skipped") and r.started is not None]
    return f"after stage {done[-1]}" if done else "before the first stage"


def _not_started_line(signum: int) -> str:
    """The last line of a flow command interrupted before its run began (imports, the Prefect server's start)."""
    return f"interrupted ({_signal_name(signum)}) before the run started: nothing was changed"


def _interrupted_line(signum: int, where: str, rerun: str | None, locked: bool) -> str:
    line = f"interrupted ({_signal_name(signum)}) {where}: the run was stopped"
    line += "; the lock is released" if locked else ""
    return line + (f"; run `{rerun}` again to finish" if rerun else "")


def _run_flow(
    console: Console, title: str, call: Callable[[], Any], *, rerun: str | None = None, locked: bool = False,
    log: Path | None = None,
) -> tuple[int, Any]:
    """Run a flow with the live stage view; its exit code and result.

    For the final line of an interrupted run: ``rerun`` is the command it
    suggests, ``locked`` says the flow holds the environment's lock (released
    by its ``with`` block on the way out). ``log``: in a terminal (and without
    ``--verbose``) everything but the stage view goes to this file
    (:mod:`cli.run_log`); its path is printed just before the final line.
    """
    redirect = RunLog.redirect(log) if log is not None else contextlib.nullcontext()
    with redirect as run_log:
        shown = console if run_log is None else Console(
            file=run_log.terminal, width=console.width, force_terminal=True, color_system=console.color_system,
        )
        code, result, final = _run_flow_quietly(shown, title, call, rerun=rerun, locked=locked)
    if run_log is not None:
        console.print(f"[dim]full log: {run_log.path}[/]", highlight=False, soft_wrap=True)
    if final:
        console.print(final, highlight=False, soft_wrap=True)
    return code, result


def _run_flow_quietly(
    console: Console, title: str, call: Callable[[], Any], *, rerun: str | None, locked: bool,
) -> tuple[int, Any, str | None]:
    """:func:`_run_flow` without the output plumbing: (exit code, result, final line to print)."""
    view = _StageView(console, title)
    try:
        _interrupts.view = view
        try:
            with temporary_api():
                try:
                    with view:
                        return EXIT_OK, call(), None
                finally:
                    _interrupts.raising = False  # from here on: cleanup, never cut short
        finally:
            _interrupts.view = None
    except BadInputError as exc:
        return EXIT_BAD_INPUT, None, f"[bold red]bad input:[/] {redact(str(exc))}"
    except (KeyboardInterrupt, TerminationSignal) as exc:
        signum = _interrupts.note(exc)
        records = view.records()
        if not records:  # the flow never began: the temporary Prefect server was still starting
            return _exit_code(signum), None, _not_started_line(signum)
        return _exit_code(signum), None, _interrupted_line(signum, _where(records, _interrupts.stage), rerun, locked)
    except Exception as exc:
        return EXIT_FAILED, None, f"[bold red]failed:[/] {redact(str(exc)) or type(exc).__name__}"


def _log_for(args: argparse.Namespace, console: Console, settings: EnvironmentSettings) -> Path | None:
    """The run log of a flow command when its output is kept off the terminal (a terminal, no --verbose)."""
    if getattr(args, "verbose", False) or not console.is_terminal:
        return None
    import tempfile

    from targets.local import state_dir_for

    path = run_log_path(state_dir_for(settings), args.command)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only state directory: the run reports that itself; its log goes to /tmp
        path = run_log_path(Path(tempfile.gettempdir()) / "mlflow-rollout" / settings.name, args.command)
    return path


def _preload_mlflow() -> None:
    """Import MLflow's store and auth app in a thread now, while the temporary Prefect server starts (~3 s the
    deploy and admin-bootstrap stages would otherwise spend on it; see :func:`tasks.mlflow_db.preload`)."""
    from tasks import mlflow_db

    threading.Thread(target=mlflow_db.preload, name="preload-mlflow", daemon=True).start()


def _cmd_rollout(args: argparse.Namespace, console: Console) -> int:
    settings = load_environment(args.env)  # bad settings: exit 2 before Prefect starts
    from flows.rollout import rollout

    _preload_mlflow()

    code, status = _run_flow(console, f"mlflow-rollout {settings.name} ({settings.target})",
                             lambda: rollout(env=settings.name), rerun=f"mlflow-rollout rollout --env {settings.name}",
                             locked=True, log=_log_for(args, console, settings))
    if code != EXIT_OK:
        return code
    console.print(
        f"[green]MLflow is up[/] at {status['url']} (revision {status['revision']}, "
        f"auth {'on' if status['auth'] else 'off'}).",
        highlight=False,
    )
    if status.get("admin_password_file"):
        console.print(
            f"Log in as {status['admin_username']!r}; the password is in {status['admin_password_file']}; "
            f"CA bundle: {status['ca_bundle']}",
            highlight=False, soft_wrap=True,
        )
    return EXIT_OK


def _print_result(console: Console, code: int, result: Any) -> int:
    if code == EXIT_OK and isinstance(result, dict):
        console.print_json(data=result, default=str)
    return code


def _cmd_rollback(args: argparse.Namespace, console: Console) -> int:
    settings = load_environment(args.env)
    from flows.rollback import RollbackRequest, rollback

    if args.revision is not None and args.revision < 1:
        raise BadInputError(f"--revision must be a revision number (1 or more), not {args.revision}; "
                            "leave it out to go back to the previous good revision with auth on")
    try:
        request = RollbackRequest(environment=args.env, revision=args.revision, reason=args.reason)
    except ValueError as exc:
        from pydantic import ValidationError

        if isinstance(exc, ValidationError):
            raise BadInputError("rollback: " + "; ".join(
                f"--{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()
            )) from None
        raise BadInputError(f"rollback: {exc}") from None
    _preload_mlflow()
    return _print_result(console, *_run_flow(
        console, f"mlflow-rollback {args.env}", lambda: rollback(request),
        rerun=f"mlflow-rollout rollback --env {args.env}" + (f" --revision {args.revision}" if args.revision else "")
        + " --reason …", locked=True, log=_log_for(args, console, settings),
    ))


def _cmd_health(args: argparse.Namespace, console: Console) -> int:
    settings = load_environment(args.env)
    from flows.health import HealthRequest, health

    request = HealthRequest(environment=args.env, artifact_round_trip=args.artifacts)
    return _print_result(console, *_run_flow(console, f"mlflow-health {args.env}", lambda: health(request),
                                             log=_log_for(args, console, settings)))


def _cmd_status(args: argparse.Namespace, console: Console) -> int:
    from targets import get_target

    target = get_target(load_environment(args.env))
    status = target.status()
    if args.json:
        sys.stdout.write(json.dumps(status, indent=2, default=str) + "\n")
    else:
        table = Table(show_header=False)
        for k, v in status.items():
            table.add_row(k, str(v))
        console.print(table)
    return EXIT_OK


def _cmd_diagnose(args: argparse.Namespace, console: Console) -> int:
    """The runbook's troubleshooting on demand: read-only, no Prefect run; exit 1 when something is found."""
    from mlflow_rollout.diagnosis import diagnose
    from targets import get_target

    target = get_target(load_environment(args.env))
    evidence = target.evidence()
    found = diagnose(evidence)
    troubled = [p for p in evidence.pods if p.troubled]
    unexplained = (f"{len(troubled)} of {len(evidence.pods)} server process(es)/pod(s) not Ready or restarting "
                   f"({', '.join(p.name for p in troubled)}), and none of the known causes matched"
                   if troubled and not found else None)
    healthy = not found and not troubled
    if args.json:
        sys.stdout.write(json.dumps({"environment": args.env, "healthy": healthy, "revision": evidence.revision,
                                     "findings": [f.model_dump() for f in found], "unexplained": unexplained,
                                     "notes": evidence.notes}, indent=2) + "\n")
        return EXIT_OK if healthy else EXIT_FAILED
    for f in found:
        console.print(f"[bold red]{f.rule}[/]: {redact(f.cause)}", highlight=False, soft_wrap=True)
        console.print(f"  [bold]fix:[/] {redact(f.fix)}", highlight=False, soft_wrap=True)
        for e in f.evidence:
            console.print(f"  [dim]- {redact(e)}[/]", highlight=False, soft_wrap=True)
    for note in evidence.notes:
        console.print(f"[yellow]not checked[/] {redact(note)}", highlight=False, soft_wrap=True)
    if unexplained:
        console.print(f"[bold red]not healthy[/]: {redact(unexplained)}; see `mlflow-rollout status --env "
                      f"{args.env}` and the server logs", highlight=False, soft_wrap=True)
    elif healthy:
        console.print(f"[green]no known failure[/] in {args.env} (database, S3 access, configuration, "
                      "load balancer, authentication)", highlight=False, soft_wrap=True)
    return EXIT_OK if healthy else EXIT_FAILED


def _cmd_stop(args: argparse.Namespace, console: Console) -> int:
    from targets import get_target

    target = get_target(load_environment(args.env))
    console.print("stopped the MLflow server" if target.stop() else "no MLflow server was running")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    global _interrupts
    _interrupts = _Interrupts()  # main() owns this process's SIGINT/SIGTERM from here to its exit
    _interrupts.install()
    import cli

    early = cli.take_early_signal()  # one that came while this module was being imported
    if early is not None:
        _interrupts.raising = False
        print(_not_started_line(early), flush=True)
        _ignore_late_signals()
        return _exit_code(early)
    install_log_redaction()
    if not getattr(args, "verbose", False):
        quiet_third_party_warnings()
    console = Console(stderr=False)
    handlers = {
        "rollout": _cmd_rollout, "status": _cmd_status, "stop": _cmd_stop,
        "rollback": _cmd_rollback, "health": _cmd_health, "diagnose": _cmd_diagnose,
    }
    try:
        return handlers[args.command](args, console)
    except BadInputError as exc:
        console.print(f"[bold red]bad input:[/] {redact(str(exc))}", highlight=False, soft_wrap=True)
        return EXIT_BAD_INPUT
    except RolloutError as exc:
        console.print(f"[bold red]error:[/] {redact(str(exc))}", highlight=False, soft_wrap=True)
        return EXIT_FAILED
    except (KeyboardInterrupt, TerminationSignal) as exc:  # outside a flow
        _interrupts.raising = False
        signum = _interrupts.note(exc)
        if args.command in FLOW_COMMANDS:  # a flow command's run catches its own: this one came before it began
            console.print(_not_started_line(signum), highlight=False, soft_wrap=True)
        else:
            console.print(f"interrupted ({_signal_name(signum)}): `{args.command}` was stopped", highlight=False,
                          soft_wrap=True)
        return _exit_code(signum)
    finally:
        _interrupts.raising = False
        _ignore_late_signals()


def _ignore_late_signals() -> None:
    """What is left (exit handlers, interpreter shutdown) is never cut short by a late signal.

    At shutdown CPython puts every signal with a Python handler back to
    ``SIG_DFL``; a second Ctrl-C landing then would kill the process by the
    signal (exit -2) after the final line was printed. Ignoring both signals
    for the last few milliseconds keeps the exit code the one announced.
    """
    if _interrupts.installed:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


if __name__ == "__main__":
    raise SystemExit(main())
