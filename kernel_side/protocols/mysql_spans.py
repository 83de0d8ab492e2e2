"""Spans for mysql exchanges (placeholder until the mysql parser lands: detects nothing)."""

from __future__ import annotations

from kernel_side.assembly import SpanAssembler
from kernel_side.events import Exchange


def detect(ex: Exchange) -> bool:
    """Whether ex is mysql traffic."""
    return False


def build(asm: SpanAssembler, ex: Exchange) -> None:
    """Turn one mysql exchange into spans."""
