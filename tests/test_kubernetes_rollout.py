"""The production-shaped rollout: the kubernetes target against an emulated cluster.

Real parts: the pinned helm binaries (3 and 4) installing ``charts/mlflow``
into the Kubernetes API emulator (tests/support/kube_emulator), moto_server
for S3/ACM/IAM/Route53, a dnslib resolver serving the Route53 records, a real
PostgreSQL as "RDS", and — standing behind the Ingress's load-balancer name —
a real MLflow server with basic-auth over TLS (a CA made here) that answers
every HTTP check. The CLI runs the flow exactly as for the local target.

The pods' own log text is the one emulated piece of MLflow (the emulator's
``set_logs`` knob): there are no containers to run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tasks.tls import ensure_certificates
from tests.support.dns_server import dns_server
from tests.support.kube_emulator import kube_emulator
from tests.support.rollout import ROOT, Sandbox
from tests.support.services import free_port

pytestmark = pytest.mark.e2e

HOST = "mlflow.example.com"
DNSFAIL_HOST = "mlflow-dnsfail.example.com"
LB = "k8s-mlplatform-mlflow-0123456789.us-west-2.elb.amazonaws.com"
ADMIN_PW = "Prod-Admin-Pw-4d1c7a9e"
FLASK_KEY = "Prod-Flask-Key-93be1f0a"
NS = "ml-platform"
WORKERS = 2
STARTUP_LOG = "".join(
    f"INFO:     Started server process [{100 + i}]\nINFO:     Application startup complete.\n" for i in range(WORKERS)
)


def _helm_bin(name: str) -> Path:
    path = ROOT / ".tools" / "bin" / name
    assert path.is_file(), f"{path} missing: run scripts/setup.sh"
    return path


class Cloud:
    """moto resources + DNS + the MLflow server behind the load balancer name."""

    def __init__(self, moto, postgres, tmp: Path, dns):
        self.moto, self.tmp, self.dns = moto, tmp, dns
        self.db_uri = postgres.create_database(f"mlflow_k8s_{os.getpid()}_{int(time.time())}")
        s3 = moto.client("s3")
        self.bucket = f"mlflow-prod-{int(time.time())}"
        s3.create_bucket(Bucket=self.bucket, CreateBucketConfiguration={"LocationConstraint": "us-west-2"})
        trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRoleWithWebIdentity",
                 "Principal": {"Federated": "arn:aws:iam::123456789012:oidc-provider/oidc.eks"}}]}
        role = f"mlflow-irsa-{int(time.time())}"
        self.role_arn = moto.client("iam").create_role(RoleName=role, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
        r53 = moto.client("route53")
        # One zone per moto server: several test modules build a world on the session's moto.
        if not [z for z in r53.list_hosted_zones()["HostedZones"] if z["Name"] == "example.com."]:
            r53.create_hosted_zone(Name="example.com", CallerReference=str(time.time()))
        self.cert_arn = self._issued_cert(HOST, [DNSFAIL_HOST])
        self.other_cert_arn = self._issued_cert("other.example.com", [])
        dns.set(LB, "A", "127.0.0.1")
        # a stale record elsewhere that the dnsfail name keeps resolving to
        dns.set(DNSFAIL_HOST, "CNAME", "old-lb.example.net")
        dns.set("old-lb.example.net", "A", "127.0.0.9")

    def _issued_cert(self, domain: str, sans: list[str]) -> str:
        acm = self.moto.client("acm")
        arn = acm.request_certificate(DomainName=domain, SubjectAlternativeNames=[domain, *sans],
                                      ValidationMethod="DNS")["CertificateArn"]
        deadline = time.monotonic() + 30
        while acm.describe_certificate(CertificateArn=arn)["Certificate"]["Status"] != "ISSUED":
            assert time.monotonic() < deadline, "moto certificate never ISSUED"
            time.sleep(0.5)
        return arn

    def outputs(self, cert_arn: str | None = None) -> dict:
        return {
            "mlflow_irsa_role_arn": self.role_arn,
            "rds_connection_string": self.db_uri,
            "s3_bucket_name": self.bucket,
            "acm_certificate_arn": cert_arn or self.cert_arn,
        }


class MlflowBehindLB:
    """A real MLflow with basic-auth on the load balancer's address, TLS for the public names."""

    def __init__(self, cloud: Cloud, tmp: Path):
        self.port = free_port()
        tls = ensure_certificates(tmp / "lb-tls", [HOST, DNSFAIL_HOST])
        self.ca = tls.ca_cert
        ini = tmp / "basic_auth.ini"
        ini.write_text(
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = {cloud.db_uri.replace('%', '%%')}\nadmin_username = admin\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "auth_cache_ttl_seconds = 0\n"
        )
        env = {
            **os.environ,
            "MLFLOW_BACKEND_STORE_URI": cloud.db_uri,
            "MLFLOW_AUTH_CONFIG_PATH": str(ini),
            "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
            "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PW,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": FLASK_KEY,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_S3_ENDPOINT_URL": cloud.moto.endpoint_url,
        }
        self.log = open(tmp / "lb-mlflow.log", "ab")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", str(WORKERS), "--serve-artifacts", "--artifacts-destination", f"s3://{cloud.bucket}/mlflow-artifacts",
             "--app-name", "basic-auth", "--allowed-hosts", f"{HOST},{HOST}:*,{DNSFAIL_HOST},{DNSFAIL_HOST}:*",
             "--uvicorn-opts", f"--ssl-certfile {tls.server_cert} --ssl-keyfile {tls.server_key}"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp,
        )
        deadline = time.monotonic() + 240
        import ssl

        ctx = ssl.create_default_context(cafile=str(self.ca))
        client = httpx.Client(verify=ctx, timeout=3)
        while True:
            assert self.proc.poll() is None, (tmp / "lb-mlflow.log").read_text()[-3000:]
            try:
                r = client.get(f"https://127.0.0.1:{self.port}/health",
                               headers={"Host": HOST}, extensions={"sni_hostname": HOST})
                if r.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "MLflow behind the LB did not start"
            time.sleep(0.5)
        client.close()

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, moto, postgres, prefect_api: str):
    tmp = tmp_path_factory.mktemp("k8s")
    with dns_server(moto.endpoint_url, region="us-west-2") as dns:
        cloud = Cloud(moto, postgres, tmp, dns)
        server = MlflowBehindLB(cloud, tmp)
        try:
            yield cloud, server, dns, tmp, prefect_api
        finally:
            server.stop()


