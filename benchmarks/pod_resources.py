"""Benchmark: what one pod of ``charts/mlflow`` really costs (memory and CPU).

The chart is installed with helm into the Kubernetes API emulator with its
process kubelet (tests/support/kube_emulator): the server pod runs the
pinned MLflow as the chart renders it (``mlflow server --workers 4
--app-name basic-auth ...``, uid 1000, read-only root, env from the Secret),
in its own network namespace. Configuration measured: the production values
(``charts/mlflow/values-production.yaml``) with one replica and no HPA,
``mlflow.workers=4``, ``mlflow.jobExecution=false``, auth on (chart-made
Secret, auth cache TTL 60 s), PostgreSQL backend and auth store (a real
PostgreSQL 15 on the host, reached through the pods' gateway), S3 artifacts
on moto (IRSA: the pod assumes a role through moto's STS), the Ingress
served by the emulator's ALB (TLS on 443, health checks every 5 s).

Per repetition (fresh emulator, fresh database, fresh install):

1. ``helm upgrade --install --wait`` (the pre-install migration Job runs
   first), then wait until ``/health`` answers 200 through the ALB and one
   authenticated call works (it creates the experiment used below).
2. **idle**: the pod stays idle for ``--settle`` seconds (default 20; only
   kubelet probes and ALB health checks reach it), then ``--idle-window``
   seconds (default 10) of 1 s samples.
3. **load**: ``--clients`` (default 8) concurrent clients for ``--duration``
   seconds (default 30), through the ALB over TLS (CA = the ALB's, SNI and
   Host = the ingress host), HTTP basic auth as the admin, one keep-alive
   connection each. Each client loops: create run, log-batch (10 metrics,
   5 params, 2 tags), log-batch (10 metrics, next step), search runs
   (the experiment, 20 newest), get experiment, update run (FINISHED).
   Samples taken in the first ``--ramp`` seconds (default 3) are left out
   of the medians (not of the peaks).
4. **after**: ``--cooldown`` seconds (default 15) without traffic, then
   ``--idle-window`` seconds of samples: does memory come back down?

Every sample (1 s) reads, for each process in the pod's network namespace
(``ip netns pids`` equivalent: ``/proc/PID/ns/net`` against
``/run/netns/NAME``): ``/proc/PID/smaps_rollup`` (RSS, PSS, anonymous PSS,
USS = private pages), ``RssFile`` from ``/proc/PID/status`` and
``/proc/PID/stat`` (utime + stime). Memory is the sum over the pod's
processes. PSS is the fair figure: the processes share the interpreter,
shared libraries and other file pages (RSS counts them once per process);
PSS also splits pages shared with processes outside the pod (the same
virtualenv is mapped by the emulator and this script), so it slightly
under-counts what a container would be charged for its files. The
*estimated working set* (what a cgroup would charge, roughly) is the
anonymous PSS plus the largest file-backed RSS of one process (the file
pages counted once; a lower bound, since the processes do not all map the
same files). CPU
is Δ(utime + stime) / Δwall in cores: per 1 s sample (median under load)
and over the whole window (idle, after). For context the same is taken for
the emulator process (API server, kubelet, ALB, host relays), PostgreSQL,
moto, this script (load generator + sampler) and the whole machine
(``/proc/stat``).

Not measured: there are no cgroups here, so no CPU throttling, no OOM kill,
no page-cache charge or kernel memory of a real container; ``working_set``
(what the kubelet and the HPA use) is close to the anonymous memory plus the
active file pages, i.e. between PSS and RSS. The load generator, the ALB,
PostgreSQL and moto share the machine's cores with the pod, so CPU under
load is what the pod got on a busy 2-core box, not what it would take if
unconstrained; throughput and latency depend on that too. No artifact
upload/download traffic (proxied artifacts would add buffer memory).

Run (as root: network and mount namespaces; about 3 minutes per
repetition)::

    PATH=$PWD/.tools/bin:$PWD/.venv/bin:$PATH .venv/bin/python benchmarks/pod_resources.py \\
        --repeat 3 [--json out.json] [--clients 8] [--duration 30] [--workers 4]

Everything (emulator, pods, namespaces, PostgreSQL, moto, temp
directories) is removed at the end, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import random
import re
import secrets
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import yaml  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from tasks.tls import ensure_certificates  # noqa: E402
from tests.support.kube_emulator import PodRuntime, kube_emulator, pods_unavailable, python_image  # noqa: E402
from tests.support.services import moto_server, postgres_server  # noqa: E402

console = Console()

CHART = REPO / "charts" / "mlflow"
HOST = "mlflow.bench.example.com"
NS = "ml-platform"
RELEASE = "mlflow"
ADMIN = "admin"
REGION = "us-west-2"
APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
IMAGE = f"ghcr.io/mlflow/mlflow:v{APP_VERSION}-full"
TICKS = os.sysconf("SC_CLK_TCK")
MB = 1024 * 1024


# ---------------------------------------------------------------- /proc reads


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return None


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of ``pid`` in clock ticks (threads included)."""
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)


