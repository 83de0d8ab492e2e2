"""Traceparent injection between network namespaces (issue 7, opt-in ``--inject-traceparent``).

Two network namespaces joined by a veth pair stand in for two nodes: the client and the
downstream server talk over the veth addresses, never loopback. The downstream server is a
byte-exact echo (tests/e2e/apps/raw_echo.py) that reports each request head as it arrived and
the SHA-256 of its body, so the test sees exactly what injection changed on the wire.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from kernel_side.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.e2e.conftest import APPS, CLIENT, PYTHON, SERVER, Harness, Proc, by_service

TP_LINE = re.compile(rb"traceparent: 00-([0-9a-f]{32})-([0-9a-f]{16})-01\r\n")
GIVEN_TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@dataclass
class Netns:
    """Two namespaces ("nodes") a and b joined by a veth pair."""

    a: str
    b: str
    addr_a: str
    addr_b: str

    def run(self, ns: str) -> list[str]:
        """The argv prefix that runs a command in namespace ``ns``."""
        return ["ip", "netns", "exec", ns]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def netns() -> Iterator[Netns]:
    """Namespaces and addresses of this test's own (10.250.x.1 and .2), removed afterwards."""
    tag = uuid.uuid4().hex[:6]
    a, b = f"ebb-a-{tag}", f"ebb-b-{tag}"
    octet = int(tag, 16) % 250 + 1
    addr_a, addr_b = f"10.250.{octet}.1", f"10.250.{octet}.2"
    _ip("netns", "add", a)
    _ip("netns", "add", b)
    try:
        _ip("link", "add", f"va-{tag}", "type", "veth", "peer", "name", f"vb-{tag}")
        _ip("link", "set", f"va-{tag}", "netns", a)
        _ip("link", "set", f"vb-{tag}", "netns", b)
        for ns, dev, addr in ((a, f"va-{tag}", addr_a), (b, f"vb-{tag}", addr_b)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield Netns(a, b, addr_a, addr_b)
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)


def _echo(h: Harness, ns: Netns, where: str, addr: str) -> tuple[Proc, int]:
    ready = h.tmp / "echo.ready"
    proc = h.start("echo", [*ns.run(where), PYTHON, str(APPS / "raw_echo.py"), "--host", addr,
                            "--ready-file", str(ready)],
                   env={"OTEL_SERVICE_NAME": "echo"}, ready_file=ready)
    return proc, int(ready.read_text())


def _relay(h: Harness, ns: Netns, upstream: str) -> tuple[Proc, int]:
    """The zero-code relay (thread per request, shared keep-alive pool) on node b:
    GET /r/<id> -> GET <upstream>/echo/<id>."""
    ready = h.tmp / "relay.ready"
    proc = h.start("relay", [*ns.run(ns.b), PYTHON, str(APPS / "relay.py"), "--host", ns.addr_b,
                             "--upstream", upstream, "--prefix", "/echo/",
                             "--ready-file", str(ready)],
                   env={"OTEL_SERVICE_NAME": "relay"}, ready_file=ready)
    return proc, int(ready.read_text())


def _client(h: Harness, ns: Netns, host: str, port: int,
            spec: list[dict[str, object]]) -> tuple[Proc, Path, Path]:
    (h.tmp / "spec.json").write_text(json.dumps(spec))
    ready, out, go = h.tmp / "client.ready", h.tmp / "client.out", h.tmp / "client.go"
    proc = h.start("client", [*ns.run(ns.a), PYTHON, str(APPS / "raw_client.py"), "--host", host,
                              "--port", str(port), "--spec", str(h.tmp / "spec.json"),
                              "--out", str(out), "--ready-file", str(ready),
                              "--go-file", str(go)],
                   env={"OTEL_SERVICE_NAME": "client"}, ready_file=ready)
    return proc, out, go


def _wait_file(path: Path, proc: Proc, timeout: float = 60.0) -> str:
    import time

    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.popen.poll() is None or path.exists(), proc.log_text()
        assert time.monotonic() < deadline, f"{path.name} not written:\n{proc.log_text()}"
        time.sleep(0.02)
    return path.read_text()


def _final_stats(agent: Proc) -> dict[str, int]:
    agent.stop()
    line = [ln for ln in agent.log_text().splitlines() if "final stats" in ln][-1]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(-?\d+)", line)}


