"""Raw ``bpf(2)`` through ctypes: just the commands the application side and its tests need.

No libbpf, no BCC: an application that imports ``bridge`` must not need either. Every helper
here raises ``OSError`` with the kernel's errno on failure; the hot path in ``_writer`` calls
``syscall`` directly with preallocated arguments and reads the errno itself.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, cast

if TYPE_CHECKING:
    from bridge._abi import AttrValue

# bpf(2) syscall numbers differ per architecture; these are the two we run on.
_SYS_BPF_BY_MACHINE: Final = {"x86_64": 321, "amd64": 321, "aarch64": 280, "arm64": 280}
SYS_BPF: Final = _SYS_BPF_BY_MACHINE.get(platform.machine().lower(), 321)

# enum bpf_cmd
BPF_MAP_CREATE: Final = 0
BPF_MAP_LOOKUP_ELEM: Final = 1
BPF_MAP_UPDATE_ELEM: Final = 2
BPF_MAP_DELETE_ELEM: Final = 3
BPF_MAP_GET_NEXT_KEY: Final = 4
BPF_OBJ_PIN: Final = 6
BPF_OBJ_GET: Final = 7

# enum bpf_map_type
BPF_MAP_TYPE_HASH: Final = 1
BPF_MAP_TYPE_ARRAY: Final = 2

# BPF_MAP_UPDATE_ELEM flags
BPF_ANY: Final = 0
BPF_NOEXIST: Final = 1
BPF_EXIST: Final = 2

# BPF_OBJ_GET file_flags (0 means read-write)
BPF_F_RDWR: Final = 0
BPF_F_RDONLY: Final = 1 << 3
BPF_F_WRONLY: Final = 1 << 4

# BPF_MAP_CREATE map_flags
BPF_F_NO_PREALLOC: Final = 1
BPF_F_MMAPABLE: Final = 1 << 10


class MapElemAttr(ctypes.Structure):
    """The ``bpf_attr`` member used by the ``BPF_MAP_*_ELEM`` commands."""

    _fields_ = (
        ("map_fd", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    )


class ObjAttr(ctypes.Structure):
    """The ``bpf_attr`` member used by ``BPF_OBJ_PIN`` and ``BPF_OBJ_GET``."""

    _fields_ = (
        ("pathname", ctypes.c_uint64),
        ("bpf_fd", ctypes.c_uint32),
        ("file_flags", ctypes.c_uint32),
    )


class MapCreateAttr(ctypes.Structure):
    """The leading fields of the ``bpf_attr`` member used by ``BPF_MAP_CREATE``."""

    _fields_ = (
        ("map_type", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("numa_node", ctypes.c_uint32),
        ("map_name", ctypes.c_char * 16),
    )


_libc: Final = ctypes.CDLL(None, use_errno=True)
syscall: Final = _libc.syscall
"""libc ``syscall(2)`` without ``argtypes``: measurably cheaper per call than declaring them.

