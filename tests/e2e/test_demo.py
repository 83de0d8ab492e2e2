"""``ebpf-bridge demo`` end to end: the polyglot shop (Node storefront, Python orders, Go
pricing, Java inventory, PostgreSQL, Redis) traced by a real agent, checked on the spans it
exported to the OTLP-JSON-lines file."""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel_side import demo as demo_mod
from kernel_side.assembly import AssemblyStats
from kernel_side.otlp_receiver import ReceivedSpan, flatten, parse_otlp_json
from tests.e2e.conftest import CLIENT, PYTHON, REPO, SERVER, by_service

BUILD = REPO / "examples" / "build"
SERVICES = {"storefront", "orders", "pricing", "inventory"}
TENANTS = {"acme", "globex", "initech", "umbrella"}
REQUESTS = 8
"""Checkouts per tenant: more than FAIL_EVERY, so every tenant has a failing checkout."""
ORDERS = {t: [demo_mod.order_id(k, i) for i in range(REQUESTS)]
          for k, t in enumerate(demo_mod.TENANTS, start=1)}
FAILING = {t: [o for o in ids if o.startswith("fail-")] for t, ids in ORDERS.items()}


def _missing() -> list[str]:
    checks = {
        "examples/build/pricing": (BUILD / "pricing").exists(),
        "examples/build/java/Inventory.class": (BUILD / "java" / "Inventory.class").exists(),
        "node": shutil.which("node") is not None, "java": shutil.which("java") is not None,
        "redis-server": shutil.which("redis-server") is not None,
        "PostgreSQL 15": Path("/usr/lib/postgresql/15/bin/postgres").exists(),
    }
    return [what for what, ok in checks.items() if not ok]


@pytest.fixture(scope="module", autouse=True)
def _stack_installed() -> None:
    """Skip where the demo stack is not installed; in CI (CI=true) that is a failure, so a
    broken install step cannot turn this test into a silent skip."""
    missing = _missing()
    if missing:
        why = (f"demo stack not installed ({', '.join(missing)}): run sudo bash "
               "scripts/install.sh (it also runs examples/build.sh)")
        if os.environ.get("CI") == "true":
            pytest.fail(why, pytrace=False)
        pytest.skip(why)


def _run_demo(out: Path, requests: int, *extra: str,
              timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "kernel_side.cli", "demo", "--non-interactive", "--no-console",
         "--requests", str(requests), "--out", str(out), *extra],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[ReceivedSpan], dict, str]:
    """Run the demo once; return its spans (warm-up excluded), its JSON summary and stdout."""
    assert REQUESTS >= demo_mod.FAIL_EVERY
    out = tmp_path_factory.mktemp("demo")
    proc = _run_demo(out, REQUESTS, "--json-summary", str(out / "s.json"))
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    summary = json.loads((out / "s.json").read_text())
    spans: list[ReceivedSpan] = []
    for line in Path(summary["jsonl"]).read_bytes().splitlines():
        if line.strip():
            spans.extend(flatten(parse_otlp_json(line)))
    return spans, summary, proc.stdout


