"""HTTP/2 and gRPC: the chunk parser on bytes captured from real clients and servers
(tests/fixtures_capture/capture_http2.py: httpx and curl against hypercorn, grpcio against
grpcio) fed as recorded, re-chunked, truncated and mangled, plus hand-built frames for what
the captures do not show (padding, CONTINUATION, RST_STREAM, GOAWAY, PUSH_PROMISE)."""

from __future__ import annotations

import dataclasses
import json
import random
import timeit
from pathlib import Path
from typing import Any

import pytest
from hpack import Encoder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel_side.protocols import http2
from kernel_side.protocols.http2 import H2Connection, H2Stream, looks_like_h2_preface

FIX = Path(__file__).resolve().parent / "fixtures" / "http2"
TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
GRPC_UA = "capture-grpc grpc-python/"

Chunk = tuple[bool, bytes]


def load(name: str) -> list[Chunk]:
    doc = json.loads((FIX / f"{name}.json").read_text())
    return [(tag == "c", bytes.fromhex(hx)) for tag, hx, _ in doc["chunks"]]


def run(chunks: list[Chunk], totals: dict[int, int] | None = None,
        conn: H2Connection | None = None) -> tuple[list[H2Stream], H2Connection]:
    """Feed chunks (chunk i carries meta=i and ts=i); finished streams, then the rest."""
    conn = conn or H2Connection()
    out: list[H2Stream] = []
    for i, (from_client, data) in enumerate(chunks):
        total = (totals or {}).get(i, len(data))
        out += conn.feed(from_client, data, total, i, meta=i)
    return out + conn.close(len(chunks)), conn


def truncated(chunks: list[Chunk], index: int, keep: int) -> tuple[list[Chunk], dict[int, int]]:
    """Chunk ``index`` captured only its first ``keep`` bytes."""
    out = list(chunks)
    out[index] = (chunks[index][0], chunks[index][1][:keep])
    return out, {index: len(chunks[index][1])}


def key(s: H2Stream) -> tuple[object, ...]:
    """Everything but timestamps and meta (which depend on the chunking)."""
    d = dataclasses.asdict(s)
    for k in ("start_ns", "end_ns", "request_meta", "response_meta", "shared_write"):
        d.pop(k)
    return tuple(sorted(d.items()))


ALL = ["h2c_httpx", "h2c_curl", "grpc_unary", "grpc_server_stream", "grpc_error", "grpc_mixed"]


# -- fixtures fed as recorded -----------------------------------------------------------------


def test_h2c_httpx() -> None:
    streams, conn = run(load("h2c_httpx"))
    assert [s.stream_id for s in streams] == [1, 3, 5]
    get, post, missing = streams
    assert (get.method, get.path, get.scheme, get.status) == ("GET", "/hello", "http", 200)
    assert get.authority is not None and get.authority.startswith("127.0.0.1:")
    assert get.traceparent == TP and get.user_agent == "capture-httpx/1.0"
    assert (get.request_body_bytes, get.response_body_bytes) == (0, 13)
    assert (post.method, post.path, post.status) == ("POST", "/echo", 200)
    assert (post.request_body_bytes, post.response_body_bytes) == (3000, 3000)
    assert (missing.path, missing.status, missing.response_body_bytes) == ("/missing?q=1", 404, 10)
    for s in streams:
        assert s.complete and s.headers_known and not s.reset
        assert s.grpc_status is None and s.request_messages == s.response_messages == 0
    # meta: the chunk that carried the request headers, and the one with the response headers.
    assert (get.request_meta, get.response_meta) == (1, 2)
    assert (post.request_meta, post.response_meta) == (4, 7)
    assert (post.start_ns, post.end_ns) == (4, 9)
    assert conn.stats["protocol_errors"] == conn.stats["hpack_errors"] == 0
    assert conn.stats["frames"] == 22 and conn.open_streams == 0


def test_h2c_curl() -> None:
    (s,), _ = run(load("h2c_curl"))
    assert (s.method, s.path, s.status, s.traceparent) == ("POST", "/echo", 200, TP)
    assert s.user_agent is not None and s.user_agent.startswith("curl/")
    assert s.content_type == "application/x-www-form-urlencoded"
    assert (s.request_body_bytes, s.response_body_bytes, s.complete) == (7, 7, True)


