"""The context-map ABI shared by the application side and the agent.

Mirrors ``bpf/bridge_abi.h`` number for number; ``tests/e2e/test_abi_header.py`` loads that
header with BCC and compares. Standard library only: applications import this.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

ABI_VERSION: Final = 1
PIN_ROOT: Final = "/sys/fs/bpf/ebpf_bridge"
PIN_DIR: Final = f"{PIN_ROOT}/v{ABI_VERSION}"
CTX_BY_TID_NAME: Final = "ctx_by_tid"
CTX_BY_TID_PIN: Final = f"{PIN_DIR}/{CTX_BY_TID_NAME}"
CTX_BY_CONN_NAME: Final = "ctx_by_conn"
CTX_BY_CONN_PIN: Final = f"{PIN_DIR}/{CTX_BY_CONN_NAME}"
CTX_MAX_ENTRIES: Final = 16384
CTX_CELLS_NAME: Final = "ctx_cells"
CTX_CELLS_PIN: Final = f"{PIN_DIR}/{CTX_CELLS_NAME}"
CTX_CELLS: Final = 16384
"""Cells of the mmapable per-thread context map (see ``bridge_ctx_cell`` in the header)."""
CTX_CELL_BITS: Final = 14
CELL_HASH: Final = 0x9E3779B97F4A7C15
CTX_CELL_HEADER: Final = struct.Struct("<QI4x")
"""struct bridge_ctx_cell before its value: owner (u64), live (u32), padding."""
# The other direction (agent -> app), readable by the app group: the server exchange each thread
# is serving (key as ctx_by_tid, value u64 exchange id), and the salt the agent derives span and
# trace ids from (one entry, 24 bytes). bridge.current_span_context() combines the two.
SERVER_BY_TID_NAME: Final = "server_by_tid"
ID_SALT_NAME: Final = "id_salt"
ID_SALT_SIZE: Final = 24

MAX_ATTRS: Final = 8
MAX_KEY_LEN: Final = 48
MAX_STR_LEN: Final = 128
ATTR_BYTES: Final = 320

ATTR_STR: Final = 1
ATTR_INT: Final = 2
ATTR_FLOAT: Final = 3
ATTR_BOOL: Final = 4

CTX_F_TRUNCATED: Final = 0x1
CTX_F_SDK_SPAN: Final = 0x2
CTX_F_TASK_SCOPED: Final = 0x4
"""Written from an asyncio task: the kernel must not clear it when a new request starts."""

# sdk_span_kind: OTLP SpanKind numbers (0 = unspecified).
SDK_KIND_INTERNAL: Final = 1
SDK_KIND_SERVER: Final = 2
SDK_KIND_CLIENT: Final = 3
SDK_KIND_PRODUCER: Final = 4
SDK_KIND_CONSUMER: Final = 5
SDK_SPAN_OFFSET: Final = 8
"""Offset of sdk_trace_id in the value; sdk_span_id and sdk_span_kind follow it."""
SDK_SPAN_SIZE: Final = 16 + 8 + 1


_MASK64: Final = (1 << 64) - 1


def mix64(x: int) -> int:
    """splitmix64's finaliser: a bijection on 64-bit integers (distinct in, distinct out)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def exchange_span_id(salt: bytes, exchange_id: int, index: int = 0) -> bytes:
    """The span id the agent gives message ``index`` of kernel exchange ``exchange_id``."""
    s1 = int.from_bytes(salt[0:8], "little")
    v = mix64(s1 ^ (((exchange_id << 16) | (index & 0xFFFF)) & _MASK64)) or 1
    return v.to_bytes(8, "big")


def exchange_trace_id(salt: bytes, exchange_id: int, index: int = 0) -> bytes:
    """The trace id the agent starts for message ``index`` of a root exchange."""
    s2 = int.from_bytes(salt[8:16], "little")
    s3 = int.from_bytes(salt[16:24], "little")
    key = ((exchange_id << 16) | (index & 0xFFFF)) & _MASK64
    return mix64(s2 ^ key).to_bytes(8, "big") + (mix64(s3 ^ key) or 1).to_bytes(8, "big")


@dataclass(frozen=True)
class SdkSpan:
    """The SDK span a context entry names (``CTX_F_SDK_SPAN``)."""

    trace_id: bytes
    span_id: bytes
    kind: int


