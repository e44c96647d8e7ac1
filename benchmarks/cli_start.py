"""Benchmark: what Prefect costs the ``mlflow-rollout`` CLI (issue 12).

Runs the real CLI, ``python -m cli rollout --env bench``, as a user does: a
subprocess, output piped (one line per finished stage, each timestamped by the
benchmark as it arrives), in a sandbox: its own environments directory (the
test suite's minimal local environment), state directory, ``PREFECT_HOME``,
database-template directory and a free port.

Variants, per repetition, interleaved (their order rotates):

* **before** – the code of a baseline revision (``--baseline``, default
  ``e559b5b``: before the start-time work of this issue's second session),
  checked out in a temporary git worktree and put first on ``PYTHONPATH``;
  same interpreter and packages;
* **after** – the working tree's code;
* **api** – the working tree's code with ``PREFECT_API_URL`` pointing at a
  Prefect server the benchmark started once (``prefect server start``-like:
  the CLI's own server module, kept running): the floor of what Prefect costs
  the CLI when a server is already up — the way Prefect supports for many runs.

``before`` and ``after`` each run twice per repetition: **fresh** (a new
``PREFECT_HOME``; the template directory already holds that code's template,
built once, untimed, before the repetitions) and **warm** (the same home
again). Every rollout has a new state directory, so MLflow starts from scratch
each time; only Prefect is fresh or warm.

Per rollout, from the timestamped lines: **start** = when the first stage
began (its line's time minus its duration: interpreter, imports, the
temporary server, the flow run's creation); **MLflow starts** = the
``deploy-no-auth`` and ``deploy-auth`` stage durations (slightly generous);
**other stages** = every other stage's duration (admin bootstrap, smoke
checks, report: MLflow work); **between** = Prefect's per-task overhead
(last stage line − start − all stage durations); **end** = wall − the last
stage line (flow end, lock release, server stop, exit). **Outside** = wall −
MLflow starts = start + other stages + between + end: the issue's measure
(goal: ≤ 4 s warm, ≤ 8 s fresh).

Medians are reported, and after/before ratios per repetition, then medianed.
Every process the benchmark started (CLI runs, the MLflow servers they leave
running, the api variant's server) and every temp directory and the worktree
are removed at the end, also on Ctrl-C or SIGTERM.

    .venv/bin/python benchmarks/cli_start.py --repeat 3 [--baseline REV] [--json out.json]
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
ENV_NAME = "bench"
OUTPUTS = {  # tests/support/rollout.py DEFAULT_OUTPUTS
    "mlflow_irsa_role_arn": {"value": "arn:aws:iam::000000000000:role/mlflow-test", "type": "string", "sensitive": False},
    "rds_connection_string": {"value": "postgresql://mlflow@127.0.0.1:5432/mlflow", "type": "string", "sensitive": True},
    "s3_bucket_name": {"value": "mlflow-test-artifacts", "type": "string", "sensitive": False},
}
MLFLOW_STARTS = ("deploy-no-auth", "deploy-auth")
STAGE_LINE = re.compile(r"^\s*(completed|failed|skipped)\s+(\S+)\s+([\d.]+)s\b")
DEFAULT_BASELINE = "e559b5b"
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


def sandbox_env(code: Path, env_dir: Path, state: Path, home: Path, template_dir: Path,
                api_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_ROLLOUT_"))}
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONPATH": str(code),
        "MLFLOW_ROLLOUT_ENVIRONMENTS_DIR": str(env_dir),
        "MLFLOW_ROLLOUT_STATE_DIR": str(state),
        "PREFECT_HOME": str(home),
        "MLFLOW_ROLLOUT_PREFECT_DB_TEMPLATE_DIR": str(template_dir),
        "COLUMNS": "200",
    })
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def run(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float = 900) -> tuple[float, int, list[tuple[float, str]]]:
    """Run ``cmd``; (wall seconds, exit code, [(seconds since start, line)])."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    _running.add(proc)
    lines: list[tuple[float, str]] = []
    try:
        deadline = started + timeout
        for line in proc.stdout:
            lines.append((time.perf_counter() - started, line.rstrip("\n")))
            if time.perf_counter() > deadline:
                break
        proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
    finally:
        _running.discard(proc)
        if proc.poll() is None:
            kill_group(proc)
    return time.perf_counter() - started, proc.returncode, lines


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


