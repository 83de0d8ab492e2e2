"""``ebpf-bridge demo``: the example services traced by a real agent, end to end.

Starts the example inventory and orders services (orders calls ``bridge.annotate``), starts the
agent selecting them, drives traffic from several tenants, then prints one trace as a
waterfall and a per-tenant summary read back from the OTLP-JSON-lines file the agent wrote.
Every process it starts is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from kernel_side.otlp_receiver import ReceivedSpan, flatten, parse_otlp_json

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "python"
TENANTS = ("acme", "globex", "initech", "umbrella")
_BOLD = "\033[1m"
_DIM = "\033[2m"
_RED = "\033[31m"
_RESET = "\033[0m"


class DemoError(RuntimeError):
    """The demo cannot go on; the message says why and what to do."""


class Stack:
    """The processes the demo started; ``close`` stops them all."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str], ready: Path,
              timeout_s: float = 60.0, stdout_to_terminal: bool = False) -> subprocess.Popen[bytes]:
        """Start a process and wait for its ready file; show its log tail if it fails."""
        log = self.out_dir / f"{name}.log"
        ready.unlink(missing_ok=True)
        with log.open("wb") as f:
            p = subprocess.Popen(argv, env={**os.environ, **env}, start_new_session=True,
                                 stdout=None if stdout_to_terminal else f, stderr=f)
        self.procs.append((name, p, log))
        deadline = time.monotonic() + timeout_s
        while not ready.exists():
            if p.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
                raise DemoError(f"{name} failed to start (exit {p.poll()}); its log {log}:\n{tail}")
            time.sleep(0.02)
        return p

    def stop(self, name: str, sig: int = signal.SIGTERM) -> int | None:
        """Stop one process by name and return its exit code."""
        for n, p, _ in self.procs:
            if n == name and p.poll() is None:
                os.killpg(p.pid, sig)
                try:
                    return p.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    return p.wait(5)
        return None

    def close(self) -> None:
        """Stop everything still running."""
        for _name, p, _ in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                    p.wait(10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)


def _get(url: str, headers: dict[str, str]) -> int:
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def _spans(path: Path) -> list[ReceivedSpan]:
    if not path.exists():
        return []
    out: list[ReceivedSpan] = []
    for line in path.read_bytes().splitlines():
        if line.strip():
            out.extend(flatten(parse_otlp_json(line)))
    return out


def _warm_up(port: int, jsonl: Path) -> None:
    # The app imported bridge before the agent pinned its map; its SDK looks again at most once
    # a second. Wait until an annotated span proves the link is up.
    for attempt in range(40):
        tenant = f"warmup-{attempt}"
        _get(f"http://127.0.0.1:{port}/orders/warmup", {"X-Tenant-ID": tenant})
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            if any(s.attributes.get("tenant_id") == tenant for s in _spans(jsonl)):
                return
            time.sleep(0.1)
    raise DemoError("the orders service never picked up the agent's context map")


