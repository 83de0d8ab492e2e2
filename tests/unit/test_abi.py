"""The context-map ABI on the Python side: layouts, encoding, limits, validation."""

from __future__ import annotations

import math

import pytest

from bridge import _abi
from bridge._abi import (
    ATTR_BYTES,
    CTX_F_TRUNCATED,
    MAX_ATTRS,
    MAX_KEY_LEN,
    MAX_STR_LEN,
    AttrValue,
    check_attr,
    decode_attrs,
    encode_attr,
    encode_attrs,
    pack_value,
    valid_key,
)


def test_layout_sizes_match_the_c_header() -> None:
    # struct bridge_ctx_key: u64 + u32 + u32; struct bridge_ctx_value: 40-byte header + data.
    assert _abi.CTX_KEY.size == 16
    assert _abi.CTX_VALUE_HEADER.size == 40
    assert _abi.CTX_VALUE_SIZE == 40 + ATTR_BYTES == 360
    assert f"{_abi.PIN_DIR}/{_abi.CTX_BY_TID_NAME}" == _abi.CTX_BY_TID_PIN


def test_round_trip_every_type() -> None:
    attrs: dict[str, AttrValue] = {
        "tenant_id": "acme",
        "user.id": "u-42",
        "retries": -3,
        "big": 2**63 - 1,
        "ratio": 0.25,
        "beta": True,
        "off": False,
        "unicode": "naïve ✓",
    }
    enc = encode_attrs(attrs)
    assert (enc.count, enc.truncated_values, enc.dropped_attrs) == (len(attrs), 0, 0)
    back = decode_attrs(enc.data, enc.count)
    assert back == attrs
    assert [type(v) for v in back.values()] == [type(v) for v in attrs.values()]


def test_bool_is_not_int() -> None:
    rec_bool, _ = encode_attr("f", True)
    rec_int, _ = encode_attr("f", 1)
    assert rec_bool[0] == _abi.ATTR_BOOL
    assert rec_int[0] == _abi.ATTR_INT
    assert decode_attrs(rec_bool, 1) == {"f": True}
    assert type(decode_attrs(rec_bool, 1)["f"]) is bool
    assert type(decode_attrs(rec_int, 1)["f"]) is int


def test_long_value_truncated_on_utf8_boundary() -> None:
    value = "a" + "é" * 100  # 1 + 200 bytes: a cut at 128 would split an "é"
    rec, cut = encode_attr("k", value)
    assert cut
    got = decode_attrs(rec, 1)["k"]
    assert isinstance(got, str)
    assert value.startswith(got)
    assert len(got.encode()) == MAX_STR_LEN - 1
    enc = encode_attrs({"k": value, "ok": "x" * MAX_STR_LEN})
    assert enc.truncated_values == 1
    assert decode_attrs(enc.data, enc.count)["ok"] == "x" * MAX_STR_LEN


def test_truncate_utf8_keeps_valid_prefix() -> None:
    raw = "€uro".encode() * 50
    for limit in range(0, 40):
        out = _abi.truncate_utf8(raw, limit)
        assert len(out) <= limit
        out.decode("utf-8")  # strict: must not raise


def test_lone_surrogate_becomes_valid_utf8() -> None:
    rec, _ = encode_attr("k", "a\ud800b")
    got = decode_attrs(rec, 1)["k"]
    assert got == "a?b"


def test_too_many_attrs_are_dropped_in_order() -> None:
    attrs = {f"k{i}": i for i in range(MAX_ATTRS + 3)}
    enc = encode_attrs(attrs)
    assert (enc.count, enc.dropped_attrs) == (MAX_ATTRS, 3)
    assert list(decode_attrs(enc.data, enc.count)) == [f"k{i}" for i in range(MAX_ATTRS)]


def test_byte_budget() -> None:
    # Each record is 4 + 2 + 128 = 134 bytes: two fit in 320, the third does not.
    attrs = {f"k{i}": "v" * MAX_STR_LEN for i in range(3)}
    enc = encode_attrs(attrs)
    assert (enc.count, enc.dropped_attrs) == (2, 1)
    assert len(enc.data) <= ATTR_BYTES
    # A later, smaller attribute still fits after a dropped one.
    enc = encode_attrs({**attrs, "small": 1})
    assert enc.count == 3
    assert "small" in decode_attrs(enc.data, enc.count)


def test_pack_value_header_and_flags() -> None:
    enc = encode_attrs({"a": 1})
    value = pack_value(enc)
    assert len(value) == _abi.CTX_VALUE_SIZE
    version, count, flags, data_len, *_ = _abi.CTX_VALUE_HEADER.unpack_from(value)
    assert (version, count, flags, data_len) == (_abi.ABI_VERSION, 1, 0, len(enc.data))
    cut = pack_value(encode_attrs({"a": "x" * (MAX_STR_LEN + 1)}))
    assert _abi.CTX_VALUE_HEADER.unpack_from(cut)[2] & CTX_F_TRUNCATED


@pytest.mark.parametrize(
    "key",
    ["", "1abc", "a b", "a/b", "ключ", "x" * (MAX_KEY_LEN + 1), "tenant\x00id"],
)
def test_invalid_keys_raise_value_error(key: str) -> None:
    assert not valid_key(key)
    with pytest.raises(ValueError, match="invalid attribute key"):
        check_attr(key, "v")


@pytest.mark.parametrize("key", ["a", "_x", "tenant_id", "http.route", "feature-flag", "x" * 48])
def test_valid_keys(key: str) -> None:
    assert valid_key(key)
    check_attr(key, "v")


@pytest.mark.parametrize("value", [None, b"bytes", [1], {"a": 1}, object(), 1j])
def test_bad_types_raise_type_error_naming_the_key(value: object) -> None:
    with pytest.raises(TypeError, match="'tenant_id'"):
        check_attr("tenant_id", value)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_rejected(value: float) -> None:
    with pytest.raises(ValueError, match="'ratio'"):
        check_attr("ratio", value)


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1])
def test_ints_out_of_range_rejected(value: int) -> None:
    with pytest.raises(ValueError, match="'n'"):
        check_attr("n", value)
    check_attr("n", 2**63 - 1)
    check_attr("n", -(2**63))


def test_decode_never_raises_on_garbage() -> None:
    assert decode_attrs(b"", 5) == {}
    assert decode_attrs(b"\x01\xff\xff\xff", 1) == {}
    # Unknown type is skipped, the next record still decodes.
    good, _ = encode_attr("b", 2)
    assert decode_attrs(b"\x09\x01\x01\x00ax" + good, 2) == {"b": 2}
    # Wrong length for an INT is skipped.
    assert decode_attrs(b"\x02\x01\x01\x00a\x05", 1) == {}
    # A count larger than MAX_ATTRS is capped.
    many = b"".join(encode_attr(f"k{i}", i)[0] for i in range(MAX_ATTRS + 2))
    assert len(decode_attrs(many, 255)) == MAX_ATTRS
