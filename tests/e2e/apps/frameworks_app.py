"""Framework services for the context-scope e2e tests; each writes its port to --ready-file.

    python frameworks_app.py MODE --port 0 --ready-file PATH [--inventory URL] [--redis-port N]

MODE: starlette (one event loop; each request awaits httpx + redis.asyncio with sleeps so
tasks interleave; no bridge code besides the middleware mapping X-Tenant-ID), fastapi, flask,
django (GET /orders/<id>, header mapping only), conn (raw sockets: the reader thread calls
bridge.annotate_connection, a pool thread writes the response).
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HEADERS = {"X-Tenant-ID": "tenant_id"}


def _ready(path: str, port: int) -> None:
    tmp = Path(path + ".tmp")
    tmp.write_text(str(port))
    tmp.rename(path)


def _listen(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(128)
    return s


def _uvicorn(app: object, args: argparse.Namespace) -> None:
    import uvicorn

    sock = _listen(args.port)
    config = uvicorn.Config(app, log_level="warning", loop="asyncio", http="h11",
                            lifespan="off")
    server = uvicorn.Server(config)
    _ready(args.ready_file, sock.getsockname()[1])
    server.run(sockets=[sock])


def starlette(args: argparse.Namespace) -> None:
    import asyncio

    import httpx
    import redis.asyncio as aredis
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from sdk_side.integrations.fastapi import bridge_starlette

    state: dict[str, object] = {}

    async def order(request: object) -> JSONResponse:
        req = request  # starlette.requests.Request
        oid = req.path_params["id"]  # type: ignore[attr-defined]
        tenant = req.headers.get("x-tenant-id", "")  # type: ignore[attr-defined]
        if "http" not in state:
            state["http"] = httpx.AsyncClient()
            state["redis"] = aredis.Redis(port=args.redis_port)
        http: httpx.AsyncClient = state["http"]  # type: ignore[assignment]
        r: aredis.Redis = state["redis"]  # type: ignore[assignment]
        await asyncio.sleep(random.uniform(0, 0.02))
        resp = await http.get(f"{args.inventory}/stock/sku-{oid}")
        await asyncio.sleep(random.uniform(0, 0.02))
        await r.set(f"order:{oid}", tenant)
        await asyncio.sleep(random.uniform(0, 0.02))
        await r.get(f"order:{oid}")
        return JSONResponse({"tenant": tenant, "stock": resp.status_code})

    app = Starlette(routes=[Route("/orders/{id}", order)])
    bridge_starlette(app, headers=HEADERS)
    _uvicorn(app, args)


def fastapi(args: argparse.Namespace) -> None:
    from fastapi import FastAPI

    from sdk_side.integrations.fastapi import bridge_fastapi

    app = FastAPI()

    @app.get("/orders/{id}")
    async def order(id: str) -> dict[str, str]:
        return {"id": id}

    bridge_fastapi(app)  # headers from EBPF_BRIDGE_HEADERS
    _uvicorn(app, args)


def _werkzeug(app: object, args: argparse.Namespace) -> None:
    from werkzeug.serving import make_server

    srv = make_server("127.0.0.1", args.port, app, threaded=True)  # type: ignore[arg-type]
    _ready(args.ready_file, srv.server_port)
    srv.serve_forever()


def flask(args: argparse.Namespace) -> None:
    from flask import Flask

    from sdk_side.integrations.flask import bridge_flask

    app = Flask("orders")

    @app.get("/orders/<int:id>")
    def order(id: int) -> dict[str, int]:
        return {"id": id}

    @app.get("/boom/<id>")
    def boom(id: str) -> dict[str, str]:
        raise RuntimeError("boom")

    bridge_flask(app)  # headers from EBPF_BRIDGE_HEADERS
    _werkzeug(app, args)


def django(args: argparse.Namespace) -> None:
    import django as dj
    from django.conf import settings

    settings.configure(
        DEBUG=False, ALLOWED_HOSTS=["*"], ROOT_URLCONF=__name__, SECRET_KEY="x",
        MIDDLEWARE=["sdk_side.integrations.django.BridgeMiddleware"],
    )
    dj.setup()
    from django.http import JsonResponse
    from django.urls import path

    def order(request: object, id: int) -> JsonResponse:
        return JsonResponse({"id": id})

    globals()["urlpatterns"] = [path("orders/<int:id>", order)]
    from django.core.wsgi import get_wsgi_application

    _werkzeug(get_wsgi_application(), args)


def conn(args: argparse.Namespace) -> None:
    import threading

    import bridge

    pool = ThreadPoolExecutor(4)
    lsock = _listen(args.port)
    _ready(args.ready_file, lsock.getsockname()[1])

    def respond(c: socket.socket, tenant: str) -> None:
        body = json.dumps({"tenant": tenant, "writer": threading.get_native_id()}).encode()
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                  + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
        c.close()

    def handle(c: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = c.recv(4096)
            if not chunk:
                c.close()
                return
            data += chunk
        tenant = ""
        for line in data.decode("latin-1").split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "x-tenant-id":
                tenant = value.strip()
        if tenant:
            bridge.annotate_connection(c, tenant_id=tenant)
        pool.submit(respond, c, tenant).result()

    while True:
        c, _ = lsock.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ready-file", required=True)
    ap.add_argument("--inventory", default="")
    ap.add_argument("--redis-port", type=int, default=0)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    globals()[args.mode](args)


if __name__ == "__main__":
    main()
