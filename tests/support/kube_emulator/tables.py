"""Server-side printing: ``meta.k8s.io/v1`` Tables for ``kubectl get``.

kubectl asks for a Table in its Accept header and prints the columns it
gets. The columns here follow the real printers for the kinds a person
looks at while debugging a rollout (priority 1 columns show with
``-o wide``); other kinds get NAME and AGE. ``includeObject`` is honoured
(``Object`` for ``--sort-by``, ``Metadata`` by default, ``None``).
"""

from __future__ import annotations

import datetime as _dt
from typing import Any, Callable

from .resources import ResourceType

__all__ = ["table"]

Column = tuple[str, int, Callable[[dict], Any]]  # (title, priority, cell)


def _age(timestamp: str | None) -> str:
    if not timestamp:
        return "<unknown>"
    then = _dt.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    seconds = max(0, int((_dt.datetime.now(_dt.timezone.utc) - then).total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def _status(o: dict) -> dict:
    return o.get("status") or {}


def _spec(o: dict) -> dict:
    return o.get("spec") or {}


def _pod_status(o: dict) -> str:
    for c in _status(o).get("containerStatuses") or []:
        state = c.get("state") or {}
        if state.get("waiting"):
            return state["waiting"].get("reason", "Waiting")
        if state.get("terminated") and _status(o).get("phase") not in ("Succeeded", "Failed"):
            return state["terminated"].get("reason", "Terminated")
    if (o.get("metadata") or {}).get("deletionTimestamp"):
        return "Terminating"
    return _status(o).get("phase", "Pending")


def _ports(o: dict) -> str:
    out = []
    for p in _spec(o).get("ports") or []:
        text = f"{p.get('port')}"
        if p.get("nodePort"):
            text += f":{p['nodePort']}"
        out.append(f"{text}/{p.get('protocol', 'TCP')}")
    return ",".join(out) or "<none>"


def _lb(o: dict) -> str:
    ingress = (_status(o).get("loadBalancer") or {}).get("ingress") or []
    return ",".join(i.get("hostname") or i.get("ip", "") for i in ingress)


def _job_status(o: dict) -> str:
    for c in _status(o).get("conditions") or []:
        if c.get("status") == "True" and c.get("type") in ("Complete", "Failed"):
            return c["type"]
    return "Running"


_COLUMNS: dict[str, list[Column]] = {
    "Namespace": [("Status", 0, lambda o: _status(o).get("phase", ""))],
    "Pod": [
        ("Ready", 0, lambda o: f"{sum(1 for c in _status(o).get('containerStatuses') or [] if c.get('ready'))}/"
                               f"{len(_spec(o).get('containers') or [])}"),
        ("Status", 0, _pod_status),
        ("Restarts", 0, lambda o: sum(c.get("restartCount", 0) for c in _status(o).get("containerStatuses") or [])),
        ("IP", 1, lambda o: _status(o).get("podIP", "<none>")),
        ("Node", 1, lambda o: _spec(o).get("nodeName", "<none>")),
    ],
    "Deployment": [
        ("Ready", 0, lambda o: f"{_status(o).get('readyReplicas', 0)}/{_spec(o).get('replicas', 1)}"),
        ("Up-to-date", 0, lambda o: _status(o).get("updatedReplicas", 0)),
        ("Available", 0, lambda o: _status(o).get("availableReplicas", 0)),
    ],
    "ReplicaSet": [
        ("Desired", 0, lambda o: _spec(o).get("replicas", 1)),
        ("Current", 0, lambda o: _status(o).get("replicas", 0)),
        ("Ready", 0, lambda o: _status(o).get("readyReplicas", 0)),
    ],
    "Service": [
        ("Type", 0, lambda o: _spec(o).get("type", "ClusterIP")),
        ("Cluster-IP", 0, lambda o: _spec(o).get("clusterIP", "<none>")),
        ("External-IP", 0, lambda o: _lb(o) or "<none>"),
        ("Port(s)", 0, _ports),
    ],
    "Job": [
        ("Status", 0, _job_status),
        ("Completions", 0, lambda o: f"{_status(o).get('succeeded', 0)}/{_spec(o).get('completions', 1)}"),
    ],
    "Ingress": [
        ("Class", 0, lambda o: _spec(o).get("ingressClassName", "<none>")),
        ("Hosts", 0, lambda o: ",".join(r.get("host", "*") for r in _spec(o).get("rules") or []) or "*"),
        ("Address", 0, _lb),
        ("Ports", 0, lambda o: "80, 443" if _spec(o).get("tls") else "80"),
    ],
    "Event": [
        ("Last Seen", 0, lambda o: _age(o.get("lastTimestamp") or o.get("eventTime"))),
        ("Type", 0, lambda o: o.get("type", "")),
        ("Reason", 0, lambda o: o.get("reason", "")),
        ("Object", 0, lambda o: f"{(o.get('involvedObject') or {}).get('kind', '').lower()}/"
                                f"{(o.get('involvedObject') or {}).get('name', '')}"),
        ("Message", 0, lambda o: o.get("message", "")),
    ],
}


def table(rt: ResourceType, items: list[dict], rv: int, include_object: str = "Metadata") -> dict:
    """The Table answer for a list (or one object as a one-row list)."""
    extra = _COLUMNS.get(rt.kind, [])
    name_priority = 1 if rt.kind == "Event" else 0  # as the real event printer
    columns = [{"name": "Name", "type": "string", "format": "name", "description": "Name", "priority": name_priority}]
    columns += [{"name": t, "type": "string", "format": "", "description": t, "priority": p} for t, p, _ in extra]
    if rt.kind != "Event":
        columns.append({"name": "Age", "type": "string", "format": "", "description": "Age", "priority": 0})
    rows = []
    for obj in items:
        cells = [obj["metadata"]["name"], *(fn(obj) for _, _, fn in extra)]
        if rt.kind != "Event":
            cells.append(_age(obj["metadata"].get("creationTimestamp")))
        row: dict[str, Any] = {"cells": cells}
        if include_object == "Object":
            row["object"] = obj
        elif include_object != "None":
            row["object"] = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]}
        rows.append(row)
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": str(rv)},
        "columnDefinitions": columns,
        "rows": rows,
    }
