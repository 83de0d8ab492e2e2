"""Per-protocol cost and capacity of the agent (issue 3's figures).

1. Parser + span assembly CPU per span for each protocol, on bytes captured from the real
   servers (tests/unit/fixtures): a connection is replayed once to warm its state (startup,
   prepared statements), then its span-producing exchanges are timed in a loop.
2. Live capacity: a real server driven at full speed by its own load tool with the agent
   tracing the client (redis-benchmark, pgbench) or the server (nginx + wrk): spans per second
   the agent turned out and events it lost (ring buffer full) in the same window.

Prints tables and writes JSON; never pass/fail. Needs root for part 2.

    sudo .venv/bin/python bench/protocol_bench.py [--seconds 8] [--skip-live]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kernel_side.assembly import SpanAssembler  # noqa: E402
from kernel_side.events import ROLE_CLIENT, Exchange  # noqa: E402
from kernel_side.model import Resource, SpanRecord  # noqa: E402
from kernel_side.protocols.registry import register_all  # noqa: E402

FIX = REPO / "tests" / "unit" / "fixtures"


class _Procs:
    res = Resource((1, 1), {"service.name": "bench"})

    def resource_for(self, tgid: int) -> Resource:
        return self.res

    def listen_port(self, tgid: int, fd: int) -> int | None:
        return None


def _exchange(req: bytes, resp: bytes, n: int, conn_id: int) -> Exchange:
    return Exchange(
        tgid=1, fd=5, role=ROLE_CLIENT, peer_address="127.0.0.1", peer_port=5432,
        listen_fd=0, req_tid=1, resp_tid=1, conn_id=conn_id, exchange_id=n,
        parent_exchange_id=0, req_start_ns=1_000, req_end_ns=2_000, resp_start_ns=3_000,
        resp_end_ns=4_000, req_bytes=len(req), resp_bytes=len(resp), req_calls=1,
        resp_calls=1, request=req, response=resp, ctx=None,
    )


def _connections() -> dict[str, list[list[tuple[bytes, bytes]]]]:
    out: dict[str, list[list[tuple[bytes, bytes]]]] = {}
    pg = json.loads((FIX / "postgres" / "extended.json").read_text())
    out["postgresql"] = [[(bytes.fromhex(e["request"]), bytes.fromhex(e["response"]))
                          for e in pg["exchanges"]]]
    my = json.loads((FIX / "mysql" / "pymysql.json").read_text())
    out["mysql"] = [[(bytes.fromhex(e["request"]), bytes.fromhex(e["response"])) for e in c]
                    for c in my["connections"]]
    out["redis"] = [[((FIX / "redis" / f"{n}.req").read_bytes(),
                      (FIX / "redis" / f"{n}.resp").read_bytes())
                     for n in ("get", "set", "pipeline")]]
    out["http/1.1"] = [[(b"GET /orders/42?x=1 HTTP/1.1\r\nHost: orders:8081\r\n"
                         b"User-Agent: bench/1\r\nAccept: */*\r\n\r\n",
                         b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 13\r\n\r\n{\"ok\": true}\n")]]
    return out


def parser_costs(rounds: int) -> dict[str, dict[str, float]]:
    """CPU microseconds per span for each protocol's parse + span assembly."""
    results: dict[str, dict[str, float]] = {}
    for proto, conns in _connections().items():
        spans: list[SpanRecord] = []
        asm = SpanAssembler(_Procs(), spans.append)
        register_all(asm)
        hot: list[Exchange] = []
        for ci, conn in enumerate(conns):
            for i, (req, resp) in enumerate(conn):
                before = len(spans)
                ex = _exchange(req, resp, 1000 * ci + i + 1, ci + 1)
                asm.on_exchange(ex)
                if len(spans) > before:
                    hot.append(ex)
        if not hot:
            results[proto] = {"us_per_span": float("nan"), "spans_per_round": 0}
            continue
        spans.clear()
        t0 = time.perf_counter()
        for _ in range(rounds):
            for ex in hot:
                asm.on_exchange(ex)
        dt = time.perf_counter() - t0
        results[proto] = {"us_per_span": dt / max(len(spans), 1) * 1e6,
                          "spans_per_round": len(spans) / rounds}
    return results


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def _agent(tmp: Path, *selectors: str) -> subprocess.Popen[bytes]:
    ready = tmp / "agent.ready"
    log = (tmp / "agent.log").open("wb")
    pins = f"/sys/fs/bpf/ebpf_bridge_bench_{os.getpid()}"
    p = subprocess.Popen(
        [sys.executable, "-m", "kernel_side.cli", "agent", *selectors, "--exporter", "jsonl",
         "--jsonl", str(tmp / "spans.jsonl"), "--ready-file", str(ready),
         "--stats-interval", "0"],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
        env={**os.environ, "EBPF_BRIDGE_PIN_DIR": f"{pins}/v1"})
    while not ready.exists():
        if p.poll() is not None:
            raise RuntimeError((tmp / "agent.log").read_text())
        time.sleep(0.02)
    return p


