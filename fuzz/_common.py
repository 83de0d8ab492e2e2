"""Shared pieces of the fuzz targets: seeds from the captured fixtures, and how one fuzz input
is split into the two directions of an exchange.

Input layout (so seeds and mutations stay meaningful): two little-endian bytes giving the
request's length, the request, then the response. Truncated inputs are fine: whatever is
missing is empty.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "unit" / "fixtures"


def pack(request: bytes, response: bytes = b"") -> bytes:
    """One fuzz input holding both directions of an exchange."""
    n = min(len(request), 0xFFFF)
    return n.to_bytes(2, "little") + request[:n] + response


def unpack(data: bytes) -> tuple[bytes, bytes]:
    """The (request, response) held by one fuzz input."""
    n = int.from_bytes(data[:2], "little")
    return data[2 : 2 + n], data[2 + n :]


def extra(data: bytes) -> int:
    """A 'bytes the syscall moved beyond the capture' count derived from the input."""
    return (data[-1] * 37) if data else 0


def postgres_seeds() -> Iterator[bytes]:
    for path in sorted((FIXTURES / "postgres").glob("*.json")):
        for e in json.loads(path.read_text())["exchanges"]:
            yield pack(bytes.fromhex(e["request"]), bytes.fromhex(e["response"]))


def mysql_seeds() -> Iterator[bytes]:
    for path in sorted((FIXTURES / "mysql").glob("*.json")):
        for conn in json.loads(path.read_text())["connections"]:
            for e in conn:
                yield pack(bytes.fromhex(e["request"]), bytes.fromhex(e["response"]))


def redis_seeds() -> Iterator[bytes]:
    for req in sorted((FIXTURES / "redis").glob("*.req")):
        yield pack(req.read_bytes(), req.with_suffix(".resp").read_bytes())


def http2_seeds() -> Iterator[bytes]:
    """A whole captured connection per seed: chunks as (direction byte, 2-byte length, data)."""
    for path in sorted((FIXTURES / "http2").glob("*.json")):
        out = bytearray()
        for tag, hx, _ in json.loads(path.read_text())["chunks"]:
            raw = bytes.fromhex(hx)[:0xFFFF]
            out += bytes([tag == "c"]) + len(raw).to_bytes(2, "little") + raw
        yield bytes(out)


def http2_chunks(data: bytes) -> Iterator[tuple[bool, bytes]]:
    """The (from_client, bytes) chunks an http2 fuzz input encodes."""
    pos = 0
    while pos < len(data):
        from_client = bool(data[pos] & 1)
        n = int.from_bytes(data[pos + 1 : pos + 3], "little")
        yield from_client, data[pos + 3 : pos + 3 + n]
        pos += 3 + n


_HTTP1 = [
    (b"GET /orders/1?x=2 HTTP/1.1\r\nHost: a\r\nUser-Agent: u\r\ntraceparent: "
     b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\r\n",
     b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
    (b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
     b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"3\r\nabc\r\n0\r\n\r\n"),
    (b"GET /a HTTP/1.1\r\n\r\nHEAD /b HTTP/1.1\r\n\r\nGET /c HTTP/1.0\r\n\r\n",
     b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n"
     b"HTTP/1.0 500 Oops\r\n\r\n"),
]


def http1_seeds() -> Iterator[bytes]:
    for req, resp in _HTTP1:
        yield pack(req, resp)


_SQL = [
    "SELECT * FROM users WHERE id = 42 AND name = 'bob'",
    "INSERT INTO t (a, b) VALUES (1, 'x''y'), ($1, $$dollar$$)",
    "WITH x AS (SELECT 1) UPDATE orders SET v = 3.5e2 WHERE k IN (1, 2, 3) -- c",
    "/* hint */ DELETE FROM \"Quoted\".tbl WHERE s = E'\\n' RETURNING *",
]


def sql_seeds() -> Iterator[bytes]:
    for q in _SQL:
        yield q.encode()
    for seed in postgres_seeds():  # the queries in the captured Query/Parse messages
        yield unpack(seed)[0]


SEEDS = {
    "http1": http1_seeds,
    "http2": http2_seeds,
    "redis": redis_seeds,
    "postgres": postgres_seeds,
    "mysql": mysql_seeds,
    "sql": sql_seeds,
}


def write_corpus(proto: str, directory: Path) -> int:
    """Write ``proto``'s seeds into ``directory``; returns how many."""
    directory.mkdir(parents=True, exist_ok=True)
    n = 0
    for n, seed in enumerate(SEEDS[proto](), 1):
        (directory / f"seed-{n:03d}").write_bytes(seed)
    return n


def exchange(request: bytes, response: bytes, data: bytes, *, role_server: bool = False,
             exchange_id: int = 1) -> object:
    """An ``Exchange`` as the kernel would report it for these captured bytes."""
    from kernel_side.events import ROLE_CLIENT, ROLE_SERVER, Exchange

    t0 = 1_000_000_000
    more = extra(data)
    return Exchange(
        tgid=100, fd=5, role=ROLE_SERVER if role_server else ROLE_CLIENT,
        peer_address="127.0.0.1", peer_port=6379, listen_fd=3 if role_server else 0,
        req_tid=100, resp_tid=100, conn_id=77, exchange_id=exchange_id, parent_exchange_id=0,
        req_start_ns=t0, req_end_ns=t0 + 1000, resp_start_ns=t0 + 2000, resp_end_ns=t0 + 3000,
        req_bytes=len(request) + more, resp_bytes=len(response) + more // 2,
        req_calls=1, resp_calls=1, request=request[:1024], response=response[:512], ctx=None)


class _Procs:
    def resource_for(self, tgid: int) -> object:
        from kernel_side.model import Resource

        return Resource((tgid, 42), {"service.name": f"svc-{tgid}"})

    def listen_port(self, tgid: int, fd: int) -> int | None:
        return 8080


def run_builder(module: object, request: bytes, response: bytes, data: bytes) -> None:
    """``module.detect``/``module.build`` on one exchange, outside the assembler's catch-all,
    so an exception in a span builder is found rather than counted."""
    from kernel_side.assembly import IdSource, SpanAssembler

    asm = SpanAssembler(_Procs(), lambda _s: None,  # type: ignore[arg-type]
                        ids=IdSource(bytes(24)))
    for role_server in (False, True):
        ex = exchange(request, response, data, role_server=role_server)
        if module.detect(ex):  # type: ignore[attr-defined]
            module.build(asm, ex)  # type: ignore[attr-defined]
    asm.flush()
