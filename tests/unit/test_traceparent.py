"""W3C ``traceparent`` parsing and formatting (cases from the W3C Trace Context spec)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernel_side.protocols.traceparent import TraceParent, format_traceparent, parse_traceparent

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_parses_spec_example() -> None:
    tp = parse_traceparent(VALID)
    assert tp == TraceParent(
        bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736"), bytes.fromhex("00f067aa0ba902b7"), 1
    )
    assert tp is not None and tp.sampled


def test_unsampled_and_unknown_flag_bits_are_kept() -> None:
    tp = parse_traceparent(VALID[:-2] + "00")
    assert tp is not None and tp.flags == 0 and not tp.sampled
    tp = parse_traceparent(VALID[:-2] + "ff")
    assert tp is not None and tp.flags == 0xFF


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        VALID[:-1],  # too short
        VALID + "0",  # version 00 must be exactly 55 characters
        VALID + "-extra",  # ... even with a dash
        VALID.upper(),  # hex must be lowercase
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0A",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # all-zero span id
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # forbidden version
        "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # version not hex
        "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # bad separators
        "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7_01",
        "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",  # misplaced dash
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bz-01",  # non-hex
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0 ",
        "00- bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # fromhex would skip spaces
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-+1",
        "00-4bf92f3577b34da6a3ce929d0e0e47é6-00f067aa0ba902b7-01",  # non-ASCII
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",  # future: 56th not '-'
    ],
)
def test_rejects_invalid(value: str | None) -> None:
    assert parse_traceparent(value) is None


@pytest.mark.parametrize(
    "value",
    [
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds",
        "fe-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09-",
    ],
)
def test_future_versions_parse_first_55_chars(value: str) -> None:
    tp = parse_traceparent(value)
    assert tp is not None
    assert tp.trace_id.hex() == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert tp.span_id.hex() == "00f067aa0ba902b7"


def test_format_is_version_00() -> None:
    tp = TraceParent(bytes(range(1, 17)), bytes(range(1, 9)), 1)
    assert format_traceparent(tp) == "00-0102030405060708090a0b0c0d0e0f10-0102030405060708-01"


@pytest.mark.parametrize(
    "tp",
    [
        TraceParent(b"\x01" * 15, b"\x01" * 8, 1),
        TraceParent(b"\x01" * 16, b"\x01" * 9, 1),
        TraceParent(b"\x01" * 16, b"\x01" * 8, 256),
        TraceParent(b"\x01" * 16, b"\x01" * 8, -1),
    ],
)
def test_format_rejects_malformed_records(tp: TraceParent) -> None:
    with pytest.raises(ValueError):
        format_traceparent(tp)


@given(
    st.binary(min_size=16, max_size=16).filter(any),
    st.binary(min_size=8, max_size=8).filter(any),
    st.integers(0, 255),
)
def test_round_trip(trace_id: bytes, span_id: bytes, flags: int) -> None:
    tp = TraceParent(trace_id, span_id, flags)
    assert parse_traceparent(format_traceparent(tp)) == tp


@given(st.text(max_size=80))
def test_never_raises(value: str) -> None:
    parse_traceparent(value)
