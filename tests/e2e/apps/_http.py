"""Reading one HTTP/1.1 message (head and Content-Length body) off a plain socket, for the
byte-exact test apps (raw_echo.py, raw_client.py)."""

from __future__ import annotations

import socket


def read_message(sock: socket.socket, buf: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(head without its blank line, body, bytes after the body) of the next message, whose
    start may already be in ``buf``; None when the peer closed the connection first."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            return None
        buf += data
    head, _, buf = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(buf) < length:
        data = sock.recv(65536)
        if not data:
            return None
        buf += data
    return head, buf[:length], buf[length:]
