"""The agent's periodic heap trim (kernel_side.agent.HeapTrimmer): glibc's malloc_trim, for real."""

from __future__ import annotations

import time

from kernel_side.agent import HeapTrimmer


def test_trims_only_once_the_interval_has_passed() -> None:
    t = HeapTrimmer(interval_s=5.0)
    now = time.monotonic()
    t.maybe_trim(now)
    assert t.trims == 0  # the first trim is one interval after start
    t.maybe_trim(now + 5.1)
    assert t.trims == 1
    t.maybe_trim(now + 6.0)
    assert t.trims == 1  # not due again until 5 s after that trim
    t.maybe_trim(now + 10.2)
    assert t.trims == 2
    assert t.ns > 0


def test_returns_freed_heap_to_the_kernel() -> None:
    def rss_kb() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")

    t = HeapTrimmer(interval_s=0.0)
    t.maybe_trim(time.monotonic())  # start from a trimmed heap
    # Many mid-sized blocks (below glibc's mmap threshold, so they live on the heap) freed
    # in an order that leaves the heap's top in use: only a trim gives their pages back.
    blocks = [b"\1" * (64 * 1024) for _ in range(800)]  # written, so resident
    keep = blocks[-1]
    del blocks
    before = rss_kb()
    t.maybe_trim(time.monotonic())
    after = rss_kb()
    assert keep[0] == 1
    assert before - after > 20_000, (before, after)  # most of the ~50 MB freed
