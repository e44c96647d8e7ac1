"""The in-memory object store: objects, resourceVersions, watches, selectors.

One lock guards everything. Every write takes the next global
``resourceVersion`` (as etcd's revision does), is appended to a bounded
history and is fanned out to the open watches of its resource, so a watch can
start from any resourceVersion still in the history (older ones get
``410 Expired``, as from a real server).

Objects are plain JSON dicts; readers always get deep copies. The store knows
nothing about REST or defaults (``api.py`` and ``admission.py`` do) and
nothing about controllers, which it only wakes (``add_listener``).

Watch semantics per watcher: with a label/field selector, an object that
starts matching is ADDED, one that stops matching is DELETED, as the real
watch cache does.
"""

from __future__ import annotations

import copy
import datetime as _dt
import queue
import re
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from .resources import RESOURCES, ResourceType

__all__ = [
    "Store",
    "Watcher",
    "WatchEvent",
    "Expired",
    "Selector",
    "SelectorError",
    "parse_label_selector",
    "parse_field_selector",
    "label_selector_from_spec",
    "now",
]


def now() -> str:
    """RFC 3339 UTC, second precision (metav1.Time)."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    """RFC 3339 UTC with microseconds (metav1.MicroTime)."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Expired(Exception):
    """The requested resourceVersion is older than the retained history."""


class SelectorError(ValueError):
    """A label or field selector that does not parse."""


# --------------------------------------------------------------------------
# selectors

Selector = Callable[[dict], bool]

_LABEL_KEY = r"[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?"


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_label_selector(text: str | None) -> Selector:
    """``a=b``, ``a==b``, ``a!=b``, ``a in (x,y)``, ``a notin (x)``, ``a``, ``!a``."""
    if not text:
        return lambda obj: True
    tests: list[Callable[[dict[str, str]], bool]] = []
    for req in _split_top_level(text):
        m = re.fullmatch(rf"({_LABEL_KEY})\s+(in|notin)\s+\((.*)\)", req)
        if m:
            key, op, values = m.group(1), m.group(3), {v.strip() for v in m.group(4).split(",") if v.strip()}
            if op == "in":
                tests.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                tests.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
            continue
        m = re.fullmatch(rf"({_LABEL_KEY})\s*(==|=|!=)\s*(.*)", req)
        if m:
            key, op, value = m.group(1), m.group(3), m.group(4).strip()
            if op == "!=":
                tests.append(lambda labels, k=key, v=value: labels.get(k) != v)
            else:
                tests.append(lambda labels, k=key, v=value: labels.get(k) == v)
            continue
        m = re.fullmatch(rf"!\s*({_LABEL_KEY})", req)
        if m:
            tests.append(lambda labels, k=m.group(1): k not in labels)
            continue
        m = re.fullmatch(rf"({_LABEL_KEY})", req)
        if m:
            tests.append(lambda labels, k=m.group(1): k in labels)
            continue
        raise SelectorError(f"unable to parse requirement: {req!r}")

    def match(obj: dict) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return all(test(labels) for test in tests)

    return match


