"""A kubelet that runs pods as processes (opt-in; DESIGN §6b).

The painted kubelet in controllers.py marks pods Ready on a timer; with this
one (``kube_emulator(..., pods=PodRuntime(...))``) the rendered pod spec is
executed, so a wrong ``secretKeyRef`` key, a probe on the wrong path or a
path written under ``readOnlyRootFilesystem`` fails as on a real node.

What it does, per pod (one worker thread each):

- **sandbox**: a network namespace with its own pod IP on the emulator's
  bridge (netns.py); ``/etc/hosts`` with the pod name and the configured host
  names; host services relayed on the gateway address.
- **volumes**: Secret (``items``, ``defaultMode``, ``optional``), ConfigMap,
  emptyDir, projected service-account token (``automountServiceAccountToken``)
  — files in the pod's directory, owned by ``fsGroup``, bound into the
  container (container_init.py). A missing Secret or key keeps the pod in
  ContainerCreating with ``FailedMount`` events, as a real kubelet.
- **IRSA**: a ServiceAccount annotated ``eks.amazonaws.com/role-arn`` gets
  what the EKS pod-identity webhook adds (``AWS_ROLE_ARN``, a web-identity
  token file), so boto3 in the pod assumes the role through STS (moto).
- **images**: a name mapped to directories on this machine (``PATH``) and
  env; an unknown image is ``ErrImagePull`` → ``ImagePullBackOff``.
- **config**: env from ``value``, ``secretKeyRef``, ``configMapKeyRef``,
  ``fieldRef`` (``$(VAR)`` expanded in env, command and args); a missing
  Secret or key (not optional) or ``runAsNonRoot`` with uid 0 is
  ``CreateContainerConfigError``.
- **process**: ``command``/``args`` as ``runAsUser``/``runAsGroup`` with the
  supplementary ``fsGroup``, ``workingDir``, ``readOnlyRootFilesystem``; the
  output is the container log (per restart, timestamped, for
  ``tailLines``/``sinceSeconds``/``previous``).
- **probes** (startup, readiness, liveness; httpGet, tcpSocket, exec) with
  their periods, timeouts and thresholds, driving ``Ready``, ``Unhealthy``
  events and restarts.
- **restarts**: ``restartPolicy`` Always/OnFailure restart with back-off
  (``CrashLoopBackOff``, ``restartCount``, ``lastState``); Never/OnFailure
  pods end Succeeded or Failed from the exit codes.
- **termination**: a deleted pod's containers get SIGTERM, then SIGKILL
  after ``terminationGracePeriodSeconds`` (capped by the configuration).

Not emulated: resource limits (no cgroups, no OOM), Linux capabilities and
seccomp (dropping to a non-root uid is all), image layers (the root is this
machine's ``/`` under an overlay), ClusterIP routing (reach pods by IP, or
through the emulated ALB), DNS inside pods (names come from ``/etc/hosts``),
ephemeral containers, ``lifecycle`` hooks, ``subPath``.
"""

from __future__ import annotations

import base64
import copy
import datetime as _dt
import hashlib
import http.client
import ipaddress
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .netns import HostRelay, PodNetwork, ServiceProxy
from .resources import resource_for_kind
from .store import Store, now

__all__ = ["KubeletConfig", "ProcessKubelet"]

PODS = resource_for_kind("Pod")
SECRETS = resource_for_kind("Secret")
CONFIGMAPS = resource_for_kind("ConfigMap")
SERVICEACCOUNTS = resource_for_kind("ServiceAccount")
SERVICES = resource_for_kind("Service")
ENDPOINTS = resource_for_kind("Endpoints")

_INIT = str(Path(__file__).with_name("container_init.py"))
_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
_SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
_IRSA_DIR = "/var/run/secrets/eks.amazonaws.com/serviceaccount"


@dataclass
class KubeletConfig:
    """What the test gives the kubelet (``--pods CONFIG.json``)."""

    prefix: str
    subnet: str
    state_dir: str
    images: dict[str, dict[str, Any]] = field(default_factory=dict)
    host_ports: list[int] = field(default_factory=list)
    udp_ports: list[int] = field(default_factory=list)
    hosts: dict[str, str] = field(default_factory=dict)
    backoff_seconds: float = 10.0
    max_grace_seconds: float = 30.0
    alb: dict[str, Any] | None = None
    token: str = ""
    api_port: int = 0

    @classmethod
    def load(cls, path: str | Path) -> "KubeletConfig":
        return cls(**json.loads(Path(path).read_text()))


