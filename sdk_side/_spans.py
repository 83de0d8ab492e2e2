"""The agent -> application direction: which span the kernel is building for this thread.

The kernel program records, per thread, the server exchange the thread serves (pinned map
``server_by_tid``); the agent publishes the salt it derives span and trace ids from (pinned map
``id_salt``). Both are readable by the application group, so an application can name the
kernel's server span and nest its own spans (or an outgoing ``traceparent``) under it.
"""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass
from typing import Final

from bridge import _abi, _env
from kernel_side.protocols.traceparent import parse_traceparent
from sdk_side import _bpf

_U64_SIZE: Final = 8


@dataclass(frozen=True)
class KernelSpanContext:
    """The ids of the server span the agent builds for the request this thread serves."""

    trace_id: bytes
    """16 bytes."""
    span_id: bytes
    """8 bytes."""

    @property
    def traceparent(self) -> str:
        """A W3C ``traceparent`` naming this span as the parent (sampled)."""
        return f"00-{self.trace_id.hex()}-{self.span_id.hex()}-01"


class _Maps:
    """Read-only fds of the two pins, reopened when a pin is replaced (an agent restart)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pid = -1
        self.pidns = 0
        self.server_fd = -1
        self.salt_fd = -1
        self.idents: tuple[tuple[int, int], tuple[int, int]] | None = None

    def close(self) -> None:
        for fd in (self.server_fd, self.salt_fd):
            if fd >= 0:
                os.close(fd)
        self.server_fd = self.salt_fd = -1
        self.idents = None

    def open(self) -> bool:
        """Make sure both fds refer to the current pins; False when no agent publishes them."""
        if self.pid != os.getpid():
            # After fork the fds are still valid, but the namespace may differ (unshare).
            self.pid = os.getpid()
            self.pidns = 0
        pin_dir = _env.pin_dir()
        server_pin = os.path.join(pin_dir, _abi.SERVER_BY_TID_NAME)
        salt_pin = os.path.join(pin_dir, _abi.ID_SALT_NAME)
        try:
            if not self.pidns:
                self.pidns = os.stat("/proc/self/ns/pid").st_ino
            st1, st2 = os.stat(server_pin), os.stat(salt_pin)
        except OSError:
            self.close()
            return False
        idents = ((st1.st_dev, st1.st_ino), (st2.st_dev, st2.st_ino))
        if idents == self.idents:
            return True
        self.close()
        try:
            self.server_fd = _bpf.obj_get(server_pin, _bpf.BPF_F_RDONLY)
            self.salt_fd = _bpf.obj_get(salt_pin, _bpf.BPF_F_RDONLY)
        except OSError:
            self.close()
            return False
        self.idents = idents
        return True


_MAPS = _Maps()


def current_span_context(traceparent: str | None = None) -> KernelSpanContext | None:
    """The kernel's server span for the request this thread is serving, or None.

    None when no agent runs, the process is not traced, the thread has served no request yet,
    or the maps are not readable by this process (the agent's ``--app-group``). The span id is
    exact; the trace id is the one of ``traceparent`` when the request carried one (pass the
    incoming header: the agent continues that trace), else the trace the agent starts for the
    request. Not exact when the agent joins the request to a traced caller on the same node
    that sent no ``traceparent`` (same-node stitching; see the README). Never raises.
    """
    with _MAPS.lock:
        try:
            if not _MAPS.open():
                return None
            key = _abi.CTX_KEY.pack(_MAPS.pidns, threading.get_native_id(), 0)
            raw = _bpf.map_lookup(_MAPS.server_fd, key, _U64_SIZE)
            salt = _bpf.map_lookup(_MAPS.salt_fd, bytes(4), _abi.ID_SALT_SIZE)
        except OSError as exc:
            if exc.errno in (errno.EBADF, errno.EINVAL):
                _MAPS.close()
            return None
    if raw is None or salt is None or not any(salt):
        return None
    exchange_id = int.from_bytes(raw, "little")
    span_id = _abi.exchange_span_id(salt, exchange_id)
    tp = parse_traceparent(traceparent)
    trace_id = tp.trace_id if tp is not None else _abi.exchange_trace_id(salt, exchange_id)
    return KernelSpanContext(trace_id, span_id)
