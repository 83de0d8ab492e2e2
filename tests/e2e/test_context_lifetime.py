"""A thread's context dies with the thread, in the kernel.

Thread ids are reused: an entry left behind by an exited thread would hand its request's tenant
to whichever thread, in any process, gets the id next (a cross-tenant leak seen once in the demo
test before the kernel forgot exiting threads). The entries here are written with a raw bpf()
update, not through bridge.annotate, so the SDK's own cleanup cannot mask the kernel's.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from bridge import _abi
from sdk_side import _bpf
from tests.e2e.conftest import PYTHON, REPO, Harness

# Waits for "go", then a worker thread writes a context entry for itself, reports its key and
# exits; the process stays alive (only the thread is gone) until stdin closes.
_WRITER = r"""
import os, sys, threading
from bridge import _abi
from sdk_side import _bpf
sys.stdin.readline()
fd = _bpf.obj_get(sys.argv[1])
ino = os.stat("/proc/self/ns/pid").st_ino
def work():
    key = _abi.CTX_KEY.pack(ino, threading.get_native_id(), 0)
    _bpf.map_update(fd, key, _abi.pack_value(_abi.encode_attrs({"tenant_id": "gone"})))
    print(key.hex(), flush=True)
t = threading.Thread(target=work)
t.start()
t.join()
print("joined", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("traced", [True, False], ids=["traced", "not-traced"])
def test_exited_thread_leaves_no_context(harness: Harness, traced: bool) -> None:
    pin = f"{harness.pin_dir}/{_abi.CTX_BY_TID_NAME}"
    writer = subprocess.Popen([PYTHON, "-c", _WRITER, pin], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=REPO,
                              env={**os.environ, "EBPF_BRIDGE_PIN_DIR": harness.pin_dir})
    try:
        # Traced: the writer is selected. Not traced: the agent selects only init, and the
        # writer lives in the agent's pid namespace.
        harness.agent("--pid", str(writer.pid) if traced else "1")
        assert writer.stdin is not None and writer.stdout is not None
        writer.stdin.write("go\n")
        writer.stdin.flush()
        key = bytes.fromhex(writer.stdout.readline().strip())
        assert writer.stdout.readline().strip() == "joined"
        fd = _bpf.obj_get(pin)
        try:
            assert _bpf.map_lookup(fd, key, _abi.CTX_VALUE_SIZE) is None
        finally:
            os.close(fd)
    finally:
        writer.kill()
        writer.wait(10)
