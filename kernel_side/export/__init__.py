"""Span export: SpanRecords to OTLP (gRPC, HTTP), OTLP/JSON lines on disk, or the terminal.

``make_exporter`` turns the agent's configuration into one exporter; wrap it in
:class:`BatchExporter` to keep the hot path non-blocking.
"""

from __future__ import annotations

import sys
from typing import TextIO

from kernel_side.export.base import SpanExporter
from kernel_side.export.batch import BatchExporter
from kernel_side.export.console import ConsoleExporter, format_span
from kernel_side.export.jsonl import JsonlExporter
from kernel_side.export.otlp import OtlpGrpcExporter, OtlpHttpExporter
from kernel_side.export.otlp_json import to_otlp_json
from kernel_side.export.otlp_proto import to_export_request

__all__ = [
    "EXPORTER_KINDS",
    "OTLP_PROTOCOLS",
    "BatchExporter",
    "ConsoleExporter",
    "JsonlExporter",
    "OtlpGrpcExporter",
    "OtlpHttpExporter",
    "SpanExporter",
    "format_span",
    "make_exporter",
    "to_export_request",
    "to_otlp_json",
]

EXPORTER_KINDS = ("otlp", "jsonl", "console")
OTLP_PROTOCOLS = ("grpc", "http/protobuf")


def make_exporter(
    kind: str,
    *,
    endpoint: str | None,
    protocol: str | None,
    jsonl_path: str | None,
    stream: TextIO | None = None,
) -> SpanExporter:
    """Build the exporter for ``kind`` (``otlp``, ``jsonl`` or ``console``).

    ``protocol`` follows ``OTEL_EXPORTER_OTLP_PROTOCOL``: ``grpc`` (the default when None or
    empty) or ``http/protobuf``. Bad combinations raise ``ValueError`` saying what to change.
    """
    if kind == "otlp":
        if not endpoint:
            raise ValueError(
                "exporter 'otlp' needs an endpoint: set OTEL_EXPORTER_OTLP_ENDPOINT "
                "(e.g. http://localhost:4317), or choose the 'jsonl' or 'console' exporter"
            )
        chosen = (protocol or "grpc").strip().lower()
        if chosen == "grpc":
            return OtlpGrpcExporter(endpoint)
        if chosen == "http/protobuf":
            return OtlpHttpExporter(endpoint)
        hint = (
            "; for OTLP/JSON use the 'jsonl' exporter and a Collector otlpjsonfile receiver"
            if chosen == "http/json"
            else ""
        )
        raise ValueError(
            f"unsupported OTLP protocol {protocol!r}: set OTEL_EXPORTER_OTLP_PROTOCOL to one of "
            f"{', '.join(OTLP_PROTOCOLS)}{hint}"
        )
    if kind == "jsonl":
        if not jsonl_path:
            raise ValueError("exporter 'jsonl' needs a file path (jsonl_path)")
        return JsonlExporter(jsonl_path)
    if kind == "console":
        return ConsoleExporter(stream if stream is not None else sys.stdout)
    raise ValueError(f"unknown exporter kind {kind!r}: use one of {', '.join(EXPORTER_KINDS)}")
