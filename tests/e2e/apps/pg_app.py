"""A tenant-annotated HTTP service that queries PostgreSQL with psycopg (e2e test app).

GET /<anything> with ``X-Tenant-ID``: annotate the tenant, run one parameterised query on a
connection of this thread, answer JSON.

    python pg_app.py --port 0 --ready-file PATH --dsn 'host=127.0.0.1 port=5432 ...'
"""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler

import psycopg
from _ready import serve

import bridge

_local = threading.local()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    dsn = ""

    def do_GET(self) -> None:
        tenant = self.headers.get("X-Tenant-ID", "anonymous")
        bridge.annotate(tenant_id=tenant)
        conn = getattr(_local, "conn", None)
        if conn is None:
            conn = _local.conn = psycopg.connect(self.dsn, autocommit=True)
        row = conn.execute("SELECT %s::text AS tenant_echo", (tenant,)).fetchone()
        raw = json.dumps({"tenant": row[0] if row else None}).encode()
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
    ap.add_argument("--dsn", required=True)
    args = ap.parse_args()
    Handler.dsn = args.dsn
    serve(Handler, args.port, args.ready_file)


if __name__ == "__main__":
    main()
