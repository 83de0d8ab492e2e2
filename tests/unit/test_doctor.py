"""Unit tests for ``kernel_side.doctor``: rendering, and checks pointed at fake directories."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from kernel_side import doctor
from kernel_side.doctor import Check, Outcome, Probe

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def fake_probe(tmp_path: Path, **kw: object) -> Probe:
    """A Probe whose every path is under tmp_path (and absent unless a test creates it)."""
    defaults: dict[str, object] = {
        "pin_root": str(tmp_path / "bpf" / "ebpf_bridge"),
        "tracefs": str(tmp_path / "tracing"),
        "bpffs": str(tmp_path / "bpf"),
        "proc_status": str(tmp_path / "status"),
        "btf": str(tmp_path / "btf" / "vmlinux"),
        "lockdown": str(tmp_path / "security" / "lockdown"),
        "modules": str(tmp_path / "modules"),
        "event_sources": str(tmp_path / "devices"),
        "release": "6.18.0-test",
        "machine": "x86_64",
        "environ": {},
    }
    defaults.update(kw)
    return Probe(**defaults)  # type: ignore[arg-type]


# --- render / verdict -------------------------------------------------------------------------

CHECKS = [
    Check("kernel", True, "Linux 6.18 x86_64", None, False),
    Check("tracefs", False, "/sys/kernel/tracing not mounted", "mount -t tracefs x y", True),
    Check("kprobes", False, "not available", "use CONFIG_KPROBES=y", False),
    Check("syscall tracepoints", True, "present", None, True),
]


def test_render_marks_ok_fail_warn() -> None:
    lines = doctor.render(CHECKS, color=False).splitlines()
    rows = [ln for ln in lines if not ln.lstrip().startswith("fix:")]
    assert [r.split()[0] for r in rows] == ["OK", "FAIL", "WARN", "OK"]


def test_render_aligns_detail_column() -> None:
    lines = doctor.render(CHECKS, color=False).splitlines()
    rows = [ln for ln in lines if not ln.lstrip().startswith("fix:")]
    starts = {r.index(c.detail) for r, c in zip(rows, CHECKS, strict=True)}
    assert len(starts) == 1, lines
    # Fix lines are indented to the detail column.
    fixes = [ln for ln in lines if ln.lstrip().startswith("fix:")]
    assert {ln.index("fix:") for ln in fixes} == starts


def test_render_fix_line_under_each_failure_only() -> None:
    lines = doctor.render(CHECKS, color=False).splitlines()
    assert lines[1].split()[1] == "tracefs"
    assert lines[2].strip() == "fix: mount -t tracefs x y"
    assert lines[3].split()[1] == "kprobes"
    assert lines[4].strip() == "fix: use CONFIG_KPROBES=y"
    assert len(lines) == len(CHECKS) + 2  # no fix line for the OK rows


def test_render_color_keeps_alignment() -> None:
    colored = doctor.render(CHECKS, color=True)
    assert "\x1b[31m" in colored and "\x1b[33m" in colored and "\x1b[32m" in colored
    assert ANSI.sub("", colored) == doctor.render(CHECKS, color=False)


def test_render_empty() -> None:
    assert doctor.render([], color=False) == ""


def test_verdict() -> None:
    assert doctor.verdict([CHECKS[0], CHECKS[2]]) == "the agent can run"
    assert doctor.verdict(CHECKS) == "the agent cannot run: 1 required check failed"
    two = [*CHECKS, Check("bpffs", False, "x", "y", True)]
    assert doctor.verdict(two) == "the agent cannot run: 2 required checks failed"


def test_checks_are_declared_once_with_unique_names() -> None:
    names = [name for name, _, _ in doctor.CHECKS]
    assert len(names) == len(set(names)) == 16


# --- run_checks and main ----------------------------------------------------------------------


def test_run_checks_turns_a_crash_into_a_failed_check(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def boom(p: Probe) -> Outcome:
        raise RuntimeError("kaput")

    monkeypatch.setattr(
        doctor,
        "CHECKS",
        [("fine", lambda p: Outcome(True, "ok"), True), ("boom", boom, True)],
    )
    got = doctor.run_checks(probe=fake_probe(tmp_path))
    assert got[0] == Check("fine", True, "ok", None, True)
    assert not got[1].ok and "RuntimeError: kaput" in got[1].detail


def test_main_exit_codes_and_json(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(doctor, "run_checks", lambda pin_root: CHECKS[::2])  # one WARN only
    assert doctor.main([]) == 0
    assert capsys.readouterr().out.rstrip().endswith("the agent can run")

    monkeypatch.setattr(doctor, "run_checks", lambda pin_root: CHECKS)
    assert doctor.main([]) == 1
    out = capsys.readouterr().out
    assert "the agent cannot run: 1 required check failed" in out
    assert "fix: mount -t tracefs x y" in out

    assert doctor.main(["--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data[1] == {
        "name": "tracefs",
        "ok": False,
        "detail": "/sys/kernel/tracing not mounted",
        "fix": "mount -t tracefs x y",
        "required": True,
    }


def test_main_passes_pin_root(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def fake_run(pin_root: str) -> list[Check]:
        seen.append(pin_root)
        return []

    monkeypatch.setattr(doctor, "run_checks", fake_run)
    assert doctor.main(["--pin-root", "/sys/fs/bpf/elsewhere"]) == 0
    assert seen == ["/sys/fs/bpf/elsewhere"]


# --- individual checks on fake directories ----------------------------------------------------


def test_privileges(tmp_path: Path) -> None:
    p = fake_probe(tmp_path)
    status = Path(p.proc_status)
    status.write_text("Name:\tx\nCapEff:\t0000000000000000\n")
    out = doctor.check_privileges(p)
    assert not out.ok and out.fix == doctor.FIX_ROOT and "none of" in out.detail

    status.write_text(f"CapEff:\t{(1 << 38) | (1 << 39):016x}\n")  # BPF + PERFMON, no SYS_ADMIN
    out = doctor.check_privileges(p)
    assert out.ok and "CAP_BPF" in out.detail and "CAP_PERFMON" in out.detail

    status.write_text(f"CapEff:\t{1 << 39:016x}\n")  # BPF alone cannot attach
    assert not doctor.check_privileges(p).ok

    status.write_text(f"CapEff:\t{1 << 21:016x}\n")
    assert doctor.check_privileges(p).ok

    status.write_text("Name:\tx\n")
    assert not doctor.check_privileges(p).ok


def test_kernel_names_an_unsupported_architecture(tmp_path: Path) -> None:
    assert doctor.check_kernel(fake_probe(tmp_path)).ok
    out = doctor.check_kernel(fake_probe(tmp_path, machine="aarch64"))
    assert not out.ok and "aarch64" in out.detail and out.fix and "x86_64" in out.fix


def test_btf(tmp_path: Path) -> None:
    p = fake_probe(tmp_path)
    out = doctor.check_btf(p)
    assert not out.ok and "absent" in out.detail and out.fix == doctor.FIX_BTF
    Path(p.btf).parent.mkdir()
    Path(p.btf).write_bytes(b"")
    out = doctor.check_btf(p)
    assert out.ok and "present" in out.detail and "IPv4 socket addresses only" in out.detail
    if Path(doctor.Probe().btf).exists():  # this kernel's own BTF names the IPv6 offsets
        out = doctor.check_btf(doctor.Probe())
        assert out.ok and "IPv6 addresses at bytes" in out.detail, out


def test_tracefs_and_syscall_tracepoints(tmp_path: Path) -> None:
    p = fake_probe(tmp_path)
    out = doctor.check_tracefs(p)
    assert not out.ok and out.fix == doctor.FIX_TRACEFS
    out = doctor.check_syscall_tracepoints(p)
    assert not out.ok and out.fix == doctor.FIX_TRACEFS

    syscalls = Path(p.tracefs) / "events" / "syscalls"
    syscalls.mkdir(parents=True)
    assert doctor.check_tracefs(p).ok
    out = doctor.check_syscall_tracepoints(p)
    assert not out.ok and "sys_enter_read" in out.detail

    for name in ("sys_enter_read", "sys_enter_write", "sys_enter_connect", "sys_enter_accept4"):
        (syscalls / name).mkdir()
    out = doctor.check_syscall_tracepoints(p)
    assert out.ok and "4 sys_enter_*" in out.detail


def test_tracefs_mounted_without_syscall_events(tmp_path: Path) -> None:
    p = fake_probe(tmp_path)
    (Path(p.tracefs) / "events").mkdir(parents=True)
    out = doctor.check_tracefs(p)
    assert not out.ok and "CONFIG_FTRACE_SYSCALLS" in out.detail


def test_kprobes_and_uprobes(tmp_path: Path) -> None:
    p = fake_probe(tmp_path)
    out = doctor.check_kprobes(p)
    assert not out.ok
    assert out.detail == (
        "not available (CONFIG_KPROBES off): the agent uses tracepoints and uprobes only"
    )
    assert not doctor.check_uprobes(p).ok

    (Path(p.event_sources) / "kprobe").mkdir(parents=True)
    assert doctor.check_kprobes(p).ok
    Path(p.tracefs).mkdir()
    (Path(p.tracefs) / "uprobe_events").write_text("")
    out = doctor.check_uprobes(p)
    assert out.ok and "uprobe_events" in out.detail


def test_kprobes_are_optional_uprobes_too() -> None:
    required = {name: req for name, _, req in doctor.CHECKS}
    assert required["kprobes"] is False and required["uprobes"] is False
    assert required["lockdown"] is False
    # The exit programs read syscall registers through BTF-typed helpers, x86_64's layout.
    assert required["btf"] and required["kernel"]
    assert required["ring buffer"] and required["pin directory"] and required["ns pid helper"]


def test_lockdown(tmp_path: Path) -> None:
    p = fake_probe(tmp_path)
    assert doctor.check_lockdown(p) == Outcome(True, "unknown (securityfs not mounted)")
    Path(p.lockdown).parent.mkdir()
    Path(p.lockdown).write_text("none [integrity] confidentiality\n")
    out = doctor.check_lockdown(p)
    assert out.ok and out.detail.startswith("integrity") and "bpf_probe_write_user" in out.detail
    Path(p.lockdown).write_text("[none] integrity confidentiality\n")
    assert doctor.check_lockdown(p).detail.startswith("none")


def test_bpffs_on_a_plain_directory(tmp_path: Path) -> None:
    p = fake_probe(tmp_path)
    out = doctor.check_bpffs(p)
    assert not out.ok and "does not exist" in out.detail
    assert out.fix == f"mount -t bpf bpf {p.bpffs}"
    Path(p.bpffs).mkdir()
    out = doctor.check_bpffs(p)
    assert not out.ok and "is not bpffs" in out.detail


def test_bpffs_fix_is_the_exact_mount_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(doctor, "fs_magic", lambda path: 0xEF53)  # ext4, say
    out = doctor.check_bpffs(fake_probe(tmp_path, bpffs="/sys/fs/bpf"))
    assert not out.ok and "0xef53" in out.detail
    assert out.fix == "mount -t bpf bpf /sys/fs/bpf"


def test_fs_magic(tmp_path: Path) -> None:
    assert doctor.fs_magic(str(tmp_path)) not in (None, doctor.BPF_FS_MAGIC)
    assert doctor.fs_magic(str(tmp_path / "missing")) is None


def test_pin_dir_off_bpffs_fails_without_creating_it(tmp_path: Path) -> None:
    p = fake_probe(tmp_path)
    out = doctor.check_pin_dir(p)
    assert not out.ok and "is not on bpffs" in out.detail
    assert out.fix and "mount -t bpf bpf /sys/fs/bpf" in out.fix
    assert not (tmp_path / "bpf").exists()


def _write_headers(root: Path, with_linux: bool) -> Path:
    root.mkdir(parents=True)
    (root / "include").mkdir()
    if with_linux:
        (root / "include" / "linux").mkdir()
    return root


def test_headers_missing(tmp_path: Path) -> None:
    p = fake_probe(tmp_path)
    out = doctor.check_headers(p)
    assert not out.ok and out.fix == doctor.FIX_HEADERS and "6.18.0-test" in out.detail


def test_headers_matching_release(tmp_path: Path) -> None:
    p = fake_probe(tmp_path)
    src = _write_headers(tmp_path / "src" / "linux-headers-6.18.0-test", with_linux=True)
    mod = Path(p.modules) / p.release
    mod.mkdir(parents=True)
    (mod / "build").symlink_to(src)
    out = doctor.check_headers(p)
    assert out.ok and str(src) in out.detail and "fallback" not in out.detail


def test_headers_debian_split_fallback(tmp_path: Path) -> None:
    p = fake_probe(tmp_path)
    amd64 = _write_headers(tmp_path / "src" / "linux-headers-6.1.0-56-amd64", with_linux=False)
    common = _write_headers(tmp_path / "src" / "linux-headers-6.1.0-56-common", with_linux=True)
    mod = Path(p.modules) / p.release
    mod.mkdir(parents=True)
    (mod / "build").symlink_to(amd64)
    out = doctor.check_headers(p)
    assert not out.ok and "include/linux" in out.detail  # generated half only: BCC would fail

    (mod / "source").symlink_to(common)
    out = doctor.check_headers(p)
    assert out.ok
    assert str(amd64) in out.detail and str(common) in out.detail
    assert "fallback headers" in out.detail


def test_headers_bcc_kernel_source(tmp_path: Path) -> None:
    src = _write_headers(tmp_path / "ksrc", with_linux=True)
    out = doctor.check_headers(fake_probe(tmp_path, environ={"BCC_KERNEL_SOURCE": str(src)}))
    assert out.ok and "BCC_KERNEL_SOURCE" in out.detail
    bad = fake_probe(tmp_path, environ={"BCC_KERNEL_SOURCE": str(tmp_path / "nope")})
    out = doctor.check_headers(bad)
    assert not out.ok and out.fix and "BCC_KERNEL_SOURCE" in out.fix


def test_bcc_missing_fails_and_skips_smoke(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def no_bcc() -> object:
        raise ImportError("No module named 'bcc'")

    monkeypatch.setattr(doctor, "_import_bcc", no_bcc)
    p = fake_probe(tmp_path)
    out = doctor.check_bcc(p)
    assert not out.ok and out.fix == doctor.FIX_BCC and "python3-bpfcc" in out.fix
    assert "--system-site-packages" in out.fix
    smoke = doctor.check_bcc_compile(p)
    assert not smoke.ok and smoke.detail.startswith("skipped") and smoke.fix == doctor.FIX_BCC
    assert not doctor.check_ns_pid_helper(p).ok


def test_bcc_impostor_is_rejected(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    class PypiBcc:  # the unrelated PyPI package: importable, no BPF class
        __file__ = "/site-packages/bcc/__init__.py"

    monkeypatch.setattr(doctor, "_import_bcc", lambda: PypiBcc())
    out = doctor.check_bcc(fake_probe(tmp_path))
    assert not out.ok and "not BCC" in out.detail


def test_tracefs_unreadable_says_permission_not_mount(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    p = fake_probe(tmp_path)
    Path(p.tracefs).mkdir()
    # Root passes every access check, so simulate the unprivileged view of a 0700 tracefs.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    out = doctor.check_tracefs(p)
    assert not out.ok and "permission denied" in out.detail
    assert out.fix and out.fix.startswith("run as root")
    assert doctor.check_syscall_tracepoints(p) == out


def test_compile_failure_explanations() -> None:
    lines = [
        "sh: 1: modprobe: not found",
        "Unable to find kernel headers. Try rebuilding kernel with CONFIG_IKHEADERS=m",
    ]
    why, fix = doctor._explain_compile_failure(lines, Exception("Failed to compile BPF module"))
    assert why.startswith("Unable to find kernel headers") and doctor.FIX_HEADERS in fix

    lines = ["could not open bpf map: stats, error: Operation not permitted"]
    why, fix = doctor._explain_compile_failure(lines, Exception("x"))
    assert "not permitted" in why and fix == doctor.FIX_ROOT

    why, _ = doctor._explain_compile_failure([], Exception("Failed to load BPF program"))
    assert why == "Failed to load BPF program"
