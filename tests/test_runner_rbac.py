"""The runner's identity and RBAC (charts/mlflow-rollout-runner): sufficient, least, and enforced.

Three layers:

1. the emulator's RBAC authorizer (tests/support/kube_emulator/rbac.py) against
   the rules kube-apiserver applies — unit tests, in process;
2. the runner chart: its Role is exactly ``tasks.kube.RUNNER_RULES``, nothing
   cluster-wide, the IRSA annotation, and an IAM policy that covers every boto3
   call the code makes;
3. proof on the emulator, with the kubeconfig's token being the runner
   ServiceAccount's (RBAC objects installed by the admin from ``helm template``):
   a full helm 4 rollout, an upgrade, a rollback, diagnostics and a ``helm
   uninstall`` pass (sufficient); every verb of every rule is used by them
   (least); dropping a representative rule fails a named step with a message
   naming the permission. A namespace that does not exist is a clear bad input.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tasks.kube import RUNNER_RULES
from tests.support.kube_emulator import kube_emulator
from tests.support.kube_emulator.rbac import Attributes, Authorizer, User, forbidden, service_account_user
from tests.support.rollout import ROOT
from tests.support.k8s_world import (  # noqa: F401  (world is a fixture)
    LB, NS, STARTUP_LOG, _environment, _helm_bin, _sandbox, world,
)

RUNNER_CHART = ROOT / "charts" / "mlflow-rollout-runner"
RUNNER_NS = "mlflow-runner"
SA_USER = f"system:serviceaccount:{RUNNER_NS}:runner"


# ----------------------------------------------------------------- 1. the authorizer
def _authorizer(*objects: dict) -> Authorizer:
    def objs(kind: str, ns: str | None) -> list[dict]:
        return [o for o in objects if o["kind"] == kind and (ns is None or o["metadata"].get("namespace") == ns)]

    def lookup(kind: str, ns: str | None, name: str) -> dict | None:
        found = [o for o in objs(kind, ns) if o["metadata"]["name"] == name]
        return found[0] if found else None

    return Authorizer(objects=objs, lookup=lookup)


def _role(name: str, ns: str | None, rules: list[dict]) -> dict:
    kind = "Role" if ns else "ClusterRole"
    meta = {"name": name, **({"namespace": ns} if ns else {})}
    return {"kind": kind, "metadata": meta, "rules": rules}


def _binding(name: str, ns: str | None, role_kind: str, role: str, subjects: list[dict]) -> dict:
    kind = "RoleBinding" if ns else "ClusterRoleBinding"
    meta = {"name": name, **({"namespace": ns} if ns else {})}
    return {"kind": kind, "metadata": meta, "roleRef": {"kind": role_kind, "name": role}, "subjects": subjects}


SA = service_account_user("ops", "runner")
SA_SUBJECT = [{"kind": "ServiceAccount", "name": "runner", "namespace": "ops"}]


def test_role_binding_grants_only_its_namespace_verbs_groups_and_resources() -> None:
    az = _authorizer(
        _role("r", "ml", [{"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "patch"]},
                          {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]}]),
        _binding("b", "ml", "Role", "r", SA_SUBJECT),
    )
    assert az.allowed(SA, Attributes("get", "deployments", "apps", "ml", "mlflow"))
    assert az.allowed(SA, Attributes("patch", "deployments", "apps", "ml", "mlflow"))
    assert not az.allowed(SA, Attributes("delete", "deployments", "apps", "ml", "mlflow"))  # verb
    assert not az.allowed(SA, Attributes("get", "deployments", "extensions", "ml", "mlflow"))  # group
    assert not az.allowed(SA, Attributes("get", "deployments", "apps", "other", "mlflow"))  # namespace
    assert not az.allowed(SA, Attributes("get", "deployments", "apps", "", "mlflow"))  # cluster scope
    assert not az.allowed(SA, Attributes("get", "deployments", "apps", "ml", "mlflow", "status"))  # subresource
    assert az.allowed(SA, Attributes("get", "pods", "", "ml", "p", "log"))
    assert not az.allowed(SA, Attributes("get", "pods", "", "ml", "p"))  # pods/log is not pods
    other = service_account_user("ops", "someone-else")
    assert not az.allowed(other, Attributes("get", "deployments", "apps", "ml", "mlflow"))
    assert not az.allowed(service_account_user("ml", "runner"), Attributes("get", "deployments", "apps", "ml", "x"))


def test_wildcards_subresource_patterns_and_resource_names() -> None:
    az = _authorizer(
        _role("r", "ml", [
            {"apiGroups": ["*"], "resources": ["*/status"], "verbs": ["get"]},
            {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["mlflow-credentials"],
             "verbs": ["get", "update", "create", "list"]},
            {"apiGroups": ["batch"], "resources": ["jobs/*"], "verbs": ["*"]},
        ]),
        _binding("b", "ml", "Role", "r", SA_SUBJECT),
    )
    assert az.allowed(SA, Attributes("get", "deployments", "apps", "ml", "d", "status"))
    assert not az.allowed(SA, Attributes("get", "deployments", "apps", "ml", "d"))
    assert az.allowed(SA, Attributes("get", "secrets", "", "ml", "mlflow-credentials"))
    assert az.allowed(SA, Attributes("update", "secrets", "", "ml", "mlflow-credentials"))
    assert not az.allowed(SA, Attributes("get", "secrets", "", "ml", "other"))
    # resourceNames never match nameless verbs (create, list), as in kube-apiserver
    assert not az.allowed(SA, Attributes("create", "secrets", "", "ml", ""))
    assert not az.allowed(SA, Attributes("list", "secrets", "", "ml", ""))
    assert az.allowed(SA, Attributes("delete", "jobs", "batch", "ml", "j", "status"))
    assert not az.allowed(SA, Attributes("delete", "jobs", "batch", "ml", "j"))


def test_cluster_roles_through_both_bindings_and_group_subjects() -> None:
    read = _role("reader", None, [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}])
    ns_bound = _authorizer(read, _binding("b", "ml", "ClusterRole", "reader", SA_SUBJECT))
    assert ns_bound.allowed(SA, Attributes("list", "configmaps", "", "ml"))
    assert not ns_bound.allowed(SA, Attributes("list", "configmaps", "", "other"))  # RoleBinding: its namespace only
    cluster_bound = _authorizer(read, _binding("b", None, "ClusterRole", "reader",
                                               [{"kind": "Group", "name": "system:serviceaccounts:ops"}]))
    assert cluster_bound.allowed(SA, Attributes("list", "configmaps", "", "other"))
    assert cluster_bound.allowed(SA, Attributes("list", "configmaps", "", ""))
    assert not cluster_bound.allowed(User("alice", ("system:authenticated",)), Attributes("list", "configmaps", "", "ml"))
    admin = User("kubernetes-admin", ("system:masters", "system:authenticated"))
    assert _authorizer().allowed(admin, Attributes("delete", "namespaces", "", "ml", "ml"))


def test_every_authenticated_user_gets_discovery_and_self_access_reviews_only() -> None:
    az = _authorizer()
    for path in ("/api", "/apis", "/api/v1", "/apis/apps/v1", "/version", "/openapi/v3/apis/apps/v1"):
        assert az.allowed(SA, Attributes("get", path=path)), path
    assert not az.allowed(SA, Attributes("get", path="/metrics"))
    assert az.allowed(SA, Attributes("create", "selfsubjectaccessreviews", "authorization.k8s.io"))
    assert not az.allowed(SA, Attributes("list", "namespaces", "", ""))
    assert not az.allowed(SA, Attributes("get", "namespaces", "", "ml", "ml"))


def test_forbidden_is_worded_as_kube_apiserver_words_it() -> None:
    err = forbidden(SA, Attributes("get", "secrets", "", "ml", "mlflow-credentials"))
    assert err.code == 403 and err.reason == "Forbidden"
    assert err.message == ('secrets "mlflow-credentials" is forbidden: User "system:serviceaccount:ops:runner" '
                           'cannot get resource "secrets" in API group "" in the namespace "ml"')
    assert err.status()["details"] == {"name": "mlflow-credentials", "kind": "secrets"}
    err = forbidden(SA, Attributes("list", "leases", "coordination.k8s.io", "ml"))
    assert err.message == ('leases.coordination.k8s.io is forbidden: User "system:serviceaccount:ops:runner" '
                           'cannot list resource "leases" in API group "coordination.k8s.io" in the namespace "ml"')
    err = forbidden(SA, Attributes("get", "pods", "", "ml", "p-1", "log"))
    assert 'pods "p-1" is forbidden' in err.message and 'cannot get resource "pods/log"' in err.message
    err = forbidden(SA, Attributes("list", "namespaces", "", ""))
    assert err.message.endswith('cannot list resource "namespaces" in API group "" at the cluster scope')
    assert forbidden(SA, Attributes("get", path="/metrics")).message == (
        'forbidden: User "system:serviceaccount:ops:runner" cannot get path "/metrics"')


def test_emulator_enforces_rbac_for_service_account_tokens(tmp_path: Path) -> None:
    """Over HTTP with the real client: 403 Status bodies, SSA create needing create, SSAR, 401 for a gone account."""
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    with kube_emulator(tmp_path / "kube") as kube:
        kube.control.create_namespace("ml")
        kube.control.create_namespace("ops")
        kube.control.create({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "runner", "namespace": "ops"}})
        kube.control.create({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                             "metadata": {"name": "r", "namespace": "ml"},
                             "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "patch"]}]})
        kube.control.create({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                             "metadata": {"name": "b", "namespace": "ml"},
                             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "r"},
                             "subjects": SA_SUBJECT})
        cfg = client.Configuration()
        sa_kubeconfig = kube.kubeconfig_for("ops", "runner")
        config.load_kube_config(config_file=str(sa_kubeconfig), client_configuration=cfg)
        api = client.ApiClient(cfg)
        core = client.CoreV1Api(api)
        with pytest.raises(ApiException) as exc:
            core.list_namespaced_config_map("ml")
        body = json.loads(exc.value.body)
        assert exc.value.status == 403 and body["kind"] == "Status" and body["reason"] == "Forbidden"
        assert body["message"] == ('configmaps is forbidden: User "system:serviceaccount:ops:runner" cannot list '
                                   'resource "configmaps" in API group "" in the namespace "ml"')
        # server-side apply of a new object: patch alone is not enough, it creates
        cm = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\n"
        with pytest.raises(ApiException) as exc:
            core.patch_namespaced_config_map("c", "ml", yaml.safe_load(cm), field_manager="t",
                                             _content_type="application/apply-patch+yaml")
        assert 'cannot create resource "configmaps"' in json.loads(exc.value.body)["message"]
        kube.control.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "ml"}})
        assert core.read_namespaced_config_map("c", "ml").metadata.name == "c"
        with pytest.raises(ApiException) as exc:
            core.read_namespace("ml")
        assert exc.value.status == 403 and 'namespaces "ml" is forbidden' in json.loads(exc.value.body)["message"]

        authz = client.AuthorizationV1Api(api)

        def can(verb: str, resource: str, ns: str = "ml", sub: str | None = None) -> bool:
            review = authz.create_self_subject_access_review(client.V1SelfSubjectAccessReview(
                spec=client.V1SelfSubjectAccessReviewSpec(resource_attributes=client.V1ResourceAttributes(
                    namespace=ns, verb=verb, resource=resource, subresource=sub))))
            return review.status.allowed

        assert can("get", "configmaps") and can("patch", "configmaps")
        assert not can("delete", "configmaps") and not can("get", "configmaps", ns="ops")
        # requests are recorded with their user; the control API is the admin's alone
        assert any(r["user"] == "system:serviceaccount:ops:runner" and r["status"] == 403
                   for r in kube.control.requests())
        from tests.support.kube_emulator import EmulatorControl

        token = yaml.safe_load(sa_kubeconfig.read_text())["users"][0]["user"]["token"]
        with pytest.raises(RuntimeError, match="failed: 403"):
            EmulatorControl(kube.url, token, kube.ca_path).knobs()
        # a token whose ServiceAccount is gone is no longer accepted
        client.CoreV1Api(client.ApiClient(kube_admin_config(kube))).delete_namespaced_service_account("runner", "ops")
        with pytest.raises(ApiException) as exc:
            core.read_namespaced_config_map("c", "ml")
        assert exc.value.status == 401


def kube_admin_config(kube):
    from kubernetes import client, config

    cfg = client.Configuration()
    config.load_kube_config(config_file=str(kube.kubeconfig), client_configuration=cfg)
    return cfg


# ----------------------------------------------------------------- 2. the chart
def _template(*sets: str, namespace: str = RUNNER_NS) -> list[dict]:
    r = subprocess.run([str(_helm_bin("helm4")), "template", "runner", str(RUNNER_CHART), "-n", namespace, *sets],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def _role_rules(docs: list[dict]) -> list[tuple[str, str, tuple[str, ...]]]:
    role = next(d for d in docs if d["kind"] == "Role")
    out = []
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule  # no wildcards smuggled in via other keys
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.append((group, resource, tuple(rule["verbs"])))
    return out


def test_runner_chart_role_is_exactly_the_code_s_rules_and_nothing_cluster_wide() -> None:
    docs = _template("--set", "serviceAccount.irsaRoleArn=arn:aws:iam::123456789012:role/mlflow-runner")
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["Role", "RoleBinding", "ServiceAccount"]
    assert sorted(_role_rules(docs)) == sorted(RUNNER_RULES)
    for _, resource, verbs in _role_rules(docs):
        assert "*" not in verbs and "*" not in resource and resource != "namespaces"
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")
    assert sa["metadata"]["namespace"] == RUNNER_NS
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == "arn:aws:iam::123456789012:role/mlflow-runner"
    binding = next(d for d in docs if d["kind"] == "RoleBinding")
    role = next(d for d in docs if d["kind"] == "Role")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "ml-platform"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "runner", "namespace": RUNNER_NS}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "runner"}
    # the rendered objects are valid Kubernetes 1.34 objects (unknown fields rejected)
    validate = Path(__import__("sys").executable).parent / "kubernetes-validate"
    if validate.exists():
        rendered = "\n---\n".join(yaml.safe_dump(d) for d in docs)
        v = subprocess.run([str(validate), "--strict", "-k", "1.34.0", "-"], input=rendered, capture_output=True,
                           text=True, timeout=120)
        assert v.returncode == 0, v.stdout + v.stderr
    # values: other namespace, existing ServiceAccount; schema and validation refuse nonsense
    docs = _template("--set", "targetNamespace=ml-prod", "--set", "serviceAccount.create=false",
                     "--set", "serviceAccount.name=prefect-worker")
    assert sorted(d["kind"] for d in docs) == ["Role", "RoleBinding"]
    assert next(d for d in docs if d["kind"] == "Role")["metadata"]["namespace"] == "ml-prod"
    for bad in (["--set", "serviceAccount.create=false"], ["--set", "targetNamespace=Not_A_Name"],
                ["--set", "serviceAccount.irsaRoleArn=not-an-arn"], ["--set", "clusterWide=true"]):
        r = subprocess.run([str(_helm_bin("helm4")), "template", "runner", str(RUNNER_CHART), *bad],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0, bad


#: boto3 client method → IAM action (the calls in tasks/aws.py, tasks/s3.py, tasks/terraform.py).
_IAM_ACTION = {
    "describe_certificate": "acm:DescribeCertificate", "get_role": "iam:GetRole",
    "list_hosted_zones": "route53:ListHostedZones", "list_resource_record_sets": "route53:ListResourceRecordSets",
    "change_resource_record_sets": "route53:ChangeResourceRecordSets", "get_change": "route53:GetChange",
    "head_bucket": "s3:ListBucket", "list_objects_v2": "s3:ListBucket", "get_object": "s3:GetObject",
    "delete_object": "s3:DeleteObject",
    "list_role_policies": "iam:ListRolePolicies", "get_role_policy": "iam:GetRolePolicy",
    "list_attached_role_policies": "iam:ListAttachedRolePolicies", "get_policy": "iam:GetPolicy",
    "get_policy_version": "iam:GetPolicyVersion",
}


def test_iam_policy_covers_every_aws_call_the_code_makes_and_no_more() -> None:
    policy = json.loads((RUNNER_CHART / "iam-policy.json").read_text())
    granted = {a for s in policy["Statement"] if s["Effect"] == "Allow" for a in s["Action"]}
    called: set[str] = set()
    for module in ("tasks/aws.py", "tasks/s3.py", "tasks/terraform.py"):
        text = (ROOT / module).read_text()
        for method in re.findall(r"\.([a-z][a-z0-9_]+)\(", text) + re.findall(r'get_paginator\("([a-z_]+)"\)', text):
            if method in _IAM_ACTION:
                called.add(_IAM_ACTION[method])
    assert called, "no boto3 call found: the scan is broken"
    assert granted == called, (granted - called, called - granted)
    assert all(not a.endswith("*") for a in granted)


# ----------------------------------------------------------------- 3. proof on the emulator
def _install_runner(kube, *, drop: tuple[str, str] | None = None, name: str = "runner") -> Path:
    """The admin installs the runner chart's objects (``helm template`` | create); a kubeconfig with its token.

    ``drop``: (apiGroup, resource) of one rule left out of the Role.
    """
    kube.control.create_namespace(RUNNER_NS)
    for doc in yaml.safe_load_all(subprocess.run(
            [str(_helm_bin("helm4")), "template", name, str(RUNNER_CHART), "-n", RUNNER_NS,
             "--set", f"targetNamespace={NS}"], capture_output=True, text=True, check=True).stdout):
        if not doc:
            continue
        if doc["kind"] == "Role" and drop:
            doc["rules"] = [r for r in doc["rules"] if (r["apiGroups"][0], r["resources"][0]) != drop]
        kube.control.create(doc)
    return kube.kubeconfig_for(RUNNER_NS, name)


def _sa_requests(kube, user: str = SA_USER) -> list[dict]:
    return [r for r in kube.control.requests() if r.get("user") == user]


def _used(requests: list[dict]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource[/sub], verb) of resource requests, as the emulator's authorizer saw them."""
    from tests.support.kube_emulator.api import Api, Request

    out = set()
    for r in requests:
        if r["status"] in (401, 403):
            continue  # refused: not a permission the run had
        parts = r["path"].rstrip("/").strip("/").split("/")
        if not ((parts[0] == "api" and len(parts) >= 3) or (parts[0] == "apis" and len(parts) >= 4)):
            continue
        try:
            route = Api._route(None, parts)  # type: ignore[arg-type]
        except Exception:
            continue
        a = Api._attributes(Request(r["method"], r["path"], r["query"], {}), route)
        out.add((a.group, a.resource + (f"/{a.subresource}" if a.subresource else ""), a.verb))
        if a.verb == "patch" and r["content_type"] == "application/apply-patch+yaml" and r["status"] == 201:
            out.add((a.group, a.resource, "create"))  # an apply that created: authorized as create too
    return out


