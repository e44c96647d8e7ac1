"""Benchmark: a full ``local`` rollout, stage by stage, against the floor.

What is measured, in one process and one run:

* **rollout** – the ``mlflow-rollout`` flow run in-process (so the stage ledger
  gives every stage's duration), each time from a fresh state directory on a
  free port. Its wall time includes Prefect's own per-flow/per-task overhead;
  the Prefect test server is started once for the whole benchmark and is not
  counted.
* **re-run** – the same flow again on the server the rollout left running: the
  idempotent path (deploys are no-ops, smoke checks run again).
* **floor** – what no orchestration can beat: two cold ``mlflow server``
  starts in a row, each from process start to ``/health`` 200 over TLS (a
  rollout also starts the server twice: auth off, then auth on). The command
  and environment are the local target's own (``LocalTarget._command`` /
  ``_environment``: same workers, TLS, auth app, job execution off), on a
  fresh SQLite backend that the server itself creates. It polls ``/health``
  every 0.1 s; the target polls every 0.5 s, which is part of the overhead.

The machine is small and shared, so repetitions are interleaved (rollout +
re-run, floor, rollout + re-run, floor, …) and medians are reported; the
ratios rollout/floor and re-run/floor are computed per repetition, then
medianed. Every server and temp directory is removed at the end, also on
Ctrl-C.

    .venv/bin/python benchmarks/rollout_local.py --repeat 3 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

import httpx  # noqa: E402
import yaml  # noqa: E402
from pydantic import SecretStr  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from mlflow_rollout.server_spec import SecretBundle, render_auth_ini  # noqa: E402
from mlflow_rollout.settings import load_environment  # noqa: E402
from mlflow_rollout.stages import add_listener, remove_listener  # noqa: E402
from targets import local as local_target  # noqa: E402
from targets.local import LocalTarget  # noqa: E402
from tasks.terraform import read_outputs  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
console = Console()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def fresh_environment(root: Path) -> LocalTarget:
    """``environments/local.yaml`` copied into ``root`` with a free port; env vars point at it."""
    data = yaml.safe_load((REPO / "environments" / "local.yaml").read_text())
    data.setdefault("local", {})["port"] = free_port()
    tf = data["terraform"]
    if tf.get("source") == "file" and not Path(tf["path"]).is_absolute():
        tf["path"] = str((REPO / tf["path"]).resolve())
    (root / "environments").mkdir()
    (root / "environments" / "local.yaml").write_text(yaml.safe_dump(data))
    os.environ["MLFLOW_ROLLOUT_ENVIRONMENTS_DIR"] = str(root / "environments")
    os.environ["MLFLOW_ROLLOUT_STATE_DIR"] = str(root / "state")
    return LocalTarget(load_environment("local"))


def run_flow() -> dict:
    """One in-process flow run: wall seconds and the ledger's per-stage numbers."""
    from flows.rollout import rollout

    seen = {}
    listener = lambda led: seen.__setitem__("ledger", led)  # noqa: E731 (the run's own ledger)
    add_listener(listener)
    try:
        started = time.perf_counter()
        rollout(env="local")
        wall = time.perf_counter() - started
    finally:
        remove_listener(listener)
    stages = {
        r.name: {"seconds": r.duration or 0.0, "status": r.status, "attempts": r.attempts}
        for r in seen["ledger"].records()
    }
    return {"wall": wall, "stages": stages}


def kill_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass


def cold_start(target: LocalTarget, spec, log) -> float:
    """Start ``mlflow server`` as the target would; seconds until ``/health`` is 200."""
    tls, endpoint = target.tls(), target.endpoint()
    cmd, env = target._command(spec, tls), target._environment(spec)
    deadline = time.monotonic() + target.settings.mlflow.startup_timeout_seconds
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            cwd=target.dir, env=env, start_new_session=True)
    try:
        with httpx.Client(verify=str(endpoint.ca_bundle), timeout=5) as client:
            while True:
                try:
                    if client.get(f"{endpoint.url}/health").status_code == 200:
                        return time.perf_counter() - started
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"floor server did not become healthy; see {log.name}")
                time.sleep(0.1)
    finally:
        kill_group(proc)


def floor(root: Path) -> dict:
    """Two cold starts (auth off, then auth on) with the local target's command and env."""
    settings = load_environment("local")
    settings = settings.model_copy(update={"local": settings.local.model_copy(
        update={"state_dir": root / "floor", "port": free_port()})})
    target = LocalTarget(settings)
    target.ensure_dirs()
    outputs = read_outputs(settings.terraform)
    backend, auth_db = target.database_uris(outputs)
    bundle = SecretBundle(admin_password=SecretStr(secrets.token_urlsafe(24)),
                          flask_secret_key=SecretStr(secrets.token_urlsafe(24)),
                          backend_store_uri=backend, auth_database_uri=auth_db)
    target.store_secrets(bundle, render_auth_ini(target.server_spec(outputs, auth=True), auth_db))
    target.tls()  # the certificates exist before the clock starts, as in a rollout's deploy
    with open(target.dir / "server.log", "ab") as log:
        starts = [cold_start(target, target.server_spec(outputs, auth=auth), log) for auth in (False, True)]
    return {"starts": starts, "total": sum(starts)}


