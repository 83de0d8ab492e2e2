"""TLS: OpenSSL uprobes on the libraries a traced process really loaded, and the processes whose
TLS stack cannot be seen.

The kernel side (``bpf/agent.bpf.c``, "TLS") records the SSL object and buffer at
``SSL_read``/``SSL_write`` (and their ``_ex`` variants) entry, learns the SSL object's socket from
the syscall the thread makes inside the call (or, for memory-BIO stacks such as Node's, from the
TLS socket the thread last touched), and at return feeds the plaintext into the same
per-connection state machine as socket bytes. The TLS socket's own (encrypted) bytes are skipped.

This module finds what to attach to: the ``libssl`` a process mapped (``/proc/<pid>/maps``,
reached through ``/proc/<pid>/root`` for a process in another mount namespace), or the
executable itself when it exports the symbols (``node`` links OpenSSL statically). Uprobes attach
to a file, so each file is attached once, whichever process brought it, and the BPF programs
filter by the ``procs`` map. A file is detached when no traced process uses it any more.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

log = logging.getLogger("ebpf_bridge.tls")

# symbol -> (entry program, return program) in bpf/agent.bpf.c
PROBES: dict[str, tuple[str, str]] = {
    "SSL_read": ("tls_enter_read", "tls_exit"),
    "SSL_read_ex": ("tls_enter_read_ex", "tls_exit"),
    "SSL_write": ("tls_enter_write", "tls_exit"),
    "SSL_write_ex": ("tls_enter_write_ex", "tls_exit"),
}

# --- ELF -------------------------------------------------------------------------------------

_SHT_SYMTAB = 2
_SHT_DYNSYM = 11
_SHN_UNDEF = 0
_MAX_SCAN = 512 * 1024 * 1024


@dataclass(frozen=True)
class ElfInfo:
    """What the TLS logic needs to know of one ELF file."""

    defined: frozenset[str]
    """Symbols among the ones we probe (and a few markers) that the file defines, in its
    dynamic symbol table or in its ``.symtab`` (a static build that was not stripped): BCC
    resolves names from either."""
    sections: frozenset[str]
    dynsym_count: int


_INTERESTING = frozenset(PROBES) | {"SSL_new", "SSL_CTX_new"}


def _defined_in(syms: bytes, strs: bytes, entsize: int) -> tuple[set[str], int]:
    """The interesting names defined in one symbol table, and its entry count."""
    count = len(syms) // entsize
    # Most files define none of them: look for the names in the string table first, so a
    # large .symtab is walked only when it can match. Linkers share string tails, so a name
    # may start inside a longer string: every occurrence counts.
    offsets: dict[int, str] = {}
    for name in _INTERESTING:
        needle = name.encode() + b"\0"
        at = strs.find(needle)
        while at >= 0:
            offsets[at] = name
            at = strs.find(needle, at + 1)
    found: set[str] = set()
    if not offsets:
        return found, count
    for off in range(0, count * entsize, entsize):
        st_name, _info, _other, st_shndx = struct.unpack_from("<IBBH", syms, off)
        hit = offsets.get(st_name)
        if hit is not None and st_shndx != _SHN_UNDEF:
            found.add(hit)
    return found, count


def _read_elf(path: str) -> ElfInfo | None:
    try:
        with open(path, "rb") as f:
            ident = f.read(64)
            if len(ident) < 64 or ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1:
                return None  # only 64-bit little-endian ELF (x86_64, arm64)
            shoff, = struct.unpack_from("<Q", ident, 0x28)
            shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ident, 0x3A)
            if not shoff or not shnum or shentsize < 64:
                return ElfInfo(frozenset(), frozenset(), 0)
            f.seek(shoff)
            raw = f.read(shentsize * shnum)
            shdrs = [struct.unpack_from("<IIQQQQIIQQ", raw, i * shentsize) for i in range(shnum)]

            def section(i: int) -> bytes:
                _n, _t, _fl, _a, off, size, *_ = shdrs[i]
                f.seek(off)
                return f.read(min(size, _MAX_SCAN))

            names: set[str] = set()
            if shstrndx < shnum:
                strtab = section(shstrndx)
                for h in shdrs:
                    end = strtab.find(b"\0", h[0])
                    names.add(strtab[h[0]:end].decode("ascii", "replace"))
            defined: set[str] = set()
            dynsym_count = 0
            for i, h in enumerate(shdrs):
                if h[1] not in (_SHT_DYNSYM, _SHT_SYMTAB):
                    continue
                link, entsize = h[6], h[9] or 24
                strs = section(link) if link < shnum else b""
                found, count = _defined_in(section(i), strs, entsize)
                defined |= found
                if h[1] == _SHT_DYNSYM:
                    dynsym_count += count
            return ElfInfo(frozenset(defined), frozenset(names), dynsym_count)
    except (OSError, struct.error, IndexError):
        return None


@lru_cache(maxsize=1024)
def _elf_cached(path: str, dev: int, ino: int, mtime: int) -> ElfInfo | None:
    return _read_elf(path)


def elf_info(path: str) -> ElfInfo | None:
    """``ElfInfo`` of ``path`` (cached per inode and mtime)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _elf_cached(path, st.st_dev, st.st_ino, int(st.st_mtime))


