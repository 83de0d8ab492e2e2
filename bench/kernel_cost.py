"""Where the kernel-side cost per request goes: the agent's BPF programs, one by one.

Turns on the kernel's BPF run-time statistics (sysctl kernel.bpf_stats_enabled, restored
afterwards), runs nginx (or gunicorn, ``--target``) under wrk, first bare and then with the
agent attached, and reads each of the agent's programs' run count and total run time from the
kernel (BPF_OBJ_GET_INFO_BY_FD). Prints, per program, calls per request and ns per request,
next to the worker's whole CPU-per-request difference between the two runs (which also holds
what the statistics cannot see: the tracepoint dispatch before a program runs, and cache
effects). Prints a table and writes JSON.

    sudo .venv/bin/python bench/kernel_cost.py [--duration 5] [--rate 5000] [--target gunicorn]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from agent_bench import (  # noqa: E402
    cpu_seconds,
    free_port,
    nginx_worker,
    parse_stats,
    run_wrk,
    start_nginx,
    wrk_pacing,
)
from flask_bench import wait_port  # noqa: E402

_SYS_BPF = {"x86_64": 321, "aarch64": 280}
_BPF_PROG_GET_FD_BY_ID = 13
_BPF_OBJ_GET_INFO_BY_FD = 15
_INFO_SIZE = 256
_libc = ctypes.CDLL(None, use_errno=True)


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    nr = _SYS_BPF[os.uname().machine]
    return int(_libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), attr,
                             ctypes.c_uint(len(attr))))


def prog_info(prog_id: int) -> dict[str, object] | None:
    """Name, run_time_ns and run_cnt of BPF program ``prog_id`` (struct bpf_prog_info)."""
    attr = ctypes.create_string_buffer(128)
    ctypes.c_uint32.from_buffer(attr, 0).value = prog_id
    fd = _bpf(_BPF_PROG_GET_FD_BY_ID, attr)
    if fd < 0:
        return None
    try:
        info = ctypes.create_string_buffer(_INFO_SIZE)
        attr = ctypes.create_string_buffer(128)
        ctypes.c_uint32.from_buffer(attr, 0).value = fd
        ctypes.c_uint32.from_buffer(attr, 4).value = _INFO_SIZE
        ctypes.c_uint64.from_buffer(attr, 8).value = ctypes.addressof(info)
        if _bpf(_BPF_OBJ_GET_INFO_BY_FD, attr) < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        raw = info.raw
        # struct bpf_prog_info (uapi, LP64): name[16] at 64, run_time_ns at 192, run_cnt 200.
        name = raw[64:80].split(b"\0", 1)[0].decode()
        return {"name": name, "run_time_ns": int.from_bytes(raw[192:200], "little"),
                "run_cnt": int.from_bytes(raw[200:208], "little")}
    finally:
        os.close(fd)


def source_names() -> list[str]:
    """The agent's tracepoint programs in BCC's load order (its module lists functions sorted
    by name), in which program ids ascend: the kernel keeps only 15 characters of a name."""
    import re

    text = (REPO / "bpf/agent.bpf.c").read_text()
    # The injector's entry programs are compiled only with injection on, which this bench
    # never turns on.
    text = re.sub(r"^#ifdef INJECT_TRACEPARENT\n.*?^#endif", "", text, flags=re.M | re.S)
    return sorted(f"{c}__{n}" for c, n in re.findall(r"^TRACEPOINT_PROBE\((\w+), (\w+)\)",
                                                      text, re.MULTILINE))


def name_programs(progs: dict[int, dict[str, object]]) -> None:
    """Give each program its full name where the truncated one and the order agree."""
    names = source_names()
    k = 0
    for prog_id in sorted(progs):
        short = str(progs[prog_id]["name"])
        if len(short) < 15:
            continue  # the whole name (data_exit, tls_exit): not one of the TRACEPOINT_PROBEs
        while k < len(names) and names[k][:15] != short:
            k += 1
        if k < len(names):
            progs[prog_id]["name"] = names[k]
            k += 1


def agent_programs(pid: int) -> dict[int, dict[str, object]]:
    """The BPF programs process ``pid`` holds open, by program id (from /proc fdinfo)."""
    out: dict[int, dict[str, object]] = {}
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            text = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("prog_id:"):
                prog_id = int(line.split()[1])
                info = prog_info(prog_id)
                if info is not None:
                    out[prog_id] = info
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--rate", type=int, default=5000, help="paced req/s (0 = max rate)")
    ap.add_argument("--agent-config", metavar="YAML",
                    help="run the agent with this --config (e.g. to try another ringbuf_mb)")
    ap.add_argument("--connection-close", action="store_true",
                    help="send `Connection: close`: a new TCP connection per request, as a "
                    "gunicorn sync worker serves them (accept, close and the socket state "
                    "changes show up per request)")
    ap.add_argument("--target", choices=("nginx", "gunicorn"), default="nginx",
                    help="the traced server: nginx (6 bytes) or gunicorn serving the Flask "
                    "bench app's /hello (one sync worker, which closes every connection)")
    ap.add_argument("--annotate", action="store_true",
                    help="gunicorn only: the app calls bridge.annotate with 3 attributes on "
                    "every request (a no-op in the bare runs, where no agent runs), so the "
                    "programs' extra work for a context shows")
    ap.add_argument("--json", default=str(REPO / "bench/results/kernel_cost.json"))
    args = ap.parse_args()
    if args.annotate and args.target != "gunicorn":
        ap.error("--annotate needs --target gunicorn (nginx cannot call bridge.annotate)")
    if os.geteuid() != 0:
        print("run as root (BPF statistics and the agent need it)", file=sys.stderr)
        return 1
    stats_path = Path("/proc/sys/kernel/bpf_stats_enabled")
    old = stats_path.read_text().strip()
    stats_path.write_text("1")
    try:
        with tempfile.TemporaryDirectory() as d:
            return _run(Path(d), args)
    finally:
        stats_path.write_text(old)


def start_target(tmp: Path, target: str, port: int,
                 annotate: bool = False) -> tuple[subprocess.Popen[bytes], int, str]:
    """The traced server on ``port``: (master process, its one worker pinned to CPU 1, the
    path wrk asks for). nginx returns 6 bytes; gunicorn serves bench/flask_app.py's /hello
    with one sync worker (the app the Flask bench drives, annotating when ``annotate``)."""
    if target == "nginx":
        ngx = start_nginx(tmp, port)
        worker, path = nginx_worker(ngx.pid), "/"
    else:
        env = dict(os.environ, BENCH_MODE="agent" if annotate else "agent-only",
                   PYTHONPATH=f"{REPO}:{REPO / 'bench'}")
        ngx = subprocess.Popen(
            ["taskset", "-c", "1", str(Path(sys.executable).parent / "gunicorn"), "-w", "1",
             "-k", "sync", "-b", f"127.0.0.1:{port}", "--log-level", "warning",
             "flask_app:app"],
            env=env, cwd=REPO / "bench", stdout=(tmp / "gunicorn.log").open("wb"),
            stderr=subprocess.STDOUT, start_new_session=True)
        wait_port(port, ngx, "gunicorn")
        worker, path = nginx_worker(ngx.pid), "/hello"
    subprocess.run(["taskset", "-pc", "1", str(worker)], capture_output=True, check=True)
    return ngx, worker, path


def _run(tmp: Path, args: argparse.Namespace) -> int:
    port = free_port()
    ngx, worker, path = start_target(tmp, args.target, port, args.annotate)
    connections, delay_ms = wrk_pacing(8, args.rate) if args.rate else (8, 0)
    headers = ("Connection: close",) if args.connection_close else ()
    ready = tmp / "agent.ready"
    agent: subprocess.Popen[bytes] | None = None
    def bare_run() -> float:
        cpu0 = cpu_seconds(worker)
        w = run_wrk(port, args.duration, connections, delay_ms, tmp, headers, path)
        return (cpu_seconds(worker) - cpu0) / w["requests"] * 1e6

    try:
        # The same server and load without the agent, before and after the agent's run: the
        # whole CPU difference per request, next to which the programs' run time says how
        # much is theirs (two bare runs bracket the drift of a shared machine).
        run_wrk(port, 2, connections, delay_ms, tmp, headers, path)  # warm-up
        bare_us = [bare_run()]
        with (tmp / "agent.log").open("w") as log:
            agent = subprocess.Popen(
                ["taskset", "-c", "0", sys.executable, "-m", "kernel_side.cli", "agent",
                 "--pid", str(ngx.pid), "--pid", str(worker), "--exporter", "jsonl",
                 "--jsonl", str(tmp / "spans.jsonl"), "--ready-file", str(ready),
                 "--stats-interval", "0",
                 *(["--config", args.agent_config] if args.agent_config else [])],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        while not ready.exists():
            if agent.poll() is not None:
                raise RuntimeError((tmp / "agent.log").read_text())
            time.sleep(0.01)
        before = agent_programs(agent.pid)
        cpu0 = cpu_seconds(worker)
        w = run_wrk(port, args.duration, connections, delay_ms, tmp, headers, path)
        app_us = (cpu_seconds(worker) - cpu0) / w["requests"] * 1e6
        after = agent_programs(agent.pid)
        name_programs(after)
        os.kill(agent.pid, signal.SIGINT)
        agent.wait(60)
        bare_us.append(bare_run())
    finally:
        if agent is not None and agent.poll() is None:
            os.kill(agent.pid, signal.SIGINT)
            agent.wait(60)
        os.killpg(ngx.pid, signal.SIGTERM)
        ngx.wait(10)
    stats = parse_stats((tmp / "agent.log").read_text())
    reqs = w["requests"]
    rows = []
    for pid_, a in after.items():
        b = before.get(pid_, {"run_time_ns": 0, "run_cnt": 0})
        calls = int(a["run_cnt"]) - int(b["run_cnt"])  # type: ignore[call-overload]
        ns = int(a["run_time_ns"]) - int(b["run_time_ns"])  # type: ignore[call-overload]
        if calls:
            rows.append({"program": a["name"], "calls_per_req": calls / reqs,
                         "ns_per_call": ns / calls, "ns_per_req": ns / reqs})
    rows.sort(key=lambda r: -float(r["ns_per_req"]))  # type: ignore[arg-type]
    total = sum(float(r["ns_per_req"]) for r in rows)  # type: ignore[arg-type]
    load = f"paced at {args.rate} req/s" if args.rate else "max rate"
    if args.connection_close:
        load += ", a new connection per request"
    what = ("nginx 6-byte body" if args.target == "nginx"
            else "gunicorn (1 sync worker) Flask /hello"
            + (" with bridge.annotate" if args.annotate else ""))
    print(f"\nagent BPF programs, {what} {load}, {reqs} requests "
          f"({stats.get('exchanges', 0)} exchanges); calls and run time from the kernel's BPF "
          "statistics (all processes' calls, as the programs fire system-wide)")
    print(f"{'program':<34} {'calls/req':>10} {'ns/call':>10} {'ns/req':>10}")
    for r in rows:
        print(f"{r['program']:<34} {r['calls_per_req']:>10.2f} {r['ns_per_call']:>10.0f} "
              f"{r['ns_per_req']:>10.0f}")
    print(f"{'total':<34} {'':>10} {'':>10} {total:>10.0f}")
    bare = sum(bare_us) / len(bare_us)
    print(f"worker CPU per request: {bare:.2f} µs bare (runs before and after: "
          f"{bare_us[0]:.2f}, {bare_us[1]:.2f}), {app_us:.2f} µs with the agent "
          f"({app_us - bare:+.2f} µs, of which {total / 1000:.2f} µs is program run time "
          "counted system-wide; at low rates the bare runs alone differ by several µs)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"config": vars(args), "requests": reqs,
                                           "app_cpu_us_per_req_bare": bare_us,
                                           "app_cpu_us_per_req_bare_mean": bare,
                                           "app_cpu_us_per_req": app_us, "programs": rows},
                                          indent=2))
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
