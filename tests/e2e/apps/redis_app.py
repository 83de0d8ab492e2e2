"""A small annotated HTTP service that uses Redis, and a scripted redis-py client, for the
Redis e2e tests.

Service: every GET annotates the request's tenant (X-Tenant-ID) with bridge.annotate, then
does a redis-py SET and GET of a key named after the path, and answers JSON.

    python redis_app.py --port 0 --ready-file PATH --redis-port N

Client mode: once the go file exists, runs a fixed redis-py script (single commands, a
pipeline, a MULTI/EXEC transaction, an error, a connection on db 2) and writes a line per step
to the out file (tmp+rename).

    python redis_app.py client --redis-port N --go-file F --ready-file R --out O
"""

from __future__ import annotations

import argparse
import json
import os
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import redis

import bridge


def _write_atomic(path: str, text: str) -> None:
    tmp = Path(path + ".tmp")
    tmp.write_text(text)
    tmp.rename(path)


class Handler(BaseHTTPRequestHandler):
    """GET /<anything>/<key>: annotate, SET and GET the key, answer."""

    protocol_version = "HTTP/1.1"
    client: redis.Redis

    def do_GET(self) -> None:
        tenant = self.headers.get("X-Tenant-ID", "anonymous")
        bridge.annotate(tenant_id=tenant)
        key = "app:" + self.path.rsplit("/", 1)[-1]
        self.client.set(key, tenant)
        value = self.client.get(key)
        body = json.dumps({"tenant": tenant, "value": value.decode() if value else None})
        raw = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


def serve(args: argparse.Namespace) -> None:
    Handler.client = redis.Redis(port=args.redis_port)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    if args.ready_file:
        _write_atomic(args.ready_file, str(server.server_address[1]))
    server.serve_forever()


def client(args: argparse.Namespace) -> None:
    _write_atomic(args.ready_file, str(os.getpid()))
    while not Path(args.go_file).exists():
        time.sleep(0.02)
    steps: list[str] = []
    r = redis.Redis(port=args.redis_port)
    r.set("py:k", "v1")
    steps.append(f"get {r.get('py:k')!r}")
    with r.pipeline(transaction=False) as p:
        p.set("py:n", 1).incr("py:n").get("py:n")
        steps.append(f"pipeline {p.execute()!r}")
    with r.pipeline(transaction=True) as p:
        p.set("py:t", 5).incr("py:t")
        steps.append(f"transaction {p.execute()!r}")
    r.set("py:str", "x")
    try:
        r.lpush("py:str", "y")
    except redis.ResponseError as e:
        steps.append(f"error {str(e).split()[0]}")
    r2 = redis.Redis(port=args.redis_port, db=2)
    r2.set("py:db2", "two")
    steps.append(f"db2 {r2.get('py:db2')!r}")
    r.close()
    r2.close()
    _write_atomic(args.out, "\n".join(steps) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("mode", nargs="?", default="serve", choices=["serve", "client"])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ready-file")
    ap.add_argument("--redis-port", type=int, required=True)
    ap.add_argument("--go-file")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.mode == "client":
        client(args)
    else:
        serve(args)


if __name__ == "__main__":
    main()