def test_grpc_unary() -> None:
    (s,), _ = run(load("grpc_unary"))
    assert (s.method, s.path, s.status) == ("POST", "/demo.Greeter/SayHello", 200)
    assert s.content_type == "application/grpc" and s.traceparent == TP
    assert s.user_agent is not None and s.user_agent.startswith(GRPC_UA)
    assert (s.grpc_status, s.grpc_message) == (0, "")
    # 5-byte prefix + b"alice"; 5 + b"hello alice".
    assert (s.request_body_bytes, s.response_body_bytes) == (10, 16)
    assert (s.request_messages, s.response_messages) == (1, 1)
    assert s.complete and s.headers_known


def test_grpc_server_stream() -> None:
    (s,), _ = run(load("grpc_server_stream"))
    assert s.path == "/demo.Greeter/ListItems" and s.grpc_status == 0
    assert (s.request_messages, s.response_messages) == (1, 5)
    assert s.response_body_bytes == sum(5 + len(b"item-%d:bob" % i) for i in range(5))


def test_grpc_error_trailers_only() -> None:
    (s,), _ = run(load("grpc_error"))
    assert s.path == "/demo.Greeter/Lookup" and s.status == 200
    assert (s.grpc_status, s.grpc_message) == (5, "no such user: carol")
    assert (s.response_body_bytes, s.response_messages, s.request_messages) == (0, 0, 1)
    assert s.complete


def test_grpc_mixed_one_connection() -> None:
    streams, _ = run(load("grpc_mixed"))
    assert [(s.stream_id, s.path, s.grpc_status, s.response_messages) for s in streams] == [
        (1, "/demo.Greeter/SayHello", 0, 1),
        (3, "/demo.Greeter/ListItems", 0, 5),
        (5, "/demo.Greeter/Lookup", 5, 0),
    ]
    assert all(s.complete and s.headers_known for s in streams)


def test_streams_returned_when_they_complete() -> None:
    conn = H2Connection()
    done_at = {}
    for i, (c, data) in enumerate(load("h2c_httpx")):
        for s in conn.feed(c, data, len(data), i):
            done_at[s.stream_id] = i
    assert done_at == {1: 2, 3: 9, 5: 11}
    assert conn.close(99) == []


# -- any chunking gives the same streams ------------------------------------------------------


def runs(chunks: list[Chunk]) -> list[Chunk]:
    """Merge consecutive chunks of the same direction (what a different reader would see)."""
    out: list[Chunk] = []
    for c, data in chunks:
        if out and out[-1][0] == c:
            out[-1] = (c, out[-1][1] + data)
        else:
            out.append((c, data))
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(ALL), seed=st.integers(0, 2**32 - 1), merge=st.booleans(),
       pieces=st.integers(1, 40))
def test_rechunking_gives_the_same_streams(name: str, seed: int, merge: bool,
                                           pieces: int) -> None:
    chunks = load(name)
    expected = [key(s) for s in run(chunks)[0]]
    rnd = random.Random(seed)
    source = runs(chunks) if merge else chunks
    split: list[Chunk] = []
    for c, data in source:
        cuts = sorted(rnd.sample(range(1, len(data)), min(pieces, len(data) - 1)))
        for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
            split.append((c, data[a:b]))
    assert [key(s) for s in run(split)[0]] == expected


def test_byte_by_byte() -> None:
    for name in ALL:
        chunks = load(name)
        single = [(c, data[i : i + 1]) for c, data in chunks for i in range(len(data))]
        assert [key(s) for s in run(single)[0]] == [key(s) for s in run(chunks)[0]]


# -- capture gaps -----------------------------------------------------------------------------


def test_gap_inside_data_keeps_everything() -> None:
    chunks = load("h2c_httpx")
    reference = [key(s) for s in run(chunks)[0]]
    # Chunks 5 (client) and 8 (server) are one 3000-byte DATA frame each.
    for index in (5, 8):
        for keep in (9, 10, 100, 3008):
            cut, totals = truncated(chunks, index, keep)
            streams, conn = run(cut, totals)
            assert [key(s) for s in streams] == reference
            assert conn.stats["gaps"] == 1


