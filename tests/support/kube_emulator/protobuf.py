"""Kubernetes protobuf bodies, decoded (and encoded, for tests) without a dependency.

client-go's typed clients may send built-in objects as
``application/vnd.kubernetes.protobuf`` (helm writes its release Secrets that
way). The body is an envelope::

    "k8s\\x00" + runtime.Unknown{ typeMeta=1 {apiVersion=1, kind=2},
                                   raw=2 (the object message), contentEncoding=3,
                                   contentType=4 }

``raw`` is the object's own message (``k8s.io/api`` ``generated.proto``). The
decoder here is schema-driven: a schema maps field numbers to a JSON name and
a field type, and only the kinds a client may send this way are described
(Secret, ConfigMap, Namespace, DeleteOptions, with their ObjectMeta). The
result is the JSON form the rest of the emulator stores. Answers are always
JSON: client-go accepts a JSON response to a protobuf request (it decodes by
the response ``Content-Type``).

Wire format: each field is a varint key ``(number << 3) | wire_type`` and a
value: varint (0), 64-bit (1), length-delimited (2) or 32-bit (5). Maps are
repeated entry messages ``{key=1, value=2}``.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
from typing import Any

__all__ = [
    "MAGIC",
    "ProtobufError",
    "decode_object",
    "encode_object",
    "read_varint",
    "iter_fields",
    "SCHEMAS",
]

MAGIC = b"k8s\x00"


class ProtobufError(ValueError):
    """A body that is not a Kubernetes protobuf object this emulator knows."""


# --------------------------------------------------------------------------
# wire format


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """``(value, new position)`` of the varint at ``pos``."""
    result = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise ProtobufError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise ProtobufError("varint too long")


def iter_fields(buf: bytes):
    """Yield ``(field number, wire type, value)``; value is int or bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = read_varint(buf, pos)
        elif wire == 1:
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wire == 2:
            length, pos = read_varint(buf, pos)
            if pos + length > len(buf):
                raise ProtobufError("truncated length-delimited field")
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        else:
            raise ProtobufError(f"unsupported wire type {wire} (field {number})")
        if pos > len(buf):
            raise ProtobufError("truncated field")
        yield number, wire, value


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _varint((number << 3) | wire)


def _len_field(number: int, payload: bytes) -> bytes:
    return _key(number, 2) + _varint(len(payload)) + payload


# --------------------------------------------------------------------------
# schemas: {number: (json name, type)}; a type is a str or a tuple
#   "string" "bytes" (base64 in JSON) "int" "bool" "time"
#   ("message", schema)  ("map", key type, value type)  ("repeated", type)

_TIME = "time"

