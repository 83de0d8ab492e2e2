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

import importlib
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

# Public name -> the module that defines it, imported on first use.
_LAZY: dict[str, str] = {
    **dict.fromkeys(
        ("annotate", "annotate_connection", "bind_request", "clear", "clear_connection",
         "context", "propagate", "status"),
        "sdk_side._writer",
    ),
    **dict.fromkeys(("current_span_context", "KernelSpanContext"), "sdk_side._spans"),
}


def __getattr__(name: str) -> Any:
    # PEP 562: load the defining module on first use, then bind all its names here so later
    # look-ups are plain module attributes with no indirection on the hot path.
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module 'bridge' has no attribute {name!r}")
    module = importlib.import_module(where)
    for lazy, source in _LAZY.items():
        if source == where:
            globals()[lazy] = getattr(module, lazy)
    return globals()[name]
