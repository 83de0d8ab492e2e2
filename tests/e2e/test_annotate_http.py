"""A user's annotated Python service, traced by the agent, spans received over real OTLP/gRPC.

orders (threaded HTTP server, calls bridge.annotate from request headers, then calls inventory
over HTTP) and inventory (no ebpf-bridge code) run as real processes; many client threads
drive concurrent keep-alive requests, each with its own tenant.
"""

from __future__ import annotations

import os
import secrets
import threading
from pathlib import Path

import requests

from kernel_side.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.e2e.conftest import CLIENT, EXAMPLES, SERVER, Harness, by_service, warm_up_context

THREADS = 6
PER_THREAD = 5


def _drive(port: int, tag: str) -> list[dict[str, str]]:
    """Concurrent requests; returns what each request sent (tenant, path, traceparent)."""
    sent: list[dict[str, str]] = []
    lock = threading.Lock()

    def worker(t: int) -> None:
        with requests.Session() as s:  # keep-alive: many requests per connection
            for i in range(PER_THREAD):
                order = f"{t}{i}"
                req = {"tenant": f"{tag}-t{t}-r{i}", "user": f"u-{t}-{i}",
                       "path": f"/orders/{order}"}
                headers = {"X-Tenant-ID": req["tenant"], "X-User-ID": req["user"]}
                if i % 3 == 1:
                    req["trace_id"] = secrets.token_hex(16)
                    req["parent"] = secrets.token_hex(8)
                    headers["traceparent"] = f"00-{req['trace_id']}-{req['parent']}-01"
                r = s.get(f"http://127.0.0.1:{port}{req['path']}", headers=headers, timeout=10)
                assert r.status_code == 200, r.text
                assert r.json()["tenant"] == req["tenant"]
                with lock:
                    sent.append(req)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return sent


def warm_up(receiver: OtlpReceiver, port: int) -> None:
    """Wait until the app's SDK has found the agent's map.

    An app that imported bridge before the agent pinned its map re-checks at most once a
    second (a documented reconnect window), so send marked requests until one arrives
    annotated. Their spans use the path /orders/warm and are left out of the checks.
    """
    warm_up_context(receiver, lambda tenant: requests.get(
        f"http://127.0.0.1:{port}/orders/warm", headers={"X-Tenant-ID": tenant}, timeout=10))


