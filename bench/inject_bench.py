"""What traceparent injection costs: wrk -> nginx with the agent tracing both, without and with
``--inject-traceparent`` (issue 7).

The injector runs inside the client's write(): its cost lands in wrk's CPU (an sk_msg program
per request: a scan of the request head, the ids, bpf_msg_push_data) and, for the 70 bytes
more each request carries, a little in nginx's. Reports per mode: throughput, p50/p99 latency,
wrk (client) CPU per request, nginx CPU per request, agent CPU per span, requests injected.
Prints a table and writes JSON; never decides pass/fail.

    sudo .venv/bin/python bench/inject_bench.py [--duration 10] [--rate 5000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from _common import compare_modes, side_by_side  # noqa: E402
from _live import pace_script, wrk_pacing  # noqa: E402
from agent_bench import (  # noqa: E402
    cpu_seconds,
    free_port,
    nginx_worker,
    parse_stats,
    parse_wrk,
    start_nginx,
)

MODES = ("agent", "agent+inject")


def _wrk(port: int, duration: int, connections: int, rate: int,
         tmp: Path) -> dict[str, float]:
    delay = 0
    if rate:
        connections, delay = wrk_pacing(connections, rate)
    argv = ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{duration}s",
            "--latency", f"http://127.0.0.1:{port}/"]
    if rate:
        argv[5:5] = ["-s", str(pace_script(tmp, delay))]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    out = proc.stdout.read()
    # wait4: the client's own CPU, where the sk_msg program runs.
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"wrk failed: {out}")
    result = parse_wrk(out)
    result["client_cpu_us_per_req"] = (usage.ru_utime + usage.ru_stime) / result["requests"] * 1e6
    return result


def one_run(tmp: Path, duration: int, connections: int, rate: int,
            inject: bool) -> dict[str, float]:
    port = free_port()
    ngx = start_nginx(tmp, port)
    worker = nginx_worker(ngx.pid)
    subprocess.run(["taskset", "-pc", "1", str(worker)], capture_output=True, check=True)
    ready = tmp / "agent.ready"
    argv = ["taskset", "-c", "0", sys.executable, "-m", "kernel_side.cli", "agent",
            "--pid", str(ngx.pid), "--pid", str(worker), "--exe", "wrk",
            "--exporter", "jsonl", "--jsonl", str(tmp / "spans.jsonl"),
            "--ready-file", str(ready), "--stats-interval", "0"]
    if inject:
        argv.append("--inject-traceparent")
    with (tmp / "agent.log").open("w") as log:
        agent = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                 start_new_session=True)
    try:
        while not ready.exists():
            if agent.poll() is not None:
                raise RuntimeError((tmp / "agent.log").read_text())
            time.sleep(0.01)
        agent_cpu0 = cpu_seconds(agent.pid)
        app_cpu0 = cpu_seconds(worker)
        result = _wrk(port, duration, connections, rate, tmp)
        result["app_cpu_us_per_req"] = (cpu_seconds(worker) - app_cpu0) / result["requests"] * 1e6
        agent_cpu = cpu_seconds(agent.pid) - agent_cpu0
        os.kill(agent.pid, signal.SIGINT)
        agent.wait(60)
        stats = parse_stats((tmp / "agent.log").read_text())
        result["spans"] = stats.get("spans", 0)
        result["events_lost"] = stats.get("events_lost", 0)
        result["injected"] = stats.get("inject_injected", 0)
        result["agent_cpu_us_per_span"] = agent_cpu / max(result["spans"], 1) * 1e6
        return result
    finally:
        if agent.poll() is None:
            agent.kill()
        os.killpg(ngx.pid, signal.SIGTERM)
        ngx.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rate", type=int, default=5000,
                    help="paced load in requests/s (0 = as fast as wrk can; default 5000)")
    ap.add_argument("--json", default=str(REPO / "bench/results/inject.json"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root (the agent loads eBPF programs)", file=sys.stderr)
        return 1
    def run(mode: str) -> dict[str, float]:
        with tempfile.TemporaryDirectory() as d:
            return one_run(Path(d), args.duration, args.connections, args.rate,
                           mode == "agent+inject")

    runs = compare_modes(MODES, args.repeat, run)
    load = f"paced at {args.rate} req/s" if args.rate else "max rate"
    side_by_side(
        f"wrk -> nginx (6-byte body), {load}, wrk -t1 -c{args.connections} -d{args.duration}s; "
        "wrk and the nginx worker on CPU 1, agent on CPU 0; agent traces both; median "
        f"[min-max] of {args.repeat} runs", runs,
        ["rps", "p50_ms", "p99_ms", "client_cpu_us_per_req", "app_cpu_us_per_req",
         "agent_cpu_us_per_span", "spans", "injected", "events_lost"], args.json, vars(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
