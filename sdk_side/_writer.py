"""Writes this thread's business context into the pinned ``ctx_by_tid`` map.

The application opens the map write-only, so it can never read back what is stored (nor what
other processes stored). Each thread therefore keeps a *mirror*: the encoded records it last
wrote to its own entry. The kernel deletes a thread's entry when a new inbound request starts on
that thread, and the writer learns about that from the update itself: it first writes
``mirror | new`` with ``BPF_EXIST``; ``ENOENT`` means the entry was cleared, so the mirror
belongs to an earlier request and is dropped, and the new attributes alone are written with
``BPF_NOEXIST``.

Nothing here raises into the application except caller errors (bad key or value type), which
are reported before anything is written. Missing agent, missing permission, full map and any
other kernel error degrade to a no-op and are counted (see ``bridge.status()``).

Cost: the connected path is one ``bpf(2)`` call with preallocated per-thread arguments; the
no-agent path validates the arguments and compares a clock reading.
"""

from __future__ import annotations

import contextvars
import ctypes
import errno
import functools
import math
import os
import socket
import struct
import sys
import threading
import weakref
from collections.abc import Callable, Coroutine, Generator
from time import monotonic as _monotonic
from types import TracebackType
from typing import Any, Final, ParamSpec, TypeVar

from bridge import _abi, _env
from bridge._abi import AttrValue
from bridge._status import BridgeStatus
from sdk_side import _bpf

RETRY_INTERVAL_S: Final = 1.0
"""How often the pin is re-checked: to pick up an agent that started, or a map re-created."""

_HEAD: Final = struct.Struct("<HBBHH")  # version, attr_count, flags, data_len, server_peer_port
_ATTR_HEAD: Final = struct.Struct("<BBH")
_DATA_OFF: Final = _abi.CTX_VALUE_HEADER.size
_SDK_OFF: Final = _abi.SDK_SPAN_OFFSET
_SDK_SIZE: Final = _abi.SDK_SPAN_SIZE
_SDK_END: Final = _SDK_OFF + _SDK_SIZE
_VALUE_SIZE: Final = _abi.CTX_VALUE_SIZE
_MAX_ATTRS: Final = _abi.MAX_ATTRS
_ATTR_BYTES: Final = _abi.ATTR_BYTES
_MAX_STR_LEN: Final = _abi.MAX_STR_LEN
_I64_MIN: Final = -(2**63)
_I64_MAX: Final = 2**63 - 1
_MAP_FULL: Final = frozenset({errno.E2BIG, errno.ENOMEM})
# The fd number no longer refers to a map of ours: look at the pin again.
_STALE_FD: Final = frozenset({errno.EBADF, errno.EINVAL})

_I64: Final = struct.Struct("<q")
_F64: Final = struct.Struct("<d")
_ABI_VERSION: Final = _abi.ABI_VERSION
# Bound once: the hot path avoids attribute look-ups on other modules.
_elem_update: Final = _bpf.elem_update
_elem_delete: Final = _bpf.elem_delete
_fast_annotate = _bpf.fast_annotate
_fast_gate = _bpf.fast_gate
_ZEROS: Final = bytes(_VALUE_SIZE)


class _Process:
    """Process-wide connection state and counters (reset in a forked child)."""

    def __init__(self) -> None:
        self.fd = -1  # the fd number reserved for the map (see _install)
        self.fd_ident: tuple[int, int] | None = None
        self.gen = 0  # bumped whenever the fd refers to another map: thread states rebuild
        self.connected = False
        self.pin_path = _env.ctx_by_tid_pin()
        self.pin_ident: tuple[int, int] | None = None
        self.next_check = 0.0
        self.pidns = 0
        self.calls = 0
        self.writes = 0
        self.noop_calls = 0
        self.map_full = 0
        self.truncated_values = 0
        self.dropped_attrs = 0
        self.errors = 0
        self.last_error: str | None = None
        self.cells = False  # ctx_cells is mapped: thread writes are memory writes
        self.cells_note: str | None = None  # why it is not, when it was tried
        self.cells_ident: tuple[int, int] | None = None  # the ctx_cells pin when connecting


_P = _Process()
_lock = threading.Lock()
_tls = threading.local()
_threads: weakref.WeakSet[_Thread] = weakref.WeakSet()
"""Every live thread state: a new map invalidates what they think the map holds."""


