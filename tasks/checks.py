"""Smoke checks against a running MLflow server, over HTTPS, as a user would.

Each check returns a one-line summary on success and raises on failure:
:class:`AuthError` (permanent) when the server's auth posture is wrong,
:class:`PermanentError` for a wrong answer, :class:`TransientError` for a
connection problem or a 5xx, which the stage retries.

The tracking and artifact checks speak the REST API the MLflow client uses
(the runbook's "connection test"): experiments, runs, params, metrics and the
proxied ``mlflow-artifacts`` routes, with basic-auth. :class:`ServerClient` is
the one HTTP stack the product uses to talk to MLflow (these checks, the
local target's probes, the auth API client in :mod:`tasks.mlflow_users`), so
every call honours the endpoint's CA bundle and its ``connect_address``
(reach a name before the runner's own resolver knows it).
"""

from __future__ import annotations

import re
import ssl
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
from pydantic import SecretStr

from mlflow_rollout.errors import AuthError, PermanentError, TransientError
from mlflow_rollout.redact import redact
from mlflow_rollout.types import Endpoint, LogSource
from tasks.tls import certificate_days_left

__all__ = [
    "check_https",
    "check_admin_login",
    "check_auth",
    "check_tracking",
    "check_tracking_read",
    "check_artifacts",
    "create_artifact_canary",
    "check_artifact_canary",
    "check_logs",
    "ArtifactProbe",
    "ServerClient",
    "error_lines",
]

#: The route every authenticated call in these checks uses; 401 without auth.
_PROTECTED = "/api/2.0/mlflow/experiments/search?max_results=1"


class ServerClient:
    """httpx against an :class:`Endpoint`, honouring ``connect_address``.

    With a connect address the request goes to that IP while TLS verifies the
    URL's host (SNI) and the Host header names it — how a runner reaches a
    name its own resolver does not know yet (DESIGN §7).

    Transport failures become :class:`TransientError` (a certificate failure
    :class:`PermanentError`), and so does a 5xx answer; other answers are
    returned for the caller to judge. ``transport`` replaces the network
    (``httpx.MockTransport`` in unit tests).
    """

    def __init__(
        self, endpoint: Endpoint, auth: tuple[str, str] | None = None, timeout: float = 15, *,
        transport: httpx.BaseTransport | None = None,
    ):
        self.endpoint = endpoint
        url = httpx.URL(endpoint.url)
        self.host = url.host
        self.port = url.port
        verify: ssl.SSLContext | bool = True
        if endpoint.ca_bundle is not None:
            verify = ssl.create_default_context(cafile=str(endpoint.ca_bundle))
        base = url
        if endpoint.connect_address:
            base = url.copy_with(host=endpoint.connect_address)
        self._client = httpx.Client(base_url=base, verify=verify, auth=auth, timeout=timeout, transport=transport)

    def __enter__(self) -> "ServerClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def request(self, method: str, path: str, **kw) -> httpx.Response:
        if self.endpoint.connect_address:
            host_header = self.host if self.port in (None, 443) else f"{self.host}:{self.port}"
            kw["headers"] = {**kw.get("headers", {}), "Host": host_header}
            kw["extensions"] = {**kw.get("extensions", {}), "sni_hostname": self.host}
        try:
            r = self._client.request(method, path, **kw)
        except httpx.ConnectError as exc:
            # A certificate failure is a ConnectError wrapping ssl errors: permanent.
            if "CERTIFICATE_VERIFY_FAILED" in str(exc) or "certificate" in str(exc).lower():
                raise PermanentError(f"TLS verification failed for {self.endpoint.url}: {redact(str(exc))}") from None
            raise TransientError(f"cannot connect to {self.endpoint.url}: {redact(str(exc))}") from None
        except httpx.TransportError as exc:
            raise TransientError(f"{method} {path}: {type(exc).__name__}: {redact(str(exc))}") from None
        if r.status_code >= 500:
            raise TransientError(f"{method} {path} answered {r.status_code}")
        return r

    def get(self, path: str, **kw) -> httpx.Response:
        return self.request("GET", path, **kw)

    def api(self, method: str, path: str, **kw) -> dict:
        """A tracking API call that must succeed; its JSON body."""
        r = self.request(method, path, **kw)
        if r.status_code in (401, 403):
            raise AuthError(f"{method} {path} refused: {r.status_code}")
        if r.status_code != 200:
            raise PermanentError(f"{method} {path} answered {r.status_code}: {redact(r.text[:300])}")
        return r.json() if r.content else {}


def _peer_certificate_days(endpoint: Endpoint) -> float:
    """Days until the served certificate expires, read from the TLS handshake."""
    import socket

    url = httpx.URL(endpoint.url)
    ctx = ssl.create_default_context(cafile=str(endpoint.ca_bundle) if endpoint.ca_bundle else None)
    address = endpoint.connect_address or url.host
    with socket.create_connection((address, url.port or 443), timeout=10) as sock:
        with ctx.wrap_socket(sock, server_hostname=url.host) as tls:
            der = tls.getpeercert(binary_form=True)
    return certificate_days_left(ssl.DER_cert_to_PEM_cert(der).encode())


