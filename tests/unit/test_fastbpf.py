"""The optional C accelerator for map writes (sdk_side/_fastbpf.c): built, and safe to misuse.

Only failing ``bpf(2)`` calls are made here (a bad fd), so no root and no map are needed; the
writes themselves run against real pinned maps in tests/e2e/test_sdk_map.py, once through this
module and once through the ctypes fallback.
"""

from __future__ import annotations

import ctypes
import errno
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