class _Thread(_bpf.SlotBase):
    """One thread's preallocated syscall arguments and its mirror.

    The mirror's fields live in the base class: with the accelerator it is ``_fastbpf.Slot``,
    whose C ``annotate`` reads and writes them directly.
    """

    __slots__ = (
        "__weakref__",
        "a_any",
        "a_delete",
        "a_exist",
        "a_noexist",
        "attrs",
        "buf",
        "key",
        "owner",
        "pid",
        "vbuf",
    )

    def __init__(self, fd: int, gen: int, pidns: int) -> None:
        self.pid = os.getpid()
        self.gen = gen
        # The mirror: key -> encoded record, what this thread's entry holds as far as this
        # thread knows (the kernel may have deleted it since). ``data`` is the records joined,
        # ``trunc`` whether the entry carries CTX_F_TRUNCATED. Mirror dicts are never mutated
        # in place, so holding a reference is a snapshot.
        self.mirror: dict[str, bytes] = {}
        self.data = b""
        self.trunc = False
        # The client port of the request's inbound connection (bind_request), part of the
        # mirror: it belongs to the request whose context the entry holds.
        self.port = 0
        # The active OpenTelemetry SDK span (sdk_side.otel): trace id, span id and kind as the
        # value stores them, or b"" for none. Part of the mirror, like ``port``.
        self.sdk = b""
        self.sdk_in_buf = b""  # what ``buf`` holds there, so annotate rewrites it only on change
        self.synced = False  # ``buf`` holds exactly the mirror's value
        # The task context (see _TaskCtx) whose value the entry holds; None when it holds
        # thread-scoped context or nothing. Compared by identity on every asyncio task step.
        self.owner: _TaskCtx | None = None
        self.stale = False  # the last write found the entry cleared by the kernel
        # Request-length prediction for annotate (see _annotate_first): calls made since the
        # kernel was last seen clearing the entry, and how many the previous request made.
        self.req_calls = 0
        self.req_len = 0
        self.buf = bytearray(_VALUE_SIZE)
        self.filled = 0  # data bytes in ``buf`` (the rest is zero)
        # Exporting the buffer pins it: it can never be resized under the kernel's pointer.
        self.vbuf = (ctypes.c_char * _VALUE_SIZE).from_buffer(self.buf)
        self.key = ctypes.create_string_buffer(
            _abi.CTX_KEY.pack(pidns, threading.get_native_id(), 0), _abi.CTX_KEY.size
        )
        vaddr = ctypes.addressof(self.vbuf)
        kaddr = ctypes.addressof(self.key)

        def elem(value: int, flags: int) -> _bpf.MapElemAttr:
            return _bpf.MapElemAttr(map_fd=fd, key=kaddr, value=value, flags=flags)

        # Kept alive here; the c_void_p handles below point into them.
        self.attrs = (
            elem(vaddr, _bpf.BPF_EXIST),
            elem(vaddr, _bpf.BPF_NOEXIST),
            elem(vaddr, _bpf.BPF_ANY),
            elem(0, 0),
        )
        self.a_exist, self.a_noexist, self.a_any, self.a_delete = (
            _bpf.elem_handle(a) for a in self.attrs
        )
        self.bind(self.buf, *self.attrs[:3])

    def set_mirror(self, recs: dict[str, bytes], data: bytes, trunc: bool, port: int) -> None:
        """Record a successful write of ``recs`` (the buffer holds exactly that value)."""
        self.mirror = recs
        self.data = data
        self.trunc = trunc
        self.port = port
        self.synced = True

    @property
    def holds(self) -> bool:
        """Whether the entry holds something of ours (attributes or a bound connection)."""
        return bool(self.mirror) or self.port != 0 or bool(self.sdk)

    def forget(self) -> None:
        """Record that nothing of ours is (or should be treated as being) in the map."""
        self.mirror = {}
        self.data = b""
        self.trunc = False
        self.port = 0
        self.sdk = b""
        self.synced = False

    def fill(self, recs: dict[str, bytes], data: bytes, trunc: bool, port: int,
             flags: int = 0) -> None:
        """Write the value for ``recs`` (bound to inbound connection ``port``) into the
        preallocated buffer."""
        buf = self.buf
        total = len(data)
        if trunc:
            flags |= _abi.CTX_F_TRUNCATED
        sdk = self.sdk
        if sdk:
            flags |= _abi.CTX_F_SDK_SPAN
        if sdk != self.sdk_in_buf:
            buf[_SDK_OFF:_SDK_END] = sdk or _ZEROS[:_SDK_SIZE]
            self.sdk_in_buf = sdk
        _HEAD.pack_into(buf, 0, _ABI_VERSION, len(recs), flags, total, port)
        end = _DATA_OFF + total
        buf[_DATA_OFF:end] = data
        if total < self.filled:
            # Zero what a longer earlier value left behind: the entry must hold only this one.
            buf[end : _DATA_OFF + self.filled] = _ZEROS[: self.filled - total]
        self.filled = total
        self.synced = False

    def __del__(self) -> None:
        # A dead thread's entry would otherwise outlive it and, once its tid is reused, label
        # another thread's syscalls (and hold a slot of a bounded map).
        try:
            if self.pid == os.getpid() and _P.connected and self.gen == _P.gen:
                if self.holds:
                    _elem_delete(self.a_delete)
                if _P.cells and _bpf.release_cell is not None:
                    # Its cell too, for the next thread that hashes there (the probes free it
                    # at thread exit, but only while an agent runs).
                    _bpf.release_cell(self.a_delete)
        except Exception:
            # Interpreter shutdown may already have torn down the globals used above.
            pass


# --- connection -----------------------------------------------------------------------------


