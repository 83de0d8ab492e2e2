"""``ebpf-bridge``: the command line (agent, doctor, demo)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from kernel_side.config import EXPORTERS, AgentConfig, ConfigError, build, load_yaml

_AGENT_HELP = """\
Trace the selected processes' HTTP/1.1, HTTP/2, gRPC, PostgreSQL, MySQL/MariaDB and Redis
traffic (plaintext, and OpenSSL TLS through uprobes) with syscall tracepoints, and export one
OpenTelemetry span per request or query, server side and client side, carrying the business
context applications set with bridge.annotate(). Runs until SIGINT/SIGTERM, then flushes and
exits 0.

Process selection (repeatable; with none, every process but the agent is traced; processes
that start later and match are picked up too):
  --pid 1234 --exe 'nginx' --exe '/usr/bin/python3*' --port 8080 --port 9000-9099

SIGHUP re-reads --config (flags still win) and applies process selection, exporters and the
stats interval without losing spans in flight; other settings need a restart (logged).

Exporters (repeatable): otlp (to --otlp-endpoint / OTEL_EXPORTER_OTLP_ENDPOINT over
OTEL_EXPORTER_OTLP_PROTOCOL=grpc|http/protobuf), jsonl (OTLP-JSON lines, as the Collector's
file exporter writes them), console (one line per span). Default: otlp when an endpoint is
set, else jsonl.
"""


def _agent_parser(sub: Any) -> None:
    p = sub.add_parser(
        "agent", help="run the agent", description=_AGENT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sel = p.add_argument_group("process selection")
    sel.add_argument("--pid", action="append", type=int, metavar="PID",
                     help="trace this process and its descendants (existing ones and those "
                     "it forks later)")
    sel.add_argument("--exe", action="append", metavar="GLOB",
                     help="trace processes whose executable path, base name or comm matches")
    sel.add_argument("--port", action="append", metavar="N[-M]",
                     help="trace processes listening on a TCP port in this range")
    exp = p.add_argument_group("export")
    exp.add_argument("--exporter", action="append", choices=EXPORTERS,
                     help="where spans go (repeatable); default otlp with an endpoint, else jsonl")
    exp.add_argument("--otlp-endpoint", metavar="URL",
                     help="OTLP endpoint; default $OTEL_EXPORTER_OTLP_ENDPOINT")
    exp.add_argument("--otlp-protocol", choices=("grpc", "http/protobuf"),
                     help="default $OTEL_EXPORTER_OTLP_PROTOCOL or grpc")
    exp.add_argument("--jsonl", metavar="PATH",
                     help="OTLP-JSON lines file (default ./ebpf-bridge-spans.jsonl)")
    run = p.add_argument_group("operation")
    run.add_argument("--config", metavar="PATH",
                     help="YAML file with the same settings as the flags (flags win)")
    run.add_argument("--ready-file", metavar="PATH",
                     help="created once every probe is attached; removed at exit")
    run.add_argument("--stats-interval", type=float, metavar="S", dest="stats_interval_s",
                     help="log counters (spans, lost events, ...) every S seconds; 0 = only at "
                     "exit (default 10)")
    run.add_argument("--idle-flush-ms", type=int, metavar="MS",
                     help="emit an exchange whose response has been quiet this long (default 100)")
    run.add_argument("--parent-wait", type=float, metavar="S", dest="parent_wait_s",
                     help="how long a client span waits for its server span's trace (default 10)")
    run.add_argument("--stitch-wait", type=float, metavar="S", dest="stitch_wait_s",
                     help="how long a server span waits for the traced client span of the same "
                     "request on this node, to join its trace (default 10); then it is exported "
                     "unstitched")
    run.add_argument("--raw-query-text", action="store_true", default=None,
                     help="keep literals in db.query.text (default: replaced by '?'; queries "
                     "carry customer data)")
    run.add_argument("--route-heuristic", action="store_true", default=None,
                     help="name server spans 'GET /orders/*' by folding ids out of the path")
    run.add_argument("--app-group", metavar="GROUP",
                     help="group allowed to write context into the pinned map (default: root only)")
    run.add_argument("--health-port", type=int, metavar="N",
                     help="serve /healthz, /readyz and Prometheus /metrics on this TCP port "
                     "(default: off)")
    run.add_argument("--health-address", metavar="ADDR",
                     help="address the health endpoint binds (default 127.0.0.1; 0.0.0.0 in a "
                     "pod, so the kubelet can probe it)")
    run.add_argument("--inject-traceparent", action="store_true", default=None,
                     help="write a W3C traceparent into outgoing HTTP/1.1 requests of traced "
                     "processes that send none, so the next node's agent joins the trace "
                     "(default: off; changes bytes on the wire: see README, 'Traceparent "
                     "injection')")
    run.add_argument("--log-level", default="info",
                     choices=("debug", "info", "warning", "error"))


def _run_agent(args: argparse.Namespace) -> int:
    from kernel_side.agent import Agent, AgentError

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    def config() -> AgentConfig:
        settings: dict[str, Any] = load_yaml(args.config) if args.config else {}
        for key in ("pid", "exe", "port", "exporter", "otlp_endpoint", "otlp_protocol", "jsonl",
                    "ready_file", "stats_interval_s", "idle_flush_ms", "parent_wait_s",
                    "stitch_wait_s", "raw_query_text",
                    "route_heuristic", "app_group", "health_port", "health_address",
                    "inject_traceparent"):
            value = getattr(args, key)
            if value is not None:
                settings[key] = value
        return build(settings)

    try:
        # SIGHUP re-reads the file and re-applies the same flags (flags still win).
        return Agent(config(), reload=config if args.config else None).run()
    except (ConfigError, AgentError) as e:
        print(f"ebpf-bridge agent: {e}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ebpf-bridge`` console script."""
    parser = argparse.ArgumentParser(
        prog="ebpf-bridge",
        description="eBPF protocol spans for every process, with business context from "
        "bridge.annotate().",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _agent_parser(sub)
    d = sub.add_parser("doctor", help="check this machine can run the agent", add_help=False)
    d.add_argument("rest", nargs=argparse.REMAINDER)
    demo = sub.add_parser("demo", help="run the agent against the example services",
                          add_help=False)
    demo.add_argument("rest", nargs=argparse.REMAINDER)
    argv = list(sys.argv[1:] if argv is None else argv)
    # doctor and demo own their options; hand them the rest of the line untouched.
    if argv and argv[0] == "doctor":
        from kernel_side import doctor

        return doctor.main(argv[1:])
    if argv and argv[0] == "demo":
        from kernel_side import demo as demo_cmd

        return demo_cmd.main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "agent":
        return _run_agent(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
