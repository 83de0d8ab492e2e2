"""Hostile and broken traffic against traced servers (a Python http.server and Debian's nginx):
binary garbage, clients that claim HTTP/Redis/PostgreSQL and are not, 64 KB headers, 10,000
concurrent idle connections, 20,000 short connections, 1,000 selected processes. The agent
keeps producing correct spans, counts what it could not parse, never crashes, and its memory
stays bounded.
Loopback only; every load is bounded in count and time."""

from __future__ import annotations

import random
import secrets
import socket
import threading

import requests

from kernel_side.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.e2e.conftest import APPS, SERVER, Harness, by_service
from tests.e2e.reliability import (
    exchange_raw,
    final_stats,
    raise_nofile,
    rss_mb,
    start_nginx,
)

EDGE = APPS / "edge_server.py"
RSS_CAP_MB = 600


def _paths(spans: list[ReceivedSpan], service: str, prefix: str) -> list[str]:
    return [str(s.attributes.get("url.path")) for s in by_service(spans, service, SERVER)
            if str(s.attributes.get("url.path", "")).startswith(prefix)]


def _hostile_payloads(rng: random.Random) -> list[bytes]:
    garbage = [rng.randbytes(rng.randint(1, 4096)) for _ in range(100)]
    fake = [
        b"GET \x00\xff\xfe not http at all\r\n\r\n",             # claims HTTP
        b"GET / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\nxx",
        b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzzzz\r\n",
        b"POST /x HTTP/9.9\r\n" + b"A" * 3000,                     # no end of head
        b"*3\r\n$3\r\nSET\r\n$99999\r\nk\r\n",                    # claims Redis
        b"*-5\r\n" + b"*1\r\n" * 500,
        b"$" + b"9" * 100 + b"\r\n",
        b"\x00\x00\x00\x08\x04\xd2\x16\x2f",                        # PostgreSQL SSLRequest
        b"\x00\x00\x00\x29\x00\x03\x00\x00user\x00x" + rng.randbytes(200),  # bad startup
        b"Q\xff\xff\xff\xffSELECT 1",                               # Query with a huge length
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + rng.randbytes(500),   # h2 preface then junk
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + rng.randbytes(300),  # TLS hello-ish
    ]
    return garbage + fake


def test_garbage_fake_protocols_and_huge_headers(harness: Harness,
                                                 receiver: OtlpReceiver) -> None:
    srv, port = harness.python_service("edge-hostile", EDGE)
    nginx_port = start_nginx(harness)
    agent = harness.agent("--pid", str(srv.pid), "--exe", "nginx", receiver=receiver)
    rss_before = rss_mb(agent.pid)
    tag = secrets.token_hex(3)
    rng = random.Random(9)
    payloads = _hostile_payloads(rng)
    for p in (port, nginx_port):
        for payload in payloads:
            exchange_raw(p, payload)
    # 64 KB of headers (one header line and many), to both servers.
    huge_one = (f"GET /huge-{tag} HTTP/1.1\r\nHost: x\r\nX-Big: ".encode() + b"v" * 65536
                + b"\r\nConnection: close\r\n\r\n")
    huge_many = (f"GET /huge-{tag} HTTP/1.1\r\nHost: x\r\n".encode()
                 + b"".join(b"X-H%d: %s\r\n" % (i, b"w" * 60) for i in range(1000))
                 + b"Connection: close\r\n\r\n")
    answers = [exchange_raw(p, h) for p in (port, nginx_port) for h in (huge_one, huge_many)]
    assert all(a.startswith(b"HTTP/1.") for a in answers), [a[:40] for a in answers]

    # The agent still produces exact spans for normal requests, on both servers.
    for i in range(5):
        for p in (port, nginx_port):
            r = requests.get(f"http://127.0.0.1:{p}/ok-{tag}/{i}",
                             headers={"Connection": "close"}, timeout=10)
            assert r.status_code == 200
    spans = receiver.wait_for(lambda ss: len(_paths(ss, "edge-hostile", f"/ok-{tag}/")) == 5
                              and len(_paths(ss, "nginx", f"/ok-{tag}/")) == 5, timeout_s=30)
    for s in by_service(spans, "edge-hostile", SERVER):
        if str(s.attributes.get("url.path")).startswith(f"/ok-{tag}/"):
            assert s.attributes["http.response.status_code"] == 200
            assert s.attributes["http.request.method"] == "GET"
    assert sorted(_paths(spans, "nginx", f"/ok-{tag}/")) == [f"/ok-{tag}/{i}" for i in range(5)]
    rss_after = rss_mb(agent.pid)
    assert agent.popen.poll() is None, "the agent died"
    assert agent.stop() == 0
    log = agent.log_text()
    assert "Traceback" not in log, log[-3000:]
    st = final_stats(log)
    # What could not be parsed is counted, not fatal.
    assert st["unknown_protocol"] + st["unmatched_responses"] > 0, st
    assert st["parse_errors"] == 0 and st["callback_errors"] == 0, st
    assert rss_after < RSS_CAP_MB, (rss_before, rss_after)
    print(f"\nhostile: {2 * len(payloads)} hostile + 4 huge-header connections; "
          f"rss {rss_before:.0f} -> {rss_after:.0f} MB; stats {st}")