def _drive(port: int, per_tenant: int) -> None:
    done = [0]
    lock = threading.Lock()
    total = per_tenant * len(TENANTS)

    def worker(tenant: str) -> None:
        for i in range(per_tenant):
            order = f"fail-{i}" if i % 7 == 6 else f"{i}"
            headers = {"X-Tenant-ID": tenant, "X-User-ID": f"{tenant[:2]}-user-{i % 3}"}
            if i % 5 == 0:
                headers["traceparent"] = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
            _get(f"http://127.0.0.1:{port}/orders/{order}", headers)
            with lock:
                done[0] += 1
                print(f"\r{_DIM}requests sent: {done[0]}/{total}{_RESET}", end="",
                      file=sys.stderr, flush=True)

    threads = [threading.Thread(target=worker, args=(t,)) for t in TENANTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(file=sys.stderr)


def _waterfall(spans: list[ReceivedSpan]) -> str:
    """One annotated trace as an indented waterfall with duration bars."""
    candidates = [s for s in spans if s.kind == 2 and s.attributes.get("tenant_id")
                  and not str(s.attributes.get("tenant_id")).startswith("warmup")]
    if not candidates:
        return "(no annotated server span found)"
    root = max(candidates, key=lambda s: s.end_ns - s.start_ns)
    trace = [s for s in spans if s.trace_id == root.trace_id]
    children: dict[str | None, list[ReceivedSpan]] = defaultdict(list)
    for s in trace:
        children[s.parent_span_id].append(s)
    t0, t1 = root.start_ns, max(s.end_ns for s in trace)
    width = 40
    lines = [f"{_BOLD}trace {root.trace_id}{_RESET}"]

    def walk(span: ReceivedSpan, depth: int) -> None:
        a = int((span.start_ns - t0) / max(t1 - t0, 1) * width)
        b = max(a + 1, int((span.end_ns - t0) / max(t1 - t0, 1) * width))
        bar = " " * a + "█" * (b - a)
        kind = {2: "SERVER", 3: "CLIENT"}.get(span.kind, str(span.kind))
        what = span.attributes.get("url.path") or span.attributes.get("url.full") or ""
        tenant = span.attributes.get("tenant_id", "")
        status = span.attributes.get("http.response.status_code", "")
        label = f"{'  ' * depth}{span.resource.get('service.name')} {kind} {span.name} {what}"
        lines.append(f"{label:<62.62} {status!s:>3} {bar:<{width}} "
                     f"{(span.end_ns - span.start_ns) / 1e6:7.2f} ms  {tenant}")
        for kid in sorted(children.get(span.span_id, []), key=lambda s: s.start_ns):
            walk(kid, depth + 1)

    walk(root, 0)
    lines.append(f"{_DIM}(inventory has no annotate call, so its spans carry no tenant; "
                 f"linking its server span into this trace is cross-process stitching){_RESET}")
    return "\n".join(lines)


def _summary(spans: list[ReceivedSpan]) -> str:
    """Per-tenant request count, latency percentiles and errors of the orders server spans."""
    rows: dict[str, list[ReceivedSpan]] = defaultdict(list)
    for s in spans:
        tenant = s.attributes.get("tenant_id")
        if s.kind == 2 and tenant and not str(tenant).startswith("warmup"):
            rows[str(tenant)].append(s)
    out = [f"{_BOLD}{'tenant':<12} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}"
           f"  client spans carrying the tenant{_RESET}"]
    for tenant in sorted(rows):
        ss = rows[tenant]
        durs = sorted((s.end_ns - s.start_ns) / 1e6 for s in ss)
        p50 = durs[len(durs) // 2]
        p99 = durs[min(len(durs) - 1, int(len(durs) * 0.99))]
        errors = sum(1 for s in ss if s.status_code == 2)
        kids = sum(1 for s in spans if s.kind == 3 and s.attributes.get("tenant_id") == tenant)
        err = f"{_RED}{errors:>7}{_RESET}" if errors else f"{errors:>7}"
        out.append(f"{tenant:<12} {len(ss):>8} {p50:>8.2f} {p99:>8.2f} {err}  {kids}")
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    """Run the demo; return the exit code."""
    if os.geteuid() != 0:
        raise DemoError("the demo runs the eBPF agent, which needs root: sudo bash scripts/demo.sh")
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / "spans.jsonl"
    jsonl.unlink(missing_ok=True)
    stack = Stack(out_dir)
    py = sys.executable
    try:
        print(f"{_BOLD}1/4 starting services{_RESET} (logs in {out_dir})")
        inv_ready, ord_ready = out_dir / "inventory.ready", out_dir / "orders.ready"
        inv = stack.start("inventory", [py, str(EXAMPLES / "inventory.py"), "--port", "0",
                                        "--ready-file", str(inv_ready)],
                          {"OTEL_SERVICE_NAME": "inventory"}, inv_ready)
        inv_port = int(inv_ready.read_text())
        orders = stack.start("orders", [py, str(EXAMPLES / "orders.py"), "--port", "0",
                                        "--inventory", f"http://127.0.0.1:{inv_port}",
                                        "--ready-file", str(ord_ready)],
                             {"OTEL_SERVICE_NAME": "orders"}, ord_ready)
        ord_port = int(ord_ready.read_text())
        print(f"   orders  pid {orders.pid} on :{ord_port} (calls bridge.annotate)")
        print(f"   inventory pid {inv.pid} on :{inv_port} (no ebpf-bridge code)")
        print(f"{_BOLD}2/4 starting the agent{_RESET} (compiles and attaches eBPF programs)")
        agent_ready = out_dir / "agent.ready"
        argv = [py, "-m", "kernel_side.cli", "agent", "--pid", str(orders.pid), "--pid",
                str(inv.pid), "--exporter", "jsonl", "--jsonl", str(jsonl), "--ready-file",
                str(agent_ready), "--stats-interval", "0"]
        if not args.no_console:
            argv += ["--exporter", "console"]
        if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            argv += ["--exporter", "otlp"]
        t0 = time.monotonic()
        stack.start("agent", argv, {}, agent_ready, stdout_to_terminal=not args.no_console)
        print(f"   ready in {time.monotonic() - t0:.1f} s")
        print(f"{_BOLD}3/4 driving traffic{_RESET} from tenants {', '.join(TENANTS)}")
        _warm_up(ord_port, jsonl)
        _drive(ord_port, args.requests)
        print(f"{_BOLD}4/4 stopping the agent{_RESET} (it flushes what is pending)")
        code = stack.stop("agent", signal.SIGINT)
        if code != 0:
            raise DemoError(f"the agent exited with {code}; see {out_dir / 'agent.log'}")
        spans = _spans(jsonl)
        print()
        print(_waterfall(spans))
        print()
        print(_summary(spans))
        print()
        print(f"{len(spans)} spans written to {jsonl} (OTLP-JSON lines)")
        if args.json_summary:
            Path(args.json_summary).write_text(json.dumps({
                "spans": len(spans), "jsonl": str(jsonl),
                "services": sorted({str(s.resource.get("service.name")) for s in spans}),
            }))
        return 0
    finally:
        stack.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ebpf-bridge demo``."""
    ap = argparse.ArgumentParser(prog="ebpf-bridge demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=12, help="requests per tenant (default 12)")
    ap.add_argument("--out", default="demo-output",
                    help="folder for logs and spans.jsonl (default ./demo-output)")
    ap.add_argument("--no-console", action="store_true",
                    help="do not print each span as it is exported (non-interactive runs)")
    ap.add_argument("--json-summary", metavar="PATH", help="also write a JSON summary here")
    args = ap.parse_args(argv)
    old = signal.getsignal(signal.SIGINT)
    try:
        return run(args)
    except DemoError as e:
        print(f"ebpf-bridge demo: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; every process the demo started has been stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, old)


if __name__ == "__main__":
    sys.exit(main())
