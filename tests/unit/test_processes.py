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
