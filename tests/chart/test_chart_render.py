"""Assertions on the objects `helm template` renders, one "must have" at a time."""

from __future__ import annotations

import base64
import configparser
import json

import pytest
import yaml

from chart_support import (
    CANARY_ADMIN_PASSWORD,
    CANARY_DB_URI,
    CANARY_FLASK_KEY,
    CANARY_SECRET_VALUES,
    CHART,
    FULLNAME,
    NAMESPACE,
    RELEASE,
    SCENARIOS,
    Helm,
    Rendered,
)

SELECTOR = {"app.kubernetes.io/name": "mlflow", "app.kubernetes.io/instance": RELEASE}
SECRET_KEYS = {"backend-store-uri", "auth-database-uri", "admin-password", "flask-secret-key", "basic_auth.ini"}
S3 = "s3://mdpg-mlops-mlflow-artifacts/mlflow-artifacts"
SERVICE_HOSTS = [
    FULLNAME,
    f"{FULLNAME}:80",
    f"{FULLNAME}.{NAMESPACE}",
    f"{FULLNAME}.{NAMESPACE}:80",
    f"{FULLNAME}.{NAMESPACE}.svc",
    f"{FULLNAME}.{NAMESPACE}.svc:80",
    f"{FULLNAME}.{NAMESPACE}.svc.cluster.local",
    f"{FULLNAME}.{NAMESPACE}.svc.cluster.local:80",
]


def secret_data(secret: dict) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def hook(obj: dict) -> str | None:
    return obj["metadata"].get("annotations", {}).get("helm.sh/hook")


def pod_specs(rendered: Rendered) -> list[dict]:
    specs = [o["spec"] for o in rendered.all("Pod")]
    for kind in ("Deployment", "Job"):
        specs += [o["spec"]["template"]["spec"] for o in rendered.all(kind)]
    return specs


# --- Chart metadata, image -------------------------------------------------


def test_chart_yaml_pins_mlflow_version() -> None:
    import re
    import tomllib

    import yaml

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == "3.17.2"
    pyproject = tomllib.loads((CHART.parents[1] / "pyproject.toml").read_text())
    pins = [d for d in pyproject["project"]["dependencies"] if re.match(r"mlflow(\[.*\])?==", d)]
    assert pins and pins[0].split("==")[1] == chart["appVersion"]


def test_default_image_is_full_tag_of_pinned_version(helm: Helm) -> None:
    rendered = helm.scenario("default")
    images = {c["image"] for spec in pod_specs(rendered) for c in spec["containers"]}
    assert images == {"ghcr.io/mlflow/mlflow:v3.17.2-full"}
    assert helm.scenario("production").container["image"] == "ghcr.io/mlflow/mlflow:v3.17.2-full"
    readme = (CHART / "README.md").read_text()
    assert "v3.17.2-full" in readme and "psycopg2" in readme and "boto3" in readme


def test_image_tag_and_digest(helm: Helm) -> None:
    assert helm.template({"image": {"tag": "v3.17.2-custom"}}).container["image"].endswith(":v3.17.2-custom")
    digest = "sha256:" + "a" * 64
    assert helm.template({"image": {"digest": digest}}).container["image"] == f"ghcr.io/mlflow/mlflow@{digest}"


# --- Labels and selectors ----------------------------------------------------


@pytest.mark.parametrize("scenario", ["default", "production", "chart-secret-postgres"])
def test_standard_labels_and_selectors(helm: Helm, scenario: str) -> None:
    rendered = helm.scenario(scenario)
    for obj in rendered.objects:
        labels = obj["metadata"]["labels"]
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                    "app.kubernetes.io/managed-by", "helm.sh/chart"):
            assert key in labels, (obj["kind"], obj["metadata"]["name"], key)
        assert labels["app.kubernetes.io/version"] == "3.17.2"
        assert labels["app.kubernetes.io/instance"] == RELEASE
    deployment = rendered.deployment
    assert deployment["spec"]["selector"] == {"matchLabels": SELECTOR}
    template_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert SELECTOR.items() <= template_labels.items()
    # The Service also selects on the auth label: only auth-on pods are its endpoints when auth is on.
    assert rendered.one("Service")["spec"]["selector"] == {**SELECTOR, "mlflow/auth": "enabled"}
    assert template_labels["mlflow/auth"] == "enabled"
    for pdb in rendered.all("PodDisruptionBudget"):
        assert pdb["spec"]["selector"] == {"matchLabels": SELECTOR}
    for policy in rendered.all("NetworkPolicy"):
        assert policy["spec"]["podSelector"] == {"matchLabels": SELECTOR}
    # Hook and test pods must never be selected by the server's selector.
    for spec_owner in rendered.all("Pod") + rendered.all("Job"):
        labels = spec_owner["metadata"]["labels"]
        assert not SELECTOR.items() <= labels.items(), spec_owner["metadata"]["name"]



