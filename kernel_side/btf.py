"""Field offsets the probes need from the running kernel's BTF (``/sys/kernel/btf/vmlinux``).

The probes read a TCP socket's addresses straight from ``struct sock_common`` when they see the
socket inside a send or receive. Its first 18 bytes (the IPv4 addresses, the ports, the
family) have had the same layout since Linux 2.6; the IPv6 addresses sit further in, at an
offset that depends on the kernel's configuration, so it is looked up here. Without it
(no BTF, or a layout this does not recognise) the probes learn IPv4 addresses only.
"""

from __future__ import annotations

import struct
from pathlib import Path

__all__ = ["VMLINUX_BTF", "sock_v6_offsets"]

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"
"""Where the kernel publishes its own BTF (CONFIG_DEBUG_INFO_BTF)."""

_MAGIC = 0xEB9F
_MEMBER = struct.Struct("<III")  # struct btf_member: name_off, type, offset (bits)


def _name_offset(strings: bytes, name: bytes) -> int | None:
    """The offset of the NUL-terminated string ``name`` in a BTF string section."""
    at = strings.find(b"\0" + name + b"\0")
    return None if at < 0 else at + 1


def sock_v6_offsets(path: str = VMLINUX_BTF) -> tuple[int, int] | None:
    """Byte offsets of ``skc_v6_daddr`` and ``skc_v6_rcv_saddr`` in ``struct sock_common``, or
    None when the BTF is missing or does not show them as expected.

    Rather than decode every type (about 150,000 on a distribution kernel, a tenth of a second
    in Python at every start), this finds the two field names in the string section and then
    the member records that carry them: two consecutive 12-byte ``btf_member`` records, the
    second 16 bytes after the first, which is how ``struct sock_common`` declares them. A
    match anywhere else would need both names side by side in another struct.
    """
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
    strings = data[hdr_len + str_off: hdr_len + str_off + str_len]
    types = data[types_at: types_at + type_len]
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