def memory(pid: int) -> dict[str, int] | None:
    """RSS, PSS, anonymous PSS, USS and file-backed RSS of ``pid`` in bytes (PSS etc. 0 without smaps_rollup)."""
    status = _read(f"/proc/{pid}/status")
    if status is None:
        return None
    st = {k: int(v) * 1024 for k, v in re.findall(r"^(\w+):\s+(\d+) kB", status, re.M)}
    text = _read(f"/proc/{pid}/smaps_rollup")
    if text is None:
        return {"rss": st.get("VmRSS", 0), "pss": 0, "pss_anon": 0, "uss": 0, "rss_file": st.get("RssFile", 0)}
    kb = {k: int(v) * 1024 for k, v in re.findall(r"^(\w+):\s+(\d+) kB", text, re.M)}
    return {"rss": kb.get("Rss", 0), "pss": kb.get("Pss", 0), "pss_anon": kb.get("Pss_Anon", 0),
            "uss": kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0), "rss_file": st.get("RssFile", 0)}


def netns_pids(name: str) -> list[int]:
    """Processes in network namespace ``name`` (what ``ip netns pids NAME`` lists)."""
    try:
        target = os.stat(f"/run/netns/{name}")
    except OSError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if st.st_ino == target.st_ino and st.st_dev == target.st_dev:
            pids.append(int(entry))
    return pids


