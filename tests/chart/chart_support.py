"""Shared helpers of the charts/mlflow tests: paths, canary credentials,
render scenarios, and a small wrapper around one pinned helm binary.

Rendering uses ``helm template`` only (no cluster); results are cached per
binary and arguments, so a scenario renders once per helm per session.
"""

from __future__ import annotations

import base64
import subprocess
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "mlflow"
TOOLS_BIN = REPO / ".tools" / "bin"
PRODUCTION_VALUES = CHART / "values-production.yaml"
KUBERNETES_VALIDATE = REPO / ".venv" / "bin" / "kubernetes-validate"



def _pinned_helms() -> dict[str, str]:
    """``{binary name: version}`` from scripts/helm_versions.txt (the install script's pins)."""
    pins: dict[str, str] = {}
    for line in (REPO / "scripts" / "helm_versions.txt").read_text().splitlines():
        parts = line.split()
        if parts and not parts[0].startswith("#"):
            pins[parts[0]] = parts[1]
    return pins


#: {"helm3": "v3.19.0", "helm4": "v4.1.4"}
HELM_VERSIONS = _pinned_helms()
RELEASE = "mlflow"
NAMESPACE = "ml-platform"
FULLNAME = "mlflow"  # the release name contains the chart name

# Canary credentials: they may appear in a Secret and nowhere else.
CANARY_ADMIN_PASSWORD = "Canary-Admin-Pw-6b1e0c5d9a"
CANARY_FLASK_KEY = "canary-flask-secret-4f8e2d7c1b"
CANARY_DB_PASSWORD = "Canary%Db@Pw:9d3f"
CANARY_DB_URI = (
    "postgresql+psycopg2://mlflow:"
    + urllib.parse.quote(CANARY_DB_PASSWORD, safe="")
    + "@canary-db.abc123.us-west-2.rds.amazonaws.com:5432/mlflow"
)

#: values for a chart-made Secret on PostgreSQL holding the canaries.
CANARY_SECRET_VALUES: dict[str, Any] = {
    "secret": {
        "create": True,
        "backendStoreUri": CANARY_DB_URI,
        "authDatabaseUri": CANARY_DB_URI,
        "adminPassword": CANARY_ADMIN_PASSWORD,
        "flaskSecretKey": CANARY_FLASK_KEY,
    },
}


def canary_strings() -> list[str]:
    """Every form in which a canary could leak (raw, URL-decoded, base64)."""
    raw = [
        CANARY_ADMIN_PASSWORD,
        CANARY_FLASK_KEY,
        CANARY_DB_PASSWORD,
        urllib.parse.quote(CANARY_DB_PASSWORD, safe=""),
        CANARY_DB_URI,
        CANARY_DB_URI.replace("%", "%%"),
    ]
    encoded = [base64.b64encode(s.encode()).decode() for s in raw]
    return raw + encoded


#: Scenarios rendered for kubernetes-validate and the assertions:
#: name -> (use values-production.yaml, overrides).
SCENARIOS: dict[str, tuple[bool, dict[str, Any]]] = {
    "default": (False, {}),
    "production": (True, {}),
    # The first install's bootstrap: auth off, no Ingress (ingress with auth off fails validateValues).
    "auth-off": (True, {"auth": {"enabled": False}, "ingress": {"enabled": False}}),
    "auth-off-ingress-allowed": (True, {"auth": {"enabled": False}, "ingress": {"allowWithoutAuth": True}}),
    "hpa-off-1-replica": (True, {"autoscaling": {"enabled": False}, "replicaCount": 1}),
    "existing-secret": (False, {"existingSecret": "my-mlflow-credentials"}),
    "ingress-off": (True, {"ingress": {"enabled": False}}),
    # Chart-made Secret on PostgreSQL, 2 replicas, everything optional on.
    "chart-secret-postgres": (
        False,
        {
            **CANARY_SECRET_VALUES,
            "replicaCount": 2,
            "artifacts": {"destination": "s3://bucket/prefix"},
            "metrics": {"enabled": True},
            "networkPolicy": {"enabled": True},
            "ingress": {
                "enabled": True,
                "className": "nginx",
                "hosts": ["mlflow.example.com", {"host": "alt.example.com", "paths": [{"path": "/", "pathType": "Prefix"}]}],
                "tls": [{"secretName": "mlflow-tls", "hosts": ["mlflow.example.com"]}],
            },
            "serviceAccount": {"irsaRoleArn": "arn:aws:iam::123456789012:role/mlflow"},
        },
    ),
}


