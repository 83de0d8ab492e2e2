"""HTTP/1.x parsing of captured exchanges: pipelining, truncation, framing, garbage."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_side.protocols.http1 import (
    MAX_VALUE_LEN,
    METHODS,
    HttpRequest,
    HttpResponse,
    looks_like_request,
    looks_like_response,
    parse_requests,
    parse_responses,
    route_heuristic,
)
from tests.unit._work import Work, WorkBudgetExceeded, assert_linear, measure

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def reqs(data: bytes, total_len: int | None = None) -> list[HttpRequest]:
    return parse_requests(data, len(data) if total_len is None else total_len)


def resps(
    data: bytes, total_len: int | None = None, methods: tuple[str, ...] = ()
) -> list[HttpResponse]:
    return parse_responses(data, len(data) if total_len is None else total_len, methods)


# --- sniffing ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(METHODS))
def test_looks_like_request_knows_every_method(method: str) -> None:
    assert looks_like_request(method.encode() + b" / HTTP/1.1\r\n")


@pytest.mark.parametrize(
    "data", [b"", b"GET", b"get / HTTP/1.1", b"GETX / HTTP/1.1", b"PRI * HTTP/2.0", b" GET /"]
)
def test_looks_like_request_rejects(data: bytes) -> None:
    assert not looks_like_request(data)


def test_looks_like_response() -> None:
    assert looks_like_response(b"HTTP/1.1 200 OK\r\n")
    assert looks_like_response(b"HTTP/1.0 404")
    assert not looks_like_response(b"HTTP/1.1 20")
    assert not looks_like_response(b"HTTP/2 200\r\n")
    assert not looks_like_response(b"HTTP/1.1 OK 200")
    assert not looks_like_response(b"")


# --- requests -----------------------------------------------------------------------------


def test_simple_get() -> None:
    data = (
        b"GET /orders/42?expand=items&x=1 HTTP/1.1\r\n"
        b"Host: shop.example:8080\r\n"
        b"User-Agent: curl/8.5.0\r\n"
        b"Accept: */*\r\n"
        b"traceparent: " + TP.encode() + b"\r\n"
        b"X-Forwarded-For: 10.0.0.1, 10.0.0.2\r\n"
        b"\r\n"
    )
    [r] = reqs(data)
    assert r == HttpRequest(
        method="GET",
        target="/orders/42?expand=items&x=1",
        path="/orders/42",
        query="expand=items&x=1",
        version="1.1",
        host="shop.example:8080",
        traceparent=TP,
        user_agent="curl/8.5.0",
        x_forwarded_for="10.0.0.1, 10.0.0.2",
        body_size=0,
        chunked=False,
        head_complete=True,
        offset=0,
        length=len(data),
    )


def test_http10_and_no_headers() -> None:
    [r] = reqs(b"GET / HTTP/1.0\r\n\r\n")
    assert (r.version, r.path, r.query, r.host, r.head_complete, r.length) == (
        "1.0",
        "/",
        None,
        None,
        True,
        18,
    )


def test_empty_query_is_not_none() -> None:
    [r] = reqs(b"GET /a? HTTP/1.1\r\n\r\n")
    assert (r.path, r.query) == ("/a", "")


def test_post_with_body() -> None:
    data = b"POST /submit HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\nhello world"
    [r] = reqs(data)
    assert (r.method, r.body_size, r.chunked, r.length) == ("POST", 11, False, len(data))


def test_keep_alive_single_with_trailing_crlf_tolerated() -> None:
    data = b"POST /a HTTP/1.1\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok\r\n"
    [r] = reqs(data)
    assert r.body_size == 2
    assert r.length == len(data) - 2


def test_pipelined_three_requests() -> None:
    a = b"GET /one HTTP/1.1\r\nHost: h\r\n\r\n"
    b = b"POST /two HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
    c = b"DELETE /three/7 HTTP/1.1\r\nHost: h\r\n\r\n"
    out = reqs(a + b + c)
    assert [r.path for r in out] == ["/one", "/two", "/three/7"]
    assert [r.offset for r in out] == [0, len(a), len(a) + len(b)]
    assert [r.length for r in out] == [len(a), len(b), len(c)]
    assert [r.body_size for r in out] == [0, 5, 0]


def test_pipelined_with_chunked_body() -> None:
    a = (
        b"POST /upload HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    b = b"GET /after HTTP/1.1\r\nHost: h\r\n\r\n"
    out = reqs(a + b)
    assert [r.path for r in out] == ["/upload", "/after"]
    assert out[0].chunked and out[0].body_size == 11 and out[0].length == len(a)
    assert out[1].offset == len(a)


def test_chunked_body_leaving_capture_stops_pipelining() -> None:
    data = b"POST /u HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n400\r\n" + b"x" * 100
    [r] = reqs(data, total_len=2000)
    assert r.chunked and r.body_size is None and r.length is None


def test_chunked_overrides_content_length() -> None:
    data = (
        b"POST /u HTTP/1.1\r\nContent-Length: 999\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n"
    )
    [r] = reqs(data)
    assert (r.chunked, r.body_size, r.length) == (True, 3, len(data))


def test_transfer_encoding_not_chunked_makes_length_unknown() -> None:
    data = b"POST /u HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\nGET /x HTTP/1.1\r\n\r\n"
    [r] = reqs(data)
    assert (r.chunked, r.body_size, r.length) == (False, None, None)


def test_broken_chunk_framing_stops() -> None:
    data = (
        b"POST /u HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"
        b"GET /next HTTP/1.1\r\n\r\n"
    )
    [r] = reqs(data)
    assert r.body_size is None and r.length is None


def test_chunk_data_not_followed_by_crlf_stops() -> None:
    data = b"POST /u HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n"
    [r] = reqs(data)
    assert r.body_size is None


def test_body_larger_than_capture() -> None:
    head = b"PUT /blob HTTP/1.1\r\nContent-Length: 5000\r\n\r\n"
    [r] = reqs(head + b"x" * 900, total_len=len(head) + 5000)
    assert (r.body_size, r.head_complete, r.length) == (5000, True, len(head) + 5000)


def test_request_line_only_then_cut() -> None:
    [r] = reqs(b"GET /only/line HTTP/1.1\r\n", total_len=300)
    assert (r.path, r.version, r.head_complete, r.host, r.length) == (
        "/only/line",
        "1.1",
        False,
        None,
        None,
    )


def test_head_cut_mid_header_keeps_whole_lines_only() -> None:
    data = b"GET /x HTTP/1.1\r\nHost: example.com\r\nUser-Agent: Mozil"
    [r] = reqs(data, total_len=500)
    assert (r.host, r.user_agent, r.head_complete, r.length) == ("example.com", None, False, None)


def test_cut_content_length_line_is_not_trusted() -> None:
    data = b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 12"
    [r] = reqs(data, total_len=5000)
    assert (r.body_size, r.length) == (None, None)


def test_request_line_cut_by_capture() -> None:
    long_path = b"/search/" + b"a" * 2000
    data = (b"GET " + long_path + b" HTTP/1.1\r\nHost: h\r\n\r\n")[:1024]
    [r] = reqs(data, total_len=2100)
    assert r.method == "GET" and r.version == "" and not r.head_complete
    assert r.path.startswith("/search/aaa") and len(r.path) <= MAX_VALUE_LEN


def test_request_line_without_newline_and_not_cut_is_garbage() -> None:
    assert reqs(b"GET /x HTTP/1.1") == []


def test_odd_case_headers_and_whitespace() -> None:
    data = (
        b"GET / HTTP/1.1\r\nhOsT:   h.example  \r\nUSER-AGENT:\tua\r\n"
        b"TraceParent: " + TP.encode() + b"\r\nx-forwarded-for:1.1.1.1\r\n\r\n"
    )
    [r] = reqs(data)
    assert (r.host, r.user_agent, r.traceparent, r.x_forwarded_for) == (
        "h.example",
        "ua",
        TP,
        "1.1.1.1",
    )


def test_repeated_xff_headers_are_joined() -> None:
    data = b"GET / HTTP/1.1\r\nX-Forwarded-For: 1.1.1.1\r\nX-Forwarded-For: 2.2.2.2\r\n\r\n"
    assert reqs(data)[0].x_forwarded_for == "1.1.1.1, 2.2.2.2"


def test_duplicate_traceparent_is_dropped() -> None:
    data = b"GET / HTTP/1.1\r\ntraceparent: " + TP.encode() + b"\r\ntraceparent: x\r\n\r\n"
    assert reqs(data)[0].traceparent is None


def test_header_name_must_start_a_line() -> None:
    data = b"GET / HTTP/1.1\r\nX-Not-Host: evil\r\nX-Note: a host: b\r\n\r\n"
    assert reqs(data)[0].host is None


def test_bare_lf_line_endings() -> None:
    a = b"POST /a HTTP/1.1\nHost: h\nContent-Length: 3\n\nabc"
    b = b"GET /b HTTP/1.1\nHost: h2\n\n"
    out = reqs(a + b)
    assert [(r.path, r.host, r.length) for r in out] == [("/a", "h", len(a)), ("/b", "h2", len(b))]


def test_mixed_line_endings() -> None:
    data = b"GET /m HTTP/1.1\r\nHost: h\n\r\nGET /n HTTP/1.1\n\n"
    assert [r.path for r in reqs(data)] == ["/m", "/n"]


def test_absolute_form_target() -> None:
    [r] = reqs(b"GET http://proxy.example:3128/p/q?z=1 HTTP/1.1\r\n\r\n")
    assert (r.path, r.query, r.host) == ("/p/q", "z=1", "proxy.example:3128")
    [r] = reqs(b"GET http://h.example HTTP/1.1\r\nHost: other\r\n\r\n")
    assert (r.path, r.host) == ("/", "other")


def test_connect_and_asterisk_forms() -> None:
    [r] = reqs(b"CONNECT db.example:5432 HTTP/1.1\r\nHost: db.example:5432\r\n\r\n")
    assert (r.method, r.target, r.path) == ("CONNECT", "db.example:5432", "db.example:5432")
    [r] = reqs(b"OPTIONS * HTTP/1.1\r\n\r\n")
    assert r.path == "*"


@pytest.mark.parametrize(
    "cl", [b"-1", b"abc", b"", b"1e3", b"0x10", b"9007199254740993", b"1" * 40, b"+5", b"5 5"]
)
def test_bogus_content_length_stops(cl: bytes) -> None:
    data = b"POST /a HTTP/1.1\r\nContent-Length: " + cl + b"\r\n\r\nGET /b HTTP/1.1\r\n\r\n"
    [r] = reqs(data)
    assert (r.body_size, r.length) == (None, None)


def test_content_length_list_of_same_value_is_fine() -> None:
    data = b"POST /a HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\nabc"
    assert reqs(data)[0].body_size == 3
    data = b"POST /a HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"
    assert reqs(data)[0].body_size is None


def test_pipelining_stops_at_non_request_bytes() -> None:
    data = b"GET /a HTTP/1.1\r\n\r\n\x16\x03\x01garbage"
    assert [r.path for r in reqs(data)] == ["/a"]


def test_huge_header_lines_are_bounded() -> None:
    ua = b"U" * 50_000
    data = b"GET /h HTTP/1.1\r\nUser-Agent: " + ua + b"\r\nHost: " + b"h" * 5000 + b"\r\n\r\n"
    [r] = reqs(data)
    assert r.user_agent == "U" * MAX_VALUE_LEN
    assert r.host is not None and len(r.host) == MAX_VALUE_LEN
    assert r.length == len(data)


def test_non_utf8_bytes_are_replaced() -> None:
    [r] = reqs(b"GET /caf\xe9 HTTP/1.1\r\nUser-Agent: \xff\xfe\r\n\r\n")
    assert r.path == "/caf\ufffd" and r.user_agent == "\ufffd\ufffd"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00" * 100,
        bytes(range(256)),
        # TLS 1.2 ClientHello record header + start of handshake
        bytes.fromhex("16030100f4010000f00303") + random.Random(1).randbytes(64),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"get / HTTP/1.1\r\n\r\n",  # methods are case-sensitive
        b"GET / HTTP/2.0\r\n\r\n",
        b"GET / HTTP/1.1 extra\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET  \r\n\r\n",
        b"*1\r\n$4\r\nPING\r\n",  # Redis
        b"HTTP/1.1 200 OK\r\n\r\n",  # a response is not a request
    ],
)
def test_garbage_requests(data: bytes) -> None:
    assert reqs(data) == []
    assert reqs(data, total_len=len(data) + 1000) == []


# --- responses ----------------------------------------------------------------------------


def test_simple_response() -> None:
    data = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
    [r] = resps(data, methods=("GET",))
    assert r == HttpResponse(
        status=200,
        reason="OK",
        version="1.1",
        body_size=5,
        chunked=False,
        head_complete=True,
        offset=0,
        length=len(data),
    )
    assert not r.informational


def test_status_without_reason() -> None:
    [r] = resps(b"HTTP/1.1 404\r\nContent-Length: 0\r\n\r\n")
    assert (r.status, r.reason) == (404, "")


def test_pipelined_responses() -> None:
    a = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    b = b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n"
    c = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 3\r\n\r\nbad"
    out = resps(a + b + c, methods=("GET", "POST", "GET"))
    assert [(r.status, r.offset, r.length) for r in out] == [
        (200, 0, len(a)),
        (201, len(a), len(b)),
        (500, len(a) + len(b), len(c)),
    ]


def test_chunked_response_complete() -> None:
    data = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\n\r\n"
    )
    [r] = resps(data)
    assert (r.chunked, r.body_size, r.length) == (True, 23, len(data))


def test_chunked_response_truncated() -> None:
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1000\r\n" + b"y" * 300
    [r] = resps(data, total_len=5000)
    assert (r.chunked, r.body_size, r.length, r.head_complete) == (True, None, None, True)


def test_chunked_response_cut_in_trailers() -> None:
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: 1\r\n"
    [r] = resps(data, total_len=200)
    assert r.body_size is None and r.length is None


def test_100_continue_then_final() -> None:
    a = b"HTTP/1.1 100 Continue\r\n\r\n"
    b = b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
    out = resps(a + b, methods=("POST",))
    assert [(r.status, r.informational, r.offset) for r in out] == [
        (100, True, 0),
        (201, False, len(a)),
    ]
    assert out[0].body_size == 0


def test_interim_responses_do_not_consume_request_methods() -> None:
    a = b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
    b = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"  # answers HEAD: no body
    c = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
    out = resps(a + b + c, methods=("HEAD", "GET"))
    assert [(r.status, r.body_size, r.length) for r in out] == [
        (103, 0, len(a)),
        (200, 0, len(b)),
        (200, 2, len(c)),
    ]


def test_head_response_has_no_body() -> None:
    a = b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"
    b = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
    out = resps(a + b, methods=("HEAD", "GET"))
    assert [(r.status, r.body_size, r.length) for r in out] == [(200, 0, len(a)), (404, 0, len(b))]


def test_head_response_without_methods_reads_content_length() -> None:
    a = b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"
    [r] = resps(a, total_len=len(a))
    assert r.body_size == 1234 and r.length == len(a) + 1234


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_statuses(status: int) -> None:
    a = b"HTTP/1.1 %d X\r\nContent-Length: 50\r\n\r\n" % status
    b = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n!"
    out = resps(a + b, methods=("GET", "GET"))
    assert [(r.status, r.body_size) for r in out] == [(status, 0), (200, 1)]


def test_close_delimited_body_uses_total_len() -> None:
    data = b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\n<html>"
    [r] = resps(data, total_len=len(data) + 10_000)
    head_len = len(data) - len(b"<html>")
    assert r.body_size == 10_006 and r.length == head_len + 10_006


def test_close_delimited_with_cut_head_is_unknown() -> None:
    data = b"HTTP/1.0 200 OK\r\nServer: x\r\n"
    [r] = resps(data, total_len=400)
    assert (r.body_size, r.length, r.head_complete) == (None, None, False)


def test_response_transfer_encoding_without_chunked_is_close_delimited() -> None:
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nzzzz"
    [r] = resps(data)
    assert (r.chunked, r.body_size) == (False, 4)


def test_101_switching_protocols_stops() -> None:
    data = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello"
    [r] = resps(data, methods=("GET",))
    assert r.status == 101 and not r.informational and r.body_size == 0


def test_connect_success_stops_at_tunnel() -> None:
    data = b"HTTP/1.1 200 Connection established\r\n\r\n\x16\x03\x03\x00\x10"
    [r] = resps(data, methods=("CONNECT",))
    assert (r.status, r.body_size, r.length) == (200, 0, len(data) - 5)


def test_response_head_cut() -> None:
    data = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Le"
    [r] = resps(data, total_len=900)
    assert (r.status, r.head_complete, r.length) == (200, False, None)


def test_response_status_line_cut() -> None:
    [r] = resps(b"HTTP/1.1 503 Service Unav", total_len=200)
    assert (r.status, r.head_complete) == (503, False)
    assert resps(b"HTTP/1.1 503 Service Unav") == []


def test_response_bare_lf_and_odd_case() -> None:
    data = b"HTTP/1.1 200 OK\nCONTENT-LENGTH: 2\n\nokHTTP/1.1 204 No Content\n\n"
    out = resps(data, methods=("GET", "DELETE"))
    assert [(r.status, r.body_size) for r in out] == [(200, 2), (204, 0)]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        random.Random(2).randbytes(200),
        bytes.fromhex("160303007a020000760303") + b"\x00" * 40,  # TLS ServerHello
        b"\x00\x00\x12\x04\x00\x00\x00\x00\x00",  # HTTP/2 SETTINGS frame
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 099 Low\r\n\r\n",
        b"HTTP/2 200\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
    ],
)
def test_garbage_responses(data: bytes) -> None:
    assert resps(data) == []


# --- route heuristic ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "route"),
    [
        ("/orders/123/items/9f8e7d6c5b4a3f2e1d0c", "/orders/*/items/*"),
        ("/users/550e8400-e29b-41d4-a716-446655440000/profile", "/users/*/profile"),
        ("/files/dGhpcyBpcyBhIHRva2VuMTIz", "/files/*"),
        ("/t/aB3_xY9-kL2mN5pQ7r", "/t/*"),
        ("/api/v1/health", "/api/v1/health"),
        ("/blog/my-first-post", "/blog/my-first-post"),
        ("/getUserProfileInformation", "/getUserProfileInformation"),
        ("/cafebabe", "/cafebabe"),  # hex-looking word without digits stays
        ("/a1b2c3d4", "/*"),
        ("/", "/"),
        ("", "/"),
        ("/orders/", "/orders/"),
        ("/2024/01/15/post", "/*/*/*/post"),
    ],
)
def test_route_heuristic(path: str, route: str) -> None:
    assert route_heuristic(path) == route


# --- properties ---------------------------------------------------------------------------


def _bounded_work(parse: Callable[[bytes], object], data: bytes) -> None:
    """The "returns fast" half of the random-input properties, as work rather than time: at
    most 64 line events, C calls and scanned bytes per input byte (random inputs take under 4;
    quadratic work on 2 KiB would take thousands)."""
    cap = 64 * (len(data) + 64)
    try:
        measure(parse, data, limit=Work(cap, cap, cap))
    except WorkBudgetExceeded as e:
        raise AssertionError(f"more than {cap} {e.unit} for {len(data)} bytes") from None


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2048), st.integers(0, 10_000))
def test_random_bytes_never_raise(data: bytes, extra: int) -> None:
    def parse(d: bytes) -> None:
        parse_requests(d, len(d) + extra)
        parse_responses(d, len(d) + extra, ("GET", "HEAD"))

    _bounded_work(parse, data)


_PREFIXES = [b"GET / HTTP/1.1\r\n", b"HTTP/1.1 200 OK\r\n", b"POST /x HTTP/1.1\r\n"]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(_PREFIXES), st.binary(max_size=1024), st.integers(0, 5000))
def test_http_prefixed_random_bytes_never_raise(prefix: bytes, tail: bytes, extra: int) -> None:
    data = prefix + tail
    for r in parse_requests(data, len(data) + extra):
        assert 0 <= r.offset < len(data)
    for s in parse_responses(data, len(data) + extra, ("GET",)):
        assert 0 <= s.offset < len(data)
    _bounded_work(lambda d: (parse_requests(d, len(d) + extra),
                             parse_responses(d, len(d) + extra, ("GET",))), data)


# (prefix, repeated unit, units in the hang-detector input).
_ADVERSARIAL = [
    pytest.param(b"GET / HTTP/1.1\r\n", b"X: y\r\n", 20_000, id="header lines"),
    pytest.param(b"", b"GET / HTTP/1.1\r\n\r\n", 10_000, id="pipelined"),
    pytest.param(b"", b"GET / HTTP/1.1\n\n", 10_000, id="pipelined bare LF"),
    pytest.param(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", b"1\r\nx\r\n",
                 20_000, id="chunks"),
    pytest.param(b"", b"HTTP/1.1 100 Continue\r\n\r\n", 10_000, id="interim responses"),
    pytest.param(b"GET ", b"/", 200_000, id="endless target"),
    pytest.param(b"GET / HTTP/1.1\r\n", b"\n", 100_000, id="blank lines"),
]


def _parse_both(data: bytes) -> None:
    parse_requests(data, len(data) + 1)
    parse_responses(data, len(data) + 1)


@pytest.mark.parametrize(("prefix", "unit", "count"), _ADVERSARIAL)
def test_adversarial_inputs_are_linear(prefix: bytes, unit: bytes, count: int) -> None:
    assert_linear(_parse_both, lambda k: prefix + unit * k, count // 100)


@pytest.mark.parametrize(("prefix", "unit", "count"), _ADVERSARIAL)
def test_adversarial_inputs_finish(prefix: bytes, unit: bytes, count: int) -> None:
    start = time.perf_counter()
    _parse_both(prefix + unit * count)
    # A hang detector, not a speed test (the test above checks the work is linear): this
    # takes milliseconds, a parser stuck in a loop the work count cannot see (in C) never ends.
    assert time.perf_counter() - start < 20.0


_token = st.text("abcdefghijklmnopqrstuvwxyz0123456789-._~", min_size=1, max_size=12)


@st.composite
def _request(draw: st.DrawFn) -> tuple[bytes, str, str, int | None]:
    method = draw(st.sampled_from(sorted(METHODS - {"CONNECT"})))
    path = "/" + "/".join(draw(st.lists(_token, max_size=4)))
    query = draw(st.none() | _token)
    eol = draw(st.sampled_from([b"\r\n", b"\n"]))
    headers = [b"Host: " + draw(_token).encode()]
    body = b""
    chunked = False
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    if framing == "length":
        body = draw(st.binary(max_size=64))
        headers.append(b"content-length: %d" % len(body))
    elif framing == "chunked":
        chunked = True
        chunks = draw(st.lists(st.binary(min_size=1, max_size=20), max_size=4))
        body = b"".join(b"%x" % len(c) + eol + c + eol for c in chunks) + b"0" + eol + eol
        headers.append(b"Transfer-Encoding: chunked")
    target = path + ("?" + query if query is not None else "")
    head = f"{method} {target} HTTP/1.1".encode() + eol + eol.join(headers) + eol + eol
    size = len(body) if not chunked else sum(len(c) for c in chunks)
    return head + body, method, path, size


@settings(max_examples=300)
@given(st.lists(_request(), min_size=1, max_size=6))
def test_pipelined_generated_requests_round_trip(
    messages: list[tuple[bytes, str, str, int | None]],
) -> None:
    data = b"".join(m[0] for m in messages)
    out = parse_requests(data, len(data))
    assert [(r.method, r.path) for r in out] == [(m[1], m[2]) for m in messages]
    assert [r.body_size for r in out] == [m[3] for m in messages]
    assert sum(r.length or 0 for r in out) == len(data)


@settings(max_examples=200)
@given(st.lists(_request(), min_size=1, max_size=6), st.integers(1, 400))
def test_truncated_pipeline_is_a_prefix(
    messages: list[tuple[bytes, str, str, int | None]], cut: int
) -> None:
    data = b"".join(m[0] for m in messages)
    captured = data[: max(1, len(data) - cut)]
    out = parse_requests(captured, len(data))
    expected = [(m[1], m[2]) for m in messages]
    got = [(r.method, r.path) for r in out]
    # Whatever was seen is the start of the real sequence; only the last may be partial.
    if got:
        assert got[:-1] == expected[: len(got) - 1]
        method, path = got[-1]
        exp_method, exp_path = expected[len(got) - 1]
        assert method == exp_method and exp_path.startswith(path)