def find_pids(*needles: str) -> list[int]:
    """Processes whose argv contains every one of ``needles`` (as whole arguments)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        raw = _read(f"/proc/{entry}/cmdline")
        if raw and all(n in raw.split("\0") for n in needles):
            found.append(int(entry))
    return found


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            text = _read(f"/proc/{entry}/stat")
            if text and int(text[text.rindex(")") + 2:].split()[1]) == pid:
                out.append(int(entry))
    return out


def machine_busy_ticks() -> int:
    fields = [int(x) for x in (_read("/proc/stat") or "cpu 0").splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]) - idle


# ---------------------------------------------------------------- sampling


@dataclass
class Sample:
    t: float
    phase: str
    nproc: int
    rss: int
    pss: int
    pss_anon: int
    uss: int
    ws: int                               # est. working set: anonymous PSS + the largest file-backed RSS
    ticks: dict[int, int]                 # pod pid -> cpu ticks
    context: dict[str, dict[int, int]]    # group -> pid -> cpu ticks
    machine: int
    cores: float | None = None            # pod, since the previous sample
    context_cores: dict[str, float] = field(default_factory=dict)
    machine_cores: float | None = None


def _delta(a: dict[int, int], b: dict[int, int], seconds: float) -> float:
    common = a.keys() & b.keys()
    return sum(b[p] - a[p] for p in common) / TICKS / seconds if seconds > 0 else 0.0


class Sampler(threading.Thread):
    """Samples the pod (and the context processes) every ``interval`` seconds, labelled with ``phase``."""

    def __init__(self, netns: str, context: dict[str, Any], interval: float = 1.0) -> None:
        super().__init__(name="sampler", daemon=True)
        self.netns, self.context, self.interval = netns, context, interval
        self.phase = "start"
        self.samples: list[Sample] = []
        self._halt = threading.Event()

    def _context_pids(self) -> dict[str, list[int]]:
        return {name: (source() if callable(source) else list(source)) for name, source in self.context.items()}

    def take(self) -> Sample:
        pids = netns_pids(self.netns)
        mem = {"rss": 0, "pss": 0, "pss_anon": 0, "uss": 0}
        ticks = {}
        file_max = 0
        for pid in pids:
            m, c = memory(pid), cpu_ticks(pid)
            if m is None or c is None:
                continue
            for k in mem:
                mem[k] += m[k]
            file_max = max(file_max, m["rss_file"])
            ticks[pid] = c
        context = {}
        for name, group in self._context_pids().items():
            context[name] = {p: c for p in group if (c := cpu_ticks(p)) is not None}
        s = Sample(time.monotonic(), self.phase, len(ticks), mem["rss"], mem["pss"], mem["pss_anon"], mem["uss"],
                   mem["pss_anon"] + file_max, ticks, context, machine_busy_ticks())
        if self.samples:
            prev = self.samples[-1]
            seconds = s.t - prev.t
            s.cores = _delta(prev.ticks, s.ticks, seconds)
            s.context_cores = {k: _delta(prev.context.get(k, {}), v, seconds) for k, v in s.context.items()}
            s.machine_cores = (s.machine - prev.machine) / TICKS / seconds
        return s

    def run(self) -> None:
        next_at = time.monotonic()
        while not self._halt.is_set():
            self.samples.append(self.take())
            next_at += self.interval
            self._halt.wait(max(0.0, next_at - time.monotonic()))

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    def phase_samples(self, phase: str) -> list[Sample]:
        return [s for s in self.samples if s.phase == phase]


def _med(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def window_cores(samples: list[Sample]) -> tuple[float | None, dict[str, float]]:
    """Pod and context cores over a whole window (first to last sample)."""
    if len(samples) < 2:
        return None, {}
    a, b = samples[0], samples[-1]
    seconds = b.t - a.t
    return _delta(a.ticks, b.ticks, seconds), {k: _delta(a.context.get(k, {}), v, seconds) for k, v in b.context.items()}


def memory_summary(samples: list[Sample]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in ("rss", "pss", "pss_anon", "uss", "ws"):
        values = [getattr(s, key) / MB for s in samples]
        out[f"{key}_median_mb"] = _med(values)
        out[f"{key}_peak_mb"] = max(values) if values else None
    out["processes"] = _med([s.nproc for s in samples])
    return out


# ---------------------------------------------------------------- load


def percentile(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    k = max(0, math.ceil(p / 100 * len(sorted_values)) - 1)
    return sorted_values[k]


@dataclass
class LoadResult:
    seconds: float
    latencies: dict[str, list[float]]
    statuses: dict[str, int]
    errors: list[str]

    def summary(self) -> dict[str, Any]:
        every = sorted(v for vs in self.latencies.values() for v in vs)
        ok = sum(n for code, n in self.statuses.items() if code.startswith("2"))
        return {
            "requests": len(every), "ok": ok, "statuses": self.statuses, "errors": len(self.errors),
            "error_examples": self.errors[:5],
            "requests_per_s": len(every) / self.seconds if self.seconds else None,
            "p50_ms": (percentile(every, 50) or 0) * 1000, "p95_ms": (percentile(every, 95) or 0) * 1000,
            "p99_ms": (percentile(every, 99) or 0) * 1000,
            "per_endpoint_p50_ms": {k: percentile(sorted(v), 50) * 1000 for k, v in self.latencies.items() if v},
            "per_endpoint_p95_ms": {k: percentile(sorted(v), 95) * 1000 for k, v in self.latencies.items() if v},
        }


class Api:
    """MLflow REST calls through the ALB (TLS to the ALB's IP, SNI and Host = the ingress host)."""

    def __init__(self, alb_ip: str, ca: Path, password: str) -> None:
        self.base = f"https://{alb_ip}"
        self.context = ssl.create_default_context(cafile=str(ca))
        self.password = password

    def client(self, timeout: float = 30) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base, verify=self.context, auth=(ADMIN, self.password),
                                 headers={"Host": HOST}, timeout=timeout,
                                 limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))

    @staticmethod
    async def call(client: httpx.AsyncClient, method: str, path: str, **kw: Any) -> httpx.Response:
        return await client.request(method, path, extensions={"sni_hostname": HOST}, **kw)


