"""Thin, typed wrappers over one outside system each (terraform, helm, kube, aws, mlflow auth, ...).

No Prefect decorators here: the flows wrap these functions in tasks with their own
retry policies, so the same code is callable (and testable) without a Prefect server.
"""
