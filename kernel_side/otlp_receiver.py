"""A real, minimal OTLP trace receiver: gRPC ``TraceService`` plus optional HTTP ``/v1/traces``.

Used by the end-to-end tests and the demo to see exactly what the agent put on the wire, and
runnable by hand: ``python -m kernel_side.otlp_receiver --grpc-port 4317 --http-port 4318``
prints every received span as one JSON line.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gzip
import json
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import (
    TraceServiceServicer,
    add_TraceServiceServicer_to_server,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

TRACES_PATH = "/v1/traces"
_PROTOBUF = "application/x-protobuf"
_JSON = "application/json"
_ID_FIELDS = ("traceId", "spanId", "parentSpanId")


@dataclass(frozen=True)
class ReceivedSpan:
    """One received span, flattened with its resource; ids as lowercase hex."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)
    resource: dict[str, Any] = field(default_factory=dict)
    status_code: int = 0
    status_message: str = ""


def any_value_to_python(value: AnyValue) -> Any:
    """The Python value of an OTLP ``AnyValue`` (arrays to lists, kvlists to dicts)."""
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value_to_python(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return attributes_to_dict(value.kvlist_value.values)
    return getattr(value, which)


def attributes_to_dict(attributes: Sequence[KeyValue]) -> dict[str, Any]:
    """A ``KeyValue`` list as a dict."""
    return {kv.key: any_value_to_python(kv.value) for kv in attributes}


def flatten(request: ExportTraceServiceRequest) -> list[ReceivedSpan]:
    """Every span of ``request`` with its resource attributes."""
    out: list[ReceivedSpan] = []
    for resource_spans in request.resource_spans:
        resource = attributes_to_dict(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                out.append(
                    ReceivedSpan(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex() or None,
                        name=span.name,
                        kind=span.kind,
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        attributes=attributes_to_dict(span.attributes),
                        resource=dict(resource),
                        status_code=span.status.code,
                        status_message=span.status.message,
                    )
                )
    return out


def parse_otlp_json(body: bytes) -> ExportTraceServiceRequest:
    """Parse an OTLP/JSON request, whose ids are hex where protobuf JSON expects base64."""
    document = json.loads(body)

    def hex_ids_to_base64(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in _ID_FIELDS and isinstance(value, str):
                    node[key] = base64.b64encode(bytes.fromhex(value)).decode("ascii")
                else:
                    hex_ids_to_base64(value)
        elif isinstance(node, list):
            for item in node:
                hex_ids_to_base64(item)

    hex_ids_to_base64(document)
    request = ExportTraceServiceRequest()
    json_format.ParseDict(document, request)
    return request


class _TraceService(TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(
        self, request: ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> ExportTraceServiceResponse:
        if not self._receiver.admit():
            context.abort(grpc.StatusCode.UNAVAILABLE, "refused for a test (fail_first)")
        self._receiver.record(request)
        return ExportTraceServiceResponse()


def _http_handler(receiver: OtlpReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            receiver._track_http_connection(self.connection, True)

        def finish(self) -> None:
            receiver._track_http_connection(self.connection, False)
            super().finish()

        def do_POST(self) -> None:
            if self.path.split("?", 1)[0] != TRACES_PATH:
                self._reply(404, "text/plain", b"only POST /v1/traces is served\n")
                return
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.headers.get("Content-Encoding", "").lower() == "gzip":
                body = gzip.decompress(body)
            content_type = self.headers.get("Content-Type", "").split(";", 1)[0].strip()
            try:
                if content_type == _PROTOBUF:
                    request = ExportTraceServiceRequest.FromString(body)
                elif content_type == _JSON:
                    request = parse_otlp_json(body)
                else:
                    self._reply(415, "text/plain", b"use application/x-protobuf or json\n")
                    return
            except (DecodeError, json_format.ParseError, ValueError) as exc:
                self._reply(400, "text/plain", f"bad OTLP request: {exc}\n".encode())
                return
            if not receiver.admit():
                self._reply(503, "text/plain", b"refused for a test (fail_first)\n")
                return
            receiver.record(request)
            if content_type == _JSON:
                self._reply(200, _JSON, b"{}")
            else:
                self._reply(200, _PROTOBUF, ExportTraceServiceResponse().SerializeToString())

        def _reply(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Silenced: per-request access lines would drown the span output."""

    return Handler


class OtlpReceiver:
    """Receives OTLP traces over gRPC (always) and HTTP (when ``http_port`` is not None).

    Ports 0 pick free ports; read the results from ``grpc_endpoint`` and ``http_endpoint``
    after :meth:`start`. ``on_request`` is called from server threads for each request.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        grpc_port: int = 0,
        http_port: int | None = None,
        *,
        on_request: Callable[[ExportTraceServiceRequest], None] | None = None,
        fail_first: int = 0,
        delay_s: float = 0.0,
    ) -> None:
        """``fail_first``: refuse that many export requests first (gRPC UNAVAILABLE, HTTP 503),
        as a collector that is overloaded or restarting does; ``delay_s``: answer every request
        that late, as a slow collector does. Both for fault tests."""
        self.host = host
        self._refuse_left = fail_first
        self._delay_s = delay_s
        self.refused = 0
        self._grpc_port = grpc_port
        self._http_port = http_port
        self._on_request = on_request
        self._cond = threading.Condition()
        self._requests: list[ExportTraceServiceRequest] = []
        self._grpc_server: Any = None
        self._http_server: ThreadingHTTPServer | None = None
        self._http_thread: threading.Thread | None = None
        self._http_connections: set[socket.socket] = set()
        self._conn_lock = threading.Lock()
        self.grpc_endpoint = ""
        self.http_endpoint: str | None = None

    def admit(self) -> bool:
        """Called once per export request: wait ``delay_s``, then False while requests are
        still to be refused (``fail_first``)."""
        if self._delay_s:
            time.sleep(self._delay_s)
        with self._cond:
            if self._refuse_left > 0:
                self._refuse_left -= 1
                self.refused += 1
                return False
        return True

    def start(self) -> OtlpReceiver:
        """Bind and start serving; returns self for chaining."""
        server = grpc.server(ThreadPoolExecutor(max_workers=4, thread_name_prefix="otlp-grpc"))
        # The generated *_pb2_grpc module ships without type hints.
        add_TraceServiceServicer_to_server(_TraceService(self), server)  # type: ignore[no-untyped-call]
        port = server.add_insecure_port(f"{self.host}:{self._grpc_port}")
        if port == 0:
            raise OSError(f"OTLP receiver: cannot bind gRPC on {self.host}:{self._grpc_port}")
        server.start()
        self._grpc_server = server
        self.grpc_endpoint = f"http://{self.host}:{port}"
        if self._http_port is not None:
            httpd = ThreadingHTTPServer((self.host, self._http_port), _http_handler(self))
            httpd.daemon_threads = True
            self._http_server = httpd
            self._http_thread = threading.Thread(
                target=httpd.serve_forever, name="otlp-http", daemon=True
            )
            self._http_thread.start()
            self.http_endpoint = f"http://{self.host}:{httpd.server_address[1]}"
        return self

    def stop(self) -> None:
        """Stop both servers and release their ports; idempotent."""
        if self._grpc_server is not None:
            self._grpc_server.stop(grace=None).wait()
            self._grpc_server = None
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            self._http_server = None
            # serve_forever's end leaves kept-alive connections served by their threads: close
            # them, as a Collector going down does, so a client sees the receiver is gone.
            with self._conn_lock:
                live = list(self._http_connections)
            for conn in live:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def _track_http_connection(self, conn: socket.socket, live: bool) -> None:
        with self._conn_lock:
            if live:
                self._http_connections.add(conn)
            else:
                self._http_connections.discard(conn)

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def record(self, request: ExportTraceServiceRequest) -> None:
        """Store one received request and wake :meth:`wait_for` callers."""
        with self._cond:
            self._requests.append(request)
            self._cond.notify_all()
        if self._on_request is not None:
            self._on_request(request)

    @property
    def requests(self) -> list[ExportTraceServiceRequest]:
        """A snapshot of the requests received so far, in arrival order."""
        with self._cond:
            return list(self._requests)

    def spans(self) -> list[ReceivedSpan]:
        """Every span received so far, flattened, in arrival order."""
        return [span for request in self.requests for span in flatten(request)]

    def wait_for(
        self, predicate: Callable[[list[ReceivedSpan]], bool], timeout_s: float = 20.0
    ) -> list[ReceivedSpan]:
        """Block until ``predicate(spans)`` holds; returns those spans.

        Raises AssertionError with a summary of what did arrive when ``timeout_s`` runs out.
        """
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                spans = self.spans()
                if predicate(spans):
                    return spans
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
        summary = "\n".join(
            f"  {s.name!r} kind={s.kind} trace={s.trace_id} attrs={s.attributes}"
            for s in spans[:20]
        )
        more = f"\n  ... and {len(spans) - 20} more" if len(spans) > 20 else ""
        raise AssertionError(
            f"OTLP receiver: condition not met within {timeout_s}s; got "
            f"{len(self.requests)} requests, {len(spans)} spans:\n{summary}{more}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run a receiver and print each received span as a JSON line until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m kernel_side.otlp_receiver",
        description="Print received OTLP spans as JSON lines.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument("--grpc-port", type=int, default=4317, help="0 picks a free port")
    parser.add_argument("--http-port", type=int, default=None, help="also serve OTLP/HTTP")
    args = parser.parse_args(argv)

    print_lock = threading.Lock()

    def print_spans(request: ExportTraceServiceRequest) -> None:
        lines = "".join(json.dumps(asdict(span)) + "\n" for span in flatten(request))
        with print_lock:
            sys.stdout.write(lines)
            sys.stdout.flush()

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    receiver = OtlpReceiver(
        args.host, args.grpc_port, args.http_port, on_request=print_spans
    ).start()
    listening = f"OTLP receiver: gRPC {receiver.grpc_endpoint}"
    if receiver.http_endpoint:
        listening += f", HTTP {receiver.http_endpoint}{TRACES_PATH}"
    print(listening, file=sys.stderr, flush=True)
    try:
        stop.wait()
    finally:
        receiver.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
