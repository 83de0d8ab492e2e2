"""The optional C accelerator (sdk_side/_fastbpf.c): built, and safe to misuse.

Only failing ``bpf(2)`` calls are made here (a bad fd), so no root and no map are needed. The
writes themselves run against real pinned maps: tests/e2e/test_sdk_map.py runs once through
this module and once through the fallback, and tests/e2e/test_sdk_fastpath.py requires the C
``annotate`` to leave exactly what the Python one leaves.
"""

from __future__ import annotations

import ctypes
import errno
import inspect
import os
import subprocess
import sys

import pytest

from sdk_side import _bpf


def test_the_install_builds_the_accelerator() -> None:
    # scripts/install.sh runs `pip install -e .`, which compiles it; without it every annotate
    # pays about 0.4-0.6 us more, so a missing compiler or header must not pass unnoticed here.
    if os.environ.get("EBPF_BRIDGE_NO_ACCEL"):
        pytest.skip("EBPF_BRIDGE_NO_ACCEL is set")
    assert _bpf.ACCELERATED, "sdk_side._fastbpf is not built: run scripts/install.sh"


def test_kernel_errors_come_back_as_errno_not_exceptions() -> None:
    from sdk_side import _fastbpf

    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        key = ctypes.create_string_buffer(16)
        value = ctypes.create_string_buffer(360)
        attr = _bpf.MapElemAttr(map_fd=devnull, key=ctypes.addressof(key),
                                value=ctypes.addressof(value), flags=_bpf.BPF_ANY)
        # /dev/null is not a map: the kernel answers EINVAL (or EBADF), and so must we.
        fast = _fastbpf.update(attr)
        assert fast in (errno.EINVAL, errno.EBADF)
        assert _fastbpf.delete(attr) == fast
        # The fallback agrees with the accelerator on the same call.
        assert _bpf._ctypes_update(_bpf._ctypes_handle(attr)) == fast
        assert _bpf._ctypes_delete(_bpf._ctypes_handle(attr)) == fast
    finally:
        os.close(devnull)


def test_wrong_arguments_raise_before_any_syscall() -> None:
    from sdk_side import _fastbpf

    with pytest.raises(ValueError, match="32 bytes"):
        _fastbpf.update(bytearray(8))
    with pytest.raises(TypeError):
        _fastbpf.update(12345)
    with pytest.raises(TypeError):
        _fastbpf.delete("not a buffer")


def test_no_accel_env_selects_the_ctypes_fallback() -> None:
    code = "from sdk_side import _bpf; print(_bpf.ACCELERATED, _bpf.elem_update.__name__)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "EBPF_BRIDGE_NO_ACCEL": "1"},
        capture_output=True, text=True, check=True,
    ).stdout.split()
    assert out == ["False", "_ctypes_update"]


def _accelerated() -> None:
    if not _bpf.ACCELERATED:
        pytest.skip("accelerator not in use (EBPF_BRIDGE_NO_ACCEL)")


def test_the_c_entry_presents_the_documented_function() -> None:
    _accelerated()
    import bridge
    from sdk_side import _fastbpf, _writer

    entry = bridge.annotate
    assert isinstance(entry, _fastbpf.Entry)
    assert entry.__doc__ == _writer._annotate_py.__doc__
    assert entry.__name__ == "annotate"
    assert inspect.signature(entry) == inspect.signature(_writer._annotate_py)
    assert "C entry" in repr(entry)


def test_the_c_entry_passes_caller_errors_through() -> None:
    # Whatever the C side declines reaches the Python annotate as the very same call, so caller
    # errors raise exactly as documented, connected or not.
    _accelerated()
    import bridge

    with pytest.raises(TypeError, match="positional"):
        bridge.annotate("acme")  # type: ignore[misc]
    with pytest.raises(ValueError, match="key"):
        bridge.annotate(**{"1bad": "x"})
    with pytest.raises(TypeError, match="tenant_id"):
        bridge.annotate(tenant_id=[1, 2])  # type: ignore[arg-type]
    bridge.annotate()  # nothing to attach: a no-op, as in Python


def test_c_types_reject_bad_arguments() -> None:
    _accelerated()
    from sdk_side import _fastbpf

    with pytest.raises(TypeError, match="callables"):
        _fastbpf.Entry(1, 2)  # type: ignore[arg-type]
    slot = _fastbpf.Slot()
    assert slot.mirror == {} and slot.data == b"" and slot.synced is False
    with pytest.raises(TypeError, match="dict"):
        slot.mirror = [("k", b"v")]  # type: ignore[assignment]
    with pytest.raises(TypeError, match="bytes"):
        slot.data = "text"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="value buffer"):
        slot.bind(bytearray(8), b"", b"", b"")
    attr = _bpf.MapElemAttr()
    with pytest.raises(ValueError, match="32 bytes"):
        slot.bind(bytearray(360), attr, attr, bytearray(8))
    # Not bound: the C write declines (-1) and touches nothing.
    assert _fastbpf.annotate(slot, {"tenant_id": "acme"}, {}) == -1
    with pytest.raises(TypeError):
        _fastbpf.annotate(slot, [], {})  # type: ignore[arg-type]
