"""The UI path, in a real browser: Prefect's UI driven by headless Chromium (Playwright).

One real Prefect server with its UI (``prefect server start``), the local
deployments of ``prefect.yaml`` deployed to it, a ``process`` worker, and a
first rollout (revision 2) run the CLI way. Then, in the browser:

1. an environment with ``approval: required``: the paused run page shows the
   plan artifact and the typed approve/reject form; a rejection cancels the
   run with nothing changed, an approval completes it (revision 3);
2. the approved run's markdown report and stage table render on their
   artifact pages;
3. the rollback deployment's custom-run form (environment, revision, a
   required reason) starts a rollback to revision 2 that completes: the
   server runs revision 2's settings (as revision 4) with auth on.

The tests run in file order and build on each other (one MLflow server).
Every page a screenshot is taken of is checked for the admin password and the
Flask key. Screenshots: ``<pytest tmp>/ui-shots*/``, also copied to
``$MLFLOW_ROLLOUT_UI_SCREENSHOTS`` when set (``scripts/screenshots.sh``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from tests.faults.support import PROTECTED, client, kill_all, owned_pids
from tests.support.rollout import Sandbox
from tests.test_deployments import POOL, _prefect, _run
from tests.ui.browser import (
    Shots, expect_state, launch_chromium, open_deployment, open_tab, prefect_ui_server, process_worker,
    require_browser, resume_dialog, run_menu, view_new_run,
)

pytestmark = [pytest.mark.e2e, pytest.mark.ui, pytest.mark.serial]

ENV = "local"  # the deployments in prefect.yaml are the `local` ones
SECRET_FILES = ("admin-password", "flask-secret-key")


def _secrets(state_dir: Path) -> list[str]:
    """The admin password and the Flask key of the local secret store (once the rollout made them)."""
    d = state_dir / "secrets"
    return [v for v in ((d / n).read_text() for n in SECRET_FILES if (d / n).exists()) if len(v) >= 8]


@dataclass
class Stack:
    base: str
    box: Sandbox
    browser: object
    shots: Shots
    runs: dict[str, str] = field(default_factory=dict)  # what a test leaves for the next one

    @property
    def state_dir(self) -> Path:
        return self.box.state_root / ENV

    def secrets(self) -> list[str]:
        return _secrets(self.state_dir)

    def revisions(self) -> list[int]:
        return sorted(int(p.stem) for p in (self.state_dir / "revisions").glob("[0-9]*.json"))

    def revision(self, number: int) -> dict:
        return json.loads((self.state_dir / "revisions" / f"{number:04d}.json").read_text())

    def flow_run(self, run_id: str) -> dict:
        return httpx.get(f"{self.base}/api/flow_runs/{run_id}", timeout=10).json()

    def edit_env(self, **changes) -> None:
        path = self.box.env_dir / f"{ENV}.yaml"
        data = yaml.safe_load(path.read_text())
        for dotted, value in changes.items():
            *parents, key = dotted.split("__")
            node = data
            for p in parents:
                node = node.setdefault(p, {})
            node[key] = value
        path.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, postgres):
    require_browser()
    root = tmp_path_factory.mktemp("ui")
    # PostgreSQL, as a production Prefect server has: the SQLite one answered resume and create-run with
    # "database is locked" now and then under the worker's, the flow's and the UI's concurrent writes
    database = postgres.create_database(f"prefect_ui_{os.getpid()}_{int(time.time())}")
    with contextlib.ExitStack() as cleanup:
        base = cleanup.enter_context(prefect_ui_server(root / "prefect-home", database_url=database))
        box = Sandbox(root / "box", f"{base}/api")
        box.root.mkdir(exist_ok=True)
        box.extra_env["PREFECT_WORKER_QUERY_SECONDS"] = "2"
        box.write_environment(ENV, {"mlflow": {"workers": 1}})
        state_dir = box.state_root / ENV

        @cleanup.callback
        def _stop_mlflow() -> None:  # runs after the worker is gone (LIFO)
            box.stop(ENV)
            kill_all(owned_pids(state_dir))

        r = _prefect(box, "work-pool", "create", POOL, "--type", "process", "--overwrite")
        assert r.returncode == 0, r.stdout + r.stderr
        r = _prefect(box, "deploy", "-n", "mlflow-rollout/local", "-n", "mlflow-rollback/local")
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        cleanup.enter_context(process_worker(box, POOL))
        _run(box, "mlflow-rollout/local")  # the first install: revision 1 (bootstrap), revision 2 (auth on)
        assert box.status(ENV)["revision"] == 2 and _secrets(state_dir)
        browser = cleanup.enter_context(launch_chromium())
        yield Stack(base, box, browser, Shots(tmp_path_factory.mktemp("ui-shots"), lambda: _secrets(state_dir)))


@pytest.fixture
def page(stack: Stack, request: pytest.FixtureRequest):
    """A fresh browser context per test; its last page is kept as ``last-<test>.png``."""
    context = stack.browser.new_context(viewport={"width": 1400, "height": 900})
    context.set_default_timeout(30_000)
    pg = context.new_page()
    try:
        yield pg
    finally:
        with contextlib.suppress(Exception):  # never for a page showing a secret (take() refuses)
            stack.shots.take(pg, f"last-{request.node.name}")
        context.close()


def _no_secret_in_parameters(stack: Stack, run_id: str) -> None:
    params = json.dumps(stack.flow_run(run_id)["parameters"])
    assert not any(v in params for v in stack.secrets()), "a secret value is in the run's parameters"


def _paused_rollout(stack: Stack, page) -> str:
    """Deployment page → Run → Quick run → the new run's page, paused for approval."""
    open_deployment(page, stack.base, "mlflow-rollout", "local")
    run_menu(page, "Quick run")
    run_id = view_new_run(page)
    expect_state(page, "Paused", timeout=120)
    return run_id


