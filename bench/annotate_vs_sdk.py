"""``bridge.annotate()`` against an OpenTelemetry SDK span carrying the same attributes.

The annotate rows run against real maps of the agent's shapes pinned under /sys/fs/bpf (created
here, as tests/e2e/test_sdk_map.py does; root needed), twice: with ``ctx_cells`` (the thread's
context is memory this process maps; no syscall) and with ``ctx_by_tid`` alone (one ``bpf()``
update per call; what a write-only member of the app group gets):

- ``annotate steady``: repeated calls within one request (the entry exists);
- ``annotate new request``: the kernel cleared the entry first, as before the first annotate
  of every request; the clear is timed alone and subtracted.

The SDK rows create and end one span with the same attributes through a ``TracerProvider``
with a ``BatchSpanProcessor`` (defaults) and an exporter that drops batches; its export
thread runs in this process, so its work is in the CPU column.

The process is pinned to one CPU (``--cpu``) so background threads compete with the caller as
they would in a one-worker service. Each row is ``--repeat`` runs of ``--iterations`` calls;
reported: process CPU ns per call (all threads; less sensitive to other tenants) and wall ns
per call, median [min-max] of the per-run means. Prints a table and writes JSON; never decides
pass/fail.

    sudo .venv/bin/python bench/annotate_vs_sdk.py [--iterations 100000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import platform
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import bridge  # noqa: E402
from bridge import _abi, _env  # noqa: E402
from sdk_side import _bpf, _writer  # noqa: E402

ATTRS_1 = {"tenant_id": "acme"}
ATTRS_3 = {"tenant_id": "acme", "user_id": "u-42", "feature_flag": "new-checkout"}


def measure(
    fn: Callable[[], object], n: int, repeat: int, setup: Callable[[], object] | None = None
) -> dict[str, list[float]]:
    """Per-call CPU and wall ns of ``repeat`` runs of ``n`` calls."""
    cpu: list[float] = []
    wall: list[float] = []
    for _ in range(repeat):
        c0, w0 = time.process_time_ns(), time.perf_counter_ns()
        for _ in range(n):
            fn()
        w1, c1 = time.perf_counter_ns(), time.process_time_ns()
        if setup is not None:
            setup()
        cpu.append((c1 - c0) / n)
        wall.append((w1 - w0) / n)
    return {"cpu_ns": cpu, "wall_ns": wall}


def minus(a: dict[str, list[float]], b: dict[str, list[float]]) -> dict[str, list[float]]:
    """``a`` with the median of ``b`` subtracted, clock by clock."""
    return {k: [v - statistics.median(b[k]) for v in a[k]] for k in a}


def sdk_rows(n: int, repeat: int) -> tuple[dict[str, dict[str, list[float]]], dict[str, Any]]:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class Sink(SpanExporter):
        def __init__(self) -> None:
            self.spans = 0

        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            self.spans += len(spans)
            return SpanExportResult.SUCCESS

    sink = Sink()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(sink))
    tracer = provider.get_tracer("bench")

    def span(attrs: dict[str, str]) -> Callable[[], None]:
        def fn() -> None:
            s = tracer.start_span("GET /order", attributes=attrs)
            s.end()

        return fn

    def current_span_3() -> None:
        with tracer.start_as_current_span("GET /order") as s:
            s.set_attributes(ATTRS_3)

    rows = {
        "SDK span, 1 attr (start_span + end)": measure(span(ATTRS_1), n, repeat),
        "SDK span, 3 attrs (start_span + end)": measure(span(ATTRS_3), n, repeat),
        "SDK span, 3 attrs (as current + set_attributes)": measure(current_span_3, n, repeat),
    }
    provider.force_flush()
    created = 3 * n * repeat
    provider.shutdown()
    return rows, {"sdk_spans_created": created, "sdk_spans_exported": sink.spans}


def annotate_rows(n: int, repeat: int) -> tuple[dict[str, dict[str, list[float]]], str]:
    if os.geteuid() != 0 or not os.path.ismount("/sys/fs/bpf"):
        return {}, "not root or no bpffs: annotate rows not measured"
    rows: dict[str, dict[str, list[float]]] = {}
    notes = []
    # Cells first (what a root app gets from today's agent), then the map alone (what a member
    # of the app group gets, and every app before the cells).
    for cells in (True, False):
        part, note = _annotate_rows(n, repeat, cells)
        rows.update(part)
        if note:
            notes.append(note)
    return rows, "; ".join(notes)


def _annotate_rows(n: int, repeat: int,
                   cells: bool) -> tuple[dict[str, dict[str, list[float]]], str]:
    base = Path(f"/sys/fs/bpf/ebpf_bridge_bench_vs_{os.getpid()}_{int(cells)}")
    base.mkdir()
    suffix = "" if cells else ", bpf() (no ctx_cells)"
    fd = _bpf.map_create(
        _abi.CTX_KEY.size, _abi.CTX_VALUE_SIZE, _abi.CTX_MAX_ENTRIES, name="bridge_bench"
    )
    cfd = -1
    rows: dict[str, dict[str, list[float]]] = {}
    try:
        _bpf.obj_pin(fd, str(base / _abi.CTX_BY_TID_NAME))
        if cells:
            cfd = _bpf.map_create(4, _abi.CTX_CELL_SIZE, _abi.CTX_CELLS,
                                  map_type=_bpf.BPF_MAP_TYPE_ARRAY,
                                  map_flags=_bpf.BPF_F_MMAPABLE, name="bridge_cells")
            _bpf.obj_pin(cfd, str(base / _abi.CTX_CELLS_NAME))
        os.environ[_env.EBPF_BRIDGE_PIN_DIR] = str(base)
        if not _writer.reconnect():
            raise SystemExit(f"could not open the bench map: {bridge.status().last_error}")
        if cells and not bridge.status().cells:
            return {}, f"ctx_cells not used: {bridge.status().cells_note}"
        pidns = os.stat("/proc/self/ns/pid").st_ino
        tid = threading.get_native_id()
        key = _abi.CTX_KEY.pack(pidns, tid, 0)
        kmem = ctypes.create_string_buffer(key, len(key))
        attr = _bpf.MapElemAttr(map_fd=fd, key=ctypes.addressof(kmem), value=0, flags=0)
        ptr = ctypes.c_void_p(ctypes.addressof(attr))
        if cells:
            # What the probes do when a new request starts on the thread: clear ``live``.
            view = mmap.mmap(cfd, _abi.CTX_CELLS * _abi.CTX_CELL_SIZE, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE)
            live = _abi.cell_index(_abi.cell_owner(pidns, tid)) * _abi.CTX_CELL_SIZE + 8
            zero = bytes(4)

            def delete() -> None:
                view[live:live + 4] = zero
        else:
            def delete() -> None:
                _bpf.syscall(_bpf.NR_BPF, _bpf.CMD_DELETE, ptr, _bpf.ELEM_ATTR_SIZE)

        for label, kw in (("1 attr", ATTRS_1), ("3 attrs", ATTRS_3)):
            bridge.clear()
            bridge.annotate(**kw)
            rows[f"annotate steady, {label}{suffix}"] = measure(
                lambda kw=kw: bridge.annotate(**kw), n, repeat)

            def both(kw: dict[str, str] = kw) -> None:
                delete()
                bridge.annotate(**kw)

            whole = measure(both, n, repeat)
            alone = measure(delete, n, repeat)
            rows[f"annotate new request, {label}{suffix}"] = minus(whole, alone)
        bridge.clear()
        status = bridge.status()
        note = f"unexpected: {status}" if status.errors or status.map_full else ""
        if cells and status.cell_fallbacks:
            note = f"{note} the bench thread's cell was taken".strip()
    finally:
        os.close(fd)
        if cfd >= 0:
            os.close(cfd)
        shutil.rmtree(base, ignore_errors=True)
    return rows, note


def stat(vals: list[float]) -> dict[str, float]:
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--iterations", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--cpu", type=int, default=1, help="pin this process to this CPU")
    ap.add_argument("--json", default=str(REPO / "bench/results/annotate_vs_sdk.json"))
    args = ap.parse_args(argv)
    os.sched_setaffinity(0, {args.cpu})
    n, r = args.iterations, args.repeat
    raw: dict[str, dict[str, list[float]]] = {}
    ann, note = annotate_rows(n, r)
    raw.update(ann)
    sdk, sdk_info = sdk_rows(n, r)
    raw.update(sdk)
    rows = {name: {clock: stat(v) for clock, v in row.items()} for name, row in raw.items()}
    ratios: dict[str, float] = {}
    sdk3 = rows["SDK span, 3 attrs (start_span + end)"]
    sdk1 = rows["SDK span, 1 attr (start_span + end)"]
    for name, row in rows.items():
        if name.startswith("annotate"):
            ref = sdk3 if "3 attrs" in name else sdk1
            ratios[f"SDK span / {name}"] = ref["cpu_ns"]["median"] / row["cpu_ns"]["median"]

    width = max(map(len, rows)) + 2
    print(f"ns per call, median [min-max] of {r} runs x {n} calls; pinned to CPU {args.cpu}; "
          f"Python {platform.python_version()}")
    print(f"{'case':<{width}}{'CPU ns (all threads)':>26}{'wall ns':>26}")
    for name, row in rows.items():
        cells = [f"{row[c]['median']:.0f} [{row[c]['min']:.0f}-{row[c]['max']:.0f}]"
                 for c in ("cpu_ns", "wall_ns")]
        print(f"{name:<{width}}{cells[0]:>26}{cells[1]:>26}")
    for name, ratio in ratios.items():
        print(f"{name:<{width + 16}} {ratio:6.1f}x (CPU medians)")
    dropped = sdk_info["sdk_spans_created"] - sdk_info["sdk_spans_exported"]
    print(f"SDK spans created {sdk_info['sdk_spans_created']}, exported "
          f"{sdk_info['sdk_spans_exported']}, dropped by a full BatchSpanProcessor queue {dropped}")
    if note:
        print(note)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(
        {"unit": "ns/call", "iterations": n, "repeat": r, "cpu": args.cpu,
         "python": platform.python_version(), "rows": rows, "raw": raw, "ratios": ratios,
         **sdk_info, "note": note}, indent=2) + "\n")
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
