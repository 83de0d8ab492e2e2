"""Optional C parts of span assembly (see ``kernel_side.assembly``)."""

from collections.abc import Callable

from kernel_side.events import Exchange
from kernel_side.model import AttrValue, Resource, SpanKind, SpanRecord, StatusCode
from kernel_side.protocols.http1 import HttpRequest, HttpResponse

class Ids:
    def __init__(self, salt: bytes) -> None: ...
    def span_id(self, exchange_id: int, index: int = 0, /) -> bytes: ...
    def trace_id(self, exchange_id: int, index: int = 0, /) -> bytes: ...
    def stream_span_id(self, conn_id: int, stream_id: int, /) -> bytes: ...
    def stream_trace_id(self, conn_id: int, stream_id: int, /) -> bytes: ...

def configure(keys: tuple[str, ...], /) -> None: ...
def server_attrs(
    req: HttpRequest,
    resp: HttpResponse | None,
    peer_address: str | None,
    peer_port: int,
    tls: bool,
    local_port: int | None,
    host: str | None,
    truncated: bool,
    ctx_truncated: bool,
    business: dict[str, AttrValue],
    /,
) -> tuple[dict[str, AttrValue], bool] | None: ...

class Decoder:
    def __init__(
        self,
        cls: type[Exchange],
        fields: tuple[tuple[int, int], ...],
        packed_off: int,
        ctx_size: int,
        phase_closed: int,
        format_addr: Callable[[int, bytes], str | None],
        cache: dict[tuple[int, bytes], str | None],
        fallback: Callable[[bytes], Exchange],
        /,
    ) -> None: ...
    def decode_packed(self, data: bytes, /) -> Exchange: ...
def configure_spans(span_cls: type[SpanRecord], kind_server: SpanKind) -> bool: ...
def server_span(
    span_id: bytes,
    name: str,
    start_ns: int,
    end_ns: int,
    resource: Resource,
    attributes: dict[str, AttrValue],
    status: StatusCode,
) -> SpanRecord: ...
