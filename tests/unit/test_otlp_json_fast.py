"""The C OTLP/JSON line writer (``kernel_side._fastjson``) against the pure-Python one.

The C writer takes the common records itself, hands odd attributes to ``otlp_json._kv_bytes``
and every other batch to ``otlp_json_line_py``, so the two must return the same bytes for
every batch, or raise the same exception. The differential test feeds both 900 random batches
(3 seeds x 300, 1-40 spans each over interleaved resources) whose strings hold every character
class JSON escaping cares about and whose values cover each branch of the attribute rules;
every line is also checked against ``orjson.dumps(to_otlp_json(...))``, the definition, and
parsed with ``json.loads``. The test counts what each route of the C module did, so a corpus
that only ever falls back cannot pass by comparing Python with itself.
"""

from __future__ import annotations

import enum
import json
import os
import random
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import orjson
import pytest

from kernel_side.export import jsonl, otlp_json
from kernel_side.export.otlp_json import otlp_json_line, otlp_json_line_py, to_otlp_json
from kernel_side.model import Resource, SpanKind, SpanRecord, StatusCode

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not otlp_json.ACCELERATED,
    reason="kernel_side._fastjson is not built or EBPF_BRIDGE_NO_ACCEL is set "
    "(build it with `.venv/bin/pip install -e . --no-deps`)",
)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class Label(str):
    """A str subclass: the Python writes its characters (orjson ignores ``__str__``)."""

    def __str__(self) -> str:
        return "not-this"


class Level(enum.IntEnum):
    LOW = 1
    NEG = -3
    TOP = INT64_MAX
    HUGE = 2**64  # beyond int64: its str() as a stringValue


# Characters escaping and UTF-8 encoding treat differently: quote, backslash, every C0
# control, DEL, '/', 2-, 3- and 4-byte UTF-8, the line separators JSON allows raw.
CHARS = (['"', "\\", "/", "\x7f", " ", "a", "Z", "0", "é", "ÿ", "\x80", "ß", "€", "\u2028",
          "\u2029", "\ufeff", "\uffff", "中", "😀", "\U0010ffff"]
         + [chr(c) for c in range(0x20)])


def rand_str(rng: random.Random, max_len: int = 16) -> str:
    out = []
    for _ in range(rng.randint(0, max_len)):
        r = rng.random()
        if r < 0.5:
            out.append(rng.choice(CHARS))
        elif r < 0.8:
            out.append(chr(rng.randint(0x20, 0x7e)))
        else:
            # Any code point but a surrogate (a lone one is tested on its own below).
            c = rng.randint(0x80, 0x10FFFF)
            out.append(chr(c if not 0xD800 <= c <= 0xDFFF else c + 0x800))
    return "".join(out)


FLOATS = [0.0, -0.0, 1.0, 1.5, 0.1, 1e16, 1e15, 1e-7, 1e-5, 1e22, 5e-324,
          1.7976931348623157e308, float("nan"), float("inf"), float("-inf"), -123.456]
INTS = [0, 1, -1, 42, INT64_MIN, INT64_MAX, INT64_MIN - 1, INT64_MAX + 1, 2**64, -(2**70),
        10**18, 10**30]


def rand_value(rng: random.Random) -> Any:
    r = rng.randrange(14)
    if r < 4:
        return rand_str(rng)
    if r == 4:
        return ""
    if r == 5:
        return rng.choice((True, False))
    if r == 6:
        return rng.choice(INTS)
    if r == 7:
        return rng.randint(-(2**70), 2**70)
    if r == 8:
        return rng.randint(-1000, 70000)
    if r == 9:
        return rng.choice(FLOATS)
    if r == 10:
        return rng.random() * 10.0 ** rng.randint(-30, 30)
    if r == 11:
        # Rare types: the C writer hands these to the Python's _kv_bytes.
        return rng.choice((Label(rand_str(rng, 6)), Label(""), Level.LOW, Level.NEG, Level.TOP,
                           Level.HUGE))
    if r == 12:
        return rng.choice(("GET", "acme", "u-42", "/orders/1"))
    return rng.choice((8080, 443, 200, 404))


