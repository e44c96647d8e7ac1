"""The local target starts MLflow the way the chart's container does (DESIGN §3).

Render the chart with the values a spec implies and compare the container's
``mlflow server`` flags, its secret-backed env and the auth ini with what
:class:`targets.local.LocalTarget` runs. Also: the pinned MLflow version,
the installed one and the chart's appVersion/image tag are the same.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from pydantic import SecretStr

from mlflow_rollout.server_spec import SECRET_ENV, SecretBundle, render_auth_ini
from mlflow_rollout.settings import EnvironmentSettings
from targets.local import LocalTarget
from tasks.terraform import parse_outputs

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "mlflow"
HELM = ROOT / ".tools" / "bin" / "helm"


def _flags(args: list[str]) -> list[str]:
    return [a for a in args if a.startswith("--")]


def _value(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


@pytest.fixture
def local(tmp_path: Path) -> LocalTarget:
    settings = EnvironmentSettings.model_validate({
        "name": "parity", "target": "local",
        "terraform": {"source": "file", "path": str(tmp_path / "x.json")},
        "mlflow": {"workers": 3, "admin_username": "root-admin", "auth_cache_ttl_seconds": 45},
        "local": {"artifacts": "s3", "s3_endpoint_url": "http://127.0.0.1:9", "state_dir": str(tmp_path / "state")},
        "secrets": {"admin_password": {"generate": True}, "flask_secret_key": {"generate": True}},
    })
    return LocalTarget(settings)


def _outputs():
    return parse_outputs({
        "mlflow_irsa_role_arn": "arn:aws:iam::123456789012:role/mlflow",
        "rds_connection_string": "postgresql://mlflow:pw-pw-pw@db.example:5432/mlflow",
        "s3_bucket_name": "parity-bucket",
    }, "test")


@pytest.mark.parametrize("auth", [True, False])
def test_local_command_and_env_match_chart_container(local: LocalTarget, auth: bool) -> None:
    assert HELM.is_file(), "run scripts/setup.sh to install the pinned helm"
    outputs = _outputs()
    spec = local.server_spec(outputs, auth=auth)
    local.ensure_dirs()
    backend, auth_db = local.database_uris(outputs)
    local.store_secrets(
        SecretBundle(admin_password=SecretStr("x" * 16), flask_secret_key=SecretStr("k" * 16),
                     backend_store_uri=backend, auth_database_uri=auth_db),
        render_auth_ini(spec, auth_db),
    )
    cmd = local._command(spec, local.tls(), local.settings.local.bind_host, local.port)
    env = local._environment(spec)

    values = {
        "existingSecret": "mlflow-creds",
        "auth": {"enabled": auth, "adminUsername": spec.admin_username,
                 "cacheTtlSeconds": spec.auth_cache_ttl_seconds, "defaultPermission": spec.default_permission},
        "mlflow": {"workers": spec.workers, "jobExecution": spec.job_execution},
        "artifacts": {"destination": spec.artifacts_destination, "s3EndpointUrl": spec.s3_endpoint_url},
    }
    rendered = subprocess.run(
        [str(HELM), "template", "r", str(CHART), "-f", "-"], input=yaml.safe_dump(values),
        capture_output=True, text=True, check=True,
    ).stdout
    deployment = next(d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]

    # the same program and the same flags, in the same order
    assert Path(cmd[0]).name == "mlflow" and cmd[1] == "server"
    assert container["command"] == ["mlflow", "server"]
    chart_args, local_args = container["args"], cmd[2:]
    uvicorn = local_args.index("--uvicorn-opts")
    local_args = local_args[:uvicorn] + local_args[uvicorn + 2:]  # TLS: the ALB's job in the cluster
    assert _flags(local_args) == _flags(chart_args)
    for flag in ("--workers", "--artifacts-destination", "--app-name"):
        assert _value(local_args, flag) == _value(chart_args, flag), flag
    assert ("--app-name" in chart_args) is auth
    # no secret in argv on either side
    for value in (backend.get_secret_value(), "x" * 16, "k" * 16):
        assert value not in " ".join(cmd) and value not in " ".join(chart_args)

    # the same env, secrets from the same secret-store keys
    chart_env = {e["name"]: e for e in container["env"]}
    for var, key in SECRET_ENV.items():
        assert chart_env[var]["valueFrom"]["secretKeyRef"]["key"] == key
        assert var in env
    assert "MLFLOW_AUTH_CONFIG_PATH" in chart_env and Path(env["MLFLOW_AUTH_CONFIG_PATH"]).name == "basic_auth.ini"
    for var, val in spec.plain_env().items():
        assert chart_env[var].get("value") == val, var

    # the chart's own ini (chart-made Secret) has the same settings as ours
    values_made = dict(values, existingSecret="", secret={"create": True, "adminPassword": "y" * 16, "flaskSecretKey": "z" * 16})
    rendered = subprocess.run(
        [str(HELM), "template", "r", str(CHART), "-f", "-"], input=yaml.safe_dump(values_made),
        capture_output=True, text=True, check=True,
    ).stdout
    secret = next(d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Secret")
    chart_ini = secret.get("stringData", {}).get("basic_auth.ini")
    if chart_ini is None:
        import base64

        chart_ini = base64.b64decode(secret["data"]["basic_auth.ini"]).decode()
    ours, theirs = configparser.ConfigParser(interpolation=None), configparser.ConfigParser(interpolation=None)
    ours.read_string(render_auth_ini(spec, auth_db))
    theirs.read_string(chart_ini)
    for key in ("default_permission", "admin_username", "authorization_function", "auth_cache_ttl_seconds"):
        assert ours["mlflow"][key] == theirs["mlflow"][key], key
    assert set(ours["mlflow"]) <= set(theirs["mlflow"])


def test_versions_in_step() -> None:
    installed = importlib.metadata.version("mlflow")
    pin = re.search(r'"mlflow\[auth\]==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert installed == pin == chart["appVersion"]
    rendered = subprocess.run([str(HELM), "template", "r", str(CHART)], capture_output=True, text=True, check=True).stdout
    images = set(re.findall(r'image: "?([^"\s]+)"?', rendered))
    assert f"ghcr.io/mlflow/mlflow:v{pin}-full" in images
