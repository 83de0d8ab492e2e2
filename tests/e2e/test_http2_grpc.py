"""HTTP/2 and gRPC through the kernel's stream mode: real grpcio and hypercorn/httpx peers."""

from __future__ import annotations

import requests

from kernel_side.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.e2e.apps.h2_app import STREAM_PAUSE_S
from tests.e2e.conftest import APPS, CLIENT, PYTHON, SERVER, Harness, by_service
from tests.e2e.test_annotate_http import warm_up

APP = str(APPS / "h2_app.py")
TP_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TP_PARENT = "00f067aa0ba902b7"


def _server(h: Harness, name: str, mode: str) -> tuple[int, int]:
    ready = h.tmp / f"{name}.ready"
    proc = h.start(name, [PYTHON, APP, mode, "--ready-file", str(ready)],
                   env={"OTEL_SERVICE_NAME": name}, ready_file=ready, timeout=60)
    return proc.pid, int(ready.read_text())


def _client(h: Harness, name: str, mode: str, port: int) -> tuple[int, str]:
    go = h.tmp / f"{name}.go"
    proc = h.start(name, [PYTHON, APP, mode, "--port", str(port), "--go-file", str(go)],
                   env={"OTEL_SERVICE_NAME": name})
    return proc.pid, str(go)


def _named(spans: list[ReceivedSpan], service: str, kind: int, name: str) -> list[ReceivedSpan]:
    return [s for s in by_service(spans, service, kind) if s.name == name]


def test_grpc_unary_streaming_and_error_both_sides(harness: Harness,
                                                   receiver: OtlpReceiver) -> None:
    srv_pid, port = _server(harness, "catalog", "grpc-server")
    cli_pid, go = _client(harness, "shopper", "grpc-client", port)
    harness.agent("--pid", str(srv_pid), "--pid", str(cli_pid), receiver=receiver)
    open(go, "w").close()
    methods = ("shop.v1.Catalog/GetItem", "shop.v1.Catalog/ListItems", "shop.v1.Catalog/Lookup")

    def done(ss: list[ReceivedSpan]) -> bool:
        return all(_named(ss, svc, kind, m) for m in methods
                   for svc, kind in (("catalog", SERVER), ("shopper", CLIENT)))

    spans = receiver.wait_for(done, timeout_s=30)
    for svc, kind in (("catalog", SERVER), ("shopper", CLIENT)):
        for m in methods:
            got = _named(spans, svc, kind, m)
            assert len(got) == 1, (svc, m, len(got))
            s = got[0]
            assert s.attributes["rpc.system"] == "grpc"
            assert s.attributes["rpc.service"] == "shop.v1.Catalog"
            assert s.attributes["rpc.method"] == m.rsplit("/", 1)[1]
            assert s.end_ns >= s.start_ns
    ok = _named(spans, "catalog", SERVER, methods[0])[0]
    assert ok.attributes["rpc.grpc.status_code"] == 0 and ok.status_code == 0
    assert ok.trace_id == TP_TRACE and ok.parent_span_id == TP_PARENT
    assert ok.attributes["server.port"] == port
    stream = _named(spans, "shopper", CLIENT, methods[1])[0]
    assert stream.attributes["rpc.grpc.status_code"] == 0
    assert stream.attributes["server.port"] == port
    # NOT_FOUND is the caller's error, not the server's (gRPC semantic conventions).
    nf_client = _named(spans, "shopper", CLIENT, methods[2])[0]
    nf_server = _named(spans, "catalog", SERVER, methods[2])[0]
    assert nf_client.attributes["rpc.grpc.status_code"] == 5
    assert nf_client.status_code == 2 and nf_client.attributes["error.type"] == "NOT_FOUND"
    assert nf_server.attributes["rpc.grpc.status_code"] == 5 and nf_server.status_code == 0
    assert "error.type" not in nf_server.attributes  # not the server's failure (README: Spans)
    # Same-node stitching: calls that carried no traceparent join the caller's trace, with the
    # caller's CLIENT span as parent (stream n of the connection is stream n at both ends).
    for m in methods[1:]:
        cli = _named(spans, "shopper", CLIENT, m)[0]
        srv = _named(spans, "catalog", SERVER, m)[0]
        assert srv.parent_span_id == cli.span_id and srv.trace_id == cli.trace_id, m


