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
``POST /_emulator/crashloop`` ``{"deployment", "namespace"?, "crashloop": true,
                              "new_pods_only"?}``: its pods crash-loop
                              (CrashLoopBackOff, restarts); with
                              ``new_pods_only`` pods already Ready keep
                              running (a bad new version: the old ReplicaSet
                              serves, a rollback recovers)
``POST /_emulator/logs``      ``{"text", "deployment"|"job"|"pod", "namespace"?,
                              "container"?, "previous"?}``: container log text
``POST /_emulator/ingress``   ``{"hostname": str|null, "name"?, "namespace"?}``:
                              the load-balancer hostname written to Ingress
                              status; null leaves the status to the test
``POST /_emulator/jobs``      ``{"fail": true, "name"?, "namespace"?}``: Jobs
                              (all, or one by name) fail (BackoffLimitExceeded)
``POST /_emulator/timing``    ``{"pod_start_seconds", "pod_ready_seconds",
                              "job_seconds", "restart_seconds"}``
``POST /_emulator/faults``    ``{"status", "count"?, "path_regex"?, "query_regex"?,
                              "methods"?, "retry_after"?, "message"?}``: the
                              next ``count`` matching API requests (default 1;
                              null or -1: until cleared) fail as a real API
                              server fails them — a ``metav1.Status`` body
                              (reason InternalError / TooManyRequests /
                              ServiceUnavailable / Timeout ...) and, for 429
                              and 503 or when ``retry_after`` is given, a
                              ``Retry-After`` header (429 default: 1 s).
                              ``path_regex``/``query_regex`` are searched in
                              the path / the query string; ``methods`` is a
                              list (default: all). ``{"clear": true}`` removes
                              every fault. ``/_emulator``, ``/healthz``,
                              ``/livez`` and ``/readyz`` are never failed.
``GET  /_emulator/objects``   ``?kind=Deployment&namespace=ns``: the stored objects
``GET  /_emulator/requests``  the API requests seen (method, path, query, types,
                              user, status)
``POST /_emulator/token``     ``{"namespace", "serviceaccount"}``: a bearer token
                              for that (existing) ServiceAccount; RBAC applies
                              to it (rbac.py). ``/_emulator`` itself answers
                              only the admin token.
