"""The ``mlflow-rollout`` command: the top of the house.

It sits above ``flows/`` (which it runs) and never below it, so the ground
package ``mlflow_rollout`` imports nothing upward. See :mod:`cli.main`.

:func:`main` is the entry point. It decides what must be settled before
Prefect is imported (Prefect builds its console log handler at import): in a
terminal without ``--verbose`` the logs go to the run's log file
(:mod:`cli.run_log`), where colour codes would only be noise; without
``PREFECT_API_URL`` (the CLI's own temporary server, analytics off) Prefect's
client telemetry is off too (``DO_NOT_TRACK=1`` unless set), so a first run
on a fresh machine shows no telemetry notice.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if sys.stdout.isatty() and not {"-v", "--verbose"} & set(args):
        os.environ.setdefault("PREFECT_LOGGING_COLORS", "false")
    if not os.environ.get("PREFECT_API_URL"):
        # Self-contained: the run's temporary Prefect server has analytics off (mlflow_rollout.prefect_server),
        # and the SDK's client side follows it — no first-run telemetry notice on the screen, no usage event.
        # DO_NOT_TRACK=0 in the environment keeps Prefect's default.
        os.environ.setdefault("DO_NOT_TRACK", "1")
    from cli.main import main as run

    return run(argv)
