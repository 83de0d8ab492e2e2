"""A small threaded HTTP/1.1 server (and keep-alive client) for the HTTP edge-case e2e tests.

Server endpoints (every other GET path answers 200 with a short body naming the path):
  GET  /big/<n>               n bytes of body, Content-Length framed, written in one write
  GET  /chunked/<parts>       Transfer-Encoding: chunked, one write per chunk (plus head, end)
  GET  /slow/<ms>             head written, a pause of <ms>, then the body in two writes
  GET  /status/<code>         that status with a short body
  POST /echo/...              reads the Content-Length body, answers it back
  anything with "Connection: close" closes after answering

    python edge_server.py --port 0 --ready-file PATH
    python edge_server.py client --port N --go-file F --ready-file R --out O PATH...

The client mode sends GETs for PATHs, in order, on one http.client connection once the go file
exists, and writes one "<path> <status>" line per response to the out file (tmp+rename).
"""

from __future__ import annotations

import argparse
import http.client
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def _write_atomic(path: str, text: str) -> None:
    tmp = Path(path + ".tmp")
    tmp.write_text(text)
    tmp.rename(path)


class EdgeHandler(BaseHTTPRequestHandler):
    """See the module docstring."""

    protocol_version = "HTTP/1.1"

    def _answer(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        parts = self.path.split("?", 1)[0].strip("/").split("/")
        head, arg = parts[0], parts[1] if len(parts) > 1 else ""
        if head == "big" and arg.isdigit():
            self._answer(200, b"x" * int(arg), "application/octet-stream")
        elif head == "chunked" and arg.isdigit():
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(int(arg)):
                data = f"chunk {i} of {arg}\n".encode() * (i + 1)
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif head == "slow" and arg.isdigit():
            body = b"slow body, first half|slow body, second half\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            time.sleep(int(arg) / 1000)  # the scenario: a response split in time
            self.wfile.write(body[:21])
            time.sleep(int(arg) / 1000)
            self.wfile.write(body[21:])
        elif head == "status" and arg.isdigit():
            self._answer(int(arg), f"status {arg}\n".encode())
        else:
            self._answer(200, f"path {self.path}\n".encode())

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        self._answer(200, body, "application/octet-stream")

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


def serve(port: int, ready_file: str | None) -> None:
    """Serve until killed."""
    server = ThreadingHTTPServer(("127.0.0.1", port), EdgeHandler)
    server.daemon_threads = True
    if ready_file:
        _write_atomic(ready_file, str(server.server_address[1]))
    server.serve_forever()


def client(port: int, go_file: str, ready_file: str, out: str, paths: list[str]) -> None:
    """Wait for the go file, then GET every path on one keep-alive connection."""
    _write_atomic(ready_file, str(os.getpid()))
    deadline = time.monotonic() + 60
    while not os.path.exists(go_file):
        if time.monotonic() > deadline:
            sys.exit("go file never appeared")
        time.sleep(0.01)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    lines = []
    for path in paths:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        lines.append(f"{path} {resp.status}")
    conn.close()
    _write_atomic(out, "\n".join(lines) + "\n")


def main() -> None:
    """Server by default; ``client`` as first argument for the keep-alive client."""
    if sys.argv[1:2] == ["client"]:
        ap = argparse.ArgumentParser()
        ap.add_argument("--port", type=int, required=True)
        ap.add_argument("--go-file", required=True)
        ap.add_argument("--ready-file", required=True)
        ap.add_argument("--out", required=True)
        ap.add_argument("paths", nargs="+")
        a = ap.parse_args(sys.argv[2:])
        client(a.port, a.go_file, a.ready_file, a.out, a.paths)
        return
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ready-file")
    a = ap.parse_args()
    serve(a.port, a.ready_file)


if __name__ == "__main__":
    main()
