"""The headline comparison: one Flask service, bare vs OpenTelemetry auto-instrumentation vs
the ebpf-bridge agent + ``bridge.annotate`` on every request, side by side in one run.

The service (``bench/flask_app.py``) runs under gunicorn with one sync worker pinned to
``--app-cpu``. ``/hello`` returns a tiny body; ``/order`` does one PostgreSQL query and one
Redis GET per request against a throwaway PostgreSQL and redis-server started here. Modes:

- ``bare``: gunicorn alone;
- ``otel``: ``opentelemetry-instrument gunicorn ...`` with the flask, psycopg and redis
  instrumentations (whichever are installed), OTLP/gRPC export to a local receiver,
  BatchSpanProcessor with its defaults; each request also sets tenant_id/user_id/feature_flag
  on its span, the same business context the agent mode carries;
- ``agent``: gunicorn alone, plus ``python -m kernel_side.cli agent --pid <master> --pid
  <worker>`` exporting OTLP (``--agent-protocol``, default http/protobuf) to the same
  receiver (the worker was forked before the agent started, so it is named: ``--pid`` alone
  picks up only later forks), and
  ``bridge.annotate(tenant_id=..., user_id=..., feature_flag=...)`` on every request;
- ``agent-only``: the same agent, the app does not annotate (separates the two costs).

Each mode gets a fresh gunicorn (and agent); each endpoint is driven by ``wrk -t1 -cN`` closed
loop ("max") and then at a fixed rate ("fixed": ``bench/openloop.c`` starts ``--rate``
requests a second on schedule, each on a new connection, whatever the server does, and times
each from its scheduled start; ``--fixed-rate-driver wrk`` restores the older "paced" phase,
where wrk waits ``delay()`` ms after each response, so a slower server is offered less and
the achieved rate is reported). The load generator, the agent, the receiver, PostgreSQL and
Redis share ``--load-cpu``; the app has ``--app-cpu`` to itself. Mode order rotates between
repeats.

Reported per phase: req/s, p50/p99 (wrk or openloop; openloop also reports requests it could
not start because 512 were already open, ``skipped``), app CPU us per request (the worker's
utime+stime from /proc, which includes the OTel SDK's export thread and the kernel-side cost
of the agent's probes in the worker's syscalls), spans received per request, agent CPU us per
span, agent events lost. Prints a table and writes JSON; never decides pass/fail.

    sudo .venv/bin/python bench/flask_bench.py [--duration 8] [--repeat 3] [--rate 2000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _live import cpu_seconds, cpu_split, openloop_binary, pace_script, run_openloop

from kernel_side.health import parse_metrics

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
TICK = os.sysconf("SC_CLK_TCK")
PG_BIN = Path("/usr/lib/postgresql/15/bin")
VENV_BIN = Path(sys.executable).parent
MODES = ("bare", "otel", "agent-only", "agent")
MODE_LABEL = {"bare": "bare", "otel": "OTel SDK auto", "agent-only": "agent, no annotate",
              "agent": "agent+annotate"}
SPANS_PER_REQ = {"hello": 1, "order": 3}  # server span (+ PostgreSQL and Redis client spans)


def rss_mb(pid: int) -> float:
    m = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    return int(m.group(1)) / 1024 if m else float("nan")


def other_agents(mine: int | None) -> int:
    """ebpf-bridge agents running besides ours (their probes tax every process's syscalls)."""
    n = 0
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == mine:
            continue
        try:
            cmd = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"kernel_side.cli" in cmd and b"agent" in cmd:
            n += 1
    return n


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port}")


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


# -- the OTLP receiver: counts spans, keeps nothing ---------------------------------------


