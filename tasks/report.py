"""The rollout report: Prefect artifacts and an event, built from the stage ledger.

Artifacts are what an operator opens in the UI after a run; the event is what
automations and the health flow key on. Neither holds a secret: they are made
from stage names, durations, the revision and the redacted messages.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.events import emit_event

from mlflow_rollout.redact import redact
from mlflow_rollout.settings import EnvironmentSettings
from mlflow_rollout.stages import StageRecord
from mlflow_rollout.server_spec import ServerSpec
from mlflow_rollout.types import Revision

__all__ = ["publish", "stage_rows", "plan_artifact", "spec_diff"]


def stage_rows(records: list[StageRecord]) -> list[dict[str, str | int]]:
    rows = []
    for r in records:
        rows.append({
            "stage": r.name,
            "status": r.status,
            "duration_s": f"{r.duration:.1f}" if r.duration is not None else "",
            "attempts": r.attempts,
            "message": redact(r.message)[:300],
        })
    return rows


def publish(
    settings: EnvironmentSettings, status: Mapping[str, Any], records: list[StageRecord], *, ok: bool,
    error: str | None, operation: str = "rollout", extra: dict[str, str] | None = None,
) -> str:
    """Write the markdown and table artifacts and emit ``mlflow.<operation>.<outcome>``.

    ``status`` is what the target says now (``Target.status()``: url, revision, auth).
    """
    env = settings.name
    rows = [r for r in stage_rows(records) if r["stage"] != "report"]
    outcome = "succeeded" if ok else "failed"
    lines = [
        f"# MLflow {operation} `{env}`: {outcome}",
        "",
        f"- target: `{settings.target}`",
        f"- url: {status.get('url')}",
        f"- revision: {status.get('revision')}",
        f"- auth: {'on' if status.get('auth') else 'off'}",
        f"- finished: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}",
        *(f"- {k}: {redact(v)}" for k, v in (extra or {}).items()),
    ]
    if error:
        lines += ["", f"**Error:** {redact(error)[:1000]}"]
    lines += ["", "| stage | status | duration (s) | attempts | message |", "|---|---|---|---|---|"]
    for r in rows:
        msg = str(r["message"]).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r['stage']} | {r['status']} | {r['duration_s']} | {r['attempts']} | {msg} |")
    create_markdown_artifact(
        key=f"mlflow-{operation}-{env}-report", markdown="\n".join(lines),
        description=f"MLflow {operation} report for {env}",
    )
    create_table_artifact(
        key=f"mlflow-{operation}-{env}-stages", table=rows, description=f"MLflow {operation} stages for {env}",
    )
    emit_event(
        event=f"mlflow.{operation}.{outcome}",
        resource={"prefect.resource.id": f"mlflow-rollout.environment.{env}", "prefect.resource.name": env},
        payload={
            "environment": env,
            "target": settings.target,
            "url": status.get("url"),
            "revision": status.get("revision"),
            "failed_stages": [r["stage"] for r in rows if r["status"] == "failed"],
            **(extra or {}),
        },
    )
    return f"report published ({outcome}), event mlflow.{operation}.{outcome}"


def spec_diff(current: Revision | None, new: ServerSpec) -> list[dict[str, str]]:
    """Field-by-field differences between the deployed spec and the one to deploy."""
    old = current.spec.model_dump() if current else {}
    rows = []
    for key, value in new.model_dump().items():
        before = old.get(key, "(not deployed)") if current else "(not deployed)"
        if before != value:
            rows.append({"setting": key, "deployed": redact(str(before)), "new": redact(str(value))})
    return rows


def _code(value: object) -> str:
    """A value as inline code in a markdown table: ``*`` and ``_`` stay literal (``localhost:*``)."""
    return "`" + str(value).replace("`", "'").replace("|", "\\|") + "`"


def plan_artifact(settings: EnvironmentSettings, stages: list[str], current: Revision | None, new: ServerSpec) -> str:
    """The plan an approver reads: what will run, and what changes against the deployed revision."""
    diff = spec_diff(current, new)
    lines = [
        f"# Rollout plan for `{settings.name}` ({settings.target})",
        "",
        f"Deployed revision: {current.number if current else 'none'}",
        "",
        "Stages: " + " → ".join(f"`{s}`" for s in stages),
        "",
    ]
    if diff:
        lines += ["| setting | deployed | new |", "|---|---|---|"]
        lines += [f"| {d['setting']} | {_code(d['deployed'])} | {_code(d['new'])} |" for d in diff]
    else:
        lines.append("No setting differs from the deployed revision (the rollout re-verifies it).")
    key = f"mlflow-rollout-{settings.name}-plan"
    create_markdown_artifact(key=key, markdown="\n".join(lines), description=f"Rollout plan for {settings.name}")
    return key
