"""Spans for Redis exchanges: one CLIENT span per command, stable OTel database semconv.

- Detection is by content only: the request starts with a RESP array of bulk strings
  (``*N\\r\\n$``) or a known inline command.
- Only the application's side is traced: exchanges where the traced process is the Redis
  server (role server) are recognised and skipped, without counting them anywhere.
- A pipeline (several commands written before the server answered) is one exchange: it gives
  one span per command, paired with the replies in order (RESP3 pushes and attributes are
  skipped). The kernel only times the exchange as a whole, so every span of a pipeline has the
  exchange's start and end.
- Name and ``db.operation.name``: the command, uppercase (``GET``). ``db.query.text``: the
  command with every argument replaced by ``?`` (``SET ? ?``); the subcommand of container
  commands is kept (``CLIENT SETINFO ? ?``).
- ``db.namespace``: the selected database index, tracked per connection (``SELECT n`` answered
  ``+OK``, ``RESET``, and ``SELECT`` queued in a MULTI that ``EXEC`` ran); ``"0"`` until then.
  Each span carries the database its command ran against.
- Errors: an error reply (``-WRONGTYPE ...``) sets status ERROR and ``error.type`` and
  ``db.response.status_code`` to its prefix. Inside MULTI/EXEC, the per-command results in the
  EXEC reply are mapped back to the queued commands when both are in the exchange.
- Truncated capture: spans for the commands whose name was captured; a command cut by the
  capture is marked ``ebpf_bridge.capture.truncated``. Replies the capture missed leave their
  span's status UNSET.
"""

from __future__ import annotations

from kernel_side import semconv
from kernel_side.assembly import SpanAssembler
from kernel_side.events import ROLE_SERVER, Exchange
from kernel_side.model import AttrValue, SpanKind, SpanRecord, StatusCode
from kernel_side.protocols import redis
from kernel_side.protocols.redis import RedisCommand, RedisReply

DB_SYSTEM = "redis"
MAX_PLACEHOLDERS = 64
"""Arguments written as ``?`` in ``db.query.text``; more are summarised as ``...``."""

# Commands whose first argument names a subcommand (a keyword, never user data).
_CONTAINERS = frozenset((
    "ACL", "CLIENT", "CLUSTER", "COMMAND", "CONFIG", "DEBUG", "FUNCTION", "LATENCY", "MEMORY",
    "MODULE", "OBJECT", "PUBSUB", "SCRIPT", "SLOWLOG", "XGROUP", "XINFO",
))
_SUBSCRIBES = frozenset((
    "SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "UNSUBSCRIBE", "PUNSUBSCRIBE", "SUNSUBSCRIBE",
))
_STATE_KEY = "redis"

# Arguments in db.query.text are replaced by "?" unless the agent runs with --raw-query-text.
RAW_QUERY_TEXT = False


def detect(ex: Exchange) -> bool:
    """Whether ``ex`` is Redis traffic (by its bytes)."""
    return redis.looks_like_command(ex.request)


def query_text(cmd: RedisCommand, obfuscate: bool = True) -> str:
    """``db.query.text`` of ``cmd``: arguments as ``?`` unless ``obfuscate`` is False."""
    parts = [cmd.name]
    first = 0
    if cmd.name in _CONTAINERS and cmd.args:
        sub = cmd.args[0]
        if sub.isascii() and sub.replace(b"-", b"").isalnum():
            parts.append(sub.decode("ascii").upper())
            first = 1
    if obfuscate:
        n = cmd.argc - first
        parts.extend("?" * min(n, MAX_PLACEHOLDERS))
        if n > MAX_PLACEHOLDERS:
            parts.append("...")
    else:
        parts.extend(a.decode("utf-8", "replace") for a in cmd.args[first:])
        if cmd.argc > len(cmd.args):
            parts.append("...")
    return " ".join(parts)


