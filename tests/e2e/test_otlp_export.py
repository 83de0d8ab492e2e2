"""End to end over loopback: the agent's exporters talk to a real OTLP receiver.

No kernel needed, but real sockets, a real gRPC server and a real HTTP server.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from kernel_side.export import BatchExporter, OtlpGrpcExporter, OtlpHttpExporter, to_otlp_json
from kernel_side.model import Resource, SpanKind, SpanRecord, StatusCode
from kernel_side.otlp_receiver import OtlpReceiver, ReceivedSpan
from kernel_side.semconv import SCHEMA_URL, SCOPE_NAME

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
RESOURCE = Resource(key=(4242, 99), attributes={"service.name": "checkout", "process.pid": 4242})


def span(n: int, *, parent: bytes | None = None) -> SpanRecord:
    return SpanRecord(
        trace_id=bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736"),
        span_id=n.to_bytes(8, "big"),
        parent_span_id=parent,
        name=f"GET /cart/{n}",
        kind=SpanKind.CLIENT if parent else SpanKind.SERVER,
        start_ns=1_700_000_000_000_000_000 + n,
        end_ns=1_700_000_000_005_000_000 + n,
        resource=RESOURCE,
        attributes={
            "http.request.method": "GET",
            "http.response.status_code": 500 if n == 2 else 200,
            "tenant_id": "acme",
            "ebpf_bridge.capture.truncated": False,
        },
        status=StatusCode.ERROR if n == 2 else StatusCode.UNSET,
        status_message="boom" if n == 2 else "",
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def assert_received_like_sent(received: list[ReceivedSpan], sent: list[SpanRecord]) -> None:
    by_id = {r.span_id: r for r in received}
    assert len(by_id) == len(sent)
    for s in sent:
        r = by_id[s.span_id.hex()]
        assert r.trace_id == s.trace_id.hex()
        assert r.parent_span_id == (s.parent_span_id.hex() if s.parent_span_id else None)
        assert (r.name, r.kind, r.start_ns, r.end_ns) == (s.name, s.kind, s.start_ns, s.end_ns)
        assert r.attributes == s.attributes
        assert r.resource == dict(RESOURCE.attributes)
        assert (r.status_code, r.status_message) == (s.status, s.status_message)


def test_grpc_exporter_delivers_spans_to_receiver() -> None:
    sent = [span(1), span(2, parent=(1).to_bytes(8, "big")), span(3)]
    with OtlpReceiver() as receiver:
        exporter = OtlpGrpcExporter(receiver.grpc_endpoint, headers={"X-Tenant": "t1"})
        assert exporter.export(sent)
        received = receiver.wait_for(lambda spans: len(spans) >= 3)
        exporter.shutdown()
        assert_received_like_sent(received, sent)
        (request,) = receiver.requests
        assert request.resource_spans[0].schema_url == SCHEMA_URL
        assert request.resource_spans[0].scope_spans[0].scope.name == SCOPE_NAME


def test_http_exporter_delivers_spans_to_receiver() -> None:
    sent = [span(1), span(2, parent=(1).to_bytes(8, "big"))]
    with OtlpReceiver(http_port=0) as receiver:
        assert receiver.http_endpoint is not None
        exporter = OtlpHttpExporter(receiver.http_endpoint)
        assert exporter.export(sent)
        assert_received_like_sent(receiver.wait_for(lambda spans: len(spans) >= 2), sent)


def test_receiver_accepts_otlp_json_as_the_collector_writes_it() -> None:
    sent = [span(7), span(8, parent=(7).to_bytes(8, "big"))]
    with OtlpReceiver(http_port=0) as receiver:
        body = json.dumps(to_otlp_json(sent)).encode()
        post = urllib.request.Request(
            f"{receiver.http_endpoint}/v1/traces",
            data=body,
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(post, timeout=5) as reply:
            assert reply.status == 200
        assert_received_like_sent(receiver.wait_for(lambda spans: len(spans) >= 2), sent)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_receiver_down_fails_fast_then_batch_delivers_queued_spans(protocol: str) -> None:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    exporter = (
        OtlpGrpcExporter(endpoint, timeout_s=2.0)
        if protocol == "grpc"
        else OtlpHttpExporter(endpoint, timeout_s=2.0)
    )
    started = time.monotonic()
    assert exporter.export([span(1)]) is False
    # gRPC's own reconnect backoff would keep trying far longer than the 2 s export timeout.
    assert time.monotonic() - started < 30.0

    batch = BatchExporter(exporter, max_batch=4, interval_s=0.05, max_retries=50, backoff_max_s=0.5)
    sent = [span(n) for n in range(1, 11)]
    assert all(batch.submit(s) for s in sent)
    deadline = time.monotonic() + 10
    while batch.stats()["export_failures"] < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert batch.stats()["export_failures"] >= 2
    assert batch.stats()["queued"] == 10

    receiver = OtlpReceiver(grpc_port=port) if protocol == "grpc" else OtlpReceiver(http_port=port)
    with receiver:
        received = receiver.wait_for(lambda spans: len({s.span_id for s in spans}) >= 10)
        assert batch.flush(10.0)
        batch.shutdown()
    assert_received_like_sent(received, sent)
    stats = batch.stats()
    assert stats["exported"] == 10 and stats["queued"] == 0
    assert stats["dropped_queue_full"] == stats["dropped_retries_exhausted"] == 0


def test_wait_for_timeout_summarises_what_arrived() -> None:
    with OtlpReceiver() as receiver:
        exporter = OtlpGrpcExporter(receiver.grpc_endpoint)
        assert exporter.export([span(1)])
        exporter.shutdown()
        with pytest.raises(AssertionError, match=r"1 spans:\n  'GET /cart/1'"):
            receiver.wait_for(lambda spans: len(spans) > 5, timeout_s=0.3)


def test_receiver_cli_prints_spans_as_json_lines() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kernel_side.otlp_receiver", "--grpc-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        assert proc.stderr is not None and proc.stdout is not None
        banner = proc.stderr.readline()
        assert banner.startswith("OTLP receiver: gRPC http://127.0.0.1:"), banner
        endpoint = banner.split("gRPC ", 1)[1].split(",")[0].strip()
        exporter = OtlpGrpcExporter(endpoint)
        assert exporter.export([span(5)])
        exporter.shutdown()
        line = json.loads(proc.stdout.readline())
        assert line["name"] == "GET /cart/5"
        assert line["span_id"] == (5).to_bytes(8, "big").hex()
        assert line["attributes"]["tenant_id"] == "acme"
        assert line["resource"]["service.name"] == "checkout"
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
