"""--raw-query-text: literals stay in db.query.text only when asked for."""

from __future__ import annotations

from kernel_side.assembly import SpanAssembler
from kernel_side.events import ROLE_CLIENT, Exchange
from kernel_side.model import Resource, SpanRecord
from kernel_side.protocols.registry import register_all


class _Procs:
    def resource_for(self, tgid: int) -> Resource:
        return Resource((1, 1), {"service.name": "t"})

    def listen_port(self, tgid: int, fd: int) -> int | None:
        return None


def _redis_set_span(raw: bool) -> SpanRecord:
    spans: list[SpanRecord] = []
    asm = SpanAssembler(_Procs(), spans.append)
    register_all(asm, raw_query_text=raw)
    req = b"*3\r\n$3\r\nSET\r\n$4\r\ncard\r\n$16\r\n4111111111111111\r\n"
    ex = Exchange(tgid=1, fd=3, role=ROLE_CLIENT, peer_address="127.0.0.1", peer_port=6379,
                  listen_fd=0, req_tid=1, resp_tid=1, conn_id=7, exchange_id=9,
                  parent_exchange_id=0, req_start_ns=1, req_end_ns=2, resp_start_ns=3,
                  resp_end_ns=4, req_bytes=len(req), resp_bytes=5, req_calls=1, resp_calls=1,
                  request=req, response=b"+OK\r\n", ctx=None)
    asm.on_exchange(ex)
    assert len(spans) == 1
    return spans[0]


def test_query_text_obfuscated_by_default_and_raw_on_request() -> None:
    try:
        assert _redis_set_span(False).attributes["db.query.text"] == "SET ? ?"
        assert "4111111111111111" in str(_redis_set_span(True).attributes["db.query.text"])
    finally:
        # The switch is process-wide: leave it off for other tests.
        _redis_set_span(False)