class SpanCounter:
    """An OTLP trace receiver that only counts spans (the agent and the SDK share it): gRPC at
    ``endpoint``, HTTP (``http/protobuf``) at ``http_endpoint``."""

    def __init__(self) -> None:
        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as pb
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as pbg

        self.spans = 0
        self._lock = threading.Lock()
        counter = self

        class _Service(pbg.TraceServiceServicer):  # type: ignore[misc]
            def Export(self, request: Any, context: Any) -> Any:
                n = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
                with counter._lock:
                    counter.spans += n
                return pb.ExportTraceServiceResponse()

        self._server = grpc.server(ThreadPoolExecutor(max_workers=2))
        pbg.add_TraceServiceServicer_to_server(_Service(), self._server)  # type: ignore[no-untyped-call]
        port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        self.endpoint = f"http://127.0.0.1:{port}"

        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class _Http(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                request = pb.ExportTraceServiceRequest.FromString(body)
                n = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
                with counter._lock:
                    counter.spans += n
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Http)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        self.http_endpoint = f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def count(self) -> int:
        with self._lock:
            return self.spans

    def close(self) -> None:
        self._server.stop(grace=None).wait()
        self._httpd.shutdown()
        self._httpd.server_close()


# -- backends -------------------------------------------------------------------------------


