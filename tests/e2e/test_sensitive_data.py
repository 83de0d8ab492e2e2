"""Planted secrets never reach the exported OTLP: HTTP Authorization and Cookie headers, SQL
literals, a Redis AUTH password and a Redis value, and a PostgreSQL password sent in clear text
at connection start. The agent traces this test process (the
client of everything) and the servers; the JSON-lines file it writes is grepped for each
secret, after checking the spans that would carry them were exported."""

from __future__ import annotations

import os
import secrets
import subprocess
import time

import pytest
import requests

from tests.e2e.conftest import APPS, Harness
from tests.e2e.reliability import final_stats, free_port
from tests.e2e.test_postgres import PG_BIN, pg_port, running_postgres

__all__ = ["pg_port"]  # the fixture, used by name below

EDGE = APPS / "edge_server.py"


def _start_redis(harness: Harness, password: str) -> int:
    port = free_port()
    harness.start("redis-server", ["redis-server", "--port", str(port), "--save", "",
                                   "--appendonly", "no", "--requirepass", password,
                                   "--dir", str(harness.tmp)])
    deadline = time.monotonic() + 20
    while subprocess.run(["redis-cli", "-p", str(port), "-a", password, "--no-auth-warning",
                          "ping"], capture_output=True, text=True).stdout.strip() != "PONG":
        assert time.monotonic() < deadline, "redis-server not ready"
        time.sleep(0.05)
    return port


@pytest.mark.skipif(not (PG_BIN / "postgres").exists(), reason="PostgreSQL not installed")
def test_planted_secrets_are_not_exported(harness: Harness, pg_port: int) -> None:
    import psycopg
    import redis

    tag = secrets.token_hex(4)
    secret = {n: f"SECRET{n}x{tag}" for n in range(1, 7)}
    srv, http_port = harness.python_service("edge-secrets", EDGE)
    redis_port = _start_redis(harness, secret[4])
    jsonl = harness.tmp / "spans.jsonl"
    agent = harness.agent("--pid", str(os.getpid()), "--pid", str(srv.pid), "--exe",
                          "redis-server", "--exe", "postgres", "--exporter", "jsonl",
                          "--jsonl", str(jsonl))
    time.sleep(1.5)  # the pytest process's selection by pid is immediate; the pg/redis rescans

    r = requests.get(f"http://127.0.0.1:{http_port}/secret-{tag}",
                     headers={"Authorization": f"Bearer {secret[1]}",
                              "Cookie": f"session={secret[2]}", "Connection": "close"},
                     timeout=10)
    assert r.status_code == 200
    with psycopg.connect(f"host=127.0.0.1 port={pg_port} user=postgres dbname=postgres",
                         autocommit=True) as conn:
        conn.execute(f"SELECT 'marker-{tag}' AS m, '{secret[3]}' AS s").fetchall()
    # Clear-text password authentication: the PasswordMessage ('p') carries secret 6 as is.
    with running_postgres(superuser_password=secret[6]) as pw_port, psycopg.connect(
            f"host=127.0.0.1 port={pw_port} user=postgres password={secret[6]} "
            "dbname=postgres", autocommit=True) as conn:
        conn.execute(f"SELECT 'pwmarker-{tag}'").fetchall()
    rc = redis.Redis(port=redis_port, password=secret[4])
    rc.set(f"k-{tag}", secret[5])
    assert rc.get(f"k-{tag}") == secret[5].encode()
    rc.close()
    time.sleep(0.5)
    assert agent.stop() == 0
    st = final_stats(agent.log_text())
    text = jsonl.read_text()
    # The spans that would carry the secrets were exported.
    assert f"/secret-{tag}" in text, "no HTTP span"
    assert "SELECT" in text and f"marker-{tag}" not in text, "no SQL span, or not obfuscated"
    pw_server = f'{{"key":"server.port","value":{{"intValue":"{pw_port}"}}}}'
    assert pw_server in text, "no span from the password-auth PostgreSQL"
    assert "SET ? ?" in text, "no Redis SET span (or its value was not obfuscated)"
    assert "HELLO ? ? ? ?" in text or "AUTH ?" in text, "no Redis AUTH/HELLO span"
    leaked = {n: s for n, s in secret.items() if s in text}
    assert not leaked, f"secrets in the exported OTLP: {leaked}"
    assert "Bearer" not in text and "session=" not in text
    print(f"\nsecrets: {len(text.splitlines())} OTLP lines, {st['spans']} spans, none of "
          f"{len(secret)} secrets present")
