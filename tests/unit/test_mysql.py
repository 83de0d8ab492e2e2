"""MySQL / MariaDB: parser and span building from exchanges captured off a real MariaDB server
(tests/fixtures_capture/capture_mysql.py), plus malformed, truncated and random bytes."""

from __future__ import annotations

import json
import struct
import time
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_side import semconv
from kernel_side.assembly import IdSource, SpanAssembler
from kernel_side.events import ROLE_CLIENT, ROLE_SERVER, Exchange
from kernel_side.model import Resource, SpanKind, SpanRecord, StatusCode
from kernel_side.protocols import mysql, mysql_spans
from tests.unit._work import assert_linear

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mysql"


class FakeProcs:
    def resource_for(self, tgid: int) -> Resource:
        return Resource((tgid, 1), {semconv.SERVICE_NAME: "app"})

    def listen_port(self, tgid: int, fd: int) -> int | None:
        return None


def assembler() -> tuple[SpanAssembler, list[SpanRecord]]:
    out: list[SpanRecord] = []
    asm = SpanAssembler(FakeProcs(), out.append, ids=IdSource(bytes(24)))
    asm.add_protocol(mysql_spans.detect, mysql_spans.build)
    return asm, out


_ids = iter(range(1, 1 << 40))


def ex(request: bytes, response: bytes = b"", *, conn_id: int = 1, role: int = ROLE_CLIENT,
       req_bytes: int | None = None, resp_bytes: int | None = None) -> Exchange:
    return Exchange(
        tgid=10, fd=5, role=role, peer_address="127.0.0.1", peer_port=3306, listen_fd=0,
        req_tid=10, resp_tid=10, conn_id=conn_id, exchange_id=next(_ids), parent_exchange_id=0,
        req_start_ns=1_000, req_end_ns=2_000, resp_start_ns=3_000, resp_end_ns=4_000,
        req_bytes=len(request) if req_bytes is None else req_bytes,
        resp_bytes=len(response) if resp_bytes is None else resp_bytes,
        req_calls=1, resp_calls=1, request=request, response=response, ctx=None)


@cache
def fixture(name: str) -> list[list[dict[str, Any]]]:
    data = json.loads((FIXTURES / f"{name}.json").read_text())
    return data["connections"]  # type: ignore[no-any-return]


def exchanges(name: str) -> list[Exchange]:
    out = []
    for i, conn in enumerate(fixture(name)):
        for e in conn:
            out.append(ex(bytes.fromhex(e["request"]), bytes.fromhex(e["response"]),
                          conn_id=1000 + i, req_bytes=e["req_bytes"],
                          resp_bytes=e["resp_bytes"]))
    return out


def run(name: str) -> tuple[SpanAssembler, list[SpanRecord]]:
    asm, out = assembler()
    for e in exchanges(name):
        asm.on_exchange(e)
    assert asm.stats.parse_errors == 0
    assert asm.stats.unknown_protocol == 0
    return asm, out


def pkt(payload: bytes, seq: int = 0) -> bytes:
    return struct.pack("<I", len(payload))[:3] + bytes([seq]) + payload


OK = pkt(b"\x00\x00\x00\x02\x00\x00\x00", 1)


def err(code: int, msg: bytes = b"boom", seq: int = 1) -> bytes:
    return pkt(b"\xff" + struct.pack("<H", code) + b"#42S02" + msg, seq)


# --- real captures ---------------------------------------------------------------------------