def _ident(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _fd_is_ours() -> bool:
    if _P.fd < 0 or _P.fd_ident is None:
        return False
    try:
        return _ident(os.fstat(_P.fd)) == _P.fd_ident
    except OSError:
        return False


def _install(newfd: int) -> None:
    """Make the reserved fd number refer to the map behind ``newfd``.

    The number never changes once chosen (``dup2`` swaps what it points at atomically), so a
    thread racing with a reconnect writes to the old or the new map, never to an unrelated file
    that happened to get a recycled number.
    """
    if _fd_is_ours():
        os.dup2(newfd, _P.fd, inheritable=False)
        os.close(newfd)
    else:
        _P.fd = newfd
    _P.fd_ident = _ident(os.fstat(_P.fd))
    _P.gen += 1
    for st in list(_threads):
        # The new map holds nothing of any thread's: asyncio steps must rewrite.
        st.owner = None


def _release() -> None:
    """Drop our reference to the map (so an agent restart frees it) but keep the fd number."""
    _P.connected = False
    if _bpf.map_cells is not None:
        _bpf.map_cells(-1, -1)
    _P.cells = False
    if not _fd_is_ours():
        _P.fd = -1
        _P.fd_ident = None
        return
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.dup2(null, _P.fd, inheritable=False)
    finally:
        os.close(null)
    _P.fd_ident = _ident(os.fstat(_P.fd))


def _refresh() -> bool:
    """Re-check the pin if due (at most once per ``RETRY_INTERVAL_S``); return ``connected``."""
    now = _monotonic()
    if now < _P.next_check:
        return _P.connected
    with _lock:
        if now < _P.next_check:
            return _P.connected
        _P.next_check = now + RETRY_INTERVAL_S
        try:
            _reconnect_locked()
        except OSError as exc:
            # Only os-level surprises (dup2, fstat) land here; never let them reach the app.
            _P.errors += 1
            _P.last_error = f"reconnect: {exc}"
            _P.connected = False
        _sync_gate()
        return _P.connected


def _sync_gate() -> None:
    """Tell the C entry (``_fastbpf.Entry``) what ``annotate`` would check before writing:
    connected, no span hook, the next pin check is not due, and which map is current."""
    if _fast_gate is not None:
        p = _P
        _fast_gate(p.connected and _span_hook is None, p.next_check, p.gen)


def _setup_fast() -> None:
    if _bpf.fast_setup is not None:
        _bpf.fast_setup(tls=_tls, ctxvar=_task_ctx, modules=_modules, strs=_strs,
                        max_str_len=_MAX_STR_LEN, per_key_max=_STRS_PER_KEY_MAX,
                        attr_str=_abi.ATTR_STR)


def _reconnect_locked() -> None:
    path = _env.ctx_by_tid_pin()
    if _P.pidns == 0:
        try:
            _P.pidns = os.stat("/proc/self/ns/pid").st_ino
        except OSError as exc:
            _P.last_error = f"cannot name this thread's PID namespace: {exc}"
            _release()
            return
    try:
        # stat before open: if the pin is replaced in between, the identity we record is the
        # older one and the next check reopens.
        ident = _ident(os.stat(path))
    except OSError:
        # No agent (or it unpinned the map): the normal no-op state, not an error.
        if _P.connected:
            _release()
        _P.pin_path = path
        _P.pin_ident = None
        return
    cells = _cells_ident()
    if (_P.connected and ident == _P.pin_ident and path == _P.pin_path and _fd_is_ours()
            and cells == _P.cells_ident):
        return
    try:
        newfd = _bpf.obj_get(path, _bpf.BPF_F_WRONLY)
    except OSError as exc:
        _P.last_error = f"open {path}: {exc.strerror}"
        _release()
        _P.pin_path = path
        return
    _install(newfd)
    _P.cells_ident = cells
    _map_cells()
    _P.pin_path = path
    _P.pin_ident = ident
    _P.connected = True


def _cells_ident() -> tuple[int, int] | None:
    """The identity of the ``ctx_cells`` pin, or None: a change (an agent replaced its maps
    between our two opens, say) reconnects, so the cells never belong to another map."""
    if _bpf.map_cells is None:
        return None
    try:
        return _ident(os.stat(_env.ctx_cells_pin()))
    except OSError:
        return None


def _map_cells() -> None:
    """Map ``ctx_cells`` where this process may (root, with the accelerator): thread-scoped
    writes then go to the thread's cell in memory, not through ``bpf(2)``. Anything else (an
    agent without the map, a write-only member of the app group) keeps the map alone."""
    if _bpf.map_cells is None:
        return
    _P.cells = False
    _bpf.map_cells(-1, -1)  # nothing of an earlier map stays mapped
    why = "disabled by EBPF_BRIDGE_NO_CELLS" if os.environ.get("EBPF_BRIDGE_NO_CELLS") else None
    if why is None:
        try:
            cfd = _bpf.obj_get(_env.ctx_cells_pin(), 0)
        except OSError as exc:
            why = f"not mapped ({exc.strerror})"
        else:
            try:
                _bpf.map_cells(_P.fd, cfd)
                _P.cells = True
            except OSError as exc:
                why = f"mmap failed ({exc.strerror})"
            finally:
                os.close(cfd)
    _P.cells_note = None if why is None else f"ctx_cells {why}: annotate uses bpf() calls"


def reconnect() -> bool:
    """Re-read ``EBPF_BRIDGE_PIN_DIR`` and re-check the pin now; return whether connected.

    Not needed in applications (the writer re-checks once per second on its own); tests use it
    to switch maps without waiting.
    """
    _P.next_check = 0.0
    return _refresh()


def _thread() -> _Thread:
    st: _Thread | None = getattr(_tls, "s", None)
    if st is None or st.gen != _P.gen:
        # First write on this thread, or a new map: nothing of ours is in it.
        st = _Thread(_P.fd, _P.gen, _P.pidns)
        _tls.s = st
        _threads.add(st)
    return st


def _after_fork_in_child() -> None:
    global _P, _lock, _tls
    # The child has a new pid, maybe a new PID namespace (unshare), and only one thread: every
    # mirror and every cached key belongs to the parent. The map fd itself stays valid.
    old = _P
    _P = _Process()
    _P.fd, _P.fd_ident, _P.connected, _P.gen = old.fd, old.fd_ident, old.connected, old.gen
    _P.pin_path, _P.pin_ident = old.pin_path, old.pin_ident
    # The mapping of ctx_cells is inherited; the child's threads claim cells of their own.
    _P.cells, _P.cells_note, _P.cells_ident = old.cells, old.cells_note, old.cells_ident
    _lock = threading.Lock()
    _tls = threading.local()
    _CONN.mirrors.clear()
    # The C entry counted the parent's calls and holds the parent's thread-local.
    _setup_fast()


os.register_at_fork(after_in_child=_after_fork_in_child)


# --- validation and encoding ----------------------------------------------------------------


class _Key:
    """A validated attribute key with its encoded prefixes and recently seen string records.

    Encoding is most of the Python cost of ``annotate``; the same keys (and often the same
    values) repeat on every request, so the records are built once.
    """

    __slots__ = ("false_rec", "float_pre", "int_pre", "kraw", "strs", "true_rec")

    def __init__(self, key: str) -> None:
        kraw = key.encode("ascii")
        klen = len(kraw)
        self.kraw = kraw
        # Keyed by the str value; typed ``object`` because look-ups use any value.
        self.strs: dict[object, bytes] = {}
        self.int_pre = _ATTR_HEAD.pack(_abi.ATTR_INT, klen, 8) + kraw
        self.float_pre = _ATTR_HEAD.pack(_abi.ATTR_FLOAT, klen, 8) + kraw
        self.true_rec = _ATTR_HEAD.pack(_abi.ATTR_BOOL, klen, 1) + kraw + b"\x01"
        self.false_rec = _ATTR_HEAD.pack(_abi.ATTR_BOOL, klen, 1) + kraw + b"\x00"


# Bounded so that key or value churn costs speed, never unbounded memory.
_KEYS_MAX: Final = 512
_STRS_PER_KEY_MAX: Final = 64
_keys: dict[str, _Key] = {}
_strs: dict[str, dict[object, bytes]] = {}
"""key -> its ``_Key.strs``: one look-up less on the hot path."""


def _key_info(key: str) -> _Key:
    ki = _Key(key)
    if len(_keys) < _KEYS_MAX:
        _keys[key] = ki
        _strs[key] = ki.strs
    return ki


def _validate(attrs: dict[str, AttrValue]) -> None:
    """``check_attr`` for every item, with a fast path for already-seen keys and plain types."""
    for k, v in attrs.items():
        if k in _keys:
            t = type(v)
            if t is str or t is bool:
                continue
            if isinstance(v, int):
                if _I64_MIN <= v <= _I64_MAX:
                    continue
            elif isinstance(v, float) and math.isfinite(v):
                continue
        _abi.check_attr(k, v)
        _key_info(k)


def _record(k: str, v: AttrValue) -> tuple[bytes, bool]:
    """Validate one attribute and encode it: (record, whether the value was truncated)."""
    ki = _keys.get(k)
    if ki is None:
        _abi.check_attr(k, v)
        ki = _key_info(k)
    if isinstance(v, str):
        raw = v.encode("utf-8", "replace")
        if len(raw) > _MAX_STR_LEN:
            # Rare: not cached, so every truncation is counted.
            return _abi.encode_attr(k, v)
        rec = _ATTR_HEAD.pack(_abi.ATTR_STR, len(ki.kraw), len(raw)) + ki.kraw + raw
        strs = ki.strs
        if len(strs) >= _STRS_PER_KEY_MAX:
            strs.clear()
        strs[v] = rec
        return rec, False
    if isinstance(v, bool):
        return (ki.true_rec if v else ki.false_rec), False
    if isinstance(v, int):
        if _I64_MIN <= v <= _I64_MAX:
            return ki.int_pre + _I64.pack(v), False
    elif isinstance(v, float) and math.isfinite(v):
        return ki.float_pre + _F64.pack(v), False
    # Raises for out-of-range numbers and unsupported types, naming the key.
    _abi.check_attr(k, v)
    return _abi.encode_attr(k, v)


def _fit(recs: dict[str, bytes]) -> tuple[dict[str, bytes], int]:
    """Apply the count and byte budget in insertion order, as ``encode_attrs`` does:
    (kept records, number dropped)."""
    kept: dict[str, bytes] = {}
    total = 0
    for k, rec in recs.items():
        if len(kept) < _MAX_ATTRS and total + len(rec) <= _ATTR_BYTES:
            kept[k] = rec
            total += len(rec)
    return kept, len(recs) - len(kept)


# --- map writes -----------------------------------------------------------------------------


def _update(attr: object) -> int:
    """One ``BPF_MAP_UPDATE_ELEM``; 0 on success, else the errno."""
    err = _elem_update(attr)
    if err == 0:
        _P.writes += 1
    return err


def _count_failure(err: int, what: str) -> None:
    if err in _MAP_FULL:
        _P.map_full += 1
        return
    _P.errors += 1
    _P.last_error = f"{what}: {os.strerror(err)}"
    if err in _STALE_FD:
        # Something closed or replaced our fd: look at the pin again on the next call.
        _P.next_check = 0.0
        _sync_gate()


def _within_limits(recs: dict[str, bytes]) -> tuple[dict[str, bytes], bytes, int]:
    """``recs`` (cut down by ``_fit`` when over the entry's limits), their joined block, and
    how many attributes were dropped."""
    data = b"".join(recs.values())
    if len(recs) > _MAX_ATTRS or len(data) > _ATTR_BYTES:
        recs, dropped = _fit(recs)
        return recs, b"".join(recs.values()), dropped
    return recs, data, 0


def _write_new(st: _Thread, recs: dict[str, bytes], trunc: bool, port: int = 0) -> None:
    """Create the entry for a new request with ``recs`` only (nothing of ours is in the map)."""
    recs, data, dropped = _within_limits(recs)
    if dropped:
        _P.dropped_attrs += dropped
        trunc = True
    st.fill(recs, data, trunc, port)
    p = _P
    err = _elem_update(st.a_noexist)
    if err == 0:
        p.writes += 1
        st.set_mirror(recs, data, trunc, port)
        return
    if err == errno.EEXIST:
        # The entry appeared since we learned it was gone (or was written by someone else on
        # this thread's key): ours replaces it.
        err = _update(st.a_any)
        if err == 0:
            st.set_mirror(recs, data, trunc, port)
            return
    st.forget()
    _count_failure(err, "update")


# --- public API -----------------------------------------------------------------------------


def annotate(**attrs: AttrValue) -> None:
    """Attach business attributes to the spans this thread produces for the current request.

    Attributes merge with what this thread set earlier *in the same request* (a later value for
    the same key wins) and never with an earlier request's. Keys and values are checked first:
    an invalid key raises ``ValueError`` and a value that is not ``str``/``int``/``float``/
    ``bool`` raises ``TypeError``, both naming the key, before anything is written. Everything
    else (no agent running, map full, value too long, kernel errors) never raises: it degrades
    as documented in ``BridgeStatus`` and is counted there.
    """
    _annotate(attrs, True)


def _annotate_tried(**attrs: AttrValue) -> None:
    """``annotate`` after the C entry attempted the write itself (see ``_fastbpf.Entry``)."""
    _annotate(attrs, False)


def _annotate(attrs: dict[str, AttrValue], core: bool) -> None:
    """All of ``annotate``; ``core``: whether the C write (``_fastbpf.annotate``) may be tried.

    With the accelerator the common call never gets here: ``_fastbpf.Entry``, exported as
    ``annotate``, makes the checks below and the same write without running Python code.
    """
    # This is the slow path's hot part: written out in one function on purpose (each Python
    # call costs about as much as encoding an attribute).
    if _span_hook is not None:
        _span_hook(attrs)
    if _ctx_get() is not None or _in_loop():
        # asyncio (or work running in a copied task context): task scope.
        _task_annotate(attrs)
        return
    p = _P
    if _monotonic() >= p.next_check:
        _refresh()
    if not p.connected:
        keys = _keys
        for k, v in attrs.items():
            # Known keys with str values (the common case) need no further checks.
            if type(v) is not str or k not in keys:
                _validate(attrs)
                break
        p.calls += 1
        p.noop_calls += 1
        return
    try:
        st: _Thread = _tls.s
    except AttributeError:
        st = _thread()
    if st.gen != p.gen:
        st = _thread()
    if core and _fast_annotate is not None and _fast_annotate(st, attrs, _strs) == 0:
        # The entry declined (a span hook, or the pin check was due) but the write itself is
        # a common one. When the entry did try, it changed nothing this code depends on.
        p.calls += 1
        p.writes += 1
        return
    mirror = merged = st.mirror
    if st.req_calls >= st.req_len and (mirror or st.port or st.sdk):
        # As many calls as the previous request made: most likely the first call of a new
        # request, whose entry the kernel has cleared.
        _annotate_first(st, attrs)
        return
    st.req_calls += 1
    data = st.data
    rebuild = False
    cut = 0
    strs = _strs
    try:
        # Merge into a copy first: a bad key or value raises before anything changes.
        for k, v in attrs.items():
            known = strs.get(k)
            # Only str records are cached; a value of another type never equals a str key.
            rec = None if known is None else known.get(v)
            if rec is None:
                rec, was_cut = _record(k, v)
                cut += was_cut
            old = mirror.get(k)
            if old == rec:
                continue
            if merged is mirror:
                merged = mirror.copy()
            merged[k] = rec
            if old is None:
                data += rec
            else:
                rebuild = True
    except TypeError:
        # An unhashable value fails the cache look-up; report it the documented way.
        _validate(attrs)
        raise
    p.calls += 1
    if cut:
        p.truncated_values += cut
    st.stale = False
    if not mirror and not st.port and not st.sdk:
        _write_new(st, merged, cut > 0)
        return
    dropped = 0
    trunc = st.trunc
    full = merged
    # Repeated values: the buffer already holds this value and the mirror already says so.
    unchanged = merged is mirror and st.synced
    if not unchanged:
        if rebuild:
            data = b"".join(merged.values())
        if len(merged) > _MAX_ATTRS or len(data) > _ATTR_BYTES:
            merged, dropped = _fit(merged)
            data = b"".join(merged.values())
        trunc = trunc or cut > 0 or dropped > 0
        st.fill(merged, data, trunc, st.port)
    err = _elem_update(st.a_exist)
    if err == 0:
        p.writes += 1
        if not unchanged:
            if dropped:
                p.dropped_attrs += dropped
            st.set_mirror(merged, data, trunc, st.port)
        return
    st.synced = False
    if err == errno.ENOENT:
        # The kernel cleared the entry: a new request began on this thread. Never carry an
        # earlier request's attributes into it.
        st.stale = True
        st.forget()
        # This call was counted in the request it turned out not to belong to.
        st.req_len, st.req_calls = st.req_calls - 1, 1
        _write_new(st, {k: full[k] for k in attrs}, cut > 0)
        return
    # The entry still holds the mirror's content; the mirror stays as it was.
    _count_failure(err, "update")


def _annotate_first(st: _Thread, attrs: dict[str, AttrValue]) -> None:
    """``annotate`` on a thread whose entry probably was cleared by the kernel (a new request):
    write ``attrs`` alone with ``BPF_NOEXIST``, one syscall where trying ``BPF_EXIST`` first
    would take two. ``EEXIST`` means the entry still holds this request's context: merge into
    it as ``annotate`` does, and expect longer requests from now on.

    The prediction only decides which write is tried first; the kernel's answer decides what
    is written, so the result is the same as ``annotate``'s either way.
    """
    recs: dict[str, bytes] = {}
    cut = 0
    strs = _strs
    try:
        for k, v in attrs.items():
            known = strs.get(k)
            rec = None if known is None else known.get(v)
            if rec is None:
                rec, was_cut = _record(k, v)
                cut += was_cut
            recs[k] = rec
    except TypeError:
        _validate(attrs)
        raise
    p = _P
    p.calls += 1
    if cut:
        p.truncated_values += cut
    kept, data, dropped = _within_limits(recs)
    trunc = cut > 0 or dropped > 0
    # A new request's entry holds no bound connection and no SDK span of the earlier one.
    sdk = st.sdk
    st.sdk = b""
    st.fill(kept, data, trunc, 0)
    err = _elem_update(st.a_noexist)
    if err == 0:
        p.writes += 1
        p.dropped_attrs += dropped
        st.stale = True  # as when an update finds the entry cleared (see annotate)
        st.req_len, st.req_calls = st.req_calls, 1
        st.set_mirror(kept, data, trunc, 0)
        return
    st.sdk = sdk
    st.synced = False
    if err != errno.EEXIST:
        # Nothing was written; whatever the entry holds, the mirror still describes it.
        _count_failure(err, "update")
        return
    # Still the same request: it makes more calls than predicted.
    st.req_len = max(2 * st.req_len, st.req_calls + 1)
    st.req_calls += 1
    st.stale = False
    merged, data, dropped = _within_limits({**st.mirror, **recs})
    trunc = st.trunc or cut > 0 or dropped > 0
    st.fill(merged, data, trunc, st.port)
    err = _update(st.a_exist)
    if err == 0:
        p.dropped_attrs += dropped
        st.set_mirror(merged, data, trunc, st.port)
        return
    st.synced = False
    if err == errno.ENOENT:
        # Cleared between the two writes: a new request after all.
        st.stale = True
        st.forget()
        st.req_len, st.req_calls = st.req_calls - 1, 1
        _write_new(st, recs, cut > 0)
        return
    _count_failure(err, "update")


def clear() -> None:
    """Drop this thread's context: delete its map entry and forget the mirror.

    Inside an asyncio task (or a copied task context) this drops the task's context instead,
    and deletes the thread's entry if it holds any context.
    """
    st: _Thread | None = getattr(_tls, "s", None)
    if _ctx_get() is not None or _in_loop():
        _task_ctx.set(None)
        if st is not None:
            st.owner = None
    if st is None or not st.holds:
        # Nothing of ours is in the map (deleting would only find ENOENT).
        return
    st.forget()
    _delete(st)


def bind_request(peer_port: int | None) -> None:
    """Tie the current request to the inbound connection it arrived on, named by the client's
    port of that connection (ASGI ``scope["client"][1]``, WSGI ``environ["REMOTE_PORT"]``).

    The agent then parents the outgoing calls made under this context (HTTP, Redis, SQL...)
    below *this* request's server span, even when the thread serves many requests at once (an
    asyncio event loop) or hands the work to another thread (``propagate``). Without it the
    parent is the request that last arrived on the thread, which is only right for
    thread-per-request servers. The framework integrations call it; hand-written servers call
    it once per request, before any outgoing call. ``None`` or 0 unbinds.

    Scoped like ``annotate``: the running asyncio task's context, else the thread's; a new
    request on the thread (or ``clear``) ends it. Raises only for a caller error (not an
    integer, or out of the 0-65535 range).
    """
    if peer_port is None:
        peer_port = 0
    if isinstance(peer_port, bool) or not isinstance(peer_port, int):
        raise TypeError(f"peer_port must be an int or None, got {type(peer_port).__name__}")
    if not 0 <= peer_port <= 0xFFFF:
        raise ValueError(f"peer_port out of range: {peer_port}")
    p = _P
    p.calls += 1
    if _ctx_get() is not None or _in_loop():
        cur = _ctx_get()
        if cur is not None and cur.port == peer_port:
            return
        new = (_TaskCtx(cur.recs, cur.data, cur.trunc, peer_port, cur.sdk) if cur is not None
               else _TaskCtx({}, b"", False, peer_port))
        _task_ctx.set(new)
        if not _task_sync(new):
            p.noop_calls += 1
        return
    if not _refresh():
        p.noop_calls += 1
        return
    st = _thread()
    st.stale = False
    if not st.holds:
        if peer_port:
            _write_new(st, {}, False, peer_port)
        return
    if not st.mirror and not peer_port and not st.sdk:
        st.forget()
        _delete(st)
        return
    st.fill(st.mirror, st.data, st.trunc, peer_port)
    err = _update(st.a_exist)
    if err == 0:
        st.set_mirror(st.mirror, st.data, st.trunc, peer_port)
        return
    st.synced = False
    if err == errno.ENOENT:
        # The kernel cleared the entry: what the mirror held belonged to an earlier request.
        st.forget()
        if peer_port:
            _write_new(st, {}, False, peer_port)
        return
    _count_failure(err, "update")


_span_hook: Callable[[dict[str, AttrValue]], None] | None = None
"""Set by ``sdk_side.otel.BridgeSpanProcessor``: also puts annotated attributes on the active
SDK span (validating them first, so a caller error still raises before anything is written)."""


def set_span_hook(hook: Callable[[dict[str, AttrValue]], None] | None) -> None:
    """Install (or remove, with None) the hook ``annotate`` calls first."""
    global _span_hook
    _span_hook = hook
    _sync_gate()


def reachable() -> bool:
    """Whether the agent's map is open (re-checking the pin at most once a second)."""
    return _refresh()


def thread_data() -> bytes:
    """This thread's encoded attribute block (``b""`` when none, or cleared by the kernel);
    the same object until the attributes change."""
    st: _Thread | None = getattr(_tls, "s", None)
    if st is None or st.stale:
        return b""
    return st.data


def thread_attributes() -> dict[str, AttrValue]:
    """The business attributes this thread's entry holds, decoded (thread scope; ``{}`` when
    none or when the kernel has cleared them for a new request)."""
    st: _Thread | None = getattr(_tls, "s", None)
    if st is None or not st.mirror or st.stale:
        return {}
    return _abi.decode_attrs(st.data, len(st.mirror))


def set_sdk_span(sdk: bytes) -> bool:
    """Record the active OpenTelemetry SDK span in this thread's entry (``b""``: none).

    ``sdk`` is ``trace_id (16 bytes) + span_id (8) + kind (1, OTLP numbering)``; called by
    ``sdk_side.otel.BridgeSpanProcessor``. Scoped like ``annotate``: on an asyncio loop thread
    (or inside a copied task context) it becomes part of the running task's context, which the
    step hook writes whenever the task runs. Never raises; False when no agent runs.
    """
    cur = _ctx_get()
    if cur is not None or _in_loop():
        if (b"" if cur is None else cur.sdk) == sdk:
            return _P.connected
        new = (_TaskCtx({}, b"", False, 0, sdk) if cur is None
               else _TaskCtx(cur.recs, cur.data, cur.trunc, cur.port, sdk))
        _task_ctx.set(new)
        return _task_sync(new)
    if not _refresh():
        return False
    st = _thread()
    if st.sdk == sdk:
        return True
    if not st.holds:
        if sdk:
            st.sdk = sdk
            _write_new(st, {}, False)
        return True
    if not st.mirror and not st.port and not sdk:
        st.forget()
        _delete(st)
        return True
    old = st.sdk
    st.sdk = sdk
    st.fill(st.mirror, st.data, st.trunc, st.port)
    err = _update(st.a_exist)
    if err == 0:
        st.set_mirror(st.mirror, st.data, st.trunc, st.port)
        return True
    st.synced = False
    if err == errno.ENOENT:
        # The kernel cleared the entry (a new inbound request): the attributes belonged to an
        # earlier request; only the span being recorded now is this request's.
        st.forget()
        if sdk:
            st.sdk = sdk
            _write_new(st, {}, False)
        return True
    st.sdk = old
    _count_failure(err, "update")
    return True


def _delete(st: _Thread) -> None:
    if not _refresh() or st.gen != _P.gen:
        return
    err = _elem_delete(st.a_delete)
    if err == 0:
        _P.writes += 1
        return
    if err != errno.ENOENT:  # already gone (the kernel cleared it) is the goal
        _count_failure(err, "delete")


class context:
    """Context manager: apply attributes for the ``with`` block, then restore the previous ones.

    On exit the thread's entry is rewritten to exactly what it held before (or deleted if it
    was empty). If a new request began on this thread inside the block (the kernel cleared the
    entry), the earlier request's context is not resurrected: the entry stays cleared. Keys and
    values are checked when the object is created, as for ``annotate``.
    """

    __slots__ = ("_attrs", "_saved", "_task")

    def __init__(self, **attrs: AttrValue) -> None:
        _validate(attrs)
        self._attrs = attrs
        self._saved: tuple[_Thread, dict[str, bytes], bytes, bool] | None = None
        self._task: tuple[_TaskCtx | None] | None = None

    def __enter__(self) -> None:
        if _ctx_get() is not None or _in_loop():
            # Task scope: restore the task's previous context object on exit.
            self._task = (_ctx_get(),)
            _task_annotate(self._attrs)
            return
        st: _Thread | None = getattr(_tls, "s", None)
        before = (st.mirror, st.data, st.trunc) if st is not None else ({}, b"", False)
        annotate(**self._attrs)
        cur: _Thread | None = getattr(_tls, "s", None)
        if cur is None:
            return  # no agent: nothing was written, nothing to undo
        if cur is not st or cur.stale:
            # A new map, or a new request had begun: there was no earlier context to restore.
            before = ({}, b"", False)
        self._saved = (cur, *before)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task, self._task = self._task, None
        if task is not None:
            _task_ctx.set(task[0])
            _task_sync(task[0])
            return
        saved, self._saved = self._saved, None
        if saved is None:
            return
        st, mirror, data, trunc = saved
        if st is not getattr(_tls, "s", None) or not st.holds or mirror == st.mirror:
            # The map changed, the entry is already gone (cleared by the kernel or by
            # clear()), or the block changed nothing: nothing to undo.
            return
        if not mirror and not st.port and not st.sdk:
            st.forget()
            _delete(st)
            return
        if not _refresh() or st.gen != _P.gen:
            st.forget()
            return
        st.fill(mirror, data, trunc, st.port)
        err = _update(st.a_exist)
        if err == 0:
            st.set_mirror(mirror, data, trunc, st.port)
        elif err == errno.ENOENT:
            # A new request began inside the block: do not resurrect the old context.
            st.forget()
        else:
            _count_failure(err, "update")


def status() -> BridgeStatus:
    """A snapshot of the connection and the process-wide counters."""
    _refresh()
    p = _P
    handled = 0 if _bpf.fast_handled is None else _bpf.fast_handled()
    return BridgeStatus(
        connected=p.connected,
        pin_path=p.pin_path,
        abi_version=_abi.ABI_VERSION,
        calls=p.calls + handled,
        writes=p.writes + handled,
        noop_calls=p.noop_calls,
        map_full=p.map_full,
        truncated_values=p.truncated_values,
        dropped_attrs=p.dropped_attrs,
        errors=p.errors,
        last_error=p.last_error,
        cells=p.cells,
        cell_fallbacks=0 if _bpf.cell_stats is None else _bpf.cell_stats()[2],
        cells_note=p.cells_note,
    )


# --- task scope (asyncio) -------------------------------------------------------------------


class _TaskCtx:
    """One immutable task context: encoded records (after the ABI limits), joined, and whether
    anything was truncated or dropped. Tasks share these objects (a child task copies its
    parent's contextvars), and the step hook compares them by identity."""

    __slots__ = ("data", "port", "recs", "sdk", "trunc")

    def __init__(self, recs: dict[str, bytes], data: bytes, trunc: bool, port: int = 0,
                 sdk: bytes = b"") -> None:
        self.recs = recs
        self.data = data
        self.trunc = trunc
        self.port = port  # the client port of the request's inbound connection (bind_request)
        self.sdk = sdk  # the task's active OpenTelemetry SDK span (see set_sdk_span)


_task_ctx: contextvars.ContextVar[_TaskCtx | None] = contextvars.ContextVar(
    "ebpf_bridge_context", default=None
)
_ctx_get: Final = _task_ctx.get
_modules: Final = sys.modules
_TASK_FLAGS: Final = _abi.CTX_F_TASK_SCOPED


def _in_loop() -> bool:
    """Whether an asyncio event loop runs on this thread (without importing asyncio)."""
    aio = _modules.get("asyncio")
    return aio is not None and aio._get_running_loop() is not None


def _task_annotate(attrs: dict[str, AttrValue]) -> None:
    """``annotate`` in task scope: merge into the task's context object, then write it."""
    cur = _ctx_get()
    merged = dict(cur.recs) if cur is not None else {}
    cut = 0
    for k, v in attrs.items():
        rec, was_cut = _record(k, v)  # raises for caller errors before anything changes
        cut += was_cut
        merged[k] = rec
    p = _P
    p.calls += 1
    if cut:
        p.truncated_values += cut
    data = b"".join(merged.values())
    dropped = 0
    if len(merged) > _MAX_ATTRS or len(data) > _ATTR_BYTES:
        merged, dropped = _fit(merged)
        data = b"".join(merged.values())
        p.dropped_attrs += dropped
    trunc = (cur is not None and cur.trunc) or cut > 0 or dropped > 0
    new = (_TaskCtx(merged, data, trunc) if cur is None
           else _TaskCtx(merged, data, trunc, cur.port, cur.sdk))
    _task_ctx.set(new)
    if not _task_sync(new):
        p.noop_calls += 1


def _task_sync(c: _TaskCtx | None) -> bool:
    """Make this thread's entry hold task context ``c`` (delete it for None). The slow path of
    the step hook: only called when the entry holds something else. Returns whether the map
    is reachable."""
    if not _refresh():
        return False
    st = _thread()
    if st.owner is c and (c is None or st.holds):
        return True
    if c is None:
        # The entry no longer holds the previous owner's context: say so, or that task's next
        # step would take the step hook's fast path (owner is its context) and run its I/O
        # with no entry at all (a step of a context-less task, such as asyncio's accept task,
        # between two steps of one request).
        st.owner = None
        if st.holds:
            st.forget()
            _delete(st)
        return True
    st.sdk = c.sdk
    st.fill(c.recs, c.data, c.trunc, c.port, _TASK_FLAGS)
    err = _update(st.a_any)
    if err == 0:
        st.set_mirror(c.recs, c.data, c.trunc, c.port)
        st.owner = c
        return True
    st.forget()
    st.owner = None
    _count_failure(err, "update")
    return True


def _task_done() -> None:
    """A wrapped coroutine finished: drop the entry if it holds the finishing context."""
    st: _Thread | None = getattr(_tls, "s", None)
    if st is not None and st.owner is not None and st.owner is _ctx_get():
        st.owner = None
        st.forget()
        _delete(st)


_T = TypeVar("_T")
_P_ = ParamSpec("_P_")


class TaskStep(Coroutine[Any, Any, _T]):
    """A thin coroutine wrapper whose every resume (``send``/``throw``) first makes the thread's
    map entry hold the running task's context. Steps where nothing changed cost one
    ``ContextVar.get``, one thread-local read and one identity compare."""

    __slots__ = ("_coro",)

    def __init__(self, coro: Coroutine[Any, Any, _T]) -> None:
        self._coro = coro

    def send(self, value: Any) -> Any:
        c = _ctx_get()
        st: _Thread | None = getattr(_tls, "s", None)
        if c is not (None if st is None else st.owner):
            _task_sync(c)
        try:
            return self._coro.send(value)
        except BaseException:
            _task_done()
            raise

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        c = _ctx_get()
        st: _Thread | None = getattr(_tls, "s", None)
        if c is not (None if st is None else st.owner):
            _task_sync(c)
        try:
            if val is None and tb is None:
                return self._coro.throw(typ)
            return self._coro.throw(typ, val, tb)
        except BaseException:
            _task_done()
            raise

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, _T]:
        return self

    def __iter__(self) -> TaskStep[_T]:
        return self

    def __next__(self) -> Any:
        return self.send(None)

    # inspect.getcoroutinestate and task reprs look at these (anyio does).
    @property
    def cr_running(self) -> bool:
        return bool(getattr(self._coro, "cr_running", False))

    @property
    def cr_frame(self) -> Any:
        return getattr(self._coro, "cr_frame", None)

    @property
    def cr_code(self) -> Any:
        return getattr(self._coro, "cr_code", None)

    @property
    def cr_await(self) -> Any:
        return getattr(self._coro, "cr_await", None)

    def __repr__(self) -> str:
        return repr(self._coro)


