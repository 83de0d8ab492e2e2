"""W3C Trace Context ``traceparent`` header: parse and format.

Follows https://www.w3.org/TR/trace-context/ (version ``00``), including its rules for
versions this code does not know yet: a receiver parses the first 55 characters the way it
parses version ``00`` as long as they are followed by ``-`` or the end of the value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

__all__ = ["TraceParent", "format_traceparent", "parse_traceparent"]

_LOWER_HEX: Final = "0123456789abcdef"
_V00_LEN: Final = 55  # "00-" + 32 + "-" + 16 + "-" + 2
# The usual header, a well-formed version 00, checked in one C call; anything else takes the
# general checks below, which decide every other case.
_V00: Final = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16


@dataclass(frozen=True, slots=True)
class TraceParent:
    """A parsed ``traceparent``: 16-byte trace id, 8-byte parent span id, 8-bit flags."""

    trace_id: bytes
    span_id: bytes
    flags: int

    @property
    def sampled(self) -> bool:
        """Whether the caller recorded its span (the ``sampled`` flag, bit 0)."""
        return bool(self.flags & 0x01)


def _is_lower_hex(s: str) -> bool:
    # str.strip with a character set removes every leading/trailing member of that set, so
    # an empty result means every character is lowercase hex, in one C-level pass.
    return bool(s) and not s.strip(_LOWER_HEX)


def parse_traceparent(value: str | None) -> TraceParent | None:
    """Parse a ``traceparent`` header value; ``None`` for anything the W3C rules reject.

    Rejected: wrong length for version ``00``, uppercase or non-hex digits, version ``ff``,
    all-zero trace or span ids, and a future version whose 55th character is followed by
    anything other than ``-``. Never raises.
    """
    if value is None:
        return None
    m = _V00.fullmatch(value)
    if m is not None:
        trace_hex, span_hex, flags_hex = m.groups()
        if trace_hex == _ZERO_TRACE or span_hex == _ZERO_SPAN:
            return None
        return TraceParent(bytes.fromhex(trace_hex), bytes.fromhex(span_hex), int(flags_hex, 16))
    if len(value) < _V00_LEN:
        return None
    version = value[0:2]
    if not _is_lower_hex(version) or version == "ff":
        return None
    if version == "00":
        if len(value) != _V00_LEN:
            return None
    elif len(value) > _V00_LEN and value[_V00_LEN] != "-":
        return None
    if value[2] != "-" or value[35] != "-" or value[52] != "-":
        return None
    trace_hex = value[3:35]
    span_hex = value[36:52]
    flags_hex = value[53:55]
    if not (_is_lower_hex(trace_hex) and _is_lower_hex(span_hex) and _is_lower_hex(flags_hex)):
        return None
    if trace_hex == "0" * 32 or span_hex == "0" * 16:
        return None
    return TraceParent(bytes.fromhex(trace_hex), bytes.fromhex(span_hex), int(flags_hex, 16))


def format_traceparent(tp: TraceParent) -> str:
    """Format as a version ``00`` header value.

    Raises ``ValueError`` when the ids have the wrong size or the flags do not fit a byte:
    such a record is a programming error, and sending it would break the callee's trace.
    """
    if len(tp.trace_id) != 16 or len(tp.span_id) != 8 or not 0 <= tp.flags <= 0xFF:
        raise ValueError(f"not a valid trace context: {tp!r}")
    return f"00-{tp.trace_id.hex()}-{tp.span_id.hex()}-{tp.flags:02x}"