def _environment(box: Sandbox, name: str, kube, world, *, helm: str, host: str = HOST, namespace: str = NS,
                 release: str = "mlflow", cert_arn: str | None = None, extra: dict | None = None,
                 create_namespace: bool = True) -> None:
    cloud, server, dns, _, _ = world
    if create_namespace:  # a prerequisite made by the platform team: the runner's namespaced Role cannot
        kube.control.create_namespace(namespace)
    overrides = {
        "target": "kubernetes",
        "mlflow": {"host": host, "workers": WORKERS, "startup_timeout_seconds": 120},
        "kubernetes": {
            "kubeconfig": str(kube.kubeconfig), "namespace": namespace, "release": release,
            "chart": str(ROOT / "charts" / "mlflow"),
            "values_files": [str(ROOT / "charts" / "mlflow" / "values-production.yaml")],
            "existing_secret": "mlflow-credentials", "helm_binary": str(_helm_bin(helm)),
            "helm_timeout_seconds": 60, "access": "ingress", "public_port": server.port,
            "ca_bundle": str(server.ca), "admin_bootstrap": "database", "ingress_timeout_seconds": 30,
        },
        "aws": {"region": "us-west-2", "endpoint_url": cloud.moto.endpoint_url, "hosted_zone_name": "example.com",
                "dns_resolvers": [dns.address], "dns_timeout_seconds": 5, "certificate_min_days": 30},
        "secrets": {"admin_password": {"env": "PROD_ADMIN_PW", "generate": False},
                    "flask_secret_key": {"env": "PROD_FLASK_KEY", "generate": False}},
        "lock_wait_seconds": 5,
    }
    for k, v in (extra or {}).items():
        overrides.setdefault(k, {}).update(v) if isinstance(v, dict) else overrides.__setitem__(k, v)
    box.write_environment(name, overrides, outputs=cloud.outputs(cert_arn))
    # the local-target section written by Sandbox does not apply here
    path = box.env_dir / f"{name}.yaml"
    data = yaml.safe_load(path.read_text())
    data.pop("local", None)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _sandbox(tmp: Path, api: str) -> Sandbox:
    return Sandbox(tmp, api, extra_env={"PROD_ADMIN_PW": ADMIN_PW, "PROD_FLASK_KEY": FLASK_KEY})


