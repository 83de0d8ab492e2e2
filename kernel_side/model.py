"""The canonical span record: what span assembly produces and every exporter consumes.

One record type for every protocol. Exporters derive their wire format from it in one place
each; nothing else builds OTLP objects.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

AttrValue = str | int | float | bool


class SpanKind(enum.IntEnum):
    """OTLP ``Span.SpanKind`` numbers."""

    INTERNAL = 1
    SERVER = 2
    CLIENT = 3


class StatusCode(enum.IntEnum):
    """OTLP ``Status.StatusCode`` numbers."""

    UNSET = 0
    OK = 1
    ERROR = 2


@dataclass(frozen=True, slots=True)
class Resource:
    """The resource of one observed process; shared by all its spans (compare by ``key``)."""

    key: tuple[int, int]
    """(host pid, process start time in clock ticks): stable while the process lives."""
    attributes: Mapping[str, AttrValue]


@dataclass(slots=True)
class SpanRecord:
    """One finished span, times in Unix epoch nanoseconds."""

    trace_id: bytes
    span_id: bytes
    parent_span_id: bytes | None
    name: str
    kind: SpanKind
    start_ns: int
    end_ns: int
    resource: Resource
    attributes: dict[str, AttrValue] = field(default_factory=dict)
    status: StatusCode = StatusCode.UNSET
    status_message: str = ""
