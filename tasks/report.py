"""The rollout report: Prefect artifacts and an event, built from the stage ledger.

Artifacts are what an operator opens in the UI after a run; the event is what
automations and the health flow key on. Neither holds a secret: they are made
from stage names, durations, the revision and the redacted messages.
"""

from __future__ import annotations

import datetime as dt

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.events import emit_event

from mlflow_rollout.redact import redact
from mlflow_rollout.settings import EnvironmentSettings
from mlflow_rollout.stages import StageRecord
from targets.base import Target

__all__ = ["publish", "stage_rows"]


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
    settings: EnvironmentSettings, target: Target, records: list[StageRecord], *, ok: bool, error: str | None
) -> str:
    """Write the markdown and table artifacts and emit ``mlflow.rollout.<outcome>``."""
    env = settings.name
    status = target.status()
    rows = [r for r in stage_rows(records) if r["stage"] != "report"]
    outcome = "succeeded" if ok else "failed"
    lines = [
        f"# MLflow rollout `{env}`: {outcome}",
        "",
        f"- target: `{settings.target}`",
        f"- url: {status.get('url')}",
        f"- revision: {status.get('revision')}",
        f"- auth: {'on' if status.get('auth') else 'off'}",
        f"- finished: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}",
    ]
    if error:
        lines += ["", f"**Error:** {redact(error)[:1000]}"]
    lines += ["", "| stage | status | duration (s) | attempts | message |", "|---|---|---|---|---|"]
    for r in rows:
        msg = str(r["message"]).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r['stage']} | {r['status']} | {r['duration_s']} | {r['attempts']} | {msg} |")
    create_markdown_artifact(
        key=f"mlflow-rollout-{env}-report", markdown="\n".join(lines),
        description=f"MLflow rollout report for {env}",
    )
    create_table_artifact(
        key=f"mlflow-rollout-{env}-stages", table=rows, description=f"MLflow rollout stages for {env}",
    )
    emit_event(
        event=f"mlflow.rollout.{outcome}",
        resource={"prefect.resource.id": f"mlflow-rollout.environment.{env}", "prefect.resource.name": env},
        payload={
            "environment": env,
            "target": settings.target,
            "url": status.get("url"),
            "revision": status.get("revision"),
            "failed_stages": [r["stage"] for r in rows if r["status"] == "failed"],
        },
    )
    return f"report published ({outcome}), event mlflow.rollout.{outcome}"
