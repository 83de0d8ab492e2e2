"""What ``sdk_side.otel.BridgeSpanProcessor`` adds to each OpenTelemetry SDK span.

Times ``with tracer.start_as_current_span(...)`` (start, activate, end) on a tracer provider
with no exporter, so the SDK's own cost is the baseline:

- ``SDK only``: no processor;
- ``+ processor, no agent``: the processor added, no map pinned (its writes are no-ops);
- ``+ processor, pinned map``: a real ``ctx_by_tid``-shaped map pinned under /sys/fs/bpf (root
  needed), so each start and end is a ``BPF_MAP_UPDATE_ELEM``;
- ``client span inside a server span``: the nested case (start writes the client span, end
  writes the server span back), per client span;
- ``annotate``: ``bridge.annotate`` with the processor's hook setting the attributes on the
  active SDK span too, against plain ``annotate``.

Each row is ``--repeat`` runs of ``--iterations`` spans; the table shows median, min and max of
the per-run means in ns. Prints a table and writes JSON; never passes or fails on time.

    .venv/bin/python bench/otel_processor_bench.py [--json bench/results/otel_processor.json]
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable

from _common import can_pin, measure, micro_args, pinned_context_map, report
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, Tracer

import bridge
from bridge import _env
from sdk_side import _writer
from sdk_side.otel import BridgeSpanProcessor


def one_span(tracer: Tracer) -> Callable[[], None]:
    def run() -> None:
        with tracer.start_as_current_span("op", kind=SpanKind.INTERNAL):
            pass

    return run


def nested(tracer: Tracer, iterations: int, repeat: int) -> dict[str, float]:
    """Client spans inside one long server span: the per-client-span cost."""
    with tracer.start_as_current_span("server", kind=SpanKind.SERVER):
        def client() -> None:
            with tracer.start_as_current_span("GET", kind=SpanKind.CLIENT):
                pass

        return measure(client, iterations, repeat)


def main(argv: list[str] | None = None) -> int:
    args = micro_args(argv, __doc__, 20_000, "otel_processor.json")
    n, r = args.iterations, args.repeat
    rows: dict[str, dict[str, float]] = {}

    plain = TracerProvider().get_tracer("bench")
    rows["SDK only"] = measure(one_span(plain), n, r)
    with_proc = TracerProvider()
    processor = BridgeSpanProcessor()
    with_proc.add_span_processor(processor)
    tracer = with_proc.get_tracer("bench")
    with tempfile.TemporaryDirectory() as empty:
        os.environ[_env.EBPF_BRIDGE_PIN_DIR] = os.path.join(empty, "none")
        _writer.reconnect()
        rows["+ processor, no agent"] = measure(one_span(tracer), n, r)

    note = ""
    if can_pin():
        with pinned_context_map():
            writes = bridge.status().writes
            rows["+ processor, pinned map"] = measure(one_span(tracer), n, r)
            if bridge.status().writes - writes < n * r:
                note = "unexpected: the processor did not write the map for every span"
            rows["client span inside a server span, SDK only"] = nested(plain, n, r)
            rows["client span inside a server span, + processor"] = nested(tracer, n, r)
            with tracer.start_as_current_span("server", kind=SpanKind.SERVER):
                rows["annotate, processor hook on"] = measure(
                    lambda: bridge.annotate(tenant_id="acme"), n, r
                )
            processor.shutdown()
            with tracer.start_as_current_span("server", kind=SpanKind.SERVER):
                rows["annotate, no hook"] = measure(lambda: bridge.annotate(tenant_id="acme"), n, r)
            status = bridge.status()
            if status.errors or status.map_full:
                note = f"unexpected: {status}"
    else:
        note = "not root or no bpffs: only the no-agent rows were measured"

    report("OpenTelemetry SDK span with BridgeSpanProcessor", "ns/span", rows, note, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
