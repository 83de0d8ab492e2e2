"""Regenerate tests/unit/fixtures/mysql/*.json from a real MariaDB server.

A throwaway mariadbd (temporary datadir, loopback, --skip-grant-tables) is driven by PyMySQL,
by raw binary-protocol packets (COM_STMT_PREPARE / EXECUTE / CLOSE), by mysql-connector-python's
server-side prepared statements and by the ``mariadb`` CLI,
through a tiny TCP proxy that records every chunk each side sent. The recording is then paired
the way bpf/agent.bpf.c pairs a client connection (bytes the server sends before any request
are dropped, request bytes run until the server answers, the next request ends the exchange,
the first REQ_CAP / RESP_CAP bytes of each side are kept) and written as one JSON file per
scenario: a list of connections, each a list of exchanges with hex bytes and total counts.

    sudo .venv/bin/python tests/fixtures_capture/capture_mysql.py [SCENARIO...]  # root: mariadbd

With scenario names (pymysql, binary, cli, connector), only those fixtures are rewritten.

The start/stop helpers and the raw-packet client are also used by tests/e2e/test_mysql.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REQ_CAP = 1024
RESP_CAP = 512
OUT = Path(__file__).resolve().parents[1] / "unit" / "fixtures" / "mysql"
MARIADBD = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
INSTALL_DB = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db") or ""
MARIADB_CLI = shutil.which("mariadb") or "/usr/bin/mariadb"


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def mariadbd(tmp: Path, timeout: float = 60.0) -> Iterator[int]:
    """Run a throwaway mariadbd in ``tmp``; yield its port once it answers a connection."""
    data = tmp / "mysql-data"
    subprocess.run([INSTALL_DB, f"--datadir={data}", "--user=root", "--skip-test-db",
                    "--auth-root-authentication-method=normal"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, timeout=timeout)
    port = free_port()
    proc = subprocess.Popen(
        [MARIADBD, "--no-defaults", f"--datadir={data}", f"--port={port}",
         "--bind-address=127.0.0.1", f"--socket={data}/sock", "--skip-grant-tables",
         "--user=root", f"--pid-file={data}/pid", f"--log-error={data}/err",
         "--innodb-buffer-pool-size=16M", "--skip-log-bin"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mariadbd exited: {_tail(data / 'err')}")
            with contextlib.suppress(OSError), \
                    socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if len(s.recv(64)) > 4:  # the greeting: the server is serving
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"mariadbd not ready: {_tail(data / 'err')}")
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _tail(path: Path) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-15:])
    except OSError:
        return "(no log)"


# --- raw binary protocol, on top of PyMySQL's handshake -----------------------------------


def _read_result(conn: Any) -> list[Any]:
    """Read one answer (OK/ERR, or a result set in the text or binary protocol) as packets."""
    first = conn._read_packet()  # raises on an ERR packet
    if first.is_ok_packet() or first.is_eof_packet():
        return [first]
    ncols = first.read_length_encoded_integer()
    for _ in range(ncols):
        conn._read_packet()
    conn._read_packet()  # EOF after the column definitions
    rows: list[Any] = []
    while True:
        pkt = conn._read_packet()
        if pkt.is_eof_packet():
            return rows
        rows.append(pkt)


def stmt_prepare(conn: Any, query: str) -> int:
    """COM_STMT_PREPARE; returns the statement id (raises on an ERR answer)."""
    conn._execute_command(0x16, query)
    ok = conn._read_packet()
    data = ok.get_all_data()
    stmt_id, ncols, nparams = struct.unpack_from("<IHH", data, 1)
    for _ in range(nparams):
        conn._read_packet()
    if nparams:
        conn._read_packet()
    for _ in range(ncols):
        conn._read_packet()
    if ncols:
        conn._read_packet()
    return int(stmt_id)


def stmt_execute(conn: Any, stmt_id: int, params: list[int | str]) -> int:
    """COM_STMT_EXECUTE with integer/string parameters; returns the number of rows."""
    body = struct.pack("<IBI", stmt_id, 0, 1)
    if params:
        body += bytes((len(params) + 7) // 8) + b"\x01"
        values = b""
        for p in params:
            if isinstance(p, int):
                body += b"\x08\x00"  # MYSQL_TYPE_LONGLONG
                values += struct.pack("<q", p)
            else:
                raw = p.encode()
                body += b"\xfd\x00"  # MYSQL_TYPE_VAR_STRING
                values += bytes([len(raw)]) + raw
        body += values
    conn._execute_command(0x17, body)
    return len(_read_result(conn))


def stmt_close(conn: Any, stmt_id: int) -> None:
    """COM_STMT_CLOSE (no answer: it rides along with the next command)."""
    conn._execute_command(0x19, struct.pack("<I", stmt_id))


# --- recording proxy and kernel pairing ------------------------------------------------------


class Recorder:
    """A TCP proxy on loopback recording each connection's chunks as (client_to_server, bytes)."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.conns: list[list[tuple[bool, bytes]]] = []
        self._lock = threading.Lock()
        self._srv = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._srv.getsockname()[1])
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self._srv.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.upstream))
            log: list[tuple[bool, bytes]] = []
            with self._lock:
                self.conns.append(log)
            for src, dst, c2s in ((c, up, True), (up, c, False)):
                t = threading.Thread(target=self._pump, args=(src, dst, c2s, log), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, c2s: bool,
              log: list[tuple[bool, bytes]]) -> None:
        try:
            while chunk := src.recv(65536):
                with self._lock:
                    log.append((c2s, chunk))
                dst.sendall(chunk)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """Stop accepting and wait for the pumps to drain."""
        self._srv.close()
        for t in self._threads:
            t.join(5)


