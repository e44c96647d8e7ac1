"""The emulated cluster with a fixture MLflow behind the load balancer's name (painted pods).

The world of the cluster fault matrix (tests/faults/test_k8s_*.py) and the
kubernetes users tests: the pinned helm into the Kubernetes API emulator with
its *painted* kubelet (pods marked Ready on a timer, their log text set with
``set_logs``), moto_server, PostgreSQL, a dnslib resolver, and — standing
behind the Ingress's load-balancer name — a real MLflow with basic-auth over
TLS that the test starts itself. Fast, and the knobs (stuck rollouts, crash
loops, API faults) shape the cluster at will; what it cannot show is whether
the chart's pods run. tests/test_kubernetes_rollout.py runs the chart's own
pods (the process kubelet) for that.
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
from tests.support.rollout import ROOT, Sandbox
from tests.support.services import free_port

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


class CloudAccount:
    """The AWS side both cluster worlds share: the artifact bucket, the IRSA role, the hosted zone,
    ACM certificates for the public names, and a stale record the dnsfail name keeps resolving to."""

    def __init__(self, moto, dns):
        self.moto, self.dns = moto, dns
        s3 = moto.client("s3")
        self.bucket = f"mlflow-prod-{int(time.time())}"
        s3.create_bucket(Bucket=self.bucket, CreateBucketConfiguration={"LocationConstraint": "us-west-2"})
        trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRoleWithWebIdentity",
                 "Principal": {"Federated": "arn:aws:iam::123456789012:oidc-provider/oidc.eks"}}]}
        role = f"mlflow-irsa-{int(time.time())}"
        self.role_arn = moto.client("iam").create_role(RoleName=role, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
        self.role_name = role
        moto.client("iam").put_role_policy(RoleName=role, PolicyName="mlflow-artifacts",
                                           PolicyDocument=json.dumps(self.artifact_policy()))
        r53 = moto.client("route53")
        # One zone per moto server: several test modules build a world on the session's moto.
        if not [z for z in r53.list_hosted_zones()["HostedZones"] if z["Name"] == "example.com."]:
            r53.create_hosted_zone(Name="example.com", CallerReference=str(time.time()))
        self.cert_arn = self._issued_cert(HOST, [DNSFAIL_HOST])
        self.other_cert_arn = self._issued_cert("other.example.com", [])
        dns.set(DNSFAIL_HOST, "CNAME", "old-lb.example.net")
        dns.set("old-lb.example.net", "A", "127.0.0.9")

    def artifact_policy(self, *, without: tuple[str, ...] = ()) -> dict:
        """The IRSA role's S3 policy, as the Terraform module writes it (``without``: actions left out)."""
        objects = [a for a in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject") if a not in without]
        statements = [{"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": f"arn:aws:s3:::{self.bucket}"}]
        if objects:
            statements.append({"Effect": "Allow", "Action": objects, "Resource": f"arn:aws:s3:::{self.bucket}/*"})
        return {"Version": "2012-10-17", "Statement": statements}

    def _issued_cert(self, domain: str, sans: list[str]) -> str:
        acm = self.moto.client("acm")
        arn = acm.request_certificate(DomainName=domain, SubjectAlternativeNames=[domain, *sans],
                                      ValidationMethod="DNS")["CertificateArn"]
        deadline = time.monotonic() + 30
        while acm.describe_certificate(CertificateArn=arn)["Certificate"]["Status"] != "ISSUED":
            assert time.monotonic() < deadline, "moto certificate never ISSUED"
            time.sleep(0.5)
        return arn

    def outputs(self, db_uri: str, cert_arn: str | None = None) -> dict:
        """The Terraform outputs the rollout reads, for a database at ``db_uri``."""
        return {
            "mlflow_irsa_role_arn": self.role_arn,
            "rds_connection_string": db_uri,
            "s3_bucket_name": self.bucket,
            "acm_certificate_arn": cert_arn or self.cert_arn,
        }


class Cloud(CloudAccount):
    """The account, a database, and the load balancer's name pointing at the fixture MLflow."""

    def __init__(self, moto, postgres, tmp: Path, dns):
        super().__init__(moto, dns)
        self.tmp = tmp
        self.db_uri = postgres.create_database(f"mlflow_k8s_{os.getpid()}_{int(time.time())}")
        dns.set(LB, "A", "127.0.0.1")

    def outputs(self, cert_arn: str | None = None) -> dict:  # type: ignore[override]
        return super().outputs(self.db_uri, cert_arn)


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
    overrides = k8s_overrides(host, WORKERS, kube, namespace=namespace, release=release, helm=helm,
                              dns_address=dns.address, endpoint_url=cloud.moto.endpoint_url)
    overrides["kubernetes"].update({"helm_timeout_seconds": 60, "access": "ingress", "public_port": server.port,
                                    "ca_bundle": str(server.ca)})
    write_k8s_environment(box, name, overrides, extra, cloud.outputs(cert_arn))


def k8s_overrides(host: str, workers: int, kube, *, namespace: str, release: str, helm: str,
                  dns_address: str, endpoint_url: str) -> dict:
    """The settings every cluster environment here shares; callers add their access and values."""
    return {
        "target": "kubernetes",
        "mlflow": {"host": host, "workers": workers, "startup_timeout_seconds": 120},
        "kubernetes": {
            "kubeconfig": str(kube.kubeconfig), "namespace": namespace, "release": release,
            "chart": str(ROOT / "charts" / "mlflow"),
            "values_files": [str(ROOT / "charts" / "mlflow" / "values-production.yaml")],
            "existing_secret": "mlflow-credentials", "helm_binary": str(_helm_bin(helm)),
            "admin_bootstrap": "database", "ingress_timeout_seconds": 30,
        },
        "aws": {"region": "us-west-2", "endpoint_url": endpoint_url, "hosted_zone_name": "example.com",
                "dns_resolvers": [dns_address], "dns_timeout_seconds": 5, "certificate_min_days": 30},
        "secrets": {"admin_password": {"env": "PROD_ADMIN_PW", "generate": False},
                    "flask_secret_key": {"env": "PROD_FLASK_KEY", "generate": False}},
        "lock_wait_seconds": 5,
    }


def write_k8s_environment(box: Sandbox, name: str, overrides: dict, extra: dict | None, outputs: dict) -> None:
    """``environments/<name>.yaml`` for the kubernetes target: ``extra`` merged one level deep."""
    for k, v in (extra or {}).items():
        overrides.setdefault(k, {}).update(v) if isinstance(v, dict) else overrides.__setitem__(k, v)
    box.write_environment(name, overrides, outputs=outputs)
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




def _artifacts(key: str) -> list:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        found = [a for a in client.read_artifacts() if a.key == key]
    return sorted(found, key=lambda a: a.created, reverse=True)  # newest version first
