"""Zero-code Python relay: GET /<anything>/<id> -> GET <upstream><prefix><id>, answered as is.

No ebpf-bridge code and no traceparent forwarding: stitching alone must join its spans. The
upstream calls share a small keep-alive pool across request threads, so concurrent requests
reuse the same connections.
"""

from __future__ import annotations

import argparse
from http.server import BaseHTTPRequestHandler

import urllib3
from _ready import serve


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on")
    ap.add_argument("--upstream", required=True, help="for example http://127.0.0.1:8082")
    ap.add_argument("--prefix", default="/stock/sku-")
    ap.add_argument("--ready-file", required=True)
    a = ap.parse_args()
    pool = urllib3.PoolManager(maxsize=2, block=True)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            ident = self.path.rsplit("/", 1)[-1]
            body = pool.request("GET", f"{a.upstream}{a.prefix}{ident}", timeout=10).data
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Quiet."""

    serve(Handler, a.port, a.ready_file, a.host)


if __name__ == "__main__":
    main()