class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that fails on a key given twice in one mapping (PyYAML keeps the last one silently)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    keys = [loader.construct_object(k, deep=True) for k, _ in node.value]
    duplicates = sorted({str(k) for k in keys if keys.count(k) > 1})
    assert not duplicates, f"duplicate keys {duplicates} at {node.start_mark}"
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def test_common_labels_are_merged_not_appended(helm: Helm) -> None:
    """A commonLabels key the chart also sets takes the user's value once; podLabels go over it on the pods."""
    rendered = helm.template({
        **CANARY_SECRET_VALUES,
        "commonLabels": {"app.kubernetes.io/part-of": "ml-platform", "team": "ml"},
        "podLabels": {"team": "tracking", "tier": "backend"},
        "ingress": {"enabled": True, "hosts": ["mlflow.example.com"]},
        "networkPolicy": {"enabled": True},
    })
    docs = [d for d in yaml.load_all(rendered.text, Loader=_UniqueKeyLoader) if d]  # no key twice anywhere
    assert len(docs) == len(rendered.objects)
    kinds = {o["kind"] for o in rendered.objects}
    assert {"Deployment", "Service", "Ingress", "Secret", "Job", "Pod", "NetworkPolicy"} <= kinds
    for obj in rendered.objects:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "ml-platform", (obj["kind"], obj["metadata"]["name"])
        assert labels["team"] == "ml" and labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["helm.sh/chart"].startswith("mlflow-") and labels["app.kubernetes.io/version"] == "3.17.2"
    deployment = rendered.deployment
    assert deployment["metadata"]["labels"]["app.kubernetes.io/component"] == "server"
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pod_labels["team"] == "tracking" and pod_labels["tier"] == "backend"
    assert pod_labels["app.kubernetes.io/part-of"] == "ml-platform" and pod_labels["mlflow/auth"] == "enabled"
    assert SELECTOR.items() <= pod_labels.items() and deployment["spec"]["selector"] == {"matchLabels": SELECTOR}
    for job in rendered.all("Job"):
        assert job["metadata"]["labels"]["app.kubernetes.io/name"] == "mlflow-migrate"
        assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "migrate"


@pytest.mark.parametrize("values, key", [
    ({"commonLabels": {"app.kubernetes.io/name": "x"}}, "app.kubernetes.io/name"),
    ({"commonLabels": {"app.kubernetes.io/instance": "x"}}, "app.kubernetes.io/instance"),
    ({"podLabels": {"mlflow/auth": "enabled"}}, "mlflow/auth"),
    ({"podLabels": {"app.kubernetes.io/component": "web"}}, "app.kubernetes.io/component"),
])
def test_labels_the_chart_selects_on_cannot_be_overridden(helm: Helm, values: dict, key: str) -> None:
    error = helm.template_error(values)
    assert "VALUES VALIDATION" in error and f"cannot set {key}" in error and "nameOverride" in error


# --- Secret contract ------------------------------------------------------


def test_chart_made_secret_keys_and_ini(helm: Helm) -> None:
    rendered = helm.scenario("chart-secret-postgres")
    secret = rendered.one("Secret", FULLNAME)
    assert hook(secret) is None
    data = secret_data(secret)
    assert set(data) == SECRET_KEYS
    assert data["backend-store-uri"] == CANARY_DB_URI
    assert data["auth-database-uri"] == CANARY_DB_URI
    assert data["admin-password"] == CANARY_ADMIN_PASSWORD
    assert data["flask-secret-key"] == CANARY_FLASK_KEY
    ini = configparser.ConfigParser()  # interpolation on, as MLflow reads it
    ini.read_string(data["basic_auth.ini"])
    section = ini["mlflow"]
    assert section["database_uri"] == CANARY_DB_URI  # `%` was written `%%`
    assert "%%" in data["basic_auth.ini"]
    assert section["default_permission"] == "READ"
    assert section["admin_username"] == "admin"
    assert section["authorization_function"] == "mlflow.server.auth:authenticate_request_basic_auth"
    assert section["auth_cache_ttl_seconds"] == "60"
    assert "admin_password" not in section


