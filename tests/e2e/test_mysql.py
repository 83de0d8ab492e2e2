"""MySQL/MariaDB client spans from a real mariadbd: PyMySQL (text and binary protocol) in an
annotated HTTP service, and the unmodified ``mariadb`` CLI picked up at exec.

The server is Debian's MariaDB, started per module in a temporary datadir; it is not traced
(server-role exchanges make no spans anyway).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pymysql
import pytest
import requests

from kernel_side.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.e2e.conftest import APPS, CLIENT, SERVER, Harness, by_service
from tests.e2e.test_annotate_http import warm_up
from tests.fixtures_capture import capture_mysql

pytestmark = pytest.mark.skipif(
    not (Path(capture_mysql.MARIADBD).exists() and capture_mysql.INSTALL_DB
         and shutil.which("mariadb")), reason="needs MariaDB server and client")

APP = "mysql-app"


@pytest.fixture(scope="module")
def db_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with capture_mysql.mariadbd(tmp_path_factory.mktemp("mariadb")) as port:
        conn = pymysql.connect(host="127.0.0.1", port=port, user="root", password="",
                               autocommit=True)
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE IF NOT EXISTS shop")
            cur.execute("CREATE TABLE IF NOT EXISTS shop.orders (id INT PRIMARY KEY,"
                        " tenant VARCHAR(40), total DECIMAL(10,2))")
        conn.close()
        yield port


def _db(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
    return [s for s in spans if s.kind == CLIENT and "db.system.name" in s.attributes]


def _start_app(harness: Harness, receiver: OtlpReceiver, db_port: int) -> int:
    app, port = harness.python_service(APP, APPS / "mysql_app.py", "--db-port", str(db_port))
    harness.agent("--pid", str(app.pid), receiver=receiver)
    warm_up(receiver, port)
    return port


def test_pymysql_text_and_binary_protocol(harness: Harness, receiver: OtlpReceiver,
                                          db_port: int) -> None:
    port = _start_app(harness, receiver, db_port)
    for name in ("pymysql", "binary"):
        r = requests.get(f"http://127.0.0.1:{port}/scenario/{name}",
                         headers={"X-Tenant-ID": f"scn-{name}"}, timeout=30)
        assert r.status_code == 200, r.text

    def done(ss: list[ReceivedSpan]) -> bool:
        db = _db(ss)
        return (any(s.attributes.get("tenant_id") == "scn-binary" and s.name == "SELECT nope"
                    for s in db)
                and any(s.name == "UPDATE orders" for s in db))

    spans = receiver.wait_for(done, timeout_s=30)
    text = [s for s in _db(spans) if s.attributes.get("tenant_id") == "scn-pymysql"]
    binary = [s for s in _db(spans) if s.attributes.get("tenant_id") == "scn-binary"]
    names = [s.name for s in text]
    for want in ("USE", "CREATE orders", "INSERT orders", "SELECT orders",
                 "SELECT missing_table", "SELECT db", "UPDATE orders"):
        assert want in names, names
    by = {s.name: s for s in text}
    ins = by["INSERT orders"]
    # PyMySQL's handshake does not reveal MariaDB; the local server's executable does.
    assert ins.attributes["db.system.name"] == "mariadb"
    assert ins.attributes["db.namespace"] == "shop"
    assert ins.attributes["db.operation.name"] == "INSERT"
    assert ins.attributes["db.collection.name"] == "orders"
    assert ins.attributes["db.query.text"] == "INSERT INTO orders VALUES (?, ?, ?)"
    assert ins.attributes["server.address"] == "127.0.0.1"
    assert ins.attributes["server.port"] == db_port
    assert "acme" not in by["SELECT orders"].attributes["db.query.text"]
    bad = by["SELECT missing_table"]
    assert bad.status_code == 2
    assert bad.attributes["db.response.status_code"] == "1146"
    assert bad.attributes["error.type"] == "1146"
    assert by["SELECT db"].attributes["db.namespace"] == "mysql"  # COM_INIT_DB (select_db)
    assert by["UPDATE orders"].attributes["db.namespace"] == "shop"  # handshake with a db
    truncated = by["SELECT shop.orders"]
    assert truncated.attributes["ebpf_bridge.capture.truncated"] is True

    # Binary protocol: each COM_STMT_EXECUTE is a span with the text stored at prepare time.
    bnames = [s.name for s in binary]
    assert bnames.count("SELECT orders") == 2, bnames
    assert "INSERT orders" in bnames and "DELETE orders" in bnames
    sel = next(s for s in binary if s.name == "SELECT orders")
    assert sel.attributes["db.query.text"] == (
        "SELECT id, total FROM orders WHERE id = ? AND tenant = ?")
    refused = next(s for s in binary if s.name == "SELECT nope")
    assert refused.status_code == 2 and refused.attributes["error.type"] == "1146"

    # Every DB span hangs under the HTTP server span of the request that ran it.
    servers = {s.span_id: s for s in by_service(spans, APP, SERVER)}
    for s in text + binary:
        parent = servers.get(s.parent_span_id or "")
        assert parent is not None, s.name
        assert parent.trace_id == s.trace_id
        assert parent.attributes["tenant_id"] == s.attributes["tenant_id"]


@contextlib.contextmanager
def _relay(to_port: int) -> Iterator[int]:
    """A plain TCP forwarder in this (untraced) process: to the agent's /proc lookup the server
    is a Python process, as a remote MariaDB behind a proxy would be anything but mariadbd."""
    lsock = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def pump(a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                b.sendall(data)
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)

    def accept() -> None:
        while not done.is_set():
            try:
                c, _ = lsock.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", to_port))
            threading.Thread(target=pump, args=(c, up), daemon=True).start()
            threading.Thread(target=pump, args=(up, c), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield lsock.getsockname()[1]
    finally:
        done.set()
        lsock.close()


def test_the_server_greeting_names_mariadb_behind_a_relay(harness: Harness,
                                                         receiver: OtlpReceiver,
                                                         db_port: int) -> None:
    # PyMySQL's handshake does not reveal MariaDB and the local process holding the server end
    # is the relay: only the greeting, which the kernel now hands over, can tell.
    with _relay(db_port) as relay_port:
        port = _start_app(harness, receiver, relay_port)
        for _ in range(3):  # one new PyMySQL connection (and greeting) per request
            r = requests.get(f"http://127.0.0.1:{port}/orders/scn-relay",
                             headers={"X-Tenant-ID": "scn-relay"}, timeout=30)
            assert r.status_code == 200, r.text
        spans = receiver.wait_for(lambda ss: len([
            s for s in _db(ss) if s.name == "SELECT orders"
            and s.attributes.get("tenant_id") == "scn-relay"]) >= 3, timeout_s=30)
    mine = [s for s in _db(spans) if s.attributes.get("tenant_id") == "scn-relay"]
    assert mine and {s.attributes["db.system.name"] for s in mine} == {"mariadb"}
    assert {s.attributes["server.port"] for s in mine} == {relay_port}


def test_connector_python_prepared_cursor(harness: Harness, receiver: OtlpReceiver,
                                          db_port: int) -> None:
    # mysql-connector-python's cursor(prepared=True): a real driver doing server-side
    # prepares, with NULL and typed parameters, re-executed statements and refused ones.
    port = _start_app(harness, receiver, db_port)
    r = requests.get(f"http://127.0.0.1:{port}/scenario/connector",
                     headers={"X-Tenant-ID": "scn-connector"}, timeout=30)
    assert r.status_code == 200, r.text

    def mine(ss: list[ReceivedSpan]) -> list[ReceivedSpan]:
        return [s for s in _db(ss) if s.attributes.get("tenant_id") == "scn-connector"]

    spans = sorted(mine(receiver.wait_for(lambda ss: any(s.name == "SELECT nope"
                                                         for s in mine(ss)), timeout_s=30)),
                   key=lambda s: s.start_ns)
    insert = "INSERT INTO typed (id, n, f, d, t, b, s) VALUES (?, ?, ?, ?, ?, ?, ?)"
    select = "SELECT id, n, s FROM typed WHERE id >= ? AND (s = ? OR s IS NULL)"
    inserts = [s for s in spans if s.name == "INSERT typed"]
    selects = [s for s in spans if s.name == "SELECT typed"]
    assert len(inserts) == 4 and len(selects) == 3, [s.name for s in spans]
    assert {s.attributes["db.query.text"] for s in inserts} == {insert}
    assert {s.attributes["db.query.text"] for s in selects} == {select}
    assert [s.status_code for s in inserts] == [0, 0, 0, 2]  # the last one: duplicate key
    assert inserts[-1].attributes["error.type"] == "1062"
    assert all(s.status_code == 0 for s in selects)
    (refused,) = [s for s in spans if s.name == "SELECT nope"]
    assert refused.status_code == 2 and refused.attributes["error.type"] == "1146"
    for s in inserts + selects:
        assert s.attributes["db.system.name"] == "mariadb"  # from the local mariadbd process
        assert s.attributes["db.namespace"] == "shop"
        assert s.attributes["server.port"] == db_port
    servers = {s.span_id: s for s in by_service(receiver.spans(), APP, SERVER)}
    for s in spans:
        assert servers[s.parent_span_id or ""].attributes["tenant_id"] == "scn-connector"


def test_tenant_lands_on_db_span_under_http_span(harness: Harness, receiver: OtlpReceiver,
                                                 db_port: int) -> None:
    port = _start_app(harness, receiver, db_port)
    tenants = [f"tenant-{i}" for i in range(8)] + ["acme"]
    for t in tenants:
        r = requests.get(f"http://127.0.0.1:{port}/orders/{t}", headers={"X-Tenant-ID": t},
                         timeout=10)
        assert r.status_code == 200 and r.json()["tenant"] == t

    def done(ss: list[ReceivedSpan]) -> bool:
        have = {s.attributes.get("tenant_id") for s in _db(ss)}
        srv = {s.attributes.get("tenant_id") for s in by_service(ss, APP, SERVER)}
        return set(tenants) <= have and set(tenants) <= srv

    spans = receiver.wait_for(done, timeout_s=30)
    for t in tenants:
        srv = [s for s in by_service(spans, APP, SERVER) if s.attributes.get("tenant_id") == t]
        db = [s for s in _db(spans) if s.attributes.get("tenant_id") == t]
        # PyMySQL's connect sends SET NAMES, then the handler's query runs.
        assert len(srv) == 1 and sorted(s.name for s in db) == ["SELECT orders", "SET"], (t, db)
        assert all(s.parent_span_id == srv[0].span_id for s in db)
        span = next(s for s in db if s.name == "SELECT orders")
        assert span.parent_span_id == srv[0].span_id
        assert span.trace_id == srv[0].trace_id
        assert span.attributes["db.namespace"] == "shop"
        assert span.attributes["server.port"] == db_port
        assert srv[0].start_ns <= span.start_ns <= span.end_ns <= srv[0].end_ns
        assert span.resource["service.name"] == APP


def test_mariadb_cli_unmodified_peer(harness: Harness, receiver: OtlpReceiver,
                                     db_port: int) -> None:
    harness.agent("--exe", "mariadb", receiver=receiver)
    sql = ("USE shop; SELECT tenant FROM orders WHERE id = 1; SELECT * FROM nowhere;")
    res = subprocess.run([capture_mysql.MARIADB_CLI, "--protocol=TCP", "-h", "127.0.0.1", "-P",
                          str(db_port), "-u", "root", "--skip-ssl", "--force", "-e", sql],
                         capture_output=True, timeout=30)
    assert b"1146" in res.stderr, res.stderr
    capture_mysql.scenario_cli(db_port)  # SQL-level PREPARE / EXECUTE (COM_QUERY)

    spans = receiver.wait_for(
        lambda ss: any(s.name == "DEALLOCATE" for s in _db(ss))
        and any(s.name == "SELECT nowhere" for s in _db(ss)), timeout_s=30)
    db = _db(spans)
    assert {s.attributes["db.system.name"] for s in db} == {"mariadb"}
    assert all(s.resource.get("process.executable.name") == "mariadb" for s in db)
    sel = [s for s in db if s.name == "SELECT orders"]
    assert len(sel) == 2
    assert all(s.attributes["db.namespace"] == "shop" for s in sel)  # COM_INIT_DB
    miss = next(s for s in db if s.name == "SELECT nowhere")
    assert miss.status_code == 2 and miss.attributes["db.response.status_code"] == "1146"
    names = [s.name for s in db]
    assert "PREPARE" in names and "EXECUTE" in names