def _not_warmup(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
    return [s for s in spans if "warm" not in str(s.attributes.get("url.path", ""))
            and "warm" not in str(s.attributes.get("url.full", ""))]


def _check_requests(spans: list[ReceivedSpan], sent: list[dict[str, str]], orders_port: int,
                    inventory_port: int, orders_service: str = "orders") -> None:
    spans = _not_warmup(spans)
    servers = by_service(spans, orders_service, SERVER)
    clients = by_service(spans, orders_service, CLIENT)
    inventory = by_service(spans, "inventory", SERVER)
    assert len(servers) == len(sent), f"{len(servers)} server spans for {len(sent)} requests"
    assert len(clients) == len(sent)
    assert len(inventory) == len(sent)
    for req in sent:
        mine = [s for s in servers if s.attributes.get("tenant_id") == req["tenant"]]
        assert len(mine) == 1, f"{req['tenant']}: {len(mine)} server spans"
        srv = mine[0]
        assert srv.attributes["user_id"] == req["user"]
        assert srv.attributes["feature_flag"] in ("new-checkout", "classic-checkout")
        assert srv.attributes["url.path"] == req["path"]
        assert srv.attributes["http.request.method"] == "GET"
        assert srv.attributes["http.response.status_code"] == 200
        assert srv.attributes["server.port"] == orders_port
        assert srv.attributes["client.address"] == "127.0.0.1"
        assert srv.name == "GET"
        if "trace_id" in req:
            assert srv.trace_id == req["trace_id"]
            assert srv.parent_span_id == req["parent"]
        else:
            assert srv.parent_span_id is None
        kids = [c for c in clients if c.attributes.get("tenant_id") == req["tenant"]]
        assert len(kids) == 1, f"{req['tenant']}: {len(kids)} client spans"
        kid = kids[0]
        assert kid.parent_span_id == srv.span_id
        assert kid.trace_id == srv.trace_id
        assert kid.attributes["user_id"] == req["user"]
        assert kid.attributes["server.port"] == inventory_port
        assert kid.attributes["http.response.status_code"] == 200
        sku = "sku-" + req["path"].rsplit("/", 1)[1]
        assert kid.attributes["url.full"].endswith(f"/stock/{sku}")
        assert srv.start_ns <= kid.start_ns <= kid.end_ns <= srv.end_ns
    # The service with no annotate call carries no business attributes.
    assert not any("tenant_id" in s.attributes for s in inventory)
    for s in servers + clients + inventory:
        assert s.resource["telemetry.sdk.name"] == "ebpf-bridge"
        assert s.resource["host.name"]


def test_concurrent_tenants_keep_alive_traceparent(harness: Harness,
                                                    receiver: OtlpReceiver) -> None:
    inventory, inv_port = harness.python_service("inventory", EXAMPLES / "python/inventory.py")
    orders, ord_port = harness.python_service(
        "orders", EXAMPLES / "python/orders.py", "--inventory", f"http://127.0.0.1:{inv_port}")
    agent = harness.agent("--pid", str(orders.pid), "--pid", str(inventory.pid),
                          receiver=receiver)
    warm_up(receiver, ord_port)
    sent = _drive(ord_port, "kc")
    n = len(sent)

    def enough(spans: list[ReceivedSpan]) -> bool:
        spans = _not_warmup(spans)
        return (len(by_service(spans, "orders", SERVER)) >= n
                and len(by_service(spans, "orders", CLIENT)) >= n
                and len(by_service(spans, "inventory", SERVER)) >= n)

    spans = receiver.wait_for(enough, timeout_s=30)
    _check_requests(spans, sent, ord_port, inv_port)

    # An error downstream: inventory answers 500, orders answers 502.
    r = requests.get(f"http://127.0.0.1:{ord_port}/orders/fail-9",
                     headers={"X-Tenant-ID": "err-tenant"}, timeout=10)
    assert r.status_code == 502
    spans = receiver.wait_for(
        lambda ss: any(s.attributes.get("tenant_id") == "err-tenant" and s.kind == SERVER
                       for s in ss) and any(s.attributes.get("url.path") == "/stock/sku-fail-9"
                                            for s in ss))
    srv = next(s for s in spans if s.attributes.get("tenant_id") == "err-tenant"
               and s.kind == SERVER)
    kid = next(s for s in spans if s.attributes.get("tenant_id") == "err-tenant"
               and s.kind == CLIENT)
    inv = next(s for s in spans if s.attributes.get("url.path") == "/stock/sku-fail-9")
    assert srv.status_code == 2 and srv.attributes["error.type"] == "502"
    assert kid.status_code == 2 and kid.attributes["error.type"] == "500"
    assert inv.status_code == 2 and inv.attributes["http.response.status_code"] == 500

    assert agent.stop() == 0, agent.log_text()
    assert "final stats" in agent.log_text()


def test_annotating_app_in_its_own_pid_namespace(harness: Harness,
                                                  receiver: OtlpReceiver) -> None:
    """As in a pod: the app cannot know its host tid; the context key is (pidns inode,
    namespaced tid) and the kernel computes the same with bpf_get_ns_current_pid_tgid."""
    inventory, inv_port = harness.python_service("inventory", EXAMPLES / "python/inventory.py")
    wrapper, ord_port = harness.python_service(
        "orders-ns", EXAMPLES / "python/orders.py", "--inventory",
        f"http://127.0.0.1:{inv_port}", prefix=["unshare", "--pid", "--fork", "--mount-proc"])
    children = Path(f"/proc/{wrapper.pid}/task/{wrapper.pid}/children").read_text().split()
    assert len(children) == 1
    app_pid = int(children[0])
    assert os.stat(f"/proc/{app_pid}/ns/pid").st_ino != os.stat("/proc/self/ns/pid").st_ino
    harness.agent("--pid", str(app_pid), "--pid", str(inventory.pid), receiver=receiver)
    warm_up(receiver, ord_port)
    sent = _drive(ord_port, "ns")
    n = len(sent)
    spans = receiver.wait_for(
        lambda ss: len(by_service(_not_warmup(ss), "orders-ns", SERVER)) >= n
        and len(by_service(_not_warmup(ss), "orders-ns", CLIENT)) >= n
        and len(by_service(_not_warmup(ss), "inventory", SERVER)) >= n, timeout_s=30)
    _check_requests(spans, sent, ord_port, inv_port, orders_service="orders-ns")
    # Resources report the host pid, not the namespaced one (which is 1 here).
    assert {s.resource["process.pid"] for s in by_service(spans, "orders-ns")} == {app_pid}
