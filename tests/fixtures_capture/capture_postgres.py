"""Regenerate tests/unit/fixtures/postgres/: real PostgreSQL wire bytes of psycopg sessions.

Starts a throwaway PostgreSQL (initdb into a temp dir, run as the ``postgres`` user, unix socket
in the temp dir plus TCP on a free loopback port, trust auth), puts a recording TCP proxy in
front of it, runs one psycopg session per scenario through the proxy and saves each session as
a list of exchanges, split the way the kernel pairs them: the bytes the client sent before the
server answered, then the server's answer.

    sudo .venv/bin/python tests/fixtures_capture/capture_postgres.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import psycopg

PG_BIN = Path("/usr/lib/postgresql/15/bin")
OUT = Path(__file__).resolve().parents[1] / "unit" / "fixtures" / "postgres"


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def postgres_server() -> Iterator[int]:
    """A throwaway PostgreSQL on 127.0.0.1; yields its port."""
    tmp = Path(tempfile.mkdtemp(prefix="pgcap-"))
    shutil.chown(tmp, "postgres", "postgres")
    data = tmp / "data"
    run_as = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*run_as, str(PG_BIN / "initdb"), "-A", "trust", "-U", "postgres",
                    "-D", str(data)], check=True, capture_output=True)
    port = free_port()
    proc = subprocess.Popen([*run_as, str(PG_BIN / "postgres"), "-D", str(data), "-p", str(port),
                             "-k", str(tmp), "-c", "listen_addresses=127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1", "-p", str(port)]).returncode:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("postgres did not start")
            time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)


class RecordingProxy:
    """Forwards one loopback port to another and records each connection's byte stream."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self.sessions: list[list[tuple[str, bytes]]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            log: list[tuple[str, bytes]] = []
            with self._lock:
                self.sessions.append(log)
            for src, dst, tag in ((client, server, "c"), (server, client, "s")):
                threading.Thread(target=self._pump, args=(src, dst, tag, log), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, tag: str,
              log: list[tuple[str, bytes]]) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                with suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            with self._lock:
                log.append((tag, data))
            dst.sendall(data)

    def close(self) -> None:
        """Stop accepting."""
        self.sock.close()


def exchanges(log: list[tuple[str, bytes]]) -> list[dict[str, str]]:
    """Pair the stream as the kernel does: client bytes until the server answers, then the
    server's bytes until the client speaks again."""
    out: list[dict[str, str]] = []
    req, resp = b"", b""
    for tag, data in log:
        if tag == "c":
            if resp:
                out.append({"request": req.hex(), "response": resp.hex()})
                req, resp = b"", b""
            req += data
        else:
            resp += data
    if req or resp:
        out.append({"request": req.hex(), "response": resp.hex()})
    return out


def _simple(conn: psycopg.Connection) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS users (id int PRIMARY KEY, name text)")
    conn.execute("INSERT INTO users VALUES (1, 'alice'), (2, 'bob') ON CONFLICT DO NOTHING")
    conn.execute("SELECT name FROM users WHERE id = 1").fetchall()


def _extended(conn: psycopg.Connection) -> None:
    conn.execute("SELECT name FROM users WHERE id = %s", (2,), prepare=False).fetchall()
    conn.execute("UPDATE users SET name = %s WHERE id = %s", ("carol", 2), prepare=False)


def _prepared(conn: psycopg.Connection) -> None:
    for i in (1, 2, 1):
        conn.execute("SELECT name FROM users WHERE id = %s", (i,), prepare=True).fetchall()


def _error(conn: psycopg.Connection) -> None:
    for args in ((), (1,)):
        with suppress(psycopg.errors.UndefinedTable):
            conn.execute("SELECT * FROM missing_table WHERE id = %s" if args
                         else "SELECT * FROM missing_table", args or None)


def _transaction(conn: psycopg.Connection) -> None:
    with conn.transaction():
        conn.execute("DELETE FROM users WHERE id IN (%s, %s, %s)", (7, 8, 9))


SCENARIOS: dict[str, tuple[Callable[[psycopg.Connection], None], dict[str, object]]] = {
    "simple": (_simple, {"autocommit": True, "sslmode": "prefer"}),
    "extended": (_extended, {"autocommit": True, "sslmode": "disable"}),
    "prepared": (_prepared, {"autocommit": True, "sslmode": "disable"}),
    "error": (_error, {"autocommit": True, "sslmode": "disable"}),
    "transaction": (_transaction, {"autocommit": False, "sslmode": "disable"}),
}


def main() -> None:
    """Capture every scenario and write one JSON file each."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with postgres_server() as pg_port:
        proxy = RecordingProxy(pg_port)
        for name, (fn, opts) in SCENARIOS.items():
            before = len(proxy.sessions)
            dsn = (f"host=127.0.0.1 port={proxy.port} user=postgres dbname=postgres "
                   f"sslmode={opts['sslmode']} gssencmode=disable")
            with psycopg.connect(dsn, autocommit=bool(opts["autocommit"])) as conn:
                fn(conn)
            time.sleep(0.2)  # let the pumps record the Terminate and the close
            log = proxy.sessions[before]
            (args.out / f"{name}.json").write_text(json.dumps(
                {"scenario": name, "database": "postgres", "exchanges": exchanges(log)},
                indent=1) + "\n")
            print(f"{name}: {len(exchanges(log))} exchanges")
        proxy.close()


if __name__ == "__main__":
    os.umask(0o022)
    main()