OWNER_REFERENCE = {
    1: ("kind", "string"),
    3: ("name", "string"),
    4: ("uid", "string"),
    5: ("apiVersion", "string"),
    6: ("controller", "bool"),
    7: ("blockOwnerDeletion", "bool"),
}
MANAGED_FIELDS_ENTRY = {
    1: ("manager", "string"),
    2: ("operation", "string"),
    3: ("apiVersion", "string"),
    4: ("time", _TIME),
    6: ("fieldsType", "string"),
    7: ("fieldsV1", ("raw", "json")),
    8: ("subresource", "string"),
}
OBJECT_META = {
    1: ("name", "string"),
    2: ("generateName", "string"),
    3: ("namespace", "string"),
    4: ("selfLink", "string"),
    5: ("uid", "string"),
    6: ("resourceVersion", "string"),
    7: ("generation", "int"),
    8: ("creationTimestamp", _TIME),
    9: ("deletionTimestamp", _TIME),
    10: ("deletionGracePeriodSeconds", "int"),
    11: ("labels", ("map", "string", "string")),
    12: ("annotations", ("map", "string", "string")),
    13: ("ownerReferences", ("repeated", ("message", OWNER_REFERENCE))),
    14: ("finalizers", ("repeated", "string")),
    17: ("managedFields", ("repeated", ("message", MANAGED_FIELDS_ENTRY))),
}
SECRET = {
    1: ("metadata", ("message", OBJECT_META)),
    2: ("data", ("map", "string", "bytes")),
    3: ("type", "string"),
    4: ("stringData", ("map", "string", "string")),
    5: ("immutable", "bool"),
}
CONFIG_MAP = {
    1: ("metadata", ("message", OBJECT_META)),
    2: ("data", ("map", "string", "string")),
    3: ("binaryData", ("map", "string", "bytes")),
    4: ("immutable", "bool"),
}
NAMESPACE = {
    1: ("metadata", ("message", OBJECT_META)),
    2: ("spec", ("message", {1: ("finalizers", ("repeated", "string"))})),
    3: ("status", ("message", {1: ("phase", "string")})),
}
DELETE_OPTIONS = {
    1: ("gracePeriodSeconds", "int"),
    2: ("preconditions", ("message", {1: ("uid", "string"), 2: ("resourceVersion", "string")})),
    3: ("orphanDependents", "bool"),
    4: ("propagationPolicy", "string"),
    5: ("dryRun", ("repeated", "string")),
}
TYPE_META = {1: ("apiVersion", "string"), 2: ("kind", "string")}
UNKNOWN = {
    1: ("typeMeta", ("message", TYPE_META)),
    2: ("raw", "rawbytes"),
    3: ("contentEncoding", "string"),
    4: ("contentType", "string"),
}
_TIMESTAMP = {1: ("seconds", "int"), 2: ("nanos", "int")}