@contextlib.contextmanager
def backends(tmp: Path, cpu: int) -> Iterator[tuple[str, str]]:
    """A throwaway PostgreSQL and redis-server on ``cpu``, seeded; yields (dsn, redis url)."""
    import psycopg
    import redis

    pg_tmp = Path(tempfile.mkdtemp(prefix="flask-bench-pg-"))  # postgres must reach it
    shutil.chown(pg_tmp, "postgres", "postgres")
    run_as = ["taskset", "-c", str(cpu), "runuser", "-u", "postgres", "--"]
    subprocess.run([*run_as, str(PG_BIN / "initdb"), "-A", "trust", "-U", "postgres",
                    "-D", str(pg_tmp / "data")], check=True, capture_output=True)
    pg_port, redis_port = free_port(), free_port()
    pg = subprocess.Popen([*run_as, str(PG_BIN / "postgres"), "-D", str(pg_tmp / "data"),
                           "-p", str(pg_port), "-k", str(pg_tmp),
                           "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
                          stdout=(tmp / "pg.log").open("wb"), stderr=subprocess.STDOUT,
                          start_new_session=True)
    rd = subprocess.Popen(["taskset", "-c", str(cpu), "redis-server", "--port", str(redis_port),
                           "--save", "", "--appendonly", "no", "--dir", str(tmp)],
                          stdout=(tmp / "redis.log").open("wb"), stderr=subprocess.STDOUT,
                          start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1", "-p", str(pg_port)]
                             ).returncode:
            if pg.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("postgres: " + (tmp / "pg.log").read_text()[-2000:])
            time.sleep(0.1)
        wait_port(redis_port, rd, "redis-server")
        dsn = f"host=127.0.0.1 port={pg_port} user=postgres dbname=postgres"
        url = f"redis://127.0.0.1:{redis_port}/0"
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("CREATE TABLE items (id int PRIMARY KEY, sku text NOT NULL, cents int)")
            c.execute("INSERT INTO items SELECT i, 'sku-' || i, 100 + i "
                      "FROM generate_series(0, 999) AS i")
        r = redis.Redis.from_url(url)
        r.mset({f"price:{i}": str(100 + i) for i in range(1000)})
        r.close()
        yield dsn, url
    finally:
        stop(pg, signal.SIGINT)
        stop(rd)
        shutil.rmtree(pg_tmp, ignore_errors=True)


# -- one service session (gunicorn, maybe the agent) ---------------------------------------


class Session:
    def __init__(self, mode: str, tmp: Path, args: argparse.Namespace, recv: SpanCounter,
                 dsn: str, redis_url: str) -> None:
        self.mode, self.tmp, self.recv = mode, tmp, recv
        self.port = free_port()
        env = dict(os.environ, BENCH_MODE=mode, BENCH_PG=dsn, BENCH_REDIS=redis_url,
                   PYTHONPATH=f"{REPO}:{BENCH}")
        argv = [str(VENV_BIN / "gunicorn"), "-w", "1", "-k", "sync", "-b",
                f"127.0.0.1:{self.port}", "--log-level", "warning", "flask_app:app"]
        if mode == "otel":
            env.update(OTEL_SERVICE_NAME="flask-bench", OTEL_TRACES_EXPORTER="otlp",
                       OTEL_METRICS_EXPORTER="none", OTEL_LOGS_EXPORTER="none",
                       OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=recv.endpoint,
                       OTEL_EXPORTER_OTLP_ENDPOINT=recv.endpoint,
                       OTEL_EXPORTER_OTLP_PROTOCOL="grpc", OTEL_EXPORTER_OTLP_INSECURE="true")
            argv = [str(VENV_BIN / "opentelemetry-instrument"), *argv]
        self.gunicorn = subprocess.Popen(["taskset", "-c", str(args.app_cpu), *argv], env=env,
                                         cwd=BENCH, stdout=(tmp / f"{mode}-gunicorn.log")
                                         .open("wb"), stderr=subprocess.STDOUT,
                                         start_new_session=True)
        wait_port(self.port, self.gunicorn, "gunicorn")
        kids: list[str] = []
        deadline = time.monotonic() + 10
        while not kids and time.monotonic() < deadline:
            p = Path(f"/proc/{self.gunicorn.pid}/task/{self.gunicorn.pid}/children")
            kids = p.read_text().split()
            time.sleep(0.05)
        if len(kids) != 1:
            raise RuntimeError(f"expected one gunicorn worker, got {kids}")
        self.worker = int(kids[0])
        self.agent: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}
        if mode.startswith("agent"):
            self.health = free_port()
            ready = tmp / "agent.ready"
            ready.unlink(missing_ok=True)
            self.agent_log = tmp / "agent.log"
            t0 = time.monotonic()
            self.agent = subprocess.Popen(
                ["taskset", "-c", str(args.load_cpu),
                 *(["chrt", "--idle", "0"] if args.agent_sched == "idle" else []),
                 *(["nice", "-n", "19"] if args.agent_sched == "nice" else []),
                 sys.executable, "-m", "kernel_side.cli",
                 # --pid covers the children a process forks after the agent starts; the
                 # worker already exists, so it is named too.
                 "agent", "--pid", str(self.gunicorn.pid), "--pid", str(self.worker),
                 "--exporter", "otlp",
                 "--otlp-endpoint",
                 recv.endpoint if args.agent_protocol == "grpc" else recv.http_endpoint,
                 "--otlp-protocol", args.agent_protocol,
                 "--ready-file", str(ready), "--stats-interval", "0",
                 "--health-port", str(self.health)],
                cwd=REPO, stdout=self.agent_log.open("w"), stderr=subprocess.STDOUT,
                start_new_session=True)
            while not ready.exists():
                if self.agent.poll() is not None:
                    raise RuntimeError("agent: " + self.agent_log.read_text()[-3000:])
                if time.monotonic() - t0 > 60:
                    raise RuntimeError("agent not ready within 60 s")
                time.sleep(0.01)
            self.info["start_to_ready_s"] = time.monotonic() - t0

    def metrics(self) -> dict[str, float]:
        """The agent's Prometheus counters (empty without an agent)."""
        if self.agent is None:
            return {}
        with urllib.request.urlopen(f"http://127.0.0.1:{self.health}/metrics", timeout=5) as r:
            return parse_metrics(r.read().decode())

    def close(self) -> None:
        if self.agent is not None and self.agent.poll() is None:
            self.info["agent_rss_mb"] = rss_mb(self.agent.pid)
            os.killpg(self.agent.pid, signal.SIGINT)
            try:
                self.agent.wait(60)
            except subprocess.TimeoutExpired:
                stop(self.agent, signal.SIGKILL)
            lines = [ln for ln in self.agent_log.read_text().splitlines() if "final stats" in ln]
            if lines:
                self.info["final_stats"] = {k: int(v) for k, v in
                                            re.findall(r"(\w+)=(\d+)", lines[-1])}
        stop(self.gunicorn)


# -- wrk --------------------------------------------------------------------------------


