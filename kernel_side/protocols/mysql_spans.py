"""Spans for MySQL / MariaDB client exchanges.

One CLIENT span per statement the client runs: ``COM_QUERY`` and ``COM_STMT_EXECUTE`` (the
executed statement's text is the one stored when the connection prepared it). Exchanges of the
traced server (role SERVER: a traced mariadbd) make no spans; the client side tells the story.

Per-connection memory (``asm.conn_state(ex, "mysql")``): the current database (from the
HandshakeResponse's CONNECT_WITH_DB, ``COM_INIT_DB``, or a successful ``USE db`` query), the
prepared statements (id -> text), the client's capabilities, whether the server is MariaDB, and
whether the connection went to TLS or compression (then nothing more is parsed).

Choices:

* ``COM_STMT_PREPARE`` makes no span of its own when it succeeds: the statement shows up, with
  its text, on the span of each ``COM_STMT_EXECUTE``. A prepare the server refuses (syntax
  error, missing table) does make a span, named after its text with status ERROR, since no
  execute will ever show that failure.
* ``COM_INIT_DB``, ``COM_PING``, ``COM_QUIT``, ``COM_STMT_CLOSE`` and the handshake make no
  spans; they only update the connection's memory.
* ``db.system.name`` comes from the server's greeting: the kernel hands the first server bytes
  of a fresh client connection over as an exchange with no request, and a version naming
  MariaDB means ``"mariadb"``, anything else ``"mysql"``. Without a greeting (a connection
  opened before the agent started) two things can still prove MariaDB, else it is ``"mysql"``:

  - the client's HandshakeResponse: a MariaDB-aware client (libmariadb, so the ``mariadb`` CLI
    and Connector/C based drivers) talking to a MariaDB server clears ``CLIENT_MYSQL`` and
    echoes MariaDB's extended capabilities;
  - the server's executable, when the server is a process on this host: the agent finds the
    other end of the client's socket in /proc (once per connection, cached per server address)
    and ``mariadbd`` means MariaDB.
"""

from __future__ import annotations

import re
from typing import Final

from kernel_side import semconv
from kernel_side.assembly import SpanAssembler
from kernel_side.events import ROLE_SERVER, Exchange
from kernel_side.model import AttrValue, SpanKind, StatusCode
from kernel_side.protocols import mysql, sql

_STATE: Final = "mysql"
_MAX_STMTS: Final = 1024
_USE: Final = re.compile(r"\s*use\s+`?([A-Za-z0-9_$]+)`?\s*;?\s*\Z", re.IGNORECASE)

# Literals in db.query.text are replaced by "?" unless the agent runs with --raw-query-text.
RAW_QUERY_TEXT = False


def detect(ex: Exchange) -> bool:
    """Whether ``ex`` is MySQL traffic: a command packet (sequence id 0, a known command byte,
    a length that fits) or a handshake response (sequence id 1) or auth continuation."""
    req = ex.request
    if ex.req_bytes == 0:
        # The server spoke first: the kernel hands over its greeting as a request-less exchange.
        return mysql.parse_greeting(ex.response) is not None
    return (
        mysql.looks_like_command(req, ex.req_bytes, ex.response)
        or mysql.looks_like_handshake_response(req, ex.response)
        or mysql.looks_like_auth_continuation(req, ex.response)
    )


