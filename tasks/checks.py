"""Smoke checks against a running MLflow server, over HTTPS, as a user would.

Each check returns a one-line summary on success and raises on failure:
:class:`AuthError` (permanent) when the server's auth posture is wrong,
:class:`PermanentError` for a wrong answer, :class:`TransientError` for a
connection problem or a 5xx, which the stage retries.

The tracking and artifact checks use the MLflow client itself (the runbook's
"connection test") with basic-auth credentials and the CA bundle passed the
way users pass them: ``MLFLOW_TRACKING_USERNAME/PASSWORD`` and
``MLFLOW_TRACKING_SERVER_CERT_PATH`` — set only for the duration of the call,
under a lock, in this process's environment (never argv, never logged).
"""

from __future__ import annotations

import contextlib
import os
import re
import ssl
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
from pydantic import SecretStr

from mlflow_rollout.errors import AuthError, PermanentError, TransientError
from mlflow_rollout.redact import redact
from targets.base import Endpoint, LogSource
from tasks.tls import certificate_days_left

__all__ = [
    "check_https",
    "check_admin_login",
    "check_auth",
    "check_tracking",
    "check_tracking_read",
    "check_artifacts",
    "check_logs",
    "ArtifactProbe",
]

_env_lock = threading.Lock()
#: The route every authenticated call in these checks uses; 401 without auth.
_PROTECTED = "/api/2.0/mlflow/experiments/search?max_results=1"


def _client(endpoint: Endpoint, auth: tuple[str, str] | None = None) -> httpx.Client:
    verify: ssl.SSLContext | bool = True
    if endpoint.ca_bundle is not None:
        verify = ssl.create_default_context(cafile=str(endpoint.ca_bundle))
    return httpx.Client(base_url=endpoint.url, verify=verify, auth=auth, timeout=15)


def _get(client: httpx.Client, path: str) -> httpx.Response:
    try:
        r = client.get(path)
    except httpx.ConnectError as exc:
        # A certificate failure is a ConnectError wrapping ssl errors: permanent.
        if "CERTIFICATE_VERIFY_FAILED" in str(exc) or "certificate" in str(exc).lower():
            raise PermanentError(f"TLS verification failed for {client.base_url}: {exc}") from None
        raise TransientError(f"cannot connect to {client.base_url}: {exc}") from None
    except httpx.TransportError as exc:
        raise TransientError(f"{path}: {type(exc).__name__}: {exc}") from None
    if r.status_code >= 500:
        raise TransientError(f"{path} answered {r.status_code}")
    return r


def _peer_certificate_days(endpoint: Endpoint) -> float:
    """Days until the served certificate expires, read from the TLS handshake."""
    url = httpx.URL(endpoint.url)
    ctx = ssl.create_default_context(cafile=str(endpoint.ca_bundle) if endpoint.ca_bundle else None)
    import socket

    with socket.create_connection((url.host, url.port or 443), timeout=10) as sock:
        with ctx.wrap_socket(sock, server_hostname=url.host) as tls:
            der = tls.getpeercert(binary_form=True)
    return certificate_days_left(ssl.DER_cert_to_PEM_cert(der).encode())


def check_https(endpoint: Endpoint, min_days: int) -> str:
    """TLS verifies against the CA for the host, not near expiry, ``/health`` 200."""
    if not endpoint.url.startswith("https://"):
        raise PermanentError(f"{endpoint.url} is not an https URL")
    with _client(endpoint) as client:
        r = _get(client, "/health")
    if r.status_code != 200:
        raise TransientError(f"/health answered {r.status_code}, expected 200")
    try:
        days = _peer_certificate_days(endpoint)
    except ssl.SSLError as exc:
        raise PermanentError(f"TLS verification failed for {endpoint.url}: {exc}") from None
    except OSError as exc:
        raise TransientError(f"cannot connect to {endpoint.url}: {exc}") from None
    if days < min_days:
        raise PermanentError(f"certificate of {endpoint.url} expires in {days:.1f} days (< {min_days})")
    return f"/health 200 over verified TLS; certificate valid {days:.0f} more days"