def rollout(code: Path, root: Path, env_dir: Path, home: Path, state: Path, template_dir: Path,
            api_url: str | None = None) -> dict:
    env = sandbox_env(code, env_dir, state, home, template_dir, api_url)
    _to_stop[str(state)] = (env, root)  # the MLflow server the rollout leaves running
    wall, rc, lines = run([sys.executable, "-m", "cli", "rollout", "--env", ENV_NAME], env, root)
    if rc != 0:
        raise RuntimeError(f"rollout failed ({rc}):\n" + "\n".join(line for _, line in lines[-60:]))
    stages = [(t, m[2], float(m[3])) for t, line in lines if (m := STAGE_LINE.match(line))]
    run([sys.executable, "-m", "cli", "stop", "--env", ENV_NAME], env, root, 120)
    _to_stop.pop(str(state), None)
    durations = {name: d for _, name, d in stages}
    mlflow = sum(durations.get(s, 0.0) for s in MLFLOW_STARTS)
    start = stages[0][0] - stages[0][2]
    total = sum(durations.values())
    return {
        "wall": wall, "mlflow_starts": mlflow, "outside": wall - mlflow, "start": start,
        "other_stages": total - mlflow, "between": stages[-1][0] - start - total, "end": wall - stages[-1][0],
        "stages": durations,
    }


def build_template(code: Path, base: Path, template_dir: Path) -> None:
    """What the very first fresh start on a machine does (untimed here): leave that code's template behind."""
    home = base / f"template-home-{code.name}"
    env = sandbox_env(code, base, base, home, template_dir)
    script = ("from pathlib import Path; import os; from mlflow_rollout.prefect_server import TemporaryPrefectServer as T; "
              "s = T(Path(os.environ['PREFECT_HOME'])); s.start(); s.stop()")
    _, rc, lines = run([sys.executable, "-c", script], env, code)
    assert rc == 0, "\n".join(line for _, line in lines)
    shutil.rmtree(home, ignore_errors=True)


def start_api_server(base: Path, stack: ExitStack) -> str:
    """A Prefect server that stays up for the whole benchmark (the ``api`` variant's)."""
    home = base / "api-home"
    env = sandbox_env(REPO, base, base, home, base / "api-template")
    env["MLFLOW_ROLLOUT_BENCH_URL_FILE"] = str(base / "api-url")
    script = ("import os, signal, time; from pathlib import Path; "
              "from mlflow_rollout.prefect_server import TemporaryPrefectServer as T; "
              "s = T(Path(os.environ['PREFECT_HOME'])); url = s.start(); "
              "Path(os.environ['MLFLOW_ROLLOUT_BENCH_URL_FILE']).write_text(url); "
              "signal.signal(signal.SIGTERM, lambda *a: (s.stop(), os._exit(0))); time.sleep(10**6)")
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=REPO, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _running.add(proc)
    stack.callback(lambda: (kill_group(proc), _running.discard(proc)))
    deadline = time.monotonic() + 180
    while not (base / "api-url").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the api variant's Prefect server did not start")
        time.sleep(0.2)
    return (base / "api-url").read_text()


def worktree(rev: str, base: Path, stack: ExitStack) -> Path:
    path = base / f"baseline-{rev}"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--quiet", str(path), rev], check=True)
    stack.callback(lambda: subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)],
                                          capture_output=True))
    return path


