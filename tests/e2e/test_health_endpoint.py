"""The agent's health endpoint, served by a real agent: readiness after attach, liveness while
the loop runs, Prometheus metrics that count the spans it made, and 2 on a taken port."""

from __future__ import annotations

import re
import socket
import subprocess
import time

import requests

from kernel_side.otlp_receiver import OtlpReceiver
from tests.e2e.conftest import EXAMPLES, PYTHON, Harness

_SAMPLE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]* [-+]?(\d+(\.\d*)?([eE][-+]?\d+)?|NaN|[+-]Inf)$")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _metrics(base: str) -> dict[str, float]:
    r = requests.get(f"{base}/metrics", timeout=5)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    out: dict[str, float] = {}
    for line in r.text.splitlines():
        if not line or line.startswith("#"):
            continue
        assert _SAMPLE.match(line), f"not a Prometheus sample: {line!r}"
        name, value = line.split(" ")
        out[name] = float(value)
    return out


def _wait_status(url: str, want: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = requests.get(url, timeout=2).status_code
            if last == want:
                return
        except requests.RequestException as e:
            last = e
        time.sleep(0.05)
    raise AssertionError(f"{url} did not answer {want} in {timeout}s; last: {last}")


def test_health_ready_live_and_metrics(harness: Harness, receiver: OtlpReceiver) -> None:
    inv, port = harness.python_service("inventory-health", EXAMPLES / "python" / "inventory.py")
    hport = _free_port()
    harness.agent("--pid", str(inv.pid), "--health-port", str(hport), receiver=receiver)
    base = f"http://127.0.0.1:{hport}"
    _wait_status(f"{base}/readyz", 200)
    r = requests.get(f"{base}/healthz", timeout=5)
    assert r.status_code == 200 and r.text.strip() == "ok"

    before = _metrics(base)
    for name in ("ebpf_bridge_spans_total", "ebpf_bridge_events_lost_total",
                 "ebpf_bridge_unknown_protocol_total", "ebpf_bridge_parse_errors_total",
                 "ebpf_bridge_waiting_parent", "ebpf_bridge_export_exported_total"):
        assert name in before, name

    for i in range(3):
        r = requests.get(f"http://127.0.0.1:{port}/stock/sku-{i}",
                         headers={"Connection": "close"}, timeout=10)
        assert r.status_code == 200
    deadline = time.monotonic() + 20
    while _metrics(base)["ebpf_bridge_spans_total"] < before["ebpf_bridge_spans_total"] + 3:
        assert time.monotonic() < deadline, "spans_total did not count the 3 requests"
        time.sleep(0.1)
    assert requests.get(f"{base}/nope", timeout=5).status_code == 404


def test_health_port_taken_exits_2(harness: Harness) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        p = subprocess.run([PYTHON, "-m", "kernel_side.cli", "agent", "--exporter", "console",
                            "--health-port", str(taken)], capture_output=True, text=True,
                           timeout=60)
    assert p.returncode == 2, p.stderr
    assert f"127.0.0.1:{taken}" in p.stderr and "--health-port" in p.stderr