def status_of(endpoint: Endpoint, path: str, *, timeout: float = 10) -> int:
    """The status ``GET path`` answers, anonymously, 5xx included (a diagnosis wants the 502 itself).

    Connection failures still raise :class:`TransientError`.
    """
    with ServerClient(endpoint, timeout=timeout) as client:
        try:
            return client.get(path).status_code
        except TransientError as exc:
            answered = re.search(r"answered (\d{3})$", str(exc))
            if answered:
                return int(answered.group(1))
            raise


def check_https(endpoint: Endpoint, min_days: int) -> str:
    """TLS verifies against the CA for the host, not near expiry, ``/health`` 200."""
    if not endpoint.url.startswith("https://"):
        raise PermanentError(f"{endpoint.url} is not an https URL")
    with ServerClient(endpoint) as client:
        r = client.get("/health")
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
    with ServerClient(endpoint, auth=(username, password.get_secret_value())) as admin:
        r = admin.get("/api/2.0/mlflow/users/current")
    if r.status_code == 401:
        raise AuthError(f"admin {username!r} was refused with the stored password (401)")
    if r.status_code != 200:
        raise TransientError(f"/api/2.0/mlflow/users/current answered {r.status_code}")
    return f"admin {username!r} logged in"


def check_auth(endpoint: Endpoint, username: str, password: SecretStr) -> str:
    """Anonymous 401 with a Basic challenge, wrong password 401, admin 200."""
    with ServerClient(endpoint) as anon:
        r = anon.get(_PROTECTED)
    if r.status_code != 401:
        raise AuthError(f"anonymous API call answered {r.status_code}, expected 401: auth is not enforced")
    if "basic" not in r.headers.get("www-authenticate", "").lower():
        raise AuthError("anonymous 401 carries no 'WWW-Authenticate: Basic' challenge")
    wrong = password.get_secret_value() + "-wrong"
    with ServerClient(endpoint, auth=(username, wrong)) as bad:
        r = bad.get(_PROTECTED)
    if r.status_code != 401:
        raise AuthError(f"a wrong password answered {r.status_code}, expected 401")
    with ServerClient(endpoint, auth=(username, password.get_secret_value())) as admin:
        r = admin.get("/api/2.0/mlflow/users/current")
    if r.status_code != 200:
        raise AuthError(f"admin {username!r} could not log in: {r.status_code}")
    return "anonymous 401, wrong password 401, admin 200"


def check_tracking_read(endpoint: Endpoint, username: str, password: SecretStr) -> str:
    """A read through the tracking API as the admin (health: the store answers)."""
    with ServerClient(endpoint, auth=(username, password.get_secret_value())) as client:
        r = client.get("/api/2.0/mlflow/experiments/search?max_results=10")
    if r.status_code in (401, 403):
        raise AuthError(f"tracking read refused for {username!r}: {r.status_code}")
    if r.status_code != 200:
        raise PermanentError(f"tracking read answered {r.status_code}")
    count = len(r.json().get("experiments", []))
    return f"experiments/search answered 200 ({count} experiment(s) in the first page)"


def _smoke_experiment(client: ServerClient, name: str) -> str:
    """The smoke experiment's id: reused across runs, restored if deleted, created once."""
    r = client.get("/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": name})
    if r.status_code == 200:
        exp = r.json()["experiment"]
        if exp.get("lifecycle_stage") == "deleted":
            client.api("POST", "/api/2.0/mlflow/experiments/restore", json={"experiment_id": exp["experiment_id"]})
        return exp["experiment_id"]
    if r.status_code in (401, 403):
        raise AuthError(f"reading experiment {name!r} refused: {r.status_code}")
    return client.api("POST", "/api/2.0/mlflow/experiments/create", json={"name": name})["experiment_id"]


def _new_run(client: ServerClient, exp_id: str, name: str) -> dict:
    return client.api(
        "POST", "/api/2.0/mlflow/runs/create",
        json={"experiment_id": exp_id, "run_name": name, "start_time": int(time.time() * 1000)},
    )["run"]["info"]


def check_tracking(endpoint: Endpoint, username: str, password: SecretStr, experiment: str) -> str:
    """The runbook's connection test over the REST API the MLflow client uses:
    experiment (reused), run, param, metric, read back; the run is deleted after."""
    token = uuid.uuid4().hex[:8]
    with ServerClient(endpoint, auth=(username, password.get_secret_value())) as client:
        exp_id = _smoke_experiment(client, experiment)
        rid = _new_run(client, exp_id, "smoke-tracking")["run_id"]
        client.api("POST", "/api/2.0/mlflow/runs/log-parameter", json={"run_id": rid, "key": "smoke_token", "value": token})
        client.api(
            "POST", "/api/2.0/mlflow/runs/log-metric",
            json={"run_id": rid, "key": "smoke_metric", "value": 0.5, "timestamp": int(time.time() * 1000), "step": 0},
        )
        client.api("POST", "/api/2.0/mlflow/runs/update", json={"run_id": rid, "status": "FINISHED"})
        back = client.api("GET", "/api/2.0/mlflow/runs/get", params={"run_id": rid})["run"]["data"]
        client.api("POST", "/api/2.0/mlflow/runs/delete", json={"run_id": rid})
    params = {p["key"]: p["value"] for p in back.get("params", [])}
    metrics = {m["key"]: m["value"] for m in back.get("metrics", [])}
    if params.get("smoke_token") != token or metrics.get("smoke_metric") != 0.5:
        raise PermanentError(f"run {rid}: logged param/metric did not read back ({params}, {metrics})")
    return f"experiment {experiment!r} ({exp_id}): run {rid} wrote and read back a param and a metric"