==========================  =====================================================
"""

from __future__ import annotations

import copy
import re
import threading
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Knobs", "DEFAULT_INGRESS_HOSTNAME", "Target", "Fault", "FaultAnswer"]

DEFAULT_INGRESS_HOSTNAME = "k8s-mlplatform-mlflow-0123456789.us-west-2.elb.amazonaws.com"

#: (namespace or None for any, name)
Target = tuple[str | None, str]


def _lookup(table: dict, namespace: str | None, name: str | None) -> Any:
    if name is None:
        return None
    if (namespace, name) in table:
        return table[(namespace, name)]
    return table.get((None, name))


#: Status reason and message of a failed API request, per HTTP code (as kube-apiserver words them).
_FAULT_REASONS: dict[int, tuple[str, str]] = {
    400: ("BadRequest", "the server rejected our request for an unknown reason"),
    401: ("Unauthorized", "Unauthorized"),
    403: ("Forbidden", "forbidden: emulated fault"),
    404: ("NotFound", "the server could not find the requested resource"),
    409: ("Conflict", "the object has been modified; please apply your changes to the latest version and try again"),
    429: ("TooManyRequests", "Too many requests, please try again later."),
    500: ("InternalError", "Internal error occurred: emulated fault"),
    502: ("InternalError", "an error on the server (\"bad gateway\") has prevented the request from succeeding"),
    503: ("ServiceUnavailable", "the server is currently unable to handle the request"),
    504: ("Timeout", "the server was unable to return a response in the time allotted, but may still be processing the request"),
}


@dataclass
class Fault:
    """One injected API failure rule (see ``POST /_emulator/faults``)."""

    status: int
    remaining: int | None  # None: until cleared
    path_regex: str | None = None
    query_regex: str | None = None
    methods: frozenset[str] | None = None
    retry_after: int | None = None
    message: str | None = None
    served: int = 0

    def matches(self, method: str, path: str, query: str) -> bool:
        if self.remaining is not None and self.remaining <= 0:
            return False
        if self.methods is not None and method.upper() not in self.methods:
            return False
        if self.path_regex is not None and not re.search(self.path_regex, path):
            return False
        if self.query_regex is not None and not re.search(self.query_regex, query):
            return False
        return True

    def answer(self) -> "FaultAnswer":
        reason, default_message = _FAULT_REASONS.get(self.status, ("InternalError", f"emulated fault {self.status}"))
        body: dict[str, Any] = {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message or default_message, "reason": reason, "code": self.status,
        }
        headers: dict[str, str] = {}
        retry_after = self.retry_after
        if retry_after is None and self.status == 429:
            retry_after = 1
        if retry_after is not None:
            headers["Retry-After"] = str(int(retry_after))
            body["details"] = {"retryAfterSeconds": int(retry_after)}
        elif self.status == 500:
            body["details"] = {"causes": [{"message": self.message or "emulated fault"}]}
        return FaultAnswer(self.status, body, headers)

    def describe(self) -> dict[str, Any]:
        return {
            "status": self.status, "remaining": self.remaining, "served": self.served,
            "path_regex": self.path_regex, "query_regex": self.query_regex,
            "methods": sorted(self.methods) if self.methods is not None else None,
            "retry_after": self.retry_after, "message": self.message,
        }


@dataclass(frozen=True)
class FaultAnswer:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]


#: Paths a fault never touches: the control API and the health probes.
_NEVER_FAULTED = re.compile(r"^/(_emulator(/|$)|healthz$|livez$|readyz$)")


@dataclass
class Knobs:
    """All knob state; methods are thread-safe."""

    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    #: deployment -> {"deadline_seconds": float | None}
    stuck: dict[Target, dict[str, Any]] = field(default_factory=dict)
    crashloop: set[Target] = field(default_factory=set)
    #: crash-looping deployments whose Ready pods are spared (``new_pods_only``)
    crashloop_new_only: set[Target] = field(default_factory=set)
    #: injected API failures, first match wins
    faults: list[Fault] = field(default_factory=list)
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
                "stuck", "crashloop", "crashloop_new_only", "faults", "logs", "ingress_hostname", "ingress_overrides",
                "fail_all_jobs",
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

    def crashloop_spares_ready(self, namespace: str, deployment: str | None) -> bool:
        """Whether Ready pods of a crash-looping deployment keep running (``new_pods_only``)."""
        with self.lock:
            return deployment is not None and (
                (namespace, deployment) in self.crashloop_new_only or (None, deployment) in self.crashloop_new_only
            )

    def take_fault(self, method: str, path: str, query: str) -> FaultAnswer | None:
        """The failure to answer this request with, if an injected fault matches (and is used up by one)."""
        if _NEVER_FAULTED.match(path):
            return None
        with self.lock:
            for fault in self.faults:
                if fault.matches(method, path, query):
                    if fault.remaining is not None:
                        fault.remaining -= 1
                    fault.served += 1
                    return fault.answer()
        return None

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
                "crashloop_new_only": sorted(key(k) for k in self.crashloop_new_only),
                "faults": [f.describe() for f in self.faults],
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
                    if body.get("new_pods_only"):
                        self.crashloop_new_only.add(target)
                    else:
                        self.crashloop_new_only.discard(target)
                else:
                    self.crashloop.discard(target)
                    self.crashloop_new_only.discard(target)
            elif action == "faults":
                self._apply_fault(body)
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


    def _apply_fault(self, body: dict[str, Any]) -> None:
        if body.get("clear"):
            self.faults.clear()
            return
        status = body.get("status")
        if not isinstance(status, int) or isinstance(status, bool) or not 400 <= status <= 599:
            raise ValueError("faults needs an integer 'status' between 400 and 599")
        count = body.get("count", 1)
        if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count == 0 or count < -1):
            raise ValueError("'count' must be a positive integer, or null / -1 for 'until cleared'")
        for name in ("path_regex", "query_regex"):
            if body.get(name) is not None:
                try:
                    re.compile(body[name])
                except (re.error, TypeError) as exc:
                    raise ValueError(f"{name!r} is not a regular expression: {exc}") from None
        methods = body.get("methods")
        if methods is not None:
            if isinstance(methods, str):
                methods = [methods]
            if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
                raise ValueError("'methods' must be a list of HTTP methods")
            methods = frozenset(m.upper() for m in methods)
        retry_after = body.get("retry_after")
        if retry_after is not None and (not isinstance(retry_after, (int, float)) or retry_after < 0):
            raise ValueError("'retry_after' must be a number of seconds >= 0")
        self.faults.append(Fault(
            status=status, remaining=None if count in (None, -1) else count,
            path_regex=body.get("path_regex"), query_regex=body.get("query_regex"), methods=methods,
            retry_after=int(retry_after) if retry_after is not None else None, message=body.get("message"),
        ))


def _required(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"missing {name!r}")
    return value