async def _client_loop(api: Api, experiment_id: str, deadline: float, result: LoadResult, index: int) -> None:
    rng = random.Random(index)
    async with api.client() as client:
        async def timed(name: str, method: str, path: str, **kw: Any) -> dict | None:
            started = time.perf_counter()
            try:
                r = await api.call(client, method, "/api/2.0/mlflow/" + path, **kw)
            except httpx.HTTPError as exc:
                result.errors.append(f"{name}: {type(exc).__name__}: {exc}")
                result.statuses["exception"] = result.statuses.get("exception", 0) + 1
                return None
            result.latencies.setdefault(name, []).append(time.perf_counter() - started)
            code = str(r.status_code)
            result.statuses[code] = result.statuses.get(code, 0) + 1
            if r.status_code >= 300:
                result.errors.append(f"{name}: {r.status_code} {r.text[:200]}")
                return None
            return r.json()

        n = 0
        while time.monotonic() < deadline:
            n += 1
            now_ms = int(time.time() * 1000)
            created = await timed("runs/create", "POST", "runs/create",
                                  json={"experiment_id": experiment_id, "start_time": now_ms,
                                        "run_name": f"bench-{index}-{n}"})
            if not created:
                await asyncio.sleep(0.2)
                continue
            run_id = created["run"]["info"]["run_id"]
            for step in (0, 1):
                batch: dict[str, Any] = {
                    "run_id": run_id,
                    "metrics": [{"key": f"m{i}", "value": rng.random(), "timestamp": now_ms + step, "step": step}
                                for i in range(10)],
                }
                if step == 0:
                    batch["params"] = [{"key": f"p{i}", "value": str(rng.randint(0, 10**6))} for i in range(5)]
                    batch["tags"] = [{"key": "client", "value": str(index)}, {"key": "bench", "value": "pod_resources"}]
                await timed("runs/log-batch", "POST", "runs/log-batch", json=batch)
            await timed("runs/search", "POST", "runs/search",
                        json={"experiment_ids": [experiment_id], "max_results": 20,
                              "order_by": ["attributes.start_time DESC"]})
            await timed("experiments/get", "GET", "experiments/get", params={"experiment_id": experiment_id})
            await timed("runs/update", "POST", "runs/update",
                        json={"run_id": run_id, "status": "FINISHED", "end_time": int(time.time() * 1000)})


def run_load(api: Api, experiment_id: str, clients: int, duration: float) -> LoadResult:
    result = LoadResult(seconds=duration, latencies={}, statuses={}, errors=[])

    async def main() -> None:
        deadline = time.monotonic() + duration
        started = time.monotonic()
        await asyncio.gather(*(_client_loop(api, experiment_id, deadline, result, i) for i in range(clients)))
        result.seconds = time.monotonic() - started  # includes the requests still in flight at the deadline

    asyncio.run(main())
    return result


# ---------------------------------------------------------------- cluster


@dataclass
class Shared:
    """What all repetitions share: PostgreSQL, moto (S3, STS, IAM), the ALB's certificate."""

    postgres: Any
    moto: Any
    bucket: str
    role_arn: str
    tls: Any
    tmp: Path


