"""HTTP/2 (and gRPC over HTTP/2) parser for captured connections: chunks in, streams out.

For an HTTP/2 connection the kernel side reports every read and write as a *chunk*: the
captured first bytes of the syscall, how many bytes it really moved, a timestamp and the
direction, in order per connection and direction. :class:`H2Connection` is fed those chunks and
returns each stream (one request/response exchange) once it finished.

Framing follows RFC 9113: the client starts with the 24-byte connection preface, then each
direction is a sequence of frames with a 9-byte header (24-bit length, type, flags, 31-bit
stream id). Header blocks (HEADERS or PUSH_PROMISE plus CONTINUATION frames) are HPACK
compressed (RFC 7541) against a dynamic table that the encoder and decoder keep in step: one
``hpack.Decoder`` per direction mirrors the receiver's table, so every header block of a
direction is decoded in order, including those of streams the parser does not track.

Capture gaps: when a syscall moved more bytes than were captured, the parser skips exactly the
missing bytes using the frame lengths it knows. A gap that falls inside a DATA frame costs
nothing but the gRPC message count of that stream. A gap that swallows part of a header block
makes that direction's HPACK state unknowable, so from then on its header blocks are not
decoded and streams report ``headers_known=False`` with ``None`` fields rather than wrong values.
A gap that runs past the end of the current frame loses the frame alignment too: the direction
is then *desynchronised* and ignored until a later chunk starts with a run of plausible frame
headers (writers emit whole frames, so a new syscall usually starts at a frame boundary).

gRPC (content-type ``application/grpc...``): messages are a 1-byte compressed flag and a 4-byte
big-endian length, then the message; they are counted as DATA payload streams by, without
buffering it. ``grpc-status`` and ``grpc-message`` come from the response trailers or from a
trailers-only response.

Contract: never raises, linear time in the bytes fed, bounded memory per connection (64 KiB of
buffered frame payload or header block per direction, at most :data:`MAX_OPEN_STREAMS` open
streams; the oldest is evicted and returned incomplete when a new one would exceed that).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

from hpack import Decoder

from kernel_side.protocols.http1 import MAX_VALUE_LEN

__all__ = [
    "MAX_BUFFERED",
    "MAX_OPEN_STREAMS",
    "PREFACE",
    "H2Connection",
    "H2Stream",
    "looks_like_h2_preface",
]

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
"""The client connection preface (RFC 9113 section 3.4)."""

MAX_OPEN_STREAMS: Final = 1024
"""Open streams tracked per connection; beyond this the oldest is evicted as incomplete."""

MAX_BUFFERED: Final = 64 * 1024
"""Most frame payload (or header block) bytes buffered per direction."""

_DEFAULT_MAX_FRAME: Final = 16384
_MAX_TABLE_SIZE: Final = 64 * 1024
"""Largest HPACK dynamic table a decoder accepts (peers rarely announce more than 4096)."""

# Frame types.
_DATA: Final = 0x0
_HEADERS: Final = 0x1
_PRIORITY: Final = 0x2
_RST_STREAM: Final = 0x3
_SETTINGS: Final = 0x4
_PUSH_PROMISE: Final = 0x5
_PING: Final = 0x6
_GOAWAY: Final = 0x7
_WINDOW_UPDATE: Final = 0x8
_CONTINUATION: Final = 0x9
# Flags.
_END_STREAM: Final = 0x1
_ACK: Final = 0x1
_END_HEADERS: Final = 0x4
_PADDED: Final = 0x8
_PRIORITY_FLAG: Final = 0x20
# Settings.
_SETTINGS_HEADER_TABLE_SIZE: Final = 0x1
_SETTINGS_MAX_FRAME_SIZE: Final = 0x5

# What the direction parser does with a frame's payload.
_MODE_SKIP: Final = 0
_MODE_BUFFER: Final = 1
_MODE_DATA: Final = 2
_BUFFERED_TYPES: Final = frozenset(
    {_HEADERS, _CONTINUATION, _PUSH_PROMISE, _RST_STREAM, _SETTINGS, _GOAWAY}
)
# Stream-id and fixed-length rules used to judge whether bytes look like a frame header.
_NEED_STREAM: Final = frozenset(
    {_DATA, _HEADERS, _PRIORITY, _RST_STREAM, _PUSH_PROMISE, _CONTINUATION}
)
_NEED_NO_STREAM: Final = frozenset({_SETTINGS, _PING, _GOAWAY})
_FIXED_LEN: Final = {_PRIORITY: 5, _RST_STREAM: 4, _PING: 8, _WINDOW_UPDATE: 4}

# Header block kinds.
_KIND_HEADERS: Final = 0
_KIND_PUSH: Final = 1

_GRPC_CT: Final = "application/grpc"


@dataclass(slots=True)
class H2Stream:
    """One HTTP/2 stream (one request and its response) seen on a connection."""

    stream_id: int
    method: str | None = None
    path: str | None = None
    authority: str | None = None
    """``:authority``, else the ``host`` header."""
    scheme: str | None = None
    status: int | None = None
    """``:status`` of the final (non-1xx) response headers."""
    content_type: str | None = None
    """The request content-type."""
    grpc_status: int | None = None
    grpc_message: str | None = None
    """Percent-decoded (gRPC encodes it so)."""
    traceparent: str | None = None
    """The request's traceparent; ``None`` when absent or sent more than once."""
    user_agent: str | None = None
    start_ns: int = 0
    """Timestamp of the first chunk that carried a frame of this stream."""
    end_ns: int = 0
    """Timestamp of the last chunk that carried a frame of this stream."""
    request_body_bytes: int = 0
    """DATA payload bytes (padding excluded) client to server, captured or skipped."""
    response_body_bytes: int = 0
    request_messages: int = 0
    """gRPC messages started client to server (0 unless the stream is gRPC)."""
    response_messages: int = 0
    headers_known: bool = True
    """False when one of this stream's header blocks could not be decoded (HPACK state lost
    to a capture gap or an HPACK error, or a pushed stream): the fields it would have set
    stay ``None``; fields set by blocks that did decode are kept."""
    reset: bool = False
    reset_error_code: int | None = None
    """RST_STREAM error code; ``None`` when not reset or when the code was not captured."""
    complete: bool = False
    """Both sides sent END_STREAM, or the stream was reset."""
    request_meta: object | None = None
    """``meta`` of the chunk that completed this stream's request header block."""
    response_meta: object | None = None
    """``meta`` of the chunk that completed the final response header block."""
    shared_write: bool = False
    """The write that opened this stream opened others too. A client that shares one
    connection among threads may send another thread's queued request in its own write
    (httpcore queues a stream's HEADERS before it takes the write lock), so the writing
    thread, whose context ``request_meta`` holds, is not known to be this stream's."""

    @property
    def is_grpc(self) -> bool:
        """The request (or, when it is unknown, nothing contradicts) says gRPC."""
        ct = self.content_type
        return ct is not None and ct.startswith(_GRPC_CT)


