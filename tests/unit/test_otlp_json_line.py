"""The direct OTLP/JSON line writer (what the JSONL sink writes) against
``orjson.dumps(to_otlp_json(...))``, byte for byte."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_side.export.otlp_json import otlp_json_line, to_otlp_json
from kernel_side.model import Resource, SpanKind, StatusCode
from tests.unit.test_export import RES_B, make_span


def same(spans: list[Any]) -> None:
    reference = orjson.dumps(to_otlp_json(spans), option=orjson.OPT_APPEND_NEWLINE)
    assert otlp_json_line(spans) == reference
    assert orjson.loads(otlp_json_line(spans)) == to_otlp_json(spans)


def test_every_field_and_grouping_by_resource() -> None:
    spans = [
        make_span(1),
        make_span(2, resource=RES_B, parent=b"\x01" * 8, kind=SpanKind.CLIENT,
                  attributes={"s": "ü€\"\\\n", "i": -5, "big": 2**70, "f": 0.25, "t": True,
                              "n": False, "z": 0, "e": "", "neg0": -0.0, "zero": 0.0,
                              "nan": float("nan"), "inf": float("-inf")}),
        make_span(3, status=StatusCode.ERROR, message="boom: \"500\""),
        make_span(4, status=StatusCode.OK, kind=SpanKind.INTERNAL, attributes={}),
        make_span(5, resource=RES_B, message="only a message"),
        make_span(6),
    ]
    same(spans)
    same(spans)  # the caches are hit the second time round
    same([])


def test_resource_with_no_attributes_and_empty_name() -> None:
    bare = Resource((9, 9), {})
    span = make_span(7, resource=bare)
    span.name = ""
    span.start_ns = span.end_ns = 0
    same([span])


values = st.one_of(st.text(max_size=40), st.integers(min_value=-(2**80), max_value=2**80),
                   st.booleans(), st.floats(), st.just(""))


@settings(max_examples=300, deadline=None)
@given(attrs=st.dictionaries(st.text(min_size=1, max_size=20), values, max_size=8),
       parent=st.one_of(st.none(), st.binary(min_size=8, max_size=8)),
       name=st.text(max_size=30), kind=st.sampled_from(list(SpanKind)),
       status=st.sampled_from(list(StatusCode)), message=st.text(max_size=20))
def test_random_spans_match_the_reference(attrs: dict[str, Any], parent: bytes | None,
                                          name: str, kind: SpanKind, status: StatusCode,
                                          message: str) -> None:
    first = make_span(1, attributes=attrs, parent=parent, kind=kind, status=status,
                      message=message)
    first.name = name
    same([first, make_span(2, resource=RES_B, attributes=attrs), make_span(3, attributes=attrs)])
