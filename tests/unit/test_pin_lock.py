"""One agent per pin directory: a second one is told who holds it (claim_pin_dir)."""

from __future__ import annotations

import os
from pathlib import Path

from kernel_side.agent import claim_pin_dir


def test_second_claim_names_the_holder_and_a_closed_lock_is_free(tmp_path: Path) -> None:
    locks = str(tmp_path / "locks")
    fd, holder = claim_pin_dir("/sys/fs/bpf/ebpf-bridge/v1", locks)
    assert fd is not None and holder is None
    fd2, holder2 = claim_pin_dir("/sys/fs/bpf/ebpf-bridge/v1", locks)
    assert fd2 is None and holder2 == os.getpid()
    # Another directory is another lock.
    other, none = claim_pin_dir("/sys/fs/bpf/elsewhere", locks)
    assert other is not None and none is None
    os.close(other)
    os.close(fd)
    fd3, holder3 = claim_pin_dir("/sys/fs/bpf/ebpf-bridge/v1", locks)
    assert fd3 is not None and holder3 is None
    os.close(fd3)
