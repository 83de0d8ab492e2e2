"""End to end: ``python -m kernel_side.doctor`` on the real machine (root, real BPF)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernel_side.doctor import CHECKS

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="the doctor's probes need root"),
]

REPO = Path(__file__).resolve().parents[2]


def run_doctor(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the doctor as a user would, in a fresh interpreter, without colour."""
    env = {**os.environ, "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "kernel_side.doctor", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_doctor_passes_on_this_machine() -> None:
    proc = run_doctor()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    for name, _, _ in CHECKS:
        assert any(ln.split(None, 1)[1].startswith(name) for ln in lines if ln[:1].isupper()), name
    assert lines[-1] == "the agent can run"
    # Nothing required failed, so every FAIL-free row is OK or WARN.
    assert not any(ln.startswith("FAIL") for ln in lines)


def test_doctor_json_parses() -> None:
    proc = run_doctor("--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = json.loads(proc.stdout)
    assert [c["name"] for c in checks] == [name for name, _, _ in CHECKS]
    for c in checks:
        assert set(c) == {"name", "ok", "detail", "fix", "required"}
    by_name = {c["name"]: c for c in checks}
    # The probes really ran: these prove BPF works here, not just that files exist.
    assert by_name["ring buffer"]["ok"]
    assert by_name["bcc compile"]["ok"] and " ms" in by_name["bcc compile"]["detail"]
    assert by_name["ns pid helper"]["ok"]


def test_doctor_fails_on_unwritable_pin_root() -> None:
    bogus = "/proc/ebpf_bridge_doctor_test/pins"
    proc = run_doctor("--pin-root", bogus)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.startswith("FAIL") and "pin directory" in ln)
    assert bogus in lines[i]
    assert lines[i + 1].lstrip().startswith("fix: mount -t bpf bpf /sys/fs/bpf")
    assert lines[-1] == "the agent cannot run: 1 required check failed"
    assert not os.path.exists(bogus)


def test_doctor_sees_its_own_pid_namespace() -> None:
    """Under a new PID namespace the helper must report the namespaced ids (pid 1 there)."""
    proc = subprocess.run(
        [
            "unshare",
            "--pid",
            "--fork",
            "--mount-proc",
            sys.executable,
            "-m",
            "kernel_side.doctor",
            "--json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode != 0 and not proc.stdout:
        pytest.skip(f"unshare unavailable: {proc.stderr.strip()}")
    by_name = {c["name"]: c for c in json.loads(proc.stdout)}
    helper = by_name["ns pid helper"]
    assert helper["ok"] and helper["detail"].startswith("tgid 1 "), helper
