"""The C entry of ``annotate`` (sdk_side/_fastbpf.c) against the Python writer, on real maps.

One seeded random sequence of annotate, clear, bind_request, set_sdk_span and kernel-side
deletes (a new request) runs four ways: through the C entry as installed, the same with
``ctx_cells`` mapped (the thread's context is written to its cell in memory, not with bpf()),
through the Python ``annotate`` of the same process, and in a child process without the
accelerator (``EBPF_BRIDGE_NO_ACCEL=1``: ctypes writes, the pure-Python thread state). After
every step the entry's bytes, the thread's mirror and the status counters must be identical.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import bridge
from sdk_side import _bpf, _writer
from tests.e2e import fastpath_trace

REPO = Path(__file__).resolve().parents[2]
STEPS = 400


@pytest.fixture
def pin_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    if os.geteuid() != 0 or not os.path.ismount("/sys/fs/bpf"):
        pytest.skip("needs root and bpffs at /sys/fs/bpf")
    if not _bpf.ACCELERATED:
        pytest.fail("sdk_side._fastbpf is not built: run scripts/install.sh (pip install -e .)")
    root = Path(f"/sys/fs/bpf/ebpf_bridge_test_fastpath_{os.getpid()}")
    root.mkdir()
    monkeypatch.setenv("EBPF_BRIDGE_PIN_DIR", str(root))
    yield root
    bridge.clear()
    monkeypatch.undo()
    _writer.reconnect()
    shutil.rmtree(root, ignore_errors=True)


def first_difference(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x != y:
            fields = [k for k in x if x[k] != y.get(k)]
            return f"step {i} ({x['op']}): {fields} differ: {x} != {y}"
    return ""


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_c_entry_leaves_what_the_python_writer_leaves(
    seed: int, pin_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast, handled = fastpath_trace.trace(seed, STEPS, pin_root / "c")
    # The same build with ctx_cells beside the map: the writes go to the thread's cell in
    # memory, which must hold what the map entry held, step for step.
    in_cells, cells_handled = fastpath_trace.trace(seed, STEPS, pin_root / "cells", cells=True)

    with monkeypatch.context() as m:
        m.setattr(_writer, "annotate", _writer._annotate_py)
        m.setattr(_writer, "_fast_annotate", None)
        slow, slow_handled = fastpath_trace.trace(seed, STEPS, pin_root / "py")

    env = {**os.environ, "EBPF_BRIDGE_NO_ACCEL": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.e2e.fastpath_trace", str(seed), str(STEPS),
         str(pin_root / "noaccel")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    child = json.loads(proc.stdout)

    # The sequence must have exercised the C entry, and the other two runs must not have.
    annotates = sum(1 for s in fast if s["op"] == "annotate")
    assert handled > annotates // 3, (handled, annotates)
    assert cells_handled > annotates // 3, (cells_handled, annotates)
    assert slow_handled == 0
    assert child["accelerated"] is False and child["handled"] == 0
    # ...and reached every kind of entry the writer can leave.
    ops = {s["op"] for s in fast}
    assert ops == {"annotate", "new request", "clear", "bind", "sdk span"}
    assert any(s["state"][0] for s in fast), "no truncated entry in the sequence"
    assert any(s["entry"] is None for s in fast) and any(s["entry"] for s in fast)

    assert fast == in_cells, first_difference(fast, in_cells)
    assert fast == slow, first_difference(fast, slow)
    assert fast == child["trace"], first_difference(fast, child["trace"])
