"""``python -m cli``: the same as the ``mlflow-rollout`` command."""

from cli.main import main

raise SystemExit(main())
