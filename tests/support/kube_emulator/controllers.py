"""Fake controllers and kubelet: what makes ``helm --wait`` finish.

One background thread reconciles everything under the store lock, woken by
every write and at least every 0.1 s (for the timed transitions below). Each
step writes only when something changes, so the loop settles.

- **Deployment** → one ReplicaSet per pod template (named
  ``<deployment>-<pod-template-hash>``, revision annotations as the real
  controller sets them); the newest gets ``spec.replicas`` and the old ones
  are scaled to 0 once the new pods are Ready (maxUnavailable 0 style, so a
  stuck rollout keeps the old pods serving). A template seen before (a
  rollback) reuses its ReplicaSet. Status: ``observedGeneration``,
  ``replicas``/``updatedReplicas``/``readyReplicas``/``availableReplicas``,
  conditions Available (MinimumReplicasAvailable) and Progressing
  (ReplicaSetUpdated → NewReplicaSetAvailable, or False with
  ProgressDeadlineExceeded after the deadline).
- **ReplicaSet** → pods from its template (Pending → scheduled → Running →
  Ready after ``pod_ready_seconds``), status with ``observedGeneration``.
- **Kubelet** → a pod owned by a ReplicaSet (or a bare pod with
  ``restartPolicy: Always``) runs and gets Ready; a pod owned by a Job, or a
  bare pod with ``restartPolicy`` Never/OnFailure (``helm test``), runs for
  ``job_seconds`` and Succeeds (Fails when a Job knob says so). Knobs: stuck
  (never Ready, Warning Unhealthy events), crash-loop (CrashLoopBackOff,
  restartCount growing, Warning BackOff events). containerStatuses carry
  every field the Python client requires (``imageID``, ``ready``,
  ``restartCount``, ``started``, ``state``).
- **Job** → one pod; Complete (``SuccessCriteriaMet`` + ``Complete``,
  ``succeeded: 1``) or Failed (``BackoffLimitExceeded``).
- **Service** → Endpoints with the Ready pods it selects; a LoadBalancer
  Service gets the load-balancer hostname.
- **Ingress** → ``status.loadBalancer.ingress[0].hostname`` from the knob.
- **PodDisruptionBudget**, **HorizontalPodAutoscaler** → status (the HPA
  also keeps the target's replicas within min/max).
- **Namespace** → a ``default`` ServiceAccount.

Events (core/v1) are recorded as the real components do (Scheduled, Pulled,
Created, Started, ScalingReplicaSet, SuccessfulCreate, Completed, BackOff,
Unhealthy, ...), with ``count`` raised for repeats.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import secrets
import threading
import time
import uuid
from typing import Any

from .admission import admit
from .knobs import Knobs
from .resources import resource_for_kind
from .store import Store, label_selector_from_spec, now

__all__ = ["Controllers", "seed", "pod_owners", "NODE_NAME"]

NODE_NAME = "ip-10-0-1-23.us-west-2.compute.internal"
_SAFE = "bcdfghjklmnpqrstvwxz2456789"

NAMESPACES = resource_for_kind("namespaces")
NODES = resource_for_kind("nodes")
PODS = resource_for_kind("pods")
EVENTS = resource_for_kind("events")
SERVICES = resource_for_kind("services")
ENDPOINTS = resource_for_kind("endpoints")
SERVICEACCOUNTS = resource_for_kind("serviceaccounts")
DEPLOYMENTS = resource_for_kind("deployments")
REPLICASETS = resource_for_kind("replicasets")
JOBS = resource_for_kind("jobs")
INGRESSES = resource_for_kind("ingresses")
PDBS = resource_for_kind("poddisruptionbudgets")
HPAS = resource_for_kind("horizontalpodautoscalers")


def _parse_time(stamp: str) -> float:
    import datetime as _dt

    return _dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _job_failed(reason: str, message: str) -> list[dict]:
    """A failed Job's conditions, as the job controller writes them (FailureTarget, then Failed)."""
    stamp = now()
    return [{"type": kind, "status": "True", "reason": reason, "message": message,
             "lastProbeTime": stamp, "lastTransitionTime": stamp} for kind in ("FailureTarget", "Failed")]


def _safe_encode(text: str) -> str:
    return "".join(_SAFE[b % len(_SAFE)] for b in text.encode())


def pod_template_hash(template: dict) -> str:
    """A stable hash of a pod template, spelled like the real one."""
    digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).digest()
    return _safe_encode(str(int.from_bytes(digest[:4], "big")))


def _rand_suffix(n: int = 5) -> str:
    return "".join(secrets.choice(_SAFE) for _ in range(n))


def _controller_ref(obj: dict) -> dict | None:
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return ref
    return None


def _owner_ref(owner: dict) -> dict:
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _meta(obj: dict) -> dict:
    return obj.setdefault("metadata", {})


def _ns(obj: dict) -> str:
    return _meta(obj).get("namespace") or ""


def _name(obj: dict) -> str:
    return _meta(obj)["name"]


def _uid(obj: dict) -> str:
    return _meta(obj)["uid"]


def _pod_ready(pod: dict) -> bool:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def _terminal(pod: dict) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def _scaled(value: Any, total: int, round_up: bool) -> int:
    if value is None:
        return 0
    if isinstance(value, str) and value.endswith("%"):
        amount = total * float(value[:-1]) / 100
        return math.ceil(amount) if round_up else math.floor(amount)
    return int(value)


def _condition(old_conditions: list[dict], ctype: str, status: str, reason: str, message: str, *, update_time: bool = False) -> dict:
    """A condition that keeps its timestamps while status/reason stay the same."""
    stamp = now()
    previous = next((c for c in old_conditions or [] if c.get("type") == ctype), None)
    cond = {"type": ctype, "status": status, "reason": reason, "message": message}
    if previous and previous.get("status") == status:
        cond["lastTransitionTime"] = previous.get("lastTransitionTime", stamp)
    else:
        cond["lastTransitionTime"] = stamp
    if update_time:
        same = previous and previous.get("status") == status and previous.get("reason") == reason
        cond["lastUpdateTime"] = previous.get("lastUpdateTime", stamp) if same else stamp
        cond = {"type": ctype, "status": status, "lastUpdateTime": cond["lastUpdateTime"],
                "lastTransitionTime": cond["lastTransitionTime"], "reason": reason, "message": message}
    return cond


