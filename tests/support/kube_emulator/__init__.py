"""A Kubernetes API emulator for tests: real helm, kubectl and the Python client talk to it.

No kube-apiserver, kind, k3s or envtest can run here (DESIGN §6), so tests of
the cluster target run against this emulator: a subprocess serving the
Kubernetes REST API over HTTPS on 127.0.0.1 with a generated CA and bearer
token, and a kubeconfig (cluster/user/context ``emulator``) that helm 3.19,
helm 4.1, kubectl 1.34 and ``kubernetes`` (Python) use unchanged.

Design, one module per concern::

    server.py       HTTPS, kubeconfig, threads, chunked watch streams
      └─ api.py     REST semantics: routes, verbs, patches, watches, logs, /_emulator
          ├─ resources.py   resource table, discovery, OpenAPI v3
          ├─ admission.py   defaults and validation per kind
          ├─ patch.py       merge / strategic merge / JSON patch / server-side apply
          ├─ protobuf.py    Kubernetes protobuf request bodies (helm's release Secrets)
          ├─ store.py       objects, resourceVersions, history, watches, selectors
          ├─ rbac.py        ServiceAccount tokens, RBAC authorizer, 403 Status wording
          ├─ controllers.py Deployment/ReplicaSet/Job/kubelet/Endpoints/Ingress/... fakes
          ├─ knobs.py       test knobs and their control API
          ├─ portforward.py pods/portforward: WebSocket upgrade and session
          └─ kubelet.py     opt-in: pods run as processes (netns.py, container_init.py),
                            Ingresses of class alb behind an emulated ALB (alb.py)

Two kubelets. The default one paints pods Ready on a timer (fast; the knobs
below shape it). With ``kube_emulator(..., pods=PodRuntime(...))`` the
process kubelet runs the pod spec for real — namespaces, uid, volumes, env
from Secrets, probes, restarts, Job exit codes, logs — and an ALB serves
the Ingress; see kubelet.py for what it does and does not emulate. It needs
root; ``pods_unavailable()`` says why it cannot run elsewhere.

What the clients need, and what it does (verified with the real binaries,
see tests/test_kube_emulator.py):

- discovery as plain JSON (clients ask for aggregated discovery first and
  fall back); OpenAPI v3 whose PATCH operations declare ``fieldValidation``,
  so helm and kubectl leave validation to the server and need no
  ``--disable-openapi-validation``;
- helm's release Secrets arrive as protobuf; answers are JSON;
- helm 4 applies server-side (``application/apply-patch+yaml``) and waits
  with kstatus watches that use ``sendInitialEvents=true`` (initial events
  end with an annotated BOOKMARK); helm 3 creates, strategic-merge-patches
  and polls Deployments/ReplicaSets (it needs ``Service.spec.clusterIP``
  and ReplicaSets owned by the Deployment with an equal pod template);
- the Python client validates responses: pods carry complete
  containerStatuses (``imageID``, ``restartCount``, ...).

Public face::

    with kube_emulator() as kube:               # KubeEmulator
        subprocess.run([helm, "upgrade", "--install", ...], env=kube.env())
        kube.control.stuck_rollout("mlflow", "ml-platform")
        kube.control.objects("Deployment", "ml-platform")

Knobs (``kube.control``, also as JSON at ``/_emulator/...``, see knobs.py):
``stuck_rollout``, ``unstick``, ``crashloop``, ``set_logs``,
``set_ingress_hostname``, ``fail_jobs``, ``set_timing``, ``reset``; reads:
``objects``, ``object``, ``requests``, ``knobs``, ``controller_errors``;
as the admin: ``create``, ``create_namespace``, ``service_account_token``
(and ``KubeEmulator.kubeconfig_for(ns, sa)``).

Authorization (rbac.py): the admin token is ``system:masters``; tokens
minted for a ServiceAccount get RBAC from the stored Roles, ClusterRoles and
their bindings, with kube-apiserver's 403 Status wording, and
``SelfSubjectAccessReview`` answers. Requests are recorded with their user.

Port-forward (``pods/{name}/portforward``, portforward.py): the WebSocket
protocol the Python client speaks, to process-kubelet pods; see README.md.

Not emulated: admission webhooks,
CRDs, exec/attach, SPDY port-forward, field ownership conflicts of server-side
apply (no ``managedFields``), graceful deletion in the API (a deleted pod
leaves the store at once; the process kubelet then stops its containers
with SIGTERM and the grace period), finalizers, aggregated discovery,
protobuf responses, pagination (``limit`` is ignored; lists are complete).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..services import ServiceError, _stop, free_port
from .knobs import DEFAULT_INGRESS_HOSTNAME

__all__ = [
    "KubeEmulator",
    "EmulatorControl",
    "kube_emulator",
    "PodRuntime",
    "python_image",
    "pods_unavailable",
    "ServiceError",
    "DEFAULT_INGRESS_HOSTNAME",
]

_REPO = Path(__file__).resolve().parents[3]


class EmulatorControl:
    """Knobs and store reads over the emulator's ``/_emulator`` API."""

    def __init__(self, url: str, token: str, cafile: Path) -> None:
        self.url = url
        self._token = token
        self._context = ssl.create_default_context(cafile=str(cafile))

    def _call(self, method: str, action: str, body: dict[str, Any] | None = None, query: dict[str, Any] | None = None) -> Any:
        url = f"{self.url}/_emulator/{action}"
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self._token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, context=self._context, timeout=30) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            if exc.code == 404 and action == "objects":
                return None
            raise RuntimeError(f"emulator control {method} {action} failed: {exc.code} {detail}") from None

    # -- knobs

    def reset(self, *, objects: bool = False) -> None:
        """Knobs back to defaults; ``objects=True`` also empties the cluster."""
        self._call("POST", "reset", {"objects": objects})

    def stuck_rollout(self, deployment: str, namespace: str | None = None, *, deadline_seconds: float | None = None) -> None:
        """New pods of ``deployment`` never get Ready; Progressing turns False
        (ProgressDeadlineExceeded) after ``deadline_seconds`` (default: the
        Deployment's progressDeadlineSeconds, 600 unless the chart sets it)."""
        self._call("POST", "stuck", {"deployment": deployment, "namespace": namespace, "stuck": True,
                                     "deadline_seconds": deadline_seconds})

    def unstick(self, deployment: str, namespace: str | None = None) -> None:
        self._call("POST", "stuck", {"deployment": deployment, "namespace": namespace, "stuck": False})

    def crashloop(self, deployment: str, namespace: str | None = None, *, on: bool = True) -> None:
        """Pods of ``deployment`` crash-loop (CrashLoopBackOff, restartCount growing)."""
        self._call("POST", "crashloop", {"deployment": deployment, "namespace": namespace, "crashloop": on})

    def set_logs(
        self,
        text: str,
        *,
        deployment: str | None = None,
        pod: str | None = None,
        job: str | None = None,
        namespace: str | None = None,
        container: str | None = None,
        previous: bool = False,
    ) -> None:
        """Log text of the containers of a deployment's, a job's or one pod's pods."""
        self._call("POST", "logs", {"text": text, "deployment": deployment, "pod": pod, "job": job,
                                    "namespace": namespace, "container": container, "previous": previous})

    def set_ingress_hostname(self, hostname: str | None, *, name: str | None = None, namespace: str | None = None) -> None:
        """Load-balancer hostname written to Ingress status (all, or one by name);
        ``None`` leaves Ingress status alone (empty unless the test writes it)."""
        self._call("POST", "ingress", {"hostname": hostname, "name": name, "namespace": namespace})

    def fail_jobs(self, name: str | None = None, namespace: str | None = None, *, fail: bool = True) -> None:
        """Jobs (all, or one by name; or a bare pod by name) fail instead of completing."""
        self._call("POST", "jobs", {"fail": fail, "name": name, "namespace": namespace})

    def set_timing(self, **seconds: float) -> None:
        """``pod_start_seconds``, ``pod_ready_seconds``, ``job_seconds``, ``restart_seconds``."""
        self._call("POST", "timing", seconds)

    # -- identities and objects (as the cluster admin)

    def service_account_token(self, namespace: str, name: str) -> str:
        """A bearer token for ServiceAccount ``namespace/name`` (which must exist): RBAC applies to it."""
        return self._call("POST", "token", {"namespace": namespace, "serviceaccount": name})["token"]

    def create(self, obj: dict[str, Any], *, exist_ok: bool = True) -> dict[str, Any] | None:
        """Create one object through the API with the admin token (``kubectl create`` by the platform team)."""
        from .resources import resource_for_kind

        rt = resource_for_kind(obj["kind"])
        ns = (obj.get("metadata") or {}).get("namespace") if rt.namespaced else None
        if rt.namespaced and not ns:
            raise ValueError(f"{obj['kind']} {obj['metadata'].get('name')}: metadata.namespace is required")
        req = urllib.request.Request(f"{self.url}{rt.base_path(ns)}", data=json.dumps(obj).encode(), method="POST")
        req.add_header("Authorization", f"Bearer {self._token}")
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, context=self._context, timeout=30) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 409 and exist_ok:
                return None
            raise RuntimeError(f"creating {obj['kind']} {obj['metadata'].get('name')}: {exc.code} "
                               f"{exc.read().decode(errors='replace')}") from None

    def create_namespace(self, name: str) -> None:
        """``kubectl create namespace NAME`` (a prerequisite of a rollout: the runner cannot create it)."""
        self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    # -- reads

    def knobs(self) -> dict[str, Any]:
        return self._call("GET", "knobs")

    def objects(self, kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
        """Stored objects of ``kind`` (kind, plural or short name), straight from the store."""
        return self._call("GET", "objects", query={"kind": kind, "namespace": namespace})

    def object(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        return self._call("GET", "objects", query={"kind": kind, "namespace": namespace, "name": name})

    def requests(self) -> list[dict[str, Any]]:
        """API requests seen since start or reset: method, path, query, content_type, accept, user_agent, status."""
        return self._call("GET", "requests")

    def controller_errors(self) -> list[str]:
        """Tracebacks of fake-controller failures (should stay empty)."""
        return self._call("GET", "errors")

    def health(self) -> dict[str, Any]:
        return self._call("GET", "health")

    def wait_for(self, predicate: Callable[[], Any], *, timeout: float = 10, interval: float = 0.1, what: str = "condition") -> Any:
        """Poll ``predicate`` until it returns something truthy; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(interval)


@dataclass
class PodRuntime:
    """Run pods as processes (kubelet.py) instead of painting them Ready.

    ``images``: image name → {"path": [dirs], "env": {...}, "traversable":
    [dirs a non-root uid must be able to enter]} (see :func:`python_image`).
    ``udp_ports``: the same for UDP (a DNS server). ``host_ports``: ports on 127.0.0.1 that pods (and the host) reach at
    ``gateway:PORT``. ``alb``: {"https_port", "http_port", "cert", "key"} for
    the emulated ALB of Ingresses of class ``alb``. ``api_access``: pods get
    in-cluster config (service-account token, ``kubernetes.default.svc``).
    """

    images: dict[str, dict[str, Any]]
    host_ports: list[int] = field(default_factory=list)
    udp_ports: list[int] = field(default_factory=list)
    hosts: dict[str, str] = field(default_factory=dict)
    backoff_seconds: float = 2.0
    max_grace_seconds: float = 10.0
    alb: dict[str, Any] | None = None
    api_access: bool = False
    subnet: str = ""
    prefix: str = ""

    def prepare(self) -> None:
        """Pick the subnet and the name prefix (before the emulator starts, so tests know the gateway)."""
        from .netns import free_subnet

        if not self.subnet:
            self.subnet = str(free_subnet())
        if not self.prefix:
            self.prefix = "ke" + os.urandom(2).hex()

    @property
    def gateway(self) -> str:
        """Where pods reach the host's relayed ports (and the host reaches them too)."""
        return self.address(1)

    def address(self, n: int) -> str:
        """``n``-th address of the pods' subnet (``.199`` suits the ALB: pods and the host both reach it)."""
        self.prepare()
        return f"{self.subnet.rsplit('.', 1)[0]}.{n}"


def python_image(venv: str | Path | None = None, *, binds: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    """An "image" that is a virtualenv on this machine: its bin on PATH, its directories enterable.

    The virtualenv, the interpreter it was made from and this repository (an
    editable install points there) are bound into the container at their own
    paths, after the pod's volumes: a checkout under ``/tmp`` stays visible
    under the chart's ``/tmp`` emptyDir, as an image's files would.
    """
    venv = Path(venv or sys.prefix)
    python = Path(os.path.realpath(venv / "bin" / "python"))
    traversable: set[str] = set()
    for path in (venv, python):
        for parent in [path, *path.parents]:
            traversable.add(str(parent))
    own = {str(p) for p in (venv, Path(sys.base_prefix), _REPO)} | {str(p.resolve()) for p in (venv, Path(sys.base_prefix), _REPO)}
    own_binds = [{"source": p, "target": p, "read_only": True} for p in sorted(own) if p != "/"]
    return {"path": [str(venv / "bin")], "traversable": sorted(traversable),
            "binds": own_binds + list(binds or []), **extra}


def pods_unavailable() -> str | None:
    """Why pods cannot run as processes on this machine (None when they can)."""
    from .netns import unavailable_reason

    return unavailable_reason()


@dataclass(frozen=True)
class KubeEmulator:
    """A running emulator: where it is and how to reach it."""

    url: str
    port: int
    directory: Path
    kubeconfig: Path
    ca_path: Path
    token: str
    log_path: Path
    control: EmulatorControl
    pods: PodRuntime | None = None

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for helm/kubectl subprocesses: this kubeconfig, private caches."""
        env = dict(os.environ if base is None else base)
        env.update({
            "KUBECONFIG": str(self.kubeconfig),
            "KUBECACHEDIR": str(self.directory / "kube-cache"),
            "HELM_CACHE_HOME": str(self.directory / "helm" / "cache"),
            "HELM_CONFIG_HOME": str(self.directory / "helm" / "config"),
            "HELM_DATA_HOME": str(self.directory / "helm" / "data"),
        })
        env.pop("HELM_KUBECONTEXT", None)
        env.pop("HELM_NAMESPACE", None)
        return env

    def objects(self, kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
        return self.control.objects(kind, namespace)

    def kubeconfig_for(self, namespace: str, service_account: str, path: Path | None = None) -> Path:
        """A kubeconfig like :attr:`kubeconfig` whose user is the ServiceAccount's token (RBAC applies)."""
        import yaml

        token = self.control.service_account_token(namespace, service_account)
        config = yaml.safe_load(self.kubeconfig.read_text())
        for user in config.get("users") or []:
            user["user"] = {"token": token}
        path = path or self.directory / f"kubeconfig-{namespace}-{service_account}"
        path.write_text(yaml.safe_dump(config))
        os.chmod(path, 0o600)
        return path

    def log_tail(self, lines: int = 40) -> str:
        return _log_tail(self.log_path, lines)


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _ready(url: str, cafile: Path) -> bool:
    if not cafile.exists():
        return False
    try:
        context = ssl.create_default_context(cafile=str(cafile))
        with urllib.request.urlopen(f"{url}/readyz", context=context, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return False


@contextlib.contextmanager
def kube_emulator(tmpdir: str | Path | None = None, *, startup_timeout: float = 30, attempts: int = 3,
                  pods: PodRuntime | None = None) -> Iterator[KubeEmulator]:
    """Run ``python -m tests.support.kube_emulator`` on a free port until the block ends.

    ``tmpdir``: where kubeconfig, certificates, caches and the log go (kept);
    default a fresh temporary directory, removed afterwards. Raises
    :class:`ServiceError` with the log tail when the emulator does not start.
    """
    own_dir = tmpdir is None
    directory = Path(tempfile.mkdtemp(prefix="kube-emulator-")) if own_dir else Path(tmpdir)
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / "emulator.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO), env.get("PYTHONPATH", "")) if p)
    proc: subprocess.Popen | None = None
    extra: list[str] = []
    if pods is not None:
        reason = pods_unavailable()
        if reason:
            raise ServiceError(reason)
        pods.prepare()
        config = {k: v for k, v in asdict(pods).items() if k not in ("api_access", "subnet", "prefix")}
        config.update(prefix=pods.prefix, subnet=pods.subnet, state_dir=str(directory / "kubelet"),
                      api_port=1 if pods.api_access else 0)
        (directory / "kubelet.json").write_text(json.dumps(config, indent=1))
        extra = ["--pods", str(directory / "kubelet.json")]
    try:
        url = ""
        port = 0
        for _ in range(attempts):
            port = free_port()
            url = f"https://127.0.0.1:{port}"
            (directory / "ca.pem").unlink(missing_ok=True)
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "tests.support.kube_emulator", "--port", str(port), "--dir", str(directory), *extra],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=_REPO,
                    env=env,
                )
            deadline = time.monotonic() + startup_timeout
            while time.monotonic() < deadline and proc.poll() is None:
                if _ready(url, directory / "ca.pem"):
                    break
                time.sleep(0.1)
            if proc.poll() is None and _ready(url, directory / "ca.pem"):
                break
            _stop(proc)
            proc = None
        if proc is None:
            raise ServiceError(f"kube emulator did not start; log {log_path}:\n{_log_tail(log_path)}")
        token = (directory / "token").read_text().strip()
        control = EmulatorControl(url, token, directory / "ca.pem")
        yield KubeEmulator(
            url=url,
            port=port,
            directory=directory,
            kubeconfig=directory / "kubeconfig",
            ca_path=directory / "ca.pem",
            token=token,
            log_path=log_path,
            control=control,
            pods=pods,
        )
    finally:
        if proc is not None:
            _stop(proc, timeout=10 if pods is None else pods.max_grace_seconds + 20)
        if pods is not None and pods.prefix:
            from .netns import sweep

            left = sweep(pods.prefix)  # what a killed emulator could not remove itself
            if left:
                print(f"kube_emulator: removed what the emulator left behind: {left}", file=sys.stderr)
        if own_dir:
            shutil.rmtree(directory, ignore_errors=True)