def setup_shared(stack: ExitStack, tmp: Path) -> Shared:
    postgres = stack.enter_context(postgres_server())
    moto = stack.enter_context(moto_server())
    import boto3

    def client(service: str) -> Any:  # moto's dummy keys, given here only (the pod uses IRSA)
        return boto3.client(service, region_name=REGION, endpoint_url=moto.endpoint_url,
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    bucket = f"mlflow-bench-{int(time.time())}"
    client("s3").create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRoleWithWebIdentity",
             "Principal": {"Federated": "arn:aws:iam::123456789012:oidc-provider/oidc.eks"}}]}
    role_arn = client("iam").create_role(RoleName=f"mlflow-bench-{int(time.time())}",
                                              AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
    tls = ensure_certificates(tmp / "alb-tls", [HOST])
    return Shared(postgres, moto, bucket, role_arn, tls, tmp)


def helm_binary() -> str:
    found = shutil.which("helm") or str(REPO / ".tools" / "bin" / "helm")
    if not Path(found).exists():
        raise SystemExit("helm not found: run scripts/setup.sh (or put .tools/bin on PATH)")
    return found


def chart_values(shared: Shared, db_uri: str, gateway: str, password: str, workers: int) -> dict[str, Any]:
    """Production values, one replica without HPA, chart-made Secret (PostgreSQL URIs through the gateway)."""
    return {
        "existingSecret": "",
        "secret": {"create": True, "backendStoreUri": db_uri, "authDatabaseUri": db_uri,
                   "adminPassword": password, "flaskSecretKey": secrets.token_urlsafe(32)},
        "image": {"tag": ""},
        "replicaCount": 1,
        "autoscaling": {"enabled": False},
        "auth": {"enabled": True, "adminUsername": ADMIN},
        "mlflow": {"workers": workers, "jobExecution": False},
        "artifacts": {"destination": f"s3://{shared.bucket}/mlflow-artifacts",
                      "s3EndpointUrl": f"http://{gateway}:{shared.moto.port}"},
        "aws": {"region": REGION},
        "serviceAccount": {"create": True, "irsaRoleArn": shared.role_arn},
        "ingress": {"enabled": True, "className": "alb", "hosts": [HOST], "certificateArn": ""},
    }


def server_pod(kube: Any) -> dict | None:
    for pod in kube.control.objects("Pod", NS) or []:
        labels = pod["metadata"].get("labels") or {}
        if labels.get("app.kubernetes.io/component") != "server":
            continue
        ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                    for c in (pod.get("status") or {}).get("conditions") or [])
        if ready and (pod.get("status") or {}).get("podIP"):
            return pod
    return None


async def _wait_serving(api: Api, timeout: float) -> str:
    """Until /health is 200 through the ALB and an authenticated call works; returns a fresh experiment id."""
    deadline = time.monotonic() + timeout
    last = ""
    async with api.client(timeout=10) as client:
        while time.monotonic() < deadline:
            try:
                r = await api.call(client, "GET", "/health")
                if r.status_code == 200 and "awselb" not in r.headers.get("server", ""):
                    r = await api.call(client, "POST", "/api/2.0/mlflow/experiments/create",
                                       json={"name": f"pod-resources-{secrets.token_hex(4)}"})
                    if r.status_code == 200:
                        return r.json()["experiment_id"]
                last = f"{r.status_code} {r.text[:200]}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(0.5)
    raise TimeoutError(f"MLflow not serving through the ALB after {timeout:.0f}s: {last}")


def context_sources(kube: Any, shared: Shared) -> dict[str, Any]:
    """Processes whose CPU is recorded for context (re-resolved per sample where they come and go)."""
    emulator = find_pids("tests.support.kube_emulator", str(kube.directory))
    moto = find_pids("-p", str(shared.moto.port))
    postmaster = int((_read(str(shared.postgres.data_dir / "postmaster.pid")) or "0\n").split()[0])
    return {
        "emulator": emulator,
        "postgres": lambda: [postmaster, *children_of(postmaster)] if postmaster else [],
        "moto": moto,
        "loadgen": [os.getpid()],
    }


