"""Unmodified peers: Debian's nginx as the server and curl as the client, no ebpf-bridge code in
either. nginx (master + forked worker) starts before the agent and is found by the /proc scan;
curl starts after it and is picked up at exec.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import time
from pathlib import Path

import pytest

from kernel_side.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.e2e.conftest import CLIENT, SERVER, Harness, by_service

NGINX = "/usr/sbin/nginx"
CURL = "/usr/bin/curl"

pytestmark = pytest.mark.skipif(not (Path(NGINX).exists() and Path(CURL).exists()),
                                reason="needs nginx and curl")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, proc_alive: object, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if not proc_alive() or time.monotonic() > deadline:  # type: ignore[operator]
                raise AssertionError(f"nginx is not listening on {port}") from None
            time.sleep(0.02)


def _start_nginx(harness: Harness) -> int:
    tmp = harness.tmp
    port = _free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
daemon off;
master_process on;
worker_processes 1;
error_log {tmp}/error.log;
pid {tmp}/nginx.pid;
events {{}}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "hello\\n"; }}
        location /missing {{ return 404; }}
    }}
}}
""")
    proc = harness.start("nginx", [NGINX, "-p", str(tmp), "-e", str(tmp / "error.log"),
                                   "-c", str(conf)])
    _wait_listening(port, lambda: proc.popen.poll() is None)
    return port


def _curl(*args: str) -> list[str]:
    """Run curl; one "<status> <new connections>" line per transfer."""
    out = subprocess.run([CURL, "-sS", "-w", "%{http_code} %{num_connects}\n", *args],
                         capture_output=True, text=True, timeout=30, check=True)
    return out.stdout.splitlines()


def _nginx(spans: list[ReceivedSpan], tag: str) -> list[ReceivedSpan]:
    return [s for s in by_service(spans, "nginx", SERVER)
            if tag in str(s.attributes.get("url.path", ""))]


def _curl_spans(spans: list[ReceivedSpan], tag: str) -> list[ReceivedSpan]:
    return [s for s in by_service(spans, "curl", CLIENT)
            if tag in str(s.attributes.get("url.full", ""))]


def test_nginx_server_and_curl_client(harness: Harness, receiver: OtlpReceiver) -> None:
    port = _start_nginx(harness)
    harness.agent("--exe", "nginx", "--exe", "curl", receiver=receiver)
    tag = secrets.token_hex(4)
    base = f"http://127.0.0.1:{port}"
    paths = [f"/a-{tag}", f"/missing/{tag}", f"/b-{tag}?x=1"]
    # Three URLs, one curl process, one reused connection.
    lines = _curl(*[x for p in paths for x in ("-o", "/dev/null", base + p)])
    assert lines == ["200 1", "404 0", "200 0"]

    spans = receiver.wait_for(lambda ss: len(_nginx(ss, tag)) >= 3
                              and len(_curl_spans(ss, tag)) >= 3)
    # Barrier: a later curl run; its spans come after any duplicate of the first run's.
    _curl("-o", "/dev/null", f"{base}/barrier-{tag}")
    spans = receiver.wait_for(lambda ss: len(_nginx(ss, f"barrier-{tag}")) == 1
                              and len(_curl_spans(ss, f"barrier-{tag}")) == 1)
    servers = sorted((s for s in _nginx(spans, tag) if "barrier" not in s.attributes["url.path"]),
                     key=lambda s: s.start_ns)
    clients = sorted((s for s in _curl_spans(spans, tag) if "barrier" not in
                      s.attributes["url.full"]), key=lambda s: s.start_ns)
    assert len(servers) == 3, servers
    assert len(clients) == 3, clients

    assert [s.attributes["url.path"] for s in servers] == [f"/a-{tag}", f"/missing/{tag}",
                                                           f"/b-{tag}"]
    assert servers[2].attributes["url.query"] == "x=1"
    assert [s.attributes["http.response.status_code"] for s in servers] == [200, 404, 200]
    for s in servers:
        assert s.name == "GET"
        assert s.kind == SERVER
        assert s.attributes["server.port"] == port
        assert s.attributes["client.address"] == "127.0.0.1"
        assert s.attributes["user_agent.original"].startswith("curl/")
        assert s.status_code == 0  # a 404 is the client's error, not the server's
        assert s.resource["process.executable.name"] == "nginx"
    assert servers[0].attributes["http.response.body.size"] == len("hello\n")
    # The worker (a forked child of the master) served them all.
    assert len({s.resource["process.pid"] for s in servers}) == 1

    assert [s.attributes["url.full"] for s in clients] == [base + p for p in paths]
    assert [s.attributes["http.response.status_code"] for s in clients] == [200, 404, 200]
    for c in clients:
        assert c.attributes["server.port"] == port
        assert c.attributes["server.address"] == "127.0.0.1"
        assert c.attributes["http.request.method"] == "GET"
        assert c.resource["process.executable.name"] == "curl"
    # A client span of a 404 is an error.
    assert clients[1].status_code == 2 and clients[1].attributes["error.type"] == "404"
    assert len({c.attributes["network.peer.port"] for c in clients}) == 1


def test_curl_traceparent_adopted_by_nginx(harness: Harness, receiver: OtlpReceiver) -> None:
    port = _start_nginx(harness)
    harness.agent("--exe", "nginx", "--exe", "curl", receiver=receiver)
    tag = secrets.token_hex(4)
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    lines = _curl("-o", "/dev/null", "-H", f"traceparent: 00-{trace_id}-{parent}-01",
                  f"http://127.0.0.1:{port}/tp-{tag}")
    assert lines == ["200 1"]
    # And one without: a fresh trace, no parent.
    assert _curl("-o", "/dev/null", f"http://127.0.0.1:{port}/notp-{tag}") == ["200 1"]
    spans = receiver.wait_for(lambda ss: len(_nginx(ss, tag)) >= 2
                              and len(_curl_spans(ss, tag)) >= 2)
    srv = [s for s in _nginx(spans, f"/tp-{tag}")]
    cli = [s for s in _curl_spans(spans, f"/tp-{tag}")]
    assert len(srv) == 1 and len(cli) == 1
    assert srv[0].trace_id == trace_id
    assert srv[0].parent_span_id == parent
    assert cli[0].trace_id == trace_id
    assert cli[0].parent_span_id == parent
    assert srv[0].span_id != cli[0].span_id

    # Without a traceparent, curl's span starts a new trace and nginx's span joins it: both
    # ends are traced on this node, so the agent stitches them by connection.
    plain = _nginx(spans, f"/notp-{tag}")
    plain_cli = _curl_spans(spans, f"/notp-{tag}")
    assert len(plain) == 1 and len(plain_cli) == 1
    assert plain_cli[0].parent_span_id is None
    assert plain[0].parent_span_id == plain_cli[0].span_id
    assert plain[0].trace_id == plain_cli[0].trace_id
    assert plain[0].trace_id not in (trace_id, srv[0].trace_id)
    assert len(plain[0].trace_id) == 32 and plain[0].trace_id != "0" * 32
