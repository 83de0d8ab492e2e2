"""Agent CPU per span, HTTPS (OpenSSL uprobes) versus plain HTTP, through one traced Python server.

Starts tests/e2e/apps/tls_app.py twice (one TLS, one plaintext variant via a tiny http.server),
an agent tracing both with a discarding exporter (jsonl to /dev/null), sends N keep-alive
requests to each in turn and reads the agent's CPU time (utime+stime from /proc/<pid>/stat)
around each batch. Prints a table; never passes or fails on time.

    sudo .venv/bin/python bench/tls_bench.py [-n 2000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "tests/e2e/apps/tls_app.py"
PLAIN = """
import sys, pathlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        raw = b'{"tenant": "x"}'
        self.send_response(200); self.send_header("Content-Length", str(len(raw)))
        self.end_headers(); self.wfile.write(raw)
    def log_message(self, *a): pass
s = ThreadingHTTPServer(("127.0.0.1", 0), H)
pathlib.Path(sys.argv[1]).write_text(str(s.server_address[1]))
s.serve_forever()
"""
TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def wait_file(p: Path, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while not p.exists() or not p.read_text().strip():
        if time.monotonic() > deadline:
            raise SystemExit(f"timeout waiting for {p}")
        time.sleep(0.05)
    return p.read_text().strip()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=2000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tls-bench-"))
    crt, key = tmp / "c.pem", tmp / "k.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(crt)], check=True, capture_output=True)
    procs = []
    try:
        tls = subprocess.Popen([sys.executable, str(APP), "--port", "0", "--ready-file",
                                str(tmp / "tls.ready"), "--cert", str(crt), "--key", str(key)])
        plain = subprocess.Popen([sys.executable, "-c", PLAIN, str(tmp / "plain.ready")])
        procs += [tls, plain]
        tls_port = int(wait_file(tmp / "tls.ready"))
        plain_port = int(wait_file(tmp / "plain.ready"))
        agent = subprocess.Popen([sys.executable, "-m", "kernel_side.cli", "agent", "--pid",
                                  str(tls.pid), "--pid", str(plain.pid), "--exporter", "jsonl",
                                  "--jsonl", "/dev/null", "--stats-interval", "0",
                                  "--ready-file", str(tmp / "agent.ready")], cwd=REPO)
        procs.append(agent)
        wait_file(tmp / "agent.ready")
        rows = []
        for name, url, verify in (("http", f"http://127.0.0.1:{plain_port}/", True),
                                  ("https", f"https://127.0.0.1:{tls_port}/", str(crt)),
                                  ("http", f"http://127.0.0.1:{plain_port}/", True),
                                  ("https", f"https://127.0.0.1:{tls_port}/", str(crt))):
            with requests.Session() as s:
                s.get(url, verify=verify)
                time.sleep(0.5)
                c0, t0 = cpu_s(agent.pid), time.monotonic()
                for _ in range(args.n):
                    s.get(url, verify=verify)
                wall = time.monotonic() - t0
                time.sleep(0.5)  # let the agent drain and export
                c1 = cpu_s(agent.pid)
            rows.append((name, args.n, wall, (c1 - c0) / args.n * 1e6))
        print(f"{'scheme':<7}{'requests':>9}{'wall s':>9}{'agent CPU us/req (server span)':>32}")
        for name, n, wall, us in rows:
            print(f"{name:<7}{n:>9}{wall:>9.2f}{us:>32.1f}")
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
