"""The agent with its optional C parts and without them (``EBPF_BRIDGE_NO_ACCEL=1``) turns the
same traffic into the same spans.

The unit tests hold each C part to its Python twin on synthetic input; this runs the whole
path both ways on real traffic: the ring-buffer reader, the HTTP/1 parser, span assembly and
the OTLP protobuf encoder (the receiver decodes it with the generated classes), plus the JSONL
writer. CI builds the C parts, so this is also the only end-to-end run of the pure-Python
agent.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import pytest
import requests

from kernel_side.otlp_receiver import OtlpReceiver, ReceivedSpan
from kernel_side.protocols import http1
from tests.e2e.conftest import APPS, SERVER, Harness, by_service

EDGE = APPS / "edge_server.py"
# Differs per connection and per run; everything else about a span must match.
_EPHEMERAL = {"network.peer.port"}
_TRACE = "0af7651916cd43dd8448eb211c80319c"


def _traffic(port: int, tag: str) -> list[str]:
    """Keep-alive and fresh connections, GET and POST, a traceparent on some, an error."""
    paths = []
    with requests.Session() as s:
        for i in range(12):
            path = f"/acc-{tag}/{i}?q={i}"
            headers = {"traceparent": f"00-{_TRACE}-{i + 1:016x}-01"} if i % 3 == 0 else {}
            if i % 4 == 1:
                r = s.post(f"http://127.0.0.1:{port}{path}", data=b"x" * (i * 10),
                           headers=headers, timeout=10)
            else:
                r = s.get(f"http://127.0.0.1:{port}{path}", headers=headers, timeout=10)
            assert r.status_code == 200
            paths.append(path.split("?")[0])
    for i in range(3):  # fresh connections
        r = requests.get(f"http://127.0.0.1:{port}/status/50{i}?t={tag}", timeout=10)
        assert r.status_code == 500 + i
    return paths


def _shape(span: ReceivedSpan) -> tuple[Any, ...]:
    attrs = {k: v for k, v in span.attributes.items() if k not in _EPHEMERAL}
    trace = span.trace_id if span.trace_id == _TRACE else None
    return (span.name, span.kind, span.status_code, trace, span.parent_span_id if trace else None,
            json.dumps(attrs, sort_keys=True))


def _run(harness: Harness, receiver: OtlpReceiver, srv_pid: int, port: int, accel: bool,
         jsonl: Path) -> tuple[list[str], str, int]:
    tag = secrets.token_hex(3)
    env = {} if accel else {"EBPF_BRIDGE_NO_ACCEL": "1"}
    agent = harness.agent("--pid", str(srv_pid), "--exporter", "jsonl", "--jsonl", str(jsonl),
                          receiver=receiver, env=env)
    paths = _traffic(port, tag)

    def is_ours(path: object, query: object) -> bool:
        return str(path).startswith(f"/acc-{tag}/") or query == f"t={tag}"

    def ours(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
        return [s for s in by_service(spans, "edge-acc", SERVER)
                if is_ours(s.attributes.get("url.path"), s.attributes.get("url.query"))]

    receiver.wait_for(lambda ss: len(ours(ss)) >= len(paths) + 3, timeout_s=30)
    assert agent.stop() == 0, agent.log_text()
    spans = ours(receiver.spans())
    assert len(spans) == len(paths) + 3, [s.attributes.get("url.path") for s in spans]
    lines = [json.loads(x) for x in jsonl.read_text().splitlines() if x.strip()]
    in_jsonl = 0
    for line in lines:
        for rs in line["resourceSpans"]:
            for ss in rs["scopeSpans"]:
                for sp in ss["spans"]:
                    attrs = {a["key"]: a["value"].get("stringValue") for a in sp["attributes"]}
                    in_jsonl += is_ours(attrs.get("url.path"), attrs.get("url.query"))
    shapes = sorted(repr(_shape(s)).replace(tag, "TAG") for s in spans)
    return shapes, agent.log_text(), in_jsonl


@pytest.mark.skipif(not http1.ACCELERATED, reason="the agent's C parts are not built "
                    "(`.venv/bin/pip install -e . --no-deps`) or EBPF_BRIDGE_NO_ACCEL is set")
def test_same_spans_with_and_without_the_c_parts(harness: Harness, receiver: OtlpReceiver,
                                                 tmp_path: Path) -> None:
    srv, port = harness.python_service("edge-acc", EDGE)
    fast, fast_log, fast_jsonl = _run(harness, receiver, srv.pid, port, True,
                                      tmp_path / "fast.jsonl")
    slow, slow_log, slow_jsonl = _run(harness, receiver, srv.pid, port, False,
                                      tmp_path / "slow.jsonl")
    assert "compiled hot paths: C: none;" in slow_log, slow_log
    assert "compiled hot paths: C: HTTP/1 parser" in fast_log, fast_log
    assert fast == slow
    assert fast_jsonl == slow_jsonl == len(fast)