Callers must therefore pass every argument as a ctypes object (``c_long``, ``c_void_p``) so
that 64-bit values are never narrowed to a C ``int``.
"""
syscall.restype = ctypes.c_long

NR_BPF: Final = ctypes.c_long(SYS_BPF)
CMD_UPDATE: Final = ctypes.c_long(BPF_MAP_UPDATE_ELEM)
CMD_DELETE: Final = ctypes.c_long(BPF_MAP_DELETE_ELEM)
ELEM_ATTR_SIZE: Final = ctypes.c_long(ctypes.sizeof(MapElemAttr))


# --- element commands for the annotate hot path ---------------------------------------------
# Callers preallocate one MapElemAttr per (key, value, flags) and turn it into a handle once
# with ``elem_handle``; ``elem_update``/``elem_delete`` then return 0 or the errno, never raise
# for kernel errors. With the C accelerator (sdk_side._fastbpf, built by ``pip install``) the
# handle is the structure itself; without it, a c_void_p to it for libc's syscall().
ACCELERATED: bool
"""Whether the C accelerator is in use: about 0.5 us less per map write than ctypes (1.01-1.24
against 1.58-1.67 us measured on the 2-core VM)."""


def _ctypes_handle(attr: MapElemAttr) -> object:
    return ctypes.c_void_p(ctypes.addressof(attr))


def _ctypes_update(handle: object) -> int:
    if syscall(NR_BPF, CMD_UPDATE, handle, ELEM_ATTR_SIZE) == 0:
        return 0
    err: int = ctypes.get_errno()
    return err


def _ctypes_delete(handle: object) -> int:
    if syscall(NR_BPF, CMD_DELETE, handle, ELEM_ATTR_SIZE) == 0:
        return 0
    err: int = ctypes.get_errno()
    return err


def _struct_handle(attr: MapElemAttr) -> object:
    return attr


elem_handle: Callable[[MapElemAttr], object]
"""The handle ``elem_update``/``elem_delete`` take for a preallocated ``MapElemAttr`` (which
must stay alive as long as the handle is used)."""
elem_update: Callable[[object], int]
"""``BPF_MAP_UPDATE_ELEM`` with a handle: 0 on success, else the errno."""
elem_delete: Callable[[object], int]
"""``BPF_MAP_DELETE_ELEM`` with a handle: 0 on success, else the errno."""



class PySlot:
    """The writer's per-thread state without the accelerator (``_fastbpf.Slot`` with it).

    The fields are the thread's mirror; ``sdk_side._writer._Thread`` documents them.
    """

    __slots__ = (
        "data", "filled", "gen", "mirror", "port", "req_calls", "req_len", "sdk", "sdk_in_buf",
        "stale", "synced", "trunc",
    )

    def __init__(self) -> None:
        self.mirror: dict[str, bytes] = {}
        self.data = b""
        self.sdk = b""
        self.sdk_in_buf = b""
        self.trunc = False
        self.synced = False
        self.stale = False
        self.port = 0
        self.req_calls = 0
        self.req_len = 0
        self.filled = 0
        self.gen = 0

    def bind(self, value: bytearray, exist: object, noexist: object, any_: object, /) -> None:
        """Nothing to bind: the Python path passes the arguments on every call."""


FastAnnotate = Callable[[PySlot, "dict[str, AttrValue]", dict[str, dict[object, bytes]]], int]
fast_annotate: FastAnnotate | None
"""The C path of ``annotate`` for the common cases (``_fastbpf.annotate``), or None: 0 when it
wrote, -1 when it did not handle the call, else the errno of a failed write."""
fast_entry: Callable[[Callable[..., None], Callable[..., None]], Callable[..., None]] | None
"""``_fastbpf.Entry(declined, tried)``: ``annotate`` with its common call in C, passing every
other call on to one of the two Python functions."""
fast_setup: Callable[..., None] | None
"""``_fastbpf.setup``: register the writer's thread-local, context variable and caches."""
fast_gate: Callable[[bool, float, int], None] | None
"""``_fastbpf.gate``: whether the C entry may write, until when, for which map generation."""
map_cells: Callable[[int, int], None] | None
"""``_fastbpf.map_cells``: map ``ctx_cells`` (see bpf/bridge_abi.h), or None without the
accelerator (threads then use ``ctx_by_tid`` alone)."""
release_cell: Callable[[object], bool] | None
"""``_fastbpf.release_cell``: free the cell of the thread an argument's key names."""
cell_stats: Callable[[], tuple[bool, int, int]] | None
"""``_fastbpf.cell_stats``: (mapped, cells claimed, cells found held by another thread)."""
fast_handled: Callable[[], int] | None
"""``_fastbpf.handled_calls``: calls the C entry completed since the last setup."""

try:
    if os.environ.get("EBPF_BRIDGE_NO_ACCEL"):
        raise ImportError("disabled by EBPF_BRIDGE_NO_ACCEL")
    from sdk_side import _fastbpf
except ImportError:
    ACCELERATED = False
    elem_handle, elem_update, elem_delete = _ctypes_handle, _ctypes_update, _ctypes_delete
    fast_annotate = fast_entry = fast_setup = fast_gate = fast_handled = None
    map_cells = cell_stats = release_cell = None
    _Slot: type = PySlot
else:
    ACCELERATED = True
    elem_handle, elem_update, elem_delete = _struct_handle, _fastbpf.update, _fastbpf.delete
    from bridge import _abi

    _fastbpf.configure(
        abi_version=_abi.ABI_VERSION,
        data_off=_abi.CTX_VALUE_HEADER.size,
        sdk_off=_abi.SDK_SPAN_OFFSET,
        sdk_size=_abi.SDK_SPAN_SIZE,
        value_size=_abi.CTX_VALUE_SIZE,
        max_attrs=_abi.MAX_ATTRS,
        attr_bytes=_abi.ATTR_BYTES,
        f_truncated=_abi.CTX_F_TRUNCATED,
        f_sdk_span=_abi.CTX_F_SDK_SPAN,
        cells=_abi.CTX_CELLS,
        cell_bits=_abi.CTX_CELL_BITS,
        cell_size=_abi.CTX_CELL_SIZE,
        cell_value_off=_abi.CTX_CELL_HEADER.size,
        cell_hash=_abi.CELL_HASH,
    )
    fast_annotate = cast(FastAnnotate, _fastbpf.annotate)
    fast_entry, fast_setup = _fastbpf.Entry, _fastbpf.setup
    fast_gate, fast_handled = _fastbpf.gate, _fastbpf.handled_calls
    map_cells, cell_stats = _fastbpf.map_cells, _fastbpf.cell_stats
    release_cell = _fastbpf.release_cell
    _Slot = _fastbpf.Slot

