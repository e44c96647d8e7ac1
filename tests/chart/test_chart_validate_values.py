"""validateValues: impossible combinations fail the render with a clear message,
and the schema rejects unknown keys and wrong types."""

from __future__ import annotations

import pytest

from chart_support import CANARY_DB_URI, CANARY_SECRET_VALUES, Helm

POSTGRES_SECRET = {"secret": {**CANARY_SECRET_VALUES["secret"]}}
S3 = {"artifacts": {"destination": "s3://bucket/prefix"}}


def with_secret(**uris: str) -> dict:
    return {"secret": {**POSTGRES_SECRET["secret"], **uris}}


FAILURES = {
    "auth, 2 replicas, sqlite auth db": (
        {**with_secret(authDatabaseUri="sqlite:////mlflow/basic_auth.db"), **S3, "replicaCount": 2},
        False,
        "auth.enabled with more than one replica (replicaCount=2) needs a shared auth database",
    ),
    "auth, HPA, sqlite auth db": (
        {**with_secret(authDatabaseUri="sqlite:///basic_auth.db"), **S3, "autoscaling": {"enabled": True}},
        False,
        "auth.enabled with more than one replica (autoscaling up to 5 replicas) needs a shared auth database",
    ),
    "sqlite backend, 2 replicas": (
        {**with_secret(backendStoreUri="sqlite:////mlflow/mlflow.db"), **S3, "replicaCount": 2, "auth": {"enabled": False}},
        False,
        "a SQLite backend store cannot serve more than one replica (replicaCount=2)",
    ),
    "sqlite backend, HPA": (
        {**with_secret(backendStoreUri="sqlite:////mlflow/mlflow.db"), **S3, "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 3}},
        False,
        "a SQLite backend store cannot serve more than one replica (autoscaling up to 3 replicas)",
    ),
    "production values with the default sqlite chart secret": (
        {"existingSecret": ""},
        True,
        "needs a shared auth database",
    ),
    "ingress without hosts": (
        {"ingress": {"enabled": True, "hosts": []}},
        False,
        "ingress.enabled=true needs at least one host in ingress.hosts",
    ),
    "ingress without hosts (production)": (
        {"ingress": {"hosts": []}},
        True,
        "ingress.enabled=true needs at least one host in ingress.hosts",
    ),
    "ingress with auth off (production)": (
        {"auth": {"enabled": False}},
        True,
        "ingress.enabled with auth.enabled=false would let anyone who reaches the Ingress",
    ),
    "ingress with auth off": (
        {"auth": {"enabled": False}, "ingress": {"enabled": True, "hosts": ["mlflow.example.com"]}},
        False,
        "set ingress.allowWithoutAuth=true",
    ),
    "local artifacts, 2 replicas": (
        {**POSTGRES_SECRET, "replicaCount": 2},
        False,
        'artifacts.destination "/mlflow/artifacts" is a path on the pod\'s own disk',
    ),
    "no credentials at all": (
        {"secret": {"create": False}},
        False,
        "no credentials: set existingSecret",
    ),
    "HPA min > max": (
        {"autoscaling": {"minReplicas": 5, "maxReplicas": 3}},
        True,
        "autoscaling.minReplicas (5) is greater than autoscaling.maxReplicas (3)",
    ),
    "HPA without targets": (
        {"autoscaling": {"targetCPUUtilizationPercentage": 0, "targetMemoryUtilizationPercentage": 0}},
        True,
        "autoscaling.enabled needs targetCPUUtilizationPercentage or targetMemoryUtilizationPercentage",
    ),
    "short admin password": (
        {"secret": {"adminPassword": "short"}},
        False,
        "secret.adminPassword must have at least 12 characters",
    ),
    "IRSA without own ServiceAccount": (
        {"serviceAccount": {"create": False, "irsaRoleArn": "arn:aws:iam::123456789012:role/x"}},
        False,
        "serviceAccount.irsaRoleArn needs serviceAccount.create=true",
    ),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_validate_values_fails_with_message(helm: Helm, case: str) -> None:
    values, production, message = FAILURES[case]
    error = helm.template_error(values, production=production)
    assert "VALUES VALIDATION (charts/mlflow)" in error, error
    assert message in error, error
    # The message never repeats a credential.
    assert CANARY_DB_URI not in error and CANARY_SECRET_VALUES["secret"]["adminPassword"] not in error


def test_all_failures_reported_at_once(helm: Helm) -> None:
    error = helm.template_error({"replicaCount": 3, "ingress": {"enabled": True}})
    for message in ("needs a shared auth database", "a SQLite backend store", "artifacts.destination", "needs at least one host"):
        assert message in error


ALLOWED = {
    "one replica with sqlite (default)": ({}, False),
    "auth off, 2 replicas, sqlite auth db but postgres backend": (
        {**with_secret(authDatabaseUri="sqlite:///basic_auth.db"), **S3, "replicaCount": 2, "auth": {"enabled": False}},
        False,
    ),
    "existing secret, several replicas (URIs unknown offline)": (
        {"existingSecret": "s", **S3, "replicaCount": 3},
        False,
    ),
    "production with --set style overrides": ({"replicaCount": 5, "mlflow": {"workers": 8}}, True),
    "auth off without an Ingress (the bootstrap)": ({"auth": {"enabled": False}, "ingress": {"enabled": False}}, True),
    "auth off with an Ingress, explicitly allowed": (
        {"auth": {"enabled": False}, "ingress": {"allowWithoutAuth": True}}, True,
    ),
}


@pytest.mark.parametrize("case", sorted(ALLOWED))
def test_valid_combinations_render(helm: Helm, case: str) -> None:
    values, production = ALLOWED[case]
    assert helm.template(values, production=production).deployment


@pytest.mark.parametrize(
    ("set_arg", "message"),
    [
        ("authEnabled=true", "authEnabled"),
        ("auth.defaultPermission=WRITE", "defaultPermission"),
        ("mlflow.workers=0", "workers"),
        ("ingress.alb.scheme=public", "scheme"),
        ("serviceAccount.irsaRoleArn=not-an-arn", "irsaRoleArn"),
        ("artifacts.destination=", "destination"),
    ],
)
def test_schema_rejects_bad_values(helm: Helm, set_arg: str, message: str) -> None:
    error = helm.template_error(set_args=(set_arg,))
    assert "schema" in error and message in error, error


def test_set_style_contract_values(helm: Helm) -> None:
    """The values the rollout flows set, in --set form."""
    common = (
        "existingSecret=rollout-secret",
        "image.tag=v3.17.2-full",
        "replicaCount=2",
        "autoscaling.enabled=false",
        "ingress.hosts[0]=mlflow.dev.example.com",
        "ingress.certificateArn=arn:aws:acm:us-west-2:123456789012:certificate/x",
        "serviceAccount.irsaRoleArn=arn:aws:iam::123456789012:role/r",
        "artifacts.destination=s3://b/p",
        "mlflow.workers=3",
    )
    # The first install's bootstrap: auth off, and no Ingress (reached only inside the cluster).
    rendered = helm.template(production=True, set_args=("auth.enabled=false", "ingress.enabled=false", *common))
    assert "--app-name" not in rendered.args
    assert rendered.get("Ingress") is None
    assert rendered.one("Service")["spec"]["selector"]["mlflow/auth"] == "disabled"
    # Then auth on, with the Ingress.
    rendered = helm.template(production=True, set_args=("auth.enabled=true", "ingress.enabled=true", *common))
    assert rendered.flag("--app-name") == "basic-auth"
    assert rendered.deployment["spec"]["replicas"] == 2
    assert rendered.flag("--workers") == "3"
    assert rendered.flag("--artifacts-destination") == "s3://b/p"
    assert rendered.flag("--allowed-hosts").startswith("mlflow.dev.example.com,")
    assert rendered.one("Ingress")["spec"]["rules"][0]["host"] == "mlflow.dev.example.com"
    assert rendered.one("ServiceAccount")["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith(":role/r")
    assert rendered.env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "rollout-secret"
