"""Optional C writer for OTLP/JSON lines (see ``kernel_side.export.otlp_json``)."""

from collections.abc import Callable, Sequence

from kernel_side.model import Resource, SpanKind, SpanRecord, StatusCode

def configure(
    span_cls: type[SpanRecord],
    resource_cls: type[Resource],
    kind_cls: type[SpanKind],
    status_cls: type[StatusCode],
    status_unset: StatusCode,
    line_py: Callable[[Sequence[SpanRecord]], bytes],
    kv_bytes: Callable[[object, object], bytes],
    envelope: Callable[[], tuple[bytes, bytes]],
    dumps: Callable[[object], bytes],
    /,
) -> None: ...
def otlp_json_line(spans: Sequence[SpanRecord]) -> bytes: ...
def counts() -> tuple[int, int, int]: ...
