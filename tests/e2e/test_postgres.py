"""PostgreSQL client spans from real clients against a real PostgreSQL, through the agent.

A throwaway PostgreSQL (initdb -A trust, run as the postgres user, TCP on a free port) serves:
psycopg (simple, extended, named prepared statements, an error), pgbench as an unmodified
peer client, and a tenant-annotated HTTP service whose query spans join its request's trace.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from kernel_side.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.e2e.conftest import APPS, CLIENT, PYTHON, SERVER, Harness, by_service
from tests.e2e.test_annotate_http import warm_up

PG_BIN = Path("/usr/lib/postgresql/15/bin")
pytestmark = pytest.mark.skipif(not (PG_BIN / "postgres").exists()
                                or not (PG_BIN / "pgbench").exists(),
                                reason="PostgreSQL 15 server binaries not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_postgres(superuser_password: str | None = None) -> Iterator[int]:
    """A throwaway PostgreSQL on 127.0.0.1; yields its port.

    Trust auth by default; with ``superuser_password``, TCP clients must send that password in
    clear text (``password`` method), so the PasswordMessage crosses the socket unencrypted.
    """
    tmp = Path(tempfile.mkdtemp(prefix="ebpf-bridge-pg-"))
    shutil.chown(tmp, "postgres", "postgres")
    run_as = ["runuser", "-u", "postgres", "--"]
    auth = ["-A", "trust"]
    if superuser_password is not None:
        pwfile = tmp / "pw"
        pwfile.write_text(superuser_password + "\n")
        shutil.chown(pwfile, "postgres", "postgres")
        auth = ["--auth-local=trust", "--auth-host=password", f"--pwfile={pwfile}"]
    subprocess.run([*run_as, str(PG_BIN / "initdb"), *auth, "-U", "postgres",
                    "-D", str(tmp / "data")], check=True, capture_output=True)
    port = _free_port()
    log = (tmp / "postgres.log").open("wb")
    proc = subprocess.Popen([*run_as, str(PG_BIN / "postgres"), "-D", str(tmp / "data"),
                             "-p", str(port), "-k", str(tmp), "-c", "listen_addresses=127.0.0.1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1", "-p", str(port)]).returncode:
            assert proc.poll() is None, (tmp / "postgres.log").read_text()
            assert time.monotonic() < deadline, "postgres not ready"
            time.sleep(0.1)
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # fast shutdown: do not wait for clients
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def pg_port() -> Iterator[int]:
    """A throwaway PostgreSQL on 127.0.0.1 (trust auth); yields its port."""
    with running_postgres() as port:
        yield port


def _db(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
    return [s for s in spans if s.attributes.get("db.system.name") == "postgresql"]


# Runs only once the test creates the go file, so the agent sees the connection from its start.
_CLIENT = """
import sys, time, pathlib, psycopg
go, done, port = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
pathlib.Path(sys.argv[1] + ".waiting").write_text("")
while not go.exists():
    time.sleep(0.02)
dsn = f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
with psycopg.connect(dsn, autocommit=True) as conn:
    conn.execute("SELECT 42 AS simple_marker", prepare=False).fetchall()
    conn.execute("SELECT %s::int AS ext_marker", (7,), prepare=False).fetchall()
    for i in range(3):
        conn.execute("SELECT %s::text AS prep_marker", (str(i),), prepare=True).fetchall()
    try:
        conn.execute("SELECT * FROM missing_table_e2e")
    except psycopg.errors.UndefinedTable:
        pass