@pytest.fixture(scope="module")
def runner(world, tmp_path_factory: pytest.TempPathFactory):
    """A cluster where only the runner ServiceAccount's token runs a rollout, an upgrade, a rollback, an uninstall."""
    cloud, server, dns, _, api = world
    tmp = tmp_path_factory.mktemp("runner")
    with kube_emulator(tmp / "kube") as kube:
        kube.control.create_namespace(NS)
        sa_kubeconfig = _install_runner(kube)
        kube.control.reset()  # knobs and the request log: from here on it is the runner's run
        kube.control.set_ingress_hostname(LB)
        kube.control.set_logs(STARTUP_LOG, deployment="mlflow", namespace=NS)
        netpol = tmp / "netpol.yaml"
        netpol.write_text(yaml.safe_dump({"networkPolicy": {"enabled": True}}))
        box = _sandbox(tmp, api)
        _environment(box, "prod", kube, world, helm="helm4", create_namespace=False, extra={
            "kubernetes": {"kubeconfig": str(sa_kubeconfig), "values_files": [
                str(ROOT / "charts" / "mlflow" / "values-production.yaml"), str(netpol)]},
            "lock_lease_seconds": 10,  # renewed every ~3 s: the lock's update is exercised
        })
        outputs: dict[str, str] = {}
        r = box.cli("rollout", "--env", "prod")
        outputs["rollout"] = r.stdout + r.stderr
        assert r.returncode == 0, outputs["rollout"][-6000:] + "\n--- emulator ---\n" + kube.log_tail()
        # an upgrade (a new value → revision 2), then the rollback flow back to revision 1
        path = box.env_dir / "prod.yaml"
        data = yaml.safe_load(path.read_text())
        data["mlflow"]["auth_cache_ttl_seconds"] = 30
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        r = box.cli("rollout", "--env", "prod")
        outputs["upgrade"] = r.stdout + r.stderr
        assert r.returncode == 0, outputs["upgrade"][-6000:]
        r = box.cli("rollback", "--env", "prod", "--revision", "1", "--reason", "rbac drill")
        outputs["rollback"] = r.stdout + r.stderr
        assert r.returncode == 0, outputs["rollback"][-6000:]
        # what a failed run and a contended lock read (diagnostics: events; LeaseLock: the holder's Lease)
        from mlflow_rollout.settings import load_environment
        from targets.kubernetes import KubernetesTarget

        target = KubernetesTarget(load_environment("prod", box.env_dir))
        outputs["diagnostics"] = target.diagnostics()
        assert target.kube.read_lease(target.lock_name) is None  # released by the rollback
        # uninstall with the runner's identity (what discard_bootstrap does with helm)
        u = subprocess.run([str(_helm_bin("helm4")), "--kubeconfig", str(sa_kubeconfig), "uninstall", "mlflow",
                            "-n", NS, "--wait", "--timeout", "60s"], capture_output=True, text=True,
                           env=kube.env(), timeout=120)
        outputs["uninstall"] = u.stdout + u.stderr
        assert u.returncode == 0, u.stderr
        yield kube, box, outputs, _sa_requests(kube)