def test_grpc_client_and_bidirectional_streaming_both_sides(harness: Harness,
                                                            receiver: OtlpReceiver) -> None:
    """A client-streaming and two bidirectional calls (one aborted by the server): one span
    per call on each side, from the first frame to the end of the stream."""
    srv_pid, port = _server(harness, "catalog", "grpc-server")
    cli_pid, go = _client(harness, "shopper", "grpc-client", port)
    harness.agent("--pid", str(srv_pid), "--pid", str(cli_pid), receiver=receiver)
    open(go, "w").close()
    # method -> (gRPC status, pauses between its first frame and the end of its stream)
    calls = {"RecordItems": (0, 2), "Chat": (0, 2), "ChatAbort": (13, 1)}

    def done(ss: list[ReceivedSpan]) -> bool:
        return all(_named(ss, svc, kind, f"shop.v1.Catalog/{m}") for m in calls
                   for svc, kind in (("catalog", SERVER), ("shopper", CLIENT)))

    spans = receiver.wait_for(done, timeout_s=30)
    # The client pauses between its messages: a span that began at the first frame and ended
    # with the stream lasts at least the pauses in between (ChatAbort ends at the second).
    for method, (code, pauses) in calls.items():
        min_ns = int(pauses * STREAM_PAUSE_S * 1e9)
        full = f"shop.v1.Catalog/{method}"
        cli = _named(spans, "shopper", CLIENT, full)
        srv = _named(spans, "catalog", SERVER, full)
        assert len(cli) == 1 and len(srv) == 1, (method, len(cli), len(srv))
        for s in cli + srv:
            assert s.attributes["rpc.system"] == "grpc"
            assert s.attributes["rpc.service"] == "shop.v1.Catalog"
            assert s.attributes["rpc.method"] == method
            assert s.attributes["rpc.grpc.status_code"] == code
            assert s.end_ns - s.start_ns >= min_ns, (method, s.kind, s.end_ns - s.start_ns)
        assert srv[0].parent_span_id == cli[0].span_id and srv[0].trace_id == cli[0].trace_id
        assert cli[0].attributes["server.port"] == port
        assert srv[0].attributes["server.port"] == port
        if code:
            # INTERNAL is an error on both sides (gRPC semantic conventions).
            for s in cli + srv:
                assert s.status_code == 2 and s.attributes["error.type"] == "INTERNAL"
        else:
            for s in cli + srv:
                assert s.status_code == 0 and "error.type" not in s.attributes


def test_h2c_prior_knowledge_httpx_against_hypercorn(harness: Harness,
                                                     receiver: OtlpReceiver) -> None:
    srv_pid, port = _server(harness, "h2web", "h2c-server")
    cli_pid, go = _client(harness, "h2caller", "h2c-client", port)
    harness.agent("--pid", str(srv_pid), "--pid", str(cli_pid), receiver=receiver)
    open(go, "w").close()

    def done(ss: list[ReceivedSpan]) -> bool:
        return (len(by_service(ss, "h2web", SERVER)) >= 2
                and len(by_service(ss, "h2caller", CLIENT)) >= 2)

    spans = receiver.wait_for(done, timeout_s=30)
    servers = {s.attributes["url.path"]: s for s in by_service(spans, "h2web", SERVER)}
    assert set(servers) == {"/hello", "/missing"}
    hello = servers["/hello"]
    assert hello.name == "GET"
    assert hello.attributes["http.response.status_code"] == 200
    assert hello.attributes["network.protocol.version"] == "2"
    assert hello.trace_id == TP_TRACE and hello.parent_span_id == TP_PARENT
    assert servers["/missing"].attributes["http.response.status_code"] == 404
    assert servers["/missing"].status_code == 0
    assert servers["/missing"].name == "GET"
    clients = {s.attributes["url.full"].rsplit("/", 1)[1]: s
               for s in by_service(spans, "h2caller", CLIENT)}
    assert clients["missing"].status_code == 2
    assert clients["hello"].attributes["http.response.status_code"] == 200
    missing = servers["/missing"]
    assert missing.parent_span_id == clients["missing"].span_id
    assert missing.trace_id == clients["missing"].trace_id


