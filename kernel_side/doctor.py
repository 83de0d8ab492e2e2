"""``ebpf-bridge doctor``: probe this machine for everything the agent needs, and say how to fix it.

Every check is a real probe (read the file the kernel exposes, make the syscall, compile and load
a program) rather than an inference from the kernel version: distribution kernels backport and
disable features freely, so a version number proves nothing. The checks are declared as data in
``CHECKS``; each takes a ``Probe`` that says where to look, so tests can point it at fake
directories.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

from kernel_side import btf

DEFAULT_PIN_ROOT = "/sys/fs/bpf/ebpf_bridge"

# statfs(2) magic of a bpf filesystem (include/uapi/linux/magic.h).
BPF_FS_MAGIC = 0xCAFE4A11

# Capability numbers (include/uapi/linux/capability.h).
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39

# bpf(2): command and map type numbers from include/uapi/linux/bpf.h.
BPF_MAP_CREATE = 0
BPF_MAP_TYPE_RINGBUF = 27
# The syscall number is per architecture; only those the agent is built for are listed.
_SYS_BPF = {"x86_64": 321, "aarch64": 280}

FIX_BCC = (
    "apt-get install python3-bpfcc bpfcc-tools libbpfcc, and run from a venv made with "
    "`/usr/bin/python3 -m venv --system-site-packages .venv` (BCC is not on PyPI; the PyPI "
    "package `bcc` is unrelated)"
)
FIX_HEADERS = (
    "bash scripts/install.sh (or: apt-get install linux-headers-amd64 && "
    "ln -sfn /usr/src/linux-headers-<ver>-amd64 /lib/modules/$(uname -r)/build && "
    "ln -sfn /usr/src/linux-headers-<ver>-common /lib/modules/$(uname -r)/source)"
)
FIX_TRACEFS = "mount -t tracefs tracefs /sys/kernel/tracing"
FIX_BPFFS = "mount -t bpf bpf /sys/fs/bpf"
FIX_ROOT = (
    "run as root (sudo ebpf-bridge doctor), or grant CAP_BPF and CAP_PERFMON "
    "(setcap cap_bpf,cap_perfmon+ep <python>, or securityContext.capabilities.add: [BPF, PERFMON])"
)


@dataclass(frozen=True)
class Check:
    """The result of one check.

    ``required`` means the agent cannot run when this check fails; a failed check that is not
    required is a warning (a feature is missing, the agent runs without it).
    """

    name: str
    ok: bool
    detail: str
    fix: str | None
    required: bool


class Outcome(NamedTuple):
    """What a check function returns; ``run_checks`` adds the name and ``required``."""

    ok: bool
    detail: str
    fix: str | None = None


@dataclass
class Probe:
    """Where the checks look. Defaults are the real machine; tests substitute directories."""

    pin_root: str = DEFAULT_PIN_ROOT
    tracefs: str = "/sys/kernel/tracing"
    bpffs: str = "/sys/fs/bpf"
    proc_status: str = "/proc/self/status"
    btf: str = "/sys/kernel/btf/vmlinux"
    lockdown: str = "/sys/kernel/security/lockdown"
    modules: str = "/lib/modules"
    event_sources: str = "/sys/bus/event_source/devices"
    release: str = field(default_factory=lambda: os.uname().release)
    machine: str = field(default_factory=lambda: os.uname().machine)
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    # The BCC smoke program runs once and feeds two checks (compile/load and the ns pid helper).
    _smoke: SmokeResult | None = field(default=None, init=False, repr=False)


# --- low-level probes -------------------------------------------------------------------------

_libc: ctypes.CDLL | None = None


def _get_libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def fs_magic(path: str) -> int | None:
    """Return the statfs(2) ``f_type`` of ``path``, or None when statfs fails.

    ``os.statvfs`` has no ``f_type``, so this calls libc's statfs. ``f_type`` is the first field
    of ``struct statfs`` on every Linux ABI; the buffer is oversized so the struct fits anywhere.
    """
    buf = ctypes.create_string_buffer(256)
    libc = _get_libc()
    if libc.statfs(os.fsencode(path), buf) != 0:
        return None
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def mounted_fstype(path: str, mounts: str = "/proc/mounts") -> str | None:
    """The filesystem type mounted exactly at ``path`` per /proc/mounts (last mount wins)."""
    found = None
    with contextlib.suppress(OSError), open(mounts) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[1] == path:
                found = parts[2]
    return found


def bpf_create_ringbuf(size: int) -> int:
    """Create a BPF ring buffer map of ``size`` bytes with bpf(2); return its fd.

    Raises OSError with the kernel's errno. ``size`` must be a power-of-two multiple of the page
    size (the kernel's rule for ring buffers).
    """
    nr = _SYS_BPF.get(os.uname().machine)
    if nr is None:
        raise OSError(errno.ENOSYS, f"bpf(2) syscall number unknown for {os.uname().machine}")
    # union bpf_attr, BPF_MAP_CREATE part: map_type, key_size, value_size, max_entries (u32
    # each), then fields that must be zero. The kernel accepts a larger attr if the tail is zero.
    attr = ctypes.create_string_buffer(128)
    ctypes.c_uint32.from_buffer(attr, 0).value = BPF_MAP_TYPE_RINGBUF
    ctypes.c_uint32.from_buffer(attr, 12).value = size
    libc = _get_libc()
    libc.syscall.restype = ctypes.c_long
    fd = int(
        libc.syscall(ctypes.c_long(nr), ctypes.c_int(BPF_MAP_CREATE), attr, ctypes.c_uint(128))
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


# --- checks -----------------------------------------------------------------------------------


def check_kernel(p: Probe) -> Outcome:
    """Kernel release and architecture: the probes read x86_64 syscall registers."""
    jit = ""
    with contextlib.suppress(OSError), open("/proc/sys/net/core/bpf_jit_enable") as f:
        jit = ", BPF JIT on" if f.read().strip() != "0" else ", BPF JIT off"
    if p.machine != "x86_64":
        return Outcome(False, f"Linux {p.release} {p.machine}: the probes read syscall "
                       "arguments from x86_64 registers", "run the agent on an x86_64 node")
    return Outcome(True, f"Linux {p.release} {p.machine}{jit}")


def _cap_names(mask: int) -> list[str]:
    names = {CAP_SYS_ADMIN: "CAP_SYS_ADMIN", CAP_PERFMON: "CAP_PERFMON", CAP_BPF: "CAP_BPF"}
    return [n for bit, n in sorted(names.items()) if mask >> bit & 1]


def check_privileges(p: Probe) -> Outcome:
    """Effective capabilities: the agent loads programs (CAP_BPF) and attaches them (CAP_PERFMON).

    Reads CapEff rather than trusting uid 0: root inside a container may have neither.
    CAP_SYS_ADMIN is accepted too, since it implies both on every kernel (and is all that kernels
    before 5.8 know).
    """
    cap_eff = None
    with open(p.proc_status) as f:
        for line in f:
            if line.startswith("CapEff:"):
                cap_eff = int(line.split()[1], 16)
    if cap_eff is None:
        return Outcome(False, f"no CapEff line in {p.proc_status}", FIX_ROOT)
    have = _cap_names(cap_eff)
    who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
    detail = f"{who}, CapEff={cap_eff:#x} ({', '.join(have) or 'none of BPF/PERFMON/SYS_ADMIN'})"
    ok = bool(cap_eff >> CAP_SYS_ADMIN & 1) or (
        bool(cap_eff >> CAP_BPF & 1) and bool(cap_eff >> CAP_PERFMON & 1)
    )
    return Outcome(ok, detail, None if ok else FIX_ROOT)


FIX_BTF = ("use a kernel built with CONFIG_DEBUG_INFO_BTF=y (every major distribution's "
           "since 2021): the probes read syscall arguments at exit through BTF-typed helpers")


def check_btf(p: Probe) -> Outcome:
    """Kernel BTF: the exit programs take the syscall's registers with bpf_task_pt_regs, which
    needs the BTF-typed task; some field offsets come from it too (the fd table, to find a new
    connection's socket; IPv6 socket addresses). BCC still compiles against headers, not
    CO-RE."""
    if not os.path.exists(p.btf):
        return Outcome(False, f"{p.btf} absent", FIX_BTF)
    notes = []
    if btf.member_offsets(btf.FD_WALK, p.btf) is None:
        notes.append("the fd-table fields were not found in it: socket addresses are learned "
                     "at each connection's first send or receive, by two more tracepoints")
    v6 = btf.sock_v6_offsets(p.btf)
    if v6 is None:
        notes.append("struct sock_common's IPv6 addresses were not found in it: same-node "
                     "stitching learns IPv4 socket addresses only")
    if notes or v6 is None:
        return Outcome(True, f"{p.btf} present, but " + "; ".join(notes))
    return Outcome(True, f"{p.btf} present (the fd table's fields, and struct sock_common's "
                   f"IPv6 addresses at bytes {v6[0]} and {v6[1]})")


def check_tracefs(p: Probe) -> Outcome:
    """tracefs is mounted: BCC attaches tracepoints by reading its event directories."""
    events = os.path.join(p.tracefs, "events", "syscalls")
    if os.path.isdir(events):
        return Outcome(True, f"{p.tracefs} mounted ({events} present)")
    if os.path.exists(p.tracefs) and not os.access(p.tracefs, os.R_OK | os.X_OK):
        # tracefs is root-only (mode 700): an unprivileged doctor sees an empty mount point.
        fix = "run as root (sudo ebpf-bridge doctor): tracefs is readable by root only"
        return Outcome(False, f"{p.tracefs} not readable (permission denied)", fix)
    if os.path.isdir(os.path.join(p.tracefs, "events")):
        return Outcome(
            False,
            f"{p.tracefs} mounted but has no events/syscalls (CONFIG_FTRACE_SYSCALLS off?)",
            "use a kernel built with CONFIG_FTRACE_SYSCALLS=y",
        )
    return Outcome(False, f"{p.tracefs} not mounted", FIX_TRACEFS)


def check_syscall_tracepoints(p: Probe) -> Outcome:
    """The syscall tracepoints the agent's probes attach to exist."""
    syscalls = os.path.join(p.tracefs, "events", "syscalls")
    wanted = ["sys_enter_read", "sys_enter_write", "sys_enter_connect", "sys_enter_accept4"]
    mounted = check_tracefs(p)
    if not mounted.ok:
        return mounted
    missing = [t for t in wanted if not os.path.isdir(os.path.join(syscalls, t))]
    if missing:
        return Outcome(
            False,
            f"missing in {syscalls}: {', '.join(missing)}",
            "use a kernel built with CONFIG_FTRACE_SYSCALLS=y",
        )
    count = sum(1 for n in os.listdir(syscalls) if n.startswith("sys_enter_"))
    return Outcome(True, f"sys_enter_read and friends present ({count} sys_enter_* events)")


def check_bpffs(p: Probe) -> Outcome:
    """A bpf filesystem is mounted at ``p.bpffs``: the context maps are pinned there."""
    magic = fs_magic(p.bpffs)
    if magic == BPF_FS_MAGIC:
        return Outcome(True, f"{p.bpffs} is bpffs (statfs magic {BPF_FS_MAGIC:#x})")
    if magic is None and mounted_fstype(p.bpffs) == "bpf":
        # statfs itself failed (odd libc?): /proc/mounts is the next best witness.
        return Outcome(True, f"{p.bpffs} is bpffs (per /proc/mounts)")
    if not os.path.exists(p.bpffs):
        seen = "does not exist"
    elif magic is None:
        seen = "cannot be statfs'd"
    else:
        seen = f"is not bpffs (statfs magic {magic:#x})"
    fix = FIX_BPFFS if p.bpffs == "/sys/fs/bpf" else f"mount -t bpf bpf {p.bpffs}"
    return Outcome(False, f"{p.bpffs} {seen}", fix)


def _probe_feature(p: Probe, pmu: str, events_file: str) -> str | None:
    """Where the kernel advertises a probe type (a PMU or a tracefs control file), or None."""
    for path in (os.path.join(p.event_sources, pmu), os.path.join(p.tracefs, events_file)):
        if os.path.exists(path):
            return path
    return None


def check_kprobes(p: Probe) -> Outcome:
    """kprobes (optional: the agent uses tracepoints and uprobes only)."""
    where = _probe_feature(p, "kprobe", "kprobe_events")
    if where:
        return Outcome(True, f"available ({where})")
    return Outcome(
        False,
        "not available (CONFIG_KPROBES off): the agent uses tracepoints and uprobes only",
        "none needed; to enable, use a kernel built with CONFIG_KPROBES=y",
    )


def check_uprobes(p: Probe) -> Outcome:
    """uprobes (optional today; TLS capture hooks SSL_read/SSL_write with them)."""
    where = _probe_feature(p, "uprobe", "uprobe_events")
    if where:
        return Outcome(True, f"available ({where})")
    return Outcome(
        False,
        "not available (CONFIG_UPROBE_EVENTS off): TLS payloads cannot be captured",
        "use a kernel built with CONFIG_UPROBES=y and CONFIG_UPROBE_EVENTS=y",
    )


def check_injection(p: Probe) -> Outcome:
    """What ``--inject-traceparent`` needs (optional): cgroup v2 for sock_ops, Linux 6.10+ for
    sockmap links."""
    from kernel_side.inject import InjectError, find_cgroup2_root

    try:
        root = find_cgroup2_root()
    except InjectError as e:
        return Outcome(False, "no cgroup v2 mount: --inject-traceparent is unavailable",
                       str(e).split(": ", 1)[-1])
    release = os.uname().release
    nums = [int(x) for x in re.findall(r"\d+", release)[:2]]
    if len(nums) == 2 and tuple(nums) < (6, 10):
        return Outcome(False, f"Linux {release}: sockmap links need 6.10+; "
                       "--inject-traceparent is unavailable", "use Linux 6.10 or later")
    return Outcome(True, f"available (cgroup v2 at {root})")


def check_ringbuf(p: Probe) -> Outcome:
    """Create (and close) a BPF_MAP_TYPE_RINGBUF: the agent's event channel."""
    size = os.sysconf("SC_PAGE_SIZE") * 4
    try:
        fd = bpf_create_ringbuf(size)
    except OSError as e:
        fix = {
            errno.EPERM: FIX_ROOT,
            errno.EINVAL: "use a kernel >= 5.8 (BPF ring buffer)",
        }.get(e.errno or 0, "run as root on a kernel >= 5.8 with CONFIG_BPF_SYSCALL=y")
        return Outcome(False, f"bpf(BPF_MAP_CREATE, RINGBUF, {size}) failed: {e.strerror}", fix)
    os.close(fd)
    return Outcome(True, f"created and closed a {size // 1024} KiB ring buffer map")


def check_lockdown(p: Probe) -> Outcome:
    """Kernel lockdown mode (information)."""
    try:
        with open(p.lockdown) as f:
            text = f.read()
    except FileNotFoundError:
        return Outcome(True, "unknown (securityfs not mounted)")
    except OSError as e:
        return Outcome(True, f"unknown ({p.lockdown}: {e.strerror})")
    m = re.search(r"\[(\w+)\]", text)
    mode = m.group(1) if m else text.strip()
    notes = {
        "none": "no restriction",
        "integrity": "bpf_probe_write_user is refused (the agent does not use it)",
        "confidentiality": "reading kernel memory is refused: BPF tracing will not work",
    }
    note = notes.get(mode)
    return Outcome(True, f"{mode}: {note}" if note else mode)


def _import_bcc() -> Any:
    import bcc  # Debian's python3-bpfcc; imported lazily so the doctor runs without it.

    return bcc


def check_bcc(p: Probe) -> Outcome:
    """BCC's Python module imports (and libbcc loads with it)."""
    try:
        bcc = _import_bcc()
    except Exception as e:  # an ImportError, or an OSError from a missing libbcc.so.0
        return Outcome(False, f"import bcc failed: {type(e).__name__}: {e}", FIX_BCC)
    if not hasattr(bcc, "BPF"):
        # The PyPI package named `bcc` imports fine but is something else entirely.
        return Outcome(False, f"{bcc.__file__} is not BCC (no bcc.BPF): the PyPI `bcc`?", FIX_BCC)
    version = getattr(bcc, "__version__", "unknown version")
    return Outcome(True, f"bcc {version} from {bcc.__file__}")


def check_headers(p: Probe) -> Outcome:
    """Kernel headers BCC can compile against: BCC_KERNEL_SOURCE, or /lib/modules/<rel>/build."""
    env = p.environ.get("BCC_KERNEL_SOURCE")
    if env:
        if os.path.isdir(os.path.join(env, "include")):
            return Outcome(True, f"BCC_KERNEL_SOURCE={env}")
        return Outcome(
            False,
            f"BCC_KERNEL_SOURCE={env} has no include/",
            "unset BCC_KERNEL_SOURCE or point it at a linux-headers tree; " + FIX_HEADERS,
        )
    base = os.path.join(p.modules, p.release)
    build = os.path.join(base, "build")
    source = os.path.join(base, "source")
    if not os.path.isdir(os.path.join(build, "include")):
        return Outcome(False, f"{build}/include missing (no headers for {p.release})", FIX_HEADERS)
    target = os.path.realpath(build)
    detail = f"{build} -> {target}"
    # Debian splits headers into -amd64 (generated) and -common (the rest): with only the
    # former, include/linux is absent and BCC fails on the first #include.
    if not os.path.isdir(os.path.join(build, "include", "linux")):
        if not os.path.isdir(os.path.join(source, "include", "linux")):
            return Outcome(
                False, f"{detail}, but no include/linux there or in {source}", FIX_HEADERS
            )
        detail += f", source -> {os.path.realpath(source)}"
    if p.release not in os.path.basename(target):
        detail += (
            f" (fallback headers, not {p.release}: fine for tracepoints and uprobes,"
            " kernel struct layouts differ)"
        )
    return Outcome(True, detail)


class SmokeResult(NamedTuple):
    """What the BCC smoke program saw; shared by two checks."""

    ok: bool
    detail: str
    fix: str | None
    ns_outcome: Outcome


SMOKE_PROGRAM = r"""
BPF_HASH(ns_tgid_by_tid, u32, u32, 256);
BPF_ARRAY(stats, s64, 2);  /* [0] hits, [1] last error from the helper */

TRACEPOINT_PROBE(syscalls, sys_enter_getpid) {
    struct bpf_pidns_info ns = {};
    int hits = 0, err = 1;
    long ret = bpf_get_ns_current_pid_tgid(PIDNS_DEV, PIDNS_INO, &ns, sizeof(ns));
    stats.atomic_increment(hits);
    if (ret != 0) {
        s64 *e = stats.lookup(&err);
        if (e)
            *e = ret;
        return 0;
    }
    /* Keyed by the tid as our PID namespace sees it: user space looks up the thread that
       called getpid() and compares the tgid with os.getpid(). */
    u32 tgid = ns.tgid, tid = ns.pid;
    ns_tgid_by_tid.update(&tid, &tgid);
    return 0;
}
"""


@contextlib.contextmanager
def _captured_output() -> Iterator[list[str]]:
    """Capture fds 1 and 2 while BCC compiles.

    libbcc and clang write diagnostics straight to the file descriptors (some to stdout), which
    would tear the table apart; the lines are kept to explain a failure instead.
    """
    out: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            tmp.seek(0)
            out.extend(tmp.read().decode(errors="replace").splitlines())


def _explain_compile_failure(lines: list[str], exc: BaseException) -> tuple[str, str]:
    """Pick the line that says why BCC failed, and the fix that matches it."""
    telling = [
        ln.strip()
        for ln in lines
        if re.search(r"error|unable|not permitted|denied", ln, re.IGNORECASE)
        and "modprobe" not in ln  # libbcc tries `modprobe kheaders`; its absence is noise
    ]
    why = (telling or [str(exc)])[0][:200]
    if re.search(r"not permitted|denied", why, re.IGNORECASE):
        return why, FIX_ROOT
    return why, "check the kernel headers line above; " + FIX_HEADERS


def _run_smoke(p: Probe) -> SmokeResult:
    """Compile, load, attach, trigger, read back and detach the smoke program."""
    skip_ns = Outcome(False, "skipped: the BCC smoke program did not run", None)
    try:
        bcc = _import_bcc()
        bcc.BPF  # noqa: B018 - the PyPI `bcc` imports but has no BPF
    except Exception as e:
        return SmokeResult(False, f"skipped: import bcc failed ({e})", FIX_BCC, skip_ns)
    st = os.stat("/proc/self/ns/pid")
    cflags = [f"-DPIDNS_DEV={st.st_dev}ULL", f"-DPIDNS_INO={st.st_ino}ULL"]
    t0 = time.perf_counter()
    try:
        with _captured_output() as lines:
            b = bcc.BPF(text=SMOKE_PROGRAM, cflags=cflags)
    except Exception as e:
        why, fix = _explain_compile_failure(lines, e)
        return SmokeResult(False, f"compile/load failed: {why}", fix, skip_ns)
    ms = (time.perf_counter() - t0) * 1000
    try:
        # Trigger from a second thread so tid != tgid: that proves the helper fills both fields
        # rather than the check passing on a coincidence of equal numbers.
        tids: list[int] = []

        def trigger() -> None:
            tids.append(threading.get_native_id())
            os.getpid()

        worker = threading.Thread(target=trigger)
        worker.start()
        worker.join()
        pid, tid = os.getpid(), tids[0]
        hits = b["stats"][ctypes.c_int(0)].value
        err = b["stats"][ctypes.c_int(1)].value
        table = b["ns_tgid_by_tid"]
        seen = {k.value: v.value for k, v in table.items()}
    finally:
        b.cleanup()  # detaches the tracepoint and closes the program and maps
    detail = f"compiled, loaded, attached and detached sys_enter_getpid in {ms:.0f} ms"
    if hits == 0:
        return SmokeResult(
            False,
            "loaded but the tracepoint never fired on getpid()",
            FIX_TRACEFS,
            Outcome(False, "skipped: the tracepoint never fired", None),
        )
    if seen.get(tid) == pid:
        ns = Outcome(True, f"tgid {pid} for thread {tid}, matching os.getpid()")
    elif tid in seen:
        ns = Outcome(
            False,
            f"thread {tid}: helper said tgid {seen[tid]}, os.getpid() is {pid}",
            "report a kernel bug; context keys would be wrong",
        )
    else:
        why = f"last error {err}" if err else f"saw tids {sorted(seen)[:5]}"
        ns = Outcome(
            False,
            f"no entry for thread {tid} of os.getpid()={pid} ({why})",
            "use a kernel >= 5.7 with bpf_get_ns_current_pid_tgid usable from tracepoints",
        )
    return SmokeResult(True, detail, None, ns)


def _smoke(p: Probe) -> SmokeResult:
    if p._smoke is None:
        p._smoke = _run_smoke(p)
    return p._smoke


def check_bcc_compile(p: Probe) -> Outcome:
    """Compile, load, attach and detach a tiny program with BCC (headers + clang + loading)."""
    s = _smoke(p)
    return Outcome(s.ok, s.detail, s.fix)


def check_pin_dir(p: Probe) -> Outcome:
    """The pin directory exists on bpffs and is writable (created when missing, and kept)."""
    root = os.path.abspath(p.pin_root)
    # Look at the nearest existing ancestor first, so a wrong pin root is reported without
    # leaving directories behind on some other filesystem.
    existing = root
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    magic = fs_magic(existing)
    if magic != BPF_FS_MAGIC:
        kind = f"statfs magic {magic:#x}" if magic is not None else "statfs failed"
        return Outcome(False, f"{root} is not on bpffs ({existing}: {kind})", _pin_fix(root))
    created = False
    try:
        if not os.path.isdir(root):
            os.makedirs(root, mode=0o755, exist_ok=True)
            created = True
    except OSError as e:
        return Outcome(False, f"cannot create {root}: {e.strerror}", _pin_fix(root))
    # bpffs holds only directories and pinned objects, so probe writability with a directory.
    # Its names may not contain dots (the kernel answers EPERM), hence no hidden-file name.
    probe_dir = os.path.join(root, f"doctor_probe_{os.getpid()}")
    try:
        os.mkdir(probe_dir)
        os.rmdir(probe_dir)
    except OSError as e:
        fix = f"run as root, or chown the agent's user onto {root}"
        return Outcome(False, f"{root} is not writable: {e.strerror}", fix)
    return Outcome(True, f"{root} {'created' if created else 'exists'}, on bpffs, writable")


def _pin_fix(root: str) -> str:
    return f"{FIX_BPFFS} && mkdir -p {DEFAULT_PIN_ROOT}" + (
        f" (or choose a pin root under /sys/fs/bpf instead of {root})"
        if not root.startswith("/sys/fs/bpf/")
        else ""
    )


def check_ns_pid_helper(p: Probe) -> Outcome:
    """bpf_get_ns_current_pid_tgid works: context map keys are (pid ns inode, namespaced tid)."""
    return _smoke(p).ns_outcome


CheckFn = Callable[[Probe], Outcome]

# (name, function, required). Order is the order of the report: cheap facts first, then the
# probes that depend on them.
CHECKS: list[tuple[str, CheckFn, bool]] = [
    ("kernel", check_kernel, True),
    ("privileges", check_privileges, True),
    ("btf", check_btf, True),
    ("tracefs", check_tracefs, True),
    ("syscall tracepoints", check_syscall_tracepoints, True),
    ("bpffs", check_bpffs, True),
    ("kprobes", check_kprobes, False),
    ("uprobes", check_uprobes, False),
    ("ring buffer", check_ringbuf, True),
    ("traceparent injection", check_injection, False),
    ("lockdown", check_lockdown, False),
    ("bcc", check_bcc, True),
    ("kernel headers", check_headers, True),
    ("bcc compile", check_bcc_compile, True),
    ("pin directory", check_pin_dir, True),
    ("ns pid helper", check_ns_pid_helper, True),
]


def run_checks(pin_root: str = DEFAULT_PIN_ROOT, probe: Probe | None = None) -> list[Check]:
    """Run every check in ``CHECKS`` and return the results in order.

    A check that raises becomes a failed ``Check``: the doctor must report, never crash.
    """
    p = probe if probe is not None else Probe(pin_root=pin_root)
    results = []
    for name, fn, required in CHECKS:
        try:
            out = fn(p)
        except Exception as e:
            out = Outcome(False, f"check crashed: {type(e).__name__}: {e}", None)
        results.append(Check(name, out.ok, out.detail, out.fix, required))
    return results


_COLORS = {"OK": "\033[32m", "FAIL": "\033[31m", "WARN": "\033[33m"}
_RESET = "\033[0m"


def status(check: Check) -> str:
    """``OK``, ``FAIL`` (a required check failed) or ``WARN`` (an optional one did)."""
    if check.ok:
        return "OK"
    return "FAIL" if check.required else "WARN"


def render(checks: Sequence[Check], color: bool) -> str:
    """An aligned table: status, name, detail; an indented ``fix:`` line under each failure."""
    width = max((len(c.name) for c in checks), default=0)
    mark_width = max(len(m) for m in _COLORS)
    indent = " " * (mark_width + 2 + width + 2)
    lines = []
    for c in checks:
        mark = status(c)
        # Pad before colouring so escape codes do not upset the alignment.
        shown = mark.ljust(mark_width)
        if color:
            shown = f"{_COLORS[mark]}{shown}{_RESET}"
        lines.append(f"{shown}  {c.name.ljust(width)}  {c.detail}")
        if not c.ok and c.fix:
            lines.append(f"{indent}fix: {c.fix}")
    return "\n".join(lines)


def verdict(checks: Sequence[Check]) -> str:
    """One line: can the agent run, and if not, how many required checks failed."""
    failed = sum(1 for c in checks if c.required and not c.ok)
    if failed == 0:
        return "the agent can run"
    return f"the agent cannot run: {failed} required check{'s' if failed != 1 else ''} failed"


def tls_report(pid: int, *, as_json: bool = False) -> int:
    """``doctor --pid N``: which TLS libraries of process N the agent would probe, or why its
    encrypted traffic is not visible. 0 when nothing is invisible, 1 otherwise, 2 no process."""
    from kernel_side import tls

    if not os.path.exists(f"/proc/{pid}"):
        print(f"no process {pid}", file=sys.stderr)
        return 2
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        exe = "?"
    libs = tls.ssl_libraries(pid)
    reason = tls.invisible_reason(pid, libs)
    if as_json:
        print(json.dumps({"pid": pid, "exe": exe,
                          "ssl_libraries": [{"path": lib.shown, "symbols": sorted(lib.symbols)}
                                            for lib in libs],
                          "not_visible": reason}, indent=2))
    else:
        for lib in libs:
            print(f"TLS visible: pid {pid} ({exe}): OpenSSL symbols in {lib.shown} "
                  f"({', '.join(sorted(lib.symbols))})")
        if reason:
            print(tls.not_visible_message(pid, exe, reason))
        elif not libs:
            print(f"pid {pid} ({exe}): no TLS library loaded (plaintext traffic only, or a "
                  "library that loads later)")
    return 1 if reason else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``ebpf-bridge doctor``: print the table and a verdict; 0 when every required check passes."""
    parser = argparse.ArgumentParser(
        prog="ebpf-bridge doctor", description="Check that this machine can run the agent."
    )
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    parser.add_argument("--pin-root", default=DEFAULT_PIN_ROOT, help="bpffs pin directory")
    parser.add_argument("--pid", type=int, metavar="N",
                        help="instead: say whether the TLS traffic of process N can be seen")
    args = parser.parse_args(argv)
    if args.pid is not None:
        return tls_report(args.pid, as_json=args.json)
    checks = run_checks(pin_root=args.pin_root)
    if args.json:
        print(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        print(render(checks, color=color))
        print()
        print(verdict(checks))
    return 0 if all(c.ok for c in checks if c.required) else 1


if __name__ == "__main__":
    sys.exit(main())