# A small pool so keys repeat with values of several types (1, True, 1.0, "1", Level.LOW):
# the Python's cache keys on (key, type, value), and the two must still agree.
KEYS = ["http.request.method", "url.path", "server.port", "tenant_id", "k", "é", 'q"uote',
        "back\\slash", "ctl\x01\x1f", "nl\n", ""]


def rand_attrs(rng: random.Random, n_max: int = 8) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    for _ in range(rng.randint(0, n_max)):
        key = rng.choice(KEYS) if rng.random() < 0.6 else rand_str(rng, 10)
        attrs[key] = rand_value(rng)
    return attrs


def resources(rng: random.Random) -> list[Resource]:
    a = Resource((100, 1), {"service.name": "checkout", "process.pid": 100, "host.name": "vm"})
    b = Resource((200, 7), {"service.name": 'ca"rt\\\n', "ratio": 0.5, "on": True})
    bare = Resource((300, 3), {})
    odd = Resource((400, 4), rand_attrs(rng, 6))
    # The same key as ``a`` in a new tuple object on another Resource: grouped with ``a``,
    # under the attributes of whichever of the two came first.
    a_alias = Resource((a.key[0], a.key[1]), {"service.name": "alias"})
    return [a, b, bare, odd, a_alias]


TIMES = [0, 1, 1_700_000_000_000_000_000, 2**63 - 1, 2**64 - 1, 2**70, 10**25]


def rand_span(rng: random.Random, res: Sequence[Resource]) -> SpanRecord:
    parent = rng.choice((None, None, b"", rng.randbytes(8)))
    kind: Any = rng.choice((0, SpanKind.INTERNAL, SpanKind.SERVER, SpanKind.CLIENT, 3, True))
    status: Any = rng.choice((StatusCode.UNSET, StatusCode.OK, StatusCode.ERROR,
                              StatusCode.UNSET, 0, 2))
    message = rand_str(rng, 12) if rng.random() < 0.5 else ""
    name = rand_str(rng, 20) if rng.random() < 0.8 else ""
    start = rng.choice(TIMES) if rng.random() < 0.3 else rng.randint(1, 2**62)
    end = rng.choice(TIMES) if rng.random() < 0.3 else start + rng.randint(0, 10**9)
    return SpanRecord(rng.randbytes(16), rng.randbytes(8), parent, name, kind, start, end,
                      rng.choice(res), rand_attrs(rng), status, message)


def outcome(fn: Callable[[Any], bytes], spans: Any) -> bytes | tuple[type, str]:
    try:
        return fn(spans)
    except Exception as exc:  # both writers must fail the same way when they fail
        return type(exc), str(exc)


def reference(spans: Any) -> bytes | tuple[type, str]:
    """The definition: what the Collector-shaped dicts serialize to."""
    return outcome(lambda s: orjson.dumps(to_otlp_json(s)) + b"\n", spans)


def same(spans: Any) -> bytes | tuple[type, str]:
    got, want = outcome(otlp_json_line, spans), outcome(otlp_json_line_py, spans)
    assert got == want, f"C and Python disagree:\nC:      {got!r}\nPython: {want!r}"
    return got


@dataclass
class Counts:
    fast: int
    fallback: int
    delegated: int


def counts() -> Counts:
    from kernel_side import _fastjson

    return Counts(*_fastjson.counts())


def delta(before: Counts) -> Counts:
    now = counts()
    return Counts(now.fast - before.fast, now.fallback - before.fallback,
                  now.delegated - before.delegated)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_c_writer_matches_python_on_random_batches(seed: int) -> None:
    rng = random.Random(seed)
    res = resources(rng)
    before = counts()
    broken = 0
    for _ in range(300):
        spans = [rand_span(rng, res) for _ in range(rng.randint(1, 40))]
        r = rng.random()
        if r < 0.03:
            # A lone surrogate: orjson refuses it, so both writers raise the same error.
            spans[-1].attributes["bad"] = "x\ud800y"
            broken += 1
        elif r < 0.06:
            # An id of another bytes-like type: the whole batch goes to the Python writer.
            spans[0].trace_id = bytearray(spans[0].trace_id)  # type: ignore[assignment]
            broken += 1
        line = same(spans if rng.random() < 0.8 else tuple(spans))
        assert line == reference(spans)
        if isinstance(line, bytes):
            assert json.loads(line) == json.loads(orjson.dumps(to_otlp_json(spans)))
    got = delta(before)
    # The C writer wrote every batch but the broken ones, and the Python helper wrote the
    # rare attribute types inside them.
    assert got.fallback == broken, got
    assert got.fast == 300 - broken, got
    assert got.fast > 250 and got.delegated > 100, got