def run_wrk(port: int, path: str, duration: int, connections: int, rate: float, cpu: int,
            tmp: Path) -> dict[str, float]:
    argv = ["taskset", "-c", str(cpu), "wrk", "-t1", f"-c{connections}", f"-d{duration}s",
            "--latency"]
    if rate:
        # wrk's delay() is whole milliseconds (see _live.wrk_pacing): rounded, not truncated.
        delay = max(1, round(connections * 1000 / rate))
        argv += ["-s", str(pace_script(tmp, delay))]
    argv.append(f"http://127.0.0.1:{port}{path}")
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout

    def num(pattern: str) -> float:
        m = re.search(pattern, out)
        return float(m.group(1)) if m else 0.0

    def pct(label: str) -> float:
        m = re.search(rf"{label}%\s+([\d.]+)(us|ms|s)\b", out)
        if not m:
            return float("nan")
        return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]

    errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    return {"requests": num(r"(\d+) requests in"), "rps": num(r"Requests/sec:\s+([\d.]+)"),
            "p50_ms": pct("50"), "p99_ms": pct("99"), "socket_errors": errors,
            "non_2xx": num(r"Non-2xx or 3xx responses:\s+(\d+)")}


def phase(s: Session, endpoint: str, rate: float, args: argparse.Namespace,
          tmp: Path) -> dict[str, float]:
    others = other_agents(s.agent.pid if s.agent else None)
    load1 = os.getloadavg()[0]
    m0, spans0 = s.metrics(), s.recv.count()
    a0 = cpu_seconds(s.agent.pid) if s.agent else 0.0
    (u0, k0), w0 = cpu_split(s.worker), cpu_seconds(s.worker)
    t0 = time.monotonic()
    if rate and args.fixed_rate_driver == "openloop":
        r = run_openloop(s.port, f"/{endpoint}", rate, args.duration, args.load_cpu)
    else:
        r = run_wrk(s.port, f"/{endpoint}", args.duration, args.connections, rate,
                    args.load_cpu, tmp)
    # Let the exporters drain: the agent (idle flush 100 ms, OTLP batches) or the SDK's
    # BatchSpanProcessor (5 s schedule). Stop once every expected span arrived or none came
    # for a while. CPU is read after the drain so that the export work is counted.
    expected = r["requests"] * SPANS_PER_REQ[endpoint]
    if s.mode != "bare":
        quiet = 6.0 if s.mode == "otel" else 1.5
        last, last_change = s.recv.count(), time.monotonic()
        while time.monotonic() - last_change < quiet and last - spans0 < expected:
            time.sleep(0.1)
            now = s.recv.count()
            if now != last:
                last, last_change = now, time.monotonic()
    (u1, k1), w1 = cpu_split(s.worker), cpu_seconds(s.worker)
    r["app_user_us_per_req"] = (u1 - u0) / max(r["requests"], 1) * 1e6
    r["app_sys_us_per_req"] = (k1 - k0) / max(r["requests"], 1) * 1e6
    r["wall_s"] = time.monotonic() - t0
    r["other_agents"] = max(others, other_agents(s.agent.pid if s.agent else None))
    r["loadavg_1m"] = load1
    r["app_cpu_us_per_req"] = (w1 - w0) / max(r["requests"], 1) * 1e6
    r["app_cpu_util"] = (w1 - w0) / args.duration
    received = s.recv.count() - spans0
    r["spans_received"] = received
    r["spans_per_req"] = received / max(r["requests"], 1)
    if s.agent is not None:
        m1 = s.metrics()
        a1 = cpu_seconds(s.agent.pid)
        d = {k: m1.get(k, 0) - m0.get(k, 0) for k in m1}
        r["agent_spans"] = d.get("spans", 0)
        r["events_lost"] = d.get("events_lost", 0)
        r["context_hits"] = d.get("context_hits", 0)
        r["export_dropped"] = sum(v for k, v in d.items() if "dropped" in k)
        r["agent_cpu_s"] = a1 - a0
        r["agent_cpu_us_per_span"] = (a1 - a0) / max(r["agent_spans"], 1) * 1e6
        r["agent_cpu_util"] = (a1 - a0) / args.duration
    return r


# -- report -----------------------------------------------------------------------------


def fmt(vals: list[float]) -> str:
    vals = [v for v in vals if v == v]
    if not vals:
        return "-"
    med = statistics.median(vals)
    if len(vals) == 1:
        return f"{med:.4g}"
    return f"{med:.4g} [{min(vals):.4g}-{max(vals):.4g}]"


def median(vals: list[float]) -> float:
    vals = [v for v in vals if v == v]
    return statistics.median(vals) if vals else float("nan")


