"""One trace, one span per operation, whether or not the app also runs the OpenTelemetry SDK.

A real Flask service (tests/e2e/apps/otel_app.py) calls a real inventory service with requests
and a real PostgreSQL with psycopg. The agent traces both services and the SDK (when the app
runs it) exports to the same real OTLP receiver, so the test sees what a backend would: both
exporters' spans together. Four set-ups:

1. agent only;  2. agent + bridge.annotate;
3. agent + SDK with the Flask and requests instrumentations + BridgeSpanProcessor + annotate;
4. agent + SDK used only for one manual business span nested under the kernel's server span.

In every case, for every request: exactly one server span in each service, exactly one HTTP
client span, exactly one PostgreSQL span; one trace id for all of them; each span's parent is
the span that caused it; the tenant on the app's spans where the app annotated.
"""

from __future__ import annotations

import secrets

import pytest
import requests

from kernel_side.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.e2e.conftest import APPS, CLIENT, EXAMPLES, SERVER, Harness, by_service
from tests.e2e.reliability import final_stats
from tests.e2e.test_postgres import PG_BIN, pg_port

__all__ = ["pg_port"]  # the fixture, used by name below

APP = APPS / "otel_app.py"
N = 5


def _pg(spans: list[ReceivedSpan], trace_id: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.trace_id == trace_id
            and s.attributes.get("db.system.name") == "postgresql"
            and s.attributes.get("db.operation.name") == "SELECT"]


def _warm(receiver: OtlpReceiver, port: int, annotated: bool) -> None:
    """Send marked requests until the agent's PostgreSQL span of one arrives (with its tenant
    when the app annotates: the app's SDK has found the agent's map)."""
    for attempt in range(30):
        tenant = f"warm{attempt}"
        requests.get(f"http://127.0.0.1:{port}/order/warm{attempt}",
                     headers={"X-Tenant-ID": tenant}, timeout=10)
        try:
            receiver.wait_for(lambda ss, t=tenant: any(  # type: ignore[misc]
                s.attributes.get("db.system.name") == "postgresql"
                and (not annotated or s.attributes.get("tenant_id") == t) for s in ss),
                timeout_s=2)
            return
        except AssertionError:
            continue
    raise AssertionError("no annotated PostgreSQL span from the app")


