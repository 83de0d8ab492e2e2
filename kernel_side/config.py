"""Agent configuration: one frozen dataclass, filled from a YAML file and then from flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from bridge import _abi
from bridge._env import EBPF_BRIDGE_PIN_DIR
from kernel_side.processes import Selector

OTEL_EXPORTER_OTLP_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
OTEL_EXPORTER_OTLP_PROTOCOL = "OTEL_EXPORTER_OTLP_PROTOCOL"
EXPORTERS = ("otlp", "jsonl", "console")


class ConfigError(ValueError):
    """A configuration value is wrong; the message names it and the fix."""


@dataclass(frozen=True)
class AgentConfig:
    """Everything ``ebpf-bridge agent`` can be told. Defaults are the documented ones."""

    selector: Selector = field(default_factory=Selector)
    exporters: tuple[str, ...] = ()
    otlp_endpoint: str | None = None
    otlp_protocol: str = "grpc"
    jsonl_path: str = "ebpf-bridge-spans.jsonl"
    ready_file: str | None = None
    stats_interval_s: float = 10.0
    idle_flush_ms: int = 100
    rescan_interval_s: float = 1.0
    parent_wait_s: float = 10.0
    stitch_wait_s: float = 10.0
    route_heuristic: bool = False
    raw_query_text: bool = False
    app_group: str | None = None
    pin_dir: str = _abi.PIN_DIR
    req_capture: int = 1024
    resp_capture: int = 512
    max_connections: int = 4096
    max_threads: int = 10240
    ringbuf_mb: int = 8
    export_queue: int = 20_000
    health_port: int | None = None
    health_address: str = "127.0.0.1"
    inject_traceparent: bool = False

    def resolved_exporters(self) -> tuple[str, ...]:
        """The exporters to run: as configured, else otlp with an endpoint, else jsonl."""
        if self.exporters:
            return self.exporters
        return ("otlp",) if self.otlp_endpoint else ("jsonl",)

    def validate(self) -> AgentConfig:
        """Raise ``ConfigError`` naming the problem and the fix; return self when fine."""
        for name in self.resolved_exporters():
            if name not in EXPORTERS:
                raise ConfigError(
                    f"unknown exporter {name!r}: use one of {', '.join(EXPORTERS)}"
                )
        if "otlp" in self.resolved_exporters() and not self.otlp_endpoint:
            raise ConfigError(
                "--exporter otlp needs an endpoint: pass --otlp-endpoint URL or set "
                f"{OTEL_EXPORTER_OTLP_ENDPOINT}"
            )
        if self.otlp_protocol not in ("grpc", "http/protobuf"):
            raise ConfigError(
                f"OTLP protocol {self.otlp_protocol!r} is not supported: use grpc or "
                "http/protobuf"
            )
        for label, value in (("req_capture", self.req_capture),
                             ("resp_capture", self.resp_capture)):
            if value < 64 or value > 8192 or value & (value - 1):
                raise ConfigError(f"{label} must be a power of two from 64 to 8192, got {value}")
        if self.ringbuf_mb < 1 or self.ringbuf_mb & (self.ringbuf_mb - 1):
            raise ConfigError(f"ringbuf_mb must be a power of two, got {self.ringbuf_mb}")
        if self.max_connections < 64:
            raise ConfigError(f"max_connections must be at least 64, got {self.max_connections}")
        if self.max_threads < 64:
            raise ConfigError(f"max_threads must be at least 64, got {self.max_threads}")
        for lo, hi in self.selector.ports:
            if not (0 < lo <= hi < 65536):
                raise ConfigError(f"port range {lo}-{hi} is not within 1-65535")
        if self.health_port is not None and not (0 < self.health_port < 65536):
            raise ConfigError(
                f"health_port must be a TCP port from 1 to 65535, got {self.health_port}"
            )
        if not self.health_address:
            raise ConfigError("health_address must be an address to bind, e.g. 0.0.0.0")
        return self


def parse_port(value: str) -> tuple[int, int]:
    """``"8080"`` or ``"8000-8099"`` to an inclusive range."""
    lo_s, sep, hi_s = value.partition("-")
    try:
        lo = int(lo_s)
        hi = int(hi_s) if sep else lo
    except ValueError:
        raise ConfigError(
            f"--port {value!r}: use N or N-M, for example 8080 or 8000-8099"
        ) from None
    if not (0 < lo <= hi < 65536):
        raise ConfigError(f"--port {value!r}: ports must satisfy 1 <= N <= M <= 65535")
    return lo, hi


# selector and exporters are spelled pid/exe/port and exporter, as the flags are.
_SCALARS = {f.name for f in fields(AgentConfig)} - {"selector", "exporters"}
_YAML_KEYS = _SCALARS | {"pid", "exe", "port", "exporter", "jsonl"}
# Settings that default to None but take an integer (the other None defaults are strings).
_OPTIONAL_INTS = {"health_port"}


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into flag-shaped settings, rejecting unknown keys."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        norm = str(key).replace("-", "_")
        if norm not in _YAML_KEYS:
            raise ConfigError(
                f"config file {path}: unknown setting {key!r}; "
                f"known: {', '.join(sorted(_YAML_KEYS))}"
            )
        out[norm] = value
    return out


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _check_type(name: str, value: Any) -> Any:
    """``value`` if it has the type of setting ``name`` (YAML is untyped), else ConfigError."""
    default = getattr(AgentConfig(), name)
    if name in _OPTIONAL_INTS:
        default = 0
    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        value = float(value) if ok else value
    else:
        ok, want = isinstance(value, str), "a string"
    if not ok:
        raise ConfigError(f"setting {name} must be {want}, got {value!r}")
    return value


def _pid(value: Any) -> int:
    try:
        if isinstance(value, bool):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"pid {value!r} is not a process id: use a number") from None


def env_endpoint(protocol: str) -> str | None:
    """The traces endpoint the OTLP exporter environment variables name, as the specification
    reads them: ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` as is; ``OTEL_EXPORTER_OTLP_ENDPOINT``
    is a base URL, to which OTLP/HTTP appends ``/v1/traces`` (gRPC ignores the path)."""
    traces = os.environ.get(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)
    if traces:
        return traces
    base = os.environ.get(OTEL_EXPORTER_OTLP_ENDPOINT)
    if not base:
        return None
    if protocol == "http/protobuf" and not base.rstrip("/").endswith("/v1/traces"):
        return base.rstrip("/") + "/v1/traces"
    return base


def build(settings: dict[str, Any]) -> AgentConfig:
    """Make a validated config from merged settings (YAML first, then flags that were given)."""
    cfg = AgentConfig()
    pids = tuple(_pid(p) for p in _as_list(settings.pop("pid", None)))
    exes = tuple(str(e) for e in _as_list(settings.pop("exe", None)))
    ports = tuple(parse_port(str(p)) for p in _as_list(settings.pop("port", None)))
    exporters = tuple(str(e) for e in _as_list(settings.pop("exporter", None)))
    if "jsonl" in settings:
        settings["jsonl_path"] = settings.pop("jsonl")
    if not settings.get("otlp_protocol"):
        settings["otlp_protocol"] = os.environ.get(OTEL_EXPORTER_OTLP_PROTOCOL) or "grpc"
    if not settings.get("otlp_endpoint"):
        settings["otlp_endpoint"] = env_endpoint(str(settings["otlp_protocol"]))
    settings.setdefault("pin_dir", os.environ.get(EBPF_BRIDGE_PIN_DIR) or _abi.PIN_DIR)
    clean = {k: _check_type(k, v) for k, v in settings.items() if k in _SCALARS and v is not None}
    cfg = replace(cfg, selector=Selector(pids, exes, ports), exporters=exporters, **clean)
    return cfg.validate()