def pod_owners(store: Store, pod: dict) -> dict[str, str | None]:
    """``{"pod", "replicaset", "deployment", "job"}`` names for a pod."""
    owners: dict[str, str | None] = {"pod": _name(pod), "replicaset": None, "deployment": None, "job": None}
    ref = _controller_ref(pod)
    if ref and ref.get("kind") == "ReplicaSet":
        owners["replicaset"] = ref.get("name")
        rs = store.get(REPLICASETS, _ns(pod), ref.get("name", ""))
        dref = _controller_ref(rs) if rs else None
        if dref and dref.get("kind") == "Deployment":
            owners["deployment"] = dref.get("name")
    elif ref and ref.get("kind") == "Job":
        owners["job"] = ref.get("name")
    return owners


def seed(store: Store) -> None:
    """What a fresh cluster has: the standard namespaces and one Ready node."""
    for name in ("default", "kube-system", "kube-public", "kube-node-lease"):
        if store.get(NAMESPACES, None, name) is None:
            store.create(NAMESPACES, admit(NAMESPACES, {"metadata": {"name": name}}))
    if store.get(NODES, None, NODE_NAME) is None:
        stamp = now()
        node = {
            "metadata": {
                "name": NODE_NAME,
                "labels": {
                    "kubernetes.io/hostname": NODE_NAME,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "topology.kubernetes.io/region": "us-west-2",
                    "topology.kubernetes.io/zone": "us-west-2a",
                    "node.kubernetes.io/instance-type": "m6i.xlarge",
                },
            },
            "spec": {"providerID": "aws:///us-west-2a/i-0123456789abcdef0"},
            "status": {
                "capacity": {"cpu": "4", "memory": "16064848Ki", "pods": "58"},
                "allocatable": {"cpu": "3920m", "memory": "15050000Ki", "pods": "58"},
                "conditions": [
                    {"type": t, "status": "False", "reason": r, "message": "", "lastHeartbeatTime": stamp, "lastTransitionTime": stamp}
                    for t, r in (("MemoryPressure", "KubeletHasSufficientMemory"), ("DiskPressure", "KubeletHasNoDiskPressure"), ("PIDPressure", "KubeletHasSufficientPID"))
                ]
                + [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet is posting ready status",
                    "lastHeartbeatTime": stamp, "lastTransitionTime": stamp}],
                "addresses": [{"type": "InternalIP", "address": "10.0.1.23"}, {"type": "Hostname", "address": NODE_NAME}],
                "nodeInfo": {
                    "architecture": "amd64",
                    "bootID": str(uuid.uuid4()),
                    "containerRuntimeVersion": "containerd://1.7.27",
                    "kernelVersion": "6.1.141-155.222.amzn2023.x86_64",
                    "kubeProxyVersion": "v1.34.2-eks-0000000",
                    "kubeletVersion": "v1.34.2-eks-0000000",
                    "machineID": secrets.token_hex(16),
                    "operatingSystem": "linux",
                    "osImage": "Amazon Linux 2023.8.20250808",
                    "systemUUID": str(uuid.uuid4()),
                },
            },
        }
        store.create(NODES, admit(NODES, node))


