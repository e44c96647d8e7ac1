"""Test knobs: how the fake controllers misbehave, and the ``/_emulator`` control API.

A knob names its target by (namespace, name); a namespace of ``None``
matches the name in every namespace. The control API is JSON over the same
HTTPS port and bearer token as the Kubernetes API:

==========================  =====================================================
``GET  /_emulator/health``    ``{"ok": true}``
``GET  /_emulator/knobs``     the current knobs
``POST /_emulator/reset``     knobs back to defaults; ``{"objects": true}`` also
                              empties the store (default namespaces come back)
``POST /_emulator/stuck``     ``{"deployment", "namespace"?, "stuck": true,
                              "deadline_seconds"?}``: new pods never get Ready;
                              after ``deadline_seconds`` (default: the
                              Deployment's ``progressDeadlineSeconds``, 600)
                              Progressing turns False/ProgressDeadlineExceeded
``POST /_emulator/crashloop`` ``{"deployment", "namespace"?, "crashloop": true}``:
                              its pods crash-loop (CrashLoopBackOff, restarts)
``POST /_emulator/logs``      ``{"text", "deployment"|"job"|"pod", "namespace"?,
                              "container"?, "previous"?}``: container log text
``POST /_emulator/ingress``   ``{"hostname": str|null, "name"?, "namespace"?}``:
                              the load-balancer hostname written to Ingress
                              status; null leaves the status to the test
``POST /_emulator/jobs``      ``{"fail": true, "name"?, "namespace"?}``: Jobs
                              (all, or one by name) fail (BackoffLimitExceeded)
``POST /_emulator/timing``    ``{"pod_start_seconds", "pod_ready_seconds",
                              "job_seconds", "restart_seconds"}``
``GET  /_emulator/objects``   ``?kind=Deployment&namespace=ns``: the stored objects
``GET  /_emulator/requests``  the API requests seen (method, path, query, types)
==========================  =====================================================
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Knobs", "DEFAULT_INGRESS_HOSTNAME", "Target"]

DEFAULT_INGRESS_HOSTNAME = "k8s-mlplatform-mlflow-0123456789.us-west-2.elb.amazonaws.com"

#: (namespace or None for any, name)
Target = tuple[str | None, str]


def _lookup(table: dict, namespace: str | None, name: str | None) -> Any:
    if name is None:
        return None
    if (namespace, name) in table:
        return table[(namespace, name)]
    return table.get((None, name))


@dataclass
class Knobs:
    """All knob state; methods are thread-safe."""

    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    #: deployment -> {"deadline_seconds": float | None}
    stuck: dict[Target, dict[str, Any]] = field(default_factory=dict)
    crashloop: set[Target] = field(default_factory=set)
    #: (owner kind "deployment"|"job"|"pod", namespace, name, container, previous) -> text
    logs: dict[tuple[str, str | None, str, str | None, bool], str] = field(default_factory=dict)
    ingress_hostname: str | None = DEFAULT_INGRESS_HOSTNAME
    ingress_overrides: dict[Target, str | None] = field(default_factory=dict)
    fail_all_jobs: bool = False
    failing_jobs: set[Target] = field(default_factory=set)
    pod_start_seconds: float = 0.05
    pod_ready_seconds: float = 0.3
    job_seconds: float = 0.5
    restart_seconds: float = 1.0

    def reset(self) -> None:
        with self.lock:
            fresh = Knobs()
            for name in (
                "stuck", "crashloop", "logs", "ingress_hostname", "ingress_overrides", "fail_all_jobs",
                "failing_jobs", "pod_start_seconds", "pod_ready_seconds", "job_seconds", "restart_seconds",
            ):
                setattr(self, name, getattr(fresh, name))

    # -- queries used by the controllers

    def stuck_for(self, namespace: str, deployment: str | None) -> dict[str, Any] | None:
        with self.lock:
            return _lookup(self.stuck, namespace, deployment)

    def crashlooping(self, namespace: str, deployment: str | None) -> bool:
        with self.lock:
            return deployment is not None and (
                (namespace, deployment) in self.crashloop or (None, deployment) in self.crashloop
            )

    def hostname_for(self, namespace: str, name: str) -> tuple[bool, str | None]:
        """``(managed, hostname)``: whether the controller writes the status, and what."""
        with self.lock:
            for key in ((namespace, name), (None, name)):
                if key in self.ingress_overrides:
                    value = self.ingress_overrides[key]
                    return value is not None, value
            return self.ingress_hostname is not None, self.ingress_hostname

    def job_fails(self, namespace: str, name: str | None) -> bool:
        with self.lock:
            return self.fail_all_jobs or (name is not None and (
                (namespace, name) in self.failing_jobs or (None, name) in self.failing_jobs
            ))

    def pod_fails(self, namespace: str, name: str) -> bool:
        """A bare pod (``helm test``) fails only when named by the jobs knob."""
        with self.lock:
            return (namespace, name) in self.failing_jobs or (None, name) in self.failing_jobs

    def log_text(self, namespace: str, owners: dict[str, str | None], container: str, previous: bool) -> str | None:
        """The knob text for a container; ``owners`` maps pod/deployment/job to names."""
        with self.lock:
            for kind in ("pod", "deployment", "job"):
                name = owners.get(kind)
                if name is None:
                    continue
                for ns in (namespace, None):
                    for c in (container, None):
                        text = self.logs.get((kind, ns, name, c, previous))
                        if text is not None:
                            return text
            return None

    # -- control API

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            def key(t: Target) -> str:
                return f"{t[0] or '*'}/{t[1]}"

            return {
                "stuck": {key(k): copy.deepcopy(v) for k, v in self.stuck.items()},
                "crashloop": sorted(key(k) for k in self.crashloop),
                "logs": [
                    {"kind": k[0], "namespace": k[1], "name": k[2], "container": k[3], "previous": k[4], "text": v}
                    for k, v in self.logs.items()
                ],
                "ingress_hostname": self.ingress_hostname,
                "ingress_overrides": {key(k): v for k, v in self.ingress_overrides.items()},
                "fail_all_jobs": self.fail_all_jobs,
                "failing_jobs": sorted(key(k) for k in self.failing_jobs),
                "timing": {
                    "pod_start_seconds": self.pod_start_seconds,
                    "pod_ready_seconds": self.pod_ready_seconds,
                    "job_seconds": self.job_seconds,
                    "restart_seconds": self.restart_seconds,
                },
            }

    def apply(self, action: str, body: dict[str, Any]) -> None:
        """Change knobs from a control API POST; raises ValueError on a bad body."""
        with self.lock:
            ns = body.get("namespace")
            if action == "stuck":
                target = (ns, _required(body, "deployment"))
                if body.get("stuck", True):
                    self.stuck[target] = {"deadline_seconds": body.get("deadline_seconds")}
                else:
                    self.stuck.pop(target, None)
            elif action == "crashloop":
                target = (ns, _required(body, "deployment"))
                if body.get("crashloop", True):
                    self.crashloop.add(target)
                else:
                    self.crashloop.discard(target)
            elif action == "logs":
                text = body.get("text")
                if not isinstance(text, str):
                    raise ValueError("logs needs a string 'text'")
                owners = [k for k in ("pod", "deployment", "job") if body.get(k)]
                if len(owners) != 1:
                    raise ValueError("logs needs exactly one of 'pod', 'deployment', 'job'")
                kind = owners[0]
                self.logs[(kind, ns, body[kind], body.get("container"), bool(body.get("previous")))] = text
            elif action == "ingress":
                hostname = body.get("hostname")
                if hostname is not None and not isinstance(hostname, str):
                    raise ValueError("'hostname' must be a string or null")
                if body.get("name"):
                    self.ingress_overrides[(ns, body["name"])] = hostname
                else:
                    self.ingress_hostname = hostname
            elif action == "jobs":
                fail = bool(body.get("fail", True))
                if body.get("name"):
                    target = (ns, body["name"])
                    if fail:
                        self.failing_jobs.add(target)
                    else:
                        self.failing_jobs.discard(target)
                else:
                    self.fail_all_jobs = fail
                    if not fail:
                        self.failing_jobs.clear()
            elif action == "timing":
                for name in ("pod_start_seconds", "pod_ready_seconds", "job_seconds", "restart_seconds"):
                    if name in body:
                        value = float(body[name])
                        if value < 0:
                            raise ValueError(f"{name} must be >= 0")
                        setattr(self, name, value)
            else:
                raise LookupError(action)


def _required(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"missing {name!r}")
    return value