def test_every_ascii_character_and_non_ascii_classes_escape_as_orjson_does() -> None:
    res = Resource((1, 1), {"r": "".join(CHARS)})
    for ch in CHARS + [chr(c) for c in range(0x80)]:
        # At several offsets: the C writer scans ASCII eight bytes at a time.
        for at in (0, 1, 6, 7, 8, 9, 15):
            text = "abcdefghijklmnop"[:at] + ch + ch + "qrstuvwxyz0123456789"
            span = SpanRecord(b"\x00" * 16, b"\xff" * 8, b"\x01" * 8, text, SpanKind.SERVER,
                              1, 2, res, {text: text, "v": ch}, StatusCode.ERROR, text)
            assert same([span]) == reference([span])


def test_integer_and_float_edges() -> None:
    res = Resource((1, 1), {})
    values: list[Any] = INTS + FLOATS + [True, False, Level.LOW, Level.HUGE, Label("l")]
    attrs = {f"k{i}": v for i, v in enumerate(values)}
    spans = [SpanRecord(b"\xab" * 16, b"\xcd" * 8, None, "n", SpanKind.CLIENT, t, t, res, attrs)
             for t in TIMES]
    assert same(spans) == reference(spans)


def test_realistic_spans_are_written_in_c_without_help() -> None:
    res = Resource((4242, 1), {"service.name": "orders", "process.pid": 4242,
                               "host.name": "vm", "telemetry.sdk.name": "ebpf-bridge"})
    spans = [SpanRecord(
        bytes(range(16)), bytes(range(8)), bytes(range(8, 16)), "GET /orders/{id}",
        SpanKind.SERVER, 1_700_000_000_000_000_000 + i, 1_700_000_000_001_000_000 + i, res,
        {"http.request.method": "GET", "url.path": f"/orders/{i}", "server.port": 8081,
         "network.peer.port": 32768 + i, "http.response.status_code": 200, "user_id": f"u-{i}",
         "tenant_id": "acme", "ebpf_bridge.truncated": False},
        StatusCode.ERROR if i % 7 == 0 else StatusCode.UNSET) for i in range(50)]
    before = counts()
    assert same(spans) == reference(spans)
    assert delta(before) == Counts(1, 0, 0)


class SubSpan(SpanRecord):
    __slots__ = ()


def _span(**changes: Any) -> SpanRecord:
    base: dict[str, Any] = dict(
        trace_id=b"\x01" * 16, span_id=b"\x02" * 8, parent_span_id=None, name="n",
        kind=SpanKind.SERVER, start_ns=5, end_ns=6, resource=Resource((1, 2), {"a": 1}),
        attributes={"k": "v"})
    base.update(changes)
    return SpanRecord(**base)


def _sub_span() -> SpanRecord:
    return SubSpan(b"\x01" * 16, b"\x02" * 8, None, "n", SpanKind.SERVER, 5, 6,
                   Resource((1, 2), {}))


class SimpleResource:
    """Duck-typed: the Python writer reads ``key`` and ``attributes`` from anything."""

    key = (7, 7)
    attributes = {"duck": "typed"}


