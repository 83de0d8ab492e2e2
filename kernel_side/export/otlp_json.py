"""SpanRecord -> OTLP/JSON, shaped exactly as the OpenTelemetry Collector file exporter writes it.

Built straight from the records rather than via ``json_format.MessageToDict`` because OTLP/JSON
differs from the generic protobuf JSON mapping (ids are hex, not base64) and because this feeds
the default JSONL sink, where a generic reflection walk would cost several times more.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson

from kernel_side import _accel
from kernel_side.export.otlp_proto import scope_version
from kernel_side.model import AttrValue, Resource, SpanKind, SpanRecord, StatusCode
from kernel_side.semconv import SCHEMA_URL, SCOPE_NAME

JsonDict = dict[str, Any]

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1



def _status(span: SpanRecord) -> JsonDict | None:
    """The OTLP-JSON ``status`` of a span; None when it is unset and has no message."""
    if span.status is StatusCode.UNSET and not span.status_message:
        return None
    status: JsonDict = {}
    if span.status_message:
        status["message"] = span.status_message
    if span.status is not StatusCode.UNSET:
        status["code"] = int(span.status)
    return status

def _any_value(value: object) -> JsonDict:
    # Mirrors otlp_proto.set_any_value so both encodings agree on every input.
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int) and _INT64_MIN <= value <= _INT64_MAX:
        # The proto3 JSON mapping writes 64-bit integers as decimal strings.
        return {"intValue": str(value)}
    if isinstance(value, float):
        if math.isfinite(value):
            return {"doubleValue": value}
        # JSON has no NaN/Infinity literals; proto3 JSON spells them as strings.
        return {
            "doubleValue": "NaN"
            if math.isnan(value)
            else ("Infinity" if value > 0 else "-Infinity")
        }
    if isinstance(value, str):
        return {"stringValue": value}
    return {"stringValue": str(value)}


# Attribute values repeat from span to span (method, ports, a tenant): each distinct
# (key, type, value) becomes its KeyValue dict once. The dicts are only ever serialized, never
# mutated, so sharing them is safe. Bounded: dropped when full.
_KV_CACHE: dict[tuple[str, type, object], JsonDict] = {}
_KV_CACHE_MAX = 65_536


def attributes_json(attributes: Mapping[str, AttrValue]) -> list[JsonDict]:
    """OTLP/JSON ``KeyValue`` list for an attribute map."""
    cache = _KV_CACHE
    out: list[JsonDict] = []
    for key, value in attributes.items():
        t = type(value)
        if t is float:
            # Not cached: 0.0 == -0.0 would share one entry (and floats rarely repeat).
            out.append({"key": key, "value": _any_value(value)})
            continue
        k = (key, t, value)
        kv = cache.get(k)
        if kv is None:
            kv = {"key": key, "value": _any_value(value)}
            if len(cache) >= _KV_CACHE_MAX:
                cache.clear()
            cache[k] = kv
        out.append(kv)
    return out


# The same (key, type, value) -> its KeyValue already serialized, for the line writer below.
_KV_BYTES: dict[tuple[object, type, object], bytes] = {}
_NAME_BYTES: dict[str, bytes] = {}
_dumps = orjson.dumps


def _kv_bytes(key: object, value: object) -> bytes:
    """One attribute's serialized ``KeyValue``, through the cache. The C writer
    (kernel_side._fastjson) calls this for every key or value not of an exact str, int, bool
    or float type, so the isinstance chain and the cache exist once, here."""
    t = type(value)
    if t is float:
        # Not cached: 0.0 == -0.0 would share one entry (and floats rarely repeat).
        return _dumps({"key": key, "value": _any_value(value)})
    k = (key, t, value)
    cache = _KV_BYTES
    kv = cache.get(k)
    if kv is None:
        kv = _dumps({"key": key, "value": _any_value(value)})
        if len(cache) >= _KV_CACHE_MAX:
            cache.clear()
        cache[k] = kv
    return kv


def _attributes_bytes(attributes: Mapping[str, AttrValue]) -> bytes:
    cache = _KV_BYTES
    parts: list[bytes] = []
    for key, value in attributes.items():
        # The cache hit inline (the common case); floats and misses in _kv_bytes.
        t = type(value)
        kv = None if t is float else cache.get((key, t, value))
        parts.append(kv if kv is not None else _kv_bytes(key, value))
    return b",".join(parts)


def _span_bytes(span: SpanRecord) -> bytes:
    out = [b'{"traceId":"', span.trace_id.hex().encode(), b'","spanId":"',
           span.span_id.hex().encode(), b'"']
    if span.parent_span_id:
        out += (b',"parentSpanId":"', span.parent_span_id.hex().encode(), b'"')
    if span.name:
        name = _NAME_BYTES.get(span.name)
        if name is None:
            name = b',"name":' + _dumps(span.name)
            if len(_NAME_BYTES) >= _KV_CACHE_MAX:
                _NAME_BYTES.clear()
            _NAME_BYTES[span.name] = name
        out.append(name)
    if span.kind:
        out.append(b',"kind":%d' % int(span.kind))
    if span.start_ns:
        out.append(b',"startTimeUnixNano":"%d"' % span.start_ns)
    if span.end_ns:
        out.append(b',"endTimeUnixNano":"%d"' % span.end_ns)
    if span.attributes:
        out += (b',"attributes":[', _attributes_bytes(span.attributes), b"]")
    status = _status(span)
    if status is not None:
        out += (b',"status":', _dumps(status))
    out.append(b"}")
    return b"".join(out)


def _envelope() -> tuple[bytes, bytes]:
    """The serialized ``scope`` and ``schemaUrl`` of a batch's ScopeSpans, looked up per batch
    as ``to_otlp_json`` does; the C writer calls it too."""
    return _dumps({"name": SCOPE_NAME, "version": scope_version()}), _dumps(SCHEMA_URL)


def otlp_json_line_py(spans: Sequence[SpanRecord]) -> bytes:
    """``orjson.dumps(to_otlp_json(spans))`` plus a newline, byte for byte, written directly:
    each span's fields and each distinct attribute are serialized once into bytes and joined,
    instead of building the nested dicts and walking them again (the JSONL sink's hot path).

    The pure-Python writer: the reference for the C one, and what ``otlp_json_line`` is
    without it."""
    if not spans:
        return b"{}\n"
    groups: dict[tuple[int, int], list[bytes]] = {}
    heads: dict[tuple[int, int], bytes] = {}
    for span in spans:
        rkey = span.resource.key
        group = groups.get(rkey)
        if group is None:
            group = groups[rkey] = []
            head = b"{"
            if span.resource.attributes:
                head += (b'"resource":{"attributes":['
                         + _attributes_bytes(span.resource.attributes) + b"]},")
            heads[rkey] = head
        group.append(_span_bytes(span))
    scope, schema = _envelope()
    tail = b'],"schemaUrl":' + schema + b'}],"schemaUrl":' + schema + b"}"
    entries = [heads[rkey] + b'"scopeSpans":[{"scope":' + scope + b',"spans":['
               + b",".join(group) + tail for rkey, group in groups.items()]
    return b'{"resourceSpans":[' + b",".join(entries) + b"]}\n"


# The line writer the JSONL sink calls: the C one from kernel_side._fastjson when it is built
# (it writes the common records itself and hands every other batch to otlp_json_line_py, and
# odd attributes to _kv_bytes, so the rare rules exist once), else the pure-Python one.
# EBPF_BRIDGE_NO_ACCEL=1 selects the pure-Python one, as it does for the other accelerators.
otlp_json_line: Callable[[Sequence[SpanRecord]], bytes] = otlp_json_line_py
ACCELERATED = False
"""Whether ``otlp_json_line`` is the C writer."""
_fastjson = _accel.load("_fastjson")
if _fastjson is not None:
    _fastjson.configure(SpanRecord, Resource, SpanKind, StatusCode, StatusCode.UNSET,
                        otlp_json_line_py, _kv_bytes, _envelope, _dumps)
    otlp_json_line = _fastjson.otlp_json_line
    ACCELERATED = True


def _span_json(span: SpanRecord) -> JsonDict:
    out: JsonDict = {"traceId": span.trace_id.hex(), "spanId": span.span_id.hex()}
    if span.parent_span_id:
        out["parentSpanId"] = span.parent_span_id.hex()
    if span.name:
        out["name"] = span.name
    if span.kind:
        out["kind"] = int(span.kind)
    if span.start_ns:
        out["startTimeUnixNano"] = str(span.start_ns)
    if span.end_ns:
        out["endTimeUnixNano"] = str(span.end_ns)
    if span.attributes:
        out["attributes"] = attributes_json(span.attributes)
    status = _status(span)
    if status is not None:
        out["status"] = status
    return out


def to_otlp_json(spans: Sequence[SpanRecord]) -> JsonDict:
    """One OTLP/JSON ``ExportTraceServiceRequest`` object, ready for ``json.dumps``.

    lowerCamelCase keys, lowercase hex ids, integer enums, 64-bit integers as decimal strings,
    empty fields omitted; grouped by resource exactly like ``to_export_request``.
    """
    resource_spans: list[JsonDict] = []
    by_resource: dict[tuple[int, int], list[JsonDict]] = {}
    scope = {"name": SCOPE_NAME, "version": scope_version()}
    for span in spans:
        out_spans = by_resource.get(span.resource.key)
        if out_spans is None:
            out_spans = by_resource[span.resource.key] = []
            entry: JsonDict = {}
            if span.resource.attributes:
                entry["resource"] = {"attributes": attributes_json(span.resource.attributes)}
            entry["scopeSpans"] = [{"scope": scope, "spans": out_spans, "schemaUrl": SCHEMA_URL}]
            entry["schemaUrl"] = SCHEMA_URL
            resource_spans.append(entry)
        out_spans.append(_span_json(span))
    return {"resourceSpans": resource_spans} if resource_spans else {}
