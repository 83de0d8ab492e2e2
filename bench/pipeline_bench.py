"""Agent user-space cost per span, stage by stage, on a realistic HTTP/1.1 exchange.

Stages: decode (ring-buffer bytes -> Exchange), parse+assemble (HTTP/1.1 parse, ids, attributes,
business context -> SpanRecord), and export encoding for each exporter (OTLP protobuf build +
serialize; the direct wire encoder the OTLP exporters use, C accelerator when built, and its
pure-Python form; OTLP-JSON line as dicts + orjson and as the direct writer the JSONL sink uses).
The kernel-to-user transfer (BCC's ctypes callback) is measured by agent_bench.py under real
load, not here. Prints a table and writes JSON; never pass/fail.

    .venv/bin/python bench/pipeline_bench.py [--n 20000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bridge import _abi  # noqa: E402
from kernel_side.assembly import SpanAssembler  # noqa: E402
from kernel_side.events import ExchangeLayout  # noqa: E402
from kernel_side.export import otlp_json, otlp_wire  # noqa: E402
from kernel_side.export.otlp_json import to_otlp_json  # noqa: E402
from kernel_side.export.otlp_proto import to_export_request  # noqa: E402
from kernel_side.model import Resource, SpanRecord  # noqa: E402
from kernel_side.protocols import http1  # noqa: E402

REQ = (b"GET /orders/4711?expand=items HTTP/1.1\r\nHost: orders.internal:8081\r\n"
       b"User-Agent: python-requests/2.32.3\r\nAccept-Encoding: gzip, deflate\r\n"
       b"Accept: */*\r\nConnection: keep-alive\r\nX-Tenant-ID: acme\r\n"
       b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n")
RESP = (b"HTTP/1.1 200 OK\r\nServer: BaseHTTP/0.6 Python/3.11.2\r\n"
        b"Date: Tue, 24 Nov 2026 22:00:00 GMT\r\nContent-Type: application/json\r\n"
        b"Content-Length: 61\r\n\r\n"
        b'{"order": "4711", "tenant": "acme", "in_stock": true, "n": 3}')


class _Layout(ctypes.Structure):
    """The C ``struct exchange`` as BCC would present it (REQ_CAP 1024, RESP_CAP 512)."""

    _fields_ = [
        ("type", ctypes.c_uint), ("tgid", ctypes.c_uint), ("fd", ctypes.c_uint),
        ("role", ctypes.c_ubyte), ("family", ctypes.c_ubyte), ("phase", ctypes.c_ubyte),
        ("has_ctx", ctypes.c_ubyte), ("peer_port", ctypes.c_ushort), ("_pad0", ctypes.c_ushort),
        ("listen_fd", ctypes.c_uint), ("req_tid", ctypes.c_uint), ("resp_tid", ctypes.c_uint),
        ("req_cap", ctypes.c_uint), ("resp_cap", ctypes.c_uint), ("req_calls", ctypes.c_uint),
        ("resp_calls", ctypes.c_uint), ("peer_addr", ctypes.c_ubyte * 16),
        ("conn_id", ctypes.c_ulonglong), ("exchange_id", ctypes.c_ulonglong),
        ("parent_exchange_id", ctypes.c_ulonglong), ("req_start_ns", ctypes.c_ulonglong),
        ("req_end_ns", ctypes.c_ulonglong), ("resp_start_ns", ctypes.c_ulonglong),
        ("resp_end_ns", ctypes.c_ulonglong), ("req_bytes", ctypes.c_ulonglong),
        ("resp_bytes", ctypes.c_ulonglong), ("local_addr", ctypes.c_ubyte * 16),
        ("local_port", ctypes.c_ushort), ("peer_traced", ctypes.c_ubyte),
        ("tls", ctypes.c_ubyte), ("_pad1", ctypes.c_ubyte * 4),
        ("ctx", ctypes.c_ubyte * _abi.CTX_VALUE_SIZE),
        ("resp", ctypes.c_ubyte * 1024), ("req", ctypes.c_ubyte * 2048),
    ]


def pack_event(raw: bytes) -> bytes:
    """The ring-buffer form of a ``struct exchange`` (EV_EXCHANGE_PACKED): header, request and
    response bytes, and the context when ``has_ctx``, as ``emit`` in bpf/agent.bpf.c packs it."""
    raw = raw.ljust(ctypes.sizeof(_Layout), b"\0")
    ev = _Layout.from_buffer_copy(raw)
    hdr = _Layout.ctx.offset
    out = (4).to_bytes(4, "little") + raw[4:hdr]
    out += raw[_Layout.req.offset:_Layout.req.offset + ev.req_cap]
    out += raw[_Layout.resp.offset:_Layout.resp.offset + ev.resp_cap]
    if ev.has_ctx:
        out += raw[hdr:hdr + _Layout.ctx.size]
    return out


def make_event() -> bytes:
    ev = _Layout()
    ev.type, ev.tgid, ev.fd, ev.role, ev.family, ev.peer_port = 1, 4242, 7, 1, 2, 51000
    ev.listen_fd, ev.req_tid, ev.resp_tid = 3, 4243, 4243
    ev.peer_addr[:4] = [127, 0, 0, 1]
    ev.conn_id, ev.exchange_id = 9, 1000
    ev.req_start_ns, ev.req_end_ns = 1_000_000, 1_010_000
    ev.resp_start_ns, ev.resp_end_ns = 1_900_000, 2_000_000
    ev.req_bytes, ev.resp_bytes, ev.req_cap, ev.resp_cap = len(REQ), len(RESP), len(REQ), len(RESP)
    ev.has_ctx = 1
    ctx = _abi.pack_value(_abi.encode_attrs(
        {"tenant_id": "acme", "user_id": "u-42", "feature_flag": "new-checkout"}))
    ctypes.memmove(ctypes.addressof(ev) + _Layout.ctx.offset, ctx, len(ctx))
    ctypes.memmove(ctypes.addressof(ev) + _Layout.req.offset, REQ, len(REQ))
    ctypes.memmove(ctypes.addressof(ev) + _Layout.resp.offset, RESP, len(RESP))
    return bytes(ev)[: _Layout.req.offset + len(REQ)]


class _Procs:
    resource = Resource((4242, 1), {"service.name": "orders", "process.pid": 4242,
                                    "host.name": "vm", "telemetry.sdk.name": "ebpf-bridge"})

    def resource_for(self, tgid: int) -> Resource:
        return self.resource

    def listen_port(self, tgid: int, fd: int) -> int | None:
        return 8081


def per_call_us(fn: object, n: int, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()  # type: ignore[operator]
        out.append((time.perf_counter() - t0) / n * 1e6)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", default=str(REPO / "bench/results/pipeline.json"))
    args = ap.parse_args()
    raw = make_event()
    layout = ExchangeLayout.from_ctypes(_Layout)
    packed = pack_event(raw)
    ex = layout.decode_packed(packed)
    spans: list[SpanRecord] = []
    asm = SpanAssembler(_Procs(), spans.append)
    asm.on_exchange(ex)
    span = spans[0]
    assert span.attributes.get("tenant_id") == "acme", span.attributes
    # Realistic variety for the exporters' caches: every span has its own ephemeral peer port
    # and order path, users rotate over 50, tenants over 4; method, ports and scheme repeat.
    # Each export sees a fresh batch (never the same path twice), so caches only help with
    # values that really repeat.

    def make_batch(b: int) -> list[SpanRecord]:
        out = []
        for i in range(512):
            attrs = dict(span.attributes)
            attrs["network.peer.port"] = 32768 + (b * 512 + i) % 28000
            attrs["url.path"] = f"/orders/{b * 512 + i}"
            attrs["user_id"] = f"u-{i % 50}"
            attrs["tenant_id"] = ("acme", "globex", "initech", "umbrella")[i % 4]
            out.append(SpanRecord(span.trace_id, span.span_id, span.parent_span_id, span.name,
                                  span.kind, span.start_ns, span.end_ns, span.resource, attrs,
                                  span.status))
        return out

    # Each batch is built just before its export and dropped after it, outside the timed
    # region: the agent's queue holds one batch at a time, and holding every batch of the run
    # at once (200,000 spans) made the garbage collector's full passes part of the figure.
    counter = itertools.count()

    def timed_batch(encode: object) -> object:
        def run() -> float:
            batch = make_batch(next(counter))
            t0 = time.perf_counter()
            encode(batch)  # type: ignore[operator]
            return time.perf_counter() - t0
        return run

    stages = {
        "decode (bytes -> Exchange)": lambda: layout.decode_packed(packed),
        "parse + assemble (-> SpanRecord)": lambda: asm.on_exchange(ex),
        "otlp protobuf, generated classes (per span, batch 512)":
            timed_batch(lambda b: to_export_request(b).SerializeToString()),
        "otlp protobuf, direct wire encoder (per span, batch 512)":
            timed_batch(otlp_wire.encode_export_request),
        "otlp protobuf, direct wire encoder, pure Python (per span, batch 512)":
            timed_batch(otlp_wire.encode_export_request_py),
        "otlp-json line, dicts + orjson (per span, batch 512)":
            timed_batch(lambda b: orjson.dumps(to_otlp_json(b))),
        "otlp-json line, direct writer (per span, batch 512)":
            timed_batch(otlp_json.otlp_json_line),
        "otlp-json line, direct writer, pure Python (per span, batch 512)":
            timed_batch(otlp_json.otlp_json_line_py),
    }
    results: dict[str, list[float]] = {}
    for name, fn in stages.items():
        if "batch" in name:
            n = max(args.n // 512, 5)
            vals = [sum(fn() for _ in range(n)) / n / 512 * 1e6  # type: ignore[operator]
                    for _ in range(args.repeat)]
        else:
            vals = per_call_us(fn, args.n, args.repeat)
        results[name] = vals
        spans.clear()
        if name.startswith("parse + assemble"):
            # The same exchange through the pure-Python HTTP/1 parser (the fallback when
            # kernel_side._fasthttp is not built), for the C parser's share.
            fast = http1.parse_requests, http1.parse_responses
            http1.parse_requests, http1.parse_responses = (http1.parse_requests_py,
                                                           http1.parse_responses_py)
            try:
                results["parse + assemble, pure-Python HTTP/1 parser"] = per_call_us(
                    lambda: asm.on_exchange(ex), args.n, args.repeat)
            finally:
                http1.parse_requests, http1.parse_responses = fast
            spans.clear()
    def which(accelerated: bool) -> str:
        return "C accelerator" if accelerated else "pure Python (accelerator not in use)"

    print(f"HTTP/1 parser: {which(http1.ACCELERATED)}; "
          f"direct wire encoder: {which(otlp_wire.ACCELERATED)}; "
          f"JSON line writer: {which(otlp_json.ACCELERATED)}")
    width = max(len(name) for name in results)
    print(f"{'stage':<{width}} {'us/span median':>15} {'min-max':>15}")
    for name, vals in results.items():
        print(f"{name:<{width}} {statistics.median(vals):>15.2f} "
              f"{min(vals):>7.2f}-{max(vals):<7.2f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"us_per_span": results}, indent=2))
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
