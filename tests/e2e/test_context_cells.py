"""The memory cells (``ctx_cells``) with the real agent: a root app's threads write their context
into their cells, the probes read it there and clear it when a new request starts; a thread
whose cell another thread holds writes ``ctx_by_tid`` instead, and its spans are as complete.
"""

from __future__ import annotations

import mmap
import os
import secrets

import requests

from bridge import _abi
from kernel_side.otlp_receiver import OtlpReceiver, ReceivedSpan
from sdk_side import _bpf
from tests.e2e.conftest import APPS, SERVER, Harness, by_service, warm_up_context

APP = APPS / "bridge_status_app.py"
PER_SESSION = 6


def _served(spans: list[ReceivedSpan], tag: str) -> list[ReceivedSpan]:
    return [s for s in by_service(spans, "cells-app", SERVER)
            if f"/{tag}/" in str(s.attributes.get("url.path"))]


def _release(pin_dir: str, cell: int, owner: int) -> None:
    """Free a cell the test marked as taken (the maps may outlive this agent)."""
    pin = os.path.join(pin_dir, _abi.CTX_CELLS_NAME)
    fd = _bpf.obj_get(pin, 0)
    try:
        mem = mmap.mmap(fd, _abi.CTX_CELLS * _abi.CTX_CELL_SIZE, mmap.MAP_SHARED,
                        mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    off = cell * _abi.CTX_CELL_SIZE
    if int.from_bytes(mem[off : off + 8], "little") == owner:
        mem[off : off + 8] = bytes(8)
    mem.close()


def test_cells_and_a_taken_cell_both_label_every_request(harness: Harness,
                                                          receiver: OtlpReceiver) -> None:
    app, port = harness.python_service("cells-app", APP)
    agent = harness.agent("--pid", str(app.pid), receiver=receiver)
    url = f"http://127.0.0.1:{port}"
    warm_up_context(receiver, lambda tenant: requests.get(
        f"{url}/warm/{tenant}", headers={"X-Tenant-ID": tenant}, timeout=10))
    status = requests.get(f"{url}/bridge-status", timeout=10).json()
    assert status["cells"] is True, status

    tag = secrets.token_hex(3)
    taken = None
    try:
        # One keep-alive connection per session: one server thread serves all its requests.
        # The second session's thread finds its cell held by someone else before its first
        # annotate and falls back to the map; the first uses its cell.
        sent = []
        for session in ("cell", "map"):
            with requests.Session() as s:
                if session == "map":
                    taken = s.get(f"{url}/take-cell", timeout=10).json()
                for i in range(PER_SESSION):
                    tenant = f"{tag}-{session}-{i}"
                    # Every other request is not annotated: the kernel's clear at the start of
                    # a request must leave it without the previous request's tenant.
                    headers = {"X-Tenant-ID": tenant} if i % 2 == 0 else {}
                    r = s.get(f"{url}/{tag}/{session}/{i}", headers=headers, timeout=10)
                    assert r.status_code == 200
                    sent.append((f"/{tag}/{session}/{i}", tenant if i % 2 == 0 else None))
        spans = receiver.wait_for(lambda ss: len(_served(ss, tag)) >= len(sent), timeout_s=30)
        got = {str(s.attributes["url.path"]): s.attributes.get("tenant_id")
               for s in _served(spans, tag)}
        assert got == dict(sent), got
        status = requests.get(f"{url}/bridge-status", timeout=10).json()
        assert status["cells"] is True and status["cell_fallbacks"] >= 1, status
        assert status["errors"] == 0 and status["annotate_exceptions"] == 0, status
    finally:
        if taken is not None:
            _release(harness.pin_dir, int(taken["cell"]), int(taken["owner"]))
    assert agent.stop() == 0, agent.log_text()
