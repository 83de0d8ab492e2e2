"""End to end over loopback: the agent's exporters talk to a real OTLP receiver.

No kernel needed, but real sockets, a real gRPC server and a real HTTP server.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

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


class _CountingServer:
    """A plain HTTP/1.1 server standing in for a Collector (or a proxy): records each request's
    target and body and the number of TCP connections, and answers with ``status``."""

    def __init__(self, status: int = 200, answer: bytes = b"") -> None:
        outer = self
        self.status = status
        self.answer = answer
        self.targets: list[str] = []
        self.bodies: list[bytes] = []
        self.connections = 0

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                outer.connections += 1
                super().setup()

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.targets.append(self.path)
                outer.bodies.append(body)
                self.send_response(outer.status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(outer.answer)))
                self.end_headers()
                self.wfile.write(outer.answer)

            def log_message(self, format: str, *args: object) -> None:
                return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> _CountingServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_http_exporter_keeps_one_connection_for_every_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with _CountingServer() as server:
        exporter = OtlpHttpExporter(f"http://127.0.0.1:{server.port}")
        for n in range(1, 6):
            assert exporter.export([span(n)])
        exporter.shutdown()
    assert server.targets == ["/v1/traces"] * 5
    assert server.connections == 1
    decoded = [ExportTraceServiceRequest.FromString(b) for b in server.bodies]
    assert [r.resource_spans[0].scope_spans[0].spans[0].name for r in decoded] == [
        f"GET /cart/{n}" for n in range(1, 6)
    ]


def test_http_exporter_reconnects_when_the_receiver_restarted() -> None:
    port = free_port()
    exporter = OtlpHttpExporter(f"http://127.0.0.1:{port}", timeout_s=5.0)
    with OtlpReceiver(http_port=port) as receiver:
        assert exporter.export([span(1)])
        receiver.wait_for(lambda spans: len(spans) >= 1)
    # The kept connection is dead now; the next batch must go out on a new one, once.
    with OtlpReceiver(http_port=port) as receiver:
        assert exporter.export([span(2)])
        received = receiver.wait_for(lambda spans: len(spans) >= 1)
        assert [r.span_id for r in received] == [(2).to_bytes(8, "big").hex()]
    exporter.shutdown()


def test_http_exporter_error_answer_fails_the_batch_and_keeps_working(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with _CountingServer(status=400, answer=b"bad span") as server:
        exporter = OtlpHttpExporter(f"http://127.0.0.1:{server.port}")
        with caplog.at_level(logging.WARNING):
            assert exporter.export([span(1)]) is False
        assert "HTTP 400" in caplog.text and "bad span" in caplog.text
        server.status, server.answer = 200, b""
        assert exporter.export([span(2)])
        exporter.shutdown()
    assert len(server.bodies) == 2


def test_http_exporter_goes_through_a_configured_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    with _CountingServer() as proxy:
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy.port}")
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        # Nothing listens on the collector's port: only the proxy can make this succeed.
        collector = f"http://collector.invalid:{free_port()}"
        exporter = OtlpHttpExporter(collector)
        assert exporter.export([span(1)])
        exporter.shutdown()
    # A proxy is asked for the absolute URL.
    assert proxy.targets == [f"{collector}/v1/traces"]


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
