"""Readiness files for the e2e test apps, written whole (a temporary file, then a rename), so a
test that polls for the file never reads half of it. The apps run as scripts, with this folder
first on ``sys.path``."""

from __future__ import annotations

import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _V6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def write_ready(path: str, value: object) -> None:
    """Create ``path`` holding ``str(value)`` (usually the port the app listens on)."""
    tmp = Path(path + ".tmp")
    tmp.write_text(str(value))
    tmp.replace(path)


def serve(handler: type[BaseHTTPRequestHandler], port: int, ready_file: str,
          host: str = "127.0.0.1") -> None:
    """Serve ``handler`` on ``host``:``port`` (0: any; an IPv6 ``host`` such as ``::1`` gets an
    IPv6 socket), a thread per request, write the port to ``ready_file``, and serve until
    killed."""
    server = (_V6Server if ":" in host else ThreadingHTTPServer)((host, port), handler)
    server.daemon_threads = True
    write_ready(ready_file, server.server_address[1])
    server.serve_forever()