def request_scope() -> contextvars.Token[_TaskCtx | None]:
    """Start a new request in task scope: the task's context is empty until annotated."""
    return _task_ctx.set(None)


def _snapshot() -> _TaskCtx | None:
    """The calling code's context as a task-context object (task scope first, then thread)."""
    c = _ctx_get()
    if c is not None:
        return c
    st: _Thread | None = getattr(_tls, "s", None)
    if st is None or not st.holds or st.stale:
        return None
    return _TaskCtx(st.mirror, st.data, st.trunc, st.port)


def propagate(fn: Callable[_P_, _T]) -> Callable[_P_, _T]:
    """Wrap ``fn`` so that it runs under the caller's current context in whatever thread
    calls it (a ``ThreadPoolExecutor`` worker, a ``threading.Thread`` target).

    The context is captured now; in the worker the captured context is written to the worker
    thread's entry before ``fn`` runs, ``annotate`` inside ``fn`` merges into it, and the
    worker's previous context (usually none) is restored after ``fn`` returns or raises.
    """
    snap = _snapshot()

    @functools.wraps(fn)
    def run(*args: _P_.args, **kwargs: _P_.kwargs) -> _T:
        if snap is None and _ctx_get() is None:
            return fn(*args, **kwargs)
        st: _Thread | None = getattr(_tls, "s", None)
        before = None
        if st is not None and st.owner is None and st.holds and not st.stale:
            before = (st.mirror, st.data, st.trunc, st.port)
        token = _task_ctx.set(snap)
        try:
            _task_sync(snap)
            return fn(*args, **kwargs)
        finally:
            _task_ctx.reset(token)
            prev = _ctx_get()
            if prev is not None or before is None:
                _task_sync(prev)
            else:
                _restore_thread(*before)

    return run


