"""Benchmark: what Prefect costs the ``mlflow-rollout`` CLI (issue 12).

Runs the real CLI, ``mlflow-rollout rollout --env bench``, as a user does: a
subprocess, output piped (one line per finished stage), no
``PREFECT_API_URL`` (so the CLI starts its own temporary Prefect server), in a
sandbox: its own environments directory (the test suite's minimal local
environment), state directory, ``PREFECT_HOME`` and a free port.

Per repetition and per *variant* (``before``: the database template off,
``MLFLOW_ROLLOUT_PREFECT_DB_TEMPLATE=0``, i.e. the old path; ``after``: the
current code), two rollouts:

* **fresh** – a new ``PREFECT_HOME`` (and a new state directory);
* **warm** – the same ``PREFECT_HOME`` again, a new state directory (so the
  MLflow servers start from scratch again; only Prefect is warm).

Each rollout's **outside** figure is its wall time minus the two MLflow server
starts, taken as the ``deploy-no-auth`` and ``deploy-auth`` stage durations
from the CLI's own lines (``completed deploy-auth 9.1s``): slightly generous,
the stages do a little more than start the server. Broken down into:

* **import** – ``python -c "import cli.main, flows.rollout"`` minus
  ``python -c pass`` (measured once per repetition, in its own process);
* **server** – the temporary server's start to ``/api/health`` 200, as the
  CLI itself logs it (``mlflow-rollout: server healthy after …s`` in
  ``$PREFECT_HOME/mlflow-rollout-prefect-server.log``);
* **other stages** – the sum of every other stage (admin bootstrap, smoke
  checks, report, …: MLflow work, not Prefect's);
* **rest** – outside − import − server − other stages: interpreter start,
  Prefect's flow/task-run overhead outside the stages, the lock, server stop
  and exit.

The database template lives in a directory of the benchmark's own
(``MLFLOW_ROLLOUT_PREFECT_DB_TEMPLATE_DIR``); it is built once, untimed,
before the repetitions, and the time that takes is printed (that is what the
very first fresh run on a machine costs).

Variants and repetitions are interleaved (before/after swap order each
repetition); medians are reported, and the ratio after/before per repetition,
then medianed. Every process the benchmark started (CLI runs, the MLflow
servers they leave running) and every temp directory is removed at the end,
also on Ctrl-C or SIGTERM.

    .venv/bin/python benchmarks/cli_start.py --repeat 3 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CLI = [str(BIN / "mlflow-rollout")]
ENV_NAME = "bench"
OUTPUTS = {  # tests/support/rollout.py DEFAULT_OUTPUTS
    "mlflow_irsa_role_arn": {"value": "arn:aws:iam::000000000000:role/mlflow-test", "type": "string", "sensitive": False},
    "rds_connection_string": {"value": "postgresql://mlflow@127.0.0.1:5432/mlflow", "type": "string", "sensitive": True},
    "s3_bucket_name": {"value": "mlflow-test-artifacts", "type": "string", "sensitive": False},
}
MLFLOW_STARTS = ("deploy-no-auth", "deploy-auth")
STAGE_LINE = re.compile(r"^\s*(completed|failed|skipped)\s+(\S+)\s+([\d.]+)s\b", re.M)
HEALTHY_LINE = re.compile(r"mlflow-rollout: server healthy after ([\d.]+)s")
console = Console()
_running: set[subprocess.Popen] = set()
_to_stop: dict[str, tuple[dict[str, str], Path]] = {}  # sandboxes whose MLflow server may still run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_environment(root: Path) -> Path:
    env_dir = root / "environments"
    out_file = env_dir / ENV_NAME / "terraform-outputs.json"
    out_file.parent.mkdir(parents=True)
    out_file.write_text(json.dumps(OUTPUTS))
    data = {
        "target": "local",
        "terraform": {"source": "file", "path": str(out_file)},
        "mlflow": {"host": "localhost", "workers": 2, "startup_timeout_seconds": 240},
        "local": {"port": free_port()},
        "secrets": {"admin_password": {"generate": True}, "flask_secret_key": {"generate": True}},
    }
    (env_dir / f"{ENV_NAME}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return env_dir


def sandbox_env(env_dir: Path, state: Path, home: Path, template_dir: Path, template: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_ROLLOUT_"))}
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "MLFLOW_ROLLOUT_ENVIRONMENTS_DIR": str(env_dir),
        "MLFLOW_ROLLOUT_STATE_DIR": str(state),
        "PREFECT_HOME": str(home),
        "MLFLOW_ROLLOUT_PREFECT_DB_TEMPLATE_DIR": str(template_dir),
        "MLFLOW_ROLLOUT_PREFECT_DB_TEMPLATE": "1" if template else "0",
        "COLUMNS": "200",
    })
    return env


def run(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float = 900) -> tuple[float, int, str]:
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    _running.add(proc)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        _running.discard(proc)
        if proc.poll() is None:
            kill_group(proc)
    return time.perf_counter() - started, proc.returncode, out


def kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            pass


def import_seconds(cwd: Path) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(cwd / "import-home")
    base, _, _ = run([sys.executable, "-c", "pass"], env, REPO)
    full, code, out = run([sys.executable, "-c", "import cli.main, flows.rollout"], env, REPO)
    assert code == 0, out
    return full - base


def rollout(root: Path, env_dir: Path, home: Path, state: Path, template_dir: Path, template: bool,
            stack: ExitStack) -> dict:
    env = sandbox_env(env_dir, state, home, template_dir, template)
    _to_stop[str(state)] = (env, root)  # the MLflow server the rollout leaves running
    wall, code, out = run([*CLI, "rollout", "--env", ENV_NAME], env, root)
    if code != 0:
        raise RuntimeError(f"rollout failed ({code}):\n{out[-4000:]}")
    stages = {m[2]: float(m[3]) for m in STAGE_LINE.finditer(out)}
    log = (home / "mlflow-rollout-prefect-server.log").read_text(errors="replace")
    healthy = HEALTHY_LINE.findall(log)
    run([*CLI, "stop", "--env", ENV_NAME], env, root, 120)
    _to_stop.pop(str(state), None)
    mlflow = sum(stages.get(s, 0.0) for s in MLFLOW_STARTS)
    others = sum(v for k, v in stages.items() if k not in MLFLOW_STARTS)
    return {"wall": wall, "mlflow_starts": mlflow, "outside": wall - mlflow,
            "server": float(healthy[-1]) if healthy else float("nan"), "other_stages": others, "stages": stages}


def build_template(base: Path, template_dir: Path) -> float:
    """The one-off cost: the first fresh start on a machine builds the template."""
    home = base / "template-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_ROLLOUT_"))}
    env.update({"PREFECT_HOME": str(home), "MLFLOW_ROLLOUT_PREFECT_DB_TEMPLATE_DIR": str(template_dir)})
    code = ("from pathlib import Path; import os; from mlflow_rollout.prefect_server import TemporaryPrefectServer as T; "
            "s = T(Path(os.environ['PREFECT_HOME'])); s.start(); s.stop()")
    _, rc, out = run([sys.executable, "-c", code], env, REPO)
    assert rc == 0, out
    log = (home / "mlflow-rollout-prefect-server.log").read_text()
    return float(HEALTHY_LINE.findall(log)[-1])


def benchmark(repeat: int, stack: ExitStack) -> tuple[list[dict], float]:
    base = Path(tempfile.mkdtemp(prefix="bench-cli-start-"))
    stack.callback(shutil.rmtree, base, ignore_errors=True)
    stack.callback(lambda: [run([*CLI, "stop", "--env", ENV_NAME], e, r, 120) for e, r in list(_to_stop.values())])
    template_dir = base / "template"
    console.print("building the database template (once, untimed in the table)…")
    build = build_template(base, template_dir)
    console.print(f"  temporary server start while building it: {build:.2f}s")
    reps = []
    for i in range(repeat):
        rep = {"import": import_seconds(base)}
        for variant in (("before", "after") if i % 2 == 0 else ("after", "before")):
            root = base / f"r{i}-{variant}"
            root.mkdir()
            env_dir = write_environment(root)
            home = root / "prefect-home"
            for kind in ("fresh", "warm"):
                r = rollout(root, env_dir, home, root / f"state-{kind}", template_dir, variant == "after", stack)
                r["rest"] = r["outside"] - rep["import"] - r["server"] - r["other_stages"]
                rep[f"{variant}/{kind}"] = r
                console.print(f"rep {i + 1} {variant:>6}/{kind:<5} wall {r['wall']:5.1f}s  outside {r['outside']:5.1f}s"
                              f"  server {r['server']:4.1f}s  (MLflow starts {r['mlflow_starts']:4.1f}s)")
            shutil.rmtree(root, ignore_errors=True)
        reps.append(rep)
    return reps, build


def report(reps: list[dict], build: float) -> dict:
    def vals(key: str, field: str) -> list[float]:
        return [r[key] if key == "import" else r[key][field] for r in reps]

    rows: dict[str, list[float]] = {"import cli + flows": vals("import", "")}
    for variant in ("before", "after"):
        for kind in ("fresh", "warm"):
            k = f"{variant}/{kind}"
            for field, label in (("wall", "wall"), ("mlflow_starts", "MLflow starts"), ("outside", "OUTSIDE"),
                                 ("server", "server start"), ("other_stages", "other stages"), ("rest", "rest")):
                rows[f"{k} {label}"] = vals(k, field)
    for kind in ("fresh", "warm"):
        rows[f"after/before {kind} outside (ratio)"] = [
            r[f"after/{kind}"]["outside"] / r[f"before/{kind}"]["outside"] for r in reps]
        rows[f"after/before {kind} server (ratio)"] = [
            r[f"after/{kind}"]["server"] / r[f"before/{kind}"]["server"] for r in reps]
    table = Table(title=f"mlflow-rollout CLI, {len(reps)} repetitions, {os.cpu_count()} CPUs, "
                        f"load {os.getloadavg()[0]:.1f}")
    for col in ("measure", "median", "per repetition"):
        table.add_column(col, justify="right" if col == "median" else "left")
    medians = {}
    for name, values in rows.items():
        medians[name] = statistics.median(values)
        unit = "" if "ratio" in name else " s"
        table.add_row(name, f"{medians[name]:.2f}{unit}", ", ".join(f"{v:.2f}" for v in values))
    console.print(table)
    console.print(f"template build (first fresh start on a machine): server start {build:.2f}s")
    for kind, goal in (("warm", 4.0), ("fresh", 8.0)):
        m = medians[f"after/{kind} OUTSIDE"]
        console.print(f"goal {kind}: outside the MLflow starts {m:.1f}s vs ≤ {goal:.0f}s: "
                      + ("[green]met[/]" if m <= goal else "[red]not met[/]"))
    return medians


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3, help="interleaved repetitions (default 3)")
    p.add_argument("--json", type=Path, help="write the raw numbers here")
    args = p.parse_args()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    stack = ExitStack()
    try:
        reps, build = benchmark(args.repeat, stack)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; cleaning up[/]")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for proc in list(_running):  # a CLI run caught mid-way (its Prefect server dies with it)
            kill_group(proc)
        stack.close()  # `stop` for every sandbox's MLflow server, then the temp dirs
        signal.signal(signal.SIGINT, signal.default_int_handler)
    medians = report(reps, build)
    if args.json:
        args.json.write_text(json.dumps({"repeat": args.repeat, "cpus": os.cpu_count(), "template_build": build,
                                         "medians": medians, "repetitions": reps}, indent=2))
        console.print(f"raw numbers in {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