def _helm(kube, helm: str, *args: str) -> str:
    r = subprocess.run([str(_helm_bin(helm)), "--kubeconfig", str(kube.kubeconfig), *args],
                       capture_output=True, text=True, env=kube.env(), timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _history(kube, helm: str, release: str = "mlflow", ns: str = NS) -> list[dict]:
    return json.loads(_helm(kube, helm, "history", release, "-n", ns, "-o", "json"))


@pytest.mark.parametrize("helm", ["helm4", "helm3"])
def test_production_rollout_all_stages_green(world, tmp_path: Path, helm: str) -> None:
    cloud, server, dns, _, api = world
    with kube_emulator(tmp_path / "kube") as kube:
        kube.control.set_ingress_hostname(LB)
        kube.control.set_logs(STARTUP_LOG, deployment="mlflow", namespace=NS)
        box = _sandbox(tmp_path, api)
        _environment(box, "prod", kube, world, helm=helm)
        r = box.cli("rollout", "--env", "prod")
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-6000:] + "\n--- emulator ---\n" + kube.log_tail()
        # The auth database here is shared with the MLflow behind the load balancer, which made its
        # admin at start: auth "has been on" (DESIGN §4.18), so there is no auth-off bootstrap.
        # tests/faults/test_k8s_auth_posture.py covers a real first install with its bootstrap.
        assert "skipped deploy-no-auth" in out and "auth has been on" in out
        for stage in ("terraform-outputs", "preflight", "secrets", "admin-bootstrap",
                      "deploy-auth", "dns", "smoke-https", "smoke-auth", "smoke-tracking",
                      "smoke-artifacts", "smoke-logging", "report"):
            assert f"completed {stage}" in out, stage
        db_password = cloud.db_uri.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
        for secret in (ADMIN_PW, FLASK_KEY, db_password):  # nothing the run printed (Prefect logs included)
            assert secret not in out

        # helm history: one install, with auth on from the start
        history = _history(kube, helm)
        assert [h["revision"] for h in history] == [1]
        assert [h["status"] for h in history] == ["deployed"]
        v1 = v2 = json.loads(_helm(kube, helm, "get", "values", "mlflow", "-n", NS, "--revision", "1", "-o", "json"))
        assert v2["auth"]["enabled"] is True
        assert v2["existingSecret"] == "mlflow-credentials" and v2["serviceAccount"]["irsaRoleArn"] == cloud.role_arn
        assert v2["ingress"]["certificateArn"] == cloud.cert_arn
        # no secret in the helm values of any revision
        for v in (v1, v2):
            text = json.dumps(v)
            assert ADMIN_PW not in text and FLASK_KEY not in text and cloud.db_uri.split("@")[0] not in text

        # the Secret the chart reads holds the five keys; the pods read it by reference
        secret = kube.control.object("Secret", "mlflow-credentials", NS)
        assert set(secret["data"]) == {"backend-store-uri", "auth-database-uri", "admin-password", "flask-secret-key", "basic_auth.ini"}
        deployment = kube.control.object("Deployment", "mlflow", NS)
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert "basic-auth" in container["args"]
        assert ADMIN_PW not in json.dumps(deployment)

        # Route53 points the name at the load balancer
        zone = [z for z in cloud.moto.client("route53").list_hosted_zones()["HostedZones"] if z["Name"] == "example.com."][0]
        records = cloud.moto.client("route53").list_resource_record_sets(HostedZoneId=zone["Id"])["ResourceRecordSets"]
        cname = [r for r in records if r["Name"] == f"{HOST}." and r["Type"] == "CNAME"]
        assert cname and cname[0]["ResourceRecords"][0]["Value"].rstrip(".") == LB

        # a re-run changes nothing: no new helm revision
        r = box.cli("rollout", "--env", "prod")
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        assert "skipped deploy-no-auth" in r.stdout
        assert [h["revision"] for h in _history(kube, helm)] == [1]

        # `status --json`: the protocol's status contract, read from the cluster
        from targets.base import STATUS_KEYS

        st = box.cli("status", "--env", "prod", "--json")
        assert st.returncode == 0, (st.stdout + st.stderr)[-3000:]
        status = json.loads(st.stdout)
        assert set(STATUS_KEYS) <= set(status), set(STATUS_KEYS) - set(status)
        assert status["revision"] == 1 and status["auth"] is True and status["healthy"] is True