def _pair(commands: list[RedisCommand], replies: list[RedisReply]) -> list[RedisReply | None]:
    """The reply of each command, in order (RESP2 (un)subscribe confirmations: one per
    channel)."""
    in_band = [r for r in replies if not r.out_of_band]
    out: list[RedisReply | None] = []
    i = 0
    for cmd in commands:
        out.append(in_band[i] if i < len(in_band) else None)
        i += 1
        if cmd.name in _SUBSCRIBES and i <= len(in_band) and in_band[i - 1].kind == "array":
            i += max(cmd.argc, 1) - 1
    return out


def _db_arg(cmd: RedisCommand) -> str | None:
    if cmd.args and cmd.args[0].isdigit() and len(cmd.args[0]) <= 10:
        return str(int(cmd.args[0]))
    return None


def build(asm: SpanAssembler, ex: Exchange) -> None:
    """Turn one Redis exchange into one CLIENT span per command."""
    if ex.role == ROLE_SERVER:
        return
    commands = redis.parse_commands(ex.request)
    if not commands:
        asm.stats.unknown_protocol += 1
        return
    replies = _pair(commands, redis.parse_replies(ex.response))
    state = asm.conn_state(ex, _STATE_KEY)
    db = str(state.get("db", "0"))
    multi = state.get("multi")  # db the queued commands will run against, while in MULTI
    txn_db = str(multi) if multi is not None else None
    queued: list[int] = []  # spans of commands queued in this exchange's MULTI
    spans: list[SpanRecord] = []
    for idx, (cmd, reply) in enumerate(zip(commands, replies, strict=True)):
        ran_in = txn_db if txn_db is not None and cmd.name not in ("EXEC", "DISCARD") else db
        attrs: dict[str, AttrValue] = {
            semconv.DB_SYSTEM_NAME: DB_SYSTEM,
            semconv.DB_OPERATION_NAME: cmd.name,
            semconv.DB_QUERY_TEXT: query_text(cmd, obfuscate=not RAW_QUERY_TEXT),
            semconv.DB_NAMESPACE: ran_in,
        }
        if ex.peer_address:
            attrs[semconv.SERVER_ADDRESS] = ex.peer_address
        if ex.peer_port:
            attrs[semconv.SERVER_PORT] = ex.peer_port
        if not cmd.complete:
            attrs[semconv.BRIDGE_TRUNCATED] = True
        span = asm.base_span(ex, cmd.name, SpanKind.CLIENT, idx, attrs)
        spans.append(span)
        ok = reply is not None and reply.kind != "error"
        if reply is not None and reply.kind == "error":
            _set_error(span, reply)
        # Connection state: the database, and MULTI/EXEC.
        name = cmd.name
        if name == "MULTI" and ok:
            txn_db, queued = db, []
        elif name == "EXEC" or name == "DISCARD":
            if name == "EXEC" and ok and reply is not None and reply.kind == "array":
                if txn_db is not None:
                    db = txn_db
                for q, item in zip(queued, reply.items, strict=False):
                    if item.kind == "error":
                        _set_error(spans[q], item)
            txn_db, queued = None, []
        elif txn_db is not None:
            if reply is not None and reply.kind == "simple" and reply.text == "QUEUED":
                queued.append(idx)
                if name == "SELECT" and _db_arg(cmd) is not None:
                    txn_db = _db_arg(cmd)
        elif name == "SELECT" and ok and reply is not None and reply.text == "OK":
            db = _db_arg(cmd) or db
        elif name == "RESET" and ok:
            db = "0"
    state["db"] = db
    state["multi"] = txn_db
    for idx, span in enumerate(spans):
        asm.finish(span, ex, idx)


def _set_error(span: SpanRecord, reply: RedisReply) -> None:
    prefix = reply.error or "ERR"
    span.status = StatusCode.ERROR
    # redis-server echoes the arguments of an unknown command: keep them out, like the query.
    span.status_message = (reply.text or "").split(", with args beginning with", 1)[0]
    span.attributes[semconv.ERROR_TYPE] = prefix
    span.attributes[semconv.DB_RESPONSE_STATUS_CODE] = prefix
