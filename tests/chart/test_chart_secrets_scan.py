"""No rendered object other than a Secret holds a credential.

The canary admin password, Flask key and database URI/password (raw,
URL-encoded, `%%`-escaped and base64) may appear in Secrets only: not in the
Deployment, the hook Job or its ConfigMap, the test pod, NOTES, or anywhere else.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from chart_support import CANARY_SECRET_VALUES, CHART, TOOLS_BIN, Helm, canary_strings

SCAN_SCENARIOS = {
    "chart secret, 1 replica": {**CANARY_SECRET_VALUES},
    "chart secret, HA, everything on": {
        **CANARY_SECRET_VALUES,
        "autoscaling": {"enabled": True},
        "artifacts": {"destination": "s3://bucket/prefix"},
        "metrics": {"enabled": True},
        "networkPolicy": {"enabled": True},
        "ingress": {"enabled": True, "hosts": ["mlflow.example.com"]},
    },
    "chart secret, auth off": {**CANARY_SECRET_VALUES, "auth": {"enabled": False}},
}


@pytest.mark.parametrize("scenario", sorted(SCAN_SCENARIOS))
def test_canaries_only_in_secrets(helm: Helm, scenario: str) -> None:
    rendered = helm.template(SCAN_SCENARIOS[scenario])
    canaries = canary_strings()
    secrets = rendered.all("Secret")
    assert secrets, "the scenario must render the chart-made Secret"
    # The canaries are really there (so the scan below can find them).
    secret_text = yaml.safe_dump_all(secrets)
    assert any(c in secret_text for c in canaries)
    for obj in rendered.objects:
        if obj["kind"] == "Secret":
            continue
        text = yaml.safe_dump(obj)
        leaked = [c for c in canaries if c in text]
        assert not leaked, f"{obj['kind']}/{obj['metadata']['name']} contains a credential"


def test_production_values_render_no_secret_object(helm: Helm) -> None:
    rendered = helm.scenario("production")
    assert rendered.all("Secret") == []


def test_notes_hold_no_credential(tmp_path: Path) -> None:
    """NOTES.txt (rendered by helm 4's client-side dry run; helm 3 needs a cluster for it)."""
    helm4 = TOOLS_BIN / "helm4"
    if not helm4.exists():
        pytest.fail(f"{helm4} is missing: run scripts/setup.sh")
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(CANARY_SECRET_VALUES))
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "no-kubeconfig"), "HELM_CACHE_HOME": str(tmp_path / "c"),
           "HELM_CONFIG_HOME": str(tmp_path / "cfg"), "HELM_DATA_HOME": str(tmp_path / "d")}
    result = subprocess.run(
        [str(helm4), "install", "mlflow", str(CHART), "-n", "ml-platform", "--dry-run=client", "-f", str(values)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "helm test mlflow -n ml-platform" in notes
    assert "kubectl -n ml-platform get secret mlflow" in notes
    assert not [c for c in canary_strings() if c in notes]