def test_pymysql_queries_errors_and_namespace() -> None:
    _, spans = run("pymysql")
    assert all(s.kind == SpanKind.CLIENT for s in spans)
    names = [s.name for s in spans]
    assert names == ["SET", "CREATE", "USE", "CREATE orders", "INSERT orders", "SELECT orders",
                     "SELECT missing_table", "SELECT db", "SELECT shop.orders", "SET",
                     "UPDATE orders"]
    by_name = {s.name: s for s in spans}
    ins = by_name["INSERT orders"].attributes
    assert ins[semconv.DB_SYSTEM_NAME] == "mysql"
    assert ins[semconv.DB_NAMESPACE] == "shop"  # from USE shop (COM_QUERY)
    assert ins[semconv.DB_QUERY_TEXT] == "INSERT INTO orders VALUES (?, ?, ?)"
    assert ins[semconv.DB_OPERATION_NAME] == "INSERT"
    assert ins[semconv.DB_COLLECTION_NAME] == "orders"
    assert ins[semconv.SERVER_ADDRESS] == "127.0.0.1"
    assert ins[semconv.SERVER_PORT] == 3306
    assert "acme" not in str(by_name["SELECT orders"].attributes[semconv.DB_QUERY_TEXT])
    bad = by_name["SELECT missing_table"]
    assert bad.status == StatusCode.ERROR
    assert bad.attributes[semconv.DB_RESPONSE_STATUS_CODE] == "1146"
    assert bad.attributes[semconv.ERROR_TYPE] == "1146"
    assert "missing_table" in bad.status_message
    assert by_name["SELECT db"].attributes[semconv.DB_NAMESPACE] == "mysql"  # COM_INIT_DB
    long = by_name["SELECT shop.orders"].attributes
    assert long[semconv.BRIDGE_TRUNCATED] is True
    assert "tenant-" not in str(long[semconv.DB_QUERY_TEXT])
    assert all(semconv.BRIDGE_TRUNCATED not in s.attributes for s in spans if s.name != "SELECT "
               "shop.orders")
    # The second connection named its database in the handshake.
    assert spans[-1].attributes[semconv.DB_NAMESPACE] == "shop"
    assert spans[-2].attributes[semconv.DB_NAMESPACE] == "shop"
    assert all(s.status == StatusCode.UNSET for s in spans if s is not bad)


def test_binary_protocol_prepared_statements() -> None:
    _, spans = run("binary")
    names = [s.name for s in spans]
    assert names == ["SET", "SELECT orders", "SELECT orders", "INSERT orders", "DELETE orders",
                     "SELECT nope"]
    sel = spans[1].attributes
    assert sel[semconv.DB_QUERY_TEXT] == "SELECT id, total FROM orders WHERE id = ? AND tenant = ?"
    # COM_STMT_CLOSE rode along with the next COM_STMT_EXECUTE; the execute still maps back.
    assert spans[3].attributes[semconv.DB_QUERY_TEXT] == (
        "INSERT INTO orders (id, tenant, total) VALUES (?, ?, ?)")
    refused = spans[-1]
    assert refused.status == StatusCode.ERROR
    assert refused.attributes[semconv.DB_RESPONSE_STATUS_CODE] == "1146"
    # Distinct span ids within and across exchanges.
    assert len({s.span_id for s in spans}) == len(spans)


CONNECTOR_INSERT = "INSERT INTO typed (id, n, f, d, t, b, s) VALUES (?, ?, ?, ?, ?, ?, ?)"
CONNECTOR_SELECT = "SELECT id, n, s FROM typed WHERE id >= ? AND (s = ? OR s IS NULL)"


def test_connector_python_server_side_prepared_statements() -> None:
    # mysql-connector-python, cursor(prepared=True): COM_STMT_RESET before every execute,
    # COM_STMT_CLOSE riding along with the next prepare, NULL bitmaps and typed parameters.
    _, spans = run("connector")
    names = [s.name for s in spans]
    assert names == ["SET", "SET", "CREATE typed", "DELETE typed"] + ["INSERT typed"] * 3 + [
        "SELECT typed"] * 3 + ["INSERT typed", "SELECT nope"]
    texts = [s.attributes.get(semconv.DB_QUERY_TEXT) for s in spans[4:10]]
    assert texts == [CONNECTOR_INSERT] * 3 + [CONNECTOR_SELECT] * 3
    for s in spans[4:10]:
        assert s.status == StatusCode.UNSET
        assert s.attributes[semconv.DB_NAMESPACE] == "shop"  # from the handshake
        assert s.attributes[semconv.DB_OPERATION_NAME] in ("INSERT", "SELECT")
        assert semconv.BRIDGE_TRUNCATED not in s.attributes
    dup, refused = spans[10], spans[11]
    assert dup.attributes[semconv.DB_QUERY_TEXT] == CONNECTOR_INSERT  # refused at execute
    assert dup.status == StatusCode.ERROR and dup.attributes[semconv.ERROR_TYPE] == "1062"
    assert refused.status == StatusCode.ERROR and refused.attributes[semconv.ERROR_TYPE] == "1146"
    assert {s.attributes[semconv.DB_SYSTEM_NAME] for s in spans} == {"mysql"}


class FakePeers:
    def __init__(self, exe: str | None) -> None:
        self.exe = exe
        self.calls: list[tuple[int, int, str, int]] = []

    def server_executable(self, tgid: int, fd: int, address: str, port: int) -> str | None:
        self.calls.append((tgid, fd, address, port))
        return self.exe