def test_annotated_http_service_calling_grpc(harness: Harness, receiver: OtlpReceiver) -> None:
    """The tenant set in an HTTP handler lands on the gRPC client span, a child of the
    request's server span — when grpcio writes the call from the handler's own thread."""
    srv_pid, gport = _server(harness, "catalog", "grpc-server")
    ready = harness.tmp / "front.ready"
    front = harness.start("front", [PYTHON, APP, "annotated", "--grpc-port", str(gport),
                                    "--ready-file", str(ready)],
                          env={"OTEL_SERVICE_NAME": "front"}, ready_file=ready)
    port = int(ready.read_text())
    harness.agent("--pid", str(front.pid), "--pid", str(srv_pid), receiver=receiver)
    warm_up(receiver, port)
    tenants = [f"g-{i}" for i in range(6)]
    for t in tenants:
        assert requests.get(f"http://127.0.0.1:{port}/item/{t}", headers={"X-Tenant-ID": t},
                            timeout=10).status_code == 200

    def done(ss: list[ReceivedSpan]) -> bool:
        got = {s.attributes.get("tenant_id") for s in by_service(ss, "front", CLIENT)}
        return set(tenants) <= got

    spans = receiver.wait_for(done, timeout_s=30)
    servers = {s.attributes.get("tenant_id"): s for s in by_service(spans, "front", SERVER)}
    for t in tenants:
        calls = [s for s in by_service(spans, "front", CLIENT)
                 if s.attributes.get("tenant_id") == t]
        assert len(calls) == 1
        call = calls[0]
        assert call.name == "shop.v1.Catalog/GetItem"
        assert call.parent_span_id == servers[t].span_id
        assert call.trace_id == servers[t].trace_id


def test_h2c_upgrade_from_http11(harness: Harness, receiver: OtlpReceiver) -> None:
    """curl --http2 asks for `Upgrade: h2c`; after the 101 the connection speaks HTTP/2 and
    the answer comes on stream 1. One span per side, with the request line from HTTP/1.1."""
    import subprocess

    srv_pid, port = _server(harness, "h2web", "h2c-server")
    harness.agent("--pid", str(srv_pid), "--exe", "curl", receiver=receiver)
    out = subprocess.run(["curl", "-s", "--http2", "-o", "/dev/null", "-w", "%{http_version}",
                          f"http://127.0.0.1:{port}/hello"], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    assert out == "2"

    def done(ss: list[ReceivedSpan]) -> bool:
        return bool(by_service(ss, "h2web", SERVER)) and any(
            s.resource.get("service.name") == "curl" and s.kind == CLIENT for s in ss)

    spans = receiver.wait_for(done, timeout_s=30)
    servers = by_service(spans, "h2web", SERVER)
    assert len(servers) == 1, [(s.name, s.attributes) for s in servers]
    srv = servers[0]
    assert srv.attributes["http.request.method"] == "GET"
    assert srv.attributes["url.path"] == "/hello"
    assert srv.attributes["http.response.status_code"] == 200
    assert srv.attributes["network.protocol.version"] == "2"
    clients = [s for s in spans if s.resource.get("service.name") == "curl"]
    assert len(clients) == 1
    assert clients[0].attributes["http.response.status_code"] == 200
    assert clients[0].attributes["url.full"].endswith("/hello")
