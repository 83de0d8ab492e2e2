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
import time
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

_KEY_CACHE_MAX: Final = 4096
_keys: dict[str, bytes] = {}
"""Validated attribute keys and their ASCII bytes; bounded so hostile key churn costs only speed."""


class _Process:
    """Process-wide connection state and counters (reset in a forked child)."""

    def __init__(self) -> None:
        self.fd = -1  # the fd number reserved for the map (see _install)
        self.fd_ident: tuple[int, int] | None = None
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
        "fd",
        "key",
        "mirror",
        "pid",
        "prev_len",
        "trunc",
    )

    def __init__(self, fd: int, pidns: int) -> None:
        self.pid = os.getpid()
        self.fd = fd
        # The mirror: key -> encoded record, exactly what this thread's entry holds (as far as
        # this thread knows; the kernel may have deleted it since).
        self.mirror: dict[str, bytes] = {}
        self.trunc = False  # the current entry had something truncated or dropped
        self.prev_len = 0
        self.buf = bytearray(_VALUE_SIZE)
        self.key = ctypes.create_string_buffer(
            _abi.CTX_KEY.pack(pidns, threading.get_native_id(), 0), _abi.CTX_KEY.size
        )
        vaddr = ctypes.addressof(ctypes.c_char.from_buffer(self.buf))
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

    def __del__(self) -> None:
        # A dead thread's entry would otherwise outlive it and, once its tid is reused, label
        # another thread's syscalls (and hold a slot of a bounded map).
        try:
            if self.mirror and self.pid == os.getpid() and _P.connected and self.fd == _P.fd:
                _bpf.syscall(_bpf.NR_BPF, _bpf.CMD_DELETE, self.a_delete, _bpf.ELEM_ATTR_SIZE)
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
    now = time.monotonic()
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
    if st is None or st.fd != _P.fd:
        st = _Thread(_P.fd, _P.pidns)
        _tls.s = st
    return st


def _after_fork_in_child() -> None:
    global _P, _lock, _tls
    # The child has a new pid, maybe a new PID namespace (unshare), and only one thread: every
    # mirror and every cached key belongs to the parent. The map fd itself stays valid.
    old = _P
    _P = _Process()
    _P.fd, _P.fd_ident, _P.connected = old.fd, old.fd_ident, old.connected
    _P.pin_path, _P.pin_ident = old.pin_path, old.pin_ident
    _lock = threading.Lock()
    _tls = threading.local()


os.register_at_fork(after_in_child=_after_fork_in_child)


# --- validation and encoding ----------------------------------------------------------------


def _remember(key: str) -> bytes:
    kraw = key.encode("ascii")
    if len(_keys) < _KEY_CACHE_MAX:
        _keys[key] = kraw
    return kraw


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
        _remember(k)


def _encode(attrs: dict[str, AttrValue]) -> tuple[dict[str, bytes], int]:
    """Validate and encode every item; return the records and how many values were cut."""
    recs: dict[str, bytes] = {}
    cut = 0
    for k, v in attrs.items():
        kraw = _keys.get(k)
        if kraw is not None and type(v) is str:
            raw = v.encode("utf-8", "replace")
            n = len(raw)
            if n <= _MAX_STR_LEN:
                recs[k] = _ATTR_HEAD.pack(_abi.ATTR_STR, len(kraw), n) + kraw + raw
                continue
        _abi.check_attr(k, v)
        _remember(k)
        rec, was_cut = _abi.encode_attr(k, v)
        recs[k] = rec
        cut += was_cut
    return recs, cut


def _fit(recs: dict[str, bytes]) -> tuple[dict[str, bytes], int, int]:
    """Apply the count and byte budget in insertion order: (kept, data bytes, dropped)."""
    total = sum(map(len, recs.values()))
    if len(recs) <= _MAX_ATTRS and total <= _ATTR_BYTES:
        return recs, total, 0
    kept: dict[str, bytes] = {}
    total = 0
    for k, rec in recs.items():
        if len(kept) < _MAX_ATTRS and total + len(rec) <= _ATTR_BYTES:
            kept[k] = rec
            total += len(rec)
    return kept, total, len(recs) - len(kept)


# --- map writes -----------------------------------------------------------------------------