@pytest.mark.parametrize(("exe", "system"), [
    ("mariadbd", "mariadb"), ("mysqld", "mysql"), (None, "mysql"), ("proxysql", "mysql")])
def test_local_server_executable_names_the_vendor(exe: str | None, system: str) -> None:
    # mysql-connector-python's handshake does not tell MariaDB; the local server process does.
    peers = FakePeers(exe)
    out: list[SpanRecord] = []
    asm = SpanAssembler(FakeProcs(), out.append, ids=IdSource(bytes(24)), peers=peers)
    asm.add_protocol(mysql_spans.detect, mysql_spans.build)
    for e in exchanges("connector"):
        asm.on_exchange(e)
    assert len(out) == 12
    assert {s.attributes[semconv.DB_SYSTEM_NAME] for s in out} == {system}
    assert peers.calls == [(10, 5, "127.0.0.1", 3306)]  # once per connection


def greeting(version: bytes) -> bytes:
    """A HandshakeV10 packet as a server sends it first (sequence id 0)."""
    body = (bytes([10]) + version + b"\0" + struct.pack("<I", 7) + b"abcdefgh\0"
            + b"\xff\xf7\x08\x02\x00\xff\x81\x15" + bytes(10) + b"ijklmnopqrst\0"
            + b"mysql_native_password\0")
    return len(body).to_bytes(3, "little") + b"\0" + body


@pytest.mark.parametrize(("version", "system"), [
    (b"5.5.5-10.11.6-MariaDB-0+deb12u1", "mariadb"), (b"8.0.36", "mysql"),
    (b"11.4.2-MariaDB-log", "mariadb")])
def test_the_greeting_names_the_vendor_without_any_lookup(version: bytes, system: str) -> None:
    # The kernel hands the server's first bytes over as an exchange with no request.
    peers = FakePeers("proxysql")  # would say nothing; it must not even be asked
    out: list[SpanRecord] = []
    asm = SpanAssembler(FakeProcs(), out.append, ids=IdSource(bytes(24)), peers=peers)
    asm.add_protocol(mysql_spans.detect, mysql_spans.build)
    conns = {e.conn_id for e in exchanges("connector")}
    for conn_id in conns:
        asm.on_exchange(ex(b"", greeting(version), conn_id=conn_id))
    assert out == [] and asm.stats.unknown_protocol == 0
    for e in exchanges("connector"):
        asm.on_exchange(e)
    assert len(out) == 12
    assert {s.attributes[semconv.DB_SYSTEM_NAME] for s in out} == {system}
    assert peers.calls == []


@pytest.mark.parametrize("response", [
    b"", b"\x05\x00\x00\x00\x0a", greeting(b"8.0")[:8], b"\x07\x00\x00\x01\x0a8.0\x00xx",
    b"\x07\x00\x00\x00\x098.0\x00xx", b"\x07\x00\x00\x00\x0a8.\x01\x00xx",
    b"SSH-2.0-OpenSSH_9.2p1\r\n"])
def test_what_is_not_a_greeting_is_left_alone(response: bytes) -> None:
    assert mysql.parse_greeting(response) is None
    asm, out = assembler()
    asm.on_exchange(ex(b"", response))
    assert out == [] and asm.stats.parse_errors == 0 and asm.stats.unknown_protocol == 1


def test_mariadb_cli_is_recognised_as_mariadb() -> None:
    _, spans = run("cli")
    assert {s.attributes[semconv.DB_SYSTEM_NAME] for s in spans} == {"mariadb"}
    names = [s.name for s in spans]
    assert names == ["SELECT", "SELECT orders", "PREPARE", "SET", "EXECUTE", "DEALLOCATE"]
    assert spans[1].attributes[semconv.DB_NAMESPACE] == "shop"  # COM_INIT_DB from `USE shop`
    assert semconv.DB_NAMESPACE not in spans[0].attributes


def test_handshake_parsing() -> None:
    first = exchanges("pymysql")[0]
    assert mysql.looks_like_handshake_response(first.request, first.response)
    assert not mysql.looks_like_command(first.request, first.req_bytes, first.response)
    hs = mysql.parse_handshake_response(first.request)
    assert hs is not None and hs.username == "root" and hs.database is None and not hs.mariadb
    with_db = exchanges("pymysql")[13]
    hs = mysql.parse_handshake_response(with_db.request)
    assert hs is not None and hs.database == "shop" and hs.auth_plugin
    cli = mysql.parse_handshake_response(exchanges("cli")[0].request)
    assert cli is not None and cli.mariadb and not cli.ssl


