"""The C OTLP wire encoder (``kernel_side._fastwire``) against the pure-Python one.

``otlp_wire.encode_export_request_py`` is the specification: the C encoder must write the
same bytes for every batch it takes, and hand every batch it does not take back to Python
(returning None) without side effects. The differential test feeds both 900 random batches
(3 seeds x 300, 1-40 spans over interleaved resources) built to reach every branch: strings
with non-ASCII text, lone surrogates and lengths that need 2- and 3-byte varints, every
scalar type at its edges, values only Python can encode (str subclasses, IntEnum, ints beyond
int64, other objects), ids, kinds, timestamps and statuses in all their shapes. It asserts
that the C path really ran (a None would compare Python with itself) and that the generated
protobuf classes parse the bytes.
"""

from __future__ import annotations

import contextlib
import enum
import os
import random
import struct
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from kernel_side.export import otlp_wire
from kernel_side.model import Resource, SpanKind, SpanRecord, StatusCode

REPO = Path(__file__).resolve().parents[2]

needs_c = pytest.mark.skipif(
    not otlp_wire.ACCELERATED,
    reason="kernel_side._fastwire is not built or EBPF_BRIDGE_NO_ACCEL is set "
    "(build it with `.venv/bin/pip install -e . --no-deps`)",
)


def c_encode(spans: Any) -> bytes | None:
    """The C encoder itself, with the constant pieces the wrapper passes."""
    from kernel_side import _fastwire

    return _fastwire.encode(spans, otlp_wire._scope_field(), otlp_wire._SCHEMA_FIELD)


class Tag(str):
    """A str subclass: encoded as str(value), not as the str it is."""

    def __str__(self) -> str:
        return "tag:" + super().__str__()


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2**40
    HUGE = 2**70  # an IntEnum beyond int64: its str() form


class Perm(enum.IntFlag):
    R = 4
    W = 2


class Meters(float):
    pass


class Odd:
    """An arbitrary object whose string form has a lone surrogate."""

    def __str__(self) -> str:
        return "odd\ud800é"


NAN_PAYLOAD = struct.unpack("<d", b"\x01\x00\x00\x00\x00\x00\xf8\x7f")[0]

TEXT = ["", "a", "GET", "/orders/4711", "ü€", "漢字", "😀 emoji", "\ud800", "a\udfffb",
        "\udc80\ud800x", "tab\tnl\n\x00nul", "é" * 64, "x" * 127, "y" * 128]
INTS = [0, 1, -1, 127, 128, -128, 255, 300, 2**31, -(2**31), 2**62, 2**63 - 1, -(2**63),
        2**63, -(2**63) - 1, 2**64 - 1, 2**64, 2**70, -(2**80), 10**30]
FLOATS = [0.0, -0.0, 1.5, -2.25, float("nan"), float("inf"), float("-inf"), 5e-324, 1e308,
          NAN_PAYLOAD, 0.1]
ODD = [Tag("vip"), Tag(""), Level.LOW, Level.HIGH, Level.HUGE, Perm.R | Perm.W, Meters(2.5),
       None, b"raw", (1, 2), Odd(), SpanKind.CLIENT, StatusCode.ERROR]


RES = Resource((1, 1), {"service.name": "s"})


def make(**fields: Any) -> SpanRecord:
    """A span with these fields over plain defaults; any type goes (the point is odd input)."""
    values: dict[str, Any] = dict(trace_id=b"\x01" * 16, span_id=b"\x02" * 8,
                                  parent_span_id=None, name="n", kind=SpanKind.SERVER,
                                  start_ns=1, end_ns=2, resource=RES)
    values.update(fields)
    return SpanRecord(**values)


def rand_text(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.5:
        return rng.choice(TEXT)
    if r < 0.8:
        alphabet = "abcxyz/-_. 0189ßüé€漢😀\ud800\udfff"
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40)))
    if r < 0.97:
        return rng.choice("aé€") * rng.randrange(40, 300)  # 2-byte length varints
    return "z" * rng.randrange(16384, 20000)  # a 3-byte length varint, and a span above 16 KiB