def pair(chunks: list[tuple[bool, bytes]]) -> list[dict[str, Any]]:
    """Exchanges as the kernel emits them for the client side of one connection."""
    out: list[dict[str, Any]] = []
    phase = "idle"
    cur: dict[str, Any] = {}
    for c2s, data in chunks:
        if c2s:
            if phase == "resp":
                out.append(cur)
                phase = "idle"
            if phase == "idle":
                cur = {"request": b"", "response": b"", "req_bytes": 0, "resp_bytes": 0}
                phase = "req"
            cur["request"] = (cur["request"] + data)[:REQ_CAP]
            cur["req_bytes"] += len(data)
        else:
            if phase == "idle":
                continue  # the greeting: the kernel drops it as an unmatched response
            phase = "resp"
            cur["response"] = (cur["response"] + data)[:RESP_CAP]
            cur["resp_bytes"] += len(data)
    if phase != "idle":
        out.append(cur)
    return [{**e, "request": e["request"].hex(), "response": e["response"].hex()} for e in out]


def record(port: int, scenario: Callable[[int], None]) -> list[list[dict[str, Any]]]:
    """Run ``scenario(proxy_port)`` and return the paired exchanges of each connection."""
    rec = Recorder(port)
    try:
        scenario(rec.port)
    finally:
        time.sleep(0.2)
        rec.close()
    return [pair(c) for c in rec.conns]


# --- scenarios ------------------------------------------------------------------------------


def _connect(port: int, db: str | None = None) -> Any:
    import pymysql

    return pymysql.connect(host="127.0.0.1", port=port, user="root", password="",
                           database=db, autocommit=True)


def scenario_pymysql(port: int) -> None:
    """Queries with and without a database, an error, USE, select_db, a long query."""
    conn = _connect(port)
    with conn.cursor() as cur:
        cur.execute("CREATE DATABASE IF NOT EXISTS shop")
        cur.execute("USE shop")
        cur.execute("CREATE TABLE IF NOT EXISTS orders (id INT PRIMARY KEY, tenant VARCHAR(40),"
                    " total DECIMAL(10,2))")
        cur.execute("INSERT INTO orders VALUES (%s, %s, %s)", (1, "acme", 12.5))
        cur.execute("SELECT id, tenant, total FROM orders WHERE tenant = %s", ("acme",))
        cur.fetchall()
        with contextlib.suppress(Exception):
            cur.execute("SELECT * FROM missing_table")
        conn.select_db("mysql")
        cur.execute("SELECT COUNT(*) FROM db")
        cur.execute("SELECT id FROM shop.orders WHERE tenant IN (" + ", ".join(
            f"'tenant-{i:04d}'" for i in range(120)) + ")")
        conn.ping()
    conn.close()
    conn = _connect(port, db="shop")
    with conn.cursor() as cur:
        cur.execute("UPDATE orders SET total = 13 WHERE id = 1")
    conn.close()


