"""The protocols the agent understands beyond HTTP/1.1, in detection order."""

from __future__ import annotations

from kernel_side.assembly import SpanAssembler
from kernel_side.protocols import mysql_spans, postgres_spans, redis_spans

_MODULES = (postgres_spans, mysql_spans, redis_spans)


def register_all(asm: SpanAssembler, *, raw_query_text: bool = False) -> None:
    """Register every protocol's detector and span builder on ``asm``. ``raw_query_text``
    keeps literals in ``db.query.text`` (off by default: queries carry customer data)."""
    postgres_spans.RAW_QUERY_TEXT = raw_query_text
    mysql_spans.RAW_QUERY_TEXT = raw_query_text
    redis_spans.RAW_QUERY_TEXT = raw_query_text
    for mod in _MODULES:
        asm.add_protocol(mod.detect, mod.build)
