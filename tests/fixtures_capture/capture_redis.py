"""Regenerate tests/unit/fixtures/redis/ from a real redis-server.

Starts ``redis-server`` on a free port (no persistence), and for each scenario opens a raw
socket, writes the request bytes exactly as a client would (RESP arrays, or inline lines),
reads everything the server answers, and saves ``<scenario>.req`` and ``<scenario>.resp``.
A scenario may first run setup commands on the same connection (``HELLO 3``, ``SELECT``):
those bytes are not saved, so each fixture is one exchange as the kernel would pair it.

    python tests/fixtures_capture/capture_redis.py [--out DIR]

Reading stops once the server has been silent for a moment after the expected number of
replies began arriving: this is a generator of test data, not a test.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "unit" / "fixtures" / "redis"


def pack(*args: str | bytes) -> bytes:
    """One command as a RESP array of bulk strings (what every client library sends)."""
    out = [f"*{len(args)}\r\n".encode()]
    for a in args:
        raw = a.encode() if isinstance(a, str) else a
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


# name -> (setup bytes sent first on the same connection, request bytes)
SCENARIOS: dict[str, tuple[bytes, bytes]] = {
    "hello3": (b"", pack("HELLO", "3")),
    "client_setinfo": (b"", pack("CLIENT", "SETINFO", "LIB-NAME", "redis-py")
                       + pack("CLIENT", "SETINFO", "LIB-VER", "5.0.0")),
    "set": (b"", pack("SET", "user:42", "alice")),
    "get": (pack("SET", "user:42", "alice"), pack("GET", "user:42")),
    "get_missing": (b"", pack("GET", "nope")),
    "pipeline": (b"", pack("SET", "a", "1") + pack("INCR", "a") + pack("GET", "a")
                 + pack("GET", "missing") + pack("DEL", "a")),
    "wrongtype": (pack("SET", "s", "x"), pack("LPUSH", "s", "y")),
    "unknown_command": (b"", pack("FOO", "secret-arg")),
    "multi_exec": (pack("SET", "str", "x"),
                   pack("MULTI") + pack("SET", "t", "1") + pack("INCR", "t")
                   + pack("LPUSH", "str", "y") + pack("EXEC")),
    "exec_abort": (b"", pack("MULTI") + pack("NOSUCHCMD") + pack("SET", "k", "v")
                   + pack("EXEC")),
    "select_get": (b"", pack("SELECT", "2") + pack("GET", "k")),
    "resp2_hgetall": (pack("HSET", "h", "f1", "v1", "f2", "v2"), pack("HGETALL", "h")),
    "resp3_hgetall": (pack("HELLO", "3") + pack("HSET", "h", "f1", "v1", "f2", "v2"),
                      pack("HGETALL", "h")),
    "resp3_smembers": (pack("HELLO", "3") + pack("SADD", "st", "m1", "m2"),
                       pack("SMEMBERS", "st")),
    "resp3_double": (pack("HELLO", "3") + pack("ZADD", "z", "1.5", "m"),
                     pack("ZSCORE", "z", "m")),
    # CLIENT TRACKING in RESP3: writing a key this connection read sends an invalidation push
    # on the same connection.
    "resp3_push": (pack("HELLO", "3") + pack("CLIENT", "TRACKING", "ON") + pack("SET", "tk", "0")
                   + pack("GET", "tk"),
                   pack("SET", "tk", "1") + pack("GET", "tk")),
    "inline": (b"", b"PING\r\nSET ik \"two words\"\r\nGET ik\r\n"),
    "big_value": (b"", pack("SET", "big", "v" * 2000) + pack("GET", "big")),
    "lrange": (pack("RPUSH", "l", *[f"item-{i}" for i in range(100)]),
               pack("LRANGE", "l", "0", "-1")),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _read_all(sock: socket.socket, quiet_s: float = 0.2) -> bytes:
    sock.settimeout(quiet_s)
    chunks = []
    while True:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server not found")
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen([server, "--port", str(port), "--save", "", "--appendonly",
                                 "no", "--daemonize", "no", "--dir", tmp],
                                stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                        s.sendall(pack("PING"))
                        if s.recv(16) == b"+PONG\r\n":
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("redis-server did not start")
                time.sleep(0.05)
            args.out.mkdir(parents=True, exist_ok=True)
            for name, (setup, request) in SCENARIOS.items():
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.sendall(pack("FLUSHALL"))
                    _read_all(s)
                    if setup:
                        s.sendall(setup)
                        _read_all(s)
                    s.sendall(request)
                    response = _read_all(s)
                (args.out / f"{name}.req").write_bytes(request)
                (args.out / f"{name}.resp").write_bytes(response)
                print(f"{name}: {len(request)} request bytes, {len(response)} response bytes")
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
