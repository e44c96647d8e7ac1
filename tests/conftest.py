"""Shared fixtures: fake AWS credentials for the session, real services on demand.

``moto`` and ``postgres`` are session-scoped and start only when a test asks
for them (see ``tests/support/services.py``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator

import pytest

# Make the checkout importable (``tasks``, ``mlflow_rollout``, ``tests.support``)
# also when pytest is run as ``.venv/bin/pytest`` without an editable install.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.support.services import MotoServer, PostgresServer, moto_server, postgres_server  # noqa: E402

#: boto3 must never find (or look for) real credentials in tests.
_AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-west-2",
}
#: Variables that would point boto3 at a real profile or session.
_AWS_UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE")


@pytest.fixture(scope="session", autouse=True)
def aws_test_credentials() -> Iterator[None]:
    """Fake AWS credentials for the whole session; the old environment is restored after."""
    saved = {name: os.environ.get(name) for name in (*_AWS_TEST_ENV, *_AWS_UNSET)}
    os.environ.update(_AWS_TEST_ENV)
    for name in _AWS_UNSET:
        os.environ.pop(name, None)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session")
def moto(aws_test_credentials: None) -> Iterator[MotoServer]:
    """A ``moto_server`` on a loopback port (``.endpoint_url``, ``.client(service)``)."""
    with moto_server() as server:
        yield server


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL 15 with role and database ``mlflow`` (``.uri``, ``.create_database(name)``)."""
    with postgres_server() as server:
        yield server


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """One Prefect test server for the session; its API URL for subprocesses.

    Started once (it takes 12–20 s here, DESIGN §7); CLI runs in subprocesses
    get ``PREFECT_API_URL`` pointing at it, so their runs, logs and artifacts
    can be read back through the API.
    """
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield PREFECT_API_URL.value()