class ConfigError(Exception):
    """The container cannot be created: (reason, message) as a kubelet reports it."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _stamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _expand(text: str, env: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env.get(name, m.group(0))

    return _VAR.sub(sub, text)


class Container:
    """One container of a pod: its process, probes and status."""

    def __init__(self, pod: "PodWorker", spec: dict[str, Any], init: bool = False) -> None:
        self.pod = pod
        self.spec = spec
        self.name = spec.get("name", "")
        self.init = init
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.state: dict[str, Any] = {"waiting": {"reason": "ContainerCreating"}}
        self.last_state: dict[str, Any] = {}
        self.ready = False
        self.started = False  # startup probe passed (or none)
        self.started_at = ""
        self.started_mono = 0.0
        self.next_start = 0.0
        self.exit_code: int | None = None
        self.restart_pending = False  # exited, and the restart policy brings it back (after next_start)
        self._probe_due: dict[str, float] = {}
        self._probe_runs: dict[str, tuple[int, int]] = {}  # kind -> (successes, failures) in a row
        self._log_thread: threading.Thread | None = None

    # -- logs

    def log_path(self, restart: int | None = None) -> Path:
        return self.pod.directory / "logs" / self.name / f"{self.restarts if restart is None else restart}.log"

    def _pump(self, stream: Any, path: Path) -> None:
        with open(path, "ab", buffering=0) as out:
            for line in iter(stream.readline, b""):
                out.write(_stamp().encode() + b" " + line.rstrip(b"\n") + b"\n")
        stream.close()

    # -- start / stop

    def start(self) -> None:
        kubelet = self.pod.kubelet
        image = self.spec.get("image", "")
        if image not in kubelet.config.images:
            self.state = {"waiting": {"reason": "ErrImagePull",
                                      "message": f'failed to pull and unpack image "{image}": not found'}}
            self.pod.event("Failed", f'Failed to pull image "{image}": not found', warning=True, container=self)
            self.next_start = time.monotonic() + kubelet.config.backoff_seconds
            return
        try:
            spec = self.pod.container_spec(self, kubelet.config.images[image])
        except ConfigError as exc:
            self.state = {"waiting": {"reason": exc.reason, "message": exc.message}}
            self.pod.event("Failed", f"Error: {exc.message}", warning=True, container=self)
            self.next_start = time.monotonic() + 2.0
            return
        spec_path = self.pod.directory / f"{self.name}.{self.restarts}.json"
        spec_path.write_text(json.dumps(spec))
        os.chmod(spec_path, 0o600)
        log = self.log_path()
        log.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.pod.netns, "unshare", "--mount", "--propagation", "private", "--",
             sys.executable, "-I", _INIT, str(spec_path)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, close_fds=True,
        )
        self._log_thread = threading.Thread(target=self._pump, args=(self.proc.stdout, log), daemon=True)
        self._log_thread.start()
        self.started_at = now()
        self.started_mono = time.monotonic()
        self.state = {"running": {"startedAt": self.started_at}}
        self.started = "startupProbe" not in self.spec
        self.ready = False
        self._probe_due = {}
        self._probe_runs = {}
        if self.restarts == 0:
            self.pod.event("Pulled", f'Container image "{image}" already present on machine', container=self)
        self.pod.event("Created", f"Created container: {self.name}", container=self)
        self.pod.event("Started", f"Started container {self.name}", container=self)

    def stop(self, grace: float, reason: str = "") -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        if reason:
            self.pod.event("Killing", reason, container=self)
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=max(0.0, grace))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
        if self._log_thread is not None:
            self._log_thread.join(timeout=5)

    def reap(self) -> bool:
        """True when the process has exited (state set to terminated)."""
        if self.proc is None or self.proc.poll() is None:
            return False
        code = self.proc.returncode
        if code < 0:
            code = 128 - code  # killed by a signal: 128 + signo, as the runtime reports
        if self._log_thread is not None:
            self._log_thread.join(timeout=5)
        self.proc = None
        self.exit_code = code
        self.ready = False
        self.state = {"terminated": {
            "exitCode": code, "reason": "Completed" if code == 0 else "Error",
            "startedAt": self.started_at, "finishedAt": now(),
            "containerID": f"containerd://{hashlib.sha256(f'{self.pod.uid}/{self.name}/{self.restarts}'.encode()).hexdigest()}",
        }}
        return True

    # -- probes

    def probe_step(self) -> bool:
        """Run the probes that are due; True when the container must be restarted."""
        if self.proc is None:
            return False
        now_ = time.monotonic()
        kinds = ["startupProbe"] if not self.started else ["livenessProbe", "readinessProbe"]
        if self.started and "readinessProbe" not in self.spec:
            self.ready = True
        for kind in kinds:
            probe = self.spec.get(kind)
            if not probe:
                continue
            due = self._probe_due.get(kind)
            if due is None:
                due = self.started_mono + float(probe.get("initialDelaySeconds", 0))
                self._probe_due[kind] = due
            if now_ < due:
                continue
            self._probe_due[kind] = now_ + float(probe.get("periodSeconds", 10))
            ok, detail = self.pod.run_probe(self, probe)
            succ, fail = self._probe_runs.get(kind, (0, 0))
            succ, fail = (succ + 1, 0) if ok else (0, fail + 1)
            self._probe_runs[kind] = (succ, fail)
            label = {"startupProbe": "Startup", "livenessProbe": "Liveness", "readinessProbe": "Readiness"}[kind]
            if not ok:
                self.pod.event("Unhealthy", f"{label} probe failed: {detail}", warning=True, container=self)
            if kind == "startupProbe":
                if succ >= 1:
                    self.started = True
                    self._probe_due.pop("livenessProbe", None)
                    self._probe_due.pop("readinessProbe", None)
                elif fail >= int(probe.get("failureThreshold", 3)):
                    self.pod.event("Killing", f"Container {self.name} failed startup probe, will be restarted", container=self)
                    return True
            elif kind == "livenessProbe":
                if fail >= int(probe.get("failureThreshold", 3)):
                    self.pod.event("Killing", f"Container {self.name} failed liveness probe, will be restarted", container=self)
                    return True
            else:
                if succ >= int(probe.get("successThreshold", 1)):
                    self.ready = True
                elif fail >= int(probe.get("failureThreshold", 3)):
                    self.ready = False
        return False

    def status(self) -> dict[str, Any]:
        image = self.spec.get("image", "")
        repo = image.split("@")[0]
        repo = repo.rsplit(":", 1)[0] if ":" in repo.rsplit("/", 1)[-1] else repo
        running = "running" in self.state
        out = {
            "name": self.name,
            "image": image,
            "imageID": f"{repo}@sha256:{hashlib.sha256(image.encode()).hexdigest()}",
            "ready": self.ready and running,
            "restartCount": self.restarts,
            "started": running and self.started,
            "state": copy.deepcopy(self.state),
            "lastState": copy.deepcopy(self.last_state),
        }
        if running or "terminated" in self.state:
            out["containerID"] = f"containerd://{hashlib.sha256(f'{self.pod.uid}/{self.name}/{self.restarts}'.encode()).hexdigest()}"
        return out


class PodWorker(threading.Thread):
    """Runs one pod until it ends or is deleted."""

    def __init__(self, kubelet: "ProcessKubelet", pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['name']}", daemon=True)
        self.kubelet = kubelet
        self.ns, self.pod_name, self.uid = meta.get("namespace", "default"), meta["name"], meta["uid"]
        self.pod = copy.deepcopy(pod)
        self.spec = self.pod.get("spec") or {}
        self.directory = Path(kubelet.config.state_dir) / "pods" / self.uid
        self.netns = ""
        self.ip = ""
        self.deleted = threading.Event()
        self.init_containers = [Container(self, c, init=True) for c in self.spec.get("initContainers") or []]
        self.containers = [Container(self, c) for c in self.spec.get("containers") or []]
        self.phase = "Pending"
        self.start_time = ""
        self._written: dict[str, Any] | None = None

    # -- helpers for containers

    @property
    def all_containers(self) -> list[Container]:
        return self.init_containers + self.containers

    def event(self, reason: str, message: str, *, warning: bool = False, container: Container | None = None) -> None:
        path = None
        if container is not None:
            path = f"spec.{'initContainers' if container.init else 'containers'}{{{container.name}}}"
        self.kubelet.event(self.pod, reason, message, warning=warning, field_path=path)

    def _security(self, container: Container) -> dict[str, Any]:
        pod_sc = self.spec.get("securityContext") or {}
        sc = {**pod_sc, **(container.spec.get("securityContext") or {})}
        return sc

    def _data(self, kind: str, name: str) -> dict[str, bytes] | None:
        """The decoded data of Secret (``kind`` "secret") or ConfigMap ("configmap") ``name``; None when absent."""
        if kind == "secret":
            obj = self.kubelet.store.get(SECRETS, self.ns, name)
            return None if obj is None else {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        obj = self.kubelet.store.get(CONFIGMAPS, self.ns, name)
        if obj is None:
            return None
        data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return data

    def _ref_data(self, kind: str, ref: dict[str, Any]) -> dict[str, bytes] | None:
        """The data a ``secretRef``/``configMapRef``-style reference names; None when it is optional and absent."""
        data = self._data(kind, ref.get("name", ""))
        if data is None and not ref.get("optional"):
            raise ConfigError("CreateContainerConfigError", f'{kind} "{ref.get("name")}" not found')
        return data

    def _key(self, kind: str, ref: dict[str, Any]) -> str | None:
        """The value of a ``secretKeyRef``/``configMapKeyRef``; None when it is optional and absent."""
        data = self._ref_data(kind, ref)
        if data is None:
            return None
        if ref.get("key") not in data:
            if ref.get("optional"):
                return None
            label = "Secret" if kind == "secret" else "ConfigMap"
            raise ConfigError("CreateContainerConfigError",
                              f"couldn't find key {ref.get('key')} in {label} {self.ns}/{ref.get('name')}")
        return data[ref["key"]].decode(errors="replace")

    def _field(self, path: str) -> str:
        meta = self.pod["metadata"]
        simple = {
            "metadata.name": meta.get("name", ""), "metadata.namespace": self.ns, "metadata.uid": self.uid,
            "spec.nodeName": self.spec.get("nodeName", ""), "spec.serviceAccountName": self.spec.get("serviceAccountName", "default"),
            "status.podIP": self.ip, "status.hostIP": self.kubelet.network.gateway,
        }
        if path in simple:
            return simple[path]
        m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if m:
            return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
        raise ConfigError("CreateContainerConfigError", f"unsupported fieldRef {path}")

    def _env(self, container: Container) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in container.spec.get("envFrom") or []:
            for key, kind in (("secretRef", "secret"), ("configMapRef", "configmap")):
                if key in source:
                    for k, v in (self._ref_data(kind, source[key]) or {}).items():
                        env[source.get("prefix", "") + k] = v.decode(errors="replace")
        for item in container.spec.get("env") or []:
            name = item.get("name", "")
            if "value" in item:
                env[name] = _expand(str(item["value"]), env)
                continue
            source = item.get("valueFrom") or {}
            ref_key = next((k for k in ("secretKeyRef", "configMapKeyRef") if k in source), None)
            if ref_key is not None:
                value = self._key("secret" if ref_key == "secretKeyRef" else "configmap", source[ref_key])
                if value is not None:
                    env[name] = value
            elif "fieldRef" in source:
                env[name] = self._field(source["fieldRef"].get("fieldPath", ""))
            else:
                env[name] = ""
        return env

    def container_spec(self, container: Container, image: dict[str, Any]) -> dict[str, Any]:
        """What container_init.py needs; raises ConfigError as CreateContainerConfigError."""
        sc = self._security(container)
        uid = sc.get("runAsUser", image.get("user"))
        gid = sc.get("runAsGroup")
        if sc.get("runAsNonRoot") and uid in (None, 0):
            if uid is None:
                raise ConfigError("CreateContainerConfigError", "container has runAsNonRoot and image will run as root "
                                  f"(pod: \"{self.pod_name}_{self.ns}({self.uid})\", container: {container.name})")
            raise ConfigError("CreateContainerConfigError", "container's runAsUser breaks non-root policy "
                              f"(pod: \"{self.pod_name}_{self.ns}({self.uid})\", container: {container.name})")
        user_env = self._env(container)
        try:
            home = pwd.getpwuid(uid if uid is not None else 0).pw_dir
        except KeyError:
            home = "/"
        env = {
            "PATH": ":".join([*image.get("path", []), "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]),
            "HOSTNAME": self.pod_name,
            "HOME": home,
            **(image.get("env") or {}),
        }
        if self.kubelet.config.api_port and self.spec.get("automountServiceAccountToken", True) is not False:
            env["KUBERNETES_SERVICE_HOST"] = "kubernetes.default.svc"  # a name the API's certificate holds
            env["KUBERNETES_SERVICE_PORT"] = str(self.kubelet.config.api_port)
        env.update(self._irsa(container))
        env.update(user_env)
        command = [_expand(a, env) for a in container.spec.get("command") or image.get("entrypoint", [])]
        args = [_expand(a, env) for a in container.spec.get("args") or ([] if container.spec.get("command") else image.get("cmd", []))]
        argv = command + args
        if not argv:
            raise ConfigError("CreateContainerConfigError", "no command specified")
        mounts = []
        volumes = {v.get("name"): v for v in self.spec.get("volumes") or []}
        for vm in container.spec.get("volumeMounts") or []:
            source = self.directory / "volumes" / vm.get("name", "")
            if vm.get("name") not in volumes and vm.get("name") != "kube-api-access":
                raise ConfigError("CreateContainerConfigError", f"volume {vm.get('name')} not found")
            if not source.exists():  # an optional volume whose source was absent
                source.mkdir(parents=True, exist_ok=True)
            kind = volumes.get(vm.get("name"), {})
            read_only = bool(vm.get("readOnly")) or any(k in kind for k in ("secret", "configMap", "projected"))
            mounts.append({"source": str(source), "target": vm.get("mountPath", ""), "read_only": read_only})
        if (self.directory / "volumes" / "kube-api-access").exists() and not any(
                m["target"] == _SA_DIR for m in mounts):
            mounts.append({"source": str(self.directory / "volumes" / "kube-api-access"), "target": _SA_DIR, "read_only": True})
        irsa = self.directory / "volumes" / "aws-iam-token"
        if irsa.exists():
            mounts.append({"source": str(irsa), "target": _IRSA_DIR, "read_only": True})
        groups = list(sc.get("supplementalGroups") or [])
        if (self.spec.get("securityContext") or {}).get("fsGroup") is not None:
            groups.append(int(self.spec["securityContext"]["fsGroup"]))
        self.write_hosts()
        mounts.append({"source": str(self.directory / "hosts"), "target": "/etc/hosts", "read_only": True})
        for bind in image.get("binds", []):
            mounts.append({"source": bind["source"], "target": bind["target"], "read_only": bind.get("read_only", True)})
        return {
            "root": str(self.directory / "rootfs" / container.name),
            "scratch": str(self.directory / "scratch" / container.name),
            "mounts": mounts,
            "files": {"/etc/hostname": self.pod_name + "\n",
                      "/etc/resolv.conf": "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"},
            "traversable": image.get("traversable", []),
            "read_only_root": bool(sc.get("readOnlyRootFilesystem")),
            "uid": uid,
            "gid": gid,
            "groups": groups,
            "working_dir": container.spec.get("workingDir") or image.get("working_dir") or "/",
            "argv": argv,
            "env": env,
        }

    def write_hosts(self) -> None:
        """The pod's /etc/hosts (bound into its containers; rewritten in place when Services change)."""
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback", f"{self.ip}\t{self.pod_name}"]
        lines += [f"{ip}\t{name}" for name, ip in self.kubelet.config.hosts.items()]
        if self.kubelet.config.api_port:
            lines.append(f"{self.kubelet.network.gateway}\tkubernetes.default.svc kubernetes.default kubernetes")
        for (ns, name), ip in sorted(self.kubelet.services.snapshot().items()):
            names = [f"{name}.{ns}.svc.cluster.local", f"{name}.{ns}.svc", f"{name}.{ns}"]
            if ns == self.ns:
                names.append(name)
            lines.append(f"{ip}\t{' '.join(names)}")
        path = self.directory / "hosts"
        with open(path, "w") as fh:  # in place: the bind mount follows the inode
            fh.write("\n".join(lines) + "\n")
        os.chmod(path, 0o644)

    def _irsa(self, container: Container) -> dict[str, str]:
        """What the EKS pod-identity webhook adds when the ServiceAccount names an IAM role."""
        sa = self.kubelet.store.get(SERVICEACCOUNTS, self.ns, self.spec.get("serviceAccountName") or "default")
        role = ((sa or {}).get("metadata", {}).get("annotations") or {}).get("eks.amazonaws.com/role-arn")
        if not role:
            return {}
        token = self.directory / "volumes" / "aws-iam-token"
        token.mkdir(parents=True, exist_ok=True)
        payload = base64.urlsafe_b64encode(json.dumps({"sub": f"system:serviceaccount:{self.ns}:{sa['metadata']['name']}",
                                                       "aud": ["sts.amazonaws.com"]}).encode()).decode().rstrip("=")
        (token / "token").write_text(f"eyJhbGciOiJSUzI1NiJ9.{payload}.{secrets.token_urlsafe(16)}")
        os.chmod(token / "token", 0o644)
        return {"AWS_ROLE_ARN": role, "AWS_WEB_IDENTITY_TOKEN_FILE": f"{_IRSA_DIR}/token",
                "AWS_STS_REGIONAL_ENDPOINTS": "regional"}

    # -- volumes

    def _write_files(self, target: Path, files: dict[str, bytes], mode: int, gid: int | None) -> None:
        target.mkdir(parents=True, exist_ok=True)
        os.chmod(target, 0o755)
        for rel, data in files.items():
            path = target / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            os.chown(path, 0, gid if gid is not None else 0)
            os.chmod(path, mode)

    def prepare_volumes(self) -> bool:
        """Materialise every volume; False (with a FailedMount event) while one cannot be."""
        gid = (self.spec.get("securityContext") or {}).get("fsGroup")
        base = self.directory / "volumes"
        for vol in self.spec.get("volumes") or []:
            name = vol.get("name", "")
            target = base / name
            if "emptyDir" in vol:
                target.mkdir(parents=True, exist_ok=True)
                os.chmod(target, 0o777)
                if gid is not None:
                    os.chown(target, 0, int(gid))
                    os.chmod(target, 0o2777)
                continue
            if "secret" in vol or "configMap" in vol:
                is_secret = "secret" in vol
                src = vol["secret"] if is_secret else vol["configMap"]
                ref = src.get("secretName") if is_secret else src.get("name")
                kind = "secret" if is_secret else "configmap"
                data = self._data(kind, ref)
                if data is None:
                    if src.get("optional"):
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    self.event("FailedMount", f'MountVolume.SetUp failed for volume "{name}" : {kind} "{ref}" not found', warning=True)
                    return False
                mode = int(src.get("defaultMode", 0o644))
                files: dict[str, bytes] = {}
                if src.get("items"):
                    for item in src["items"]:
                        if item.get("key") not in data:
                            if src.get("optional"):
                                continue
                            self.event("FailedMount", f'MountVolume.SetUp failed for volume "{name}" : '
                                       f"references non-existent {kind} key: {item.get('key')}", warning=True)
                            return False
                        files[item.get("path", item["key"])] = data[item["key"]]
                else:
                    files = data
                if target.exists():
                    shutil.rmtree(target)
                self._write_files(target, files, mode, int(gid) if gid is not None else None)
                continue
            if "projected" in vol:
                files = {}
                for source in vol["projected"].get("sources") or []:
                    if "serviceAccountToken" in source:
                        files[source["serviceAccountToken"].get("path", "token")] = self.kubelet.token_for(self).encode()
                    elif "configMap" in source and source["configMap"].get("name") == "kube-root-ca.crt":
                        files["ca.crt"] = self.kubelet.ca_pem()
                    elif "downwardAPI" in source:
                        files["namespace"] = self.ns.encode()
                self._write_files(target, files, int(vol["projected"].get("defaultMode", 0o644)), None)
                continue
        if self.spec.get("automountServiceAccountToken", True) is not False and self.kubelet.config.api_port:
            self._write_files(base / "kube-api-access", {
                "token": self.kubelet.token_for(self).encode(), "ca.crt": self.kubelet.ca_pem(),
                "namespace": self.ns.encode()}, 0o644, None)
        return True

    # -- probes

    def _port(self, container: Container, port: Any) -> int:
        if isinstance(port, int) or (isinstance(port, str) and port.isdigit()):
            return int(port)
        for p in container.spec.get("ports") or []:
            if p.get("name") == port:
                return int(p["containerPort"])
        raise ValueError(f"port {port!r} not found")

    def run_probe(self, container: Container, probe: dict[str, Any]) -> tuple[bool, str]:
        """(success, failure detail in the words a kubelet uses)."""
        timeout = float(probe.get("timeoutSeconds", 1))
        if "httpGet" in probe:
            get = probe["httpGet"]
            path, host = get.get("path", "/"), get.get("host") or self.ip
            try:
                port = self._port(container, get.get("port"))
            except ValueError as exc:
                return False, str(exc)
            url = f"http://{host}:{port}{path}"
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
            try:
                headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
                headers.setdefault("User-Agent", "kube-probe/1.34")
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
                resp.read()
            except ConnectionRefusedError:
                return False, f'Get "{url}": dial tcp {host}:{port}: connect: connection refused'
            except (TimeoutError, socket.timeout):
                return False, f'Get "{url}": context deadline exceeded (Client.Timeout exceeded while awaiting headers)'
            except (OSError, http.client.HTTPException) as exc:
                return False, f'Get "{url}": {exc or type(exc).__name__}'
            finally:
                conn.close()
            if 200 <= resp.status < 400:
                return True, ""
            return False, f"HTTP probe failed with statuscode: {resp.status}"
        if "tcpSocket" in probe:
            try:
                port = self._port(container, probe["tcpSocket"].get("port"))
                with socket.create_connection((self.ip, port), timeout=timeout):
                    return True, ""
            except ValueError as exc:
                return False, str(exc)
            except OSError as exc:
                return False, f"dial tcp {self.ip}:{probe['tcpSocket'].get('port')}: {exc.strerror or exc}"
        if "exec" in probe:
            argv = probe["exec"].get("command") or []
            if container.proc is None:
                return False, "container not running"
            try:
                result = subprocess.run(["nsenter", "-t", str(container.proc.pid), "-m", "-n", "-S", "follow", "-G", "follow",
                                         "--", *argv], capture_output=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                return False, f"command {argv!r} timed out"
            if result.returncode == 0:
                return True, ""
            return False, f"command {argv!r} exited with {result.returncode}: {result.stdout.decode(errors='replace')[-200:]}"
        return False, "probe has no handler"

    # -- the pod's life

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # the emulator log shows it; the pod is marked failed
            import traceback

            self.kubelet.errors.append(traceback.format_exc())
            print(f"kubelet: pod {self.ns}/{self.pod_name} failed: {exc!r}", flush=True)
        finally:
            self._teardown()

    def _run(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o755)
        while not self.deleted.is_set():
            if self.prepare_volumes():
                break
            self.write_status()
            self.deleted.wait(2.0)
        if self.deleted.is_set():
            return
        self.netns, self.ip = self.kubelet.network.add_pod()
        self.start_time = now()
        policy = self.spec.get("restartPolicy", "Always")
        for c in self.init_containers:
            if not self._run_to_completion(c, policy):
                return
        for c in self.containers:
            c.state = {"waiting": {"reason": "ContainerCreating"}}
        self.phase = "Running"
        while not self.deleted.is_set():
            for c in self.containers:
                self._step(c, policy)
            if policy != "Always" and all("terminated" in c.state for c in self.containers):
                codes = [c.exit_code or 0 for c in self.containers]
                self.phase = "Succeeded" if all(code == 0 for code in codes) else "Failed"
                self.write_status()
                return
            self.write_status()
            self.deleted.wait(0.25)

    def _run_to_completion(self, c: Container, policy: str) -> bool:
        while not self.deleted.is_set():
            if c.proc is None and "terminated" not in c.state:
                if time.monotonic() >= c.next_start:
                    c.start()
            elif c.reap():
                if c.exit_code == 0:
                    self.write_status()
                    return True
                if policy == "Never":
                    self.phase = "Failed"
                    self.write_status()
                    return False
                c.last_state, c.restarts = c.state, c.restarts + 1
                c.next_start = time.monotonic() + self._backoff(c)
                c.state = {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off restarting failed container"}}
            self.write_status()
            self.deleted.wait(0.25)
        return False

    def _backoff(self, c: Container) -> float:
        base = self.kubelet.config.backoff_seconds
        return 0.0 if c.restarts <= 1 else min(300.0, base * 2 ** (c.restarts - 2))

    def _step(self, c: Container, policy: str) -> None:
        if c.proc is None:
            if "terminated" in c.state and not c.restart_pending:
                return
            if time.monotonic() >= c.next_start:
                c.restart_pending = False
                c.start()
            return
        if c.reap():
            restart = policy == "Always" or (policy == "OnFailure" and c.exit_code != 0)
            if not restart:
                return
            c.last_state = c.state
            c.restarts += 1
            c.restart_pending = True
            delay = self._backoff(c)
            c.next_start = time.monotonic() + delay
            if delay > 0:
                c.state = {"waiting": {"reason": "CrashLoopBackOff",
                                       "message": f"back-off {int(delay)}s restarting failed container={c.name} "
                                                  f"pod={self.pod_name}_{self.ns}({self.uid})"}}
                self.event("BackOff", f"Back-off restarting failed container {c.name} in pod {self.pod_name}_{self.ns}({self.uid})",
                           warning=True, container=c)
            return
        if c.probe_step():
            c.stop(self._grace())
            c.reap()
            c.last_state = c.state
            c.restarts += 1
            c.restart_pending = True
            c.next_start = time.monotonic()

    def _grace(self) -> float:
        grace = float(self.spec.get("terminationGracePeriodSeconds", 30))
        return min(grace, self.kubelet.config.max_grace_seconds)

    def _teardown(self) -> None:
        grace = self._grace()
        for c in self.all_containers:
            if c.proc is not None:
                c.stop(grace, f"Stopping container {c.name}" if self.deleted.is_set() else "")
                c.reap()
        if self.netns:
            self.kubelet.network.remove_pod(self.netns)
        if not self.deleted.is_set():
            self.write_status()

    # -- status

    def write_status(self) -> None:
        ready = self.phase == "Running" and all(c.ready and "running" in c.state for c in self.containers)
        initialized = all("terminated" in c.state and c.exit_code == 0 for c in self.init_containers)
        phase = self.phase
        if phase == "Running" and not any(c.started_at for c in self.containers):
            phase = "Pending"  # no container has started yet (config error, image pull, back-off)
        status: dict[str, Any] = {"phase": phase, "hostIP": self.kubelet.network.gateway,
                                  "hostIPs": [{"ip": self.kubelet.network.gateway}]}
        if self.ip:
            status["podIP"] = self.ip
            status["podIPs"] = [{"ip": self.ip}]
        if self.start_time:
            status["startTime"] = self.start_time
        if self.init_containers:
            status["initContainerStatuses"] = [c.status() for c in self.init_containers]
        status["containerStatuses"] = [c.status() for c in self.containers]
        unready = [c.name for c in self.containers if not (c.ready and "running" in c.state)]
        terminal = self.phase in ("Succeeded", "Failed")
        reason = "PodCompleted" if terminal else ("ContainersNotReady" if unready else "")
        message = "" if terminal or not unready else f"containers with unready status: [{' '.join(unready)}]"
        self.kubelet.write_status(self, status, ready=ready, initialized=initialized or not self.init_containers,
                                  sandbox=bool(self.ip), reason=reason, message=message)


class ProcessKubelet:
    """Pod workers, the pod network, the host relay and the ALB of one emulator."""

    def __init__(self, store: Store, config: KubeletConfig, *, record: Callable[..., None],
                 conditions: Callable[..., list[dict]], ca_pem: bytes = b"",
                 token_for: Callable[[str, str], str] | None = None) -> None:
        self.store = store
        self.config = config
        self._record = record
        self._conditions = conditions
        self._ca_pem = ca_pem
        self._token_for = token_for
        self.network = PodNetwork(config.prefix, config.subnet)
        self.relay = HostRelay(self.network.gateway, list(config.host_ports), list(config.udp_ports))
        self.services = ServiceProxy(self.network)
        self._service_map: dict | None = None
        self.workers: dict[str, PodWorker] = {}
        self.errors: list[str] = []
        self.alb: Any = None
        self._lock = threading.Lock()

    def start(self) -> None:
        Path(self.config.state_dir).mkdir(parents=True, exist_ok=True)
        self.network.start()
        self.relay.start()
        if self.config.alb:
            from .alb import LoadBalancer

            host = self.config.alb.get("host", "127.0.0.1")
            if ipaddress.ip_address(host) in self.network.subnet:  # a VPC address: reachable from pods and the host
                subprocess.run(["ip", "addr", "add", f"{host}/32", "dev", self.network.bridge], capture_output=True)

            self.alb = LoadBalancer(host=self.config.alb.get("host", "127.0.0.1"), https_port=int(self.config.alb["https_port"]),
                                    http_port=self.config.alb.get("http_port"),
                                    cert_file=self.config.alb["cert"], key_file=self.config.alb["key"],
                                    interval=float(self.config.alb.get("interval", 1.0)))
            self.alb.start()
        print(f"kubelet: pods run in namespaces {self.config.prefix}-* on {self.config.subnet} "
              f"(gateway {self.network.gateway}, relayed ports {self.config.host_ports})", flush=True)

    def stop(self) -> None:
        with self._lock:
            workers = list(self.workers.values())
        for w in workers:
            w.deleted.set()
        for w in workers:
            w.join(timeout=self.config.max_grace_seconds + 15)
        if self.alb is not None:
            self.alb.stop()
        self.services.stop()
        self.relay.stop()
        self.network.stop()

    # -- called by the controllers, under the store lock

    def sync(self, pods: list[dict[str, Any]]) -> None:
        """Start workers for new scheduled pods; stop those of pods that are gone."""
        live = set()
        for pod in pods:
            meta = pod.get("metadata") or {}
            uid = meta.get("uid", "")
            live.add(uid)
            if meta.get("deletionTimestamp") or not (pod.get("spec") or {}).get("nodeName"):
                continue
            if uid not in self.workers and (pod.get("status") or {}).get("phase", "Pending") not in ("Succeeded", "Failed"):
                worker = PodWorker(self, pod)
                with self._lock:
                    self.workers[uid] = worker
                worker.start()
        with self._lock:
            for uid, worker in list(self.workers.items()):
                if uid not in live:
                    worker.deleted.set()
                if not worker.is_alive() and uid not in live:
                    del self.workers[uid]
        self._sync_services()

    def _sync_services(self) -> None:
        """ClusterIP Services → the service proxy; pods' /etc/hosts follow new names."""
        wanted: dict[tuple[str, str], dict[int, list[tuple[str, int]]]] = {}
        for svc in self.store.iter_refs(SERVICES):
            meta, spec = svc.get("metadata") or {}, svc.get("spec") or {}
            if not spec.get("selector") or spec.get("clusterIP") == "None":
                continue
            key = (meta.get("namespace", "default"), meta.get("name", ""))
            ep = self.store.get(ENDPOINTS, *key) or {}
            ports: dict[int, list[tuple[str, int]]] = {}
            for port in spec.get("ports") or []:
                targets = []
                for subset in ep.get("subsets") or []:
                    eps = subset.get("ports") or []
                    chosen = next((p for p in eps if p.get("name") == port.get("name")), eps[0] if len(eps) == 1 else None)
                    if chosen is not None:
                        targets += [(a["ip"], int(chosen["port"])) for a in subset.get("addresses") or []]
                ports[int(port.get("port"))] = sorted(targets)
            wanted[key] = ports
        if wanted == self._service_map:
            return
        self._service_map = wanted
        if self.services.update(wanted):
            for worker in list(self.workers.values()):
                if worker.ip:
                    worker.write_hosts()

    # -- used by pod workers

    def event(self, pod: dict[str, Any], reason: str, message: str, *, warning: bool = False, field_path: str | None = None) -> None:
        with self.store.lock:
            current = self.store.get(PODS, pod["metadata"].get("namespace"), pod["metadata"]["name"])
            if current is None or current["metadata"].get("uid") != pod["metadata"]["uid"]:
                return
            self._record(PODS, current, reason, message, warning=warning, field_path=field_path)

    def write_status(self, worker: PodWorker, status: dict[str, Any], *, ready: bool, initialized: bool,
                     sandbox: bool, reason: str, message: str) -> None:
        with self.store.lock:
            current = self.store.get(PODS, worker.ns, worker.pod_name)
            if current is None or current["metadata"].get("uid") != worker.uid:
                return
            old = (current.get("status") or {}).get("conditions") or []
            conditions = self._conditions(old, ready=ready, reason=reason, message=message)
            for cond in conditions:
                if cond["type"] == "PodReadyToStartContainers":
                    cond["status"] = "True" if sandbox else "False"
                if cond["type"] == "Initialized":
                    cond["status"] = "True" if initialized else "False"
            status["conditions"] = conditions
            if status.get("phase") == "Pending" and not status.get("containerStatuses"):
                status.pop("containerStatuses", None)
            if current.get("status") != status:
                changed = copy.deepcopy(current)
                changed["status"] = status
                self.store.update(PODS, changed)

    def token_for(self, worker: PodWorker) -> str:
        if self._token_for is not None:
            return self._token_for(worker.ns, worker.spec.get("serviceAccountName") or "default")
        return self.config.token

    def ca_pem(self) -> bytes:
        return self._ca_pem

    # -- logs and port-forward, for the API

    def pod_ip(self, uid: str) -> str | None:
        """The pod's IP while its sandbox runs (port-forward's target); None before it has one and once it ended."""
        worker = self.workers.get(uid)
        if worker is None or not worker.is_alive() or worker.deleted.is_set() or worker.phase in ("Succeeded", "Failed"):
            return None
        return worker.ip or None

    def knows(self, uid: str) -> bool:
        return uid in self.workers

    def log_lines(self, uid: str, container: str, *, previous: bool) -> list[tuple[str, str]] | None:
        """(timestamp, line) of a container's current or previous run; None when unknown."""
        worker = self.workers.get(uid)
        if worker is None:
            return None
        c = next((c for c in worker.all_containers if c.name == container), None)
        if c is None:
            return None
        run = c.restarts - 1 if previous else c.restarts
        if "running" not in c.state and "terminated" not in c.state and not previous:
            run = c.restarts - 1  # waiting to restart: the last run's log, as kubectl shows it
        path = c.log_path(run) if run >= 0 else None
        if path is None or not path.exists():
            return []
        out = []
        for raw in path.read_text(errors="replace").splitlines():
            stamp, _, line = raw.partition(" ")
            out.append((stamp, line))
        return out
