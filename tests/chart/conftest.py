"""Fixtures for the charts/mlflow tests.

Every chart test runs once with each pinned helm (``helm3`` = v3.19.0,
``helm4`` = v4.1.4) from ``.tools/bin``, installed by
``scripts/install-helm.sh`` (which ``scripts/setup.sh`` runs). A missing or
wrong binary is a failure, not a skip.
"""

from __future__ import annotations

import subprocess

import pytest

from chart_support import HELM_VERSIONS, TOOLS_BIN, Helm

_HELMS: dict[str, Helm] = {}


@pytest.fixture(scope="session", params=sorted(HELM_VERSIONS))
def helm(request: pytest.FixtureRequest) -> Helm:
    """Each pinned helm binary in turn; fails (never skips) when one is missing."""
    name = request.param
    if name not in _HELMS:
        path = TOOLS_BIN / name
        if not (path.is_file() and path.stat().st_mode & 0o111):
            pytest.fail(
                f"{path} is missing: run scripts/setup.sh (or bash scripts/install-helm.sh) "
                f"to install the pinned helm binaries ({', '.join(f'{k} {v}' for k, v in HELM_VERSIONS.items())})"
            )
        version = subprocess.run(
            [str(path), "version", "--short"], capture_output=True, text=True, timeout=60
        ).stdout.strip()
        if not version.startswith(HELM_VERSIONS[name]):
            pytest.fail(
                f"{path} is {version!r}, expected {HELM_VERSIONS[name]}: run scripts/setup.sh "
                "(or bash scripts/install-helm.sh)"
            )
        _HELMS[name] = Helm(name, path)
    return _HELMS[name]
