"""The hand-written OTLP encoder against the reference built with the generated classes."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from kernel_side.export.otlp_proto import to_export_request
from kernel_side.export.otlp_wire import encode_export_request
from kernel_side.model import Resource, SpanKind, StatusCode
from tests.unit.test_export import RES_B, make_span


def _normal(request: ExportTraceServiceRequest) -> Any:
    """The request as plain data with attribute lists in key order: the reference puts cached
    attributes first, the wire encoder keeps the span's order; OTLP gives order no meaning."""
    doc = json_format.MessageToDict(request)

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: (sorted((walk(a) for a in v), key=lambda a: a["key"])
                        if k == "attributes" else walk(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(x) for x in node]
        return node

    return walk(doc)


def same(spans: list[Any]) -> None:
    parsed = ExportTraceServiceRequest.FromString(encode_export_request(spans))
    assert _normal(parsed) == _normal(to_export_request(spans))


def test_every_field_and_grouping_by_resource() -> None:
    spans = [
        make_span(1),
        make_span(2, resource=RES_B, parent=b"\x01" * 8, kind=SpanKind.CLIENT,
                  attributes={"s": "ü€", "i": -5, "big": 2**70, "f": 0.25, "t": True,
                              "n": False, "z": 0, "e": ""}),
        make_span(3, status=StatusCode.ERROR, message="boom: 500"),
        make_span(4, status=StatusCode.OK, kind=SpanKind.INTERNAL, attributes={}),
        make_span(5, resource=RES_B, message="only a message"),
    ]
    same(spans)
    # The caches are hit the second time round: still the same bytes' meaning.
    same(spans)
    same([])


def test_resource_with_no_attributes_and_empty_name() -> None:
    bare = Resource((9, 9), {})
    span = make_span(7, resource=bare)
    span.name = ""
    same([span])


values = st.one_of(st.text(max_size=40), st.integers(min_value=-(2**80), max_value=2**80),
                   st.booleans(), st.floats(allow_nan=False), st.just(""))


@settings(max_examples=300, deadline=None)
@given(attrs=st.dictionaries(st.text(min_size=1, max_size=20), values, max_size=8),
       parent=st.one_of(st.none(), st.binary(min_size=8, max_size=8)),
       status=st.sampled_from(list(StatusCode)), message=st.text(max_size=20))
def test_random_spans_match_the_reference(attrs: dict[str, Any], parent: bytes | None,
                                          status: StatusCode, message: str) -> None:
    same([make_span(1, attributes=attrs, parent=parent, status=status, message=message),
          make_span(2, resource=RES_B, attributes=attrs)])