def _path(span: ReceivedSpan) -> str:
    return urlsplit(str(span.attributes["url.full"])).path


def _req(method: str, path: str, host: str, *, body: str = "", tp: str | None = None,
         version: str = "1.1", split: bool = False) -> dict[str, object]:
    lines = [f"{method} {path} HTTP/{version}", f"Host: {host}", "User-Agent: raw-client/1",
             "Accept: */*"]
    if tp:
        lines.append(f"traceparent: {tp}")
    if body or method == "POST":
        lines += ["Content-Type: application/octet-stream", f"Content-Length: {len(body)}"]
    return {"head": "\r\n".join(lines) + "\r\n\r\n", "body": body, "split": split}


def test_injects_into_requests_without_traceparent_and_leaves_the_rest_byte_exact(
        harness: Harness, receiver: OtlpReceiver, netns: Netns) -> None:
    echo, port = _echo(harness, netns, netns.b, netns.addr_b)
    host = f"{netns.addr_b}:{port}"
    body = "x" * 3000 + "\r\n\r\nGET /not-a-request HTTP/1.1\r\n\r\n" + "y" * 100
    spec = [
        _req("GET", "/plain", host),                               # injected
        _req("POST", "/with-body", host, body=body),               # injected; body intact
        _req("GET", "/given", host, tp=GIVEN_TP),                  # untouched
        _req("POST", "/given-body", host, body="abc", tp=GIVEN_TP),  # untouched
        _req("POST", "/split", host, body=body, split=True),       # head injected, body intact
        _req("GET", "/http10", host, version="1.0"),               # not HTTP/1.1: untouched
        _req("GET", "/last", host),                                # injected
    ]
    client, out, go = _client(harness, netns, netns.addr_b, port, spec)
    agent = harness.agent("--pid", str(client.pid), "--pid", str(echo.pid),
                          "--inject-traceparent", receiver=receiver)
    go.touch()
    answers = [json.loads(ln) for ln in _wait_file(out, client).splitlines()]
    assert len(answers) == len(spec)
    # A process the agent does not select is never touched, injection on or not.
    untraced = subprocess.run([*netns.run(netns.a), "curl", "-s", f"http://{host}/untraced"],
                              capture_output=True, check=True, timeout=30)
    assert b"/untraced" in untraced.stdout and b"traceparent" not in untraced.stdout

    injected: dict[str, tuple[str, str]] = {}
    for req, answer in zip(spec, answers, strict=True):
        sent = str(req["head"]).encode("latin-1")
        got = str(answer["head"]).encode("latin-1")
        path = sent.split(b" ")[1].decode()
        assert answer["body_sha256"] == hashlib.sha256(
            str(req["body"]).encode("latin-1")).hexdigest(), path
        if path in ("/given", "/given-body", "/http10"):
            assert got == sent, f"{path}: changed on the wire:\n{got!r}"
            continue
        m = TP_LINE.search(got)
        assert m is not None, f"{path}: no traceparent injected:\n{got!r}"
        # Exactly one line, right after the request line; every other byte as sent.
        line_end = sent.index(b"\r\n") + 2
        assert m.start() == line_end, path
        assert got[:m.start()] + got[m.end():] == sent, path
        injected[path] = (m.group(1).decode(), m.group(2).decode())
    assert set(injected) == {"/plain", "/with-body", "/split", "/last"}
    assert len({span for _, span in injected.values()}) == 4

    def complete(ss: list[ReceivedSpan]) -> bool:
        return (len(by_service(ss, "echo", SERVER)) >= len(spec)
                and len(by_service(ss, "client", CLIENT)) >= len(spec))

    spans = receiver.wait_for(complete, timeout_s=60)
    clients = {_path(s): s for s in by_service(spans, "client", CLIENT)}
    servers = {s.attributes["url.path"]: s for s in by_service(spans, "echo", SERVER)}
    for path, (trace, span) in injected.items():
        # The header names the client span the agent exported, and the server span (which
        # reads the header, as an agent on another node would) joins its trace under it.
        c, s = clients[path], servers[path]
        assert (c.trace_id, c.span_id) == (trace, span), path
        assert (s.trace_id, s.parent_span_id) == (trace, span), path
    given = GIVEN_TP[3:35]
    for path in ("/given", "/given-body"):
        assert servers[path].trace_id == given and clients[path].trace_id == given
    stats = _final_stats(agent)
    assert stats["inject_injected"] == 4
    assert stats["inject_present"] == 2
    assert stats["inject_failed"] == 0