def test_gap_over_a_frame_header_loses_alignment_not_truth() -> None:
    chunks = load("h2c_httpx")
    # Chunk 5 keeps less than the DATA frame header: the direction cannot know where frames
    # are until the next write (chunk 6) starts with a plausible frame; its HPACK state is
    # unknown from then on, so stream 5's request headers are not decoded.
    for keep in (0, 5):
        cut, totals = truncated(chunks, 5, keep)
        streams, _ = run(cut, totals)
        by_id = {s.stream_id: s for s in streams}
        assert by_id[3].complete and by_id[3].path == "/echo"
        assert by_id[3].request_body_bytes == 0  # never seen, never invented
        assert by_id[5].complete and not by_id[5].headers_known and by_id[5].path is None
        assert by_id[5].status == 404


def test_gap_inside_grpc_message_keeps_the_stream() -> None:
    # Server-streaming response split so each DATA frame is its own write, then one of them
    # cut after its message header: counts and trailers survive.
    chunks = load("grpc_server_stream")
    reference = run(chunks)[0][0]
    split: list[Chunk] = []
    for c, data in chunks:
        pos = 24 if c and data.startswith(http2.PREFACE) else 0
        if pos:
            split.append((c, data[:pos]))
        while pos + 9 <= len(data):
            end = pos + 9 + int.from_bytes(data[pos : pos + 3], "big")
            split.append((c, data[pos:end]))
            pos = end
    data_frames = [i for i, (c, d) in enumerate(split) if not c and d[3] == 0 and len(d) > 9]
    assert len(data_frames) == 5
    cut, totals = truncated(split, data_frames[2], 9 + 6)
    (s,), _ = run(cut, totals)
    assert key(s) == key(reference)


def test_gap_in_headers_makes_later_headers_unknown_never_wrong() -> None:
    chunks = load("h2c_httpx")
    # Chunk 4: HEADERS of stream 3 (18 bytes) then a WINDOW_UPDATE; keep 20 of its 40 bytes:
    # the header block is cut and the next frame header is lost with it.
    cut, totals = truncated(chunks, 4, 20)
    streams, conn = run(cut, totals)
    by_id = {s.stream_id: s for s in streams}
    assert by_id[1].headers_known and by_id[1].path == "/hello"
    for sid, status in ((3, 200), (5, 404)):
        s = by_id[sid]
        assert not s.headers_known
        assert s.method is s.path is s.authority is s.traceparent is s.user_agent is None
        assert s.status == status  # the server direction kept its HPACK state
        assert s.complete
    # The client direction found its frames again at the next write: the body still counts.
    assert by_id[3].request_body_bytes == 3000
    assert conn.stats["gaps"] == 1


def test_gap_only_in_header_block_payload() -> None:
    chunks = load("h2c_httpx")
    # Chunk 10 is HEADERS(stream 5, 18 bytes) + WINDOW_UPDATE: split so the HEADERS frame is
    # its own truncated write; the alignment survives but the client HPACK state does not.
    c, data = chunks[10]
    parts = [*chunks[:10], (c, data[:12]), (c, data[27:]), *chunks[11:]]
    streams, _ = run(parts, {10: 27})
    s = streams[-1]
    assert s.stream_id == 5 and not s.headers_known and s.path is None
    assert s.status == 404 and s.complete


def test_gap_swallowing_trailers_leaves_stream_incomplete() -> None:
    chunks = load("grpc_unary")
    # Chunk 7 (server): HEADERS, DATA, trailers HEADERS, WINDOW_UPDATE; keep 100 bytes (into
    # the DATA frame): the trailers are gone, so no status may be invented.
    cut, totals = truncated(chunks, 7, 100)
    (s,), conn = run(cut, totals)
    assert s.status == 200 and s.grpc_status is None and not s.complete
    assert conn.stats["gaps"] == 1


