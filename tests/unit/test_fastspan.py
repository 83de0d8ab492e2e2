"""The C parts of span assembly (``kernel_side._fastspan``) against the Python code they
mirror, which stays the reference: IdSource's ids (the same bytes for every input, edge cases
first, then random ones) and the HTTP/1 server span's attributes (the same dict, in the same
order, with values of the same types)."""

from __future__ import annotations

import random

import pytest

from bridge import _abi
from kernel_side import assembly
from kernel_side.assembly import IdSource
from kernel_side.model import AttrValue
from kernel_side.protocols import http1
from kernel_side.semconv import (
    CLIENT_ADDRESS,
    HTTP_REQUEST_METHOD,
    HTTP_ROUTE,
    SERVER_PORT,
    URL_PATH,
)

pytestmark = pytest.mark.skipif(not assembly.ACCELERATED,
                                reason="kernel_side._fastspan is not built")

EDGES = [0, 1, 2, 0xFFFF, 0x10000, 2**31 - 1, 2**32, 2**47, 2**48 - 1, 2**48, 2**63,
         2**64 - 1, 2**64, 2**70 + 5]


def _pairs(seed: int, n: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    out = [(a, b) for a in EDGES for b in EDGES]
    for _ in range(n):
        bits = rng.choice((8, 16, 32, 48, 64))
        out.append((rng.getrandbits(bits), rng.getrandbits(rng.choice((4, 16, 20)))))
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_c_ids_equal_python_ids(seed: int) -> None:
    salt = random.Random(seed).randbytes(_abi.ID_SALT_SIZE)
    ids = IdSource(salt)
    py = IdSource.__dict__  # the class's Python methods, which the instance's C ones shadow
    assert ids.span_id is not py["span_id"].__get__(ids)
    checked = 0
    for a, b in _pairs(seed, 20_000):
        assert ids.span_id(a, b) == py["span_id"](ids, a, b), (a, b)
        assert ids.trace_id(a, b) == py["trace_id"](ids, a, b), (a, b)
        assert ids.stream_span_id(a, b) == py["stream_span_id"](ids, a, b), (a, b)
        assert ids.stream_trace_id(a, b) == py["stream_trace_id"](ids, a, b), (a, b)
        checked += 1
    assert ids.span_id(7) == py["span_id"](ids, 7) and ids.trace_id(7) == py["trace_id"](ids, 7)
    assert checked > 20_000


def test_c_ids_match_what_applications_compute() -> None:
    # bridge._abi names the kernel's server span from the application side: the same salt and
    # exchange id must give the same ids there.
    salt = bytes(range(_abi.ID_SALT_SIZE))
    ids = IdSource(salt)
    for ex in (1, 99, 2**40 + 3):
        assert ids.span_id(ex) == _abi.exchange_span_id(salt, ex)
        assert ids.trace_id(ex) == _abi.exchange_trace_id(salt, ex)


def test_c_ids_refuse_what_python_refuses() -> None:
    ids = IdSource(bytes(_abi.ID_SALT_SIZE))
    for bad in ("1", 1.0, None, b"\x01"):
        with pytest.raises(TypeError):
            ids.span_id(bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            ids.trace_id(1, bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ids.span_id()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        ids.stream_span_id(1)  # type: ignore[call-arg]
    from kernel_side import _fastspan

    with pytest.raises(ValueError, match="24 bytes"):
        _fastspan.Ids(b"short")


# -- HTTP/1 server span attributes ----------------------------------------------------------

_TEXTS = [None, "", "x", "orders.internal", "::1", "10.0.0.7", "a" * 300, "ünïcode", " sp "]


def _request(rng: random.Random) -> http1.HttpRequest:
    path = rng.choice(["/", "/orders/4711", "", "/a b", "/" + "p" * 500])
    return http1.HttpRequest(
        method=rng.choice(["GET", "POST", "PURGE", ""]), target=path,
        path=path, query=rng.choice([None, "", "a=1", "q=" + "x" * 100]),
        version=rng.choice(["1.1", "1.0", ""]), host=rng.choice(_TEXTS),
        traceparent=None, user_agent=rng.choice(_TEXTS),
        # The C side takes only requests without X-Forwarded-For; mostly none here.
        x_forwarded_for=rng.choice([None, None, None, None, "", "203.0.113.9, 10.0.0.1"]),
        body_size=rng.choice([None, 0, 17, 2**40]), chunked=False,
        head_complete=rng.random() < 0.9, offset=0, length=None)


def _response(rng: random.Random) -> http1.HttpResponse | None:
    if rng.random() < 0.15:
        return None
    return http1.HttpResponse(
        status=rng.choice([100, 101, 200, 204, 301, 404, 499, 500, 503, 599, 999]),
        reason="R", version="1.1", body_size=rng.choice([None, 0, 6, 10**9]), chunked=False,
        head_complete=True, offset=0, length=None)


def _business(rng: random.Random) -> dict[str, AttrValue]:
    pool: list[tuple[str, AttrValue]] = [
        ("tenant_id", "acme"), ("user_id", "u-42"), ("feature_flag", "new-checkout"),
        ("n", 7), ("ratio", 0.5), ("on", True), (HTTP_ROUTE, "/orders/{id}"),
        # Business keys that clash with the span's own: the span's values must win where the
        # Python code writes after the context, and lose where it writes before.
        (URL_PATH, "/from-context"), (HTTP_REQUEST_METHOD, "FROM-CONTEXT"),
        (CLIENT_ADDRESS, "ctx"), (SERVER_PORT, 1)]
    return dict(rng.sample(pool, rng.randint(0, len(pool))))


@pytest.mark.parametrize("seed", [11, 12, 13, 14])
def test_c_server_attrs_equal_python(seed: int) -> None:
    rng = random.Random(seed)
    fast = assembly._fast_server_attrs
    assert fast is not None
    compared = declined = 0
    for _ in range(25_000):
        req = _request(rng)
        args = (req, _response(rng), rng.choice([None, "", "127.0.0.1", "::ffff:10.1.2.3"]),
                rng.choice([0, 51000, 65535]), rng.random() < 0.3,
                rng.choice([None, 0, 8080]), rng.choice(_TEXTS), rng.random() < 0.2,
                rng.random() < 0.2, _business(rng))
        want = assembly.server_attrs_py(*args)  # type: ignore[arg-type]
        got = fast(*args)
        if got is None:
            # Declined only for what is left to Python, and then nothing is half-built.
            assert req.x_forwarded_for
            declined += 1
            continue
        attrs, failed = got
        assert (list(attrs.items()), failed) == (list(want[0].items()), want[1]), args
        for key, value in attrs.items():
            assert type(value) is type(want[0][key]), key
        compared += 1
    assert compared > 20_000 and declined > 1_000


def test_c_server_attrs_refuse_bad_input() -> None:
    fast = assembly._fast_server_attrs
    assert fast is not None
    req = _request(random.Random(1))
    with pytest.raises(TypeError):
        fast(req)
    with pytest.raises(TypeError):
        fast(req, None, None, 0, False, None, None, False, False, [])
    with pytest.raises(AttributeError):
        fast(object(), None, None, 0, False, None, None, False, False, {})


def _random_event(rng: random.Random) -> bytes:
    """A packed exchange event with random header fields, caps and addresses (IPv4, IPv6,
    v4-mapped, unknown family), possibly cut short or with trailing bytes."""
    import ctypes

    from bench.pipeline_bench import _Layout, make_event, pack_event

    ev = _Layout.from_buffer_copy(make_event().ljust(ctypes.sizeof(_Layout), b"\0"))
    for name, ctype in _Layout._fields_:
        if name in ("ctx", "req", "resp", "peer_addr", "local_addr") or name.startswith("_"):
            continue
        bits = ctypes.sizeof(ctype) * 8
        edge = rng.choice((0, 1, (1 << bits) - 1, rng.getrandbits(bits)))
        setattr(ev, name, edge)
    ev.family = rng.choice((2, 10, 10, 0, 7))
    ev.phase = rng.choice((0, 1, 2, 3, 3))
    ev.has_ctx = rng.choice((0, 1, 1, 2))
    ev.req_cap = rng.choice((0, 5, 40, 1024, 2048))
    ev.resp_cap = rng.choice((0, 3, 512, 1024))
    ev.local_port = rng.choice((0, 0, 8080, 65535))
    for addr in (ev.peer_addr, ev.local_addr):
        kind = rng.randrange(4)
        raw = ([0] * 10 + [255, 255] + [rng.randrange(256) for _ in range(4)] if kind == 0
               else [rng.choice((0, 1, 127, 10))] * 16 if kind == 1
               else [rng.randrange(256) for _ in range(16)])
        addr[:] = raw
    data = pack_event(bytes(ev))
    cut = rng.random()
    if cut < 0.1:
        data = data[: rng.randint(0, len(data))]
    elif cut < 0.2:
        data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 40)))
    return data


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_c_decoder_equals_python_decoder(seed: int) -> None:
    from bench.pipeline_bench import _Layout
    from kernel_side.events import ExchangeLayout

    layout = ExchangeLayout.from_ctypes(_Layout)
    assert type(layout.decode_packed).__name__ == "builtin_function_or_method"
    rng = random.Random(seed)
    short = 0
    for _ in range(20_000):
        data = _random_event(rng)
        try:
            want = layout.decode_packed_py(data)
        except Exception as e:  # a cut header: both must refuse it the same way
            short += 1
            with pytest.raises(type(e)):
                layout.decode_packed(data)
            continue
        got = layout.decode_packed(data)
        assert got == want, (data, got, want)
        # Same types too (dataclass equality alone would let True equal 1).
        assert [type(getattr(got, f)) for f in got.__slots__] == [
            type(getattr(want, f)) for f in want.__slots__]
    assert 0 < short < 2_000


