"""Unit tests for ``kernel_side.tls``: ELF symbol reading on real files of this machine and on
binaries built here (gcc, go), and the "encrypted traffic not visible" report for real
processes. No BPF is loaded: the processes below have no SSL library to attach to."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel_side import tls

LIBSSL = Path("/usr/lib/x86_64-linux-gnu/libssl.so.3")
NODE = shutil.which("node")
PROBED = {"SSL_read", "SSL_read_ex", "SSL_write", "SSL_write_ex"}

_FAKE_SSL_C = r"""
#include <unistd.h>
int SSL_read(void *ssl, void *buf, int num) { (void)ssl; return (int)read(0, buf, num); }
int SSL_write(void *ssl, const void *buf, int num) { (void)ssl; return (int)write(1, buf, num); }
int main(void) { char b[1]; return SSL_read(0, b, 1) < 0; }
"""

# Links crypto/tls, waits for a line on stdin, then execs sleep (a new image, same pid).
_GO_TLS = """package main

import (
	"bufio"
	"crypto/tls"
	"os"
	"syscall"
)

func main() {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	_ = cfg
	bufio.NewReader(os.Stdin).ReadString('\\n')
	syscall.Exec("/bin/sleep", []string{"sleep", "60"}, os.Environ())
}
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Static C programs defining SSL_read/SSL_write (symbol table kept, and stripped)."""
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc")
    d = tmp_path_factory.mktemp("elf")
    src = d / "fake_ssl.c"
    src.write_text(_FAKE_SSL_C)
    out = {"static": d / "static_ssl", "stripped": d / "static_ssl_stripped"}
    for key, extra in (("static", []), ("stripped", ["-s"])):
        r = subprocess.run(["gcc", "-static", *extra, "-o", str(out[key]), str(src)],
                           capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"gcc -static failed (no static libc?): {r.stderr[-300:]}")
    return out


@pytest.fixture(scope="module")
def go_tls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Go binary that links crypto/tls."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("needs go")
    d = tmp_path_factory.mktemp("go")
    (d / "main.go").write_text(_GO_TLS)
    env = {**os.environ, "GO111MODULE": "off", "GOCACHE": str(d / "cache"),
           "GOPATH": str(d / "gopath")}
    subprocess.run([go, "build", "-o", str(d / "gotls"), str(d / "main.go")], check=True,
                   cwd=d, env=env, capture_output=True, timeout=300)
    return d / "gotls"


def _spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    # Readiness: the kernel shows the image once exec is done.
    deadline = time.monotonic() + 10
    while os.path.realpath(f"/proc/{p.pid}/exe") != os.path.realpath(argv[0]):
        assert time.monotonic() < deadline and p.poll() is None, argv
        time.sleep(0.01)
    return p


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    out: list[subprocess.Popen[bytes]] = []
    yield out
    for p in out:
        p.kill()
        p.wait(5)


# --- ELF ------------------------------------------------------------------------------------


@pytest.mark.skipif(not LIBSSL.exists(), reason="Debian's multiarch libssl path")
def test_system_libssl_exports_the_probed_symbols() -> None:
    info = tls.elf_info(str(LIBSSL))
    assert info is not None
    assert info.defined >= PROBED
    assert info.dynsym_count > 100


@pytest.mark.skipif(NODE is None, reason="needs node")
def test_node_binary_carries_openssl() -> None:
    assert NODE is not None
    info = tls.elf_info(os.path.realpath(NODE))
    assert info is not None
    assert info.defined >= PROBED


def test_static_openssl_with_a_symbol_table_is_probed(built: dict[str, Path],
                                                      procs: list[subprocess.Popen[bytes]]
                                                      ) -> None:
    """A static build has no dynamic symbols; its .symtab still names SSL_read/SSL_write, BCC
    resolves them, and the process's executable is the library to attach to."""
    info = tls.elf_info(str(built["static"]))
    assert info is not None
    assert info.dynsym_count == 0 and ".symtab" in info.sections
    assert {"SSL_read", "SSL_write"} <= info.defined
    from bcc import BPF

    assert BPF.get_user_addresses(str(built["static"]).encode(), b"^SSL_read$")
    p = _spawn([str(built["static"])])
    procs.append(p)
    libs = tls.ssl_libraries(p.pid)
    assert [(lib.shown, lib.symbols) for lib in libs] == [
        (str(built["static"]), frozenset({"SSL_read", "SSL_write"}))]
    assert tls.invisible_reason(p.pid, libs) is None