def test_gap_then_later_streams_on_grpc() -> None:
    chunks = load("grpc_mixed")
    # Chunk 5 (server): response HEADERS of stream 1, DATA, trailers, WINDOW_UPDATE; keep 20
    # bytes: the server's HPACK state is lost, and its frames until the next write (a PING).
    cut, totals = truncated(chunks, 5, 20)
    streams, _ = run(cut, totals)
    by_id = {s.stream_id: s for s in streams}
    one, three, five = by_id[1], by_id[3], by_id[5]
    assert not one.complete and one.status is None and one.grpc_status is None
    for s in (three, five):
        # Request side intact; no response header may be guessed.
        assert s.path is not None and s.path.startswith("/demo.Greeter/")
        assert not s.headers_known and s.complete
        assert s.status is None and s.grpc_status is None and s.grpc_message is None
    assert three.response_messages == 5


# -- cut connections and broken input ---------------------------------------------------------


def test_connection_cut_mid_stream() -> None:
    chunks = load("grpc_server_stream")
    conn = H2Connection()
    # Through chunk 5: response headers and four of the five messages.
    for i, (c, data) in enumerate(chunks[:6]):
        assert conn.feed(c, data, len(data), i) == []
    # Then half of chunk 6 (the last message, cut) and the connection closes.
    c, data = chunks[6]
    assert conn.feed(c, data[:10], 10, 6) == []
    assert conn.open_streams == 1
    (s,) = conn.close(7)
    assert not s.complete and s.path == "/demo.Greeter/ListItems" and s.status == 200
    assert s.grpc_status is None and s.response_messages == 5 and s.request_messages == 1
    assert conn.open_streams == 0 and conn.close(8) == []


def test_looks_like_h2_preface() -> None:
    assert looks_like_h2_preface(http2.PREFACE + b"\x00\x00")
    assert looks_like_h2_preface(b"PRI * HT")
    assert not looks_like_h2_preface(b"")
    assert not looks_like_h2_preface(b"GET / HTTP/1.1\r\n")
    assert not looks_like_h2_preface(b"PRI * HTTP/1.1")


def test_missing_preface_means_unknown_headers() -> None:
    chunks = load("grpc_unary")
    c, data = chunks[0]
    chunks[0] = (c, data[24:])  # as if the capture began after the preface
    (s,), conn = run(chunks)
    assert not s.headers_known and s.path is None and s.status is None
    assert s.request_body_bytes == 10 and s.complete
    assert conn.stats["protocol_errors"] >= 1


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=300), st.integers(0, 400)),
                max_size=20))
def test_random_bytes_never_raise(feed: list[tuple[bool, bytes, int]]) -> None:
    conn = H2Connection()
    for i, (c, data, extra) in enumerate(feed):
        for s in conn.feed(c, data, len(data) + extra, i):
            assert isinstance(s, H2Stream)
    conn.close(0)
    assert conn.open_streams == 0


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(ALL), seed=st.integers(0, 2**32 - 1), flips=st.integers(1, 20))
def test_mangled_fixtures_never_raise(name: str, seed: int, flips: int) -> None:
    rnd = random.Random(seed)
    chunks = [(c, bytearray(d)) for c, d in load(name)]
    for _ in range(flips):
        _, d = rnd.choice(chunks)
        if d:
            d[rnd.randrange(len(d))] = rnd.randrange(256)
    conn = H2Connection()
    for i, (c, d) in enumerate(chunks):
        conn.feed(c, bytes(d), len(d) + rnd.choice((0, 0, 0, rnd.randrange(100))), i)
    conn.close(0)


# -- hand-built frames ------------------------------------------------------------------------


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") + (
        payload
    )


SETTINGS = frame(4, 0, 0)


class Peer:
    """Builds one side's frames with a real HPACK encoder."""

    def __init__(self) -> None:
        self.enc = Encoder()

    def headers(self, sid: int, hdrs: list[tuple[str, str]], end_stream: bool = False,
                flags: int = 0x4, prefix: bytes = b"", pad: int = 0) -> bytes:
        block = self.enc.encode(hdrs)
        f = flags | (0x1 if end_stream else 0) | (0x8 if pad else 0)
        body = (bytes([pad]) if pad else b"") + prefix + block + b"\x00" * pad
        return frame(1, f, sid, body)


