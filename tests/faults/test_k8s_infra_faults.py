"""Fault matrix, kubernetes target: the infrastructure misbehaves under a real rollout.

Issue 8 item 6, the faults that belong to the cluster and the cloud. Each test
drives the real CLI (``mlflow-rollout rollout``) against the emulated cluster
of ``tests/support/k8s_world.py`` — the pinned helm 4, the Kubernetes API
emulator, moto_server, PostgreSQL, a dnslib resolver and a real MLflow with
basic-auth behind the load balancer's name — breaks one thing, and asserts
the outcome: success after retry, or a failed run that names the cause in its
final line with the last good **auth-on** revision still serving (the newest
helm revision deployed with ``auth.enabled: true``, anonymous requests
answered 401, the data canary intact).

How each fault is made:

=============================  ==================================================
Kubernetes API 500 / 429       the emulator's ``POST /_emulator/faults`` (a
                               ``metav1.Status`` answer, ``Retry-After`` for 429)
helm killed mid-upgrade        SIGKILL of the CLI's own ``helm upgrade`` child
                               while the release is ``pending-upgrade``
crash loops, failing           on running pods: tests/test_kubernetes_rollout.py
migration Jobs
S3 AccessDenied                an AWS proxy in front of moto answers S3's own
                               ``AccessDenied`` for the artifact bucket (moto
                               enforces IAM only with auth switched on for the
                               whole server, which breaks Route53 and every
                               other client there)
Route53 throttling             the same proxy answers Route53's ``Throttling``
                               (400 ``<ErrorResponse>``) for the first N
                               ChangeResourceRecordSets calls
=============================  ==================================================

The environment's ``aws.endpoint_url`` is the proxy from the first rollout on
(it is part of the chart values, so switching it later would make a new
revision); without a rule the proxy passes everything through to moto.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from tests.support.kube_emulator import kube_emulator
from tests.support.rollout import CLI, Sandbox
from tests.support.k8s_world import (  # noqa: F401  (world is a fixture used by this module)
    ADMIN_PW,
    FLASK_KEY,
    HOST,
    LB,
    NS,
    STARTUP_LOG,
    WORKERS,
    _artifacts,
    _environment,
    _helm,
    _history,
    _sandbox,
    world,
)

pytestmark = pytest.mark.e2e

HELM = "helm4"
HELM_TIMEOUT = 30  # seconds of `helm --wait` before a stuck upgrade counts as failed (the settings minimum)


# ----------------------------------------------------------------- AWS fault proxy
@dataclass
class _Rule:
    name: str
    match: Callable[[str, str], bool]  # (method, path) -> bool
    status: int
    body: bytes
    headers: dict[str, str]
    remaining: int | None  # None: until removed
    served: int = 0


@dataclass
class AwsFaultProxy:
    """An HTTP proxy in front of moto_server that answers chosen AWS requests with AWS errors."""

    upstream: str
    rules: list[_Rule] = field(default_factory=list)
    seen: list[tuple[str, str, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def add(self, rule: _Rule) -> _Rule:
        with self.lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()
            self.seen.clear()

    def take(self, method: str, path: str) -> _Rule | None:
        with self.lock:
            for rule in self.rules:
                if (rule.remaining is None or rule.remaining > 0) and rule.match(method, path):
                    if rule.remaining is not None:
                        rule.remaining -= 1
                    rule.served += 1
                    return rule
        return None

    def throttle_route53_changes(self, count: int | None) -> _Rule:
        """Route53's throttling answer for ChangeResourceRecordSets (``None``: every call)."""
        body = (
            '<?xml version="1.0"?>\n<ErrorResponse xmlns="https://route53.amazonaws.com/doc/2013-04-01/">'
            "<Error><Type>Sender</Type><Code>Throttling</Code><Message>Rate exceeded</Message></Error>"
            f"<RequestId>{uuid.uuid4()}</RequestId></ErrorResponse>"
        ).encode()
        return self.add(_Rule(
            "route53-throttling",
            lambda m, p: m == "POST" and re.fullmatch(r"/2013-04-01/hostedzone/[^/]+/rrset/?", p) is not None,
            400, body, {"Content-Type": "text/xml"}, count,
        ))

    def deny_bucket(self, bucket: str) -> _Rule:
        """S3's AccessDenied for every request on ``bucket`` (path-style, as boto3 sends to an IP endpoint)."""
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code><Message>Access Denied</Message>'
            f"<RequestId>{uuid.uuid4().hex[:16].upper()}</RequestId><HostId>proxy</HostId></Error>"
        ).encode()
        return self.add(_Rule(
            "s3-access-denied", lambda m, p: p == f"/{bucket}" or p.startswith(f"/{bucket}/"),
            403, body, {"Content-Type": "application/xml"}, None,
        ))