def rand_value(rng: random.Random) -> object:
    r = rng.random()
    if r < 0.35:
        return rand_text(rng)
    if r < 0.45:
        return rng.random() < 0.5
    if r < 0.65:
        return rng.choice(INTS) if rng.random() < 0.6 else rng.randrange(-(2**64), 2**64)
    if r < 0.8:
        return rng.choice(FLOATS) if rng.random() < 0.6 else rng.uniform(-1e9, 1e9)
    return rng.choice(ODD)


def rand_attrs(rng: random.Random, most: int) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    for _ in range(rng.randrange(0, most + 1)):
        key = rng.choice(["http.request.method", "url.path", "server.port", "user_id", "k",
                          "", "ключ", "k\ud800", "x" * 200]) if rng.random() < 0.6 \
            else rand_text(rng)[:50]
        attrs[key] = rand_value(rng)
    return attrs


def rand_time(rng: random.Random) -> int:
    return rng.choice([0, 0, 1, 1_700_000_000_123_456_789, 2**63 - 1, 2**64 - 1, 2**64,
                       2**64 + 5, -1, -(2**70), rng.randrange(2**64)])


def make_resources(rng: random.Random) -> list[Resource]:
    resources = [Resource((rng.randrange(1, 2**22), rng.randrange(2**40)), rand_attrs(rng, 6))
                 for _ in range(rng.randrange(1, 5))]
    resources.append(Resource((rng.randrange(2**22), 0), {}))  # no Resource field at all
    first = resources[0]
    # The same key in another object (built anew, so not the same tuple): one group with it.
    resources.append(Resource((first.key[0] + 0, first.key[1] + 0), {"ignored": True}))
    return resources


def rand_span(rng: random.Random, resources: list[Resource]) -> SpanRecord:
    return make(
        trace_id=rng.randbytes(16),
        span_id=rng.randbytes(8),
        parent_span_id=rng.choice([None, b"", rng.randbytes(8)]),
        name=rand_text(rng) if rng.random() < 0.9 else "",
        kind=rng.choice([*SpanKind, 0, 1, 3]),  # plain ints too
        start_ns=rand_time(rng),
        end_ns=rand_time(rng),
        resource=rng.choice(resources),
        attributes=rand_attrs(rng, 20),
        status=rng.choice([*StatusCode, 0, 2]),  # a plain 0 is not UNSET: written as code 0
        status_message=rand_text(rng) if rng.random() < 0.5 else "",
    )


def check_same(spans: list[SpanRecord], parse: bool = True) -> bytes:
    """Both encoders' bytes are equal, the C path ran, the wrapper agrees, protobuf parses."""
    fast = c_encode(spans)
    assert fast is not None, "the C encoder declined a batch it should take"
    slow = otlp_wire.encode_export_request_py(spans)
    assert fast == slow
    assert otlp_wire.encode_export_request(spans) == slow
    if not parse:
        return fast
    request = ExportTraceServiceRequest.FromString(fast)
    keys = list(dict.fromkeys(s.resource.key for s in spans))
    assert len(request.resource_spans) == len(keys)
    assert sum(len(rs.scope_spans[0].spans) for rs in request.resource_spans) == len(spans)
    return fast


@needs_c
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_batches_are_byte_identical(seed: int) -> None:
    rng = random.Random(seed)
    resources = make_resources(rng)
    for i in range(300):
        if i % 50 == 0:
            resources = make_resources(rng)
        batch = [rand_span(rng, resources) for _ in range(rng.randrange(1, 41))]
        check_same(batch)
        if i % 10 == 0:
            check_same(batch)  # again, now that the Python caches hold its fields


@needs_c
def test_edges() -> None:
    assert c_encode([]) == otlp_wire.encode_export_request_py([]) == b""
    check_same([make()])
    # A span of 28 bytes (1-byte length, the body moves back) and one above 2 MiB (4 bytes).
    check_same([make(name="", kind=0, start_ns=0, end_ns=0)])
    check_same([make(attributes={"big": "b" * (2**21 + 10)})])
    # Ids of any length are copied as they are (b"".join does: the tags still say 16 and 8
    # bytes, so protobuf cannot parse the result); falsy fields are skipped.
    check_same([make(trace_id=b"short", span_id=b"", parent_span_id=b"\x09" * 3, name=None,
                     kind=None, start_ns=None, end_ns=None, attributes=None,
                     status_message=None)], parse=False)
    check_same([make(start_ns=True, end_ns=False, kind=True, status=True)])
    check_same([make(status=StatusCode.OK, status_message="\ud800" * 200)])
    check_same([make(status=StatusCode.UNSET, status_message="only a message")])


