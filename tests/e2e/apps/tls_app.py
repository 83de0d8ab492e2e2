"""An HTTPS service (the standard library's ssl over ThreadingHTTPServer) for the TLS e2e tests.

GET /<anything>: with ``--annotate``, annotate the tenant from ``X-Tenant-ID``; with
``--upstream URL``, call ``URL/<same path>`` over HTTPS with requests (verify=--cafile), and
optionally query PostgreSQL (``--dsn``, sslmode=require) or Redis over TLS (``--redis``); answer
JSON.

    python tls_app.py --port 0 --ready-file PATH --cert C --key K [--annotate]
        [--upstream https://127.0.0.1:N --cafile C] [--dsn DSN] [--redis rediss://...]
"""

from __future__ import annotations

import argparse
import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from _ready import write_ready

_local = threading.local()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    opts: Any = None

    def do_GET(self) -> None:
        o = self.opts
        tenant = self.headers.get("X-Tenant-ID", "anonymous")
        out: dict[str, object] = {"tenant": tenant}
        if o.annotate:
            import bridge

            bridge.annotate(tenant_id=tenant)
        if o.upstream:
            import requests

            s = getattr(_local, "session", None)
            if s is None:
                s = _local.session = requests.Session()
            r = s.get(o.upstream.rstrip("/") + self.path, verify=o.cafile, timeout=10)
            out["upstream"] = r.status_code
        if o.dsn:
            import psycopg

            conn = getattr(_local, "pg", None)
            if conn is None:
                conn = _local.pg = psycopg.connect(o.dsn, autocommit=True)
            row = conn.execute("SELECT %s::text AS tenant_echo", (tenant,)).fetchone()
            out["pg"] = row[0] if row else None
        if o.redis:
            import redis

            rc = getattr(_local, "redis", None)
            if rc is None:
                rc = _local.redis = redis.Redis.from_url(o.redis, ssl_ca_certs=o.cafile)
            rc.set(f"tenant:{tenant}", "1")
            out["redis"] = rc.get(f"tenant:{tenant}") == b"1"
        raw = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ready-file", required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--annotate", action="store_true")
    ap.add_argument("--upstream")
    ap.add_argument("--cafile")
    ap.add_argument("--dsn")
    ap.add_argument("--redis")
    args = ap.parse_args()
    Handler.opts = args
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    write_ready(args.ready_file, server.server_address[1])
    server.serve_forever()


if __name__ == "__main__":
    main()
