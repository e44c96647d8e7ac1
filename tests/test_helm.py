"""tasks/helm.py: every call goes through one runner, so a missing helm is bad input (exit 2) that says how to install it."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlflow_rollout.errors import BadInputError
from tasks.helm import Helm

REPO = Path(__file__).resolve().parent.parent


def test_version_of_the_pinned_helm() -> None:
    helm = REPO / ".tools" / "bin" / "helm4"
    assert helm.is_file(), f"{helm} missing: run scripts/setup.sh"
    assert Helm(binary=str(helm), namespace="ns").version().startswith("v4.")


@pytest.mark.parametrize("case", ["path", "PATH"])
def test_missing_helm_is_bad_input_naming_the_binary_and_the_installer(case, tmp_path, monkeypatch) -> None:
    if case == "path":
        binary = str(tmp_path / "no-such" / "helm")
    else:
        monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without helm
        binary = "helm"
    with pytest.raises(BadInputError) as err:
        Helm(binary=binary, namespace="ns").version()
    assert repr(binary) in str(err.value) and "scripts/install-helm.sh" in str(err.value)
    assert "kubernetes.helm_binary" in str(err.value)


def test_helm_that_is_not_executable_is_bad_input(tmp_path) -> None:
    fake = tmp_path / "helm"
    fake.write_text("#!/bin/sh\n")
    with pytest.raises(BadInputError, match="not executable"):
        Helm(binary=str(fake), namespace="ns").version()