def _fill(st: _Thread, recs: dict[str, bytes], total: int, trunc: bool) -> None:
    buf = st.buf
    _HEAD.pack_into(
        buf, 0, _abi.ABI_VERSION, len(recs), _abi.CTX_F_TRUNCATED if trunc else 0, total
    )
    end = _DATA_OFF + total
    buf[_DATA_OFF:end] = b"".join(recs.values())
    if total < st.prev_len:
        # Zero what a longer earlier value left behind: the agent must only ever see this entry.
        buf[end : _DATA_OFF + st.prev_len] = bytes(st.prev_len - total)
    st.prev_len = total


def _update(attr: ctypes.c_void_p) -> int:
    """One ``BPF_MAP_UPDATE_ELEM``; 0 on success, else the errno."""
    if _bpf.syscall(_bpf.NR_BPF, _bpf.CMD_UPDATE, attr, _bpf.ELEM_ATTR_SIZE) == 0:
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
    """Create the entry for a new request with ``recs`` only (the mirror is known to be stale)."""
    recs, total, dropped = _fit(recs)
    _P.dropped_attrs += dropped
    trunc = trunc or dropped > 0
    _fill(st, recs, total, trunc)
    err = _update(st.a_noexist)
    if err == errno.EEXIST:
        # The entry appeared since we learned it was gone (or was written by someone else on
        # this thread's key): ours replaces it.
        err = _update(st.a_any)
    if err:
        st.mirror = {}
        st.trunc = False
        _count_failure(err, "update")
        return
    st.mirror = recs
    st.trunc = trunc


def _apply(st: _Thread, recs: dict[str, bytes], cut: int) -> bool:
    """Merge ``recs`` into this request's entry; return False if the mirror was stale."""
    _P.truncated_values += cut
    mirror = st.mirror
    if not mirror:
        _write_new(st, recs, cut > 0)
        return True
    merged, total, dropped = _fit({**mirror, **recs})
    trunc = st.trunc or cut > 0 or dropped > 0
    _fill(st, merged, total, trunc)
    err = _update(st.a_exist)
    if err == 0:
        _P.dropped_attrs += dropped
        st.mirror = merged
        st.trunc = trunc
        return True
    if err == errno.ENOENT:
        # The kernel cleared the entry: a new request began on this thread. Never carry an
        # earlier request's attributes into it.
        _write_new(st, recs, cut > 0)
        return False
    _P.dropped_attrs += dropped
    # The entry still holds the mirror's content; it stays as it was.
    _count_failure(err, "update")
    return True


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
    p = _P
    if not (p.connected and time.monotonic() < p.next_check) and not _refresh():
        _validate(attrs)
        p.calls += 1
        p.noop_calls += 1
        return
    recs, cut = _encode(attrs)
    p.calls += 1
    _apply(_thread(), recs, cut)


def clear() -> None:
    """Drop this thread's context: delete its map entry and forget the mirror."""
    st: _Thread | None = getattr(_tls, "s", None)
    if st is None or not st.mirror:
        return
    st.mirror = {}
    st.trunc = False
    _delete(st)


def _delete(st: _Thread) -> None:
    if not _refresh() or st.fd != _P.fd:
        return
    if _bpf.syscall(_bpf.NR_BPF, _bpf.CMD_DELETE, st.a_delete, _bpf.ELEM_ATTR_SIZE) == 0:
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
        self._saved: tuple[dict[str, bytes], bool] | None = None

    def __enter__(self) -> None:
        p = _P
        p.calls += 1
        if not (p.connected and time.monotonic() < p.next_check) and not _refresh():
            p.noop_calls += 1
            self._saved = ({}, False)
            return
        st = _thread()
        # Mirrors are never mutated in place, so keeping a reference is a snapshot.
        saved = (st.mirror, st.trunc)
        recs, cut = _encode(self._attrs)
        if not _apply(st, recs, cut):
            saved = ({}, False)
        self._saved = saved

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        saved, self._saved = self._saved, None
        st: _Thread | None = getattr(_tls, "s", None)
        if saved is None or st is None or not st.mirror:
            # Nothing was written since (or the kernel already cleared it): nothing to undo.
            return
        mirror, trunc = saved
        if mirror == st.mirror:
            return
        if not mirror:
            st.mirror = {}
            st.trunc = False
            _delete(st)
            return
        if not _refresh() or st.fd != _P.fd:
            st.mirror = {}
            st.trunc = False
            return
        total = sum(map(len, mirror.values()))
        _fill(st, mirror, total, trunc)
        err = _update(st.a_exist)
        if err == 0:
            st.mirror = mirror
            st.trunc = trunc
        elif err == errno.ENOENT:
            st.mirror = {}
            st.trunc = False
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
