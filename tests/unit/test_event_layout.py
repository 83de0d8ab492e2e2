"""The packed exchange event (EV_EXCHANGE_PACKED) decodes to the same Exchange as the struct
it was packed from, with and without business context."""

from __future__ import annotations

import ctypes

from bench.pipeline_bench import _Layout, make_event, pack_event
from kernel_side.events import ExchangeLayout


def test_packed_event_decodes_like_the_struct() -> None:
    layout = ExchangeLayout.from_ctypes(_Layout)
    raw = make_event()
    packed = pack_event(raw)
    assert len(packed) < len(raw) - 512  # the unused capture buffer stays behind
    full = layout.decode(raw)
    assert layout.decode_packed(packed) == full
    assert full.ctx is not None and b"acme" in full.ctx


def test_packed_event_without_context_or_response() -> None:
    layout = ExchangeLayout.from_ctypes(_Layout)
    ev = _Layout.from_buffer_copy(make_event().ljust(ctypes.sizeof(_Layout), b"\0"))
    ev.has_ctx = 0
    ev.resp_cap = 0
    raw = bytes(ev)
    got = layout.decode_packed(pack_event(raw))
    assert got.ctx is None and got.response == b""
    assert got == layout.decode(raw)
    assert got.request.startswith(b"GET /orders/4711")


def test_packed_header_is_the_struct_header() -> None:
    # The kernel copies offsetof(struct exchange, ctx) bytes; the decoder must read the same.
    assert _Layout.ctx.offset % 8 == 0
    assert ctypes.sizeof(_Layout) == _Layout.req.offset + 2048
