"""The ``mlflow-rollout`` command line, parsed with the standard library only.

Kept apart from :mod:`cli.main` (rich, Prefect, the flows) so that
:func:`cli.main` can read the command before anything heavy is imported and
start the temporary Prefect server of a flow command first (issue 12).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = ["FLOW_COMMANDS", "parse", "parser"]

#: Commands that run a Prefect flow (and so need a Prefect API); the others never import Prefect's client.
FLOW_COMMANDS = frozenset({"rollout", "rollback", "health"})
DESCRIPTION = "mlflow-rollout: a thin command line over the same flows the deployments run."


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlflow-rollout", description=DESCRIPTION)
    sub = p.add_subparsers(dest="command")
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true",
                         help="show Prefect's and MLflow's logs as they come (in a terminal they go to the run log)")
    r = sub.add_parser("rollout", help="run the staged rollout", parents=[verbose])
    r.add_argument("--env", default="local", help="environment name (environments/<env>.yaml), default local")
    s = sub.add_parser("status", help="show what runs now")
    s.add_argument("--env", default="local")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    st = sub.add_parser("stop", help="stop the local MLflow server")
    st.add_argument("--env", default="local")
    rb = sub.add_parser("rollback", help="roll back to an earlier revision (default: the previous good one)",
                        parents=[verbose])
    rb.add_argument("--env", default="local")
    rb.add_argument("--revision", type=int, default=None)
    rb.add_argument("--reason", required=True, help="why (kept in the history and the report)")
    h = sub.add_parser("health", help="one health pass (exit 1 when degraded)", parents=[verbose])
    h.add_argument("--env", default="local")
    h.add_argument("--artifacts", action="store_true", help="also do an artifact round trip")
    d = sub.add_parser("diagnose", help="name what is wrong, as the runbook's troubleshooting would (read-only; "
                                         "exit 1 with findings)")
    d.add_argument("--env", default="local")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv``; no command means a full ``rollout`` (of ``local``). Exits 2 on a usage error."""
    p = parser()
    args = p.parse_args(argv)
    if args.command is None:  # the default: a full local rollout
        args = p.parse_args(["rollout", *argv])
    return args
