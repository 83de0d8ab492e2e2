"""Decoding of ring-buffer events. The layout comes from the C struct, never retyped by hand.

``ExchangeLayout.from_ctypes`` reads field offsets from the ctypes class BCC generates for the
``conns`` map value (the same struct the kernel emits) and builds a ``struct.Struct`` for the
fixed header, so one ``unpack_from`` decodes an event.
"""

from __future__ import annotations

import ctypes
import ipaddress
import struct
from dataclasses import dataclass
from typing import Any, Final

from kernel_side import _accel

EV_EXCHANGE: Final = 1
EV_PROC: Final = 2
EV_CHUNK: Final = 3
EV_EXCHANGE_PACKED: Final = 4
"""An exchange as the ring buffer carries it: header, request bytes, response bytes, then the
context only when ``has_ctx`` (``emit`` in bpf/agent.bpf.c)."""
PHASE_CLOSED: Final = 3
"""``phase`` of an exchange emitted at close (bpf/agent.bpf.c)."""
CHUNK_F_CLOSE: Final = 1

ROLE_SERVER: Final = 1
ROLE_CLIENT: Final = 2

PROC_EXEC: Final = 1
PROC_FORK: Final = 2
PROC_EXIT: Final = 3

AF_INET: Final = 2
AF_INET6: Final = 10

# Slots of the kernel's per-CPU `stats` array (ST_* in bpf/agent.bpf.c).
STAT_NAMES: Final = (
    "events_lost",
    "exchanges",
    "unmatched_responses",
    "context_hits",
    "pidns_errors",
    "connections",
    "proc_events_lost",
    "chunks",
    "conns_deleted",
    "socks_created",
    "socks_deleted",
    "tracking_full",
)

PROC_EVENT: Final = struct.Struct("<IIII16s")

_HEADER_FIELDS: Final = (
    "type",
    "tgid",
    "fd",
    "role",
    "family",
    "phase",
    "has_ctx",
    "peer_port",
    "listen_fd",
    "req_tid",
    "resp_tid",
    "req_cap",
    "resp_cap",
    "req_calls",
    "resp_calls",
    "peer_addr",
    "conn_id",
    "exchange_id",
    "parent_exchange_id",
    "req_start_ns",
    "req_end_ns",
    "resp_start_ns",
    "resp_end_ns",
    "req_bytes",
    "resp_bytes",
    "local_addr",
    "local_port",
    "peer_traced",
    "tls",
    "ctx",
)

_CODES: Final[dict[Any, str]] = {
    ctypes.c_ubyte: "B",
    ctypes.c_ushort: "H",
    ctypes.c_uint: "I",
    ctypes.c_ulong: "Q" if ctypes.sizeof(ctypes.c_ulong) == 8 else "I",
    ctypes.c_ulonglong: "Q",
    ctypes.c_int: "i",
    ctypes.c_longlong: "q",
}


@dataclass(slots=True)
class Exchange:
    """One request/response exchange on one connection, as the kernel paired it."""

    tgid: int
    fd: int
    role: int
    peer_address: str | None
    peer_port: int
    listen_fd: int
    req_tid: int
    resp_tid: int
    conn_id: int
    exchange_id: int
    parent_exchange_id: int
    req_start_ns: int
    req_end_ns: int
    resp_start_ns: int
    resp_end_ns: int
    req_bytes: int
    resp_bytes: int
    req_calls: int
    resp_calls: int
    request: bytes
    response: bytes
    ctx: bytes | None
    """The raw ``struct bridge_ctx_value`` snapshot, when the thread had context."""
    local_address: str | None = None
    local_port: int = 0
    peer_traced: bool = False
    """Server side: the client end of this connection is a traced socket on this node."""
    tls: bool = False
    """The bytes are TLS plaintext (from the SSL uprobes), not socket bytes."""
    closed: bool = False
    """The kernel emitted this exchange because its connection closed."""


def _format_addr_uncached(family: int, raw: bytes) -> str | None:
    if family == AF_INET:
        return str(ipaddress.IPv4Address(raw[:4]))
    if family == AF_INET6:
        addr = ipaddress.IPv6Address(raw)
        return str(addr.ipv4_mapped or addr)
    return None


