"""Span assembly: kernel exchanges in, finished ``SpanRecord``s out.

One place derives span names, kinds, attributes, ids and parents for every protocol.

Ids are derived from the kernel's exchange ids with a per-run salt, so a client span can name
its parent server span before that span's event has arrived (the kernel emits an exchange when
it ends, and a handler's outgoing calls end before its own response does). Only the trace id
may depend on the parent's request (an adopted ``traceparent``), so children wait for their
parent for a bounded time and fall back to the derived trace id.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

from bridge import _abi
from kernel_side import _accel
from kernel_side.events import ROLE_SERVER, Chunk, Exchange
from kernel_side.model import AttrValue, Resource, SpanKind, SpanRecord, StatusCode
from kernel_side.protocols import http1
from kernel_side.protocols.traceparent import parse_traceparent
from kernel_side.semconv import (
    BRIDGE_CONTEXT_TRUNCATED,
    BRIDGE_TRUNCATED,
    CLIENT_ADDRESS,
    ERROR_TYPE,
    HTTP_REQUEST_BODY_SIZE,
    HTTP_REQUEST_METHOD,
    HTTP_RESPONSE_BODY_SIZE,
    HTTP_RESPONSE_STATUS_CODE,
    HTTP_ROUTE,
    NETWORK_PEER_ADDRESS,
    NETWORK_PEER_PORT,
    NETWORK_PROTOCOL_VERSION,
    SERVER_ADDRESS,
    SERVER_PORT,
    TLS_PROTOCOL_NAME,
    URL_FULL,
    URL_PATH,
    URL_QUERY,
    URL_SCHEME,
    USER_AGENT_ORIGINAL,
)

log = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1
_mix64 = _abi.mix64
_GOLDEN = 0x9E3779B97F4A7C15
_fastspan = _accel.load("_fastspan")
ACCELERATED = _fastspan is not None
"""Whether ids are derived in C (``kernel_side._fastspan``)."""


class IdSource:
    """Span and trace ids derived from exchange ids, unique per agent run."""

    def __init__(self, salt: bytes | None = None) -> None:
        raw = salt if salt is not None else os.urandom(_abi.ID_SALT_SIZE)
        self.salt = raw
        self._s1 = int.from_bytes(raw[0:8], "little")
        self._s2 = int.from_bytes(raw[8:16], "little")
        self._s3 = int.from_bytes(raw[16:24], "little")
        if _fastspan is not None and len(raw) >= 24:
            # The C methods shadow the Python ones on this instance: same ids, no Python frame
            # (the Python methods stay the reference; tests/unit/test_fastspan.py).
            c = _fastspan.Ids(raw)
            self.span_id = c.span_id  # type: ignore[method-assign]
            self.trace_id = c.trace_id  # type: ignore[method-assign]
            self.stream_span_id = c.stream_span_id  # type: ignore[method-assign]
            self.stream_trace_id = c.stream_trace_id  # type: ignore[method-assign]

    def span_id(self, exchange_id: int, index: int = 0) -> bytes:
        """The span id of message ``index`` of an exchange (``bridge._abi.exchange_span_id``,
        which applications use to name the kernel's server span).

        Distinct for every exchange id below 2**48 (a counter) and index below 2**16 (a
        capture buffer holds at most a few hundred pipelined requests).
        """
        # _abi.exchange_span_id with the salt's words and mix64 inlined (hot path).
        x = (self._s1 ^ (((exchange_id << 16) | (index & 0xFFFF)) & _MASK64)) + _GOLDEN
        x &= _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        return ((x ^ (x >> 31)) or 1).to_bytes(8, "big")

    def stream_span_id(self, conn_id: int, stream_id: int) -> bytes:
        """The span id of stream ``stream_id`` of a multiplexed connection."""
        v = _mix64(self._s1 ^ _mix64(conn_id ^ 0x5EED) ^ stream_id) or 1
        return v.to_bytes(8, "big")

    def stream_trace_id(self, conn_id: int, stream_id: int) -> bytes:
        """The trace id a root stream starts."""
        key = _mix64(conn_id ^ 0xFEED) ^ stream_id
        return (_mix64(self._s2 ^ key).to_bytes(8, "big")
                + (_mix64(self._s3 ^ key) or 1).to_bytes(8, "big"))

    def trace_id(self, exchange_id: int, index: int = 0) -> bytes:
        """The trace id that message ``index`` of a root exchange starts
        (``bridge._abi.exchange_trace_id``)."""
        key = ((exchange_id << 16) | (index & 0xFFFF)) & _MASK64
        # _abi.mix64 inlined twice (hot path: one call per server span).
        x = ((self._s2 ^ key) + _GOLDEN) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        y = ((self._s3 ^ key) + _GOLDEN) & _MASK64
        y = ((y ^ (y >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        y = ((y ^ (y >> 27)) * 0x94D049BB133111EB) & _MASK64
        return (x ^ (x >> 31)).to_bytes(8, "big") + ((y ^ (y >> 31)) or 1).to_bytes(8, "big")


_DERIVED: Final = b""
"""In ``_servers``: the trace id is ``IdSource.trace_id(exchange_id)``, recomputed on use."""

# The business attributes of an exchange without a context block. Shared, like the cached
# dicts ``business`` returns for blocks: span builders copy from them and never write to them.
_NO_BUSINESS: Final[dict[str, AttrValue]] = {}

_StitchKey = tuple[str, int, str, int, int]
"""(client address, client port, server address, server port, request ordinal)."""


class ProcessLookup(Protocol):
    """What assembly needs to know about processes."""

    def resource_for(self, tgid: int) -> Resource:
        """The resource of ``tgid`` (a placeholder one if the process is unknown)."""
        ...

    def listen_port(self, tgid: int, fd: int) -> int | None:
        """Local port of listening socket ``fd`` of ``tgid``."""
        ...


@dataclass(frozen=True, slots=True)
class Upgrade:
    """An HTTP/1.1 request that upgraded its connection to HTTP/2 (``Upgrade: h2c``), and the
    exchange that carried it: HTTP/2 stream 1 is its answer."""

    request: http1.HttpRequest
    exchange: Exchange


class PeerLookup(Protocol):
    """What assembly may learn about the server at the other end of a client connection."""

    def server_executable(self, tgid: int, fd: int, address: str, port: int) -> str | None:
        """Executable name of the local process serving ``address:port`` to socket ``fd`` of
        ``tgid``; None when the server is remote or unknown."""
        ...


@dataclass
class AssemblyStats:
    """Counters of span assembly."""

    spans: int = 0
    unknown_protocol: int = 0
    parse_errors: int = 0
    parent_timeouts: int = 0
    pending_overflow: int = 0
    stitched: int = 0
    """Server spans joined to the traced client span of the same request on this node."""
    stitch_waited: int = 0
    """Server spans that had to wait for their client span (it arrived later)."""
    stitch_timeouts: int = 0
    """Server spans exported unstitched because their client span never showed."""
    stitch_wait_us_total: int = 0
    stitch_wait_us_max: int = 0
    """How long server spans waited for their client span (the ones that found it)."""
    sdk_covered: int = 0
    """Spans not emitted because an OpenTelemetry SDK span of the same kind covered them."""
    sdk_parented: int = 0
    """Spans parented under the SDK span that was active when the kernel saw them."""
    counts: dict[str, int] = field(default_factory=dict)


@dataclass
class _Waiting:
    deadline_ns: int
    span: SpanRecord


class SpanAssembler:
    """Turns exchanges into spans and hands finished spans to ``sink``."""

    def __init__(
        self,
        procs: ProcessLookup,
        sink: Callable[[SpanRecord], object],
        *,
        route_heuristic: bool = False,
        parent_wait_s: float = 10.0,
        stitch_wait_s: float = 10.0,
        max_pending: int = 50_000,
        ids: IdSource | None = None,
        peers: PeerLookup | None = None,
    ) -> None:
        self._procs = procs
        self._peers = peers
        self._sink = sink
        self._route_heuristic = route_heuristic
        self._parent_wait_ns = int(parent_wait_s * 1e9)
        self._max_pending = max_pending
        self.ids = ids or IdSource()
        # Kernel timestamps are CLOCK_MONOTONIC; spans want Unix time.
        self._epoch_offset_ns = time.time_ns() - time.monotonic_ns()
        # Server exchange id -> its trace id (_DERIVED: the one ids.trace_id derives), for
        # client spans that finish after their server span. Two generations of plain dicts
        # rather than an LRU: O(1) per span and about 70 bytes per entry instead of 170, which
        # at max rate is 7 MB of the agent's RSS. Between max_servers/2 and max_servers of the
        # most recent server exchanges are remembered.
        self._servers: dict[int, bytes] = {}
        self._servers_old: dict[int, bytes] = {}
        # Server exchanges whose span the SDK made: exchange id -> the SDK span's id, the parent
        # of the client spans that wait on that exchange.
        self._sdk_servers: OrderedDict[int, bytes] = OrderedDict()
        self._max_servers = 65_536
        self._waiting: dict[int, list[_Waiting]] = {}
        self._n_waiting = 0
        self._stitch_wait_ns = int(stitch_wait_s * 1e9)
        self._stitch_clients: OrderedDict[_StitchKey, tuple[bytes, bytes]] = OrderedDict()
        self._stitch_waiting: dict[_StitchKey, tuple[int, SpanRecord, int, int, bytes]] = {}
        self._client_keys: dict[bytes, _StitchKey] = {}
        self._stream_handler: Callable[[Chunk], None] | None = None
        self._ctx_cache: dict[bytes, tuple[dict[str, AttrValue], bool]] = {}
        self._upgrades: dict[tuple[int, int], Upgrade] = {}
        self._conn_states: OrderedDict[tuple[int, int, str], dict[str, object]] = OrderedDict()
        self._max_conn_states = 65_536
        self._conn_protocols: set[str] = set()  # the protocol names conn_state was asked for
        # HTTP/1 request ordinals by (tgid, conn_id), least recently used first (see _http).
        self._http1_order: dict[tuple[int, int], int] = {}
        self._protocols: list[tuple[Callable[[Exchange], bool],
                                    Callable[[SpanAssembler, Exchange], None]]] = []
        self.stats = AssemblyStats()

    # -- public -------------------------------------------------------------------------------

    def add_protocol(self, detect: Callable[[Exchange], bool],
                     build: Callable[[SpanAssembler, Exchange], None]) -> None:
        """Register a protocol: ``detect`` looks at an exchange's bytes (cheaply; by content,
        never by port), ``build`` turns it into spans with ``client_span``/``server_span``.
        Protocols are tried in registration order, after HTTP/1.1."""
        self._protocols.append((detect, build))

    def set_stream_handler(self, handler: Callable[[Chunk], None]) -> None:
        """Where stream-mode chunks (HTTP/2) go; see ``kernel_side.protocols.http2_spans``."""
        self._stream_handler = handler

    def on_chunk(self, chunk: Chunk) -> None:
        """Route one stream-mode chunk. Never raises on bad bytes."""
        if self._stream_handler is None:
            self.stats.unknown_protocol += 1
            return
        try:
            self._stream_handler(chunk)
        except Exception:
            self.stats.parse_errors += 1
            log.exception("could not handle a chunk of pid %d", chunk.tgid)

    def on_exchange(self, ex: Exchange) -> None:
        """Build and route the spans of one exchange. Never raises on bad bytes."""
        try:
            # Redis inline commands can look like an HTTP request line ("GET key"): when the
            # HTTP parser finds no request, let the other protocols try.
            if http1.looks_like_request(ex.request) and self._http(ex):
                return
            for detect, build in self._protocols:
                if detect(ex):
                    build(self, ex)
                    return
            self.stats.unknown_protocol += 1
        except Exception:  # a parser bug must cost one exchange, never the agent
            self.stats.parse_errors += 1
            log.exception("could not assemble exchange %d of pid %d", ex.exchange_id, ex.tgid)

    def tick(self, now_ns: int | None = None) -> None:
        """Release spans whose parent (or stitched client) did not show up in time."""
        if not self._waiting and not self._stitch_waiting:
            return
        now = time.monotonic_ns() if now_ns is None else now_ns
        if self._stitch_waiting:
            self._expire_stitches(now)
        for parent_id in list(self._waiting):
            items = self._waiting[parent_id]
            if items[0].deadline_ns <= now:
                self._release(parent_id, self.ids.trace_id(parent_id), timed_out=True)

    def flush(self) -> None:
        """Release every waiting span (agent shutdown)."""
        self._expire_stitches(0, everything=True)
        for parent_id in list(self._waiting):
            self._release(parent_id, self.ids.trace_id(parent_id), timed_out=True)

    @property
    def waiting(self) -> int:
        """Spans held back waiting for their parent or their stitched client span."""
        return self._n_waiting + len(self._stitch_waiting)

    # -- HTTP/1.1 -----------------------------------------------------------------------------

    def _http(self, ex: Exchange) -> bool:
        requests = http1.parse_requests(ex.request, ex.req_bytes)
        if not requests:
            return False
        # The ordinal of each request on its connection: the stitching key's last part. In a
        # plain dict kept most recently used last by pop and re-insert, not in conn_state:
        # every HTTP/1 exchange comes here, and conn_state's OrderedDict, its per-connection
        # dict and the calls cost about 0.3 us per span more.
        okey = (ex.tgid, ex.conn_id)
        orders = self._http1_order
        base = orders.pop(okey, 0)
        orders[okey] = base + len(requests)
        if base == 0 and len(orders) > self._max_conn_states:
            del orders[next(iter(orders))]
        # One request with one final response is nearly every exchange: no list
        # comprehensions for it (each is a function call on Python 3.11).
        methods = (requests[0].method,) if len(requests) == 1 else [q.method for q in requests]
        responses = http1.parse_responses(ex.response, ex.resp_bytes, methods)
        if len(responses) != 1 or responses[0].status < 200:
            responses = [r for r in responses if not r.informational]
        ctx = ex.ctx
        business, ctx_truncated = self.business(ctx) if ctx is not None else (_NO_BUSINESS, False)
        resource = self._procs.resource_for(ex.tgid)
        start = ex.req_start_ns + self._epoch_offset_ns
        end = max(ex.resp_end_ns, ex.req_end_ns) + self._epoch_offset_ns
        server = ex.role == ROLE_SERVER
        local_port = self._procs.listen_port(ex.tgid, ex.listen_fd) if server else None
        truncated = len(ex.request) < ex.req_bytes and not requests[-1].head_complete
        for idx, req in enumerate(requests):
            resp = responses[idx] if idx < len(responses) else None
            if resp is not None and resp.status == 101 and _asks_h2c(ex.request):
                # Upgrade: h2c. The answer to this request comes on HTTP/2 stream 1 (the
                # kernel switched the connection to stream mode): that stream's span is this
                # operation's one span, and it takes the request line from here.
                self._upgrades[(ex.tgid, ex.conn_id)] = Upgrade(req, ex)
                if len(self._upgrades) > 4096:
                    self._upgrades.pop(next(iter(self._upgrades)))
                self._upgrade_tail(ex, resp)
                continue
            span_id = self.ids.span_id(ex.exchange_id, idx)
            if server:
                # The flag test first: most context blocks name no SDK span (and a cut
                # block names none, as sdk_span_of says).
                if (idx == 0 and ctx is not None and len(ctx) > 3
                        and ctx[3] & _abi.CTX_F_SDK_SPAN and self._sdk_covers_server(ex)):
                    continue
                host = _split_host(req.host)[0] if req.host else None
                built = None
                if _fast_server_attrs is not None:
                    built = _fast_server_attrs(req, resp, ex.peer_address, ex.peer_port, ex.tls,
                                               local_port, host, truncated, ctx_truncated,
                                               business)
                if built is None:
                    built = server_attrs_py(req, resp, ex.peer_address, ex.peer_port, ex.tls,
                                            local_port, host, truncated, ctx_truncated, business)
                attrs, failed = built
                status = StatusCode.ERROR if failed else StatusCode.UNSET
                name = req.method
                route = business.get(HTTP_ROUTE)
                if isinstance(route, str) and route:
                    # The framework's route template (sdk_side.integrations): no heuristics.
                    name = f"{req.method} {route}"
                elif self._route_heuristic:
                    name = f"{req.method} {http1.route_heuristic(req.path)}"
                span = _new_server_span(span_id, name, start, end, resource, attrs, status)
                derived = False
                tp = parse_traceparent(req.traceparent) if req.traceparent else None
                if tp is not None:
                    # A traceparent the caller sent wins over stitching.
                    span.trace_id, span.parent_span_id = tp.trace_id, tp.span_id
                elif ex.peer_traced and ex.local_address and ex.peer_address:
                    key = (ex.peer_address, ex.peer_port, ex.local_address, ex.local_port,
                           base + idx)
                    if self._stitch_server(span, key, ex.exchange_id, idx):
                        continue
                else:
                    # Pipelined requests are unrelated operations: one trace each.
                    span.trace_id = self.ids.trace_id(ex.exchange_id, idx)
                    derived = True
                self._server_final(span, ex.exchange_id, idx, derived)
            else:
                attrs, failed = _common_attrs(req, resp, ex.peer_address, ex.peer_port, False,
                                              truncated, ctx_truncated, business)
                status = StatusCode.ERROR if failed else StatusCode.UNSET
                self._http_client_attrs(attrs, req, ex)
                if ex.local_address and ex.peer_address:
                    self._client_keys[span_id] = (ex.local_address, ex.local_port,
                                                  ex.peer_address, ex.peer_port, base + idx)
                span = SpanRecord(b"", span_id, None, req.method, SpanKind.CLIENT, start, end,
                                  resource, attrs, status)
                self._route_client(span, ex, req.traceparent, idx)
        return True

    @staticmethod
    def _http_client_attrs(attrs: dict[str, AttrValue], req: http1.HttpRequest,
                           ex: Exchange) -> None:
        host, port = _split_host(req.host) if req.host else (None, None)
        host = host or ex.peer_address
        port = port or ex.peer_port or None
        if host:
            attrs[SERVER_ADDRESS] = host
        if port:
            attrs[SERVER_PORT] = port
        if req.target.startswith(("http://", "https://")):
            attrs[URL_FULL] = req.target
        elif host:
            name = f"[{host}]" if ":" in host else host
            hostport = req.host or (f"{name}:{port}" if port else name)
            scheme = "https" if ex.tls else "http"
            attrs[URL_FULL] = f"{scheme}://{hostport}{req.target}"
        else:
            attrs[URL_PATH] = req.path
        if ex.tls:
            attrs[TLS_PROTOCOL_NAME] = "tls"

    # -- for protocol span builders ------------------------------------------------------------

    def base_span(self, ex: Exchange, name: str, kind: SpanKind, index: int = 0,
                  attributes: dict[str, AttrValue] | None = None) -> SpanRecord:
        """A span for message ``index`` of ``ex`` with times, resource, peer attributes and
        the thread's business context filled in; ids and parents are set by ``finish``."""
        attrs: dict[str, AttrValue] = dict(attributes or {})
        if ex.peer_address:
            attrs.setdefault(NETWORK_PEER_ADDRESS, ex.peer_address)
            attrs.setdefault(NETWORK_PEER_PORT, ex.peer_port)
        business, ctx_truncated = self._business(ex)
        if ctx_truncated:
            attrs[BRIDGE_CONTEXT_TRUNCATED] = True
        if ex.tls:
            attrs[TLS_PROTOCOL_NAME] = "tls"
        attrs.update(business)
        start = ex.req_start_ns + self._epoch_offset_ns
        end = max(ex.resp_end_ns, ex.req_end_ns) + self._epoch_offset_ns
        return SpanRecord(b"", self.ids.span_id(ex.exchange_id, index), None, name, kind, start,
                          end, self._procs.resource_for(ex.tgid), attrs)

    def take_upgrade(self, tgid: int, conn_id: int) -> Upgrade | None:
        """The HTTP/1.1 request that upgraded connection ``conn_id`` to HTTP/2, once."""
        return self._upgrades.pop((tgid, conn_id), None)

    def _upgrade_tail(self, ex: Exchange, resp: http1.HttpResponse) -> None:
        """Hand on, as the first server chunk of the HTTP/2 connection, the bytes that came in
        the same read or write as the ``101``: the kernel switched to stream mode only after
        that call, and a server that writes its SETTINGS and the answer on stream 1 right
        behind the 101 (or a client that reads them in one go) puts them here."""
        if resp.length is None or self._stream_handler is None:
            return
        at = resp.offset + resp.length
        if at >= ex.resp_bytes:
            return
        self.on_chunk(Chunk(
            tgid=ex.tgid, fd=ex.fd, role=ex.role, from_client=False, closed=False,
            peer_address=ex.peer_address, peer_port=ex.peer_port, listen_fd=ex.listen_fd,
            tid=ex.resp_tid, total_len=ex.resp_bytes - at, conn_id=ex.conn_id,
            ts_ns=ex.resp_end_ns, parent_exchange_id=ex.parent_exchange_id,
            data=ex.response[at:], ctx=ex.ctx, local_address=ex.local_address,
            local_port=ex.local_port, peer_traced=ex.peer_traced, tls=ex.tls))

    def resource_for(self, tgid: int) -> Resource:
        """The resource of process ``tgid``."""
        return self._procs.resource_for(tgid)

    def listen_port(self, tgid: int, fd: int) -> int | None:
        """Local port of listening socket ``fd`` in ``tgid``."""
        return self._procs.listen_port(tgid, fd)

    def server_executable(self, ex: Exchange) -> str | None:
        """Executable name of the local server process a client exchange went to (None: remote,
        unknown, or no peer lookup configured). Scans /proc on a miss: call it once per
        connection, not per exchange."""
        if self._peers is None or not ex.peer_address:
            return None
        return self._peers.server_executable(ex.tgid, ex.fd, ex.peer_address, ex.peer_port)

    def business(self, ctx: bytes | None) -> tuple[dict[str, AttrValue], bool]:
        """Business attributes (and whether they were truncated) from a context snapshot."""
        if ctx is None:
            return {}, False
        cached = self._ctx_cache.get(ctx)
        if cached is None:
            cached = self._decode_ctx(ctx)
            if len(self._ctx_cache) >= 4096:
                self._ctx_cache.clear()
            self._ctx_cache[ctx] = cached
        return cached

    def epoch_ns(self, monotonic_ns: int) -> int:
        """A kernel (CLOCK_MONOTONIC) timestamp as Unix time."""
        return monotonic_ns + self._epoch_offset_ns

    def server_span_done(self, span: SpanRecord) -> None:
        """Hand on a server span whose ids and trace are set."""
        self._emit(span)

    def forget_conn(self, ex: Exchange) -> None:
        """Drop the per-connection memory of ``ex``'s connection, which has closed. Servers
        that close after every request (a gunicorn sync worker) would otherwise fill the
        bounded table with dead connections: about 250 bytes each, 16 MB at the bound."""
        self._http1_order.pop((ex.tgid, ex.conn_id), None)
        for protocol in self._conn_protocols:
            self._conn_states.pop((ex.tgid, ex.conn_id, protocol), None)

    @property
    def conn_states(self) -> int:
        """Connections with per-connection memory now."""
        return len(self._conn_states) + len(self._http1_order)

    def conn_state(self, ex: Exchange, protocol: str) -> dict[str, object]:
        """Per-connection memory for stateful protocols (a database name from a startup
        message, prepared statements). Bounded: the least recently used connections go."""
        key = (ex.tgid, ex.conn_id, protocol)
        state = self._conn_states.get(key)
        if state is None:
            self._conn_protocols.add(protocol)
            state = self._conn_states[key] = {}
            if len(self._conn_states) > self._max_conn_states:
                self._conn_states.popitem(last=False)
        else:
            self._conn_states.move_to_end(key)
        return state

    def finish(self, span: SpanRecord, ex: Exchange, index: int = 0) -> None:
        """Give ``span`` its trace and parent and hand it on: a client span joins the server
        span its thread was serving; a server span starts a trace."""
        if span.kind == SpanKind.SERVER:
            if index == 0 and self._sdk_covers_server(ex):
                return
            span.trace_id = self.ids.trace_id(ex.exchange_id, index)
            if index == 0:
                self._server_done(ex.exchange_id, span.trace_id, derived=True)
            self._emit(span)
        else:
            self._route_client(span, ex, None, index)

    # -- context and parents ------------------------------------------------------------------

    def _business(self, ex: Exchange) -> tuple[dict[str, AttrValue], bool]:
        # Many requests carry the same context block (same tenant, same flag): ``business``
        # decodes each distinct block once.
        return self.business(ex.ctx)

    @staticmethod
    def _decode_ctx(ctx: bytes) -> tuple[dict[str, AttrValue], bool]:
        version, count, flags, data_len, _pad, _tid, _sid, _kind = (
            _abi.CTX_VALUE_HEADER.unpack_from(ctx, 0)
        )
        if version != _abi.ABI_VERSION:
            return {}, False
        data = ctx[_abi.CTX_VALUE_HEADER.size : _abi.CTX_VALUE_HEADER.size + data_len]
        return _abi.decode_attrs(data, count), bool(flags & _abi.CTX_F_TRUNCATED)

    def _server_done(self, exchange_id: int, trace_id: bytes, derived: bool = False) -> None:
        servers = self._servers
        servers[exchange_id] = _DERIVED if derived else trace_id
        if len(servers) >= self._max_servers // 2:
            self._servers_old = servers
            self._servers = {}
        if exchange_id in self._waiting:
            self._release(exchange_id, trace_id, timed_out=False)

    def _sdk_covers_server(self, ex: Exchange) -> bool:
        """Whether an SDK server span was active for this server exchange (then it is the
        operation's one span: the agent's is dropped, and the client spans waiting on the
        exchange join the SDK span)."""
        sdk = _abi.sdk_span_of(ex.ctx) if ex.ctx is not None else None
        if sdk is None or sdk.kind != _abi.SDK_KIND_SERVER:
            return False
        self.stats.sdk_covered += 1
        self._sdk_servers[ex.exchange_id] = sdk.span_id
        if len(self._sdk_servers) > self._max_servers:
            self._sdk_servers.popitem(last=False)
        self._server_done(ex.exchange_id, sdk.trace_id)
        return True

    def _route_client(self, span: SpanRecord, ex: Exchange, traceparent: str | None,
                      index: int) -> None:
        if ex.ctx is not None and self.route_under_sdk(span, ex.ctx):
            return
        self.route_client(span, ex.parent_exchange_id, traceparent,
                          lambda: self.ids.trace_id(ex.exchange_id, index))

    def route_under_sdk(self, span: SpanRecord, ctx: bytes | None) -> bool:
        """Handle a client span made while an OpenTelemetry SDK span was active (``ctx`` names
        it): dropped when that SDK span is a client span (it is this call), else parented
        under it and handed on. False, doing nothing, when ``ctx`` names no SDK span."""
        sdk = _abi.sdk_span_of(ctx) if ctx is not None else None
        if sdk is None:
            return False
        if sdk.kind == _abi.SDK_KIND_CLIENT:
            # The SDK's client span (requests, psycopg, grpc instrumentation...) is this call.
            self.stats.sdk_covered += 1
            self._client_keys.pop(span.span_id, None)
            return True
        span.attributes.pop(HTTP_ROUTE, None)
        span.trace_id, span.parent_span_id = sdk.trace_id, sdk.span_id
        self.stats.sdk_parented += 1
        self._emit(span)
        return True

    def route_client(self, span: SpanRecord, parent: int, traceparent: str | None,
                     root_trace: Callable[[], bytes]) -> None:
        """Parent a client span under the server exchange ``parent`` its thread was serving
        (waiting a bounded time for that span's trace id), else under an outgoing
        ``traceparent``, else start the trace ``root_trace()``; then hand it on."""
        # The reserved key http.route names the server's route: not a client attribute.
        span.attributes.pop(HTTP_ROUTE, None)
        if not parent:
            tp = parse_traceparent(traceparent)
            if tp is not None:
                span.trace_id, span.parent_span_id = tp.trace_id, tp.span_id
            else:
                span.trace_id = root_trace()
            self._emit(span)
            return
        span.parent_span_id = self._sdk_servers.get(parent) or self.ids.span_id(parent)
        trace_id = self._servers.get(parent)
        if trace_id is None:
            trace_id = self._servers_old.get(parent)
        if trace_id is not None:
            span.trace_id = trace_id or self.ids.trace_id(parent)
            self._emit(span)
            return
        if self._n_waiting >= self._max_pending:
            self.stats.pending_overflow += 1
            span.trace_id = self.ids.trace_id(parent)
            self._emit(span)
            return
        deadline = time.monotonic_ns() + self._parent_wait_ns
        self._waiting.setdefault(parent, []).append(_Waiting(deadline, span))
        self._n_waiting += 1

    def _release(self, parent_id: int, trace_id: bytes, *, timed_out: bool) -> None:
        items = self._waiting.pop(parent_id, [])
        self._n_waiting -= len(items)
        if timed_out:
            self.stats.parent_timeouts += len(items)
        sdk_parent = self._sdk_servers.get(parent_id)
        for w in items:
            w.span.trace_id = trace_id
            if sdk_parent is not None:
                w.span.parent_span_id = sdk_parent
            self._emit(w.span)

    def _emit(self, span: SpanRecord) -> None:
        self.stats.spans += 1
        self._sink(span)
        if self._client_keys:
            key = self._client_keys.pop(span.span_id, None)
            if key is not None:
                self._client_done(key, span)

    # -- same-node stitching --------------------------------------------------------------------
    # The agent sees both ends of a connection between two traced processes: the server span of
    # the k-th request on a connection is the child of the client span of the k-th request on
    # the same 4-tuple. Neither end carries a traceparent (zero-code services), so this is how
    # a request through several services becomes one trace.

    def _server_final(self, span: SpanRecord, exchange_id: int, index: int,
                      derived: bool = False) -> None:
        # Exchange id 0: a span with no kernel exchange (an HTTP/2 stream) that no client
        # span of its own process waits on by exchange id.
        if exchange_id and index == 0:
            self._server_done(exchange_id, span.trace_id, derived)
        self._emit(span)

    def _stitch_server(self, span: SpanRecord, key: _StitchKey, exchange_id: int,
                       index: int, fallback: bytes | None = None) -> bool:
        """Join ``span`` to its client span if known, else hold it; True when held."""
        fallback = fallback or self.ids.trace_id(exchange_id, index)
        client = self._stitch_clients.get(key)
        if client is not None:
            span.trace_id, span.parent_span_id = client
            self.stats.stitched += 1
            return False
        if len(self._stitch_waiting) >= self._max_pending:
            self.stats.pending_overflow += 1
            span.trace_id = fallback
            return False
        deadline = time.monotonic_ns() + self._stitch_wait_ns
        self._stitch_waiting[key] = (deadline, span, exchange_id, index, fallback)
        self.stats.stitch_waited += 1
        return True

    def stitch_client(self, span_id: bytes, key: _StitchKey) -> None:
        """Declare that the client span ``span_id`` (not yet handed on) sent the request
        ``key``; a server span on this node with the same key will join its trace."""
        self._client_keys[span_id] = key

    def finish_server(self, span: SpanRecord, *, fallback_trace: bytes,
                      stitch_key: _StitchKey | None) -> None:
        """Hand on a server span with no traceparent of its own: joined to its traced client
        span on this node when ``stitch_key`` is given (possibly after a bounded wait), else
        starting ``fallback_trace``."""
        if stitch_key is not None:
            if self._stitch_server(span, stitch_key, 0, 0, fallback_trace):
                return
        else:
            span.trace_id = fallback_trace
        self._emit(span)

    def _client_done(self, key: _StitchKey, span: SpanRecord) -> None:
        self._stitch_clients[key] = (span.trace_id, span.span_id)
        if len(self._stitch_clients) > self._max_servers:
            self._stitch_clients.popitem(last=False)
        held = self._stitch_waiting.pop(key, None)
        if held is not None:
            deadline, server, exchange_id, index, _fallback = held
            waited_us = (time.monotonic_ns() - (deadline - self._stitch_wait_ns)) // 1000
            self.stats.stitch_wait_us_total += waited_us
            self.stats.stitch_wait_us_max = max(self.stats.stitch_wait_us_max, waited_us)
            server.trace_id, server.parent_span_id = span.trace_id, span.span_id
            self.stats.stitched += 1
            self._server_final(server, exchange_id, index)

    def _expire_stitches(self, now: int, *, everything: bool = False) -> None:
        expired = [key for key, held in self._stitch_waiting.items()
                   if everything or held[0] <= now]
        for key in expired:
            # Handing a server span on releases the client spans waiting on it, and each of
            # those may release a held server span of its own (a chain of zero-code services):
            # a key taken below may be gone already, joined to its client after all.
            held = self._stitch_waiting.pop(key, None)
            if held is None:
                continue
            _deadline, server, exchange_id, index, fallback = held
            self.stats.stitch_timeouts += 1
            server.trace_id = fallback
            self._server_final(server, exchange_id, index)