def looks_like_h2_preface(data: bytes) -> bool:
    """Whether ``data`` starts with the client preface (or is a non-empty prefix of it)."""
    head = data[:24]
    return bool(head) and PREFACE.startswith(head)


def _text(raw: bytes) -> str:
    if len(raw) <= MAX_VALUE_LEN:
        return raw.decode("utf-8", "replace")
    return raw[:MAX_VALUE_LEN].decode("utf-8", "replace")[:MAX_VALUE_LEN]


def _small_int(raw: bytes) -> int | None:
    raw = raw.strip(b" \t")
    if not raw or len(raw) > 10 or not raw.isdigit():
        return None
    return int(raw)


class _Grpc:
    """gRPC length-prefixed message framing of one stream direction, walked without buffering."""

    __slots__ = ("body_left", "hdr_len", "hdr_seen", "lost", "messages")

    def __init__(self) -> None:
        self.messages = 0
        self.body_left = 0  # message body bytes still to come
        self.hdr_seen = 0  # bytes of the 5-byte message header seen so far (0: none)
        self.hdr_len = 0  # length accumulated from the header bytes seen
        self.lost = False  # a gap broke the alignment: stop counting

    def feed(self, data: bytes, pos: int, end: int) -> None:
        if self.lost:
            return
        while pos < end:
            left = self.body_left
            if left:
                take = end - pos if end - pos < left else left
                self.body_left = left - take
                pos += take
                continue
            seen = self.hdr_seen
            if seen == 0:
                self.messages += 1
            length = self.hdr_len
            while seen < 5 and pos < end:
                if seen:
                    length = (length << 8) | data[pos]
                seen += 1
                pos += 1
            if seen == 5:
                self.body_left = length
                self.hdr_seen = 0
                self.hdr_len = 0
            else:
                self.hdr_seen = seen
                self.hdr_len = length

    def skip(self, n: int) -> None:
        if self.hdr_seen == 0 and self.body_left >= n:
            self.body_left -= n
        else:
            self.lost = True


