"""The ring-drain settings the agent derives: CPU count for the kernel's wake-up threshold,
and the event loop's drain timer."""

from __future__ import annotations

import ctypes
import itertools
import os
from pathlib import Path

import pytest

from kernel_side import ring
from kernel_side.agent import DRAIN_INTERVAL_MAX_S, drain_interval_s, possible_cpus


@pytest.mark.parametrize(("text", "want"), [
    ("0\n", 1), ("0-1\n", 2), ("0-3,8-11\n", 8), ("0,2,4-5", 4),
])
def test_possible_cpus_reads_the_kernels_cpu_list(tmp_path: Path, text: str, want: int) -> None:
    f = tmp_path / "possible"
    f.write_text(text)
    assert possible_cpus(str(f)) == want


@pytest.mark.parametrize("text", ["", "x-y", "3-"])
def test_possible_cpus_falls_back_on_garbage(tmp_path: Path, text: str) -> None:
    f = tmp_path / "possible"
    f.write_text(text)
    assert possible_cpus(str(f)) == (os.cpu_count() or 1)
    assert possible_cpus(str(tmp_path / "missing")) == (os.cpu_count() or 1)


def test_this_machine_has_at_least_its_online_cpus() -> None:
    assert possible_cpus() >= (os.cpu_count() or 1)


def test_drain_interval_follows_idle_flush_within_bounds() -> None:
    assert drain_interval_s(100) == 0.1
    assert drain_interval_s(30) == 0.03
    assert drain_interval_s(1) == 0.01
    assert drain_interval_s(0) == 0.01
    assert drain_interval_s(5_000) == DRAIN_INTERVAL_MAX_S == 0.2


class _FakeClock:
    """perf_counter_ns for the drain: each handled record moves it by ``step_ns``."""

    def __init__(self, step_ns: int) -> None:
        self.now = 0
        self.step_ns = step_ns

    def perf_counter_ns(self) -> int:
        return self.now


def _reader(handle: object) -> ring.RingReader:
    r = ring.RingReader.__new__(ring.RingReader)
    r._handle = handle  # type: ignore[assignment]
    return r


@pytest.mark.parametrize(("step_us", "records", "yields"), [
    (1, 150, 0),     # 150 µs of work: under one slice, never yields
    (50, 40, 10),    # 2 ms of work: a yield after every 4 records (200 µs)
    (300, 5, 5),     # one slow record already overruns the slice: a yield after each
])
def test_a_long_drain_offers_the_cpu_between_records(
    monkeypatch: pytest.MonkeyPatch, step_us: int, records: int, yields: int
) -> None:
    clock = _FakeClock(step_us * 1000)
    monkeypatch.setattr(ring, "time", clock)
    yielded: list[int] = []
    monkeypatch.setattr(ring.os, "sched_yield", lambda: yielded.append(clock.now))
    seen: list[bytes] = []

    def handle(raw: bytes) -> None:
        seen.append(raw)
        clock.now += clock.step_ns

    batch = [bytes([i]) for i in range(records)]
    _reader(handle)._hand_over(batch)
    assert seen == batch  # every record, once, in ring order
    assert len(yielded) == yields
    gaps = [b - a for a, b in itertools.pairwise([0, *yielded])]
    assert all(g <= ring.YIELD_AFTER_NS + clock.step_ns for g in gaps)


def test_bccs_callback_path_offers_the_cpu_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without kernel_side._fastring, BCC calls back per record; the same 200 µs rule holds
    within one drain, and a new drain starts its own slice."""
    clock = _FakeClock(50_000)
    monkeypatch.setattr(ring, "time", clock)
    monkeypatch.setattr(ring, "_fastring", None)
    yielded: list[int] = []
    monkeypatch.setattr(ring.os, "sched_yield", lambda: yielded.append(clock.now))
    pending: list[list[bytes]] = []

    class FakeMap:
        def open_ring_buffer(self, cb: object) -> None:
            self.cb = cb

    class FakeBpf:
        table = FakeMap()

        def __getitem__(self, name: str) -> FakeMap:
            return self.table

        def ring_buffer_consume(self) -> None:
            for raw in pending.pop(0):
                buf = ctypes.create_string_buffer(raw, len(raw))
                self.table.cb(None, buf, len(raw))  # type: ignore[operator]

    seen: list[bytes] = []

    def handle(raw: bytes) -> None:
        seen.append(raw)
        clock.now += clock.step_ns

    r = ring.RingReader(FakeBpf(), "events", handle)
    pending += [[bytes([i]) for i in range(8)], [b"x", b"y"]]
    r.consume()
    assert seen == [bytes([i]) for i in range(8)] and len(yielded) == 2
    r.consume()  # 100 µs of work in a new drain: no yield
    assert seen[-2:] == [b"x", b"y"] and len(yielded) == 2
