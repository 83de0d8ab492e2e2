"""Unit tests for span export: wire building, OTLP/JSON, console, factory and batching."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from kernel_side.export import (
    BatchExporter,
    ConsoleExporter,
    JsonlExporter,
    OtlpGrpcExporter,
    OtlpHttpExporter,
    SpanExporter,
    make_exporter,
    to_export_request,
    to_otlp_json,
)
from kernel_side.export.otlp import grpc_target, http_traces_url
from kernel_side.export.otlp_proto import scope_version
from kernel_side.model import Resource, SpanKind, SpanRecord, StatusCode
from kernel_side.semconv import SCHEMA_URL, SCOPE_NAME

RES_A = Resource(key=(100, 1), attributes={"service.name": "checkout", "process.pid": 100})
RES_B = Resource(key=(200, 7), attributes={"service.name": "cart", "process.pid": 200})


def make_span(
    n: int = 0,
    *,
    resource: Resource = RES_A,
    parent: bytes | None = None,
    attributes: dict[str, Any] | None = None,
    status: StatusCode = StatusCode.UNSET,
    message: str = "",
    kind: SpanKind = SpanKind.SERVER,
) -> SpanRecord:
    return SpanRecord(
        trace_id=bytes([0xAB]) * 15 + bytes([n % 256]),
        span_id=bytes([0xCD]) * 7 + bytes([n % 256]),
        parent_span_id=parent,
        name=f"GET /items/{n}",
        kind=kind,
        start_ns=1_700_000_000_000_000_000 + n,
        end_ns=1_700_000_000_012_345_678 + n,
        resource=resource,
        attributes=attributes if attributes is not None else {"http.request.method": "GET"},
        status=status,
        status_message=message,
    )


# --- protobuf request -------------------------------------------------------------------------


def test_request_groups_spans_by_resource_key_in_first_seen_order() -> None:
    same_key_other_attrs = Resource(key=RES_A.key, attributes={"service.name": "ignored"})
    spans = [
        make_span(1, resource=RES_A),
        make_span(2, resource=RES_B),
        make_span(3, resource=same_key_other_attrs),
    ]
    request = to_export_request(spans)
    assert len(request.resource_spans) == 2
    first, second = request.resource_spans
    assert [s.name for s in first.scope_spans[0].spans] == ["GET /items/1", "GET /items/3"]
    assert [s.name for s in second.scope_spans[0].spans] == ["GET /items/2"]
    resource = {kv.key: kv.value for kv in first.resource.attributes}
    assert resource["service.name"].string_value == "checkout"
    assert resource["process.pid"].int_value == 100
    for resource_spans in request.resource_spans:
        assert resource_spans.schema_url == SCHEMA_URL
        (scope_spans,) = resource_spans.scope_spans
        assert scope_spans.schema_url == SCHEMA_URL
        assert scope_spans.scope.name == SCOPE_NAME
        assert scope_spans.scope.version == scope_version() != ""


def test_request_attribute_types() -> None:
    attrs: dict[str, Any] = {
        "s": "x",
        "t": True,
        "f": False,
        "i": 42,
        "neg": -7,
        "d": 1.5,
        "empty": "",
        "huge": 2**64,
    }
    (span,) = (
        to_export_request([make_span(attributes=attrs)]).resource_spans[0].scope_spans[0].spans
    )
    values = {kv.key: kv.value for kv in span.attributes}
    # Every key once (repeated values become cached fragments, listed first: order is free).
    assert sorted(kv.key for kv in span.attributes) == sorted(attrs)
    assert values["s"].WhichOneof("value") == "string_value" and values["s"].string_value == "x"
    assert values["t"].WhichOneof("value") == "bool_value" and values["t"].bool_value is True
    assert values["f"].WhichOneof("value") == "bool_value" and values["f"].bool_value is False
    assert values["i"].WhichOneof("value") == "int_value" and values["i"].int_value == 42
    assert values["neg"].int_value == -7
    assert values["d"].WhichOneof("value") == "double_value" and values["d"].double_value == 1.5
    assert values["empty"].WhichOneof("value") == "string_value"
    # Beyond int64 the value survives as text instead of failing the whole batch.
    assert values["huge"].string_value == str(2**64)


def test_request_span_fields_parent_and_status() -> None:
    parent = bytes(range(1, 9))
    spans = [
        make_span(1),
        make_span(2, parent=parent, status=StatusCode.ERROR, message="boom", kind=SpanKind.CLIENT),
        make_span(3, status=StatusCode.OK),
    ]
    root, child, ok = to_export_request(spans).resource_spans[0].scope_spans[0].spans
    assert root.trace_id == spans[0].trace_id and root.span_id == spans[0].span_id
    assert root.parent_span_id == b""
    assert root.kind == SpanKind.SERVER
    assert root.start_time_unix_nano == spans[0].start_ns
    assert root.end_time_unix_nano == spans[0].end_ns
    assert not root.HasField("status")
    assert child.parent_span_id == parent
    assert child.kind == SpanKind.CLIENT
    assert (child.status.code, child.status.message) == (StatusCode.ERROR, "boom")
    assert ok.status.code == StatusCode.OK


def test_request_empty() -> None:
    assert to_export_request([]) == ExportTraceServiceRequest()


# --- OTLP/JSON --------------------------------------------------------------------------------


def _hex_ids_to_base64(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            k: base64.b64encode(bytes.fromhex(v)).decode()
            if k in ("traceId", "spanId", "parentSpanId")
            else _hex_ids_to_base64(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_hex_ids_to_base64(v) for v in node]
    return node


def _mixed_spans() -> list[SpanRecord]:
    return [
        make_span(1, attributes={"s": "x", "b": True, "i": 7, "d": 0.25, "tenant_id": "acme"}),
        make_span(2, resource=RES_B, parent=bytes(8 * [1]), status=StatusCode.ERROR, message="e"),
        make_span(3, status=StatusCode.OK, attributes={}),
    ]


def test_otlp_json_shape() -> None:
    doc = to_otlp_json(_mixed_spans())
    first = doc["resourceSpans"][0]
    assert first["schemaUrl"] == SCHEMA_URL
    assert first["resource"]["attributes"][1] == {
        "key": "process.pid",
        "value": {"intValue": "100"},
    }
    scope_spans = first["scopeSpans"][0]
    assert scope_spans["scope"] == {"name": SCOPE_NAME, "version": scope_version()}
    assert scope_spans["schemaUrl"] == SCHEMA_URL
    span1, span3 = scope_spans["spans"]
    assert span1["traceId"] == "ab" * 15 + "01"
    assert span1["spanId"] == "cd" * 7 + "01"
    assert "parentSpanId" not in span1 and "status" not in span1
    assert span1["kind"] == 2
    assert span1["startTimeUnixNano"] == "1700000000000000001"
    assert span1["endTimeUnixNano"] == "1700000000012345679"
    assert span1["attributes"] == [
        {"key": "s", "value": {"stringValue": "x"}},
        {"key": "b", "value": {"boolValue": True}},
        {"key": "i", "value": {"intValue": "7"}},
        {"key": "d", "value": {"doubleValue": 0.25}},
        {"key": "tenant_id", "value": {"stringValue": "acme"}},
    ]
    assert span3["status"] == {"code": 1} and "attributes" not in span3
    span2 = doc["resourceSpans"][1]["scopeSpans"][0]["spans"][0]
    assert span2["parentSpanId"] == "0101010101010101"
    assert span2["status"] == {"code": 2, "message": "e"}
    assert to_otlp_json([]) == {}


def _sorted_attributes(request: ExportTraceServiceRequest) -> ExportTraceServiceRequest:
    """A copy with every attribute list sorted by key: OTLP gives attribute order no meaning
    (keys are unique), and the protobuf encoder merges repeated values first."""
    out = ExportTraceServiceRequest()
    out.CopyFrom(request)
    for rs in out.resource_spans:
        rs.resource.attributes.sort(key=lambda kv: kv.key)
        for ss in rs.scope_spans:
            for span in ss.spans:
                span.attributes.sort(key=lambda kv: kv.key)
    return out


def test_otlp_json_matches_protobuf_request_exactly() -> None:
    spans = _mixed_spans()
    # Twice: the second build serves repeated values from the protobuf fragment cache.
    for _ in range(2):
        doc = to_otlp_json(spans)
        proto = _sorted_attributes(to_export_request(spans))
        parsed = json_format.ParseDict(_hex_ids_to_base64(doc), ExportTraceServiceRequest())
        assert _sorted_attributes(parsed) == proto
        # The generic mapping agrees on every key once ids are base64: no extras, none missing.
        generic = json_format.MessageToDict(proto, use_integers_for_enums=True)
        assert json_format.MessageToDict(_sorted_attributes(parsed),
                                         use_integers_for_enums=True) == generic


def test_otlp_json_non_finite_double_is_valid_json() -> None:
    doc = to_otlp_json([make_span(attributes={"nan": float("nan"), "inf": float("-inf")})])
    text = json.dumps(doc, allow_nan=False)
    assert '"doubleValue":"NaN"' in text.replace(" ", "")
    assert '"doubleValue":"-Infinity"' in text.replace(" ", "")


# --- JSONL ------------------------------------------------------------------------------------


def test_jsonl_appends_one_request_per_line(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "spans.jsonl"
    exporter = JsonlExporter(path)
    assert exporter.export([make_span(1), make_span(2)])
    assert exporter.export([])
    threads = [threading.Thread(target=exporter.export, args=([make_span(i)],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    exporter.shutdown()
    assert not exporter.export([make_span(3)])
    lines = path.read_text().splitlines()
    assert len(lines) == 9
    assert " " not in lines[0].split('"name"')[0]
    first = json.loads(lines[0])
    assert first == to_otlp_json([make_span(1), make_span(2)])
    assert all(json.loads(line)["resourceSpans"] for line in lines)


# --- console ----------------------------------------------------------------------------------


def test_console_line_content() -> None:
    out = io.StringIO()
    span = make_span(
        5,
        kind=SpanKind.CLIENT,
        status=StatusCode.ERROR,
        attributes={"http.request.method": "GET", "tenant_id": "acme", "user_id": "u-42"},
    )
    assert ConsoleExporter(out).export([span, make_span(6)])
    first, second = out.getvalue().splitlines()
    assert "\x1b[" not in first
    for part in ("checkout", "CLIENT", "GET /items/5", "ERROR", "12.35ms", "tenant_id=acme"):
        assert part in first
    assert "user_id=u-42" in first and "http.request.method" not in first
    assert first.endswith("trace=abababab")
    assert "SERVER" in second and "UNSET" in second


def test_console_color_forced_and_closed_stream() -> None:
    out = io.StringIO()
    assert ConsoleExporter(out, color=True).export([make_span(status=StatusCode.ERROR)])
    assert "\x1b[31mERROR" in out.getvalue()
    out.close()
    assert not ConsoleExporter(out).export([make_span()])


# --- factory and endpoints --------------------------------------------------------------------


def test_make_exporter_kinds(tmp_path: Path) -> None:
    grpc_exp = make_exporter(
        "otlp", endpoint="http://127.0.0.1:4317", protocol=None, jsonl_path=None
    )
    assert isinstance(grpc_exp, OtlpGrpcExporter)
    grpc_exp.shutdown()
    http_exp = make_exporter(
        "otlp", endpoint="http://127.0.0.1:4318", protocol="http/protobuf", jsonl_path=None
    )
    assert isinstance(http_exp, OtlpHttpExporter)
    assert http_exp.url == "http://127.0.0.1:4318/v1/traces"
    jsonl = make_exporter("jsonl", endpoint=None, protocol=None, jsonl_path=str(tmp_path / "x"))
    assert isinstance(jsonl, JsonlExporter)
    jsonl.shutdown()
    stream = io.StringIO()
    console = make_exporter("console", endpoint=None, protocol=None, jsonl_path=None, stream=stream)
    assert isinstance(console, ConsoleExporter)


@pytest.mark.parametrize(
    ("kind", "endpoint", "protocol", "jsonl_path", "message"),
    [
        ("zipkin", None, None, None, "unknown exporter kind 'zipkin'"),
        ("otlp", None, None, None, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        ("otlp", "http://h:4318", "http/json", None, "'jsonl' exporter"),
        ("otlp", "http://h:4318", "thrift", None, "grpc, http/protobuf"),
        ("jsonl", None, None, None, "jsonl_path"),
    ],
)
def test_make_exporter_errors_name_the_fix(
    kind: str, endpoint: str | None, protocol: str | None, jsonl_path: str | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make_exporter(kind, endpoint=endpoint, protocol=protocol, jsonl_path=jsonl_path)


def test_endpoint_parsing() -> None:
    assert grpc_target("http://collector:4317") == ("collector:4317", False)
    assert grpc_target("https://collector:4317/") == ("collector:4317", True)
    assert grpc_target("collector:4317") == ("collector:4317", False)
    assert grpc_target("collector:4317", insecure=False) == ("collector:4317", True)
    with pytest.raises(ValueError, match="host:port"):
        grpc_target("ftp://collector:4317")
    assert http_traces_url("http://c:4318") == "http://c:4318/v1/traces"
    assert http_traces_url("http://c:4318/") == "http://c:4318/v1/traces"
    assert http_traces_url("c:4318") == "http://c:4318/v1/traces"
    assert http_traces_url("https://c/custom/path") == "https://c/custom/path"
    with pytest.raises(ValueError, match="http://host:4318"):
        http_traces_url("ftp://c:4318")


# --- batching ---------------------------------------------------------------------------------


class FakeExporter(SpanExporter):
    """Fails the first ``fail_times`` calls (or always), records what succeeded."""

    def __init__(self, fail_times: int = 0, *, always_fail: bool = False, delay_s: float = 0.0):
        self.fail_times = fail_times
        self.always_fail = always_fail
        self.delay_s = delay_s
        self.calls = 0
        self.exported: list[SpanRecord] = []
        self.shutdown_at_count: int | None = None

    def export(self, spans: Sequence[SpanRecord]) -> bool:
        self.calls += 1
        time.sleep(self.delay_s)
        if self.always_fail or self.calls <= self.fail_times:
            return False
        self.exported.extend(spans)
        return True

    def shutdown(self) -> None:
        self.shutdown_at_count = len(self.exported)


class RaisingExporter(FakeExporter):
    def export(self, spans: Sequence[SpanRecord]) -> bool:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("bug")
        return super().export(spans)


def fast_batch(exporter: SpanExporter, **kwargs: Any) -> BatchExporter:
    options: dict[str, Any] = {"interval_s": 0.01, "backoff_initial_s": 0.01, "backoff_max_s": 0.05}
    options.update(kwargs)
    return BatchExporter(exporter, **options)


def test_batch_retries_then_delivers_everything_in_order() -> None:
    fake = FakeExporter(fail_times=3)
    batch = fast_batch(fake, max_batch=10)
    spans = [make_span(i) for i in range(25)]
    assert all(batch.submit(s) for s in spans)
    assert batch.flush(5.0)
    assert fake.exported == spans
    stats = batch.stats()
    assert stats["exported"] == 25 and stats["queued"] == 0
    assert stats["export_failures"] == 3 and stats["retries"] == 3
    assert stats["dropped_queue_full"] == stats["dropped_retries_exhausted"] == 0
    batch.shutdown()


def test_batch_always_failing_tiny_queue_counts_drops_and_never_blocks() -> None:
    fake = FakeExporter(always_fail=True, delay_s=0.05)
    batch = fast_batch(fake, max_queue=5, max_batch=5, max_retries=2)
    started = time.monotonic()
    results = [batch.submit(make_span(i)) for i in range(1000)]
    # Blocking on the 50 ms exporter would take 50 s; never-blocking takes milliseconds.
    assert time.monotonic() - started < 20.0
    assert results[:5] == [True] * 5
    assert results.count(True) <= 10
    stats = batch.stats()
    assert stats["dropped_queue_full"] == results.count(False) >= 990
    assert not batch.flush(0.05)
    deadline = time.monotonic() + 5
    while batch.stats()["dropped_retries_exhausted"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = batch.stats()
    assert stats["dropped_retries_exhausted"] >= 5
    assert stats["retries"] >= 2 and stats["export_failures"] >= 3
    assert stats["exported"] == 0
    batch.shutdown(0.2)


def test_batch_retries_for_max_retry_s_not_a_fixed_count() -> None:
    # A collector outage longer than a handful of fast retries must not lose spans: the retry
    # budget is time, so this batch is still queued after many more than 5 attempts.
    fake = FakeExporter(always_fail=True)
    batch = fast_batch(fake, backoff_max_s=0.01, max_retry_s=3600.0)
    batch.submit(make_span(1))
    deadline = time.monotonic() + 10
    while batch.stats()["retries"] < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = batch.stats()
    assert stats["retries"] >= 20 and stats["queued"] == 1
    assert stats["dropped_retries_exhausted"] == 0
    batch.shutdown(0.1)
    assert batch.stats()["dropped_shutdown"] == 1


def test_batch_gives_up_after_max_retry_s() -> None:
    fake = FakeExporter(always_fail=True)
    batch = fast_batch(fake, max_retry_s=0.2)
    batch.submit(make_span(1))
    deadline = time.monotonic() + 10
    while batch.stats()["dropped_retries_exhausted"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = batch.stats()
    assert stats["dropped_retries_exhausted"] == 1 and stats["queued"] == 0
    assert stats["retries"] >= 1
    batch.shutdown()


def test_batch_survives_an_exporter_that_raises() -> None:
    fake = RaisingExporter()
    batch = fast_batch(fake)
    batch.submit(make_span(1))
    assert batch.flush(5.0)
    assert len(fake.exported) == 1 and batch.stats()["export_failures"] == 1
    batch.shutdown()


def test_batch_exports_full_batches_without_waiting_for_interval() -> None:
    fake = FakeExporter()
    batch = BatchExporter(fake, max_batch=4, interval_s=60.0)
    for i in range(8):
        batch.submit(make_span(i))
    deadline = time.monotonic() + 5
    while len(fake.exported) < 8 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(fake.exported) == 8 and fake.calls == 2
    batch.shutdown()


def test_batch_shutdown_flushes_pending_then_shuts_exporter() -> None:
    fake = FakeExporter()
    batch = BatchExporter(fake, max_batch=1000, interval_s=60.0)
    spans = [make_span(i) for i in range(30)]
    for s in spans:
        batch.submit(s)
    batch.shutdown(5.0)
    assert fake.exported == spans
    assert fake.shutdown_at_count == 30
    assert not batch.submit(make_span(99))
    assert batch.stats()["dropped_shutdown"] == 1
    batch.shutdown()


def test_batch_shutdown_deadline_bounds_a_dead_destination() -> None:
    fake = FakeExporter(always_fail=True)
    batch = fast_batch(fake, backoff_initial_s=1.0, backoff_max_s=1.0, max_retries=100)
    for i in range(3):
        batch.submit(make_span(i))
    started = time.monotonic()
    batch.shutdown(0.3)
    # 100 retries a second apart would take 100 s: the deadline must cut them short.
    assert time.monotonic() - started < 30.0
    assert batch.stats()["dropped_shutdown"] == 3
    assert fake.shutdown_at_count == 0


def test_flush_with_nothing_queued_is_immediate() -> None:
    batch = BatchExporter(FakeExporter())
    started = time.monotonic()
    assert batch.flush(60.0)
    # Waiting out the flush deadline would take 60 s.
    assert time.monotonic() - started < 30.0
    batch.shutdown()


def test_submit_many_keeps_order_counts_overflow_and_wakes_on_a_full_batch() -> None:
    fake = FakeExporter()
    # A 60 s interval: only the full-batch wake-up can export before the deadline below.
    batch = BatchExporter(fake, max_batch=4, max_queue=10, interval_s=60.0)
    first = [make_span(i) for i in range(3)]
    assert batch.submit_many(first) == 3
    more = [make_span(i) for i in range(3, 15)]
    # 3 queued, room for 7 (unless the worker already took the first 3): never more.
    taken = batch.submit_many(more)
    assert 7 <= taken <= 10
    assert batch.stats()["dropped_queue_full"] == len(more) - taken
    deadline = time.monotonic() + 5
    while len(fake.exported) < 8 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert fake.exported[:8] == (first + more)[:8]
    batch.shutdown(5.0)
    assert fake.exported == (first + more)[:3 + taken]
    assert batch.submit_many([make_span(99), make_span(100)]) == 0
    assert batch.stats()["dropped_shutdown"] == 2


def test_submit_many_of_nothing_is_harmless() -> None:
    fake = FakeExporter()
    batch = fast_batch(fake)
    assert batch.submit_many([]) == 0
    assert batch.flush(5.0) and fake.exported == []
    batch.shutdown()


def test_fanout_holds_until_hand_over_then_every_exporter_gets_each_span() -> None:
    from kernel_side.agent import Fanout

    a, b = FakeExporter(), FakeExporter()
    fan = Fanout([fast_batch(a), fast_batch(b)])
    spans = [make_span(i) for i in range(5)]
    for s in spans:
        fan.hold(s)
    assert fan.stats()["queued"] == 0  # held, not yet with the exporters
    fan.hand_over()
    fan.hold(make_span(5))
    # shutdown() hands over what is still held before it flushes.
    fan.shutdown(5.0)
    assert a.exported == b.exported == [*spans, make_span(5)]
    assert fan.stats()["exported"] == 12
