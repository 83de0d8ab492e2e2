"""SpanRecord -> OTLP/JSON, shaped exactly as the OpenTelemetry Collector file exporter writes it.

Built straight from the records rather than via ``json_format.MessageToDict`` because OTLP/JSON
differs from the generic protobuf JSON mapping (ids are hex, not base64) and because this feeds
the default JSONL sink, where a generic reflection walk would cost several times more.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from kernel_side.export.otlp_proto import scope_version
from kernel_side.model import AttrValue, SpanRecord, StatusCode
from kernel_side.semconv import SCHEMA_URL, SCOPE_NAME

JsonDict = dict[str, Any]

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


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
        k = (key, type(value), value)
        kv = cache.get(k)
        if kv is None:
            kv = {"key": key, "value": _any_value(value)}
            if len(cache) >= _KV_CACHE_MAX:
                cache.clear()
            cache[k] = kv
        out.append(kv)
    return out


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
    if span.status is not StatusCode.UNSET or span.status_message:
        status: JsonDict = {}
        if span.status_message:
            status["message"] = span.status_message
        if span.status is not StatusCode.UNSET:
            status["code"] = int(span.status)
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
