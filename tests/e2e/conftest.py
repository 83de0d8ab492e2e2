"""Harness for end-to-end tests: real agent processes, real servers, a real OTLP receiver.

Everything waits on readiness (a file the process writes once it serves), never on a sleep.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kernel_side.otlp_receiver import OtlpReceiver, ReceivedSpan

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
EXAMPLES = REPO / "examples"
APPS = Path(__file__).resolve().parent / "apps"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/e2e is e2e and needs root."""
    for item in items:
        if "/tests/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)
            if os.geteuid() != 0:
                item.add_marker(
                    pytest.mark.skip(reason="e2e tests load eBPF programs: run as root")
                )


_PIN_SEQ = itertools.count()


def _private_pin_root() -> str:
    # bpffs refuses names with a dot; keep to letters, digits and underscores.
    return f"/sys/fs/bpf/ebpf_bridge_test_{os.getpid()}_{next(_PIN_SEQ)}"


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


@dataclass
class Proc:
    """A process the harness started, with its combined log."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        """Host pid."""
        return self.popen.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal, wait, and kill if it does not go."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        return self.popen.returncode

    def log_text(self) -> str:
        """Everything it printed so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Harness:
    """Starts processes, waits for their readiness, and stops them all at the end."""

    tmp: Path
    procs: list[Proc] = field(default_factory=list)
    pin_root: str = field(default_factory=lambda: _private_pin_root())
    """A private pin directory for this test's agent and apps, so agents running at the same
    time (another test run, a developer's own agent) never share a context map."""

    @property
    def pin_dir(self) -> str:
        """What EBPF_BRIDGE_PIN_DIR is for every process this harness starts."""
        return f"{self.pin_root}/v1"

    def start(self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None,
              ready_file: Path | None = None, timeout: float = 30.0) -> Proc:
        """Start ``argv`` in its own process group; wait until ``ready_file`` exists."""
        log = self.tmp / f"{name}.log"
        full_env = {**os.environ, "EBPF_BRIDGE_PIN_DIR": self.pin_dir, **(env or {})}
        with log.open("wb") as out:
            popen = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT,
                                     env=full_env, start_new_session=True)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        if ready_file is not None:
            deadline = time.monotonic() + timeout
            while not ready_file.exists():
                if popen.poll() is not None:
                    raise AssertionError(
                        f"{name} exited with {popen.returncode} before it was ready:\n{_tail(log)}"
                    )
                if time.monotonic() > deadline:
                    raise AssertionError(f"{name} not ready after {timeout}s:\n{_tail(log)}")
                time.sleep(0.02)
        return proc

    def python_service(self, name: str, script: Path, *args: str,
                       env: dict[str, str] | None = None,
                       prefix: Sequence[str] = ()) -> tuple[Proc, int]:
        """Start an example service that writes its port to a ready file; return it and the
        port."""
        ready = self.tmp / f"{name}.ready"
        proc = self.start(name, [*prefix, PYTHON, str(script), "--port", "0",
                                 "--ready-file", str(ready), *args],
                          env={"OTEL_SERVICE_NAME": name, **(env or {})}, ready_file=ready)
        return proc, int(ready.read_text())

    def agent(self, *args: str, receiver: OtlpReceiver | None = None,
              env: dict[str, str] | None = None) -> Proc:
        """Start ``ebpf-bridge agent`` and wait until every probe is attached."""
        ready = self.tmp / f"agent-{len(self.procs)}.ready"
        argv = [PYTHON, "-m", "kernel_side.cli", "agent", "--ready-file", str(ready),
                "--stats-interval", "0", *args]
        if receiver is not None:
            argv += ["--exporter", "otlp", "--otlp-endpoint", receiver.grpc_endpoint]
        return self.start("agent", argv, env=env, ready_file=ready, timeout=60)

    def stop_all(self) -> None:
        """Stop every process, agents last so they can flush what the others did."""
        for proc in sorted(self.procs, key=lambda p: p.name == "agent"):
            proc.stop()


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    """A harness whose processes are all stopped after the test."""
    h = Harness(tmp_path)
    try:
        yield h
    finally:
        h.stop_all()
        shutil.rmtree(h.pin_root, ignore_errors=True)


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    """A real OTLP/gRPC receiver on loopback."""
    with OtlpReceiver(http_port=0) as r:
        yield r


def warm_up_context(receiver: OtlpReceiver, send: Callable[[str], object],
                    matches: Callable[[ReceivedSpan], bool] = lambda _s: True) -> None:
    """Send marked requests (``send(tenant)``) until a span (one ``matches`` accepts) arrives
    carrying the tenant: an app that imported bridge before the agent pinned its maps re-checks
    at most once a second (a documented reconnect window)."""
    for attempt in range(30):
        tenant = f"warmup-{attempt}"
        send(tenant)
        try:
            receiver.wait_for(lambda ss, t=tenant: any(  # type: ignore[misc]
                s.attributes.get("tenant_id") == t and matches(s) for s in ss), timeout_s=2)
            return
        except AssertionError:
            continue
    raise AssertionError("the app never picked up the agent's context map")


def by_service(spans: Sequence[ReceivedSpan], service: str,
               kind: int | None = None) -> list[ReceivedSpan]:
    """Spans of one service (and kind: 2 server, 3 client)."""
    return [s for s in spans if s.resource.get("service.name") == service
            and (kind is None or s.kind == kind)]


SERVER = 2
CLIENT = 3
