"""The protocols the agent understands beyond HTTP/1.1, in detection order."""

from __future__ import annotations

from kernel_side.assembly import SpanAssembler
from kernel_side.protocols import mysql_spans, postgres_spans, redis_spans

_MODULES = (postgres_spans, mysql_spans, redis_spans)


def register_all(asm: SpanAssembler) -> None:
    """Register every protocol's detector and span builder on ``asm``."""
    for mod in _MODULES:
        asm.add_protocol(mod.detect, mod.build)
