"""``ebpf-bridge demo``: a polyglot shop traced by a real agent, end to end.

Starts PostgreSQL and Redis as local processes, then four example services:

    storefront (Node)  --HTTP/1.1-->  orders (Python, calls bridge.annotate)
                                        |-- HTTP/1.1 --> inventory (Java) --JDBC--> PostgreSQL
                                        |-- RESP ------> Redis (price cache)
                                        |-- HTTP/2 h2c -> pricing (Go)      (on a cache miss)
                                        '-- SQL -------> PostgreSQL (records the order)

starts the agent selecting the four by pid, drives a burst of checkouts from several tenants
through the storefront while a live view shows progress, spans per service and lost events,
then prints one request as a waterfall across the services and a per-tenant summary, read back
from the OTLP-JSON-lines file the agent wrote. Only orders has ebpf-bridge code.

It installs nothing (``scripts/demo.sh`` runs ``scripts/install.sh`` first) and stops every
process it started on exit, Ctrl-C included; a run left behind by a killed demo is cleaned up
by the next one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kernel_side.health import parse_metrics
from kernel_side.otlp_receiver import ReceivedSpan, flatten, parse_otlp_json

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
BUILD = EXAMPLES / "build"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
JDBC_JAR = Path("/usr/share/java/postgresql.jar")
TENANTS = ("acme", "globex", "initech", "umbrella")
SERVICES = ("storefront", "orders", "pricing", "inventory")
LANG = {"storefront": "Node", "orders": "Python", "pricing": "Go", "inventory": "Java"}
SERVER, CLIENT = 2, 3
PACE_S = 0.1
"""Pause between two checkouts of one tenant, so the live view has something to show."""
FAIL_EVERY = 7
"""Every 7th checkout of a tenant asks for a sku inventory fails on: error spans to show."""
_BOLD = "\033[1m"
_DIM = "\033[2m"
_RED = "\033[31m"
_GREEN = "\033[32m"
_RESET = "\033[0m"


class DemoError(RuntimeError):
    """The demo cannot go on; the message says why and what to do."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return "    (no log)"
    return "\n".join(f"    {line}" for line in lines) or "    (empty log)"


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/pid/stat), to survive pid reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


