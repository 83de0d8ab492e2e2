"""Every benchmark in one command, with short defaults (about 20 minutes on 2 cores).

Runs, in order: annotate_vs_sdk (annotate() vs an OpenTelemetry SDK span), otel_processor
(what BridgeSpanProcessor adds to an SDK span), pipeline_bench (agent user-space cost per span
by stage), agent_bench at max rate and paced (nginx worst case), flask_bench (bare vs
OpenTelemetry auto-instrumentation vs agent + annotate, at max rate and at a fixed open-loop
rate), kernel_cost (per BPF program, under nginx and under the Flask bench's gunicorn), inject
and stitch, protocol_bench (parser cost per protocol, and live
capacity under redis-benchmark, pgbench, mariadb-slap, grpcio and wrk) and tls_bench (HTTPS vs
HTTP at a fixed rate). Each writes its own JSON under bench/results/; this prints every table
and writes bench/results/all.json with all of them. Never decides pass/fail.

    sudo .venv/bin/python bench/run_all.py [--quick] [--only flask,annotate]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run one bench: stdout captured, stderr (progress) shown live and kept.

    Both go to files, not pipes: a server a crashed bench left behind must not keep us
    waiting for an end of file.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=err, text=True)
        shown = 0
        while True:
            done = proc.poll() is not None
            err.seek(shown)
            chunk = err.read()
            shown += len(chunk.encode())
            sys.stderr.write(chunk)
            sys.stderr.flush()
            if done:
                break
            time.sleep(0.5)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(argv, proc.returncode, out.read(), err.read())


def benches(quick: bool) -> dict[str, list[str]]:
    """name -> argv (without the JSON path); ``quick`` halves durations and repeats."""
    d = "3" if quick else "5"
    rep = "2" if quick else "3"
    return {
        "annotate_vs_sdk": ["bench/annotate_vs_sdk.py", "--iterations",
                            "20000" if quick else "50000", "--repeat", "5",
                            "--cold-iterations", "500" if quick else "2000"],
        "otel_processor": ["bench/otel_processor_bench.py", "--iterations",
                           "5000" if quick else "20000", "--repeat", "5"],
        "pipeline": ["bench/pipeline_bench.py", "--n", "2000" if quick else "5000",
                     "--repeat", "3"],
        "agent_max": ["bench/agent_bench.py", "--duration", d, "--repeat", "2",
                      "--exporter", "otlp-http"],
        # The budget's operating point: 10,000 spans/s (wrk's pacing calibrated to reach it).
        "agent_paced": ["bench/agent_bench.py", "--duration", d, "--repeat", "2",
                        "--rate", "10000", "--exporter", "otlp-http"],
        "agent_paced_jsonl": ["bench/agent_bench.py", "--duration", d, "--repeat", "2",
                              "--rate", "10000", "--exporter", "jsonl"],
        "flask": ["bench/flask_bench.py", "--duration", d, "--repeat", rep],
        "kernel_cost": ["bench/kernel_cost.py", "--duration", d],
        # The Flask bench's app: a new connection per request, and Python's syscalls.
        "kernel_cost_gunicorn": ["bench/kernel_cost.py", "--duration", d, "--target",
                                 "gunicorn", "--rate", "1000"],
        "inject": ["bench/inject_bench.py", "--duration", d, "--repeat", "2"],
        "stitch": ["bench/stitch_bench.py", "--duration", "4" if quick else "8", "--repeat", "2"],
        "protocols": ["bench/protocol_bench.py", "--seconds", "3" if quick else "6",
                      "--repeat", rep],
        "tls": ["bench/tls_bench.py", "--seconds", "3" if quick else "6", "--repeat", rep],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="shorter runs (about 5 minutes)")
    ap.add_argument("--only", default="", help="comma-separated subset of: "
                    + ",".join(benches(False)))
    ap.add_argument("--json", default=str(RESULTS / "all.json"))
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("run as root (the agent loads eBPF programs)", file=sys.stderr)
        return 1
    todo = benches(args.quick)
    if args.only:
        todo = {k: v for k, v in todo.items() if k in args.only.split(",")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out: dict[str, object] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                    "python": platform.python_version(), "loadavg_at_start": os.getloadavg()},
        "commands": {},
        "results": {},
        "wall_s": {},
    }
    failed = []
    tables = []
    for name, cmd in todo.items():
        path = RESULTS / f"{name}.json"
        argv_ = [sys.executable, *cmd, "--json", str(path)]
        out["commands"][name] = " ".join(["sudo", ".venv/bin/python", *cmd])  # type: ignore[index]
        print(f"== {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        for attempt in (1, 2):  # one retry: a start-up race must not sink the whole run
            p = run(argv_)
            if p.returncode == 0:
                break
            print(f"== {name} failed (attempt {attempt})", file=sys.stderr, flush=True)
        out["wall_s"][name] = round(time.monotonic() - t0, 1)  # type: ignore[index]
        failure = "" if p.returncode == 0 else (
            f"FAILED (exit {p.returncode}): " + (p.stderr.strip().splitlines() or [""])[-1] + "\n")
        tables.append(f"== {name} ({' '.join(cmd)})\n{failure}{p.stdout}")
        print(tables[-1], flush=True)
        if p.returncode != 0:
            failed.append(name)
            out["results"][name] = {"error": p.stderr.strip()[-2000:]}  # type: ignore[index]
            continue
        out["results"][name] = json.loads(path.read_text())  # type: ignore[index]
    out["loadavg_at_end"] = os.getloadavg()
    out["failed"] = failed
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    (RESULTS / "all.txt").write_text("\n".join(tables))
    print(f"wall time per bench (s): {out['wall_s']}")
    print(f"JSON: {args.json}; tables: {RESULTS / 'all.txt'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