ROWS = ("rps", "p50_ms", "p99_ms", "skipped", "app_cpu_us_per_req", "app_user_us_per_req",
        "app_sys_us_per_req", "spans_per_req",
        "agent_cpu_us_per_span", "events_lost", "export_dropped", "context_hits",
        "socket_errors", "other_agents", "loadavg_1m")


def summarize(runs: dict[str, dict[str, list[dict[str, float]]]],
              modes: list[str]) -> dict[str, dict[str, Any]]:
    """Per phase: medians and spreads per mode, and each mode against bare."""
    out: dict[str, dict[str, Any]] = {}
    for ph, by_mode in runs.items():
        summ: dict[str, Any] = {}
        for mode in modes:
            rs = by_mode.get(mode, [])
            summ[mode] = {k: {"median": median([r[k] for r in rs if k in r]),
                              "min": min((r[k] for r in rs if k in r), default=float("nan")),
                              "max": max((r[k] for r in rs if k in r), default=float("nan"))}
                          for k in ROWS if any(k in r for r in rs)}
        bare = summ.get("bare", {})
        for mode in modes:
            if mode == "bare" or not bare:
                continue
            m = summ[mode]
            summ[mode]["vs_bare"] = {
                "rps_pct_of_bare": 100 * m["rps"]["median"] / bare["rps"]["median"],
                "p99_change_pct": 100 * (m["p99_ms"]["median"] / bare["p99_ms"]["median"] - 1),
                "app_cpu_change_pct": 100 * (m["app_cpu_us_per_req"]["median"]
                                             / bare["app_cpu_us_per_req"]["median"] - 1),
                "app_cpu_added_us_per_req": m["app_cpu_us_per_req"]["median"]
                - bare["app_cpu_us_per_req"]["median"],
            }
        out[ph] = summ
    return out