# ----------------------------------------------------------------- failure paths (helm 4)
@pytest.fixture(scope="module")
def cluster(world, tmp_path_factory: pytest.TempPathFactory):
    """One emulated cluster with a good production rollout (revisions 1 and 2) to break."""
    cloud, server, dns, _, api = world
    tmp = tmp_path_factory.mktemp("cluster")
    with kube_emulator(tmp / "kube") as kube:
        kube.control.set_ingress_hostname(LB)
        kube.control.set_logs(STARTUP_LOG, deployment="mlflow", namespace=NS)
        box = _sandbox(tmp, api)
        _environment(box, "prod", kube, world, helm="helm4", extra={"kubernetes": {"helm_timeout_seconds": 30}})
        r = box.cli("rollout", "--env", "prod")
        assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
        yield kube, box


def _artifacts(key: str) -> list:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        found = [a for a in client.read_artifacts() if a.key == key]
    return sorted(found, key=lambda a: a.created, reverse=True)  # newest version first


def test_stuck_rollout_times_out_and_rolls_back(cluster, world) -> None:
    kube, box = cluster
    before = _history(kube, "helm4")
    good = before[-1]["revision"]
    path = box.env_dir / "prod.yaml"
    original = path.read_text()
    data = yaml.safe_load(original)
    data["mlflow"]["workers"] = 3  # a new pod template, whose pods never get Ready
    path.write_text(yaml.safe_dump(data))
    kube.control.stuck_rollout("mlflow", NS)
    try:
        r = box.cli("rollout", "--env", "prod")
    finally:
        kube.control.unstick("mlflow", NS)
        path.write_text(original)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-5000:]
    assert "failed deploy-auth" in out and "timed out" in out
    assert "completed auto-rollback" in out and f"rolled back to revision {good}" in out
    history = _history(kube, "helm4")
    assert history[-2]["status"] == "failed" and history[-1]["status"] == "deployed"
    assert history[-1]["revision"] == good + 2
    values = json.loads(_helm(kube, "helm4", "get", "values", "mlflow", "-n", NS, "-o", "json"))
    assert values["mlflow"]["workers"] == WORKERS  # the previous settings run again
    diagnostics = _artifacts("mlflow-rollout-prod-diagnostics")
    assert diagnostics and "Unhealthy" in diagnostics[0].data and "deploy-auth" in diagnostics[0].data
    assert ADMIN_PW not in diagnostics[0].data
    report = _artifacts("mlflow-rollout-prod-report")
    assert report and "auto_rollback" in report[0].data


