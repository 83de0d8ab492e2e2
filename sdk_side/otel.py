"""Coexistence with the OpenTelemetry SDK: one trace, one span per operation.

Add the processor to the app's tracer provider::

    from opentelemetry.sdk.trace import TracerProvider
    from sdk_side.otel import BridgeSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(BridgeSpanProcessor())

On every span start and end it writes the SDK span that is active on the thread (trace id,
span id, kind) into the thread's context entry. The agent then parents the spans it builds from
syscalls under that SDK span, and drops its own span where an SDK span of the same kind already
covers the operation (its server span inside an SDK server span, its client span inside an SDK
client span). Spans the SDK does not make (a database call with no instrumentation, say) stay,
nested under the SDK span that was active. ``bridge.annotate`` also sets its attributes on the
active SDK span, and SDK spans started later in the request get the thread's business
attributes, so they carry the same context as the agent's spans.

The other direction: where the app has no SDK server span (it uses the SDK only for a few
business spans), ``kernel_context()`` is the kernel's server span as an OpenTelemetry parent
context, so a manual span nests under it and the whole request is one trace::

    with tracer.start_as_current_span("price-check", context=kernel_context()):
        ...

Scoped like ``bridge.annotate``: per thread (WSGI servers), and per task on an asyncio loop,
where the active SDK span becomes part of the task's context that the step hook writes
whenever the task runs (install the hook: ``bridge.asyncio.install()`` or the ASGI middleware).
"""

from __future__ import annotations

import threading

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

from bridge import _abi
from bridge._abi import AttrValue
from sdk_side import _spans, _writer

_KINDS: dict[SpanKind, int] = {
    SpanKind.INTERNAL: _abi.SDK_KIND_INTERNAL,
    SpanKind.SERVER: _abi.SDK_KIND_SERVER,
    SpanKind.CLIENT: _abi.SDK_KIND_CLIENT,
    SpanKind.PRODUCER: _abi.SDK_KIND_PRODUCER,
    SpanKind.CONSUMER: _abi.SDK_KIND_CONSUMER,
}


class _Decoded(threading.local):
    def __init__(self) -> None:
        # The thread's attribute block last decoded, and its decoding: most spans of a request
        # see the same block.
        self.data: bytes = b""
        self.attrs: dict[str, AttrValue] = {}


_MAX_LIVE = 100_000


def _set_on_current_span(attrs: dict[str, AttrValue]) -> None:
    # Raise for a caller error exactly as annotate would, before anything is written.
    for k, v in attrs.items():
        _abi.check_attr(k, v)
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes(attrs)


class BridgeSpanProcessor(SpanProcessor):
    """Writes the active SDK span into the thread's context entry (see the module docstring).

    ``copy_attributes``: set ``bridge.annotate`` attributes on the active SDK span too, and
    give SDK spans started later in the request the thread's business attributes.
    """

    def __init__(self, *, copy_attributes: bool = True) -> None:
        # Encoded spans started and not yet ended, by span id: when a span ends, its parent
        # (if it is one of these) becomes the active one again. By parent rather than by a
        # per-thread stack, so it holds for asyncio tasks that interleave on one thread.
        self._live: dict[int, bytes] = {}
        self._decoded = _Decoded()
        self._copy = copy_attributes
        if copy_attributes:
            _writer.set_span_hook(_set_on_current_span)

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        """Make ``span`` the thread's active SDK span."""
        if not _writer.reachable():
            return  # no agent: nothing to tell it (the pin is re-checked once a second)
        ctx = span.get_span_context()
        if ctx is None or not ctx.is_valid:
            return
        kind = _KINDS.get(span.kind, _abi.SDK_KIND_INTERNAL)
        encoded = ctx.trace_id.to_bytes(16, "big") + ctx.span_id.to_bytes(8, "big") + bytes(
            (kind,))
        if self._copy:
            data = _writer.thread_data()
            if data:
                dec = self._decoded
                if data is not dec.data:
                    dec.data, dec.attrs = data, _writer.thread_attributes()
                span.set_attributes(dec.attrs)
        live = self._live
        if len(live) >= _MAX_LIVE:
            live.clear()  # spans that never end must not grow this without bound
        live[ctx.span_id] = encoded
        _writer.set_sdk_span(encoded)

    def on_end(self, span: ReadableSpan) -> None:
        """Make the span ``span`` was nested in active again.

        When the outermost span of the thread ends and it is a SERVER span, it stays recorded:
        a WSGI server writes the response after the framework's span has ended, and the agent
        must still see that this request's server span was the SDK's. The kernel clears the
        entry when the next request arrives on the thread.
        """
        ctx = span.get_span_context()
        if ctx is None or self._live.pop(ctx.span_id, None) is None:
            return  # not started through this processor
        parent = span.parent
        outer = self._live.get(parent.span_id) if parent is not None else None
        if outer is not None:
            _writer.set_sdk_span(outer)
        elif span.kind is not SpanKind.SERVER:
            _writer.set_sdk_span(b"")

    def shutdown(self) -> None:
        """Stop copying annotate attributes onto SDK spans."""
        if self._copy:
            _writer.set_span_hook(None)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Nothing is buffered here."""
        return True



def kernel_context(traceparent: str | None = None) -> Context | None:
    """The kernel's server span for the request this thread serves, as a parent context for
    ``tracer.start_as_current_span(..., context=...)``; None when the agent does not know it
    (then the SDK's default, the current context, applies). ``traceparent``: the request's
    incoming header, if any (see ``bridge.current_span_context``)."""
    ksc = _spans.current_span_context(traceparent)
    if ksc is None:
        return None
    parent = SpanContext(
        trace_id=int.from_bytes(ksc.trace_id, "big"),
        span_id=int.from_bytes(ksc.span_id, "big"),
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    return trace.set_span_in_context(NonRecordingSpan(parent))