def test_c_decoder_takes_only_bytes_of_a_slotted_record() -> None:
    from bench.pipeline_bench import _Layout, make_event, pack_event
    from kernel_side import _fastspan  # type: ignore[attr-defined]
    from kernel_side.events import ExchangeLayout

    layout = ExchangeLayout.from_ctypes(_Layout)
    packed = pack_event(make_event())
    # Not bytes: the Python decoder's answer (struct reads a bytearray just as well).
    assert layout.decode_packed(bytearray(packed)) == layout.decode_packed_py(packed)

    class Plain:
        tgid = 0

    with pytest.raises(TypeError, match="not a slot"):
        _fastspan.Decoder(Plain, (), 0, 0, 3, print, {}, print)
    fields = tuple((getattr(_Layout, n).offset, getattr(_Layout, n).size)
                   for n, _t in _Layout._fields_[:3])
    from kernel_side.events import Exchange
    with pytest.raises(ValueError, match="expected 29 fields"):
        _fastspan.Decoder(Exchange, fields, 0, 0, 3, print, {}, print)


def test_c_server_span_equals_the_dataclass_and_declines_other_shapes() -> None:
    from dataclasses import field, fields, make_dataclass

    from kernel_side import _fastspan
    from kernel_side.model import Resource, SpanKind, SpanRecord, StatusCode

    res = Resource((1, 2), {"service.name": "s"})
    args = (b"\x01" * 8, "GET /x", 10, 20, res, {"k": "v"}, StatusCode.ERROR)
    made = assembly._new_server_span(*args)
    assert made == assembly._new_server_span_py(*args)
    assert made.kind is SpanKind.SERVER and made.trace_id == b"" and made.status_message == ""

    # One field more than SpanRecord: storing slots by position would be wrong.
    Wider = make_dataclass(
        "Wider",
        [(f.name, f.type) for f in fields(SpanRecord)] + [("links", tuple, field(default=()))],
        slots=True,
    )

    try:
        assert _fastspan.configure_spans(Wider, SpanKind.SERVER) is False
        wide = _fastspan.server_span(*args)
        assert isinstance(wide, Wider) and wide.links == () and wide.name == "GET /x"
    finally:
        assert _fastspan.configure_spans(SpanRecord, SpanKind.SERVER) is True
    with pytest.raises(TypeError, match="7 arguments"):
        _fastspan.server_span(*args[:6])