class Controllers:
    """The reconcile loop; see the module docstring."""

    def __init__(self, store: Store, knobs: Knobs, *, interval: float = 0.1) -> None:
        self.store = store
        self.kubelet: Any = None  # a kubelet.ProcessKubelet when pods run as processes
        self._last_routes: list | None = None
        self.knobs = knobs
        self.interval = interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._clock: dict[tuple[str, str], float] = {}  # (uid, mark) -> monotonic time
        self._rollout: dict[str, tuple[str, float]] = {}  # deployment uid -> (hash, start)
        self._completed: dict[str, str] = {}  # deployment uid -> hash whose rollout completed
        self._event_keys: dict[tuple[str, str, str], tuple[str, str]] = {}
        self._ips = itertools.count(10)
        self._ticks = 0
        self.errors: list[str] = []
        store.add_listener(self._wake.set)

    # -- loop

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="controllers", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Reconcile now (after a knob changed)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        import traceback

        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            try:
                with self.store.lock:
                    self.reconcile()
            except Exception:  # keep the loop alive; the log shows it
                text = traceback.format_exc()
                self.errors.append(text)
                print(f"controllers: reconcile failed:\n{text}", flush=True)
                time.sleep(self.interval)

    def reconcile(self) -> None:
        self._namespaces()
        self._hpas()
        self._deployments()
        self._replicasets()
        self._jobs()
        self._pods()
        self._endpoints()
        self._ingresses()
        self._load_balancers()
        self._pdbs()
        self._ticks += 1
        if self._ticks % 50 == 0:
            self._forget_gone()

    # -- helpers

    def _mark(self, uid: str, mark: str) -> float:
        """When ``mark`` was first reached for ``uid`` (set now if new)."""
        return self._clock.setdefault((uid, mark), time.monotonic())

    def _since(self, uid: str, mark: str) -> float:
        return time.monotonic() - self._mark(uid, mark)

    def _forget_gone(self) -> None:
        live = {_uid(o) for o in self.store.all_objects()}
        for key in [k for k in self._clock if k[0] not in live]:
            del self._clock[key]
        for table in (self._rollout, self._completed):
            for uid in [u for u in table if u not in live]:
                del table[uid]
        for key in [k for k in self._event_keys if k[0] not in live]:
            del self._event_keys[key]

    def _update(self, rt, obj: dict, *, bump: bool = False) -> dict:
        return self.store.update(rt, obj, bump_generation=bump)

    def _set_status(self, rt, obj: dict, status: dict) -> None:
        if obj.get("status") != status:
            changed = copy.deepcopy(obj)
            changed["status"] = status
            self.store.update(rt, changed)

    def record(self, rt, obj: dict, reason: str, message: str, *, warning: bool = False,
               component: str = "kubelet", field_path: str | None = None) -> None:
        """Record a core/v1 Event about ``obj`` (repeats raise ``count``)."""
        ns = _ns(obj) or "default"
        key = (_uid(obj), reason, message)
        stamp = now()
        if key in self._event_keys:
            ens, ename = self._event_keys[key]
            existing = self.store.get(EVENTS, ens, ename)
            if existing is not None:
                existing["count"] = existing.get("count", 1) + 1
                existing["lastTimestamp"] = stamp
                self.store.update(EVENTS, existing)
                return
        involved = {
            "apiVersion": rt.api_version,
            "kind": rt.kind,
            "name": _name(obj),
            "namespace": _ns(obj),
            "uid": _uid(obj),
            "resourceVersion": _meta(obj).get("resourceVersion", ""),
        }
        if field_path:
            involved["fieldPath"] = field_path
        name = f"{_name(obj)}.{secrets.token_hex(8)}"
        event = {
            "metadata": {"name": name, "namespace": ns},
            "involvedObject": involved,
            "reason": reason,
            "message": message,
            "source": {"component": component, **({"host": NODE_NAME} if component == "kubelet" else {})},
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
            "type": "Warning" if warning else "Normal",
            "reportingComponent": component,
            "reportingInstance": NODE_NAME if component == "kubelet" else "",
        }
        self.store.create(EVENTS, admit(EVENTS, event))
        self._event_keys[key] = (ns, name)

    def _owned(self, rt, owner: dict) -> list[dict]:
        uid = _uid(owner)
        ns = _ns(owner)
        return [
            copy.deepcopy(o)
            for o in self.store.iter_refs(rt)
            if _ns(o) == ns and (_controller_ref(o) or {}).get("uid") == uid
        ]

    # -- namespaces

    def _namespaces(self) -> None:
        for ns in self.store.iter_refs(NAMESPACES):
            name = _name(ns)
            if (ns.get("status") or {}).get("phase") != "Active":
                continue
            if self.store.get(SERVICEACCOUNTS, name, "default") is None:
                self.store.create(SERVICEACCOUNTS, admit(SERVICEACCOUNTS, {"metadata": {"name": "default", "namespace": name}}))

    # -- deployments

    def _deployments(self) -> None:
        for dep in [copy.deepcopy(d) for d in self.store.iter_refs(DEPLOYMENTS)]:
            self._deployment(dep)

    def _deployment(self, dep: dict) -> None:
        ns, name, uid = _ns(dep), _name(dep), _uid(dep)
        spec = dep.get("spec") or {}
        desired = int(spec.get("replicas", 1))
        template = spec.get("template") or {}
        phash = pod_template_hash(template)
        rss = self._owned(REPLICASETS, dep)

        def revision(rs: dict) -> int:
            try:
                return int((_meta(rs).get("annotations") or {}).get("deployment.kubernetes.io/revision", "0"))
            except ValueError:
                return 0

        max_rev = max((revision(rs) for rs in rss), default=0)
        new_rs = next((rs for rs in rss if (_meta(rs).get("labels") or {}).get("pod-template-hash") == phash), None)
        if self._rollout.get(uid, ("",))[0] != phash:
            self._rollout[uid] = (phash, time.monotonic())
        surge = _scaled(((spec.get("strategy") or {}).get("rollingUpdate") or {}).get("maxSurge"), desired, True)
        annotations = {
            "deployment.kubernetes.io/desired-replicas": str(desired),
            "deployment.kubernetes.io/max-replicas": str(desired + surge),
        }
        if spec.get("paused"):
            pass
        elif new_rs is None:
            rev = max_rev + 1
            labels = dict((template.get("metadata") or {}).get("labels") or {})
            labels["pod-template-hash"] = phash
            rs_template = copy.deepcopy(template)
            rs_template.setdefault("metadata", {})["labels"] = labels
            selector = copy.deepcopy(spec.get("selector") or {})
            selector.setdefault("matchLabels", {})["pod-template-hash"] = phash
            rs = {
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "metadata": {
                    "name": f"{name}-{phash}",
                    "namespace": ns,
                    "labels": labels,
                    "annotations": {**annotations, "deployment.kubernetes.io/revision": str(rev)},
                    "ownerReferences": [_owner_ref(dep)],
                },
                "spec": {
                    "replicas": desired,
                    "minReadySeconds": spec.get("minReadySeconds", 0),
                    "selector": selector,
                    "template": rs_template,
                },
            }
            _meta(rs)["uid"] = str(uuid.uuid4())
            if self.store.get(REPLICASETS, ns, _name(rs)) is not None:
                return  # a name collision with a foreign ReplicaSet: leave it
            new_rs = self.store.create(REPLICASETS, admit(REPLICASETS, rs))
            rss.append(new_rs)
            max_rev = rev
            self.record(DEPLOYMENTS, dep, "ScalingReplicaSet",
                        f"Scaled up replica set {_name(new_rs)} from 0 to {desired}", component="deployment-controller")
        else:
            changed = copy.deepcopy(new_rs)
            rs_ann = _meta(changed).setdefault("annotations", {})
            if revision(new_rs) != max_rev:  # an older template again: a rollback
                rs_ann["deployment.kubernetes.io/revision"] = str(max_rev + 1)
                max_rev += 1
            rs_ann.update(annotations)
            old_replicas = changed["spec"].get("replicas", 1)
            changed["spec"]["replicas"] = desired
            if changed != new_rs:
                new_rs = self._update(REPLICASETS, changed, bump=old_replicas != desired)
                if old_replicas != desired:
                    verb = "up" if desired > old_replicas else "down"
                    self.record(DEPLOYMENTS, dep, "ScalingReplicaSet",
                                f"Scaled {verb} replica set {_name(new_rs)} from {old_replicas} to {desired}",
                                component="deployment-controller")

        # the deployment's own revision annotation
        dep_ann = _meta(dep).setdefault("annotations", {})
        if new_rs is not None and dep_ann.get("deployment.kubernetes.io/revision") != str(revision(new_rs)):
            dep_ann["deployment.kubernetes.io/revision"] = str(revision(new_rs))
            dep = self._update(DEPLOYMENTS, dep)

        pods_of = {_uid(rs): [p for p in self._owned(PODS, rs) if not _terminal(p)] for rs in rss}
        new_pods = pods_of.get(_uid(new_rs), []) if new_rs else []
        new_ready = sum(1 for p in new_pods if _pod_ready(p))

        # scale old ReplicaSets down once the new one is fully ready
        if new_rs is not None and new_ready >= desired and not spec.get("paused"):
            for rs in rss:
                if _uid(rs) == _uid(new_rs) or rs["spec"].get("replicas", 1) == 0:
                    continue
                before = rs["spec"].get("replicas", 1)
                rs["spec"]["replicas"] = 0
                self._update(REPLICASETS, rs, bump=True)
                self.record(DEPLOYMENTS, dep, "ScalingReplicaSet",
                            f"Scaled down replica set {_name(rs)} from {before} to 0", component="deployment-controller")
        # revision history limit
        limit = int(spec.get("revisionHistoryLimit", 10))
        old = sorted((rs for rs in rss if new_rs is None or _uid(rs) != _uid(new_rs)), key=revision)
        idle = [rs for rs in old if rs["spec"].get("replicas", 1) == 0 and not pods_of.get(_uid(rs))]
        for rs in idle[: max(0, len(idle) - limit)]:
            self.store.delete(REPLICASETS, ns, _name(rs))

        # status
        all_pods = [p for pods in pods_of.values() for p in pods]
        ready = sum(1 for p in all_pods if _pod_ready(p))
        replicas = len(all_pods)
        strategy = spec.get("strategy") or {}
        max_unavailable = 0
        if strategy.get("type", "RollingUpdate") == "RollingUpdate" and desired:
            max_unavailable = _scaled((strategy.get("rollingUpdate") or {}).get("maxUnavailable"), desired, False)
        old_status = dep.get("status") or {}
        old_conditions = old_status.get("conditions") or []
        if ready >= desired - max_unavailable:
            available = _condition(old_conditions, "Available", "True", "MinimumReplicasAvailable",
                                   "Deployment has minimum availability.", update_time=True)
        else:
            available = _condition(old_conditions, "Available", "False", "MinimumReplicasUnavailable",
                                   "Deployment does not have minimum availability.", update_time=True)
        rs_name = _name(new_rs) if new_rs else f"{name}-{phash}"
        complete = new_rs is not None and new_ready >= desired and replicas == desired and len(new_pods) == desired
        if complete:
            self._completed[uid] = phash
        previous = next((c for c in old_conditions if c.get("type") == "Progressing"), None)
        stuck = self.knobs.stuck_for(ns, name)
        deadline = float(spec.get("progressDeadlineSeconds", 600))
        if stuck and stuck.get("deadline_seconds") is not None:
            deadline = float(stuck["deadline_seconds"])
        started = self._rollout[uid][1]
        if self._completed.get(uid) == phash:
            progressing = _condition(old_conditions, "Progressing", "True", "NewReplicaSetAvailable",
                                     f'ReplicaSet "{rs_name}" has successfully progressed.', update_time=True)
        elif time.monotonic() - started > deadline or (
            previous is not None
            and previous.get("reason") == "ProgressDeadlineExceeded"
            and previous.get("message", "").startswith(f'ReplicaSet "{rs_name}"')
        ):
            progressing = _condition(old_conditions, "Progressing", "False", "ProgressDeadlineExceeded",
                                     f'ReplicaSet "{rs_name}" has timed out progressing.', update_time=True)
        else:
            progressing = _condition(old_conditions, "Progressing", "True", "ReplicaSetUpdated",
                                     f'ReplicaSet "{rs_name}" is progressing.', update_time=True)
        status = {
            "observedGeneration": _meta(dep).get("generation", 1),
            "replicas": replicas,
            "updatedReplicas": len(new_pods),
            "readyReplicas": ready,
            "availableReplicas": ready,
            "unavailableReplicas": max(0, desired - ready),
            "conditions": [available, progressing],
        }
        for key in ("replicas", "updatedReplicas", "readyReplicas", "availableReplicas", "unavailableReplicas"):
            if status[key] == 0 and key != "replicas":
                del status[key]
        if not replicas:
            status.pop("replicas")
        self._set_status(DEPLOYMENTS, dep, status)

    # -- replicasets

    def _replicasets(self) -> None:
        for rs in [copy.deepcopy(r) for r in self.store.iter_refs(REPLICASETS)]:
            ns = _ns(rs)
            desired = int((rs.get("spec") or {}).get("replicas", 1))
            pods = [p for p in self._owned(PODS, rs) if not _terminal(p)]
            if len(pods) < desired:
                template = copy.deepcopy((rs.get("spec") or {}).get("template") or {})
                for _ in range(desired - len(pods)):
                    pod_name = f"{_name(rs)}-{_rand_suffix()}"
                    pod = {
                        "metadata": {
                            "name": pod_name,
                            "generateName": f"{_name(rs)}-",
                            "namespace": ns,
                            "labels": copy.deepcopy((template.get("metadata") or {}).get("labels") or {}),
                            "ownerReferences": [_owner_ref(rs)],
                        },
                        "spec": copy.deepcopy(template.get("spec") or {}),
                    }
                    annotations = (template.get("metadata") or {}).get("annotations")
                    if annotations:
                        pod["metadata"]["annotations"] = copy.deepcopy(annotations)
                    created = self.store.create(PODS, admit(PODS, pod))
                    pods.append(created)
                    self.record(REPLICASETS, rs, "SuccessfulCreate", f"Created pod: {pod_name}", component="replicaset-controller")
            elif len(pods) > desired:
                doomed = sorted(pods, key=lambda p: (_pod_ready(p), _meta(p).get("creationTimestamp", "")))
                for pod in doomed[: len(pods) - desired]:
                    self.store.delete(PODS, ns, _name(pod))
                    pods.remove(pod)
                    self.record(REPLICASETS, rs, "SuccessfulDelete", f"Deleted pod: {_name(pod)}", component="replicaset-controller")
            ready = sum(1 for p in pods if _pod_ready(p))
            status = {
                "replicas": len(pods),
                "fullyLabeledReplicas": len(pods),
                "readyReplicas": ready,
                "availableReplicas": ready,
                "observedGeneration": _meta(rs).get("generation", 1),
            }
            for key in ("fullyLabeledReplicas", "readyReplicas", "availableReplicas"):
                if not status[key]:
                    del status[key]
            self._set_status(REPLICASETS, rs, status)

    # -- jobs

    def _jobs(self) -> None:
        for job in [copy.deepcopy(j) for j in self.store.iter_refs(JOBS)]:
            ns, name = _ns(job), _name(job)
            spec = job.get("spec") or {}
            status = copy.deepcopy(job.get("status") or {})
            conditions = status.get("conditions") or []
            finished = any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True" for c in conditions)
            if finished or spec.get("suspend"):
                continue
            pods = self._owned(PODS, job)
            limit = int(spec.get("backoffLimit", 6))
            failed_so_far = sum(1 for p in pods if (p.get("status") or {}).get("phase") == "Failed")
            running = [p for p in pods if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")]
            done = any((p.get("status") or {}).get("phase") == "Succeeded" for p in pods)
            deadline = spec.get("activeDeadlineSeconds")
            started = status.get("startTime")
            if deadline is not None and started and \
                    time.time() - _parse_time(started) > float(deadline):
                for p in running:
                    self.store.delete(PODS, ns, _name(p))
                    self.record(JOBS, job, "SuccessfulDelete", f"Deleted pod: {_name(p)}", component="job-controller")
                status.pop("active", None)
                status["failed"] = failed_so_far + len(running)
                status["conditions"] = _job_failed("DeadlineExceeded", "Job was active longer than specified deadline")
                self.record(JOBS, job, "DeadlineExceeded", "Job was active longer than specified deadline",
                            warning=True, component="job-controller")
                self._set_status(JOBS, job, status)
                continue
            if not running and not done and failed_so_far <= limit:
                template = copy.deepcopy(spec.get("template") or {})
                pod_name = f"{name}-{_rand_suffix()}"
                pod = {
                    "metadata": {
                        "name": pod_name,
                        "generateName": f"{name}-",
                        "namespace": ns,
                        "labels": copy.deepcopy((template.get("metadata") or {}).get("labels") or {}),
                        "ownerReferences": [_owner_ref(job)],
                    },
                    "spec": copy.deepcopy(template.get("spec") or {}),
                }
                if (template.get("metadata") or {}).get("annotations"):
                    pod["metadata"]["annotations"] = copy.deepcopy(template["metadata"]["annotations"])
                pods.append(self.store.create(PODS, admit(PODS, pod)))
                self.record(JOBS, job, "SuccessfulCreate", f"Created pod: {pod_name}", component="job-controller")
            status.setdefault("startTime", now())
            succeeded = sum(1 for p in pods if (p.get("status") or {}).get("phase") == "Succeeded")
            failed = sum(1 for p in pods if (p.get("status") or {}).get("phase") == "Failed")
            active = len(pods) - succeeded - failed
            status.update(active=active, ready=sum(1 for p in pods if _pod_ready(p)), terminating=0,
                          uncountedTerminatedPods={})
            if succeeded:
                status["succeeded"] = succeeded
            if failed:
                status["failed"] = failed
            if not active:
                status.pop("active", None)
            if succeeded >= int(spec.get("completions", 1)):
                stamp = now()
                status["completionTime"] = stamp
                status["conditions"] = [
                    {"type": "SuccessCriteriaMet", "status": "True", "reason": "CompletionsReached",
                     "message": "Reached expected number of succeeded pods", "lastProbeTime": stamp, "lastTransitionTime": stamp},
                    {"type": "Complete", "status": "True", "reason": "CompletionsReached",
                     "message": "Reached expected number of succeeded pods", "lastProbeTime": stamp, "lastTransitionTime": stamp},
                ]
                self.record(JOBS, job, "Completed", "Job completed", component="job-controller")
            elif failed > limit:
                status["conditions"] = _job_failed("BackoffLimitExceeded", "Job has reached the specified backoff limit")
                self.record(JOBS, job, "BackoffLimitExceeded", "Job has reached the specified backoff limit",
                            warning=True, component="job-controller")
            self._set_status(JOBS, job, status)

    # -- kubelet

    def _pods(self) -> None:
        for pod in [copy.deepcopy(p) for p in self.store.iter_refs(PODS)]:
            if _meta(pod).get("deletionTimestamp"):
                continue
            if self.kubelet is not None:
                self._schedule(pod)
            else:
                self._pod(pod)
        if self.kubelet is not None:
            self.kubelet.sync([copy.deepcopy(p) for p in self.store.iter_refs(PODS)])

    def _schedule(self, pod: dict) -> None:
        """Bind an unscheduled pod to the node (the process kubelet takes it from there)."""
        if (pod.get("spec") or {}).get("nodeName"):
            return
        status = copy.deepcopy(pod.get("status") or {})
        pod["spec"]["nodeName"] = NODE_NAME
        status["phase"] = "Pending"
        status["conditions"] = [_condition(status.get("conditions") or [], "PodScheduled", "True", "", "")]
        for c in status["conditions"]:
            c.pop("reason"), c.pop("message")
        pod["status"] = status
        pod = self._update(PODS, pod)
        self.record(PODS, pod, "Scheduled", f"Successfully assigned {_ns(pod)}/{_name(pod)} to {NODE_NAME}",
                    component="default-scheduler")

    def _container_status(self, container: dict, pod_uid: str, *, ready: bool, state: dict, restarts: int = 0,
                          last_state: dict | None = None, started: bool = True) -> dict:
        image = container.get("image", "")
        image_digest = hashlib.sha256(image.encode()).hexdigest()
        repo = image.split("@")[0]
        repo = repo.rsplit(":", 1)[0] if ":" in repo.rsplit("/", 1)[-1] else repo
        cid = hashlib.sha256(f"{pod_uid}/{container.get('name')}/{restarts}".encode()).hexdigest()
        return {
            "name": container.get("name", ""),
            "image": image,
            "imageID": f"{repo}@sha256:{image_digest}",
            "containerID": f"containerd://{cid}",
            "ready": ready,
            "restartCount": restarts,
            "started": started,
            "state": state,
            "lastState": last_state or {},
        }

    def _pod(self, pod: dict) -> None:
        ns, name, uid = _ns(pod), _name(pod), _uid(pod)
        spec = pod.get("spec") or {}
        status = copy.deepcopy(pod.get("status") or {})
        phase = status.get("phase", "Pending")
        if phase in ("Succeeded", "Failed"):
            return
        containers = spec.get("containers") or []
        conditions = status.get("conditions") or []
        owners = pod_owners(self.store, pod)
        ref = _controller_ref(pod)
        runs_to_completion = (ref is not None and ref.get("kind") == "Job") or (
            ref is None and spec.get("restartPolicy", "Always") != "Always"
        )
        deployment = owners.get("deployment")

        if not spec.get("nodeName"):
            pod["spec"]["nodeName"] = NODE_NAME
            status["conditions"] = [_condition(conditions, "PodScheduled", "True", "", "")]
            for c in status["conditions"]:
                c.pop("reason"), c.pop("message")
            pod["status"] = status
            pod = self._update(PODS, pod)
            self.record(PODS, pod, "Scheduled", f"Successfully assigned {ns}/{name} to {NODE_NAME}", component="default-scheduler")
            self._mark(uid, "scheduled")
            return
        if phase == "Pending":
            if self._since(uid, "scheduled") < self.knobs.pod_start_seconds:
                return
            stamp = now()
            n = next(self._ips)
            status.update(
                phase="Running",
                hostIP="10.0.1.23",
                hostIPs=[{"ip": "10.0.1.23"}],
                podIP=f"10.0.{2 + n // 250}.{n % 250 + 2}",
                startTime=stamp,
            )
            status["podIPs"] = [{"ip": status["podIP"]}]
            status["containerStatuses"] = [
                self._container_status(c, uid, ready=False, state={"running": {"startedAt": stamp}}) for c in containers
            ]
            if spec.get("initContainers"):
                status["initContainerStatuses"] = [
                    self._container_status(c, uid, ready=True, started=False, state={"terminated": {
                        "exitCode": 0, "reason": "Completed", "startedAt": stamp, "finishedAt": stamp,
                        "containerID": f"containerd://{secrets.token_hex(32)}"}})
                    for c in spec["initContainers"]
                ]
            status["conditions"] = self._pod_conditions(conditions, ready=False)
            pod["status"] = status
            pod = self._update(PODS, pod)
            self._mark(uid, "running")
            for c in containers:
                path = f"spec.containers{{{c.get('name')}}}"
                self.record(PODS, pod, "Pulled", f'Container image "{c.get("image")}" already present on machine', field_path=path)
                self.record(PODS, pod, "Created", f"Created container: {c.get('name')}", field_path=path)
                self.record(PODS, pod, "Started", f"Started container {c.get('name')}", field_path=path)
            return

        # Running
        if runs_to_completion:
            if self._since(uid, "running") < self.knobs.job_seconds:
                return
            if owners.get("job"):
                fails = self.knobs.job_fails(ns, owners["job"])
            else:
                fails = self.knobs.pod_fails(ns, name)
            stamp = now()
            code, reason = (1, "Error") if fails else (0, "Completed")
            status["phase"] = "Failed" if fails else "Succeeded"
            status["containerStatuses"] = [
                self._container_status(c, uid, ready=False, started=False, state={"terminated": {
                    "exitCode": code, "reason": reason, "startedAt": status.get("startTime", stamp), "finishedAt": stamp,
                    "containerID": f"containerd://{hashlib.sha256((uid + c.get('name', '')).encode()).hexdigest()}"}})
                for c in containers
            ]
            status["conditions"] = self._pod_conditions(conditions, ready=False, reason="PodCompleted")
            pod["status"] = status
            self._update(PODS, pod)
            if fails:
                self.record(PODS, pod, "BackOff", "Back-off restarting failed container" if spec.get("restartPolicy") == "OnFailure"
                            else f"Error: container exited with code {code}", warning=True)
            return

        statuses = status.get("containerStatuses") or []
        crash = self.knobs.crashlooping(ns, deployment)
        if crash and _pod_ready(pod) and self.knobs.crashloop_spares_ready(ns, deployment):
            crash = False  # new_pods_only: the running version keeps serving
        if crash:
            last = self._clock.get((uid, "restart"))
            if last is not None and time.monotonic() - last < self.knobs.restart_seconds and \
                    all("waiting" in (s.get("state") or {}) for s in statuses):
                return
            self._clock[(uid, "restart")] = time.monotonic()
            self._clock.pop((uid, "ready"), None)
            stamp = now()
            new_statuses = []
            for c in containers:
                prev = next((s for s in statuses if s.get("name") == c.get("name")), {})
                restarts = int(prev.get("restartCount", 0)) + 1
                started_at = ((prev.get("state") or {}).get("running") or {}).get("startedAt") or \
                    ((prev.get("lastState") or {}).get("terminated") or {}).get("startedAt") or stamp
                waiting = {"waiting": {"reason": "CrashLoopBackOff",
                                       "message": f"back-off {min(300, 10 * 2 ** max(0, restarts - 1))}s restarting failed container={c.get('name')} pod={name}_{ns}({uid})"}}
                terminated = {"terminated": {"exitCode": 1, "reason": "Error", "startedAt": started_at, "finishedAt": stamp,
                                             "containerID": f"containerd://{hashlib.sha256(f'{uid}{restarts}'.encode()).hexdigest()}"}}
                new_statuses.append(self._container_status(c, uid, ready=False, started=False, state=waiting,
                                                           restarts=restarts, last_state=terminated))
                self.record(PODS, pod, "BackOff", f"Back-off restarting failed container {c.get('name')} in pod {name}_{ns}({uid})",
                            warning=True, field_path=f"spec.containers{{{c.get('name')}}}")
            status["containerStatuses"] = new_statuses
            status["conditions"] = self._pod_conditions(conditions, ready=False, reason="ContainersNotReady",
                                                        message=f"containers with unready status: [{' '.join(c.get('name', '') for c in containers)}]")
            pod["status"] = status
            self._update(PODS, pod)
            return

        was_crashing = any("waiting" in (s.get("state") or {}) for s in statuses)
        if was_crashing:  # the knob was turned off: the next restart stays up
            self._clock.pop((uid, "restart"), None)
            stamp = now()
            status["containerStatuses"] = [
                self._container_status(c, uid, ready=False, state={"running": {"startedAt": stamp}},
                                       restarts=int(s.get("restartCount", 0)) + 1, last_state=s.get("lastState"))
                for c, s in zip(containers, statuses)
            ]
            self._clock[(uid, "running")] = time.monotonic()
            pod["status"] = status
            self._update(PODS, pod)
            return
        if _pod_ready(pod):
            return
        stuck = self.knobs.stuck_for(ns, deployment)
        if stuck is not None:
            last_probe = self._clock.get((uid, "unhealthy"))
            if last_probe is None or time.monotonic() - last_probe >= 5:
                self._clock[(uid, "unhealthy")] = time.monotonic()
                self.record(PODS, pod, "Unhealthy", "Readiness probe failed: HTTP probe failed with statuscode: 503",
                            warning=True, field_path=f"spec.containers{{{containers[0].get('name') if containers else ''}}}")
            return
        if self._since(uid, "running") < self.knobs.pod_ready_seconds:
            return
        status["containerStatuses"] = [dict(s, ready=True, started=True) for s in statuses]
        status["conditions"] = self._pod_conditions(conditions, ready=True)
        pod["status"] = status
        self._update(PODS, pod)

    def _pod_conditions(self, old: list[dict], *, ready: bool, reason: str = "", message: str = "") -> list[dict]:
        out = []
        for ctype, value in (
            ("PodReadyToStartContainers", True),
            ("Initialized", True),
            ("Ready", ready),
            ("ContainersReady", ready),
            ("PodScheduled", True),
        ):
            cond = _condition(old, ctype, "True" if value else "False", reason if not value else "", message if not value else "")
            if value or not reason:
                cond.pop("reason")
                cond.pop("message")
            cond["lastProbeTime"] = None
            out.append(cond)
        return out

    # -- services, endpoints, load balancers

    def _endpoints(self) -> None:
        services = {(_ns(s), _name(s)): s for s in self.store.iter_refs(SERVICES)}
        for (ns, name), svc in services.items():
            spec = svc.get("spec") or {}
            selector = spec.get("selector")
            if not selector:
                continue
            pods = [
                p for p in self.store.iter_refs(PODS)
                if _ns(p) == ns and not _terminal(p) and (p.get("status") or {}).get("podIP")
                and all(((_meta(p).get("labels") or {}).get(k) == v) for k, v in selector.items())
            ]
            ready = [p for p in pods if _pod_ready(p)]
            not_ready = [p for p in pods if not _pod_ready(p)]

            def address(p: dict) -> dict:
                return {"ip": p["status"]["podIP"], "nodeName": NODE_NAME,
                        "targetRef": {"kind": "Pod", "namespace": ns, "name": _name(p), "uid": _uid(p)}}

            ports = []
            for port in spec.get("ports") or []:
                target = port.get("targetPort", port.get("port"))
                if isinstance(target, str) and not target.isdigit():
                    resolved = None
                    for p in pods:
                        for c in (p.get("spec") or {}).get("containers") or []:
                            for cp in c.get("ports") or []:
                                if cp.get("name") == target:
                                    resolved = cp.get("containerPort")
                    if resolved is None:
                        continue
                    target = resolved
                entry = {"port": int(target), "protocol": port.get("protocol", "TCP")}
                if port.get("name"):
                    entry["name"] = port["name"]
                ports.append(entry)
            subset: dict[str, Any] = {}
            if ready:
                subset["addresses"] = [address(p) for p in sorted(ready, key=_name)]
            if not_ready:
                subset["notReadyAddresses"] = [address(p) for p in sorted(not_ready, key=_name)]
            desired = {
                "metadata": {
                    "name": name,
                    "namespace": ns,
                    "labels": {**((_meta(svc).get("labels")) or {}), "endpoints.kubernetes.io/managed-by": "endpoint-controller"},
                },
            }
            if subset and ports:
                subset["ports"] = ports
                desired["subsets"] = [subset]
            existing = self.store.get(ENDPOINTS, ns, name)
            if existing is None:
                self.store.create(ENDPOINTS, admit(ENDPOINTS, desired))
            else:
                changed = copy.deepcopy(existing)
                changed["metadata"]["labels"] = desired["metadata"]["labels"]
                changed.pop("subsets", None)
                if "subsets" in desired:
                    changed["subsets"] = desired["subsets"]
                if changed != existing:
                    self._update(ENDPOINTS, changed)
        for ep in [copy.deepcopy(e) for e in self.store.iter_refs(ENDPOINTS)]:
            managed = (_meta(ep).get("labels") or {}).get("endpoints.kubernetes.io/managed-by") == "endpoint-controller"
            if managed and (_ns(ep), _name(ep)) not in services:
                self.store.delete(ENDPOINTS, _ns(ep), _name(ep))

    def _ingresses(self) -> None:
        for ing in [copy.deepcopy(i) for i in self.store.iter_refs(INGRESSES)]:
            managed, hostname = self.knobs.hostname_for(_ns(ing), _name(ing))
            if not managed:
                continue
            status = {"loadBalancer": {"ingress": [{"hostname": hostname}]}}
            self._set_status(INGRESSES, ing, status)
        if self.kubelet is not None and self.kubelet.alb is not None:
            routes = self._alb_routes()
            if routes != self._last_routes:
                self._last_routes = routes
                self.kubelet.alb.set_routes(routes)

    def _alb_routes(self) -> list:
        """The emulated ALB's rules: every Ingress of class ``alb``, targets = Ready endpoints (IP mode)."""
        from .alb import Route

        routes = []
        for ing in self.store.iter_refs(INGRESSES):
            annotations = _meta(ing).get("annotations") or {}
            spec = ing.get("spec") or {}
            if spec.get("ingressClassName", annotations.get("kubernetes.io/ingress.class")) != "alb":
                continue
            ns = _ns(ing)
            for rule in spec.get("rules") or []:
                for path in ((rule.get("http") or {}).get("paths")) or []:
                    backend = (path.get("backend") or {}).get("service") or {}
                    routes.append(Route(
                        host=rule.get("host", ""), path=path.get("path", "/") or "/",
                        targets=tuple(self._service_targets(ns, backend.get("name", ""), backend.get("port") or {})),
                        health_path=annotations.get("alb.ingress.kubernetes.io/healthcheck-path", "/"),
                        success_codes=annotations.get("alb.ingress.kubernetes.io/success-codes", "200"),
                        ssl_redirect="alb.ingress.kubernetes.io/ssl-redirect" in annotations,
                        name=f"{ns}/{_name(ing)}",
                    ))
        return routes

    def _service_targets(self, ns: str, service: str, port: dict) -> list[tuple[str, int]]:
        svc = self.store.get(SERVICES, ns, service)
        ep = self.store.get(ENDPOINTS, ns, service)
        if svc is None or ep is None:
            return []
        svc_ports = (svc.get("spec") or {}).get("ports") or []
        wanted = next((p for p in svc_ports if ("number" in port and p.get("port") == port["number"])
                       or ("name" in port and p.get("name") == port["name"])), None)
        if wanted is None:
            return []
        targets = []
        for subset in ep.get("subsets") or []:
            ports = subset.get("ports") or []
            chosen = next((p for p in ports if p.get("name") == wanted.get("name")), ports[0] if len(ports) == 1 else None)
            if chosen is None:
                continue
            targets += [(a["ip"], int(chosen["port"])) for a in subset.get("addresses") or []]
        return sorted(targets)

    def _load_balancers(self) -> None:
        for svc in [copy.deepcopy(s) for s in self.store.iter_refs(SERVICES)]:
            if (svc.get("spec") or {}).get("type") != "LoadBalancer":
                continue
            managed, hostname = self.knobs.hostname_for(_ns(svc), _name(svc))
            if managed:
                self._set_status(SERVICES, svc, {"loadBalancer": {"ingress": [{"hostname": hostname}]}})

    # -- policy and autoscaling

    def _pdbs(self) -> None:
        for pdb in [copy.deepcopy(p) for p in self.store.iter_refs(PDBS)]:
            spec = pdb.get("spec") or {}
            match = label_selector_from_spec(spec.get("selector"))
            pods = [p for p in self.store.iter_refs(PODS) if _ns(p) == _ns(pdb) and not _terminal(p) and match(p)]
            expected = len(pods)
            healthy = sum(1 for p in pods if _pod_ready(p))
            if spec.get("minAvailable") is not None:
                desired = _scaled(spec["minAvailable"], expected, True)
            elif spec.get("maxUnavailable") is not None:
                desired = max(0, expected - _scaled(spec["maxUnavailable"], expected, True))
            else:
                desired = expected
            allowed = max(0, healthy - desired)
            old_conditions = (pdb.get("status") or {}).get("conditions") or []
            cond = _condition(old_conditions, "DisruptionAllowed", "True" if allowed else "False",
                              "SufficientPods" if allowed else "InsufficientPods", "")
            cond["observedGeneration"] = _meta(pdb).get("generation", 1)
            status = {
                "observedGeneration": _meta(pdb).get("generation", 1),
                "disruptionsAllowed": allowed,
                "currentHealthy": healthy,
                "desiredHealthy": desired,
                "expectedPods": expected,
                "conditions": [cond],
            }
            self._set_status(PDBS, pdb, status)

    def _hpas(self) -> None:
        for hpa in [copy.deepcopy(h) for h in self.store.iter_refs(HPAS)]:
            spec = hpa.get("spec") or {}
            ref = spec.get("scaleTargetRef") or {}
            lo, hi = int(spec.get("minReplicas", 1)), int(spec.get("maxReplicas", 1))
            current = desired = lo
            old_conditions = (hpa.get("status") or {}).get("conditions") or []
            target = self.store.get(DEPLOYMENTS, _ns(hpa), ref.get("name", "")) if ref.get("kind") == "Deployment" else None
            if target is not None:
                current = int((target.get("spec") or {}).get("replicas", 1))
                desired = min(hi, max(lo, current))
                if desired != current:
                    target["spec"]["replicas"] = desired
                    self._update(DEPLOYMENTS, target, bump=True)
                    self.record(HPAS, hpa, "SuccessfulRescale",
                                f"New size: {desired}; reason: Current number of replicas below Spec.MinReplicas"
                                if desired > current else f"New size: {desired}; reason: Current number of replicas above Spec.MaxReplicas",
                                component="horizontal-pod-autoscaler")
                conditions = [
                    _condition(old_conditions, "AbleToScale", "True", "ReadyForNewScale", "recommended size matches current size"),
                    _condition(old_conditions, "ScalingActive", "True", "ValidMetricFound",
                               "the HPA was able to successfully calculate a replica count"),
                    _condition(old_conditions, "ScalingLimited", "False", "DesiredWithinRange",
                               "the desired count is within the acceptable range"),
                ]
            else:
                conditions = [
                    _condition(old_conditions, "AbleToScale", "False", "FailedGetScale",
                               f"the HPA controller was unable to get the target's current scale: {ref.get('kind', '').lower()}s \"{ref.get('name', '')}\" not found"),
                ]
            status = {"currentReplicas": current, "desiredReplicas": desired, "currentMetrics": None, "conditions": conditions}
            status = {k: v for k, v in status.items() if v is not None}
            self._set_status(HPAS, hpa, status)