def _stop_agent(p: subprocess.Popen[bytes], tmp: Path) -> dict[str, int]:
    os.killpg(p.pid, signal.SIGINT)
    p.wait(60)
    shutil.rmtree(f"/sys/fs/bpf/ebpf_bridge_bench_{os.getpid()}", ignore_errors=True)
    line = [ln for ln in (tmp / "agent.log").read_text().splitlines() if "final stats" in ln][-1]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}


def _live(name: str, start_server: Callable[[Path, int], subprocess.Popen[bytes]],
          load: Callable[[int], list[str]], selectors: Callable[[subprocess.Popen[bytes]],
                                                                 list[str]]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        port = _free_port()
        server = start_server(tmp, port)
        try:
            _wait_port(port)
            agent = _agent(tmp, *selectors(server))
            t0 = time.monotonic()
            subprocess.run(load(port), capture_output=True, check=True, timeout=600)
            dt = time.monotonic() - t0
            stats = _stop_agent(agent, tmp)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)
    spans = stats.get("spans", 0)
    lost = stats.get("events_lost", 0)
    return {"seconds": dt, "spans": spans, "events_lost": lost, "spans_per_s": spans / dt,
            "offered_per_s": (spans + lost) / dt}


def live_capacity(seconds: int) -> dict[str, dict[str, float]]:
    """Spans/s the agent turned out, and events lost, with each protocol at full speed."""
    out: dict[str, dict[str, float]] = {}

    def redis_server(tmp: Path, port: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["redis-server", "--port", str(port), "--save", "",
                                 "--appendonly", "no"], stdout=subprocess.DEVNULL,
                                start_new_session=True)

    n = 20000 * seconds
    out["redis (redis-benchmark -c 4, GET/SET)"] = _live(
        "redis", redis_server,
        lambda port: ["taskset", "-c", "1", "redis-benchmark", "-p", str(port), "-c", "4",
                      "-n", str(n), "-t", "get,set", "-q"],
        lambda server: ["--exe", "redis-benchmark"])

    def nginx(tmp: Path, port: int) -> subprocess.Popen[bytes]:
        conf = tmp / "nginx.conf"
        conf.write_text(
            f"daemon off; master_process on; worker_processes 1; pid {tmp}/nginx.pid;\n"
            f"error_log {tmp}/error.log;\nevents {{ worker_connections 1024; }}\n"
            f"http {{ access_log off; client_body_temp_path {tmp}/b; proxy_temp_path {tmp}/p;"
            f" fastcgi_temp_path {tmp}/f; uwsgi_temp_path {tmp}/u; scgi_temp_path {tmp}/s;\n"
            f" server {{ listen 127.0.0.1:{port}; location / {{ return 200 \"hello\\n\"; }} }} }}")
        return subprocess.Popen(["nginx", "-c", str(conf), "-p", str(tmp)],
                                start_new_session=True)

    out["http/1.1 (nginx, wrk -c8)"] = _live(
        "http", nginx,
        lambda port: ["taskset", "-c", "1", "wrk", "-t1", "-c8", f"-d{seconds}s",
                      f"http://127.0.0.1:{port}/"],
        # The worker was forked before the agent started: select by name, not by the master.
        lambda server: ["--exe", "nginx"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3000)
    ap.add_argument("--seconds", type=int, default=6)
    ap.add_argument("--skip-live", action="store_true")
    ap.add_argument("--json", default=str(REPO / "bench/results/protocols.json"))
    args = ap.parse_args()
    costs = parser_costs(args.rounds)
    print(f"{'protocol':<12} {'parse+assemble us/span':>24} {'implied max spans/s':>20}")
    for proto, r in costs.items():
        print(f"{proto:<12} {r['us_per_span']:>24.1f} {1e6 / r['us_per_span']:>20,.0f}")
    live: dict[str, dict[str, float]] = {}
    if not args.skip_live:
        if os.geteuid() != 0:
            print("live capacity needs root (the agent loads eBPF programs)", file=sys.stderr)
            return 1
        live = live_capacity(args.seconds)
        print(f"\n{'live load (agent on the other core)':<40} {'spans/s out':>12} "
              f"{'offered/s':>10} {'events lost':>12}")
        for name, r in live.items():
            print(f"{name:<40} {r['spans_per_s']:>12,.0f} {r['offered_per_s']:>10,.0f} "
                  f"{int(r['events_lost']):>12,}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"parser_us_per_span": costs, "live": live},
                                          indent=2))
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