def sdk_span_of(value: bytes) -> SdkSpan | None:
    """The SDK span recorded in a ``struct bridge_ctx_value``, if its flag is set and the ids
    are valid (non-zero); None otherwise. Never raises on short or malformed input."""
    end = SDK_SPAN_OFFSET + SDK_SPAN_SIZE
    if len(value) < end or not value[3] & CTX_F_SDK_SPAN:
        return None
    trace_id = bytes(value[SDK_SPAN_OFFSET : SDK_SPAN_OFFSET + 16])
    span_id = bytes(value[SDK_SPAN_OFFSET + 16 : SDK_SPAN_OFFSET + 24])
    if not any(trace_id) or not any(span_id):
        return None
    return SdkSpan(trace_id, span_id, value[end - 1])

# struct bridge_ctx_key { u64 pidns_ino; u32 tid; u32 _pad; }
CTX_KEY: Final = struct.Struct("<QII")
# struct bridge_conn_key { u64 pidns_ino; u32 tgid; u32 fd; }
CONN_KEY: Final = struct.Struct("<QII")
# struct bridge_ctx_value header: version, attr_count, flags, data_len, server_peer_port,
# sdk_trace_id[16], sdk_span_id[8], sdk_span_kind, _pad2[7]; then data[ATTR_BYTES].
# server_peer_port: the client port of the inbound connection the context belongs to (0 =
# unknown); the agent parents client exchanges under that connection's server exchange.
CTX_VALUE_HEADER: Final = struct.Struct("<HBBHH16s8sB7x")
CTX_VALUE_SIZE: Final = CTX_VALUE_HEADER.size + ATTR_BYTES
CTX_CELL_SIZE: Final = CTX_CELL_HEADER.size + CTX_VALUE_SIZE
_ATTR_HEAD: Final = struct.Struct("<BBH")
_I64: Final = struct.Struct("<q")
_F64: Final = struct.Struct("<d")

AttrValue = str | int | float | bool
"""The value types ``bridge.annotate`` accepts."""


def cell_owner(pidns_ino: int, tid: int) -> int:
    """The owner word of a thread's ``ctx_cells`` cell: 0 when the namespace inode does not fit
    32 bits (such a thread uses ``ctx_by_tid``)."""
    if pidns_ino >> 32 or not 0 < tid < 1 << 32:
        return 0
    return (pidns_ino << 32) | tid


def cell_index(owner: int) -> int:
    """The cell a thread with owner word ``owner`` may claim (``bridge_cell_index``)."""
    return ((owner * CELL_HASH) & _MASK64) >> (64 - CTX_CELL_BITS)


def valid_key(key: str) -> bool:
    """Whether ``key`` may name a business attribute.

    Keys are ASCII identifiers that may also contain dots and dashes, start with a letter or an
    underscore, and fit in ``MAX_KEY_LEN`` bytes: they become span attribute keys as given.
    """
    if not key or len(key) > MAX_KEY_LEN or not key.isascii():
        return False
    if not (key[0].isalpha() or key[0] == "_"):
        return False
    return all(c.isalnum() or c in "_.-" for c in key)


@dataclass(frozen=True)
class Encoded:
    """An encoded attribute block and what the encoder had to give up to fit the ABI limits."""

    data: bytes
    count: int
    truncated_values: int
    dropped_attrs: int


def _encode_value(value: AttrValue) -> tuple[int, bytes, bool]:
    # bool before int: bool is a subclass of int.
    if isinstance(value, bool):
        return ATTR_BOOL, b"\x01" if value else b"\x00", False
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise ValueError("integer out of the signed 64-bit range")
        return ATTR_INT, _I64.pack(value), False
    if isinstance(value, float):
        return ATTR_FLOAT, _F64.pack(value), False
    # A lone surrogate cannot be UTF-8: "replace" writes "?" so the agent always gets valid
    # UTF-8 ("surrogatepass" would hand it bytes that no strict decoder accepts).
    raw = value.encode("utf-8", "replace")
    if len(raw) <= MAX_STR_LEN:
        return ATTR_STR, raw, False
    return ATTR_STR, truncate_utf8(raw, MAX_STR_LEN), True


