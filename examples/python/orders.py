"""Example orders service: the revenue path, instrumented with one call to bridge.annotate.

A thread-per-request HTTP server (the standard library's ThreadingHTTPServer). Each request
names its tenant and user in headers, as an API gateway would forward them; the handler
annotates them, asks the inventory service over HTTP, and answers with JSON.

    python orders.py --port 8081 --inventory http://127.0.0.1:8082 [--ready-file PATH]
"""

from __future__ import annotations

import argparse
import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import bridge


class OrdersHandler(BaseHTTPRequestHandler):
    """GET /orders/<id>: annotate, call inventory, answer."""

    protocol_version = "HTTP/1.1"
    inventory_url = "http://127.0.0.1:8082"

    def do_GET(self) -> None:
        tenant = self.headers.get("X-Tenant-ID", "anonymous")
        user = self.headers.get("X-User-ID", "guest")
        flag = "new-checkout" if tenant.endswith("a") else "classic-checkout"
        bridge.annotate(tenant_id=tenant, user_id=user, feature_flag=flag)
        if not self.path.startswith("/orders/"):
            self._reply(404, {"error": "not found"})
            return
        order_id = self.path.rsplit("/", 1)[-1]
        sku = f"sku-{order_id}"
        try:
            with urllib.request.urlopen(f"{self.inventory_url}/stock/{sku}", timeout=5) as r:
                stock = json.loads(r.read())
        except urllib.error.HTTPError as e:
            self._reply(502, {"error": f"inventory answered {e.code}"})
            return
        except OSError as e:
            self._reply(503, {"error": f"inventory unreachable: {e}"})
            return
        self._reply(200, {"order": order_id, "tenant": tenant, "in_stock": stock["count"] > 0,
                          "thread": threading.get_native_id()})

    def _reply(self, status: int, body: dict[str, object]) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the agent is the one telling what happened."""


def main() -> None:
    """Serve until killed."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, default=8081)
    ap.add_argument("--inventory", default="http://127.0.0.1:8082")
    ap.add_argument("--ready-file")
    args = ap.parse_args()
    OrdersHandler.inventory_url = args.inventory
    server = ThreadingHTTPServer(("127.0.0.1", args.port), OrdersHandler)
    server.daemon_threads = True
    if args.ready_file:
        # Write then rename, so a watcher never reads a half-written file.
        tmp = Path(args.ready_file + ".tmp")
        tmp.write_text(str(server.server_address[1]))
        tmp.rename(args.ready_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
