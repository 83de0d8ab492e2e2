"""A thread's context dies with the thread, in the kernel.

Thread ids are reused: an entry left behind by an exited thread would hand its request's tenant
to whichever thread, in any process, gets the id next (a cross-tenant leak seen once in the demo
test before the kernel forgot exiting threads). The entries here are written with a raw bpf()
update, not through bridge.annotate, so the SDK's own cleanup cannot mask the kernel's.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from bridge import _abi
from kernel_side.otlp_receiver import OtlpReceiver
from sdk_side import _bpf
from tests.e2e.conftest import PYTHON, REPO, Harness, warm_up_context

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
            # join() returns once the kernel clears the thread's tid, which can come before
            # the exit tracepoint that forgets its context: wait for the entry to go.
            deadline = time.monotonic() + 10
            while _bpf.map_lookup(fd, key, _abi.CTX_VALUE_SIZE) is not None:
                assert time.monotonic() < deadline, "the exited thread's context stayed"
                time.sleep(0.01)
        finally:
            os.close(fd)
    finally:
        writer.kill()
        writer.wait(10)


def test_agent_restart_mid_request_keeps_the_context(harness: Harness,
                                                      receiver: OtlpReceiver) -> None:
    """The context maps are pinned, so they outlive the agent: a request that annotated before
    the agent restarted still gets its tenant on the outgoing call the new agent traces, and
    annotate neither raised nor failed in between."""
    import json
    import threading

    import requests

    from tests.e2e.conftest import APPS, CLIENT, EXAMPLES, by_service

    inv, inv_port = harness.python_service("inventory", EXAMPLES / "python/inventory.py")
    hold_dir = harness.tmp / "hold"
    hold_dir.mkdir()
    app, port = harness.python_service("hold", APPS / "hold_app.py", "--dir", str(hold_dir),
                                       "--upstream", f"http://127.0.0.1:{inv_port}")
    first = harness.agent("--pid", str(app.pid), "--pid", str(inv.pid), receiver=receiver)
    def warm(tenant: str) -> None:  # until the app's writer has found the map
        (hold_dir / f"go-{tenant}").write_text("")
        requests.get(f"http://127.0.0.1:{port}/hold/{tenant}",
                     headers={"X-Tenant-ID": tenant}, timeout=20)

    warm_up_context(receiver, warm)

    answers: list[int] = []
    held = threading.Thread(target=lambda: answers.append(requests.get(
        f"http://127.0.0.1:{port}/hold/mid", headers={"X-Tenant-ID": "across-restart"},
        timeout=60).status_code))
    held.start()
    deadline = time.monotonic() + 30
    while not (hold_dir / "held-mid").exists():
        assert time.monotonic() < deadline, "the request never annotated"
        time.sleep(0.01)
    assert first.stop() == 0
    harness.agent("--pid", str(app.pid), "--pid", str(inv.pid), receiver=receiver)
    (hold_dir / "go-mid").write_text("")
    held.join(60)
    assert answers == [200]
    spans = receiver.wait_for(lambda ss: any(str(s.attributes.get("url.full", "")).endswith(
        "/stock/sku-mid") for s in ss), timeout_s=30)
    (call,) = [s for s in by_service(spans, "hold", CLIENT)
               if str(s.attributes.get("url.full", "")).endswith("/stock/sku-mid")]
    assert call.attributes.get("tenant_id") == "across-restart", call.attributes
    status = json.loads(requests.get(f"http://127.0.0.1:{port}/status", timeout=10).text)
    assert status["errors"] == 0 and status["connected"], status