IDLE = 10_000
SHORT = 20_000


def test_10k_idle_and_20k_short_connections(harness: Harness, receiver: OtlpReceiver) -> None:
    raise_nofile(IDLE + 2_000)
    nginx_port = start_nginx(harness, connections=IDLE + 200)
    agent = harness.agent("--exe", "nginx", receiver=receiver)
    rss_before = rss_mb(agent.pid)
    tag = secrets.token_hex(3)

    # 10,000 concurrent idle connections: half never send a byte, half send half a request.
    idle: list[socket.socket] = []
    try:
        for i in range(IDLE):
            s = socket.create_connection(("127.0.0.1", nginx_port), timeout=10)
            if i % 2:
                s.sendall(b"GET /never-finished HTTP/1.1\r\nHost: x\r\n")
            idle.append(s)
        # With all of them open, a normal request still gets its exact span.
        r = requests.get(f"http://127.0.0.1:{nginx_port}/during-idle-{tag}",
                         headers={"Connection": "close"}, timeout=10)
        assert r.status_code == 200
        receiver.wait_for(lambda ss: _paths(ss, "nginx", f"/during-idle-{tag}")
                          == [f"/during-idle-{tag}"], timeout_s=30)
        rss_idle = rss_mb(agent.pid)
    finally:
        for s in idle:
            s.close()

    # 20,000 short connections (connect, one request, close), from 8 threads.
    errors: list[str] = []

    def worker(t: int) -> None:
        for i in range(t, SHORT, 8):
            req = f"GET /short-{tag}/{i} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            try:
                with socket.create_connection(("127.0.0.1", nginx_port), timeout=10) as s:
                    s.sendall(req.encode())
                    data = b""
                    while chunk := s.recv(4096):
                        data += chunk
                if not data.startswith(b"HTTP/1.1 200"):
                    errors.append(repr(data[:40]))
            except OSError as e:
                errors.append(str(e))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(300)
    assert not errors, errors[:5]
    r = requests.get(f"http://127.0.0.1:{nginx_port}/after-{tag}",
                     headers={"Connection": "close"}, timeout=10)
    assert r.status_code == 200
    receiver.wait_for(lambda ss: f"/after-{tag}" in _paths(ss, "nginx", f"/after-{tag}"),
                      timeout_s=60)
    rss_after = rss_mb(agent.pid)
    assert agent.stop() == 0
    log = agent.log_text()
    assert "Traceback" not in log, log[-3000:]
    st = final_stats(log)
    short = set(_paths(receiver.spans(), "nginx", f"/short-{tag}/"))
    lost = SHORT - len(short)
    # Every short connection has its span unless the ring buffer overflowed (counted).
    assert lost == 0 or st["events_lost"] >= lost, (lost, st)
    assert st["callback_errors"] == 0 and st["parse_errors"] == 0, st
    # 5,000 half-sent requests do not fit the 4,096-entry exchange map: the excess is evicted
    # by the LRU, and counted. The 16,384-entry socket map holds all 10,000.
    assert st["conns_evicted"] >= IDLE // 2 - 4096, st
    assert st["socks_evicted"] == 0, st
    assert max(rss_idle, rss_after) < RSS_CAP_MB, (rss_before, rss_idle, rss_after)
    print(f"\nidle/short: {IDLE} idle + {SHORT} short connections; spans for "
          f"{len(short)}/{SHORT}; rss {rss_before:.0f} -> {rss_idle:.0f} (idle) -> "
          f"{rss_after:.0f} MB; stats {st}")


