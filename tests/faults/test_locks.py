"""Locks that heal (issue 8 item 2): real holder processes are ``kill -9``ed, real Prefect test server.

Every holder runs in its own Python process (``_HOLDER`` below) that takes
the real lock and prints ``HELD``; the tests kill it the way an operator or
the OOM killer would, then take the lock in this process (or another one) and
read what was logged. Leases are a few seconds (the lower-level
:func:`prefect_lock` accepts any lease; the setting's minimum is 10 s, used in
the ``operation_lock`` test). Each test uses its own environment name, so
nothing leaks between tests, and every process started is killed in teardown.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest
import yaml

pytestmark = pytest.mark.serial  # leases of a few seconds: run alone (scripts/test.sh)

ROOT = Path(__file__).resolve().parents[2]

_HOLDER = textwrap.dedent(
    """
    import logging, sys, time
    from pathlib import Path
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
    from mlflow_rollout.locks import EnvironmentBusyError, file_lock, operation_lock, prefect_lock
    from mlflow_rollout.types import LockHolder

    kind, key, wait, lease, hold = sys.argv[1:6]
    holder = LockHolder.here("rollout")
    if kind == "prefect":
        cm = prefect_lock(key, holder, wait_seconds=float(wait), lease_seconds=float(lease))
    elif kind == "file":
        cm = file_lock(Path(key), holder, float(wait), env="faults")
    else:  # "operation": key is the environments directory, lease unused (from the settings)
        from mlflow_rollout.settings import load_environment
        from targets.local import LocalTarget
        settings = load_environment("lockop", Path(key))
        cm = operation_lock(settings, LocalTarget(settings), operation="rollout")
    try:
        with cm:
            print("HELD", time.time(), flush=True)
            time.sleep(float(hold))
            print("RELEASED", time.time(), flush=True)
    except EnvironmentBusyError as exc:
        print("BUSY", exc, flush=True)
        sys.exit(3)
    """
)


class Proc:
    """A holder process whose stdout/stderr lines are collected by reader threads."""

    def __init__(self, popen: subprocess.Popen[str]) -> None:
        self.popen = popen
        self.lines: queue.Queue[str] = queue.Queue()
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, sink in ((popen.stdout, self.out), (popen.stderr, self.err)):
            threading.Thread(target=self._pump, args=(stream, sink), daemon=True).start()

    def _pump(self, stream, sink: list[str]) -> None:
        for line in stream:
            sink.append(line)
            if sink is self.out:
                self.lines.put(line)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_for(self, word: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.popen.poll() is not None and self.lines.empty():
                    break
                continue
            if line.startswith(word):
                return line
        raise AssertionError(f"no {word!r} from pid {self.pid}: stdout={''.join(self.out)!r} "
                             f"stderr={''.join(self.err)[-3000:]!r}")

    def kill9(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self.popen.wait(10)

    def finish(self, timeout: float = 60) -> int:
        rc = self.popen.wait(timeout)
        time.sleep(0.2)  # let the pumps drain
        return rc

    @property
    def stderr(self) -> str:
        return "".join(self.err)


@pytest.fixture
def spawn(prefect_api: str, tmp_path: Path) -> Iterator:
    """Start holder processes (own PREFECT_HOME each unless given); all are killed at teardown."""
    started: list[Proc] = []
    script = tmp_path / "holder.py"
    script.write_text(_HOLDER)

    def start(*args: object, prefect_home: Path | None = None, extra_env: dict[str, str] | None = None) -> Proc:
        home = prefect_home or tmp_path / f"prefect-home-{len(started)}"
        home.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update({
            "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONPATH": str(ROOT),
            **(extra_env or {}),
        })
        popen = subprocess.Popen([sys.executable, str(script), *map(str, args)], cwd=ROOT, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        proc = Proc(popen)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            if proc.popen.poll() is None:
                proc.popen.kill()
            proc.popen.wait(10)


@pytest.fixture
def lock_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="mlflow_rollout")
    return caplog


def _env() -> str:
    return f"faults-{uuid.uuid4().hex[:8]}"


def _slots(env: str) -> int:
    from prefect.client.orchestration import get_client

    from mlflow_rollout.locks import lock_name

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(lock_name(env)).active_slots


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records]


# --------------------------------------------------------------------------- Prefect slot


def test_prefect_holder_killed_is_healed_within_the_lease(spawn, lock_logs) -> None:
    from mlflow_rollout.locks import prefect_lock, read_holder_record
    from mlflow_rollout.types import LockHolder

    env, lease = _env(), 4.0
    holder = spawn("prefect", env, 10, lease, 600)
    holder.wait_for("HELD")
    record = read_holder_record(env)
    assert record and record["holder"]["pid"] == holder.pid
    holder.kill9()
    killed_at = time.monotonic()

    with prefect_lock(env, LockHolder.here("rollback"), wait_seconds=30, lease_seconds=lease):
        took = time.monotonic() - killed_at
        assert _slots(env) == 1
        assert read_holder_record(env)["holder"]["pid"] == os.getpid()
    assert took <= lease + 3, f"took {took:.1f}s to heal a dead holder (lease {lease}s)"
    healed = [m for m in _messages(lock_logs) if m.startswith(f"freeing the lock of environment {env}")]
    assert len(healed) == 1 and f"pid {holder.pid} " in healed[0] and "no longer exists" in healed[0], healed
    waiting = [m for m in _messages(lock_logs) if m.startswith(f"waiting for the lock of environment {env}")]
    assert waiting and f"held by rollout (a run without a flow run id, pid {holder.pid} " in waiting[0]
    assert _slots(env) == 0 and read_holder_record(env) is None


def test_prefect_dead_holder_on_another_host_is_healed_and_its_lease_revoked(prefect_api, lock_logs) -> None:
    """A record from another host (its pid cannot be checked): healed on heartbeat age; the lease is revoked."""
    import httpx
    from prefect.client.orchestration import get_client

    from mlflow_rollout.locks import _ensure_limit, _Record, _write_record, lock_name, prefect_lock
    from mlflow_rollout.types import LockHolder

    env, lease = _env(), 3.0
    gone = LockHolder(operation="rollout", flow_run_id=str(uuid.uuid4()), pid=4242, host="elsewhere",
                      since=dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5))
    with get_client(sync_client=True) as client:
        _ensure_limit(client, lock_name(env))
        response = client.increment_concurrency_slots_with_lease(
            names=[lock_name(env)], slots=1, mode="concurrency", lease_duration=60)
        dead_lease = response.json()["lease_id"]
        _write_record(client, env, _Record(holder=gone, lease_id=dead_lease, lease_seconds=lease,
                                           heartbeat=dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=30)))
    start = time.monotonic()
    with prefect_lock(env, LockHolder.here("rollout"), wait_seconds=20, lease_seconds=lease):
        took = time.monotonic() - start
    assert lease / 2 - 0.5 <= took <= lease + 2, took
    healed = [m for m in _messages(lock_logs) if m.startswith(f"freeing the lock of environment {env}")]
    assert len(healed) == 1 and gone.describe() in healed[0] and "its last heartbeat was 3" in healed[0], healed
    with get_client(sync_client=True) as client, pytest.raises(httpx.HTTPStatusError) as gone_lease:
        client.renew_concurrency_lease(lease_id=uuid.UUID(dead_lease), lease_duration=60)
    assert gone_lease.value.response.status_code == 410  # revoked, so the repossessor cannot decrement twice
    assert _slots(env) == 0


def test_prefect_live_holder_keeps_the_lock_past_the_lease(spawn, lock_logs) -> None:
    from mlflow_rollout.locks import EnvironmentBusyError, prefect_lock
    from mlflow_rollout.types import LockHolder

    # Heartbeats every lease/4 through a shared test Prefect server (SQLite) on a busy 2-core machine:
    # a 2 s lease was occasionally missed there; 5 s still spans three leases in the wait below.
    env, lease = _env(), 5.0
    holder = spawn("prefect", env, 10, lease, 600)
    holder.wait_for("HELD")
    start = time.monotonic()
    with pytest.raises(EnvironmentBusyError) as busy:
        with prefect_lock(env, LockHolder.here("rollback"), wait_seconds=3 * lease, lease_seconds=lease):
            pytest.fail("took the lock of a live holder")
    assert time.monotonic() - start >= 3 * lease
    text = str(busy.value)
    assert f"another rollout or rollback of environment '{env}' is running" in text
    assert f"rollout (a run without a flow run id, pid {holder.pid} on " in text and "since " in text
    assert f"This rollback waited {3 * lease:.0f}s and gave up" in text and "Retry when it has finished" in text
    waiting = [m for m in _messages(lock_logs) if m.startswith("waiting for the lock")]
    assert len(waiting) == 1, waiting  # once, not once per attempt
    assert not [m for m in _messages(lock_logs) if m.startswith("freeing")]
    assert holder.popen.poll() is None and _slots(env) == 1


def test_prefect_slot_taken_without_any_record_is_healed_after_the_lease(prefect_api, lock_logs) -> None:
    """What an older version (no lease, no record) leaves behind after a kill -9."""
    from prefect.client.orchestration import get_client

    from mlflow_rollout.locks import _ensure_limit, lock_name, prefect_lock
    from mlflow_rollout.types import LockHolder

    env, lease = _env(), 3.0
    with get_client(sync_client=True) as client:
        _ensure_limit(client, lock_name(env))
        client.increment_concurrency_slots(names=[lock_name(env)], slots=1, mode="concurrency")
    assert _slots(env) == 1
    start = time.monotonic()
    with prefect_lock(env, LockHolder.here("rollout"), wait_seconds=20, lease_seconds=lease):
        took = time.monotonic() - start
        assert _slots(env) == 1
    assert lease - 0.5 <= took <= lease + 3, took
    messages = _messages(lock_logs)
    assert any(m.startswith(f"waiting for the lock of environment {env}: held by an unknown holder") for m in messages)
    assert any(m.startswith(f"freeing the lock of environment {env} held by an unknown holder: the slot has been "
                            "taken without any holder record") for m in messages), messages
    assert _slots(env) == 0


def test_prefect_racing_healers_free_an_orphaned_slot_once_and_hold_it_one_at_a_time(spawn) -> None:
    """Three waiters find the same record-less slot: one heal, then each holds it alone, in turn."""
    from prefect.client.orchestration import get_client

    from mlflow_rollout.locks import _ensure_limit, lock_name

    env, lease = _env(), 3.0
    with get_client(sync_client=True) as client:
        _ensure_limit(client, lock_name(env))
        client.increment_concurrency_slots(names=[lock_name(env)], slots=1, mode="concurrency")
    waiters = [spawn("prefect", env, 40, lease, 1.5) for _ in range(3)]
    assert [w.finish(90) for w in waiters] == [0, 0, 0], [w.stderr[-2000:] for w in waiters]
    spans = sorted((float(w.wait_for("HELD").split()[1]), float(w.wait_for("RELEASED").split()[1]))
                   for w in waiters)
    for (_, end), (begin, _) in zip(spans, spans[1:]):
        assert begin >= end, f"two holders at once: {spans}"
    freed = [line for w in waiters for line in w.err if f"freeing the lock of environment {env}" in line]
    assert len(freed) == 1, freed
    assert _slots(env) == 0


# --------------------------------------------------------------------------- file lock


def test_file_lock_one_holder_across_prefect_homes_then_freed_at_once_by_kill9(spawn, tmp_path) -> None:
    lock = tmp_path / "state" / "operation.lock"
    first = spawn("file", lock, 1, 0, 600, prefect_home=tmp_path / "home-a")
    first.wait_for("HELD")
    second = spawn("file", lock, 1.5, 0, 0, prefect_home=tmp_path / "home-b")
    assert second.finish() == 3
    busy = "".join(second.out)
    assert busy.startswith("BUSY another rollout or rollback of environment 'faults' is running: rollout (")
    assert f"pid {first.pid} on " in busy and f"holds the lock file {lock}" in busy
    waiting = f"waiting for the lock of environment faults: held by rollout (a run without a flow run id, pid {first.pid}"
    assert waiting in second.stderr

    first.kill9()
    start = time.monotonic()
    third = spawn("file", lock, 5, 0, 0, prefect_home=tmp_path / "home-b")
    third.wait_for("HELD")
    assert third.finish() == 0
    assert time.monotonic() - start < 15  # process start-up; the lock itself is free at once
    assert "waiting for the lock" not in third.stderr
    assert f"took over the lock of environment faults from rollout (a run without a flow run id, pid {first.pid}" \
        in third.stderr
    assert lock.read_text() == ""  # a clean release empties the holder record


def test_file_lock_in_a_read_only_state_directory_is_a_clear_bad_input(tmp_path) -> None:
    from mlflow_rollout.errors import BadInputError
    from mlflow_rollout.locks import file_lock
    from mlflow_rollout.types import LockHolder

    src, ro = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    ro.mkdir()
    (src / "state").mkdir()
    mounted = subprocess.run(["mount", "--bind", str(src), str(ro)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {mounted.stderr.strip()}")
    try:
        r = subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        for path in (ro / "state" / "operation.lock", ro / "new-state" / "operation.lock"):
            with pytest.raises(BadInputError) as bad:
                with file_lock(path, LockHolder.here("rollout"), 1):
                    pytest.fail("locked a file on a read-only mount")
            assert str(path) in str(bad.value) and "Read-only file system" in str(bad.value)
            assert "must be writable" in str(bad.value)
    finally:
        subprocess.run(["umount", str(ro)], check=False)


# --------------------------------------------------------------------------- operation_lock


def _write_env(tmp_path: Path) -> Path:
    env_dir = tmp_path / "environments"
    (env_dir / "lockop").mkdir(parents=True)
    outputs = env_dir / "lockop" / "terraform-outputs.json"
    outputs.write_text("{}")
    (env_dir / "lockop.yaml").write_text(yaml.safe_dump({
        "target": "local",
        "terraform": {"source": "file", "path": str(outputs)},
        "local": {"state_dir": str(tmp_path / "state")},
        "secrets": {"admin_password": {"generate": True}, "flask_secret_key": {"generate": True}},
        "lock_wait_seconds": 20,
        "lock_lease_seconds": 10,
    }))
    return env_dir


def test_operation_lock_local_target_holder_killed(spawn, tmp_path, lock_logs) -> None:
    """Both locks of a killed CLI: the file lock at once, the Prefect slot within lease/2 on this host."""
    from mlflow_rollout.locks import EnvironmentBusyError, operation_lock, read_holder_record
    from mlflow_rollout.settings import load_environment
    from targets.local import LocalTarget

    env_dir = _write_env(tmp_path)
    settings = load_environment("lockop", env_dir)
    holder = spawn("operation", env_dir, 0, 0, 600)
    holder.wait_for("HELD")
    assert read_holder_record("lockop")["holder"]["pid"] == holder.pid
    impatient = settings.model_copy(update={"lock_wait_seconds": 1})
    with pytest.raises(EnvironmentBusyError) as busy:  # the target's file lock answers first
        with operation_lock(impatient, LocalTarget(settings), operation="rollback"):
            pytest.fail("took the lock of a live holder")
    assert str(busy.value).startswith("another rollout or rollback of environment 'lockop' is running: rollout (")
    assert f"pid {holder.pid} on " in str(busy.value) and "operation.lock" in str(busy.value)
    holder.kill9()
    killed_at = time.monotonic()
    with operation_lock(settings, LocalTarget(settings), operation="rollback") as me:
        took = time.monotonic() - killed_at
        assert me.operation == "rollback" and me.pid == os.getpid()
        assert read_holder_record("lockop")["holder"]["operation"] == "rollback"
        assert '"operation":"rollback"' in (tmp_path / "state" / "operation.lock").read_text()
    assert took <= settings.lock_lease_seconds / 2 + 3, took
    messages = _messages(lock_logs)
    assert any(m.startswith("took over the lock of environment lockop from rollout") and f"pid {holder.pid} " in m
               for m in messages), messages
    assert any(m.startswith(f"freeing the lock of environment lockop held by rollout") and f"pid {holder.pid} " in m
               for m in messages), messages
    assert _slots("lockop") == 0 and read_holder_record("lockop") is None


def test_operation_lock_released_on_keyboard_interrupt(prefect_api, tmp_path) -> None:
    import fcntl

    from mlflow_rollout.locks import operation_lock, read_holder_record
    from mlflow_rollout.settings import load_environment
    from targets.local import LocalTarget

    env_dir = _write_env(tmp_path)
    settings = load_environment("lockop", env_dir)
    with pytest.raises(KeyboardInterrupt):
        with operation_lock(settings, LocalTarget(settings), operation="rollout"):
            assert _slots("lockop") == 1
            raise KeyboardInterrupt
    assert _slots("lockop") == 0 and read_holder_record("lockop") is None
    with open(tmp_path / "state" / "operation.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: would raise BlockingIOError if still held


def test_operation_lock_in_a_flow_names_the_flow_run_and_logs_to_the_run(prefect_api, tmp_path) -> None:
    """In a flow run the holder carries the flow run id and the waiting line reaches the run's logs."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from mlflow_rollout.locks import EnvironmentBusyError, operation_lock, prefect_lock, read_holder_record
    from mlflow_rollout.settings import load_environment
    from mlflow_rollout.types import LockHolder

    settings = load_environment("lockop", _write_env(tmp_path)).model_copy(update={"lock_wait_seconds": 1.5})

    @flow(name="lock-probe")
    def probe(expect_busy: bool) -> str:
        from prefect.runtime import flow_run

        with operation_lock(settings, object(), operation="rollout") as me:  # no target lock: Prefect slot only
            assert not expect_busy
            assert read_holder_record("lockop")["holder"]["flow_run_id"] == flow_run.id == me.flow_run_id
            return me.flow_run_id

    assert probe(False)
    with prefect_lock("lockop", LockHolder.here("rollback"), wait_seconds=5, lease_seconds=10):
        state = probe(True, return_state=True)
    assert state.is_failed()
    with pytest.raises(EnvironmentBusyError, match=r"This rollout waited 2s and gave up"):
        state.result()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    waiting = [log.message for log in logs if log.message.startswith("waiting for the lock of environment lockop")]
    assert waiting and f"held by rollback (a run without a flow run id, pid {os.getpid()} " in waiting[0]