def truncate_utf8(raw: bytes, limit: int) -> bytes:
    """The longest prefix of valid UTF-8 ``raw`` that fits in ``limit`` bytes and ends on a
    character boundary."""
    if len(raw) <= limit:
        return raw
    cut = limit
    # Back off over continuation bytes (10xxxxxx) so no character is split.
    while cut > 0 and raw[cut] & 0xC0 == 0x80:
        cut -= 1
    return raw[:cut]


def encode_attr(key: str, value: AttrValue) -> tuple[bytes, bool]:
    """One encoded attribute record (header, key, value) and whether the value was truncated.

    ``key`` and ``value`` must have passed ``check_attr``.
    """
    kind, raw, cut = _encode_value(value)
    kraw = key.encode("ascii")
    return _ATTR_HEAD.pack(kind, len(kraw), len(raw)) + kraw + raw, cut


def encode_attrs(attrs: Mapping[str, AttrValue]) -> Encoded:
    """Encode validated attributes into the ``data`` block of a context value.

    Strings longer than ``MAX_STR_LEN`` bytes are truncated; attributes past ``MAX_ATTRS`` or
    past the ``ATTR_BYTES`` budget are dropped, in insertion order. Callers validate keys and
    types first (see ``check_attr``); this function never raises for well-typed input.
    """
    out = bytearray()
    count = truncated = dropped = 0
    for key, value in attrs.items():
        rec, cut = encode_attr(key, value)
        if count >= MAX_ATTRS or len(out) + len(rec) > ATTR_BYTES:
            dropped += 1
            continue
        out += rec
        count += 1
        truncated += cut
    return Encoded(bytes(out), count, truncated, dropped)


def check_attr(key: str, value: object) -> None:
    """Raise ``TypeError``/``ValueError`` naming ``key`` if it cannot be an attribute."""
    if not isinstance(key, str) or not valid_key(key):
        raise ValueError(
            f"invalid attribute key {key!r}: use 1-{MAX_KEY_LEN} ASCII letters, digits, "
            "'_', '.' or '-', starting with a letter or '_'"
        )
    if not isinstance(value, (str, int, float, bool)):
        raise TypeError(
            f"attribute {key!r} has a value of type {type(value).__name__}; "
            "use str, int, float or bool"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"attribute {key!r} must be a finite float, got {value!r}")
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        raise ValueError(f"attribute {key!r} does not fit in a signed 64-bit integer")


def pack_value(enc: Encoded, flags: int = 0, server_peer_port: int = 0) -> bytes:
    """The full ``struct bridge_ctx_value`` bytes for an encoded attribute block.

    ``server_peer_port`` is the client port of the inbound connection the context belongs to
    (0 = unknown)."""
    if enc.truncated_values or enc.dropped_attrs:
        flags |= CTX_F_TRUNCATED
    head = CTX_VALUE_HEADER.pack(
        ABI_VERSION, enc.count, flags, len(enc.data), server_peer_port, bytes(16), bytes(8), 0
    )
    return head + enc.data.ljust(ATTR_BYTES, b"\x00")


def decode_attrs(data: bytes, count: int) -> dict[str, AttrValue]:
    """Decode an attribute block written by ``encode_attrs``.

    The agent calls this on bytes that came from an application, so malformed input never
    raises: decoding stops at the first attribute that does not fit.
    """
    out: dict[str, AttrValue] = {}
    off = 0
    n = len(data)
    for _ in range(min(count, MAX_ATTRS)):
        if off + _ATTR_HEAD.size > n:
            break
        kind, klen, vlen = _ATTR_HEAD.unpack_from(data, off)
        off += _ATTR_HEAD.size
        if off + klen + vlen > n:
            break
        key = data[off : off + klen].decode("ascii", "replace")
        raw = data[off + klen : off + klen + vlen]
        off += klen + vlen
        value: AttrValue
        if kind == ATTR_STR:
            value = raw.decode("utf-8", "replace")
        elif kind == ATTR_INT and vlen == 8:
            value = _I64.unpack(raw)[0]
        elif kind == ATTR_FLOAT and vlen == 8:
            value = _F64.unpack(raw)[0]
        elif kind == ATTR_BOOL and vlen == 1:
            value = raw != b"\x00"
        else:
            continue
        out[key] = value
    return out