def test_approval_plan_and_form_reject_then_approve(stack: Stack, page) -> None:
    from playwright.sync_api import expect

    stack.edit_env(approval="required", mlflow__workers=2)
    before = stack.revisions()
    secrets_dir = stack.state_dir / "secrets"
    secrets_before = {p.name: p.stat().st_mtime_ns for p in secrets_dir.iterdir()}

    # 1. a paused run shows its plan artifact: workers 1 → 2 against the deployed revision 2
    run_id = _paused_rollout(stack, page)
    plan_card = open_tab(page, "Artifacts").get_by_role("link", name=re.compile("mlflow-rollout-local-plan"))
    plan_card.click()
    plan = page.get_by_role("tabpanel", name="Artifact")
    expect(plan.get_by_role("heading", name="Rollout plan for local (local)")).to_be_visible()
    # (the raw markdown sits hidden beside the rendered one: ask for the rendered paragraph)
    expect(plan.get_by_role("paragraph").filter(has_text="Deployed revision: 2")).to_be_visible()
    expect(plan.get_by_role("row", name="workers 1 2", exact=True)).to_be_visible()
    stack.shots.take(page, "rollout-plan", full_page=True)
    page.go_back()
    expect_state(page, "Paused")

    # 2. the typed form: the switch starts off (an untouched answer rejects: the safe default); reject
    dialog = resume_dialog(page)
    approve = dialog.get_by_role("switch", name="Approve")
    expect(approve).not_to_be_checked()
    expect(dialog.get_by_text("Approve this rollout (false rejects it; nothing will have changed)")).to_be_visible()
    dialog.get_by_role("textbox", name="Comment (Optional)").fill("not today")
    stack.shots.take(page, "reject-form")
    dialog.get_by_role("button", name="Resume").click()
    expect(dialog).to_be_hidden()
    expect_state(page, "Cancelled", timeout=120)
    stack.shots.take(page, "rollout-rejected")
    run = stack.flow_run(run_id)
    assert run["state"]["type"] == "CANCELLED" and "not today" in run["state"]["message"]
    # nothing changed: no new revision, the same secret store, revision 2 still serves
    assert stack.revisions() == before
    assert {p.name: p.stat().st_mtime_ns for p in secrets_dir.iterdir()} == secrets_before
    assert stack.box.status(ENV)["revision"] == 2

    # 3. a second run: approve in the browser; it completes with a new revision
    page.goto("about:blank")
    run_id = _paused_rollout(stack, page)
    dialog = resume_dialog(page)
    dialog.get_by_role("switch", name="Approve").click()
    dialog.get_by_role("textbox", name="Comment (Optional)").fill("approved in the browser")
    stack.shots.take(page, "approval-form")
    dialog.get_by_role("button", name="Resume").click()
    expect(dialog).to_be_hidden()
    expect_state(page, "Completed", timeout=300)
    stack.shots.take(page, "rollout-approved")
    _no_secret_in_parameters(stack, run_id)
    status = stack.box.status(ENV)
    assert status["revision"] == 3 and status["auth"] is True
    assert stack.revision(3)["spec"]["workers"] == 2
    stack.runs["approved"] = run_id


