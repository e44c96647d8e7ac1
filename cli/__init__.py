"""The ``mlflow-rollout`` command: the top of the house.

It sits above ``flows/`` (which it runs) and never below it, so the ground
package ``mlflow_rollout`` imports nothing upward. See :mod:`cli.main`.

:func:`main` is the entry point. It decides what must be settled before
Prefect is imported (Prefect builds its console log handler at import): in a
terminal without ``--verbose`` the logs go to the run's log file
(:mod:`cli.run_log`), where colour codes would only be noise.
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
    from cli.main import main as run

    return run(argv)