def test_server_role_makes_no_spans() -> None:
    asm, out = assembler()
    asm.on_exchange(ex(pkt(b"\x03SELECT 1"), OK, role=ROLE_SERVER))
    assert out == []
    assert asm.stats.unknown_protocol == 0


# --- hand-built edge cases --------------------------------------------------------------------


def test_mariadb_execute_last_prepared_and_unknown_statement() -> None:
    asm, out = assembler()
    prep_ok = pkt(b"\x00" + struct.pack("<IHH", 9, 0, 0) + b"\x00\x00\x00", 1)
    asm.on_exchange(ex(pkt(b"\x16DELETE FROM t WHERE id = ?"), prep_ok))
    asm.on_exchange(ex(pkt(b"\x17" + b"\xff\xff\xff\xff" + b"\x00\x01\x00\x00\x00"), OK))
    asm.on_exchange(ex(pkt(b"\x17" + struct.pack("<I", 77) + b"\x00\x01\x00\x00\x00"), OK))
    assert [s.name for s in out] == ["DELETE t", "mysql"]
    assert semconv.DB_QUERY_TEXT not in out[1].attributes
    # Another connection does not see this connection's statements.
    asm.on_exchange(ex(pkt(b"\x17" + struct.pack("<I", 9) + b"\x00\x01\x00\x00\x00"), OK,
                       conn_id=2))
    assert out[-1].name == "mysql"


def test_pipelined_commands_get_their_own_replies() -> None:
    asm, out = assembler()
    req = pkt(b"\x03SELECT a FROM x") + pkt(b"\x03SELECT b FROM y")
    asm.on_exchange(ex(req, OK + err(1064)))
    assert [(s.name, s.status) for s in out] == [("SELECT x", StatusCode.UNSET),
                                                ("SELECT y", StatusCode.ERROR)]
    assert out[0].span_id != out[1].span_id


def test_init_db_error_keeps_namespace_and_quit_ping_make_no_span() -> None:
    asm, out = assembler()
    asm.on_exchange(ex(pkt(b"\x02good"), OK))
    asm.on_exchange(ex(pkt(b"\x02bad"), err(1049)))
    asm.on_exchange(ex(pkt(b"\x0e"), OK))
    asm.on_exchange(ex(pkt(b"\x03SELECT 1"), pkt(b"\x01", 1)))
    asm.on_exchange(ex(pkt(b"\x01")))
    assert len(out) == 1 and out[0].attributes[semconv.DB_NAMESPACE] == "good"
    assert out[0].name == "SELECT"


def test_truncated_query_still_makes_a_span() -> None:
    text = b"SELECT * FROM big WHERE note = '" + b"x" * 2000 + b"'"
    full = pkt(b"\x03" + text)
    asm, out = assembler()
    asm.on_exchange(ex(full[:1024], OK, req_bytes=len(full)))
    assert len(out) == 1
    s = out[0]
    assert s.name == "SELECT big" and s.attributes[semconv.BRIDGE_TRUNCATED] is True
    assert "xxx" not in str(s.attributes[semconv.DB_QUERY_TEXT])


def test_no_response_yet_still_makes_a_span() -> None:
    asm, out = assembler()
    asm.on_exchange(ex(pkt(b"\x03UPDATE t SET a = 1")))
    assert [s.name for s in out] == ["UPDATE t"] and out[0].status == StatusCode.UNSET


@pytest.mark.parametrize("data", [
    b"", b"\x00", b"GET / HTTP/1.1\r\n\r\n", b"*1\r\n$4\r\nPING\r\n",
    b"\x00\x00\x00\x08\x04\xd2\x16\x2f",  # Postgres SSLRequest
    pkt(b"\x03SELECT 1", seq=1),  # wrong sequence id
    pkt(b"\x99junk"),  # unknown command
    pkt(b"\x03SELECT 1")[:-1] + b"",  # length larger than everything sent
    b"\x05\x00\x00\x00\x03SEL",  # declares 5, only 4 and nothing more was sent
])
def test_detect_rejects(data: bytes) -> None:
    e = ex(data)
    assert not mysql_spans.detect(e)


def test_detect_rejects_reply_with_wrong_sequence() -> None:
    assert not mysql_spans.detect(ex(pkt(b"\x03SELECT 1"), pkt(b"\x00\x00\x00\x02\x00", 5)))
    assert mysql_spans.detect(ex(pkt(b"\x03SELECT 1"), OK))