done.write_text("ok")
"""


def test_psycopg_simple_extended_prepared_and_error(harness: Harness, receiver: OtlpReceiver,
                                                    pg_port: int) -> None:
    go = harness.tmp / "go"
    client = harness.start("pgclient", [PYTHON, "-c", _CLIENT, str(go), str(harness.tmp / "done"),
                                        str(pg_port)],
                           env={"OTEL_SERVICE_NAME": "pgclient"},
                           ready_file=harness.tmp / "go.waiting")
    harness.agent("--pid", str(client.pid), receiver=receiver)
    go.write_text("")
    assert client.popen.wait(30) == 0, client.log_text()

    def by_text(spans: list[ReceivedSpan], marker: str) -> list[ReceivedSpan]:
        return [s for s in _db(spans) if marker in str(s.attributes.get("db.query.text"))]

    spans = receiver.wait_for(lambda ss: len(by_text(ss, "missing_table_e2e")) >= 1
                              and len(by_text(ss, "prep_marker")) >= 3, timeout_s=30)
    spans = by_service(_db(spans), "pgclient", CLIENT)
    for s in spans:
        assert s.attributes["db.namespace"] == "postgres"
        assert s.attributes["server.address"] == "127.0.0.1"
        assert s.attributes["server.port"] == pg_port
        assert s.attributes["db.operation.name"] == "SELECT"

    simple = by_text(spans, "simple_marker")
    assert len(simple) == 1
    assert simple[0].attributes["db.query.text"] == "SELECT ? AS simple_marker"  # obfuscated
    assert simple[0].name == "SELECT"
    assert simple[0].status_code == 0

    ext = by_text(spans, "ext_marker")
    assert len(ext) == 1 and ext[0].attributes["db.query.text"] == "SELECT $1::int AS ext_marker"

    prep = by_text(spans, "prep_marker")  # one Parse, three Bind/Execute of the named statement
    assert len(prep) == 3
    assert {s.attributes["db.query.text"] for s in prep} == {"SELECT $1::text AS prep_marker"}

    err = by_text(spans, "missing_table_e2e")
    assert len(err) == 1
    assert err[0].name == "SELECT missing_table_e2e"
    assert err[0].attributes["db.collection.name"] == "missing_table_e2e"
    assert err[0].status_code == 2
    assert err[0].attributes["db.response.status_code"] == "42P01"
    assert err[0].attributes["error.type"] == "42P01"
    # Startup, SSL negotiation and Terminate make no spans.
    assert len(spans) == 6


def test_pgbench_unmodified_peer(harness: Harness, receiver: OtlpReceiver, pg_port: int) -> None:
    conn = ["-h", "127.0.0.1", "-p", str(pg_port), "-U", "postgres"]
    # The real binary: /usr/bin/pgbench is Debian's perl wrapper that execs it.
    pgbench = str(PG_BIN / "pgbench")
    subprocess.run([pgbench, "-i", "-q", *conn, "postgres"], check=True, capture_output=True)
    harness.agent("--exe", "pgbench", receiver=receiver)
    bench = subprocess.run([pgbench, "-t", "20", "-S", *conn, "postgres"],
                           capture_output=True, text=True, timeout=60)
    assert bench.returncode == 0, bench.stderr

    def selects(ss: list[ReceivedSpan]) -> list[ReceivedSpan]:
        return [s for s in _db(ss) if s.name == "SELECT pgbench_accounts"]

    spans = selects(receiver.wait_for(lambda ss: len(selects(ss)) >= 20, timeout_s=30))
    assert len(spans) == 20
    for s in spans:
        assert s.kind == CLIENT
        assert s.resource["process.executable.name"] == "pgbench"
        assert s.attributes["db.namespace"] == "postgres"
        assert s.attributes["db.collection.name"] == "pgbench_accounts"
        assert s.attributes["db.query.text"] == (
            "SELECT abalance FROM pgbench_accounts WHERE aid = ?;")
        assert s.attributes["server.port"] == pg_port
        assert s.status_code == 0


def test_annotated_http_service_query_joins_request_trace(harness: Harness,
                                                          receiver: OtlpReceiver,
                                                          pg_port: int) -> None:
    dsn = f"host=127.0.0.1 port={pg_port} user=postgres dbname=postgres"
    app, port = harness.python_service("pg-app", APPS / "pg_app.py", "--dsn", dsn)
    harness.agent("--pid", str(app.pid), receiver=receiver)
    warm_up(receiver, port)

    tenants = [f"acme-{t}-{i}" for t in range(3) for i in range(4)]

    def worker(mine: list[str]) -> None:
        with requests.Session() as s:
            for tenant in mine:
                r = s.get(f"http://127.0.0.1:{port}/orders/{tenant}",
                          headers={"X-Tenant-ID": tenant}, timeout=10)
                assert r.status_code == 200 and r.json()["tenant"] == tenant

    threads = [threading.Thread(target=worker, args=(tenants[t::3],)) for t in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()

    def mine(ss: list[ReceivedSpan], kind: int) -> list[ReceivedSpan]:
        return [s for s in by_service(ss, "pg-app", kind)
                if str(s.attributes.get("tenant_id", "")).startswith("acme-")]

    spans = receiver.wait_for(lambda ss: len(mine(ss, SERVER)) >= len(tenants)
                              and len(_db(mine(ss, CLIENT))) >= len(tenants), timeout_s=30)
    servers, dbs = mine(spans, SERVER), _db(mine(spans, CLIENT))
    assert len(servers) == len(dbs) == len(tenants)
    for tenant in tenants:
        (srv,) = [s for s in servers if s.attributes["tenant_id"] == tenant]
        (db,) = [s for s in dbs if s.attributes["tenant_id"] == tenant]
        assert srv.attributes["url.path"] == f"/orders/{tenant}"
        assert db.parent_span_id == srv.span_id
        assert db.trace_id == srv.trace_id
        assert db.name == "SELECT"
        assert db.attributes["db.query.text"] == "SELECT $1::text AS tenant_echo"
        assert db.attributes["db.namespace"] == "postgres"
        assert srv.start_ns <= db.start_ns <= db.end_ns <= srv.end_ns


PG_JDBC = Path("/usr/share/java/postgresql.jar")


@pytest.mark.skipif(shutil.which("javac") is None or not PG_JDBC.exists(),
                    reason="needs javac and the PostgreSQL JDBC driver (libpostgresql-jdbc-java)")
def test_jdbc_fetch_size_cursor_named_portal_across_round_trips(
        harness: Harness, receiver: OtlpReceiver, pg_port: int) -> None:
    classes = harness.tmp / "classes"
    subprocess.run(["javac", "-d", str(classes), str(APPS / "PgPortalClient.java")],
                   check=True, capture_output=True)
    go, done = harness.tmp / "go", harness.tmp / "done"
    client = harness.start("pgjava", ["java", "-cp", f"{PG_JDBC}:{classes}", "PgPortalClient",
                                      str(go), str(done), str(pg_port)],
                           env={"OTEL_SERVICE_NAME": "pgjava"},
                           ready_file=harness.tmp / "go.waiting", timeout=60)
    harness.agent("--pid", str(client.pid), receiver=receiver)
    go.write_text("")
    assert client.popen.wait(60) == 0, client.log_text()
    assert done.read_text() == "23"

    def marked(ss: list[ReceivedSpan], marker: str) -> list[ReceivedSpan]:
        return [s for s in by_service(_db(ss), "pgjava", CLIENT)
                if marker in str(s.attributes.get("db.query.text"))]

    spans = receiver.wait_for(lambda ss: len(marked(ss, "portal_marker")) >= 5
                              and len(marked(ss, "other_marker")) >= 5
                              and any(s.name == "COMMIT" for s in ss), timeout_s=30)
    # 23 rows in batches of 5: the first Execute and four more of the same portal, each after
    # a round trip that ran the other query on the unnamed statement.
    cursor = marked(spans, "portal_marker")
    assert len(cursor) == 5
    assert {s.attributes["db.query.text"] for s in cursor} == {
        "SELECT g AS portal_marker FROM generate_series(?, $1) g"}
    assert {s.name for s in cursor} == {"SELECT"}
    other = marked(spans, "other_marker")
    assert len(other) == 5
    assert {s.attributes["db.query.text"] for s in other} == {"SELECT $1 AS other_marker"}
    # Nothing ran without a known text.
    assert [s for s in by_service(_db(spans), "pgjava", CLIENT)
            if "db.query.text" not in s.attributes] == []
