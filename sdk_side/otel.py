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

Thread scope only (WSGI servers, thread pools): on an asyncio loop thread the entry follows the
running task and the processor leaves it alone; the agent's spans there are not parented under
SDK spans (see the README).
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


class _Stack(threading.local):
    def __init__(self) -> None:
        # (span id, encoded span) of the spans started and not yet ended on this thread,
        # innermost last.
        self.items: list[tuple[int, bytes]] = []
        # The thread's attribute block last decoded, and its decoding: most spans of a request
        # see the same block.
        self.data: bytes = b""
        self.attrs: dict[str, AttrValue] = {}


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
        self._stack = _Stack()
        self._copy = copy_attributes
        if copy_attributes:
            _writer.set_span_hook(_set_on_current_span)

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        """Make ``span`` the thread's active SDK span."""
        ctx = span.get_span_context()
        if ctx is None or not ctx.is_valid:
            return
        kind = _KINDS.get(span.kind, _abi.SDK_KIND_INTERNAL)
        encoded = ctx.trace_id.to_bytes(16, "big") + ctx.span_id.to_bytes(8, "big") + bytes(
            (kind,))
        stack = self._stack
        if self._copy:
            data = _writer.thread_data()
            if data:
                if data is not stack.data:
                    stack.data, stack.attrs = data, _writer.thread_attributes()
                span.set_attributes(stack.attrs)
        stack.items.append((ctx.span_id, encoded))
        _writer.set_sdk_span(encoded)

    def on_end(self, span: ReadableSpan) -> None:
        """Make the span ``span`` was nested in active again.

        When the outermost span of the thread ends and it is a SERVER span, it stays recorded:
        a WSGI server writes the response after the framework's span has ended, and the agent
        must still see that this request's server span was the SDK's. The kernel clears the
        entry when the next request arrives on the thread.
        """
        ctx = span.get_span_context()
        if ctx is None:
            return
        items = self._stack.items
        for i in range(len(items) - 1, -1, -1):
            if items[i][0] == ctx.span_id:
                del items[i]
                break
        else:
            return  # started on another thread, or before this processor was added
        if items:
            _writer.set_sdk_span(items[-1][1])
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
