"""Spans for PostgreSQL client exchanges: one CLIENT span per simple Query and per Execute.

Connection memory (``asm.conn_state``) holds the database named in the StartupMessage, the
prepared statements' SQL (so a later Bind/Execute of a named statement knows its text), the open
portals' SQL (so an Execute of a portal bound in an earlier round trip knows it) and
whether the connection switched to TLS (then nothing more on it is readable).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

from kernel_side import semconv
from kernel_side.assembly import SpanAssembler
from kernel_side.events import ROLE_SERVER, Exchange
from kernel_side.model import AttrValue, SpanKind, StatusCode
from kernel_side.protocols import postgres as pg
from kernel_side.protocols import sql

RAW_QUERY_TEXT = False
"""Put the SQL on spans as captured instead of obfuscated (literals replaced by ``?``)."""

_PROTO: Final = "postgres"
_MAX_STATEMENTS: Final = 512
_MAX_PORTALS: Final = 64
_MAX_TLS_CONNS: Final = 4096
# Connections that switched to TLS (or GSS encryption): their later exchanges are encrypted
# bytes that no detector could read; claim them so they count as postgres, not as unknown.
_encrypted: OrderedDict[tuple[int, int], None] = OrderedDict()


def detect(ex: Exchange) -> bool:
    """Whether ex is PostgreSQL traffic (by content: never by port)."""
    if (ex.tgid, ex.conn_id) in _encrypted:
        return True
    return pg.looks_like_frontend(ex.request, ex.req_bytes)


def build(asm: SpanAssembler, ex: Exchange) -> None:
    """Turn one PostgreSQL exchange into spans (client side only)."""
    if ex.role == ROLE_SERVER:
        return  # a traced postgres backend: its clients' spans describe the same work
    state = asm.conn_state(ex, _PROTO)
    if state.get("encrypted"):
        return
    stmts = state.get("statements")
    if not isinstance(stmts, OrderedDict):
        stmts = state["statements"] = OrderedDict()
    portals = state.get("portals")
    fe = pg.parse_frontend(ex.request, ex.req_bytes, stmts,
                           portals if isinstance(portals, dict) else {})
    if fe.startup is not None:
        _startup(state, fe.startup, ex)
        return
    for name, stmt in fe.defined:
        if stmt is None:
            stmts.pop(name, None)
            continue
        stmts[name] = stmt
        stmts.move_to_end(name)
        if len(stmts) > _MAX_STATEMENTS:
            stmts.popitem(last=False)
    # Named portals end with their transaction: back to idle, none is left on the server.
    open_portals = {} if pg.last_ready_status(ex.response) == "I" else fe.portals
    state["portals"] = open_portals if len(open_portals) <= _MAX_PORTALS else {}
    if not fe.commands:
        return
    results = pg.match_results(fe, ex.response)
    db = state.get("db")
    index = 0
    for cmd, res in zip(fe.commands, results, strict=True):
        if res is not None and res.skipped:
            continue
        query, truncated = cmd.query, cmd.truncated
        attrs: dict[str, AttrValue] = {semconv.DB_SYSTEM_NAME: "postgresql"}
        name = "postgresql"
        if isinstance(db, str) and db:
            attrs[semconv.DB_NAMESPACE] = db
        if query is not None:
            text, op, coll = sql.describe(query, RAW_QUERY_TEXT)
            attrs[semconv.DB_QUERY_TEXT] = text
            if op:
                attrs[semconv.DB_OPERATION_NAME] = op
                name = op
                if coll:
                    attrs[semconv.DB_COLLECTION_NAME] = coll
                    name = f"{op} {coll}"
        if ex.peer_address:
            attrs[semconv.SERVER_ADDRESS] = ex.peer_address
            attrs[semconv.SERVER_PORT] = ex.peer_port
        if truncated:
            attrs[semconv.BRIDGE_TRUNCATED] = True
        span = asm.base_span(ex, name, SpanKind.CLIENT, index, attrs)
        if res is not None and res.sqlstate is not None:
            span.status = StatusCode.ERROR
            span.attributes[semconv.DB_RESPONSE_STATUS_CODE] = res.sqlstate
            span.attributes[semconv.ERROR_TYPE] = res.sqlstate
            if RAW_QUERY_TEXT and res.message:
                span.status_message = res.message  # may quote data: only with raw text on
        asm.finish(span, ex, index)
        index += 1


def _startup(state: dict[str, object], startup: pg.Startup, ex: Exchange) -> None:
    if startup.code in (pg.SSL_REQUEST, pg.GSSENC_REQUEST):
        if ex.response[:1] in (b"S", b"G"):
            state["encrypted"] = True
            key = (ex.tgid, ex.conn_id)
            _encrypted[key] = None
            if len(_encrypted) > _MAX_TLS_CONNS:
                _encrypted.popitem(last=False)
        return
    if startup.code == pg.PROTOCOL_3:
        db = startup.params.get("database") or startup.params.get("user")
        if db:
            state["db"] = db
