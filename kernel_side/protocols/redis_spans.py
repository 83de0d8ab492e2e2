"""Spans for redis exchanges (placeholder until the redis parser lands: detects nothing)."""

from __future__ import annotations

from kernel_side.assembly import SpanAssembler
from kernel_side.events import Exchange


def detect(ex: Exchange) -> bool:
    """Whether ex is redis traffic."""
    return False


def build(asm: SpanAssembler, ex: Exchange) -> None:
    """Turn one redis exchange into spans."""