def _asks_h2c(request: bytes) -> bool:
    """Whether a request head asks to upgrade to cleartext HTTP/2."""
    head = request.lower()
    return b"\nupgrade:" in head and b"h2c" in head


_HOSTS: dict[str, tuple[str | None, int | None]] = {}


def _common_attrs(req: http1.HttpRequest, resp: http1.HttpResponse | None,
                  peer_address: str | None, peer_port: int, server: bool, truncated: bool,
                  ctx_truncated: bool, business: dict[str, AttrValue]
                  ) -> tuple[dict[str, AttrValue], bool]:
    """The attributes HTTP/1 client and server spans share, and whether the span failed (5xx;
    4xx too for a client: for a server it is the caller's error)."""
    attrs: dict[str, AttrValue] = {
        HTTP_REQUEST_METHOD: req.method,
        NETWORK_PROTOCOL_VERSION: req.version,
    }
    failed = False
    if resp is not None:
        attrs[HTTP_RESPONSE_STATUS_CODE] = resp.status
        if resp.body_size is not None:
            attrs[HTTP_RESPONSE_BODY_SIZE] = resp.body_size
        if resp.status >= 500 or (not server and resp.status >= 400):
            failed = True
            attrs[ERROR_TYPE] = str(resp.status)
    if req.body_size is not None:
        attrs[HTTP_REQUEST_BODY_SIZE] = req.body_size
    if req.user_agent:
        attrs[USER_AGENT_ORIGINAL] = req.user_agent
    if peer_address:
        attrs[NETWORK_PEER_ADDRESS] = peer_address
        attrs[NETWORK_PEER_PORT] = peer_port
    if truncated:
        attrs[BRIDGE_TRUNCATED] = True
    if ctx_truncated:
        attrs[BRIDGE_CONTEXT_TRUNCATED] = True
    attrs.update(business)
    return attrs, failed