def test_certificate_for_another_host_fails_preflight(cluster, world) -> None:
    kube, box = cluster
    cloud = world[0]
    _environment(box, "wrongcert", kube, world, helm="helm4", namespace="other", release="mlflow-other",
                 cert_arn=cloud.other_cert_arn)
    r = box.cli("rollout", "--env", "wrongcert")
    assert r.returncode == 2, (r.stdout + r.stderr)[-4000:]
    assert HOST in r.stdout and "other.example.com" in r.stdout
    assert "failed preflight" in r.stdout
    # nothing installed, nothing written
    assert json.loads(_helm(kube, "helm4", "list", "-n", "other", "-o", "json")) == []
    assert kube.control.objects("Secret", "other") == []


def test_release_left_pending_upgrade_is_recovered(cluster, world) -> None:
    kube, box = cluster
    good = _history(kube, "helm4")[-1]["revision"]
    kube.control.stuck_rollout("mlflow", NS)
    helm = subprocess.Popen(
        [str(_helm_bin("helm4")), "--kubeconfig", str(kube.kubeconfig), "upgrade", "mlflow", str(ROOT / "charts" / "mlflow"),
         "-n", NS, "--reuse-values", "--set", "mlflow.workers=5", "--wait", "--timeout", "300s"],
        env=kube.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while _history(kube, "helm4")[-1]["status"] != "pending-upgrade":
            assert time.monotonic() < deadline and helm.poll() is None, "helm never reached pending-upgrade"
            time.sleep(0.3)
    finally:
        helm.kill()  # the interrupted client: the release stays pending-upgrade
        helm.wait()
        kube.control.unstick("mlflow", NS)
    assert _history(kube, "helm4")[-1]["status"] == "pending-upgrade"

    r = box.cli("rollout", "--env", "prod")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    assert "pending-upgrade" in out and f"rolled back to revision {good}" in out
    history = _history(kube, "helm4")
    # helm keeps the interrupted record in the history; it is no longer the newest, so helm works again
    stuck = [h["revision"] for h in history if h["status"] == "pending-upgrade"]
    assert stuck and history[-1]["status"] == "deployed" and history[-1]["revision"] > stuck[-1]
    values = json.loads(_helm(kube, "helm4", "get", "values", "mlflow", "-n", NS, "-o", "json"))
    assert values["mlflow"]["workers"] == WORKERS


def test_dns_never_resolving_fails_naming_what_it_resolved_to(cluster, world) -> None:
    kube, box = cluster
    kube.control.set_logs(STARTUP_LOG, deployment="mlflow-dnsfail", namespace="dnsfail")
    _environment(box, "dnsfail", kube, world, helm="helm4", host=DNSFAIL_HOST, namespace="dnsfail",
                 release="mlflow-dnsfail")
    r = box.cli("rollout", "--env", "dnsfail")
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-5000:]
    assert "failed dns" in out and "(3 attempts)" in out
    assert DNSFAIL_HOST in out and "old-lb.example.net" in out and LB in out
    assert "nothing to roll back to (first install)" in json.dumps([a.data for a in _artifacts("mlflow-rollout-dnsfail-report")])


