"""Value types shared by every layer (tasks, targets, flows, the CLI).

They live in the ground package so that ``tasks/`` and ``mlflow_rollout/``
never import ``targets/`` to name them.
"""

from __future__ import annotations

import datetime as dt
import os
import socket

from pydantic import BaseModel, ConfigDict

__all__ = ["LockHolder"]


class LockHolder(BaseModel):
    """Who holds (or asks for) an environment's lock: shown to whoever waits for it."""

    model_config = ConfigDict(frozen=True)

    operation: str
    flow_run_id: str | None = None
    pid: int
    host: str
    since: dt.datetime

    def describe(self) -> str:
        run = f"flow run {self.flow_run_id}" if self.flow_run_id else "a run without a flow run id"
        return f"{self.operation} ({run}, pid {self.pid} on {self.host}, since {self.since.isoformat(timespec='seconds')})"

    @classmethod
    def here(cls, operation: str, flow_run_id: str | None = None) -> "LockHolder":
        """This process, now."""
        return cls(
            operation=operation, flow_run_id=flow_run_id, pid=os.getpid(), host=socket.gethostname(),
            since=dt.datetime.now(dt.timezone.utc),
        )