class _State:
    """Per-stream parsing state around the public record."""

    __slots__ = ("final_seen", "grpc_req", "grpc_resp", "rec", "req_ended", "resp_ct", "resp_ended")

    def __init__(self, rec: H2Stream) -> None:
        self.rec = rec
        self.req_ended = False
        self.resp_ended = False
        self.final_seen = False  # final response headers seen (later blocks are trailers)
        self.resp_ct: str | None = None
        self.grpc_req = _Grpc()
        self.grpc_resp = _Grpc()


class _Dir:
    """Frame parser state of one direction."""

    __slots__ = (
        "block",
        "block_end_stream",
        "block_kind",
        "block_lost",
        "block_promised",
        "block_sid",
        "data_left",
        "decoder",
        "desync",
        "flags",
        "from_client",
        "ftype",
        "hdr",
        "left",
        "lost",
        "max_frame",
        "mode",
        "pad_pending",
        "payload",
        "preface_left",
        "sid",
        "stream",
    )

    def __init__(self, from_client: bool) -> None:
        self.from_client = from_client
        self.preface_left = len(PREFACE) if from_client else 0
        self.desync = False
        self.decoder: Decoder | None = Decoder()
        self.max_frame = _DEFAULT_MAX_FRAME  # what the peer allows this side to send
        # The frame being read: header bytes collected, then its payload.
        self.hdr = bytearray()
        self.left = -1  # payload bytes still to come; -1 while reading a frame header
        self.ftype = 0
        self.flags = 0
        self.sid = 0
        self.mode = _MODE_SKIP
        self.payload = bytearray()
        self.lost = False  # part of the buffered payload was not captured (or over the cap)
        self.stream: _State | None = None  # DATA: the stream it belongs to
        self.pad_pending = False  # DATA: the pad-length byte is still to come
        self.data_left = 0  # DATA: payload bytes that are data (not padding) still to come
        # A header block waiting for CONTINUATION frames.
        self.block: bytearray | None = None
        self.block_sid = 0
        self.block_kind = _KIND_HEADERS
        self.block_end_stream = False
        self.block_lost = False
        self.block_promised = 0  # PUSH_PROMISE: the promised stream id


def _plausible(data: bytes, pos: int, max_frame: int) -> bool:
    """Whether ``data[pos:]`` starts with frame headers that all obey the frame rules."""
    n = len(data)
    seen = 0
    while pos + 9 <= n:
        length = int.from_bytes(data[pos : pos + 3], "big")
        ftype = data[pos + 3]
        sid = int.from_bytes(data[pos + 5 : pos + 9], "big")
        if ftype > _CONTINUATION or length > max_frame or sid & 0x80000000:
            return False
        if (sid == 0 and ftype in _NEED_STREAM) or (sid and ftype in _NEED_NO_STREAM):
            return False
        fixed = _FIXED_LEN.get(ftype)
        if (fixed is not None and length != fixed) or (ftype == _SETTINGS and length % 6):
            return False
        seen += 1
        pos += 9 + length
    return seen > 0