if TYPE_CHECKING:
    SlotBase = PySlot
else:
    SlotBase = _Slot
    """The base class of the writer's per-thread state: ``_fastbpf.Slot`` or ``PySlot``."""


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    ret: int = syscall(
        NR_BPF, ctypes.c_long(cmd), ctypes.byref(attr), ctypes.c_long(ctypes.sizeof(attr))
    )
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def obj_get(path: str, file_flags: int = BPF_F_RDWR) -> int:
    """Open a pinned BPF object and return a new (close-on-exec) file descriptor."""
    raw = ctypes.create_string_buffer(os.fsencode(path))
    attr = ObjAttr(pathname=ctypes.addressof(raw), bpf_fd=0, file_flags=file_flags)
    try:
        return _bpf(BPF_OBJ_GET, attr)
    except OSError as exc:
        exc.filename = path
        raise


def obj_pin(fd: int, path: str) -> None:
    """Pin the BPF object behind ``fd`` at ``path`` on a bpffs mount."""
    raw = ctypes.create_string_buffer(os.fsencode(path))
    attr = ObjAttr(pathname=ctypes.addressof(raw), bpf_fd=fd, file_flags=0)
    try:
        _bpf(BPF_OBJ_PIN, attr)
    except OSError as exc:
        exc.filename = path
        raise


def map_create(
    key_size: int,
    value_size: int,
    max_entries: int,
    map_type: int = BPF_MAP_TYPE_HASH,
    map_flags: int = 0,
    name: str = "",
) -> int:
    """Create a map (needs CAP_BPF or root) and return its file descriptor."""
    attr = MapCreateAttr(
        map_type=map_type,
        key_size=key_size,
        value_size=value_size,
        max_entries=max_entries,
        map_flags=map_flags,
        map_name=name.encode("ascii")[:15],
    )
    return _bpf(BPF_MAP_CREATE, attr)


def _elem_attr(
    fd: int, key: bytes, value: ctypes.Array[ctypes.c_char] | None, flags: int
) -> tuple[MapElemAttr, ctypes.Array[ctypes.c_char]]:
    kbuf = ctypes.create_string_buffer(key, len(key))
    attr = MapElemAttr(
        map_fd=fd,
        key=ctypes.addressof(kbuf),
        value=0 if value is None else ctypes.addressof(value),
        flags=flags,
    )
    return attr, kbuf


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    """``BPF_MAP_UPDATE_ELEM`` with ``BPF_ANY``, ``BPF_NOEXIST`` or ``BPF_EXIST``."""
    vbuf = ctypes.create_string_buffer(value, len(value))
    attr, _kbuf = _elem_attr(fd, key, vbuf, flags)
    _bpf(BPF_MAP_UPDATE_ELEM, attr)


def map_delete(fd: int, key: bytes) -> None:
    """``BPF_MAP_DELETE_ELEM``; ``ENOENT`` if the key is absent."""
    attr, _kbuf = _elem_attr(fd, key, None, 0)
    _bpf(BPF_MAP_DELETE_ELEM, attr)


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """``BPF_MAP_LOOKUP_ELEM``: the value bytes, or ``None`` if the key is absent.

    Needs a readable fd: a ``BPF_F_WRONLY`` descriptor gets ``EPERM``.
    """
    vbuf = ctypes.create_string_buffer(value_size)
    attr, _kbuf = _elem_attr(fd, key, vbuf, 0)
    try:
        _bpf(BPF_MAP_LOOKUP_ELEM, attr)
    except FileNotFoundError:
        return None
    return vbuf.raw


def map_keys(fd: int, key_size: int) -> list[bytes]:
    """Every key of a hash map (``BPF_MAP_GET_NEXT_KEY`` walk; needs a readable fd)."""
    keys: list[bytes] = []
    cur = ctypes.create_string_buffer(key_size)
    nxt = ctypes.create_string_buffer(key_size)
    attr = MapElemAttr(map_fd=fd, key=0, value=ctypes.addressof(nxt), flags=0)
    while True:
        try:
            _bpf(BPF_MAP_GET_NEXT_KEY, attr)
        except FileNotFoundError:
            return keys
        keys.append(nxt.raw)
        ctypes.memmove(cur, nxt, key_size)
        attr.key = ctypes.addressof(cur)