#: Given (experiment_id, run_id, artifact_path, content) → finds the object at
#: the artifact destination (a file, or an S3 object), checks and removes it.
ArtifactProbe = Callable[[str, str, str, str], str]


def check_artifacts(
    endpoint: Endpoint, username: str, password: SecretStr, experiment: str, probe: ArtifactProbe
) -> str:
    """Upload an artifact through the server's proxy; ``probe`` finds it at the destination."""
    content = f"mlflow-rollout smoke {uuid.uuid4().hex}\n"
    path = "smoke/hello.txt"
    with ServerClient(endpoint, auth=(username, password.get_secret_value())) as client:
        exp_id = _smoke_experiment(client, experiment)
        info = _new_run(client, exp_id, "smoke-artifacts")
        rid, uri = info["run_id"], info["artifact_uri"]
        if not uri.startswith("mlflow-artifacts:"):
            raise PermanentError(f"artifact URI {uri} is not proxied (clients would need storage credentials)")
        proxied = uri.removeprefix("mlflow-artifacts:").lstrip("/")
        client.api("PUT", f"/api/2.0/mlflow-artifacts/artifacts/{proxied}/{path}", content=content.encode())
        listed = client.api("GET", "/api/2.0/mlflow-artifacts/artifacts", params={"path": f"{proxied}/smoke"})
        names = [f["path"] for f in listed.get("files", [])]
        if "hello.txt" not in names:
            raise PermanentError(f"uploaded artifact not listed by the server: {names}")
        found = probe(exp_id, rid, path, content)
        client.api("POST", "/api/2.0/mlflow/runs/delete", json={"run_id": rid})
    return f"artifact proxied via {uri}; found at {found}"


def create_artifact_canary(endpoint: Endpoint, username: str, password: SecretStr, experiment: str) -> dict:
    """Log a small artifact that health passes read back later: data loss shows as its absence.

    A fresh upload (:func:`check_artifacts`) passes even when everything logged
    before was removed behind the server's back; reading an *old* artifact
    does not. Returns the non-secret record to keep (run id, path, digest).
    """
    content = f"mlflow-rollout canary {uuid.uuid4().hex}\n"
    with ServerClient(endpoint, auth=(username, password.get_secret_value())) as client:
        exp_id = _smoke_experiment(client, experiment)
        info = _new_run(client, exp_id, "mlflow-rollout-canary")
        proxied = info["artifact_uri"].removeprefix("mlflow-artifacts:").lstrip("/")
        path = f"{proxied}/canary/canary.txt"
        client.api("PUT", f"/api/2.0/mlflow-artifacts/artifacts/{path}", content=content.encode())
    import hashlib

    return {"run_id": info["run_id"], "path": path, "sha256": hashlib.sha256(content.encode()).hexdigest(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def check_artifact_canary(endpoint: Endpoint, username: str, password: SecretStr, canary: dict) -> str:
    """The canary logged by an earlier pass is still readable through the server, unchanged."""
    import hashlib

    with ServerClient(endpoint, auth=(username, password.get_secret_value())) as client:
        r = client.get(f"/api/2.0/mlflow-artifacts/artifacts/{canary['path']}")
    if r.status_code in (502, 503, 504):
        raise TransientError(f"reading the canary artifact answered {r.status_code}")
    if r.status_code != 200:
        raise PermanentError(
            f"the canary artifact logged {canary.get('created', 'earlier')} (run {canary['run_id']}) is gone "
            f"({r.status_code}): artifacts were lost at the destination"
        )
    if hashlib.sha256(r.content).hexdigest() != canary["sha256"]:
        raise PermanentError(f"the canary artifact of run {canary['run_id']} changed behind the server's back")
    return f"canary artifact of run {canary['run_id']} (logged {canary.get('created', '?')}) still readable"


_ERROR_LINE = re.compile(r"Traceback \(most recent call last\)|\bERROR\b|\bCRITICAL\b")


def error_lines(text: str) -> list[str]:
    """The lines of a server log that report an error (Traceback, ERROR, CRITICAL)."""
    return [line.strip() for line in text.splitlines() if _ERROR_LINE.search(line)]


def check_logs(sources: list[LogSource], workers: int) -> str:
    """Every worker logged startup complete; no Traceback/ERROR since the mark."""
    if not sources:
        raise PermanentError("no server logs found")
    problems = []
    for src in sources:
        started = src.since_start.count("Application startup complete.")
        if started < workers:
            problems.append(f"{src.name}: {started}/{workers} workers logged 'Application startup complete.'")
        bad = error_lines(src.text)
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