def test_the_runner_service_account_is_sufficient(runner) -> None:
    kube, box, outputs, requests = runner
    for stage in ("preflight", "secrets", "deploy-auth", "dns", "smoke-logging", "report"):
        assert f"completed {stage}" in outputs["rollout"], stage
    assert "permissions the rollout needs in namespace ml-platform are granted" in outputs["rollout"]
    assert "completed deploy-auth" in outputs["upgrade"] and "completed rollback" in outputs["rollback"]
    assert "### Events" in outputs["diagnostics"]
    assert requests, "the runner's token made no request: the kubeconfig did not carry it"
    denied = [(r["method"], r["path"]) for r in requests if r["status"] in (401, 403)]
    assert denied == []
    assert kube.control.objects("Deployment", NS) == []  # uninstalled
    # nothing cluster-scoped was touched (no Namespace read or created)
    assert not [r for r in requests if re.match(r"^/api/v1/namespaces/?$", r["path"])
                or re.match(r"^/api/v1/namespaces/[^/]+/?$", r["path"])]


@pytest.fixture(scope="module")
def runner3(world, tmp_path_factory: pytest.TempPathFactory):
    """Helm 3 (creates, strategic-merge patches, polling and informer waits): a rollout and an uninstall."""
    cloud, server, dns, _, api = world
    tmp = tmp_path_factory.mktemp("runner3")
    with kube_emulator(tmp / "kube") as kube:
        kube.control.create_namespace(NS)
        sa_kubeconfig = _install_runner(kube)
        kube.control.reset()
        kube.control.set_ingress_hostname(LB)
        kube.control.set_logs(STARTUP_LOG, deployment="mlflow", namespace=NS)
        box = _sandbox(tmp, api)
        _environment(box, "prod", kube, world, helm="helm3", create_namespace=False,
                     extra={"kubernetes": {"kubeconfig": str(sa_kubeconfig)}})
        r = box.cli("rollout", "--env", "prod")
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-6000:] + "\n--- emulator ---\n" + kube.log_tail()
        u = subprocess.run([str(_helm_bin("helm3")), "--kubeconfig", str(sa_kubeconfig), "uninstall", "mlflow",
                            "-n", NS, "--wait", "--timeout", "60s"], capture_output=True, text=True,
                           env=kube.env(), timeout=120)
        assert u.returncode == 0, u.stderr
        yield kube, out, _sa_requests(kube)


