"""Per-protocol cost and capacity of the agent (issue 3's figures).

1. Parser + span assembly CPU per span for each protocol, on bytes captured from the real
   servers (tests/unit/fixtures). Request/response protocols (PostgreSQL, MySQL, Redis,
   HTTP/1.1): a connection is replayed once to warm its state (startup, prepared
   statements), then its span-producing exchanges are timed in a loop. HTTP/2 and gRPC: each
   captured connection is replayed whole, chunk by chunk, through the agent's stream path
   (``SpanAssembler.on_chunk`` -> ``StreamSpans`` -> ``H2Connection``) as a new connection each
   round, so the figure includes the preface, SETTINGS and a fresh HPACK table per
   connection, shared among that connection's streams.
2. Live capacity: a real server driven at full speed by a real client with the agent tracing
   the client (redis-benchmark, pgbench -S, mariadb-slap) or the server (nginx + wrk, a grpcio
   server under unary calls from several threads). The agent has core 0, server and load core
   1. Per run: spans per second counted in the agent's JSONL output (only this run's spans,
   by server port or method), events the kernel lost (ring buffer full) from the agent's final
   stats, and agent CPU per span net of its idle cost (utime+stime from /proc, minus the idle
   rate measured over an equal window before the load). When no event was lost, the load
   tool was the limit, and the agent's CPU share says how far from its own limit it was. The
   share of the window the agent's consumer thread spent runnable but without a CPU
   (/proc schedstat) says how much of any loss is the machine being busy.

Prints tables (median [min-max] of --repeat runs) and writes JSON; never pass/fail. Part 2
needs root, PostgreSQL 15, MariaDB, redis, nginx and wrk (a missing one is skipped and said).

    sudo .venv/bin/python bench/protocol_bench.py [--seconds 6] [--repeat 3] [--skip-live]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _live import (  # noqa: E402
    LOAD_CPU,
    Agent,
    attr_is,
    count_spans,
    free_port,
    other_agents,
    start_nginx,
    stop_group,
    wait_file,
    wait_port,
)

from kernel_side.assembly import SpanAssembler  # noqa: E402
from kernel_side.events import ROLE_CLIENT, Chunk, Exchange  # noqa: E402
from kernel_side.model import Resource, SpanRecord  # noqa: E402
from kernel_side.protocols.http2_spans import StreamSpans  # noqa: E402
from kernel_side.protocols.registry import register_all  # noqa: E402

FIX = REPO / "tests" / "unit" / "fixtures"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
H2_FIXTURES = {"http/2": ("h2c_httpx", "h2c_curl"),
               "grpc": ("grpc_unary", "grpc_server_stream", "grpc_error", "grpc_mixed")}


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


def _assembler() -> tuple[SpanAssembler, list[SpanRecord]]:
    """An assembler wired as the agent wires it: every protocol, and the HTTP/2 stream path."""
    spans: list[SpanRecord] = []
    asm = SpanAssembler(_Procs(), spans.append)
    register_all(asm)
    asm.set_stream_handler(StreamSpans(asm))
    return asm, spans


def _timed(asm: SpanAssembler, spans: list[SpanRecord], rounds: int,
           feed: Callable[[int], None]) -> dict[str, float]:
    spans.clear()
    parse_errors = asm.stats.parse_errors
    t0 = time.process_time()
    for r in range(rounds):
        feed(r)
    dt = time.process_time() - t0
    if asm.stats.parse_errors != parse_errors or not spans:
        raise RuntimeError("the replay made parse errors or no spans: the fixtures and the "
                           "parsers disagree; run tests/unit first")
    return {"us_per_span": dt / len(spans) * 1e6, "spans_per_round": len(spans) / rounds}


def exchange_costs(rounds: int) -> dict[str, dict[str, float]]:
    """CPU microseconds per span for each request/response protocol's parse + assembly."""
    results: dict[str, dict[str, float]] = {}
    for proto, conns in _connections().items():
        asm, spans = _assembler()
        hot: list[Exchange] = []
        for ci, conn in enumerate(conns):
            for i, (req, resp) in enumerate(conn):
                before = len(spans)
                ex = _exchange(req, resp, 1000 * ci + i + 1, ci + 1)
                asm.on_exchange(ex)
                if len(spans) > before:
                    hot.append(ex)

        def feed(_r: int, hot: list[Exchange] = hot, asm: SpanAssembler = asm) -> None:
            for ex in hot:
                asm.on_exchange(ex)

        results[proto] = _timed(asm, spans, rounds, feed)
    return results