def _both(spans: Any) -> None:
    """C declines (or fails where Python fails); the wrapper then does exactly what the Python
    encoder does."""
    with contextlib.suppress(TypeError, AttributeError):
        assert c_encode(spans) is None
    try:
        expected: bytes | type[BaseException] = otlp_wire.encode_export_request_py(spans)
    except Exception as exc:  # the error type is what the wrapper must reproduce
        expected = type(exc)
    if isinstance(expected, bytes):
        assert otlp_wire.encode_export_request(spans) == expected
    else:
        with pytest.raises(expected):
            otlp_wire.encode_export_request(spans)


class SubRecord(SpanRecord):
    __slots__ = ()


SLOTS = ("trace_id", "span_id", "parent_span_id", "name", "kind", "start_ns", "end_ns",
         "resource", "attributes", "status", "status_message")


@needs_c
def test_declined_input_goes_to_python() -> None:
    ok = make()
    # An iterator or generator: declined before anything is consumed.
    for it in (iter([ok, ok]), (s for s in [ok, ok])):
        assert c_encode(it) is None
        assert list(it) == [ok, ok]
    assert otlp_wire.encode_export_request(cast(Any, (s for s in [ok, ok]))) == \
        otlp_wire.encode_export_request_py([ok, ok])
    _both([ok, SubRecord(*(getattr(ok, f) for f in SLOTS))])
    _both([make(trace_id=bytearray(16))])
    _both([make(span_id=memoryview(b"12345678"))])
    _both([make(parent_span_id=bytearray(b"\x03" * 8))])
    _both([make(attributes=types.MappingProxyType({"k": "v"}))])
    _both([make(attributes={Tag("key"): "v"})])
    _both([make(name=Tag("name"))])
    _both([make(kind=300)])  # bytes((0x30, 300)) raises ValueError
    _both([make(kind=-1)])
    _both([make(kind=Perm.R)])
    _both([make(status=StatusCode.ERROR), make(status=256)])
    _both([make(status_message=b"bytes")])
    _both([make(start_ns=1.5)])
    _both([make(attributes={5: "v"})])  # 5.encode: AttributeError either way
    _both([make(kind=2**70)])  # beyond a C long
    _both([make(resource=Resource([1, 2], {}))])  # type: ignore[arg-type]  # unhashable key
    # The header raises (5.items()); a key no other test uses, so it is not cached yet.
    _both([make(resource=Resource((-424242, -1), 5))])  # type: ignore[arg-type]
    for field in SLOTS:  # an unset slot: AttributeError in Python
        gone = make()
        delattr(gone, field)
        _both([ok, gone])


class Boom:
    def __str__(self) -> str:
        raise LookupError("no string form")


@needs_c
def test_callback_errors_and_mutation() -> None:
    # Errors from str() happen on both paths: the same exception comes out of the wrapper.
    with pytest.raises(LookupError):
        c_encode([make(attributes={"x": Boom()})])
    with pytest.raises(LookupError):
        otlp_wire.encode_export_request([make(attributes={"x": Boom()})])
    huge = 10**5000  # beyond int's str() digit limit: ValueError either way
    with pytest.raises(ValueError):
        otlp_wire.encode_export_request([make(attributes={"x": huge})])

    attrs: dict[str, Any] = {}

    class Grow:
        def __str__(self) -> str:
            attrs[f"k{len(attrs)}"] = 1  # resizes the dict being encoded
            return "grow"

    attrs["g"] = Grow()
    grower = make(attributes=attrs)
    assert c_encode([grower]) is None
    with pytest.raises(RuntimeError):  # what the Python loop raises
        otlp_wire.encode_export_request([grower])

    class Keyless:
        pass

    with pytest.raises(AttributeError):
        otlp_wire.encode_export_request([make(resource=Keyless())])