# Each goes to the Python writer whole (or, for odd attribute values, to _kv_bytes) and must
# come out as it does there: the same bytes, or the same exception.
ODD_BATCHES: dict[str, Callable[[], Any]] = {
    "surrogate in a value": lambda: [_span(attributes={"k": "\udfff"})],
    "surrogate in a key": lambda: [_span(attributes={"\ud83d": 1})],
    "surrogate in the name": lambda: [_span(name="a\udc00")],
    "surrogate in the status message": lambda: [_span(status_message="\ud800",
                                                      status=StatusCode.ERROR)],
    "surrogate in a resource attribute": lambda: [_span(resource=Resource((9, 9),
                                                                          {"r": "\ud800"}))],
    "a SpanRecord subclass": lambda: [_span(), _sub_span()],
    "bytearray and memoryview ids": lambda: [_span(trace_id=bytearray(16)),
                                            _span(span_id=memoryview(b"12345678"))],
    "a mappingproxy of attributes": lambda: [_span(attributes=MappingProxyType({"k": 1}))],
    "resource attributes in a mappingproxy": lambda: [_span(resource=Resource(
        (3, 3), MappingProxyType({"r": 1})))],
    "an unhashable value": lambda: [_span(attributes={"k": [1, 2]})],
    "None, bytes and tuple values": lambda: [_span(attributes={"n": None, "b": b"x",
                                                               "t": (1, "a")})],
    "a non-str key": lambda: [_span(attributes={5: "five", None: 1.5})],
    "an int past str()'s digit limit": lambda: [_span(attributes={"k": 10**5000})],
    "a time past str()'s digit limit": lambda: [_span(start_ns=10**5000)],
    "float times": lambda: [_span(start_ns=1.5, end_ns=2.0)],
    "an IntEnum time": lambda: [_span(start_ns=Level.TOP)],
    "a huge kind": lambda: [_span(kind=2**80)],
    "a str kind": lambda: [_span(kind="2")],
    "a status of another IntEnum": lambda: [_span(status=Level.LOW)],
    "a None status message": lambda: [_span(status_message=None, status=StatusCode.ERROR)],
    "a str-subclass name": lambda: [_span(name=Label("x"))],
    "an empty-str parent and a None name": lambda: [_span(parent_span_id="", name=None)],
    "an unhashable resource key": lambda: [_span(resource=Resource([1], {}))],  # type: ignore[arg-type]
    "a non-Resource resource": lambda: [_span(resource=SimpleResource())],
    "a deque of spans": lambda: deque([_span(), _span()]),
    "a generator of spans": lambda: (s for s in [_span()]),
    "an empty list": lambda: [],
    "an empty tuple": lambda: (),
    "a list of non-spans": lambda: [1, 2],
}


@pytest.mark.parametrize("name", list(ODD_BATCHES))
def test_odd_batches_come_out_as_the_python_writes_them(name: str) -> None:
    make = ODD_BATCHES[name]
    got, want = outcome(otlp_json_line, make()), outcome(otlp_json_line_py, make())
    assert got == want, f"{name}:\nC:      {got!r}\nPython: {want!r}"


def test_large_batches_and_huge_strings_grow_the_buffer() -> None:
    res = Resource((1, 1), {"r": "x"})
    many = [_span(resource=res, attributes={"i": i, "s": "v" * (i % 300)}) for i in range(3000)]
    huge = [_span(attributes={"big": "\\\"" * (5 << 20)}), _span()]  # 20 MB once escaped
    for spans in (many, huge, many):
        assert same(spans) == reference(spans)


class ReentrantKey(tuple):  # type: ignore[type-arg]
    """A resource key whose hash writes another line: a nested call while a batch is open."""

    def __hash__(self) -> int:
        nested = otlp_json_line([_span(attributes={"nested": True})])
        assert nested == otlp_json_line_py([_span(attributes={"nested": True})])
        return tuple.__hash__(self)


def test_a_line_written_from_python_code_run_inside_another() -> None:
    res = Resource(ReentrantKey((5, 5)), {"r": 1})
    spans = [_span(resource=res), _span(), _span(resource=res)]
    before = counts()
    assert same(spans) == reference(spans)
    assert delta(before).fast >= 2


def test_keyword_and_wrong_arity_calls_go_to_python() -> None:
    spans = [_span()]
    assert otlp_json_line(spans=spans) == otlp_json_line_py(spans)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        otlp_json_line()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        otlp_json_line(spans, spans)  # type: ignore[call-arg]


def test_the_jsonl_sink_uses_the_c_writer() -> None:
    from kernel_side import _fastjson

    assert otlp_json_line is _fastjson.otlp_json_line
    assert vars(jsonl)["otlp_json_line"] is _fastjson.otlp_json_line


def test_no_accel_switch_selects_the_python_writer() -> None:
    code = ("from kernel_side.export import otlp_json, jsonl; "
            "print(otlp_json.ACCELERATED, otlp_json.otlp_json_line is otlp_json.otlp_json_line_py,"
            " jsonl.otlp_json_line is otlp_json.otlp_json_line_py)")
    env = {**os.environ, "EBPF_BRIDGE_NO_ACCEL": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["False", "True", "True"]
