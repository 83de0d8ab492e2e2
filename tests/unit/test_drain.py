"""The ring-drain settings the agent derives: CPU count for the kernel's wake-up threshold,
and the event loop's drain timer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