def test_nested_requests_carry_the_inbound_trace(harness: Harness, receiver: OtlpReceiver,
                                                 netns: Netns) -> None:
    """client (node a) -> relay (node b, zero-code, thread per request) -> echo (node a). The
    relay's own outbound requests carry the trace of the request it serves: the one the
    injected (or given) traceparent named, or, for a caller the agent does not trace, the
    trace the relay's server span starts."""
    echo, echo_port = _echo(harness, netns, netns.a, netns.addr_a)
    relay, relay_port = _relay(harness, netns, f"http://{netns.addr_a}:{echo_port}")
    host = f"{netns.addr_b}:{relay_port}"
    spec = [_req("GET", f"/r/{i}", host) for i in range(3)]
    spec.append(_req("GET", "/r/given", host, tp=GIVEN_TP))
    client, out, go = _client(harness, netns, netns.addr_b, relay_port, spec)
    agent = harness.agent("--pid", str(client.pid), "--pid", str(relay.pid), "--pid",
                          str(echo.pid), "--inject-traceparent", receiver=receiver)
    go.touch()
    answers = [json.loads(ln) for ln in _wait_file(out, client).splitlines()]
    assert len(answers) == len(spec)
    # A caller the agent does not trace: the relay's server span starts the trace.
    untraced = subprocess.run([*netns.run(netns.b), "curl", "-s", f"http://{host}/r/untraced"],
                              capture_output=True, check=True, timeout=30)
    assert b"traceparent: 00-" in untraced.stdout

    def complete(ss: list[ReceivedSpan]) -> bool:
        return len(by_service(ss, "echo", SERVER)) >= len(spec) + 1

    spans = receiver.wait_for(complete, timeout_s=60)
    by_id = {s.span_id: s for s in spans}
    for ident in ("0", "1", "2", "given", "untraced"):
        echo_span = [s for s in by_service(spans, "echo", SERVER)
                     if s.attributes["url.path"] == f"/echo/{ident}"]
        assert len(echo_span) == 1, ident
        chain = [echo_span[0]]
        while chain[-1].parent_span_id in by_id:
            chain.append(by_id[chain[-1].parent_span_id])
        kinds = [(s.resource["service.name"], s.kind) for s in chain]
        expected = [("echo", SERVER), ("relay", CLIENT), ("relay", SERVER)]
        if ident not in ("untraced", "given"):
            expected.append(("client", CLIENT))
        assert kinds == expected, (ident, kinds)
        assert len({s.trace_id for s in chain}) == 1, f"{ident}: more than one trace"
        if ident == "given":
            assert chain[-1].trace_id == GIVEN_TP[3:35]
            assert chain[-1].parent_span_id == GIVEN_TP[36:52]
    stats = _final_stats(agent)
    # client: 3 (the 4th carried its own); relay: 5 outbound, all under a known trace.
    assert stats["inject_injected"] == 8, stats
    assert stats["inject_unknown_trace"] == 0, stats


def test_off_by_default(harness: Harness,
                                                         receiver: OtlpReceiver,
                                                         netns: Netns) -> None:
    echo, port = _echo(harness, netns, netns.b, netns.addr_b)
    host = f"{netns.addr_b}:{port}"
    spec = [_req("GET", "/a", host), _req("POST", "/b", host, body="hello")]
    client, out, go = _client(harness, netns, netns.addr_b, port, spec)
    harness.agent("--pid", str(client.pid), "--pid", str(echo.pid), receiver=receiver)
    go.touch()
    answers = [json.loads(ln) for ln in _wait_file(out, client).splitlines()]
    for req, answer in zip(spec, answers, strict=True):
        assert answer["head"] == req["head"]


