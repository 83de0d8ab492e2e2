"""PostgreSQL wire parsing and spans, from real captured psycopg sessions
(tests/fixtures_capture/capture_postgres.py) plus malformed and truncated bytes."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_side import semconv
from kernel_side.assembly import IdSource, SpanAssembler
from kernel_side.events import ROLE_CLIENT, ROLE_SERVER, Exchange
from kernel_side.model import Resource, SpanKind, SpanRecord, StatusCode
from kernel_side.protocols import postgres as pg
from kernel_side.protocols import postgres_spans
from tests.unit._work import assert_linear

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "postgres"
T0 = 5_000_000_000


class FakeProcs:
    def resource_for(self, tgid: int) -> Resource:
        return Resource((tgid, 42), {semconv.SERVICE_NAME: f"svc-{tgid}"})

    def listen_port(self, tgid: int, fd: int) -> int | None:
        return None


def load(name: str) -> list[tuple[bytes, bytes]]:
    data = json.loads((FIXTURES / f"{name}.json").read_text())
    return [(bytes.fromhex(e["request"]), bytes.fromhex(e["response"]))
            for e in data["exchanges"]]


def ex_of(req: bytes, resp: bytes, *, n: int = 1, conn_id: int = 77, role: int = ROLE_CLIENT,
          req_cap: int = 1024, resp_cap: int = 512, parent: int = 0, tgid: int = 100) -> Exchange:
    return Exchange(
        tgid=tgid, fd=5, role=role, peer_address="127.0.0.1", peer_port=5432, listen_fd=0,
        req_tid=tgid, resp_tid=tgid, conn_id=conn_id, exchange_id=n, parent_exchange_id=parent,
        req_start_ns=T0 + n * 10_000_000, req_end_ns=T0 + n * 10_000_000 + 1000,
        resp_start_ns=T0 + n * 10_000_000 + 2000, resp_end_ns=T0 + n * 10_000_000 + 3000,
        req_bytes=len(req), resp_bytes=len(resp), req_calls=1, resp_calls=1,
        request=req[:req_cap], response=resp[:resp_cap], ctx=None)


def run(exchanges: list[tuple[bytes, bytes]], **kw: Any) -> tuple[list[SpanRecord], SpanAssembler]:
    spans: list[SpanRecord] = []
    asm = SpanAssembler(FakeProcs(), spans.append, ids=IdSource(bytes(range(24))))
    asm.add_protocol(postgres_spans.detect, postgres_spans.build)
    for i, (req, resp) in enumerate(exchanges, 1):
        asm.on_exchange(ex_of(req, resp, n=i, **kw))
    return spans, asm


def test_every_captured_exchange_is_detected() -> None:
    for f in FIXTURES.glob("*.json"):
        for req, _resp in load(f.stem):
            assert pg.looks_like_frontend(req, len(req)), (f.stem, req[:40])


def test_simple_query_session() -> None:
    spans, asm = run(load("simple"))
    assert asm.stats.parse_errors == 0 and asm.stats.unknown_protocol == 0
    assert [s.name for s in spans] == ["CREATE users", "INSERT users", "SELECT users"]
    sel = spans[2]
    assert sel.kind == SpanKind.CLIENT
    assert sel.status == StatusCode.UNSET
    assert sel.attributes[semconv.DB_SYSTEM_NAME] == "postgresql"
    assert sel.attributes[semconv.DB_NAMESPACE] == "postgres"
    assert sel.attributes[semconv.DB_OPERATION_NAME] == "SELECT"
    assert sel.attributes[semconv.DB_COLLECTION_NAME] == "users"
    assert sel.attributes[semconv.DB_QUERY_TEXT] == "SELECT name FROM users WHERE id = ?"
    assert sel.attributes[semconv.SERVER_ADDRESS] == "127.0.0.1"
    assert sel.attributes[semconv.SERVER_PORT] == 5432
    assert spans[1].attributes[semconv.DB_QUERY_TEXT] == (
        "INSERT INTO users VALUES (?, ?), (?, ?) ON CONFLICT DO NOTHING")
    assert len({s.span_id for s in spans}) == 3


def test_raw_query_text_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(postgres_spans, "RAW_QUERY_TEXT", True)
    spans, _ = run(load("simple"))
    assert spans[2].attributes[semconv.DB_QUERY_TEXT] == "SELECT name FROM users WHERE id = 1"


def test_extended_protocol_unnamed_statements() -> None:
    spans, _ = run(load("extended"))
    assert [s.name for s in spans] == ["SELECT users", "UPDATE users"]
    assert spans[0].attributes[semconv.DB_QUERY_TEXT] == "SELECT name FROM users WHERE id = $1"
    assert spans[1].attributes[semconv.DB_QUERY_TEXT] == (
        "UPDATE users SET name = $1 WHERE id = $2")
    assert all(s.status == StatusCode.UNSET for s in spans)


def test_named_prepared_statement_reused_across_exchanges() -> None:
    spans, _ = run(load("prepared"))
    # Parse+Sync alone runs nothing; each of the three Bind/Execute exchanges is one span.
    assert [s.name for s in spans] == ["SELECT users"] * 3
    for s in spans:
        assert s.attributes[semconv.DB_QUERY_TEXT] == "SELECT name FROM users WHERE id = $1"
        assert s.attributes[semconv.DB_NAMESPACE] == "postgres"


def test_prepared_statement_unknown_without_its_parse() -> None:
    ex = load("prepared")
    spans, _ = run([ex[2]])  # agent started after the Parse: still a span, no text
    assert len(spans) == 1
    assert spans[0].name == "postgresql"
    assert semconv.DB_QUERY_TEXT not in spans[0].attributes
    assert semconv.DB_NAMESPACE not in spans[0].attributes


def test_errors_carry_sqlstate() -> None:
    spans, _ = run(load("error"))
    assert len(spans) == 2  # simple and extended
    for s in spans:
        assert s.name == "SELECT missing_table"
        assert s.status == StatusCode.ERROR
        assert s.attributes[semconv.DB_RESPONSE_STATUS_CODE] == "42P01"
        assert s.attributes[semconv.ERROR_TYPE] == "42P01"


def test_transaction() -> None:
    spans, _ = run(load("transaction"))
    assert [s.name for s in spans] == ["BEGIN", "DELETE users", "COMMIT"]
    assert spans[1].attributes[semconv.DB_QUERY_TEXT] == (
        "DELETE FROM users WHERE id IN ($1, $2, $3)")


def test_server_role_is_skipped() -> None:
    spans, asm = run(load("simple"), role=ROLE_SERVER)
    assert spans == [] and asm.stats.unknown_protocol == 0


def test_ssl_accepted_marks_connection_encrypted() -> None:
    ssl = struct.pack(">ii", 8, pg.SSL_REQUEST)
    tls = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(100)
    q = load("simple")[4]
    spans, asm = run([(ssl, b"S"), (tls, b"\x16\x03\x03\x00\x7a"), q], conn_id=900)
    assert spans == []
    assert asm.stats.unknown_protocol == 0
    # Another connection of the same process is unaffected.
    spans, _ = run([q], conn_id=901)
    assert len(spans) == 1


def test_ssl_refused_then_startup() -> None:
    ex = load("simple")
    assert ex[0][1] == b"N"
    spans, _ = run(ex[:2])
    assert spans == []


def test_truncated_query_still_a_span() -> None:
    long_q = "SELECT * FROM big WHERE note = '" + "x" * 3000 + "'"
    body = long_q.encode() + b"\0"
    req = b"Q" + struct.pack(">i", len(body) + 4) + body
    resp = b"C\x00\x00\x00\rSELECT 0\x00Z\x00\x00\x00\x05I"
    spans, _ = run([(req, resp)], req_cap=1024)
    assert len(spans) == 1
    s = spans[0]
    assert s.attributes[semconv.BRIDGE_TRUNCATED] is True
    assert s.name == "SELECT big"
    assert s.attributes[semconv.DB_QUERY_TEXT] == "SELECT * FROM big WHERE note = ?"


def test_truncated_bind_execute_past_capture() -> None:
    # A Bind with a large parameter pushes the Execute past the capture limit.
    parse_body = b"\0INSERT INTO blobs VALUES ($1)\0\0\0"
    param = b"y" * 5000
    bind_body = b"\0\0" + b"\0\0" + b"\0\x01" + struct.pack(">i", len(param)) + param + b"\0\0"
    req = (b"P" + struct.pack(">i", len(parse_body) + 4) + parse_body
           + b"B" + struct.pack(">i", len(bind_body) + 4) + bind_body
           + b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00S\x00\x00\x00\x04")
    resp = b"1\x00\x00\x00\x042\x00\x00\x00\x04C\x00\x00\x00\x0fINSERT 0 1\x00Z\x00\x00\x00\x05I"
    spans, _ = run([(req, resp)])
    assert [s.name for s in spans] == ["INSERT blobs"]
    assert spans[0].attributes[semconv.BRIDGE_TRUNCATED] is True


def test_large_result_response_truncated() -> None:
    cell = struct.pack(">i", 100) + b"r" * 100
    row = b"D" + struct.pack(">i", 4 + 2 + len(cell)) + b"\x00\x01" + cell
    resp = row * 20 + b"C\x00\x00\x00\x0eSELECT 20\x00Z\x00\x00\x00\x05I"
    req = b"Q" + struct.pack(">i", 4 + len(b"SELECT * FROM wide_t\0")) + b"SELECT * FROM wide_t\0"
    spans, _ = run([(req, resp)])
    assert len(spans) == 1 and spans[0].status == StatusCode.UNSET


def test_error_in_batch_skips_later_executes() -> None:
    def parse(q: bytes) -> bytes:
        b = b"\0" + q + b"\0\0\0"
        return b"P" + struct.pack(">i", len(b) + 4) + b
    bind = b"B\x00\x00\x00\x0c\x00\x00\x00\x00\x00\x00\x00\x00"
    exe = b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00"
    req = (parse(b"SELECT 1") + bind + exe + parse(b"SELECT * FROM nope") + bind + exe
           + parse(b"SELECT 3") + bind + exe + b"S\x00\x00\x00\x04")
    err = b"SERROR\0C42P01\0Mrelation does not exist\0\0"
    resp = (b"1\x00\x00\x00\x042\x00\x00\x00\x04C\x00\x00\x00\x0dSELECT 1\x00"
            + b"E" + struct.pack(">i", len(err) + 4) + err + b"Z\x00\x00\x00\x05I")
    spans, _ = run([(req, resp)])
    assert [s.name for s in spans] == ["SELECT", "SELECT nope"]
    assert spans[0].status == StatusCode.UNSET
    assert spans[1].status == StatusCode.ERROR
    assert spans[1].attributes[semconv.ERROR_TYPE] == "42P01"


def _msg(t: bytes, body: bytes) -> bytes:
    return t + struct.pack(">i", len(body) + 4) + body


def _parse(name: bytes, q: bytes) -> bytes:
    return _msg(b"P", name + b"\0" + q + b"\0\0\0")


def _bind(portal: bytes, stmt: bytes) -> bytes:
    return _msg(b"B", portal + b"\0" + stmt + b"\0" + b"\0\0\0\0\0\0")


def _execute(portal: bytes, limit: int = 0) -> bytes:
    return _msg(b"E", portal + b"\0" + struct.pack(">i", limit))


SYNC = _msg(b"S", b"")
ROW = _msg(b"D", b"\x00\x01" + struct.pack(">i", 1) + b"7")
SUSPENDED = _msg(b"s", b"")


def _ready(status: bytes) -> bytes:
    return _msg(b"Z", status)


def test_named_portal_executed_in_later_round_trips() -> None:
    # A JDBC fetch-size cursor: Bind to a named portal, Execute with a row limit, then one more
    # Execute(portal, limit) per round trip after each PortalSuspended. An unnamed statement
    # parsed meanwhile must not lend the portal its text.
    first = (_parse(b"", b"SELECT id FROM big_t WHERE k = $1") + _bind(b"C_1", b"")
             + _execute(b"C_1", 2) + SYNC)
    first_resp = (b"1\x00\x00\x00\x042\x00\x00\x00\x04" + ROW * 2 + SUSPENDED
                  + _ready(b"T"))
    other = _parse(b"", b"UPDATE other_t SET v = 1") + _bind(b"", b"") + _execute(b"") + SYNC
    other_resp = (b"1\x00\x00\x00\x042\x00\x00\x00\x04"
                  + _msg(b"C", b"UPDATE 1\0") + _ready(b"T"))
    fetch = _execute(b"C_1", 2) + SYNC
    last_resp = ROW + _msg(b"C", b"SELECT 5\0") + _ready(b"T")
    spans, _ = run([(first, first_resp), (other, other_resp), (fetch, ROW * 2 + SUSPENDED
                                                                + _ready(b"T")),
                    (fetch, last_resp)])
    assert [s.name for s in spans] == ["SELECT big_t", "UPDATE other_t", "SELECT big_t",
                                       "SELECT big_t"]
    assert spans[3].attributes[semconv.DB_QUERY_TEXT] == "SELECT id FROM big_t WHERE k = $1"


def test_unknown_portal_has_no_text() -> None:
    # The Bind happened before the capture started; the unnamed statement is known, yet the
    # portal's statement is not: missing, not wrong.
    prep = _parse(b"", b"SELECT 1 FROM t1") + _bind(b"", b"") + _execute(b"") + SYNC
    resp = b"1\x00\x00\x00\x042\x00\x00\x00\x04" + _msg(b"C", b"SELECT 1\0") + _ready(b"T")
    spans, _ = run([(prep, resp), (_execute(b"C_9", 10) + SYNC,
                                   ROW + _msg(b"C", b"SELECT 1\0") + _ready(b"T"))])
    assert [s.name for s in spans] == ["SELECT t1", "postgresql"]
    assert semconv.DB_QUERY_TEXT not in spans[1].attributes


def test_portal_dropped_on_close_sync_and_transaction_end() -> None:
    q = b"SELECT a FROM t2"
    closed = (_parse(b"s1", q) + _bind(b"C_1", b"s1") + _execute(b"C_1", 1) + SYNC
              + _msg(b"C", b"PC_1\0") + SYNC)
    fe = pg.parse_frontend(closed, len(closed))
    assert fe.commands[0].query == q.decode() and fe.portals == {}
    # Flush-separated round trips keep the unnamed portal until the Sync.
    bound = _parse(b"", q) + _bind(b"", b"") + _msg(b"H", b"")
    fe = pg.parse_frontend(bound, len(bound))
    assert fe.portals == {"": (q.decode(), False)}
    later = _execute(b"") + SYNC
    fe2 = pg.parse_frontend(later, len(later), {}, fe.portals)
    assert fe2.commands[0].query == q.decode() and fe2.portals == {}
    # Back to idle (commit): named portals are gone on the server, and from the agent's memory.
    open_ = _parse(b"", q) + _bind(b"C_2", b"") + _execute(b"C_2", 1) + SYNC
    spans, _ = run([(open_, ROW + SUSPENDED + _ready(b"T")),
                    (_msg(b"Q", b"COMMIT\0"), _msg(b"C", b"COMMIT\0") + _ready(b"I")),
                    (_execute(b"C_2", 1) + SYNC, _ready(b"I"))])
    assert [s.name for s in spans] == ["SELECT t2", "COMMIT", "postgresql"]


def test_statement_closed_and_reprepared_in_one_exchange() -> None:
    first = _parse(b"s1", b"SELECT 1 FROM old_t") + SYNC
    again = (_msg(b"C", b"Ss1\0") + _parse(b"s1", b"SELECT 2 FROM new_t") + _bind(b"", b"s1")
             + _execute(b"") + SYNC)
    resp = (b"3\x00\x00\x00\x041\x00\x00\x00\x042\x00\x00\x00\x04"
            + _msg(b"C", b"SELECT 1\0") + _ready(b"I"))
    spans, _ = run([(first, b"1\x00\x00\x00\x04" + _ready(b"I")), (again, resp),
                    (_bind(b"", b"s1") + _execute(b"") + SYNC, resp[10:])])
    assert [s.name for s in spans] == ["SELECT new_t", "SELECT new_t"]


def test_parent_and_business_context_flow_like_http() -> None:
    q, resp = load("simple")[4]
    spans: list[SpanRecord] = []
    asm = SpanAssembler(FakeProcs(), spans.append, ids=IdSource(bytes(range(24))))
    asm.add_protocol(postgres_spans.detect, postgres_spans.build)
    asm.on_exchange(ex_of(q, resp, n=5, parent=3))
    assert spans == [] and asm.waiting == 1  # waits for its server span
    asm.flush()
    assert spans[0].parent_span_id == asm.ids.span_id(3)
    assert spans[0].trace_id == asm.ids.trace_id(3)


@pytest.mark.parametrize("data", [
    b"", b"Q", b"Q\x00\x00", b"Q\x00\x00\x00\x03x", b"Q\xff\xff\xff\xffabc", b"Z\x00\x00\x00\x05I",
    b"\x00\x00\x00\x08\x04\xd2\x16", b"\x00\x00\x00\x05\x00\x03\x00\x00", b"GET / HTTP/1.1\r\n",
    b"*1\r\n$4\r\nPING\r\n", b"\x21\x00\x00\x00\x03SELECT 1",  # redis, mysql COM_QUERY
    b"Q\x00\x00\x00\x10SELECT 1\x00",  # claims more than was sent
])
def test_malformed_is_not_postgres(data: bytes) -> None:
    assert not pg.looks_like_frontend(data, len(data))
    spans, asm = run([(data, b"garbage")])
    assert not [s for s in spans if semconv.DB_SYSTEM_NAME in s.attributes]
    assert asm.stats.parse_errors == 0


def test_mysql_handshake_response_is_not_postgres() -> None:
    # 3-byte LE length 0x50 ('P'), seq 1, capability flags...: must not pass as Parse.
    pkt = b"\x50\x00\x00\x01\x8d\xa6\xff\x09" + bytes(76)
    assert not pg.looks_like_frontend(pkt, len(pkt))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=300), st.integers(0, 2000))
def test_random_bytes_never_raise(req: bytes, resp: bytes, extra: int) -> None:
    pg.looks_like_frontend(req, len(req) + extra)
    fe = pg.parse_frontend(req, len(req) + extra)
    pg.match_results(fe, resp)
    spans: list[SpanRecord] = []
    asm = SpanAssembler(FakeProcs(), spans.append)
    asm.add_protocol(postgres_spans.detect, postgres_spans.build)
    asm.on_exchange(ex_of(b"Q" + req, resp))
    asm.on_exchange(ex_of(req, resp))
    assert asm.stats.parse_errors == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([e for f in ("simple", "extended", "prepared", "error")
                                 for e in load(f)]), max_size=8), st.integers(1, 1024))
def test_captured_messages_cut_anywhere(exchanges: list[tuple[bytes, bytes]], cut: int) -> None:
    _spans, asm = run(exchanges, req_cap=cut, resp_cap=cut // 2)
    assert asm.stats.parse_errors == 0


def test_linear_in_input_size() -> None:
    def make(n: int) -> tuple[bytes, bytes]:
        req = b"B\x00\x00\x00\x0c\x00\x00\x00\x00\x00\x00\x00\x00" * n + b"S\x00\x00\x00\x04"
        resp = b"2\x00\x00\x00\x04" * n + b"Z\x00\x00\x00\x05I"
        return req, resp

    def parse(req: bytes, resp: bytes) -> None:
        pg.match_results(pg.parse_frontend(req, len(req)), resp)

    assert_linear(parse, make, 200)
