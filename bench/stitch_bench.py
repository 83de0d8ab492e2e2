"""Same-node stitching under load, and what injection changes (issue 7).

Three zero-code Python services on this machine, front -> mid -> inventory (thread per request,
keep-alive pools shared by the request threads), driven by wrk at a paced rate against front.
The agent traces all three. Reported per mode (stitching alone; stitching with
``--inject-traceparent``): spans, server spans joined by stitching, how many of them had to
wait for their client span and for how long (mean, max), spans exported unstitched after the
wait, and whether every span of a request ended up in one trace. Prints a table and writes
JSON; never decides pass/fail.

    sudo .venv/bin/python bench/stitch_bench.py [--duration 10] [--rate 200] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from _common import compare_modes, side_by_side  # noqa: E402
from agent_bench import parse_stats  # noqa: E402

PY = sys.executable
MODES = ("stitching", "stitching+inject")


def _start(argv: list[str], ready: Path, log: Path,
           service: str | None = None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OTEL_SERVICE_NAME": service} if service else None
    with log.open("w") as out:
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                             start_new_session=True)
    deadline = time.monotonic() + 60
    while not ready.exists():
        if p.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{argv[:3]} did not start: {log.read_text()[-2000:]}")
        time.sleep(0.02)
    return p


def _traces(jsonl: Path) -> tuple[int, int]:
    """(front requests, those whose 5 spans share one trace)."""
    spans = []
    for line in jsonl.read_text().splitlines():
        for rs in json.loads(line)["resourceSpans"]:
            svc = next(a["value"]["stringValue"] for a in rs["resource"]["attributes"]
                       if a["key"] == "service.name")
            for ss in rs["scopeSpans"]:
                for s in ss["spans"]:
                    spans.append((svc, s["traceId"]))
    per_trace: dict[str, list[str]] = defaultdict(list)
    for svc, trace in spans:
        per_trace[trace].append(svc)
    fronts = sum(1 for svc, _ in spans if svc == "front") // 2  # a server and a client span
    whole = sum(1 for svcs in per_trace.values()
                if sorted(svcs) == ["front", "front", "inventory", "mid", "mid"])
    return fronts, whole


def one_run(tmp: Path, duration: int, rate: int, inject: bool) -> dict[str, float]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        env_ready = tmp / "inv.ready"
        procs.append(_start([PY, str(REPO / "examples/python/inventory.py"), "--port", "0",
                             "--ready-file", str(env_ready)], env_ready, tmp / "inv.log",
                            "inventory"))
        inv_port = int(env_ready.read_text())
        ports = {}
        upstream = f"http://127.0.0.1:{inv_port}"
        for name, prefix in (("mid", "/stock/sku-"), ("front", "/mid/")):
            ready = tmp / f"{name}.ready"
            procs.append(_start([PY, str(REPO / "tests/e2e/apps/relay.py"), "--upstream",
                                 upstream, "--prefix", prefix, "--ready-file", str(ready)],
                                ready, tmp / f"{name}.log", name))
            ports[name] = int(ready.read_text())
            upstream = f"http://127.0.0.1:{ports[name]}"
        ready = tmp / "agent.ready"
        argv = [PY, "-m", "kernel_side.cli", "agent", "--exporter", "jsonl", "--jsonl",
                str(tmp / "spans.jsonl"), "--ready-file", str(ready), "--stats-interval", "0"]
        for p in procs:
            argv += ["--pid", str(p.pid)]
        if inject:
            argv.append("--inject-traceparent")
        agent_log = tmp / "agent.log"
        with agent_log.open("w") as out:
            agent = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                     start_new_session=True)
        procs.append(agent)
        while not ready.exists():
            if agent.poll() is not None:
                raise RuntimeError(agent_log.read_text())
            time.sleep(0.02)
        script = tmp / "load.lua"
        script.write_text(
            "counter = 0\n"
            "request = function()\n  counter = counter + 1\n"
            "  return wrk.format(\"GET\", \"/front/\" .. counter)\nend\n"
            # whole milliseconds: wrk truncates delay() (see _live.wrk_pacing)
            f"function delay() return {max(1, round(4 * 1000 / rate))} end\n")
        subprocess.run(["wrk", "-t1", "-c4", f"-d{duration}s", "-s", str(script),
                        f"http://127.0.0.1:{ports['front']}/"], capture_output=True, check=True)
        os.kill(agent.pid, signal.SIGINT)
        agent.wait(120)
        stats = parse_stats(agent_log.read_text())
        fronts, whole = _traces(tmp / "spans.jsonl")
        waited = stats.get("stitch_waited", 0)
        return {
            "requests": fronts,
            "rps": fronts / duration,
            "one_trace_pct": 100.0 * whole / max(fronts, 1),
            "spans": stats.get("spans", 0),
            "stitched": stats.get("stitched", 0),
            "stitch_waited": waited,
            "stitch_wait_mean_ms": stats.get("stitch_wait_us_total", 0) / max(waited, 1) / 1000,
            "stitch_wait_max_ms": stats.get("stitch_wait_us_max", 0) / 1000,
            "stitch_timeouts": stats.get("stitch_timeouts", 0),
            "injected": stats.get("inject_injected", 0),
            "events_lost": stats.get("events_lost", 0),
        }
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--rate", type=int, default=200,
                    help="requests/s offered to front (wrk paces 4 connections; the rate reached "
                    "is reported as rps)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", default=str(REPO / "bench/results/stitch.json"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root (the agent loads eBPF programs)", file=sys.stderr)
        return 1
    def run(mode: str) -> dict[str, float]:
        with tempfile.TemporaryDirectory() as d:
            return one_run(Path(d), args.duration, args.rate, mode.endswith("inject"))

    runs = compare_modes(MODES, args.repeat, run)
    side_by_side(
        f"front -> mid -> inventory (zero-code Python, same node), wrk paced at {args.rate} "
        f"req/s for {args.duration}s; median [min-max] of {args.repeat} runs", runs,
        list(runs[MODES[0]][0]), args.json, vars(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
