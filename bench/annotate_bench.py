"""How much ``bridge.annotate`` costs per call, against a real pinned map and with no agent.

Creates a ``ctx_by_tid``-shaped hash map, pins it under /sys/fs/bpf (root needed for that
part; the no-agent rows run anyway), and times:

- ``steady``: repeated calls in one request (the entry exists: one ``BPF_EXIST`` update);
- ``new request``: the entry was cleared by the kernel before each call, as on the first
  annotate of every request (``BPF_EXIST`` fails with ``ENOENT``, then ``BPF_NOEXIST``);
- ``raw map update``: one ``BPF_MAP_UPDATE_ELEM`` the way annotate makes it (C accelerator or
  ctypes, as built), the floor;
- ``no agent``: no map pinned, the silent no-op.

Each row is ``--repeat`` runs of ``--iterations`` calls; the table shows the median and the
min/max of the per-run means in ns per call. Prints a table and writes JSON. It never passes
or fails on time.

    .venv/bin/python bench/annotate_bench.py [--json bench/results/annotate.json]
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading

from _common import can_pin, measure, micro_args, pinned_context_map, report

import bridge
from bridge import _abi, _env
from sdk_side import _bpf, _writer

ATTRS_1 = {"tenant_id": "acme"}
ATTRS_3 = {"tenant_id": "acme", "user_id": "u-42", "feature_flag": "new-checkout"}


def measure_new_request(
    kw: dict[str, str], fd: int, iterations: int, repeat: int
) -> dict[str, float]:
    """annotate right after the kernel-side clear; the clear itself is timed and subtracted."""
    key = _abi.CTX_KEY.pack(os.stat("/proc/self/ns/pid").st_ino, threading.get_native_id(), 0)
    attr = _bpf.MapElemAttr(map_fd=fd, key=0, value=0, flags=0)
    kbuf = bytes(key)
    import ctypes

    kmem = ctypes.create_string_buffer(kbuf, len(kbuf))
    attr.key = ctypes.addressof(kmem)
    ptr = ctypes.c_void_p(ctypes.addressof(attr))

    def delete() -> None:
        _bpf.syscall(_bpf.NR_BPF, _bpf.CMD_DELETE, ptr, _bpf.ELEM_ATTR_SIZE)

    def both() -> None:
        delete()
        bridge.annotate(**kw)

    bridge.annotate(**kw)
    whole = measure(both, iterations, repeat)
    # Deleting a missing key costs about what deleting a present one does.
    alone = measure(delete, iterations, repeat)
    return {k: whole[k] - alone["median"] for k in whole}


def main(argv: list[str] | None = None) -> int:
    args = micro_args(argv, __doc__, 100_000, "annotate.json")
    n, r = args.iterations, args.repeat
    rows: dict[str, dict[str, float]] = {}

    with tempfile.TemporaryDirectory() as empty:
        os.environ[_env.EBPF_BRIDGE_PIN_DIR] = os.path.join(empty, "none")
        _writer.reconnect()
        rows["no agent, 1 attr"] = measure(lambda: bridge.annotate(**ATTRS_1), n, r)
        rows["no agent, 3 attrs"] = measure(lambda: bridge.annotate(**ATTRS_3), n, r)

    note = ""
    if can_pin():
        with pinned_context_map() as fd:
            bridge.annotate(**ATTRS_3)
            st = _writer._thread()
            rows[f"raw map update ({'C accelerator' if _bpf.ACCELERATED else 'ctypes'})"] = (
                measure(lambda: _bpf.elem_update(st.a_exist), n, r)
            )
            bridge.clear()
            rows["steady, 1 attr"] = measure(lambda: bridge.annotate(**ATTRS_1), n, r)
            bridge.clear()
            rows["steady, 3 attrs"] = measure(lambda: bridge.annotate(**ATTRS_3), n, r)
            bridge.clear()
            counter = iter(range(10**9))
            rows["steady, 3 attrs, new user_id each"] = measure(
                lambda: bridge.annotate(
                    tenant_id="acme", user_id=f"u-{next(counter)}", feature_flag="new-checkout"
                ),
                n,
                r,
            )
            bridge.clear()
            rows["new request, 1 attr"] = measure_new_request(ATTRS_1, fd, n, r)
            bridge.clear()
            rows["new request, 3 attrs"] = measure_new_request(ATTRS_3, fd, n, r)
            bridge.clear()
            status = bridge.status()
            if status.errors or status.map_full:
                note = f"unexpected: {status}"
    else:
        note = "not root or no bpffs: only the no-agent rows were measured"

    report("bridge.annotate", "ns/call", rows, note, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
