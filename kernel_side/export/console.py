"""A human-readable terminal view: one line per span."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import TextIO

from kernel_side.export.base import SpanExporter
from kernel_side.model import SpanKind, SpanRecord, StatusCode
from kernel_side.semconv import SERVICE_NAME

logger = logging.getLogger(__name__)

_RESET = "\x1b[0m"
_DIM = "\x1b[2m"
_BOLD = "\x1b[1m"
_KIND_COLOR = {SpanKind.SERVER: "\x1b[36m", SpanKind.CLIENT: "\x1b[35m"}
_STATUS_COLOR = {StatusCode.OK: "\x1b[32m", StatusCode.ERROR: "\x1b[31m"}
_TRACE_ID_PREFIX_HEX = 8


def _use_color(stream: TextIO) -> bool:
    # https://no-color.org: any non-empty NO_COLOR disables color.
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        # Duck-typed streams without isatty, or a stream that is already closed.
        return False


def format_span(span: SpanRecord, *, color: bool = False) -> str:
    """One line: time, service, kind, name, status, duration, business attrs, trace id prefix.

    Business attributes are the ones whose key has no dot (``tenant_id=acme``): semconv and our
    own attributes are always namespaced, so this picks out exactly what ``annotate`` added.
    """
    seconds, nanos = divmod(span.start_ns, 1_000_000_000)
    clock = time.strftime("%H:%M:%S", time.localtime(seconds)) + f".{nanos // 1_000_000:03d}"
    service = str(span.resource.attributes.get(SERVICE_NAME, "?"))
    kind = span.kind.name
    code = span.attributes.get("http.response.status_code")
    status = str(code) if code is not None else span.status.name
    if span.status_message:
        status += f"({span.status_message})"
    duration_ms = max(span.end_ns - span.start_ns, 0) / 1e6
    business = " ".join(f"{k}={v}" for k, v in span.attributes.items() if "." not in k)
    trace = "trace=" + span.trace_id.hex()[:_TRACE_ID_PREFIX_HEX]
    if color:
        clock = _DIM + clock + _RESET
        service = _BOLD + service + _RESET
        kind = _KIND_COLOR.get(span.kind, "") + kind + _RESET
        status = _STATUS_COLOR.get(span.status, "") + status + _RESET
        trace = _DIM + trace + _RESET
    target = span.attributes.get("url.path") or span.attributes.get("url.full")
    name = f"{span.name} {target}" if target and str(target) not in span.name else span.name
    parts = [clock, service, kind, name, status, f"{duration_ms:.2f}ms"]
    if business:
        parts.append(business)
    parts.append(trace)
    return " ".join(parts)


class ConsoleExporter(SpanExporter):
    """Writes :func:`format_span` lines to ``stream``.

    ``color=None`` colors only when ``stream`` is a terminal and ``NO_COLOR`` is unset.
    """

    def __init__(self, stream: TextIO = sys.stdout, color: bool | None = None) -> None:
        self._stream = stream
        self._color = _use_color(stream) if color is None else color
        self._lock = threading.Lock()

    def export(self, spans: Sequence[SpanRecord]) -> bool:
        """Write one line per span in a single write, so concurrent batches never interleave."""
        if not spans:
            return True
        text = "".join(format_span(span, color=self._color) + "\n" for span in spans)
        with self._lock:
            try:
                self._stream.write(text)
                self._stream.flush()
            except (OSError, ValueError) as exc:
                # ValueError: the stream was closed under us (e.g. stdout at interpreter exit).
                logger.warning("console export failed: %s", exc)
                return False
        return True
