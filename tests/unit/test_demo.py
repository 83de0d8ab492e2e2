"""The demo's pure parts: the waterfall, the per-tenant summary, the checkout ids and the
preflight errors (no kernel, no services)."""

from __future__ import annotations

import dataclasses
import itertools
import socket

import pytest

from kernel_side import demo
from kernel_side.demo import CLIENT, SERVER, DemoError
from kernel_side.otlp_receiver import ReceivedSpan

_IDS = itertools.count(1)
MS = 1_000_000


def _span(service: str, kind: int, start_ms: float, end_ms: float, trace: str,
          parent: str | None = None, status: int = 0, **attrs: object) -> ReceivedSpan:
    return ReceivedSpan(trace_id=trace, span_id=f"{next(_IDS):016x}", parent_span_id=parent,
                        name=str(attrs.get("url.path", "span")), kind=kind,
                        start_ns=int(start_ms * MS), end_ns=int(end_ms * MS),
                        attributes=dict(attrs), resource={"service.name": service},
                        status_code=status)


def _checkout(order: str, tenant: str, t0: float, orders_ms: float = 20.0,
              fail: bool = False) -> list[ReceivedSpan]:
    """One checkout as the agent exports it: the storefront's own trace, the orders trace with
    its four kinds of client call, and the callees' server spans in traces of their own."""
    code = 502 if fail else 200
    front = _span("storefront", SERVER, t0, t0 + orders_ms + 4, "f" * 32,
                  **{"url.path": f"/checkout/{order}", "http.request.method": "GET",
                     "http.response.status_code": code}, status=2 if fail else 0)
    call = _span("storefront", CLIENT, t0 + 1, t0 + orders_ms + 3, "f" * 32, front.span_id,
                 **{"url.full": f"http://127.0.0.1:1/orders/{order}",
                    "http.request.method": "GET"})
    trace = f"{next(_IDS):032x}"
    tid = {"tenant_id": tenant}
    orders = _span("orders", SERVER, t0 + 2, t0 + 2 + orders_ms, trace,
                   status=2 if fail else 0,
                   **{"url.path": f"/orders/{order}", "http.request.method": "GET",
                      "http.response.status_code": code, **tid})
    s0 = t0 + 3
    stock = _span("orders", CLIENT, s0, s0 + 5, trace, orders.span_id,
                  **{"url.full": f"http://127.0.0.1:2/stock/sku-{order}",
                     "http.request.method": "GET", "network.protocol.version": "1.1", **tid})
    inv = _span("inventory", SERVER, s0 + 1, s0 + 4, "1" * 32,
                **{"url.path": f"/stock/sku-{order}", "http.request.method": "GET"})
    out = [front, call, orders, stock, inv]
    if fail:
        return out
    out += [
        _span("orders", CLIENT, s0 + 6, s0 + 7, trace, orders.span_id,
              **{"db.system.name": "redis", "db.query.text": "GET ?", **tid}),
        _span("orders", CLIENT, s0 + 8, s0 + 12, trace, orders.span_id,
              **{"url.full": f"http://127.0.0.1:3/price/sku-{order}?tenant={tenant}",
                 "http.request.method": "GET", "network.protocol.version": "2", **tid}),
        _span("pricing", SERVER, s0 + 9, s0 + 11, "2" * 32,
              **{"url.path": f"/price/sku-{order}", "http.request.method": "GET",
                 "network.protocol.version": "2"}),
        _span("orders", CLIENT, s0 + 13, s0 + 15, trace, orders.span_id,
              **{"db.system.name": "postgresql",
                 "db.query.text": "INSERT INTO orders VALUES (?)", **tid}),
    ]
    return out


def test_order_ids_are_unique_and_every_seventh_fails() -> None:
    ids = [demo.order_id(k, i) for k in range(1, 5) for i in range(21)]
    assert len(set(ids)) == len(ids)
    fails = [i for i in range(21) if demo.order_id(1, i).startswith("fail-")]
    assert fails == [6, 13, 20]


