"""Regenerate tests/unit/fixtures/http2/: real HTTP/2 (h2c) and gRPC wire bytes.

A recording TCP proxy sits on loopback between a real client and a real server and records,
per connection, every ``recv`` it did from either side, in the order it did them, as
``(direction, bytes, ts_ns)``: exactly the read/write granularity the kernel would report.
Scenarios:

- ``h2c_httpx``: httpx (``http2=True, http1=False``: prior knowledge, no TLS) against hypercorn
  serving a tiny ASGI app: GET, POST with a body, a 404, all on one connection.
- ``h2c_curl``: ``curl --http2-prior-knowledge`` (nghttp2's HPACK encoder) against the same app:
  POST /echo with 7 bytes.
- ``h2c_upgrade``: ``curl --http2`` against the same app: GET /hello as HTTP/1.1 with
  ``Upgrade: h2c``, the server's ``101 Switching Protocols``, then HTTP/2 on the same connection
  (the answer on stream 1).
- ``grpc_unary``, ``grpc_server_stream``, ``grpc_error``: grpcio client and server (generic
  handlers with bytes in and out, so no protoc), one channel (one connection) per scenario.
- ``grpc_mixed``: the three calls above on one channel.

Each fixture is JSON: ``{"scenario", "description", "chunks": [["c"|"s", hex, ts_ns], ...]}``
where ``"c"`` is client to server. Run with the dev extra installed:

    .venv/bin/python tests/fixtures_capture/capture_http2.py [--out DIR] [--only NAME ...]

``--only`` rewrites just the named fixtures (e.g. ``--only h2c_upgrade``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parents[1] / "unit" / "fixtures" / "http2"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

Chunk = tuple[str, bytes, int]


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RecordingProxy:
    """Forwards a loopback port to another and records each connection's reads in order."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self.sessions: list[list[Chunk]] = []
        self._lock = threading.Lock()
        self._pumps: list[threading.Thread] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            session: list[Chunk] = []
            with self._lock:
                self.sessions.append(session)
            for src, dst, tag in ((client, upstream, "c"), (upstream, client, "s")):
                t = threading.Thread(target=self._pump, args=(src, dst, tag, session),
                                     daemon=True)
                t.start()
                self._pumps.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, tag: str,
              session: list[Chunk]) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                with suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            # Record before forwarding, under the lock, so the order of the list is an order in
            # which the reads really happened relative to each other.
            with self._lock:
                session.append((tag, data, time.monotonic_ns()))
            try:
                dst.sendall(data)
            except OSError:
                return

    def wait_idle(self, timeout: float = 5.0) -> None:
        """Wait until every pump thread has seen both ends close."""
        deadline = time.monotonic() + timeout
        for t in list(self._pumps):
            t.join(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        self._closed = True
        with suppress(OSError):
            self.sock.close()


# ---------------------------------------------------------------------------------------------
# h2c: hypercorn + a tiny ASGI app


async def asgi_app(scope: dict[str, Any], receive: Callable[..., Any],
                   send: Callable[..., Any]) -> None:
    """GET /hello -> 200 text; POST /echo -> 200 with the body back; anything else -> 404."""
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    path = scope["path"]
    if path == "/hello" and scope["method"] == "GET":
        status, out, ctype = 200, b"hello, world\n", b"text/plain"
    elif path == "/echo" and scope["method"] == "POST":
        status, out, ctype = 200, body, b"application/octet-stream"
    else:
        status, out, ctype = 404, b"not found\n", b"text/plain"
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", ctype),
                            (b"content-length", str(len(out)).encode())]})
    await send({"type": "http.response.body", "body": out})


@contextmanager
def hypercorn_server() -> Iterator[int]:
    """hypercorn on 127.0.0.1 in a background thread; yields its port."""
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    port = free_port()
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.errorlog = None
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(serve(asgi_app, config,  # type: ignore[arg-type]
                                      shutdown_trigger=stop.wait))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("hypercorn did not start") from None
            time.sleep(0.05)
    try:
        yield port
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)


def run_httpx(port: int) -> None:
    import httpx

    headers = {"traceparent": TRACEPARENT, "user-agent": "capture-httpx/1.0"}
    with httpx.Client(http1=False, http2=True, base_url=f"http://127.0.0.1:{port}",
                      headers=headers, trust_env=False) as client:
        r = client.get("/hello")
        assert r.http_version == "HTTP/2", r.http_version
        client.post("/echo", content=b"x" * 3000)
        client.get("/missing?q=1")


def run_curl(port: int) -> None:
    curl = shutil.which("curl")
    if curl is None:
        raise RuntimeError("curl not found")
    base = f"http://127.0.0.1:{port}"
    # One request: curl 7.88 fails (error 16) reusing an h2c connection to hypercorn, with
    # or without the proxy, so a second URL would need a second connection.
    subprocess.run([curl, "-sS", "--http2-prior-knowledge", "--noproxy", "*",
                    "-H", f"traceparent: {TRACEPARENT}", "--data-binary", "payload",
                    "-o", "/dev/null", f"{base}/echo"],
                   check=True)


def run_curl_upgrade(port: int) -> None:
    curl = shutil.which("curl")
    if curl is None:
        raise RuntimeError("curl not found")
    out = subprocess.run([curl, "-sS", "--http2", "--noproxy", "*",
                          "-H", f"traceparent: {TRACEPARENT}", "-o", "/dev/null",
                          "-w", "%{http_version}", f"http://127.0.0.1:{port}/hello"],
                         check=True, capture_output=True, text=True).stdout
    if out != "2":
        raise RuntimeError(f"curl --http2 did not upgrade (HTTP/{out})")