def req(path: str = "/x", **extra: str) -> list[tuple[str, str]]:
    return [(":method", "POST"), (":scheme", "http"), (":path", path),
            (":authority", "svc:50051"), *extra.items()]


def test_padding_priority_and_continuation() -> None:
    cli, srv = Peer(), Peer()
    block = cli.enc.encode(req("/padded", **{"content-type": "application/grpc"}))
    part1, part2, part3 = block[:5], block[5:9], block[9:]
    client = (http2.PREFACE + SETTINGS
              + frame(1, 0x8 | 0x20, 1, bytes([3]) + b"\x00\x00\x00\x00\x10" + part1 + b"pad")
              + frame(9, 0, 1, part2) + frame(9, 0x4, 1, part3)
              # Padded DATA: one gRPC message (5 + 3 bytes) and 4 padding bytes.
              + frame(0, 0x8 | 0x1, 1, bytes([4]) + b"\x00\x00\x00\x00\x03abc" + b"\x00" * 4))
    server = (SETTINGS + srv.headers(1, [(":status", "200"), ("content-type", "application/grpc")],
                                     pad=2)
              + frame(0, 0, 1, b"\x00\x00\x00\x00\x01z\x00\x00\x00\x00\x00")
              + srv.headers(1, [("grpc-status", "13"), ("grpc-message", "boom%20%E2%9C%93")],
                            end_stream=True))
    (s,), conn = run([(True, client), (False, server)])
    assert (s.path, s.status, s.grpc_status, s.grpc_message) == ("/padded", 200, 13, "boom ✓")
    assert (s.request_body_bytes, s.request_messages) == (8, 1)
    # An empty message counts too.
    assert (s.response_body_bytes, s.response_messages) == (11, 2)
    assert s.complete and conn.stats["protocol_errors"] == 0


def test_interim_response_then_final() -> None:
    cli, srv = Peer(), Peer()
    client = http2.PREFACE + SETTINGS + cli.headers(1, req("/up"), end_stream=True)
    server = (srv.headers(1, [(":status", "100")]) + srv.headers(1, [(":status", "201")])
              + frame(0, 1, 1, b"ok"))
    (s,), _ = run([(True, client), (False, b""), (False, server)])
    assert s.status == 201 and s.response_meta == 2 and s.complete


def test_rst_stream_and_goaway() -> None:
    cli = Peer()
    client = (http2.PREFACE + SETTINGS + cli.headers(1, req("/a"), end_stream=True)
              + cli.headers(3, req("/b"), end_stream=True)
              + cli.headers(5, req("/c"), end_stream=True))
    server = (frame(3, 0, 1, (8).to_bytes(4, "big"))  # CANCEL
              + frame(7, 0, 0, (3).to_bytes(4, "big") + b"\x00\x00\x00\x00"))
    conn = H2Connection()
    assert conn.feed(True, client, len(client), 1) == []
    assert conn.open_streams == 3
    out = conn.feed(False, server, len(server), 2)
    assert [(s.stream_id, s.reset, s.reset_error_code, s.complete) for s in out] == [
        (1, True, 8, True), (5, False, None, False)]
    assert conn.open_streams == 1
    assert [s.path for s in conn.close(3)] == ["/b"]


def test_push_promise_decoded_but_unknown() -> None:
    cli, srv = Peer(), Peer()
    client = http2.PREFACE + SETTINGS + cli.headers(1, req("/page"), end_stream=True)
    promise_block = srv.enc.encode(req("/style.css"))
    server = (frame(5, 0x4, 1, (2).to_bytes(4, "big") + promise_block)
              + srv.headers(1, [(":status", "200")]) + frame(0, 1, 1, b"<html>")
              # The pushed response, then a later stream: the HPACK state stayed in step.
              + srv.headers(2, [(":status", "200")]) + frame(0, 1, 2, b"css"))
    client2 = cli.headers(3, req("/next"), end_stream=True)
    server2 = srv.headers(3, [(":status", "204")], end_stream=True)
    streams, conn = run([(True, client), (False, server), (True, client2), (False, server2)])
    by_id = {s.stream_id: s for s in streams}
    assert by_id[1].status == 200 and by_id[1].complete
    assert not by_id[2].headers_known and by_id[2].path is None and by_id[2].complete
    assert by_id[2].response_body_bytes == 3
    assert by_id[3].path == "/next" and by_id[3].status == 204
    assert conn.stats["push_promises"] == 1