def _h2_chunks(name: str, conn_id: int) -> list[Chunk]:
    """One captured HTTP/2 connection as the kernel hands it over, then its close."""
    doc = json.loads((FIX / "http2" / f"{name}.json").read_text())
    out = []
    ts = 1_000
    for tag, hx, _ in doc["chunks"]:
        data = bytes.fromhex(hx)
        ts += 1_000
        out.append(Chunk(tgid=1, fd=5, role=ROLE_CLIENT, from_client=tag == "c", closed=False,
                         peer_address="127.0.0.1", peer_port=50051, listen_fd=0, tid=1,
                         total_len=len(data), conn_id=conn_id, ts_ns=ts,
                         parent_exchange_id=0, data=data, ctx=None))
    out.append(Chunk(tgid=1, fd=5, role=ROLE_CLIENT, from_client=True, closed=True,
                     peer_address="127.0.0.1", peer_port=50051, listen_fd=0, tid=1,
                     total_len=0, conn_id=conn_id, ts_ns=ts + 1_000, parent_exchange_id=0,
                     data=b"", ctx=None))
    return out


def stream_costs(rounds: int) -> dict[str, dict[str, float]]:
    """CPU microseconds per span for HTTP/2 and gRPC: frames, HPACK, streams and assembly."""
    results: dict[str, dict[str, float]] = {}
    for proto, names in H2_FIXTURES.items():
        asm, spans = _assembler()
        # Built beforehand, as the other rows' Exchange objects are: decoding the ring
        # buffer's bytes is not part of either figure.
        plan = [[c for i, n in enumerate(names) for c in _h2_chunks(n, r * 16 + i + 1)]
                for r in range(rounds)]

        def feed(r: int, plan: list[list[Chunk]] = plan, asm: SpanAssembler = asm) -> None:
            for c in plan[r]:
                asm.on_chunk(c)

        results[proto] = _timed(asm, spans, rounds, feed)
    return results


def parser_costs(rounds: int, repeat: int) -> dict[str, dict[str, float]]:
    """Median, min and max of ``repeat`` runs of every protocol's per-span cost."""
    runs: dict[str, list[dict[str, float]]] = {}
    for _ in range(repeat):
        for proto, r in {**exchange_costs(rounds), **stream_costs(rounds)}.items():
            runs.setdefault(proto, []).append(r)
    out = {}
    for proto, rs in runs.items():
        us = [r["us_per_span"] for r in rs]
        out[proto] = {"us_per_span": statistics.median(us), "min": min(us), "max": max(us),
                      "spans_per_round": rs[0]["spans_per_round"], "runs": us}
    return out


# -- part 2: live ---------------------------------------------------------------------------


@dataclass
class Load:
    """One protocol's live case: the agent's selectors, the load (returns operations the tool
    reports), and which spans in the JSONL output are this case's."""

    selectors: list[str]
    run: Callable[[int], int]
    match: Callable[[dict[str, object]], bool]


