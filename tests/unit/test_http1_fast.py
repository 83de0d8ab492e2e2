"""The C HTTP/1.x parser (``kernel_side._fasthttp``) against the pure-Python one.

The C parser takes the common heads and hands every other buffer to the Python parser, so the
two must agree on every input, field for field and type for type (``repr`` tells ``1`` from
``True`` and ``None`` from ``""``). The differential test feeds both the same 200,000
buffers (4 seeds x 50,000, each parsed as requests and as responses): realistic messages,
then cuts, byte edits, inserted header lines, case changes, pipelines and splices of them,
with several ``total_len`` values and request-method lists. It also checks that both paths
of the C module really ran, so a corpus that only ever falls back cannot pass by comparing
Python with itself.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from kernel_side.protocols import http1

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not http1.ACCELERATED,
    reason="kernel_side._fasthttp is not built or EBPF_BRIDGE_NO_ACCEL is set "
    "(build it with `.venv/bin/pip install -e . --no-deps`)",
)

REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /orders/4711?expand=items HTTP/1.1\r\nHost: orders.internal:8081\r\n"
    b"User-Agent: python-requests/2.32.3\r\nAccept: */*\r\nX-Tenant-ID: acme\r\n"
    b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n",
    b"POST /api/v1/pay HTTP/1.1\r\nHost: pay\r\nContent-Type: application/json\r\n"
    b"Content-Length: 17\r\n\r\n{\"amount\": 12.5}\n",
    b"POST /upload HTTP/1.1\r\nHost: up\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n",
    b"PUT /x HTTP/1.0\nHost: lf-only\nContent-Length: 3\n\nabc",
    b"HEAD /health HTTP/1.1\r\nhost: h\r\nUSER-AGENT: curl/8.0\r\n\r\n",
    b"GET http://proxy.example:8080/p?q=1 HTTP/1.1\r\nHost: proxy.example\r\n\r\n",
    b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: s\r\n\r\n",
    b"GET /f HTTP/1.1\r\nX-Forwarded-For: 10.0.0.1\r\nX-Forwarded-For: 10.0.0.2\r\n\r\n",
    b"GET /t HTTP/1.1\r\ntraceparent: a\r\ntraceparent: b\r\n\r\n",
    b"DELETE /items/9 HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\nabcde",
    b"PATCH /u/\xc3\xa9t\xc3\xa9?x=\xff HTTP/1.1\r\nHost: \xe2\x82\xac.example\r\n"
    b"User-Agent: caf\xc3\xa9 \xed\xa0\x80\r\n\r\n",
    b"GET /long?" + b"a" * 1500 + b" HTTP/1.1\r\nHost: " + b"h" * 1100 + b"\r\n\r\n",
    b"\r\n\r\nGET /after-blank HTTP/1.1\r\nHost: b\r\n\r\n",
    b"TRACE /t HTTP/1.1\r\nContent-Length: 99999999999999999\r\n\r\n",
    # 2**53 is the largest length kept, 2**53 + 1 the first one refused.
    b"POST /big HTTP/1.1\r\nContent-Length: 9007199254740992\r\n\r\n",
    b"POST /big HTTP/1.1\r\nContent-Length: 9007199254740993\r\n\r\n",
    b"GET /obs HTTP/1.1\r\nHost: h\r\n fold\r\nContent-Length:  0 \r\n\r\n",
]

RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nServer: BaseHTTP/0.6 Python/3.11.2\r\n"
    b"Date: Tue, 24 Nov 2026 22:00:00 GMT\r\nContent-Type: application/json\r\n"
    b"Content-Length: 61\r\n\r\n"
    b'{"order": "4711", "tenant": "acme", "in_stock": true, "n": 3}',
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwiki\r\n0\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close",
    b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n",
    b"HTTP/1.1 404\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 500 Internal Server Error  \r\ncontent-length: 5\r\n\r\nerror",
    b"HTTP/1.1 200 OK\nContent-Length: 1\n\nx",
    b"HTTP/1.1 200 Connection established\r\n\r\n",
    b"HTTP/1.1 099 Odd\r\n\r\n",
    b"HTTP/1.1 200 \xc3\xa9t\xc3\xa9 \xff\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
]

METHOD_LISTS: list[Sequence[str]] = [
    (), ("GET",), ["HEAD"], ("CONNECT",), ["GET", "HEAD"], ("POST", "GET", "GET"),
]

# Bytes and fragments that change how a head parses: line ends, separators, digits, header
# names the parser looks up, method and version tokens, non-UTF-8.
ALPHABET = b"\r\n :\t/?,;-0123456789aAcChHtTxXuU\x80\xc3\xff"
FRAGMENTS = [
    b"\r\n", b"\n", b"\r\n\r\n", b"\n\n", b" ", b"Content-Length: 5\r\n",
    b"\ncontent-length:12", b"Transfer-Encoding: chunked\r\n", b"\nTRANSFER-ENCODING: gzip",
    b"Host: x\r\n", b"\ntraceparent: 00-ab", b"\nTraceParent:", b"\nuser-agent: u",
    b"\nX-Forwarded-For: 1.2.3.4", b"HTTP/1.1 ", b"HTTP/1.1 200 OK\r\n", b"GET /p HTTP/1.1\r\n",
    b"HEAD ", b"0\r\n\r\n", b"HTTP/2.0", b"\xed\xa0\x80", b"\t",
]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        at = rng.randint(0, len(out))
        if op == 0 and out:
            out[min(at, len(out) - 1)] = rng.choice(ALPHABET)
        elif op == 1:
            out[at:at] = rng.choice(FRAGMENTS)
        elif op == 2 and out:
            del out[at : at + rng.randint(1, 8)]
        elif op == 3 and out:
            end = min(len(out), at + rng.randint(1, 40))
            out[at:end] = out[at:end].swapcase()
        elif op == 4 and out:
            end = min(len(out), at + rng.randint(1, 30))
            out[at:at] = out[at:end]
        elif op == 5:
            del out[at:]
        else:
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 3)))
    return bytes(out)


def _sample(rng: random.Random) -> bytes:
    pick = rng.randrange(10)
    corpus = REQUESTS if rng.random() < 0.5 else RESPONSES
    if pick == 0:
        # A pipeline, possibly mixing requests and responses.
        return b"".join(rng.choice(REQUESTS + RESPONSES) for _ in range(rng.randint(2, 4)))
    base = rng.choice(corpus)
    if pick == 1:
        return base
    if pick == 2:
        return base[: rng.randint(0, len(base))]
    if pick == 3:
        return base + rng.choice(corpus)
    return _mutate(rng, base if pick < 8 else base + rng.choice(corpus))


def _both(fast: Callable[..., object], slow: Callable[..., object], *args: object) -> str:
    def run(fn: Callable[..., object]) -> str:
        try:
            return repr(fn(*args))
        except Exception as exc:  # both must fail the same way if they ever fail
            return f"raised {type(exc).__name__}"

    got, want = run(fast), run(slow)
    assert got == want, f"C and Python disagree on {args!r}:\nC:      {got}\nPython: {want}"
    return got


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_c_parser_matches_python_on_mutated_buffers(seed: int) -> None:
    from kernel_side import _fasthttp

    rng = random.Random(seed)
    fast_before, slow_before = _fasthttp.counts()
    parsed = 0
    for _ in range(50_000):
        data = _sample(rng)
        extra = rng.choice((0, 0, 0, 1, 5, 1000, 2**40))
        methods = rng.choice(METHOD_LISTS)
        _both(http1.parse_requests, http1.parse_requests_py, data, len(data) + extra)
        out = _both(http1.parse_responses, http1.parse_responses_py, data, len(data) + extra,
                    methods)
        parsed += out != "[]"
    fast, slow = _fasthttp.counts()
    fast, slow = fast - fast_before, slow - slow_before
    # Both routes carried a real share of the 100,000 calls, and many produced records.
    assert fast > 60_000, (fast, slow)
    assert slow > 2_000, (fast, slow)
    assert parsed > 10_000


def test_c_sniff_matches_python() -> None:
    rng = random.Random(7)
    yes = 0
    edges = [b"", b" ", b"GET", b"GET ", b" GET /", b"OPTIONS /", b"OPTIONSX /", b"get /",
             b"PATCH\t/", b"CONNECT a:1", b"\r\nGET / HTTP/1.1", bytearray(b"GET / ")]
    for data in edges + [_sample(rng) for _ in range(50_000)]:
        if not isinstance(data, bytes):
            with pytest.raises(TypeError, match="takes bytes"):
                http1.looks_like_request(data)  # type: ignore[arg-type]
            continue
        got = http1.looks_like_request(data)
        assert got is http1.looks_like_request_py(data), data
        yes += got
    assert http1.looks_like_request is not http1.looks_like_request_py
    # Both answers were common.
    assert 10_000 < yes < 45_000, yes


def test_every_corpus_message_parses_the_same_whole_and_cut_at_every_byte() -> None:
    for msg in REQUESTS + RESPONSES:
        for cut in range(len(msg) + 1):
            data = msg[:cut]
            for total in (cut, len(msg)):
                _both(http1.parse_requests, http1.parse_requests_py, data, total)
                for methods in METHOD_LISTS:
                    _both(http1.parse_responses, http1.parse_responses_py, data, total, methods)


def test_the_c_parser_takes_the_common_shapes_itself() -> None:
    """The realistic request and response, whole and cut anywhere after their start line, never
    fall back (a start line cut by the capture does: it is rare and has its own rules)."""
    from kernel_side import _fasthttp

    req, resp = REQUESTS[1], RESPONSES[1]
    req_cuts = range(req.index(b"\n") + 1, len(req) + 1)
    resp_cuts = range(resp.index(b"\n") + 1, len(resp) + 1)
    fast0, slow0 = _fasthttp.counts()
    for cut in req_cuts:
        http1.parse_requests(req[:cut], len(req))
    for cut in resp_cuts:
        http1.parse_responses(resp[:cut], len(resp), ["GET"])
    fast, slow = _fasthttp.counts()
    assert slow == slow0
    assert fast - fast0 == len(req_cuts) + len(resp_cuts)


def test_odd_argument_types_go_to_the_python_parser_unchanged() -> None:
    data = REQUESTS[2]
    resp = RESPONSES[0]
    cases: list[tuple[Callable[..., object], Callable[..., object], tuple[object, ...]]] = [
        (http1.parse_requests, http1.parse_requests_py, (bytearray(data), len(data))),
        (http1.parse_requests, http1.parse_requests_py, (data, 2**70)),
        (http1.parse_requests, http1.parse_requests_py, (data, True)),
        (http1.parse_responses, http1.parse_responses_py, (resp, len(resp), iter(["HEAD"]))),
        (http1.parse_responses, http1.parse_responses_py, (resp, len(resp), [b"HEAD"])),
        (http1.parse_responses, http1.parse_responses_py, (resp, -5)),
    ]
    for fast, slow, args in cases:
        _both(fast, slow, *args)
    assert http1.parse_responses(resp, len(resp), request_methods=("HEAD",)) == \
        http1.parse_responses_py(resp, len(resp), ("HEAD",))
    assert http1.parse_responses(resp, len(resp), request_methods=("HEAD",))[0].body_size == 0


def test_no_accel_switch_selects_the_python_parser() -> None:
    code = ("from kernel_side.protocols import http1; "
            "print(http1.ACCELERATED, http1.parse_requests is http1.parse_requests_py)")
    env = {**os.environ, "EBPF_BRIDGE_NO_ACCEL": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["False", "True"]


def test_c_parser_builds_records_without_their_init_and_declines_when_it_must() -> None:
    from dataclasses import dataclass

    from kernel_side import _fasthttp

    # The real record types: slots stored directly, records equal to the Python parser's.
    assert _fasthttp.direct_records() == (True, True)
    data = REQUESTS[1]
    assert http1.parse_requests(data, len(data)) == http1.parse_requests_py(data, len(data))

    seen: list[str] = []

    @dataclass(slots=True)
    class CheckedRequest(http1.HttpRequest):
        def __post_init__(self) -> None:
            seen.append(self.method)

    try:
        # A __post_init__ must run, so the parser has to call the class.
        _fasthttp.configure(CheckedRequest, http1.HttpResponse, http1.parse_requests_py,
                            http1.parse_responses_py)
        assert _fasthttp.direct_records() == (False, True)
        (req,) = _fasthttp.parse_requests(data, len(data))
        assert isinstance(req, CheckedRequest) and seen == ["GET"]
    finally:
        _fasthttp.configure(http1.HttpRequest, http1.HttpResponse, http1.parse_requests_py,
                            http1.parse_responses_py)
    assert _fasthttp.direct_records() == (True, True)