def check_admin_login(endpoint: Endpoint, username: str, password: SecretStr) -> str:
    """The admin's stored password opens ``/users/current`` (right after deploy-auth)."""
    with _client(endpoint, auth=(username, password.get_secret_value())) as admin:
        r = _get(admin, "/api/2.0/mlflow/users/current")
    if r.status_code == 401:
        raise AuthError(f"admin {username!r} was refused with the stored password (401)")
    if r.status_code != 200:
        raise TransientError(f"/api/2.0/mlflow/users/current answered {r.status_code}")
    return f"admin {username!r} logged in"


def check_auth(endpoint: Endpoint, username: str, password: SecretStr) -> str:
    """Anonymous 401 with a Basic challenge, wrong password 401, admin 200."""
    with _client(endpoint) as anon:
        r = _get(anon, _PROTECTED)
    if r.status_code != 401:
        raise AuthError(f"anonymous API call answered {r.status_code}, expected 401: auth is not enforced")
    if "basic" not in r.headers.get("www-authenticate", "").lower():
        raise AuthError("anonymous 401 carries no 'WWW-Authenticate: Basic' challenge")
    wrong = password.get_secret_value() + "-wrong"
    with _client(endpoint, auth=(username, wrong)) as bad:
        r = _get(bad, _PROTECTED)
    if r.status_code != 401:
        raise AuthError(f"a wrong password answered {r.status_code}, expected 401")
    with _client(endpoint, auth=(username, password.get_secret_value())) as admin:
        r = _get(admin, "/api/2.0/mlflow/users/current")
    if r.status_code != 200:
        raise AuthError(f"admin {username!r} could not log in: {r.status_code}")
    return "anonymous 401, wrong password 401, admin 200"


def check_tracking_read(endpoint: Endpoint, username: str, password: SecretStr) -> str:
    """A read through the tracking API as the admin (health: the store answers)."""
    with _client(endpoint, auth=(username, password.get_secret_value())) as client:
        r = _get(client, "/api/2.0/mlflow/experiments/search?max_results=10")
    if r.status_code in (401, 403):
        raise AuthError(f"tracking read refused for {username!r}: {r.status_code}")
    if r.status_code != 200:
        raise PermanentError(f"tracking read answered {r.status_code}")
    count = len(r.json().get("experiments", []))
    return f"experiments/search answered 200 ({count} experiment(s) in the first page)"


@contextlib.contextmanager
def _mlflow_client(endpoint: Endpoint, username: str, password: SecretStr) -> Iterator[object]:
    """An MlflowClient with basic-auth and CA settings, env restored afterwards."""
    from mlflow.tracking import MlflowClient

    wanted = {
        "MLFLOW_TRACKING_USERNAME": username,
        "MLFLOW_TRACKING_PASSWORD": password.get_secret_value(),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    }
    if endpoint.ca_bundle is not None:
        wanted["MLFLOW_TRACKING_SERVER_CERT_PATH"] = str(endpoint.ca_bundle)
    with _env_lock:
        saved = {k: os.environ.get(k) for k in wanted}
        os.environ.update(wanted)
        try:
            yield MlflowClient(tracking_uri=endpoint.url)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _mlflow_error(what: str, exc: Exception) -> Exception:
    text = redact(f"{what}: {type(exc).__name__}: {str(exc)[:300]}")
    code = getattr(exc, "error_code", "")
    if code in ("PERMISSION_DENIED", "UNAUTHENTICATED") or "401" in text or "403" in text:
        return AuthError(text)
    if "Connection" in text or "Max retries" in text or "50" in str(getattr(exc, "get_http_status_code", lambda: "")()):
        return TransientError(text)
    return PermanentError(text)


