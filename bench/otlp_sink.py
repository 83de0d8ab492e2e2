"""A discarding OTLP/HTTP receiver for benchmarks: the stand-in for a Collector.

Accepts ``POST /v1/traces`` with a protobuf body, reads it whole, answers ``200`` with an empty
``ExportTraceServiceResponse`` (an empty body is a valid one) and throws the bytes away. It
counts requests and body bytes and prints them on SIGTERM/SIGINT, so a benchmark can check that
the agent really exported. It does not decode: decoding is the Collector's cost, not the
agent's, and a Python decoder on the agent's core would steal the CPU being measured.

    .venv/bin/python bench/otlp_sink.py --port 4318 [--ready-file F]
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType


class _Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.bytes = 0


COUNTS = _Counts()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if self.path != "/v1/traces":
            self.send_error(404, "only /v1/traces")
            return
        with COUNTS.lock:
            COUNTS.requests += 1
            COUNTS.bytes += len(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        return


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--ready-file", help="created once the port accepts connections")
    args = ap.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), _Handler)
    server.daemon_threads = True

    def stop(_sig: int, _frame: FrameType | None) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if args.ready_file:
        Path(args.ready_file).write_text("ready\n")
    server.serve_forever(poll_interval=0.5)
    print(f"otlp_sink requests={COUNTS.requests} bytes={COUNTS.bytes}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