@contextlib.contextmanager
def redis_case(tmp: Path, seconds: int) -> Iterator[Load]:
    """redis-server; redis-benchmark -c 4 GET/SET, traced as the client."""
    port = free_port()
    server = subprocess.Popen(["taskset", "-c", LOAD_CPU, "redis-server", "--port", str(port),
                               "--save", "", "--appendonly", "no"],
                              stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_port(port, lambda: server.poll() is None)

        def run(n: int) -> int:
            subprocess.run(["taskset", "-c", LOAD_CPU, "redis-benchmark", "-p", str(port),
                            "-c", "4", "-n", str(n), "-t", "get,set", "-q"],
                           capture_output=True, check=True, timeout=600)
            return 2 * n

        # redis-benchmark has no duration: size the run from a short calibration.
        t0 = time.monotonic()
        run(20_000)
        per_s = 40_000 / (time.monotonic() - t0)
        yield Load(["--exe", "redis-benchmark"],
                   lambda _s: run(int(per_s * seconds / 2)),
                   attr_is("server.port", port))
    finally:
        stop_group(server)


@contextlib.contextmanager
def postgres_case(tmp: Path, seconds: int) -> Iterator[Load]:
    """A throwaway PostgreSQL (as tests/e2e/test_postgres.py starts one); pgbench -S -c 4."""
    # Its own directory: the postgres user cannot enter the bench's (root's, mode 700).
    data = Path(tempfile.mkdtemp(prefix="ebpf-bridge-bench-pg-"))
    shutil.chown(data, "postgres", "postgres")
    run_as = ["taskset", "-c", LOAD_CPU, "runuser", "-u", "postgres", "--"]
    subprocess.run([*run_as, str(PG_BIN / "initdb"), "-A", "trust", "-U", "postgres",
                    "-D", str(data / "data")], check=True, capture_output=True)
    port = free_port()
    with (data / "postgres.log").open("wb") as log:
        server = subprocess.Popen(
            [*run_as, str(PG_BIN / "postgres"), "-D", str(data / "data"), "-p", str(port),
             "-k", str(data), "-c", "listen_addresses=127.0.0.1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1", "-p", str(port)]).returncode:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((data / "postgres.log").read_text()[-2000:])
            time.sleep(0.1)
        conn = ["-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]
        # The real binary: /usr/bin/pgbench is Debian's perl wrapper that execs it.
        pgbench = str(PG_BIN / "pgbench")
        subprocess.run([pgbench, "-i", "-q", *conn, "postgres"], check=True,
                       capture_output=True)

        def run(s: int) -> int:
            out = subprocess.run(["taskset", "-c", LOAD_CPU, pgbench, "-S", "-c", "4", "-j", "1",
                                  "-T", str(s), *conn, "postgres"],
                                 capture_output=True, text=True, check=True, timeout=600).stdout
            m = re.search(r"number of transactions actually processed: (\d+)", out)
            if m is None:
                raise RuntimeError(f"unexpected pgbench output:\n{out}")
            return int(m.group(1))

        yield Load(["--exe", "pgbench"], run, attr_is("server.port", port))
    finally:
        stop_group(server, signal.SIGINT)  # fast shutdown: do not wait for clients
        shutil.rmtree(data, ignore_errors=True)


@contextlib.contextmanager
def mysql_case(tmp: Path, seconds: int) -> Iterator[Load]:
    """A throwaway MariaDB (as tests/e2e/test_mysql.py starts one); mariadb-slap, 4 clients
    each running SELECT 1 over TCP."""
    import pymysql

    from tests.fixtures_capture import capture_mysql

    with capture_mysql.mariadbd(tmp) as port:
        # mariadb-slap creates its schema only for generated SQL; with --query it must exist.
        conn = pymysql.connect(host="127.0.0.1", port=port, user="root", password="",
                               autocommit=True)
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE IF NOT EXISTS bench")
        conn.close()
        common = [f"--port={port}", "--host=127.0.0.1", "--protocol=tcp", "--user=root"]

        def run(n: int) -> int:
            out = subprocess.run(["taskset", "-c", LOAD_CPU, "mariadb-slap", *common,
                                  "--concurrency=4", "--iterations=1",
                                  f"--number-of-queries={n}", "--query=SELECT 1",
                                  "--create-schema=bench", "--no-drop"],
                                 capture_output=True, text=True, check=True, timeout=600)
            # It exits 0 when its clients cannot connect: an error line is the only sign.
            if "Error" in out.stderr:
                raise RuntimeError(f"mariadb-slap: {out.stderr.strip()}")
            return n  # --number-of-queries is the total over all clients

        t0 = time.monotonic()
        run(8_000)
        per_s = 8_000 / (time.monotonic() - t0)
        yield Load(["--exe", "mariadb-slap"], lambda s: run(int(per_s * s)),
                   attr_is("server.port", port))


@contextlib.contextmanager
def grpc_case(tmp: Path, seconds: int) -> Iterator[Load]:
    """tests/e2e/apps/h2_app.py grpc-server (grpcio, h2c), traced as the server, under unary
    calls from bench/grpc_load.py's 4 threads."""
    ready = tmp / "grpc.ready"
    server = subprocess.Popen(["taskset", "-c", LOAD_CPU, sys.executable,
                               str(REPO / "tests/e2e/apps/h2_app.py"), "grpc-server",
                               "--ready-file", str(ready)], start_new_session=True)
    try:
        port = int(wait_file(ready, lambda: server.poll() is None))

        def run(s: int) -> int:
            out = subprocess.run(["taskset", "-c", LOAD_CPU, sys.executable,
                                  str(REPO / "bench/grpc_load.py"), str(port), str(s), "4"],
                                 capture_output=True, text=True, check=True, timeout=600)
            return int(out.stdout.split()[-1])

        yield Load(["--pid", str(server.pid)], run, attr_is("rpc.method", "GetItem"))
    finally:
        stop_group(server)


@contextlib.contextmanager
def http_case(tmp: Path, seconds: int) -> Iterator[Load]:
    """nginx returning 6 bytes, traced as the server (by pid: --exe would also pick other
    people's nginx on a shared machine); wrk -c8."""
    port = free_port()
    master, worker = start_nginx(tmp, port)
    try:
        def run(s: int) -> int:
            out = subprocess.run(["taskset", "-c", LOAD_CPU, "wrk", "-t1", "-c8", f"-d{s}s",
                                  f"http://127.0.0.1:{port}/"],
                                 capture_output=True, text=True, check=True, timeout=600).stdout
            return int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]

        yield Load(["--pid", str(master.pid), "--pid", str(worker)], run,
                   attr_is("server.port", port))
    finally:
        stop_group(master)


CASES: dict[str, tuple[Callable[[Path, int], contextlib.AbstractContextManager[Load]],
                       Callable[[], str | None]]] = {
    "redis (redis-benchmark -c4 GET/SET)": (
        redis_case, lambda: None if shutil.which("redis-benchmark") else "no redis-benchmark"),
    "postgresql (pgbench -S -c4)": (
        postgres_case,
        lambda: None if (PG_BIN / "pgbench").exists() else "no PostgreSQL 15 binaries"),
    "mysql (mariadb-slap -c4 SELECT 1)": (
        mysql_case,
        lambda: None if shutil.which("mariadb-slap") and shutil.which("mariadbd")
        else "no mariadbd / mariadb-slap"),
    "grpc (grpcio unary, 4 threads)": (grpc_case, lambda: None),
    "http/1.1 (nginx, wrk -c8)": (
        http_case, lambda: None if shutil.which("wrk") and shutil.which("nginx")
        else "no nginx / wrk"),
}


def one_live_run(tmp: Path, load: Load, seconds: int) -> dict[str, float]:
    """One agent over one load window."""
    agent = Agent(tmp, load.selectors)
    try:
        agent.start()
        idle = agent.idle_cpu_per_s(seconds)
        others = other_agents(agent.pid)
        c0, w0, t0 = agent.cpu(), agent.runqueue_wait(), time.monotonic()
        ops = load.run(seconds)
        window = time.monotonic() - t0
        during, waited = agent.cpu() - c0, agent.runqueue_wait() - w0
        agent.wait_drained()
        busy = agent.cpu() - c0
        drained = time.monotonic() - t0
        stats = agent.stop()
    finally:
        agent.kill()
    spans = count_spans(agent.jsonl, load.match)
    net = busy - idle * drained
    return {
        "window_s": window, "tool_ops": ops, "spans": spans, "spans_per_s": spans / window,
        "events_lost": stats.get("events_lost", 0),
        "export_dropped": stats.get("export_dropped_queue_full", 0),
        "agent_core_busy": during / window, "agent_runqueue_wait": waited / window,
        "idle_cpu_per_s": idle, "other_agents": max(others, other_agents(agent.pid)),
        "agent_us_per_span": net / max(spans, 1) * 1e6,
    }


def live_capacity(seconds: int, repeat: int, only: list[str]) -> dict[str, object]:
    """Every live case, ``repeat`` agent runs against one server each."""
    out: dict[str, object] = {}
    for name, (case, missing) in CASES.items():
        if only and not any(o in name for o in only):
            continue
        why = missing()
        if why:
            print(f"skipped {name}: {why}", file=sys.stderr)
            out[name] = {"skipped": why}
            continue
        runs = []
        with tempfile.TemporaryDirectory() as d, case(Path(d), seconds) as load:
            for i in range(repeat):
                r = one_live_run(Path(d), load, seconds)
                runs.append(r)
                print(f"{name} run {i + 1}/{repeat}: "
                      + " ".join(f"{k}={v:.4g}" for k, v in r.items()), file=sys.stderr)
        out[name] = {"runs": runs}
    return out


def _cell(runs: list[dict[str, float]], key: str, fmt: str) -> str:
    vals = [r[key] for r in runs]
    return (f"{format(statistics.median(vals), fmt)} "
            f"[{format(min(vals), fmt)}-{format(max(vals), fmt)}]")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3000)
    ap.add_argument("--seconds", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated substrings of live case names "
                    "(redis,postgresql,mysql,grpc,http/1.1)")
    ap.add_argument("--skip-live", action="store_true")
    ap.add_argument("--json", default=str(REPO / "bench/results/protocols.json"))
    args = ap.parse_args()
    load_start = os.getloadavg()
    costs = parser_costs(args.rounds, args.repeat)
    print(f"parser + span assembly, CPU per span (process time; {args.rounds} rounds, median "
          f"[min-max] of {args.repeat})")
    print(f"{'protocol':<12} {'spans/round':>12} {'us/span':>22} {'implied max spans/s':>20}")
    for proto, r in costs.items():
        cell = f"{r['us_per_span']:.1f} [{r['min']:.1f}-{r['max']:.1f}]"
        print(f"{proto:<12} {r['spans_per_round']:>12.0f} {cell:>22} "
              f"{1e6 / r['us_per_span']:>20,.0f}")
    live: dict[str, object] = {}
    if not args.skip_live:
        if os.geteuid() != 0:
            print("live capacity needs root (the agent loads eBPF programs)", file=sys.stderr)
            return 1
        live = live_capacity(args.seconds, args.repeat,
                             [o for o in args.only.split(",") if o])
        print(f"\nlive load, {args.seconds} s windows, agent on CPU 0, server + load tool on "
              f"CPU 1; median [min-max] of {args.repeat} runs")
        cols = [("spans_per_s", "spans/s out", ",.0f"), ("tool_ops", "tool ops", ",.0f"),
                ("spans", "spans (JSONL)", ",.0f"), ("events_lost", "events lost", ",.0f"),
                ("agent_core_busy", "agent CPU share", ".2f"),
                ("agent_runqueue_wait", "agent waited CPU", ".2f"),
                ("agent_us_per_span", "agent us/span", ".1f")]
        for name, res in live.items():
            print(f"\n{name}")
            if "skipped" in res:  # type: ignore[operator]
                print(f"  skipped: {res['skipped']}")  # type: ignore[index]
                continue
            for key, label, fmt in cols:
                print(f"  {label:<18} {_cell(res['runs'], key, fmt)}")  # type: ignore[index]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(
        {"config": vars(args), "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
         "parser_us_per_span": costs, "live": live}, indent=2))
    print(f"\nloadavg {load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
