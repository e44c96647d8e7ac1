"""What a person sees in a terminal (issue 12): the CLI under tmux, read back with ``capture-pane``.

A real pseudo-terminal, a real rollout (real MLflow servers, the session's
Prefect server), and assertions on the screen while it runs and at the end:
one stage table and nothing else drawn (no Prefect log lines, no MLflow
output, no warning, no traceback), the run's full log named on the screen
and holding what was kept off it. A failing run ends in its one-line reason
after the log's path; the traceback is in the log only. ``--verbose`` shows
the logs as they come.

Every tmux server a test starts has its own socket and is killed by the
test, also when it fails; the MLflow servers are stopped.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.rollout import CLI, Sandbox

pytestmark = [
    pytest.mark.serial,
    pytest.mark.e2e,
    # In CI (root) scripts/setup.sh installs tmux, so there a missing tmux fails the tests instead of skipping them.
    pytest.mark.skipif(shutil.which("tmux") is None and not os.environ.get("CI"),
                       reason="tmux is not installed (scripts/setup.sh installs it as root)"),
]

TITLE = "mlflow-rollout {env} (local)"
NOISE = (" | INFO ", " | WARNING ", " | ERROR ", "Traceback", "Warning:", "DeprecationWarning", "database is locked",
         "Updating database tables", "Creating initial MLflow database tables")


@dataclass
class Terminal:
    """One tmux server (own socket) running one command in a 180x50 window."""

    socket: str
    script: Path
    snapshots: list[str] = field(default_factory=list)

    def _tmux(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=30)

    def start(self) -> None:
        r = self._tmux("new-session", "-d", "-s", "main", "-x", "180", "-y", "50", f"bash {shlex.quote(str(self.script))}")
        assert r.returncode == 0, r.stderr

    def screen(self) -> str:
        """The whole pane, its scrollback included (torn frames would scroll up into it)."""
        return self._tmux("capture-pane", "-p", "-J", "-S", "-", "-t", "main").stdout

    def wait_exit(self, timeout: float) -> tuple[int, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.screen()
            self.snapshots.append(text)
            m = re.search(r"^EXIT=(\d+)$", text, re.M)
            if m:
                return int(m.group(1)), text
            time.sleep(0.4)
        raise AssertionError(f"the command did not end within {timeout:.0f}s; screen:\n{self.screen()[-3000:]}")

    def kill(self) -> None:
        self._tmux("kill-server")


@contextlib.contextmanager
def terminal(box: Sandbox, *args: str, unset: tuple[str, ...] = (), extra: dict[str, str] | None = None) -> Iterator[Terminal]:
    """``mlflow-rollout ARGS`` in a fresh tmux server with the sandbox's environment (less ``unset``, plus
    ``extra``); killed on the way out."""
    env = {k: v for k, v in box.env().items() if k not in unset} | (extra or {})
    env.pop("COLUMNS", None)  # the pseudo-terminal's own size, as a person's terminal has
    env["TERM"] = "xterm-256color"
    script = box.root / f"tty-{uuid.uuid4().hex[:6]}.sh"
    exports = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items() if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k))
    unsets = "".join(f"unset {name}\n" for name in unset)  # tmux's server may pass them on from its own start
    script.write_text(f"{exports}\n{unsets}cd {shlex.quote(str(box.root))}\n{shlex.join([*CLI, *args])}\necho EXIT=$?\nsleep 600\n")
    term = Terminal(socket=f"mlr-{uuid.uuid4().hex[:8]}", script=script)
    term.start()
    try:
        yield term
    finally:
        term.kill()


@pytest.fixture
def box(tmp_path: Path, prefect_api: str) -> Iterator[Sandbox]:
    sandbox = Sandbox(tmp_path, prefect_api)
    yield sandbox
    for path in sandbox.env_dir.glob("*.yaml"):
        sandbox.stop(path.stem)


def _log_path(screen: str) -> Path:
    m = re.search(r"^full log: (\S+)$", screen, re.M)
    assert m, f"the screen does not name the run's log:\n{screen[-3000:]}"
    return Path(m.group(1))


def _last_lines(screen: str, n: int) -> list[str]:
    lines = [line for line in screen.splitlines() if line.strip() and not line.startswith("EXIT=")]
    return lines[-n:]


def test_a_rollout_in_a_terminal_draws_only_the_stage_table(box: Sandbox) -> None:
    box.write_environment("tty")
    title = TITLE.format(env="tty")
    with terminal(box, "rollout", "--env", "tty") as term:
        code, screen = term.wait_exit(600)
    assert code == 0, screen[-4000:]

    # mid-run: the table with a running stage, and nothing but the table
    running = [s for s in term.snapshots if re.search(r"│ \S+\s+│ running", s)]
    assert running, "no snapshot caught a stage running"
    for snap in term.snapshots:
        assert snap.count(title) <= 1, f"a torn frame (the table drawn twice):\n{snap[-4000:]}"
        assert not [n for n in NOISE if n in snap], snap[-4000:]

    # the end: one table, every stage in it, the log named, the way in
    assert screen.count(title) == 1, screen[-6000:]
    assert screen.count("┏") == 1 and screen.count("└") == 1, screen[-6000:]
    for stage in ("preflight", "deploy-no-auth", "admin-bootstrap", "deploy-auth", "smoke-auth", "report"):
        assert re.search(rf"│ {stage}\s+│ (completed|skipped)", screen), stage
    log = _log_path(screen)
    tail = _last_lines(screen, 3)
    assert tail[0].startswith("full log: ") and tail[1].startswith("MLflow is up at"), tail

    # what was kept off the screen is in the log: Prefect's logs and MLflow's migration output, no colour codes
    text = log.read_text()
    assert "Beginning flow run" in text and "Task run 'deploy-auth'" in text, text[:2000]
    assert "\x1b[" not in text
    assert log.stat().st_mode & 0o777 == 0o600
    status = box.status("tty")
    password = Path(status["admin_password_file"]).read_text()
    assert password not in screen and password not in text


def test_a_failing_rollout_ends_in_one_line_and_keeps_the_traceback_in_the_log(box: Sandbox) -> None:
    box.write_environment("busy")
    with socket.socket() as taken:  # another program holds the environment's port
        taken.bind(("127.0.0.1", box.port))
        taken.listen()
        with terminal(box, "rollout", "--env", "busy") as term:
            code, screen = term.wait_exit(300)
    assert code == 2, screen[-4000:]
    tail = _last_lines(screen, 2)
    assert tail[0].startswith("full log: "), tail
    assert tail[1].startswith("bad input: port ") and "in use by another program" in tail[1], tail
    assert "Traceback" not in screen and " | ERROR " not in screen, screen[-4000:]
    assert re.search(r"│ preflight\s+│ failed", screen)
    assert "Traceback" in _log_path(screen).read_text()  # the detail is kept, off the screen


def test_a_first_run_on_a_fresh_machine_shows_no_telemetry_notice(box: Sandbox, tmp_path: Path) -> None:
    """No PREFECT_API_URL (the CLI's own temporary server), a fresh PREFECT_HOME, not in CI: what a newcomer's
    first ``mlflow-rollout`` meets. Prefect's first-run notice would print before the table."""
    box.write_environment("fresh")
    home = tmp_path / "fresh-prefect-home"
    with terminal(box, "rollout", "--env", "fresh", unset=("PREFECT_API_URL", "CI", "DO_NOT_TRACK"),
                  extra={"PREFECT_HOME": str(home)}) as term:
        code, screen = term.wait_exit(600)
    assert code == 0, screen[-4000:]
    assert "anonymous usage data" not in screen and "telemetry" not in screen.lower(), screen[:3000]
    assert not [n for n in NOISE if n in screen], screen[-4000:]
    assert (home / "prefect.db").is_file()  # it did run its own temporary server in that home


def test_verbose_shows_the_logs_as_they_come(box: Sandbox) -> None:
    box.write_environment("loud")
    with terminal(box, "health", "--env", "loud", "--verbose") as term:
        code, screen = term.wait_exit(300)
    assert code == 1, screen[-4000:]  # nothing is deployed: degraded
    assert " | INFO " in screen and "Beginning flow run" in screen, screen[-4000:]
    assert "full log:" not in screen
    assert screen.rstrip().splitlines()[-2].startswith("failed: loud is degraded"), screen[-2000:]
