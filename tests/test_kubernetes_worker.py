"""`prefect deployment run mlflow-rollout/production`, end to end: a real kubernetes worker.

The README's production path, with moto, the emulator and a real worker
standing in for AWS and EKS (issue 10):

- a Prefect server (the session's), the production deployments deployed
  from ``prefect.yaml`` (its build/push steps through the recording stand-in
  for prefect-docker: there is no Docker engine), the ``mlflow-k8s`` pool;
- ``prefect worker start --type kubernetes`` (prefect-kubernetes, pinned),
  which submits each flow run as a Job to the emulated cluster;
- the emulator's process kubelet runs that Job: the runner image is this
  project (``/opt/mlflow-rollout`` bound from a layout of its files, helm on
  PATH), with in-cluster config from the projected ServiceAccount token of
  ``mlflow-rollout-runner`` — so the flow runs under the runner chart's Role;
- the flow installs ``charts/mlflow`` whose pods run too, reads the Terraform
  outputs from the state object in S3 (moto), the admin password from a
  Prefect Secret block, and reaches MLflow through its Service.

Needs root (namespaces); skipped elsewhere with the reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import httpx
import pytest
import yaml

from tests.support.dns_server import dns_server
from tests.support.kube_emulator import KubeEmulator, PodRuntime, kube_emulator, pods_unavailable, python_image
from tests.support.rollout import ROOT, Sandbox, prefect_worker
from tests.support.k8s_world import HOST, LB, _helm, _helm_bin, _history
from tests.support.pod_cluster import IMAGE, Cloud

_REASON = pods_unavailable()
pytestmark = [pytest.mark.e2e, pytest.mark.pods, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

BIN = Path(sys.executable).parent
NS = "ml-platform"
RUNNER_IMAGE = "registry.example/mlflow-rollout:test"
ADMIN_PW = "Worker-Admin-Pw-7c2e91d4"
STATE_BUCKET, STATE_KEY = "mdpg-terraform-state", "aws-eks/terraform.tfstate"


@dataclass
class Production:
    kube: KubeEmulator
    box: Sandbox
    cloud: Cloud
    worker_log: Path

    def prefect(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], cwd=ROOT, env=self.box.env(),
                              capture_output=True, text=True, timeout=timeout)

    def worker_tail(self) -> str:
        return self.worker_log.read_text(errors="replace")[-5000:]


def _runner_layout(tmp: Path) -> Path:
    """What the runner image holds at /opt/mlflow-rollout (scripts/build-runner.sh): the sources, charts, prefect.yaml."""
    opt = tmp / "opt-mlflow-rollout"
    for item in ("flows", "tasks", "targets", "cli", "mlflow_rollout", "charts"):
        shutil.copytree(ROOT / item, opt / item, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "prefect.yaml", opt / "prefect.yaml")
    (opt / "environments").mkdir()
    return opt


def _production_env(opt: Path, gateway: str, cloud: Cloud, dns_port: int, moto_port: int) -> None:
    """environments/production.yaml as the team would have it, pointed at this stand-in cloud."""
    data = yaml.safe_load((ROOT / "environments" / "production.yaml").read_text())
    endpoint = f"http://{gateway}:{moto_port}"
    data["terraform"].update(bucket=STATE_BUCKET, key=STATE_KEY, endpoint_url=endpoint)
    data["mlflow"].update(host=HOST, workers=1, startup_timeout_seconds=240)
    small = opt / "charts" / "values-small.yaml"
    small.write_text(yaml.safe_dump({"replicaCount": 1, "autoscaling": {"minReplicas": 1},
                                     "podDisruptionBudget": {"enabled": False}}))
    # ACM's certificate is a public CA's; the stand-in ALB's is the tests' CA, so the image carries that CA
    shutil.copy(cloud.tls.ca_cert, opt / "alb-ca.pem")
    data["kubernetes"].update(values_files=["charts/mlflow/values-production.yaml", "charts/values-small.yaml"],
                              helm_timeout_seconds=300, ca_bundle="/opt/mlflow-rollout/alb-ca.pem")
    data["aws"].update(endpoint_url=endpoint, hosted_zone_name="example.com", dns_record="cname",
                       dns_resolvers=[f"{gateway}:{dns_port}"], dns_timeout_seconds=30, dns_retry_delay_seconds=[2, 4])
    data["lock_wait_seconds"] = 30
    (opt / "environments" / "production.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def _terraform_state(cloud: Cloud, db_uri: str) -> None:
    s3 = cloud.moto.client("s3")
    try:
        s3.create_bucket(Bucket=STATE_BUCKET, CreateBucketConfiguration={"LocationConstraint": "us-west-2"})
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    outputs = cloud.outputs(db_uri)
    state = {"version": 4, "terraform_version": "1.11.0", "serial": 1, "lineage": "test",
             "outputs": {k: {"value": v, "type": "string", "sensitive": k == "rds_connection_string"}
                         for k, v in outputs.items()}, "resources": []}
    s3.put_object(Bucket=STATE_BUCKET, Key=STATE_KEY, Body=json.dumps(state).encode())


@pytest.fixture(scope="module")
def production(tmp_path_factory: pytest.TempPathFactory, moto, postgres, prefect_api: str) -> Iterator[Production]:
    tmp = tmp_path_factory.mktemp("worker")
    api_port = urlparse(prefect_api).port
    with dns_server(moto.endpoint_url, region="us-west-2") as dns:
        cloud = Cloud(moto, postgres, tmp, dns)
        dns_port = int(dns.address.rsplit(":", 1)[1])
        runtime = PodRuntime(images={}, host_ports=[postgres.port, moto.port, api_port], udp_ports=[dns_port],
                             api_access=True, backoff_seconds=2.0)
        gateway = runtime.gateway
        sts = {"AWS_ENDPOINT_URL_STS": f"http://{gateway}:{moto.port}"}
        opt = _runner_layout(tmp)
        _production_env(opt, gateway, cloud, dns_port, moto.port)
        runtime.images[IMAGE] = python_image(env=sts)
        runtime.images[RUNNER_IMAGE] = python_image(
            env=sts, working_dir="/opt/mlflow-rollout",
            binds=[{"source": str(opt), "target": "/opt/mlflow-rollout", "read_only": True}])
        runtime.images[RUNNER_IMAGE]["path"].append(str(ROOT / ".tools" / "bin"))  # the pinned helm
        alb_ip = runtime.address(199)  # in the "VPC": reachable from the host and from pods
        runtime.alb = {"host": alb_ip, "https_port": 443, "http_port": 80, "cert": str(cloud.tls.server_cert),
                       "key": str(cloud.tls.server_key), "interval": 1.0}
        db = postgres.create_database(f"mlflow_worker_{os.getpid()}_{int(time.time())}")
        _terraform_state(cloud, re.sub(r"@[^:/]+:", f"@{gateway}:", db, count=1))
        with kube_emulator(tmp / "kube", pods=runtime) as kube:
            kube.control.set_ingress_hostname(LB)
            dns.set(LB, "A", alb_ip)
            box = Sandbox(tmp, f"http://{gateway}:{api_port}/api")  # the address pods reach the API at
            box.extra_env.update({"KUBECONFIG": str(kube.kubeconfig), "PREFECT_WORKER_QUERY_SECONDS": "2",
                                  "PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES": NS})
            # The README's section, command by command: the namespace, the runner chart, the pool, the Secret block,
            # prefect deploy (image build/push recorded), the worker.
            kube.control.create_namespace(NS)
            _helm(kube, "helm4", "upgrade", "--install", "mlflow-rollout-runner", str(ROOT / "charts" / "mlflow-rollout-runner"),
                  "-n", NS, "--set", f"targetNamespace={NS}", "--set", f"serviceAccount.irsaRoleArn={cloud.role_arn}")
            p = Production(kube, box, cloud, tmp / "worker.log")
            r = p.prefect("work-pool", "create", "mlflow-k8s", "--type", "kubernetes", "--overwrite")
            assert r.returncode == 0, r.stdout + r.stderr
            from prefect.blocks.system import Secret

            Secret(value=ADMIN_PW).save("mlflow-production-admin-password", overwrite=True)
            box.extra_env.update({
                "MLFLOW_ROLLOUT_IMAGE_NAME": RUNNER_IMAGE.rsplit(":", 1)[0], "MLFLOW_ROLLOUT_IMAGE_TAG": "test",
                "PYTHONPATH": str(ROOT / "tests" / "support" / "fake_prefect_docker"),
                "FAKE_PREFECT_DOCKER_LOG": str(tmp / "prefect-docker.jsonl"),
            })
            names = ["mlflow-rollout/production", "mlflow-health/production", "mlflow-rollback/production"]
            r = p.prefect("deploy", *[a for n in names for a in ("-n", n)])
            for key in ("PYTHONPATH", "FAKE_PREFECT_DOCKER_LOG"):
                box.extra_env.pop(key)
            assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
            with prefect_worker(box, "mlflow-k8s", "kubernetes", p.worker_log):
                yield p


def _flow_run_id(out: str) -> str:
    m = re.search(r"UUID: ([0-9a-f-]{36})", out) or re.search(r"flow-run/([0-9a-f-]{36})", out)
    assert m, out[-3000:]
    return m.group(1)


def _wait_state(p: Production, flow_run_id: str, states: set[str], timeout: float = 600) -> str:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            name = run.state.type.value if run.state else "NONE"
            if name in states:
                return name
            assert time.monotonic() < deadline, (
                f"flow run {flow_run_id} stayed {name} (wanted {states})\n--- worker ---\n{p.worker_tail()}\n"
                f"--- jobs ---\n{json.dumps([j.get('status') for j in p.kube.control.objects('Job', NS)])[-2000:]}")
            time.sleep(2)


def _resume(flow_run_id: str, approve: bool) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        result = client.resume_flow_run(flow_run_id, run_input={"approve": approve, "comment": "from the test"})
        assert result.status.value == "ACCEPT", result


def _job_pod_log(p: Production, flow_run_id: str) -> str:
    pods = [x for x in p.kube.control.objects("Pod", NS)
            if (x["metadata"].get("labels") or {}).get("prefect.io/flow-run-id") == flow_run_id]
    out = []
    for pod in pods:
        r = subprocess.run([str(_helm_bin("kubectl")), "logs", pod["metadata"]["name"], "-n", NS],
                           env=p.kube.env(), capture_output=True, text=True)
        out.append(r.stdout + r.stderr)
    return "\n".join(out)


def test_production_rollout_through_the_kubernetes_worker(production: Production) -> None:
    p = production
    # a rejected approval: the run ends Cancelled, nothing changed
    r = p.prefect("deployment", "run", "mlflow-rollout/production")
    assert r.returncode == 0, r.stdout + r.stderr
    rejected = _flow_run_id(r.stdout)
    assert _wait_state(p, rejected, {"PAUSED", "FAILED", "CRASHED"}) == "PAUSED", _job_pod_log(p, rejected)[-4000:]
    _resume(rejected, approve=False)
    assert _wait_state(p, rejected, {"CANCELLED", "COMPLETED", "FAILED", "CRASHED"}) == "CANCELLED"
    assert "mlflow" not in [x["name"] for x in json.loads(_helm(p.kube, "helm4", "list", "-n", NS, "-o", "json"))]

    # approved: the rollout runs in the runner's Job, under the runner's Role, to the end
    r = p.prefect("deployment", "run", "mlflow-rollout/production")
    run = _flow_run_id(r.stdout)
    assert _wait_state(p, run, {"PAUSED", "FAILED", "CRASHED"}) == "PAUSED", _job_pod_log(p, run)[-4000:]
    _resume(run, approve=True)
    final = _wait_state(p, run, {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}, timeout=900)
    log = _job_pod_log(p, run)
    assert final == "COMPLETED", log[-6000:] + "\n--- worker ---\n" + p.worker_tail()
    history = _history(p.kube, "helm4")
    assert history[-1]["status"] == "deployed"
    values = json.loads(_helm(p.kube, "helm4", "get", "values", "mlflow", "-n", NS, "-o", "json"))
    assert values["auth"]["enabled"] is True
    job_pods = [x for x in p.kube.control.objects("Pod", NS)
                if (x["metadata"].get("labels") or {}).get("prefect.io/flow-run-id") == run]
    assert job_pods and all(x["spec"]["serviceAccountName"] == "mlflow-rollout-runner" for x in job_pods)
    assert ADMIN_PW not in log
    # MLflow serves with auth through the ALB
    ctx = __import__("ssl").create_default_context(cafile=str(p.cloud.tls.ca_cert))
    alb = p.kube.pods.alb["host"]
    with httpx.Client(verify=ctx, timeout=10) as c:
        anon = c.get(f"https://{alb}/api/2.0/mlflow/experiments/search?max_results=1",
                     headers={"Host": HOST}, extensions={"sni_hostname": HOST})
        admin = c.get(f"https://{alb}/api/2.0/mlflow/experiments/search?max_results=1", auth=("admin", ADMIN_PW),
                      headers={"Host": HOST}, extensions={"sni_hostname": HOST})
    assert anon.status_code == 401 and admin.status_code == 200, (anon.status_code, admin.status_code)

    # a health pass in its own Job; its event reaches the server
    r = p.prefect("deployment", "run", "mlflow-health/production", "--watch", "--watch-timeout", "600")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:] + "\n--- worker ---\n" + p.worker_tail()
    body = {"filter": {"event": {"name": ["mlflow.health.ok"]},
                       "resource": {"id": ["mlflow-rollout.environment.production"]}}, "limit": 5}
    # The server persists events in batches (its event persister flushes every few seconds): the flow run can
    # be Completed a moment before its event is readable.
    deadline = time.monotonic() + 60
    while not (events := httpx.post(f"{p.box.api_url}/events/filter", json=body, timeout=10).json()["events"]):
        if time.monotonic() > deadline:
            break
        time.sleep(1)
    assert events, "no mlflow.health.ok event within 60 s of the health run's end"

    # an operator's upgrade by hand (2 workers), then a rollback from Prefect with its typed request and reason
    good = history[-1]["revision"]
    _helm(p.kube, "helm4", "upgrade", "mlflow", str(ROOT / "charts" / "mlflow"), "-n", NS, "--reuse-values",
          "--set", "mlflow.workers=2", "--wait", "--timeout", "300s")
    request = {"request": {"environment": "production", "revision": good, "reason": "drill from the worker test"}}
    r = p.prefect("deployment", "run", "mlflow-rollback/production", "--params", json.dumps(request),
                  "--watch", "--watch-timeout", "600")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:] + "\n--- worker ---\n" + p.worker_tail()
    after = _history(p.kube, "helm4")
    assert after[-1]["status"] == "deployed" and after[-1]["revision"] == good + 2, after
    values = json.loads(_helm(p.kube, "helm4", "get", "values", "mlflow", "-n", NS, "-o", "json"))
    assert values["auth"]["enabled"] is True and values["mlflow"]["workers"] == 1