def one_repetition(index: int, shared: Shared, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"repetition": index + 1, "loadavg_start": os.getloadavg()}
    tmp = Path(tempfile.mkdtemp(prefix=f"rep{index + 1}-", dir=shared.tmp))
    runtime = PodRuntime(images={}, host_ports=[shared.postgres.port, shared.moto.port], backoff_seconds=2.0)
    gateway = runtime.gateway
    runtime.images[IMAGE] = python_image(env={"AWS_ENDPOINT_URL_STS": f"http://{gateway}:{shared.moto.port}"})
    alb_ip = f"127.{random.randint(64, 250)}.{random.randint(1, 250)}.{random.randint(2, 250)}"
    runtime.alb = {"host": alb_ip, "https_port": 443, "cert": str(shared.tls.server_cert),
                   "key": str(shared.tls.server_key), "interval": 5.0}
    db_name = f"mlflow_bench_{os.getpid()}_{index}_{int(time.time())}"
    db = shared.postgres.create_database(db_name)
    db_uri = re.sub(r"@[^:/]+:", f"@{gateway}:", db, count=1)
    password = "Bench-" + secrets.token_urlsafe(18)
    api = Api(alb_ip, shared.tls.ca_cert, password)
    try:
        with kube_emulator(tmp / "kube", pods=runtime) as kube:
            values = tmp / "values.yaml"
            values.write_text(yaml.safe_dump(chart_values(shared, db_uri, gateway, password, args.workers)))
            os.chmod(values, 0o600)
            started = time.monotonic()
            console.print(f"[bold]repetition {index + 1}[/]: helm install (load average {_loadavg()})")
            r = subprocess.run([helm_binary(), "upgrade", "--install", RELEASE, str(CHART), "-n", NS,
                                "--create-namespace", "-f", str(CHART / "values-production.yaml"), "-f", str(values),
                                "--wait", "--timeout", "6m"],
                               capture_output=True, text=True, env=kube.env(), timeout=420)
            if r.returncode != 0:
                raise RuntimeError(f"helm install failed:\n{r.stderr[-3000:]}\n--- emulator ---\n{kube.log_tail()}")
            out["helm_install_s"] = time.monotonic() - started
            pod = kube.control.wait_for(lambda: server_pod(kube), timeout=120, interval=0.5, what="a Ready server pod")
            experiment_id = asyncio.run(_wait_serving(api, timeout=120))
            out["ready_s"] = time.monotonic() - started
            netns = f"{runtime.prefix}-{pod['status']['podIP'].rsplit('.', 1)[1]}"
            console.print(f"  serving after {out['ready_s']:.1f} s (pod {pod['metadata']['name']}, netns {netns}, "
                          f"{len(netns_pids(netns))} processes); idle {args.settle:.0f}+{args.idle_window:.0f} s")

            sampler = Sampler(netns, context_sources(kube, shared))
            sampler.phase = "settle"
            sampler.start()
            try:
                time.sleep(args.settle)
                sampler.phase = "idle"
                time.sleep(args.idle_window)
                sampler.phase = "load-ramp"
                console.print(f"  load: {args.clients} clients x {args.duration:.0f} s (load average {_loadavg()})")
                ramp = threading.Timer(args.ramp, lambda: setattr(sampler, "phase", "load"))
                ramp.start()
                load = run_load(api, experiment_id, args.clients, args.duration)
                ramp.cancel()
                sampler.phase = "cooldown"
                console.print(f"  cool-down {args.cooldown:.0f}+{args.idle_window:.0f} s")
                time.sleep(args.cooldown)
                sampler.phase = "after"
                time.sleep(args.idle_window)
            finally:
                sampler.stop()
            out.update(summarise(sampler, load))
            out["processes"] = [_describe(p) for p in netns_pids(netns)]
    finally:
        try:
            shared.postgres.drop_database(db_name)
        except Exception as exc:  # noqa: BLE001 (cleanup must go on)
            console.print(f"[yellow]could not drop {db_name}: {exc}[/]")
        shutil.rmtree(tmp, ignore_errors=True)
    out["loadavg_end"] = os.getloadavg()
    return out


def _describe(pid: int) -> str:
    argv = (_read(f"/proc/{pid}/cmdline") or "").split("\0")
    m = memory(pid) or {}
    return f"{pid} rss={m.get('rss', 0) / MB:.0f}MB pss={m.get('pss', 0) / MB:.0f}MB {' '.join(argv)[:120]}"