def benchmark(repeat: int, stack: ExitStack) -> list[dict]:
    from prefect.testing.utilities import prefect_test_harness

    console.print("starting the Prefect test server (not timed) …")
    stack.enter_context(prefect_test_harness(server_startup_timeout=None))
    reps = []
    for i in range(1, repeat + 1):
        root = Path(tempfile.mkdtemp(prefix=f"rollout-bench-{i}-"))
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        target = fresh_environment(root)
        stack.callback(target.stop)  # runs before the rmtree above
        rollout = run_flow()
        console.print(f"[{i}/{repeat}] rollout {rollout['wall']:.1f}s", highlight=False)
        rerun = run_flow()
        console.print(f"[{i}/{repeat}] re-run  {rerun['wall']:.1f}s", highlight=False)
        started = time.perf_counter()
        target.stop()  # in no measure; reported because a lingering keep-alive TLS client stalls it (30 s)
        stop_s = time.perf_counter() - started
        fl = floor(root)
        console.print(f"[{i}/{repeat}] floor   {fl['total']:.1f}s "
                      f"({fl['starts'][0]:.1f}s + {fl['starts'][1]:.1f}s)", highlight=False)
        reps.append({"rollout": rollout, "rerun": rerun, "floor": fl, "stop_after_rerun_s": stop_s,
                     "rollout_over_floor": rollout["wall"] / fl["total"],
                     "rerun_over_floor": rerun["wall"] / fl["total"]})
    return reps


def report(reps: list[dict]) -> dict:
    med = statistics.median
    per = lambda f: [f(r) for r in reps]  # noqa: E731
    fmt = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    table = Table(title=f"local rollout vs floor — medians of {len(reps)} interleaved repetitions")
    for col in ("stage", "rollout s", "re-run s"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for name in reps[0]["rollout"]["stages"]:
        a = med(per(lambda r: r["rollout"]["stages"][name]["seconds"]))
        b = med(per(lambda r: r["rerun"]["stages"][name]["seconds"]))
        table.add_row(name, f"{a:.2f}", f"{b:.2f}")
    overhead = lambda run: run["wall"] - sum(s["seconds"] for s in run["stages"].values())  # noqa: E731
    table.add_row("[dim](outside stages: Prefect, lock, flow)[/]", f"{med(per(lambda r: overhead(r['rollout']))):.2f}",
                  f"{med(per(lambda r: overhead(r['rerun']))):.2f}", end_section=True)
    table.add_row("[bold]total (wall)[/]", f"[bold]{med(per(lambda r: r['rollout']['wall'])):.2f}[/]",
                  f"[bold]{med(per(lambda r: r['rerun']['wall'])):.2f}[/]")
    console.print(table)

    summary = {
        "rollout_s": per(lambda r: r["rollout"]["wall"]),
        "rerun_s": per(lambda r: r["rerun"]["wall"]),
        "floor_s": per(lambda r: r["floor"]["total"]),
        "floor_start_no_auth_s": per(lambda r: r["floor"]["starts"][0]),
        "floor_start_auth_s": per(lambda r: r["floor"]["starts"][1]),
        "rollout_over_floor": per(lambda r: r["rollout_over_floor"]),
        "rerun_over_floor": per(lambda r: r["rerun_over_floor"]),
        "stop_after_rerun_s": per(lambda r: r["stop_after_rerun_s"]),
    }
    totals = Table(title="summary (ratios per repetition, then medianed)")
    for col in ("measure", "median", "per repetition"):
        totals.add_column(col, justify="left" if col == "measure" else "right")
    for key, xs in summary.items():
        totals.add_row(key, f"[bold]{med(xs):.2f}[/]", fmt(xs))
    console.print(totals)
    retried = sorted({f"{name} ({kind})" for r in reps for kind in ("rollout", "rerun")
                      for name, s in r[kind]["stages"].items() if s["attempts"] > 1})
    if retried:
        console.print(f"[yellow]stages that needed retries:[/] {', '.join(retried)}")
    return {k: med(v) for k, v in summary.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3, help="interleaved repetitions (default 3)")
    p.add_argument("--json", type=Path, help="write the raw numbers here")
    args = p.parse_args()
    for sig in (signal.SIGINT, signal.SIGTERM):  # both clean up like Ctrl-C (also when started with &)
        signal.signal(sig, signal.default_int_handler)
    stack = ExitStack()
    try:
        reps = benchmark(args.repeat, stack)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; cleaning up[/]")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut cleanup short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.close()
        for proc in list(local_target._children.values()):  # a server caught between start and record
            kill_group(proc, timeout=5)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    medians = report(reps)
    if args.json:
        args.json.write_text(json.dumps({
            "repeat": args.repeat, "cpus": os.cpu_count(), "medians": medians, "repetitions": reps,
        }, indent=2))
        console.print(f"raw numbers in {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