def test_table_size_update_and_bad_hpack() -> None:
    cli = Peer()
    cli.enc.header_table_size = 256  # emits a dynamic table size update in the next block
    client = (http2.PREFACE + SETTINGS + cli.headers(1, req("/one"), end_stream=True)
              + cli.headers(3, req("/two"), end_stream=True))
    server = frame(1, 0x5, 1, b"\x88") + frame(1, 0x5, 3, b"\xff\xff\xff\xff\xff\x00")
    (a, b), conn = run([(True, client), (False, server)])
    assert (a.path, a.status) == ("/one", 200)
    assert b.path == "/two" and b.status is None and not b.headers_known
    assert conn.stats["hpack_errors"] == 1


def test_open_streams_are_bounded() -> None:
    cli = Peer()
    conn = H2Connection()
    conn.feed(True, http2.PREFACE + SETTINGS, 33, 0)
    evicted: list[H2Stream] = []
    for i in range(http2.MAX_OPEN_STREAMS + 10):
        data = cli.headers(2 * i + 1, req(f"/s{i}"))
        evicted += conn.feed(True, data, len(data), i)
    assert conn.open_streams == http2.MAX_OPEN_STREAMS
    assert [s.path for s in evicted] == [f"/s{i}" for i in range(10)]
    assert not any(s.complete for s in evicted)


def test_oversized_header_block_is_lost_not_buffered() -> None:
    cli = Peer()
    big = cli.enc.encode([*req("/big"), ("x-big", "v" * (http2.MAX_BUFFERED + 10))])
    client = (http2.PREFACE + SETTINGS + frame(1, 0x1, 1, big[:16384])
              + b"".join(frame(9, 0, 1, big[i : i + 16384]) for i in range(16384, len(big),
                                                                            16384))
              + frame(9, 0x4, 1, b""))
    conn = H2Connection()
    conn.feed(True, client, len(client), 0)
    (s,) = conn.close(1)
    assert not s.headers_known and s.path is None


# -- speed (reported, never asserted) ---------------------------------------------------------


def test_speed_grpc_unary(capsys: pytest.CaptureFixture[str]) -> None:
    chunks = load("grpc_unary")

    def once() -> None:
        conn = H2Connection()
        for i, (c, data) in enumerate(chunks):
            conn.feed(c, data, len(data), i)

    n = 200
    per = min(timeit.repeat(once, number=n, repeat=3)) / n
    with capsys.disabled():
        print(f"\nhttp2: grpc unary connection (1 stream, {len(chunks)} chunks): "
              f"{per * 1e6:.1f} us")


# -- Upgrade: h2c, through span assembly as the kernel hands it over ---------------------------


class _Procs:
    def resource_for(self, tgid: int) -> Any:
        from kernel_side.model import Resource

        return Resource((tgid, 1), {"service.name": f"svc-{tgid}"})

    def listen_port(self, tgid: int, fd: int) -> int | None:
        return 8080 if fd == 3 else None


