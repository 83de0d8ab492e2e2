"""A thread-per-request service that holds a request open between annotate and its outgoing
call, for the agent-restart test.

GET /hold/<id>: ``bridge.annotate(tenant_id=<X-Tenant-ID>)``, create ``<dir>/held-<id>``, wait
for ``<dir>/go-<id>`` (at most 60 s), then GET ``<upstream>/stock/sku-<id>`` on a new
connection and answer 200 with the upstream's status. GET /status answers ``bridge.status()``.

    python hold_app.py --port 0 --ready-file PATH --dir DIR --upstream URL
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import requests
from _ready import serve

import bridge


def main() -> None:
    """Serve until killed."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ready-file", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--upstream", required=True)
    a = ap.parse_args()
    base = Path(a.dir)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self, body: dict[str, object]) -> None:
            raw = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self) -> None:
            if self.path == "/status":
                self._answer(dataclasses.asdict(bridge.status()))
                return
            ident = self.path.rsplit("/", 1)[-1]
            bridge.annotate(tenant_id=self.headers.get("X-Tenant-ID", ""))
            (base / f"held-{ident}").write_text("")
            deadline = time.monotonic() + 60
            while not (base / f"go-{ident}").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            up = requests.get(f"{a.upstream}/stock/sku-{ident}", timeout=10)
            self._answer({"upstream": up.status_code})

        def log_message(self, format: str, *args: object) -> None:
            pass

    serve(Handler, a.port, a.ready_file)


if __name__ == "__main__":
    main()
