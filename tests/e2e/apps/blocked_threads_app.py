"""An HTTP service that can park many threads inside recv(), for the bookkeeping-bound test.

Once ``<dir>/block`` exists it opens ``--threads`` TCP connections to a listener of its own and
gives each to a thread that blocks in ``recv``; when every one of those threads is inside the
syscall (``/proc/self/task/*/syscall``) it creates ``<dir>/blocked``. ``<dir>/release`` makes
the listener side close them all, so the threads return. GET on any path answers 200.

    python blocked_threads_app.py --port 0 --ready-file PATH --dir DIR --threads N
"""

from __future__ import annotations

import argparse
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from _ready import serve

_RECVFROM = 45  # x86-64 syscall number


def _in_recv() -> int:
    n = 0
    for task in os.listdir("/proc/self/task"):
        try:
            first = Path(f"/proc/self/task/{task}/syscall").read_text().split()[0]
        except (OSError, IndexError):
            continue
        n += first == str(_RECVFROM)
    return n


def _wait_for(path: Path) -> None:
    while not path.exists():
        time.sleep(0.01)


def park(base: Path, count: int) -> None:
    """Block ``count`` threads in recv until the release file appears."""
    _wait_for(base / "block")
    lsock = socket.create_server(("127.0.0.1", 0), backlog=count)
    accepted: list[socket.socket] = []

    def blocker() -> None:
        with socket.create_connection(lsock.getsockname()) as c:
            c.recv(1)

    threads = [threading.Thread(target=blocker, daemon=True) for _ in range(count)]
    for t in threads:
        t.start()
        accepted.append(lsock.accept()[0])
    while _in_recv() < count:
        time.sleep(0.01)
    (base / "blocked").write_text(str(count))
    _wait_for(base / "release")
    for s in accepted:
        s.close()
    for t in threads:
        t.join(10)
    (base / "released").write_text("")


def main() -> None:
    """Serve until killed."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ready-file", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--threads", type=int, default=100)
    a = ap.parse_args()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            body = b"ok"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    threading.Thread(target=park, args=(Path(a.dir), a.threads), daemon=True).start()
    serve(Handler, a.port, a.ready_file)


if __name__ == "__main__":
    main()