class Stack:
    """The processes the demo started. Each runs in its own process group; ``close`` stops
    them all. Their pids are recorded in ``demo.pids`` so a later run can stop what a killed
    run left behind."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.pidfile = out_dir / "demo.pids"
        self.procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        self.cleanups: list[Callable[[], None]] = []

    def reap_leftovers(self) -> int:
        """Stop the process groups a previous, killed run recorded; return how many."""
        n = 0
        with contextlib.suppress(OSError):
            lines = self.pidfile.read_text().splitlines()
            for line in lines:
                pid_s, _, start = line.partition(" ")
                if pid_s.isdigit() and _start_time(int(pid_s)) == start:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(int(pid_s), signal.SIGKILL)
                        n += 1
            for line in lines:
                if line.startswith("dir "):
                    shutil.rmtree(line[4:], ignore_errors=True)
        self.pidfile.unlink(missing_ok=True)
        return n

    def temp_dir(self, prefix: str) -> Path:
        """A temporary directory removed at close (or by the next run, after a kill)."""
        tmp = Path(tempfile.mkdtemp(prefix=prefix))
        self.cleanups.append(lambda: shutil.rmtree(tmp, ignore_errors=True))
        with self.pidfile.open("a") as f:
            f.write(f"dir {tmp}\n")
        return tmp

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None,
              stdout_to_terminal: bool = False) -> subprocess.Popen[bytes]:
        """Start ``argv`` with its output in ``<out>/<name>.log``."""
        log = self.out_dir / f"{name}.log"
        with log.open("wb") as f:
            try:
                p = subprocess.Popen(argv, env={**os.environ, **(env or {})},
                                     start_new_session=True, stdin=subprocess.DEVNULL,
                                     stdout=None if stdout_to_terminal else f, stderr=f)
            except FileNotFoundError as e:
                raise DemoError(f"{name}: cannot run {argv[0]}: {e.strerror}; "
                                "run sudo bash scripts/install.sh") from e
        self.procs.append((name, p, log))
        with self.pidfile.open("a") as f:
            f.write(f"{p.pid} {_start_time(p.pid)}\n")
        return p

    def fail(self, name: str, what: str) -> DemoError:
        """An error naming the process, with its log tail."""
        log = self.out_dir / f"{name}.log"
        return DemoError(f"{name} {what}; the end of its log {log}:\n{_tail(log)}")

    def wait(self, name: str, p: subprocess.Popen[bytes], ready: Callable[[], bool],
             timeout_s: float = 60.0) -> None:
        """Wait until ``ready()``; fail with the log tail if the process dies or times out."""
        deadline = time.monotonic() + timeout_s
        while not ready():
            if p.poll() is not None:
                raise self.fail(name, f"exited with code {p.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise self.fail(name, f"was not ready after {timeout_s:.0f} s")
            time.sleep(0.05)

    def start_service(self, name: str, argv: list[str], env: dict[str, str],
                      timeout_s: float = 60.0) -> tuple[subprocess.Popen[bytes], int]:
        """Start a service that writes its port to ``--ready-file`` (appended here)."""
        ready = self.out_dir / f"{name}.ready"
        ready.unlink(missing_ok=True)
        p = self.spawn(name, [*argv, "--ready-file", str(ready)], env)
        self.wait(name, p, ready.exists, timeout_s)
        return p, int(ready.read_text())

    def stop(self, name: str, sig: int = signal.SIGTERM) -> int | None:
        """Stop one process by name and return its exit code."""
        for n, p, _ in self.procs:
            if n == name and p.poll() is None:
                os.killpg(p.pid, sig)
                try:
                    return p.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    return p.wait(5)
            if n == name:
                return p.returncode
        return None

    def close(self) -> None:
        """Stop everything still running, newest first, then run the cleanups."""
        for _name, p, _ in reversed(self.procs):
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for _name, p, _ in reversed(self.procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        for fn in reversed(self.cleanups):
            with contextlib.suppress(OSError):
                fn()
        self.pidfile.unlink(missing_ok=True)


# -- preflight ------------------------------------------------------------------------------

def check_root(euid: int) -> None:
    """The agent loads eBPF programs: refuse to start the stack without root."""
    if euid != 0:
        raise DemoError(f"the demo runs the eBPF agent, which needs root (this is uid {euid}): "
                        "sudo bash scripts/demo.sh")


def check_port(port: int) -> None:
    """A fixed ``--port`` must be free on loopback (0 picks a free one)."""
    if port and _port_in_use(port):
        raise DemoError(f"port {port} is in use (choose another with --port, or 0 for any "
                        f"free port); see who holds it: ss -ltnp 'sport = :{port}'")


def preflight(port: int, euid: int | None = None) -> None:
    """Fail early, with the fix, on what would otherwise fail late and obscurely."""
    check_root(os.geteuid() if euid is None else euid)
    try:
        import bcc  # noqa: F401
    except ImportError as e:
        raise DemoError(f"BCC is not importable ({e}). Run sudo bash scripts/install.sh, "
                        "then .venv/bin/ebpf-bridge doctor to see what else is missing") from e
    if not Path("/sys/kernel/btf/vmlinux").exists():
        raise DemoError("this kernel has no BTF (/sys/kernel/btf/vmlinux is missing); "
                        "run .venv/bin/ebpf-bridge doctor for what the agent needs")
    missing = [what for what, ok in (
        ("PostgreSQL 15 (postgresql)", (PG_BIN / "postgres").exists()),
        ("redis-server", shutil.which("redis-server") is not None),
        ("node (nodejs)", shutil.which("node") is not None),
        ("java (default-jdk-headless)", shutil.which("java") is not None),
        ("the JDBC driver (libpostgresql-jdbc-java)", JDBC_JAR.exists()),
        ("examples/build/pricing (examples/build.sh)", (BUILD / "pricing").exists()),
        ("examples/build/java/Inventory.class (examples/build.sh)",
         (BUILD / "java" / "Inventory.class").exists()),
    ) if not ok]
    for module in ("httpx", "h2", "psycopg", "redis"):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"the Python package {module}")
    if missing:
        raise DemoError("missing: " + ", ".join(missing) + ". Run sudo bash scripts/install.sh")
    check_port(port)


# -- databases ------------------------------------------------------------------------------

def start_postgres(stack: Stack) -> int:
    """A throwaway PostgreSQL (initdb, trust auth, run as the postgres user) on a free port."""
    tmp = stack.temp_dir("ebpf-bridge-demo-pg-")
    shutil.chown(tmp, "postgres", "postgres")
    run_as = ["runuser", "-u", "postgres", "--"]
    init = subprocess.run([*run_as, str(PG_BIN / "initdb"), "-A", "trust", "-U", "postgres",
                           "-D", str(tmp / "data")], capture_output=True, text=True,
                          check=False)
    if init.returncode:
        raise DemoError(f"initdb failed:\n{init.stdout}{init.stderr}")
    port = _free_port()
    p = stack.spawn("postgres", [*run_as, str(PG_BIN / "postgres"), "-D", str(tmp / "data"),
                                 "-p", str(port), "-k", str(tmp),
                                 "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])

    def ready() -> bool:
        return subprocess.run([str(PG_BIN / "pg_isready"), "-q", "-h", "127.0.0.1", "-p",
                               str(port)], check=False).returncode == 0

    stack.wait("postgres", p, ready)
    return port


def start_redis(stack: Stack) -> int:
    """redis-server on a free port, no persistence."""
    port = _free_port()
    p = stack.spawn("redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no", "--daemonize", "no",
                              "--dir", str(stack.out_dir)])

    def ready() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    stack.wait("redis", p, ready)
    return port


# -- spans and metrics ----------------------------------------------------------------------

class SpanFile:
    """Reads the agent's OTLP-JSON-lines file incrementally."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.spans: list[ReceivedSpan] = []

    def poll(self) -> list[ReceivedSpan]:
        """Parse the complete lines added since the last call; return all spans so far."""
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return self.spans
        end = data.rfind(b"\n") + 1
        for line in data[:end].splitlines():
            if line.strip():
                self.spans.extend(flatten(parse_otlp_json(line)))
        self.offset += end
        return self.spans


