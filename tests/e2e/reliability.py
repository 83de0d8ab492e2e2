"""Helpers for the reliability e2e tests (hostile traffic, faults, trust model, secrets)."""

from __future__ import annotations

import re
import resource
import socket
import time
from pathlib import Path

from tests.e2e.conftest import Harness

NGINX = "/usr/sbin/nginx"


def free_port() -> int:
    """A port nothing listens on right now (bind, read, close)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def final_stats(log: str) -> dict[str, int]:
    """The counters of the agent's last "final stats" line."""
    lines = [ln for ln in log.splitlines() if "final stats" in ln]
    assert lines, f"no final stats line in the agent log:\n{log[-3000:]}"
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", lines[-1].split("final stats", 1)[1])}


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` (VmRSS) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def raise_nofile(n: int) -> None:
    """Let this process hold ``n`` descriptors (root may raise the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, max(hard, n)))


def wait_listening(port: int, alive: object, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if not alive() or time.monotonic() > deadline:  # type: ignore[operator]
                raise AssertionError(f"nothing listening on {port}") from None
            time.sleep(0.02)


def start_nginx(harness: Harness, *, connections: int = 1024) -> int:
    """Debian's nginx (master + 1 worker) on a free loopback port; returns the port."""
    tmp = harness.tmp
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {connections * 2 + 100};
error_log {tmp}/error.log;
pid {tmp}/nginx.pid;
events {{ worker_connections {connections + 100}; }}
http {{
    access_log off;
    keepalive_timeout 600s;
    client_header_timeout 600s;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    large_client_header_buffers 4 128k;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ return 200 "hello\\n"; }}
    }}
}}
""")
    proc = harness.start("nginx", [NGINX, "-p", str(tmp), "-e", str(tmp / "error.log"),
                                   "-c", str(conf)])
    wait_listening(port, lambda: proc.popen.poll() is None)
    return port


def exchange_raw(port: int, payload: bytes, *, timeout: float = 2.0) -> bytes:
    """Send ``payload`` on a fresh connection, half-close, read what comes back."""
    out = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except OSError:  # reset by a server that rejected the bytes: fine
            pass
    return out
