"""The four PATCH flavours, good enough for helm, kubectl and the Python client.

- JSON merge patch (RFC 7386): maps merge, ``null`` deletes, lists replace.
- Strategic merge patch: a merge patch whose lists of maps with a known
  merge key (``containers`` by ``name``, ``volumeMounts`` by ``mountPath``,
  ...) merge element by element, with the directives helm's three-way patches
  use: ``$patch: delete|replace|merge``, ``$setElementOrder/<list>``,
  ``$deleteFromPrimitiveList/<list>``, ``$retainKeys``. Lists without a merge
  key replace, as in the real thing for atomic lists.
- JSON patch (RFC 6902): add, remove, replace, move, copy, test.
- Server-side apply: the applied configuration is merged onto the live
  object after removing what the same field manager applied last time and
  no longer applies (lists are atomic). Conflicts between managers are not
  detected and ``managedFields`` are not kept.
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = [
    "PatchError",
    "merge_patch",
    "strategic_merge_patch",
    "json_patch",
    "apply_patch",
]


class PatchError(ValueError):
    """A patch that cannot be applied (answered 422 or 400)."""


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# --------------------------------------------------------------------------
# strategic merge patch

#: Field name -> merge key(s), tried in order (``ports`` is keyed by
#: ``containerPort`` in containers and by ``port`` in Services).
MERGE_KEYS: dict[str, tuple[str, ...]] = {
    "containers": ("name",),
    "initContainers": ("name",),
    "ephemeralContainers": ("name",),
    "env": ("name",),
    "volumes": ("name",),
    "volumeMounts": ("mountPath",),
    "volumeDevices": ("devicePath",),
    "ports": ("containerPort", "port"),
    "imagePullSecrets": ("name",),
    "hostAliases": ("ip",),
    "conditions": ("type",),
    "ownerReferences": ("uid",),
    "topologySpreadConstraints": ("topologyKey",),
    "resourceClaims": ("name",),
    "secrets": ("name",),
}
#: Lists of scalars merged as sets.
MERGED_PRIMITIVE_LISTS = {"finalizers"}


def _merge_key(field: str, items: list) -> str | None:
    keys = MERGE_KEYS.get(field)
    if not keys:
        return None
    dicts = [i for i in items if isinstance(i, dict)]
    if len(dicts) != len(items):
        return None
    for key in keys:
        if all(key in i or "$patch" in i for i in dicts):
            return key
    return None


def _merge_list(field: str, original: Any, patch: list, order: list | None) -> list:
    original = copy.deepcopy(original) if isinstance(original, list) else []
    if field in MERGED_PRIMITIVE_LISTS and all(not isinstance(i, (dict, list)) for i in patch):
        result = list(original)
        for item in patch:
            if item not in result:
                result.append(item)
        return result
    # A {"$patch": "replace"} element replaces the whole list with the others.
    if any(isinstance(i, dict) and i.get("$patch") == "replace" for i in patch):
        return [copy.deepcopy(i) for i in patch if not (isinstance(i, dict) and i.get("$patch") == "replace")]
    key = _merge_key(field, patch) or (_merge_key(field, original) if not patch else None)
    if key is None:
        return copy.deepcopy(patch)
    result = original
    for item in patch:
        directive = item.get("$patch")
        kval = item.get(key)
        idx = next((n for n, o in enumerate(result) if isinstance(o, dict) and o.get(key) == kval), None)
        if directive == "delete":
            if idx is not None:
                result.pop(idx)
            continue
        clean = {k: v for k, v in item.items() if k != "$patch"}
        if idx is None:
            result.append(strategic_merge_patch({}, clean))
        else:
            result[idx] = strategic_merge_patch(result[idx], clean)
    if order:
        rank = {o.get(key) if isinstance(o, dict) else o: n for n, o in enumerate(order)}
        listed = sorted((o for o in result if o.get(key) in rank), key=lambda o: rank[o.get(key)])
        rest = [o for o in result if o.get(key) not in rank]
        result = listed + rest
    return result


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Kubernetes strategic merge patch (see the module docstring for what is covered)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    directive = patch.get("$patch")
    if directive == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    if directive == "delete":
        return None
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    retain = patch.get("$retainKeys")
    orders: dict[str, list] = {}
    for key, value in patch.items():
        if key.startswith("$setElementOrder/"):
            orders[key.split("/", 1)[1]] = value
    for key, value in patch.items():
        if key in ("$patch", "$retainKeys") or key.startswith("$setElementOrder/"):
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            if isinstance(result.get(field), list):
                result[field] = [v for v in result[field] if v not in value]
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict):
            merged = strategic_merge_patch(result.get(key), value)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
        elif isinstance(value, list):
            result[key] = _merge_list(key, result.get(key), value, orders.get(key))
        else:
            result[key] = value
    for field, order in orders.items():
        if field not in patch and isinstance(result.get(field), list):
            result[field] = _merge_list(field, result[field], [], order)
    if isinstance(retain, list):
        result = {k: v for k, v in result.items() if k in retain}
    return result


# --------------------------------------------------------------------------
# JSON patch


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def _parent(doc: Any, pointer: str) -> tuple[Any, str]:
    if not pointer.startswith("/"):
        raise PatchError(f"invalid JSON pointer {pointer!r}")
    tokens = [_unescape(t) for t in pointer[1:].split("/")]
    node = doc
    for token in tokens[:-1]:
        if isinstance(node, list):
            try:
                node = node[int(token)]
            except (ValueError, IndexError):
                raise PatchError(f"path {pointer!r} not found") from None
        elif isinstance(node, dict) and token in node:
            node = node[token]
        else:
            raise PatchError(f"path {pointer!r} not found")
    return node, tokens[-1]


def _get(doc: Any, pointer: str) -> Any:
    if pointer == "":
        return doc
    parent, last = _parent(doc, pointer)
    try:
        return parent[int(last)] if isinstance(parent, list) else parent[last]
    except (KeyError, IndexError, ValueError, TypeError):
        raise PatchError(f"path {pointer!r} not found") from None


def _add(doc: Any, pointer: str, value: Any) -> Any:
    if pointer == "":
        return value
    parent, last = _parent(doc, pointer)
    if isinstance(parent, list):
        if last == "-":
            parent.append(value)
        else:
            try:
                index = int(last)
            except ValueError:
                raise PatchError(f"invalid list index in {pointer!r}") from None
            if index > len(parent):
                raise PatchError(f"index out of range in {pointer!r}")
            parent.insert(index, value)
    elif isinstance(parent, dict):
        parent[last] = value
    else:
        raise PatchError(f"cannot add at {pointer!r}")
    return doc


def _remove(doc: Any, pointer: str) -> Any:
    parent, last = _parent(doc, pointer)
    try:
        if isinstance(parent, list):
            parent.pop(int(last))
        else:
            del parent[last]
    except (KeyError, IndexError, ValueError, TypeError):
        raise PatchError(f"path {pointer!r} not found") from None
    return doc


def json_patch(target: Any, operations: Any) -> Any:
    """RFC 6902."""
    if not isinstance(operations, list):
        raise PatchError("a JSON patch must be a list of operations")
    doc = copy.deepcopy(target)
    for op in operations:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise PatchError(f"invalid JSON patch operation {op!r}")
        kind, path = op["op"], op["path"]
        if kind == "add":
            doc = _add(doc, path, copy.deepcopy(op.get("value")))
        elif kind == "remove":
            doc = _remove(doc, path)
        elif kind == "replace":
            _get(doc, path)
            doc = _remove(doc, path) if path else doc
            doc = _add(doc, path, copy.deepcopy(op.get("value")))
        elif kind == "move":
            value = _get(doc, op["from"])
            doc = _remove(doc, op["from"])
            doc = _add(doc, path, value)
        elif kind == "copy":
            doc = _add(doc, path, copy.deepcopy(_get(doc, op["from"])))
        elif kind == "test":
            if _get(doc, path) != op.get("value"):
                raise PatchError(f"test operation failed at {path!r}")
        else:
            raise PatchError(f"unknown JSON patch operation {kind!r}")
    return doc


# --------------------------------------------------------------------------
# server-side apply


def _leaf_paths(obj: Any, prefix: tuple = ()) -> set[tuple]:
    """Paths to every non-map value (lists count as leaves: atomic)."""
    if isinstance(obj, dict) and obj:
        out: set[tuple] = set()
        for key, value in obj.items():
            out |= _leaf_paths(value, prefix + (key,))
        return out
    return {prefix} if prefix else set()


def _has_path(obj: Any, path: tuple) -> bool:
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return False
        obj = obj[key]
    return True


def _drop_path(obj: dict, path: tuple) -> None:
    chain = [obj]
    for key in path[:-1]:
        nxt = chain[-1].get(key)
        if not isinstance(nxt, dict):
            return
        chain.append(nxt)
    chain[-1].pop(path[-1], None)
    # prune maps left empty by the removal
    for depth in range(len(chain) - 1, 0, -1):
        if not chain[depth]:
            chain[depth - 1].pop(path[depth - 1], None)


def _overlay(base: Any, config: Any) -> Any:
    if isinstance(base, dict) and isinstance(config, dict):
        result = copy.deepcopy(base)
        for key, value in config.items():
            result[key] = _overlay(result.get(key), value)
        return result
    return copy.deepcopy(config)


def apply_patch(live: dict | None, config: dict, previous: dict | None) -> dict:
    """Server-side apply of ``config`` onto ``live`` (None: create).

    ``previous`` is what the same field manager applied last time: fields it
    had and ``config`` no longer has are removed from the live object.
    """
    if live is None:
        return copy.deepcopy(config)
    base = copy.deepcopy(live)
    if previous:
        for path in _leaf_paths(previous) - _leaf_paths(config):
            if path[:1] in (("apiVersion",), ("kind",)):
                continue
            if not _has_path(config, path):
                _drop_path(base, path)
    return _overlay(base, config)
