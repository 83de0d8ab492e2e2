"""TLS: OpenSSL plaintext through uprobes, fed to the same parsers and span assembly.

Real peers, real certificates (a self-signed one generated per test module with ``openssl
req -x509``): Python's ssl (server) and requests (client), nginx with TLS and curl, Node's https
server and client, PostgreSQL with sslmode=require, Redis over TLS, and grpcio with TLS
credentials (whose BoringSSL cannot be seen: the agent says so).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from kernel_side.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.e2e.conftest import (
    APPS,
    CLIENT,
    PYTHON,
    SERVER,
    Harness,
    Proc,
    by_service,
    warm_up_context,
)

NODE = shutil.which("node")
NGINX = "/usr/sbin/nginx"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def cert() -> Iterator[tuple[Path, Path]]:
    """A self-signed certificate for 127.0.0.1/localhost: (cert, key)."""
    tmp = Path(tempfile.mkdtemp(prefix="ebpf-bridge-tls-"))
    os.chmod(tmp, 0o755)
    crt, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(crt)], check=True, capture_output=True)
    os.chmod(key, 0o644)
    try:
        yield crt, key
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _stats(agent_log: str) -> dict[str, int]:
    lines = [ln for ln in agent_log.splitlines() if "final stats" in ln]
    assert lines, agent_log[-2000:]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(-?\d+)", lines[-1])}


def _tls_app(harness: Harness, name: str, cert: tuple[Path, Path],
             *args: str) -> tuple[Proc, int]:
    return harness.python_service(name, APPS / "tls_app.py", "--cert", str(cert[0]),
                                  "--key", str(cert[1]), *args)


def _garbage(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
    """Spans that could only come from ciphertext: no known protocol attribute."""
    keys = ("http.request.method", "db.system.name", "rpc.system")
    return [s for s in spans if not any(k in s.attributes for k in keys)]


# --- Python ssl server and requests client --------------------------------------------------


def test_python_https_server_and_client_with_tenant(harness: Harness, receiver: OtlpReceiver,
                                                     cert: tuple[Path, Path]) -> None:
    backend, be_port = _tls_app(harness, "tls-backend", cert)
    front, fr_port = _tls_app(harness, "tls-front", cert, "--annotate", "--upstream",
                              f"https://127.0.0.1:{be_port}", "--cafile", str(cert[0]))
    agent = harness.agent("--pid", str(front.pid), "--pid", str(backend.pid),
                          receiver=receiver)
    # The SDK finds the agent's map (reconnect window) before the real requests.
    _warm_https(receiver, fr_port, cert[0])
    tenants = [f"acme-{i}" for i in range(8)]
    with requests.Session() as s:
        for t in tenants:
            r = s.get(f"https://127.0.0.1:{fr_port}/orders/{t}", headers={"X-Tenant-ID": t},
                      verify=str(cert[0]), timeout=10)
            assert r.status_code == 200 and r.json()["upstream"] == 200

    def done(ss: list[ReceivedSpan]) -> bool:
        return all(any(x.attributes.get("url.path") == f"/orders/{t}"
                       for x in by_service(ss, "tls-backend", SERVER)) for t in tenants) and \
            len([x for x in by_service(ss, "tls-front", CLIENT)
                 if x.attributes.get("tenant_id") in tenants]) >= len(tenants)

    spans = receiver.wait_for(done, timeout_s=30)
    servers = by_service(spans, "tls-front", SERVER)
    clients = by_service(spans, "tls-front", CLIENT)
    backs = by_service(spans, "tls-backend", SERVER)
    for t in tenants:
        srv = [x for x in servers if x.attributes.get("url.path") == f"/orders/{t}"]
        assert len(srv) == 1, (t, [x.attributes for x in servers])
        srv_span = srv[0]
        assert srv_span.attributes["url.scheme"] == "https"
        assert srv_span.attributes["tenant_id"] == t
        assert srv_span.attributes["http.response.status_code"] == 200
        assert srv_span.attributes["server.port"] == fr_port
        kid = [c for c in clients if c.attributes.get("tenant_id") == t]
        assert len(kid) == 1, (t, [c.attributes for c in clients])
        assert kid[0].parent_span_id == srv_span.span_id
        assert kid[0].trace_id == srv_span.trace_id
        assert kid[0].attributes["url.full"] == f"https://127.0.0.1:{be_port}/orders/{t}"
        assert kid[0].attributes["tls.protocol.name"] == "tls"
        back = [b for b in backs if b.attributes.get("url.path") == f"/orders/{t}"]
        assert len(back) == 1
        assert back[0].attributes["url.scheme"] == "https"
        assert "tenant_id" not in back[0].attributes
    assert not _garbage(spans), [s.attributes for s in _garbage(spans)]
    agent.stop()
    st = _stats(agent.log_text())
    assert st["unknown_protocol"] == 0 and st["parse_errors"] == 0, st


def _warm_https(receiver: OtlpReceiver, port: int, ca: Path, db: str | None = None) -> None:
    """Until a span (of database system ``db`` if given) carries the warm-up tenant."""
    warm_up_context(
        receiver,
        lambda tenant: requests.get(f"https://127.0.0.1:{port}/warm",
                                    headers={"X-Tenant-ID": tenant}, verify=str(ca), timeout=10),
        lambda s: db is None or s.attributes.get("db.system.name") == db)


# --- nginx with TLS, curl: unmodified peers ------------------------------------------------


def _wait_listening(port: int, alive: object, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if not alive() or time.monotonic() > deadline:  # type: ignore[operator]
                raise AssertionError(f"nothing listening on {port}") from None
            time.sleep(0.02)


@pytest.mark.skipif(not os.path.exists(NGINX) or shutil.which("curl") is None,
                    reason="needs nginx and curl")
def test_nginx_tls_and_curl(harness: Harness, receiver: OtlpReceiver,
                            cert: tuple[Path, Path]) -> None:
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
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert[0]};
        ssl_certificate_key {cert[1]};
        location / {{ return 200 "hello\\n"; }}
        location /missing {{ return 404; }}
    }}
}}
""")
    nginx = harness.start("nginx", [NGINX, "-p", str(tmp), "-e", str(tmp / "error.log"),
                                    "-c", str(conf)])
    _wait_listening(port, lambda: nginx.popen.poll() is None)
    agent = harness.agent("--exe", "nginx", "--exe", "curl", receiver=receiver)
    base = f"https://127.0.0.1:{port}"
    paths = ["/a", "/missing/b", "/c?x=1"]
    out = subprocess.run(["curl", "-sS", "--cacert", str(cert[0]), "-w", "%{http_code}\n",
                          *[x for p in paths for x in ("-o", "/dev/null", base + p)]],
                         capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout.split() == ["200", "404", "200"]

    # --exe nginx may also select other nginx instances on the host: keep ours (by port).
    def mine(ss: list[ReceivedSpan], svc: str, kind: int) -> list[ReceivedSpan]:
        return sorted((x for x in by_service(ss, svc, kind)
                       if x.attributes.get("server.port") == port), key=lambda x: x.start_ns)

    spans = receiver.wait_for(lambda ss: len(mine(ss, "nginx", SERVER)) >= 3
                              and len(mine(ss, "curl", CLIENT)) >= 3, timeout_s=30)
    servers = mine(spans, "nginx", SERVER)
    clients = mine(spans, "curl", CLIENT)
    assert [s.attributes["url.path"] for s in servers] == ["/a", "/missing/b", "/c"]
    assert [s.attributes["http.response.status_code"] for s in servers] == [200, 404, 200]
    for s in servers:
        assert s.attributes["url.scheme"] == "https"
        assert s.attributes["server.port"] == port
    assert [c.attributes["url.full"] for c in clients] == [base + p for p in paths]
    assert not _garbage(spans)
    agent.stop()
    st = _stats(agent.log_text())
    assert st["unknown_protocol"] == 0 and st["parse_errors"] == 0, st


# --- Node https server and client ------------------------------------------------------------

_NODE_SERVER = """
const https = require('https'), fs = require('fs');
const [cert, key, ready] = process.argv.slice(1);
const srv = https.createServer({cert: fs.readFileSync(cert), key: fs.readFileSync(key)},
  (req, res) => { res.setHeader('Content-Type', 'text/plain'); res.end('node ' + req.url); });
srv.listen(0, '127.0.0.1', () => {
  fs.writeFileSync(ready + '.tmp', String(srv.address().port));
  fs.renameSync(ready + '.tmp', ready);
});
"""

_NODE_CLIENT = """
const https = require('https'), fs = require('fs');
const [ca, port, go, n] = process.argv.slice(1);
const agent = new https.Agent({keepAlive: true, maxSockets: 1, ca: fs.readFileSync(ca)});
function wait() { if (!fs.existsSync(go)) return setTimeout(wait, 20); run(0); }
function run(i) {
  if (i >= Number(n)) { agent.destroy(); return; }
  https.get({host: '127.0.0.1', port: Number(port), path: '/node/' + i, agent}, (res) => {
    res.resume(); res.on('end', () => run(i + 1));
  }).on('error', (e) => { console.error(e); process.exit(1); });
}
wait();
"""


def _node_server(harness: Harness, cert: tuple[Path, Path]) -> tuple[Proc, int]:
    """The Node https server (its OpenSSL is linked into node), started and ready."""
    assert NODE is not None
    ready = harness.tmp / "node-server.ready"
    server = harness.start("node-server", [NODE, "-e", _NODE_SERVER, str(cert[0]),
                                           str(cert[1]), str(ready)],
                           env={"OTEL_SERVICE_NAME": "node-server"}, ready_file=ready)
    return server, int(ready.read_text())


@pytest.mark.skipif(NODE is None, reason="needs node")
def test_node_https_server_and_client(harness: Harness, receiver: OtlpReceiver,
                                      cert: tuple[Path, Path]) -> None:
    assert NODE is not None
    server, port = _node_server(harness, cert)
    go = harness.tmp / "node-client.go"
    client = harness.start("node-client", [NODE, "-e", _NODE_CLIENT, str(cert[0]), str(port),
                                           str(go), "5"],
                           env={"OTEL_SERVICE_NAME": "node-client"})
    agent = harness.agent("--pid", str(server.pid), "--pid", str(client.pid),
                          receiver=receiver)
    go.write_text("")

    def done(ss: list[ReceivedSpan]) -> bool:
        return len(by_service(ss, "node-server", SERVER)) >= 5 and \
            len(by_service(ss, "node-client", CLIENT)) >= 5

    spans = receiver.wait_for(done, timeout_s=30)
    servers = sorted(by_service(spans, "node-server", SERVER), key=lambda s: s.start_ns)
    clients = sorted(by_service(spans, "node-client", CLIENT), key=lambda s: s.start_ns)
    assert [s.attributes["url.path"] for s in servers] == [f"/node/{i}" for i in range(5)]
    assert all(s.attributes["url.scheme"] == "https" for s in servers)
    assert all(s.attributes["http.response.status_code"] == 200 for s in servers)
    assert [c.attributes["url.full"] for c in clients] == [
        f"https://127.0.0.1:{port}/node/{i}" for i in range(5)]
    assert not _garbage(spans)
    assert client.popen.wait(20) == 0
    agent.stop()
    st = _stats(agent.log_text())
    assert st["unknown_protocol"] == 0 and st["parse_errors"] == 0, st


_NODE_CONCURRENT_CLIENT = """
const https = require('https'), fs = require('fs');
const [ca, port, go, n, width] = process.argv.slice(1);
const opts = {host: '127.0.0.1', port: Number(port), agent: false, ca: fs.readFileSync(ca)};
let next = 0, done = 0;
function one() {
  if (next >= Number(n)) return;
  const i = next++;
  https.get({...opts, path: '/conc/' + i, headers: {Connection: 'close'}}, (res) => {
    res.resume();
    res.on('end', () => { if (++done === Number(n)) process.exit(0); one(); });
  }).on('error', (e) => { console.error(e); process.exit(1); });
}
function wait() {
  if (!fs.existsSync(go)) return setTimeout(wait, 20);
  for (let k = 0; k < Number(width); k++) one();
}
wait();
"""


@pytest.mark.skipif(NODE is None, reason="needs node")
def test_node_https_concurrent_connections_each_get_their_own_spans(
        harness: Harness, receiver: OtlpReceiver, cert: tuple[Path, Path]) -> None:
    """Node's OpenSSL works on memory buffers, so the agent learns an SSL object's socket from
    the thread's last TLS socket; SSL objects are freed and their addresses reused as
    connections come and go. 64 requests, each on its own connection, 16 at a time: every one
    gets one server and one client span, and each server span is the child of its own
    request's client span (same-node stitching by connection)."""
    assert NODE is not None
    n = 64
    server, port = _node_server(harness, cert)
    go = harness.tmp / "node-client.go"
    client = harness.start("node-client", [NODE, "-e", _NODE_CONCURRENT_CLIENT, str(cert[0]),
                                           str(port), str(go), str(n), "16"],
                           env={"OTEL_SERVICE_NAME": "node-client"})
    agent = harness.agent("--pid", str(server.pid), "--pid", str(client.pid),
                          receiver=receiver)
    go.write_text("")
    assert client.popen.wait(60) == 0
    paths = [f"/conc/{i}" for i in range(n)]

    def done(ss: list[ReceivedSpan]) -> bool:
        return len(by_service(ss, "node-server", SERVER)) >= n and \
            len(by_service(ss, "node-client", CLIENT)) >= n

    with contextlib.suppress(AssertionError):  # what is missing is reported below
        receiver.wait_for(done, timeout_s=60)
    spans = receiver.spans()
    servers = {s.attributes["url.path"]: s for s in by_service(spans, "node-server", SERVER)}
    clients = {str(c.attributes["url.full"]).split(str(port), 1)[1]: c
               for c in by_service(spans, "node-client", CLIENT)}
    assert sorted(set(paths) - set(servers)) == [], "requests without a server span"
    assert sorted(set(paths) - set(clients)) == [], "requests without a client span"
    assert len(by_service(spans, "node-server", SERVER)) == n
    assert len(by_service(spans, "node-client", CLIENT)) == n
    for path in paths:
        assert servers[path].parent_span_id == clients[path].span_id, path
        assert servers[path].trace_id == clients[path].trace_id, path
    assert not _garbage(spans)
    agent.stop()
    st = _stats(agent.log_text())
    assert st["unknown_protocol"] == 0 and st["parse_errors"] == 0, st


# --- PostgreSQL with sslmode=require -------------------------------------------------------

PG_BIN = Path("/usr/lib/postgresql/15/bin")


@pytest.fixture
def pg_tls(cert: tuple[Path, Path]) -> Iterator[int]:
    """A throwaway PostgreSQL with ssl=on and the test certificate; yields its port."""
    if not (PG_BIN / "postgres").exists():
        pytest.skip("PostgreSQL 15 server binaries not installed")
    tmp = Path(tempfile.mkdtemp(prefix="ebpf-bridge-pgtls-"))
    shutil.copy(cert[0], tmp / "server.crt")
    shutil.copy(cert[1], tmp / "server.key")
    os.chmod(tmp / "server.key", 0o600)
    for p in (tmp, tmp / "server.crt", tmp / "server.key"):
        shutil.chown(p, "postgres", "postgres")
    run_as = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*run_as, str(PG_BIN / "initdb"), "-A", "trust", "-U", "postgres",
                    "-D", str(tmp / "data")], check=True, capture_output=True)
    port = _free_port()
    log = (tmp / "postgres.log").open("wb")
    proc = subprocess.Popen([*run_as, str(PG_BIN / "postgres"), "-D", str(tmp / "data"),
                             "-p", str(port), "-k", str(tmp), "-c", "listen_addresses=127.0.0.1",
                             "-c", "ssl=on", "-c", f"ssl_cert_file={tmp}/server.crt",
                             "-c", f"ssl_key_file={tmp}/server.key"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1", "-p", str(port)]).returncode:
            assert proc.poll() is None, (tmp / "postgres.log").read_text()
            assert time.monotonic() < deadline, "postgres not ready"
            time.sleep(0.1)
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def test_postgres_sslmode_require(harness: Harness, receiver: OtlpReceiver,
                                  cert: tuple[Path, Path], pg_tls: int) -> None:
    dsn = (f"host=127.0.0.1 port={pg_tls} user=postgres dbname=postgres sslmode=require")
    app, port = _tls_app(harness, "pg-tls-app", cert, "--annotate", "--dsn", dsn)
    agent = harness.agent("--pid", str(app.pid), receiver=receiver)
    # psycopg (and its bundled libssl) loads on the first request: the agent finds the library
    # when it re-reads the process's maps. Warm up until a query span carries its tenant.
    _warm_https(receiver, port, cert[0], db="postgresql")
    tenants = [f"pg-{i}" for i in range(4)]
    with requests.Session() as s:
        for t in tenants:
            r = s.get(f"https://127.0.0.1:{port}/q/{t}", headers={"X-Tenant-ID": t},
                      verify=str(cert[0]), timeout=10)
            assert r.json()["pg"] == t

    def db(ss: list[ReceivedSpan]) -> list[ReceivedSpan]:
        return [s for s in ss if s.attributes.get("db.system.name") == "postgresql"
                and s.attributes.get("tenant_id") in tenants]

    def complete(ss: list[ReceivedSpan]) -> bool:
        # Every span asserted on below: one query and one server span per tenant (a server
        # span can be one export batch behind its query's).
        paths = {s.attributes.get("url.path") for s in by_service(ss, "pg-tls-app", SERVER)}
        return all(any(s.attributes["tenant_id"] == t for s in db(ss)) and f"/q/{t}" in paths
                   for t in tenants)

    try:
        spans = receiver.wait_for(complete, timeout_s=30)
    except AssertionError:
        spans = receiver.spans()
    servers = by_service(spans, "pg-tls-app", SERVER)
    for t in tenants:
        q = [s for s in db(spans) if s.attributes["tenant_id"] == t]
        assert len(q) == 1, [s.attributes for s in q]
        assert "tenant_echo" in str(q[0].attributes["db.query.text"])
        assert q[0].attributes["tls.protocol.name"] == "tls"
        srv = [s for s in servers if s.attributes.get("url.path") == f"/q/{t}"]
        assert len(srv) == 1 and q[0].parent_span_id == srv[0].span_id
    assert not _garbage(spans), [s.attributes for s in _garbage(spans)]
    agent.stop()
    log = agent.log_text()
    st = _stats(log)
    # The counters and what the agent logged about them, so a failure says which it was.
    assert st["unknown_protocol"] == 0 and st["parse_errors"] == 0, (
        {k: st.get(k) for k in ("unknown_protocol", "parse_errors", "exchanges", "tls_uprobes")},
        [ln for ln in log.splitlines() if "could not" in ln or "Error" in ln][-20:],
    )


# --- Redis over TLS ------------------------------------------------------------------------


def _redis_has_tls() -> bool:
    exe = shutil.which("redis-server")
    if exe is None:
        return False
    out = subprocess.run(["ldd", exe], capture_output=True, text=True).stdout
    return "libssl" in out


@pytest.mark.skipif(not _redis_has_tls(), reason="redis-server without TLS support")
def test_redis_tls(harness: Harness, receiver: OtlpReceiver, cert: tuple[Path, Path]) -> None:
    rport = _free_port()
    redis = harness.start("redis-server", [
        "redis-server", "--port", "0", "--tls-port", str(rport), "--tls-cert-file", str(cert[0]),
        "--tls-key-file", str(cert[1]), "--tls-ca-cert-file", str(cert[0]),
        "--tls-auth-clients", "no", "--save", "", "--appendonly", "no"])
    _wait_listening(rport, lambda: redis.popen.poll() is None)
    app, port = _tls_app(harness, "redis-tls-app", cert, "--annotate", "--cafile", str(cert[0]),
                         "--redis", f"rediss://127.0.0.1:{rport}/0")
    agent = harness.agent("--pid", str(app.pid), receiver=receiver)
    _warm_https(receiver, port, cert[0], db="redis")
    tenants = [f"rd-{i}" for i in range(3)]
    with requests.Session() as s:
        for t in tenants:
            r = s.get(f"https://127.0.0.1:{port}/r/{t}", headers={"X-Tenant-ID": t},
                      verify=str(cert[0]), timeout=10)
            assert r.json()["redis"] is True

    def cache(ss: list[ReceivedSpan]) -> list[ReceivedSpan]:
        return [s for s in ss if s.attributes.get("db.system.name") == "redis"
                and s.attributes.get("tenant_id") in tenants]

    def ops_of(ss: list[ReceivedSpan], t: str) -> list[str]:
        # redis-py also sends HELLO / CLIENT SETINFO when it connects.
        return sorted(str(s.attributes["db.operation.name"]) for s in cache(ss)
                      if s.attributes["tenant_id"] == t
                      and s.attributes["db.operation.name"] in ("GET", "SET"))

    # Wait for the spans asserted on, not a count: the connection's HELLO and CLIENT SETINFO
    # spans carry the first tenant too, so a count can be met while the last request's
    # spans are still in a later export batch (seen once in CI).
    try:
        spans = receiver.wait_for(lambda ss: all(len(ops_of(ss, t)) >= 2 for t in tenants),
                                  timeout_s=30)
    except AssertionError:
        spans = receiver.spans()
    for t in tenants:
        assert ops_of(spans, t) == ["GET", "SET"], (t, ops_of(spans, t))
    assert all(s.attributes["tls.protocol.name"] == "tls" for s in cache(spans))
    assert not _garbage(spans), [s.attributes for s in _garbage(spans)]
    agent.stop()
    st = _stats(agent.log_text())
    assert st["unknown_protocol"] == 0 and st["parse_errors"] == 0, st


# --- gRPC with TLS credentials: BoringSSL inside grpcio is not visible ----------------------

_GRPC = """
import sys, pathlib, time, grpc
from concurrent import futures
cert, key, ready, go = (pathlib.Path(a) for a in sys.argv[1:5])
ident = lambda req, ctx: req
handler = grpc.method_handlers_generic_handler("demo.Echo", {
    "Say": grpc.unary_unary_rpc_method_handler(ident)})
server = grpc.server(futures.ThreadPoolExecutor(2))
server.add_generic_rpc_handlers((handler,))
creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
port = server.add_secure_port("127.0.0.1:0", creds)
server.start()
ready.write_text(str(port))
while not go.exists():
    time.sleep(0.02)
ch = grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(cert.read_bytes()))
say = ch.unary_unary("/demo.Echo/Say")
for i in range(5):
    assert say(b"hello") == b"hello"
pathlib.Path(str(go) + ".done").write_text("")
time.sleep(3600)
"""


def test_grpc_tls_reported_not_visible(harness: Harness, receiver: OtlpReceiver,
                                       cert: tuple[Path, Path]) -> None:
    pytest.importorskip("grpc")
    ready, go = harness.tmp / "grpc.ready", harness.tmp / "grpc.go"
    app = harness.start("grpc-tls", [PYTHON, "-c", _GRPC, str(cert[0]), str(cert[1]),
                                     str(ready), str(go)],
                        env={"OTEL_SERVICE_NAME": "grpc-tls"}, ready_file=ready)
    agent = harness.agent("--pid", str(app.pid), receiver=receiver)
    go.write_text("")
    deadline = time.monotonic() + 30
    while not Path(str(go) + ".done").exists():
        assert app.popen.poll() is None, app.log_text()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    log = agent.log_text()
    lines = [ln for ln in log.splitlines() if "encrypted traffic not visible" in ln]
    assert len(lines) == 1, log
    assert f"pid {app.pid}" in lines[0] and "BoringSSL" in lines[0]
    doc = subprocess.run([PYTHON, "-m", "kernel_side.cli", "doctor", "--pid", str(app.pid)],
                         capture_output=True, text=True, timeout=60)
    assert "encrypted traffic not visible" in doc.stdout and "BoringSSL" in doc.stdout, doc
    agent.stop()
    st = _stats(agent.log_text())
    # The encrypted HTTP/2 bytes were recognised as TLS and skipped: no garbage, no unknown.
    assert st["unknown_protocol"] == 0 and st["parse_errors"] == 0, st
    assert not by_service(receiver.spans(), "grpc-tls")


def test_uprobes_attach_when_a_process_appears_and_detach_when_it_exits(
        harness: Harness, receiver: OtlpReceiver, cert: tuple[Path, Path]) -> None:
    """The agent starts first; a TLS app selected by --port appears, gets its libssl uprobes,
    and loses them when it exits (no other traced process uses that file)."""
    port = _free_port()
    agent = harness.agent("--port", str(port), receiver=receiver)
    app, _ = _tls_app(harness, "tls-late", cert, "--port", str(port))
    deadline = time.monotonic() + 30
    while "TLS: uprobes on" not in agent.log_text():
        assert time.monotonic() < deadline, agent.log_text()[-2000:]
        time.sleep(0.1)
    attached = [ln for ln in agent.log_text().splitlines() if "TLS: uprobes on" in ln][-1]
    lib = os.path.basename(attached.split("TLS: uprobes on ", 1)[1].split(" (", 1)[0])
    assert "libssl" in lib, attached
    app.stop()
    deadline = time.monotonic() + 30
    while not any("TLS: detached from" in ln and lib in ln
                  for ln in agent.log_text().splitlines()):
        assert time.monotonic() < deadline, agent.log_text()[-2000:]
        time.sleep(0.1)


def test_libssl_inside_another_mount_namespace(harness: Harness, receiver: OtlpReceiver,
                                               cert: tuple[Path, Path]) -> None:
    """As in a container: the app maps a libssl that exists only in its own mount namespace (a
    copy bind-mounted over the system path). Uprobes on the host path would never fire; the
    agent must attach through /proc/<pid>/root."""
    system = Path("/usr/lib/x86_64-linux-gnu/libssl.so.3")
    if not system.exists():
        pytest.skip("this test expects Debian's multiarch libssl path")
    copy = harness.tmp / "libssl.so.3"
    shutil.copy2(system, copy)
    prefix = ["unshare", "--mount", "--propagation", "private", "sh",
              str(APPS / "in_mount_ns.sh"), str(copy), str(system)]
    app, port = harness.python_service("tls-ns", APPS / "tls_app.py", "--cert", str(cert[0]),
                                       "--key", str(cert[1]), prefix=prefix)
    assert os.stat(f"/proc/{app.pid}/ns/mnt").st_ino != os.stat("/proc/self/ns/mnt").st_ino
    # The app maps the copy: a different inode than the file the host path names.
    inodes = {int(line.split()[4]) for line in Path(f"/proc/{app.pid}/maps").read_text()
              .splitlines() if line.endswith("libssl.so.3")}
    assert inodes and system.stat().st_ino not in inodes, inodes
    agent = harness.agent("--pid", str(app.pid), receiver=receiver)
    paths = [f"/ns/{i}" for i in range(3)]
    with requests.Session() as s:
        for p in paths:
            assert s.get(f"https://127.0.0.1:{port}{p}", verify=str(cert[0]),
                         timeout=10).status_code == 200

    def done(ss: list[ReceivedSpan]) -> bool:
        return {str(x.attributes.get("url.path")) for x in ss} >= set(paths)

    spans = receiver.wait_for(done, timeout_s=30)
    mine = [x for x in spans if x.attributes.get("url.path") in paths]
    assert len(mine) == 3
    assert all(x.attributes["url.scheme"] == "https" for x in mine)
    # The app exits: its uprobes must really go, though the path they were attached through
    # (/proc/<pid>/root/...) went with it. Each uprobe is one perf event fd of the agent.
    attached = [ln for ln in agent.log_text().splitlines()
                if "TLS: uprobes on" in ln and "libssl.so.3" in ln]
    assert len(attached) == 1, agent.log_text()[-2000:]
    n_syms = len(attached[0].rsplit(" (", 1)[1].rstrip(")").split(", "))
    before = _perf_event_fds(agent.pid)
    app.stop()
    deadline = time.monotonic() + 30
    while "TLS: detached from /proc/" not in agent.log_text():
        assert "could not detach" not in agent.log_text(), agent.log_text()[-2000:]
        assert time.monotonic() < deadline, agent.log_text()[-2000:]
        time.sleep(0.1)
    assert before - _perf_event_fds(agent.pid) == 2 * n_syms
    agent.stop()
    st = _stats(agent.log_text())
    assert st["tls_uprobes"] == 0 and st["tls_detach_errors"] == 0, st


def _perf_event_fds(pid: int) -> int:
    """Open perf event fds of ``pid`` (BCC opens one per uprobe and per tracepoint)."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # an fd closed while we look
            n += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[perf_event]"
    return n


# --- HTTP/2 over TLS: hypercorn and httpx (Python ssl, so the system libssl) ---------------


def test_http2_over_tls_hypercorn_and_httpx(harness: Harness, receiver: OtlpReceiver,
                                            cert: tuple[Path, Path]) -> None:
    """HTTP/2 negotiated by ALPN: the stream-mode spans say TLS like the HTTP/1.1 ones."""
    app = str(APPS / "h2_app.py")
    ready, go = harness.tmp / "h2s.ready", harness.tmp / "h2s.go"
    server = harness.start("h2s-web", [PYTHON, app, "h2c-server", "--ready-file", str(ready),
                                       "--cert", str(cert[0]), "--key", str(cert[1])],
                           env={"OTEL_SERVICE_NAME": "h2s-web"}, ready_file=ready, timeout=60)
    port = int(ready.read_text())
    client = harness.start("h2s-caller", [PYTHON, app, "h2c-client", "--port", str(port),
                                          "--go-file", str(go), "--cafile", str(cert[0])],
                           env={"OTEL_SERVICE_NAME": "h2s-caller"})
    agent = harness.agent("--pid", str(server.pid), "--pid", str(client.pid),
                          receiver=receiver)
    go.write_text("")
    assert client.popen.wait(60) == 0, client.log_text()

    def done(ss: list[ReceivedSpan]) -> bool:
        return (len(by_service(ss, "h2s-web", SERVER)) >= 2
                and len(by_service(ss, "h2s-caller", CLIENT)) >= 2)

    spans = receiver.wait_for(done, timeout_s=30)
    servers = {s.attributes["url.path"]: s for s in by_service(spans, "h2s-web", SERVER)}
    assert set(servers) == {"/hello", "/missing"}
    for s in servers.values():
        assert s.attributes["network.protocol.version"] == "2"
        assert s.attributes["url.scheme"] == "https"
        assert s.attributes["tls.protocol.name"] == "tls"
    assert servers["/hello"].attributes["http.response.status_code"] == 200
    assert servers["/missing"].attributes["http.response.status_code"] == 404
    clients = sorted(by_service(spans, "h2s-caller", CLIENT), key=lambda s: s.start_ns)
    assert [c.attributes["url.full"] for c in clients] == [
        f"https://127.0.0.1:{port}/hello", f"https://127.0.0.1:{port}/missing"]
    assert all(c.attributes["tls.protocol.name"] == "tls" for c in clients)
    assert not _garbage(spans), [s.attributes for s in _garbage(spans)]
    agent.stop()
    st = _stats(agent.log_text())
    assert st["unknown_protocol"] == 0 and st["parse_errors"] == 0, st