def scenario_binary(port: int) -> None:
    """Server-side prepared statements over the binary protocol, and a refused prepare."""
    conn = _connect(port, db="shop")
    sid = stmt_prepare(conn, "SELECT id, total FROM orders WHERE id = ? AND tenant = ?")
    stmt_execute(conn, sid, [1, "acme"])
    stmt_execute(conn, sid, [2, "other"])
    sid2 = stmt_prepare(conn, "INSERT INTO orders (id, tenant, total) VALUES (?, ?, 1)")
    stmt_close(conn, sid)
    stmt_execute(conn, sid2, [7, "globex"])
    stmt_close(conn, sid2)
    with conn.cursor() as cur:
        cur.execute("DELETE FROM orders WHERE id = 7")
    with contextlib.suppress(Exception):
        stmt_prepare(conn, "SELECT * FROM nope WHERE id = ?")
    conn.close()


def scenario_connector(port: int) -> None:
    """mysql-connector-python's server-side prepared statements (``cursor(prepared=True)``):
    several parameter types, NULLs, re-execution of one statement, a statement replaced by the
    next on the same cursor, an execute the server refuses, and a refused prepare."""
    import datetime
    import decimal

    import mysql.connector

    conn = mysql.connector.connect(host="127.0.0.1", port=port, user="root", password="",
                                   database="shop", autocommit=True, use_pure=True)
    plain = conn.cursor()
    plain.execute("CREATE TABLE IF NOT EXISTS typed (id INT PRIMARY KEY, n INT, f DOUBLE,"
                  " d DECIMAL(10,2), t DATETIME, b VARBINARY(16), s VARCHAR(40))")
    plain.execute("DELETE FROM typed")
    cur = conn.cursor(prepared=True)
    insert = "INSERT INTO typed (id, n, f, d, t, b, s) VALUES (%s, %s, %s, %s, %s, %s, %s)"
    cur.execute(insert, (1, 10, 1.5, decimal.Decimal("2.25"),
                         datetime.datetime(2024, 5, 6, 7, 8, 9), b"\x00\x01", "acme"))
    cur.execute(insert, (2, None, None, None, None, None, None))
    cur.execute(insert, (3, -7, 0.0, decimal.Decimal("-1.00"), None, b"", "o'brien"))
    select = "SELECT id, n, s FROM typed WHERE id >= ? AND (s = ? OR s IS NULL)"
    for first, tenant in ((1, "acme"), (2, None), (3, "nobody")):
        cur.execute(select, (first, tenant))
        cur.fetchall()
    with contextlib.suppress(mysql.connector.Error):
        cur.execute(insert, (1, 0, 0.0, decimal.Decimal(0), None, None, "dup"))
    with contextlib.suppress(mysql.connector.Error):
        cur.execute("SELECT * FROM nope WHERE id = ?", (1,))
    cur.close()
    plain.close()
    conn.close()


def scenario_cli(port: int) -> None:
    """The mariadb CLI, as an unmodified client, with SQL-level PREPARE / EXECUTE."""
    sql = ("USE shop; SELECT tenant FROM orders WHERE id = 1; "
           "PREPARE s FROM 'SELECT total FROM orders WHERE id = ?'; SET @i = 1; "
           "EXECUTE s USING @i; DEALLOCATE PREPARE s;")
    subprocess.run([MARIADB_CLI, "--protocol=TCP", "-h", "127.0.0.1", "-P", str(port), "-u",
                    "root", "--skip-ssl", "-e", sql], check=True, stdout=subprocess.DEVNULL,
                   timeout=30)


SCENARIOS: dict[str, Callable[[int], None]] = {
    "pymysql": scenario_pymysql,
    "binary": scenario_binary,
    "cli": scenario_cli,
    "connector": scenario_connector,
}


def main(names: list[str]) -> None:
    """Capture the named scenarios (all when none is named) into OUT."""
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        raise SystemExit(f"unknown scenario {', '.join(unknown)}: pick from {', '.join(SCENARIOS)}")
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, mariadbd(Path(tmp)) as port:
        if names and "pymysql" not in names:
            record(port, scenario_pymysql)  # creates the shop database the others use
        for name, fn in SCENARIOS.items():
            if names and name not in names:
                continue
            conns = record(port, fn)
            path = OUT / f"{name}.json"
            path.write_text(json.dumps({"scenario": name, "connections": conns}, indent=1) + "\n")
            print(f"{path}: {len(conns)} connections, {sum(map(len, conns))} exchanges")


if __name__ == "__main__":
    os.umask(0o022)
    main(sys.argv[1:])
