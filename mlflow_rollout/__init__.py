"""mlflow-rollout: roll out and operate an authenticated MLflow tracking server.

The house, from the ground up (each layer imports only the ones below it):

- ``mlflow_rollout/`` the ground: settings, errors, value types, secrets and
  redaction, the stage ledger, locks, the temporary Prefect server.
- ``tasks/``   one module per outside system (terraform, helm, kube, aws, dns,
  s3, MLflow's databases and REST API, TLS); thin, typed, no Prefect tasks.
- ``targets/`` where MLflow runs: ``local`` (processes on this machine) and
  ``kubernetes`` (helm + the Kubernetes API), behind the protocol in
  ``targets/base.py``.
- ``flows/``   the procedures that decide: rollout, rollback, health, users.
- ``cli/``     the ``mlflow-rollout`` command over the same flows.
"""

__version__ = "0.1.0"