def _field_value(obj: dict, path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        if not isinstance(value, dict):
            return ""
        value = value.get(part)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_field_selector(text: str | None) -> Selector:
    """``path=value``, ``path==value``, ``path!=value`` joined by commas (any dotted path)."""
    if not text:
        return lambda obj: True
    tests: list[Callable[[dict], bool]] = []
    for req in _split_top_level(text):
        m = re.fullmatch(r"([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(.*)", req)
        if not m:
            raise SelectorError(f"invalid field selector requirement: {req!r}")
        path, op, value = m.group(1), m.group(2), m.group(3).strip()
        if op == "!=":
            tests.append(lambda obj, p=path, v=value: _field_value(obj, p) != v)
        else:
            tests.append(lambda obj, p=path, v=value: _field_value(obj, p) == v)
    return lambda obj: all(test(obj) for test in tests)


def label_selector_from_spec(selector: dict | None) -> Selector:
    """A ``metav1.LabelSelector`` (``matchLabels`` + ``matchExpressions``) as a predicate.

    ``None`` or ``{}`` selects nothing, as for a Service without a selector.
    """
    if not selector:
        return lambda obj: False
    match_labels = selector.get("matchLabels") or {}
    expressions = selector.get("matchExpressions") or []

    def match(obj: dict) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        if any(labels.get(k) != v for k, v in match_labels.items()):
            return False
        for expr in expressions:
            key, op, values = expr.get("key"), expr.get("operator"), set(expr.get("values") or [])
            if op == "In" and labels.get(key) not in values:
                return False
            if op == "NotIn" and labels.get(key) in values:
                return False
            if op == "Exists" and key not in labels:
                return False
            if op == "DoesNotExist" and key in labels:
                return False
        return True

    return match


# --------------------------------------------------------------------------
# watches


@dataclass
class WatchEvent:
    type: str  # ADDED MODIFIED DELETED BOOKMARK ERROR
    object: dict


@dataclass
class _HistoryEntry:
    rv: int
    key: str
    type: str
    old: dict | None
    new: dict


@dataclass(eq=False)
class Watcher:
    """One open watch: a queue of :class:`WatchEvent` filled by the store."""

    key: str
    namespace: str | None
    match: Selector
    events: "queue.Queue[WatchEvent]" = field(default_factory=queue.Queue)
    _store: "Store | None" = None

    def offer(self, kind: str, old: dict | None, new: dict) -> None:
        """Translate one store change into what this watcher sees, if anything."""
        ns = (new.get("metadata") or {}).get("namespace")
        if self.namespace is not None and ns != self.namespace:
            return
        was = old is not None and self.match(old)
        now_ = self.match(new)
        if kind == "DELETED":
            if was or now_:
                self.events.put(WatchEvent("DELETED", copy.deepcopy(new)))
            return
        if kind == "ADDED":
            if now_:
                self.events.put(WatchEvent("ADDED", copy.deepcopy(new)))
            return
        if was and now_:
            self.events.put(WatchEvent("MODIFIED", copy.deepcopy(new)))
        elif now_:
            self.events.put(WatchEvent("ADDED", copy.deepcopy(new)))
        elif was:
            self.events.put(WatchEvent("DELETED", copy.deepcopy(new)))

    def stop(self) -> None:
        if self._store is not None:
            self._store._remove_watcher(self)
            self._store = None


# --------------------------------------------------------------------------
# the store


class Store:
    """Objects by resource key, namespace and name; see the module docstring."""

    def __init__(self, history_limit: int = 50_000) -> None:
        self.lock = threading.RLock()
        self._rv = 0
        self._objects: dict[str, dict[tuple[str, str], dict]] = {rt.key: {} for rt in RESOURCES}
        self._history: deque[_HistoryEntry] = deque(maxlen=history_limit)
        self._history_floor = 0  # watches from an rv below this are Expired
        self._watchers: dict[str, list[Watcher]] = {}
        self._listeners: list[Callable[[], None]] = []
        #: Last applied configuration per (uid, field manager), for server-side apply.
        self.applied: dict[tuple[str, str], dict] = {}

    # -- versions

    @property
    def resource_version(self) -> int:
        with self.lock:
            return self._rv

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` (under the lock: keep it short) after every write."""
        self._listeners.append(listener)

    # -- reads

    def get(self, rt: ResourceType, namespace: str | None, name: str) -> dict | None:
        with self.lock:
            obj = self._objects[rt.key].get((namespace or "", name))
            return copy.deepcopy(obj) if obj is not None else None

    def list(
        self,
        rt: ResourceType,
        namespace: str | None = None,
        match: Selector | None = None,
    ) -> tuple[list[dict], int]:
        """Matching objects sorted by namespace and name, and the current resourceVersion."""
        with self.lock:
            items = [
                copy.deepcopy(obj)
                for (ns, _), obj in sorted(self._objects[rt.key].items())
                if (namespace is None or ns == namespace) and (match is None or match(obj))
            ]
            return items, self._rv

    def iter_refs(self, rt: ResourceType) -> list[dict]:
        """The stored objects themselves (no copies): for controllers, under the lock."""
        return list(self._objects[rt.key].values())

    def dependents(self, uid: str) -> list[tuple[ResourceType, dict]]:
        """Objects with an ownerReference to ``uid``."""
        out = []
        with self.lock:
            for rt in RESOURCES:
                for obj in self._objects[rt.key].values():
                    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
                    if any(ref.get("uid") == uid for ref in refs):
                        out.append((rt, copy.deepcopy(obj)))
        return out

    # -- writes

    def create(self, rt: ResourceType, obj: dict) -> dict:
        """Store a new object: uid, creationTimestamp, resourceVersion, generation 1."""
        with self.lock:
            meta = obj.setdefault("metadata", {})
            key = (meta.get("namespace") or "", meta["name"])
            if key in self._objects[rt.key]:
                raise KeyError(key)
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", now())
            meta["generation"] = 1
            meta["resourceVersion"] = str(self._next_rv())
            stored = copy.deepcopy(obj)
            self._objects[rt.key][key] = stored
            self._emit(rt, "ADDED", None, stored)
            return copy.deepcopy(stored)

    def update(self, rt: ResourceType, obj: dict, *, bump_generation: bool = False, force_event: bool = False) -> dict:
        """Replace an existing object; a no-op (no new rv, no event) when nothing changed."""
        with self.lock:
            meta = obj["metadata"]
            key = (meta.get("namespace") or "", meta["name"])
            old = self._objects[rt.key].get(key)
            if old is None:
                raise KeyError(key)
            meta["uid"] = old["metadata"]["uid"]
            meta["creationTimestamp"] = old["metadata"].get("creationTimestamp")
            meta["generation"] = old["metadata"].get("generation", 1) + (1 if bump_generation else 0)
            meta["resourceVersion"] = old["metadata"]["resourceVersion"]
            if obj == old and not force_event:
                return copy.deepcopy(old)
            meta["resourceVersion"] = str(self._next_rv())
            stored = copy.deepcopy(obj)
            self._objects[rt.key][key] = stored
            self._emit(rt, "MODIFIED", old, stored)
            return copy.deepcopy(stored)

    def delete(self, rt: ResourceType, namespace: str | None, name: str) -> dict | None:
        """Remove an object; the DELETED event carries a new resourceVersion."""
        with self.lock:
            old = self._objects[rt.key].pop((namespace or "", name), None)
            if old is None:
                return None
            gone = copy.deepcopy(old)
            gone["metadata"]["resourceVersion"] = str(self._next_rv())
            uid = old["metadata"].get("uid")
            for k in [k for k in self.applied if k[0] == uid]:
                del self.applied[k]
            self._emit(rt, "DELETED", old, gone)
            return copy.deepcopy(gone)

    def clear(self) -> None:
        """Delete every object (events are sent, watches stay open)."""
        with self.lock:
            for rt in RESOURCES:
                for ns, name in list(self._objects[rt.key]):
                    self.delete(rt, ns, name)

    def _emit(self, rt: ResourceType, kind: str, old: dict | None, new: dict) -> None:
        if len(self._history) == self._history.maxlen:
            self._history_floor = self._history[0].rv
        self._history.append(_HistoryEntry(self._rv, rt.key, kind, old, new))
        for watcher in self._watchers.get(rt.key, ()):
            watcher.offer(kind, old, new)
        for listener in self._listeners:
            listener()

    # -- watches

    def watch(
        self,
        rt: ResourceType,
        namespace: str | None,
        match: Selector,
        since: int | None,
    ) -> tuple[list[dict], int, Watcher]:
        """Open a watch.

        ``since=None``: returns the current matching objects and the current
        resourceVersion (the caller sends them as synthetic ADDED events);
        otherwise the watcher is primed with the changes after ``since``.
        Raises :class:`Expired` when ``since`` is older than the history.
        """
        with self.lock:
            watcher = Watcher(rt.key, namespace, match, _store=self)
            initial: list[dict] = []
            if since is None:
                initial, _ = self.list(rt, namespace, match)
            else:
                if since < self._history_floor:
                    raise Expired(f"too old resource version: {since} ({self._history_floor})")
                for entry in self._history:
                    if entry.rv > since and entry.key == rt.key:
                        watcher.offer(entry.type, entry.old, entry.new)
            self._watchers.setdefault(rt.key, []).append(watcher)
            return initial, self._rv, watcher

    def _remove_watcher(self, watcher: Watcher) -> None:
        with self.lock:
            watchers = self._watchers.get(watcher.key, [])
            if watcher in watchers:
                watchers.remove(watcher)

    def all_objects(self, rts: Iterable[ResourceType] = RESOURCES) -> list[dict]:
        with self.lock:
            return [copy.deepcopy(o) for rt in rts for o in self._objects[rt.key].values()]
