"""ebpf-bridge: business context from the application onto the spans an eBPF agent records.

In a request handler::

    import bridge
    bridge.annotate(tenant_id="acme", user_id="u-42", feature_flag="new-checkout")

The attributes land on every span the agent builds for this thread while the request runs.
With no agent on the host every call is a cheap no-op; nothing here raises into the
application except a caller error (an invalid key or an unsupported value type).

Other scopes: ``bridge.asyncio`` (one loop thread, many requests), ``annotate_connection``
(context keyed by socket), ``propagate`` (carry context into a worker thread),
``bind_request`` (name the request's inbound connection, so outgoing calls are parented under
its server span on an event loop; the integrations do it), and the framework integrations in
``sdk_side.integrations``. ``current_span_context`` names the kernel's server span for the
request the thread serves; ``sdk_side.otel`` makes the OpenTelemetry SDK and the agent produce
one trace with one span per operation.

The writer lives in ``sdk_side`` and is imported on first use, so code that only needs the
shared contract (the agent imports ``bridge._abi``) never loads it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bridge._abi import AttrValue
from bridge._status import BridgeStatus

if TYPE_CHECKING:
    from sdk_side._spans import KernelSpanContext, current_span_context
    from sdk_side._writer import (
        annotate,
        annotate_connection,
        bind_request,
        clear,
        clear_connection,
        context,
        propagate,
        status,
    )

__all__ = [
    "AttrValue",
    "BridgeStatus",
    "KernelSpanContext",
    "annotate",
    "annotate_connection",
    "bind_request",
    "clear",
    "clear_connection",
    "context",
    "current_span_context",
    "propagate",
    "status",
]

_LAZY = frozenset(
    {
        "annotate",
        "annotate_connection",
        "bind_request",
        "clear",
        "clear_connection",
        "context",
        "propagate",
        "status",
    }
)


def __getattr__(name: str) -> Any:
    # PEP 562: load the writer on first use, then bind it here so later look-ups are plain
    # module attributes with no indirection on the hot path.
    if name in ("current_span_context", "KernelSpanContext"):
        from sdk_side import _spans

        value = getattr(_spans, name)
        globals()[name] = value
        return value
    if name in _LAZY:
        from sdk_side import _writer

        for lazy in _LAZY:
            globals()[lazy] = getattr(_writer, lazy)
        return globals()[name]
    raise AttributeError(f"module 'bridge' has no attribute {name!r}")
