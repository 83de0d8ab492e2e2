"""The agent's health endpoint: liveness, readiness and Prometheus metrics over plain HTTP.

``ebpf-bridge agent --health-port N`` serves, from a daemon thread:

- ``GET /healthz``: 200 while the agent's main loop is alive. The loop beats every iteration
  (at most every 50 ms); once it has started, more than ``STALE_AFTER_S`` without a beat is 503.
  Before the loop starts (BCC compiling, probes attaching) the answer is 200 ``starting``:
  a slow LLVM compile on a busy node is not a dead agent. Use ``/readyz`` (a Kubernetes
  ``startupProbe``) to bound start-up.
- ``GET /readyz``: 200 once every probe is attached, 503 before that and while shutting down.
- ``GET /metrics``: Prometheus text exposition format 0.0.4: every agent counter as
  ``ebpf_bridge_<name>_total`` and the gauges (``ebpf_bridge_waiting_parent``, ...).

The server is single-threaded on purpose: ``stop()`` returns only after the request being
served has finished, so nothing reads the agent's BPF maps after the agent has closed them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

log = logging.getLogger("ebpf_bridge.health")

STALE_AFTER_S = 5.0
PREFIX = "ebpf_bridge_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class HealthState:
    """What the loop reports (heartbeat, readiness) and the probes read. Cheap to update: one
    float store per loop iteration."""

    def __init__(self, stale_after_s: float = STALE_AFTER_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stale_after_s = stale_after_s
        self._clock = clock
        self.last_beat: float | None = None
        self.ready = False

    def beat(self, now: float | None = None) -> None:
        """The loop is alive (call every iteration)."""
        self.last_beat = self._clock() if now is None else now

    def mark_ready(self) -> None:
        """Every probe is attached; the loop starts now (counts as its first beat)."""
        self.beat()
        self.ready = True

    def live(self) -> tuple[bool, str]:
        """(alive, reason) for ``/healthz``."""
        last = self.last_beat
        if last is None:
            return True, "starting"
        age = self._clock() - last
        if age > self.stale_after_s:
            return False, f"agent loop has not run for {age:.1f} s"
        return True, "ok"


@dataclass(frozen=True)
class Metric:
    """One sample: ``kind`` is ``counter`` (name gets ``_total``) or ``gauge``."""

    name: str
    kind: str
    value: float
    help: str


def _fmt(value: float) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def render(metrics: Iterable[Metric]) -> str:
    """Prometheus text format: ``# HELP``/``# TYPE`` then ``name value`` per metric."""
    lines: list[str] = []
    seen: set[str] = set()
    for m in metrics:
        if m.kind not in ("counter", "gauge"):
            raise ValueError(f"metric {m.name}: kind must be counter or gauge, not {m.kind}")
        name = PREFIX + m.name + ("_total" if m.kind == "counter" else "")
        if name in seen:
            continue
        seen.add(name)
        help_text = m.help.replace("\\", "\\\\").replace("\n", "\\n")
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {m.kind}",
                  f"{name} {_fmt(m.value)}"]
    return "\n".join(lines) + "\n"


_KERNEL_HELP = {
    "events_lost": "events the kernel could not put on the ring buffer (full)",
    "exchanges": "request/response exchanges the kernel emitted",
    "unmatched_responses": "responses seen with no request on the connection",
    "context_hits": "exchanges that carried business context from bridge.annotate()",
    "pidns_errors": "failed PID-namespace lookups in the kernel",
    "connections": "connections the kernel started tracking",
    "proc_events_lost": "process exec/fork/exit events lost (ring buffer full)",
    "conns_deleted": "exchange entries the kernel program deleted (ordinary ends)",
    "socks_created": "connections the kernel program started tracking",
    "socks_deleted": "tracked connections closed",
    "tracking_full": "syscalls or processes not traced because a bookkeeping map was full",
    "conns_live": "exchanges in progress now (the conns map)",
    "conns_evicted": "exchanges evicted from the full conns map without a span",
    "socks_live": "connections tracked now (the socks map)",
    "socks_evicted": "tracked connections evicted from the full socks map (later traffic unseen)",
}
_EXPORT_GAUGES = {"queued"}


