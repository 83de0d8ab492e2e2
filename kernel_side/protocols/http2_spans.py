"""Spans for HTTP/2 and gRPC: stream-mode chunks in, one span per stream out.

The kernel hands every read/write of an HTTP/2 connection over as an ordered chunk (it cannot
pair requests with responses on a multiplexed connection). ``StreamSpans`` keeps one
``H2Connection`` (frames, HPACK tables, streams) per connection and turns each finished stream
into a span: gRPC when the request content-type says so (semconv 1.37 RPC names), plain HTTP
otherwise.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

from kernel_side import semconv
from kernel_side.assembly import SpanAssembler
from kernel_side.events import ROLE_SERVER, Chunk
from kernel_side.model import AttrValue, SpanKind, SpanRecord, StatusCode
from kernel_side.protocols import http1
from kernel_side.protocols.http2 import H2Connection, H2Stream
from kernel_side.protocols.traceparent import parse_traceparent

log = logging.getLogger(__name__)

GRPC_CODES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED",
)
# Per the gRPC semantic conventions, a server only treats these as its own errors; every
# non-OK code is an error on the client. error.type goes with the error status (set "if and
# only if the operation failed"), so a server's NOT_FOUND has neither: its code stays on
# rpc.grpc.status_code.
_GRPC_SERVER_ERRORS = frozenset({2, 4, 12, 13, 14, 15})


@dataclass(slots=True)
class ChunkMeta:
    """What the kernel knew of the thread that moved a chunk."""

    tid: int
    ctx: bytes | None
    parent_exchange_id: int


@dataclass(slots=True)
class _Conn:
    h2: H2Connection
    role: int
    tgid: int
    conn_id: int
    listen_fd: int
    peer_address: str | None
    peer_port: int
    local_address: str | None = None
    local_port: int = 0
    peer_traced: bool = False
    tls: bool = False
    """Plaintext from the SSL uprobes: the connection is TLS."""
    upgrade: http1.HttpRequest | None = None
    """The HTTP/1.1 request that upgraded this connection: stream 1 answers it."""


class StreamSpans:
    """The stream handler the agent installs with ``SpanAssembler.set_stream_handler``."""

    def __init__(self, asm: SpanAssembler, *, max_connections: int = 4096,
                 route_heuristic: bool = False) -> None:
        self._asm = asm
        self._conns: OrderedDict[tuple[int, int], _Conn] = OrderedDict()
        self._max = max_connections
        self._route_heuristic = route_heuristic
        self.evicted = 0

    def __call__(self, chunk: Chunk) -> None:
        """Feed one chunk; emit the spans of the streams it completed."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("chunk pid=%d conn=%d from_client=%s len=%d captured=%d closed=%s %r",
                      chunk.tgid, chunk.conn_id, chunk.from_client, chunk.total_len,
                      len(chunk.data), chunk.closed, chunk.data[:24])
        key = (chunk.tgid, chunk.conn_id)
        conn = self._conns.get(key)
        if conn is None:
            if chunk.closed:
                return
            conn = _Conn(H2Connection(), chunk.role, chunk.tgid, chunk.conn_id, chunk.listen_fd,
                         chunk.peer_address, chunk.peer_port)
            up = self._asm.take_upgrade(chunk.tgid, chunk.conn_id)
            if up is not None:
                # The operation began with the HTTP/1.1 request, on the thread (and in the
                # context) that wrote or read it.
                ex = up.exchange
                conn.upgrade = up.request
                conn.h2.upgraded(ex.req_start_ns, ChunkMeta(ex.req_tid, ex.ctx,
                                                            ex.parent_exchange_id))
            self._conns[key] = conn
            if len(self._conns) > self._max:
                # The oldest connection's open streams are reported as they stand.
                _, old = self._conns.popitem(last=False)
                self.evicted += 1
                for s in old.h2.close(chunk.ts_ns):
                    self._span(old, s)
        else:
            self._conns.move_to_end(key)
        if chunk.local_port and not conn.local_port:
            conn.local_address, conn.local_port = chunk.local_address, chunk.local_port
        conn.peer_traced = conn.peer_traced or chunk.peer_traced
        conn.tls = conn.tls or chunk.tls
        if chunk.closed:
            del self._conns[key]
            done = conn.h2.close(chunk.ts_ns)
        else:
            meta = ChunkMeta(chunk.tid, chunk.ctx, chunk.parent_exchange_id)
            done = conn.h2.feed(chunk.from_client, chunk.data, chunk.total_len, chunk.ts_ns, meta)
        for stream in done:
            self._span(conn, stream)

    def flush(self, ts_ns: int) -> None:
        """Report every open stream (agent shutdown)."""
        for conn in list(self._conns.values()):
            for s in conn.h2.close(ts_ns):
                self._span(conn, s)
        self._conns.clear()

    def _span(self, conn: _Conn, s: H2Stream) -> None:
        asm = self._asm
        server = conn.role == ROLE_SERVER
        up = conn.upgrade
        if s.stream_id == 1 and up is not None:
            # Stream 1 of an upgraded connection answers the HTTP/1.1 request that upgraded it.
            s.method, s.authority, s.scheme = up.method, up.host, "http"
            s.path = up.target if up.target.startswith("/") else up.path
            s.traceparent = s.traceparent or up.traceparent
            s.user_agent = s.user_agent or up.user_agent
        # Context rides on what the application wrote: a client's request, a server's response.
        meta = s.request_meta if not server else s.response_meta
        if not isinstance(meta, ChunkMeta):
            meta = None
        attrs: dict[str, AttrValue] = {}
        if s.shared_write and not server:
            # The writer may have flushed another thread's request: rather than a wrong
            # tenant and a wrong parent, none (and the trace its traceparent names, if any).
            meta = None
            attrs[semconv.BRIDGE_THREAD_AMBIGUOUS] = True
        if conn.tls:
            attrs[semconv.TLS_PROTOCOL_NAME] = "tls"
        if conn.peer_address:
            attrs[semconv.NETWORK_PEER_ADDRESS] = conn.peer_address
            attrs[semconv.NETWORK_PEER_PORT] = conn.peer_port
        grpc = bool(s.content_type and s.content_type.startswith("application/grpc"))
        status = StatusCode.UNSET
        if grpc:
            name = self._grpc_attrs(attrs, s)
            code = s.grpc_status
            if code is not None and code != 0 and (not server or code in _GRPC_SERVER_ERRORS):
                status = StatusCode.ERROR
                attrs[semconv.ERROR_TYPE] = (GRPC_CODES[code] if 0 <= code < len(GRPC_CODES)
                                             else str(code))
        else:
            name = self._http_attrs(attrs, s, server, conn.tls)
            if s.status is not None and (s.status >= 500 or (not server and s.status >= 400)):
                status = StatusCode.ERROR
                attrs[semconv.ERROR_TYPE] = str(s.status)
        if s.reset and status is StatusCode.UNSET and not (grpc and s.grpc_status == 0):
            status = StatusCode.ERROR
            attrs.setdefault(semconv.ERROR_TYPE, "stream_reset")
        if server:
            port = asm.listen_port(conn.tgid, conn.listen_fd)
            if port is not None:
                attrs[semconv.SERVER_PORT] = port
            if conn.peer_address:
                attrs[semconv.CLIENT_ADDRESS] = conn.peer_address
        else:
            if s.authority:
                host, _, port_s = s.authority.rpartition(":")
                if host and port_s.isdigit():
                    attrs[semconv.SERVER_ADDRESS] = host.strip("[]")
                    attrs[semconv.SERVER_PORT] = int(port_s)
                else:
                    attrs[semconv.SERVER_ADDRESS] = s.authority
            elif conn.peer_address:
                attrs[semconv.SERVER_ADDRESS] = conn.peer_address
            attrs.setdefault(semconv.SERVER_PORT, conn.peer_port)
        if not s.headers_known:
            attrs[semconv.BRIDGE_TRUNCATED] = True
        business, ctx_truncated = asm.business(meta.ctx if meta else None)
        if ctx_truncated:
            attrs[semconv.BRIDGE_CONTEXT_TRUNCATED] = True
        attrs.update(business)
        span = SpanRecord(
            b"", asm.ids.stream_span_id(conn.conn_id, s.stream_id), None, name,
            SpanKind.SERVER if server else SpanKind.CLIENT, asm.epoch_ns(s.start_ns),
            asm.epoch_ns(max(s.end_ns, s.start_ns)), asm.resource_for(conn.tgid), attrs, status,
        )
        # Same-node stitching: stream n of a connection is stream n at both ends.
        stitch = None
        if conn.local_address and conn.peer_address:
            if server:
                stitch = (conn.peer_address, conn.peer_port, conn.local_address,
                          conn.local_port, s.stream_id)
            else:
                stitch = (conn.local_address, conn.local_port, conn.peer_address,
                          conn.peer_port, s.stream_id)
        if server:
            tp = parse_traceparent(s.traceparent)
            if tp is not None:
                span.trace_id, span.parent_span_id = tp.trace_id, tp.span_id
                asm.server_span_done(span)
            else:
                asm.finish_server(
                    span, fallback_trace=asm.ids.stream_trace_id(conn.conn_id, s.stream_id),
                    stitch_key=stitch if conn.peer_traced else None)
        else:
            # The stream's first chunk carries the thread's context when the call started: an
            # SDK client span then (grpc instrumentation) is this call's one span.
            if asm.route_under_sdk(span, meta.ctx if meta else None):
                return
            if stitch is not None:
                asm.stitch_client(span.span_id, stitch)
            asm.route_client(span, meta.parent_exchange_id if meta else 0, s.traceparent,
                             lambda: asm.ids.stream_trace_id(conn.conn_id, s.stream_id))

    @staticmethod
    def _grpc_attrs(attrs: dict[str, AttrValue], s: H2Stream) -> str:
        attrs[semconv.RPC_SYSTEM] = "grpc"
        if s.grpc_status is not None:
            attrs[semconv.RPC_GRPC_STATUS_CODE] = s.grpc_status
        full = (s.path or "").lstrip("/")
        service, _, method = full.rpartition("/")
        if service and method:
            attrs[semconv.RPC_SERVICE] = service
            attrs[semconv.RPC_METHOD] = method
            return full
        # Headers lost to a capture gap: say what is known, never a guess.
        return "grpc"

    def _http_attrs(self, attrs: dict[str, AttrValue], s: H2Stream, server: bool,
                    tls: bool) -> str:
        attrs[semconv.NETWORK_PROTOCOL_NAME] = "http"
        attrs[semconv.NETWORK_PROTOCOL_VERSION] = "2"
        if s.method:
            attrs[semconv.HTTP_REQUEST_METHOD] = s.method
        if s.status is not None:
            attrs[semconv.HTTP_RESPONSE_STATUS_CODE] = s.status
        if s.user_agent:
            attrs[semconv.USER_AGENT_ORIGINAL] = s.user_agent
        path, _, query = (s.path or "").partition("?")
        # Over TLS the bytes say https whatever :scheme claims; else trust :scheme.
        scheme = "https" if tls else s.scheme or "http"
        if server:
            if path:
                attrs[semconv.URL_PATH] = path
            if query:
                attrs[semconv.URL_QUERY] = query
            attrs[semconv.URL_SCHEME] = scheme
        elif s.path is not None:
            attrs[semconv.URL_FULL] = f"{scheme}://{s.authority or ''}{s.path}"
        name = s.method or "HTTP"
        if server and self._route_heuristic and path:
            name = f"{name} {http1.route_heuristic(path)}"
        return name
