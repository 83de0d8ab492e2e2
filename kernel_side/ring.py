"""Reading the agent's ring buffer: in batches through ``kernel_side._fastring`` when it is
built, else through BCC's per-record callback. Either way the handler sees every record's
bytes once, in ring order."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

from kernel_side import _accel

__all__ = ["BATCHED", "RingReader"]

_fastring = _accel.load("_fastring")
BATCHED = _fastring is not None
"""Whether records come in batches from ``kernel_side._fastring``."""


class RingReader:
    """The ring buffer map ``name`` of BCC program ``bpf``, delivering each record to
    ``handle(raw: bytes)``. ``poll`` waits up to ``timeout_ms`` and hands over what arrived;
    ``consume`` hands over what is there without waiting."""

    def __init__(self, bpf: Any, name: str, handle: Callable[[bytes], None]) -> None:
        self._bpf = bpf
        self._handle = handle
        self._ring: Any = None
        if _fastring is not None:
            self._ring = _fastring.Ring(bpf[name].map_fd)
        else:
            def callback(_ctx: Any, data: Any, size: int) -> int:
                handle(ctypes.string_at(data, size))
                return 0

            # BCC keeps the callback alive; so does this object, for clarity.
            self._callback = callback
            bpf[name].open_ring_buffer(callback)

    def poll(self, timeout_ms: int) -> None:
        """Wait up to ``timeout_ms`` for records and hand them over."""
        if self._ring is None:
            self._bpf.ring_buffer_poll(timeout_ms)
            return
        handle = self._handle
        for raw in self._ring.poll(timeout_ms):
            handle(raw)

    def consume(self) -> None:
        """Hand over the records available now."""
        if self._ring is None:
            self._bpf.ring_buffer_consume()
            return
        handle = self._handle
        for raw in self._ring.consume():
            handle(raw)

    def close(self) -> None:
        """Stop reading (before the BPF object is cleaned up); idempotent."""
        if self._ring is not None:
            self._ring.close()
