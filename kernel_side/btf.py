"""Field offsets the probes need from the running kernel's BTF (``/sys/kernel/btf/vmlinux``).

BCC compiles the probes against kernel headers, which may be another kernel's, so the fields
whose place varies are looked up here. At ``accept``/``connect`` exit the probes follow the
thread's fd table to the new connection's socket (``FD_WALK``) and read its addresses from
``struct sock_common``. Its first 18 bytes (the IPv4 addresses, the ports, the family) have had
the same layout since Linux 2.6; the IPv6 addresses sit further in, at an offset that depends
on the kernel's configuration. Without the fd-table fields the probes learn the addresses at
the first send or receive instead; without the IPv6 offsets, IPv4 addresses only.
"""

from __future__ import annotations

import struct
from pathlib import Path

__all__ = ["FD_WALK", "VMLINUX_BTF", "member_offsets", "sock_v6_offsets"]

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"
"""Where the kernel publishes its own BTF (CONFIG_DEBUG_INFO_BTF)."""

_MAGIC = 0xEB9F
_MEMBER = struct.Struct("<III")  # struct btf_member: name_off, type, offset (bits)
_TYPE = struct.Struct("<III")  # struct btf_type: name_off, info, size
_KIND_STRUCT = 4

FD_WALK: dict[str, tuple[str, ...]] = {
    "task_struct": ("files",),
    "files_struct": ("fdt",),
    "fdtable": ("max_fds", "fd"),
    "file": ("private_data",),
    "socket": ("type", "sk"),
}
"""The fields from a task to one of its sockets: ``task->files->fdt->fd[n]`` is a ``struct
file`` whose ``private_data`` is the ``struct socket``, whose ``sk`` is the TCP socket. The
probes follow them once per connection, at ``accept``/``connect`` exit, to read its addresses."""


def _name_offset(strings: bytes, name: bytes) -> int | None:
    """The offset of the NUL-terminated string ``name`` in a BTF string section."""
    at = strings.find(b"\0" + name + b"\0")
    return None if at < 0 else at + 1


def _sections(path: str) -> tuple[bytes, bytes] | None:
    """(types, strings) of the BTF file at ``path``, or None when it is missing or not BTF."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    if len(data) < 24:
        return None
    magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
    if magic != _MAGIC:
        return None
    type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
    types_at = hdr_len + type_off
    return (data[types_at: types_at + type_len],
            data[hdr_len + str_off: hdr_len + str_off + str_len])


def _string_at(strings: bytes, off: int) -> bytes:
    end = strings.find(b"\0", off)
    return strings[off:end] if end >= 0 else b""


def member_offsets(wanted: dict[str, tuple[str, ...]],
                   path: str = VMLINUX_BTF) -> dict[str, int] | None:
    """Byte offsets of the named direct members of the named structs, keyed
    ``"struct.member"``, or None when the BTF is missing or any of them is not found (or is a
    bitfield, or not byte-aligned).

    As in ``sock_v6_offsets``, this does not decode every type: it finds each struct's name in
    the string section, then the 4-aligned ``btf_type`` records that carry that name with the
    struct kind, and reads their member lists. A struct name used twice (a second definition
    in a module's BTF would be elsewhere; vmlinux has one of each) takes the first record
    that holds every wanted member.
    """
    sections = _sections(path)
    if sections is None:
        return None
    types, strings = sections
    found: dict[str, int] = {}
    for sname, members in wanted.items():
        name_off = _name_offset(strings, sname.encode())
        if name_off is None:
            return None
        got = _struct_members(types, strings, name_off, members)
        if got is None:
            return None
        found.update({f"{sname}.{m}": off for m, off in got.items()})
    return found


def _struct_members(types: bytes, strings: bytes, name_off: int,
                    members: tuple[str, ...]) -> dict[str, int] | None:
    needle = struct.pack("<I", name_off)
    want = {m.encode() for m in members}
    at = types.find(needle)
    while at >= 0:
        if at % 4 == 0 and at + _TYPE.size <= len(types):
            _n, info, _size = _TYPE.unpack_from(types, at)
            kind, vlen, kind_flag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
            end = at + _TYPE.size + vlen * _MEMBER.size
            if kind == _KIND_STRUCT and end <= len(types):
                got: dict[str, int] = {}
                for i in range(vlen):
                    m_name, _t, m_off = _MEMBER.unpack_from(types, at + _TYPE.size
                                                            + i * _MEMBER.size)
                    name = _string_at(strings, m_name)
                    if name not in want:
                        continue
                    if kind_flag and m_off >> 24:
                        return None  # a bitfield: no byte offset to read it at
                    bits = m_off & 0xFFFFFF if kind_flag else m_off
                    if bits % 8:
                        return None
                    got[name.decode()] = bits // 8
                if len(got) == len(want):
                    return got
        at = types.find(needle, at + 1)
    return None


def sock_v6_offsets(path: str = VMLINUX_BTF) -> tuple[int, int] | None:
    """Byte offsets of ``skc_v6_daddr`` and ``skc_v6_rcv_saddr`` in ``struct sock_common``, or
    None when the BTF is missing or does not show them as expected.

    Rather than decode every type (about 150,000 on a distribution kernel, a tenth of a second
    in Python at every start), this finds the two field names in the string section and then
    the member records that carry them: two consecutive 12-byte ``btf_member`` records, the
    second 16 bytes after the first, which is how ``struct sock_common`` declares them. A
    match anywhere else would need both names side by side in another struct.
    """
    sections = _sections(path)
    if sections is None:
        return None
    types, strings = sections
    daddr = _name_offset(strings, b"skc_v6_daddr")
    saddr = _name_offset(strings, b"skc_v6_rcv_saddr")
    if daddr is None or saddr is None:
        return None
    needle = struct.pack("<I", daddr)
    at = types.find(needle)
    while at >= 0:
        if at % 4 == 0 and at + 2 * _MEMBER.size <= len(types):
            _n, _t, off_a = _MEMBER.unpack_from(types, at)
            n_b, _t, off_b = _MEMBER.unpack_from(types, at + _MEMBER.size)
            # In a struct with kind_flag set the top 8 bits hold a bitfield size (0 here).
            off_a &= 0xFFFFFF
            off_b &= 0xFFFFFF
            if n_b == saddr and off_a % 8 == 0 and off_b == off_a + 128:
                return off_a // 8, off_b // 8
        at = types.find(needle, at + 1)
    return None
