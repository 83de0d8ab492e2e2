"""Pieces the live benchmarks share: an agent writing real JSONL, its CPU time net of its idle
cost, the spans counted from its output, and nginx configured in a temporary directory.

The agent runs with a private pin directory (the bench's pid) so that it never shares a
context map with an agent someone else runs on the machine at the same time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")
AGENT_CPU = "0"
LOAD_CPU = "1"
"""The agent gets core 0, the server and its load tool core 1: what the agent sustains is then
what one core of Python sustains, not what is left after the load generator took its share."""


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), in seconds."""
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    f = raw[raw.rfind(b")") + 2 :].split()
    return (int(f[11]) + int(f[12])) / TICK


def thread_cpu_seconds(pid: int, tid: int) -> float:
    """utime + stime of one thread ``tid`` of process ``pid``, in seconds (``tid == pid``: the
    main thread)."""
    raw = Path(f"/proc/{pid}/task/{tid}/stat").read_bytes()
    f = raw[raw.rfind(b")") + 2 :].split()
    return (int(f[11]) + int(f[12])) / TICK


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of process ``pid``, in seconds: its own code vs the kernel's work for it
    (syscalls, and the probes that fire in them)."""
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    f = raw[raw.rfind(b")") + 2 :].split()
    return int(f[11]) / TICK, int(f[12]) / TICK


def wrk_pacing(connections: int, rate: float) -> tuple[int, int]:
    """(connections, delay in ms) for wrk's ``delay()`` hook to offer about ``rate`` req/s.

    wrk truncates the value ``delay()`` returns to whole milliseconds (measured: 0.8 paces not
    at all, 1.6 paces as 1), so the delay is rounded to a whole number of at least 1 ms and the
    connection count is chosen to match it. The offered rate is an upper bound: each connection
    also waits for its response; benches report the achieved rate.
    """
    delay = max(1, round(connections * 1000 / rate))
    return max(1, round(rate * delay / 1000)), delay


def pace_script(tmp: Path, delay_ms: int) -> Path:
    """A wrk script pacing each connection by ``delay_ms`` between response and request."""
    script = tmp / "pace.lua"
    script.write_text(f"function delay() return {delay_ms} end\n")
    return script


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, alive: Callable[[], bool], timeout: float = 60.0) -> None:
    """Wait until something accepts connections on ``port``; fail early if ``alive()`` is
    false (the server exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the server for port {port} exited before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout:.0f} s")


def wait_file(path: Path, alive: Callable[[], bool], timeout: float = 60.0) -> str:
    """The stripped text of ``path`` once it exists and is not empty."""
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text().strip():
        if not alive():
            raise RuntimeError(f"the process that should write {path} exited")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear in {timeout:.0f} s")
        time.sleep(0.05)
    return path.read_text().strip()


def stop_group(p: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Signal ``p``'s process group (started with ``start_new_session``) and reap ``p``."""
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        return
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(5)


def nginx_conf(tmp: Path, port: int, cert: tuple[Path, Path] | None = None) -> Path:
    """An nginx.conf inside ``tmp``: one worker returning 6 bytes, TLS when ``cert`` is given
    (keep-alive connections, so the handshake is paid once per connection, not per request)."""
    listen = f"127.0.0.1:{port}" + (" ssl" if cert else "")
    tls = (f"ssl_certificate {cert[0]}; ssl_certificate_key {cert[1]};" if cert else "")
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"daemon off; master_process on; worker_processes 1; pid {tmp}/nginx.pid;\n"
        f"error_log {tmp}/error.log;\nevents {{ worker_connections 1024; }}\n"
        f"http {{ access_log off; keepalive_requests 1000000;\n"
        f" client_body_temp_path {tmp}/b; proxy_temp_path {tmp}/p; fastcgi_temp_path {tmp}/f;"
        f" uwsgi_temp_path {tmp}/u; scgi_temp_path {tmp}/s;\n"
        f" server {{ listen {listen}; {tls}\n"
        f"  location / {{ return 200 \"hello\\n\"; }} }} }}\n")
    return conf