def test_mlflow_reads_the_chart_made_ini(helm: Helm, tmp_path, monkeypatch) -> None:
    data = secret_data(helm.scenario("chart-secret-postgres").one("Secret", FULLNAME))
    path = tmp_path / "basic_auth.ini"
    path.write_text(data["basic_auth.ini"])
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(path))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", CANARY_ADMIN_PASSWORD)
    from mlflow.server.auth.config import read_auth_config

    config = read_auth_config()
    assert config.database_uri == CANARY_DB_URI
    assert config.auth_cache_ttl_seconds == 60
    assert config.default_permission == "READ"
    assert config.admin_username == "admin"


def test_auth_settings_shape_the_ini(helm: Helm) -> None:
    rendered = helm.template({"auth": {"defaultPermission": "NO_PERMISSIONS", "cacheTtlSeconds": 0, "adminUsername": "root"}})
    ini = configparser.ConfigParser()
    ini.read_string(secret_data(rendered.one("Secret", FULLNAME))["basic_auth.ini"])
    assert ini["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    assert ini["mlflow"]["auth_cache_ttl_seconds"] == "0"
    assert ini["mlflow"]["admin_username"] == "root"
    assert rendered.env["MLFLOW_AUTH_ADMIN_USERNAME"]["value"] == "root"


def test_generated_credentials_when_not_given(helm: Helm) -> None:
    data = secret_data(helm.scenario("default").one("Secret", FULLNAME))
    assert len(data["admin-password"]) >= 12
    assert len(data["flask-secret-key"]) >= 32


def test_existing_secret_is_used_and_no_secret_rendered(helm: Helm) -> None:
    for scenario in ("existing-secret", "production"):
        rendered = helm.scenario(scenario)
        assert rendered.all("Secret") == []
        name = "my-mlflow-credentials" if scenario == "existing-secret" else "mlflow-credentials"
        refs = [e["valueFrom"]["secretKeyRef"]["name"] for e in rendered.container["env"] if "valueFrom" in e]
        assert refs and set(refs) == {name}
        volumes = {v["name"]: v for v in rendered.pod_spec["volumes"]}
        assert volumes["auth-config"]["secret"]["secretName"] == name


def test_secret_key_names_are_overridable(helm: Helm) -> None:
    rendered = helm.template({"existingSecret": "s", "secretKeys": {"backendStoreUri": "db", "authConfig": "auth.ini"}})
    assert rendered.env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "s", "key": "db"}
    volumes = {v["name"]: v for v in rendered.pod_spec["volumes"]}
    assert volumes["auth-config"]["secret"]["items"] == [{"key": "auth.ini", "path": "basic_auth.ini"}]


# --- Container command and env (contract with the local target) ---------------


def test_production_command_and_args_exact(helm: Helm) -> None:
    rendered = helm.scenario("production")
    container = rendered.container
    assert container["command"] == ["mlflow", "server"]
    assert container["args"] == [
        "--host", "0.0.0.0",
        "--port", "5000",
        "--workers", "4",
        "--serve-artifacts",
        "--artifacts-destination", S3,
        "--app-name", "basic-auth",
        "--allowed-hosts", ",".join(["mlflow.mdpg.ai", *SERVICE_HOSTS, "localhost", "localhost:*", "127.0.0.1", "127.0.0.1:*"]),
        "--cors-allowed-origins", "https://mlflow.mdpg.ai",
    ]
    assert all(isinstance(a, str) for a in container["args"])


