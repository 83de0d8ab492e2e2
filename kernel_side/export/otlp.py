"""OTLP exporters: gRPC (``grpc``) and HTTP (``http/protobuf``), per the OTLP specification."""

from __future__ import annotations

import logging
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence

import grpc
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from kernel_side.export.base import SpanExporter
from kernel_side.export.otlp_wire import encode_export_request
from kernel_side.model import SpanRecord

logger = logging.getLogger(__name__)

TRACES_PATH = "/v1/traces"
# The OTLP/gRPC method; the request goes out as bytes already serialized (otlp_wire).
EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
PROTOBUF_CONTENT_TYPE = "application/x-protobuf"

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

# gRPC's default reconnect backoff grows to 120 s, so after a collector outage the agent would
# keep failing fast for up to two minutes after the collector is back (an RPC without
# wait-for-ready fails at once while the channel sits in its backoff). The batch layer already
# backs off between attempts; keep the channel's own backoff at most 1 s, one cheap connect
# attempt per second to a collector that is normally node-local.
_GRPC_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def _log_partial_success(response: ExportTraceServiceResponse, endpoint: str) -> None:
    partial = response.partial_success
    if partial.rejected_spans or partial.error_message:
        # Rejected spans are the receiver's verdict on the data; resending would not help.
        logger.warning(
            "OTLP receiver %s rejected %d spans: %s",
            endpoint,
            partial.rejected_spans,
            partial.error_message,
        )


def grpc_target(endpoint: str, insecure: bool | None = None) -> tuple[str, bool]:
    """(``host:port`` target, use TLS) for an OTLP/gRPC endpoint.

    The scheme decides when present (``http`` plaintext, ``https`` TLS), as the OTLP exporter
    spec says. Without a scheme ``insecure`` decides; its default here is plaintext rather than
    the spec's TLS, because the agent normally talks to a node-local Collector.
    """
    if _SCHEME.match(endpoint):
        parts = urllib.parse.urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(
                f"OTLP gRPC endpoint {endpoint!r}: use http://host:port, https://host:port "
                "or host:port"
            )
        return parts.netloc, parts.scheme == "https"
    if not endpoint:
        raise ValueError("OTLP gRPC endpoint is empty: use http://host:4317 or host:4317")
    return endpoint.rstrip("/"), insecure is False


class OtlpGrpcExporter(SpanExporter):
    """OTLP/gRPC ``TraceService/Export`` over one long-lived channel.

    Fails fast while the receiver is unreachable (no wait-for-ready), so ``export`` returns False
    promptly and the batch layer owns retry and backoff.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        insecure: bool | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self.endpoint = endpoint
        target, tls = grpc_target(endpoint, insecure)
        if tls:
            self._channel = grpc.secure_channel(
                target, grpc.ssl_channel_credentials(), options=_GRPC_CHANNEL_OPTIONS
            )
        else:
            self._channel = grpc.insecure_channel(target, options=_GRPC_CHANNEL_OPTIONS)
        self._export = self._channel.unary_unary(
            EXPORT_METHOD,
            request_serializer=None,  # the request is bytes from encode_export_request
            response_deserializer=ExportTraceServiceResponse.FromString,
        )
        # gRPC metadata keys must be lowercase; OTEL_EXPORTER_OTLP_HEADERS often are not.
        self._metadata = tuple((k.lower(), v) for k, v in (headers or {}).items())
        self._timeout_s = timeout_s
        self._closed = False

    def export(self, spans: Sequence[SpanRecord]) -> bool:
        """One Export RPC; False (logged) on any RPC error or after shutdown."""
        if not spans:
            return True
        if self._closed:
            logger.warning("OTLP gRPC export after shutdown: %d spans", len(spans))
            return False
        request = encode_export_request(spans)
        try:
            response = self._export(request, timeout=self._timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            logger.warning(
                "OTLP gRPC export of %d spans to %s failed: %s %s",
                len(spans),
                self.endpoint,
                exc.code(),
                exc.details(),
            )
            return False
        except ValueError as exc:
            # grpc raises ValueError when the channel was closed by a concurrent shutdown.
            logger.warning("OTLP gRPC export to %s failed: %s", self.endpoint, exc)
            return False
        _log_partial_success(response, self.endpoint)
        return True

    def shutdown(self) -> None:
        """Close the channel, cancelling any RPC in flight; idempotent."""
        self._closed = True
        self._channel.close()


def http_traces_url(endpoint: str) -> str:
    """The URL to POST to: ``endpoint`` as is if it has a path, else ``<endpoint>/v1/traces``.

    A scheme-less ``host:port`` means plain ``http``.
    """
    if not _SCHEME.match(endpoint):
        endpoint = "http://" + endpoint
    parts = urllib.parse.urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"OTLP HTTP endpoint {endpoint!r}: use http://host:4318 or https://host:4318"
        )
    if parts.path in ("", "/"):
        parts = parts._replace(path=TRACES_PATH)
    return urllib.parse.urlunsplit(parts)


class OtlpHttpExporter(SpanExporter):
    """OTLP/HTTP with binary protobuf bodies (``http/protobuf``), using only ``urllib``."""

    def __init__(
        self,
        endpoint: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self.url = http_traces_url(endpoint)
        self._headers = {**(headers or {}), "Content-Type": PROTOBUF_CONTENT_TYPE}
        self._timeout_s = timeout_s
        self._closed = False

    def export(self, spans: Sequence[SpanRecord]) -> bool:
        """One POST; True on a 2xx answer, False (logged) on anything else or after shutdown."""
        if not spans:
            return True
        if self._closed:
            logger.warning("OTLP HTTP export after shutdown: %d spans", len(spans))
            return False
        body = encode_export_request(spans)
        request = urllib.request.Request(self.url, data=body, headers=self._headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self._timeout_s) as reply:
                answer = reply.read()
                content_type = reply.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            detail = exc.read(512).decode("utf-8", "replace")
            logger.warning(
                "OTLP HTTP export of %d spans to %s failed: HTTP %d %s",
                len(spans),
                self.url,
                exc.code,
                detail,
            )
            return False
        except (OSError, ValueError) as exc:
            # URLError, timeouts and connection resets are all OSErrors.
            logger.warning(
                "OTLP HTTP export of %d spans to %s failed: %s", len(spans), self.url, exc
            )
            return False
        if answer and content_type.startswith(PROTOBUF_CONTENT_TYPE):
            response = ExportTraceServiceResponse()
            try:
                response.ParseFromString(answer)
            except DecodeError:
                logger.warning("OTLP HTTP receiver %s sent an unparsable response", self.url)
            else:
                _log_partial_success(response, self.url)
        return True

    def shutdown(self) -> None:
        """Refuse further exports; urllib holds no connection between calls."""
        self._closed = True