def summarise(sampler: Sampler, load: LoadResult) -> dict[str, Any]:
    idle, ramp, loaded, after = (sampler.phase_samples(p) for p in ("idle", "load-ramp", "load", "after"))
    idle_cores, idle_context = window_cores(idle)
    after_cores, _ = window_cores(after)
    load_samples = [s for s in loaded if s.cores is not None]
    mem_load = memory_summary(loaded)
    # peaks over the whole load, ramp included
    for key in ("rss", "pss", "pss_anon", "uss", "ws"):
        values = [getattr(s, key) / MB for s in ramp + loaded]
        mem_load[f"{key}_peak_mb"] = max(values) if values else None
    context_names = sorted({k for s in load_samples for k in s.context_cores})
    return {
        "idle": {**memory_summary(idle), "cores": idle_cores, "context_cores": idle_context,
                 "machine_cores": _med([s.machine_cores for s in idle])},
        "load": {
            **mem_load,
            "cores_median": _med([s.cores for s in load_samples]),
            "cores_p90": percentile(sorted(s.cores for s in load_samples), 90),
            "cores_max": max((s.cores for s in load_samples), default=None),
            "context_cores_median": {k: _med([s.context_cores.get(k) for s in load_samples]) for k in context_names},
            "machine_cores_median": _med([s.machine_cores for s in load_samples]),
            **load.summary(),
        },
        "after": {**memory_summary(after), "cores": after_cores},
        "samples": [{"t": round(s.t - sampler.samples[0].t, 2), "phase": s.phase, "nproc": s.nproc,
                     "rss_mb": round(s.rss / MB, 1), "pss_mb": round(s.pss / MB, 1),
                     "pss_anon_mb": round(s.pss_anon / MB, 1), "uss_mb": round(s.uss / MB, 1), "ws_mb": round(s.ws / MB, 1),
                     "cores": None if s.cores is None else round(s.cores, 3),
                     "machine_cores": None if s.machine_cores is None else round(s.machine_cores, 3),
                     "context_cores": {k: round(v, 3) for k, v in s.context_cores.items()}}
                    for s in sampler.samples],
    }


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ---------------------------------------------------------------- report

ROWS: list[tuple[str, tuple[str, ...], str]] = [
    ("idle RSS (MB)", ("idle", "rss_median_mb"), "{:.0f}"),
    ("idle PSS (MB)", ("idle", "pss_median_mb"), "{:.0f}"),
    ("idle anon PSS (MB)", ("idle", "pss_anon_median_mb"), "{:.0f}"),
    ("idle est. working set (MB)", ("idle", "ws_median_mb"), "{:.0f}"),
    ("idle CPU (cores)", ("idle", "cores"), "{:.3f}"),
    ("load RSS median (MB)", ("load", "rss_median_mb"), "{:.0f}"),
    ("load RSS peak (MB)", ("load", "rss_peak_mb"), "{:.0f}"),
    ("load PSS median (MB)", ("load", "pss_median_mb"), "{:.0f}"),
    ("load PSS peak (MB)", ("load", "pss_peak_mb"), "{:.0f}"),
    ("load anon PSS median (MB)", ("load", "pss_anon_median_mb"), "{:.0f}"),
    ("load est. working set median (MB)", ("load", "ws_median_mb"), "{:.0f}"),
    ("load est. working set peak (MB)", ("load", "ws_peak_mb"), "{:.0f}"),
    ("load CPU median of 1 s (cores)", ("load", "cores_median"), "{:.2f}"),
    ("load CPU p90 of 1 s (cores)", ("load", "cores_p90"), "{:.2f}"),
    ("load CPU max of 1 s (cores)", ("load", "cores_max"), "{:.2f}"),
    ("requests/s", ("load", "requests_per_s"), "{:.1f}"),
    ("p50 latency (ms)", ("load", "p50_ms"), "{:.0f}"),
    ("p95 latency (ms)", ("load", "p95_ms"), "{:.0f}"),
    ("non-2xx + errors", ("load", "errors"), "{:.0f}"),
    ("machine busy under load (cores)", ("load", "machine_cores_median"), "{:.2f}"),
    ("  emulator+ALB (cores)", ("load", "context_cores_median", "emulator"), "{:.2f}"),
    ("  PostgreSQL (cores)", ("load", "context_cores_median", "postgres"), "{:.2f}"),
    ("  moto (cores)", ("load", "context_cores_median", "moto"), "{:.2f}"),
    ("  load generator (cores)", ("load", "context_cores_median", "loadgen"), "{:.2f}"),
    ("after-load RSS (MB)", ("after", "rss_median_mb"), "{:.0f}"),
    ("after-load PSS (MB)", ("after", "pss_median_mb"), "{:.0f}"),
    ("after-load CPU (cores)", ("after", "cores"), "{:.3f}"),
    ("pod processes", ("load", "processes"), "{:.0f}"),
    ("install to serving (s)", ("ready_s",), "{:.1f}"),
]