# Every event carries two raw addresses, and they repeat (a handful of peers, one local
# address): formatting through ``ipaddress`` costs about a microsecond each, a dict hit a few
# tens of nanoseconds. Bounded: dropped when full.
_ADDR_CACHE: dict[tuple[int, bytes], str | None] = {}
_ADDR_CACHE_MAX: Final = 65_536
_fastspan = _accel.load("_fastspan")
ACCELERATED = _fastspan is not None
"""Whether packed events are decoded in C (``kernel_side._fastspan.Decoder``)."""


def _format_addr(family: int, raw: bytes) -> str | None:
    key = (family, raw)
    text = _ADDR_CACHE.get(key, _ADDR_CACHE)
    if text is _ADDR_CACHE:
        text = _format_addr_uncached(family, raw)
        if len(_ADDR_CACHE) >= _ADDR_CACHE_MAX:
            _ADDR_CACHE.clear()
        _ADDR_CACHE[key] = text
    return text  # type: ignore[return-value]


class ExchangeLayout:
    """Offsets of ``struct exchange`` and a decoder for it."""

    def __init__(self, header: struct.Struct, names: tuple[str, ...], req_off: int,
                 resp_off: int, ctx_size: int, packed_header: struct.Struct,
                 packed_off: int) -> None:
        self._header = header
        self._names = names
        self.req_off = req_off
        self.resp_off = resp_off
        self.ctx_size = ctx_size
        self._packed_header = packed_header
        self._packed_off = packed_off

    @classmethod
    def from_ctypes(cls, leaf: type[ctypes.Structure]) -> ExchangeLayout:
        """Build the decoder from BCC's ctypes class for the ``conns`` map value."""
        header = _struct_for(leaf, _HEADER_FIELDS)
        names = _HEADER_FIELDS
        layout = cls(header, tuple(names), leaf.req.offset, leaf.resp.offset, leaf.ctx.size,
                     _struct_for(leaf, _HEADER_FIELDS[:-1]), leaf.ctx.offset)
        if _fastspan is not None:
            # The C decoder shadows decode_packed on this instance (decode_packed_py stays the
            # reference; tests/unit/test_fastspan.py compares both).
            fields = tuple((getattr(leaf, n).offset, getattr(leaf, n).size)
                           for n in _HEADER_FIELDS[:-1])
            layout.decode_packed = _fastspan.Decoder(  # type: ignore[method-assign]
                Exchange, fields, leaf.ctx.offset, leaf.ctx.size, PHASE_CLOSED, _format_addr,
                _ADDR_CACHE, layout.decode_packed_py).decode_packed
        return layout

    def decode_packed_py(self, data: bytes) -> Exchange:
        """Decode one ``EV_EXCHANGE_PACKED`` ring-buffer event in Python. ``decode_packed`` is
        this, or the C decoder when ``kernel_side._fastspan`` is built."""
        (
            _type, tgid, fd, role, family, _phase, has_ctx, peer_port, listen_fd, req_tid,
            resp_tid, req_cap, resp_cap, req_calls, resp_calls, peer_addr, conn_id,
            exchange_id, parent_exchange_id, req_start_ns, req_end_ns, resp_start_ns,
            resp_end_ns, req_bytes, resp_bytes, local_addr, local_port, peer_traced, tls,
        ) = self._packed_header.unpack_from(data, 0)
        req_off = self._packed_off
        resp_off = req_off + req_cap
        ctx_off = resp_off + resp_cap
        return Exchange(
            tgid, fd, role, _format_addr(family, peer_addr), peer_port, listen_fd, req_tid,
            resp_tid, conn_id, exchange_id, parent_exchange_id, req_start_ns, req_end_ns,
            resp_start_ns, resp_end_ns, req_bytes, resp_bytes, req_calls, resp_calls,
            data[req_off:resp_off], data[resp_off:ctx_off],
            data[ctx_off : ctx_off + self.ctx_size] if has_ctx else None,
            _format_addr(family, local_addr) if local_port else None,
            local_port, peer_traced != 0, tls != 0, _phase == PHASE_CLOSED,
        )

    decode_packed = decode_packed_py

    def decode(self, data: bytes) -> Exchange:
        """Decode a ``conns`` map value (an exchange as the kernel keeps it), read by user
        space."""
        (
            _type, tgid, fd, role, family, _phase, has_ctx, peer_port, listen_fd, req_tid,
            resp_tid, req_cap, resp_cap, req_calls, resp_calls, peer_addr, conn_id,
            exchange_id, parent_exchange_id, req_start_ns, req_end_ns, resp_start_ns,
            resp_end_ns, req_bytes, resp_bytes, local_addr, local_port, peer_traced, tls, ctx,
        ) = self._header.unpack_from(data, 0)
        req_off = self.req_off
        resp_off = self.resp_off
        req_cap = max(0, min(req_cap, len(data) - req_off))
        # Positional: a 26-argument keyword call costs noticeably more on this hot path.
        return Exchange(
            tgid, fd, role, _format_addr(family, peer_addr), peer_port, listen_fd, req_tid,
            resp_tid, conn_id, exchange_id, parent_exchange_id, req_start_ns, req_end_ns,
            resp_start_ns, resp_end_ns, req_bytes, resp_bytes, req_calls, resp_calls,
            data[req_off : req_off + req_cap], data[resp_off : resp_off + resp_cap],
            ctx if has_ctx else None,
            _format_addr(family, local_addr) if local_port else None,
            local_port, peer_traced != 0, tls != 0,
        )