def _real(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
    """Without the warm-up requests (their tenant and path say warmup)."""
    bad = {s.trace_id for s in spans
           if "warmup" in str(s.attributes.get("tenant_id", ""))
           or "warmup" in str(s.attributes.get("url.path", ""))}
    return [s for s in spans if s.trace_id not in bad]


def test_all_four_services_are_traced(demo: tuple[list[ReceivedSpan], dict, str]) -> None:
    spans, summary, stdout = demo
    assert {str(s.resource.get("service.name")) for s in spans} >= SERVICES
    assert set(summary["services"]) >= SERVICES
    real = _real(spans)
    n = REQUESTS * len(TENANTS)
    good = n - sum(len(f) for f in FAILING.values())  # failing checkouts never reach pricing
    for svc in ("storefront", "orders", "pricing", "inventory"):
        assert len(by_service(real, svc, SERVER)) >= (good if svc == "pricing" else n), svc
    # The resource says who is who: the pids the demo started.
    for svc, pid in summary["pids"].items():
        assert {s.resource["process.pid"] for s in by_service(spans, svc)} == {pid}, svc
    assert summary["non_200"] == sum(len(f) for f in FAILING.values())
    assert "one checkout across the services" in stdout
    assert "tenant" in stdout and "spans.jsonl" in stdout


def test_no_duplicate_spans(demo: tuple[list[ReceivedSpan], dict, str]) -> None:
    spans, _, _ = demo
    dup = [k for k, c in Counter(s.span_id for s in spans).items() if c > 1]
    assert not dup, f"{len(dup)} span ids exported more than once"
    # Exactly one server span per request path in every service (each checkout has its own
    # order id): no double-counted exchange and no missing one. Pricing is asked only when
    # inventory had the sku, so never for the failing checkouts.
    ids = [o for t in ORDERS.values() for o in t]
    good = [o for o in ids if not o.startswith("fail-")]
    want = {"storefront": [f"/checkout/{o}" for o in ids],
            "orders": [f"/orders/{o}" for o in ids],
            "inventory": [f"/stock/sku-{o}" for o in ids],
            "pricing": [f"/price/sku-{o}" for o in good]}
    real = _real(spans)
    for svc, paths in want.items():
        got = Counter(str(s.attributes.get("url.path")) for s in by_service(real, svc, SERVER))
        assert got == Counter(paths), (svc, (got - Counter(paths)).most_common(3),
                                       (Counter(paths) - got).most_common(3))


def test_failing_checkouts_are_error_spans_and_counted_per_tenant(
        demo: tuple[list[ReceivedSpan], dict, str]) -> None:
    """Every 7th checkout asks inventory for a sku it answers 500 for: inventory's, orders'
    (502) and the storefront's server spans are errors, orders' with the tenant, and the
    summary counts them per tenant."""
    spans, summary, stdout = demo
    real = _real(spans)

    def server(svc: str, path: str) -> ReceivedSpan:
        (s,) = [s for s in by_service(real, svc, SERVER) if s.attributes.get("url.path") == path]
        return s

    for tenant, fails in FAILING.items():
        assert fails, tenant
        for order in fails:
            inv = server("inventory", f"/stock/sku-{order}")
            assert inv.attributes["http.response.status_code"] == 500 and inv.status_code == 2
            srv = server("orders", f"/orders/{order}")
            assert srv.attributes["http.response.status_code"] == 502 and srv.status_code == 2
            assert srv.attributes["tenant_id"] == tenant
            (call,) = [s for s in by_service(real, "orders", CLIENT)
                       if s.parent_span_id == srv.span_id]
            assert call.attributes["http.response.status_code"] == 500, call.attributes
            assert call.attributes["tenant_id"] == tenant
            assert server("storefront", f"/checkout/{order}").status_code == 2
        row = summary["tenants"][tenant]
        assert row["requests"] == REQUESTS and row["errors"] == len(fails), row
    ok = {s.attributes.get("url.path") for s in by_service(real, "orders", SERVER)
          if s.status_code != 2}
    assert len(ok) == sum(len(o) - len(FAILING[t]) for t, o in ORDERS.items())
    table = stdout.split("tenant     requests", 1)[1].splitlines()
    for tenant, fails in FAILING.items():
        (line,) = [li for li in table if li.startswith(tenant)]
        assert line.split()[1:5:3] == [str(REQUESTS), str(len(fails))], line
    assert "latency: the orders service's server span" in stdout


def test_tenant_on_orders_spans_and_its_db_and_redis_calls(
        demo: tuple[list[ReceivedSpan], dict, str]) -> None:
    spans, _, _ = demo
    real = _real(spans)
    servers = by_service(real, "orders", SERVER)
    assert {s.attributes.get("tenant_id") for s in servers} == TENANTS
    for s in servers:
        assert s.attributes.get("user_id") and s.attributes.get("feature_flag"), s.attributes
    clients = by_service(real, "orders", CLIENT)
    pg = [s for s in clients if s.attributes.get("db.system.name") == "postgresql"]
    rd = [s for s in clients if s.attributes.get("db.system.name") == "redis"]
    # A failing checkout stops at inventory; every other one reads Redis and writes PostgreSQL.
    ok = [s for s in servers if s.status_code != 2]
    assert len(ok) == len(servers) - sum(len(f) for f in FAILING.values())
    assert len(pg) >= len(ok) and len(rd) >= len(ok)
    for s in pg + rd:
        assert s.attributes.get("tenant_id") in TENANTS, s.attributes
    # The zero-code services carry no business context.
    for svc in ("storefront", "pricing", "inventory"):
        assert not any("tenant_id" in s.attributes for s in by_service(real, svc)), svc


def test_http2_hop_to_pricing(demo: tuple[list[ReceivedSpan], dict, str]) -> None:
    spans, _, _ = demo
    real = _real(spans)
    calls = [s for s in by_service(real, "orders", CLIENT)
             if "/price/" in str(s.attributes.get("url.full", ""))]
    served = by_service(real, "pricing", SERVER)
    assert calls and served
    for s in calls + served:
        assert s.attributes["network.protocol.version"] == "2", s.attributes
    # httpcore can write one thread's queued HEADERS in another thread's write: then the
    # agent cannot tell which request a stream belongs to, and must guess no tenant rather
    # than a wrong one (2 of 29 calls in one CI run; 0 of 29 in others).
    ambiguous = [s for s in calls if s.attributes.get("ebpf_bridge.thread.ambiguous") is True]
    assert all("tenant_id" not in s.attributes for s in ambiguous)
    known = [s for s in calls if s not in ambiguous]
    assert len(known) > len(calls) // 2, (len(known), len(calls))
    assert all(s.attributes.get("tenant_id") in TENANTS for s in known)


def test_one_trace_across_services_where_propagation_allows(
        demo: tuple[list[ReceivedSpan], dict, str]) -> None:
    """Only orders has code of ours, and no service sends a traceparent. So what is
    guaranteed today is the orders trace: its server span with its PostgreSQL, Redis, HTTP/1.1
    (to inventory) and h2 (to pricing) client spans as children, all carrying the tenant —
    a trace that reaches every other service of the stack as a callee. The callees' own server
    spans join it only through same-node stitching by connection (issue 7): when the agent has
    it (HTTP/1.1 and HTTP/2), the trace must hold all four services."""
    spans, _, _ = demo
    real = _real(spans)
    by_trace: dict[str, list[ReceivedSpan]] = {}
    for s in real:
        by_trace.setdefault(s.trace_id, []).append(s)
    full = []
    for srv in by_service(real, "orders", SERVER):
        if srv.attributes.get("http.response.status_code") != 200:
            continue
        kids = [s for s in by_trace[srv.trace_id]
                if s.kind == CLIENT and s.parent_span_id == srv.span_id]
        kinds = {str(k.attributes.get("db.system.name") or k.attributes.get(
            "network.protocol.version")) for k in kids}
        if {"postgresql", "redis", "1.1", "2"} <= kinds:
            assert all(k.attributes.get("tenant_id") == srv.attributes["tenant_id"]
                       for k in kids)
            assert all(srv.start_ns <= k.start_ns <= k.end_ns <= srv.end_ns for k in kids)
            full.append(srv)
    assert full, "no orders trace with PostgreSQL, Redis, HTTP/1.1 and h2 client spans"
    stitching = "stitched" in {f.name for f in dataclasses.fields(AssemblyStats)}
    if stitching:
        services = max(({str(s.resource.get("service.name")) for s in by_trace[srv.trace_id]}
                        for srv in full), key=len)
        assert services >= SERVICES, services


def _demo_processes(pidfile: Path) -> tuple[set[int], list[str]]:
    """The process groups and temporary directories a running demo recorded."""
    groups, dirs = set(), []
    for line in pidfile.read_text().splitlines():
        if line.startswith("dir "):
            dirs.append(line[4:])
        else:
            groups.add(int(line.split()[0]))
    return groups, dirs


def _alive_in(groups: set[int]) -> list[str]:
    """Live processes (not zombies) that lead or belong to one of ``groups``."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if state != "Z" and (int(d.name) in groups or int(pgrp) in groups):
            out.append(f"{d.name} {stat.split('(', 1)[1].split(')', 1)[0]}")
    return out


@pytest.fixture
def lines_of() -> Iterator[list[subprocess.Popen[str]]]:
    """Popen objects whose stdout the test reads; killed if the test leaves them running."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def test_ctrl_c_mid_run_stops_everything_and_a_second_run_works(
        tmp_path: Path, lines_of: list[subprocess.Popen[str]]) -> None:
    """SIGINT (what Ctrl-C sends) while the traffic runs: the demo exits 130 and no process
    it started survives (it records them in <out>/demo.pids), its temporary directories are
    gone; then a second run in the same folder works without manual cleanup."""
    out = tmp_path / "out"
    p = subprocess.Popen(
        [PYTHON, "-m", "kernel_side.cli", "demo", "--non-interactive", "--no-console",
         "--requests", "200", "--out", str(out)], cwd=REPO, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines_of.append(p)
    seen: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert p.stdout is not None
        for line in p.stdout:
            seen.put(line)
        seen.put(None)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 180
    printed: list[str] = []
    while not any(li.startswith("checkouts ") for li in printed):  # the live view is up
        line = seen.get(timeout=max(deadline - time.monotonic(), 0.1))
        assert line is not None, "demo ended early:\n" + "".join(printed) + (
            p.stderr.read() if p.stderr else "")
        printed.append(line)
    groups, dirs = _demo_processes(out / "demo.pids")
    assert len(groups) == 7, groups  # PostgreSQL, Redis, four services, the agent
    assert len(_alive_in(groups)) >= 7
    p.send_signal(signal.SIGINT)
    assert p.wait(60) == 130
    assert p.stderr is not None and "interrupted" in p.stderr.read()
    assert _alive_in(groups) == []
    assert not (out / "demo.pids").exists()
    assert dirs and not any(Path(d).exists() for d in dirs)

    again = _run_demo(out, 1, "--json-summary", str(out / "s.json"))
    assert again.returncode == 0, f"stdout:\n{again.stdout}\nstderr:\n{again.stderr}"
    assert set(json.loads((out / "s.json").read_text())["services"]) >= SERVICES