@pytest.mark.parametrize("env, release, override, deployment, label", [
    ("fullname", "ml-full", {"fullnameOverride": "tracking-server"}, "tracking-server", "mlflow"),
    ("shortname", "ml-short", {"nameOverride": "tracking"}, "ml-short-tracking", "tracking"),
])
def test_chart_name_overrides_work_end_to_end(cluster, world, tmp_path: Path, env: str, release: str,
                                              override: dict, deployment: str, label: str) -> None:
    """The Deployment, its pods, the Service and the Ingress are found by the names the release rendered."""
    from mlflow_rollout.settings import load_environment
    from targets.kubernetes import KubernetesTarget

    kube, box = cluster
    ns = f"names-{env}"
    names = tmp_path / "names.yaml"
    names.write_text(yaml.safe_dump(override))
    kube.control.set_logs(STARTUP_LOG, deployment=deployment, namespace=ns)
    _environment(box, env, kube, world, helm="helm4", namespace=ns, release=release, extra={"kubernetes": {
        "values_files": [str(ROOT / "charts" / "mlflow" / "values-production.yaml"), str(names)]}})
    r = box.cli("rollout", "--env", env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:] + "\n--- emulator ---\n" + kube.log_tail()
    assert "completed deploy-auth" in out and "completed smoke-logging" in out
    rendered = kube.control.object("Deployment", deployment, ns)
    assert rendered is not None and rendered["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == label
    assert [i["metadata"]["name"] for i in kube.control.objects("Ingress", ns)] == [deployment]

    r = box.cli("health", "--env", env)
    assert r.returncode == 0 and '"outcome": "ok"' in r.stdout, (r.stdout + r.stderr)[-4000:]

    target = KubernetesTarget(load_environment(env, box.env_dir))
    assert deployment in target.kube.rollout_status()
    pods = target.processes()
    assert pods and all(p.ready and p.name.startswith(f"pod {deployment}-") for p in pods), pods
    logs = target.logs_since(target.log_mark())
    assert {s.name for s in logs} == {p.name for p in pods} and all("startup complete" in s.since_start for s in logs)
    settings = load_environment(env, box.env_dir)
    service = settings.model_copy(update={"kubernetes": settings.kubernetes.model_copy(update={"access": "service"})})
    assert KubernetesTarget(service).access_endpoint().url == f"http://{deployment}.{ns}.svc"


def test_health_and_rollback_flows_on_the_cluster(cluster, world) -> None:
    kube, box = cluster
    r = box.cli("health", "--env", "prod")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert '"outcome": "ok"' in r.stdout
    assert "dns" in r.stdout and LB in r.stdout  # the record still points at the current load balancer

    history = _history(kube, "helm4")
    valid = [h["revision"] for h in history if h["status"] == "superseded"]
    r = box.cli("rollback", "--env", "prod", "--revision", "999", "--reason", "typo")
    assert r.returncode == 2 and "valid revisions:" in r.stdout and str(valid[-1]) in r.stdout
    assert _history(kube, "helm4") == history  # refused before anything changed

    r = box.cli("rollback", "--env", "prod", "--revision", str(valid[-1]), "--reason", "drill")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    after = _history(kube, "helm4")
    assert len(after) == len(history) + 1 and after[-1]["status"] == "deployed"
    for stage in ("history", "rollback", "smoke-https", "smoke-tracking", "smoke-artifacts"):
        assert f"completed {stage}" in r.stdout, stage
    values = json.loads(_helm(kube, "helm4", "get", "values", "mlflow", "-n", NS, "--revision", str(valid[-1]), "-o", "json"))
    if values["auth"]["enabled"]:
        assert "completed smoke-auth" in r.stdout
    else:  # rolled back to the no-auth install: its auth check does not apply
        assert "skipped smoke-auth" in r.stdout and "auth off" in r.stdout

    # a crash-looping pod degrades health: restarts are reported, and the pass fails
    kube.control.crashloop("mlflow", NS)
    try:
        kube.control.wait_for(lambda: any(
            (s.get("restartCount") or 0) > 0
            for p in kube.control.objects("Pod", NS) for s in p.get("status", {}).get("containerStatuses", [])
        ), timeout=30, what="a restart")
        r = box.cli("health", "--env", "prod")
        assert r.returncode == 1 and "degraded" in r.stdout and "restarts" in r.stdout
    finally:
        kube.control.crashloop("mlflow", NS, on=False)
