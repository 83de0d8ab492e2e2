"""Finding struct sock_common's IPv6 address offsets in kernel BTF (kernel_side/btf.py)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from kernel_side import btf


def _blob(members: list[tuple[bytes, int]], extra_strings: bytes = b"") -> bytes:
    """A minimal BTF: one struct whose members are (name, bit offset), every type id 1."""
    strings = b"\0" + extra_strings
    offs = []
    for name, _ in members:
        offs.append(len(strings))
        strings += name + b"\0"
    struct_name = len(strings)
    strings += b"sock_common\0"
    kind_struct = 4
    types = struct.pack("<III", struct_name, (kind_struct << 24) | len(members), 136)
    for off, (_, bits) in zip(offs, members, strict=True):
        types += struct.pack("<III", off, 1, bits)
    hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return hdr + types + strings


def test_finds_the_adjacent_ipv6_addresses(tmp_path: Path) -> None:
    f = tmp_path / "vmlinux"
    f.write_bytes(_blob([(b"skc_daddr", 0), (b"skc_v6_daddr", 56 * 8),
                         (b"skc_v6_rcv_saddr", 72 * 8), (b"skc_cookie", 88 * 8)]))
    assert btf.sock_v6_offsets(str(f)) == (56, 72)


@pytest.mark.parametrize("members", [
    [(b"skc_v6_daddr", 56 * 8)],                                  # rcv_saddr missing
    [(b"skc_v6_daddr", 56 * 8), (b"skc_other", 72 * 8),
     (b"skc_v6_rcv_saddr", 88 * 8)],                              # not side by side
    [(b"skc_v6_daddr", 56 * 8), (b"skc_v6_rcv_saddr", 80 * 8)],   # not 16 bytes apart
])
def test_an_unexpected_layout_gives_none(tmp_path: Path, members: list[tuple[bytes, int]]) -> None:
    f = tmp_path / "vmlinux"
    f.write_bytes(_blob(members))
    assert btf.sock_v6_offsets(str(f)) is None


def test_missing_or_foreign_files_give_none(tmp_path: Path) -> None:
    assert btf.sock_v6_offsets(str(tmp_path / "absent")) is None
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x7fELF" + bytes(64))
    assert btf.sock_v6_offsets(str(junk)) is None


@pytest.mark.skipif(not Path(btf.VMLINUX_BTF).exists(), reason="kernel without BTF")
def test_this_kernels_sock_common() -> None:
    found = btf.sock_v6_offsets()
    assert found is not None
    daddr, saddr = found
    # After the IPv4 head (18 bytes) and at least the bind-hash node, in6_addr aligned.
    assert 24 <= daddr < 256 and daddr % 4 == 0
    assert saddr == daddr + 16