def test_waterfall_shows_one_checkout_across_the_four_services() -> None:
    spans = _checkout("1000", "acme", 0) + _checkout("fail-1006", "acme", 100, fail=True)
    text, desc = demo.waterfall(spans, color=False)
    assert "\033[" not in text
    rows = desc["rows"]
    assert isinstance(rows, list)
    assert [(r["service"], r["kind"], r["depth"]) for r in rows] == [
        ("storefront", SERVER, 0), ("storefront", CLIENT, 1), ("orders", SERVER, 2),
        ("orders", CLIENT, 3), ("inventory", SERVER, 4), ("orders", CLIENT, 3),
        ("orders", CLIENT, 3), ("pricing", SERVER, 4), ("orders", CLIENT, 3)]
    # The successful checkout is the one shown, never the failed one.
    assert all("fail" not in str(r["operation"]) for r in rows)
    assert [r["operation"] for r in rows][2:5] == [
        "GET /orders/1000", "GET /stock/sku-1000", "GET /stock/sku-1000"]
    assert {r["tenant_id"] for r in rows if r["service"] == "orders"} == {"acme"}
    assert desc["orders_trace_id"] == rows[2]["trace_id"]
    lines = text.splitlines()
    table = [line for line in lines if line.startswith(("storefront", "orders", "inventory",
                                                        "pricing"))]
    assert len(table) == len(rows)
    # The first row covers the whole request: its bar is the full width.
    assert "█" * 36 in table[0]
    assert " 24.00 " in table[0]  # duration in ms
    assert "  redis: GET ?" in table[5] and "acme" in table[5]
    assert "h2 GET /price/sku-1000" in table[6]
    # Callees found by URL and time are in traces of their own, and the text says so.
    assert "Not in it: inventory, pricing, storefront" in text


def test_waterfall_marks_error_rows_and_handles_no_request() -> None:
    assert demo.waterfall([], color=False)[0] == "(no annotated orders server span found)"
    spans = _checkout("1000", "acme", 0)
    spans[4] = dataclasses.replace(spans[4], status_code=2)  # the inventory server span
    text, _ = demo.waterfall(spans, color=True)
    (row,) = [line for line in text.splitlines() if "inventory" in line and "SERVER" in line]
    assert row.startswith(demo._RED)


def test_tenant_summary_counts_requests_errors_and_context_spans() -> None:
    spans = []
    for i, d in enumerate((10.0, 20.0, 30.0, 40.0)):
        spans += _checkout(f"1{i:03d}", "acme", i * 100, orders_ms=d)
    spans += _checkout("fail-1006", "acme", 900, orders_ms=100.0, fail=True)
    spans += _checkout("2000", "globex", 1000, orders_ms=50.0)
    spans += _checkout("warmup", "warmup-0", 2000)
    summary = demo.tenant_summary(spans)
    assert list(summary) == ["acme", "globex"]  # warm-up left out
    acme = summary["acme"]
    assert acme["requests"] == 5 and acme["errors"] == 1
    assert acme["p50_ms"] == 30.0
    assert acme["p99_ms"] == 100.0
    # 4 client calls per good checkout, 1 for the failed one; 2 of the 4 are PostgreSQL/Redis.
    assert acme["client_spans"] == 17 and acme["db_spans"] == 8
    assert summary["globex"] == {"requests": 1, "p50_ms": 50.0, "p99_ms": 50.0, "errors": 0,
                                 "client_spans": 4, "db_spans": 2}
    table = demo.format_summary(summary, color=False)
    lines = table.splitlines()
    assert lines[0].split()[:5] == ["tenant", "requests", "p50", "ms", "p99"]
    assert lines[1].split()[:5] == ["acme", "5", "30.00", "100.00", "1"]
    assert "latency: the orders service's server span" in table


def test_preflight_refuses_a_non_root_user_first() -> None:
    with pytest.raises(DemoError, match=r"needs root \(this is uid 1000\).*sudo bash "
                                        r"scripts/demo.sh"):
        demo.preflight(0, euid=1000)
    demo.check_root(0)


def test_preflight_names_a_port_in_use() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(DemoError, match=rf"port {port} is in use.*--port.*"
                                            rf"ss -ltnp 'sport = :{port}'"):
            demo.check_port(port)
    demo.check_port(port)  # free again once closed
    demo.check_port(0)  # 0: any free port, never in use