_CHUNK_FIELDS: Final = (
    "type", "tgid", "fd", "role", "from_client", "has_ctx", "flags", "peer_port", "family",
    "listen_fd", "tid", "cap", "len", "conn_id", "ts_ns", "parent_exchange_id", "peer_addr",
    "local_addr", "local_port", "peer_traced", "tls", "ctx",
)


@dataclass(slots=True)
class Chunk:
    """One read or write on a stream-mode (HTTP/2) connection, in order."""

    tgid: int
    fd: int
    role: int
    from_client: bool
    closed: bool
    peer_address: str | None
    peer_port: int
    listen_fd: int
    tid: int
    total_len: int
    conn_id: int
    ts_ns: int
    parent_exchange_id: int
    data: bytes
    ctx: bytes | None
    local_address: str | None = None
    local_port: int = 0
    peer_traced: bool = False
    tls: bool = False
    """The bytes are TLS plaintext (from the SSL uprobes)."""


def _struct_for(leaf: type[ctypes.Structure], names: tuple[str, ...]) -> struct.Struct:
    fmt = "<"
    pos = 0
    types = {f[0]: f[1] for f in leaf._fields_}
    for name in names:
        desc = getattr(leaf, name)
        if desc.offset > pos:
            fmt += f"{desc.offset - pos}x"
        ctype = types[name]
        fmt += _CODES.get(ctype, f"{desc.size}s")
        pos = desc.offset + desc.size
    out = struct.Struct(fmt)
    if out.size != pos:
        raise RuntimeError(f"event layout mismatch for {leaf.__name__}: {out.size} != {pos}")
    return out


class ChunkLayout:
    """Decoder for ``struct chunk``, built from BCC's ctypes class of ``chunk_scratch``."""

    def __init__(self, leaf: type[ctypes.Structure]) -> None:
        self._header = _struct_for(leaf, _CHUNK_FIELDS)
        self.data_off = leaf.data.offset

    def decode(self, raw: bytes) -> Chunk:
        """Decode one chunk event."""
        (
            _type, tgid, fd, role, from_client, has_ctx, flags, peer_port, family, listen_fd,
            tid, cap, total, conn_id, ts_ns, parent, peer_addr, local_addr, local_port,
            peer_traced, tls, ctx,
        ) = self._header.unpack_from(raw, 0)
        return Chunk(
            tgid=tgid, fd=fd, role=role, from_client=bool(from_client),
            closed=bool(flags & CHUNK_F_CLOSE), peer_address=_format_addr(family, peer_addr),
            peer_port=peer_port, listen_fd=listen_fd, tid=tid, total_len=total, conn_id=conn_id,
            ts_ns=ts_ns, parent_exchange_id=parent,
            data=raw[self.data_off : self.data_off + cap], ctx=ctx if has_ctx else None,
            local_address=_format_addr(family, local_addr) if local_port else None,
            local_port=local_port, peer_traced=bool(peer_traced), tls=bool(tls),
        )
