"""A real Prefect server with its UI, a headless Chromium driven by Playwright, and screenshots.

- :func:`require_browser` skips (or, in CI as root, fails) when Playwright or
  Debian's Chromium is missing: ``scripts/setup.sh`` installs both; the
  browser is never downloaded (no ``playwright install``).
- :func:`prefect_ui_server` runs ``prefect server start`` with the UI on a free
  loopback port and its own ``PREFECT_HOME`` (its own database), and stops the
  whole process group when the ``with`` block ends, also on failure.
- :func:`process_worker` runs a ``process`` worker for the deployments.
- :class:`Shots` saves named screenshots under the pytest tmp dir (and copies
  them to ``$MLFLOW_ROLLOUT_UI_SCREENSHOTS`` when set), after checking that no
  secret is in the page.
- The rest are the few UI moves the tests repeat (Prefect's default V2 UI,
  served under ``/v2``), by role, label and text.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest

from tests.support.rollout import Sandbox
from tests.support.services import free_port

__all__ = [
    "CHROMIUM", "CHROMIUM_ARGS", "SCREENSHOTS_ENV", "require_browser", "prefect_ui_server", "process_worker",
    "launch_chromium", "Shots", "open_deployment", "run_menu", "view_new_run", "expect_state", "open_tab",
    "resume_dialog",
]

BIN = Path(sys.executable).parent
#: Debian's Chromium (``apt-get install chromium``); override with MLFLOW_ROLLOUT_CHROMIUM.
CHROMIUM = os.environ.get("MLFLOW_ROLLOUT_CHROMIUM", "/usr/bin/chromium")
#: Headless as root on a closed network: without the background-networking flags Chromium
#: keeps calling out (updates, sync, QUIC). Playwright adds --headless and a fresh profile.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
#: When set, every named screenshot is also copied into this directory (scripts/screenshots.sh).
SCREENSHOTS_ENV = "MLFLOW_ROLLOUT_UI_SCREENSHOTS"
UI = "/v2"  # Prefect 3.9's default UI


def require_browser() -> None:
    """Skip with the reason when Playwright or Chromium is missing; in CI (as root) that is a failure."""
    problem = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problem = "the Python package playwright is not installed (pip install -e '.[test]')"
    if problem is None and not os.access(CHROMIUM, os.X_OK):
        problem = f"{CHROMIUM} is missing (scripts/setup.sh installs Debian's chromium when run as root)"
    if problem is None:
        return
    if os.environ.get("CI") and os.geteuid() == 0:
        pytest.fail(f"Prefect UI tests cannot run in CI: {problem}")
    pytest.skip(f"Prefect UI tests need a browser: {problem}")


def _log_tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def _stop_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the process group, SIGKILL what is left after ``timeout``."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@contextlib.contextmanager
def prefect_ui_server(home: Path, startup_timeout: float = 120, *, database_url: str | None = None) -> Iterator[str]:
    """``prefect server start`` with the UI on; yields the base URL (the API is ``<url>/api``).

    ``database_url``: a PostgreSQL database for the server (``postgresql://…``); default SQLite in ``home``.
    """
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"{url}/api",
        "PREFECT_UI_API_URL": f"{url}/api",
        "PREFECT_UI_URL": url,
        "PREFECT_SERVER_UI_ENABLED": "true",
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
    })
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql+asyncpg://",
                                                           database_url)
    log_path = home / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--ui"],
            cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            deadline = time.monotonic() + startup_timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"prefect server exited with {proc.returncode}:\n{_log_tail(log_path)}")
                with contextlib.suppress(httpx.HTTPError):
                    if (httpx.get(f"{url}/api/health", timeout=2).status_code == 200
                            and httpx.get(f"{url}{UI}/", headers={"Accept": "text/html"}, timeout=5).status_code == 200):
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"prefect server did not answer in {startup_timeout}s:\n{_log_tail(log_path)}")
                time.sleep(0.5)
            yield url
        finally:
            _stop_group(proc)


@contextlib.contextmanager
def process_worker(box: Sandbox, pool: str) -> Iterator[subprocess.Popen]:
    """A ``process`` worker for ``pool`` (log: ``<box>/worker.log``), stopped with its flow runs at exit."""
    with open(box.root / "worker.log", "w") as log:
        proc = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"],
            cwd=box.root, env=box.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            yield proc
        finally:
            _stop_group(proc)


@contextlib.contextmanager
def launch_chromium() -> Iterator["playwright.sync_api.Browser"]:  # noqa: F821
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=20_000)  # a busy 2-core machine: the UI's polls can take a few seconds
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


class Shots:
    """Named screenshots of pages that must not show a secret."""

    def __init__(self, directory: Path, secrets: Callable[[], list[str]]):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.secrets = secrets
        self.publish = Path(os.environ[SCREENSHOTS_ENV]) if os.environ.get(SCREENSHOTS_ENV) else None

    def check_no_secret(self, page, what: str) -> None:
        text, html = page.locator("body").inner_text(), page.content()
        for value in self.secrets():
            assert value not in text and value not in html, f"a secret value is on the page ({what}: {page.url})"

    def take(self, page, name: str, *, full_page: bool = False, locator=None) -> Path:
        self.check_no_secret(page, name)
        path = self.dir / f"{name}.png"
        (locator or page).screenshot(path=str(path), **({} if locator else {"full_page": full_page}))
        if self.publish:
            self.publish.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, self.publish / path.name)
        return path


# --------------------------------------------------------------------------- UI moves (Prefect V2 UI)

def open_deployment(page, base: str, flow: str, deployment: str) -> None:
    """Deployments list → the ``flow/deployment`` row's link."""
    from playwright.sync_api import expect

    page.goto(f"{base}{UI}/deployments")
    row = page.get_by_role("row").filter(has=page.get_by_role("link", name=flow, exact=True))
    row.get_by_role("link", name=deployment, exact=True).click()
    expect(page.get_by_role("button", name="Run", exact=True)).to_be_visible()


def run_menu(page, item: str) -> None:
    """The deployment page's Run button → ``Quick run`` or ``Custom run``."""
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_role("menuitem", name=item).click()


def view_new_run(page, name: str | None = None) -> str:
    """Follow the "… scheduled to start — View run" toast; returns the flow run id.

    The toast lasts a few seconds: when it is gone (a slow machine), the run is
    taken from the deployment page's Runs tab instead (by ``name``, else the newest).
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout, expect

    toast = page.get_by_role("region", name=re.compile("Notifications")).get_by_role("link", name="View run")
    try:
        toast.click(timeout=4_000)
    except PlaywrightTimeout:
        runs = page.get_by_role("tabpanel", name="Runs")
        link = runs.get_by_role("link", name=name, exact=True) if name else runs.locator("a[href*='/runs/flow-run/']")
        expect(link.first).to_be_visible(timeout=60_000)
        link.first.click()
    page.wait_for_url(re.compile(r"/runs/flow-run/[0-9a-f-]{36}"))
    return re.search(r"/runs/flow-run/([0-9a-f-]{36})", page.url).group(1)


def expect_state(page, state: str, timeout: float = 120) -> None:
    """The run page's state badge (the page polls the API) reads ``state``."""
    from playwright.sync_api import expect

    badge = page.get_by_role("main").locator("[data-slot=badge]").filter(has_text=re.compile(f"^{state}$"))
    expect(badge.first).to_be_visible(timeout=timeout * 1000)


def open_tab(page, name: str):
    """A tab of the run page; returns its panel."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name=name, exact=True).click()
    panel = page.get_by_role("tabpanel", name=name)
    expect(panel).to_be_visible()
    return panel


def resume_dialog(page):
    """The paused run's ⋮ menu → Resume: the typed input form (a dialog)."""
    from playwright.sync_api import expect

    page.get_by_role("main").get_by_role("button", name="Open menu").first.click()
    page.get_by_role("menuitem", name="Resume").click()
    dialog = page.get_by_role("dialog", name="Resume Flow Run")
    expect(dialog).to_be_visible()
    return dialog
