"""SpanRecord -> OTLP protobuf ``ExportTraceServiceRequest`` built with the generated classes.

The exporters send bytes from ``otlp_wire`` instead (cheaper); this builder is the reference
those bytes are checked against (``tests/unit/test_otlp_wire.py``) and the baseline
``bench/pipeline_bench.py`` compares with. It fills the messages in place through ``add()`` and
direct field assignment: with the upb backend that is several times cheaper than building
``KeyValue``/``AnyValue`` objects and copying them in via constructors.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping, Sequence
from functools import cache

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from kernel_side.model import AttrValue, SpanRecord, StatusCode
from kernel_side.semconv import SCHEMA_URL, SCOPE_NAME

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


@cache
def scope_version() -> str:
    """The installed ebpf-bridge version, reported as the instrumentation scope version."""
    try:
        return importlib.metadata.version("ebpf-bridge")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def set_any_value(target: AnyValue, value: object) -> None:
    """Store a Python attribute value in ``target`` without ever raising.

    Values outside what OTLP scalars can hold (ints beyond int64, unexpected types) are sent as
    their string form rather than losing the span: the agent must not crash on odd input.
    """
    # bool is tested before int because bool is an int subclass.
    if isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, int) and _INT64_MIN <= value <= _INT64_MAX:
        target.int_value = value
    elif isinstance(value, float):
        target.double_value = value
    elif isinstance(value, str):
        target.string_value = value
    else:
        target.string_value = str(value)


def fill_attributes(
    target: RepeatedCompositeFieldContainer[KeyValue], attributes: Mapping[str, AttrValue]
) -> None:
    """Append ``attributes`` to a repeated ``KeyValue`` field."""
    add = target.add
    for key, value in attributes.items():
        any_value = add(key=key).value
        # Exact-type checks keep the common case to one comparison each (and bool is not
        # ``int`` here, so order is free); subclasses and odd values take the careful path.
        if type(value) is str:
            any_value.string_value = value
        elif type(value) is int and _INT64_MIN <= value <= _INT64_MAX:
            any_value.int_value = value
        elif type(value) is float:
            any_value.double_value = value
        elif type(value) is bool:
            any_value.bool_value = value
        else:
            set_any_value(any_value, value)


class _AttributeFragments:
    """Serialized attribute fields for values that keep coming back.

    Most span attributes repeat (method, scheme, ports, service-level values, a tenant), and
    with upb each ``KeyValue`` filled field by field costs far more than parsing its bytes.
    Protobuf itself serializes a ``Span`` holding just that one attribute; those bytes, joined,
    are the attributes field of a span, merged with one ``MergeFromString``. A value becomes a
    fragment on its second sighting, so one-off values (ephemeral ports, ids in paths) cost
    nothing extra. Bounded: the table is dropped when full.
    """

    def __init__(self, max_entries: int = 65_536) -> None:
        self._frags: dict[tuple[str, type, object], bytes] = {}
        self._seen: set[tuple[str, type, object]] = set()
        self._max = max_entries

    def split(self, attributes: Mapping[str, AttrValue]) -> tuple[bytes, dict[str, AttrValue]]:
        """The joined fragments of known attributes and the rest, to fill the usual way."""
        frags = self._frags
        found: list[bytes] = []
        rest: dict[str, AttrValue] = {}
        for key, value in attributes.items():
            k = (key, type(value), value)
            frag = frags.get(k)
            if frag is not None:
                found.append(frag)
            elif k in self._seen:
                frag = self._fragment(key, value)
                if len(frags) >= self._max:
                    frags.clear()
                frags[k] = frag
                found.append(frag)
            else:
                if len(self._seen) >= self._max:
                    self._seen.clear()
                self._seen.add(k)
                rest[key] = value
        return b"".join(found), rest

    @staticmethod
    def _fragment(key: str, value: AttrValue) -> bytes:
        holder = Span()
        fill_attributes(holder.attributes, {key: value})
        data: bytes = holder.SerializeToString()
        return data


_FRAGMENTS = _AttributeFragments()


def _fill_span(out: Span, span: SpanRecord) -> None:
    if span.parent_span_id:
        out.parent_span_id = span.parent_span_id
    if span.attributes:
        known, rest = _FRAGMENTS.split(span.attributes)
        if known:
            out.MergeFromString(known)
        if rest:
            fill_attributes(out.attributes, rest)
    if span.status is not StatusCode.UNSET or span.status_message:
        out.status.code = Status.StatusCode.ValueType(span.status.value)
        if span.status_message:
            out.status.message = span.status_message


def to_export_request(spans: Sequence[SpanRecord]) -> ExportTraceServiceRequest:
    """Build one OTLP export request: one ``ResourceSpans`` per resource, one scope each.

    Resources are grouped by ``Resource.key`` (not by comparing attribute maps), in order of
    first appearance; the scope is ``SCOPE_NAME`` at the package version, and both levels carry
    the pinned semconv ``SCHEMA_URL``.
    """
    request = ExportTraceServiceRequest()
    by_resource: dict[tuple[int, int], RepeatedCompositeFieldContainer[Span]] = {}
    version = scope_version()
    for span in spans:
        resource = span.resource
        out_spans = by_resource.get(resource.key)
        if out_spans is None:
            resource_spans = request.resource_spans.add(schema_url=SCHEMA_URL)
            fill_attributes(resource_spans.resource.attributes, resource.attributes)
            scope_spans = resource_spans.scope_spans.add(schema_url=SCHEMA_URL)
            scope_spans.scope.name = SCOPE_NAME
            scope_spans.scope.version = version
            out_spans = by_resource[resource.key] = scope_spans.spans
        out = out_spans.add(
            trace_id=span.trace_id,
            span_id=span.span_id,
            name=span.name,
            kind=span.kind.value,
            start_time_unix_nano=span.start_ns,
            end_time_unix_nano=span.end_ns,
        )
        if span.parent_span_id or span.attributes or span.status or span.status_message:
            _fill_span(out, span)
    return request
