"""Faults: the agent killed with SIGKILL under load, the OTLP endpoint down (then up), a full
export queue, a ring-buffer overflow, and SIGHUP. The applications never notice; what the agent
loses is counted."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import threading
import time
from pathlib import Path

import requests

from kernel_side.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.e2e.conftest import APPS, SERVER, Harness, Proc, by_service
from tests.e2e.reliability import final_stats, free_port, rss_mb, start_nginx

APP = APPS / "bridge_status_app.py"
EDGE = APPS / "edge_server.py"


def _tenants(spans: list[ReceivedSpan], service: str) -> list[str]:
    return [str(s.attributes["tenant_id"]) for s in by_service(spans, service, SERVER)
            if "tenant_id" in s.attributes]


class Load:
    """One client thread making requests continuously, each with its own tenant."""

    def __init__(self, port: int, tag: str) -> None:
        self.port, self.tag = port, tag
        self.sent: list[str] = []
        self.errors: list[str] = []
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # Keep-alive, with a new connection every 10 requests: a connection accepted while no
        # agent ran is not known to the next agent (it learns connections at accept/connect).
        i = 0
        while not self._stop.is_set():
            with requests.Session() as s:
                for _ in range(10):
                    tenant = f"{self.tag}-{i}"
                    t = time.perf_counter()
                    try:
                        r = s.get(f"http://127.0.0.1:{self.port}/work/{i}",
                                  headers={"X-Tenant-ID": tenant}, timeout=10)
                        if r.status_code != 200:
                            self.errors.append(f"{i}: {r.status_code}")
                    except requests.RequestException as e:
                        self.errors.append(f"{i}: {e}")
                    self.latencies.append(time.perf_counter() - t)
                    self.sent.append(tenant)
                    i += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


def _status(port: int) -> dict[str, object]:
    doc: dict[str, object] = requests.get(f"http://127.0.0.1:{port}/bridge-status",
                                          timeout=10).json()
    return doc


def test_kill_9_under_load_then_restart(harness: Harness, receiver: OtlpReceiver) -> None:
    app, port = harness.python_service("annotated", APP)
    agent = harness.agent("--pid", str(app.pid), receiver=receiver)
    tag = secrets.token_hex(3)
    load = Load(port, tag)
    try:
        receiver.wait_for(lambda ss: len(_tenants(ss, "annotated")) >= 50, timeout_s=30)
        os.kill(agent.pid, signal.SIGKILL)
        agent.popen.wait(10)
        n_at_kill = len(load.sent)
        time.sleep(2)  # the app serves with no agent at all
        n_without = len(load.sent) - n_at_kill
        agent2 = harness.agent("--pid", str(app.pid), receiver=receiver)
        # Spans with context again, from requests sent after the restart.
        mark = len(load.sent)
        receiver.wait_for(lambda ss: any(int(t.rsplit("-", 1)[1]) > mark + 20
                                         for t in _tenants(ss, "annotated")), timeout_s=30)
    finally:
        load.stop()
    assert not load.errors, load.errors[:5]
    assert n_without > 20, "the app stopped serving while the agent was dead"
    st = _status(port)
    assert st["annotate_exceptions"] == 0 and st["errors"] == 0, st
    assert st["connected"] is True, st
    # A root app writes its context as memory, and found the cells again after the restart.
    assert st["cells"] is True and st["cell_fallbacks"] == 0, st
    assert agent2.stop() == 0
    log = agent2.log_text()
    assert "Traceback" not in log
    # After the restart spans carry the tenant of exactly the request they belong to.
    spans = by_service(receiver.spans(), "annotated", SERVER)
    for s in spans:
        if "tenant_id" in s.attributes:
            i = str(s.attributes["tenant_id"]).rsplit("-", 1)[1]
            assert s.attributes["url.path"] == f"/work/{i}"
    # No added latency beyond noise: the median after the kill (no agent, then a new one)
    # against the median before it, with a generous bound.
    before = sorted(load.latencies[:n_at_kill])
    after = sorted(load.latencies[n_at_kill:])
    p50_before, p50_after = before[len(before) // 2], after[len(after) // 2]
    assert p50_after < 3 * p50_before + 0.005, (p50_before, p50_after)
    lat = sorted(load.latencies)
    print(f"\nkill -9: {len(load.sent)} requests, 0 errors, {n_without} served with no agent, "
          f"p50 {lat[len(lat) // 2] * 1e3:.2f} ms p99 {lat[int(len(lat) * 0.99)] * 1e3:.2f} ms; "
          f"p50 before kill {p50_before * 1e3:.2f} ms, after {p50_after * 1e3:.2f} ms")


def _drive(port: int, tag: str, n: int) -> None:
    with requests.Session() as s:
        for i in range(n):
            r = s.get(f"http://127.0.0.1:{port}/{tag}/{i}", timeout=10)
            assert r.status_code == 200


def _paths(spans: list[ReceivedSpan], service: str, tag: str) -> set[str]:
    return {str(s.attributes.get("url.path")) for s in by_service(spans, service, SERVER)
            if str(s.attributes.get("url.path", "")).startswith(f"/{tag}/")}


def test_otlp_endpoint_down_then_up(harness: Harness) -> None:
    srv, port = harness.python_service("edge-otlp", EDGE)
    otlp_port = free_port()
    agent = harness.agent("--pid", str(srv.pid), "--exporter", "otlp", "--otlp-endpoint",
                          f"http://127.0.0.1:{otlp_port}")
    tag = secrets.token_hex(3)
    _drive(port, tag, 100)
    time.sleep(0.6)  # at least one failed export attempt
    with OtlpReceiver(grpc_port=otlp_port, http_port=0) as rcv:
        spans = rcv.wait_for(lambda ss: len(_paths(ss, "edge-otlp", tag)) >= 100, timeout_s=60)
        assert _paths(spans, "edge-otlp", tag) == {f"/{tag}/{i}" for i in range(100)}
        assert agent.stop() == 0
    st = final_stats(agent.log_text())
    assert st["export_export_failures"] >= 1 and st["export_retries"] >= 1, st
    assert st["export_dropped_queue_full"] == 0, st
    assert st["export_dropped_retries_exhausted"] == 0, st
    # Nothing near the map bounds: no connection state was evicted.
    assert st["conns_evicted"] == 0 and st["socks_evicted"] == 0, st
    print(f"\notlp down/up: 100 spans, {st['export_export_failures']} failed exports, "
          f"{st['export_retries']} retries, 0 dropped")


def test_otlp_endpoint_slow_and_refusing(harness: Harness) -> None:
    """A collector that answers every export 0.5 s late and refuses the first four
    (UNAVAILABLE, as an overloaded or restarting one does): the refused batches are retried,
    every span arrives, nothing is dropped, and the app never waits on any of it."""
    srv, port = harness.python_service("edge-slow", EDGE)
    with OtlpReceiver(fail_first=4, delay_s=0.5) as rcv:
        agent = harness.agent("--pid", str(srv.pid), receiver=rcv)
        tag = secrets.token_hex(3)
        _drive(port, tag, 100)
        spans = rcv.wait_for(lambda ss: len(_paths(ss, "edge-slow", tag)) >= 100, timeout_s=120)
        assert _paths(spans, "edge-slow", tag) == {f"/{tag}/{i}" for i in range(100)}
        assert agent.stop() == 0
        assert rcv.refused == 4
    st = final_stats(agent.log_text())
    assert st["export_export_failures"] >= 4 and st["export_retries"] >= 4, st
    assert st["export_dropped_queue_full"] == st["export_dropped_retries_exhausted"] == 0, st
    assert st["export_dropped_shutdown"] == 0, st
    print(f"\notlp slow+refusing: 100 spans, {st['export_export_failures']} failed exports, "
          f"{st['export_retries']} retries, 0 dropped")


def test_tiny_export_queue_with_endpoint_down_counts_drops(harness: Harness) -> None:
    srv, port = harness.python_service("edge-queue", EDGE)
    cfg = harness.tmp / "agent.yaml"
    cfg.write_text(f"export_queue: 50\nexporter: otlp\n"
                   f"otlp_endpoint: http://127.0.0.1:{free_port()}\n")
    agent = harness.agent("--pid", str(srv.pid), "--config", str(cfg))
    tag = secrets.token_hex(3)
    # The edge server writes head and body separately, so each request costs a delayed-ACK
    # round (about 40 ms): keep the counts modest.
    _drive(port, tag, 200)
    time.sleep(1)
    rss1 = rss_mb(agent.pid)
    _drive(port, tag + "b", 800)
    time.sleep(1)
    rss2 = rss_mb(agent.pid)
    assert agent.stop() == 0
    st = final_stats(agent.log_text())
    assert st["spans"] == 1000, st
    full, exhausted = st["export_dropped_queue_full"], st["export_dropped_retries_exhausted"]
    dropped = full + exhausted + st["export_dropped_shutdown"]
    # Everything not refused at the door was in the 50-span queue when it was dropped.
    assert full >= 1000 - 50 - exhausted, st
    assert st["export_exported"] == 0 and dropped == 1000 and st["export_queued"] == 0, st
    assert rss2 - rss1 < 30, (rss1, rss2)  # flat: the queue is bounded
    print(f"\ntiny queue: 1000 spans, dropped_queue_full={st['export_dropped_queue_full']} "
          f"retries_exhausted={st['export_dropped_retries_exhausted']} "
          f"shutdown={st['export_dropped_shutdown']}; rss {rss1:.0f} -> {rss2:.0f} MB")


def test_ring_buffer_overflow_is_counted(harness: Harness, receiver: OtlpReceiver) -> None:
    nginx_port = start_nginx(harness, connections=512)
    cfg = harness.tmp / "agent.yaml"
    cfg.write_text("ringbuf_mb: 1\n")
    agent = harness.agent("--exe", "nginx", "--config", str(cfg), receiver=receiver)
    # The agent is paused for the burst, so the 1 MB ring fills whatever the machine's speed:
    # a running agent drains about 45,000 events/s here and may keep up with wrk on its own.
    os.kill(agent.popen.pid, signal.SIGSTOP)
    try:
        out = subprocess.run(["wrk", "-t4", "-c128", "-d4s",
                              f"http://127.0.0.1:{nginx_port}/burst"],
                             capture_output=True, text=True, timeout=60)
    finally:
        os.kill(agent.popen.pid, signal.SIGCONT)
    assert out.returncode == 0, out.stderr
    tag = secrets.token_hex(3)
    r = requests.get(f"http://127.0.0.1:{nginx_port}/after-{tag}", timeout=10)
    assert r.status_code == 200
    receiver.wait_for(lambda ss: any(s.attributes.get("url.path") == f"/after-{tag}"
                                     for s in ss), timeout_s=60)
    assert agent.popen.poll() is None
    assert agent.stop() == 0
    log = agent.log_text()
    assert "Traceback" not in log
    st = final_stats(log)
    assert st["events_lost"] > 0, st
    assert st["spans"] > 0 and st["callback_errors"] == 0, st
    reqs = next((ln for ln in out.stdout.splitlines() if "requests in" in ln), "")
    # Each request wrk completed is a span or a counted lost event (wrk may leave a few
    # requests unanswered at its deadline, which then have neither).
    n_wrk = int(reqs.split()[0])
    assert st["spans"] + st["events_lost"] >= n_wrk - 128, (n_wrk, st)
    print(f"\nringbuf 1 MB: wrk {reqs.strip()}; spans={st['spans']} "
          f"events_lost={st['events_lost']}")


def _wait_log(agent: Proc, text: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in agent.log_text():
        assert agent.popen.poll() is None, "the agent died:\n" + agent.log_text()[-3000:]
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n" + agent.log_text()[-3000:]
        time.sleep(0.05)


def _wait_file(path: Path, needles: list[str], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not (path.exists() and all(n in path.read_text() for n in needles)):
        assert time.monotonic() < deadline, f"{path} lacks some of {needles[:3]}..."
        time.sleep(0.05)


def test_sighup_reloads_selection_and_exporters(harness: Harness) -> None:
    """SIGHUP re-reads --config: the new process selection and the new exporter apply, spans
    exported before go where they went, a bad file changes nothing, and settings that need a
    restart are named."""
    a, port_a = harness.python_service("edge-a", EDGE)
    b, port_b = harness.python_service("edge-b", EDGE)
    out1, out2 = harness.tmp / "one.jsonl", harness.tmp / "two.jsonl"
    cfg = harness.tmp / "agent.yaml"
    cfg.write_text(f"pid: [{a.pid}]\nexporter: jsonl\njsonl: {out1}\n")
    agent = harness.agent("--config", str(cfg))
    tag1, tag2, tag3 = (secrets.token_hex(3) for _ in range(3))
    _drive(port_a, tag1, 10)
    _drive(port_b, tag1, 10)
    _wait_file(out1, [f"/{tag1}/{i}" for i in range(10)])

    cfg.write_text(f"pid: [{b.pid}]\nexporter: jsonl\njsonl: {out2}\nringbuf_mb: 16\n")
    os.kill(agent.pid, signal.SIGHUP)
    _wait_log(agent, "SIGHUP: reloaded")
    assert "ringbuf_mb changed but apply only at start" in agent.log_text()
    _drive(port_a, tag2, 10)
    _drive(port_b, tag2, 10)
    _wait_file(out2, [f"/{tag2}/{i}" for i in range(10)])

    cfg.write_text("pid: [not-a-number\n")
    os.kill(agent.pid, signal.SIGHUP)
    _wait_log(agent, "SIGHUP: config not reloaded")
    _drive(port_b, tag3, 5)
    _wait_file(out2, [f"/{tag3}/{i}" for i in range(5)])
    assert agent.stop() == 0
    log = agent.log_text()
    assert "Traceback" not in log
    one, two = out1.read_text(), out2.read_text()
    # Before the reload only A was traced, into the first file; after it only B, into the
    # second. The first exporter exported everything it held.
    assert one.count(f"/{tag1}/") == 10 and tag2 not in one and tag3 not in one
    assert two.count(f"/{tag2}/") == 10 and two.count(f"/{tag3}/") == 5 and tag1 not in two
    st = final_stats(log)
    assert st["export_exported"] == 25 and st["export_dropped_shutdown"] == 0, st


def test_sighup_without_config_is_answered_not_fatal(harness: Harness,
                                                     receiver: OtlpReceiver) -> None:
    srv, port = harness.python_service("edge-hup", EDGE)
    agent = harness.agent("--pid", str(srv.pid), receiver=receiver)
    tag = secrets.token_hex(3)
    _drive(port, tag, 10)
    os.kill(agent.pid, signal.SIGHUP)
    _wait_log(agent, "started without --config; nothing to reload")
    _drive(port, tag, 20)
    receiver.wait_for(lambda ss: len(_paths(ss, "edge-hup", tag)) >= 20, timeout_s=30)
    assert agent.stop() == 0
    spans = receiver.spans()
    assert len([s for s in by_service(spans, "edge-hup", SERVER)
                if str(s.attributes.get("url.path")).startswith(f"/{tag}/")]) == 30
