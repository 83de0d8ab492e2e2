"""Redis: the RESP parser and the span builder, on bytes captured from a real redis-server
(tests/fixtures_capture/capture_redis.py) and hand-made edge cases."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge import _abi
from kernel_side import semconv
from kernel_side.assembly import IdSource, SpanAssembler
from kernel_side.events import ROLE_CLIENT, ROLE_SERVER, Exchange
from kernel_side.model import SpanKind, SpanRecord, StatusCode
from kernel_side.protocols import redis, redis_spans
from kernel_side.protocols.registry import register_all
from tests.unit.test_assembly import SALT, FakeProcs, make_ex

FIX = Path(__file__).resolve().parent / "fixtures" / "redis"
REQ_CAP = 1024
RESP_CAP = 512


def fixture(name: str) -> tuple[bytes, bytes]:
    return (FIX / f"{name}.req").read_bytes(), (FIX / f"{name}.resp").read_bytes()


def pack(*args: str | bytes) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for a in args:
        raw = a.encode() if isinstance(a, str) else a
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


def redis_ex(request: bytes, response: bytes, **kw: object) -> Exchange:
    """A client exchange as the kernel captures it: the first bytes of each direction, the
    totals as sent."""
    kw.setdefault("role", ROLE_CLIENT)
    kw.setdefault("peer_port", 6379)
    kw.setdefault("peer_address", "10.0.0.9")
    return make_ex(request[:REQ_CAP], response[:RESP_CAP], req_bytes=len(request),
                   resp_bytes=len(response), **kw)  # type: ignore[arg-type]


class Run:
    """An assembler with the registry's protocols, collecting spans."""

    def __init__(self) -> None:
        self.spans: list[SpanRecord] = []
        self.asm = SpanAssembler(FakeProcs(), self.spans.append, ids=IdSource(SALT))
        register_all(self.asm)

    def __call__(self, ex: Exchange) -> list[SpanRecord]:
        before = len(self.spans)
        self.asm.on_exchange(ex)
        return self.spans[before:]


def run(name: str, **kw: object) -> list[SpanRecord]:
    req, resp = fixture(name)
    return Run()(redis_ex(req, resp, **kw))


# -- parser: requests ---------------------------------------------------------------------------


def test_commands_pipeline_from_real_bytes() -> None:
    req, _ = fixture("pipeline")
    cmds = redis.parse_commands(req)
    assert [(c.name, c.argc, c.complete) for c in cmds] == [
        ("SET", 2, True), ("INCR", 1, True), ("GET", 1, True), ("GET", 1, True),
        ("DEL", 1, True)]
    assert cmds[0].args == (b"a", b"1")


def test_inline_commands_with_quotes() -> None:
    req, _ = fixture("inline")
    cmds = redis.parse_commands(req)
    assert [(c.name, c.argc, c.inline) for c in cmds] == [
        ("PING", 0, True), ("SET", 2, True), ("GET", 1, True)]
    assert cmds[1].args == (b"ik", b"two words")


def test_command_cut_by_capture_keeps_name_and_claimed_argc() -> None:
    req, _ = fixture("big_value")  # SET big <2000 bytes>; GET big
    cmds = redis.parse_commands(req[:REQ_CAP])
    assert [(c.name, c.argc, c.complete) for c in cmds] == [("SET", 2, False)]
    assert redis.parse_commands(b"*3\r\n$3\r\nSE") == []  # name itself cut: nothing to name


def test_huge_claimed_lengths_cost_nothing() -> None:
    assert redis.parse_commands(b"*2\r\n$3\r\nGET\r\n$999999999999\r\nab") == [
        redis.RedisCommand("GET", 1, (), False)]
    assert redis.parse_commands(b"*99999999999\r\n$4\r\nPING\r\n") == [
        redis.RedisCommand("PING", 99999999998, (), False)]
    reply = redis.parse_replies(b"$999999999999\r\nabc")
    assert reply == [redis.RedisReply("bulk", False)]
    assert redis.parse_replies(b"*999999999999\r\n:1\r\n")[0].complete is False