def test_the_runner_service_account_is_sufficient_for_helm3(runner3) -> None:
    kube, out, requests = runner3
    assert "completed deploy-auth" in out and "completed smoke-logging" in out
    # helm 3 reads its release namespace and carries on when refused (helm 3 in a namespaced Role, as on
    # real clusters); it is the only thing refused, and nothing is granted for it
    denied = {(r["method"], r["path"], r["user_agent"].split("/")[0]) for r in requests if r["status"] in (401, 403)}
    assert denied <= {("GET", f"/api/v1/namespaces/{NS}", "Helm")}, denied
    assert kube.control.objects("Deployment", NS) == []


@pytest.mark.parametrize("rule", RUNNER_RULES, ids=lambda r: f"{r[0] or 'core'}-{r[1]}")
def test_every_verb_of_every_rule_is_used(runner, runner3, rule) -> None:
    """By helm 4's rollout, upgrade, rollback, diagnostics and uninstall, or helm 3's rollout and uninstall."""
    used = _used(runner[-1]) | _used(runner3[-1])
    group, resource, verbs = rule
    unused = [v for v in verbs if (group, resource, v) not in used]
    assert unused == [], f"rule {group or 'core'}/{resource}: verbs {unused} granted but never used"


def test_nothing_outside_the_rules_is_used(runner, runner3) -> None:
    granted = {(g, r, v) for g, r, verbs in RUNNER_RULES for v in verbs}
    granted.add(("authorization.k8s.io", "selfsubjectaccessreviews", "create"))  # every authenticated user
    assert _used(runner[-1]) - granted == set()
    assert _used(runner3[-1]) - granted == set()


