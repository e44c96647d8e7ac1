"""Value types shared by every layer (tasks, targets, flows, the CLI).

They live in the ground package so that ``tasks/`` and ``mlflow_rollout/``
never import ``targets/`` to name them: a task that reads pod logs returns
:class:`LogSource`, the report task lists :class:`Revision` — neither needs
to know which target made them.
"""

from __future__ import annotations

import datetime as dt
import os
import socket

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from mlflow_rollout.server_spec import ServerSpec

__all__ = ["LockHolder", "Revision", "DeployResult", "Endpoint", "LogSource", "ProcessState"]


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


class Revision(BaseModel):
    """One deploy: a number, the spec it ran, and what became of it."""

    number: int
    spec: ServerSpec
    created_at: dt.datetime
    #: ``interrupted``: a deploy whose runner died before it could say how it ended.
    status: Literal["deployed", "superseded", "failed", "pending", "interrupted"]
    description: str = ""

    @property
    def bootstrap(self) -> bool:
        """The first install's auth-off revision: never a rollback target (DESIGN §4.18)."""
        return not self.spec.auth


class DeployResult(BaseModel):
    revision: int
    #: False when the running server already matched the spec (a re-run).
    changed: bool
    detail: str


class Endpoint(BaseModel):
    """How the runner reaches the server."""

    model_config = ConfigDict(frozen=True)

    url: str
    #: CA bundle that verifies the server's certificate; None: system trust store.
    ca_bundle: Path | None = None
    #: Connect to this address instead of resolving the URL's host (e.g. the
    #: address the configured DNS resolvers gave); TLS still verifies the
    #: URL's host name (SNI) and the Host header carries it.
    connect_address: str | None = None


class LogSource(BaseModel):
    """Server output since a mark, one per process (or pod)."""

    name: str
    #: Text logged since the mark (for error scanning).
    text: str
    #: Text logged since this process started (for startup messages).
    since_start: str
    restarts: int = 0


class ProcessState(BaseModel):
    name: str
    ready: bool
    restarts: int = 0
    detail: str = ""