#: Kinds decodable from protobuf, by kind.
SCHEMAS: dict[str, dict[int, tuple[str, Any]]] = {
    "Secret": SECRET,
    "ConfigMap": CONFIG_MAP,
    "Namespace": NAMESPACE,
    "DeleteOptions": DELETE_OPTIONS,
}


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _format_time(seconds: int, nanos: int = 0) -> str:
    when = _dt.datetime.fromtimestamp(seconds, tz=_dt.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(text: str) -> int:
    text = text.replace("Z", "+00:00")
    return int(_dt.datetime.fromisoformat(text).timestamp())


def _decode_scalar(kind: Any, wire: int, value: Any) -> Any:
    if kind == "string":
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    if kind == "bytes":
        return base64.b64encode(value).decode("ascii")
    if kind == "rawbytes":
        return value
    if kind == "int":
        return _signed64(value)
    if kind == "bool":
        return bool(value)
    if kind == _TIME:
        fields = decode_message(value, _TIMESTAMP)
        return _format_time(fields.get("seconds", 0), fields.get("nanos", 0))
    if isinstance(kind, tuple) and kind[0] == "message":
        return decode_message(value, kind[1])
    if isinstance(kind, tuple) and kind[0] == "raw":  # FieldsV1 {raw=1 bytes of JSON}
        for number, _, raw in iter_fields(value):
            if number == 1:
                return json.loads(raw or b"{}")
        return {}
    raise ProtobufError(f"unsupported field type {kind!r}")


def decode_message(buf: bytes, schema: dict[int, tuple[str, Any]]) -> dict[str, Any]:
    """Decode one message with ``schema``; unknown fields are skipped."""
    out: dict[str, Any] = {}
    for number, wire, value in iter_fields(buf):
        if number not in schema:
            continue
        name, kind = schema[number]
        if isinstance(kind, tuple) and kind[0] == "map":
            entry = {"key": None, "value": None}
            for n, w, v in iter_fields(value):
                if n == 1:
                    entry["key"] = _decode_scalar(kind[1], w, v)
                elif n == 2:
                    entry["value"] = _decode_scalar(kind[2], w, v)
            default = "" if kind[2] in ("string", "bytes") else None
            out.setdefault(name, {})[entry["key"] or ""] = entry["value"] if entry["value"] is not None else default
        elif isinstance(kind, tuple) and kind[0] == "repeated":
            inner = kind[1]
            if wire == 2 and inner in ("int", "bool"):  # packed
                pos, items = 0, []
                while pos < len(value):
                    item, pos = read_varint(value, pos)
                    items.append(_decode_scalar(inner, 0, item))
                out.setdefault(name, []).extend(items)
            else:
                out.setdefault(name, []).append(_decode_scalar(inner, wire, value))
        else:
            out[name] = _decode_scalar(kind, wire, value)
    return out


def decode_object(body: bytes) -> dict[str, Any]:
    """A protobuf request body as the JSON object it stands for.

    Raises :class:`ProtobufError` for a body without the ``k8s\\x00`` magic,
    a compressed or non-protobuf ``raw``, or a kind without a schema here.
    """
    if not body.startswith(MAGIC):
        raise ProtobufError("protobuf body without the k8s\\x00 magic prefix")
    unknown = decode_message(body[len(MAGIC) :], UNKNOWN)
    type_meta = unknown.get("typeMeta", {})
    kind = type_meta.get("kind", "")
    if unknown.get("contentEncoding"):
        raise ProtobufError(f"unsupported protobuf contentEncoding {unknown['contentEncoding']!r}")
    schema = SCHEMAS.get(kind)
    if schema is None:
        raise ProtobufError(f"the emulator cannot decode kind {kind!r} from protobuf; send JSON")
    obj = decode_message(unknown.get("raw", b""), schema)
    result: dict[str, Any] = {"apiVersion": type_meta.get("apiVersion", "v1"), "kind": kind}
    result.update(obj)
    return result


# --------------------------------------------------------------------------
# encoder (tests, and a client that wants to speak protobuf)


def _encode_scalar(kind: Any, value: Any) -> tuple[int, bytes]:
    """``(wire type, payload)``; payload is the raw value for LEN fields."""
    if kind == "string":
        return 2, str(value).encode("utf-8")
    if kind == "bytes":
        return 2, base64.b64decode(value)
    if kind == "rawbytes":
        return 2, bytes(value)
    if kind == "int":
        return 0, _varint(int(value))
    if kind == "bool":
        return 0, _varint(1 if value else 0)
    if kind == _TIME:
        return 2, encode_message({"seconds": _parse_time(value)}, _TIMESTAMP)
    if isinstance(kind, tuple) and kind[0] == "message":
        return 2, encode_message(value, kind[1])
    if isinstance(kind, tuple) and kind[0] == "raw":
        return 2, _len_field(1, json.dumps(value, separators=(",", ":")).encode())
    raise ProtobufError(f"unsupported field type {kind!r}")


def _field(number: int, kind: Any, value: Any) -> bytes:
    wire, payload = _encode_scalar(kind, value)
    if wire == 2:
        return _len_field(number, payload)
    return _key(number, wire) + payload


def encode_message(obj: dict[str, Any], schema: dict[int, tuple[str, Any]]) -> bytes:
    out = bytearray()
    for number in sorted(schema):
        name, kind = schema[number]
        if name not in obj or obj[name] is None:
            continue
        value = obj[name]
        if isinstance(kind, tuple) and kind[0] == "map":
            for key in sorted(value):
                entry = _field(1, kind[1], key) + _field(2, kind[2], value[key])
                out += _len_field(number, entry)
        elif isinstance(kind, tuple) and kind[0] == "repeated":
            for item in value:
                out += _field(number, kind[1], item)
        else:
            out += _field(number, kind, value)
    return bytes(out)


def encode_object(obj: dict[str, Any]) -> bytes:
    """The protobuf envelope for a JSON object of a kind in :data:`SCHEMAS`."""
    kind = obj.get("kind", "")
    schema = SCHEMAS.get(kind)
    if schema is None:
        raise ProtobufError(f"no protobuf schema for kind {kind!r}")
    raw = encode_message(obj, schema)
    unknown = {
        "typeMeta": {"apiVersion": obj.get("apiVersion", "v1"), "kind": kind},
        "raw": raw,
        "contentEncoding": "",
        "contentType": "",
    }
    return MAGIC + encode_message({k: v for k, v in unknown.items() if v != ""}, UNKNOWN)
