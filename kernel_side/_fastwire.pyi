"""Optional C OTLP wire encoder (see ``kernel_side.export.otlp_wire``)."""

from collections.abc import Callable, Sequence

from kernel_side.model import SpanKind, SpanRecord, StatusCode

def configure(
    *,
    span_type: type[SpanRecord],
    kind_type: type[SpanKind],
    status_type: type[StatusCode],
    status_unset: StatusCode,
    any_value: Callable[[object], bytes],
    heads: Callable[[SpanRecord], bytes],
) -> None: ...
def encode(spans: Sequence[SpanRecord], scope: bytes, schema: bytes, /) -> bytes | None: ...
