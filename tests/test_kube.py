"""tasks/kube.py: the rollout decision (kubectl's), names read from the rendered release, the API error split.

``deployment_rollout`` is checked branch by branch on real ``V1Deployment``
objects against kubectl's ``DeploymentStatusViewer.Status``
(kubernetes/kubectl pkg/polymorphichelpers/rollout_status.go); then
:class:`Kube` runs against the Kubernetes API emulator, and
:meth:`Workload.from_manifest` reads what the pinned helm renders.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Iterator

import pytest
import yaml
from kubernetes import client

from mlflow_rollout.errors import BadInputError, PermanentError, TransientError
from tasks.kube import Kube, Workload, deployment_rollout
from tests.support.kube_emulator import KubeEmulator, kube_emulator

REPO = Path(__file__).resolve().parent.parent
HELM4 = REPO / ".tools" / "bin" / "helm4"


def _deployment(*, replicas: int | None = 3, generation: int = 2, observed: int = 2, updated: int = 3,
                total: int = 3, available: int = 3, progressing: str | None = "NewReplicaSetAvailable") -> client.V1Deployment:
    conditions = [client.V1DeploymentCondition(type="Available", status="True", reason="MinimumReplicasAvailable")]
    if progressing is not None:
        conditions.append(client.V1DeploymentCondition(
            type="Progressing", status="False" if progressing == "ProgressDeadlineExceeded" else "True",
            reason=progressing, message='ReplicaSet "web-5d9c" has timed out progressing.'))
    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name="web", generation=generation),
        spec=client.V1DeploymentSpec(
            replicas=replicas, selector=client.V1LabelSelector(match_labels={"app": "web"}),
            template=client.V1PodTemplateSpec(),
        ),
        status=client.V1DeploymentStatus(
            observed_generation=observed, updated_replicas=updated, replicas=total,
            available_replicas=available, conditions=conditions,
        ),
    )


# ------------------------------------------------------------------ kubectl's decision, branch by branch
def test_rolled_out() -> None:
    assert deployment_rollout(_deployment()) == ('deployment "web" successfully rolled out', True)


def test_spec_update_not_observed_comes_first() -> None:
    # even a timed-out condition of the previous generation is not looked at before the new spec is observed
    d = _deployment(generation=3, observed=2, progressing="ProgressDeadlineExceeded")
    assert deployment_rollout(d) == ("Waiting for deployment spec update to be observed...", False)


def test_progress_deadline_exceeded_is_an_error() -> None:
    with pytest.raises(PermanentError, match='deployment "web" exceeded its progress deadline'):
        deployment_rollout(_deployment(updated=1, available=1, progressing="ProgressDeadlineExceeded"))


def test_new_replicas_not_all_updated() -> None:
    message, done = deployment_rollout(_deployment(updated=1, available=1))
    assert not done and message.endswith("1 out of 3 new replicas have been updated...")


def test_old_replicas_pending_termination() -> None:
    # updated and available == spec.replicas, but two old pods still run: not done (the old check said done)
    message, done = deployment_rollout(_deployment(total=5))
    assert not done and message.endswith("2 old replicas are pending termination...")


def test_updated_replicas_not_all_available() -> None:
    message, done = deployment_rollout(_deployment(available=2))
    assert not done and message.endswith("2 of 3 updated replicas are available...")


def test_available_is_compared_with_updated_not_with_spec() -> None:
    # kubectl: with spec.replicas unset (nil), only status counts
    assert deployment_rollout(_deployment(replicas=None, updated=2, total=2, available=2))[1] is True
    message, done = deployment_rollout(_deployment(replicas=None, updated=2, total=2, available=1))
    assert not done and message.endswith("1 of 2 updated replicas are available...")


# ------------------------------------------------------------------ names from the rendered release
def _template(*values: str) -> list[dict]:
    assert HELM4.is_file(), f"{HELM4} missing: run scripts/setup.sh"
    out = subprocess.run([str(HELM4), "template", "rel", str(REPO / "charts" / "mlflow"), *values],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return [o for o in yaml.safe_load_all(out) if o]


@pytest.mark.parametrize("values, name, label", [
    ((), "rel-mlflow", "mlflow"),
    (("--set", "fullnameOverride=tracking-server"), "tracking-server", "mlflow"),
    (("--set", "nameOverride=tracking"), "rel-tracking", "tracking"),
])
def test_workload_is_read_from_the_manifest(values, name, label) -> None:
    ingress = ("--set", "ingress.enabled=true", "--set", "ingress.hosts[0]=m.example.com", "--set", "service.port=8080")
    w = Workload.from_manifest(_template(*values, *ingress))
    assert w == Workload(deployment=name, selector={"app.kubernetes.io/name": label, "app.kubernetes.io/instance": "rel"},
                         service=name, service_port=8080, ingress=name, service_account=name, container_port=5000)
    assert w.label_selector == f"app.kubernetes.io/instance=rel,app.kubernetes.io/name={label}"
    assert Workload.from_manifest([]) == Workload()


# ------------------------------------------------------------------ against the emulator
@pytest.fixture
def kube(tmp_path: Path) -> Iterator[KubeEmulator]:
    with kube_emulator(tmp_path / "kube") as emulator:
        yield emulator


def _create(kube: KubeEmulator, name: str, replicas: int) -> None:
    api = client.ApiClient(_config(kube))
    client.AppsV1Api(api).create_namespaced_deployment("default", {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]}}}})


def _config(kube: KubeEmulator) -> client.Configuration:
    from kubernetes import config

    cfg = client.Configuration()
    config.load_kube_config(config_file=str(kube.kubeconfig), client_configuration=cfg)
    return cfg


def test_rollout_status_on_the_cluster(kube: KubeEmulator) -> None:
    names = {"current": Workload()}
    k = Kube(namespace="default", release="web", kubeconfig=kube.kubeconfig, workload=lambda: names["current"])
    with pytest.raises(PermanentError, match="no Deployment"):
        k.rollout_status()
    assert k.pods() == [] and k.processes() == []  # not installed: never every pod of the namespace

    _create(kube, "other", 1)  # pods of another app in the namespace are not the release's
    kube.control.stuck_rollout("web", "default", deadline_seconds=2)
    _create(kube, "web", 2)
    names["current"] = Workload(deployment="web", selector={"app": "web"})
    with pytest.raises(TransientError, match="updated replicas are available|new replicas have been updated"):
        k.rollout_status()
    kube.control.wait_for(
        lambda: any(c.reason == "ProgressDeadlineExceeded" for c in
                    client.AppsV1Api(client.ApiClient(_config(kube))).read_namespaced_deployment("web", "default")
                    .status.conditions or []),
        timeout=15, what="ProgressDeadlineExceeded")
    with pytest.raises(PermanentError, match="exceeded its progress deadline"):
        k.rollout_status()

    kube.control.unstick("web", "default")
    _create(kube, "web2", 2)
    names["current"] = Workload(deployment="web2", selector={"app": "web2"})
    kube.control.wait_for(lambda: _done(k), timeout=15, what="web2 rolled out")
    assert k.rollout_status() == 'deployment "web2" successfully rolled out'
    states = k.processes()
    assert len(states) == 2 and all(s.ready and s.name.startswith("pod web2-") for s in states)


def _done(k: Kube) -> bool:
    try:
        k.rollout_status()
        return True
    except TransientError:
        return False


def test_api_errors_are_split_in_one_place(kube: KubeEmulator) -> None:
    k = Kube(namespace="fresh", release="web", kubeconfig=kube.kubeconfig)
    assert k.read_secret("nope") is None and k.secret_annotations("nope") is None
    # the namespace is a prerequisite the runner never creates: a create in it is bad input naming it
    with pytest.raises(BadInputError, match=r"namespace fresh does not exist.*kubectl create namespace fresh"):
        k.create_lease("lock", client.V1LeaseSpec(holder_identity="a", lease_duration_seconds=10))
    assert kube.control.object("Namespace", "fresh") is None
    kube.control.create_namespace("fresh")
    assert k.read_lease("lock") is None
    spec = client.V1LeaseSpec(holder_identity="a", lease_duration_seconds=10)
    lease = k.create_lease("lock", spec)
    assert lease is not None and k.create_lease("lock", spec) is None  # 409: held
    assert k.delete_lease("lock", "999999") is False  # 409: precondition failed
    assert k.delete_lease("lock", lease.metadata.resource_version) is True
    assert k.delete_lease("lock", None) is False  # 404
    with pytest.raises(PermanentError, match="no source for the release's object names"):
        k.rollout_status()