@pytest.mark.parametrize("data", [
    b"", b"*", b"*x\r\n", b"*-1\r\n", b"*1\r\n:1\r\n", b"*1\r\n$-1\r\n", b"*1\r\n$3\r\nGETxx",
    b"*1\r\n$3\r\n\x00\x01\x02\r\n", b"howdy world\r\n", b"\xff\xfe\r\n", b"GET",
])
def test_request_garbage_gives_no_commands(data: bytes) -> None:
    assert redis.parse_commands(data) == []


def test_garbage_after_good_commands_ends_the_list() -> None:
    cmds = redis.parse_commands(pack("GET", "a") + b"\x00garbage" + pack("GET", "b"))
    assert [c.name for c in cmds] == ["GET"]


# -- parser: replies ----------------------------------------------------------------------------


def test_resp3_types_from_real_bytes() -> None:
    kinds = {name: [r.kind for r in redis.parse_replies(fixture(name)[1])]
             for name in ("hello3", "resp3_hgetall", "resp3_smembers", "resp3_double",
                          "resp3_push", "resp2_hgetall", "get_missing")}
    assert kinds == {
        "hello3": ["map"], "resp3_hgetall": ["map"], "resp3_smembers": ["set"],
        "resp3_double": ["double"], "resp3_push": ["simple", "push", "bulk"],
        "resp2_hgetall": ["array"], "get_missing": ["null"],
    }
    hello = redis.parse_replies(fixture("hello3")[1])[0]
    assert len(hello.items) == 14 and hello.complete


def test_every_resp3_type() -> None:
    data = (b"_\r\n#t\r\n(3492890328409238509324850943850943825024385\r\n"
            b"!21\r\nSYNTAX invalid syntax\r\n=15\r\ntxt:Some string\r\n"
            b"|1\r\n+key-popularity\r\n%1\r\n$1\r\na\r\n,0.19\r\n"
            b"*2\r\n:1\r\n*-1\r\n")
    replies = redis.parse_replies(data)
    assert [r.kind for r in replies] == [
        "null", "boolean", "bignumber", "error", "verbatim", "attribute", "array"]
    assert replies[3].error == "SYNTAX"
    assert replies[5].out_of_band
    assert [i.kind for i in replies[6].items] == ["integer", "null"]


def test_errors_and_prefixes() -> None:
    replies = redis.parse_replies(fixture("exec_abort")[1])
    assert [r.error for r in replies] == [None, "ERR", None, "EXECABORT"]
    assert redis.error_prefix("lowercase message") == "ERR"
    assert redis.parse_replies(b"-WRONGTYPE Oper")[0].error == "WRONGTYPE"


def test_truncated_reply_pairs_but_is_incomplete() -> None:
    _, resp = fixture("lrange")
    replies = redis.parse_replies(resp[:RESP_CAP])
    assert len(replies) == 1 and replies[0].kind == "array" and not replies[0].complete


def test_deep_nesting_is_iterative() -> None:
    deep = b"*1\r\n" * 50_000 + b":1\r\n"
    assert redis.parse_replies(deep) == []  # deeper than any real reply: garbage, no recursion


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_raise(data: bytes) -> None:
    redis.parse_commands(data)
    redis.parse_replies(data)
    redis.looks_like_command(data)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([
    b"*", b"$", b"%", b"~", b">", b"|", b"!", b"=", b"+", b"-", b":", b"_", b",", b"#", b"(",
    b"1", b"2", b"-1", b"0", b"\r\n", b"OK", b"GET", b"x",
]), max_size=80))
def test_resp_shaped_noise_never_raises(parts: list[bytes]) -> None:
    data = b"".join(parts)
    redis.parse_commands(data)
    redis.parse_replies(data)
    Run()(redis_ex(b"*1\r\n$4\r\nPING\r\n" + data, data))


# -- detection ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "expected"), [
    (pack("GET", "a"), True), (b"PING\r\n", True), (b"ping\r\n", True),
    (b"SET a b\r\n", True), (b"*1\r\n:1\r\n", False), (b"HELO example.com\r\n", False),
    (b"\x16\x03\x01", False), (b"", False), (b"*", False),
])
def test_detect_by_content(data: bytes, expected: bool) -> None:
    assert redis_spans.detect(make_ex(data, b"", role=ROLE_CLIENT)) is expected


