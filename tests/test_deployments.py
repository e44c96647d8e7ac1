"""The deployments in prefect.yaml, run the way users run them.

A real Prefect server (the session's test server), ``prefect deploy`` of the
local deployments, a real ``process`` worker, and ``prefect deployment run
… --watch`` for the rollout, a health pass, a rollback to a given revision and
a users reconcile. What the runs did is checked on the server they deployed.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.rollout import ROOT, Sandbox, prefect_worker

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
POOL = "local-process"


def _prefect(box: Sandbox, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "prefect"), "--no-prompt", *args], cwd=ROOT, env=box.env(),
        capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory, prefect_api: str):
    """Deploy the local deployments and start a process worker against the test server."""
    box = Sandbox(tmp_path_factory.mktemp("deployments"), prefect_api)
    box.extra_env["PREFECT_WORKER_QUERY_SECONDS"] = "2"
    box.extra_env["BOB_PW"] = "bob-password-12345"
    box.write_environment("local", {
        "users": [{
            "username": "bob", "password": {"env": "BOB_PW"},
            "permissions": [{"resource_type": "experiment", "resource": "team-exp", "permission": "EDIT"}],
        }],
    })
    r = _prefect(box, "work-pool", "create", POOL, "--type", "process", "--overwrite")
    assert r.returncode == 0, r.stdout + r.stderr
    names = [f"{flow}/local" for flow in ("mlflow-rollout", "mlflow-health", "mlflow-rollback", "mlflow-users")]
    r = _prefect(box, "deploy", *[a for n in names for a in ("-n", n)])
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    try:
        with prefect_worker(box, POOL, "process", box.root / "worker.log"):
            yield box
    finally:
        box.stop("local")


def _run(box: Sandbox, deployment: str, params: dict | None = None) -> str:
    args = ["deployment", "run", deployment, "--watch", "--watch-timeout", "800"]
    if params is not None:
        args += ["--params", json.dumps(params)]
    r = _prefect(box, *args)
    out = r.stdout + r.stderr
    worker_log = (box.root / "worker.log").read_text()[-4000:]
    assert r.returncode == 0, f"{out[-4000:]}\n--- worker log ---\n{worker_log}"
    return out


def _status(box: Sandbox) -> dict:
    return box.status("local")


def test_rollout_health_rollback_users_through_a_worker(deployed: Sandbox) -> None:
    box = deployed
    # 1. the rollout deployment completes
    _run(box, "mlflow-rollout/local")
    status = _status(box)
    assert status["auth"] and status["healthy"] and status["revision"] == 2

    # 2. a health pass; its event is visible through the API
    _run(box, "mlflow-health/local")
    from prefect.settings import PREFECT_API_URL

    body = {"filter": {"event": {"name": ["mlflow.health.ok"]},
                       "resource": {"id": ["mlflow-rollout.environment.local"]}}, "limit": 10}
    deadline, events = time.monotonic() + 30, []
    while not events and time.monotonic() < deadline:
        events = httpx.post(f"{PREFECT_API_URL.value()}/events/filter", json=body, timeout=10).json()["events"]
        time.sleep(0.5)
    assert events and events[0]["payload"]["revision"] == 2

    # 3. change a setting, roll out (revision 3), then roll back to revision 2 with a parameter
    env_file = box.env_dir / "local.yaml"
    data = yaml.safe_load(env_file.read_text())
    data["mlflow"]["workers"] = 1
    env_file.write_text(yaml.safe_dump(data))
    _run(box, "mlflow-rollout/local")
    assert _status(box)["revision"] == 3
    _run(box, "mlflow-rollback/local", {"request": {"environment": "local", "revision": 2, "reason": "ci rollback"}})
    status = _status(box)
    assert status["revision"] == 4 and status["healthy"]
    revision = json.loads((Path(status["state_dir"]) / "revisions" / "0004.json").read_text())
    assert revision["spec"]["workers"] == 2 and "rollback to 2" in revision["description"]
    data["mlflow"]["workers"] = 2
    env_file.write_text(yaml.safe_dump(data))

    # 4. users: the declared user can log in with the declared permission and nothing more
    _run(box, "mlflow-users/local", {"request": {"environment": "local", "action": "reconcile"}})
    ctx = ssl.create_default_context(cafile=status["ca_bundle"])
    admin = (status["admin_username"], Path(status["admin_password_file"]).read_text())
    with httpx.Client(base_url=status["url"], verify=ctx, timeout=15) as c:
        exp = c.get("/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": "team-exp"}, auth=admin)
        assert exp.status_code == 200, exp.text
        exp_id = exp.json()["experiment"]["experiment_id"]
        other = c.post("/api/2.0/mlflow/experiments/create", json={"name": "admins-only"}, auth=admin)
        other_id = other.json()["experiment_id"]
        bob = ("bob", "bob-password-12345")
        assert c.get("/api/2.0/mlflow/users/current", auth=bob).status_code == 200
        assert c.post("/api/2.0/mlflow/runs/create", json={"experiment_id": exp_id}, auth=bob).status_code == 200
        # nothing more: not an admin, no rights to grant, and EDIT is not MANAGE
        assert c.post("/api/2.0/mlflow/users/create", json={"username": "eve", "password": "eve-password-123"},
                      auth=bob).status_code == 403
        assert c.post("/api/2.0/mlflow/experiments/delete", json={"experiment_id": exp_id}, auth=bob).status_code == 403
        assert c.get(f"/api/2.0/mlflow/experiments/get?experiment_id={other_id}", auth=("bob", "wrong-password-1")).status_code == 401


def test_production_deployments_deploy_with_their_trigger(deployed: Sandbox) -> None:
    """The cluster deployments of prefect.yaml deploy as written (kubernetes pool, job
    variables, cron schedule) and the degraded-health trigger becomes an automation."""
    box = deployed
    # prefect.yaml's build/push steps run through a recording stand-in for prefect_docker (no Docker engine).
    log = box.root / "prefect-docker.jsonl"
    box.extra_env.update({
        "MLFLOW_ROLLOUT_IMAGE_NAME": "registry.example/mlflow-rollout", "MLFLOW_ROLLOUT_IMAGE_TAG": "test",
        "PYTHONPATH": str(ROOT / "tests" / "support" / "fake_prefect_docker"),
        "FAKE_PREFECT_DOCKER_LOG": str(log),
    })
    r = _prefect(box, "work-pool", "create", "mlflow-k8s", "--type", "kubernetes", "--overwrite")
    assert r.returncode == 0, r.stdout + r.stderr
    names = ["mlflow-rollout/production", "mlflow-rollout/staging", "mlflow-health/production",
             "mlflow-rollback/production", "mlflow-users/production"]
    try:
        r = _prefect(box, "deploy", *[a for n in names for a in ("-n", n)])
    finally:
        for key in ("PYTHONPATH", "FAKE_PREFECT_DOCKER_LOG"):
            box.extra_env.pop(key)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    # The image is built from ./Dockerfile at the project root and pushed under the same name and tag.
    steps = [json.loads(line) for line in log.read_text().splitlines()]
    assert {s["step"] for s in steps} == {"build", "push"}, steps
    for s in steps:
        assert (s["image_name"], s["tag"]) == ("registry.example/mlflow-rollout", "test")
        if s["step"] == "build":
            assert s["dockerfile"] == "Dockerfile" and Path(s["cwd"]).resolve() == ROOT

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        health = client.read_deployment_by_name("mlflow-health/production")
        assert health.work_pool_name == "mlflow-k8s"
        assert health.job_variables["image"] == "registry.example/mlflow-rollout:test"
        assert health.job_variables["service_account_name"] == "mlflow-rollout-runner"
        # the Job starts in the runner image's WORKDIR (Dockerfile), where the entrypoints are
        assert health.pull_steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": "/opt/mlflow-rollout"}}]
        assert [s.schedule.cron for s in health.schedules] == ["*/5 * * * *"]
        rollback = client.read_deployment_by_name("mlflow-rollback/production")
        automations = [a for a in client.read_automations() if "production" in a.name]
    trigger = [a for a in automations if "mlflow.health.degraded" in a.trigger.expect]
    assert trigger, [a.name for a in automations]
    auto = trigger[0]
    assert auto.enabled is False and auto.trigger.threshold == 3
    assert auto.actions[0].deployment_id == rollback.id
    assert auto.actions[0].parameters["request"]["environment"] == "production"