# ---------------------------------------------------------------------------------------------
# gRPC: generic handlers, bytes in and out

SERVICE = "demo.Greeter"


def _say_hello(request: bytes, context: Any) -> bytes:
    return b"hello " + request


def _stream(request: bytes, context: Any) -> Iterator[bytes]:
    for i in range(5):
        yield b"item-%d:" % i + request


def _lookup(request: bytes, context: Any) -> bytes:
    import grpc

    context.abort(grpc.StatusCode.NOT_FOUND, "no such user: " + request.decode())
    return b""  # not reached


@contextmanager
def grpc_server() -> Iterator[int]:
    """A grpcio server on 127.0.0.1 with the demo service; yields its port."""
    from concurrent import futures

    import grpc

    def ident(b: bytes) -> bytes:
        return b

    handlers = {
        "SayHello": grpc.unary_unary_rpc_method_handler(
            _say_hello, request_deserializer=ident, response_serializer=ident),
        "ListItems": grpc.unary_stream_rpc_method_handler(
            _stream, request_deserializer=ident, response_serializer=ident),
        "Lookup": grpc.unary_unary_rpc_method_handler(
            _lookup, request_deserializer=ident, response_serializer=ident),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(0).wait(5)


def run_grpc(port: int, calls: list[str]) -> None:
    import grpc

    def ident(b: bytes) -> bytes:
        return b

    md = (("traceparent", TRACEPARENT),)
    with grpc.insecure_channel(f"127.0.0.1:{port}",
                               options=[("grpc.enable_http_proxy", 0),
                                        ("grpc.primary_user_agent", "capture-grpc")]) as ch:
        for call in calls:
            if call == "unary":
                f = ch.unary_unary(f"/{SERVICE}/SayHello", request_serializer=ident,
                                   response_deserializer=ident)
                assert f(b"alice", metadata=md, timeout=5) == b"hello alice"
            elif call == "stream":
                g = ch.unary_stream(f"/{SERVICE}/ListItems", request_serializer=ident,
                                    response_deserializer=ident)
                assert len(list(g(b"bob", metadata=md, timeout=5))) == 5
            elif call == "error":
                e = ch.unary_unary(f"/{SERVICE}/Lookup", request_serializer=ident,
                                   response_deserializer=ident)
                try:
                    e(b"carol", metadata=md, timeout=5)
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.NOT_FOUND, err
                else:
                    raise AssertionError("Lookup should fail")


# ---------------------------------------------------------------------------------------------


def record(target_port: int, client: Callable[[int], None]) -> list[Chunk]:
    """Run ``client`` against a fresh proxy in front of ``target_port``; the one session."""
    proxy = RecordingProxy(target_port)
    try:
        client(proxy.port)
        proxy.wait_idle()
    finally:
        proxy.close()
    if len(proxy.sessions) != 1:
        raise RuntimeError(f"expected one connection, saw {len(proxy.sessions)}")
    return proxy.sessions[0]


def save(out: Path, name: str, description: str, chunks: list[Chunk]) -> None:
    t0 = chunks[0][2] if chunks else 0
    doc = {"scenario": name, "description": description,
           "chunks": [[tag, data.hex(), ts - t0] for tag, data, ts in chunks]}
    (out / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    c = sum(len(d) for t, d, _ in chunks if t == "c")
    s = sum(len(d) for t, d, _ in chunks if t == "s")
    print(f"{name}: {len(chunks)} chunks, {c} client bytes, {s} server bytes")


H2C: tuple[tuple[str, Callable[[int], None], str], ...] = (
    ("h2c_httpx", run_httpx, "httpx h2c prior knowledge vs hypercorn: GET /hello, "
     "POST /echo (3000 bytes), GET /missing?q=1 (404)"),
    ("h2c_curl", run_curl, "curl --http2-prior-knowledge vs hypercorn: POST /echo (7 bytes)"),
    ("h2c_upgrade", run_curl_upgrade, "curl --http2 vs hypercorn: GET /hello as HTTP/1.1 with "
     "Upgrade: h2c, 101, then the answer on HTTP/2 stream 1"),
)
GRPC: tuple[tuple[str, list[str], str], ...] = (
    ("grpc_unary", ["unary"], "SayHello(alice) -> hello alice"),
    ("grpc_server_stream", ["stream"], "ListItems(bob) -> 5 messages"),
    ("grpc_error", ["error"], "Lookup(carol) -> NOT_FOUND 'no such user: carol'"),
    ("grpc_mixed", ["unary", "stream", "error"], "the three calls on one channel"),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=OUT)
    names = [n for n, _, _ in H2C] + [n for n, _, _ in GRPC]
    ap.add_argument("--only", action="append", choices=names, metavar="NAME",
                    help=f"rewrite only this fixture (repeatable): {', '.join(names)}")
    args = ap.parse_args()
    wanted = set(args.only or names)
    args.out.mkdir(parents=True, exist_ok=True)
    if wanted & {n for n, _, _ in H2C}:
        with hypercorn_server() as port:
            for name, client, desc in H2C:
                if name in wanted:
                    save(args.out, name, desc, record(port, client))
    if wanted & {n for n, _, _ in GRPC}:
        with grpc_server() as port:
            for name, calls, desc in GRPC:
                if name in wanted:
                    save(args.out, name, f"grpcio {desc}",
                         record(port, lambda p, calls=calls: run_grpc(p, calls)))  # type: ignore[misc]


if __name__ == "__main__":
    main()
