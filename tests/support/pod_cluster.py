"""An emulated EKS cluster whose pods run (the process kubelet), for the tests that need the chart's own pods.

:func:`running_cluster` starts the Kubernetes API emulator with its process
kubelet and the emulated ALB in front of the pods; :func:`environment`
writes an environment file that rolls out to it. Shared by
tests/test_kubernetes_rollout.py (the rollout and its failure paths) and
tests/test_diagnosis_pods.py (the runbook's troubleshooting on real pods).
Needs root: check :func:`pods_unavailable` first.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import signal
import yaml

from tasks.tls import ensure_certificates
from tests.support.dns_server import dns_server
from tests.support.kube_emulator import KubeEmulator, PodRuntime, kube_emulator, python_image
from tests.support.k8s_world import (
    DNSFAIL_HOST, HOST, LB, NS, CloudAccount, _helm_bin, k8s_overrides, write_k8s_environment,
)
from tests.support.rollout import ROOT, Sandbox

__all__ = ["IMAGE", "Cloud", "Cluster", "running_cluster", "pod_world", "environment", "kubectl", "small_values"]

IMAGE = "ghcr.io/mlflow/mlflow:v{}-full".format(yaml.safe_load((ROOT / "charts" / "mlflow" / "Chart.yaml").read_text())["appVersion"])



class Cloud(CloudAccount):
    """The AWS account, the PostgreSQL that stands for RDS, DNS, and the ALB's certificate."""

    def __init__(self, moto, postgres, tmp: Path, dns):
        super().__init__(moto, dns)
        self.postgres, self.tmp = postgres, tmp
        self.tls = ensure_certificates(tmp / "alb-tls", [HOST, DNSFAIL_HOST])  # "ACM's" certificate, as the ALB serves it


@dataclass
class Cluster:
    """An emulated EKS cluster with running pods, its ALB, and the database its MLflow uses."""

    kube: KubeEmulator
    gateway: str
    db_uri: str
    cloud: Cloud

    @property
    def endpoint_url(self) -> str:
        """moto as the pods (and the runner) reach it."""
        return f"http://{self.gateway}:{self.cloud.moto.port}"

    def outputs(self, cert_arn: str | None = None) -> dict:
        return self.cloud.outputs(self.db_uri, cert_arn)

    def kill_server_process(self, pod: dict) -> None:
        """SIGKILL the main process of a pod's container (the kubelet restarts it)."""
        netns = f"{self.kube.pods.prefix}-{pod['status']['podIP'].rsplit('.', 1)[1]}"
        pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


@contextlib.contextmanager
def running_cluster(tmp: Path, world, name: str) -> Iterator[Cluster]:
    cloud = world[0]
    runtime = PodRuntime(images={}, host_ports=[cloud.postgres.port, cloud.moto.port], backoff_seconds=2.0)
    gateway = runtime.gateway
    runtime.images[IMAGE] = python_image(env={"AWS_ENDPOINT_URL_STS": f"http://{gateway}:{cloud.moto.port}"})
    alb_ip = runtime.address(199)  # in the "VPC": reachable from the host and from pods
    runtime.alb = {"host": alb_ip, "https_port": 443, "http_port": 80, "cert": str(cloud.tls.server_cert),
                   "key": str(cloud.tls.server_key), "interval": 1.0}
    db = cloud.postgres.create_database(f"mlflow_{name}_{os.getpid()}_{int(time.time())}")
    db_uri = re.sub(r"@[^:/]+:", f"@{gateway}:", db, count=1)
    with kube_emulator(tmp / "kube", pods=runtime) as kube:
        kube.control.set_ingress_hostname(LB)
        cloud.dns.set(LB, "A", alb_ip)
        yield Cluster(kube=kube, gateway=gateway, db_uri=db_uri, cloud=cloud)


@contextlib.contextmanager
def pod_world(tmp: Path, moto, postgres, prefect_api: str):
    """(cloud, None, dns, tmp, prefect_api): the AWS account, PostgreSQL, DNS — what a module's clusters share."""
    with dns_server(moto.endpoint_url, region="us-west-2") as dns:
        yield Cloud(moto, postgres, tmp, dns), None, dns, tmp, prefect_api


def environment(box: Sandbox, name: str, cluster: Cluster, world, *, helm: str, host: str = HOST, namespace: str = NS,
                 release: str = "mlflow", cert_arn: str | None = None, extra: dict | None = None,
                 workers: int = 1, small: bool = False, create_namespace: bool = True) -> None:
    """An environment on ``cluster``. ``workers``/``small`` (one replica) keep pods cheap where
    the test's subject is not the pod count; the all-stages tests run the production shape."""
    cloud, _, dns, _, _ = world
    kube = cluster.kube
    if create_namespace:  # a prerequisite made by the platform team: the runner's namespaced Role cannot
        kube.control.create_namespace(namespace)
    overrides = k8s_overrides(host, workers, kube, namespace=namespace, release=release, helm=helm,
                              dns_address=dns.address, endpoint_url=cluster.endpoint_url)
    if small:
        overrides["kubernetes"]["values_files"].append(str(small_values(box)))
    overrides["kubernetes"].update({"helm_timeout_seconds": 240, "access": "ingress", "ca_bundle": str(cloud.tls.ca_cert)})
    write_k8s_environment(box, name, overrides, extra, cluster.outputs(cert_arn))


def kubectl(kube, *args: str) -> str:
    r = subprocess.run([str(_helm_bin("kubectl")), "--kubeconfig", str(kube.kubeconfig), *args],
                       capture_output=True, text=True, env=kube.env(), timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def small_values(box: Sandbox) -> Path:
    """One replica (the HPA's floor too): for tests whose subject is not the pod count."""
    path = box.env_dir / "values-small.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"replicaCount": 1, "autoscaling": {"minReplicas": 1},
                                    "podDisruptionBudget": {"enabled": False}}))
    return path