class H2Connection:
    """Incremental parser of one HTTP/2 connection, fed chunk by chunk."""

    __slots__ = ("_c", "_max_client_sid", "_max_push_sid", "_opened", "_opened_meta", "_out",
                 "_s", "_streams", "stats")

    def __init__(self) -> None:
        self._c = _Dir(True)
        self._s = _Dir(False)
        self._streams: dict[int, _State] = {}
        self._max_client_sid = 0
        # The streams the latest request-side chunk opened, and that chunk's meta (one
        # object per chunk): how a write that opens several streams is recognised.
        self._opened: list[H2Stream] = []
        self._opened_meta: object = None
        self._max_push_sid = 0
        self._out: list[H2Stream] = []
        self.stats: dict[str, int] = {
            "frames": 0,
            "gaps": 0,
            "hpack_errors": 0,
            "protocol_errors": 0,
            "push_promises": 0,
            "evicted": 0,
        }

    @property
    def open_streams(self) -> int:
        """Streams seen and not finished."""
        return len(self._streams)

    def feed(
        self, from_client: bool, data: bytes, total_len: int, ts_ns: int, meta: object = None
    ) -> list[H2Stream]:
        """Feed the captured bytes of one read or write.

        ``from_client`` is the direction (client to server); ``total_len`` is how many bytes
        the syscall moved (``len(data)`` or more: the tail beyond ``data`` was not captured).
        Returns the streams that finished with this chunk: completed ones, plus any ended
        without completing (``complete=False``: evicted, or above a GOAWAY's last stream id).
        """
        out: list[H2Stream] = []
        self._out = out
        d = self._c if from_client else self._s
        try:
            self._feed(d, data, max(total_len, len(data)), ts_ns, meta)
        except Exception:  # the contract is to never raise: lose the direction, not the agent
            self.stats["protocol_errors"] += 1
            self._desync(d)
        self._out = []
        return out

    def upgraded(self, ts_ns: int, meta: object = None) -> None:
        """The connection was upgraded from HTTP/1.1 (``Upgrade: h2c``): stream 1 is that
        request, already sent and half-closed from the client (RFC 9113 section 3.1 of its
        predecessor, RFC 7540 3.2), so its answer is a response to a known request."""
        if 1 in self._streams or self._max_client_sid >= 1:
            return
        self._max_client_sid = 1
        st = self._new_stream(1, ts_ns)
        st.rec.request_meta = meta
        st.req_ended = True

    def close(self, ts_ns: int) -> list[H2Stream]:
        """The connection closed: return the streams still open (``complete=False``)."""
        out = []
        for st in self._streams.values():
            _settle_grpc(st)
            out.append(st.rec)
        self._streams.clear()
        return out

    # -- direction parsing ----------------------------------------------------------------

    def _feed(self, d: _Dir, data: bytes, total: int, ts: int, meta: object) -> None:
        n = len(data)
        missing = total - n
        if missing:
            self.stats["gaps"] += 1
        pos = 0
        if d.preface_left:
            done = len(PREFACE) - d.preface_left
            take = min(d.preface_left, n)
            if data[:take] != PREFACE[done : done + take]:
                # Not the start of a connection (or not HTTP/2): both HPACK states unknown.
                self.stats["protocol_errors"] += 1
                d.preface_left = 0
                self._desync(d)
                self._desync(self._s)
            else:
                d.preface_left -= take
                pos = take
                if d.preface_left and missing:
                    skip = min(d.preface_left, missing)
                    d.preface_left -= skip
                    missing -= skip
        if d.desync:
            if pos < n and _plausible(data, pos, d.max_frame):
                d.desync = False
                d.left = -1
                d.hdr.clear()
            else:
                return
        while pos < n:
            if d.left < 0:
                hdr = d.hdr
                if not hdr and n - pos >= 9:
                    self._begin_frame(d, data[pos : pos + 9], ts, meta)
                    pos += 9
                else:
                    need = 9 - len(hdr)
                    hdr += data[pos : pos + need]
                    pos += need
                    if len(hdr) < 9:
                        break
                    self._begin_frame(d, bytes(hdr), ts, meta)
                    hdr.clear()
                continue
            take = n - pos if n - pos < d.left else d.left
            mode = d.mode
            if mode == _MODE_DATA:
                self._data(d, data, pos, pos + take)
            elif mode == _MODE_BUFFER:
                d.payload += data[pos : pos + take]
            pos += take
            d.left -= take
            if d.left == 0:
                self._end_frame(d, ts, meta)
        if missing and not d.desync:
            self._gap(d, missing, ts, meta)

    def _desync(self, d: _Dir) -> None:
        """Lose the frame alignment (and with it the HPACK state) of a direction."""
        d.desync = True
        d.decoder = None
        d.left = -1
        d.hdr.clear()
        d.payload = bytearray()
        d.block = None
        d.stream = None

    def _gap(self, d: _Dir, missing: int, ts: int, meta: object) -> None:
        """Skip ``missing`` uncaptured bytes using the known frame lengths."""
        while missing > 0:
            if d.left < 0:
                # A frame header fell into the gap: the alignment is gone.
                self._desync(d)
                return
            take = missing if missing < d.left else d.left
            if d.mode == _MODE_DATA:
                st = d.stream
                if d.pad_pending:
                    # Padding length unknown: count the rest of the frame as data.
                    d.pad_pending = False
                    d.data_left = d.left
                data_take = take if take < d.data_left else d.data_left
                d.data_left -= data_take
                if st is not None and data_take:
                    if d.from_client:
                        st.rec.request_body_bytes += data_take
                        st.grpc_req.skip(data_take)
                    else:
                        st.rec.response_body_bytes += data_take
                        st.grpc_resp.skip(data_take)
            elif d.mode == _MODE_BUFFER:
                d.lost = True
            d.left -= take
            missing -= take
            if d.left == 0:
                self._end_frame(d, ts, meta)

    def _begin_frame(self, d: _Dir, hdr: bytes, ts: int, meta: object) -> None:
        length = (hdr[0] << 16) | (hdr[1] << 8) | hdr[2]
        ftype = hdr[3]
        sid = ((hdr[5] & 0x7F) << 24) | (hdr[6] << 16) | (hdr[7] << 8) | hdr[8]
        d.ftype = ftype
        d.flags = hdr[4]
        d.sid = sid
        d.left = length
        d.lost = False
        self.stats["frames"] += 1
        if length > d.max_frame:
            self.stats["protocol_errors"] += 1
        if d.block is not None and (ftype != _CONTINUATION or sid != d.block_sid):
            # RFC 9113 6.10: nothing may interleave a header block. The block is lost.
            self.stats["protocol_errors"] += 1
            self._finish_block(d, None, ts, meta)
        if ftype == _DATA:
            d.mode = _MODE_DATA
            st = self._streams.get(sid)
            d.stream = st
            if st is not None:
                st.rec.end_ns = ts
            d.pad_pending = bool(d.flags & _PADDED)
            d.data_left = 0 if d.pad_pending else length
        elif ftype in _BUFFERED_TYPES:
            if length > MAX_BUFFERED:
                d.mode = _MODE_SKIP
                d.lost = True
            else:
                d.mode = _MODE_BUFFER
        else:
            d.mode = _MODE_SKIP
        if length == 0:
            self._end_frame(d, ts, meta)

    def _data(self, d: _Dir, data: bytes, pos: int, end: int) -> None:
        """A captured slice of a DATA frame's payload."""
        if d.pad_pending:
            d.pad_pending = False
            # The pad length byte, then data, then that many padding bytes.
            d.data_left = d.left - 1 - data[pos]
            if d.data_left < 0:
                self.stats["protocol_errors"] += 1
                d.data_left = 0
            pos += 1
        n = end - pos
        if n > d.data_left:
            n = d.data_left
        st = d.stream
        if n <= 0 or st is None:
            return
        d.data_left -= n
        if d.from_client:
            st.rec.request_body_bytes += n
            st.grpc_req.feed(data, pos, pos + n)
        else:
            st.rec.response_body_bytes += n
            st.grpc_resp.feed(data, pos, pos + n)

    def _end_frame(self, d: _Dir, ts: int, meta: object) -> None:
        """The current frame's payload has all passed (captured or skipped)."""
        ftype = d.ftype
        flags = d.flags
        d.left = -1
        if ftype == _DATA:
            st = d.stream
            d.stream = None
            if st is not None and flags & _END_STREAM:
                self._end_side(st, d.from_client)
            return
        if d.mode != _MODE_BUFFER and not d.lost:
            return
        payload = None if d.lost else bytes(d.payload)
        d.payload.clear()
        if ftype == _HEADERS:
            fragment = None
            if payload is not None:
                start = 0
                pad = 0
                if flags & _PADDED:
                    pad = payload[0] if payload else 0
                    start = 1
                if flags & _PRIORITY_FLAG:
                    start += 5
                if start + pad > len(payload):
                    self.stats["protocol_errors"] += 1
                else:
                    fragment = payload[start : len(payload) - pad]
            self._start_block(
                d,
                _KIND_HEADERS,
                d.sid,
                fragment,
                bool(flags & _END_STREAM),
                bool(flags & _END_HEADERS),
                ts,
                meta,
            )
        elif ftype == _CONTINUATION:
            if d.block is None or d.sid != d.block_sid:
                self.stats["protocol_errors"] += 1
                return
            if payload is None:
                d.block_lost = True
            elif not d.block_lost:
                if len(d.block) + len(payload) > MAX_BUFFERED:
                    d.block_lost = True
                else:
                    d.block += payload
            if flags & _END_HEADERS:
                self._finish_block(d, None if d.block_lost else bytes(d.block), ts, meta)
        elif ftype == _PUSH_PROMISE:
            self.stats["push_promises"] += 1
            fragment = None
            promised = 0
            if payload is not None:
                pad = 0
                start = 0
                if flags & _PADDED:
                    pad = payload[0] if payload else 0
                    start = 1
                if start + 4 + pad > len(payload):
                    self.stats["protocol_errors"] += 1
                else:
                    promised = int.from_bytes(payload[start : start + 4], "big") & 0x7FFFFFFF
                    fragment = payload[start + 4 : len(payload) - pad]
            self._start_block(
                d, _KIND_PUSH, promised, fragment, False, bool(flags & _END_HEADERS), ts, meta
            )
        elif ftype == _RST_STREAM:
            st = self._streams.get(d.sid)
            if st is not None:
                rec = st.rec
                rec.reset = True
                if payload is not None and len(payload) == 4:
                    rec.reset_error_code = int.from_bytes(payload, "big")
                rec.end_ns = ts
                self._finish(st, True)
        elif ftype == _SETTINGS:
            if payload is not None and not flags & _ACK:
                self._settings(d, payload)
        elif ftype == _GOAWAY and payload is not None and len(payload) >= 8:
            self._goaway(d, int.from_bytes(payload[:4], "big") & 0x7FFFFFFF)

    def _settings(self, d: _Dir, payload: bytes) -> None:
        # Settings sent by one side constrain what the *other* side sends.
        other = self._s if d.from_client else self._c
        for i in range(0, len(payload) - 5, 6):
            ident = (payload[i] << 8) | payload[i + 1]
            value = int.from_bytes(payload[i + 2 : i + 6], "big")
            if ident == _SETTINGS_HEADER_TABLE_SIZE:
                if other.decoder is not None:
                    other.decoder.max_allowed_table_size = max(4096, min(value, _MAX_TABLE_SIZE))
            elif ident == _SETTINGS_MAX_FRAME_SIZE:
                other.max_frame = max(_DEFAULT_MAX_FRAME, min(value, (1 << 24) - 1))

    def _goaway(self, d: _Dir, last_sid: int) -> None:
        # The sender processed no stream above last_sid that the receiver initiated: a server
        # GOAWAY ends odd (client) streams, a client GOAWAY ends even (pushed) ones.
        parity = 1 if not d.from_client else 0
        highest = self._max_client_sid if parity else self._max_push_sid
        if last_sid >= highest:
            return  # the common case (graceful shutdown): nothing to scan
        for sid in [s for s in self._streams if s > last_sid and s % 2 == parity]:
            self._finish(self._streams[sid], False)

    # -- header blocks ----------------------------------------------------------------------

    def _start_block(
        self,
        d: _Dir,
        kind: int,
        sid: int,
        fragment: bytes | None,
        end_stream: bool,
        end_headers: bool,
        ts: int,
        meta: object,
    ) -> None:
        d.block_kind = kind
        d.block_sid = d.sid
        d.block_end_stream = end_stream
        if kind == _KIND_PUSH:
            # The block continues on the frame's stream but concerns the promised one.
            d.block_end_stream = False
        d.block_promised = sid if kind == _KIND_PUSH else 0
        if end_headers:
            d.block = bytearray()  # marks the block open for _finish_block
            self._finish_block(d, fragment, ts, meta)
        else:
            d.block_lost = fragment is None
            d.block = bytearray(fragment or b"")

    def _finish_block(self, d: _Dir, block: bytes | None, ts: int, meta: object) -> None:
        """A whole header block (``None``: not captured) ends; decode it and apply it."""
        kind = d.block_kind
        sid = d.block_sid
        end_stream = d.block_end_stream
        promised = d.block_promised
        d.block = None
        d.block_lost = False
        headers: list[tuple[bytes, bytes]] | None = None
        decoder = d.decoder
        if decoder is not None:
            if block is None:
                d.decoder = None
            else:
                try:
                    headers = [(h[0], h[1]) for h in decoder.decode(block, raw=True)]
                except Exception:  # hpack raises its own errors, and on hostile input others
                    self.stats["hpack_errors"] += 1
                    d.decoder = None
        if kind == _KIND_PUSH:
            if promised and promised > self._max_push_sid:
                self._max_push_sid = promised
                st = self._new_stream(promised, ts)
                st.rec.headers_known = False
                st.req_ended = True
            return
        if d.from_client:
            self._request_block(sid, headers, end_stream, ts, meta)
        else:
            self._response_block(sid, headers, end_stream, ts, meta)

    def _new_stream(self, sid: int, ts: int) -> _State:
        streams = self._streams
        if len(streams) >= MAX_OPEN_STREAMS:
            oldest = next(iter(streams))
            self.stats["evicted"] += 1
            self._finish(streams[oldest], False)
        st = _State(H2Stream(stream_id=sid, start_ns=ts, end_ns=ts))
        streams[sid] = st
        return st

    def _request_block(
        self,
        sid: int,
        headers: list[tuple[bytes, bytes]] | None,
        end_stream: bool,
        ts: int,
        meta: object,
    ) -> None:
        st = self._streams.get(sid)
        if st is None:
            if sid <= self._max_client_sid or sid == 0:
                return  # a late block of a finished (or evicted) stream
            self._max_client_sid = sid
            st = self._new_stream(sid, ts)
            rec = st.rec
            rec.request_meta = meta
            if meta is not None and meta is self._opened_meta:
                self._opened.append(rec)
                for other in self._opened:
                    other.shared_write = True
            else:
                self._opened_meta, self._opened = meta, [rec]
            if headers is None:
                rec.headers_known = False
            else:
                _apply_request(rec, headers)
        else:
            rec = st.rec
            rec.end_ns = ts
            if headers is None:
                rec.headers_known = False
        if end_stream:
            self._end_side(st, True)

    def _response_block(
        self,
        sid: int,
        headers: list[tuple[bytes, bytes]] | None,
        end_stream: bool,
        ts: int,
        meta: object,
    ) -> None:
        st = self._streams.get(sid)
        if st is None:
            if sid % 2 == 0 or sid <= self._max_client_sid:
                return  # a late block of a finished stream, or of an unknown pushed one
            # The request was not seen (lost to a gap): keep the response.
            self._max_client_sid = sid
            st = self._new_stream(sid, ts)
            st.rec.headers_known = False
            st.req_ended = True
        rec = st.rec
        rec.end_ns = ts
        if headers is None:
            rec.headers_known = False
            if not st.final_seen:
                st.final_seen = True
                rec.response_meta = meta
        else:
            if not st.final_seen:
                status = None
                for name, value in headers:
                    if name == b":status":
                        status = _small_int(value)
                        break
                if status is not None and 100 <= status < 200 and not end_stream:
                    pass  # interim response: the final one is still to come
                else:
                    st.final_seen = True
                    rec.status = status
                    rec.response_meta = meta
                    for name, value in headers:
                        if name == b"content-type":
                            st.resp_ct = _text(value)
                            break
            for name, value in headers:
                if name == b"grpc-status":
                    rec.grpc_status = _small_int(value)
                elif name == b"grpc-message":
                    rec.grpc_message = _text(
                        unquote(value.decode("utf-8", "replace"), errors="replace").encode()
                    )
        if end_stream:
            self._end_side(st, False)

    # -- completion -------------------------------------------------------------------------

    def _end_side(self, st: _State, from_client: bool) -> None:
        if from_client:
            st.req_ended = True
        else:
            st.resp_ended = True
        if st.req_ended and st.resp_ended:
            self._finish(st, True)

    def _finish(self, st: _State, complete: bool) -> None:
        rec = st.rec
        if self._streams.pop(rec.stream_id, None) is None:
            return
        rec.complete = complete
        _settle_grpc(st)
        self._out.append(rec)


def _settle_grpc(st: _State) -> None:
    rec = st.rec
    grpc = rec.is_grpc or (
        rec.content_type is None and st.resp_ct is not None and st.resp_ct.startswith(_GRPC_CT)
    )
    if grpc:
        rec.request_messages = st.grpc_req.messages
        rec.response_messages = st.grpc_resp.messages


def _apply_request(rec: H2Stream, headers: list[tuple[bytes, bytes]]) -> None:
    host = None
    traceparents = 0
    for name, value in headers:
        if name[:1] == b":":
            if name == b":method":
                rec.method = _text(value)
            elif name == b":path":
                rec.path = _text(value)
            elif name == b":authority":
                rec.authority = _text(value)
            elif name == b":scheme":
                rec.scheme = _text(value)
        elif name == b"content-type":
            rec.content_type = _text(value)
        elif name == b"traceparent":
            traceparents += 1
            rec.traceparent = _text(value.strip(b" \t"))
        elif name == b"user-agent":
            rec.user_agent = _text(value)
        elif name == b"host":
            host = value
    if traceparents > 1:
        rec.traceparent = None
    if rec.authority is None and host is not None:
        rec.authority = _text(host)
