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

import ctypes
import errno
import math
import os
import struct
import threading
from time import monotonic as _monotonic
from types import TracebackType
from typing import Final

from bridge import _abi, _env
from bridge._abi import AttrValue
from bridge._status import BridgeStatus
from sdk_side import _bpf

RETRY_INTERVAL_S: Final = 1.0
"""How often the pin is re-checked: to pick up an agent that started, or a map re-created."""

_HEAD: Final = struct.Struct("<HBBH")  # version, attr_count, flags, data_len
_ATTR_HEAD: Final = struct.Struct("<BBH")
_DATA_OFF: Final = _abi.CTX_VALUE_HEADER.size
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
_syscall: Final = _bpf.syscall
_NR_BPF: Final = _bpf.NR_BPF
_CMD_UPDATE: Final = _bpf.CMD_UPDATE
_CMD_DELETE: Final = _bpf.CMD_DELETE
_ELEM_SIZE: Final = _bpf.ELEM_ATTR_SIZE
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


_P = _Process()
_lock = threading.Lock()
_tls = threading.local()


class _Thread:
    """One thread's preallocated syscall arguments and its mirror."""

    __slots__ = (
        "a_any",
        "a_delete",
        "a_exist",
        "a_noexist",
        "attrs",
        "buf",
        "data",
        "filled",
        "gen",
        "key",
        "mirror",
        "pid",
        "stale",
        "synced",
        "trunc",
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
        self.synced = False  # ``buf`` holds exactly the mirror's value
        self.stale = False  # the last write found the entry cleared by the kernel
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
            ctypes.c_void_p(ctypes.addressof(a)) for a in self.attrs
        )

    def set_mirror(self, recs: dict[str, bytes], data: bytes, trunc: bool) -> None:
        """Record a successful write of ``recs`` (the buffer holds exactly that value)."""
        self.mirror = recs
        self.data = data
        self.trunc = trunc
        self.synced = True

    def forget(self) -> None:
        """Record that nothing of ours is (or should be treated as being) in the map."""
        self.mirror = {}
        self.data = b""
        self.trunc = False
        self.synced = False

    def fill(self, recs: dict[str, bytes], data: bytes, trunc: bool) -> None:
        """Write the value for ``recs`` into the preallocated buffer."""
        buf = self.buf
        total = len(data)
        _HEAD.pack_into(
            buf, 0, _ABI_VERSION, len(recs), _abi.CTX_F_TRUNCATED if trunc else 0, total
        )
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
            if self.mirror and self.pid == os.getpid() and _P.connected and self.gen == _P.gen:
                _syscall(_NR_BPF, _CMD_DELETE, self.a_delete, _ELEM_SIZE)
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


def _release() -> None:
    """Drop our reference to the map (so an agent restart frees it) but keep the fd number."""
    _P.connected = False
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
        return _P.connected


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
    if _P.connected and ident == _P.pin_ident and path == _P.pin_path and _fd_is_ours():
        return
    try:
        newfd = _bpf.obj_get(path, _bpf.BPF_F_WRONLY)
    except OSError as exc:
        _P.last_error = f"open {path}: {exc.strerror}"
        _release()
        _P.pin_path = path
        return
    _install(newfd)
    _P.pin_path = path
    _P.pin_ident = ident
    _P.connected = True


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
    return st


def _after_fork_in_child() -> None:
    global _P, _lock, _tls
    # The child has a new pid, maybe a new PID namespace (unshare), and only one thread: every
    # mirror and every cached key belongs to the parent. The map fd itself stays valid.
    old = _P
    _P = _Process()
    _P.fd, _P.fd_ident, _P.connected, _P.gen = old.fd, old.fd_ident, old.connected, old.gen
    _P.pin_path, _P.pin_ident = old.pin_path, old.pin_ident
    _lock = threading.Lock()
    _tls = threading.local()


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


def _update(attr: ctypes.c_void_p) -> int:
    """One ``BPF_MAP_UPDATE_ELEM``; 0 on success, else the errno."""
    if _syscall(_NR_BPF, _CMD_UPDATE, attr, _ELEM_SIZE) == 0:
        _P.writes += 1
        return 0
    return ctypes.get_errno()


def _count_failure(err: int, what: str) -> None:
    if err in _MAP_FULL:
        _P.map_full += 1
        return
    _P.errors += 1
    _P.last_error = f"{what}: {os.strerror(err)}"
    if err in _STALE_FD:
        # Something closed or replaced our fd: look at the pin again on the next call.
        _P.next_check = 0.0


