"""Redis (RESP2/RESP3) parser for captured exchanges: bytes in, typed records out.

A client exchange holds what the client wrote before the server answered (the first bytes of
it: one command, a pipeline, a MULTI/EXEC transaction) and the first bytes of the answer. This
module turns the request buffer into one ``RedisCommand`` per command it can see the start of,
and the response buffer into one ``RedisReply`` per top-level reply, in order.

Requests: clients send each command as a RESP array of bulk strings (``*N\\r\\n$len\\r\\n...``);
``telnet``-style inline commands (``PING\\r\\n``, ``SET k v\\r\\n``) are understood too. Replies:
every RESP2 and RESP3 type (simple string, error, integer, bulk, array, null, double, boolean,
big number, blob error, verbatim string, map, set, attribute, push). RESP3 pushes and
attributes are out-of-band: they are reported with ``out_of_band=True`` so callers can leave
them out when pairing replies with commands.

Contract: pure functions, never raise on any input, linear time in ``len(data)``. Lengths and
counts the bytes claim are never trusted: nothing is allocated or looped over by a claimed
size, so ``$999999999`` with three bytes behind it costs three bytes of work. Parsing stops at
the first byte that cannot be RESP (garbage) and returns what came before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = [
    "INLINE_COMMANDS",
    "MAX_ARGS_KEPT",
    "RedisCommand",
    "RedisReply",
    "looks_like_command",
    "parse_commands",
    "parse_replies",
]

MAX_ARGS_KEPT: Final = 8
"""Arguments kept per command (after the name); the rest are only counted."""

_MAX_ARG_KEPT_LEN: Final = 64
_MAX_NAME_LEN: Final = 64
_MAX_TEXT_LEN: Final = 256
_MAX_DEPTH: Final = 64
# A length or count line longer than this is garbage (2**63 has 19 digits).
_MAX_NUM_DIGITS: Final = 20
_MAX_INLINE_LEN: Final = 64 * 1024  # redis-server's own inline limit

# Command names an inline request must start with: inline is plain text, so without this any
# line-based protocol would look like Redis. RESP arrays need no list (modules add commands).
INLINE_COMMANDS: Final = frozenset(
    """
    APPEND AUTH BGREWRITEAOF BGSAVE BITCOUNT BITFIELD BITOP BITPOS BLMOVE BLPOP BRPOP
    BRPOPLPUSH BZPOPMAX BZPOPMIN CLIENT CLUSTER COMMAND CONFIG COPY DBSIZE DEBUG DECR DECRBY
    DEL DISCARD DUMP ECHO EVAL EVALSHA EXEC EXISTS EXPIRE EXPIREAT FLUSHALL FLUSHDB FUNCTION
    GEOADD GEODIST GEOHASH GEOPOS GEOSEARCH GET GETBIT GETDEL GETEX GETRANGE GETSET HDEL HELLO
    HEXISTS HGET HGETALL HINCRBY HINCRBYFLOAT HKEYS HLEN HMGET HMSET HSCAN HSET HSETNX HSTRLEN
    HVALS INCR INCRBY INCRBYFLOAT INFO KEYS LASTSAVE LINDEX LINSERT LLEN LMOVE LPOP LPOS LPUSH
    LPUSHX LRANGE LREM LSET LTRIM MEMORY MGET MONITOR MOVE MSET MSETNX MULTI OBJECT PERSIST
    PEXPIRE PEXPIREAT PFADD PFCOUNT PFMERGE PING PSETEX PSUBSCRIBE PTTL PUBLISH PUBSUB
    PUNSUBSCRIBE QUIT RANDOMKEY RENAME RENAMENX RESET RESTORE ROLE RPOP RPOPLPUSH RPUSH RPUSHX
    SADD SAVE SCAN SCARD SCRIPT SDIFF SDIFFSTORE SELECT SET SETBIT SETEX SETNX SETRANGE
    SHUTDOWN SINTER SINTERSTORE SISMEMBER SLOWLOG SMEMBERS SMISMEMBER SMOVE SORT SPOP
    SRANDMEMBER SREM SSCAN STRLEN SUBSCRIBE SUNION SUNIONSTORE SWAPDB TIME TOUCH TTL TYPE
    UNLINK UNSUBSCRIBE UNWATCH WAIT WATCH XACK XADD XDEL XGROUP XINFO XLEN XPENDING XRANGE
    XREAD XREADGROUP XREVRANGE XTRIM ZADD ZCARD ZCOUNT ZINCRBY ZINTERSTORE ZRANGE ZRANGEBYSCORE
    ZRANK ZREM ZREVRANGE ZREVRANK ZSCAN ZSCORE ZUNIONSTORE
    """.split()  # noqa: SIM905 -- a word list reads better than 190 quoted strings
)

_NAME_CHARS: Final = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-|:"
)
_DIGITS: Final = frozenset(b"0123456789")

# Reply type bytes -> kind names.
_LINE_KINDS: Final = {
    ord("+"): "simple",
    ord("-"): "error",
    ord(":"): "integer",
    ord("_"): "null",
    ord(","): "double",
    ord("#"): "boolean",
    ord("("): "bignumber",
}
_BLOB_KINDS: Final = {ord("$"): "bulk", ord("!"): "error", ord("="): "verbatim"}
# Aggregates: kind name and elements per counted item (maps and attributes count pairs).
_AGG_KINDS: Final = {
    ord("*"): ("array", 1),
    ord("~"): ("set", 1),
    ord(">"): ("push", 1),
    ord("%"): ("map", 2),
    ord("|"): ("attribute", 2),
}
REPLY_TYPE_BYTES: Final = frozenset(_LINE_KINDS) | frozenset(_BLOB_KINDS) | frozenset(_AGG_KINDS)


@dataclass(slots=True)
class RedisCommand:
    """One command seen (at least its name) in a captured request buffer. Read-only by
    convention (not frozen: a frozen dataclass costs about 2.5x as much to build)."""

    name: str
    """The command name, uppercase (``GET``, ``CLIENT``, ``JSON.GET``)."""
    argc: int
    """Arguments after the name, as the array header claims (inline: as counted)."""
    args: tuple[bytes, ...]
    """The first ``MAX_ARGS_KEPT`` arguments that were captured whole, each cut to 64 bytes."""
    complete: bool
    """Every byte of the command was captured."""
    inline: bool = False


@dataclass(slots=True)
class RedisReply:
    """One reply (top-level RESP value) seen in a captured response buffer. Read-only by
    convention, like ``RedisCommand``."""

    kind: str
    """``simple``, ``error``, ``integer``, ``bulk``, ``null``, ``double``, ``boolean``,
    ``bignumber``, ``verbatim``, ``array``, ``set``, ``map``, ``push`` or ``attribute``
    (RESP2 null bulk and null array are ``null``)."""
    complete: bool
    text: str | None = None
    """Simple strings and errors: the line (cut to 256 characters)."""
    items: tuple[RedisReply, ...] = ()
    """Aggregates: their direct elements as far as captured (elements carry no ``items``)."""

    @property
    def error(self) -> str | None:
        """For an error reply, its prefix (``ERR``, ``WRONGTYPE``, ``EXECABORT``)."""
        if self.kind != "error":
            return None
        return error_prefix(self.text or "")

    @property
    def out_of_band(self) -> bool:
        """A RESP3 push or attribute: not the reply to any command."""
        return self.kind in ("push", "attribute")


def error_prefix(message: str) -> str:
    """The error code Redis puts first in an error message; ``ERR`` when there is none."""
    word = message.split(" ", 1)[0]
    if word and len(word) <= 32 and word.isupper() and word.replace("_", "").isalnum():
        return word
    return "ERR"


def _text(raw: bytes) -> str:
    return raw[:_MAX_TEXT_LEN].decode("utf-8", "replace")


def _read_num(data: bytes, pos: int, end: int) -> tuple[int | None, int, bool]:
    """Read the decimal after a type byte at ``pos``: (value, position after CRLF, ok).

    ``value`` None with ok True means the line was cut by the capture; ok False is garbage.
    """
    eol = data.find(b"\r\n", pos, min(end, pos + _MAX_NUM_DIGITS + 3))
    if eol < 0:
        if end - pos > _MAX_NUM_DIGITS + 2:
            return None, end, False
        # Cut by the capture: what there is must still look like a number.
        frag = data[pos:end]
        ok = not frag or frag == b"-" or frag.lstrip(b"-").isdigit() or frag.endswith(b"\r")
        return None, end, ok
    raw = data[pos:eol]
    if raw == b"-1":
        return -1, eol + 2, True
    if not raw or not raw.isdigit() or not raw.isascii():
        return None, eol + 2, False
    return int(raw), eol + 2, True


# -- requests -----------------------------------------------------------------------------------


def looks_like_command(data: bytes) -> bool:
    """Cheap sniff: a RESP array of bulk strings (``*N\\r\\n$``) or a known inline command."""
    if data[:1] == b"*":
        eol = data.find(b"\r\n", 1, _MAX_NUM_DIGITS + 2)
        return eol > 1 and data[1:eol].isdigit() and data[eol + 2 : eol + 3] == b"$"
    line_end = data.find(b"\n", 0, 40)
    head = data[: line_end if line_end >= 0 else 40].split(b" ", 1)[0].rstrip(b"\r")
    return (
        bool(head)
        and (line_end >= 0 or len(data) >= 40 or b" " in data[:40])
        and head.isascii()
        and head.upper().decode("ascii", "replace") in INLINE_COMMANDS
    )


def _name(raw: bytes) -> str | None:
    if not raw or len(raw) > _MAX_NAME_LEN or not _NAME_CHARS.issuperset(raw):
        return None
    return raw.decode("ascii").upper()


def parse_commands(data: bytes) -> list[RedisCommand]:
    """The commands in a captured request buffer, in order.

    A command that runs past the captured bytes is returned with ``complete=False`` (and ends
    the list) when its name was captured, and dropped when not.
    """
    out: list[RedisCommand] = []
    end = len(data)
    pos = 0
    try:
        while pos < end:
            b = data[pos]
            if b == 0x2A:  # '*'
                cmd, pos = _array_command(data, pos, end)
                if cmd is None:
                    break
                out.append(cmd)
                if not cmd.complete:
                    break
            elif b in (0x0D, 0x0A, 0x20):  # blank lines between inline commands
                pos += 1
            else:
                cmd, pos = _inline_command(data, pos, end)
                if cmd is None:
                    break
                out.append(cmd)
                if not cmd.complete:
                    break
    except Exception:  # defensive: the contract is "never raises"
        return out
    return out


def _array_command(data: bytes, pos: int, end: int) -> tuple[RedisCommand | None, int]:
    count, pos, ok = _read_num(data, pos + 1, end)
    if not ok or count is None or count < 1:
        return None, end
    name: str | None = None
    args: list[bytes] = []
    seen = 0
    while seen < count:
        if pos >= end:
            break
        if data[pos] != 0x24:  # '$'
            return (None, end) if name is None else (_cmd(name, count, args, False), end)
        size, body, ok = _read_num(data, pos + 1, end)
        if not ok or size == -1:
            return (None, end) if name is None else (_cmd(name, count, args, False), end)
        if size is None or body + size + 2 > end:
            # Cut by the capture (or a huge length claimed with nothing behind it).
            if name is None and size is not None and body + size <= end:
                name = _name(data[body : body + size])
            if name is None:
                return None, end
            return _cmd(name, count, args, False), end
        if data[body + size : body + size + 2] != b"\r\n":
            return (None, end) if name is None else (_cmd(name, count, args, False), end)
        raw = data[body : body + size]
        if seen == 0:
            name = _name(raw)
            if name is None:
                return None, end
        elif len(args) < MAX_ARGS_KEPT:
            args.append(raw[:_MAX_ARG_KEPT_LEN])
        pos = body + size + 2
        seen += 1
    if name is None:
        return None, end
    return _cmd(name, count, args, seen == count), pos


def _cmd(name: str, count: int, args: list[bytes], complete: bool) -> RedisCommand:
    return RedisCommand(name, count - 1, tuple(args), complete)


def _inline_command(data: bytes, pos: int, end: int) -> tuple[RedisCommand | None, int]:
    eol = data.find(b"\n", pos, min(end, pos + _MAX_INLINE_LEN))
    complete = eol >= 0
    line = data[pos : eol if complete else min(end, pos + _MAX_INLINE_LEN)].rstrip(b"\r")
    parts = _split_inline(line)
    if not parts or (not complete and len(parts) == 1 and not line.endswith((b" ", b"\t"))):
        return None, end  # no command, or its name may be cut ("GET" of "GETRANGE")
    name = _name(parts[0])
    if name is None or name not in INLINE_COMMANDS:
        return None, end
    args = tuple(p[:_MAX_ARG_KEPT_LEN] for p in parts[1 : 1 + MAX_ARGS_KEPT])
    return RedisCommand(name, len(parts) - 1, args, complete, inline=True), (
        eol + 1 if complete else end
    )


def _split_inline(line: bytes) -> list[bytes]:
    """Split an inline command like redis-server does (``sdssplitargs``), approximately:
    whitespace separates, double or single quotes group (quotes are kept off the result)."""
    out: list[bytes] = []
    i, n = 0, len(line)
    while i < n:
        c = line[i]
        if c in b" \t":
            i += 1
            continue
        if c in b"\"'":
            j = i + 1
            while j < n and line[j] != c:
                j += 2 if line[j] == 0x5C and c == 0x22 else 1  # backslash escapes in "..."
            out.append(line[i + 1 : min(j, n)])
            i = j + 1
            continue
        j = i
        while j < n and line[j] not in b" \t":
            j += 1
        out.append(line[i:j])
        i = j
    return out


# -- replies ------------------------------------------------------------------------------------


def parse_replies(data: bytes) -> list[RedisReply]:
    """The top-level replies in a captured response buffer, in order.

    A reply cut by the capture is returned with ``complete=False`` (and ends the list).
    """
    out: list[RedisReply] = []
    end = len(data)
    pos = 0
    try:
        while pos < end:
            reply, pos = _reply(data, pos, end)
            if reply is None:
                break
            out.append(reply)
            if not reply.complete:
                break
    except Exception:  # defensive: the contract is "never raises"
        return out
    return out


def _scalar(data: bytes, pos: int, end: int) -> tuple[RedisReply | None, int, bool]:
    """A non-aggregate value at ``pos``: (record, next position, garbage?).

    The record is None for an aggregate header (the caller handles those).
    """
    t = data[pos]
    kind = _LINE_KINDS.get(t)
    if kind is not None:
        eol = data.find(b"\r\n", pos + 1)
        if eol < 0:
            text = _text(data[pos + 1 : end]) if kind in ("simple", "error") else None
            return RedisReply(kind, False, text), end, False
        text = _text(data[pos + 1 : eol]) if kind in ("simple", "error") else None
        if kind == "null" and eol != pos + 1:
            return None, end, True
        return RedisReply(kind, True, text), eol + 2, False
    kind = _BLOB_KINDS.get(t)
    if kind is not None:
        size, body, ok = _read_num(data, pos + 1, end)
        if not ok:
            return None, end, True
        if size is None:
            return RedisReply(kind, False), end, False
        if size == -1:
            return RedisReply("null", True), body, False
        if body + size + 2 > end:
            text = _text(data[body:end]) if kind == "error" else None
            return RedisReply(kind, False, text), end, False
        if data[body + size : body + size + 2] != b"\r\n":
            return None, end, True
        text = _text(data[body : body + size]) if kind == "error" else None
        return RedisReply(kind, True, text), body + size + 2, False
    return None, pos, t not in _AGG_KINDS


def _reply(data: bytes, pos: int, end: int) -> tuple[RedisReply | None, int]:
    """One top-level value at ``pos``; iterative, so nesting depth costs no recursion."""
    scalar, nxt, garbage = _scalar(data, pos, end)
    if garbage:
        return None, end
    if scalar is not None:
        return scalar, nxt
    kind, per = _AGG_KINDS[data[pos]]
    count, pos, ok = _read_num(data, pos + 1, end)
    if not ok:
        return None, end
    if count is None:
        return RedisReply(kind, False), end
    if count == -1:
        return RedisReply("null", True), pos
    items: list[RedisReply] = []
    # Elements still to read at each open level; the top level is stack[0].
    stack = [count * per]
    while stack:
        if stack[-1] == 0:
            stack.pop()
            continue
        if pos >= end:
            return RedisReply(kind, False, None, tuple(items)), end
        stack[-1] -= 1
        scalar, nxt, garbage = _scalar(data, pos, end)
        if garbage:
            return None, end
        if scalar is not None:
            if len(stack) == 1:
                items.append(scalar)
            if not scalar.complete:
                return RedisReply(kind, False, None, tuple(items)), end
            pos = nxt
            continue
        sub_kind, sub_per = _AGG_KINDS[data[pos]]
        sub_count, pos, ok = _read_num(data, pos + 1, end)
        if not ok:
            return None, end
        if sub_count is None:
            if len(stack) == 1:
                items.append(RedisReply(sub_kind, False))
            return RedisReply(kind, False, None, tuple(items)), end
        if sub_count == -1 or sub_count == 0 or len(stack) >= _MAX_DEPTH:
            if sub_count not in (-1, 0):
                return None, end  # nested deeper than any real reply: garbage
            if len(stack) == 1:
                items.append(RedisReply("null" if sub_count == -1 else sub_kind, True))
            continue
        if len(stack) == 1:
            items.append(RedisReply(sub_kind, True))
        stack.append(sub_count * sub_per)
    return RedisReply(kind, True, None, tuple(items)), pos
