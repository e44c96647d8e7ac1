"""What every fault test checks around its fault: a data canary, an anonymous sampler, no leaked secret.

- :class:`Canary` logs a run with a metric and an artifact through the server
  *before* the fault, and proves afterwards (through the server, as a user)
  that both are still there.
- :class:`AnonSampler` asks the environment's URL an anonymous API question
  every few tenths of a second while the fault plays out, and keeps every
  answer: the rule is that none of them is ever 200 (DESIGN §4.18).
- :func:`assert_no_secret` scans what a run printed and what the state
  directory's logs hold for the secret store's values.
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import threading
import time
import uuid
from pathlib import Path

import httpx

from tests.support.rollout import Sandbox

PROTECTED = "/api/2.0/mlflow/experiments/search?max_results=1"


def client(status: dict, auth: tuple[str, str] | None = None, url: str | None = None) -> httpx.Client:
    ctx = ssl.create_default_context(cafile=status["ca_bundle"])
    return httpx.Client(base_url=url or status["url"], verify=ctx, auth=auth, timeout=15)


def admin(status: dict) -> tuple[str, str]:
    return status["admin_username"], Path(status["admin_password_file"]).read_text()


class Canary:
    """A run with a metric and an artifact, logged before a fault, checked after it."""

    def __init__(self, status: dict):
        self.status = status
        self.auth = admin(status)
        self.content = f"canary {uuid.uuid4().hex}\n"
        with client(status, self.auth) as c:
            name = f"fault-canary-{uuid.uuid4().hex[:8]}"
            exp = c.post("/api/2.0/mlflow/experiments/create", json={"name": name})
            assert exp.status_code == 200, exp.text
            run = c.post("/api/2.0/mlflow/runs/create", json={"experiment_id": exp.json()["experiment_id"]})
            assert run.status_code == 200, run.text
            info = run.json()["run"]["info"]
            self.run_id = info["run_id"]
            r = c.post("/api/2.0/mlflow/runs/log-metric", json={
                "run_id": self.run_id, "key": "canary", "value": 42.0, "timestamp": int(time.time() * 1000), "step": 0,
            })
            assert r.status_code == 200, r.text
            self.artifact = info["artifact_uri"].removeprefix("mlflow-artifacts:").lstrip("/") + "/canary.txt"
            r = c.put(f"/api/2.0/mlflow-artifacts/artifacts/{self.artifact}", content=self.content.encode())
            assert r.status_code == 200, r.text

    def assert_intact(self, status: dict | None = None) -> None:
        status = status or self.status
        with client(status, admin(status)) as c:
            run = c.get("/api/2.0/mlflow/runs/get", params={"run_id": self.run_id})
            assert run.status_code == 200, run.text
            metrics = {m["key"]: m["value"] for m in run.json()["run"]["data"].get("metrics", [])}
            assert metrics.get("canary") == 42.0, metrics
            art = c.get(f"/api/2.0/mlflow-artifacts/artifacts/{self.artifact}")
            assert art.status_code == 200 and art.text == self.content, (art.status_code, art.text[:200])


class AnonSampler:
    """Anonymous API calls against ``url`` in a thread; ``answers`` keeps every status (or error name)."""

    def __init__(self, url: str, ca_bundle: str, interval: float = 0.25):
        self.url, self.ca, self.interval = url, ca_bundle, interval
        self.answers: list[int | str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        ctx = ssl.create_default_context(cafile=self.ca)
        deadline = time.monotonic() + 900  # bounded, whatever the test does
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                with httpx.Client(verify=ctx, timeout=3) as c:
                    self.answers.append(c.get(self.url + PROTECTED).status_code)
            except Exception as exc:
                self.answers.append(type(exc).__name__)
            self._stop.wait(self.interval)

    def __enter__(self) -> "AnonSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def assert_never_open(self) -> None:
        assert self.answers, "the sampler took no sample"
        assert 200 not in self.answers, f"anonymous request answered 200 at some moment: {self.answers}"

    @property
    def served(self) -> int:
        """How many samples got an HTTP answer (401)."""
        return sum(1 for a in self.answers if a == 401)


def secret_values(state_dir: Path) -> list[str]:
    secrets = state_dir / "secrets"
    return [p.read_text() for p in secrets.iterdir() if p.name != "basic_auth.ini" and p.is_file()] if secrets.is_dir() else []


def assert_no_secret(state_dir: Path, *texts: str) -> None:
    values = [v for v in secret_values(state_dir) if len(v) >= 8]
    log = state_dir / "server.log"
    haystacks = [*texts, log.read_text(errors="replace") if log.exists() else ""]
    for v in values:
        for h in haystacks:
            assert v not in h, "a secret value appeared in the output"


def owned_pids(state_dir: Path) -> list[int]:
    """Processes whose environment names this state directory (the server and its workers)."""
    marker = f"MLFLOW_ROLLOUT_SERVER={state_dir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                        found.append(int(entry.name))
            except OSError:
                pass
    return found


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_cli(box: Sandbox, *args: str) -> subprocess.Popen[str]:
    """The CLI in the background (its own session, so a test can signal it alone)."""
    from tests.support.rollout import CLI

    return subprocess.Popen(
        [*CLI, *args], cwd=box.root, env=box.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