def benchmark(repeat: int, baseline: str, stack: ExitStack) -> list[dict]:
    base = Path(tempfile.mkdtemp(prefix="bench-cli-start-"))
    stack.callback(shutil.rmtree, base, ignore_errors=True)
    stack.callback(lambda: [run([sys.executable, "-m", "cli", "stop", "--env", ENV_NAME], e, r, 120)
                            for e, r in list(_to_stop.values())])
    code = {"before": worktree(baseline, base, stack), "after": REPO}
    templates = {v: base / f"template-{v}" for v in code}
    console.print("building each variant's database template and starting the api variant's server (untimed)…")
    for variant, path in code.items():
        build_template(path, base, templates[variant])
    api_url = start_api_server(base, stack)
    reps = []
    variants = ["before", "after", "api"]
    for i in range(repeat):
        rep: dict = {}
        for variant in variants[i % 3:] + variants[:i % 3]:
            root = base / f"r{i}-{variant}"
            root.mkdir()
            env_dir = write_environment(root)
            home = root / "prefect-home"
            kinds = ("warm",) if variant == "api" else ("fresh", "warm")
            for kind in kinds:
                r = rollout(code.get(variant, REPO), root, env_dir, home, root / f"state-{kind}",
                            templates.get(variant, templates["after"]), api_url if variant == "api" else None)
                rep[f"{variant}/{kind}"] = r
                console.print(f"rep {i + 1} {variant:>6}/{kind:<5} wall {r['wall']:5.1f}s  outside {r['outside']:5.1f}s"
                              f"  start {r['start']:4.1f}s  end {r['end']:4.1f}s  (MLflow starts {r['mlflow_starts']:4.1f}s)")
            shutil.rmtree(root, ignore_errors=True)
        reps.append(rep)
    return reps


FIELDS = (("wall", "wall"), ("mlflow_starts", "MLflow starts"), ("outside", "OUTSIDE"), ("start", "start"),
          ("other_stages", "other stages"), ("between", "between stages"), ("end", "end"))


def report(reps: list[dict], baseline: str) -> dict:
    rows: dict[str, list[float]] = {}
    for key in ("before/fresh", "after/fresh", "before/warm", "after/warm", "api/warm"):
        for field, label in FIELDS:
            rows[f"{key} {label}"] = [r[key][field] for r in reps]
    for kind in ("fresh", "warm"):
        for field in ("outside", "start", "end"):
            rows[f"after/before {kind} {field} (ratio)"] = [
                r[f"after/{kind}"][field] / r[f"before/{kind}"][field] for r in reps]
    rows["api/after warm outside (ratio)"] = [r["api/warm"]["outside"] / r["after/warm"]["outside"] for r in reps]
    table = Table(title=f"mlflow-rollout CLI, {len(reps)} repetitions, {os.cpu_count()} CPUs, "
                        f"load {os.getloadavg()[0]:.1f}, before = {baseline}")
    for col in ("measure", "median", "per repetition"):
        table.add_column(col, justify="right" if col == "median" else "left")
    medians = {}
    for name, values in rows.items():
        medians[name] = statistics.median(values)
        unit = "" if "ratio" in name else " s"
        table.add_row(name, f"{medians[name]:.2f}{unit}", ", ".join(f"{v:.2f}" for v in values))
    console.print(table)
    for kind, goal in (("warm", 4.0), ("fresh", 8.0)):
        m = medians[f"after/{kind} OUTSIDE"]
        console.print(f"goal {kind}: outside the MLflow starts {m:.1f}s vs ≤ {goal:.0f}s: "
                      + ("[green]met[/]" if m <= goal else "[red]not met[/]"))
    return medians


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3, help="interleaved repetitions (default 3)")
    p.add_argument("--baseline", default=DEFAULT_BASELINE, help=f"git revision of 'before' (default {DEFAULT_BASELINE})")
    p.add_argument("--json", type=Path, help="write the raw numbers here")
    args = p.parse_args()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    stack = ExitStack()
    try:
        reps = benchmark(args.repeat, args.baseline, stack)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; cleaning up[/]")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for proc in list(_running):  # a CLI run caught mid-way (its Prefect server dies with it)
            kill_group(proc)
        stack.close()  # `stop` for every sandbox's MLflow server, the api server, the worktree, the temp dirs
        signal.signal(signal.SIGINT, signal.default_int_handler)
    medians = report(reps, args.baseline)
    if args.json:
        args.json.write_text(json.dumps({"repeat": args.repeat, "cpus": os.cpu_count(), "baseline": args.baseline,
                                         "medians": medians, "repetitions": reps}, indent=2))
        console.print(f"raw numbers in {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
