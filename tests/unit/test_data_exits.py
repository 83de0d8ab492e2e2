"""The one data_exit program is attached to every data syscall's exit, after its record layout
is checked against the tracefs format (BCC checks only TRACEPOINT_PROBEs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kernel_side.agent import (
    DATA_SYSCALLS,
    AgentError,
    attach_data_exits,
    check_probe_requirements,
)

_GOOD = """name: {event}
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;
\tfield:long ret;\toffset:16;\tsize:8;\tsigned:1;
"""


class _Recorder:
    def __init__(self) -> None:
        self.attached: list[tuple[str, bytes]] = []

    def attach_tracepoint(self, tp: str, fn_name: bytes) -> None:
        self.attached.append((tp, fn_name))


def _tracefs(root: Path, layout: str = _GOOD, skip: str = "") -> str:
    for name in DATA_SYSCALLS:
        if name == skip:
            continue
        d = root / "events/syscalls" / f"sys_exit_{name}"
        d.mkdir(parents=True)
        (d / "format").write_text(layout.format(event=f"sys_exit_{name}"))
    return str(root)


def test_every_data_syscall_exit_gets_the_one_program(tmp_path: Path) -> None:
    rec = _Recorder()
    attach_data_exits(rec, _tracefs(tmp_path))
    assert rec.attached == [(f"syscalls:sys_exit_{n}", b"data_exit") for n in DATA_SYSCALLS]
    assert {"read", "write", "recvmsg", "sendmsg", "readv", "writev"} <= set(DATA_SYSCALLS)


def test_a_different_record_layout_is_refused_by_name(tmp_path: Path) -> None:
    moved = _GOOD.replace("offset:16;", "offset:24;")
    rec = _Recorder()
    with pytest.raises(AgentError, match="sys_exit_read has an unexpected record layout"):
        attach_data_exits(rec, _tracefs(tmp_path, moved))
    assert rec.attached == []


def test_a_moved_syscall_number_is_refused(tmp_path: Path) -> None:
    # data_exit tells the syscalls apart by the number at offset 8.
    moved = _GOOD.replace("offset:8;", "offset:12;")
    with pytest.raises(AgentError, match="syscall number is not an int at offset 8"):
        attach_data_exits(_Recorder(), _tracefs(tmp_path, moved))


def test_probe_requirements_name_the_machine_and_the_btf(tmp_path: Path) -> None:
    btf = tmp_path / "vmlinux"
    btf.write_bytes(b"\x9f\xeb")
    check_probe_requirements("x86_64", str(btf))
    with pytest.raises(AgentError, match="x86_64 syscall registers; this machine is aarch64"):
        check_probe_requirements("aarch64", str(btf))
    with pytest.raises(AgentError, match=r"no kernel BTF at .*CONFIG_DEBUG_INFO_BTF=y"):
        check_probe_requirements("x86_64", str(tmp_path / "missing"))


def test_a_missing_format_names_the_event_and_the_fix(tmp_path: Path) -> None:
    rec = _Recorder()
    with pytest.raises(AgentError, match=r"syscalls:sys_exit_sendto .*mount -t tracefs"):
        attach_data_exits(rec, _tracefs(tmp_path, skip="sendto"))