def parse_metrics(text: str) -> dict[str, float]:
    """The samples of a ``/metrics`` page as ``{name: value}``, names without the
    ``ebpf_bridge_`` prefix and ``_total`` suffix (the reader's side of ``render``)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            name = name.removeprefix("ebpf_bridge_").removesuffix("_total")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def agent_metrics(agent: Any) -> list[Metric]:
    """Every counter of a running ``kernel_side.agent.Agent``, the ones ``format_stats`` logs."""
    out: list[Metric] = []
    for name, v in agent.kernel_stats().items():
        out.append(Metric(name, "counter", v, _KERNEL_HELP.get(name, f"kernel counter {name}")))
    for name, v in agent.table_stats().items():
        kind = "gauge" if name.endswith("_live") else "counter"
        out.append(Metric(name, kind, v, _KERNEL_HELP.get(name, f"connection map {name}")))
    asm = agent.assembler
    if asm is not None:
        s = asm.stats
        out += [
            Metric("spans", "counter", s.spans, "spans assembled and handed to the exporters"),
            Metric("unknown_protocol", "counter", s.unknown_protocol,
                   "exchanges no protocol parser recognised"),
            Metric("parse_errors", "counter", s.parse_errors, "exchanges a parser rejected"),
            Metric("parent_timeouts", "counter", s.parent_timeouts,
                   "client spans exported without their server span's trace (wait expired)"),
            Metric("pending_overflow", "counter", s.pending_overflow,
                   "spans released early because too many were waiting for a parent"),
            Metric("sdk_covered", "counter", s.sdk_covered,
                   "spans not emitted because an OpenTelemetry SDK span covered the operation"),
            Metric("sdk_parented", "counter", s.sdk_parented,
                   "spans parented under the OpenTelemetry SDK span active at the time"),
            Metric("waiting_parent", "gauge", asm.waiting,
                   "client spans currently held back waiting for their parent's trace"),
            Metric("conn_states", "gauge", asm.conn_states,
                   "connections whose per-connection parser memory the agent holds"),
        ]
    registry = getattr(agent, "registry", None)
    if registry is not None:
        out.append(Metric("procs_full", "counter", registry.procs_full,
                          "processes not traced because the traced-process map was full"))
    out += [
        Metric("idle_flushed", "counter", agent.idle_flushed,
               "exchanges emitted by the idle flush (response quiet for --idle-flush-ms)"),
        Metric("callback_errors", "counter", agent.callback_errors,
               "ring buffer events, or rounds of releasing held spans, whose handling raised"),
    ]
    if agent.fanout is not None:
        for k, v in agent.fanout.stats().items():
            kind = "gauge" if k in _EXPORT_GAUGES else "counter"
            out.append(Metric(f"export_{k}", kind, v, f"exporter {k.replace('_', ' ')}"))
    ready_s = getattr(agent, "start_to_ready_s", 0.0)
    if ready_s:
        out.append(Metric("start_to_ready_seconds", "gauge", ready_s,
                          "seconds from start to every probe attached"))
    return out


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 2.0  # a client that stalls cannot block the probes for long

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        srv = self.server
        if path == "/healthz":
            ok, why = srv.state.live()
            self._reply(200 if ok else 503, why + "\n")
        elif path == "/readyz":
            ready = srv.state.ready
            self._reply(200 if ready else 503, "ready\n" if ready else "not ready\n")
        elif path == "/metrics":
            try:
                body = render(srv.collect())
            except Exception as e:
                log.exception("collecting metrics failed")
                self._reply(503, f"metrics unavailable: {e}\n")
                return
            self._reply(200, body, CONTENT_TYPE)
        else:
            self._reply(404, "not found: try /healthz, /readyz or /metrics\n")

    def _reply(self, status: int, body: str,
               ctype: str = "text/plain; charset=utf-8") -> None:
        raw = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(raw)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, format: str, *args: object) -> None:
        """Probes every few seconds are not worth a log line."""


class _Server(HTTPServer):
    def __init__(self, address: tuple[str, int], state: HealthState,
                 collect: Callable[[], Iterable[Metric]]) -> None:
        self.state = state
        self.collect = collect
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)


class HealthServer:
    """``/healthz``, ``/readyz`` and ``/metrics`` on ``address:port`` from a daemon thread."""

    def __init__(self, address: str, port: int, state: HealthState,
                 collect: Callable[[], Iterable[Metric]]) -> None:
        self.state = state
        try:
            self._httpd = _Server((address, port), state, collect)
        except OSError as e:
            raise OSError(
                e.errno, f"cannot serve health endpoint on {address}:{port}: {e.strerror}"
            ) from None
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.2},
                                        name="ebpf-bridge-health", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return int(self._httpd.server_address[1])

    def stop(self) -> None:
        """Stop serving; returns once no request is being served. Idempotent."""
        self.state.ready = False
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(5)
        with contextlib.suppress(OSError):
            self._httpd.server_close()
