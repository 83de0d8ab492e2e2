"""The health endpoint without a kernel: metric rendering, liveness arithmetic, the HTTP server
and the config/CLI plumbing."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from kernel_side.config import ConfigError, build, load_yaml
from kernel_side.health import (
    CONTENT_TYPE,
    HealthServer,
    HealthState,
    Metric,
    agent_metrics,
    render,
)

_SAMPLE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]* [-+]?(\d+(\.\d*)?([eE][-+]?\d+)?|NaN|[+-]Inf)$")


def _samples(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        assert _SAMPLE.match(line), line
        name, value = line.split(" ")
        out[name] = float(value)
    return out


def test_render_counters_get_total_and_type_lines() -> None:
    text = render([Metric("spans", "counter", 7, "spans made"),
                   Metric("waiting_parent", "gauge", 2, "waiting"),
                   Metric("start_to_ready_seconds", "gauge", 0.25, "start")])
    assert text.endswith("\n")
    assert "# TYPE ebpf_bridge_spans_total counter" in text
    assert "# HELP ebpf_bridge_spans_total spans made" in text
    assert "# TYPE ebpf_bridge_waiting_parent gauge" in text
    assert _samples(text) == {"ebpf_bridge_spans_total": 7, "ebpf_bridge_waiting_parent": 2,
                              "ebpf_bridge_start_to_ready_seconds": 0.25}
    # HELP/TYPE come right before their sample, once per metric.
    lines = text.splitlines()
    i = lines.index("ebpf_bridge_spans_total 7")
    assert lines[i - 2].startswith("# HELP ebpf_bridge_spans_total ")
    assert lines[i - 1] == "# TYPE ebpf_bridge_spans_total counter"


def test_render_escapes_help_and_rejects_unknown_kinds() -> None:
    text = render([Metric("x", "counter", 1, "a\\b\nc")])
    assert "# HELP ebpf_bridge_x_total a\\\\b\\nc" in text
    with pytest.raises(ValueError):
        render([Metric("x", "histogram", 1, "")])


def test_render_special_floats() -> None:
    text = render([Metric("a", "gauge", float("nan"), ""), Metric("b", "gauge", float("inf"), "")])
    assert _samples(text)["ebpf_bridge_b"] == float("inf")
    assert "ebpf_bridge_a NaN" in text


@dataclass
class _Stats:
    spans: int = 5
    unknown_protocol: int = 1
    parse_errors: int = 2
    parent_timeouts: int = 0
    pending_overflow: int = 0
    sdk_covered: int = 4
    sdk_parented: int = 6


@dataclass
class _Assembler:
    stats: _Stats = field(default_factory=_Stats)
    waiting: int = 3
    conn_states: int = 12


class _Fanout:
    def stats(self) -> dict[str, int]:
        return {"exported": 4, "dropped_queue_full": 1, "queued": 6}


def _fake_agent(**kw: Any) -> Any:
    base: dict[str, Any] = {
        "kernel_stats": lambda: {"events_lost": 9, "exchanges": 11},
        "table_stats": lambda: {"conns_live": 7, "conns_evicted": 8},
        "assembler": _Assembler(), "fanout": _Fanout(), "idle_flushed": 2,
        "callback_errors": 0, "start_to_ready_s": 0.4,
    }
    return SimpleNamespace(**{**base, **kw})


def test_agent_metrics_names_every_counter_format_stats_logs() -> None:
    s = _samples(render(agent_metrics(_fake_agent())))
    assert s["ebpf_bridge_events_lost_total"] == 9
    assert s["ebpf_bridge_exchanges_total"] == 11
    assert s["ebpf_bridge_spans_total"] == 5
    assert s["ebpf_bridge_unknown_protocol_total"] == 1
    assert s["ebpf_bridge_parse_errors_total"] == 2
    assert s["ebpf_bridge_waiting_parent"] == 3
    assert s["ebpf_bridge_conn_states"] == 12
    assert s["ebpf_bridge_idle_flushed_total"] == 2
    assert s["ebpf_bridge_callback_errors_total"] == 0
    assert s["ebpf_bridge_export_exported_total"] == 4
    assert s["ebpf_bridge_export_dropped_queue_full_total"] == 1
    assert s["ebpf_bridge_export_queued"] == 6  # a queue length is a gauge
    assert s["ebpf_bridge_start_to_ready_seconds"] == 0.4
    assert s["ebpf_bridge_conns_live"] == 7  # entries now: a gauge
    assert s["ebpf_bridge_conns_evicted_total"] == 8
    assert s["ebpf_bridge_sdk_covered_total"] == 4
    assert s["ebpf_bridge_sdk_parented_total"] == 6


def test_agent_metrics_before_anything_is_built() -> None:
    s = _samples(render(agent_metrics(_fake_agent(
        kernel_stats=dict, table_stats=dict, assembler=None, fanout=None, start_to_ready_s=0.0))))
    assert s == {"ebpf_bridge_idle_flushed_total": 2, "ebpf_bridge_callback_errors_total": 0}


def test_liveness_starting_ok_and_stale() -> None:
    now = [100.0]
    st = HealthState(stale_after_s=5.0, clock=lambda: now[0])
    assert st.live() == (True, "starting")
    st.beat()
    now[0] += 5.0
    assert st.live() == (True, "ok")
    now[0] += 0.5
    ok, why = st.live()
    assert not ok and "5.5 s" in why


def test_mark_ready_counts_as_a_beat() -> None:
    now = [50.0]
    st = HealthState(clock=lambda: now[0])
    st.mark_ready()
    assert st.ready and st.live() == (True, "ok")


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def test_server_answers_probes_and_metrics() -> None:
    now = [0.0]
    st = HealthState(clock=lambda: now[0])
    srv = HealthServer("127.0.0.1", 0, st, lambda: agent_metrics(_fake_agent()))
    base = f"http://127.0.0.1:{srv.port}"
    try:
        assert _get(base + "/readyz")[0] == 503
        assert _get(base + "/healthz")[:1] == (200,)
        st.ready = True
        st.beat()
        assert _get(base + "/readyz")[0] == 200
        now[0] = 6.0
        assert _get(base + "/healthz")[0] == 503
        st.beat()
        assert _get(base + "/healthz")[0] == 200
        status, ctype, body = _get(base + "/metrics")
        assert status == 200 and ctype == CONTENT_TYPE
        assert _samples(body)["ebpf_bridge_spans_total"] == 5
        assert _get(base + "/nope")[0] == 404
    finally:
        srv.stop()
        srv.stop()  # idempotent
    assert st.ready is False


def test_metrics_failure_is_503_not_a_dead_server() -> None:
    def boom() -> list[Metric]:
        raise RuntimeError("map closed")

    srv = HealthServer("127.0.0.1", 0, HealthState(), boom)
    try:
        status, _, body = _get(f"http://127.0.0.1:{srv.port}/metrics")
        assert status == 503 and "map closed" in body
        assert _get(f"http://127.0.0.1:{srv.port}/healthz")[0] == 200
    finally:
        srv.stop()


def test_port_in_use_names_the_address() -> None:
    srv = HealthServer("127.0.0.1", 0, HealthState(), list)
    try:
        with pytest.raises(OSError, match=f"127.0.0.1:{srv.port}"):
            HealthServer("127.0.0.1", srv.port, HealthState(), list)
    finally:
        srv.stop()


def test_config_health_defaults_flags_and_yaml(tmp_path: Any) -> None:
    cfg = build({})
    assert cfg.health_port is None and cfg.health_address == "127.0.0.1"
    cfg = build({"health_port": 9464, "health_address": "0.0.0.0"})
    assert (cfg.health_port, cfg.health_address) == (9464, "0.0.0.0")
    f = tmp_path / "c.yaml"
    f.write_text("health-port: 9464\nhealth_address: '::'\n")
    cfg = build(load_yaml(f))
    assert (cfg.health_port, cfg.health_address) == (9464, "::")


@pytest.mark.parametrize("bad", [0, 65536, -1, "9464", True])
def test_config_rejects_bad_health_port(bad: object) -> None:
    with pytest.raises(ConfigError, match="health_port"):
        build({"health_port": bad})


def test_cli_passes_health_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from kernel_side import agent as agent_mod
    from kernel_side import cli

    seen: list[Any] = []

    class FakeAgent:
        def __init__(self, cfg: Any, reload: Any = None) -> None:
            seen.append(cfg)

        def run(self) -> int:
            return 0

    monkeypatch.setattr(agent_mod, "Agent", FakeAgent)
    assert cli.main(["agent", "--exporter", "console", "--health-port", "9464",
                     "--health-address", "0.0.0.0"]) == 0
    assert (seen[0].health_port, seen[0].health_address) == (9464, "0.0.0.0")
    assert cli.main(["agent", "--exporter", "console", "--health-port", "70000"]) == 2


def test_cli_reload_rereads_the_config_file_and_keeps_flags(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    from kernel_side import agent as agent_mod
    from kernel_side import cli
    from kernel_side.config import ConfigError

    reloads: list[Any] = []

    class FakeAgent:
        def __init__(self, cfg: Any, reload: Any = None) -> None:
            reloads.append(reload)

        def run(self) -> int:
            return 0

    monkeypatch.setattr(agent_mod, "Agent", FakeAgent)
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("pid: [11]\nexporter: console\n")
    assert cli.main(["agent", "--config", str(cfg), "--stats-interval", "3"]) == 0
    reload = reloads[0]
    cfg.write_text("pid: [22]\nexporter: console\nstats_interval_s: 9\n")
    new = reload()
    assert new.selector.pids == (22,) and new.stats_interval_s == 3.0  # the flag still wins
    cfg.write_text("pid: [oops\n")
    with pytest.raises(ConfigError):
        reload()
    assert cli.main(["agent", "--exporter", "console"]) == 0
    assert reloads[-1] is None  # no --config: nothing to reload
