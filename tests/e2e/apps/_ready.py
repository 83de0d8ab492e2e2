"""Readiness files for the e2e test apps, written whole (a temporary file, then a rename), so a
test that polls for the file never reads half of it. The apps run as scripts, with this folder
first on ``sys.path``."""

from __future__ import annotations

from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def write_ready(path: str, value: object) -> None:
    """Create ``path`` holding ``str(value)`` (usually the port the app listens on)."""
    tmp = Path(path + ".tmp")
    tmp.write_text(str(value))
    tmp.replace(path)


def serve(handler: type[BaseHTTPRequestHandler], port: int, ready_file: str,
          host: str = "127.0.0.1") -> None:
    """Serve ``handler`` on ``host``:``port`` (0: any), a thread per request, write the port
    to ``ready_file``, and serve until killed."""
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    write_ready(ready_file, server.server_address[1])
    server.serve_forever()
