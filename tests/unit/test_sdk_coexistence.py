"""Agent side of OpenTelemetry SDK coexistence: exchanges whose context names an SDK span."""

from __future__ import annotations

from bridge import _abi
from kernel_side import semconv
from kernel_side.assembly import IdSource
from kernel_side.model import SpanKind
from sdk_side._spans import KernelSpanContext
from tests.unit.test_assembly import SALT, T0, assembler, client_ex, make_ex

SDK_TRACE = bytes.fromhex("0af7651916cd43dd8448eb211c80319c")
SDK_SPAN = bytes.fromhex("b7ad6b7169203331")


def ctx(kind: int, trace: bytes = SDK_TRACE, span: bytes = SDK_SPAN, **attrs: str) -> bytes:
    enc = _abi.encode_attrs(attrs)
    head = _abi.CTX_VALUE_HEADER.pack(_abi.ABI_VERSION, enc.count, _abi.CTX_F_SDK_SPAN,
                                      len(enc.data), 0, trace, span, kind)
    return head + enc.data.ljust(_abi.ATTR_BYTES, b"\0")


REQ = b"GET /stock/1 HTTP/1.1\r\nHost: inv:8082\r\n\r\n"


def test_server_covered_by_sdk_server_span_is_dropped_and_children_join_it() -> None:
    asm, out = assembler()
    asm.on_exchange(make_ex(exchange_id=10, ctx=ctx(_abi.SDK_KIND_SERVER, tenant_id="acme")))
    assert out == [] and asm.stats.sdk_covered == 1
    # A child with no SDK span of its own (an uninstrumented call) joins the SDK server span.
    asm.on_exchange(client_ex(REQ, exchange_id=11, parent_exchange_id=10))
    (child,) = out
    assert (child.trace_id, child.parent_span_id) == (SDK_TRACE, SDK_SPAN)


def test_waiting_child_is_released_under_the_sdk_server_span() -> None:
    asm, out = assembler()
    asm.on_exchange(client_ex(REQ, exchange_id=21, parent_exchange_id=20))
    assert out == []  # its parent's exchange has not ended yet
    asm.on_exchange(make_ex(exchange_id=20, ctx=ctx(_abi.SDK_KIND_SERVER)))
    (child,) = out
    assert (child.trace_id, child.parent_span_id) == (SDK_TRACE, SDK_SPAN)
    assert asm.stats.parent_timeouts == 0


def test_client_covered_by_sdk_client_span_is_dropped() -> None:
    asm, out = assembler()
    asm.on_exchange(client_ex(REQ, exchange_id=30, ctx=ctx(_abi.SDK_KIND_CLIENT)))
    assert out == [] and asm.stats.sdk_covered == 1


def test_client_under_sdk_internal_span_is_parented_there_with_business_context() -> None:
    asm, out = assembler()
    asm.on_exchange(client_ex(REQ, exchange_id=40, parent_exchange_id=99,
                              ctx=ctx(_abi.SDK_KIND_INTERNAL, tenant_id="acme")))
    (span,) = out
    assert span.kind == SpanKind.CLIENT
    assert (span.trace_id, span.parent_span_id) == (SDK_TRACE, SDK_SPAN)
    assert span.attributes["tenant_id"] == "acme"
    assert asm.stats.sdk_parented == 1 and asm.waiting == 0


def test_redis_call_under_sdk_server_span_goes_through_finish() -> None:
    from kernel_side.protocols.registry import register_all

    asm, out = assembler()
    register_all(asm)
    asm.on_exchange(client_ex(b"*1\r\n$4\r\nPING\r\n", b"+PONG\r\n", exchange_id=50,
                              ctx=ctx(_abi.SDK_KIND_SERVER)))
    (span,) = out
    assert span.attributes.get(semconv.DB_SYSTEM_NAME) == "redis"
    assert (span.trace_id, span.parent_span_id) == (SDK_TRACE, SDK_SPAN)


def test_server_span_under_non_server_sdk_span_is_kept() -> None:
    asm, out = assembler()
    asm.on_exchange(make_ex(exchange_id=60, ctx=ctx(_abi.SDK_KIND_INTERNAL)))
    (span,) = out
    assert span.kind == SpanKind.SERVER and span.trace_id == IdSource(SALT).trace_id(60)


def test_sdk_span_of_rejects_what_is_not_a_valid_span() -> None:
    assert _abi.sdk_span_of(ctx(_abi.SDK_KIND_SERVER)) == _abi.SdkSpan(
        SDK_TRACE, SDK_SPAN, _abi.SDK_KIND_SERVER)
    assert _abi.sdk_span_of(ctx(_abi.SDK_KIND_SERVER, trace=bytes(16))) is None
    assert _abi.sdk_span_of(ctx(_abi.SDK_KIND_SERVER, span=bytes(8))) is None
    assert _abi.sdk_span_of(ctx(_abi.SDK_KIND_SERVER)[:20]) is None
    no_flag = bytearray(ctx(_abi.SDK_KIND_SERVER))
    no_flag[3] = 0
    assert _abi.sdk_span_of(bytes(no_flag)) is None


def test_app_side_ids_match_the_agents() -> None:
    ids = IdSource(SALT)
    for exchange_id in (1, 2, 77, 2**40 + 5):
        assert _abi.exchange_span_id(SALT, exchange_id) == ids.span_id(exchange_id)
        assert _abi.exchange_trace_id(SALT, exchange_id) == ids.trace_id(exchange_id)
    k = KernelSpanContext(SDK_TRACE, SDK_SPAN)
    assert k.traceparent == f"00-{SDK_TRACE.hex()}-{SDK_SPAN.hex()}-01"


def _grpc_client_spans(kind: int) -> tuple[list[object], object]:
    from kernel_side.events import ROLE_CLIENT, Chunk
    from kernel_side.protocols.http2_spans import StreamSpans
    from tests.unit.test_http2 import load

    asm, out = assembler()
    streams = StreamSpans(asm, max_connections=64)
    for i, (from_client, data) in enumerate(load("grpc_unary")):
        streams(Chunk(tgid=100, fd=5, role=ROLE_CLIENT, from_client=from_client, closed=False,
                      peer_address="127.0.0.1", peer_port=50051, listen_fd=0, tid=100,
                      total_len=len(data), conn_id=7, ts_ns=T0 + i, parent_exchange_id=0,
                      data=data, ctx=ctx(kind, tenant_id="acme")))
    streams.flush(T0 + 10**12)
    return list(out), asm


def test_grpc_client_stream_under_sdk_spans() -> None:
    out, asm = _grpc_client_spans(_abi.SDK_KIND_CLIENT)
    assert out == [] and asm.stats.sdk_covered == 1  # type: ignore[attr-defined]
    out, asm = _grpc_client_spans(_abi.SDK_KIND_SERVER)
    (span,) = out
    assert span.attributes.get("rpc.system") == "grpc"  # type: ignore[attr-defined]
    assert (span.trace_id, span.parent_span_id) == (SDK_TRACE, SDK_SPAN)  # type: ignore[attr-defined]