def test_parse_reply_kinds() -> None:
    assert mysql.parse_reply([]).kind == "unknown"
    e = mysql.parse_reply(mysql.split_replies(err(1146, b"Table 'x' doesn't exist"))[0])
    assert (e.kind, e.error_code, e.sql_state) == ("err", 1146, "42S02")
    assert e.message == "Table 'x' doesn't exist"
    assert mysql.parse_reply(mysql.split_replies(pkt(b"\xff\x15", 1))[0]).kind == "err"
    rs = mysql.parse_reply(mysql.split_replies(pkt(b"\x03", 1) + pkt(b"def", 2))[0])
    assert (rs.kind, rs.column_count) == ("result_set", 3)
    assert mysql.parse_reply(mysql.split_replies(pkt(b"\xfb/tmp/x", 1))[0]).kind == \
        "local_infile"


def test_ssl_request_makes_the_connection_opaque() -> None:
    caps = mysql.CLIENT_PROTOCOL_41 | mysql.CLIENT_SSL | mysql.CLIENT_MYSQL
    ssl_req = pkt(struct.pack("<IIB", caps, 1 << 24, 45) + bytes(23), seq=1)
    asm, out = assembler()
    asm.on_exchange(ex(ssl_req + b"\x16\x03\x01\x02\x00", b"\x16\x03\x03\x00\x7a"))
    # Inside TLS nothing is parsed, even bytes that happen to look like a command.
    asm.on_exchange(ex(pkt(b"\x03SELECT 1"), OK))
    assert out == []


# --- robustness -------------------------------------------------------------------------------


def test_every_cut_of_every_fixture_is_handled() -> None:
    asm, _ = assembler()
    for name in ("pymysql", "binary", "cli"):
        for e in exchanges(name):
            for cut in range(len(e.request) + 1):
                asm.on_exchange(ex(e.request[:cut], e.response, req_bytes=e.req_bytes))
            for cut in range(0, len(e.response) + 1, 3):
                asm.on_exchange(ex(e.request, e.response[:cut], resp_bytes=e.resp_bytes))
    assert asm.stats.parse_errors == 0


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=200), st.integers(0, 2000))
def test_random_bytes_never_raise(request: bytes, response: bytes, extra: int) -> None:
    mysql.split_packets(request)
    mysql.parse_request(request, mysql.CLIENT_QUERY_ATTRIBUTES)
    mysql.parse_handshake_response(request)
    for group in mysql.split_replies(response):
        for code in (mysql.COM_QUERY, mysql.COM_STMT_PREPARE, mysql.COM_CHANGE_USER):
            mysql.parse_reply(group, code)
    asm, _ = assembler()
    e = ex(request, response, req_bytes=len(request) + extra)
    asm.on_exchange(e)
    # Also as a command with a plausible header, so build() gets exercised on random bodies.
    asm.on_exchange(ex(pkt(b"\x03" + request) + pkt(b"\x17" + request), response))
    asm.on_exchange(ex(pkt(request[:40].ljust(40, b"\0"), seq=1), response))
    assert asm.stats.parse_errors == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=40)),
                max_size=8))
def test_random_packet_streams_never_raise(parts: list[tuple[int, int, bytes]]) -> None:
    request = b"".join(pkt(bytes([c]) + body, seq) for c, seq, body in parts)
    asm, _ = assembler()
    asm.on_exchange(ex(request, request))
    assert asm.stats.parse_errors == 0


def test_parse_is_linear() -> None:
    def parse(data: bytes) -> None:
        mysql.parse_request(data)
        mysql.split_replies(data)

    assert_linear(parse, lambda k: pkt(b"\x19\x01\x00\x00\x00") * k, 100)


def test_microseconds_per_query(capsys: pytest.CaptureFixture[str]) -> None:
    """Not a pass/fail on time: prints the parse + span-build cost of one captured query."""
    e = exchanges("pymysql")[6]  # SELECT ... FROM orders WHERE tenant = 'acme' + result set
    asm, out = assembler()
    n = 3000
    t0 = time.perf_counter()
    for _ in range(n):
        asm.on_exchange(e)
    dt = (time.perf_counter() - t0) / n * 1e6
    assert len(out) == n
    with capsys.disabled():
        print(f"\nmysql parse + span build: {dt:.1f} us per query")
