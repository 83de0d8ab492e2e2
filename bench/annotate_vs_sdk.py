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

**Cold caches** (``--cold-iterations``, 0 to skip): a request runs a few hundred µs of its own
code between two annotate calls, so a call finds little of what it touches in the CPU caches,
which the loops above never show. These rows evict the caches before every call (one write
per cache line of an 8 MB buffer and a read of 10,000 small Python objects) and time that
call alone with the wall clock, less an empty call timed the same way. The SDK row then leaves
out its export thread's work, which favours the SDK.

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


class Evictor:
    """Pushes what the next call would touch out of the CPU caches, as a request's own work
    does between two annotate calls: one write per 64-byte line of ``mb`` MB (past this
    machine's L2 and its share of L3) and a read of ``objects`` small dicts."""

    def __init__(self, mb: int = 8, objects: int = 10_000) -> None:
        self.buf = bytearray(mb << 20)
        self.ones = b"\1" * (len(self.buf) // 64)
        self.objs = [{"n": i, "s": str(i)} for i in range(objects)]

    def evict(self) -> int:
        """Touch everything once; returns a sum so the reads are not optimised away."""
        self.buf[::64] = self.ones
        total = 0
        for d in self.objs:
            total += d["n"]
        return total


def measure_cold(fn: Callable[[], object], n: int, repeat: int, evictor: Evictor,
                 before: Callable[[], object] | None = None) -> dict[str, list[float]]:
    """Wall ns of ``fn`` alone, called after ``before`` and a cache eviction, ``repeat`` runs of
    ``n`` calls."""
    wall: list[float] = []
    clock = time.perf_counter_ns
    for _ in range(repeat):
        total = 0
        for _ in range(n):
            if before is not None:
                before()
            evictor.evict()
            t0 = clock()
            fn()
            total += clock() - t0
        wall.append(total / n)
    return {"wall_ns": wall}


def minus(a: dict[str, list[float]], b: dict[str, list[float]]) -> dict[str, list[float]]:
    """``a`` with the median of ``b`` subtracted, clock by clock."""
    return {k: [v - statistics.median(b[k]) for v in a[k]] for k in a}


def sdk_rows(n: int, repeat: int, cold: int = 0, evictor: Evictor | None = None,
             ) -> tuple[dict[str, dict[str, list[float]]], dict[str, Any],
                        dict[str, dict[str, list[float]]]]:
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
    created = 3 * n * repeat
    cold_rows: dict[str, dict[str, list[float]]] = {}
    if cold and evictor is not None:
        empty = measure_cold(lambda: None, cold, repeat, evictor)
        for label, attrs in (("1 attr", ATTRS_1), ("3 attrs", ATTRS_3)):
            cold_rows[f"SDK span, {label} (start_span + end)"] = minus(
                measure_cold(span(attrs), cold, repeat, evictor), empty)
        created += 2 * cold * repeat
    provider.force_flush()
    provider.shutdown()
    return rows, {"sdk_spans_created": created, "sdk_spans_exported": sink.spans}, cold_rows


Rows = dict[str, dict[str, list[float]]]


def annotate_rows(n: int, repeat: int, cold: int = 0,
                  evictor: Evictor | None = None) -> tuple[Rows, str, Rows]:
    if os.geteuid() != 0 or not os.path.ismount("/sys/fs/bpf"):
        return {}, "not root or no bpffs: annotate rows not measured", {}
    rows: Rows = {}
    cold_rows: Rows = {}
    notes = []
    # Cells first (what a root app gets from today's agent), then the map alone (what a member
    # of the app group gets, and every app before the cells).
    for cells in (True, False):
        part, note, cold_part = _annotate_rows(n, repeat, cells, cold, evictor)
        rows.update(part)
        cold_rows.update(cold_part)
        if note:
            notes.append(note)
    return rows, "; ".join(notes), cold_rows


def _annotate_rows(n: int, repeat: int, cells: bool, cold: int,
                   evictor: Evictor | None) -> tuple[Rows, str, Rows]:
    base = Path(f"/sys/fs/bpf/ebpf_bridge_bench_vs_{os.getpid()}_{int(cells)}")
    base.mkdir()
    suffix = "" if cells else ", bpf() (no ctx_cells)"
    fd = _bpf.map_create(
        _abi.CTX_KEY.size, _abi.CTX_VALUE_SIZE, _abi.CTX_MAX_ENTRIES, name="bridge_bench"
    )
    cfd = -1
    rows: Rows = {}
    cold_rows: Rows = {}
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
            return {}, f"ctx_cells not used: {bridge.status().cells_note}", {}
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
            if cold and evictor is not None:
                # The clear comes before the eviction: in a service the probes clear the
                # entry in the request's first read, and the handler runs between the two.
                empty = measure_cold(lambda: None, cold, repeat, evictor, before=delete)
                got = measure_cold(lambda kw=kw: bridge.annotate(**kw), cold, repeat,
                                   evictor, before=delete)
                cold_rows[f"annotate new request, {label}{suffix}"] = minus(got, empty)
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
    return rows, note, cold_rows


def stat(vals: list[float]) -> dict[str, float]:
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--iterations", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--cold-iterations", type=int, default=2000,
                    help="calls per run for the cold-cache rows (each after an eviction of "
                    "the CPU caches); 0 skips them")
    ap.add_argument("--cpu", type=int, default=1, help="pin this process to this CPU")
    ap.add_argument("--json", default=str(REPO / "bench/results/annotate_vs_sdk.json"))
    args = ap.parse_args(argv)
    os.sched_setaffinity(0, {args.cpu})
    n, r = args.iterations, args.repeat
    if args.cold_iterations < 0:
        ap.error("--cold-iterations must be 0 (skip) or more")
    cold = args.cold_iterations
    evictor = Evictor() if cold else None
    raw: Rows = {}
    ann, note, cold_raw = annotate_rows(n, r, cold, evictor)
    raw.update(ann)
    sdk, sdk_info, sdk_cold = sdk_rows(n, r, cold, evictor)
    raw.update(sdk)
    cold_raw.update(sdk_cold)
    cold_rows = {name: {c: stat(v) for c, v in row.items()} for name, row in cold_raw.items()}
    cold_ratios: dict[str, float] = {}
    for name, row in cold_rows.items():
        if name.startswith("annotate"):
            ref = cold_rows[("SDK span, 3 attrs (start_span + end)" if "3 attrs" in name
                             else "SDK span, 1 attr (start_span + end)")]
            cold_ratios[f"SDK span / {name}"] = (ref["wall_ns"]["median"]
                                                 / row["wall_ns"]["median"])
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
    if cold_rows:
        print(f"\ncold caches: the call alone after evicting the CPU caches, wall ns less an "
              f"empty call's, median [min-max] of {r} runs x {cold} calls")
        for name, row in cold_rows.items():
            w = row["wall_ns"]
            print(f"{name:<{width}}{w['median']:>12.0f} [{w['min']:.0f}-{w['max']:.0f}]")
        for name, ratio in cold_ratios.items():
            print(f"{name:<{width + 16}} {ratio:6.1f}x (wall medians; the SDK's export "
                  "thread not counted)")
    dropped = sdk_info["sdk_spans_created"] - sdk_info["sdk_spans_exported"]
    print(f"SDK spans created {sdk_info['sdk_spans_created']}, exported "
          f"{sdk_info['sdk_spans_exported']}, dropped by a full BatchSpanProcessor queue {dropped}")
    if note:
        print(note)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(
        {"unit": "ns/call", "iterations": n, "repeat": r, "cpu": args.cpu,
         "python": platform.python_version(), "rows": rows, "raw": raw, "ratios": ratios,
         "cold_iterations": cold, "cold_rows": cold_rows, "cold_raw": cold_raw,
         "cold_ratios": cold_ratios,
         **sdk_info, "note": note}, indent=2) + "\n")
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
