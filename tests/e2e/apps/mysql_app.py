"""A Python HTTP service backed by MySQL/MariaDB, annotated with one bridge.annotate call.

    python mysql_app.py --port 0 --ready-file PATH --db-port 3306

GET /orders/<tenant>   annotate(tenant_id=X-Tenant-ID), run one PyMySQL query, answer JSON
GET /scenario/<name>   run a capture scenario (tests/fixtures_capture/capture_mysql.py) against
                       the database: pymysql (text protocol) or binary (prepared statements)
"""

from __future__ import annotations

import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pymysql

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from _ready import write_ready

import bridge
from tests.fixtures_capture import capture_mysql


class Handler(BaseHTTPRequestHandler):
    """Thread per request."""

    protocol_version = "HTTP/1.1"
    db_port = 3306

    def do_GET(self) -> None:
        tenant = self.headers.get("X-Tenant-ID", "anonymous")
        bridge.annotate(tenant_id=tenant)
        if self.path.startswith("/scenario/"):
            fn = capture_mysql.SCENARIOS.get(self.path.rsplit("/", 1)[1])
            if fn is None:
                self._reply(404, {"error": "no such scenario"})
                return
            try:
                fn(self.db_port)
            except Exception as e:  # tell the test what went wrong
                self._reply(500, {"error": repr(e)})
                return
            self._reply(200, {"ok": True})
            return
        conn = pymysql.connect(host="127.0.0.1", port=self.db_port, user="root", password="",
                               database="shop", autocommit=True)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT id, total FROM orders WHERE tenant = %s", (tenant,))
                rows = cur.fetchall()
        finally:
            conn.close()
        self._reply(200, {"tenant": tenant, "rows": len(rows)})

    def _reply(self, status: int, body: dict[str, object]) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


def main() -> None:
    """Serve until killed."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ready-file")
    ap.add_argument("--db-port", type=int, required=True)
    args = ap.parse_args()
    Handler.db_port = args.db_port
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    if args.ready_file:
        write_ready(args.ready_file, server.server_address[1])
    server.serve_forever()


if __name__ == "__main__":
    main()