class RenderError(Exception):
    """``helm template`` failed; ``stderr`` holds helm's message."""

    def __init__(self, stderr: str):
        super().__init__(stderr)
        self.stderr = stderr


@dataclass
class Rendered:
    """The objects of one ``helm template`` run."""

    text: str
    objects: list[dict[str, Any]] = field(default_factory=list)

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [o for o in self.all(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
        return found[0]

    def get(self, kind: str, name: str | None = None) -> dict[str, Any] | None:
        found = [o for o in self.all(kind) if name is None or o["metadata"]["name"] == name]
        return found[0] if found else None

    @property
    def deployment(self) -> dict[str, Any]:
        return self.one("Deployment", FULLNAME)

    @property
    def pod_spec(self) -> dict[str, Any]:
        return self.deployment["spec"]["template"]["spec"]

    @property
    def container(self) -> dict[str, Any]:
        (c,) = [c for c in self.pod_spec["containers"] if c["name"] == "mlflow"]
        return c

    @property
    def args(self) -> list[str]:
        return self.container["args"]

    def flag(self, name: str) -> str:
        args = self.args
        assert name in args, f"{name} not in args {args}"
        return args[args.index(name) + 1]

    @property
    def env(self) -> dict[str, dict[str, Any]]:
        return {e["name"]: e for e in self.container["env"]}


class Helm:
    """One pinned helm binary."""

    def __init__(self, name: str, path: Path):
        self.name = name
        self.path = path
        self._cache: dict[str, Rendered | RenderError] = {}

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.path), *args], capture_output=True, text=True, timeout=120
        )
        if check and result.returncode != 0:
            raise RenderError(result.stderr)
        return result

    def template(
        self,
        values: dict[str, Any] | None = None,
        *,
        production: bool = False,
        set_args: tuple[str, ...] = (),
        release: str = RELEASE,
        namespace: str = NAMESPACE,
        extra_args: tuple[str, ...] = (),
    ) -> Rendered:
        """Render the chart; raise :class:`RenderError` when helm fails."""
        key = yaml.safe_dump([values, production, set_args, release, namespace, extra_args])
        if key not in self._cache:
            self._cache[key] = self._template(values, production, set_args, release, namespace, extra_args)
        cached = self._cache[key]
        if isinstance(cached, RenderError):
            raise cached
        return cached

    def _template(self, values, production, set_args, release, namespace, extra_args):
        with tempfile.TemporaryDirectory() as tmp:
            args = ["template", release, str(CHART), "--namespace", namespace]
            if production:
                args += ["--values", str(PRODUCTION_VALUES)]
            if values:
                path = Path(tmp) / "values.yaml"
                path.write_text(yaml.safe_dump(values))
                args += ["--values", str(path)]
            for s in set_args:
                args += ["--set", s]
            args += list(extra_args)
            try:
                result = self.run(*args)
            except RenderError as exc:
                return exc
        objects = [o for o in yaml.safe_load_all(result.stdout) if o]
        return Rendered(result.stdout, objects)

    def template_error(self, values: dict[str, Any] | None = None, **kw: Any) -> str:
        """Render expecting failure; return helm's error text."""
        with pytest.raises(RenderError) as info:
            self.template(values, **kw)
        return info.value.stderr

    def scenario(self, name: str) -> Rendered:
        production, overrides = SCENARIOS[name]
        return self.template(overrides, production=production)
