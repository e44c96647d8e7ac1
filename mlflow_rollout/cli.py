"""``mlflow-rollout``: a thin command line over the same flows the deployments run.

Exit codes: 0 success, 1 a run that failed, 2 bad input (found before
anything changed). The ``rollout`` command shows the stages live in a
terminal, and one line per finished stage when output is not a terminal.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from mlflow_rollout.errors import BadInputError, RolloutError
from mlflow_rollout.redact import install_log_redaction, redact
from mlflow_rollout.settings import load_environment
from mlflow_rollout.stages import Ledger, StageRecord, add_listener, remove_listener

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
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
            self.live = Live(_table([], self.title), console=self.console, refresh_per_second=4)
            self.live.__enter__()
        add_listener(self)
        return self

    def __exit__(self, *exc: object) -> None:
        remove_listener(self)
        if self.live is not None:
            self.live.update(_table(self.last, self.title))
            self.live.__exit__(None, None, None)


def _run_flow(console: Console, title: str, call: Callable[[], Any]) -> tuple[int, Any]:
    """Run a flow with the live stage view; its exit code and result."""
    try:
        with _StageView(console, title):
            return EXIT_OK, call()
    except BadInputError as exc:
        console.print(f"[bold red]bad input:[/] {redact(str(exc))}", highlight=False, soft_wrap=True)
        return EXIT_BAD_INPUT, None
    except Exception as exc:
        console.print(f"[bold red]failed:[/] {redact(str(exc)) or type(exc).__name__}", highlight=False, soft_wrap=True)
        return EXIT_FAILED, None


def _cmd_rollout(args: argparse.Namespace, console: Console) -> int:
    settings = load_environment(args.env)  # bad settings: exit 2 before Prefect starts
    from flows.rollout import rollout

    code, status = _run_flow(console, f"mlflow-rollout {settings.name} ({settings.target})",
                             lambda: rollout(env=settings.name))
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
    load_environment(args.env)
    from flows.rollback import RollbackRequest, rollback

    try:
        request = RollbackRequest(environment=args.env, revision=args.revision, reason=args.reason)
    except ValueError as exc:
        raise BadInputError(f"rollback: {exc}") from None
    return _print_result(console, *_run_flow(console, f"mlflow-rollback {args.env}", lambda: rollback(request)))


def _cmd_health(args: argparse.Namespace, console: Console) -> int:
    load_environment(args.env)
    from flows.health import HealthRequest, health

    request = HealthRequest(environment=args.env, artifact_round_trip=args.artifacts)
    return _print_result(console, *_run_flow(console, f"mlflow-health {args.env}", lambda: health(request)))


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


def _cmd_stop(args: argparse.Namespace, console: Console) -> int:
    from targets import get_target

    target = get_target(load_environment(args.env))
    stop = getattr(target, "stop", None)
    if stop is None:
        raise BadInputError(f"'stop' is only for the local target; {args.env!r} is {target.name!r}")
    console.print("stopped the MLflow server" if stop() else "no MLflow server was running")
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlflow-rollout", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command")
    r = sub.add_parser("rollout", help="run the staged rollout")
    r.add_argument("--env", default="local", help="environment name (environments/<env>.yaml), default local")
    s = sub.add_parser("status", help="show what runs now")
    s.add_argument("--env", default="local")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    st = sub.add_parser("stop", help="stop the local MLflow server")
    st.add_argument("--env", default="local")
    rb = sub.add_parser("rollback", help="roll back to an earlier revision (default: the previous good one)")
    rb.add_argument("--env", default="local")
    rb.add_argument("--revision", type=int, default=None)
    rb.add_argument("--reason", required=True, help="why (kept in the history and the report)")
    h = sub.add_parser("health", help="one health pass (exit 1 when degraded)")
    h.add_argument("--env", default="local")
    h.add_argument("--artifacts", action="store_true", help="also do an artifact round trip")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:  # the default: a full local rollout
        args = parser.parse_args(["rollout", *(argv or [])])
    install_log_redaction()
    console = Console(stderr=False)
    handlers = {
        "rollout": _cmd_rollout, "status": _cmd_status, "stop": _cmd_stop,
        "rollback": _cmd_rollback, "health": _cmd_health,
    }
    try:
        return handlers[args.command](args, console)
    except BadInputError as exc:
        console.print(f"[bold red]bad input:[/] {redact(str(exc))}", highlight=False, soft_wrap=True)
        return EXIT_BAD_INPUT
    except RolloutError as exc:
        console.print(f"[bold red]error:[/] {redact(str(exc))}", highlight=False, soft_wrap=True)
        return EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
