"""Example inventory service in Python: plain HTTP, no ebpf-bridge code at all.

The e2e tests use it as a light stand-in for the demo's Java inventory
(examples/java/inventory), with the same GET /stock/<sku> contract.

GET /stock/<sku> answers {"sku": ..., "count": N}; GET /stock/fail-* answers 500, so the demo
and tests can show error spans.

    python inventory.py --port 8082 [--ready-file PATH]
"""

from __future__ import annotations

import argparse
import json
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class InventoryHandler(BaseHTTPRequestHandler):
    """GET /stock/<sku>."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        sku = self.path.rsplit("/", 1)[-1]
        if "fail" in sku:
            status, body = 500, {"error": "inventory database unavailable"}
        else:
            status, body = 200, {"sku": sku, "count": zlib.crc32(sku.encode()) % 7}
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
    ap.add_argument("--port", type=int, default=8082)
    ap.add_argument("--ready-file")
    args = ap.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), InventoryHandler)
    server.daemon_threads = True
    if args.ready_file:
        # Write then rename, so a watcher never reads a half-written file.
        tmp = Path(args.ready_file + ".tmp")
        tmp.write_text(str(server.server_address[1]))
        tmp.rename(args.ready_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