def _proxy_handler(proxy: AwsFaultProxy) -> type[BaseHTTPRequestHandler]:
    up = urlsplit(proxy.upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = bytearray()
                while True:
                    size = int(self.rfile.readline().strip().split(b";")[0] or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _serve(self) -> None:
            body = self._body()
            path = self.path.split("?", 1)[0]
            rule = proxy.take(self.command, path)
            if rule is not None:
                status, headers, payload = rule.status, dict(rule.headers), rule.body
                if self.command == "HEAD":
                    payload = b""
            else:
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
                try:
                    fwd = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "connection")}
                    fwd["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=fwd)
                    resp = conn.getresponse()
                    payload = resp.read()
                    status = resp.status
                    headers = {k: v for k, v in resp.getheaders()
                               if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date")}
                finally:
                    conn.close()
            with proxy.lock:
                proxy.seen.append((self.command, path, status))
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _serve

    return Handler


@contextmanager
def aws_fault_proxy(upstream: str) -> Iterator[AwsFaultProxy]:
    proxy = AwsFaultProxy(upstream)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _proxy_handler(proxy))
    server.daemon_threads = True
    proxy.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


# ----------------------------------------------------------------- the shared cluster
@dataclass
class Faulty:
    kube: object
    box: Sandbox
    proxy: AwsFaultProxy
    world: tuple
    canary: dict

    @property
    def env_path(self) -> Path:
        return self.box.env_dir / "prod.yaml"

    def rollout(self) -> tuple[int, str, str]:
        """Run ``mlflow-rollout rollout``: exit code, all output, and the final line it printed."""
        r = self.box.cli("rollout", "--env", "prod")
        out = r.stdout + r.stderr
        self.assert_no_secret(out)
        return r.returncode, out, _final_message(r.stdout)

    def assert_no_secret(self, out: str) -> None:
        cloud = self.world[0]
        db_password = cloud.db_uri.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
        for secret in (ADMIN_PW, FLASK_KEY, db_password):
            assert secret not in out, "a secret was printed"

    def faults(self, **rule) -> None:
        self.kube.control._call("POST", "faults", rule)  # EmulatorControl has no helper for it (yet)

    def fault_requests(self, status: int) -> list[dict]:
        return [r for r in self.kube.control.requests() if r["status"] == status]

    @contextmanager
    def changed_settings(self, **mlflow) -> Iterator[None]:
        """A new pod template for the next rollout (so deploy-auth really upgrades)."""
        original = self.env_path.read_text()
        data = yaml.safe_load(original)
        data["mlflow"].update(mlflow)
        self.env_path.write_text(yaml.safe_dump(data, sort_keys=False))
        try:
            yield
        finally:
            self.env_path.write_text(original)


def _final_message(stdout: str) -> str:
    """What the CLI printed last: from its final ``failed:``/``bad input:`` line to the end.

    Its first line must name the cause; what follows (if anything) is the
    wrapped rest of a long third-party message (helm's stderr).
    """
    lines = stdout.rstrip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith(("failed:", "bad input:")):
            return "\n".join(lines[i:])
    return lines[-1] if lines else ""


def _lb_client(server) -> httpx.Client:
    return httpx.Client(base_url=f"https://127.0.0.1:{server.port}", verify=ssl.create_default_context(cafile=str(server.ca)),
                        headers={"Host": HOST}, timeout=15)


def _lb(server, method: str, path: str, *, auth: bool = True, **kw) -> httpx.Response:
    with _lb_client(server) as client:
        return client.request(method, path, auth=("admin", ADMIN_PW) if auth else None,
                              extensions={"sni_hostname": HOST}, **kw)


def _make_canary(server) -> dict:
    """A run with a metric and an artifact, logged through the server before any fault."""
    name = f"fault-canary-{uuid.uuid4().hex[:8]}"
    exp = _lb(server, "POST", "/api/2.0/mlflow/experiments/create", json={"name": name})
    assert exp.status_code == 200, exp.text
    exp_id = exp.json()["experiment_id"]
    run = _lb(server, "POST", "/api/2.0/mlflow/runs/create", json={"experiment_id": exp_id, "start_time": 0})
    assert run.status_code == 200, run.text
    info = run.json()["run"]["info"]
    metric = _lb(server, "POST", "/api/2.0/mlflow/runs/log-metric",
                 json={"run_id": info["run_id"], "key": "canary", "value": 42.0, "timestamp": 0, "step": 0})
    assert metric.status_code == 200, metric.text
    proxied = info["artifact_uri"].removeprefix("mlflow-artifacts:").lstrip("/")
    put = _lb(server, "PUT", f"/api/2.0/mlflow-artifacts/artifacts/{proxied}/canary.txt", content=b"canary data\n")
    assert put.status_code == 200, put.text
    return {"run_id": info["run_id"], "artifact": f"{proxied}/canary.txt"}


def _assert_serving_auth_on(f: Faulty) -> None:
    """The newest helm revision is deployed with auth on; anonymous → 401; the canary is intact."""
    history = _history(f.kube, HELM)
    newest = history[-1]
    assert newest["status"] == "deployed", history
    values = json.loads(_helm(f.kube, HELM, "get", "values", "mlflow", "-n", NS, "-o", "json"))
    assert values["auth"]["enabled"] is True, f"revision {newest['revision']} runs with auth off"
    assert values["mlflow"]["workers"] == WORKERS  # the good settings, not the faulty attempt's
    deployment = f.kube.control.object("Deployment", "mlflow", NS)
    status = deployment["status"]
    assert status.get("availableReplicas", 0) >= deployment["spec"]["replicas"], status
    server = f.world[1]
    anonymous = _lb(server, "GET", "/api/2.0/mlflow/experiments/search?max_results=1", auth=False)
    assert anonymous.status_code == 401, anonymous.status_code
    run = _lb(server, "GET", "/api/2.0/mlflow/runs/get", params={"run_id": f.canary["run_id"]})
    assert run.status_code == 200 and run.json()["run"]["data"]["metrics"][0]["value"] == 42.0, run.text
    art = _lb(server, "GET", f"/api/2.0/mlflow-artifacts/artifacts/{f.canary['artifact']}")
    assert art.status_code == 200 and art.content == b"canary data\n", art.status_code


@pytest.fixture(scope="module")
def faulty(world, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faulty]:
    """One emulated cluster with a good production rollout (revisions 1 and 2), reached through the AWS proxy."""
    cloud, server, dns, _, api = world
    tmp = tmp_path_factory.mktemp("faults-k8s")
    with aws_fault_proxy(cloud.moto.endpoint_url) as proxy, kube_emulator(tmp / "kube") as kube:
        kube.control.set_ingress_hostname(LB)
        kube.control.set_logs(STARTUP_LOG, deployment="mlflow", namespace=NS)
        box = _sandbox(tmp, api)
        _environment(box, "prod", kube, world, helm=HELM, extra={
            "kubernetes": {"helm_timeout_seconds": HELM_TIMEOUT},
            # seconds between dns attempts: the Route53 throttling tests wait through them
            "aws": {"endpoint_url": proxy.url, "dns_retry_delay_seconds": [2, 4]},
        })
        r = box.cli("rollout", "--env", "prod")
        assert r.returncode == 0, (r.stdout + r.stderr)[-5000:] + "\n--- emulator ---\n" + kube.log_tail()
        f = Faulty(kube, box, proxy, world, _make_canary(server))
        _assert_serving_auth_on(f)
        yield f


@pytest.fixture
def f(faulty: Faulty) -> Iterator[Faulty]:
    """The shared cluster, with every knob and proxy rule back to normal after the test."""
    faulty.kube.control.reset()
    faulty.kube.control.set_ingress_hostname(LB)
    faulty.kube.control.set_logs(STARTUP_LOG, deployment="mlflow", namespace=NS)
    faulty.proxy.clear()
    try:
        yield faulty
    finally:
        faulty.faults(clear=True)
        faulty.kube.control.reset()
        faulty.kube.control.set_ingress_hostname(LB)
        faulty.kube.control.set_logs(STARTUP_LOG, deployment="mlflow", namespace=NS)
        faulty.proxy.clear()


# ----------------------------------------------------------------- 1. Kubernetes API 500 / 429
def _api(f: Faulty, method: str, path: str) -> tuple[int, dict[str, str], dict]:
    req = urllib.request.Request(f.kube.url + path, method=method, headers={"Authorization": f"Bearer {f.kube.token}"})
    context = ssl.create_default_context(cafile=str(f.kube.ca_path))
    try:
        with urllib.request.urlopen(req, context=context, timeout=10) as resp:
            return resp.status, dict(resp.headers), _json_or_text(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), _json_or_text(exc.read())


def _json_or_text(raw: bytes) -> dict:
    try:
        return json.loads(raw or b"{}")
    except ValueError:
        return {"text": raw.decode(errors="replace")}


def test_emulator_fault_knob_answers_like_an_api_server(f: Faulty) -> None:
    """The knob itself: Status bodies, Retry-After, counts, method and path filters, never the probes."""
    f.faults(status=429, count=1, path_regex=r"^/api/v1/namespaces/default$", retry_after=2)
    code, headers, body = _api(f, "GET", "/api/v1/namespaces/default")
    assert code == 429 and headers.get("Retry-After") == "2"
    assert body["kind"] == "Status" and body["reason"] == "TooManyRequests" and body["code"] == 429
    assert body["details"]["retryAfterSeconds"] == 2
    assert _api(f, "GET", "/api/v1/namespaces/default")[0] == 200  # used up

    f.faults(status=500, count=-1, methods=["DELETE"])
    assert _api(f, "GET", "/api/v1/namespaces/default")[0] == 200  # other methods pass
    code, headers, body = _api(f, "DELETE", f"/api/v1/namespaces/{NS}/configmaps/none")
    assert code == 500 and body["reason"] == "InternalError" and "Retry-After" not in headers
    knobs = f.kube.control.knobs()["faults"]
    assert [(k["status"], k["remaining"], k["served"]) for k in knobs] == [(429, 0, 1), (500, None, 1)]

    f.faults(status=503, count=-1)  # everything fails ...
    code, headers, body = _api(f, "GET", "/api/v1/namespaces")
    assert code == 503 and body["reason"] == "ServiceUnavailable"
    assert _api(f, "GET", "/readyz")[0] == 200  # ... except the probes and the control API
    assert _api(f, "GET", "/_emulator/knobs")[0] == 200
    f.faults(clear=True)
    assert f.kube.control.knobs()["faults"] == []
    with pytest.raises(RuntimeError, match="status"):
        f.faults(status=200)


def test_api_429_burst_is_absorbed_and_the_rollout_succeeds(f: Faulty) -> None:
    """Priority-and-fairness throttling: each reader (helm's client-go, the Python client) waits Retry-After."""
    f.faults(status=429, count=3, methods=["GET"], retry_after=1)
    code, out, _ = f.rollout()
    assert code == 0, out[-5000:]
    assert len(f.fault_requests(429)) == 3  # the burst was really served
    for stage in ("preflight", "secrets", "deploy-auth", "dns", "smoke-auth", "smoke-logging"):
        assert f"completed {stage}" in out, stage
    _assert_serving_auth_on(f)


def test_api_longer_429_burst_is_absorbed(f: Faulty) -> None:
    """Eight 429s in a row on reads: more than urllib3's default budget of 3 retries per call."""
    f.faults(status=429, count=8, methods=["GET"], retry_after=1)
    code, out, _ = f.rollout()
    assert len(f.fault_requests(429)) == 8
    assert code == 0, out[-5000:]
    _assert_serving_auth_on(f)


#: The preflight's first API call: a SelfSubjectAccessReview per permission the rollout needs (namespaced only).
_ACCESS_REVIEW = r"^/apis/authorization\.k8s\.io/v1/selfsubjectaccessreviews$"


def test_api_500_burst_is_retried_and_the_rollout_succeeds(f: Faulty) -> None:
    """Two 500s on the preflight's API check: absorbed by the client's bounded retry policy; the run succeeds."""
    f.faults(status=500, count=2, path_regex=_ACCESS_REVIEW, methods=["POST"])
    code, out, _ = f.rollout()
    assert code == 0, out[-5000:]
    assert len(f.fault_requests(500)) == 2
    assert "completed preflight" in out, out[-3000:]
    _assert_serving_auth_on(f)


def test_api_500_burst_on_helm_storage_is_retried(f: Faulty) -> None:
    """One 500 on helm's release-storage list (what every helm command reads first)."""
    f.faults(status=500, count=1, path_regex=rf"^/api/v1/namespaces/{NS}/secrets$", query_regex=r"owner(%3D|=)helm",
             methods=["GET"])
    code, out, _ = f.rollout()
    assert len(f.fault_requests(500)) == 1
    assert code == 0, out[-5000:]
    _assert_serving_auth_on(f)


def test_api_persistent_500_fails_preflight_with_a_clear_line(f: Faulty) -> None:
    before = _history(f.kube, HELM)
    f.faults(status=500, count=-1, path_regex=_ACCESS_REVIEW, methods=["POST"])
    started = time.monotonic()
    code, out, last = f.rollout()
    assert code == 1, out[-5000:]
    assert re.search(r"failed preflight .*\(3 attempts\)", out), out[-3000:]
    assert last.startswith("failed:") and "access review: 500" in last, last
    assert time.monotonic() - started < 120
    assert _history(f.kube, HELM) == before  # nothing changed
    _assert_serving_auth_on(f)


# ----------------------------------------------------------------- 2. helm killed mid-upgrade
def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            out.append(int(entry))
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def test_helm_killed_mid_upgrade_is_recovered(f: Faulty) -> None:
    """SIGKILL of the CLI's own ``helm upgrade`` (deploy-auth) while the release is pending-upgrade.

    The run fails naming helm; its auto-rollback un-sticks the release (a
    rollback is allowed on a pending release) back to the auth-on revision,
    and the next rollout succeeds.
    """
    good = _history(f.kube, HELM)[-1]["revision"]
    f.kube.control.stuck_rollout("mlflow", NS)  # helm --wait hangs: time to find and kill it
    killed = False
    with f.changed_settings(workers=3):
        out_path, err_path = f.box.root / "killed-run.out", f.box.root / "killed-run.err"
        with open(out_path, "w") as out_file, open(err_path, "w") as err_file:  # files: a full pipe cannot block it
            cli = subprocess.Popen([*CLI, "rollout", "--env", "prod"], cwd=f.box.root, env=f.box.env(),
                                   stdout=out_file, stderr=err_file, text=True)
        try:
            deadline = time.monotonic() + 180
            while not killed:
                assert cli.poll() is None, "the rollout ended before its helm upgrade could be killed"
                assert time.monotonic() < deadline, "never saw the helm upgrade of deploy-auth"
                history = _history(f.kube, HELM)
                if history[-1]["status"] == "pending-upgrade":
                    for pid in _children(cli.pid):
                        argv = _cmdline(pid)
                        if argv and argv[0].endswith(HELM) and "upgrade" in argv:
                            os.kill(pid, signal.SIGKILL)
                            killed = True
                time.sleep(0.2)
            f.kube.control.unstick("mlflow", NS)
            cli.wait(timeout=300)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait()
            f.kube.control.unstick("mlflow", NS)
    first_stdout = out_path.read_text()
    first_out = first_stdout + err_path.read_text()
    f.assert_no_secret(first_out)
    assert cli.returncode == 1, first_out[-5000:]
    assert "failed deploy-auth" in first_out, first_out[-4000:]
    first_final = _final_message(first_stdout)
    assert first_final.startswith("failed:") and "helm upgrade" in first_final.splitlines()[0], first_stdout[-3000:]
    # the killed helm left its revision pending-upgrade; the run's own auto-rollback made the good one newest
    history = _history(f.kube, HELM)
    assert any(h["status"] == "pending-upgrade" for h in history), history
    assert "completed auto-rollback" in first_out and f"rolled back to revision {good}" in first_out, first_out[-4000:]
    _assert_serving_auth_on(f)

    code, out, last = f.rollout()  # and the next rollout works
    assert code == 0, out[-5000:]
    _assert_serving_auth_on(f)


# ----------------------------------------------------------------- 3./4. crash loops, failing migrations
# Proven on running pods in tests/test_kubernetes_rollout.py: a readiness probe that never answers
# (helm times out, the last good revision serves) and a migration Job whose pods exit non-zero.


# ----------------------------------------------------------------- 5. S3 AccessDenied
def test_s3_access_denied_fails_fast_naming_the_bucket(f: Faulty) -> None:
    cloud = f.world[0]
    before = _history(f.kube, HELM)
    f.proxy.deny_bucket(cloud.bucket)
    started = time.monotonic()
    code, out, last = f.rollout()
    elapsed = time.monotonic() - started
    assert code == 1, out[-5000:]
    assert last.startswith("failed:") and cloud.bucket in last and "AccessDenied" in last, last
    assert re.search(r"failed preflight", out) and not re.search(r"failed preflight .*attempts\)", out), out[-3000:]
    assert elapsed < 90, f"an access denial took {elapsed:.0f}s"
    assert _history(f.kube, HELM) == before
    _assert_serving_auth_on(f)


# ----------------------------------------------------------------- 6. Route53 throttling
def test_route53_throttling_burst_is_retried_and_dns_succeeds(f: Faulty) -> None:
    rule = f.proxy.throttle_route53_changes(4)  # botocore's 3 attempts, then the stage's second try
    code, out, last = f.rollout()
    assert code == 0, out[-5000:]
    assert rule.served == 4
    assert re.search(r"completed dns .*\(2 attempts\)", out), out[-3000:]
    _assert_serving_auth_on(f)


def test_route53_persistent_throttling_fails_the_dns_stage(f: Faulty) -> None:
    rule = f.proxy.throttle_route53_changes(None)
    code, out, last = f.rollout()
    assert code == 1, out[-5000:]
    assert re.search(r"failed dns .*\(3 attempts\)", out), out[-3000:]
    assert last.startswith("failed:") and "Throttling" in last and HOST in last, last
    assert rule.served >= 3
    _assert_serving_auth_on(f)


# ----------------------------------------------------------------- 7. health while the API fails
def _health_events(f: Faulty, outcome: str, since: str) -> list[dict]:
    body = {"filter": {"event": {"name": [f"mlflow.health.{outcome}"]},
                       "resource": {"id": ["mlflow-rollout.environment.prod"]},
                       "occurred": {"since": since}}, "limit": 10}
    deadline = time.monotonic() + 20
    while True:
        events = httpx.post(f"{f.box.api_url}/events/filter", json=body, timeout=10).json()["events"]
        if events or time.monotonic() > deadline:
            return events
        time.sleep(0.5)


def test_health_counts_a_failing_cluster_api_as_degraded(f: Faulty) -> None:
    """Issue 11: an API outage (helm's release storage and the existingSecret unreadable) is a failing
    check and a ``mlflow.health.degraded`` event — what the degraded-health trigger counts — not a run
    that ends without one."""
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1))
    f.faults(status=503, count=-1, methods=["GET"], path_regex=rf"^/api/v1/namespaces/{NS}/secrets")
    r = f.box.cli("health", "--env", "prod")
    out = r.stdout + r.stderr
    f.assert_no_secret(out)
    assert r.returncode == 1, out[-4000:]
    events = _health_events(f, "degraded", since)
    assert events, f"no mlflow.health.degraded event\n{out[-3000:]}"
    failing = {c["check"]: c["detail"] for c in events[0]["payload"]["failing_checks"]}
    # helm's own words for a 503 from its release storage
    assert "revision" in failing and "unable to handle the request" in failing["revision"], failing
    assert "prod is degraded" in out and "revision:" in out, out[-3000:]

    f.faults(clear=True)  # the API is back: the next pass is ok again
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1))
    r = f.box.cli("health", "--env", "prod")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert _health_events(f, "ok", since)
