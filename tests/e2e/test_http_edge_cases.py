"""HTTP/1.1 edge cases, end to end: keep-alive, pipelining, requests split across reads,
bodies larger than the capture, chunked and slow responses.

One edge server and one agent serve the whole module (an agent start costs ~1.5 s); each test
uses its own path prefix and counts only its own spans. "Exactly N" is checked after a
barrier: a later request on a new connection whose span must arrive after any span (or
duplicate) of the requests before it.
"""

from __future__ import annotations

import re
import secrets
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import requests

from kernel_side.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.e2e.conftest import APPS, CLIENT, PYTHON, SERVER, Harness, by_service

EDGE = APPS / "edge_server.py"
SERVICE = "edge"


@dataclass
class Edge:
    """The module's server, agent and receiver."""

    harness: Harness
    receiver: OtlpReceiver
    port: int

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def server_spans(self, pred: Callable[[str], bool]) -> list[ReceivedSpan]:
        """Server spans of the edge service whose url.path satisfies ``pred``."""
        return [s for s in by_service(self.receiver.spans(), SERVICE, SERVER)
                if pred(str(s.attributes.get("url.path", "")))]

    def wait_server(self, pred: Callable[[str], bool], n: int,
                    timeout_s: float = 20) -> list[ReceivedSpan]:
        """Wait for ``n`` matching server spans, pass a barrier, and return every match."""
        self.receiver.wait_for(
            lambda ss: len([s for s in by_service(ss, SERVICE, SERVER)
                            if pred(str(s.attributes.get("url.path", "")))]) >= n,
            timeout_s=timeout_s)
        self.barrier()
        return self.server_spans(pred)

    def barrier(self) -> None:
        """A request on a fresh connection; once its span is in, earlier spans are too."""
        path = f"/barrier/{secrets.token_hex(6)}"
        r = requests.get(self.url(path), headers={"Connection": "close"}, timeout=10)
        assert r.status_code == 200
        self.receiver.wait_for(lambda ss: any(s.attributes.get("url.path") == path
                                              for s in ss))


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    h = Harness(tmp_path_factory.mktemp("edge"))
    with OtlpReceiver(http_port=0) as rcv:
        try:
            srv, port = h.python_service(SERVICE, EDGE)
            h.agent("--pid", str(srv.pid), receiver=rcv)
            e = Edge(h, rcv, port)
            e.barrier()  # the agent is tracing: the first span arrived
            yield e
        finally:
            agent = [p for p in h.procs if p.name == "agent"]
            h.stop_all()
            for p in agent:
                assert p.popen.returncode == 0, p.log_text()
                # The kernel's second emission of idle-flushed exchanges (see
                # test_idle_flushed_exchange_then_next_request) was seen and dropped.
                final = [ln for ln in p.log_text().splitlines() if "final stats" in ln]
                repeats = re.search(r"idle_flush_repeats=(\d+)", final[-1]) if final else None
                assert repeats and int(repeats.group(1)) > 0, final


def _prefix(tag: str) -> Callable[[str], bool]:
    return lambda path: path.startswith(tag)


