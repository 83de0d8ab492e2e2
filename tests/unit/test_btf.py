"""Finding struct field offsets in kernel BTF (kernel_side/btf.py): struct sock_common's IPv6
addresses and the fd-table walk's fields."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from kernel_side import btf


def _structs(defs: list[tuple[bytes, int, list[tuple[bytes, int]]]],
             funcs: tuple[bytes, ...] = ()) -> bytes:
    """A BTF with the given functions, then structs: (name, kind_flag, [(member, raw offset
    field)])."""
    strings = b"\0"
    names: dict[bytes, int] = {}

    def name(s: bytes) -> int:
        nonlocal strings
        if s not in names:
            names[s] = len(strings)
            strings += s + b"\0"
        return names[s]

    types = struct.pack("<III", name(b"int"), 1 << 24, 4) + struct.pack("<I", 32)  # an INT
    for fname in funcs:
        types += struct.pack("<III", name(fname), 12 << 24, 1)  # FUNC, type 1
    for sname, kind_flag, members in defs:
        info = (kind_flag << 31) | (4 << 24) | len(members)
        types += struct.pack("<III", name(sname), info, 64)
        for m, off in members:
            types += struct.pack("<III", name(m), 1, off)
    hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return hdr + types + strings


def test_finds_the_adjacent_ipv6_addresses(tmp_path: Path) -> None:
    f = tmp_path / "vmlinux"
    f.write_bytes(_structs([(b"sock_common", 0, [
        (b"skc_daddr", 0), (b"skc_v6_daddr", 56 * 8), (b"skc_v6_rcv_saddr", 72 * 8),
        (b"skc_cookie", 88 * 8)])]))
    assert btf.sock_v6_offsets(str(f)) == (56, 72)


@pytest.mark.parametrize("members", [
    [(b"skc_v6_daddr", 56 * 8)],                                  # rcv_saddr missing
    [(b"skc_v6_daddr", 56 * 8), (b"skc_other", 72 * 8),
     (b"skc_v6_rcv_saddr", 88 * 8)],                              # not side by side
    [(b"skc_v6_daddr", 56 * 8), (b"skc_v6_rcv_saddr", 80 * 8)],   # not 16 bytes apart
])
def test_an_unexpected_layout_gives_none(tmp_path: Path, members: list[tuple[bytes, int]]) -> None:
    f = tmp_path / "vmlinux"
    f.write_bytes(_structs([(b"sock_common", 0, members)]))
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


def test_member_offsets_finds_each_struct(tmp_path: Path) -> None:
    f = tmp_path / "vmlinux"
    # A function named like a struct must not be taken for it (kind 12, not 4).
    f.write_bytes(_structs([
        (b"socket", 0, [(b"state", 0), (b"type", 32), (b"file", 128), (b"sk", 192)]),
        (b"file", 1, [(b"f_lock", 0), (b"private_data", 24 * 8)]),
    ], funcs=(b"file", b"socket")))
    got = btf.member_offsets({"socket": ("type", "sk"), "file": ("private_data",)}, str(f))
    assert got == {"socket.type": 4, "socket.sk": 24, "file.private_data": 24}


@pytest.mark.parametrize("defs", [
    [(b"socket", 0, [(b"type", 32)])],                      # sk missing
    [(b"sockets", 0, [(b"type", 32), (b"sk", 192)])],       # no struct of that name
    [(b"socket", 1, [(b"type", (4 << 24) | 32), (b"sk", 192)])],  # type is a bitfield
    [(b"socket", 0, [(b"type", 36), (b"sk", 192)])],        # not byte-aligned
])
def test_member_offsets_gives_none_when_a_field_is_not_plain(
        tmp_path: Path, defs: list[tuple[bytes, int, list[tuple[bytes, int]]]]) -> None:
    f = tmp_path / "vmlinux"
    f.write_bytes(_structs(defs))
    assert btf.member_offsets({"socket": ("type", "sk")}, str(f)) is None
    assert btf.member_offsets({"socket": ("sk",)}, str(tmp_path / "absent")) is None


@pytest.mark.skipif(not Path(btf.VMLINUX_BTF).exists(), reason="kernel without BTF")
def test_this_kernels_fd_walk() -> None:
    found = btf.member_offsets(btf.FD_WALK)
    assert found is not None
    # Fields whose place has not moved in years: fdtable starts with max_fds, then the
    # array; struct socket with its state, then its type.
    assert found["fdtable.max_fds"] == 0 and found["fdtable.fd"] == 8
    assert found["socket.type"] == 4
    assert found["socket.sk"] % 8 == 0 and found["file.private_data"] % 8 == 0
    assert found["task_struct.files"] > 256
