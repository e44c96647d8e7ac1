"""`helm lint --strict` and offline schema validation of the rendered chart.

Each scenario is rendered with both pinned helm binaries and validated with
`kubernetes-validate --strict` (unknown fields are errors) against Kubernetes
1.30 and 1.34.
"""

from __future__ import annotations

import subprocess

import pytest

from chart_support import CHART, KUBERNETES_VALIDATE, PRODUCTION_VALUES, SCENARIOS, Helm

KUBERNETES_VERSIONS = ["1.30.0", "1.34.0"]


@pytest.mark.parametrize("values", ["default", "production"])
def test_lint_strict(helm: Helm, values: str) -> None:
    args = ["lint", "--strict", str(CHART)]
    if values == "production":
        args += ["--values", str(PRODUCTION_VALUES)]
    result = helm.run(*args, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


@pytest.mark.parametrize("kube_version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_rendered_objects_validate(helm: Helm, scenario: str, kube_version: str) -> None:
    assert KUBERNETES_VALIDATE.exists(), "kubernetes-validate missing: run scripts/setup.sh"
    rendered = helm.scenario(scenario)
    assert rendered.objects
    result = subprocess.run(
        [str(KUBERNETES_VALIDATE), "--strict", "--quiet", "-k", kube_version, "-"],
        input=rendered.text,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"{scenario} on Kubernetes {kube_version}:\n{result.stdout}{result.stderr}"
    assert "ERROR" not in result.stdout + result.stderr
