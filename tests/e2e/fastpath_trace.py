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


def _snapshot(fd: int, key: bytes, base: dict[str, int]) -> dict[str, Any]:
    st = _writer._tls.s
    raw = _bpf.map_lookup(fd, key, _abi.CTX_VALUE_SIZE)
    status = bridge.status()
    return {
        "entry": None if raw is None else raw.hex(),
        "mirror": [[k, v.hex()] for k, v in st.mirror.items()],
        "data": st.data.hex(),
        "state": [st.trunc, st.port, st.sdk.hex(), st.synced, st.req_calls, st.req_len,
                  st.stale, st.filled],
        "counters": {c: getattr(status, c) - base[c] for c in COUNTERS},
    }


def trace(seed: int, steps: int, pin_dir: Path) -> tuple[list[dict[str, Any]], int]:
    """Run the sequence against a fresh map pinned in ``pin_dir``: (the trace, how many calls
    the C entry completed)."""
    pin_dir.mkdir(parents=True)
    fd = _bpf.map_create(_abi.CTX_KEY.size, _abi.CTX_VALUE_SIZE, 1024, name="fastpath")
    try:
        _bpf.obj_pin(fd, str(pin_dir / _abi.CTX_BY_TID_NAME))
        os.environ[_env.EBPF_BRIDGE_PIN_DIR] = str(pin_dir)
        if not _writer.reconnect():
            raise RuntimeError(f"cannot connect: {bridge.status().last_error}")
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
                    _bpf.map_delete(fd, key)
            elif roll < 0.85:
                op = "clear"
                bridge.clear()
            elif roll < 0.93:
                op = "bind"
                bridge.bind_request(rng.choice((0, 40000 + rng.randrange(3))))
            else:
                op = "sdk span"
                _writer.set_sdk_span(rng.choice((b"", bytes(range(1, 26)), bytes(range(2, 27)))))
            out.append({"op": op, **_snapshot(fd, key, base)})
        bridge.clear()
        handled = 0 if _bpf.fast_handled is None else _bpf.fast_handled() - handled0
        return out, handled
    finally:
        os.close(fd)
        (pin_dir / _abi.CTX_BY_TID_NAME).unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    seed, steps, pin_dir = int(argv[0]), int(argv[1]), Path(argv[2])
    out, handled = trace(seed, steps, pin_dir)
    print(json.dumps({"accelerated": _bpf.ACCELERATED, "handled": handled, "trace": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