def _get(rep: dict, path: tuple[str, ...]) -> float | None:
    value: Any = rep
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value if isinstance(value, (int, float)) else None


def report(reps: list[dict]) -> dict[str, float | None]:
    table = Table(title=f"charts/mlflow pod, {len(reps)} repetition(s): medians")
    table.add_column("measure")
    table.add_column("median", justify="right")
    table.add_column("per repetition")
    medians: dict[str, float | None] = {}
    for label, path, fmt in ROWS:
        values = [_get(r, path) for r in reps]
        med = _med(values)
        medians[".".join(path)] = med
        table.add_row(label, "-" if med is None else fmt.format(med),
                      ", ".join("-" if v is None else fmt.format(v) for v in values))
    console.print(table)
    return medians


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3, help="repetitions, each a fresh install (default 3)")
    p.add_argument("--json", type=Path, help="write the figures (and every sample) here")
    p.add_argument("--workers", type=int, default=4, help="mlflow.workers (default 4)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--duration", type=float, default=30, help="seconds of load (default 30)")
    p.add_argument("--ramp", type=float, default=3, help="first seconds of load left out of the medians (default 3)")
    p.add_argument("--settle", type=float, default=20, help="idle seconds before the idle samples (default 20)")
    p.add_argument("--idle-window", type=float, default=10, help="seconds of idle samples (default 10)")
    p.add_argument("--cooldown", type=float, default=15, help="quiet seconds after the load (default 15)")
    args = p.parse_args()
    reason = pods_unavailable()
    if reason:
        console.print(f"[red]cannot run pods here: {reason}[/]")
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM):  # both clean up like Ctrl-C (also when started with &)
        signal.signal(sig, signal.default_int_handler)
    started = time.monotonic()
    header = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
              "loadavg_start": os.getloadavg(), "chart_app_version": APP_VERSION, "helm": helm_binary(),
              "args": {k: str(v) for k, v in vars(args).items()}}
    console.print(f"load average at start: {_loadavg()} ({os.cpu_count()} CPUs)")
    stack = ExitStack()
    tmp = Path(tempfile.mkdtemp(prefix="pod-resources-"))
    stack.callback(shutil.rmtree, tmp, ignore_errors=True)
    reps: list[dict] = []
    try:
        shared = setup_shared(stack, tmp)
        for i in range(args.repeat):
            reps.append(one_repetition(i, shared, args))
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; cleaning up[/]")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut cleanup short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.close()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    header["loadavg_end"] = os.getloadavg()
    header["wall_s"] = time.monotonic() - started
    medians = report(reps)
    console.print(f"load average at end: {_loadavg()}; wall {header['wall_s']:.0f} s")
    if reps:
        console.print("pod processes (last repetition, at the end):")
        for line in reps[-1].get("processes", []):
            console.print(f"  {line}", markup=False, highlight=False)
    if args.json:
        args.json.write_text(json.dumps({**header, "medians": medians, "repetitions": reps}, indent=2))
        console.print(f"figures in {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