def _recv_until_closed(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


# -- keep-alive -------------------------------------------------------------------------------

def test_keep_alive_twenty_requests_one_connection(edge: Edge) -> None:
    tag = f"/ka-{secrets.token_hex(4)}"
    paths = [f"{tag}/{i}" for i in range(20)]
    with requests.Session() as s:
        for p in paths:
            r = s.get(edge.url(p), timeout=10)
            assert r.status_code == 200
    spans = edge.wait_server(_prefix(tag), 20)
    assert len(spans) == 20, [s.attributes["url.path"] for s in spans]
    spans.sort(key=lambda s: s.start_ns)
    assert [s.attributes["url.path"] for s in spans] == paths
    for s in spans:
        assert s.name == "GET"
        assert s.attributes["http.request.method"] == "GET"
        assert s.attributes["http.response.status_code"] == 200
        assert s.attributes["server.port"] == edge.port
        assert s.attributes["network.protocol.version"] == "1.1"
        assert s.start_ns <= s.end_ns
    # One connection: one client port for all twenty.
    assert len({s.attributes["network.peer.port"] for s in spans}) == 1
    assert len({s.span_id for s in spans}) == 20
    assert len({s.trace_id for s in spans}) == 20


def test_keep_alive_traced_client_and_server(harness: Harness, receiver: OtlpReceiver) -> None:
    """Both ends traced: a Python http.client process sends 20 requests on one connection."""
    srv, port = harness.python_service("edge-ka", EDGE)
    go, out = harness.tmp / "go", harness.tmp / "client.out"
    ready = harness.tmp / "client.ready"
    paths = [f"/kc/{i}?n={i}" for i in range(20)]
    client = harness.start("edge-client", [PYTHON, str(EDGE), "client", "--port", str(port),
                                           "--go-file", str(go), "--ready-file", str(ready),
                                           "--out", str(out), *paths],
                           env={"OTEL_SERVICE_NAME": "edge-client"}, ready_file=ready)
    harness.agent("--pid", str(srv.pid), "--pid", str(client.pid), receiver=receiver)
    go.write_text("go")
    assert client.popen.wait(30) == 0, client.log_text()
    assert out.read_text().split("\n")[:20] == [f"{p} 200" for p in paths]
    spans = receiver.wait_for(lambda ss: len(by_service(ss, "edge-ka", SERVER)) >= 20
                              and len(by_service(ss, "edge-client", CLIENT)) >= 20)
    # Barrier: one more request through the (still traced) server.
    requests.get(f"http://127.0.0.1:{port}/done", headers={"Connection": "close"}, timeout=10)
    spans = receiver.wait_for(lambda ss: any(s.attributes.get("url.path") == "/done" for s in ss))
    servers = sorted((s for s in by_service(spans, "edge-ka", SERVER)
                      if s.attributes["url.path"] != "/done"), key=lambda s: s.start_ns)
    clients = sorted(by_service(spans, "edge-client", CLIENT), key=lambda s: s.start_ns)
    assert len(servers) == 20 and len(clients) == 20
    assert [f"{s.attributes['url.path']}?{s.attributes['url.query']}" for s in servers] == paths
    assert [s.attributes["url.full"] for s in clients] == [
        f"http://127.0.0.1:{port}{p}" for p in paths]
    for c in clients:
        assert c.attributes["server.port"] == port
        assert c.attributes["http.response.status_code"] == 200
        assert c.attributes["http.request.method"] == "GET"
    assert len({c.attributes["network.peer.port"] for c in clients}) == 1
    assert len({s.attributes["network.peer.port"] for s in servers}) == 1


def test_closed_connections_leave_no_parser_state(harness: Harness,
                                                  receiver: OtlpReceiver) -> None:
    """A server that closes after every response (gunicorn's sync worker does) must not fill
    the agent's per-connection table: the kernel marks the exchange it emits at close."""
    srv, port = harness.python_service("edge-close", EDGE)
    agent = harness.agent("--pid", str(srv.pid), receiver=receiver)
    n = 30
    for i in range(n):
        r = requests.get(f"http://127.0.0.1:{port}/close/{i}", headers={"Connection": "close"},
                         timeout=10)
        assert r.status_code == 200
    with requests.Session() as keep:
        # One connection still open when the agent stops: its state is the one left.
        assert keep.get(f"http://127.0.0.1:{port}/open", timeout=10).status_code == 200
        spans = receiver.wait_for(
            lambda ss: len(by_service(ss, "edge-close", SERVER)) >= n + 1)
        assert agent.stop(signal.SIGINT) == 0, agent.log_text()
    paths = sorted(str(s.attributes["url.path"]) for s in by_service(spans, "edge-close", SERVER))
    assert paths == sorted([f"/close/{i}" for i in range(n)] + ["/open"])
    final = [ln for ln in agent.log_text().splitlines() if "final stats" in ln]
    left = re.search(r"conn_states=(\d+)", final[-1]) if final else None
    assert left is not None, final
    assert int(left.group(1)) <= 1, final[-1]


# -- pipelining -------------------------------------------------------------------------------

def test_pipelined_requests_in_one_send(edge: Edge) -> None:
    tag = secrets.token_hex(3)
    reqs = [(f"/p{tag}/a", 200), (f"/status/404?p={tag}", 404), (f"/p{tag}/c", 200)]
    wire = b""
    for i, (target, _) in enumerate(reqs):
        close = b"Connection: close\r\n" if i == len(reqs) - 1 else b""
        wire += f"GET {target} HTTP/1.1\r\nHost: e\r\n".encode() + close + b"\r\n"
    with socket.create_connection(("127.0.0.1", edge.port)) as sock:
        sock.sendall(wire)  # all three requests in one send
        answer = _recv_until_closed(sock)
    assert answer.count(b"HTTP/1.1 ") == 3, answer

    mine = _prefix(f"/p{tag}/")
    spans = edge.wait_server(lambda p: mine(p) or p == "/status/404", 3)
    spans = [s for s in spans if mine(s.attributes["url.path"])
             or s.attributes.get("url.query") == f"p={tag}"]
    assert len(spans) == 3
    got = [(s.attributes["url.path"] + (f"?{s.attributes['url.query']}"
                                        if "url.query" in s.attributes else ""),
            s.attributes.get("http.response.status_code")) for s in spans]
    assert got == reqs
    assert spans[1].status_code == 0  # a 404 is not a server error
    assert len({s.span_id for s in spans}) == 3


# -- a request head split across reads -------------------------------------------------------

def test_request_split_across_reads(edge: Edge) -> None:
    tag = secrets.token_hex(4)
    pieces = [f"GET /split-{tag}/x?q=1 HT".encode(),
              b"TP/1.1\r\nHost: split.example:8080\r\nUser-Agent: split",
              b"-agent/1.0\r\nX-Other: y\r\nConnection: close\r\n\r\n"]
    with socket.create_connection(("127.0.0.1", edge.port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i, piece in enumerate(pieces):
            if i:
                # The scenario: the server's read returns the part sent so far.
                time.sleep(0.05)
            sock.sendall(piece)
        answer = _recv_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    spans = edge.wait_server(_prefix(f"/split-{tag}/"), 1)
    assert len(spans) == 1
    a = spans[0].attributes
    assert a["url.path"] == f"/split-{tag}/x"
    assert a["url.query"] == "q=1"
    assert a["http.request.method"] == "GET"
    assert a["network.protocol.version"] == "1.1"
    assert a["server.address"] == "split.example"
    assert a["user_agent.original"] == "split-agent/1.0"
    assert a["http.response.status_code"] == 200
    assert "ebpf_bridge.capture.truncated" not in a


# -- bodies larger than the capture (1024 request bytes, 512 response bytes) -----------------

def test_post_body_larger_than_capture(edge: Edge) -> None:
    tag = secrets.token_hex(4)
    body = secrets.token_bytes(100_000) * 2
    r = requests.post(edge.url(f"/echo/{tag}"), data=body, timeout=20)
    assert r.status_code == 200 and r.content == body
    spans = edge.wait_server(_prefix(f"/echo/{tag}"), 1)
    assert len(spans) == 1
    a = spans[0].attributes
    assert a["http.request.method"] == "POST"
    assert a["http.request.body.size"] == 200_000
    assert a["http.response.body.size"] == 200_000
    assert a["http.response.status_code"] == 200
    # The head was captured whole: only the body was cut, which is not "truncated".
    assert "ebpf_bridge.capture.truncated" not in a


def test_get_response_larger_than_capture(edge: Edge) -> None:
    r = requests.get(edge.url("/big/300000"), timeout=20)
    assert r.status_code == 200 and len(r.content) == 300_000
    spans = edge.wait_server(lambda p: p == "/big/300000", 1)
    assert len(spans) == 1
    a = spans[0].attributes
    assert a["http.response.status_code"] == 200
    assert a["http.response.body.size"] == 300_000
    assert a.get("http.request.body.size", 0) == 0
    assert "ebpf_bridge.capture.truncated" not in a


def test_request_head_larger_than_capture_is_marked_truncated(edge: Edge) -> None:
    tag = secrets.token_hex(4)
    r = requests.get(edge.url(f"/trunc-{tag}?a=b"), headers={"X-Pad": "p" * 3000}, timeout=10)
    assert r.status_code == 200
    spans = edge.wait_server(_prefix(f"/trunc-{tag}"), 1)
    assert len(spans) == 1
    a = spans[0].attributes
    assert a["ebpf_bridge.capture.truncated"] is True
    assert a["url.path"] == f"/trunc-{tag}"
    assert a["url.query"] == "a=b"
    assert a["http.request.method"] == "GET"
    assert a["http.response.status_code"] == 200


# -- chunked and slow responses ---------------------------------------------------------------

def _chunked_body_size(parts: int) -> int:
    return sum(len(f"chunk {i} of {parts}\n") * (i + 1) for i in range(parts))


def test_chunked_response_in_several_writes(edge: Edge) -> None:
    with requests.Session() as s:
        r = s.get(edge.url("/chunked/5"), timeout=10)
        assert r.status_code == 200
        assert r.headers["Transfer-Encoding"] == "chunked"
        assert len(r.content) == _chunked_body_size(5)
        # Bigger than the response capture: the walk cannot finish, the size is unknown.
        r = s.get(edge.url("/chunked/20"), timeout=10)
        assert r.status_code == 200 and len(r.content) == _chunked_body_size(20)
    spans = edge.wait_server(lambda p: p.startswith("/chunked/"), 2)
    small = [s for s in spans if s.attributes["url.path"] == "/chunked/5"]
    large = [s for s in spans if s.attributes["url.path"] == "/chunked/20"]
    assert len(small) == 1 and len(large) == 1
    assert small[0].attributes["http.response.status_code"] == 200
    assert small[0].attributes["http.response.body.size"] == _chunked_body_size(5)
    assert large[0].attributes["http.response.status_code"] == 200
    assert "http.response.body.size" not in large[0].attributes


def test_response_split_in_time(edge: Edge) -> None:
    """Pauses shorter and longer than --idle-flush-ms (100 ms) inside one response, followed
    by another request on the same connection: one span per request, nothing lost."""
    tag = secrets.token_hex(4)
    with requests.Session() as s:
        for path in ("/slow/30", "/slow/250", f"/after-slow-{tag}"):
            r = s.get(edge.url(path) + (f"?t={tag}" if path.startswith("/slow") else ""),
                      timeout=10)
            assert r.status_code == 200
    spans = edge.wait_server(lambda p: p.startswith("/slow/") or p == f"/after-slow-{tag}", 3)
    spans = [s for s in spans if s.attributes.get("url.query") == f"t={tag}"
             or s.attributes["url.path"] == f"/after-slow-{tag}"]
    by_path = {s.attributes["url.path"]: s for s in spans}
    assert len(spans) == 3 and set(by_path) == {"/slow/30", "/slow/250", f"/after-slow-{tag}"}
    for s in spans:
        assert s.attributes["http.response.status_code"] == 200
    assert by_path["/slow/30"].attributes["http.response.body.size"] == 45
    assert len({s.attributes["network.peer.port"] for s in spans}) == 1


def test_idle_flushed_exchange_then_next_request(edge: Edge) -> None:
    """The idle flush emits a finished exchange on a keep-alive connection that stays open;
    the kernel emits that exchange again when the connection's next request starts, and the
    agent drops the copy: one span per request, no span id twice."""
    tag = secrets.token_hex(4)
    first, second = f"/ka-{tag}/1", f"/ka-{tag}/2"
    with requests.Session() as s:
        assert s.get(edge.url(first), timeout=10).status_code == 200
        # Only the idle flush can emit it now: the connection stays open and quiet.
        edge.receiver.wait_for(lambda ss: any(x.attributes.get("url.path") == first
                                              for x in ss))
        assert s.get(edge.url(second), timeout=10).status_code == 200
    spans = edge.wait_server(_prefix(f"/ka-{tag}/"), 2)
    assert sorted(str(x.attributes["url.path"]) for x in spans) == [first, second]
    assert len({x.span_id for x in spans}) == 2
    assert len({x.attributes["network.peer.port"] for x in spans}) == 1


def test_spans_resource(edge: Edge) -> None:
    spans = by_service(edge.receiver.spans(), SERVICE, SERVER)
    assert spans
    for s in spans:
        assert s.resource["telemetry.sdk.name"] == "ebpf-bridge"
        assert s.resource["process.executable.name"].startswith("python")
        assert s.attributes["client.address"] == "127.0.0.1"


def test_expect_100_continue(edge: Edge) -> None:
    """A client that waits for "100 Continue" before sending the body: the interim response
    sits between the request head and the body. One span, with the final status."""
    tag = secrets.token_hex(4)
    body = b"b" * 5000
    head = (f"POST /echo/c{tag} HTTP/1.1\r\nHost: e\r\nContent-Length: {len(body)}\r\n"
            "Expect: 100-continue\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", edge.port)) as sock:
        sock.sendall(head)
        sock.settimeout(10)
        interim = sock.recv(1024)
        assert interim.startswith(b"HTTP/1.1 100"), interim
        sock.sendall(body)
        answer = _recv_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(body), answer[:200]
    spans = edge.wait_server(_prefix(f"/echo/c{tag}"), 1)
    assert len(spans) == 1
    a = spans[0].attributes
    assert a["http.request.method"] == "POST"
    assert a["http.request.body.size"] == 5000
    assert a.get("http.response.status_code") == 200, a
    assert a.get("http.response.body.size") == 5000, a
