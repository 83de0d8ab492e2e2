"""Redis client spans from real clients talking to a real redis-server, through the agent.

redis-server is started on a free port (never traced: its side of each exchange is skipped
anyway); the clients are redis-py (scripted, and inside an annotated HTTP service) and the
unmodified redis-cli binary.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
import requests

from kernel_side.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.e2e.conftest import APPS, CLIENT, PYTHON, SERVER, Harness, by_service
from tests.e2e.test_annotate_http import warm_up

APP = APPS / "redis_app.py"

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="needs redis-server and redis-cli")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def redis_port(harness: Harness) -> Iterator[int]:
    """A real redis-server on a free port, ready (answers PING)."""
    port = _free_port()
    harness.start("redis-server", ["redis-server", "--port", str(port), "--save", "",
                                   "--appendonly", "no", "--daemonize", "no",
                                   "--dir", str(harness.tmp)])
    deadline = time.monotonic() + 20
    while True:
        out = subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True,
                             text=True, check=False)
        if out.stdout.strip() == "PONG":
            break
        assert time.monotonic() < deadline, f"redis-server not ready: {out.stderr}"
        time.sleep(0.05)
    yield port


def _redis_spans(spans: list[ReceivedSpan], service: str) -> list[ReceivedSpan]:
    return [s for s in by_service(spans, service, CLIENT)
            if s.attributes.get("db.system.name") == "redis"]


def _ops(spans: list[ReceivedSpan]) -> list[str]:
    return [str(s.attributes["db.operation.name"]) for s in spans]


def test_redis_py_commands_pipeline_transaction_error_select(
        harness: Harness, receiver: OtlpReceiver, redis_port: int) -> None:
    go, out = harness.tmp / "go", harness.tmp / "client.out"
    ready = harness.tmp / "client.ready"
    cli = harness.start("redis-py", [PYTHON, str(APP), "client", "--redis-port",
                                     str(redis_port), "--go-file", str(go), "--ready-file",
                                     str(ready), "--out", str(out)],
                        env={"OTEL_SERVICE_NAME": "redis-py-client"}, ready_file=ready)
    harness.agent("--pid", str(cli.pid), receiver=receiver)
    go.touch()
    assert cli.popen.wait(60) == 0, cli.log_text()
    steps = out.read_text().splitlines()
    assert steps[-1] == "db2 b'two'" and "error WRONGTYPE" in steps

    def done(ss: list[ReceivedSpan]) -> bool:
        mine = _redis_spans(ss, "redis-py-client")
        return any(s.attributes.get("db.namespace") == "2"
                   and s.attributes["db.operation.name"] == "GET" for s in mine)

    spans = _redis_spans(receiver.wait_for(done, timeout_s=30), "redis-py-client")
    for s in spans:
        assert s.kind == CLIENT
        assert s.name == s.attributes["db.operation.name"]
        assert s.attributes["server.address"] == "127.0.0.1"
        assert s.attributes["server.port"] == redis_port
        assert s.resource["service.name"] == "redis-py-client"
    by_query = {str(s.attributes["db.query.text"]) for s in spans}
    # (redis-py sends incr as INCRBY key 1)
    assert {"SET ? ?", "GET ?", "INCRBY ? ?", "MULTI", "EXEC", "LPUSH ? ?",
            "SELECT ?"} <= by_query, by_query
    assert "v1" not in str([s.attributes for s in spans])

    # Spans of one exchange share its timing: group them to find the pipeline and the
    # transaction, each one span per command.
    groups: dict[tuple[int, int], list[ReceivedSpan]] = {}
    for s in spans:
        groups.setdefault((s.start_ns, s.end_ns), []).append(s)
    shapes = [sorted(_ops(g)) for g in groups.values()]
    assert ["GET", "INCRBY", "SET"] in shapes, shapes
    assert ["EXEC", "INCRBY", "MULTI", "SET"] in shapes, shapes
    (txn,) = [g for g in groups.values() if "MULTI" in _ops(g)]
    assert all(s.status_code != 2 for s in txn)

    # The error.
    (lpush,) = [s for s in spans if s.name == "LPUSH"]
    assert lpush.status_code == 2
    assert lpush.attributes["error.type"] == "WRONGTYPE"
    assert lpush.attributes["db.response.status_code"] == "WRONGTYPE"

    # db=2: redis-py sends SELECT 2 on connect; later commands on that connection are in "2".
    select = [s for s in spans if s.name == "SELECT"]
    assert select and all(s.attributes["db.namespace"] == "0" for s in select)
    db2 = [s for s in spans if s.attributes["db.namespace"] == "2"]
    assert sorted(_ops(db2)) == ["GET", "SET"]
    assert all(s.attributes["db.namespace"] == "0" for s in spans
               if s.name in ("MULTI", "EXEC", "LPUSH"))


def test_redis_cli_unmodified_client(harness: Harness, receiver: OtlpReceiver,
                                     redis_port: int) -> None:
    harness.agent("--exe", "redis-cli", receiver=receiver)
    port = str(redis_port)
    for argv in (["SET", "cli:k", "secret-value"], ["GET", "cli:k"], ["LPUSH", "cli:k", "x"],
                 ["-n", "3", "GET", "cli:k"]):
        subprocess.run(["redis-cli", "-p", port, *argv], check=True, capture_output=True)

    def done(ss: list[ReceivedSpan]) -> bool:
        mine = [s for s in ss if s.resource.get("process.executable.name") == "redis-cli"]
        return sum(1 for s in mine if s.attributes.get("db.operation.name") == "GET") >= 2 \
            and any(s.attributes.get("db.operation.name") == "LPUSH" for s in mine)

    spans = [s for s in receiver.wait_for(done, timeout_s=30)
             if s.resource.get("process.executable.name") == "redis-cli"]
    assert all(s.kind == CLIENT for s in spans)
    assert not any(s.kind == SERVER for s in spans)
    (set_,) = [s for s in spans if s.name == "SET"]
    assert set_.attributes["db.query.text"] == "SET ? ?"
    assert set_.attributes["server.port"] == redis_port
    assert "secret-value" not in str(set_.attributes)
    (lpush,) = [s for s in spans if s.name == "LPUSH"]
    assert lpush.status_code == 2 and lpush.attributes["error.type"] == "WRONGTYPE"
    gets = sorted(str(s.attributes["db.namespace"]) for s in spans if s.name == "GET")
    assert gets == ["0", "3"]  # redis-cli -n 3 selects the db on its connection first


def test_annotated_http_service_redis_spans_carry_tenant_and_parent(
        harness: Harness, receiver: OtlpReceiver, redis_port: int) -> None:
    app, port = harness.python_service("redis-app", APP, "--redis-port", str(redis_port))
    harness.agent("--pid", str(app.pid), receiver=receiver)
    warm_up(receiver, port)
    tenants = [f"tenant-{i}" for i in range(6)]
    with requests.Session() as s:
        for i, tenant in enumerate(tenants):
            r = s.get(f"http://127.0.0.1:{port}/kv/key{i}", headers={"X-Tenant-ID": tenant},
                      timeout=10)
            assert r.status_code == 200 and r.json() == {"tenant": tenant, "value": tenant}

    def done(ss: list[ReceivedSpan]) -> bool:
        got = {s.attributes.get("tenant_id") for s in _redis_spans(ss, "redis-app")
               if s.name == "GET"}
        servers = {s.attributes.get("tenant_id") for s in by_service(ss, "redis-app", SERVER)}
        return set(tenants) <= got and set(tenants) <= servers

    spans = receiver.wait_for(done, timeout_s=30)
    servers = by_service(spans, "redis-app", SERVER)
    rspans = _redis_spans(spans, "redis-app")
    for tenant in tenants:
        (srv,) = [s for s in servers if s.attributes.get("tenant_id") == tenant]
        kids = [s for s in rspans if s.attributes.get("tenant_id") == tenant]
        assert sorted(_ops(kids)) == ["GET", "SET"], _ops(kids)
        for kid in kids:
            assert kid.parent_span_id == srv.span_id
            assert kid.trace_id == srv.trace_id
            assert kid.attributes["db.system.name"] == "redis"
            assert kid.attributes["db.namespace"] == "0"
            assert kid.attributes["server.port"] == redis_port
            assert srv.start_ns <= kid.start_ns <= kid.end_ns <= srv.end_ns
        assert {str(k.attributes["db.query.text"]) for k in kids} == {"SET ? ?", "GET ?"}
    # Nothing else in the app became a redis span without a parent.
    assert all(s.parent_span_id for s in rspans)