def test_a_file_without_symbols(built: dict[str, Path]) -> None:
    info = tls.elf_info(str(built["stripped"]))
    assert info is not None
    assert info.defined == frozenset() and info.dynsym_count == 0
    assert ".symtab" not in info.sections


def test_not_an_elf_file(tmp_path: Path) -> None:
    f = tmp_path / "script.sh"
    f.write_text("#!/bin/sh\necho hi\n")
    assert tls.elf_info(str(f)) is None
    assert tls.elf_info(str(tmp_path / "missing")) is None


# --- invisible TLS ----------------------------------------------------------------------------


def test_go_crypto_tls_is_named(go_tls: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    info = tls.elf_info(str(go_tls))
    assert info is not None and ".gopclntab" in info.sections
    p = _spawn([str(go_tls)])
    procs.append(p)
    assert tls.ssl_libraries(p.pid) == []
    reason = tls.invisible_reason(p.pid)
    assert reason is not None and "Go crypto/tls" in reason
    msg = tls.not_visible_message(p.pid, str(go_tls), reason)
    assert msg.startswith(f"encrypted traffic not visible: pid {p.pid} ")
    assert "if it uses TLS" in msg


def test_plain_process_has_no_reason(procs: list[subprocess.Popen[bytes]]) -> None:
    p = _spawn(["/bin/sleep", "60"])
    procs.append(p)
    assert tls.invisible_reason(p.pid) is None


def _reports(caplog: pytest.LogCaptureFixture, pid: int) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if "encrypted traffic not visible" in r.getMessage() and f"pid {pid} " in
            r.getMessage()]


def test_report_waits_for_a_reason_and_comes_once(go_tls: Path,
                                                  procs: list[subprocess.Popen[bytes]],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """sh first (nothing to say), then the same pid execs the Go binary: a later look (the
    agent's rescan) reports it, and only once."""
    caplog.set_level(logging.WARNING, logger="ebpf_bridge.tls")
    p = _spawn(["/bin/sh", "-c", f'read line; exec "{go_tls}"'])
    procs.append(p)
    probes = tls.TlsProbes(bpf=None)
    probes.on_process(p.pid)
    assert _reports(caplog, p.pid) == [] and p.pid not in probes.invisible
    assert p.stdin is not None
    p.stdin.write(b"go\n")
    p.stdin.flush()
    _wait_exe(p.pid, go_tls)
    probes.on_process(p.pid)
    probes.on_process(p.pid)
    assert len(_reports(caplog, p.pid)) == 1
    assert "Go crypto/tls" in probes.invisible[p.pid]


def test_exec_resets_the_report(go_tls: Path, procs: list[subprocess.Popen[bytes]],
                                caplog: pytest.LogCaptureFixture) -> None:
    """The Go binary is reported, then execs sleep: the old reason no longer holds."""
    caplog.set_level(logging.WARNING, logger="ebpf_bridge.tls")
    p = _spawn([str(go_tls)])
    procs.append(p)
    probes = tls.TlsProbes(bpf=None)
    probes.on_process(p.pid)
    assert p.pid in probes.invisible
    assert p.stdin is not None
    p.stdin.write(b"go\n")
    p.stdin.flush()
    _wait_exe(p.pid, Path("/bin/sleep"))
    probes.on_process(p.pid, execed=True)
    assert p.pid not in probes.invisible
    assert len(_reports(caplog, p.pid)) == 1


def _wait_exe(pid: int, exe: Path) -> None:
    deadline = time.monotonic() + 10
    while os.path.realpath(f"/proc/{pid}/exe") != os.path.realpath(exe):
        assert time.monotonic() < deadline, (pid, exe)
        time.sleep(0.01)

