"""How much ``bridge.annotate`` costs per call, against a real pinned map and with no agent.

Creates a ``ctx_by_tid``-shaped hash map, pins it under /sys/fs/bpf (root needed for that
part; the no-agent rows run anyway), and times:

- ``steady``: repeated calls in one request (the entry exists: one ``BPF_EXIST`` update);
- ``new request``: the entry was cleared by the kernel before each call, as on the first
  annotate of every request (``BPF_EXIST`` fails with ``ENOENT``, then ``BPF_NOEXIST``);
- ``raw syscall``: one ``BPF_MAP_UPDATE_ELEM`` through ctypes, the floor;
- ``no agent``: no map pinned, the silent no-op.

Each row is ``--repeat`` runs of ``--iterations`` calls; the table shows the median and the
min/max of the per-run means in ns per call. Prints a table and writes JSON. It never passes
or fails on time.

    .venv/bin/python bench/annotate_bench.py [--json bench/results/annotate.json]
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
import threading
import time
from collections.abc import Callable
from pathlib import Path

import bridge
from bridge import _abi, _env
from sdk_side import _bpf, _writer

ATTRS_1 = {"tenant_id": "acme"}
ATTRS_3 = {"tenant_id": "acme", "user_id": "u-42", "feature_flag": "new-checkout"}


def measure(fn: Callable[[], object], iterations: int, repeat: int) -> dict[str, float]:
    """Per-call ns: median, min and max of ``repeat`` run means."""
    runs: list[float] = []
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        for _ in range(iterations):
            fn()
        runs.append((time.perf_counter_ns() - t0) / iterations)
    return {"median": statistics.median(runs), "min": min(runs), "max": max(runs)}


def measure_new_request(
    kw: dict[str, str], fd: int, iterations: int, repeat: int
) -> dict[str, float]:
    """annotate right after the kernel-side clear; the clear itself is timed and subtracted."""
    key = _abi.CTX_KEY.pack(os.stat("/proc/self/ns/pid").st_ino, threading.get_native_id(), 0)
    attr = _bpf.MapElemAttr(map_fd=fd, key=0, value=0, flags=0)
    kbuf = bytes(key)
    import ctypes

    kmem = ctypes.create_string_buffer(kbuf, len(kbuf))
    attr.key = ctypes.addressof(kmem)
    ptr = ctypes.c_void_p(ctypes.addressof(attr))

    def delete() -> None:
        _bpf.syscall(_bpf.NR_BPF, _bpf.CMD_DELETE, ptr, _bpf.ELEM_ATTR_SIZE)

    def both() -> None:
        delete()
        bridge.annotate(**kw)

    bridge.annotate(**kw)
    whole = measure(both, iterations, repeat)
    # Deleting a missing key costs about what deleting a present one does.
    alone = measure(delete, iterations, repeat)
    return {k: whole[k] - alone["median"] for k in whole}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--iterations", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument(
        "--json", type=Path, default=Path(__file__).parent / "results" / "annotate.json"
    )
    args = ap.parse_args(argv)
    n, r = args.iterations, args.repeat
    rows: dict[str, dict[str, float]] = {}

    with tempfile.TemporaryDirectory() as empty:
        os.environ[_env.EBPF_BRIDGE_PIN_DIR] = os.path.join(empty, "none")
        _writer.reconnect()
        rows["no agent, 1 attr"] = measure(lambda: bridge.annotate(**ATTRS_1), n, r)
        rows["no agent, 3 attrs"] = measure(lambda: bridge.annotate(**ATTRS_3), n, r)

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
            bridge.annotate(**ATTRS_3)
            st = _writer._thread()
            rows["raw syscall (floor)"] = measure(
                lambda: _bpf.syscall(_bpf.NR_BPF, _bpf.CMD_UPDATE, st.a_exist, _bpf.ELEM_ATTR_SIZE),
                n,
                r,
            )
            bridge.clear()
            rows["steady, 1 attr"] = measure(lambda: bridge.annotate(**ATTRS_1), n, r)
            bridge.clear()
            rows["steady, 3 attrs"] = measure(lambda: bridge.annotate(**ATTRS_3), n, r)
            bridge.clear()
            counter = iter(range(10**9))
            rows["steady, 3 attrs, new user_id each"] = measure(
                lambda: bridge.annotate(
                    tenant_id="acme", user_id=f"u-{next(counter)}", feature_flag="new-checkout"
                ),
                n,
                r,
            )
            bridge.clear()
            rows["new request, 1 attr"] = measure_new_request(ATTRS_1, fd, n, r)
            bridge.clear()
            rows["new request, 3 attrs"] = measure_new_request(ATTRS_3, fd, n, r)
            bridge.clear()
            status = bridge.status()
            if status.errors or status.map_full:
                note = f"unexpected: {status}"
        finally:
            os.close(fd)
            shutil.rmtree(base, ignore_errors=True)
    else:
        note = "not root or no bpffs: only the no-agent rows were measured"

    width = max(map(len, rows)) + 2
    print(
        f"bridge.annotate, ns per call ({n} calls x {r} runs; Python {platform.python_version()})"
    )
    print(f"{'case':<{width}}{'median':>10}{'min':>10}{'max':>10}")
    for name, row in rows.items():
        print(f"{name:<{width}}{row['median']:>10.0f}{row['min']:>10.0f}{row['max']:>10.0f}")
    if note:
        print(note)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "unit": "ns/call",
                "iterations": n,
                "repeat": r,
                "python": platform.python_version(),
                "machine": platform.machine(),
                "kernel": platform.release(),
                "rows": rows,
                "note": note,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