def test_report_and_stage_table_artifacts_render(stack: Stack, page) -> None:
    from playwright.sync_api import expect

    run_id = stack.runs.get("approved")
    if run_id is None:
        pytest.skip("needs the approved rollout of the previous test")
    page.goto(f"{stack.base}/v2/runs/flow-run/{run_id}")
    expect_state(page, "Completed")
    panel = open_tab(page, "Artifacts")
    for key in ("plan", "report", "stages"):
        expect(panel.get_by_role("heading", name=f"mlflow-rollout-local-{key}")).to_be_visible()

    # the markdown report: heading, facts, the stage table as markdown
    panel.get_by_role("link", name=re.compile("mlflow-rollout-local-report")).click()
    report = page.get_by_role("tabpanel", name="Artifact")
    expect(report.get_by_role("heading", name="MLflow rollout local: succeeded")).to_be_visible()
    for fact in ("revision: 3", "auth: on", "target: local"):
        expect(report.get_by_role("listitem").filter(has_text=fact)).to_be_visible()
    expect(report.get_by_role("row", name=re.compile(r"^approval completed .* approved: approved in the browser$")))\
        .to_be_visible()
    expect(report.get_by_role("row", name=re.compile(r"^deploy-auth completed .*admin login verified$"))).to_be_visible()
    stack.shots.take(page, "rollout-report", full_page=True)
    page.go_back()

    # the table artifact: a real table with the ledger's columns, every stage on one page
    open_tab(page, "Artifacts").get_by_role("link", name=re.compile("mlflow-rollout-local-stages")).click()
    table = page.get_by_role("tabpanel", name="Artifact")
    for column in ("stage", "status", "duration_s", "attempts", "message"):
        expect(table.get_by_role("columnheader", name=column, exact=True)).to_be_visible()
    table.get_by_role("combobox", name="Items per page").click()
    page.get_by_role("option", name="25", exact=True).click()
    for stage, status in (("secrets", "completed"), ("deploy-no-auth", "skipped"), ("deploy-auth", "completed"),
                          ("dns", "skipped"), ("smoke-auth", "completed"), ("smoke-logging", "completed")):
        row = table.get_by_role("row").filter(has=page.get_by_role("cell", name=stage, exact=True))
        expect(row.get_by_role("cell", name=status, exact=True)).to_be_visible()
    expect(table.get_by_role("cell", name="anonymous 401, wrong password 401, admin 200")).to_be_visible()
    stack.shots.take(page, "stage-table")


def test_rollback_from_the_custom_run_form(stack: Stack, page) -> None:
    from playwright.sync_api import expect

    if len([r for r in stack.revisions() if stack.revision(r)["spec"]["auth"]]) < 2:
        pytest.skip("needs two auth-on revisions (the approved rollout of the first test)")
    open_deployment(page, stack.base, "mlflow-rollback", "local")
    run_menu(page, "Custom run")

    # the typed request: environment (default local), an optional revision, a required reason
    env_box = page.get_by_role("textbox", name="Environment (Optional)")
    expect(env_box).to_have_value("local")
    expect(page.get_by_text("Revision to go back to; empty: the previous good revision")).to_be_visible()
    expect(page.get_by_role("tab", name="None", exact=True)).to_have_attribute("aria-selected", "true")
    reason = page.get_by_role("textbox", name="Reason", exact=True)  # no "(Optional)": required
    expect(page.get_by_text("Why (kept in the revision history and the report)")).to_be_visible()
    page.get_by_role("button", name="Submit").click()
    expect(page.get_by_text("'reason' is a required property").first).to_be_visible()

    page.reload()  # a fresh form (the refused submit's error stays on the page until the next one)
    expect(reason).to_be_empty()
    page.get_by_role("textbox", name="Run Name").fill("rollback-to-2-from-the-ui")
    page.get_by_role("tab", name="int", exact=True).click()
    page.get_by_role("tabpanel", name="int").get_by_role("spinbutton").fill("2")
    reason.fill("back to revision 2 from the browser")
    stack.shots.take(page, "rollback-form")
    page.get_by_role("button", name="Submit").click()
    run_id = view_new_run(page, "rollback-to-2-from-the-ui")
    expect_state(page, "Completed", timeout=300)
    stack.shots.take(page, "rollback-completed")
    params = open_tab(page, "Parameters")
    expect(params.get_by_text("back to revision 2 from the browser")).to_be_visible()
    stack.shots.take(page, "rollback-parameters")
    assert stack.flow_run(run_id)["parameters"] == {
        "request": {"environment": "local", "revision": 2, "reason": "back to revision 2 from the browser"}
    }
    _no_secret_in_parameters(stack, run_id)

    # the server now runs revision 2's settings (as the new revision 4), with auth on
    status = stack.box.status(ENV)
    assert status["revision"] == 4 and status["auth"] is True and status["healthy"]
    rev4 = stack.revision(4)
    assert rev4["spec"] == stack.revision(2)["spec"] and "rollback to 2" in rev4["description"]
    with client(status) as c:
        assert c.get(PROTECTED).status_code == 401
