"""Byte-exact HTTP/1.1 echo for the injection tests: for each request on a keep-alive
connection, answers JSON with the request head exactly as it arrived (latin-1) and the SHA-256
of its body. A plain socket server, so nothing normalises the bytes it reports."""

from __future__ import annotations

import argparse
import hashlib
import json
import select
import socket
import threading

from _http import read_message
from _ready import write_ready


def _serve_conn(conn: socket.socket) -> None:
    buf = b""
    with conn:
        while (msg := read_message(conn, buf)) is not None:
            head, body, buf = msg
            out = json.dumps({"head": (head + b"\r\n\r\n").decode("latin-1"),
                              "body_sha256": hashlib.sha256(body).hexdigest()}).encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(out)).encode() + b"\r\n\r\n" + out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ready-file", required=True)
    a = ap.parse_args()
    srv = socket.create_server((a.host, a.port))
    write_ready(a.ready_file, srv.getsockname()[1])
    while True:
        # accept() only once a connection is waiting: an agent started after this server sees
        # the whole accept syscall (it learns sockets from accept's enter and exit).
        select.select([srv], [], [])
        conn, _ = srv.accept()
        threading.Thread(target=_serve_conn, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