def _restore_thread(mirror: dict[str, bytes], data: bytes, trunc: bool, port: int) -> None:
    """Write thread-scoped ``mirror`` back as this thread's entry (after ``propagate``)."""
    if not _refresh():
        return
    st = _thread()
    st.owner = None
    st.fill(mirror, data, trunc, port)
    err = _update(st.a_any)
    if err == 0:
        st.set_mirror(mirror, data, trunc, port)
    else:
        st.forget()
        _count_failure(err, "update")


# --- connection scope -----------------------------------------------------------------------


class _ConnMap:
    """The process's handle on ``ctx_by_conn`` and the mirror of each connection it wrote."""

    def __init__(self) -> None:
        self.fd = -1
        self.ident: tuple[int, int] | None = None
        self.next_check = 0.0
        self.mirrors: dict[int, dict[str, bytes]] = {}
        self.lock = threading.Lock()


_CONN = _ConnMap()


def _conn_fd() -> int:
    """The ``ctx_by_conn`` fd (re-checking the pin at most once per ``RETRY_INTERVAL_S``), or
    -1 when there is no such map."""
    c = _CONN
    now = _monotonic()
    if now < c.next_check:
        return c.fd
    with c.lock:
        c.next_check = now + RETRY_INTERVAL_S
        path = _env.ctx_by_conn_pin()
        try:
            ident = _ident(os.stat(path))
        except OSError:
            ident = None
        if ident is not None and ident == c.ident and c.fd >= 0:
            return c.fd
        if c.fd >= 0:
            os.close(c.fd)
            c.fd = -1
        c.ident = None
        c.mirrors.clear()
        if ident is None:
            return -1
        try:
            c.fd = _bpf.obj_get(path, _bpf.BPF_F_WRONLY)
        except OSError as exc:
            _P.last_error = f"open {path}: {exc.strerror}"
            return -1
        c.ident = ident
        return c.fd