def test_env_contract(helm: Helm) -> None:
    rendered = helm.scenario("production")
    env = rendered.container["env"]
    names = [e["name"] for e in env]
    assert names == [
        "MLFLOW_BACKEND_STORE_URI",
        "MLFLOW_AUTH_CONFIG_PATH",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
        "MLFLOW_AUTH_ADMIN_PASSWORD",
        "MLFLOW_AUTH_ADMIN_USERNAME",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION",
        "AWS_DEFAULT_REGION",
        "AWS_REGION",
    ]
    by_name = {e["name"]: e for e in env}
    for name, key in [
        ("MLFLOW_BACKEND_STORE_URI", "backend-store-uri"),
        ("MLFLOW_FLASK_SERVER_SECRET_KEY", "flask-secret-key"),
        ("MLFLOW_AUTH_ADMIN_PASSWORD", "admin-password"),
    ]:
        assert "value" not in by_name[name]
        ref = by_name[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "mlflow-credentials" and ref["key"] == key
        assert not ref.get("optional", False)
    assert by_name["MLFLOW_AUTH_CONFIG_PATH"]["value"] == "/etc/mlflow/auth/basic_auth.ini"
    assert by_name["MLFLOW_AUTH_ADMIN_USERNAME"]["value"] == "admin"
    assert by_name["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    assert by_name["AWS_DEFAULT_REGION"]["value"] == by_name["AWS_REGION"]["value"] == "us-west-2"
    assert "--backend-store-uri" not in rendered.args


def test_job_execution_value(helm: Helm) -> None:
    rendered = helm.template({"mlflow": {"jobExecution": True}})
    assert rendered.env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "true"


def test_auth_toggle(helm: Helm) -> None:
    on = helm.scenario("production")
    off = helm.scenario("auth-off")
    assert on.flag("--app-name") == "basic-auth"
    assert "--app-name" not in off.args and "basic-auth" not in off.args
    # Nothing else in the command changes: the rollout flips one value.
    assert [a for a in on.args if a not in ("--app-name", "basic-auth")] == off.args
    # Auth off tolerates a Secret without the auth keys.
    assert off.env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]["optional"] is True
    volumes = {v["name"]: v for v in off.pod_spec["volumes"]}
    assert volumes["auth-config"]["secret"]["optional"] is True


def test_workers_value(helm: Helm) -> None:
    assert helm.template({"mlflow": {"workers": 7}}).flag("--workers") == "7"
    assert helm.scenario("default").flag("--workers") == "2"


def test_allowed_hosts_and_cors_follow_ingress_hosts(helm: Helm) -> None:
    rendered = helm.scenario("chart-secret-postgres")
    hosts = rendered.flag("--allowed-hosts").split(",")
    assert hosts[:2] == ["mlflow.example.com", "alt.example.com"]
    assert set(SERVICE_HOSTS) <= set(hosts)
    assert "10.*" in hosts and "172.20.*" in hosts  # metrics on: Prometheus scrapes by pod IP
    assert rendered.flag("--cors-allowed-origins") == "https://mlflow.example.com,https://alt.example.com"
    extra = helm.template({"mlflow": {"allowedHosts": ["mlflow.internal"], "corsAllowedOrigins": ["https://nb.example.com"]},
                           "ingress": {"hosts": ["a.example.com"]}})
    assert "mlflow.internal" in extra.flag("--allowed-hosts").split(",")
    assert extra.flag("--cors-allowed-origins") == "https://a.example.com,https://nb.example.com"
    default = helm.scenario("default")
    assert "10.*" not in default.flag("--allowed-hosts").split(",")
    assert default.flag("--cors-allowed-origins") == "http://localhost:*,http://127.0.0.1:*"


def test_expose_prometheus_option(helm: Helm) -> None:
    assert "--expose-prometheus" not in helm.scenario("production").args
    rendered = helm.scenario("chart-secret-postgres")
    assert rendered.args[-2:] == ["--expose-prometheus", "/mlflow/metrics"]


def test_no_secret_in_argv_or_plain_env(helm: Helm) -> None:
    rendered = helm.scenario("chart-secret-postgres")
    for spec in pod_specs(rendered):
        for container in spec["containers"]:
            argv = " ".join(container.get("command", []) + container.get("args", []))
            assert "postgresql" not in argv and "sqlite" not in argv
            for entry in container.get("env", []):
                if "URI" in entry["name"] or "PASSWORD" in entry["name"] or "SECRET" in entry["name"]:
                    assert "value" not in entry, entry


# --- Auth ini mount -------------------------------------------------------------


def test_auth_ini_mounted_read_only_from_secret(helm: Helm) -> None:
    rendered = helm.scenario("production")
    mounts = {m["name"]: m for m in rendered.container["volumeMounts"]}
    assert mounts["auth-config"]["readOnly"] is True
    assert mounts["auth-config"]["mountPath"] == "/etc/mlflow/auth"
    volumes = {v["name"]: v for v in rendered.pod_spec["volumes"]}
    secret_volume = volumes["auth-config"]["secret"]
    assert secret_volume["items"] == [{"key": "basic_auth.ini", "path": "basic_auth.ini"}]
    assert "optional" not in secret_volume
    assert rendered.env["MLFLOW_AUTH_CONFIG_PATH"]["value"] == mounts["auth-config"]["mountPath"] + "/basic_auth.ini"
    assert rendered.all("ConfigMap") == [] or all(hook(c) for c in rendered.all("ConfigMap"))


# --- Migrations hook Job ------------------------------------------------------


def test_migration_job_is_a_hook_with_limits(helm: Helm) -> None:
    rendered = helm.scenario("production")
    job = rendered.one("Job", f"{FULLNAME}-migrate")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert set(annotations["helm.sh/hook-delete-policy"].split(",")) == {"before-hook-creation", "hook-succeeded"}
    assert job["spec"]["backoffLimit"] == 2
    assert job["spec"]["activeDeadlineSeconds"] == 600
    configmap = rendered.one("ConfigMap", f"{FULLNAME}-migrate")
    assert hook(configmap) == "pre-install,pre-upgrade"
    assert int(configmap["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(annotations["helm.sh/hook-weight"])
    assert configmap["data"]["migrate.py"] == (CHART / "files" / "migrate.py").read_text()


def test_migration_job_reads_uris_from_env_only(helm: Helm) -> None:
    rendered = helm.scenario("production")
    spec = rendered.one("Job")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["command"] == ["python", "/opt/mlflow-migrate/migrate.py"]
    assert "args" not in container
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-credentials", "key": "backend-store-uri"}
    assert env["MLFLOW_AUTH_DATABASE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-credentials", "key": "auth-database-uri"}
    assert spec["restartPolicy"] == "Never"
    assert spec["automountServiceAccountToken"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_migration_with_chart_made_secret_uses_hook_secret(helm: Helm) -> None:
    rendered = helm.scenario("chart-secret-postgres")
    hook_secret = rendered.one("Secret", f"{FULLNAME}-migrate")
    assert hook(hook_secret) == "pre-install,pre-upgrade"
    assert set(secret_data(hook_secret)) == {"backend-store-uri", "auth-database-uri"}
    env = {e["name"]: e for e in rendered.one("Job")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == f"{FULLNAME}-migrate"


def test_no_migration_job_for_sqlite_only_chart_secret(helm: Helm) -> None:
    rendered = helm.scenario("default")
    assert rendered.all("Job") == [] and rendered.all("ConfigMap") == []
    # With an existing Secret the chart cannot know: the Job runs (and skips SQLite itself).
    assert helm.scenario("existing-secret").one("Job")
    assert helm.template({"existingSecret": "s", "migrations": {"enabled": False}}).all("Job") == []


def test_auth_db_migrated_before_auth_is_switched_on(helm: Helm) -> None:
    env = {e["name"] for e in helm.scenario("auth-off").one("Job")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "MLFLOW_AUTH_DATABASE_URI" in env
    rendered = helm.template({"auth": {"enabled": False}, "ingress": {"enabled": False},
                              "migrations": {"authDatabase": False}}, production=True)
    env = {e["name"] for e in rendered.one("Job")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "MLFLOW_AUTH_DATABASE_URI" not in env


# --- Artifacts and IRSA -------------------------------------------------------


def test_artifacts_proxied_and_irsa(helm: Helm) -> None:
    rendered = helm.template({"serviceAccount": {"irsaRoleArn": "arn:aws:iam::123456789012:role/mlflow-s3"}}, production=True)
    assert "--serve-artifacts" in rendered.args
    assert rendered.flag("--artifacts-destination") == S3
    assert "--default-artifact-root" not in rendered.args
    sa = rendered.one("ServiceAccount")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == "arn:aws:iam::123456789012:role/mlflow-s3"
    assert rendered.pod_spec["serviceAccountName"] == sa["metadata"]["name"]
    assert "AWS_ACCESS_KEY_ID" not in rendered.text and "AWS_SECRET_ACCESS_KEY" not in rendered.text


def test_artifacts_destination_value(helm: Helm) -> None:
    rendered = helm.template({"artifacts": {"destination": "s3://other-bucket/x", "s3EndpointUrl": "http://127.0.0.1:5055"}})
    assert rendered.flag("--artifacts-destination") == "s3://other-bucket/x"
    assert rendered.env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "http://127.0.0.1:5055"


# --- Probes ----------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["default", "production"])
def test_probes_on_health(helm: Helm, scenario: str) -> None:
    container = helm.scenario(scenario).container
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60 * 2  # room for a 60 s cold start, twice over
    assert container["ports"] == [{"name": "http", "containerPort": 5000, "protocol": "TCP"}]


# --- Ingress -----------------------------------------------------------------------


def test_alb_ingress(helm: Helm) -> None:
    rendered = helm.template({"ingress": {"certificateArn": "arn:aws:acm:us-west-2:123456789012:certificate/abc"}}, production=True)
    ingress = rendered.one("Ingress")
    annotations = ingress["metadata"]["annotations"]
    assert ingress["spec"]["ingressClassName"] == "alb"
    assert annotations["alb.ingress.kubernetes.io/scheme"] == "internet-facing"
    assert annotations["alb.ingress.kubernetes.io/target-type"] == "ip"
    assert json.loads(annotations["alb.ingress.kubernetes.io/listen-ports"]) == [{"HTTP": 80}, {"HTTPS": 443}]
    assert annotations["alb.ingress.kubernetes.io/ssl-redirect"] == "443"
    assert annotations["alb.ingress.kubernetes.io/certificate-arn"] == "arn:aws:acm:us-west-2:123456789012:certificate/abc"
    assert annotations["alb.ingress.kubernetes.io/healthcheck-path"] == "/health"
    assert annotations["alb.ingress.kubernetes.io/success-codes"] == "200"
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "mlflow.mdpg.ai"
    (path,) = rule["http"]["paths"]
    assert path["path"] == "/" and path["pathType"] == "Prefix"
    assert path["backend"]["service"] == {"name": FULLNAME, "port": {"name": "http"}}
    # No certificate ARN: the controller discovers one; the annotation is left out.
    annotations = helm.scenario("production").one("Ingress")["metadata"]["annotations"]
    assert "alb.ingress.kubernetes.io/certificate-arn" not in annotations


def test_ingress_annotations_override_generated_ones(helm: Helm) -> None:
    rendered = helm.template({"ingress": {"annotations": {"alb.ingress.kubernetes.io/scheme": "internal", "x/y": "z"}}}, production=True)
    annotations = rendered.one("Ingress")["metadata"]["annotations"]
    assert annotations["alb.ingress.kubernetes.io/scheme"] == "internal"
    assert annotations["x/y"] == "z"


def test_generic_ingress_class(helm: Helm) -> None:
    ingress = helm.scenario("chart-secret-postgres").one("Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert not any(k.startswith("alb.") for k in ingress["metadata"].get("annotations", {}))
    assert ingress["spec"]["tls"] == [{"hosts": ["mlflow.example.com"], "secretName": "mlflow-tls"}]
    assert [r["host"] for r in ingress["spec"]["rules"]] == ["mlflow.example.com", "alt.example.com"]


def test_ingress_off(helm: Helm) -> None:
    rendered = helm.scenario("ingress-off")
    assert rendered.all("Ingress") == []
    assert helm.scenario("default").all("Ingress") == []


# --- Replicas, HPA, PDB, scheduling ---------------------------------------------------


def test_production_hpa_and_pdb(helm: Helm) -> None:
    rendered = helm.scenario("production")
    hpa = rendered.one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["minReplicas"] == 3 and hpa["spec"]["maxReplicas"] == 10
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME}
    metrics = {m["resource"]["name"]: m["resource"]["target"] for m in hpa["spec"]["metrics"]}
    # CPU only: MLflow's memory is a start-up cost that would pin the HPA at maxReplicas (chart README: Resources)
    assert metrics == {"cpu": {"type": "Utilization", "averageUtilization": 70}}
    assert "replicas" not in rendered.deployment["spec"]  # the HPA owns it
    pdb = rendered.one("PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1" and pdb["spec"]["maxUnavailable"] == 1


def test_hpa_off_one_replica(helm: Helm) -> None:
    rendered = helm.scenario("hpa-off-1-replica")
    assert rendered.deployment["spec"]["replicas"] == 1
    assert rendered.all("HorizontalPodAutoscaler") == []
    assert rendered.all("PodDisruptionBudget") == []


def test_pdb_with_fixed_replicas(helm: Helm) -> None:
    rendered = helm.template({"autoscaling": {"enabled": False}, "replicaCount": 4}, production=True)
    assert rendered.deployment["spec"]["replicas"] == 4
    assert rendered.one("PodDisruptionBudget")


def test_anti_affinity_and_topology_spread(helm: Helm) -> None:
    spec = helm.scenario("production").pod_spec
    (term,) = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"] == {"matchLabels": SELECTOR}
    (spread,) = spec["topologySpreadConstraints"]
    assert spread["topologyKey"] == "topology.kubernetes.io/zone"
    assert spread["labelSelector"] == {"matchLabels": SELECTOR}
    hard = helm.template({"podAntiAffinityPreset": "hard"}).pod_spec["affinity"]["podAntiAffinity"]
    assert hard["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"] == "kubernetes.io/hostname"
    assert "affinity" not in helm.template({"podAntiAffinityPreset": "none"}).pod_spec


# --- Security ------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_security_contexts(helm: Helm, scenario: str) -> None:
    rendered = helm.scenario(scenario)
    for spec in pod_specs(rendered):
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        assert spec["enableServiceLinks"] is False
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp and "emptyDir" in volumes[tmp[0]["name"]]
    for sa in rendered.all("ServiceAccount"):
        assert sa["automountServiceAccountToken"] is False


def test_writable_working_directory(helm: Helm) -> None:
    rendered = helm.scenario("default")
    assert rendered.container["workingDir"] == "/mlflow"
    mounts = {m["mountPath"]: m["name"] for m in rendered.container["volumeMounts"]}
    volumes = {v["name"]: v for v in rendered.pod_spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/mlflow"]]


def test_network_policy_optional(helm: Helm) -> None:
    assert helm.scenario("production").all("NetworkPolicy") == []
    policy = helm.scenario("chart-secret-postgres").one("NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["ingress"] == [{"ports": [{"port": "http", "protocol": "TCP"}]}]
    peers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}}]
    policy = helm.template({"networkPolicy": {"enabled": True, "ingressFrom": peers}}).one("NetworkPolicy")
    assert policy["spec"]["ingress"][0]["from"] == peers


# --- Checksums ---------------------------------------------------------------------------


def test_checksum_annotation_rolls_pods_on_secret_change(helm: Helm) -> None:
    def checksum(values: dict) -> str:
        return helm.template(values).deployment["spec"]["template"]["metadata"]["annotations"]["checksum/secret"]

    first = checksum(CANARY_SECRET_VALUES)
    assert first == checksum(CANARY_SECRET_VALUES)
    changed = {"secret": {**CANARY_SECRET_VALUES["secret"], "flaskSecretKey": "another-flask-secret-key-1234"}}
    assert checksum(changed) != first
    changed_ini = {**CANARY_SECRET_VALUES, "auth": {"cacheTtlSeconds": 30}}
    assert checksum(changed_ini) != first


def test_pod_annotations_value(helm: Helm) -> None:
    rendered = helm.template({"existingSecret": "s", "podAnnotations": {"checksum/secret": "abc"}})
    assert rendered.deployment["spec"]["template"]["metadata"]["annotations"] == {"checksum/secret": "abc"}


# --- helm test pod ------------------------------------------------------------------------


def test_helm_test_pod(helm: Helm) -> None:
    for scenario, expected in (("production", "401"), ("auth-off", "200")):
        pod = helm.scenario(scenario).one("Pod", f"{FULLNAME}-test")
        assert hook(pod) == "test"
        assert pod["spec"]["restartPolicy"] == "Never"
        (container,) = pod["spec"]["containers"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["MLFLOW_URL"] == f"http://{FULLNAME}.{NAMESPACE}.svc.cluster.local:80"
        assert env["EXPECT_ANONYMOUS_STATUS"] == expected
        script = container["command"][-1]
        assert '"/health"' in script and "/api/2.0/mlflow/" in script


def test_helm_test_script_against_a_fake_server(helm: Helm, tmp_path) -> None:
    """Run the test pod's script against a tiny local HTTP server: passes on 200/401, fails otherwise."""
    import http.server
    import subprocess
    import sys
    import threading

    pod = helm.scenario("production").one("Pod", f"{FULLNAME}-test")
    script = pod["spec"]["containers"][0]["command"][-1]
    statuses = {"/health": 200, "api": 401}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            code = statuses["/health"] if self.path == "/health" else statuses["api"]
            self.send_response(code)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {"MLFLOW_URL": f"http://127.0.0.1:{server.server_port}", "EXPECT_ANONYMOUS_STATUS": "401"}
        ok = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        statuses["api"] = 200  # auth not enforced: must fail
        bad = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
        assert bad.returncode != 0 and "anonymous API call" in bad.stderr
    finally:
        server.shutdown()
