"""Agent configuration: defaults, environment, YAML, flags and the errors a user sees."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bridge import _abi
from bridge._env import EBPF_BRIDGE_PIN_DIR
from kernel_side.config import (
    OTEL_EXPORTER_OTLP_ENDPOINT,
    OTEL_EXPORTER_OTLP_PROTOCOL,
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
    AgentConfig,
    ConfigError,
    build,
    load_yaml,
    parse_port,
)
from kernel_side.processes import Selector


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
                 OTEL_EXPORTER_OTLP_PROTOCOL, EBPF_BRIDGE_PIN_DIR):
        monkeypatch.delenv(name, raising=False)


def merged(yaml_settings: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """What the CLI hands build(): YAML first, then the flags that were given."""
    out = dict(yaml_settings)
    out.update({k: v for k, v in flags.items() if v is not None})
    return out


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    return path


# --- defaults and environment ----------------------------------------------------------------


def test_defaults_without_endpoint_export_jsonl() -> None:
    cfg = build({})
    assert cfg.resolved_exporters() == ("jsonl",)
    assert cfg.exporters == ()
    assert cfg.otlp_endpoint is None
    assert cfg.otlp_protocol == "grpc"
    assert cfg.jsonl_path == "ebpf-bridge-spans.jsonl"
    assert cfg.selector == Selector()
    assert cfg.selector.select_all
    assert cfg.pin_dir == _abi.PIN_DIR
    assert cfg.req_capture == 1024 and cfg.resp_capture == 512
    assert cfg.route_heuristic is False
    assert cfg == AgentConfig(otlp_endpoint=None).validate()


def test_endpoint_from_environment_selects_otlp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(OTEL_EXPORTER_OTLP_ENDPOINT, "http://collector:4317")
    cfg = build({})
    assert cfg.otlp_endpoint == "http://collector:4317"
    assert cfg.resolved_exporters() == ("otlp",)


def test_traces_endpoint_wins_over_generic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(OTEL_EXPORTER_OTLP_ENDPOINT, "http://generic:4317")
    monkeypatch.setenv(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, "http://traces:4317")
    assert build({}).otlp_endpoint == "http://traces:4317"


@pytest.mark.parametrize(("base", "want"), [
    ("http://collector:4318", "http://collector:4318/v1/traces"),
    ("http://collector:4318/", "http://collector:4318/v1/traces"),
    ("https://gw.example:443/otel", "https://gw.example:443/otel/v1/traces"),
    ("http://collector:4318/v1/traces", "http://collector:4318/v1/traces"),
])
def test_generic_endpoint_is_a_base_url_for_otlp_http(monkeypatch: pytest.MonkeyPatch,
                                                      base: str, want: str) -> None:
    monkeypatch.setenv(OTEL_EXPORTER_OTLP_ENDPOINT, base)
    monkeypatch.setenv(OTEL_EXPORTER_OTLP_PROTOCOL, "http/protobuf")
    assert build({}).otlp_endpoint == want
    # The traces-specific variable is the URL itself, path and all.
    monkeypatch.setenv(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, "https://gw.example/otel/traces")
    assert build({}).otlp_endpoint == "https://gw.example/otel/traces"


def test_generic_endpoint_keeps_its_path_for_grpc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(OTEL_EXPORTER_OTLP_ENDPOINT, "http://collector:4317")
    assert build({}).otlp_endpoint == "http://collector:4317"
    assert build({"otlp_protocol": "http/protobuf"}).otlp_endpoint == (
        "http://collector:4317/v1/traces")


def test_flag_endpoint_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(OTEL_EXPORTER_OTLP_ENDPOINT, "http://env:4317")
    assert build({"otlp_endpoint": "http://flag:4317"}).otlp_endpoint == "http://flag:4317"


def test_protocol_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(OTEL_EXPORTER_OTLP_PROTOCOL, "http/protobuf")
    assert build({}).otlp_protocol == "http/protobuf"
    # An explicit setting wins.
    assert build({"otlp_protocol": "grpc"}).otlp_protocol == "grpc"


def test_bad_protocol_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(OTEL_EXPORTER_OTLP_PROTOCOL, "http/json")
    with pytest.raises(ConfigError, match="http/json") as e:
        build({})
    assert "grpc" in str(e.value) and "http/protobuf" in str(e.value)


def test_pin_dir_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EBPF_BRIDGE_PIN_DIR, "/sys/fs/bpf/test_bridge")
    assert build({}).pin_dir == "/sys/fs/bpf/test_bridge"


# --- merging YAML and flags ------------------------------------------------------------------


def test_flags_override_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, (
        "exporter: [jsonl]\n"
        "jsonl: /tmp/from-yaml.jsonl\n"
        "parent-wait-s: 3\n"
        "route_heuristic: false\n"
        "req-capture: 2048\n"
        "port: 8080\n"
        "pid: [11, 12]\n"
    ))
    yaml_settings = load_yaml(path)
    flags = {"exporter": ["console"], "jsonl": "/tmp/from-flag.jsonl", "parent_wait_s": 1.5,
             "route_heuristic": True, "pid": None, "otlp_endpoint": None}
    cfg = build(merged(yaml_settings, flags))
    assert cfg.exporters == ("console",)
    assert cfg.jsonl_path == "/tmp/from-flag.jsonl"
    assert cfg.parent_wait_s == 1.5
    assert cfg.route_heuristic is True
    # Settings no flag gave keep their YAML values.
    assert cfg.req_capture == 2048
    assert cfg.selector.pids == (11, 12)
    assert cfg.selector.ports == ((8080, 8080),)
    assert isinstance(cfg.parent_wait_s, float)


def test_yaml_alone(tmp_path: Path) -> None:
    path = write(tmp_path, (
        "exporter: otlp\n"
        "otlp-endpoint: http://collector:4318\n"
        "otlp-protocol: http/protobuf\n"
        "exe: ['nginx', '/usr/bin/python3*']\n"
        "port: ['80', '8000-8099']\n"
        "ready-file: /run/ebpf-bridge.ready\n"
    ))
    cfg = build(load_yaml(path))
    assert cfg.resolved_exporters() == ("otlp",)
    assert cfg.otlp_endpoint == "http://collector:4318"
    assert cfg.otlp_protocol == "http/protobuf"
    assert cfg.selector.exes == ("nginx", "/usr/bin/python3*")
    assert cfg.selector.ports == ((80, 80), (8000, 8099))
    assert cfg.ready_file == "/run/ebpf-bridge.ready"


def test_several_exporters() -> None:
    cfg = build({"exporter": ["jsonl", "console"]})
    assert cfg.resolved_exporters() == ("jsonl", "console")


# --- parse_port ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("80", (80, 80)), ("8000-8099", (8000, 8099)), ("1", (1, 1)), ("65535", (65535, 65535)),
     ("443-443", (443, 443))],
)
def test_parse_port(value: str, expected: tuple[int, int]) -> None:
    assert parse_port(value) == expected


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("x", ["'x'", "N-M", "8080"]),
        ("80-x", ["'80-x'", "N-M"]),
        ("", ["N-M"]),
        ("0", ["'0'", "1", "65535"]),
        ("9-1", ["'9-1'", "N <= M"]),
        ("70000", ["'70000'", "65535"]),
        ("80-70000", ["65535"]),
    ],
)
def test_parse_port_errors(value: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        parse_port(value)
    msg = str(e.value)
    assert "--port" in msg
    for word in words:
        assert word in msg


def test_bad_port_through_build() -> None:
    with pytest.raises(ConfigError, match="--port '9-1'"):
        build({"port": ["9-1"]})


# --- validate --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1000, 32, 16384, 0])
def test_req_capture_must_be_power_of_two(value: int) -> None:
    with pytest.raises(ConfigError) as e:
        build({"req_capture": value})
    msg = str(e.value)
    assert "req_capture" in msg and "power of two" in msg and str(value) in msg
    assert "64" in msg and "8192" in msg


def test_resp_capture_named() -> None:
    with pytest.raises(ConfigError, match="resp_capture"):
        build({"resp_capture": 100})


def test_capture_powers_of_two_accepted() -> None:
    cfg = build({"req_capture": 8192, "resp_capture": 64})
    assert (cfg.req_capture, cfg.resp_capture) == (8192, 64)


def test_bad_exporter() -> None:
    with pytest.raises(ConfigError) as e:
        build({"exporter": ["zipkin"]})
    msg = str(e.value)
    assert "zipkin" in msg
    for name in ("otlp", "jsonl", "console"):
        assert name in msg


def test_otlp_without_endpoint() -> None:
    with pytest.raises(ConfigError) as e:
        build({"exporter": ["otlp"]})
    msg = str(e.value)
    assert "otlp" in msg and "--otlp-endpoint" in msg and OTEL_EXPORTER_OTLP_ENDPOINT in msg


def test_bad_protocol() -> None:
    with pytest.raises(ConfigError) as e:
        build({"otlp_protocol": "http/json", "otlp_endpoint": "http://c:4318"})
    msg = str(e.value)
    assert "'http/json'" in msg and "grpc" in msg and "http/protobuf" in msg


def test_other_validations_name_the_setting() -> None:
    with pytest.raises(ConfigError, match="ringbuf_mb"):
        build({"ringbuf_mb": 3})
    with pytest.raises(ConfigError, match="max_connections"):
        build({"max_connections": 10})
    with pytest.raises(ConfigError, match="port range 0-5"):
        AgentConfig(selector=Selector(ports=((0, 5),))).validate()


# --- load_yaml -------------------------------------------------------------------------------


def test_unknown_key_lists_known_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "exporter: jsonl\nendpiont: http://x\n")
    with pytest.raises(ConfigError) as e:
        load_yaml(path)
    msg = str(e.value)
    assert str(path) in msg
    assert "'endpiont'" in msg and "unknown setting" in msg
    for known in ("otlp_endpoint", "exporter", "port", "req_capture", "ready_file"):
        assert known in msg


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_yaml(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_yaml(path)
    assert str(path) in str(e.value) and "mapping" in str(e.value)


def test_invalid_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "port: [80\nexporter: : :\n")
    with pytest.raises(ConfigError) as e:
        load_yaml(path)
    assert str(path) in str(e.value) and "not valid YAML" in str(e.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as e:
        load_yaml(path)
    msg = str(e.value)
    assert "cannot read config file" in msg and str(path) in msg
    assert "No such file" in msg


def test_empty_file_is_no_settings(tmp_path: Path) -> None:
    assert load_yaml(write(tmp_path, "")) == {}
    assert load_yaml(write(tmp_path, "# only a comment\n")) == {}


def test_dash_keys_normalised(tmp_path: Path) -> None:
    path = write(tmp_path, "ready-file: /tmp/ready\nstats-interval-s: 0\napp-group: bridge\n")
    assert load_yaml(path) == {"ready_file": "/tmp/ready", "stats_interval_s": 0,
                               "app_group": "bridge"}
    cfg = build(load_yaml(path))
    assert cfg.ready_file == "/tmp/ready"
    assert cfg.app_group == "bridge"
    assert cfg.stats_interval_s == 0.0


@pytest.mark.parametrize("key", ["selector", "exporters"])
def test_internal_field_names_are_not_yaml_settings(tmp_path: Path, key: str) -> None:
    # They used to pass load_yaml and then crash build() with a TypeError.
    path = write(tmp_path, f"{key}: [jsonl]\n")
    with pytest.raises(ConfigError) as e:
        load_yaml(path)
    msg = str(e.value)
    assert f"'{key}'" in msg and "exporter" in msg


# --- wrongly typed values (YAML is untyped) --------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"req_capture": "big"}, ["req_capture", "integer", "'big'"]),
        ({"idle_flush_ms": 1.5}, ["idle_flush_ms", "integer"]),
        ({"route_heuristic": "no"}, ["route_heuristic", "true or false"]),
        ({"parent_wait_s": "10s"}, ["parent_wait_s", "number"]),
        ({"stats_interval_s": True}, ["stats_interval_s", "number"]),
        ({"otlp_endpoint": 4317}, ["otlp_endpoint", "string"]),
        ({"jsonl": ["a", "b"]}, ["jsonl_path", "string"]),
        ({"pid": ["abc"]}, ["pid", "'abc'", "number"]),
        ({"pid": [True]}, ["pid"]),
    ],
)
def test_wrong_types_are_config_errors(settings: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        build(settings)
    for word in words:
        assert word in str(e.value)


def test_wrong_type_from_yaml_file(tmp_path: Path) -> None:
    path = write(tmp_path, "req-capture: 1k\n")
    with pytest.raises(ConfigError, match="req_capture must be an integer"):
        build(load_yaml(path))


def test_int_accepted_for_float_settings() -> None:
    cfg = build({"parent_wait_s": 2, "rescan_interval_s": 1})
    assert cfg.parent_wait_s == 2.0 and isinstance(cfg.parent_wait_s, float)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_traceparent_injection_is_off_by_default_and_set_from_yaml(tmp_path: Path) -> None:
    assert build({}).inject_traceparent is False
    path = tmp_path / "agent.yaml"
    path.write_text("inject_traceparent: true\n")
    assert build(load_yaml(path)).inject_traceparent is True
    path.write_text("inject_traceparent: sometimes\n")
    with pytest.raises(ConfigError, match="inject_traceparent must be true or false"):
        build(load_yaml(path))


def _readme_settings_table() -> list[list[str]]:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("\n## The agent\n", 1)[1].split("\n## ", 1)[0]
    head = "| flag | YAML key | default | meaning |"
    rows = section.split(head, 1)[1].split("\n\n", 1)[0].strip().splitlines()[1:]
    # Split on cell bars, not on the escaped ones inside `otlp\|jsonl`.
    return [[c.strip() for c in re.split(r"(?<!\\)\|", r)[1:-1]] for r in rows]


def test_readme_lists_every_flag_and_yaml_key_with_its_default() -> None:
    """The README's one table of agent settings names every flag of ``agent --help`` and every
    key the YAML loader accepts, and its numeric defaults are AgentConfig's."""
    from kernel_side import config as config_mod

    rows = _readme_settings_table()
    assert all(len(r) == 4 for r in rows), rows
    helptext = subprocess.run([sys.executable, "-m", "kernel_side.cli", "agent", "--help"],
                              capture_output=True, text=True, check=True).stdout
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", helptext)) - {"--help"}
    documented = {f for r in rows for f in re.findall(r"`(--[a-z][a-z-]+)", r[0])}
    assert flags == documented, (flags ^ documented)
    keys = {k for r in rows for k in re.findall(r"`([a-z_]+)`", r[1])}
    assert keys == config_mod._YAML_KEYS, (keys ^ config_mod._YAML_KEYS)
    defaults = AgentConfig()
    for r in rows:
        names = re.findall(r"`([a-z_]+)`", r[1])
        value = getattr(defaults, names[0], None) if names else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert re.match(rf"{value:g}\b", r[2].replace(",", "")), (names, r[2])
        if isinstance(value, bool):
            assert r[2].startswith("false"), (names, r[2])
    assert any(_abi.PIN_DIR in r[2] for r in rows)
