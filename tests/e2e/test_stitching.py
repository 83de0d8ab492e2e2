"""One trace across zero-code services on one node, by connection (issue 7).

The agent sees both ends of each connection between traced processes and joins the server span
of the k-th request on a connection to the client span that sent it. None of these services
forwards a traceparent.
"""

from __future__ import annotations

import threading

import pytest
import requests

from kernel_side.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.e2e.conftest import APPS, CLIENT, EXAMPLES, PYTHON, SERVER, Harness, by_service


def _relay(h: Harness, name: str, upstream_port: int, prefix: str, host: str = "127.0.0.1",
           upstream_host: str = "127.0.0.1") -> tuple[int, int]:
    ready = h.tmp / f"{name}.ready"
    proc = h.start(name, [PYTHON, str(APPS / "relay.py"), "--upstream",
                          f"http://{upstream_host}:{upstream_port}", "--prefix", prefix,
                          "--host", host, "--ready-file", str(ready)],
                   env={"OTEL_SERVICE_NAME": name}, ready_file=ready)
    return proc.pid, int(ready.read_text())


def _chains(spans: list[ReceivedSpan], n: int, front: str, front_prefix: str,
            mid: str) -> None:
    by_id = {s.span_id: s for s in spans}
    for i in range(n):
        inv = [s for s in by_service(spans, "inventory", SERVER)
               if s.attributes["url.path"] == f"/stock/sku-{i}"]
        assert len(inv) == 1
        chain = [inv[0]]
        while chain[-1].parent_span_id is not None:
            parent = by_id.get(chain[-1].parent_span_id)
            assert parent is not None, f"request {i}: dangling parent under {chain[-1].name}"
            chain.append(parent)
        kinds = [(s.resource["service.name"], s.kind) for s in chain]
        assert kinds == [("inventory", SERVER), (mid, CLIENT), (mid, SERVER),
                         (front, CLIENT), (front, SERVER)], kinds
        assert len({s.trace_id for s in chain}) == 1, f"request {i}: several traces"
        assert chain[-1].attributes["url.path"] == f"{front_prefix}{i}", (i, chain[-1])
    roots = {s.trace_id for s in by_service(spans, front, SERVER)}
    assert len(roots) == n
    for svc in (mid, "inventory"):
        assert {s.trace_id for s in by_service(spans, svc)} <= roots


def _enough(n: int, front: str, mid: str):  # type: ignore[no-untyped-def]
    def done(ss: list[ReceivedSpan]) -> bool:
        return all(len(by_service(ss, svc, SERVER)) >= n for svc in (front, mid, "inventory"))
    return done


def _sequential(receiver: OtlpReceiver, port: int, n: int, front: str) -> list[ReceivedSpan]:
    """n requests one after another on one connection to ``front`` on ``port``; returns the
    spans once every service has its n server spans, each request one whole trace."""
    with requests.Session() as s:
        for i in range(n):
            r = s.get(f"http://127.0.0.1:{port}/front/{i}", timeout=20)
            assert r.status_code == 200 and r.json()["sku"] == f"sku-{i}"
    spans = receiver.wait_for(_enough(n, front, "mid"), timeout_s=40)
    _chains(spans, n, front, "/front/", "mid")
    return spans


def test_concurrent_requests_on_shared_keep_alive_connections(harness: Harness,
                                                               receiver: OtlpReceiver) -> None:
    """Threaded zero-code services (front -> mid -> inventory); each relay shares two
    keep-alive connections among all its request threads."""
    inv, inv_port = harness.python_service("inventory", EXAMPLES / "python/inventory.py")
    mid_pid, mid_port = _relay(harness, "mid", inv_port, "/stock/sku-")
    front_pid, front_port = _relay(harness, "front", mid_port, "/mid/")
    harness.agent("--pid", str(front_pid), "--pid", str(mid_pid), "--pid", str(inv.pid),
                  receiver=receiver)
    n = 16
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            r = requests.get(f"http://127.0.0.1:{front_port}/front/{i}", timeout=20)
            assert r.status_code == 200 and r.json()["sku"] == f"sku-{i}"
        except BaseException as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    spans = receiver.wait_for(_enough(n, "front", "mid"), timeout_s=40)
    _chains(spans, n, "front", "/front/", "mid")
    # The two shared connections carried several requests each: stitching went by order on
    # the connection, not by one request per connection.
    mid_servers = by_service(spans, "mid", SERVER)
    assert len({s.attributes["network.peer.port"] for s in mid_servers}) < n


# The probes read a connection's addresses through the fd table at accept/connect exit; on a
# kernel whose BTF lacks those fields they learn them at the first send or receive instead.
# EBPF_BRIDGE_NO_FD_WALK selects that fallback here, so both paths stay tested.
FD_WALK = pytest.mark.parametrize("fd_walk", [True, False], ids=["fd-walk", "first-io"])
_FALLBACK_LOG = "EBPF_BRIDGE_NO_FD_WALK is set"


def _agent_env(fd_walk: bool) -> dict[str, str] | None:
    return None if fd_walk else {"EBPF_BRIDGE_NO_FD_WALK": "1"}


@FD_WALK
def test_an_ipv6_hop_is_stitched(harness: Harness, receiver: OtlpReceiver,
                                 fd_walk: bool) -> None:
    """front -> mid over ::1, mid -> inventory over 127.0.0.1. The probes read an IPv6
    socket's addresses at the offsets the kernel's BTF gives (kernel_side/btf.py); with them
    wrong or missing, the mid server span would have no client on this node and start its
    own trace."""
    inv, inv_port = harness.python_service("inventory", EXAMPLES / "python/inventory.py")
    mid_pid, mid_port = _relay(harness, "mid", inv_port, "/stock/sku-", host="::1")
    front_pid, front_port = _relay(harness, "front", mid_port, "/mid/", upstream_host="[::1]")
    agent = harness.agent("--pid", str(front_pid), "--pid", str(mid_pid), "--pid",
                          str(inv.pid), receiver=receiver, env=_agent_env(fd_walk))
    spans = _sequential(receiver, front_port, 6, "front")
    mid_servers = by_service(spans, "mid", SERVER)
    assert {s.attributes["network.peer.address"] for s in mid_servers} == {"::1"}
    assert (_FALLBACK_LOG in agent.log_text()) is not fd_walk


@FD_WALK
def test_node_front_sequential(harness: Harness, receiver: OtlpReceiver,
                               fd_walk: bool) -> None:
    """A zero-code Node service in front. Node serves every request on one thread, so the
    in-process link (its outgoing call under its incoming request) is exact only when requests
    do not overlap; the cross-process links are exact either way. libuv accepts with
    ``accept4(fd, NULL, NULL)``, so the peer's address comes from the socket, not the call."""
    inv, inv_port = harness.python_service("inventory", EXAMPLES / "python/inventory.py")
    mid_pid, mid_port = _relay(harness, "mid", inv_port, "/stock/sku-")
    ready = harness.tmp / "node.ready"
    node = harness.start("node", ["node", str(APPS / "relay.js"),
                                  f"http://127.0.0.1:{mid_port}", str(ready)],
                         env={"OTEL_SERVICE_NAME": "node-front"}, ready_file=ready)
    port = int(ready.read_text())
    agent = harness.agent("--pid", str(node.pid), "--pid", str(mid_pid), "--pid",
                          str(inv.pid), receiver=receiver, env=_agent_env(fd_walk))
    _sequential(receiver, port, 5, "node-front")
    assert (_FALLBACK_LOG in agent.log_text()) is not fd_walk
