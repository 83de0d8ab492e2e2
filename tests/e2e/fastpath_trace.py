"""A seeded random sequence of thread-scope writer calls, and what each one left behind.

``tests/e2e/test_sdk_fastpath.py`` runs the same sequence through the three ways the writer can
run (the C entry, the Python ``annotate`` on the same build, and a process without the
accelerator) and requires identical traces: the map entry's bytes, the thread's mirror and the
status counters after every step. Run as a script for the process without the accelerator::

    EBPF_BRIDGE_NO_ACCEL=1 python -m tests.e2e.fastpath_trace SEED STEPS PIN_DIR

It prints the trace as JSON. Needs root and a bpffs mount (it creates and pins a hash map).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import random
import sys
import threading
from pathlib import Path
from typing import Any

import bridge
from bridge import _abi, _env
from bridge._abi import AttrValue
from sdk_side import _bpf, _writer

KEYS = ("tenant_id", "user_id", "feature_flag", "http.route", "plan", "region")
COUNTERS = ("calls", "writes", "noop_calls", "map_full", "truncated_values", "dropped_attrs",
            "errors")


def _value(rng: random.Random, key: str) -> AttrValue:
    roll = rng.random()
    if roll < 0.08:
        return rng.randrange(-3, 1000)
    if roll < 0.12:
        return rng.random() < 0.5
    if roll < 0.16:
        return "x" * rng.choice((129, 200))  # over MAX_STR_LEN: truncated, never cached
    if roll < 0.26:
        # Values seen once (a user id): never in the cache, and they churn it.
        return f"{key[:3]}-{rng.randrange(10**9):09d}" + "z" * rng.randrange(116)  # <= 128
    if roll < 0.29:
        return f"ünï-{rng.randrange(3)}-€"  # multi-byte UTF-8
    if roll < 0.30:
        return "bad-\udcff"  # a lone surrogate: encoded with "replace"
    return f"{key[:3]}-{rng.randrange(5)}"


def _attrs(rng: random.Random) -> dict[str, AttrValue]:
    roll = rng.random()
    if roll < 0.05:
        # Over the entry's limits: more than MAX_ATTRS keys, or more than ATTR_BYTES of data.
        return {f"k{i}": f"value-{i}" for i in range(_abi.MAX_ATTRS + 2)}
    if roll < 0.09:
        return {f"long{i}": "y" * 120 for i in range(3)}
    keys = rng.sample(KEYS, rng.randint(1, 4))
    return {k: _value(rng, k) for k in keys}


class Cells:
    """A ``ctx_cells`` map made and mapped here, read the way the probes read it: a thread
    whose cell holds its owner word is looked up there, any other in ``ctx_by_tid``."""

    def __init__(self, pin_dir: Path) -> None:
        self.fd = _bpf.map_create(4, _abi.CTX_CELL_SIZE, _abi.CTX_CELLS,
                                  map_type=_bpf.BPF_MAP_TYPE_ARRAY,
                                  map_flags=_bpf.BPF_F_MMAPABLE, name="test_cells")
        self.pin = pin_dir / _abi.CTX_CELLS_NAME
        _bpf.obj_pin(self.fd, str(self.pin))
        self.mem = mmap.mmap(self.fd, _abi.CTX_CELLS * _abi.CTX_CELL_SIZE, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE)

    def offset(self, key: bytes) -> int | None:
        """Where the thread ``key`` names has its cell, if it claimed one."""
        pidns, tid, _ = _abi.CTX_KEY.unpack(key)
        owner = _abi.cell_owner(pidns, tid)
        if not owner:
            return None
        off = _abi.cell_index(owner) * _abi.CTX_CELL_SIZE
        held, _ = _abi.CTX_CELL_HEADER.unpack_from(self.mem, off)
        return off if held == owner else None

    def lookup(self, map_fd: int, key: bytes) -> bytes | None:
        off = self.offset(key)
        if off is None:
            return _bpf.map_lookup(map_fd, key, _abi.CTX_VALUE_SIZE)
        _, live = _abi.CTX_CELL_HEADER.unpack_from(self.mem, off)
        start = off + _abi.CTX_CELL_HEADER.size
        return bytes(self.mem[start : start + _abi.CTX_VALUE_SIZE]) if live else None

    def delete(self, map_fd: int, key: bytes) -> None:
        """What the probes do when a new request starts: clear ``live``, or delete the entry.
        Raises FileNotFoundError when there was nothing, as the map does."""
        off = self.offset(key)
        if off is None:
            _bpf.map_delete(map_fd, key)
            return
        self.mem[off + 8 : off + 12] = bytes(4)

    def owners(self) -> list[tuple[int, int]]:
        """(pidns inode, tid) of every thread whose cell holds live context."""
        out = []
        for off in range(0, _abi.CTX_CELLS * _abi.CTX_CELL_SIZE, _abi.CTX_CELL_SIZE):
            owner, live = _abi.CTX_CELL_HEADER.unpack_from(self.mem, off)
            if owner and live:
                out.append((owner >> 32, owner & 0xFFFFFFFF))
        return out

    def close(self) -> None:
        self.mem.close()
        os.close(self.fd)
        self.pin.unlink(missing_ok=True)


def _snapshot(fd: int, key: bytes, base: dict[str, int],
              cells: Cells | None = None) -> dict[str, Any]:
    st = _writer._tls.s
    raw = (_bpf.map_lookup(fd, key, _abi.CTX_VALUE_SIZE) if cells is None
           else cells.lookup(fd, key))
    status = bridge.status()
    return {
        "entry": None if raw is None else raw.hex(),
        "mirror": [[k, v.hex()] for k, v in st.mirror.items()],
        "data": st.data.hex(),
        "state": [st.trunc, st.port, st.sdk.hex(), st.synced, st.req_calls, st.req_len,
                  st.stale, st.filled],
        "counters": {c: getattr(status, c) - base[c] for c in COUNTERS},
    }


def trace(seed: int, steps: int, pin_dir: Path,
          cells: bool = False) -> tuple[list[dict[str, Any]], int]:
    """Run the sequence against a fresh map pinned in ``pin_dir`` (with ``ctx_cells`` beside it
    when ``cells``): (the trace, how many calls the C entry completed)."""
    pin_dir.mkdir(parents=True)
    fd = _bpf.map_create(_abi.CTX_KEY.size, _abi.CTX_VALUE_SIZE, 1024, name="fastpath")
    view = Cells(pin_dir) if cells else None
    try:
        _bpf.obj_pin(fd, str(pin_dir / _abi.CTX_BY_TID_NAME))
        os.environ[_env.EBPF_BRIDGE_PIN_DIR] = str(pin_dir)
        if not _writer.reconnect():
            raise RuntimeError(f"cannot connect: {bridge.status().last_error}")
        if cells and not bridge.status().cells:
            raise RuntimeError(f"ctx_cells not mapped: {bridge.status().cells_note}")
        key = _abi.CTX_KEY.pack(os.stat("/proc/self/ns/pid").st_ino, threading.get_native_id(),
                                0)
        handled0 = 0 if _bpf.fast_handled is None else _bpf.fast_handled()
        status0 = bridge.status()
        base = {c: getattr(status0, c) for c in COUNTERS}
        bridge.clear()
        rng = random.Random(seed)
        out: list[dict[str, Any]] = []
        for _ in range(steps):
            roll = rng.random()
            if roll < 0.62:
                op = "annotate"
                # The module attribute, looked up on each call: tests swap it.
                _writer.annotate(**_attrs(rng))
            elif roll < 0.77:
                op = "new request"  # what the kernel does when a request arrives
                with contextlib.suppress(FileNotFoundError):
                    if view is None:
                        _bpf.map_delete(fd, key)
                    else:
                        view.delete(fd, key)
            elif roll < 0.85:
                op = "clear"
                bridge.clear()
            elif roll < 0.93:
                op = "bind"
                bridge.bind_request(rng.choice((0, 40000 + rng.randrange(3))))
            else:
                op = "sdk span"
                _writer.set_sdk_span(rng.choice((b"", bytes(range(1, 26)), bytes(range(2, 27)))))
            out.append({"op": op, **_snapshot(fd, key, base, view)})
        bridge.clear()
        handled = 0 if _bpf.fast_handled is None else _bpf.fast_handled() - handled0
        if view is not None and view.offset(key) is None:
            raise RuntimeError("the thread never claimed its cell: the trace used the map")
        return out, handled
    finally:
        if view is not None:
            view.close()
        os.close(fd)
        (pin_dir / _abi.CTX_BY_TID_NAME).unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    seed, steps, pin_dir = int(argv[0]), int(argv[1]), Path(argv[2])
    out, handled = trace(seed, steps, pin_dir)
    print(json.dumps({"accelerated": _bpf.ACCELERATED, "handled": handled, "trace": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
