"""The map ABI has one source of truth: bpf/bridge_abi.h. Compile it with BCC, load a map of
its structs, and check bridge/_abi.py against what the compiler laid out."""

from __future__ import annotations

import re

import bpf
from bridge import _abi

HEADER = bpf.SOURCE_DIR / "bridge_abi.h"


def _defines() -> dict[str, str]:
    text = HEADER.read_text()
    return dict(re.findall(r"^#define (BRIDGE_\w+) (.+?)\s*(?:/\*.*)?$", text, re.M))


def test_constants_match() -> None:
    d = _defines()
    assert int(d["BRIDGE_ABI_VERSION"]) == _abi.ABI_VERSION
    assert d["BRIDGE_PIN_ROOT"].strip('"') == _abi.PIN_ROOT
    assert d["BRIDGE_PIN_DIR"].strip('"') == _abi.PIN_DIR
    assert d["BRIDGE_CTX_BY_TID_PIN"].strip('"') == _abi.CTX_BY_TID_PIN
    assert _abi.CTX_BY_TID_PIN.endswith("/" + _abi.CTX_BY_TID_NAME)
    assert d["BRIDGE_CTX_BY_CONN_PIN"].strip('"') == _abi.CTX_BY_CONN_PIN
    assert _abi.CTX_BY_CONN_PIN.endswith("/" + _abi.CTX_BY_CONN_NAME)
    for name, value in (("MAX_ATTRS", _abi.MAX_ATTRS), ("MAX_KEY_LEN", _abi.MAX_KEY_LEN),
                        ("MAX_STR_LEN", _abi.MAX_STR_LEN), ("ATTR_BYTES", _abi.ATTR_BYTES),
                        ("CTX_MAX_ENTRIES", _abi.CTX_MAX_ENTRIES),
                        ("ATTR_STR", _abi.ATTR_STR), ("ATTR_INT", _abi.ATTR_INT),
                        ("ATTR_FLOAT", _abi.ATTR_FLOAT), ("ATTR_BOOL", _abi.ATTR_BOOL)):
        assert int(d[f"BRIDGE_{name}"]) == value, name
    assert int(d["BRIDGE_CTX_F_TRUNCATED"], 0) == _abi.CTX_F_TRUNCATED
    assert int(d["BRIDGE_CTX_F_SDK_SPAN"], 0) == _abi.CTX_F_SDK_SPAN
    assert int(d["BRIDGE_CTX_F_TASK_SCOPED"], 0) == _abi.CTX_F_TASK_SCOPED
    for kind in ("INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER"):
        assert int(d[f"BRIDGE_SDK_KIND_{kind}"]) == getattr(_abi, f"SDK_KIND_{kind}")


def test_layout_compiled_by_bcc_matches_python() -> None:
    from bcc import BPF

    b = BPF(text="""
#include "bridge_abi.h"
BPF_HASH(abi_check, struct bridge_ctx_key, struct bridge_ctx_value, 1);
BPF_HASH(abi_conn, struct bridge_conn_key, struct bridge_ctx_value, 1);
""", cflags=[f"-I{bpf.SOURCE_DIR}"])
    try:
        table = b["abi_check"]
        key, leaf = table.Key, table.Leaf
        import ctypes

        assert ctypes.sizeof(key) == _abi.CTX_KEY.size == 16
        assert ctypes.sizeof(leaf) == _abi.CTX_VALUE_SIZE
        # Field offsets the Python struct formats assume.
        assert key.pidns_ino.offset == 0 and key.tid.offset == 8
        assert leaf.version.offset == 0
        assert leaf.attr_count.offset == 2
        assert leaf.flags.offset == 3
        assert leaf.data_len.offset == 4
        assert leaf.server_peer_port.offset == 6
        assert leaf.sdk_trace_id.offset == 8
        assert leaf.sdk_span_id.offset == 24
        assert leaf.sdk_span_kind.offset == 32
        assert leaf.data.offset == _abi.CTX_VALUE_HEADER.size
        # A value packed by Python reads back field by field through the C layout.
        enc = _abi.encode_attrs({"tenant_id": "acme", "seats": 12})
        raw = _abi.pack_value(enc, server_peer_port=54321)
        v = leaf.from_buffer_copy(raw)
        assert (v.version, v.attr_count, v.data_len) == (_abi.ABI_VERSION, 2, len(enc.data))
        assert v.server_peer_port == 54321
        assert bytes(v.data)[: v.data_len] == enc.data
        table[key(77, 5)] = v
        assert bytes(table[key(77, 5)]) == raw
        conn = b["abi_conn"].Key
        assert ctypes.sizeof(conn) == _abi.CONN_KEY.size == 16
        assert conn.pidns_ino.offset == 0 and conn.tgid.offset == 8 and conn.fd.offset == 12
        assert bytes(conn(77, 1234, 9)) == _abi.CONN_KEY.pack(77, 1234, 9)
    finally:
        b.cleanup()


def test_ctx_cells_layout_and_hash_match_python() -> None:
    """The cell struct as BCC lays it out, and the cell a thread hashes to as the BPF program
    computes it (bridge_cell_index, run in the kernel), against bridge/_abi.py."""
    from bcc import BPF

    d = _defines()
    assert d["BRIDGE_CTX_CELLS_PIN"].strip('"') == _abi.CTX_CELLS_PIN
    assert _abi.CTX_CELLS_PIN.endswith("/" + _abi.CTX_CELLS_NAME)
    assert int(d["BRIDGE_CTX_CELLS"]) == _abi.CTX_CELLS == 1 << _abi.CTX_CELL_BITS
    assert int(d["BRIDGE_CTX_CELL_BITS"]) == _abi.CTX_CELL_BITS
    assert int(d["BRIDGE_CELL_HASH"].removesuffix("ULL"), 0) == _abi.CELL_HASH
    owners = [_abi.cell_owner(4026531836, 1), _abi.cell_owner(4026531836, 4194303),
              _abi.cell_owner(4026532512, 77), _abi.cell_owner(1, 1)]
    b = BPF(text="""
#include "bridge_abi.h"
BPF_ARRAY(cells_check, struct bridge_ctx_cell, 1);
BPF_ARRAY(owners, __u64, 4);
BPF_ARRAY(index_out, __u32, 4);
TRACEPOINT_PROBE(syscalls, sys_enter_getppid)
{
    for (int i = 0; i < 4; i++) {
        int k = i;
        __u64 *o = owners.lookup(&k);
        __u32 *out = index_out.lookup(&k);
        if (o && out)
            *out = bridge_cell_index(*o) + 1;
    }
    return 0;
}
""", cflags=[f"-I{bpf.SOURCE_DIR}"])
    try:
        import ctypes
        import os

        leaf = b["cells_check"].Leaf
        assert ctypes.sizeof(leaf) == _abi.CTX_CELL_SIZE
        assert leaf.owner.offset == 0 and leaf.live.offset == 8
        assert leaf.value.offset == _abi.CTX_CELL_HEADER.size
        table = b["owners"]
        for i, owner in enumerate(owners):
            table[table.Key(i)] = table.Leaf(owner)
        os.getppid()
        got = [v.value - 1 for v in b["index_out"].values()]
        assert got == [_abi.cell_index(o) for o in owners]
        assert all(0 <= i < _abi.CTX_CELLS for i in got)
    finally:
        b.cleanup()