@pytest.mark.parametrize("drop, step, permission", [
    (("coordination.k8s.io", "leases"), "lock",
     'cannot create resource "leases" in API group "coordination.k8s.io" in the namespace "ml-platform"'),
    (("", "pods/log"), "preflight", "get pods/log"),
    # the flow's first read of the release (helm history) comes before preflight: helm's own error names it
    (("", "secrets"), "history",
     'cannot list resource "secrets" in API group "" in the namespace "ml-platform"'),
], ids=["leases", "pods-log", "secrets"])
def test_dropping_a_rule_fails_a_named_step_naming_the_permission(runner, world, drop, step, permission) -> None:
    kube, box, _, _ = runner
    name = f"runner-no-{drop[1].replace('/', '-')}"
    kubeconfig = _install_runner(kube, drop=drop, name=name)
    env = f"drop-{drop[1].replace('/', '-')}"
    _environment(box, env, kube, world, helm="helm4", create_namespace=False,
                 extra={"kubernetes": {"kubeconfig": str(kubeconfig)}})
    r = box.cli("rollout", "--env", env)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-4000:]
    assert permission in out, out[-4000:]
    if step == "preflight":
        assert "failed preflight" in out and "charts/mlflow-rollout-runner" in out, out[-4000:]
    else:
        assert f"system:serviceaccount:{RUNNER_NS}:{name}" in out, out[-4000:]
    if drop == ("", "pods/log"):  # the real call, not only the preflight's review, is refused with the API's words
        from mlflow_rollout.errors import AuthError
        from tasks.kube import Kube, Workload

        k = Kube(namespace=NS, release="mlflow", kubeconfig=kubeconfig,
                 workload=lambda: Workload(deployment="mlflow", selector={"app": "x"}))
        kube.control.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": NS,
                             "labels": {"app": "x"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}})
        with pytest.raises(AuthError, match=r'pods "p" is forbidden: .* cannot get resource "pods/log"'):
            k.logs_since(__import__("datetime").datetime.now(__import__("datetime").timezone.utc))


def test_a_missing_namespace_is_bad_input_naming_it_and_the_command(runner, world) -> None:
    kube, box, _, _ = runner
    _environment(box, "nons", kube, world, helm="helm4", namespace="ml-absent", create_namespace=False,
                 release="mlflow-absent", extra={"kubernetes": {"kubeconfig": str(kube.kubeconfig)}})
    r = box.cli("rollout", "--env", "nons")
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-4000:]
    assert "namespace ml-absent does not exist" in out and "kubectl create namespace ml-absent" in out, out[-4000:]
    assert kube.control.object("Namespace", "ml-absent") is None  # not created behind the user's back
