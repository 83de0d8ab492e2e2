"""The snapshot type returned by ``bridge.status()``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BridgeStatus:
    """What the application side of the bridge has done in this process so far.

    Counters are process-wide and best effort: they are plain ints bumped without a lock, so
    under heavy multi-threaded use an increment can occasionally be lost. They are diagnostics,
    not accounting.
    """

    connected: bool
    """Whether the context map is open (an agent pinned it and this process may write it)."""
    pin_path: str
    """The pin path of the context map that was (or would be) opened."""
    abi_version: int
    """The map ABI version this SDK writes."""
    calls: int
    """``annotate``/``context`` calls made."""
    writes: int
    """Successful map writes (updates and deletes)."""
    noop_calls: int
    """Calls that did nothing because no map was open (no agent, or no permission)."""
    map_full: int
    """Writes refused because the map was full (``E2BIG``/``ENOMEM``)."""
    truncated_values: int
    """String values cut to ``MAX_STR_LEN`` bytes."""
    dropped_attrs: int
    """Attributes left out because they exceeded the count or byte budget."""
    errors: int
    """Other failed map operations."""
    last_error: str | None
    """The most recent failure (including why the map could not be opened), if any."""
    cells: bool = False
    """Whether thread context is written as memory (the mapped ``ctx_cells``) instead of with
    ``bpf()`` calls: needs the C accelerator and a read-write open of the pin (root)."""
    cell_fallbacks: int = 0
    """Threads that found their cell held by another thread and use ``ctx_by_tid`` instead."""
    cells_note: str | None = None
    """Why ``ctx_cells`` is not mapped, when the writer tried."""
