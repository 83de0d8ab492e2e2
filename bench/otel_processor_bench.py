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

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, Tracer

import bridge
from bridge import _abi, _env
from sdk_side import _bpf, _writer
from sdk_side.otel import BridgeSpanProcessor


def measure(fn: Callable[[], object], iterations: int, repeat: int) -> dict[str, float]:
    """Per-call ns: median, min and max of ``repeat`` run means."""
    runs: list[float] = []
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        for _ in range(iterations):
            fn()
        runs.append((time.perf_counter_ns() - t0) / iterations)
    return {"median": statistics.median(runs), "min": min(runs), "max": max(runs)}


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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--iterations", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument(
        "--json", type=Path, default=Path(__file__).parent / "results" / "otel_processor.json"
    )
    args = ap.parse_args(argv)
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
    if os.geteuid() == 0 and os.path.ismount("/sys/fs/bpf"):
        base = Path(f"/sys/fs/bpf/ebpf_bridge_bench_{os.getpid()}")
        base.mkdir()
        fd = _bpf.map_create(
            _abi.CTX_KEY.size, _abi.CTX_VALUE_SIZE, _abi.CTX_MAX_ENTRIES, name="bridge_bench"
        )
        try:
            _bpf.obj_pin(fd, str(base / _abi.CTX_BY_TID_NAME))
            os.environ[_env.EBPF_BRIDGE_PIN_DIR] = str(base)
            if not _writer.reconnect():
                raise SystemExit(f"could not open the bench map: {bridge.status().last_error}")
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
        finally:
            os.close(fd)
            shutil.rmtree(base, ignore_errors=True)
    else:
        note = "not root or no bpffs: only the no-agent rows were measured"

    width = max(map(len, rows)) + 2
    print(f"OpenTelemetry SDK span with BridgeSpanProcessor, ns per span ({n} x {r} runs; "
          f"Python {platform.python_version()})")
    print(f"{'case':<{width}}{'median':>10}{'min':>10}{'max':>10}")
    for name, row in rows.items():
        print(f"{name:<{width}}{row['median']:>10.0f}{row['min']:>10.0f}{row['max']:>10.0f}")
    if note:
        print(note)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "unit": "ns/span", "iterations": n, "repeat": r, "python": platform.python_version(),
        "kernel": platform.release(), "rows": rows, "note": note,
    }, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