def _upgrade_spans(role: int, split_response: bool) -> tuple[list[Any], Any]:
    """Feed the h2c_upgrade capture the way the kernel reports it for one side: the HTTP/1.1
    request and the first response read/write (the ``101``) as one exchange, every later read
    and write as a stream-mode chunk. ``split_response``: the 101 came alone (a server that
    wrote it by itself), else with the first HTTP/2 frames in the same read, as captured."""
    from kernel_side.assembly import IdSource, SpanAssembler
    from kernel_side.events import Chunk, Exchange
    from kernel_side.protocols.http2_spans import StreamSpans
    from kernel_side.protocols.registry import register_all

    spans: list[Any] = []
    asm = SpanAssembler(_Procs(), spans.append, ids=IdSource(bytes(24)))
    register_all(asm)
    asm.set_stream_handler(StreamSpans(asm))
    chunks = load("h2c_upgrade")
    (c0, request), (s0, response) = chunks[0], chunks[1]
    assert c0 and not s0 and request.startswith(b"GET /hello HTTP/1.1\r\n")
    rest = chunks[2:]
    if split_response:
        head = response.index(b"\r\n\r\n") + 4
        response, rest = response[:head], [(False, response[head:]), *rest]
    listen_fd = 3 if role == 1 else 0
    asm.on_exchange(Exchange(
        tgid=7, fd=5, role=role, peer_address="127.0.0.1", peer_port=40000, listen_fd=listen_fd,
        req_tid=7, resp_tid=7, conn_id=99, exchange_id=1, parent_exchange_id=0,
        req_start_ns=1_000, req_end_ns=2_000, resp_start_ns=3_000, resp_end_ns=4_000,
        req_bytes=len(request), resp_bytes=len(response), req_calls=1, resp_calls=1,
        request=request, response=response, ctx=None))
    if split_response:
        assert spans == []  # no span of its own: the upgraded request's span is stream 1's
    for i, (from_client, data) in enumerate(rest):
        asm.on_chunk(Chunk(tgid=7, fd=5, role=role, from_client=from_client, closed=False,
                           peer_address="127.0.0.1", peer_port=40000, listen_fd=listen_fd,
                           tid=7, total_len=len(data), conn_id=99, ts_ns=5_000 + i,
                           parent_exchange_id=0, data=data, ctx=None))
    asm.on_chunk(Chunk(tgid=7, fd=5, role=role, from_client=False, closed=True,
                       peer_address="127.0.0.1", peer_port=40000, listen_fd=listen_fd, tid=7,
                       total_len=0, conn_id=99, ts_ns=9_000, parent_exchange_id=0, data=b"",
                       ctx=None))
    asm.flush()
    assert asm.stats.parse_errors == 0 and asm.stats.unknown_protocol == 0
    return spans, asm


@pytest.mark.parametrize("split_response", [False, True])
@pytest.mark.parametrize("role", [1, 2])  # ROLE_SERVER (hypercorn), ROLE_CLIENT (curl)
def test_h2c_upgrade_one_span_with_the_http11_request_line(role: int,
                                                           split_response: bool) -> None:
    spans, asm = _upgrade_spans(role, split_response)
    assert len(spans) == 1
    s = spans[0]
    assert s.start_ns == asm.epoch_ns(1_000)  # the operation began with the HTTP/1.1 request
    attrs = s.attributes
    assert attrs["http.request.method"] == "GET"
    assert attrs["network.protocol.version"] == "2"
    assert attrs["http.response.status_code"] == 200
    assert "ebpf_bridge.capture.truncated" not in attrs
    if role == 1:
        assert s.kind.name == "SERVER" and attrs["url.path"] == "/hello"
        assert attrs["server.port"] == 8080
        assert s.trace_id.hex() == TP.split("-")[1]  # the upgrading request's traceparent
    else:
        assert s.kind.name == "CLIENT" and attrs["url.full"].endswith("/hello")


@pytest.mark.parametrize("role", [1, 2])  # ROLE_SERVER, ROLE_CLIENT
def test_grpc_not_found_is_the_callers_error_only(role: int) -> None:
    # Semantic conventions: a server span fails only on the codes it is to blame for; the
    # code itself is on rpc.grpc.status_code either way (README: Spans).
    from kernel_side.assembly import IdSource, SpanAssembler
    from kernel_side.events import Chunk
    from kernel_side.model import StatusCode
    from kernel_side.protocols.http2_spans import StreamSpans

    spans: list[Any] = []
    asm = SpanAssembler(_Procs(), spans.append, ids=IdSource(bytes(24)))
    streams = StreamSpans(asm)
    for i, (from_client, data) in enumerate(load("grpc_error")):
        streams(Chunk(tgid=7, fd=5, role=role, from_client=from_client, closed=False,
                      peer_address="127.0.0.1", peer_port=40000, listen_fd=3, tid=7,
                      total_len=len(data), conn_id=5, ts_ns=1_000 + i, parent_exchange_id=0,
                      data=data, ctx=None))
    streams.flush(10**9)
    asm.flush()
    (s,) = spans
    assert s.name == "demo.Greeter/Lookup" and s.attributes["rpc.grpc.status_code"] == 5
    if role == 1:
        assert s.status == StatusCode.UNSET and "error.type" not in s.attributes
    else:
        assert s.status == StatusCode.ERROR and s.attributes["error.type"] == "NOT_FOUND"