def test_concurrent_requests_on_shared_keep_alive_connections(
        harness: Harness, receiver: OtlpReceiver, netns: Netns) -> None:
    """16 concurrent requests through a threaded relay whose outbound calls share two
    keep-alive connections: each injected traceparent names the trace of the request its
    thread serves, never a neighbour's."""
    echo, echo_port = _echo(harness, netns, netns.a, netns.addr_a)
    relay, relay_port = _relay(harness, netns, f"http://{netns.addr_a}:{echo_port}")
    host = f"{netns.addr_b}:{relay_port}"
    agent = harness.agent("--pid", str(relay.pid), "--pid", str(echo.pid),
                          "--inject-traceparent", receiver=receiver)
    n = 16
    callers = [subprocess.Popen([*netns.run(netns.b), "curl", "-s", "--max-time", "30",
                                 f"http://{host}/r/{i}"], stdout=subprocess.PIPE)
               for i in range(n)]
    for i, c in enumerate(callers):
        out, _ = c.communicate(timeout=60)
        assert c.returncode == 0 and f"/echo/{i} ".encode() in out, (i, out)

    spans = receiver.wait_for(lambda ss: len(by_service(ss, "echo", SERVER)) >= n,
                              timeout_s=60)
    by_id = {s.span_id: s for s in spans}
    for i in range(n):
        (echo_span,) = [s for s in by_service(spans, "echo", SERVER)
                        if s.attributes["url.path"] == f"/echo/{i}"]
        relay_client = by_id[echo_span.parent_span_id]
        relay_server = by_id[relay_client.parent_span_id]
        assert relay_client.kind == CLIENT and relay_server.kind == SERVER
        assert relay_server.attributes["url.path"] == f"/r/{i}", i
        assert {echo_span.trace_id, relay_client.trace_id, relay_server.trace_id} == {
            relay_server.trace_id}, i
    assert len({s.trace_id for s in by_service(spans, "relay", SERVER)}) == n
    stats = _final_stats(agent)
    assert stats["inject_injected"] == n, stats


def test_agent_killed_mid_connection_leaves_the_app_working_and_untouched(
        harness: Harness, receiver: OtlpReceiver, netns: Netns) -> None:
    """The programs are attached through BPF links, which go with the agent's file
    descriptors: after SIGKILL nothing injects any more, and the connection that was in the
    sockhash keeps working."""
    echo, port = _echo(harness, netns, netns.b, netns.addr_b)
    host = f"{netns.addr_b}:{port}"
    later = harness.tmp / "agent-dead"
    spec = [_req("GET", "/before", host), {**_req("GET", "/after", host), "wait": str(later)}]
    client, out, go = _client(harness, netns, netns.addr_b, port, spec)
    agent = harness.agent("--pid", str(client.pid), "--pid", str(echo.pid),
                          "--inject-traceparent", receiver=receiver)
    go.touch()
    progress = Path(str(out) + ".progress")
    first = json.loads(_wait_file(progress, client).splitlines()[0])
    assert TP_LINE.search(str(first["head"]).encode("latin-1"))
    agent.popen.kill()
    agent.popen.wait(30)
    later.touch()
    answers = [json.loads(ln) for ln in _wait_file(out, client).splitlines()]
    assert answers[1]["head"] == spec[1]["head"]


def test_ids_stay_this_agents_when_another_agent_shares_the_pin_dir(
        harness: Harness, receiver: OtlpReceiver, netns: Netns) -> None:
    """A second agent started with the same pin directory publishes its own salt into the
    pinned id_salt map. The injector derives ids from its own agent's salt, so the header
    still names the span its agent exports (found by a benchmark, where it did not)."""
    echo, port = _echo(harness, netns, netns.b, netns.addr_b)
    host = f"{netns.addr_b}:{port}"
    spec = [_req("GET", f"/n/{i}", host) for i in range(3)]
    client, out, go = _client(harness, netns, netns.addr_b, port, spec)
    first = harness.agent("--pid", str(client.pid), "--pid", str(echo.pid),
                          "--inject-traceparent", receiver=receiver)
    second = harness.agent("--pid", "1", "--exporter", "jsonl", "--jsonl",
                           str(harness.tmp / "b.jsonl"))
    assert f"another agent (pid {first.pid})" in second.log_text()  # and it is told so
    go.touch()
    _wait_file(out, client)
    spans = receiver.wait_for(lambda ss: len(by_service(ss, "echo", SERVER)) >= 3
                              and len(by_service(ss, "client", CLIENT)) >= 3, timeout_s=60)
    client_ids = {s.span_id for s in by_service(spans, "client", CLIENT)}
    for s in by_service(spans, "echo", SERVER):
        assert s.parent_span_id in client_ids, s
