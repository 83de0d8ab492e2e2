"""Pieces the micro-benchmarks share: timing, and a private pinned context map."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import bridge
from bridge import _abi, _env
from sdk_side import _bpf, _writer


def measure(fn: Callable[[], object], iterations: int, repeat: int) -> dict[str, float]:
    """Per-call ns: median, min and max of ``repeat`` run means."""
    runs: list[float] = []
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        for _ in range(iterations):
            fn()
        runs.append((time.perf_counter_ns() - t0) / iterations)
    return {"median": statistics.median(runs), "min": min(runs), "max": max(runs)}


def can_pin() -> bool:
    """Whether this process may create and pin maps (root, bpffs mounted)."""
    return os.geteuid() == 0 and os.path.ismount("/sys/fs/bpf")


@contextmanager
def pinned_context_map() -> Iterator[int]:
    """A ``ctx_by_tid``-shaped map pinned in a private directory, with the writer connected to
    it; yields its read-write fd. Removed on exit."""
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
        yield fd
    finally:
        os.close(fd)
        shutil.rmtree(base, ignore_errors=True)


def micro_args(argv: list[str] | None, doc: str | None, iterations: int,
               json_name: str) -> argparse.Namespace:
    """``--iterations``, ``--repeat`` and ``--json`` for a micro-benchmark."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    ap.add_argument("--iterations", type=int, default=iterations)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / json_name)
    return ap.parse_args(argv)


def report(title: str, unit: str, rows: dict[str, dict[str, float]], note: str,
           args: argparse.Namespace) -> None:
    """Print the rows as a table (median, min, max) and write them as JSON to ``args.json``."""
    width = max(map(len, rows)) + 2
    print(f"{title}, {unit} ({args.iterations} x {args.repeat} runs; "
          f"Python {platform.python_version()})")
    print(f"{'case':<{width}}{'median':>10}{'min':>10}{'max':>10}")
    for name, row in rows.items():
        print(f"{name:<{width}}{row['median']:>10.0f}{row['min']:>10.0f}{row['max']:>10.0f}")
    if note:
        print(note)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "unit": unit, "iterations": args.iterations, "repeat": args.repeat,
        "python": platform.python_version(), "machine": platform.machine(),
        "kernel": platform.release(), "rows": rows, "note": note,
    }, indent=2) + "\n")
    print(f"wrote {args.json}")


def compare_modes(modes: tuple[str, ...], repeat: int,
                  run: Callable[[str], dict[str, float]]) -> dict[str, list[dict[str, float]]]:
    """``run(mode)`` for every mode, ``repeat`` rounds, modes interleaved within each round so
    that a machine growing busier or quieter affects them alike; prints each run."""
    import sys

    runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    width = max(map(len, modes))
    for i in range(repeat):
        for mode in modes:
            r = run(mode)
            runs[mode].append(r)
            print(f"run {i + 1}/{repeat} {mode:<{width}}: "
                  + " ".join(f"{k}={v:.4g}" for k, v in r.items()), file=sys.stderr)
    return runs


def side_by_side(title: str, runs: dict[str, list[dict[str, float]]], keys: list[str],
                 json_path: str | Path, config: dict[str, object]) -> None:
    """Print median [min-max] of each key, one column per mode, and write every run as JSON."""
    def cell(mode: str, key: str) -> str:
        vals = [r[key] for r in runs[mode] if key in r]
        if not vals:
            return "-"
        return f"{statistics.median(vals):.4g} [{min(vals):.4g}-{max(vals):.4g}]"

    print(f"\n{title}")
    print(f"{'metric':<24}" + "".join(f" {m:>32}" for m in runs))
    for k in keys:
        print(f"{k:<24}" + "".join(f" {cell(m, k):>32}" for m in runs))
    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": config, "runs": runs}, indent=2))
    print(f"\nJSON: {path}")