def _smoke_experiment(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    if exp is None:
        return client.create_experiment(name)
    return exp.experiment_id


def check_tracking(endpoint: Endpoint, username: str, password: SecretStr, experiment: str) -> str:
    """Experiment (reused), run, param, metric, read back; the run is deleted after."""
    try:
        with _mlflow_client(endpoint, username, password) as client:
            exp_id = _smoke_experiment(client, experiment)
            run = client.create_run(exp_id, run_name="smoke-tracking")
            rid = run.info.run_id
            token = uuid.uuid4().hex[:8]
            client.log_param(rid, "smoke_token", token)
            client.log_metric(rid, "smoke_metric", 0.5)
            client.set_terminated(rid)
            back = client.get_run(rid)
            client.delete_run(rid)
    except Exception as exc:
        raise _mlflow_error("tracking check failed", exc) from None
    if back.data.params.get("smoke_token") != token or back.data.metrics.get("smoke_metric") != 0.5:
        raise PermanentError(f"run {rid}: logged param/metric did not read back ({back.data.params}, {back.data.metrics})")
    return f"experiment {experiment!r} ({exp_id}): run {rid} wrote and read back a param and a metric"


#: Given (experiment_id, run_id, artifact_path) → where the object sits, finds
#: it at the artifact destination (a file, or an S3 object) and removes it.
ArtifactProbe = Callable[[str, str, str, str], str]


def check_artifacts(
    endpoint: Endpoint, username: str, password: SecretStr, experiment: str, probe: ArtifactProbe
) -> str:
    """Log an artifact through the server's proxy; ``probe`` finds it at the destination."""
    content = f"mlflow-rollout smoke {uuid.uuid4().hex}\n"
    try:
        with _mlflow_client(endpoint, username, password) as client:
            exp_id = _smoke_experiment(client, experiment)
            run = client.create_run(exp_id, run_name="smoke-artifacts")
            rid = run.info.run_id
            client.log_text(rid, content, "smoke/hello.txt")
            uri = client.get_run(rid).info.artifact_uri
            listed = [f.path for f in client.list_artifacts(rid, "smoke")]
    except Exception as exc:
        raise _mlflow_error("artifact upload failed", exc) from None
    if not uri.startswith("mlflow-artifacts:"):
        raise PermanentError(f"artifact URI {uri} is not proxied (clients would need storage credentials)")
    if "smoke/hello.txt" not in listed:
        raise PermanentError(f"uploaded artifact not listed by the server: {listed}")
    found = probe(exp_id, rid, "smoke/hello.txt", content)
    try:
        with _mlflow_client(endpoint, username, password) as client:
            client.delete_run(rid)
    except Exception:
        pass  # the object itself is already cleaned up by the probe
    return f"artifact proxied via {uri}; found at {found}"


_ERROR_LINE = re.compile(r"Traceback \(most recent call last\)|\bERROR\b|\bCRITICAL\b")


def check_logs(sources: list[LogSource], workers: int) -> str:
    """Every worker logged startup complete; no Traceback/ERROR since the mark."""
    if not sources:
        raise PermanentError("no server logs found")
    problems = []
    for src in sources:
        started = src.since_start.count("Application startup complete.")
        if started < workers:
            problems.append(f"{src.name}: {started}/{workers} workers logged 'Application startup complete.'")
        bad = [line.strip() for line in src.text.splitlines() if _ERROR_LINE.search(line)]
        if bad:
            problems.append(f"{src.name}: {len(bad)} error line(s), first: {redact(bad[0])[:300]}")
        if src.restarts:
            problems.append(f"{src.name}: {src.restarts} restart(s)")
    if problems:
        raise PermanentError("; ".join(problems))
    return f"{len(sources)} process(es): all {workers} workers started, no errors since the rollout began"


def local_artifact_probe(root: Path) -> ArtifactProbe:
    """Probe for a directory destination: ``<root>/<exp>/<run>/artifacts/<path>``."""

    def probe(exp_id: str, run_id: str, path: str, content: str) -> str:
        target = root / exp_id / run_id / "artifacts" / path
        if not target.is_file():
            raise PermanentError(f"artifact not found at the destination: {target}")
        if target.read_text() != content:
            raise PermanentError(f"artifact at {target} has unexpected content")
        target.unlink()
        return str(target)

    return probe
