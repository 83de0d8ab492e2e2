"""HTTP/1.x parser for captured exchanges: bytes in, typed records out.

The agent captures, per exchange, the first bytes of each direction and the total byte count
of each direction. A request buffer may therefore hold several pipelined requests, a request
whose head or body was cut by the capture, or a request followed by part of its body; the
response buffer likewise. This module turns such a buffer into one record per message it can
see the start of.

Contract: pure functions, never raise on any input, linear time in ``len(data)``. The hot path
sticks to ``bytes.find``/``partition``/``split`` (C loops) rather than per-byte Python or
regular expressions, and only the handful of headers the agent uses are looked up.

Framing follows RFC 9112 section 6.3: ``Transfer-Encoding: chunked`` wins over
``Content-Length``; requests without either have no body; responses to HEAD, 1xx, 204 and 304
have no body; a response without either is delimited by the connection close, so its body is
the rest of what the server sent in the exchange.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from kernel_side import _accel

__all__ = [
    "ACCELERATED",
    "MAX_VALUE_LEN",
    "METHODS",
    "HttpRequest",
    "HttpResponse",
    "looks_like_request",
    "looks_like_request_py",
    "looks_like_response",
    "parse_requests",
    "parse_requests_py",
    "parse_responses",
    "parse_responses_py",
    "route_heuristic",
]

METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
"""Request methods recognised (RFC 9110 section 9 plus PATCH); case-sensitive."""

MAX_VALUE_LEN: Final = 1024
"""Longest string stored in a record (characters); longer values are cut to this."""

_METHOD_NAMES: Final = {m.encode(): m for m in METHODS}
_METHOD_BYTES: Final = frozenset(_METHOD_NAMES)
# "HTTP/1.<digit>" -> "1.<digit>": a dict lookup validates and converts in one step.
_VERSIONS: Final = {f"HTTP/1.{d}".encode(): f"1.{d}" for d in range(10)}
_MAX_METHOD_LEN: Final = max(len(m) for m in METHODS)
# Above 2**53 a length cannot be an attribute value that every OTLP consumer reads exactly
# (JSON numbers), and no real body is that large: treat it as garbage, not as a size.
_MAX_LENGTH: Final = 2**53
_DIGITS: Final = b"0123456789"
_HEX_DIGITS: Final = b"0123456789abcdefABCDEF"
_HEX_CHARS: Final = "0123456789abcdefABCDEF"
_B64_CHARS: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_=.~"
# Statuses whose responses never carry a body, whatever their headers say.
_NO_BODY_STATUSES: Final = frozenset({204, 304})

# Header lookups search the lowercased header block for "\n<name>:". The block starts at the
# newline that ends the start line, so the first header matches too; obs-fold continuation
# lines start with whitespace and so never match.
_H_HOST: Final = b"\nhost:"
_H_TRACEPARENT: Final = b"\ntraceparent:"
_H_USER_AGENT: Final = b"\nuser-agent:"
_H_XFF: Final = b"\nx-forwarded-for:"
_H_CONTENT_LENGTH: Final = b"\ncontent-length:"
_H_TRANSFER_ENCODING: Final = b"\ntransfer-encoding:"


@dataclass(slots=True)
class HttpRequest:
    """One HTTP/1.x request seen (at least partly) in a captured request buffer."""

    method: str
    target: str
    """The request target as sent (origin, absolute, authority or asterisk form)."""
    path: str
    query: str | None
    """Text after ``?``; ``None`` when the target has no ``?``."""
    version: str
    """``"1.1"``, ``"1.0"``; ``""`` when the capture cut the request line before it."""
    host: str | None
    traceparent: str | None
    """The raw header value; ``None`` when absent or sent more than once."""
    user_agent: str | None
    x_forwarded_for: str | None
    body_size: int | None
    """From Content-Length, or summed chunk sizes when the whole chunked body was captured."""
    chunked: bool
    head_complete: bool
    """The whole header block (through its empty line) is inside the capture."""
    offset: int
    """Where this message starts in the captured buffer."""
    length: int | None
    """Total length of the message (head + framed body) when known."""


@dataclass(slots=True)
class HttpResponse:
    """One HTTP/1.x response seen (at least partly) in a captured response buffer."""

    status: int
    reason: str
    version: str
    body_size: int | None
    """Bytes of body this message carries: 0 for HEAD, 1xx, 204 and 304 responses."""
    chunked: bool
    head_complete: bool
    offset: int
    length: int | None

    @property
    def informational(self) -> bool:
        """An interim 1xx response (``100 Continue``, ``103 Early Hints``) that precedes the
        final one. ``101 Switching Protocols`` is final: it ends HTTP on the connection."""
        return 100 <= self.status < 200 and self.status != 101


def looks_like_request_py(data: bytes) -> bool:
    """Cheap sniff: a known method token followed by a space at the very start (the reference
    for ``_fasthttp.looks_like_request``; ``looks_like_request`` is whichever is in use)."""
    sp = data.find(b" ", 0, _MAX_METHOD_LEN + 1)
    return sp > 0 and data[:sp] in _METHOD_BYTES


def looks_like_response(data: bytes) -> bool:
    """Cheap sniff: ``HTTP/1.<digit> <3-digit status>`` at the very start."""
    return (
        data[:7] == b"HTTP/1."
        and data[7:8].isdigit()
        and data[8:9] == b" "
        and len(data) >= 12
        and data[9:12].isdigit()
    )


def _text(raw: bytes) -> str:
    # UTF-8 with replacement never raises and keeps attribute values valid UTF-8 for OTLP;
    # bounding the bytes first bounds the work on hostile input.
    if len(raw) <= MAX_VALUE_LEN:
        return raw.decode("utf-8", "replace")
    return raw[:MAX_VALUE_LEN].decode("utf-8", "replace")[:MAX_VALUE_LEN]


def _skip_blank_lines(data: bytes, pos: int, end: int) -> int:
    # RFC 9112 section 2.2: a server should ignore empty lines before a request line (some
    # clients send an extra CRLF after a POST body). Bounded by ``end``, so linear overall.
    while pos < end and data[pos] in b"\r\n":
        pos += 1
    return pos


def _find_head_end(data: bytes, pos: int, absent: list[bool]) -> tuple[int, int]:
    """Find the empty line ending the head that starts at ``pos``.

    Returns (end of the last header line incl. its LF, end of the head), or (-1, -1).
    Both ``\\n\\r\\n`` and a bare ``\\n\\n`` end a head. The bare-LF search is bounded by
    the CRLF match, and ``absent`` remembers a pattern that has no match at or after an
    earlier ``pos`` (so none after any later one): every byte is scanned a bounded number of
    times across a whole pipeline, which keeps parsing linear.
    """
    crlf = -1 if absent[0] else data.find(b"\n\r\n", pos)
    if crlf >= 0:
        lf = data.find(b"\n\n", pos, crlf + 1)
        if lf < 0:
            return crlf + 1, crlf + 3
        return lf + 1, lf + 2
    absent[0] = True
    lf = -1 if absent[1] else data.find(b"\n\n", pos)
    if lf < 0:
        absent[1] = True
        return -1, -1
    return lf + 1, lf + 2


class _Head:
    """The located start line and header block of one message."""

    __slots__ = ("block", "complete", "end", "line", "line_complete", "lower")

    def __init__(
        self, line: bytes, line_complete: bool, block: bytes, complete: bool, end: int
    ) -> None:
        self.line = line
        self.line_complete = line_complete
        # The block keeps the LF that ends the start line, so every header line, the first
        # included, is preceded by "\n" (see the _H_* patterns).
        self.block = block
        self.lower = block.lower()
        self.complete = complete
        self.end = end

    def first(self, name: bytes) -> bytes | None:
        """First value of header ``name``, whitespace-trimmed, original case."""
        i = self.lower.find(name)
        if i < 0:
            return None
        start = i + len(name)
        return self.block[start : self.block.find(b"\n", start)].strip(b" \t\r")

    def all(self, name: bytes, lower: bool = False) -> list[bytes]:
        """Every value of header ``name`` in order (lowercased if asked: framing tokens)."""
        src = self.lower if lower else self.block
        values: list[bytes] = []
        i = self.lower.find(name)
        while i >= 0:
            start = i + len(name)
            end = self.lower.find(b"\n", start)
            values.append(src[start:end].strip(b" \t\r"))
            i = self.lower.find(name, end)
        return values


def _locate_head(data: bytes, pos: int, absent: list[bool]) -> _Head:
    """Locate the start line and header block of the message that starts at ``pos``.

    A head cut by the capture keeps only its whole lines: a header line without its LF may be
    a truncated value (a Content-Length of ``12`` that was ``1234``), so it is dropped.
    """
    block_end, head_end = _find_head_end(data, pos, absent)
    complete = head_end >= 0
    if not complete:
        block_end = data.rfind(b"\n", pos) + 1
        if block_end == 0:
            # Not even the start line ended inside the capture.
            return _Head(data[pos:], False, b"", False, len(data))
        head_end = len(data)
    line_end = data.find(b"\n", pos, block_end)
    return _Head(data[pos:line_end], True, data[line_end:block_end], complete, head_end)


def _parse_content_length(values: list[bytes]) -> int | None:
    """The one length all Content-Length values agree on, else ``None`` (bogus)."""
    length: int | None = None
    for value in values:
        # "5, 5" is a legal list of one repeated length (RFC 9110 section 8.6).
        for item in value.split(b","):
            item = item.strip(b" \t")
            if not item or item.translate(None, _DIGITS) or len(item) > 16:
                return None
            n = int(item)
            if n > _MAX_LENGTH or (length is not None and n != length):
                return None
            length = n
    return length


def _walk_chunks(data: bytes, pos: int) -> tuple[int, int] | None:
    """Walk a chunked body starting at ``pos``.

    Returns (sum of chunk sizes, end of the message after the trailer section), or ``None``
    when the walk leaves the buffer or the framing is invalid. Each step moves forward by at
    least one line, so the walk is linear in the buffer.
    """
    total = 0
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            return None
        size_field = data[pos:nl].partition(b";")[0].strip(b" \t\r")
        if not size_field or size_field.translate(None, _HEX_DIGITS) or len(size_field) > 14:
            return None
        size = int(size_field, 16)
        pos = nl + 1
        if size == 0:
            break
        total += size
        if total > _MAX_LENGTH:
            return None
        pos += size
        if data.startswith(b"\r\n", pos):
            pos += 2
        elif data.startswith(b"\n", pos):
            pos += 1
        else:
            # Past the end: the body continues beyond the capture. Inside: broken framing.
            return None
    # Trailer section: header lines up to an empty line.
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            return None
        empty = nl == pos or (nl == pos + 1 and data[pos] == 0x0D)
        pos = nl + 1
        if empty:
            return total, pos


_Framing = tuple[bool, int | None, int | None]
"""(chunked, body size, end of message in the buffer); ``None`` members are unknown."""


def _body_framing(data: bytes, head: _Head) -> _Framing | None:
    """How the body after ``head`` is framed; ``None`` when no length frames it.

    ``None`` covers both "no Content-Length nor Transfer-Encoding" and "Transfer-Encoding
    whose final coding is not chunked"; requests and responses treat those differently.
    A bogus Content-Length yields an unknown size and end, which stops pipelining.
    """
    lower = head.lower
    # Most messages have neither header: `in` answers that without building lists.
    if _H_TRANSFER_ENCODING in lower:
        te = head.all(_H_TRANSFER_ENCODING, lower=True)
        # Only a final "chunked" coding frames the body; it overrides Content-Length.
        if te[-1].rsplit(b",", 1)[-1].strip(b" \t") != b"chunked":
            return None
        walked = _walk_chunks(data, head.end) if head.complete else None
        if walked is None:
            return True, None, None
        return True, walked[0], walked[1]
    i = lower.find(_H_CONTENT_LENGTH)
    if i < 0:
        return None
    start = i + len(_H_CONTENT_LENGTH)
    if lower.find(_H_CONTENT_LENGTH, start) < 0:
        # One plain decimal Content-Length, the usual case: no lists to build.
        value = lower[start : lower.find(b"\n", start)].strip(b" \t\r")
        if value.isdigit() and len(value) <= 16:
            single = int(value)
            if single <= _MAX_LENGTH:
                return False, single, head.end + single if head.complete else None
    length = _parse_content_length(head.all(_H_CONTENT_LENGTH, lower=True))
    if length is None:
        return False, None, None
    return False, length, head.end + length if head.complete else None


def _split_target(target: str) -> tuple[str, str | None, str | None]:
    """Split a request target into (path, query, authority from absolute form)."""
    authority: str | None = None
    rest = target
    if target[:1] != "/":
        scheme, sep, after = target.partition("://")
        if sep and scheme.lower() in ("http", "https"):
            authority, slash, path = after.partition("/")
            rest = slash + path if slash else "/"
            # "?" may directly follow the authority: "http://h?q".
            if "?" in authority:
                authority, _, q = authority.partition("?")
                rest = "/?" + q
    path, qmark, query = rest.partition("?")
    return path, query if qmark else None, authority


def _parse_request_line(line: bytes, complete: bool) -> tuple[str, str, str] | None:
    """(method, target, version) or ``None``; a line cut by the capture may lack parts."""
    parts = line.split()
    if not parts or parts[0] not in _METHOD_BYTES:
        return None
    if complete:
        if len(parts) != 3:
            return None
        version = _VERSIONS.get(parts[2])
        if version is None:
            return None
        return _METHOD_NAMES[parts[0]], _text(parts[1]), version
    # Cut mid-line: keep method and (possibly partial) target, but only if what follows the
    # target could still become a version; anything else is not HTTP/1.
    if len(parts) == 2 or (len(parts) == 3 and b"HTTP/1.".startswith(parts[2][:7])):
        version_text = _VERSIONS.get(parts[2], "") if len(parts) == 3 else ""
        return _METHOD_NAMES[parts[0]], _text(parts[1]), version_text
    return None


def parse_requests_py(data: bytes, total_len: int) -> list[HttpRequest]:
    """Parse every request that starts inside a captured request buffer.

    ``total_len`` is how many bytes the direction carried in this exchange (at least
    ``len(data)``); it tells a request line cut by the capture from a malformed one.
    Pipelined requests are parsed one after another while the previous one's length is known
    and the next one starts inside the buffer. Returns ``[]`` for anything that is not
    HTTP/1.x; never raises.
    """
    n = len(data)
    truncated = total_len > n
    absent = [False, False]
    out: list[HttpRequest] = []
    # The common shapes are inlined below (this runs for every exchange); anything unusual
    # takes the general helpers, which decide exactly as before.
    pos = _skip_blank_lines(data, 0, n) if n and data[0] in b"\r\n" else 0
    while pos < n:
        # looks_like_request, without slicing the buffer.
        sp = data.find(b" ", pos, pos + _MAX_METHOD_LEN + 1)
        if sp <= pos or data[pos:sp] not in _METHOD_BYTES:
            break
        head = _locate_head(data, pos, absent)
        if head.line_complete:
            parts = head.line.split()
            if len(parts) != 3 or parts[0] not in _METHOD_BYTES:
                break
            version = _VERSIONS.get(parts[2])
            if version is None:
                break
            raw_target = parts[1]
            method = _METHOD_NAMES[parts[0]]
            target = (raw_target.decode("utf-8", "replace") if len(raw_target) <= MAX_VALUE_LEN
                      else _text(raw_target))
        elif not truncated:
            break
        else:
            parsed = _parse_request_line(head.line, False)
            if parsed is None:
                break
            method, target, version = parsed
        if target[:1] == "/":
            path, qmark, query_text = target.partition("?")
            query = query_text if qmark else None
            authority = None
        else:
            path, query, authority = _split_target(target)
        lower = head.lower
        if _H_TRANSFER_ENCODING not in lower and _H_CONTENT_LENGTH not in lower:
            # No body framing: a complete head ends the request; a cut one may have lost
            # its Content-Length.
            chunked = False
            if head.complete:
                body_size: int | None = 0
                end: int | None = head.end
            else:
                body_size = end = None
        else:
            framing = _body_framing(data, head)
            if framing is None:
                # Transfer-Encoding without a final chunked: RFC 9112 6.3 makes this a 400;
                # the length is unknowable.
                framing = (False, None, None)
            chunked, body_size, end = framing
        host = head.first(_H_HOST)
        traceparent = head.first(_H_TRACEPARENT)
        if traceparent is not None and lower.count(_H_TRACEPARENT) > 1:
            # W3C trace context: more than one traceparent makes the context invalid.
            traceparent = None
        user_agent = head.first(_H_USER_AGENT)
        # Repeated X-Forwarded-For headers form one list (RFC 9110 section 5.3).
        xff = b", ".join(head.all(_H_XFF)) if _H_XFF in lower else None
        out.append(
            HttpRequest(
                method,
                target,
                path,
                query,
                version,
                _text(host) if host is not None else authority,
                _text(traceparent) if traceparent is not None else None,
                _text(user_agent) if user_agent is not None else None,
                _text(xff) if xff is not None else None,
                body_size,
                chunked,
                head.complete,
                pos,
                end - pos if end is not None else None,
            )
        )
        if end is None:
            break
        pos = _skip_blank_lines(data, end, n) if end < n and data[end] in b"\r\n" else end
    return out


def parse_responses_py(
    data: bytes, total_len: int, request_methods: Sequence[str] = ()
) -> list[HttpResponse]:
    """Parse every response that starts inside a captured response buffer.

    ``request_methods`` are the methods of the exchange's requests in order; the i-th final
    (non-interim) response answers the i-th request, which matters for HEAD (no body) and
    CONNECT (a 2xx turns the connection into a tunnel). Interim 1xx responses are returned
    too, marked ``informational``. A response framed by neither Content-Length nor chunked
    ends at the connection close, so its body is the rest of ``total_len``. Returns ``[]``
    for anything that is not HTTP/1.x; never raises.
    """
    n = len(data)
    total_len = max(total_len, n)
    truncated = total_len > n
    absent = [False, False]
    out: list[HttpResponse] = []
    final_index = 0
    pos = 0
    while pos < n and looks_like_response(data[pos : pos + 12]):
        head = _locate_head(data, pos, absent)
        if not head.line_complete and not truncated:
            break
        version = _VERSIONS.get(head.line[:8])
        if version is None:
            break
        _, _, rest = head.line.partition(b" ")
        status_tok, _, reason = rest.partition(b" ")
        if len(status_tok.rstrip(b"\r")) != 3:
            break
        status = int(status_tok[:3])
        if status < 100:
            break
        interim = 100 <= status < 200 and status != 101
        method = ""
        if not interim:
            if final_index < len(request_methods):
                method = request_methods[final_index]
            final_index += 1
        # After 101 or a successful CONNECT the connection carries another protocol.
        tunnel = status == 101 or (method == "CONNECT" and 200 <= status < 300)
        framing: _Framing | None
        if interim or tunnel or status in _NO_BODY_STATUSES or method == "HEAD":
            framing = (False, 0, head.end if head.complete else None)
        else:
            framing = _body_framing(data, head)
        if framing is None:
            # Delimited by close: everything else this exchange carried is body.
            tunnel = True
            if head.complete:
                framing = (False, total_len - head.end, total_len)
            else:
                framing = (False, None, None)
        chunked, body_size, end = framing
        out.append(
            HttpResponse(
                status,
                _text(reason.strip(b" \t\r")),
                version,
                body_size,
                chunked,
                head.complete,
                pos,
                end - pos if end is not None else None,
            )
        )
        if end is None or tunnel:
            break
        pos = end
    return out


# The parsers the agent calls: the C ones from kernel_side._fasthttp when it is built (it
# parses the common heads itself and hands every other buffer to the *_py function, so the
# rare rules exist once), else the pure-Python ones above. EBPF_BRIDGE_NO_ACCEL=1 selects
# the pure-Python ones, as it does for the SDK's accelerator.
looks_like_request: Callable[[bytes], bool] = looks_like_request_py
parse_requests: Callable[[bytes, int], list[HttpRequest]] = parse_requests_py
parse_responses: Callable[..., list[HttpResponse]] = parse_responses_py
ACCELERATED = False
"""Whether ``parse_requests``/``parse_responses`` are the C parsers."""
_fasthttp = _accel.load("_fasthttp")
if _fasthttp is not None:
    _fasthttp.configure(HttpRequest, HttpResponse, parse_requests_py, parse_responses_py)
    looks_like_request = _fasthttp.looks_like_request
    parse_requests = _fasthttp.parse_requests
    parse_responses = _fasthttp.parse_responses
    ACCELERATED = True


def _fold_segment(seg: str) -> bool:
    """Whether a path segment looks like an identifier rather than a route word."""
    n = len(seg)
    if n == 0:
        return False
    if seg.isdigit():
        return True
    if n == 36 and seg[8] == "-" and seg[13] == "-" and seg[18] == "-" and seg[23] == "-":
        return _is_hex(seg.replace("-", ""))
    has_digit = any(c.isdigit() for c in seg)
    if not has_digit:
        # Words, slugs and camelCase names ("orders", "my-post", "getUser") stay.
        return False
    if n >= 8 and _is_hex(seg):
        return True
    # Long base64/base64url-ish tokens with digits (opaque ids, tokens).
    return n >= 16 and not seg.strip(_B64_CHARS)


def _is_hex(s: str) -> bool:
    # str.strip with a set of characters empties the string iff every character is in it.
    return bool(s) and not s.strip(_HEX_CHARS)


def route_heuristic(path: str) -> str:
    """Fold identifier-like path segments into ``*`` to get a low-cardinality route.

    Folded: all-digit segments, UUIDs, hex tokens of 8+ characters with a digit, and
    base64-ish tokens of 16+ characters with a digit. Words and slugs stay, so
    ``/orders/123/items/9f8e7d6c5b4a`` becomes ``/orders/*/items/*``.
    """
    if not path:
        return "/"
    segments = path.split("/")
    return "/".join("*" if _fold_segment(s) else s for s in segments)
