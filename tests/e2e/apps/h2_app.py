"""HTTP/2 and gRPC peers for the end-to-end tests, one process per role.

    h2_app.py grpc-server --ready-file F          # grpcio server (plaintext h2c), port in F
    h2_app.py grpc-client --port P --go-file G    # waits for G, then runs the calls
    h2_app.py h2c-server --ready-file F           # hypercorn ASGI app over h2c
    h2_app.py h2c-client --port P --go-file G     # httpx with prior-knowledge HTTP/2
    h2_app.py h2c-server ... --cert C --key K     # the same over TLS instead (ALPN h2)
    h2_app.py h2c-client ... --cafile C           # the same over TLS instead (ALPN h2)
    h2_app.py annotated --grpc-port P --ready-file F
        # threaded HTTP/1.1 service: bridge.annotate(tenant_id=<X-Tenant-ID>), then a gRPC call

Ready files are written atomically (tmp + rename).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

SERVICE = "shop.v1.Catalog"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _ready(path: str, port: int) -> None:
    tmp = Path(path + ".tmp")
    tmp.write_text(str(port))
    tmp.rename(path)


def _wait_go(path: str) -> None:
    deadline = time.monotonic() + 60
    while not Path(path).exists():
        if time.monotonic() > deadline:
            sys.exit("go file never appeared")
        time.sleep(0.02)


def _ident(b: bytes) -> bytes:
    return b


def grpc_server(ready: str) -> None:
    import grpc

    def get_item(request: bytes, context: Any) -> bytes:
        return b"item:" + request

    def list_items(request: bytes, context: Any) -> Iterator[bytes]:
        for i in range(3):
            yield b"item-%d" % i

    def lookup(request: bytes, context: Any) -> bytes:
        context.abort(grpc.StatusCode.NOT_FOUND, "no such item")

    def record_items(requests: Iterator[bytes], context: Any) -> bytes:
        return b"recorded:%d" % sum(1 for _ in requests)

    def chat(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        for r in requests:
            yield b"echo:" + r

    def chat_abort(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        yield b"echo:" + next(requests)
        next(requests)  # the second message breaks it
        context.abort(grpc.StatusCode.INTERNAL, "chat broke")

    handlers = {
        "GetItem": grpc.unary_unary_rpc_method_handler(get_item, _ident, _ident),
        "ListItems": grpc.unary_stream_rpc_method_handler(list_items, _ident, _ident),
        "Lookup": grpc.unary_unary_rpc_method_handler(lookup, _ident, _ident),
        "RecordItems": grpc.stream_unary_rpc_method_handler(record_items, _ident, _ident),
        "Chat": grpc.stream_stream_rpc_method_handler(chat, _ident, _ident),
        "ChatAbort": grpc.stream_stream_rpc_method_handler(chat_abort, _ident, _ident),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    _ready(ready, port)
    server.wait_for_termination()


def _channel(port: int) -> Any:
    import grpc

    return grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.enable_http_proxy", 0)])


def grpc_client(port: int, go: str) -> None:
    import grpc

    _wait_go(go)
    with _channel(port) as ch:
        get = ch.unary_unary(f"/{SERVICE}/GetItem", request_serializer=_ident,
                             response_deserializer=_ident)
        listing = ch.unary_stream(f"/{SERVICE}/ListItems", request_serializer=_ident,
                                  response_deserializer=_ident)
        lookup = ch.unary_unary(f"/{SERVICE}/Lookup", request_serializer=_ident,
                                response_deserializer=_ident)
        assert get(b"42", metadata=(("traceparent", TRACEPARENT),)) == b"item:42"
        assert list(listing(b"all")) == [b"item-0", b"item-1", b"item-2"]
        try:
            lookup(b"nope")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND
        _streaming_calls(ch)
    print("grpc-client done", flush=True)


STREAM_PAUSE_S = 0.05
"""Gap between the messages a streaming call sends, so each call spans several round trips."""


def _paced(messages: list[bytes]) -> Iterator[bytes]:
    for i, m in enumerate(messages):
        if i:
            time.sleep(STREAM_PAUSE_S)
        yield m


def _streaming_calls(ch: Any) -> None:
    """A client-streaming call, a bidirectional one, and a bidirectional one the server aborts
    midway, each sending three messages with a pause between them."""
    import grpc

    record = ch.stream_unary(f"/{SERVICE}/RecordItems", request_serializer=_ident,
                             response_deserializer=_ident)
    chat = ch.stream_stream(f"/{SERVICE}/Chat", request_serializer=_ident,
                            response_deserializer=_ident)
    chat_abort = ch.stream_stream(f"/{SERVICE}/ChatAbort", request_serializer=_ident,
                                  response_deserializer=_ident)
    assert record(_paced([b"a", b"b", b"c"])) == b"recorded:3"
    assert list(chat(_paced([b"x", b"y", b"z"]))) == [b"echo:x", b"echo:y", b"echo:z"]
    got: list[bytes] = []
    try:
        for reply in chat_abort(_paced([b"p", b"q", b"r"])):
            got.append(reply)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INTERNAL
    assert got == [b"echo:p"]


async def _asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    while (await receive()).get("more_body"):
        pass
    status, out = (200, b"hello\n") if scope["path"] == "/hello" else (404, b"missing\n")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", str(len(out)).encode())]})
    await send({"type": "http.response.body", "body": out})


def h2c_server(ready: str, cert: str | None = None, key: str | None = None) -> None:
    import socket

    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = Config()
    cfg.bind = [f"127.0.0.1:{port}"]
    cfg.accesslog = None
    if cert:
        cfg.certfile, cfg.keyfile = cert, key

    async def main() -> None:
        task = asyncio.ensure_future(serve(_asgi, cfg))  # type: ignore[arg-type]
        for _ in range(500):
            try:
                _r, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.02)
        _ready(ready, port)
        await task

    asyncio.run(main())


def h2c_client(port: int, go: str, cafile: str | None = None) -> None:
    import ssl

    import httpx

    _wait_go(go)
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=cafile) if cafile else True
    scheme = "https" if cafile else "http"
    with httpx.Client(http1=False, http2=True, verify=verify,
                      base_url=f"{scheme}://127.0.0.1:{port}") as c:
        assert c.get("/hello", headers={"traceparent": TRACEPARENT}).status_code == 200
        assert c.get("/missing").status_code == 404
    print("h2c-client done", flush=True)


def annotated(grpc_port: int, ready: str) -> None:
    import bridge

    ch = _channel(grpc_port)
    get = ch.unary_unary(f"/{SERVICE}/GetItem", request_serializer=_ident,
                         response_deserializer=_ident)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            bridge.annotate(tenant_id=self.headers.get("X-Tenant-ID", "none"))
            item = get(self.path.rsplit("/", 1)[-1].encode(), timeout=10)
            self.send_response(200)
            self.send_header("Content-Length", str(len(item)))
            self.end_headers()
            self.wfile.write(item)

        def log_message(self, format: str, *args: object) -> None:
            """Quiet."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    _ready(ready, server.server_address[1])
    server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode")
    ap.add_argument("--port", type=int)
    ap.add_argument("--grpc-port", type=int)
    ap.add_argument("--ready-file")
    ap.add_argument("--go-file")
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--cafile")
    a = ap.parse_args()
    if a.mode == "grpc-server":
        grpc_server(a.ready_file)
    elif a.mode == "grpc-client":
        grpc_client(a.port, a.go_file)
    elif a.mode == "h2c-server":
        h2c_server(a.ready_file, a.cert, a.key)
    elif a.mode == "h2c-client":
        h2c_client(a.port, a.go_file, a.cafile)
    elif a.mode == "annotated":
        annotated(a.grpc_port, a.ready_file)
    else:
        sys.exit(f"unknown mode {a.mode}")


if __name__ == "__main__":
    main()
