"""Process discovery helpers that need no kernel: environment and resource parsing, and
selection by listening port (real sockets, read back from /proc/net/tcp)."""

from __future__ import annotations

import os
import socket

from kernel_side import processes
from kernel_side.model import Resource


def test_parse_environ_splits_on_nul_and_first_equals() -> None:
    raw = b"OTEL_SERVICE_NAME=orders\0PATH=/bin:/usr/bin\0EMPTY=\0weird=a=b\0noequals\0"
    env = processes.parse_environ(raw)
    assert env == {"OTEL_SERVICE_NAME": "orders", "PATH": "/bin:/usr/bin", "EMPTY": "",
                   "weird": "a=b"}


def test_parse_resource_attributes_percent_decodes_and_skips_junk() -> None:
    got = processes.parse_resource_attributes(
        "deployment.environment=prod, team=pay%20ments,=x,novalue,k=v%2Cw")
    assert got == {"deployment.environment": "prod", "team": "pay ments", "k": "v,w"}


def test_build_resource_for_this_process_reads_environment(monkeypatch: object) -> None:
    res = processes.build_resource(os.getpid(), "host-a", "9.9")
    assert res is not None
    assert res.attributes["process.pid"] == os.getpid()
    assert res.attributes["host.name"] == "host-a"
    assert res.attributes["telemetry.sdk.name"] == "ebpf-bridge"
    assert res.attributes["service.name"]
    assert res.key[0] == os.getpid() and res.key[1] > 0


def test_build_resource_for_a_missing_process_is_none() -> None:
    assert processes.build_resource(2**22 + 12345, "h", "0") is None


def test_renamed_follows_exec_unless_service_was_configured() -> None:
    from_exe = Resource((1, 2), {"service.name": "perl", "process.executable.name": "perl"})
    r = processes.renamed(from_exe, "pgbench")
    assert r.attributes["service.name"] == "pgbench"
    assert r.attributes["process.executable.name"] == "pgbench"
    assert r.key == (1, 2)
    configured = Resource((1, 2), {"service.name": "bench", "process.executable.name": "perl"})
    r = processes.renamed(configured, "pgbench")
    assert r.attributes["service.name"] == "bench"
    assert r.attributes["process.executable.name"] == "pgbench"


def test_selector_with_no_criteria_selects_all() -> None:
    assert processes.Selector().select_all
    assert not processes.Selector(pids=(1,)).select_all
    assert not processes.Selector(ports=((80, 80),)).select_all


def test_port_ranges_select_the_process_listening_inside_one() -> None:
    pids_listening_on = processes.pids_listening_on
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        me = os.getpid()
        assert pids_listening_on([(port - 1, port + 1)], [me]) == {me}
        assert pids_listening_on([(port, port)], [me]) == {me}
        assert pids_listening_on([(port + 1, port + 10), (1, port - 1)], [me]) == set()
    assert pids_listening_on([(port, port)], [me]) == set()  # closed: no longer listening


def _own_exe() -> str:
    return os.path.basename(os.readlink("/proc/self/exe"))


def _pair(family: int, host: str) -> tuple[socket.socket, socket.socket, int]:
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.bind((host, 0))
    srv.listen()
    port = srv.getsockname()[1]
    client = socket.create_connection((host, port))
    accepted, _ = srv.accept()
    srv.close()
    return client, accepted, port


def test_local_peer_executable_finds_the_server_end_of_a_connection() -> None:
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        client, accepted, port = _pair(family, host)
        with client, accepted:
            fd = client.fileno()
            assert processes.local_peer_executable(os.getpid(), fd, (host, port)) == _own_exe()
            # The fd names another connection than the exchange's: never guess.
            assert processes.local_peer_executable(os.getpid(), fd, (host, port + 1)) is None
            # The server end of a connection is the client's "peer" the other way round.
            cport = client.getsockname()[1]
            assert processes.local_peer_executable(
                os.getpid(), accepted.fileno(), (host, cport)) == _own_exe()


def test_local_peer_executable_after_close_falls_back_to_a_local_listener() -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = srv.accept()
    fd = client.fileno()
    client.close()
    accepted.close()
    with srv:  # still listening: the loopback listener stands in for the closed connection
        assert processes.local_peer_executable(os.getpid(), fd, ("127.0.0.1", port)) == (
            _own_exe())
    # No listener any more, and a port nobody listens on: unknown, not guessed.
    assert processes.local_peer_executable(os.getpid(), fd, ("127.0.0.1", port)) is None
    with open(os.devnull) as f:
        assert processes.local_peer_executable(os.getpid(), f.fileno(), ("10.9.8.7", 1)) is None


def test_peer_servers_caches_per_server() -> None:
    peers = processes.PeerServers()
    client, accepted, port = _pair(socket.AF_INET, "127.0.0.1")
    with client, accepted:
        got = peers.server_executable(os.getpid(), client.fileno(), "127.0.0.1", port)
        assert got == _own_exe()
    # Connection and listener gone: the cached answer stands for the same server.
    assert peers.server_executable(os.getpid(), 9999, "127.0.0.1", port) == _own_exe()
    assert peers.server_executable(os.getpid(), 9999, "127.0.0.1", 1) is None
