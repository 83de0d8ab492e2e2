"""Attribute names from the pinned OpenTelemetry semantic conventions: the one registry.

Every span attribute the agent writes is named here, so a semconv upgrade is one file.
"""

from __future__ import annotations

from typing import Final

SEMCONV_VERSION: Final = "1.37.0"
SCHEMA_URL: Final = f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"
SCOPE_NAME: Final = "ebpf-bridge"

# Resource
SERVICE_NAME: Final = "service.name"
PROCESS_PID: Final = "process.pid"
PROCESS_EXECUTABLE_NAME: Final = "process.executable.name"
HOST_NAME: Final = "host.name"
TELEMETRY_SDK_NAME: Final = "telemetry.sdk.name"
TELEMETRY_SDK_LANGUAGE: Final = "telemetry.sdk.language"
TELEMETRY_SDK_VERSION: Final = "telemetry.sdk.version"

# HTTP
HTTP_REQUEST_METHOD: Final = "http.request.method"
HTTP_RESPONSE_STATUS_CODE: Final = "http.response.status_code"
HTTP_ROUTE: Final = "http.route"
HTTP_REQUEST_BODY_SIZE: Final = "http.request.body.size"
HTTP_RESPONSE_BODY_SIZE: Final = "http.response.body.size"
URL_PATH: Final = "url.path"
URL_QUERY: Final = "url.query"
URL_FULL: Final = "url.full"
URL_SCHEME: Final = "url.scheme"
USER_AGENT_ORIGINAL: Final = "user_agent.original"
NETWORK_PROTOCOL_NAME: Final = "network.protocol.name"
NETWORK_PROTOCOL_VERSION: Final = "network.protocol.version"

# Network
SERVER_ADDRESS: Final = "server.address"
SERVER_PORT: Final = "server.port"
CLIENT_ADDRESS: Final = "client.address"
CLIENT_PORT: Final = "client.port"
NETWORK_PEER_ADDRESS: Final = "network.peer.address"
NETWORK_PEER_PORT: Final = "network.peer.port"

ERROR_TYPE: Final = "error.type"
TLS_PROTOCOL_NAME: Final = "tls.protocol.name"

# Attributes of our own, namespaced so they cannot collide with semconv or business keys.
BRIDGE_TRUNCATED: Final = "ebpf_bridge.capture.truncated"
BRIDGE_CONTEXT_TRUNCATED: Final = "ebpf_bridge.context.truncated"
BRIDGE_THREAD_AMBIGUOUS: Final = "ebpf_bridge.thread.ambiguous"
"""An HTTP/2 client span whose request went out in one write with other streams' requests:
its thread's parent request and business context are unknown, so neither was applied."""

# Database
DB_SYSTEM_NAME: Final = "db.system.name"
DB_NAMESPACE: Final = "db.namespace"
DB_OPERATION_NAME: Final = "db.operation.name"
DB_COLLECTION_NAME: Final = "db.collection.name"
DB_QUERY_TEXT: Final = "db.query.text"
DB_RESPONSE_STATUS_CODE: Final = "db.response.status_code"

# RPC (semconv 1.37 names; RPC conventions were not yet stable in that version)
RPC_SYSTEM: Final = "rpc.system"
RPC_SERVICE: Final = "rpc.service"
RPC_METHOD: Final = "rpc.method"
RPC_GRPC_STATUS_CODE: Final = "rpc.grpc.status_code"