@lru_cache(maxsize=256)
def _contains(path: str, dev: int, ino: int, mtime: int, needle: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            tail = b""
            read = 0
            while read < _MAX_SCAN:
                block = f.read(1 << 20)
                if not block:
                    return False
                if needle in tail + block:
                    return True
                tail = block[-len(needle):]
                read += len(block)
    except OSError:
        pass
    return False


def file_contains(path: str, needle: bytes) -> bool:
    """Whether ``needle`` occurs in the file (cached per inode and mtime)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return _contains(path, st.st_dev, st.st_ino, int(st.st_mtime), needle)


# --- processes ---------------------------------------------------------------------------------


def _same_mount_ns(pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt")
    except OSError:
        return True


def host_path(pid: int, path: str) -> str:
    """``path`` as the process sees it, reachable from the agent."""
    return path if _same_mount_ns(pid) else f"/proc/{pid}/root{path}"


def mapped_files(pid: int) -> list[str]:
    """Paths of the files ``pid`` mapped (as the process names them), in map order."""
    out: list[str] = []
    seen: set[str] = set()
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) < 6:
                    continue
                path = parts[5].strip()
                if not path.startswith("/") or path.endswith("(deleted)") or path in seen:
                    continue
                seen.add(path)
                out.append(path)
    except OSError:
        pass
    return out


def _exe(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


@dataclass(frozen=True)
class SslLibrary:
    """A file with OpenSSL's read/write symbols that a process uses."""

    path: str
    """Reachable from the agent (through /proc/<pid>/root for another mount namespace)."""
    shown: str
    """As the process names it."""
    symbols: frozenset[str]


def _candidate(path: str, exe: str | None) -> bool:
    base = os.path.basename(path)
    return path == exe or "ssl" in base.lower() or base.startswith("node")


def ssl_libraries(pid: int) -> list[SslLibrary]:
    """The OpenSSL-compatible libraries (or executable) ``pid`` loaded that we can probe."""
    exe = _exe(pid)
    files = mapped_files(pid)
    if exe and exe not in files:
        files.insert(0, exe)
    out = []
    for shown in files:
        if not _candidate(shown, exe):
            continue
        path = host_path(pid, shown)
        info = elf_info(path)
        if info is None:
            continue
        syms = info.defined & frozenset(PROBES)
        if {"SSL_read", "SSL_write"} <= syms or {"SSL_read_ex", "SSL_write_ex"} <= syms:
            out.append(SslLibrary(path, shown, syms))
    return out


def invisible_reason(pid: int, libs: Iterable[SslLibrary] | None = None) -> str | None:
    """Why the TLS traffic of ``pid`` cannot be seen, or None when there is no known TLS stack
    we cannot see."""
    exe = _exe(pid)
    files = mapped_files(pid)
    bases = [os.path.basename(p) for p in files]
    if any(b.startswith("cygrpc") for b in bases):
        return ("grpcio's BoringSSL is linked statically into cygrpc with no exported SSL "
                "symbols and no symbol table: gRPC TLS cannot be probed by name")
    if any(b.startswith("libjvm.so") for b in bases) or (exe and os.path.basename(exe) == "java"):
        return "Java JSSE: TLS is implemented in Java code, there is no native SSL_read/SSL_write"
    if exe is None:
        return None
    path = host_path(pid, exe)
    info = elf_info(path)
    if info is None:
        return None
    found = list(libs) if libs is not None else ssl_libraries(pid)
    if found:
        return None
    if ".gopclntab" in info.sections or ".go.buildinfo" in info.sections:
        if file_contains(path, b"crypto/tls."):
            return ("Go crypto/tls: TLS is implemented in Go, with no OpenSSL symbols "
                    "(needs uprobes on crypto/tls.(*Conn).Read/Write, not done yet)")
        return None
    if file_contains(path, b"rustls"):
        return "rustls: TLS is implemented in Rust and linked statically, no symbols to probe"
    if info.dynsym_count == 0 and ".symtab" not in info.sections and (
            file_contains(path, b"BoringSSL") or file_contains(path, b"OpenSSL 3.")):
        return "a TLS library is linked statically without symbols"
    return None


# --- attaching ---------------------------------------------------------------------------------


def not_visible_message(pid: int, exe: str, reason: str) -> str:
    """The one line the agent logs and ``doctor --pid`` prints for a process whose TLS stack
    cannot be seen. The reason comes from the file alone (a Go binary that links crypto/tls,
    any JVM), so it says "if": the process may well talk plaintext only."""
    return (f"encrypted traffic not visible: pid {pid} ({exe}): if it uses TLS, its TLS is not "
            f"visible: {reason}")


@dataclass
class _Attached:
    path: str
    shown: str
    symbols: frozenset[str]
    events: list[bytes]
    """BCC's names of the perf events opened for this file ("p_..."/"r_..." per symbol).
    Detaching by name needs no path or symbol lookup, which fails once the path went away
    (``/proc/<pid>/root/...`` of a process that exited)."""
    users: set[int] = field(default_factory=set)
    pinned: bool = False


class TlsProbes:
    """Attaches the SSL uprobes per library file as traced processes appear, detaches them
    when no traced process uses the file; reports processes whose TLS is invisible once."""

    def __init__(self, bpf: Any) -> None:
        self._bpf = bpf
        self._files: dict[tuple[int, int], _Attached] = {}
        self._by_pid: dict[int, set[tuple[int, int]]] = {}
        self._reported: set[int] = set()
        self.attach_errors = 0
        self.detach_errors = 0
        """Uprobes that could not be closed (their perf event stays open until exit)."""
        self.invisible: dict[int, str] = {}
        self._next_rescan = 0.0

    @property
    def attached_files(self) -> list[str]:
        """Paths of the files with uprobes attached."""
        return [a.path for a in self._files.values()]

    @property
    def open_uprobes(self) -> int:
        """Uprobes (entry and return) this object holds open."""
        return sum(len(a.events) for a in self._files.values())

    def preattach_system(self) -> None:
        """Attach to the host's libssl up front, for short-lived processes selected at exec
        (curl): their first TLS write may come before user space reads their maps."""
        for cand in ("/usr/lib/x86_64-linux-gnu/libssl.so.3", "/usr/lib/aarch64-linux-gnu/"
                     "libssl.so.3", "/lib/x86_64-linux-gnu/libssl.so.3", "/usr/lib/libssl.so.3"):
            info = elf_info(cand)
            if info is None:
                continue
            syms = info.defined & frozenset(PROBES)
            key = self._attach(SslLibrary(cand, cand, syms))
            if key is not None:
                self._files[key].pinned = True
            return

    def on_process(self, pid: int, *, execed: bool = False) -> None:
        """A traced process appeared, exec'd (``execed``: what was decided about its old image
        no longer holds) or is looked at again: attach to its SSL libraries, and report it
        when its TLS stack cannot be seen."""
        if execed:
            # The old image's libraries keep their uprobes until the pid exits: the new image
            # often maps the same libssl, and ld.so maps it only after this exec event.
            self._reported.discard(pid)
            self.invisible.pop(pid, None)
        try:
            libs = ssl_libraries(pid)
        except Exception:
            log.exception("could not inspect pid %d for TLS libraries", pid)
            return
        keys = self._by_pid.setdefault(pid, set())
        for lib in libs:
            key = self._attach(lib)
            if key is not None:
                keys.add(key)
                self._files[key].users.add(pid)
        if pid in self._reported:
            return
        # Decided only once a reason shows: a library imported later (grpc) or an exec
        # (sh -> java) changes the answer, and rescan() asks again.
        reason = invisible_reason(pid, libs)
        if reason:
            self._reported.add(pid)
            self.invisible[pid] = reason
            log.warning("%s", not_visible_message(pid, _exe(pid) or "?", reason))

    def rescan(self, pids: Iterable[int], interval_s: float = 2.0) -> None:
        """Libraries loaded after a process was selected (a driver imported lazily, dlopen):
        re-read the maps of traced processes, at most every ``interval_s``."""
        now = time.monotonic()
        if now < self._next_rescan:
            return
        self._next_rescan = now + interval_s
        for pid in list(pids):
            self.on_process(pid)

    def forget(self, pid: int) -> None:
        """``pid`` is gone: detach files no traced process uses any more."""
        self._reported.discard(pid)
        self.invisible.pop(pid, None)
        for key in self._by_pid.pop(pid, set()):
            att = self._files.get(key)
            if att is None:
                continue
            att.users.discard(pid)
            if not att.users and not att.pinned:
                self._detach(key, att)

    def _open(self, ret: bool, path: str, sym: str, fn_name: str) -> list[bytes]:
        """Attach one uprobe (``ret``: a uretprobe); return the event names BCC opened."""
        before = set(self._bpf.uprobe_fds)
        attach = self._bpf.attach_uretprobe if ret else self._bpf.attach_uprobe
        attach(name=path, sym=sym, fn_name=fn_name)
        opened = [ev for ev in self._bpf.uprobe_fds if ev not in before]
        if not opened:
            # BCC names events by path and address: the name was taken (a file replaced at
            # the same path), and BCC replaced that entry's fd, which nothing can close now.
            raise RuntimeError(f"BCC reused the uprobe event of {sym} in {path}")
        return opened

    def _close(self, events: Iterable[bytes]) -> list[str]:
        """Close uprobes by event name; the errors, one per event that would not close."""
        errors = []
        for ev in events:
            try:
                self._bpf.detach_uprobe_event(ev)
            except Exception as e:  # BCC raises a bare Exception
                errors.append(f"{ev.decode(errors='replace')}: {e}")
        return errors

    def _attach(self, lib: SslLibrary) -> tuple[int, int] | None:
        try:
            st = os.stat(lib.path)
        except OSError:
            return None
        key = (st.st_dev, st.st_ino)
        if key in self._files:
            return key
        done: list[str] = []
        events: list[bytes] = []
        for sym in sorted(lib.symbols):
            enter, ret = PROBES[sym]
            opened: list[bytes] = []
            try:
                opened += self._open(False, lib.path, sym, enter)
                opened += self._open(True, lib.path, sym, ret)
            except Exception as e:  # BCC raises a bare Exception
                self.attach_errors += 1
                log.warning("could not attach to %s in %s: %s", sym, lib.shown, e)
                # An entry probe without its return probe would only fill ssl_calls.
                self._count_detach_errors(self._close(opened), lib.shown)
                continue
            done.append(sym)
            events += opened
        if not done:
            return None
        self._files[key] = _Attached(lib.path, lib.shown, frozenset(done), events)
        log.info("TLS: uprobes on %s (%s)", lib.shown, ", ".join(done))
        return key

    def _count_detach_errors(self, errors: list[str], shown: str) -> None:
        if errors:
            self.detach_errors += len(errors)
            log.warning("TLS: could not detach %d uprobes from %s: %s", len(errors), shown,
                        "; ".join(errors))

    def _detach(self, key: tuple[int, int], att: _Attached) -> None:
        errors = self._close(att.events)
        del self._files[key]
        if errors:
            self._count_detach_errors(errors, att.path)
        else:
            log.info("TLS: detached from %s (%d uprobes)", att.path, len(att.events))