def _write_new(st: _Thread, recs: dict[str, bytes], trunc: bool) -> None:
    """Create the entry for a new request with ``recs`` only (nothing of ours is in the map)."""
    data = b"".join(recs.values())
    if len(recs) > _MAX_ATTRS or len(data) > _ATTR_BYTES:
        recs, dropped = _fit(recs)
        _P.dropped_attrs += dropped
        trunc = True
        data = b"".join(recs.values())
    st.fill(recs, data, trunc)
    p = _P
    if _syscall(_NR_BPF, _CMD_UPDATE, st.a_noexist, _ELEM_SIZE) == 0:
        p.writes += 1
        st.set_mirror(recs, data, trunc)
        return
    err = ctypes.get_errno()
    if err == errno.EEXIST:
        # The entry appeared since we learned it was gone (or was written by someone else on
        # this thread's key): ours replaces it.
        err = _update(st.a_any)
        if err == 0:
            st.set_mirror(recs, data, trunc)
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
    # This is the hot path: it is written out in one function on purpose (each Python call
    # costs about as much as encoding an attribute).
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
    mirror = merged = st.mirror
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
    if not mirror:
        _write_new(st, merged, cut > 0)
        return
    dropped = 0
    trunc = st.trunc
    full = merged
    if merged is not mirror or not st.synced:
        if rebuild:
            data = b"".join(merged.values())
        if len(merged) > _MAX_ATTRS or len(data) > _ATTR_BYTES:
            merged, dropped = _fit(merged)
            data = b"".join(merged.values())
        trunc = trunc or cut > 0 or dropped > 0
        st.fill(merged, data, trunc)
    if _syscall(_NR_BPF, _CMD_UPDATE, st.a_exist, _ELEM_SIZE) == 0:
        p.writes += 1
        if dropped:
            p.dropped_attrs += dropped
        st.set_mirror(merged, data, trunc)
        return
    st.synced = False
    err = ctypes.get_errno()
    if err == errno.ENOENT:
        # The kernel cleared the entry: a new request began on this thread. Never carry an
        # earlier request's attributes into it.
        st.stale = True
        st.forget()
        _write_new(st, {k: full[k] for k in attrs}, cut > 0)
        return
    # The entry still holds the mirror's content; the mirror stays as it was.
    _count_failure(err, "update")


def clear() -> None:
    """Drop this thread's context: delete its map entry and forget the mirror."""
    st: _Thread | None = getattr(_tls, "s", None)
    if st is None or not st.mirror:
        # Nothing of ours is in the map (deleting would only find ENOENT).
        return
    st.forget()
    _delete(st)


def _delete(st: _Thread) -> None:
    if not _refresh() or st.gen != _P.gen:
        return
    if _syscall(_NR_BPF, _CMD_DELETE, st.a_delete, _ELEM_SIZE) == 0:
        _P.writes += 1
        return
    err = ctypes.get_errno()
    if err != errno.ENOENT:  # already gone (the kernel cleared it) is the goal
        _count_failure(err, "delete")


class context:
    """Context manager: apply attributes for the ``with`` block, then restore the previous ones.

    On exit the thread's entry is rewritten to exactly what it held before (or deleted if it
    was empty). If a new request began on this thread inside the block (the kernel cleared the
    entry), the earlier request's context is not resurrected: the entry stays cleared. Keys and
    values are checked when the object is created, as for ``annotate``.
    """

    __slots__ = ("_attrs", "_saved")

    def __init__(self, **attrs: AttrValue) -> None:
        _validate(attrs)
        self._attrs = attrs
        self._saved: tuple[_Thread, dict[str, bytes], bytes, bool] | None = None

    def __enter__(self) -> None:
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
        saved, self._saved = self._saved, None
        if saved is None:
            return
        st, mirror, data, trunc = saved
        if st is not getattr(_tls, "s", None) or not st.mirror or mirror == st.mirror:
            # The map changed, the entry is already gone (cleared by the kernel or by
            # clear()), or the block changed nothing: nothing to undo.
            return
        if not mirror:
            st.forget()
            _delete(st)
            return
        if not _refresh() or st.gen != _P.gen:
            st.forget()
            return
        st.fill(mirror, data, trunc)
        err = _update(st.a_exist)
        if err == 0:
            st.set_mirror(mirror, data, trunc)
        elif err == errno.ENOENT:
            # A new request began inside the block: do not resurrect the old context.
            st.forget()
        else:
            _count_failure(err, "update")


def status() -> BridgeStatus:
    """A snapshot of the connection and the process-wide counters."""
    _refresh()
    p = _P
    return BridgeStatus(
        connected=p.connected,
        pin_path=p.pin_path,
        abi_version=_abi.ABI_VERSION,
        calls=p.calls,
        writes=p.writes,
        noop_calls=p.noop_calls,
        map_full=p.map_full,
        truncated_values=p.truncated_values,
        dropped_attrs=p.dropped_attrs,
        errors=p.errors,
        last_error=p.last_error,
    )
