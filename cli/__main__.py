"""``python -m cli``: the same as the ``mlflow-rollout`` command."""

from cli import main

main()