def print_table(runs: dict[str, dict[str, list[dict[str, float]]]], summary: dict[str, Any],
                modes: list[str], info: dict[str, list[dict[str, Any]]],
                args: argparse.Namespace) -> None:
    print(f"\nFlask under gunicorn (1 sync worker on CPU {args.app_cpu}); wrk -t1 "
          f"-c{args.connections} -d{args.duration:g}s on CPU {args.load_cpu} with the agent, "
          f"receiver, PostgreSQL and Redis; median [min-max] of {args.repeat} runs")
    w = 30
    for ph, by_mode in runs.items():
        print(f"\n{ph:<26}" + "".join(f"{MODE_LABEL[m]:>{w}}" for m in modes))
        for k in ROWS:
            if not any(k in r for m in modes for r in by_mode.get(m, [])):
                continue
            cells = [fmt([r[k] for r in by_mode.get(m, []) if k in r]) for m in modes]
            print(f"{k:<26}" + "".join(f"{c:>{w}}" for c in cells))
        for key, label in (("rps_pct_of_bare", "req/s, % of bare"),
                           ("p99_change_pct", "p99 change vs bare, %"),
                           ("app_cpu_change_pct", "app CPU/req vs bare, %"),
                           ("app_cpu_added_us_per_req", "app CPU added, us/req")):
            cells = [f"{summary[ph][m]['vs_bare'][key]:+.1f}" if "vs_bare" in summary[ph][m]
                     else "" for m in modes]
            if key == "rps_pct_of_bare":
                cells = [c.lstrip("+") for c in cells]
            print(f"{label:<26}" + "".join(f"{c:>{w}}" for c in cells))
    agent = info.get("agent", []) + info.get("agent-only", [])
    if agent:
        rss = [i["agent_rss_mb"] for i in agent if "agent_rss_mb" in i]
        ready = [i["start_to_ready_s"] for i in agent if "start_to_ready_s" in i]
        lost = [i.get("final_stats", {}).get("events_lost", 0) for i in agent]
        print(f"\nagent: RSS {fmt(rss)} MB at the end of a session; start to ready "
              f"{fmt(ready)} s; events lost over whole sessions {lost}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured wrk seconds per endpoint")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--rate", type=int, default=2000,
                    help="fixed offered rate, req/s; capped at --rate-cap of bare max")
    ap.add_argument("--rate-cap", type=float, default=0.5,
                    help="fixed rate at most this fraction of the first bare max-rate run "
                    "(an open-loop rate near capacity measures queueing, not the agent)")
    ap.add_argument("--fixed-rate-driver", choices=("openloop", "wrk"), default="openloop",
                    help="openloop (bench/openloop.c): requests start on schedule whatever the "
                    "server does, latency from the scheduled start; wrk: each connection "
                    "waits delay() ms after a response, so a slower server is offered less")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--agent-sched", choices=("normal", "nice", "idle"), default="normal",
                    help="the agent's CPU scheduling: normal, nice 19, or SCHED_IDLE")
    ap.add_argument("--agent-protocol", choices=("http/protobuf", "grpc"),
                    default="http/protobuf",
                    help="how the agent exports to the receiver (the SDK mode always uses "
                    "OTLP/gRPC, its usual setup); http/protobuf costs the agent less CPU and "
                    "about 22 MB less memory (no grpc library)")
    ap.add_argument("--endpoints", default="hello,order")
    ap.add_argument("--app-cpu", type=int, default=1)
    ap.add_argument("--load-cpu", type=int, default=0)
    ap.add_argument("--json", default=str(BENCH / "results/flask.json"))
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("run as root (the agent loads eBPF programs; PostgreSQL runs as postgres)",
              file=sys.stderr)
        return 1
    modes = [m for m in args.modes.split(",") if m]
    endpoints = [e for e in args.endpoints.split(",") if e]
    needed = ["gunicorn"] + (["opentelemetry-instrument"] if "otel" in modes else [])
    missing = [tool for tool in needed if not (VENV_BIN / tool).exists()]
    if missing:
        print(f"{', '.join(missing)} not found in {VENV_BIN}: install the bench extras with "
              f"{VENV_BIN / 'pip'} install -e '.[agent,bench]'", file=sys.stderr)
        return 1
    if args.fixed_rate_driver == "openloop":
        openloop_binary()  # build it (or fail) before the first session starts
    os.sched_setaffinity(0, {args.load_cpu})  # this driver hosts the OTLP receiver
    recv = SpanCounter()
    runs: dict[str, dict[str, list[dict[str, float]]]] = {}
    info: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    rates: dict[str, float] = {}
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="flask-bench-") as d:
        tmp = Path(d)
        with backends(tmp, args.load_cpu) as (dsn, url):
            for rep in range(args.repeat):
                order = modes[rep % len(modes):] + modes[: rep % len(modes)]
                for mode in order:
                    s = Session(mode, tmp, args, recv, dsn, url)
                    try:
                        for ep in endpoints:
                            run_wrk(s.port, f"/{ep}", args.warmup, args.connections, 0,
                                    args.load_cpu, tmp)
                            time.sleep(0.3)
                            for load in ("max", "paced"):
                                if load == "paced":
                                    if ep not in rates:
                                        bare_max = runs.get(f"/{ep} max", {}).get("bare")
                                        cap = (bare_max[0]["rps"] * args.rate_cap if bare_max
                                               else args.rate)
                                        rates[ep] = float(min(args.rate, int(cap)))
                                    rate = rates[ep]
                                    how = ("fixed" if args.fixed_rate_driver == "openloop"
                                           else "paced")
                                    key = f"/{ep} {how} {rate:.0f}/s"
                                else:
                                    rate, key = 0, f"/{ep} max"
                                r = phase(s, ep, rate, args, tmp)
                                runs.setdefault(key, {}).setdefault(mode, []).append(r)
                                print(f"rep {rep + 1} {mode:5} {key:<22} " + " ".join(
                                    f"{k}={v:.4g}" for k, v in r.items()
                                    if k in ROWS or k.endswith("util")), file=sys.stderr)
                    finally:
                        s.close()
                    info[mode].append(s.info)
                    if s.info.get("final_stats"):
                        print(f"rep {rep + 1} agent final stats: {s.info['final_stats']}",
                              file=sys.stderr)
    recv.close()
    summary = summarize(runs, modes)
    print_table(runs, summary, modes, info, args)
    result = {"config": vars(args), "paced_rates": rates, "summary": summary, "runs": runs,
              "sessions": info, "wall_s": time.monotonic() - t_start,
              "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