def test_one_write_opening_several_streams_marks_them_shared() -> None:
    cli, srv = Peer(), Peer()
    opening = http2.PREFACE + SETTINGS
    two = cli.headers(1, req("/a"), end_stream=True) + cli.headers(3, req("/b"), end_stream=True)
    alone = cli.headers(5, req("/c"), end_stream=True)
    server = b"".join(srv.headers(sid, [(":status", "200")], end_stream=True)
                      for sid in (1, 3, 5))
    streams, _ = run([(True, opening), (True, two), (True, alone), (False, server)])
    shared = {s.path: s.shared_write for s in streams}
    assert shared == {"/a": True, "/b": True, "/c": False}
    # A stream's own frames in several writes, or several streams' other frames in one
    # write, are not a shared opening.
    cli, srv = Peer(), Peer()  # a new connection: new HPACK state
    streams, _ = run([(True, opening + cli.headers(1, req("/d"))),
                      (True, frame(0, 1, 1, b"x") + cli.headers(3, req("/e"), end_stream=True)),
                      (False, srv.headers(1, [(":status", "200")], end_stream=True)
                       + srv.headers(3, [(":status", "200")], end_stream=True))])
    assert {s.path: s.shared_write for s in streams} == {"/d": False, "/e": False}


def test_shared_write_client_spans_take_no_thread_context() -> None:
    """httpcore (httpx) queues a stream's HEADERS before it takes the connection's write lock,
    so one thread's write can carry another thread's request: the writer's parent request and
    tenant would be a guess, and a wrong tenant is worse than none."""
    from bridge import _abi
    from kernel_side import semconv
    from kernel_side.assembly import IdSource, SpanAssembler
    from kernel_side.events import Chunk
    from kernel_side.protocols.http2_spans import StreamSpans

    spans: list[Any] = []
    asm = SpanAssembler(_Procs(), spans.append, ids=IdSource(bytes(24)))
    streams = StreamSpans(asm)
    ctx = _abi.pack_value(_abi.encode_attrs({"tenant_id": "acme"}))
    cli, srv = Peer(), Peer()
    writes = [
        (True, http2.PREFACE + SETTINGS),
        (True, cli.headers(1, req("/a"), end_stream=True)
         + cli.headers(3, req("/b", traceparent=TP), end_stream=True)),
        (True, cli.headers(5, req("/c"), end_stream=True)),
        (False, b"".join(srv.headers(sid, [(":status", "200")], end_stream=True)
                         for sid in (1, 3, 5))),
    ]
    for i, (from_client, data) in enumerate(writes):
        streams(Chunk(tgid=7, fd=5, role=2, from_client=from_client, closed=False,
                      peer_address="127.0.0.1", peer_port=50051, listen_fd=0, tid=7,
                      total_len=len(data), conn_id=5, ts_ns=1_000 + i,
                      parent_exchange_id=40 if from_client else 0, data=data,
                      ctx=ctx if from_client else None))
    streams.flush(10**9)
    asm.flush()
    by_path = {s.attributes["url.full"].rsplit("/", 1)[-1]: s for s in spans}
    assert set(by_path) == {"a", "b", "c"}
    for name in ("a", "b"):
        attrs = by_path[name].attributes
        assert attrs[semconv.BRIDGE_THREAD_AMBIGUOUS] is True and "tenant_id" not in attrs
        assert by_path[name].parent_span_id != asm.ids.span_id(40)
    assert by_path["a"].parent_span_id is None
    # A traceparent the request itself carries is still followed.
    assert by_path["b"].trace_id.hex() == TP.split("-")[1]
    c = by_path["c"]
    assert semconv.BRIDGE_THREAD_AMBIGUOUS not in c.attributes
    assert c.attributes["tenant_id"] == "acme" and c.parent_span_id == asm.ids.span_id(40)