def server_attrs_py(req: http1.HttpRequest, resp: http1.HttpResponse | None,
                    peer_address: str | None, peer_port: int, tls: bool, local_port: int | None,
                    host: str | None, truncated: bool, ctx_truncated: bool,
                    business: dict[str, AttrValue]) -> tuple[dict[str, AttrValue], bool]:
    """The attributes of an HTTP/1 server span and whether it failed. ``host`` is the name
    part of the request's Host header; the business context goes in before the server's own
    attributes, which win on a clash. The reference for ``_fastspan.server_attrs``."""
    attrs, failed = _common_attrs(req, resp, peer_address, peer_port, True, truncated,
                                  ctx_truncated, business)
    attrs[URL_PATH] = req.path
    if req.query:
        attrs[URL_QUERY] = req.query
    attrs[URL_SCHEME] = "https" if tls else "http"
    if tls:
        attrs[TLS_PROTOCOL_NAME] = "tls"
    if local_port is not None:
        attrs[SERVER_PORT] = local_port
    if host:
        attrs[SERVER_ADDRESS] = host
    forwarded = req.x_forwarded_for.split(",")[0].strip() if req.x_forwarded_for else None
    client = forwarded or peer_address
    if client:
        attrs[CLIENT_ADDRESS] = client
    return attrs, failed


