"""What TLS adds: agent CPU per span and nginx CPU per request, HTTPS (OpenSSL uprobes) versus
plain HTTP, at a fixed request rate (issue 4's figure).

Two nginx instances returning 6 bytes, one with ``listen ... ssl`` and a throwaway certificate
(as tests/e2e/test_tls.py sets it up), one plaintext; one worker each, both on CPU 1 with wrk.
Each round drives both without an agent ("bare"), then starts one agent on CPU 0 tracing both
nginx by pid and drives both again. wrk keeps its connections open (the TLS handshake is paid
once per connection) and is paced with its ``delay()`` hook to --rate requests per second, so
the agent keeps up and the per-span figures are not those of a saturated agent.

Per phase: requests (wrk), nginx worker CPU per request (utime+stime from /proc: the uprobes
and tracepoint programs run in its system calls, so the kernel-side cost lands here), spans
of that nginx counted in the agent's JSONL output (by server port and url.scheme), events
lost, and agent CPU per span: its CPU from the start of the load until the output stopped
growing, minus its idle CPU rate (measured over an equal window just before) times that time.
Other ebpf-bridge agents running at the time (someone else's tests) are counted per phase:
their libssl uprobes trap in every process that uses the same libssl, bare nginx included.
With --bpf-stats the kernel's BPF run-time statistics (sysctl kernel.bpf_stats_enabled, restored
afterwards, as bench/kernel_cost.py does) give each agent program's ns per request.

Prints median [min-max] of --repeat rounds and writes JSON; never pass/fail. Needs root.

    sudo .venv/bin/python bench/tls_bench.py [--seconds 6] [--rate 4000] [--repeat 3] [--bpf-stats]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from _live import (  # noqa: E402
    LOAD_CPU,
    Agent,
    count_spans,
    cpu_seconds,
    free_port,
    other_agents,
    pace_script,
    self_signed_cert,
    start_nginx,
    stop_group,
    wrk_pacing,
)
from agent_bench import parse_wrk  # noqa: E402
from kernel_cost import agent_programs, name_programs  # noqa: E402

SCHEMES = ("http", "https")


def run_wrk(url: str, seconds: int, connections: int, rate: int, tmp: Path) -> dict[str, float]:
    """wrk -t1 on the load core, each connection paced so that all together send ``rate``."""
    connections, delay = wrk_pacing(connections, rate)
    script = pace_script(tmp, delay)
    out = subprocess.run(["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{connections}",
                          f"-d{seconds}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    return parse_wrk(out)


def _match(port: int, scheme: str) -> Callable[[dict[str, object]], bool]:
    def match(span: dict[str, object]) -> bool:
        seen = {a["key"]: next(iter(a["value"].values()))  # type: ignore[attr-defined]
                for a in span.get("attributes", ())  # type: ignore[attr-defined]
                if a["key"] in ("server.port", "url.scheme")}
        return seen.get("server.port") == str(port) and seen.get("url.scheme") == scheme
    return match


def phase(tmp: Path, scheme: str, port: int, worker: int, agent: Agent | None,
          args: argparse.Namespace) -> dict[str, float]:
    """One load window against one nginx; with ``agent``, its cost for this window too."""
    url = f"{scheme}://127.0.0.1:{port}/"
    out: dict[str, float] = {}
    if agent is not None:
        idle = agent.idle_cpu_per_s(args.seconds)
        before_spans = count_spans(agent.jsonl, _match(port, scheme))
        progs0 = agent_programs(agent.pid) if args.bpf_stats else {}
        c0, t0 = agent.cpu(), time.monotonic()
    others = other_agents(agent.pid if agent else None)
    app0 = cpu_seconds(worker)
    w = run_wrk(url, args.seconds, args.connections, args.rate, tmp)
    out["other_agents"] = max(others, other_agents(agent.pid if agent else None))
    out.update({"rps": w["rps"], "requests": w["requests"], "p50_ms": w["p50_ms"],
                "p99_ms": w["p99_ms"],
                "app_cpu_us_per_req": (cpu_seconds(worker) - app0) / w["requests"] * 1e6})
    if agent is not None:
        progs1 = agent_programs(agent.pid) if args.bpf_stats else {}
        agent.wait_drained()
        elapsed = time.monotonic() - t0
        net = agent.cpu() - c0 - idle * elapsed
        spans = count_spans(agent.jsonl, _match(port, scheme)) - before_spans
        out.update({"spans": spans, "agent_us_per_span": net / max(spans, 1) * 1e6,
                    "agent_idle_cpu_per_s": idle})
        if progs1:
            name_programs(progs1)
            for pid_, a in progs1.items():
                b = progs0.get(pid_, {"run_time_ns": 0, "run_cnt": 0})
                ns = int(a["run_time_ns"]) - int(b["run_time_ns"])  # type: ignore[call-overload]
                if ns:
                    key = f"bpf_ns_per_req:{a['name']}"
                    out[key] = out.get(key, 0.0) + ns / w["requests"]
            out["bpf_ns_per_req_total"] = sum(v for k, v in out.items()
                                              if k.startswith("bpf_ns_per_req:"))
    return out


@contextlib.contextmanager
def bpf_stats(enabled: bool) -> Iterator[None]:
    """The kernel's BPF run-time statistics on for the block (system-wide; restored)."""
    path = Path("/proc/sys/kernel/bpf_stats_enabled")
    old = path.read_text().strip()
    if enabled:
        path.write_text("1")
    try:
        yield
    finally:
        if enabled:
            path.write_text(old)


