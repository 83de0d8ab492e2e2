"""PostgreSQL frontend/backend protocol (v3): a pure parser from captured bytes to typed records.

The kernel hands over one exchange at a time: the bytes the client sent before the server
answered (possibly cut at the capture limit) and the start of the answer. This module splits
both into messages, finds the commands (simple ``Query`` messages and extended-protocol
``Execute`` messages, with the statement each one runs) and pairs each command with its result
(command tag or ``ErrorResponse`` SQLSTATE).

Linear in the input and never raises: the bytes are untrusted.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

PROTOCOL_3: Final = 196608
SSL_REQUEST: Final = 80877103
GSSENC_REQUEST: Final = 80877104
CANCEL_REQUEST: Final = 80877102

# Message types a client sends after startup (Query, Parse, Bind, Execute, Describe, Close,
# Sync, Flush, Terminate, password/SASL, CopyData/Done/Fail, FunctionCall).
FRONTEND_TYPES: Final = frozenset(b"QPBEDCSHXpdcfF")
# Message types a server sends.
BACKEND_TYPES: Final = frozenset(b"RSKZTDCEN123ntsIGHWdcAvV")

_MAX_LEN: Final = 1 << 30  # the server's own limit on a message
_I32: Final = struct.Struct(">i")
_I16: Final = struct.Struct(">h")
_TWO_I32: Final = struct.Struct(">ii")
_CHR: Final = [chr(i) for i in range(256)]


@dataclass(slots=True)
class Message:
    """One protocol message. ``body`` is what was captured of it; ``complete`` says whether
    that is all of it. Treat as read-only: ``split_messages`` hands the same objects to every
    caller that splits the same bytes. (Not frozen: a frozen dataclass took 260 ns to build
    against 94, and an exchange builds about twenty.)"""

    type: str
    body: bytes
    complete: bool


_last_split: tuple[bytes, frozenset[int], tuple[list[Message], bool]] | None = None


def split_messages(data: bytes, allowed: frozenset[int]) -> tuple[list[Message], bool]:
    """Split typed messages (type byte + int32 length including itself).

    Returns the messages and whether the bytes were well formed up to where they stop (a last
    message cut by the capture is well formed; an unknown type or a bad length is not). The
    list is shared with the next caller that splits the same ``data`` object (detection, then
    parsing, split each exchange's bytes twice): do not modify it.
    """
    global _last_split
    last = _last_split
    if last is not None and last[0] is data and last[1] is allowed:
        return last[2]
    result = _split(data, allowed)
    _last_split = (data, allowed, result)
    return result


def _split(data: bytes, allowed: frozenset[int]) -> tuple[list[Message], bool]:
    out: list[Message] = []
    append = out.append
    unpack = _I32.unpack_from
    pos, n = 0, len(data)
    while pos < n:
        t = data[pos]
        if t not in allowed:
            return out, False
        if pos + 5 > n:
            append(Message(_CHR[t], b"", False))
            return out, True
        (length,) = unpack(data, pos + 1)
        if length < 4 or length > _MAX_LEN:
            return out, False
        end = pos + 1 + length
        # A slice stops at the end of the bytes by itself: a cut last message keeps what came.
        append(Message(_CHR[t], data[pos + 5 : end], end <= n))
        pos = end
    return out, True


@dataclass(frozen=True, slots=True)
class Startup:
    """An untyped first message: a StartupMessage, SSLRequest, GSSENCRequest or CancelRequest."""

    code: int
    params: dict[str, str]


def parse_startup(data: bytes) -> Startup | None:
    """The untyped message at the start of ``data``, if it is one."""
    if len(data) < 8:
        return None
    length, code = _TWO_I32.unpack_from(data, 0)
    if code in (SSL_REQUEST, GSSENC_REQUEST):
        return Startup(code, {}) if length == 8 else None
    if code == CANCEL_REQUEST:
        return Startup(code, {}) if length == 16 else None
    if code != PROTOCOL_3 or not 9 <= length <= 10_000:
        return None
    body = data[8:length]
    parts = body.split(b"\0")
    params: dict[str, str] = {}
    for i in range(0, len(parts) - 1, 2):
        key = parts[i]
        if not key:
            break
        params[key.decode("utf-8", "replace")] = parts[i + 1].decode("utf-8", "replace")
    return Startup(code, params)


def looks_like_frontend(data: bytes, total: int) -> bool:
    """Whether ``data`` (the first bytes of ``total`` a client sent) is PostgreSQL client
    traffic: a startup-family message, or a chain of valid typed messages that ends exactly at
    the end of what was sent (or runs past a capture cut)."""
    if len(data) < 5:
        return False
    if data[0] == 0:
        return parse_startup(data) is not None
    msgs, ok = split_messages(data, FRONTEND_TYPES)
    if not ok or not msgs:
        return False
    if not msgs[-1].complete and len(data) >= total:
        return False  # claims more bytes than the client sent
    return all(_plausible(m) for m in msgs)


def _plausible(m: Message) -> bool:
    if not m.complete:
        return True
    t, body = m.type, m.body
    if t in "SHXc":
        return not body
    if t == "Q":
        return body.endswith(b"\0")
    if t == "E":
        return len(body) >= 5 and body.find(b"\0") == len(body) - 5
    if t in "DC":
        return len(body) >= 2 and body[0] in b"SP" and body.endswith(b"\0")
    return True


# -- client side ---------------------------------------------------------------------------------

Statement = tuple[str, bool]
"""A prepared statement's SQL text and whether the capture cut it."""

Portal = tuple[str | None, bool]
"""What a bound portal runs: its statement's SQL text (None: the statement was prepared before
the capture started) and whether the capture cut it."""


@dataclass(slots=True)
class Command:
    """A message that runs SQL: a simple Query or an Execute."""

    simple: bool
    query: str | None
    """The SQL text when known: a Query's own text, or for an Execute the text of the statement
    its portal was bound to (in this exchange or, through ``portals``, an earlier one)."""
    truncated: bool = False
    group: int = 0


@dataclass(slots=True)
class Frontend:
    """What a client sent in one exchange."""

    startup: Startup | None = None
    commands: list[Command] = field(default_factory=list)
    defined: list[tuple[str, Statement | None]] = field(default_factory=list)
    """Prepared statements defined by Parse (name, (text, truncated)) or dropped by Close
    (name, None), in the order sent."""
    portals: dict[str, Portal] = field(default_factory=dict)
    """The connection's open portals after this exchange: the ones passed in, plus those bound
    here, minus those closed here and the unnamed portal when a Sync followed its use."""
    groups: int = 0
    """Number of result groups: each Query and each Sync ends one (a trailing unsynced
    extended batch is one more)."""
    truncated: bool = False


def _cstr(body: bytes, pos: int) -> tuple[str, int, bool]:
    """A NUL-terminated string at ``pos``: (text, position after it, terminated)."""
    end = body.find(b"\0", pos)
    if end < 0:
        return body[pos:].decode("utf-8", "replace"), len(body), False
    return body[pos:end].decode("utf-8", "replace"), end + 1, True


_NO_STATEMENTS: Final[Mapping[str, Statement]] = {}
_NO_PORTALS: Final[Mapping[str, Portal]] = {}


def parse_frontend(data: bytes, total: int,
                   statements: Mapping[str, Statement] = _NO_STATEMENTS,
                   portals: Mapping[str, Portal] = _NO_PORTALS) -> Frontend:
    """Parse the client's bytes of one exchange (``total`` bytes were sent in all).

    ``statements`` and ``portals`` are what earlier exchanges of the connection prepared and
    bound (neither is modified): an Execute of a portal bound in an earlier round trip (a JDBC
    fetch-size cursor repeats ``Execute(portal, limit)`` after each PortalSuspended) gets its
    text from there, and a portal that is in neither gets no text rather than another
    statement's.
    """
    fe = Frontend(truncated=len(data) < total, portals=dict(portals))
    if data[:1] == b"\0":
        fe.startup = parse_startup(data)
        return fe
    msgs, _ok = split_messages(data, FRONTEND_TYPES)
    parsed: dict[str, Statement | None] = {}  # this exchange's Parse and Close, over statements
    open_portals = fe.portals
    pending: Portal | None = None  # what a Bind not yet executed would run
    extended_open = False

    def statement(name: str) -> Portal:
        known = parsed[name] if name in parsed else statements.get(name)
        return known if known is not None else (None, False)

    for m in msgs:
        t, body = m.type, m.body
        if not m.complete:
            fe.truncated = True
        if t == "Q":
            if extended_open:
                fe.groups += 1
                extended_open = False
            text, _, _ = _cstr(body, 0)
            fe.commands.append(Command(True, text, not m.complete, fe.groups))
            fe.groups += 1
        elif t == "P":
            extended_open = True
            name, pos, _ = _cstr(body, 0)
            text, _, done = _cstr(body, pos)
            stmt = (text, not (m.complete and done))
            parsed[name] = stmt
            fe.defined.append((name, stmt))
            pending = stmt
        elif t == "B":
            extended_open = True
            portal, pos, _ = _cstr(body, 0)
            name, _, _ = _cstr(body, pos)
            pending = open_portals[portal] = statement(name)
        elif t == "E":
            extended_open = True
            portal, _, _ = _cstr(body, 0)
            known, trunc = open_portals.get(portal, (None, False))
            fe.commands.append(Command(False, known, trunc, fe.groups))
            pending = None
        elif t == "S":
            fe.groups += 1
            extended_open = False
            # The unnamed portal lasts at most to the end of its transaction; dropping it at
            # Sync can lose a text, never attach a wrong one.
            open_portals.pop("", None)
        elif t == "C" and body[:1] in b"SP":
            name, _, _ = _cstr(body, 1)
            if body[:1] == b"S":
                parsed[name] = None
                fe.defined.append((name, None))
            else:
                open_portals.pop(name, None)
        elif t in "DCH":
            extended_open = True
    if fe.truncated and pending is not None:
        # The Execute is past the capture: the statement still ran.
        fe.commands.append(Command(False, pending[0], True, fe.groups))
    if extended_open:
        fe.groups += 1
    return fe


# -- server side ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Result:
    """The outcome of one command, as far as the captured response shows it."""

    tag: str | None = None
    """Command tag of CommandComplete (``SELECT 1``, ``INSERT 0 2``...)."""
    sqlstate: str | None = None
    """SQLSTATE of an ErrorResponse."""
    message: str | None = None
    skipped: bool = False
    """An earlier command of the same batch failed, so the server never ran this one."""


def error_fields(body: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse body, by their one-letter codes."""
    out: dict[str, str] = {}
    pos, n = 0, len(body)
    while pos < n and body[pos] != 0:
        code = chr(body[pos])
        text, pos, _ = _cstr(body, pos + 1)
        out[code] = text
    return out


def last_ready_status(response: bytes) -> str | None:
    """Transaction status of the last complete ReadyForQuery in ``response`` (``I`` idle,
    ``T`` in a transaction, ``E`` in a failed one), None when none was captured."""
    msgs, _ok = split_messages(response, BACKEND_TYPES)
    for m in reversed(msgs):
        if m.type == "Z" and m.complete and len(m.body) == 1:
            return chr(m.body[0])
    return None


def match_results(fe: Frontend, response: bytes) -> list[Result | None]:
    """Pair each of ``fe.commands`` with its result in ``response`` (None: not captured)."""
    results: list[Result | None] = [None] * len(fe.commands)
    if not fe.commands:
        return results
    msgs, _ok = split_messages(response, BACKEND_TYPES)
    by_group: dict[int, list[int]] = {}
    for i, cmd in enumerate(fe.commands):
        by_group.setdefault(cmd.group, []).append(i)
    group = 0
    j = 0  # position among the current group's commands
    failed = False
    for m in msgs:
        if not m.complete:
            break
        t = m.type
        members = by_group.get(group, [])
        if t == "Z":
            if failed:
                for k in members[j:]:
                    if results[k] is None:
                        results[k] = Result(skipped=True)
            group += 1
            j = 0
            failed = False
            continue
        if j >= len(members):
            continue
        idx = members[j]
        if t == "E":
            f = error_fields(m.body)
            results[idx] = Result(sqlstate=f.get("C"), message=f.get("M"))
            failed = True
            j += 1
        elif t in "CIs":
            tag = _cstr(m.body, 0)[0] if t == "C" else None
            prev = results[idx]
            if fe.commands[idx].simple:
                # A simple query may hold several statements: keep the first error, else the
                # last tag; it ends at ReadyForQuery.
                if prev is None or prev.sqlstate is None:
                    results[idx] = Result(tag=tag)
            else:
                results[idx] = Result(tag=tag)
                j += 1
        if fe.commands[idx].simple and t == "E":
            j -= 1  # the Query's group still ends at its ReadyForQuery
    return results