# -- spans --------------------------------------------------------------------------------------


def test_single_command_span() -> None:
    (span,) = run("set")
    assert span.name == "SET" and span.kind == SpanKind.CLIENT
    assert span.attributes[semconv.DB_SYSTEM_NAME] == "redis"
    assert span.attributes[semconv.DB_OPERATION_NAME] == "SET"
    assert span.attributes[semconv.DB_QUERY_TEXT] == "SET ? ?"
    assert span.attributes[semconv.DB_NAMESPACE] == "0"
    assert span.attributes[semconv.SERVER_ADDRESS] == "10.0.0.9"
    assert span.attributes[semconv.SERVER_PORT] == 6379
    assert span.status == StatusCode.UNSET
    assert semconv.BRIDGE_TRUNCATED not in span.attributes
    assert "alice" not in str(span.attributes)


def test_pipeline_one_span_per_command_sharing_timing() -> None:
    spans = run("pipeline")
    assert [s.name for s in spans] == ["SET", "INCR", "GET", "GET", "DEL"]
    assert len({s.span_id for s in spans}) == 5
    assert len({s.trace_id for s in spans}) == 5  # unrelated operations: a trace each
    assert {(s.start_ns, s.end_ns) for s in spans} == {(spans[0].start_ns, spans[0].end_ns)}
    assert all(s.status == StatusCode.UNSET for s in spans)


def test_error_reply() -> None:
    (span,) = run("wrongtype")
    assert span.status == StatusCode.ERROR
    assert span.attributes[semconv.ERROR_TYPE] == "WRONGTYPE"
    assert span.attributes[semconv.DB_RESPONSE_STATUS_CODE] == "WRONGTYPE"
    assert span.attributes[semconv.DB_QUERY_TEXT] == "LPUSH ? ?"


def test_error_message_does_not_leak_arguments() -> None:
    (span,) = run("unknown_command")
    assert span.name == "FOO" and span.attributes[semconv.ERROR_TYPE] == "ERR"
    assert "secret" not in span.status_message and "secret" not in str(span.attributes)


def test_multi_exec_maps_exec_results_to_queued_commands() -> None:
    spans = run("multi_exec")
    assert [s.name for s in spans] == ["MULTI", "SET", "INCR", "LPUSH", "EXEC"]
    assert [s.status for s in spans] == [StatusCode.UNSET] * 3 + [StatusCode.ERROR,
                                                                   StatusCode.UNSET]
    assert spans[3].attributes[semconv.ERROR_TYPE] == "WRONGTYPE"


def test_exec_abort() -> None:
    spans = run("exec_abort")
    assert [(s.name, s.attributes.get(semconv.ERROR_TYPE)) for s in spans] == [
        ("MULTI", None), ("NOSUCHCMD", "ERR"), ("SET", None), ("EXEC", "EXECABORT")]


def test_select_tracked_per_connection() -> None:
    r = Run()
    spans = r(redis_ex(*fixture("select_get"), exchange_id=1))
    assert [(s.name, s.attributes[semconv.DB_NAMESPACE]) for s in spans] == [
        ("SELECT", "0"), ("GET", "2")]
    assert spans[0].attributes[semconv.DB_QUERY_TEXT] == "SELECT ?"
    same_conn = redis_ex(*fixture("get"), exchange_id=2)
    same_conn.conn_id = 1001  # make_ex derives conn_id from the exchange id: use the first's
    (later,) = r(same_conn)
    assert later.attributes[semconv.DB_NAMESPACE] == "2"
    (other,) = r(redis_ex(*fixture("get"), exchange_id=3))
    assert other.attributes[semconv.DB_NAMESPACE] == "0"