def start_nginx(tmp: Path, port: int, cert: tuple[Path, Path] | None = None
                ) -> tuple[subprocess.Popen[bytes], int]:
    """nginx on the load core; returns the master and its worker's pid."""
    conf = nginx_conf(tmp, port, cert)
    p = subprocess.Popen(["taskset", "-c", LOAD_CPU, "nginx", "-c", str(conf), "-p", str(tmp)],
                         start_new_session=True)
    wait_port(port, lambda: p.poll() is None)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        kids = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
        if kids:
            return p, int(kids[0])
        time.sleep(0.02)
    raise RuntimeError(f"nginx master {p.pid} forked no worker")


def self_signed_cert(tmp: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 (as tests/e2e/test_tls.py makes one)."""
    crt, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(crt)], check=True, capture_output=True)
    return crt, key


def other_agents(mine: int | None = None) -> int:
    """ebpf-bridge agents running that are not ``mine``: their tracepoints and libssl uprobes
    also tax every process, ours and the bare baselines included."""
    n = 0
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == mine:
            continue
        try:
            argv = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"kernel_side.cli" in argv and b"agent" in argv:
            n += 1
    return n


def parse_stats(log: str) -> dict[str, int]:
    """The counters of the agent's ``final stats`` line."""
    lines = [ln for ln in log.splitlines() if "final stats" in ln]
    if not lines:
        raise RuntimeError("the agent printed no final stats line:\n" + log[-3000:])
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", lines[-1])}


def _attr(span: dict[str, object], key: str) -> object:
    for a in span.get("attributes", ()):  # type: ignore[attr-defined]
        if a["key"] == key:
            v = a["value"]
            return next(iter(v.values())) if v else None
    return None


def count_spans(path: Path, match: Callable[[dict[str, object]], bool]) -> int:
    """Spans in an OTLP-JSON-lines file (the agent's JSONL exporter) for which ``match``
    holds."""
    n = 0
    if not path.exists():
        return 0
    with path.open("rb") as f:
        for line in f:
            if not line.strip():
                continue
            for rs in orjson.loads(line).get("resourceSpans", ()):
                for ss in rs.get("scopeSpans", ()):
                    n += sum(1 for s in ss.get("spans", ()) if match(s))
    return n


def attr_is(key: str, value: object) -> Callable[[dict[str, object]], bool]:
    """A ``count_spans`` filter: attribute ``key`` equals ``value`` (ints compare as OTLP-JSON
    writes them, as strings)."""
    want = str(value)
    return lambda s: str(_attr(s, key)) == want


@dataclass
class Agent:
    """One agent process tracing ``selectors``, pinned to the agent core, exporting JSONL."""

    tmp: Path
    selectors: list[str]
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def jsonl(self) -> Path:
        """The agent's span output."""
        return self.tmp / "spans.jsonl"

    @property
    def log_path(self) -> Path:
        """The agent's log (its final stats line lands here)."""
        return self.tmp / "agent.log"

    def start(self) -> Agent:
        """Start the agent and wait until its ready file says every probe is attached."""
        ready = self.tmp / "agent.ready"
        ready.unlink(missing_ok=True)
        self.jsonl.unlink(missing_ok=True)
        pins = f"/sys/fs/bpf/ebpf_bridge_bench_{os.getpid()}"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                ["taskset", "-c", AGENT_CPU, sys.executable, "-m", "kernel_side.cli", "agent",
                 *self.selectors, "--exporter", "jsonl", "--jsonl", str(self.jsonl),
                 "--ready-file", str(ready), "--stats-interval", "0"],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                env={**os.environ, "PYTHONPATH": str(REPO), "EBPF_BRIDGE_PIN_DIR": f"{pins}/v1",
                     **self.extra_env})
        proc = self.proc
        try:
            wait_file(ready, lambda: proc.poll() is None, timeout=120)
        except RuntimeError:
            raise RuntimeError(self.log_path.read_text()[-3000:]) from None
        return self

    @property
    def pid(self) -> int:
        """The agent's pid (taskset execs, so it is the Python process)."""
        assert self.proc is not None
        return self.proc.pid

    def cpu(self) -> float:
        """The agent's CPU seconds so far."""
        return cpu_seconds(self.pid)

    def runqueue_wait(self) -> float:
        """Seconds the agent's main thread (the ring-buffer consumer) has spent runnable but
        waiting for a CPU (/proc schedstat): on a shared machine, time others took from it."""
        fields = Path(f"/proc/{self.pid}/task/{self.pid}/schedstat").read_text().split()
        return int(fields[1]) / 1e9

    def idle_cpu_per_s(self, seconds: float) -> float:
        """The agent's CPU seconds per second with no traffic, over ``seconds``."""
        c0, t0 = self.cpu(), time.monotonic()
        time.sleep(seconds)
        return (self.cpu() - c0) / (time.monotonic() - t0)

    def wait_drained(self, settle_s: float = 1.0, timeout: float = 60.0) -> None:
        """Wait until the JSONL output stopped growing for ``settle_s``: what the load
        produced has been assembled and exported (the exporter writes a partial batch every
        0.2 s)."""
        deadline = time.monotonic() + timeout
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            size = self.jsonl.stat().st_size if self.jsonl.exists() else 0
            if size != last:
                last, since = size, time.monotonic()
            elif time.monotonic() - since >= settle_s:
                return
            time.sleep(0.1)

    def stop(self) -> dict[str, int]:
        """SIGINT (the agent flushes and prints its final stats); its counters."""
        assert self.proc is not None
        stop_group(self.proc, signal.SIGINT)
        shutil.rmtree(f"/sys/fs/bpf/ebpf_bridge_bench_{os.getpid()}", ignore_errors=True)
        return parse_stats(self.log_path.read_text())

    def kill(self) -> None:
        """Stop the agent if it still runs (error paths)."""
        if self.proc is not None and self.proc.poll() is None:
            stop_group(self.proc, signal.SIGINT)
        shutil.rmtree(f"/sys/fs/bpf/ebpf_bridge_bench_{os.getpid()}", ignore_errors=True)


