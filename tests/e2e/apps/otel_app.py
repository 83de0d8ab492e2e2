"""A Flask service for the OpenTelemetry SDK coexistence tests: GET /order/<id> annotates the
tenant from X-Tenant-ID, calls the inventory service over HTTP (requests) and runs one query on
PostgreSQL (psycopg), then answers.

    python otel_app.py MODE --port 0 --ready-file PATH --inventory URL --pg-port N [--otlp URL]

MODE:
  plain     no ebpf-bridge and no OpenTelemetry code (agent only)
  annotate  bridge.annotate only
  sdk       the OpenTelemetry SDK with the Flask and requests instrumentations, exporting to
            --otlp, plus sdk_side.otel.BridgeSpanProcessor and bridge.annotate
  manual    the SDK only for one manual business span around the outgoing calls, nested under
            the kernel's server span with sdk_side.otel.kernel_context(), plus bridge.annotate
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import Any

import psycopg
import requests
from _ready import write_ready
from flask import Flask, jsonify, request
from werkzeug.serving import make_server


def main() -> None:
    """Serve until killed."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("mode", choices=["plain", "annotate", "sdk", "manual"])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ready-file", required=True)
    ap.add_argument("--inventory", required=True)
    ap.add_argument("--pg-port", type=int, required=True)
    ap.add_argument("--otlp", default="")
    args = ap.parse_args()

    app = Flask(__name__)
    tracer: Any = None
    if args.mode in ("sdk", "manual"):
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        from sdk_side.otel import BridgeSpanProcessor

        provider = TracerProvider(resource=Resource.create())  # OTEL_SERVICE_NAME names it
        provider.add_span_processor(BridgeSpanProcessor())
        provider.add_span_processor(BatchSpanProcessor(
            OTLPSpanExporter(endpoint=args.otlp, insecure=True), schedule_delay_millis=100))
        trace.set_tracer_provider(provider)
        tracer = trace.get_tracer("otel_app")
        if args.mode == "sdk":
            from opentelemetry.instrumentation.flask import FlaskInstrumentor
            from opentelemetry.instrumentation.requests import RequestsInstrumentor

            FlaskInstrumentor().instrument_app(app)
            RequestsInstrumentor().instrument()

    @contextlib.contextmanager
    def business_span() -> Iterator[None]:
        if args.mode != "manual":
            yield
            return
        from sdk_side.otel import kernel_context

        ctx = kernel_context(request.headers.get("traceparent"))
        with tracer.start_as_current_span("price-check", context=ctx):
            yield

    @app.get("/order/<oid>")
    def order(oid: str) -> Any:
        tenant = request.headers.get("X-Tenant-ID", "")
        if args.mode != "plain":
            import bridge

            bridge.annotate(tenant_id=tenant)
        with business_span():
            stock = requests.get(f"{args.inventory}/stock/sku-{oid}", timeout=10).json()
            with psycopg.connect(f"host=127.0.0.1 port={args.pg_port} user=postgres "
                                 "dbname=postgres", autocommit=True) as conn:
                conn.execute("SELECT 1").fetchall()
        return jsonify({"order": oid, "tenant": tenant, "stock": stock["count"]})

    server = make_server("127.0.0.1", args.port, app, threaded=True)
    write_ready(args.ready_file, server.server_address[1])
    server.serve_forever()


if __name__ == "__main__":
    main()