def one_round(tmp: Path, i: int, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """bare http/https, then agent http/https; the scheme order alternates between rounds."""
    cert = self_signed_cert(tmp)
    servers = {}
    for scheme in SCHEMES:
        d = tmp / scheme
        d.mkdir()
        port = free_port()
        master, worker = start_nginx(d, port, cert if scheme == "https" else None)
        servers[scheme] = (port, master, worker)
    order = SCHEMES if i % 2 == 0 else SCHEMES[::-1]
    out: dict[str, dict[str, float]] = {}
    agent: Agent | None = None
    try:
        for scheme in order:
            port, _, worker = servers[scheme]
            out[f"bare {scheme}"] = phase(tmp, scheme, port, worker, None, args)
        selectors = [x for _, m, w in servers.values() for x in ("--pid", str(m.pid), "--pid",
                                                                  str(w))]
        agent = Agent(tmp, selectors).start()
        with bpf_stats(args.bpf_stats):
            for scheme in order:
                port, _, worker = servers[scheme]
                out[f"agent {scheme}"] = phase(tmp, scheme, port, worker, agent, args)
        stats = agent.stop()
        for scheme in SCHEMES:
            out[f"agent {scheme}"]["events_lost_round"] = stats.get("events_lost", 0)
    finally:
        if agent is not None:
            agent.kill()
        for _, master, _ in servers.values():
            stop_group(master)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=6)
    ap.add_argument("--rate", type=int, default=4000, help="requests/s wrk sends (paced)")
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--bpf-stats", action="store_true",
                    help="per-program kernel time of the agent's BPF programs")
    ap.add_argument("--json", default=str(REPO / "bench/results/tls.json"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root (the agent loads eBPF programs)", file=sys.stderr)
        return 1
    load_start = os.getloadavg()
    runs: dict[str, list[dict[str, float]]] = {}
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory() as d:
            for mode, r in one_round(Path(d), i, args).items():
                runs.setdefault(mode, []).append(r)
                print(f"round {i + 1}/{args.repeat} {mode:<11}: "
                      + " ".join(f"{k}={v:.4g}" for k, v in r.items() if ":" not in k),
                      file=sys.stderr)
    modes = ["bare http", "bare https", "agent http", "agent https"]

    def cell(mode: str, key: str) -> str:
        vals = [r[key] for r in runs[mode] if key in r]
        if not vals:
            return "-"
        return f"{statistics.median(vals):.4g} [{min(vals):.4g}-{max(vals):.4g}]"

    print(f"\nnginx 6-byte body, wrk -t1 -c{args.connections} paced at {args.rate} req/s, "
          f"{args.seconds} s per phase, keep-alive; nginx + wrk on CPU 1, agent on CPU 0; "
          f"median [min-max] of {args.repeat} rounds")
    keys = ["rps", "p50_ms", "p99_ms", "app_cpu_us_per_req", "spans", "agent_us_per_span",
            "events_lost_round", "bpf_ns_per_req_total", "other_agents"]
    print(f"{'metric':<22}" + "".join(f" {m:>26}" for m in modes))
    for k in keys:
        if any(k in r for m in modes for r in runs[m]):
            print(f"{k:<22}" + "".join(f" {cell(m, k):>26}" for m in modes))
    for scheme in SCHEMES:
        extra = [statistics.median(
            a["app_cpu_us_per_req"] - b["app_cpu_us_per_req"]
            for a, b in zip(runs[f"agent {scheme}"], runs[f"bare {scheme}"], strict=True))]
        print(f"nginx CPU the agent adds per {scheme} request (median of per-round "
              f"differences): {extra[0]:.2f} µs")
    if args.bpf_stats:
        print("\nagent BPF programs, ns per request (median over rounds)")
        progs = sorted({k for m in modes[2:] for r in runs[m] for k in r if ":" in k})
        for k in progs:
            print(f"  {k.split(':', 1)[1]:<34}" + "".join(
                f" {cell(m, k):>26}" for m in modes[2:]))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(
        {"config": vars(args), "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
         "runs": runs}, indent=2))
    print(f"\nloadavg {load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