def test_failed_select_and_queued_select() -> None:
    r = Run()
    r(redis_ex(pack("SELECT", "99"), b"-ERR DB index is out of range\r\n", exchange_id=1))
    (get,) = r(redis_ex(pack("GET", "k"), b"$-1\r\n", exchange_id=1))
    assert get.attributes[semconv.DB_NAMESPACE] == "0"
    txn = pack("MULTI") + pack("SELECT", "3") + pack("GET", "k") + pack("EXEC") + pack("GET", "k")
    spans = r(redis_ex(txn, b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n+OK\r\n$-1\r\n$-1\r\n",
                       exchange_id=1))
    assert [s.attributes[semconv.DB_NAMESPACE] for s in spans] == ["0", "0", "3", "0", "3"]


def test_resp3_push_is_skipped_when_pairing() -> None:
    spans = run("resp3_push")
    assert [(s.name, s.status) for s in spans] == [("SET", StatusCode.UNSET),
                                                  ("GET", StatusCode.UNSET)]
    spans = Run()(redis_ex(pack("GET", "a") + pack("LPUSH", "a", "b"),
                           b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\na\r\n$1\r\nx\r\n"
                           b"-WRONGTYPE Operation\r\n"))
    assert [s.status for s in spans] == [StatusCode.UNSET, StatusCode.ERROR]


def test_hello_and_client_setinfo_are_commands() -> None:
    (hello,) = run("hello3")
    assert hello.name == "HELLO" and hello.attributes[semconv.DB_QUERY_TEXT] == "HELLO ?"
    spans = run("client_setinfo")  # redis 7.0 does not know SETINFO: an error, as redis-py sees
    assert [s.attributes[semconv.DB_QUERY_TEXT] for s in spans] == ["CLIENT SETINFO ? ?"] * 2
    assert all(s.attributes[semconv.ERROR_TYPE] == "ERR" for s in spans)


def test_truncated_capture() -> None:
    spans = run("big_value")  # SET big <2000 bytes> cut at 1024: GET big never captured
    assert [s.name for s in spans] == ["SET"]
    assert spans[0].attributes[semconv.BRIDGE_TRUNCATED] is True
    assert spans[0].attributes[semconv.DB_QUERY_TEXT] == "SET ? ?"
    (lr,) = run("lrange")  # reply cut at 512: the command is whole
    assert semconv.BRIDGE_TRUNCATED not in lr.attributes and lr.status == StatusCode.UNSET


def test_long_pipeline_cut_by_capture() -> None:
    req = b"".join(pack("INCR", f"counter:{i}") for i in range(100))
    resp = b"".join(b":%d\r\n" % i for i in range(100))
    spans = Run()(redis_ex(req, resp))
    assert 20 < len(spans) < 100
    assert all(s.name == "INCR" for s in spans)
    assert all(semconv.BRIDGE_TRUNCATED not in s.attributes for s in spans[:-1])


def test_many_arguments_are_summarised() -> None:
    req = pack("MSET", *[f"k{i}" for i in range(200)])
    (span,) = Run()(redis_ex(req, b"+OK\r\n"))
    text = span.attributes[semconv.DB_QUERY_TEXT]
    assert isinstance(text, str) and text.startswith("MSET ? ?") and text.endswith("...")
    assert text.count("?") == redis_spans.MAX_PLACEHOLDERS


def test_server_side_is_skipped_without_counting() -> None:
    r = Run()
    assert r(redis_ex(*fixture("set"), role=ROLE_SERVER)) == []
    assert r.asm.stats.unknown_protocol == 0 and r.asm.stats.parse_errors == 0


def test_business_context_and_parent_like_http() -> None:
    ctx = _abi.pack_value(_abi.encode_attrs({"tenant_id": "acme"}))
    r = Run()
    (srv,) = r(make_ex(exchange_id=10, ctx=ctx))
    (cli,) = r(redis_ex(*fixture("get"), exchange_id=11, parent_exchange_id=10, ctx=ctx))
    assert cli.attributes["tenant_id"] == "acme"
    assert cli.parent_span_id == srv.span_id and cli.trace_id == srv.trace_id


def test_unparseable_request_counts_unknown() -> None:
    r = Run()
    assert r(redis_ex(b"*1\r\n$4\r\n\x00\x00\x00\x00\r\n", b"")) == []
    assert r.asm.stats.unknown_protocol == 1