def _metrics(port: int) -> dict[str, float]:
    """The agent's Prometheus counters, without the prefix and suffix."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            return parse_metrics(r.read().decode())
    except OSError:
        return {}


def _is_warmup(s: ReceivedSpan) -> bool:
    return "warmup" in str(s.attributes.get("url.path") or s.attributes.get("url.full") or "") \
        or str(s.attributes.get("tenant_id", "")).startswith("warmup")


# -- traffic --------------------------------------------------------------------------------

@dataclass
class Progress:
    """What the traffic driver did so far."""

    total: int
    sent: int = 0
    errors: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _get(url: str, headers: dict[str, str]) -> int:
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            r.read()
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0


def _warm_up(port: int, spans: SpanFile, timeout_s: float = 60.0) -> None:
    """orders imported bridge before the agent pinned its map; its SDK looks again at most
    once a second. Wait until an annotated span proves the link is up."""
    deadline = time.monotonic() + timeout_s
    attempt = 0
    while time.monotonic() < deadline:
        tenant = f"warmup-{attempt}"
        _get(f"http://127.0.0.1:{port}/checkout/warmup", {"X-Tenant-ID": tenant})
        until = time.monotonic() + 1.5
        while time.monotonic() < until:
            if any(s.attributes.get("tenant_id") == tenant for s in spans.poll()):
                return
            time.sleep(0.1)
        attempt += 1
    raise DemoError("the orders service never picked up the agent's context map; "
                    "see orders.log and agent.log")


def order_id(tenant_no: int, i: int) -> str:
    """The id of checkout ``i`` of tenant number ``tenant_no`` (from 1): unique per request,
    and every ``FAIL_EVERY``-th one names a sku inventory answers 500 for."""
    return f"fail-{tenant_no}{i:03d}" if i % FAIL_EVERY == FAIL_EVERY - 1 \
        else f"{tenant_no}{i:03d}"


def _drive(port: int, per_tenant: int, progress: Progress) -> None:
    """Checkouts from every tenant at once; every 7th order of a tenant fails in inventory."""

    def worker(k: int, tenant: str) -> None:
        for i in range(per_tenant):
            order = order_id(k, i)
            headers = {"X-Tenant-ID": tenant, "X-User-ID": f"{tenant[:2]}-user-{i % 3}"}
            status = _get(f"http://127.0.0.1:{port}/checkout/{order}", headers)
            time.sleep(PACE_S)
            with progress.lock:
                progress.sent += 1
                progress.statuses[status] += 1
                progress.errors += status != 200

    threads = [threading.Thread(target=worker, args=(k + 1, t), daemon=True)
               for k, t in enumerate(TENANTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


class LiveView:
    """Progress, spans per service and agent counters: redrawn in place on a terminal, or as
    plain lines (``--non-interactive``)."""

    def __init__(self, progress: Progress, spans: SpanFile, health_port: int,
                 interactive: bool) -> None:
        self.progress = progress
        self.spans = spans
        self.health_port = health_port
        self.interactive = interactive
        self.drawn = 0
        self.t0 = time.monotonic()
        self.last_plain = 0.0

    def lines(self) -> list[str]:
        """The current view."""
        p = self.progress
        spans = [s for s in self.spans.poll() if not _is_warmup(s)]
        m = _metrics(self.health_port)
        width = 30
        done = int(width * p.sent / max(p.total, 1))
        bar = "█" * done + "░" * (width - done)
        per = Counter(str(s.resource.get("service.name")) for s in spans)
        out = [f"  checkouts {bar} {p.sent}/{p.total}   non-200: {p.errors}   "
               f"{time.monotonic() - self.t0:5.1f} s"]
        cells = "  ".join(f"{svc} {per.get(svc, 0):>4}" for svc in SERVICES)
        out.append(f"  spans      {cells}")
        lost = int(m.get("events_lost", 0))
        lost_s = f"{_RED}{lost}{_RESET}" if lost else f"{lost}"
        out.append(f"  agent      spans {int(m.get('spans', 0))}   events lost {lost_s}   "
                   f"unknown protocol {int(m.get('unknown_protocol', 0))}   "
                   f"parse errors {int(m.get('parse_errors', 0))}")
        return out

    def draw(self, final: bool = False) -> None:
        """Redraw (terminal) or print a line every 2 s and at the end (plain)."""
        if self.interactive:
            lines = self.lines()
            if self.drawn:
                sys.stdout.write(f"\033[{self.drawn}F")
            for line in lines:
                sys.stdout.write(f"\033[2K{line}\n")
            sys.stdout.flush()
            self.drawn = len(lines)
        elif final or time.monotonic() - self.last_plain >= 2.0:
            self.last_plain = time.monotonic()
            print("\n".join(line.strip() for line in self.lines()), flush=True)

    def run_while(self, thread: threading.Thread, settle_s: float = 8.0) -> None:
        """Draw until ``thread`` ends and the span file has caught up (no new span for a
        second, at most ``settle_s``)."""
        while thread.is_alive():
            self.draw()
            thread.join(0.25 if self.interactive else 0.5)
        deadline = time.monotonic() + settle_s
        count, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            n = len(self.spans.poll())
            if n != count:
                count, since = n, time.monotonic()
            elif time.monotonic() - since >= 1.0:
                break
            if self.interactive:
                self.draw()
            time.sleep(0.25)
        self.draw(final=True)


# -- the report -----------------------------------------------------------------------------

def _op(s: ReceivedSpan) -> str:
    a = s.attributes
    if a.get("db.system.name"):
        text = str(a.get("db.query.text") or a.get("db.operation.name") or s.name)
        return f"{a['db.system.name']}: {' '.join(text.split())}"
    proto = "h2 " if str(a.get("network.protocol.version")) == "2" else ""
    if s.kind == CLIENT and a.get("url.full"):
        full = str(a["url.full"])
        path = "/" + full.split("://", 1)[-1].split("/", 1)[-1] if "://" in full else full
        return f"{proto}{a.get('http.request.method', s.name)} {path}"
    if a.get("url.path"):
        return f"{proto}{a.get('http.request.method', s.name)} {a['url.path']}"
    return s.name


def _within(inner: ReceivedSpan, outer: ReceivedSpan, slack_ns: int = 2_000_000) -> bool:
    return outer.start_ns - slack_ns <= inner.start_ns and inner.end_ns <= outer.end_ns + slack_ns


def _client_kind(s: ReceivedSpan) -> str:
    a = s.attributes
    if a.get("db.system.name"):
        return str(a["db.system.name"])
    return "h2" if str(a.get("network.protocol.version")) == "2" else "http"


@dataclass
class Row:
    """One line of the waterfall."""

    span: ReceivedSpan
    depth: int
    note: str = ""


def pick_request(spans: list[ReceivedSpan]) -> ReceivedSpan | None:
    """A typical request: among the successful orders server spans whose trace has the most
    kinds of client call (HTTP, h2, PostgreSQL, Redis) and whose request is seen in the most
    services, the one of median duration (the first requests also open connections)."""
    by_trace: dict[str, list[ReceivedSpan]] = defaultdict(list)
    for s in spans:
        by_trace[s.trace_id].append(s)
    scored: list[tuple[int, int, ReceivedSpan]] = []
    for s in spans:
        if (s.kind == SERVER and s.resource.get("service.name") == "orders"
                and s.attributes.get("tenant_id") and not _is_warmup(s)
                and s.attributes.get("http.response.status_code") == 200):
            kinds = {_client_kind(c) for c in by_trace[s.trace_id]
                     if c.kind == CLIENT and c.parent_span_id == s.span_id}
            services = {str(r.span.resource.get("service.name"))
                        for r in request_rows(spans, s)}
            scored.append((len(kinds), len(services), s))
    if not scored:
        return None
    top = max((k, n) for k, n, _ in scored)
    best = sorted((s for k, n, s in scored if (k, n) == top), key=lambda s: s.end_ns - s.start_ns)
    return best[len(best) // 2]


def request_rows(spans: list[ReceivedSpan], orders: ReceivedSpan) -> list[Row]:
    """One request across the services: the orders trace, plus the other services' spans of
    the same request matched by URL and time (their own traces until stitching exists)."""
    order_id = str(orders.attributes.get("url.path", "")).rsplit("/", 1)[-1]
    by_parent: dict[str | None, list[ReceivedSpan]] = defaultdict(list)
    for s in spans:
        by_parent[s.parent_span_id].append(s)

    def svc(s: ReceivedSpan) -> str:
        return str(s.resource.get("service.name"))

    rows: list[Row] = []
    seen: set[str] = set()
    # The storefront's server span and its call to orders, found by path and time.
    front = [s for s in spans if svc(s) == "storefront" and s.kind == SERVER
             and s.attributes.get("url.path") == f"/checkout/{order_id}" and _within(orders, s)]
    front_call = [s for s in spans if svc(s) == "storefront" and s.kind == CLIENT
                  and str(s.attributes.get("url.full", "")).endswith(f"/orders/{order_id}")
                  and _within(orders, s)]
    depth = 0
    if front:
        rows.append(Row(front[0], 0))
        depth = 1
    if front_call:
        rows.append(Row(front_call[0], depth))
        depth += 1
    rows.append(Row(orders, depth))
    seen.update(r.span.span_id for r in rows)

    def callee(call: ReceivedSpan) -> ReceivedSpan | None:
        url = str(call.attributes.get("url.full", ""))
        path = "/" + url.split("://", 1)[-1].split("/", 1)[-1].split("?", 1)[0]
        for s in spans:
            if (s.kind == SERVER and svc(s) in ("pricing", "inventory")
                    and s.attributes.get("url.path") == path and _within(s, call)):
                return s
        return None

    def subtree(s: ReceivedSpan, d: int) -> None:
        kids = [k for k in by_parent.get(s.span_id, []) if k.trace_id == s.trace_id]
        for kid in sorted(kids, key=lambda k: k.start_ns):
            if kid.span_id in seen:
                continue
            seen.add(kid.span_id)
            rows.append(Row(kid, d))
            if (kid.kind == CLIENT and not kid.attributes.get("db.system.name")
                    and not any(k.kind == SERVER for k in by_parent.get(kid.span_id, []))):
                # Not stitched (yet): find the callee's server span by URL and time.
                srv = callee(kid)
                if srv is not None and srv.span_id not in seen:
                    seen.add(srv.span_id)
                    rows.append(Row(srv, d + 1))
                    subtree(srv, d + 2)
            subtree(kid, d + 1)

    subtree(orders, depth + 1)
    return rows


def waterfall(spans: list[ReceivedSpan], color: bool = True) -> tuple[str, dict[str, object]]:
    """The picked request as a waterfall, and a JSON-able description of it."""
    bold, dim, red, reset = (_BOLD, _DIM, _RED, _RESET) if color else ("", "", "", "")
    orders = pick_request(spans)
    if orders is None:
        return "(no annotated orders server span found)", {}
    rows = request_rows(spans, orders)
    t0 = min(r.span.start_ns for r in rows)
    t1 = max(r.span.end_ns for r in rows)
    width = 36
    traces: dict[str, int] = {}
    for r in rows:
        traces.setdefault(r.span.trace_id, len(traces) + 1)
    out = [f"{bold}one checkout across the services{reset} "
           f"(trace {orders.trace_id} is the orders trace)"]
    out.append(f"{dim}{'service':<11}{'kind':<7}{'operation':<44}{'':>{width}}  "
               f"{'ms':>7}  {'tenant':<9}trace{reset}")
    for r in rows:
        s = r.span
        a = int((s.start_ns - t0) / max(t1 - t0, 1) * width)
        b = max(a + 1, int((s.end_ns - t0) / max(t1 - t0, 1) * width))
        bar = " " * a + "█" * (b - a)
        kind = {SERVER: "SERVER", CLIENT: "CLIENT"}.get(s.kind, str(s.kind))
        op = f"{'  ' * r.depth}{_op(s)}"
        if len(op) > 43:
            op = op[:42] + "…"
        err = s.status_code == 2
        tenant = str(s.attributes.get("tenant_id", ""))
        line = (f"{s.resource.get('service.name')!s:<11}{kind:<7}{op:<44}{bar:<{width}}  "
                f"{(s.end_ns - s.start_ns) / 1e6:7.2f}  {tenant:<9}#{traces[s.trace_id]}")
        out.append(f"{red}{line}{reset}" if err else line)
    one = sorted({str(r.span.resource.get("service.name")) for r in rows
                  if r.span.trace_id == orders.trace_id})
    apart = sorted({str(r.span.resource.get("service.name")) for r in rows
                    if r.span.trace_id != orders.trace_id})
    out.append(f"{dim}#N: the trace a span is in. Trace #{traces[orders.trace_id]} holds "
               f"{', '.join(one)}: orders' server span and its PostgreSQL,\nRedis, HTTP and h2 "
               f"calls share it and carry the tenant (bridge.annotate).")
    if apart:
        out.append(f"Not in it: {', '.join(apart)}. Only orders has code of ours and no service "
                   f"sends traceparent, so a callee\njoins its caller's trace only where same-node "
                   f"stitching by connection (issue 7) links them;\nthe rest is matched to this "
                   f"request here by URL and time.")
    else:
        out.append("The Node, Go and Java services send no traceparent: their spans joined it "
                   "through same-node\nstitching by connection.")
    out[-1] += reset
    desc: dict[str, object] = {
        "orders_trace_id": orders.trace_id,
        "rows": [{"service": r.span.resource.get("service.name"), "kind": r.span.kind,
                  "operation": _op(r.span), "depth": r.depth, "trace_id": r.span.trace_id,
                  "duration_ms": round((r.span.end_ns - r.span.start_ns) / 1e6, 3),
                  "tenant_id": r.span.attributes.get("tenant_id")} for r in rows],
    }
    return "\n".join(out), desc


def tenant_summary(spans: list[ReceivedSpan]) -> dict[str, dict[str, float]]:
    """Per tenant, from the orders server spans (the ones that carry the tenant)."""
    rows: dict[str, list[ReceivedSpan]] = defaultdict(list)
    for s in spans:
        tenant = s.attributes.get("tenant_id")
        if (s.kind == SERVER and tenant and not _is_warmup(s)
                and s.resource.get("service.name") == "orders"):
            rows[str(tenant)].append(s)
    out: dict[str, dict[str, float]] = {}
    for tenant in sorted(rows):
        ss = rows[tenant]
        durs = sorted((s.end_ns - s.start_ns) / 1e6 for s in ss)
        kids = [s for s in spans if s.kind == CLIENT and s.attributes.get("tenant_id") == tenant]
        out[tenant] = {
            "requests": len(ss),
            "p50_ms": round(durs[len(durs) // 2], 3),
            "p99_ms": round(durs[min(len(durs) - 1, int(len(durs) * 0.99))], 3),
            "errors": sum(1 for s in ss if s.status_code == 2),
            "client_spans": len(kids),
            "db_spans": sum(1 for s in kids if s.attributes.get("db.system.name")),
        }
    return out


def format_summary(summary: dict[str, dict[str, float]], color: bool = True) -> str:
    """The per-tenant table, with a caption saying what the latency measures."""
    bold, dim, red, reset = (_BOLD, _DIM, _RED, _RESET) if color else ("", "", "", "")
    out = [f"{bold}{'tenant':<10} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}"
           f"  {'client spans with the tenant (of which DB/Redis)'}{reset}"]
    for tenant, r in summary.items():
        err = f"{int(r['errors']):>7}"
        out.append(f"{tenant:<10} {int(r['requests']):>8} {r['p50_ms']:>8.2f} "
                   f"{r['p99_ms']:>8.2f} {red if r['errors'] else ''}{err}"
                   f"{reset if r['errors'] else ''}  {int(r['client_spans'])} "
                   f"({int(r['db_spans'])})")
    out.append(f"{dim}latency: the orders service's server span per checkout (request bytes in "
               f"to response bytes out, as the\nkernel saw them), so it includes inventory, "
               f"pricing, PostgreSQL and Redis but not the storefront hop;\nerrors: orders "
               f"answered 5xx.{reset}")
    return "\n".join(out)


# -- the run --------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    """Run the demo; return the exit code."""
    preflight(args.port)
    interactive = sys.stdout.isatty() and not args.non_interactive
    color = sys.stdout.isatty()
    bold, dim, reset = (_BOLD, _DIM, _RESET) if color else ("", "", "")
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    stack = Stack(out_dir)
    if stack.reap_leftovers():
        print(f"{dim}stopped processes left behind by an earlier demo run{reset}")
    jsonl = out_dir / "spans.jsonl"
    jsonl.unlink(missing_ok=True)
    py = sys.executable
    try:
        print(f"{bold}1/5 databases{reset} (logs in {out_dir})")
        pg_port = start_postgres(stack)
        redis_port = start_redis(stack)
        print(f"   PostgreSQL on :{pg_port}, Redis on :{redis_port}")

        print(f"{bold}2/5 services{reset}")
        inv, inv_port = stack.start_service("inventory", [
            "java", "-cp", f"{BUILD / 'java'}:{JDBC_JAR}", "Inventory", "--port", "0",
            "--jdbc", f"jdbc:postgresql://127.0.0.1:{pg_port}/postgres?user=postgres"],
            {"OTEL_SERVICE_NAME": "inventory"})
        pri, pri_port = stack.start_service("pricing", [str(BUILD / "pricing"), "--port", "0"],
                                            {"OTEL_SERVICE_NAME": "pricing"})
        ords, ord_port = stack.start_service("orders", [
            py, str(EXAMPLES / "python" / "orders.py"), "--port", "0",
            "--inventory", f"http://127.0.0.1:{inv_port}",
            "--pricing", f"http://127.0.0.1:{pri_port}",
            "--postgres", f"host=127.0.0.1 port={pg_port} user=postgres dbname=postgres",
            "--redis", f"redis://127.0.0.1:{redis_port}/0"], {"OTEL_SERVICE_NAME": "orders"})
        front, front_port = stack.start_service("storefront", [
            "node", str(EXAMPLES / "node" / "storefront" / "server.js"),
            "--port", str(args.port), "--orders", f"http://127.0.0.1:{ord_port}"],
            {"OTEL_SERVICE_NAME": "storefront"})
        for name, p, port, note in (
                ("storefront", front, front_port, "entry point, calls orders over HTTP/1.1"),
                ("orders", ords, ord_port, "calls bridge.annotate; PostgreSQL, Redis, "
                                           "inventory (HTTP/1.1), pricing (h2c)"),
                ("pricing", pri, pri_port, "HTTP/2 cleartext"),
                ("inventory", inv, inv_port, "JDBC to PostgreSQL")):
            print(f"   {name:<10} {LANG[name]:<6} pid {p.pid:<7} :{port:<6} {dim}{note}{reset}")

        print(f"{bold}3/5 agent{reset} (compiles and attaches the eBPF programs)")
        health_port = _free_port()
        agent_ready = out_dir / "agent.ready"
        agent_ready.unlink(missing_ok=True)
        argv = [py, "-m", "kernel_side.cli", "agent", "--exporter", "jsonl", "--jsonl",
                str(jsonl), "--ready-file", str(agent_ready), "--stats-interval", "0",
                "--health-port", str(health_port), "--route-heuristic"]
        for p in (front, ords, pri, inv):
            argv += ["--pid", str(p.pid)]
        show_console = not args.no_console and not interactive
        if show_console:
            argv += ["--exporter", "console"]
        if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            argv += ["--exporter", "otlp"]
        t0 = time.monotonic()
        agent = stack.spawn("agent", argv, stdout_to_terminal=show_console)
        stack.wait("agent", agent, agent_ready.exists, timeout_s=120)
        print(f"   ready in {time.monotonic() - t0:.1f} s, selecting pids "
              f"{front.pid} {ords.pid} {pri.pid} {inv.pid}; /metrics on :{health_port}")

        print(f"{bold}4/5 traffic{reset}: {args.requests} checkouts from each of "
              f"{', '.join(TENANTS)} through the storefront")
        spans = SpanFile(jsonl)
        _warm_up(front_port, spans)
        progress = Progress(total=args.requests * len(TENANTS))
        driver = threading.Thread(target=_drive, args=(front_port, args.requests, progress),
                                  daemon=True)
        driver.start()
        LiveView(progress, spans, health_port, interactive).run_while(driver)
        metrics = _metrics(health_port)

        print(f"{bold}5/5 stopping the agent{reset} (it flushes what is pending)")
        code = stack.stop("agent", signal.SIGINT)
        if code != 0:
            raise stack.fail("agent", f"exited with code {code}")
        all_spans = spans.poll()
        shown = [s for s in all_spans if not _is_warmup(s)]
        text, desc = waterfall(shown, color)
        summary = tenant_summary(shown)
        per_service = Counter(str(s.resource.get("service.name")) for s in shown)
        print()
        print(text)
        print()
        print(format_summary(summary, color))
        print()
        print("spans per service: " + ", ".join(f"{svc} {per_service.get(svc, 0)}"
                                                 for svc in SERVICES)
              + f"; events lost {int(metrics.get('events_lost', 0))}")
        print(f"{len(all_spans)} spans (warm-up included) written to {jsonl} (OTLP-JSON lines)")
        if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            print(f"and exported to {os.environ['OTEL_EXPORTER_OTLP_ENDPOINT']}")
        if args.json_summary:
            Path(args.json_summary).write_text(json.dumps({
                "spans": len(all_spans), "jsonl": str(jsonl),
                "services": sorted({str(s.resource.get("service.name")) for s in all_spans}),
                "spans_per_service": dict(per_service),
                "requests": progress.total, "non_200": progress.errors,
                "events_lost": metrics.get("events_lost", 0),
                "pids": {"storefront": front.pid, "orders": ords.pid, "pricing": pri.pid,
                         "inventory": inv.pid},
                "tenants": summary, "waterfall": desc,
                "agent_metrics": metrics,
            }, indent=2))
        return 0
    finally:
        # A second Ctrl-C must not cut the cleanup short: hold the signals until it is done
        # (they are delivered afterwards).
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            stack.close()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ebpf-bridge demo``."""
    ap = argparse.ArgumentParser(prog="ebpf-bridge demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=12, help="checkouts per tenant (default 12)")
    ap.add_argument("--out", default="demo-output",
                    help="folder for logs and spans.jsonl (default ./demo-output)")
    ap.add_argument("--port", type=int, default=0,
                    help="storefront port (default 0: any free port)")
    ap.add_argument("--non-interactive", action="store_true",
                    help="no live redraw: plain progress lines (tests, CI)")
    ap.add_argument("--no-console", action="store_true",
                    help="do not print each span as it is exported (non-interactive runs)")
    ap.add_argument("--json-summary", metavar="PATH", help="also write a JSON summary here")
    args = ap.parse_args(argv)
    if args.requests < 1:
        ap.error("--requests must be at least 1")

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term)
    # Ctrl-C must stop the demo even where SIGINT was inherited as ignored (background jobs).
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return run(args)
    except DemoError as e:
        print(f"ebpf-bridge demo: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; every process the demo started has been stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)


if __name__ == "__main__":
    sys.exit(main())