def build(asm: SpanAssembler, ex: Exchange) -> None:
    """Turn one MySQL exchange into spans (one per statement run)."""
    if ex.role == ROLE_SERVER:
        return
    state = asm.conn_state(ex, _STATE)
    if state.get("opaque"):
        return
    req = ex.request
    if ex.req_bytes == 0:
        version = mysql.parse_greeting(ex.response)
        if version is not None:
            state["system"] = mysql.vendor_of_server_version(version)
        return
    if "system" not in state:
        # No greeting seen (the connection predates the agent, or its exchange was lost).
        _learn_server(asm, ex, state)
    if mysql.looks_like_handshake_response(req, ex.response):
        _handshake(state, req)
        return
    if not mysql.looks_like_command(req, ex.req_bytes, ex.response):
        return  # the rest of an authentication dialogue
    caps = state.get("caps")
    commands = mysql.parse_request(req, caps if isinstance(caps, int) else 0)
    replies = mysql.split_replies(ex.response)
    stmts = state.get("stmts")
    if not isinstance(stmts, dict):
        stmts = state["stmts"] = {}
    r = 0
    index = 0
    for cmd in commands:
        reply: mysql.Reply | None = None
        if cmd.code not in mysql.NO_RESPONSE and cmd.code != mysql.COM_QUIT:
            if r < len(replies):
                reply = mysql.parse_reply(replies[r], cmd.code)
            r += 1
        code = cmd.code
        if code == mysql.COM_QUERY:
            text = cmd.text
            if reply is not None and reply.kind == "ok":
                m = _USE.match(text)
                if m:
                    state["db"] = m.group(1)
            _span(asm, ex, state, index, text, cmd, reply)
            index += 1
        elif code == mysql.COM_STMT_PREPARE:
            if reply is not None and reply.kind == "ok" and reply.statement_id is not None:
                if len(stmts) >= _MAX_STMTS:
                    stmts.pop(next(iter(stmts)))
                stmts[reply.statement_id] = cmd.text
                state["last_stmt"] = reply.statement_id
            elif reply is not None and reply.kind == "err":
                _span(asm, ex, state, index, cmd.text, cmd, reply)
                index += 1
        elif code in (mysql.COM_STMT_EXECUTE, mysql.COM_STMT_BULK_EXECUTE):
            sid = cmd.statement_id
            if sid == 0xFFFFFFFF:  # MariaDB: the statement prepared last on this connection
                last = state.get("last_stmt")
                sid = last if isinstance(last, int) else None
            known = stmts.get(sid) if sid is not None else None
            _span(asm, ex, state, index, known if isinstance(known, str) else None, cmd, reply)
            index += 1
        elif code == mysql.COM_STMT_CLOSE:
            if cmd.statement_id is not None:
                stmts.pop(cmd.statement_id, None)
        elif code == mysql.COM_INIT_DB:
            if reply is None or reply.kind == "ok":
                state["db"] = cmd.text or None
        elif code in (mysql.COM_RESET_CONNECTION, mysql.COM_CHANGE_USER):
            stmts.clear()


def _learn_server(asm: SpanAssembler, ex: Exchange, state: dict[str, object]) -> None:
    exe = asm.server_executable(ex)
    state["system"] = (mysql.vendor_of_server_executable(exe) if exe else None) or "mysql"


def _handshake(state: dict[str, object], req: bytes) -> None:
    hs = mysql.parse_handshake_response(req)
    if hs is None:
        return
    state["caps"] = hs.capabilities
    if hs.database:
        state["db"] = hs.database
    if hs.mariadb:
        state["system"] = "mariadb"
    if hs.ssl or hs.compressed:
        state["opaque"] = True


def _span(asm: SpanAssembler, ex: Exchange, state: dict[str, object], index: int,
          text: str | None, cmd: mysql.Command, reply: mysql.Reply | None) -> None:
    system = state.get("system")
    attrs: dict[str, AttrValue] = {
        semconv.DB_SYSTEM_NAME: system if isinstance(system, str) else "mysql",
    }
    db = state.get("db")
    if isinstance(db, str) and db:
        attrs[semconv.DB_NAMESPACE] = db
    op = coll = None
    if text:
        shown, op, coll = sql.describe(text, RAW_QUERY_TEXT)
        attrs[semconv.DB_QUERY_TEXT] = shown
    if op:
        attrs[semconv.DB_OPERATION_NAME] = op
    if coll:
        attrs[semconv.DB_COLLECTION_NAME] = coll
    if ex.peer_address:
        attrs[semconv.SERVER_ADDRESS] = ex.peer_address
    if ex.peer_port:
        attrs[semconv.SERVER_PORT] = ex.peer_port
    if not cmd.complete:
        attrs[semconv.BRIDGE_TRUNCATED] = True
    name = f"{op} {coll}" if op and coll else op or "mysql"
    span = asm.base_span(ex, name, SpanKind.CLIENT, index, attrs)
    if reply is not None and reply.kind == "err":
        code = str(reply.error_code) if reply.error_code is not None else "ERR"
        span.attributes[semconv.DB_RESPONSE_STATUS_CODE] = code
        span.attributes[semconv.ERROR_TYPE] = code
        span.status = StatusCode.ERROR
        span.status_message = reply.message or ""
    asm.finish(span, ex, index)
