"""The agent as an operator meets it: signals, selection by port, config files and flags, bad
input, the JSON-lines exporter and --help."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from kernel_side.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.e2e.conftest import APPS, EXAMPLES, PYTHON, REPO, SERVER, Harness, Proc, by_service

EDGE = APPS / "edge_server.py"
CLI = [PYTHON, "-m", "kernel_side.cli", "agent"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}


def _paths(spans: list[ReceivedSpan], service: str) -> list[str]:
    return [str(s.attributes.get("url.path")) for s in by_service(spans, service, SERVER)]


def _agent_ready_file(harness: Harness, agent: Proc) -> Path:
    i = harness.procs.index(agent)
    ready = harness.tmp / f"agent-{i}.ready"
    assert ready.exists()
    return ready


def _get(port: int, path: str) -> None:
    r = requests.get(f"http://127.0.0.1:{port}{path}", headers={"Connection": "close"},
                     timeout=10)
    assert r.status_code == 200


# -- (a) (b) signals while requests are in flight ---------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_flight_flushes_and_exits_zero(harness: Harness, receiver: OtlpReceiver,
                                                  sig: signal.Signals) -> None:
    srv, port = harness.python_service("edge-sig", EDGE)
    agent = harness.agent("--pid", str(srv.pid), receiver=receiver)
    ready = _agent_ready_file(harness, agent)
    tag = secrets.token_hex(3)
    done: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(t: int) -> None:
        with requests.Session() as s:  # keep-alive
            i = 0
            while not stop.is_set():
                path = f"/sig-{tag}/{t}/{i}"
                try:
                    r = s.get(f"http://127.0.0.1:{port}{path}", timeout=10)
                except requests.RequestException:
                    continue
                assert r.status_code == 200
                with lock:
                    done.append(path)
                i += 1

    threads = [threading.Thread(target=client, args=(t,), daemon=True) for t in range(4)]
    for th in threads:
        th.start()
    try:
        receiver.wait_for(lambda ss: len(_paths(ss, "edge-sig")) >= 40, timeout_s=30)
        with lock:
            finished_before = list(done)
        os.kill(agent.pid, sig)
        try:
            rc = agent.popen.wait(15)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"agent ignored {sig.name}:\n{agent.log_text()}") from None
    finally:
        stop.set()
        for th in threads:
            th.join(15)
    assert rc == 0, agent.log_text()
    assert not ready.exists(), "the ready file must be removed at exit"
    log = agent.log_text()
    assert "final stats" in log and "Traceback" not in log, log

    # Everything exported arrived before the agent exited: no waiting needed now.
    paths = [p for p in _paths(receiver.spans(), "edge-sig") if p.startswith(f"/sig-{tag}/")]
    counts: dict[str, int] = {}
    for p in paths:
        counts[p] = counts.get(p, 0) + 1
    assert not {p: n for p, n in counts.items() if n > 1}, "duplicate spans"
    missing = [p for p in finished_before if p not in counts]
    assert not missing, f"{len(missing)} of {len(finished_before)} finished requests have no span"
    # The keep-alive connections' last exchanges were still open at the signal: they were
    # flushed at shutdown, not lost.
    for t in range(4):
        last = max((p for p in finished_before if p.startswith(f"/sig-{tag}/{t}/")),
                   key=lambda p: int(p.rsplit("/", 1)[1]), default=None)
        assert last is None or last in counts


# -- (c) selection by port, before the server exists --------------------------------------------

def test_port_selection_picks_up_a_server_started_later(harness: Harness,
                                                        receiver: OtlpReceiver) -> None:
    port = _free_port()
    other, other_port = harness.python_service("edge-other", EDGE)
    harness.agent("--port", str(port), receiver=receiver)
    ready = harness.tmp / "edge-port.ready"
    harness.start("edge-port", [PYTHON, str(EDGE), "--port", str(port), "--ready-file",
                                str(ready)], env={"OTEL_SERVICE_NAME": "edge-port"},
                  ready_file=ready)
    # The agent rescans /proc every second: drive requests until one is traced.
    deadline = time.monotonic() + 30
    while True:
        probe = f"/probe-{secrets.token_hex(4)}"
        _get(port, probe)
        try:
            receiver.wait_for(lambda ss, p=probe: p in _paths(ss, "edge-port"),  # type: ignore[misc]
                              timeout_s=1.5)
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
    tag = secrets.token_hex(4)
    for i in range(5):
        _get(port, f"/port-{tag}/{i}")
        _get(other_port, f"/other-{tag}/{i}")
    _get(port, f"/barrier-{tag}")
    spans = receiver.wait_for(lambda ss: f"/barrier-{tag}" in _paths(ss, "edge-port"))
    mine = sorted(p for p in _paths(spans, "edge-port") if p.startswith(f"/port-{tag}/"))
    assert mine == [f"/port-{tag}/{i}" for i in range(5)]
    assert {s.resource.get("service.name") for s in spans} == {"edge-port"}
    for s in by_service(spans, "edge-port"):
        assert s.attributes["server.port"] == port
    assert other.popen.poll() is None


# -- (d) a config file, and flags that override it ---------------------------------------------

def test_config_file_and_flag_override(harness: Harness, receiver: OtlpReceiver) -> None:
    one, port1 = harness.python_service("edge-one", EDGE)
    two, port2 = harness.python_service("edge-two", EDGE)
    cfg = harness.tmp / "agent.yaml"
    cfg.write_text(f"pid: [{one.pid}]\nexporter: otlp\notlp_endpoint: {receiver.grpc_endpoint}\n"
                   "idle-flush-ms: 50\n")
    agent = harness.agent("--config", str(cfg), env={"OTEL_EXPORTER_OTLP_ENDPOINT": ""})
    tag = secrets.token_hex(4)
    _get(port1, f"/cfg-{tag}")
    receiver.wait_for(lambda ss: f"/cfg-{tag}" in _paths(ss, "edge-one"))
    assert agent.stop() == 0, agent.log_text()

    # Same file; flags replace the pid list and the endpoint (the file's is now dead).
    cfg.write_text(f"pid: [{one.pid}]\nexporter: otlp\notlp_endpoint: http://127.0.0.1:9\n")
    agent = harness.agent("--config", str(cfg), "--pid", str(two.pid),
                          "--otlp-endpoint", receiver.grpc_endpoint)
    _get(port1, f"/flag1-{tag}")
    _get(port2, f"/flag2-{tag}")
    _get(port2, f"/flag-barrier-{tag}")
    spans = receiver.wait_for(lambda ss: f"/flag-barrier-{tag}" in _paths(ss, "edge-two"))
    assert f"/flag2-{tag}" in _paths(spans, "edge-two")
    assert f"/flag1-{tag}" not in _paths(spans, "edge-one")
    assert agent.stop() == 0, agent.log_text()


# -- (e) bad input: a clear message, exit code 2, no traceback ---------------------------------

BAD_YAML = [
    ("bogus_key: 1\n", "unknown setting 'bogus_key'"),
    ("req_capture: 1000\n", "req_capture must be a power of two"),
    ("req_capture: lots\n", "req_capture"),
    ("max_threads: 10\n", "max_threads must be at least 64"),
    ("port: 70000\n", "70000"),
    ("pid: [abc]\n", "abc"),
    ("- just\n- a list\n", "mapping"),
    ("key: [unclosed\n", "not valid YAML"),
]


@pytest.mark.parametrize(("text", "message"), BAD_YAML, ids=[b[1] for b in BAD_YAML])
def test_bad_config_file(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    _expect_usage_error(tmp_path, ["--config", str(cfg), "--exporter", "console"], message)


@pytest.mark.parametrize(("args", "message"), [
    (["--port", "70000"], "70000"),
    (["--port", "9000-80"], "9000-80"),
    (["--port", "http"], "'http'"),
    (["--exporter", "otlp"], "needs an endpoint"),
    (["--config", "/nonexistent/agent.yaml"], "cannot read config file"),
    (["--exporter", "kafka"], "invalid choice"),
    (["--pid", "x"], "invalid int value"),
], ids=["port-range", "port-order", "port-name", "otlp-no-endpoint", "missing-config",
        "exporter-choice", "pid-not-int"])
def test_bad_flags(tmp_path: Path, args: list[str], message: str) -> None:
    _expect_usage_error(tmp_path, args, message)


def _expect_usage_error(tmp_path: Path, args: list[str], message: str) -> None:
    ready = tmp_path / "never.ready"
    out = subprocess.run([*CLI, "--ready-file", str(ready), *args], capture_output=True,
                         text=True, timeout=60, env=_clean_env(), cwd=REPO)
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert not ready.exists()


# -- (f) the JSON-lines exporter -----------------------------------------------------------------

_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HEX16 = re.compile(r"^[0-9a-f]{16}$")


def _jsonl_spans(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    spans = []
    for line in path.read_text().splitlines():
        if not line.endswith("}"):
            continue  # a line being written
        for rs in json.loads(line)["resourceSpans"]:
            for ss in rs["scopeSpans"]:
                spans.extend(ss["spans"])
    return spans


def _attr(span: dict[str, Any], key: str) -> Any:
    for kv in span.get("attributes", []):
        if kv["key"] == key:
            return next(iter(kv["value"].values()))
    return None


def test_jsonl_exporter(harness: Harness) -> None:
    srv, port = harness.python_service("edge-jsonl", EDGE)
    out = harness.tmp / "spans" / "out.jsonl"
    agent = harness.agent("--pid", str(srv.pid), "--exporter", "jsonl", "--jsonl", str(out))
    tag = secrets.token_hex(4)
    paths = [f"/jsonl-{tag}/{i}" for i in range(5)] + ["/status/503"]
    with requests.Session() as s:
        for p in paths:
            s.get(f"http://127.0.0.1:{port}{p}", timeout=10)
    deadline = time.monotonic() + 20
    while not all(any(_attr(sp, "url.path") == p for sp in _jsonl_spans(out)) for p in paths):
        assert time.monotonic() < deadline, f"spans never reached {out}"
        time.sleep(0.05)
    assert agent.stop() == 0, agent.log_text()

    lines = out.read_text().splitlines()
    assert lines
    for line in lines:
        doc = json.loads(line)
        assert isinstance(doc, dict) and set(doc) == {"resourceSpans"}
        for rs in doc["resourceSpans"]:
            res = {kv["key"]: next(iter(kv["value"].values()))
                   for kv in rs["resource"]["attributes"]}
            assert res["service.name"] == "edge-jsonl"
            assert str(res["process.pid"]) == str(srv.pid)
            for ss in rs["scopeSpans"]:
                assert ss["scope"]["name"] == "ebpf-bridge"
                for sp in ss["spans"]:
                    assert _HEX32.match(sp["traceId"]), sp["traceId"]
                    assert _HEX16.match(sp["spanId"]), sp["spanId"]
                    assert sp["kind"] == 2
                    assert int(sp["startTimeUnixNano"]) <= int(sp["endTimeUnixNano"])
    spans = _jsonl_spans(out)
    mine = [sp for sp in spans if str(_attr(sp, "url.path")).startswith(f"/jsonl-{tag}/")]
    assert sorted(_attr(sp, "url.path") for sp in mine) == sorted(paths[:5])
    err = [sp for sp in spans if _attr(sp, "url.path") == "/status/503"]
    assert len(err) == 1
    assert str(_attr(err[0], "http.response.status_code")) == "503"
    assert err[0]["status"]["code"] == 2


# -- (g) --help ---------------------------------------------------------------------------------

def test_agent_help() -> None:
    out = subprocess.run([*CLI, "--help"], capture_output=True, text=True, timeout=60,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr
    for flag in ("--pid", "--exe", "--port", "--exporter", "--ready-file", "--config",
                 "--otlp-endpoint", "--jsonl"):
        assert flag in out.stdout, flag


def test_pid_covers_children_started_before_the_agent(harness: Harness,
                                                      receiver: OtlpReceiver) -> None:
    """`--pid MASTER` also traces the workers MASTER forked before the agent started (a
    gunicorn or nginx master), not only the ones it forks later."""
    ready = harness.tmp / "child.ready"
    script = EXAMPLES / "python" / "inventory.py"
    # bash stays the parent (`; true` keeps it from exec'ing the child in its place).
    parent = harness.start("parent", ["bash", "-c", f"{PYTHON} {script} --port 0 "
                                      f"--ready-file {ready}; true"],
                           env={"OTEL_SERVICE_NAME": "inventory"}, ready_file=ready)
    port = int(ready.read_text())
    harness.agent("--pid", str(parent.pid), receiver=receiver)
    for i in range(3):
        assert requests.get(f"http://127.0.0.1:{port}/stock/sku-pre-{i}", timeout=10).ok
    spans = receiver.wait_for(
        lambda ss: len([s for s in ss if str(s.attributes.get("url.path", "")).startswith(
            "/stock/sku-pre-")]) >= 3, timeout_s=30)
    traced = {s.resource["process.pid"] for s in spans
              if str(s.attributes.get("url.path", "")).startswith("/stock/sku-pre-")}
    assert parent.pid not in traced and len(traced) == 1


# -- OTLP/HTTP chosen by the standard environment variables alone -----------------------------

def test_otlp_http_protobuf_from_the_environment(harness: Harness,
                                                 receiver: OtlpReceiver) -> None:
    assert receiver.http_endpoint is not None
    srv, port = harness.python_service("edge-http-otlp", EDGE)
    env = {**_clean_env(), "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint,
           "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    agent = harness.agent("--pid", str(srv.pid), env=env)
    tag = secrets.token_hex(4)
    for i in range(3):
        _get(port, f"/h-{tag}/{i}")

    def mine(ss: list[ReceivedSpan]) -> list[str]:
        return sorted(p for p in _paths(ss, "edge-http-otlp") if p.startswith(f"/h-{tag}/"))

    spans = receiver.wait_for(lambda ss: len(mine(ss)) >= 3)
    assert mine(spans) == [f"/h-{tag}/{i}" for i in range(3)]
    agent.popen.send_signal(signal.SIGTERM)
    assert agent.popen.wait(timeout=30) == 0
    assert f"otlp http/protobuf {receiver.http_endpoint}/v1/traces" in agent.log.read_text()


# The capability DaemonSet's set (examples/k8s/agent-daemonset.yaml) minus SYS_RESOURCE when
# this machine's bounding set lacks it (it is only used for RLIMIT_MEMLOCK on kernels < 5.11).
_DAEMONSET_CAPS = ("bpf", "perfmon", "sys_ptrace", "dac_read_search", "sys_resource")
_CAP_SYS_RESOURCE, _CAP_SYS_ADMIN = 24, 21


def _cap_eff(pid: int | str = "self", field: str = "CapEff") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def test_agent_restarts_with_the_daemonset_capabilities_and_no_sys_admin(
        harness: Harness, receiver: OtlpReceiver) -> None:
    """Root uid with only the DaemonSet's capabilities (setpriv limits the bounding and
    inheritable sets, so the exec'd agent has exactly these): the first start pins the maps,
    and a restart over the pins it left (which BCC would reopen with BPF_MAP_GET_FD_BY_ID, a
    CAP_SYS_ADMIN call) starts too, with an annotating app's tenant on spans again after it."""
    import shutil

    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    caps = [c for c in _DAEMONSET_CAPS
            if c != "sys_resource" or _cap_eff("self", "CapBnd") >> _CAP_SYS_RESOURCE & 1]
    spec = "-all," + ",".join(f"+{c}" for c in caps)
    prefix = ["setpriv", f"--bounding-set={spec}", f"--inh-caps={spec}"]
    inv, inv_port = harness.python_service("inventory", EXAMPLES / "python/inventory.py")
    orders, port = harness.python_service("orders", EXAMPLES / "python/orders.py",
                                          "--inventory", f"http://127.0.0.1:{inv_port}")

    def start_agent(n: int) -> Proc:
        ready = harness.tmp / f"capagent-{n}.ready"
        agent = harness.start(f"agent-{n}", [*prefix, *CLI, "--ready-file", str(ready),
                                             "--stats-interval", "0", "--pid", str(orders.pid),
                                             "--exporter", "otlp", "--otlp-endpoint",
                                             receiver.grpc_endpoint],
                              ready_file=ready, timeout=120)
        assert not _cap_eff(agent.pid) >> _CAP_SYS_ADMIN & 1
        return agent

    def tenant_arrives(tenant: str) -> None:
        # The app re-checks the pin at most once a second: retry until its write lands.
        for attempt in range(30):
            requests.get(f"http://127.0.0.1:{port}/orders/{tenant}-{attempt}",
                         headers={"X-Tenant-ID": f"{tenant}-{attempt}"}, timeout=20)
            try:
                receiver.wait_for(lambda ss, t=f"{tenant}-{attempt}": any(  # type: ignore[misc]
                    s.attributes.get("tenant_id") == t for s in ss), timeout_s=2)
                return
            except AssertionError:
                continue
        raise AssertionError(f"no span with tenant {tenant}-*")

    first = start_agent(1)
    tenant_arrives("before")
    assert first.stop(signal.SIGINT) == 0
    pinned = {n: os.stat(f"{harness.pin_dir}/{n}").st_ino for n in os.listdir(harness.pin_dir)}
    assert "ctx_by_tid" in pinned
    second = start_agent(2)
    assert "replacing the maps an earlier agent pinned" in second.log_text()
    assert os.stat(f"{harness.pin_dir}/ctx_by_tid").st_ino != pinned["ctx_by_tid"]
    tenant_arrives("after")
    assert inv.popen.poll() is None
