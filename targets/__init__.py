"""Where MLflow runs. ``get_target`` picks the implementation an environment names."""

from __future__ import annotations

from mlflow_rollout.settings import EnvironmentSettings
from mlflow_rollout.types import DeployResult, Endpoint, LockHolder, LogSource, ProcessState, Revision
from targets.base import Target, status_or_error

__all__ = ["get_target", "Target", "status_or_error", "LockHolder", "Revision", "DeployResult", "Endpoint", "LogSource", "ProcessState"]


def get_target(settings: EnvironmentSettings) -> Target:
    if settings.target == "local":
        from targets.local import LocalTarget

        return LocalTarget(settings)
    from targets.kubernetes import KubernetesTarget

    return KubernetesTarget(settings)