def dropping_batch() -> list[SpanRecord]:
    """Two references to one span whose second attribute's __str__ renames the span, replaces
    its attributes and empties the list being encoded."""
    spans: list[SpanRecord] = []

    class Drop:
        def __str__(self) -> str:
            span.attributes = {}
            span.name = "renamed"
            span.status = StatusCode.ERROR  # read after the attributes: this one counts
            spans.clear()
            return "dropped " + "€" * 10

    span = make(name="n" * 5, resource=Resource((7, 7), {"r": "x"}),
                attributes={"a": "é" * 30, "d": Drop(), "b": 2**65})
    spans[:] = [span, span]
    return spans


@needs_c
def test_a_callback_may_drop_the_objects_being_encoded() -> None:
    """Nothing the C borrowed may be freed early, and what it reads after a callback is what
    Python reads after it."""
    fast = c_encode(dropping_batch())
    assert fast is not None
    assert fast == otlp_wire.encode_export_request_py(dropping_batch())
    (encoded,) = ExportTraceServiceRequest.FromString(fast).resource_spans[0].scope_spans[0].spans
    assert encoded.name == "nnnnn"
    assert [a.key for a in encoded.attributes] == ["a", "d", "b"]
    assert encoded.status.code == StatusCode.ERROR


def _in_child(code: str, **env: str) -> list[str]:
    child_env = {k: v for k, v in os.environ.items() if k != "EBPF_BRIDGE_NO_ACCEL"}
    child_env.update(env)
    return subprocess.run([sys.executable, "-c", code], env=child_env, cwd=REPO,
                          capture_output=True, text=True, check=True).stdout.split()


SELECTED = ("from kernel_side.export import otlp_wire as w; "
            "print(w.ACCELERATED, w.encode_export_request is w.encode_export_request_py)")


def test_no_accel_switch_selects_the_python_encoder() -> None:
    assert _in_child(SELECTED, EBPF_BRIDGE_NO_ACCEL="1") == ["False", "True"]


@needs_c
def test_without_the_switch_the_c_encoder_is_selected() -> None:
    assert _in_child(SELECTED) == ["True", "False"]


@needs_c
def test_a_header_that_is_not_bytes_is_declined() -> None:
    from kernel_side import _fastwire

    def configure(heads: Callable[[SpanRecord], object]) -> None:
        _fastwire.configure(span_type=SpanRecord, kind_type=SpanKind, status_type=StatusCode,
                            status_unset=StatusCode.UNSET, any_value=otlp_wire._any_value,
                            heads=heads)  # type: ignore[arg-type]

    configure(lambda span: bytearray(b"\x0a\x00"))
    try:
        assert c_encode([make()]) is None
    finally:
        configure(otlp_wire._HEADERS.resource)
    check_same([make()])


@needs_c
def test_no_references_are_leaked() -> None:
    """Every object of a batch has the same reference count after many encodings, through
    the C path, the fallback (a declined span at the end) and a callback's error."""
    rng = random.Random(7)
    batch = [rand_span(rng, make_resources(rng)) for _ in range(30)]
    objects: list[object] = []
    for span in batch:
        objects += [span, span.resource, span.resource.key, span.name, span.attributes,
                    span.trace_id, span.status_message]
        objects += [x for kv in span.attributes.items() for x in kv]
    variants: list[list[SpanRecord]] = [batch, [*batch, make(kind=300)],
                                        [*batch, make(attributes={"x": Boom()})]]
    for spans in variants:  # warm every cache first
        with contextlib.suppress(LookupError):
            c_encode(spans)
    before = [sys.getrefcount(o) for o in objects]
    for _ in range(50):
        for spans in variants:
            with contextlib.suppress(LookupError):
                c_encode(spans)
    assert [sys.getrefcount(o) for o in objects] == before


@needs_c
def test_configure_refuses_a_type_without_slots() -> None:
    from kernel_side import _fastwire

    class NoSlots:
        trace_id = None

    configure: Callable[..., None] = _fastwire.configure
    with pytest.raises(TypeError):
        configure(span_type=NoSlots, kind_type=SpanKind, status_type=StatusCode,
                  status_unset=StatusCode.UNSET, any_value=otlp_wire._any_value,
                  heads=otlp_wire._HEADERS.resource)
    check_same([make(name="still configured")])  # the failed call changed nothing
    encode: Callable[..., object] = _fastwire.encode
    with pytest.raises(TypeError):
        encode([make()], "scope as str", b"")
    with pytest.raises(TypeError):
        encode([make()])