OPENLOOP_SRC = Path(__file__).resolve().parent / "openloop.c"


def openloop_binary() -> Path:
    """bench/openloop.c compiled into bench/build/ (again whenever the source is newer)."""
    out = OPENLOOP_SRC.parent / "build" / "openloop"
    if not out.exists() or out.stat().st_mtime < OPENLOOP_SRC.stat().st_mtime:
        out.parent.mkdir(exist_ok=True)
        try:
            subprocess.run(["cc", "-O2", "-Wall", "-o", str(out), str(OPENLOOP_SRC)],
                           check=True, capture_output=True, text=True)
        except FileNotFoundError:
            raise RuntimeError("no C compiler (cc) to build bench/openloop.c: "
                               "apt-get install gcc") from None
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"building bench/openloop.c failed:\n{e.stderr}") from None
    return out


def run_openloop(port: int, path: str, rate: float, duration: int, cpu: int) -> dict[str, float]:
    """``bench/openloop`` on ``cpu``: ``rate`` requests a second on schedule, each on a new
    connection, whatever the server does; latency runs from each request's scheduled start.
    Returns its JSON (requests = completed)."""
    out = subprocess.run(["taskset", "-c", str(cpu), str(openloop_binary()), "127.0.0.1",
                          str(port), path, f"{rate:g}", str(duration)],
                         capture_output=True, text=True, check=True).stdout
    r: dict[str, float] = json.loads(out)
    r["requests"] = r["completed"]
    r["socket_errors"] = r.pop("errors")
    return r
