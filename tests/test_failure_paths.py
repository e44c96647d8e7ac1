"""After a failure, the run's own error is the one the operator sees (issue 11).

The rollout's after-failure path (remove the bootstrap, diagnostics, automatic
rollback) reads the target again — the very thing that may be failing. Each
of those reads is recorded in the report, never raised over the original
error. Driven with a real local target whose revision store is damaged.
"""

from __future__ import annotations

from pathlib import Path

import yaml


def _settings(tmp_path: Path):
    from mlflow_rollout.settings import load_environment

    env_dir = tmp_path / "environments"
    (env_dir / "broken").mkdir(parents=True)
    outputs = env_dir / "broken" / "terraform-outputs.json"
    outputs.write_text("{}")
    (env_dir / "broken.yaml").write_text(yaml.safe_dump({
        "target": "local",
        "terraform": {"source": "file", "path": str(outputs)},
        "local": {"state_dir": str(tmp_path / "state")},
        "secrets": {"admin_password": {"generate": True}, "flask_secret_key": {"generate": True}},
    }))
    return load_environment("broken", env_dir)


def test_unreadable_history_after_a_failed_deploy_is_reported_not_raised(prefect_api, tmp_path: Path) -> None:
    from prefect import flow

    from flows.rollout import _after_failed_deploy
    from mlflow_rollout.errors import BadInputError
    from mlflow_rollout.stages import ledger
    from targets import get_target, status_or_error

    settings = _settings(tmp_path)
    target = get_target(settings)
    target.ensure_dirs()
    damaged = target.dir / "revisions" / "0003.json"
    damaged.parent.mkdir(parents=True, exist_ok=True)
    damaged.write_text('{"number": 3, "spec": {')  # a revision file cut short by a crash
    try:
        target.history()
    except BadInputError as exc:
        assert "0003.json" in str(exc)
    else:
        raise AssertionError("a truncated revision file must make history() fail")

    @flow(name="after-failure-probe")
    def probe() -> dict[str, str]:
        ledger().plan(["deploy-auth", "diagnostics"])
        extra: dict[str, str] = {}
        _after_failed_deploy(settings, target, None, "deploy-auth", extra)
        return extra

    extra = probe()
    assert extra["auto_rollback"].startswith("not attempted: the revision history is unreadable"), extra
    assert "0003.json" in extra["auto_rollback"]
    # the report's status read fails the same way: recorded, not raised
    unavailable = status_or_error(target)
    assert list(unavailable) == ["status_unavailable"] and "0003.json" in unavailable["status_unavailable"]