N_PROCS = 1_000


def test_1000_selected_processes(harness: Harness, receiver: OtlpReceiver) -> None:
    """1,000 selected processes (a copied ``sleep`` under a unique name, selected by --exe and
    picked up at exec) cost the agent little memory, and spans keep coming for a busy one."""
    import re
    import shutil
    import subprocess
    import time

    srv, port = harness.python_service("edge-many", EDGE)
    name = f"bi-{secrets.token_hex(3)}"  # within the 15 characters of a task's comm
    binary = harness.tmp / name
    shutil.copy("/bin/sleep", binary)
    agent = harness.agent("--pid", str(srv.pid), "--exe", name, receiver=receiver)
    rss_before = rss_mb(agent.pid)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(N_PROCS):
            procs.append(subprocess.Popen([str(binary), "600"], stdin=subprocess.DEVNULL))
        pids = {p.pid for p in procs}
        deadline = time.monotonic() + 120
        while True:
            traced = {int(m) for m in re.findall(r"tracing pid (\d+)", agent.log_text())}
            if pids <= traced:
                break
            assert time.monotonic() < deadline, f"{len(pids - traced)} of {N_PROCS} not traced"
            time.sleep(0.2)
        tag = secrets.token_hex(3)
        with requests.Session() as s:
            for i in range(20):
                assert s.get(f"http://127.0.0.1:{port}/many-{tag}/{i}", timeout=10).ok
        receiver.wait_for(lambda ss: len(_paths(ss, "edge-many", f"/many-{tag}/")) == 20,
                          timeout_s=60)
        rss_after = rss_mb(agent.pid)
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait(10)
    assert agent.popen.poll() is None
    assert agent.stop() == 0
    log = agent.log_text()
    assert "Traceback" not in log, log[-3000:]
    st = final_stats(log)
    assert st["callback_errors"] == 0 and st["proc_events_lost"] == 0, st
    per_proc_kb = (rss_after - rss_before) * 1024 / N_PROCS
    assert rss_after < RSS_CAP_MB, (rss_before, rss_after)
    print(f"\n{N_PROCS} processes: agent rss {rss_before:.0f} -> {rss_after:.0f} MB "
          f"({per_proc_kb:.0f} KB per process)")


def test_threads_blocked_in_recv_hold_no_bookkeeping(harness: Harness,
                                                     receiver: OtlpReceiver) -> None:
    """``max_threads`` bounds only calls tracked from entry to return (SSL calls): socket
    syscalls are read at their exit, so 100 threads blocked in recv() against
    ``max_threads: 64`` take no slot, the requests served meanwhile all get spans and nothing
    counts in ``tracking_full``."""
    import time

    blocked = 100
    base = harness.tmp / "park"
    base.mkdir()
    srv, port = harness.python_service("parked", APPS / "blocked_threads_app.py", "--dir",
                                       str(base), "--threads", str(blocked))
    cfg = harness.tmp / "agent.yaml"
    cfg.write_text("max_threads: 64\n")
    agent = harness.agent("--pid", str(srv.pid), "--config", str(cfg), receiver=receiver)
    (base / "block").write_text("")
    deadline = time.monotonic() + 60
    while not (base / "blocked").exists():
        assert time.monotonic() < deadline, "the app's threads never all blocked"
        time.sleep(0.05)
    tag = secrets.token_hex(3)
    for i in range(5):
        r = requests.get(f"http://127.0.0.1:{port}/full-{tag}/{i}",
                         headers={"Connection": "close"}, timeout=10)
        assert r.status_code == 200
    (base / "release").write_text("")
    while not (base / "released").exists():
        assert time.monotonic() < deadline, "the app's threads never returned"
        time.sleep(0.05)
    r = requests.get(f"http://127.0.0.1:{port}/after-{tag}", headers={"Connection": "close"},
                     timeout=10)
    assert r.status_code == 200
    want = {f"/full-{tag}/{i}" for i in range(5)} | {f"/after-{tag}"}
    receiver.wait_for(lambda ss: want <= set(_paths(ss, "parked", "/")), timeout_s=30)
    assert agent.stop() == 0
    st = final_stats(agent.log_text())
    assert st["tracking_full"] == 0, st
    assert st["callback_errors"] == 0, st
    print(f"\nmax_threads 64, {blocked} threads blocked: tracking_full={st['tracking_full']}")
