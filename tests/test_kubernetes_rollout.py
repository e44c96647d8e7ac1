"""The production-shaped rollout: the kubernetes target against an emulated cluster whose pods run.

Real parts: the pinned helm binaries (3 and 4) installing ``charts/mlflow``
into the Kubernetes API emulator (tests/support/kube_emulator) with its
process kubelet: the chart's migration Job and server pods run the pinned
MLflow as the chart says (uid 1000, read-only root, env from the
existingSecret, the ini from a Secret volume, probes on ``/health``), each
in its own network namespace. moto_server stands in for S3/STS/ACM/IAM/
Route53 (the pods assume the IRSA role through STS), a real PostgreSQL for
RDS, a dnslib resolver for Route53's records, and the emulator's ALB for
the Ingress: TLS for the public name on 443 (a CA made here), health checks
on the annotation's path, targets = the Ready pods. The CLI runs the flow
exactly as for the local target.

Needs root (namespaces); elsewhere the module is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.support.kube_emulator import pods_unavailable
from tests.support.k8s_world import (
    ADMIN_PW, DNSFAIL_HOST, FLASK_KEY, HOST, LB, NS, WORKERS, _artifacts, _helm, _helm_bin, _history, _sandbox,
)
from tests.support.pod_cluster import Cluster, environment, kubectl, pod_world, running_cluster, small_values
from tests.support.rollout import ROOT, Sandbox

_REASON = pods_unavailable()
pytestmark = [pytest.mark.e2e, pytest.mark.pods,
              pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, moto, postgres, prefect_api: str):
    with pod_world(tmp_path_factory.mktemp("k8s"), moto, postgres, prefect_api) as w:
        yield w


@pytest.mark.parametrize("helm, replicas", [("helm4", 3), ("helm3", 1)])
def test_production_rollout_all_stages_green(world, tmp_path: Path, helm: str, replicas: int) -> None:
    """helm 4 with the production shape (3 pods × 2 workers); helm 3 (a different client protocol) with one pod."""
    cloud, _, dns, _, api = world
    with running_cluster(tmp_path, world, f"all_{helm}") as cluster:
        kube = cluster.kube
        box = _sandbox(tmp_path, api)
        environment(box, "prod", cluster, world, helm=helm, workers=WORKERS, small=replicas == 1)
        r = box.cli("rollout", "--env", "prod")
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-6000:] + "\n--- emulator ---\n" + kube.log_tail()
        for stage in ("terraform-outputs", "preflight", "secrets", "admin-bootstrap",
                      "deploy-auth", "dns", "smoke-https", "smoke-auth", "smoke-tracking",
                      "smoke-artifacts", "smoke-logging", "report"):
            assert f"completed {stage}" in out, stage
        db_password = cluster.db_uri.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
        for secret in (ADMIN_PW, FLASK_KEY, db_password):  # nothing the run printed (Prefect logs included)
            assert secret not in out

        # helm history: a real first install — the auth-off bootstrap (no Ingress), then auth on
        assert "completed deploy-no-auth" in out
        history = _history(kube, helm)
        assert [(h["revision"], h["status"]) for h in history] == [(1, "superseded"), (2, "deployed")]
        v1 = json.loads(_helm(kube, helm, "get", "values", "mlflow", "-n", NS, "--revision", "1", "-o", "json"))
        v2 = json.loads(_helm(kube, helm, "get", "values", "mlflow", "-n", NS, "--revision", "2", "-o", "json"))
        assert v1["auth"]["enabled"] is False and v2["auth"]["enabled"] is True
        assert v2["existingSecret"] == "mlflow-credentials" and v2["serviceAccount"]["irsaRoleArn"] == cloud.role_arn
        assert v2["ingress"]["certificateArn"] == cloud.cert_arn
        # no secret in the helm values of any revision
        for v in (v1, v2):
            text = json.dumps(v)
            assert ADMIN_PW not in text and FLASK_KEY not in text and cluster.db_uri.split("@")[0] not in text

        # the chart's own pods served it: Ready, never restarted, their log is MLflow's, the artifact is in S3
        pods = [p for p in kube.control.objects("Pod", NS) if p["metadata"]["name"].startswith("mlflow-")
                and p["status"].get("phase") == "Running"]
        assert len(pods) == replicas and all(c["ready"] and c["restartCount"] == 0
                                      for p in pods for c in p["status"]["containerStatuses"]), pods
        log = kubectl(kube, "logs", pods[0]["metadata"]["name"], "-n", NS)
        assert "Application startup complete" in log and ADMIN_PW not in log
        assert f"found at s3://{cloud.bucket}/mlflow-artifacts/" in out  # the pods wrote it to S3 (moto), via IRSA
        migrate = [j for j in kube.control.objects("Job", NS)]
        assert not migrate  # the migration hook Job succeeded and was deleted (hook-succeeded)
        assert any(e["reason"] == "Completed" and e["involvedObject"]["kind"] == "Job" for e in kube.control.objects("Event", NS))

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
        assert [h["revision"] for h in _history(kube, helm)] == [1, 2]

        # `status --json`: the protocol's status contract, read from the cluster
        from targets.base import STATUS_KEYS

        st = box.cli("status", "--env", "prod", "--json")
        assert st.returncode == 0, (st.stdout + st.stderr)[-3000:]
        status = json.loads(st.stdout)
        assert set(STATUS_KEYS) <= set(status), set(STATUS_KEYS) - set(status)
        assert status["revision"] == 2 and status["auth"] is True and status["healthy"] is True


# ----------------------------------------------------------------- failure paths (helm 4)
@pytest.fixture(scope="module")
def cluster(world, tmp_path_factory: pytest.TempPathFactory):
    """One emulated cluster with a good production rollout (revisions 1 and 2) to break."""
    api = world[4]
    tmp = tmp_path_factory.mktemp("cluster")
    with running_cluster(tmp, world, "failures") as running:
        box = _sandbox(tmp, api)
        environment(box, "prod", running, world, helm="helm4")
        r = box.cli("rollout", "--env", "prod")
        assert r.returncode == 0, (r.stdout + r.stderr)[-5000:] + "\n--- emulator ---\n" + running.kube.log_tail()
        yield running, box, tmp


def _chart_copy(tmp: Path, name: str, edit) -> Path:
    """charts/mlflow with one defect, as a chart author could ship it."""
    chart = tmp / name
    if chart.exists():
        shutil.rmtree(chart)
    shutil.copytree(ROOT / "charts" / "mlflow", chart)
    edit(chart)
    return chart


def _probe_never_answers(chart: Path) -> None:
    deployment = chart / "templates" / "deployment.yaml"
    text = deployment.read_text()
    at = text.index("path: /health", text.index("readinessProbe:"))
    deployment.write_text(text[:at] + "path: /never-answers" + text[at + len("path: /health"):])


def _migration_fails(chart: Path) -> None:
    script = chart / "files" / "migrate.py"
    script.write_text('import sys\nprint("migration: cannot upgrade the schema (test defect)", flush=True)\nsys.exit(3)\n'
                      + script.read_text())


def _set_workers(box: Sandbox, workers: int) -> None:
    path = box.env_dir / "prod.yaml"
    data = yaml.safe_load(path.read_text())
    data["mlflow"]["workers"] = workers
    path.write_text(yaml.safe_dump(data))


def _serving(cluster: Cluster) -> list[dict]:
    pods = [p for p in cluster.kube.control.objects("Pod", NS)
            if p["metadata"]["name"].startswith("mlflow-") and p["status"].get("phase") == "Running"]
    return sorted(pods, key=lambda p: p["metadata"]["name"])


def _with_chart(box: Sandbox, chart: Path, timeout: int | None = None):
    path = box.env_dir / "prod.yaml"
    original = path.read_text()
    data = yaml.safe_load(original)
    data["kubernetes"]["chart"] = str(chart)
    if timeout:
        data["kubernetes"]["helm_timeout_seconds"] = timeout
    path.write_text(yaml.safe_dump(data))
    stack = contextlib.ExitStack()
    stack.callback(path.write_text, original)
    return stack


def test_probe_that_never_answers_times_out_and_rolls_back(cluster, world) -> None:
    """New pods whose readiness probe path never answers: helm --wait times out, the last good revision serves."""
    running, box, tmp = cluster
    kube = running.kube
    before = _history(kube, "helm4")
    good = before[-1]["revision"]
    old_pods = [p["metadata"]["name"] for p in _serving(running)]
    with _with_chart(box, _chart_copy(tmp, "probe-defect", _probe_never_answers), timeout=30):
        _set_workers(box, 2)  # a changed setting: the upgrade is not a no-op
        r = box.cli("rollout", "--env", "prod")
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-5000:]
    assert "failed deploy-auth" in out and "timed out" in out
    assert "completed auto-rollback" in out and f"rolled back to revision {good}" in out
    history = _history(kube, "helm4")
    assert history[-2]["status"] == "failed" and history[-1]["status"] == "deployed"
    assert history[-1]["revision"] == good + 2
    diagnostics = _artifacts("mlflow-rollout-prod-diagnostics")
    assert diagnostics and "Readiness probe failed" in diagnostics[0].data and "/never-answers" in diagnostics[0].data
    assert ADMIN_PW not in diagnostics[0].data
    report = _artifacts("mlflow-rollout-prod-report")
    assert report and "auto_rollback" in report[0].data
    # the old pods served throughout and still do, through the ALB
    assert [p["metadata"]["name"] for p in _serving(running)] == old_pods
    r = box.cli("health", "--env", "prod")
    assert r.returncode == 0 and '"outcome": "ok"' in r.stdout, (r.stdout + r.stderr)[-4000:]


def test_failing_migration_job_leaves_the_old_pods_serving(cluster, world) -> None:
    """The pre-upgrade migration hook fails (backoffLimit exhausted): no upgrade, the running pods keep serving."""
    running, box, tmp = cluster
    kube = running.kube
    before = _history(kube, "helm4")
    old_pods = [p["metadata"]["name"] for p in _serving(running)]
    with _with_chart(box, _chart_copy(tmp, "migration-defect", _migration_fails), timeout=90):
        _set_workers(box, 2)  # a changed setting: the upgrade is not a no-op
        r = box.cli("rollout", "--env", "prod")
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-5000:]
    assert "failed deploy-auth" in out and "pre-upgrade hooks failed" in out and "mlflow-migrate" in out, out[-4000:]
    history = _history(kube, "helm4")
    assert history[len(before)]["status"] == "failed" and history[-1]["status"] == "deployed"
    values = json.loads(_helm(kube, "helm4", "get", "values", "mlflow", "-n", NS, "-o", "json"))
    assert values["mlflow"]["workers"] == 1
    # the Job ran its pods for real: backoffLimit + 1 failures, each with the script's own words in its log
    events = kube.control.objects("Event", NS)
    assert any(e["reason"] == "BackoffLimitExceeded" for e in events)
    assert [p["metadata"]["name"] for p in _serving(running)] == old_pods
    assert all(c["restartCount"] == 0 for p in _serving(running) for c in p["status"]["containerStatuses"])
    r = box.cli("health", "--env", "prod")
    assert r.returncode == 0 and '"outcome": "ok"' in r.stdout, (r.stdout + r.stderr)[-4000:]


def test_wrong_existing_secret_key_is_named_by_the_diagnostics(cluster, world, tmp_path: Path) -> None:
    """Values that name a key the existingSecret lacks: the new pods stop at CreateContainerConfigError, helm
    --wait times out, the last good revision serves, and the diagnostics name the error and the key."""
    running, box, _ = cluster
    kube = running.kube
    good = _history(kube, "helm4")[-1]["revision"]
    old_pods = [p["metadata"]["name"] for p in _serving(running)]
    wrong = tmp_path / "wrong-key.yaml"
    wrong.write_text(yaml.safe_dump({"secretKeys": {"flaskSecretKey": "flask-key"}}))
    path = box.env_dir / "prod.yaml"
    original = path.read_text()
    data = yaml.safe_load(original)
    data["kubernetes"]["values_files"].append(str(wrong))
    data["kubernetes"]["helm_timeout_seconds"] = 30
    path.write_text(yaml.safe_dump(data))
    try:
        r = box.cli("rollout", "--env", "prod")
    finally:
        path.write_text(original)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-5000:]
    assert "failed deploy-auth" in out and f"rolled back to revision {good}" in out, out[-4000:]
    # the failure message ends with the cause and the fix (issue 13's configuration rule); the artifact starts so
    assert r.stdout.rstrip().splitlines()[-1].startswith(
        "diagnosis: configuration: the Secret ml-platform/mlflow-credentials has no key 'flask-key'"), out[-3000:]
    assert "fix: name an existing key" in r.stdout.rstrip().splitlines()[-1]
    diagnostics = _artifacts("mlflow-rollout-prod-diagnostics")[0].data
    assert diagnostics.index("## Diagnosis") < diagnostics.index("### Events"), diagnostics[:2000]
    assert "waiting: CreateContainerConfigError" in diagnostics, diagnostics[-3000:]
    assert f"couldn't find key flask-key in Secret {NS}/mlflow-credentials" in diagnostics
    assert FLASK_KEY not in diagnostics and ADMIN_PW not in diagnostics
    assert [p["metadata"]["name"] for p in _serving(running)] == old_pods


def test_certificate_for_another_host_fails_preflight(cluster, world) -> None:
    running, box, _ = cluster
    kube = running.kube
    environment(box, "wrongcert", running, world, helm="helm4", namespace="other", release="mlflow-other",
                 cert_arn=world[0].other_cert_arn)
    r = box.cli("rollout", "--env", "wrongcert")
    assert r.returncode == 2, (r.stdout + r.stderr)[-4000:]
    assert HOST in r.stdout and "other.example.com" in r.stdout
    assert "failed preflight" in r.stdout
    # nothing installed, nothing written
    assert json.loads(_helm(kube, "helm4", "list", "-n", "other", "-o", "json")) == []
    assert kube.control.objects("Secret", "other") == []


def test_release_left_pending_upgrade_is_recovered(cluster, world) -> None:
    running, box, tmp = cluster
    kube = running.kube
    good = _history(kube, "helm4")[-1]["revision"]
    chart = _chart_copy(tmp, "probe-defect-pending", _probe_never_answers)  # new pods never Ready: helm keeps waiting
    helm = subprocess.Popen(
        [str(_helm_bin("helm4")), "--kubeconfig", str(kube.kubeconfig), "upgrade", "mlflow", str(chart),
         "-n", NS, "--reuse-values", "--set", "mlflow.workers=2", "--wait", "--timeout", "300s"],
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
    assert values["mlflow"]["workers"] == 1


def test_dns_never_resolving_fails_naming_what_it_resolved_to(cluster, world) -> None:
    running, box, _ = cluster
    environment(box, "dnsfail", running, world, helm="helm4", host=DNSFAIL_HOST, namespace="dnsfail",
                 release="mlflow-dnsfail", small=True, extra={"aws": {"dns_timeout_seconds": 2, "dns_retry_delay_seconds": [1, 2]}})
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

    running, box, _ = cluster
    kube = running.kube
    ns = f"names-{env}"
    names = tmp_path / "names.yaml"
    names.write_text(yaml.safe_dump(override))
    environment(box, env, running, world, helm="helm4", namespace=ns, release=release, extra={"kubernetes": {
        "values_files": [str(ROOT / "charts" / "mlflow" / "values-production.yaml"), str(small_values(box)), str(names)]}}, small=True)
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
    _helm(kube, "helm4", "uninstall", release, "-n", ns, "--wait")  # its pods stop: the next tests have the CPU


def test_health_and_rollback_flows_on_the_cluster(cluster, world) -> None:
    running, box, _ = cluster
    kube = running.kube
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
    after = _history(kube, "helm4")  # (helm keeps the last 10 revisions: compare numbers, not lengths)
    assert after[-1]["revision"] == history[-1]["revision"] + 1 and after[-1]["status"] == "deployed"
    for stage in ("history", "rollback", "smoke-https", "smoke-auth", "smoke-tracking", "smoke-artifacts"):
        assert f"completed {stage}" in r.stdout, stage
    values = json.loads(_helm(kube, "helm4", "get", "values", "mlflow", "-n", NS, "--revision", str(valid[-1]), "-o", "json"))
    assert values["auth"]["enabled"]  # never the auth-off bootstrap (DESIGN §4.18)

    # a server process that dies is restarted by the kubelet: health reports the restart and degrades
    victim = _serving(running)[0]
    running.kill_server_process(victim)
    kube.control.wait_for(lambda: any(
        (s.get("restartCount") or 0) > 0
        for p in kube.control.objects("Pod", NS) for s in p.get("status", {}).get("containerStatuses", [])
    ), timeout=30, what="a restart")
    r = box.cli("health", "--env", "prod")
    assert r.returncode == 1 and "degraded" in r.stdout and "restarts" in r.stdout
    previous = kubectl(kube, "logs", victim["metadata"]["name"], "-n", NS, "--previous")
    assert "Application startup complete" in previous  # the killed run's own log