def _conn_key(fd: int) -> bytes | None:
    if _P.pidns == 0:
        try:
            _P.pidns = os.stat("/proc/self/ns/pid").st_ino
        except OSError:
            return None
    return _abi.CONN_KEY.pack(_P.pidns, os.getpid(), fd)


def _sock_fd(sock_or_fd: socket.socket | int | Any) -> int:
    if isinstance(sock_or_fd, bool):
        raise TypeError("expected a socket (or an object with fileno()) or an fd number")
    if isinstance(sock_or_fd, int):
        fd = sock_or_fd
    elif hasattr(sock_or_fd, "fileno"):
        fd = int(sock_or_fd.fileno())
    else:
        raise TypeError(
            f"expected a socket (or an object with fileno()) or an fd number, "
            f"got {type(sock_or_fd).__name__}"
        )
    if fd < 0:
        raise ValueError(f"not an open file descriptor: {fd}")
    return fd


def annotate_connection(sock_or_fd: socket.socket | int | Any, **attrs: AttrValue) -> None:
    """Attach business attributes to every span of one connection of this process.

    For servers where the thread that writes the response is not the thread that annotated
    (hand-offs to a pool, a writer thread). The connection's context wins over the thread's
    for spans on that socket, merges with what was set earlier on the same connection, and
    ends when the socket is closed (the agent deletes it) or ``clear_connection`` is called.
    Raises only for caller errors (bad socket argument, key or value); everything else
    degrades to a counted no-op like ``annotate``.
    """
    fd = _sock_fd(sock_or_fd)
    recs: dict[str, bytes] = {}
    cut = 0
    for k, v in attrs.items():
        rec, was_cut = _record(k, v)
        cut += was_cut
        recs[k] = rec
    p = _P
    p.calls += 1
    p.truncated_values += cut
    mfd = _conn_fd()
    key = _conn_key(fd)
    if mfd < 0 or key is None:
        p.noop_calls += 1
        return
    mirrors = _CONN.mirrors
    old = mirrors.get(fd)

    def value(r: dict[str, bytes]) -> tuple[bytes, dict[str, bytes]]:
        kept, dropped = _fit(r)
        p.dropped_attrs += dropped
        enc = _abi.Encoded(b"".join(kept.values()), len(kept), cut, dropped)
        return _abi.pack_value(enc), kept

    try:
        if old:
            raw, kept = value({**old, **recs})
            try:
                _bpf.map_update(mfd, key, raw, _bpf.BPF_EXIST)
                p.writes += 1
                mirrors[fd] = kept
                return
            except FileNotFoundError:
                pass  # the kernel deleted it: the socket was closed, this fd is a new one
        raw, kept = value(recs)
        try:
            _bpf.map_update(mfd, key, raw, _bpf.BPF_NOEXIST)
        except FileExistsError:
            # Left by an earlier connection on this fd number that the agent did not track.
            _bpf.map_update(mfd, key, raw, _bpf.BPF_ANY)
        p.writes += 1
        if len(mirrors) >= _abi.CTX_MAX_ENTRIES:
            mirrors.clear()
        mirrors[fd] = kept
    except OSError as exc:
        mirrors.pop(fd, None)
        _count_failure(exc.errno or 0, "update connection")


def clear_connection(sock_or_fd: socket.socket | int | Any) -> None:
    """Drop the context of one connection (see ``annotate_connection``)."""
    fd = _sock_fd(sock_or_fd)
    _CONN.mirrors.pop(fd, None)
    mfd = _conn_fd()
    key = _conn_key(fd)
    if mfd < 0 or key is None:
        return
    try:
        _bpf.map_delete(mfd, key)
        _P.writes += 1
    except FileNotFoundError:
        pass
    except OSError as exc:
        _count_failure(exc.errno or 0, "delete connection")

# Last: the C entry reads names defined throughout this module.
_setup_fast()
_annotate_py: Final = annotate
if _bpf.fast_entry is not None:
    annotate = _bpf.fast_entry(_annotate_py, _annotate_tried)