_FAST_KEYS: Final = (
    HTTP_REQUEST_METHOD, NETWORK_PROTOCOL_VERSION, HTTP_RESPONSE_STATUS_CODE,
    HTTP_RESPONSE_BODY_SIZE, ERROR_TYPE, HTTP_REQUEST_BODY_SIZE, USER_AGENT_ORIGINAL,
    NETWORK_PEER_ADDRESS, NETWORK_PEER_PORT, BRIDGE_TRUNCATED, BRIDGE_CONTEXT_TRUNCATED, URL_PATH,
    URL_QUERY, URL_SCHEME, TLS_PROTOCOL_NAME, SERVER_PORT, SERVER_ADDRESS, CLIENT_ADDRESS,
)
"""The keys ``_fastspan.server_attrs`` writes, in the order of its enum."""

def _new_server_span_py(span_id: bytes, name: str, start_ns: int, end_ns: int,
                        resource: Resource, attributes: dict[str, AttrValue],
                        status: StatusCode) -> SpanRecord:
    """An HTTP/1 server span before its trace is known (``_fastspan.server_span`` in C)."""
    return SpanRecord(b"", span_id, None, name, SpanKind.SERVER, start_ns, end_ns, resource,
                      attributes, status)


_fast_server_attrs: Callable[..., tuple[dict[str, AttrValue], bool] | None] | None = None
_new_server_span: Callable[[bytes, str, int, int, Resource, dict[str, AttrValue], StatusCode],
                           SpanRecord] = _new_server_span_py
if _fastspan is not None:
    _fastspan.configure(_FAST_KEYS)
    _fast_server_attrs = _fastspan.server_attrs
    _fastspan.configure_spans(SpanRecord, SpanKind.SERVER)
    _new_server_span = _fastspan.server_span


def _split_host(host: str) -> tuple[str | None, int | None]:
    # Host headers repeat from request to request: split each distinct one once (bounded).
    split = _HOSTS.get(host)
    if split is None:
        split = _split_host_uncached(host)
        if len(_HOSTS) >= 4096:
            _HOSTS.clear()
        _HOSTS[host] = split
    return split


def _split_host_uncached(host: str) -> tuple[str | None, int | None]:
    host = host.strip()
    if not host:
        return None, None
    if host.startswith("["):
        end = host.find("]")
        name = host[1:end] if end > 0 else host
        rest = host[end + 1 :] if end > 0 else ""
        port = int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
        return name, port
    name, sep, port_s = host.rpartition(":")
    if sep and port_s.isdigit() and ":" not in name:
        return name, int(port_s)
    return host, None
