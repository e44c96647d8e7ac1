"""mlflow-rollout: roll out and operate an authenticated MLflow tracking server.

Layout (DESIGN.md §3):

- ``flows/``   the procedures (rollout, later health/rollback/users); they decide.
- ``tasks/``   one module per outside system; thin, typed, each with its retry policy.
- ``targets/`` where MLflow runs: ``local`` (processes on this machine) and,
  later, ``kubernetes`` (helm + the Kubernetes API), behind one interface.
- ``mlflow_rollout/`` what everything shares: settings, errors, secrets, the CLI.
"""

__version__ = "0.1.0"