@pytest.mark.skipif(not (PG_BIN / "postgres").exists(), reason="PostgreSQL not installed")
@pytest.mark.parametrize("mode", ["plain", "annotate", "sdk", "manual"])
def test_one_trace_one_span_per_operation(mode: str, harness: Harness, receiver: OtlpReceiver,
                                          pg_port: int) -> None:
    inv, inv_port = harness.python_service("inventory", EXAMPLES / "python/inventory.py")
    app, port = harness.python_service(
        "shop", APP, mode, "--inventory", f"http://127.0.0.1:{inv_port}",
        "--pg-port", str(pg_port), "--otlp", receiver.grpc_endpoint,
        env={"OTEL_SEMCONV_STABILITY_OPT_IN": "http"})
    agent = harness.agent("--pid", str(app.pid), "--pid", str(inv.pid), receiver=receiver)
    annotated = mode != "plain"
    _warm(receiver, port, annotated)

    tag = secrets.token_hex(3)
    for i in range(N):
        r = requests.get(f"http://127.0.0.1:{port}/order/{tag}-{i}",
                         headers={"X-Tenant-ID": f"t{tag}-{i}"}, timeout=10)
        assert r.status_code == 200 and r.json()["tenant"] == f"t{tag}-{i}"

    def complete(ss: list[ReceivedSpan]) -> bool:
        """Every span the checks look at has arrived, from whichever exporter makes it (the
        SDK's batch processor and the agent export on their own schedules)."""
        inv_paths = {s.attributes.get("url.path") for s in by_service(ss, "inventory", SERVER)}
        shop = by_service(ss, "shop")
        tagged = [s for s in shop if s.kind == SERVER
                  and str(s.attributes.get("url.path", "")).startswith(f"/order/{tag}-")]
        srv_paths = {s.attributes.get("url.path") for s in tagged}
        traces = {s.trace_id for s in tagged}
        urls = [str(s.attributes.get("url.full", "")) for s in shop if s.kind == CLIENT]
        return (all(f"/stock/sku-{tag}-{i}" in inv_paths and f"/order/{tag}-{i}" in srv_paths
                    and any(u.endswith(f"/stock/sku-{tag}-{i}") for u in urls)
                    for i in range(N))
                and sum(s.attributes.get("db.system.name") == "postgresql" and tag in str(
                    s.attributes.get("tenant_id", tag)) for s in shop) >= N
                and (mode != "manual"
                     or sum(s.name == "price-check" and s.trace_id in traces for s in shop) >= N))

    spans = receiver.wait_for(complete, timeout_s=60)
    if mode == "manual":
        # A caller's traceparent: the agent continues that trace, and so does the manual span.
        caller_trace = secrets.token_hex(16)
        r = requests.get(f"http://127.0.0.1:{port}/order/{tag}-tp", timeout=10, headers={
            "X-Tenant-ID": f"t{tag}-tp", "traceparent": f"00-{caller_trace}-{'ab' * 8}-01"})
        assert r.status_code == 200
        spans = receiver.wait_for(lambda ss: any(
            s.name == "price-check" and s.trace_id == caller_trace for s in ss), timeout_s=30)
    assert agent.stop() == 0  # flushes everything the agent still held
    spans = receiver.spans()
    shop = by_service(spans, "shop")
    for i in range(N):
        where = f"{mode} request {i}"
        server = [s for s in by_service(spans, "shop", SERVER)
                  if s.attributes.get("url.path") == f"/order/{tag}-{i}"]
        assert len(server) == 1, f"{where}: {len(server)} server spans"
        srv = server[0]
        http = [s for s in by_service(spans, "shop", CLIENT)
                if str(s.attributes.get("url.full", "")).endswith(f"/stock/sku-{tag}-{i}")]
        assert len(http) == 1, f"{where}: {len(http)} http client spans"
        pg = _pg(shop, srv.trace_id)
        assert len(pg) == 1, f"{where}: {len(pg)} postgresql spans in the trace"
        inv_srv = [s for s in by_service(spans, "inventory", SERVER)
                   if s.attributes.get("url.path") == f"/stock/sku-{tag}-{i}"]
        assert len(inv_srv) == 1, f"{where}: {len(inv_srv)} inventory server spans"

        parent = srv.span_id
        if mode == "manual":
            manual = [s for s in shop if s.name == "price-check" and s.trace_id == srv.trace_id]
            assert len(manual) == 1, f"{where}: {len(manual)} manual spans in the trace"
            assert manual[0].parent_span_id == srv.span_id, where
            parent = manual[0].span_id
        trace = {srv.trace_id, http[0].trace_id, pg[0].trace_id, inv_srv[0].trace_id}
        assert len(trace) == 1, f"{where}: {len(trace)} trace ids"
        assert http[0].parent_span_id == parent, where
        assert pg[0].parent_span_id == parent, where
        assert inv_srv[0].parent_span_id == http[0].span_id, where
        if annotated:
            for s in (srv, http[0], pg[0]):
                assert s.attributes.get("tenant_id") == f"t{tag}-{i}", (where, s.name)
        else:
            assert not any("tenant_id" in s.attributes for s in (srv, http[0], pg[0])), where
    if mode == "manual":
        tp_server = [s for s in by_service(spans, "shop", SERVER)
                     if s.attributes.get("url.path") == f"/order/{tag}-tp"]
        assert len(tp_server) == 1 and tp_server[0].trace_id == caller_trace
        assert tp_server[0].parent_span_id == "ab" * 8
        tp_manual = [s for s in shop if s.name == "price-check" and s.trace_id == caller_trace]
        assert len(tp_manual) == 1 and tp_manual[0].parent_span_id == tp_server[0].span_id
    # Who made which span: the SDK's spans win where both saw the operation.
    st = final_stats(agent.log_text())
    sdk_made = {(s.kind, s.name) for s in shop
                if s.resource.get("telemetry.sdk.name") == "opentelemetry"}
    if mode == "sdk":
        # The SDK made the server and HTTP client spans; the agent dropped its own (counted)
        # and parented its PostgreSQL spans under the SDK's server span.
        assert (SERVER, "GET /order/<oid>") in sdk_made and (CLIENT, "GET") in sdk_made, sdk_made
        assert st["sdk_covered"] >= 2 * N and st["sdk_parented"] >= N, st
    elif mode == "manual":
        assert sdk_made == {(1, "price-check")}, sdk_made
        assert st["sdk_covered"] == 0 and st["sdk_parented"] >= 2 * N, st
    else:
        assert not sdk_made and st["sdk_covered"] == st["sdk_parented"] == 0, st
    print(f"\n{mode}: {N} requests, one span per operation in one trace; SDK spans "
          f"{sorted(sdk_made)}; agent sdk_covered={st['sdk_covered']} "
          f"sdk_parented={st['sdk_parented']}")
