"""The agent: loads ``bpf/agent.bpf.c``, keeps the process selection current, reads exchanges
from the ring buffer, assembles spans and exports them until SIGINT/SIGTERM."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import gc
import grp
import logging
import os
import platform
import signal
import stat
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Container
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import FrameType
from typing import Any, Final

import bpf
from bridge import _abi
from kernel_side import assembly, btf, events, processes, ring
from kernel_side.assembly import IdSource, SpanAssembler
from kernel_side.config import AgentConfig, ConfigError
from kernel_side.events import (
    EV_CHUNK,
    EV_EXCHANGE_PACKED,
    EV_PROC,
    PROC_EVENT,
    PROC_EXEC,
    PROC_EXIT,
    PROC_FORK,
    STAT_NAMES,
    ChunkLayout,
    ExchangeLayout,
)
from kernel_side.export import make_exporter, otlp_json, otlp_wire
from kernel_side.export.batch import BatchExporter
from kernel_side.health import HealthServer, HealthState, agent_metrics
from kernel_side.inject import InjectError, Injector
from kernel_side.model import AttrValue, Resource, SpanRecord
from kernel_side.protocols import http1
from kernel_side.protocols.http2_spans import StreamSpans
from kernel_side.protocols.registry import register_all
from kernel_side.tls import TlsProbes

log = logging.getLogger("ebpf_bridge.agent")

_PAGE = 4096
# Exited processes keep their resource this long, for exchanges still in flight.
_DEAD_GRACE_S = 30.0
# kernel_side.btf.FD_WALK's fields -> the macros bpf/agent.bpf.c reads them from.
_FD_WALK_MACROS = {
    "task_struct.files": "TASK_FILES_OFF",
    "files_struct.fdt": "FILES_FDT_OFF",
    "fdtable.max_fds": "FDT_MAX_FDS_OFF",
    "fdtable.fd": "FDT_FD_OFF",
    "file.private_data": "FILE_PRIVATE_DATA_OFF",
    "socket.type": "SOCKET_TYPE_OFF",
    "socket.sk": "SOCKET_SK_OFF",
}
# Names of recently exec'd/forked processes kept for those that vanish before /proc is read.
_MAX_COMMS = 4096


class AgentError(RuntimeError):
    """The agent cannot start; the message says why and how to fix it."""


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("ebpf-bridge")
    except Exception:
        return "0"


@dataclass
class ProcessRegistry:
    """The selected processes, mirrored into the kernel's ``procs`` map."""

    selector: processes.Selector
    procs_map: Any
    agent_pid: int
    host: str = field(default_factory=processes.host_name)
    sdk_version: str = field(default_factory=_version)
    known: dict[int, processes.ProcInfo] = field(default_factory=dict)
    rejected: set[int] = field(default_factory=set)
    dead: dict[int, float] = field(default_factory=dict)
    comms: OrderedDict[int, str] = field(default_factory=OrderedDict)
    """Names from exec/fork events, for processes gone before /proc could be read."""
    procs_full: int = 0
    """Processes not traced because the kernel's ``procs`` map was full."""
    forgotten: set[int] = field(default_factory=set)
    """Pids dropped since the agent last purged their connection state (take_forgotten)."""
    tls: TlsProbes | None = None
    """Attaches the SSL uprobes of each selected process (kernel_side.tls)."""

    def wanted_alone(self, pid: int, listening: set[int]) -> bool:
        """Whether the selector names ``pid`` itself (not through a selected ancestor)."""
        if pid == self.agent_pid:
            return False
        sel = self.selector
        if sel.select_all:
            return processes.exe_path(pid) is not None
        if pid in sel.pids or pid in listening:
            return True
        return bool(sel.exes) and processes.matches_exe(pid, sel.exes)

    @staticmethod
    def descends_from(pid: int, ancestors: Container[int]) -> bool:
        """Whether one of ``pid``'s ancestors (up to 8 levels) is in ``ancestors``."""
        ancestor = pid
        for _ in range(8):
            parent = processes.parent_pid(ancestor)
            if parent is None or parent <= 1:
                return False
            if parent in ancestors:
                return True
            ancestor = parent
        return False

    def _wanted(self, pid: int, listening: set[int]) -> bool:
        if pid == self.agent_pid:
            return False
        # Children forked before the agent started (a gunicorn master's workers): the kernel
        # follows forks from now on; existing descendants of a selected process count too.
        return self.wanted_alone(pid, listening) or self.descends_from(pid, self.known)

    def add(self, pid: int, *, execed: bool = False) -> bool:
        """Select ``pid``: record its namespace and resource and tell the kernel. ``execed``:
        it just exec'd a new image."""
        ns = processes.pid_namespace(pid)
        resource = processes.build_resource(pid, self.host, self.sdk_version)
        if ns is None or resource is None:
            return False
        info = processes.ProcInfo(pid, ns[0], ns[1], resource)
        old = self.known.get(pid)
        if old is not None:
            info.listen_ports = old.listen_ports
        try:
            self.procs_map[self.procs_map.Key(pid)] = self.procs_map.Leaf(ns[0], ns[1])
        except Exception:  # BCC raises a bare Exception when the update fails (map full)
            self.procs_full += 1
            if self.procs_full == 1:
                log.warning("the traced-process map is full: pid %d and later ones are not "
                            "traced (counted in procs_full)", pid)
            return False
        self.known[pid] = info
        if old is None:
            log.info("tracing pid %d (%s)", pid, resource.attributes.get("service.name"))
        if self.tls is not None:
            self.tls.on_process(pid, execed=execed)
        return True

    def scan(self) -> None:
        """Select processes that appeared since the last scan; forget dead ones."""
        pids = processes.all_pids()
        fresh = [p for p in pids if p not in self.known and p not in self.rejected]
        listening: set[int] = set()
        if self.selector.ports and fresh:
            listening = processes.pids_listening_on(self.selector.ports, fresh)
        # Parents before children (pids mostly grow), so a pre-existing child finds its
        # selected parent already known.
        for pid in sorted(fresh):
            if self._wanted(pid, listening):
                self.add(pid)
            elif not self.selector.ports:
                # A port selector may match later, once the process listens.
                self.rejected.add(pid)
        alive = set(pids)
        self.rejected &= alive
        now = time.monotonic()
        for pid in [p for p in self.known if p not in alive and p not in self.dead]:
            self.dead[pid] = now
        for pid, since in list(self.dead.items()):
            if now - since > _DEAD_GRACE_S:
                self.forget(pid)

    def take_forgotten(self) -> set[int]:
        """Pids forgotten since the last call (their kernel connection state can go)."""
        out, self.forgotten = self.forgotten, set()
        return out

    def forget(self, pid: int) -> None:
        """Drop ``pid`` entirely."""
        self.forgotten.add(pid)
        self.dead.pop(pid, None)
        self.comms.pop(pid, None)
        self.known.pop(pid, None)
        if self.tls is not None:
            self.tls.forget(pid)
        with contextlib.suppress(KeyError):
            del self.procs_map[self.procs_map.Key(pid)]

    def on_event(self, what: int, pid: int, ppid: int, comm: str = "") -> None:
        """React to exec/fork/exit of processes."""
        if comm and what in (PROC_EXEC, PROC_FORK):
            self.comms[pid] = comm
            self.comms.move_to_end(pid)
            if len(self.comms) > _MAX_COMMS:
                self.comms.popitem(last=False)
        if what == PROC_FORK:
            # The kernel already selected the child with its parent's namespace; the child may
            # live in a new PID namespace (unshare --pid --fork), so read it again.
            if not self.add(pid):
                self.forget(pid)
        elif what == PROC_EXEC:
            if pid in self.known:
                if not self.add(pid, execed=True) and comm:
                    # Gone before /proc could be read: the exec's name is what we know.
                    self.known[pid].resource = processes.renamed(self.known[pid].resource, comm)
            elif pid not in self.rejected or self.selector.exes or self.selector.select_all:
                self.rejected.discard(pid)
                if self._wanted(pid, set()) and self.add(pid, execed=True):
                    return
                if pid not in self.known:
                    # The kernel may have selected it by its name (exec_names): undo that.
                    with contextlib.suppress(KeyError):
                        del self.procs_map[self.procs_map.Key(pid)]
        elif what == PROC_EXIT:
            if pid in self.known:
                self.dead[pid] = time.monotonic()
            if self.tls is not None:
                # Uprobes on a library no traced process uses any more go now; the resource
                # stays for the grace period, for exchanges still in flight.
                self.tls.forget(pid)
            with contextlib.suppress(KeyError):
                del self.procs_map[self.procs_map.Key(pid)]

    def resource_for(self, tgid: int) -> Resource:
        """The resource of ``tgid``; a minimal one when the process was never seen."""
        info = self.known.get(tgid)
        if info is not None:
            return info.resource
        built = processes.build_resource(tgid, self.host, self.sdk_version)
        if built is not None:
            return built
        comm = self.comms.get(tgid)
        attrs: dict[str, AttrValue] = {
            "service.name": comm or "unknown_service", "process.pid": tgid,
            "host.name": self.host, "telemetry.sdk.name": "ebpf-bridge",
        }
        if comm:
            attrs["process.executable.name"] = comm
        return Resource((tgid, 0), attrs)

    def listen_port(self, tgid: int, fd: int) -> int | None:
        """The local port of listening socket ``fd`` in ``tgid`` (cached)."""
        info = self.known.get(tgid)
        if info is None:
            return processes.listen_port_of_fd(tgid, fd)
        port = info.listen_ports.get(fd)
        if port is None:
            port = processes.listen_port_of_fd(tgid, fd)
            if port is not None:
                info.listen_ports[fd] = port
        return port


class Fanout:
    """Sends every span to each configured exporter through its own bounded batch queue.

    The event loop collects spans with ``hold`` (a bound ``list.append``: no Python frame per
    span) and hands them to the exporters with ``hand_over`` once per drain of the ring, so an
    exporter's lock is taken once per drain instead of once per span (about a tenth of the
    loop's samples under py-spy was ``submit`` and its lock)."""

    def __init__(self, batches: list[BatchExporter]) -> None:
        self._batches = batches
        self._retired: list[BatchExporter] = []
        self._pending: list[SpanRecord] = []
        self.hold: Callable[[SpanRecord], None] = self._pending.append
        """Queue a span for the next ``hand_over`` (call from the event loop's thread)."""

    def hand_over(self) -> None:
        """Give every held span to each exporter (dropped and counted there when full)."""
        pending = self._pending
        if pending:
            for b in self._batches:
                b.submit_many(pending)
            pending.clear()

    def replace(self, batches: list[BatchExporter], timeout_s: float) -> None:
        """Send new spans to ``batches`` from now on; the old exporters export what they hold
        (within ``timeout_s``) on a background thread, so the caller never waits on I/O.
        Their counters stay in ``stats``."""
        self.hand_over()
        old, self._batches = self._batches, batches
        self._retired += old
        def retire() -> None:
            for b in old:
                b.shutdown(timeout_s)

        threading.Thread(target=retire, name="ebpf-bridge-retire", daemon=True).start()

    def submit(self, span: SpanRecord) -> None:
        """Queue ``span`` on every exporter now (never blocks)."""
        self.hold(span)
        self.hand_over()

    def shutdown(self, timeout_s: float) -> None:
        """Hand over what is held, then flush and close every exporter (retired ones too:
        idempotent for them)."""
        self.hand_over()
        for b in self._batches + self._retired:
            b.shutdown(timeout_s)

    def stats(self) -> dict[str, int]:
        """Summed exporter counters, including exporters replaced by a reload."""
        out: dict[str, int] = {}
        for b in self._batches + self._retired:
            for k, v in b.stats().items():
                out[k] = out.get(k, 0) + v
        return out


_MADV_PAGEOUT = 21  # Linux 5.4+
_COMPILER_LIBS = ("libLLVM", "libclang")


def check_probe_requirements(machine: str | None = None,
                             vmlinux_btf: str | None = None) -> None:
    """Raise ``AgentError`` naming what is missing for the probes to load.

    The syscall exit programs read the syscall's arguments from the registers its entry saved
    (``bpf_task_pt_regs``, which takes the BTF-typed task of ``bpf_get_current_task_btf``), so
    the agent needs the x86_64 syscall ABI and the kernel's own BTF.
    """
    machine = machine or platform.machine()
    if machine != "x86_64":
        raise AgentError(f"this agent's probes read x86_64 syscall registers; this machine is "
                         f"{machine}: run it on an x86_64 node")
    path = vmlinux_btf or btf.VMLINUX_BTF
    if not os.path.exists(path):
        raise AgentError(f"no kernel BTF at {path}: the probes need it to read syscall "
                         "arguments at exit (bpf_task_pt_regs). Use a kernel built with "
                         "CONFIG_DEBUG_INFO_BTF=y (every major distribution's since 2021)")


def release_compiler_memory() -> int:
    """Give back what compiling the BPF program left resident; returns the bytes asked for.

    BCC compiles in-process with LLVM and clang: afterwards about 85 MB of their read-only code
    pages and tens of MB of freed heap stay resident, although the agent never compiles again.
    MADV_PAGEOUT drops the clean code pages (they fault back in from the file if ever used;
    writable mappings are left alone, their contents matter), malloc_trim returns free heap.
    Best effort: any failure leaves memory as it was.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        asked = 0
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split()
                if len(parts) < 6 or "w" in parts[1]:
                    continue
                if not any(lib in parts[5] for lib in _COMPILER_LIBS):
                    continue
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_PAGEOUT) == 0:
                    asked += hi - lo
        libc.malloc_trim(0)
        return asked
    except (OSError, AttributeError, ValueError):
        return 0


class HeapTrimmer:
    """Returns the C heap's free pages to the kernel every ``interval_s`` (glibc
    ``malloc_trim``).

    Bursts leave the heap large: the drain lists, exchanges and spans of a max-rate burst are
    freed, but glibc keeps the pages. Measured under nginx at max rate: 103 MB RSS after the
    load, 91 MB after one ``malloc_trim(0)``, which took 1.9 ms. The pages it returns fault back
    in if the heap grows again, so under steady load a trim every few seconds costs little and
    the RSS the operator sees is what the agent uses. A libc without ``malloc_trim`` (musl)
    makes this a no-op.
    """

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self.trims = 0
        self.ns = 0
        self._due = time.monotonic() + interval_s
        try:
            self._trim: Callable[[int], int] | None = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            self._trim = None

    def maybe_trim(self, now: float) -> None:
        """Trim if the interval has passed since the last one (``now``: time.monotonic())."""
        if now < self._due or self._trim is None:
            return
        t0 = time.perf_counter_ns()
        self._trim(0)
        self.ns += time.perf_counter_ns() - t0
        self.trims += 1
        self._due = now + self.interval_s


LOCK_DIR = "/run/ebpf-bridge"


def claim_pin_dir(pin_dir: str, lock_dir: str = LOCK_DIR) -> tuple[int | None, int | None]:
    """Take the advisory lock that names ``pin_dir`` for this agent: ``(fd, None)``; or
    ``(None, pid)`` when the agent ``pid`` holds it (bpffs holds maps, not lock files, hence a
    lock file elsewhere). The lock goes with the fd, so an agent that dies releases it."""
    import fcntl
    import hashlib

    os.makedirs(lock_dir, exist_ok=True)
    name = hashlib.sha256(os.path.realpath(pin_dir).encode()).hexdigest()[:16]
    fd = os.open(os.path.join(lock_dir, f"{name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = int(os.pread(fd, 32, 0).split()[0])
        except (ValueError, IndexError, OSError):
            holder = 0
        os.close(fd)
        return None, holder
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {pin_dir}\n".encode(), 0)
    return fd, None


DATA_SYSCALLS = ("read", "write", "recvfrom", "sendto", "readv", "writev", "recvmsg", "sendmsg")
"""The syscalls whose exits the one ``data_exit`` program (bpf/agent.bpf.c) handles."""

_TRACEFS = "/sys/kernel/tracing"
_EXIT_RET_FIELD = "field:long ret;\toffset:16;\tsize:8;"
# The number tells data_exit which syscall it is in: its direction and its arguments' shape.
_EXIT_NR_FIELD = "field:int __syscall_nr;\toffset:8;\tsize:4;"


def attach_data_exits(b: Any, tracefs: str = _TRACEFS) -> None:
    """Attach ``data_exit`` to every data syscall's exit tracepoint.

    BCC checks a TRACEPOINT_PROBE's record against the tracefs format; a program attached by
    hand gets no such check, so the layout it reads (``ret`` at offset 16) is checked here.
    """
    for name in DATA_SYSCALLS:
        event = f"sys_exit_{name}"
        try:
            fmt = Path(tracefs, "events/syscalls", event, "format").read_text()
        except OSError as e:
            raise AgentError(f"no tracefs format for syscalls:{event} ({e.strerror}): mount "
                             "tracefs (mount -t tracefs tracefs /sys/kernel/tracing)") from None
        if _EXIT_RET_FIELD not in fmt or _EXIT_NR_FIELD not in fmt:
            raise AgentError(f"syscalls:{event} has an unexpected record layout (the syscall "
                             "number is not an int at offset 8, or ret not a long at offset "
                             "16); this kernel is not supported")
        b.attach_tracepoint(tp=f"syscalls:{event}", fn_name=b"data_exit")


def detach_in_parallel(b: Any) -> None:
    """Detach every tracepoint and uprobe of BCC object ``b`` at once, from parallel threads.

    Closing a perf event waits for an RCU grace period (about 70 ms each on this kind of
    machine): BCC's cleanup, one after another, made every agent stop take over 2 s for its 29
    tracepoints. ctypes drops the GIL in the close, so the waits overlap. What fails here is
    left for ``b.cleanup()``, which retries it one by one.
    """
    jobs: list[Callable[[], object]] = [
        *(functools.partial(b.detach_tracepoint, tp) for tp in list(b.tracepoint_fds)),
        *(functools.partial(b.detach_uprobe_event, ev) for ev in list(b.uprobe_fds)),
    ]
    if not jobs:
        return

    def run(job: Callable[[], object]) -> None:
        with contextlib.suppress(Exception):  # BCC raises bare Exceptions
            job()

    with ThreadPoolExecutor(max_workers=min(len(jobs), 64)) as pool:
        list(pool.map(run, jobs))


def _check_environment() -> None:
    if os.geteuid() != 0:
        raise AgentError(
            "the agent must run as root (it loads eBPF programs): sudo ebpf-bridge agent"
        )
    if not os.path.isdir("/sys/kernel/tracing/events/syscalls"):
        raise AgentError(
            "tracefs is not mounted: mount -t tracefs tracefs /sys/kernel/tracing "
            "(or run scripts/install.sh); `ebpf-bridge doctor` checks everything"
        )
    with open("/proc/mounts") as f:
        if not any(line.split()[1:3] == ["/sys/fs/bpf", "bpf"] for line in f):
            raise AgentError("bpffs is not mounted: mount -t bpf bpf /sys/fs/bpf")


_CAP_SYS_ADMIN = 21


def _has_effective_cap(bit: int, status: str = "/proc/self/status") -> bool:
    """Whether this process holds capability ``bit`` (CapEff; uid 0 alone says nothing in a
    container)."""
    with open(status) as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    return False


class GcClock:
    """Time the interpreter spends in cyclic garbage collection, from ``gc.callbacks``: part of
    the agent's CPU that no profile of its own code shows."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.ns = 0
        self._t0 = 0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter_ns()
        else:
            self.ns += time.perf_counter_ns() - self._t0
            self.collections[info["generation"]] += 1

    def install(self) -> None:
        """Start timing (idempotent)."""
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def remove(self) -> None:
        """Stop timing."""
        if self in gc.callbacks:
            gc.callbacks.remove(self)


def describe_accelerators() -> str:
    """Which of the agent's optional C parts are in use (``pip install`` builds them when a C
    compiler and the Python headers are present; ``EBPF_BRIDGE_NO_ACCEL=1`` turns them off)."""
    parts = {"HTTP/1 parser": http1.ACCELERATED, "OTLP protobuf encoder": otlp_wire.ACCELERATED,
             "OTLP/JSON writer": otlp_json.ACCELERATED, "ring-buffer reader": ring.BATCHED,
             "span ids and HTTP/1 attributes": assembly.ACCELERATED,
             "event decoder": events.ACCELERATED}
    on = [name for name, used in parts.items() if used]
    off = [name for name, used in parts.items() if not used]
    text = "C: " + (", ".join(on) if on else "none")
    if off:
        text += "; pure Python: " + ", ".join(off)
    return text


def _load_bcc() -> Any:
    try:
        import bcc
    except ImportError:
        raise AgentError(
            "BCC is not importable: apt-get install python3-bpfcc and run the agent from a venv "
            "made with --system-site-packages (BCC is not on PyPI; PyPI's 'bcc' is unrelated)"
        ) from None
    return bcc


BPF_NOEXIST = 1

def possible_cpus(path: str = "/sys/devices/system/cpu/possible") -> int:
    """How many CPUs the kernel may ever run (a CPU list such as ``0-3,8-11`` in ``path``);
    ``os.cpu_count()`` when it cannot be read."""
    try:
        text = Path(path).read_text().strip()
        return sum(int(b) - int(a) + 1 for a, _, b in
                   (part.partition("-") if "-" in part else (part, "", part)
                    for part in text.split(",")))
    except (OSError, ValueError):
        return os.cpu_count() or 1


DRAIN_INTERVAL_MAX_S: Final = 0.2
"""The longest the event loop sleeps between ring-buffer drains. The kernel wakes it only
after an eighth of the ring (WAKEUP_BYTES in bpf/agent.bpf.c), so below that rate this timer
drains the ring; it runs every ``idle_flush_ms`` (default 100 ms), at most this long and at
least 10 ms. Each wake-up starts cold, so fewer and larger batches cost less per span (see
the README's performance notes for the figures)."""


def drain_interval_s(idle_flush_ms: int) -> float:
    """The event loop's drain timer for an ``idle_flush_ms`` setting: an exchange whose
    response went quiet is emitted within two of these."""
    return min(max(idle_flush_ms / 1000, 0.01), DRAIN_INTERVAL_MAX_S)


def take_if_unchanged(table: Any, key: Any, seen: Any) -> None:
    """Delete ``table[key]`` if it still holds ``seen``, so a value the kernel wrote after it
    was read is never thrown away.

    BPF_MAP_LOOKUP_AND_DELETE_ELEM (hash maps, Linux 5.14+) takes the entry atomically; a value
    that turns out newer than ``seen`` is put back, unless the kernel has written yet another
    by then (BPF_NOEXIST). Where the kernel lacks the command, a plain delete.
    """
    from bcc.libbcc import lib

    got = table.Leaf()
    fd = table.map_fd
    if lib.bpf_map_lookup_and_delete_elem(fd, ctypes.byref(key), ctypes.byref(got)) != 0:
        if ctypes.get_errno() not in (errno.ENOENT, 0):
            with contextlib.suppress(KeyError):
                del table[key]
        return
    if bytes(got) != bytes(seen):
        lib.bpf_update_elem(fd, ctypes.byref(key), ctypes.byref(got), BPF_NOEXIST)


class Agent:
    """One agent run. ``run()`` blocks until stopped and returns the exit code."""

    def __init__(self, cfg: AgentConfig, *, out: Any = None,
                 reload: Callable[[], AgentConfig] | None = None) -> None:
        self.cfg = cfg
        # Re-reads the config file and re-applies the command line (SIGHUP); None without one.
        self._reload = reload
        self._out = out or sys.stdout
        self._stop = False
        self._hup = False
        self._bpf: Any = None
        self._layout: ExchangeLayout | None = None
        self._chunk_layout: ChunkLayout | None = None
        self.streams: StreamSpans | None = None
        self.registry: ProcessRegistry | None = None
        self.tls: TlsProbes | None = None
        self.injector: Injector | None = None
        self._pin_lock: int | None = None
        self.assembler: SpanAssembler | None = None
        self.callback_errors = 0
        self.gc_clock = GcClock()
        self.idle_flushed = 0
        self.ids = IdSource()
        # Exchange ids the idle flush emitted while the kernel still holds the exchange: the
        # kernel emits it again at the connection's next request or close, and that copy is
        # dropped (see _flush_idle). Insertion-ordered and capped at the size of `conns`.
        self._flushed: dict[int, int] = {}
        self._ring: ring.RingReader | None = None
        self.idle_flush_repeats = 0
        """Kernel emissions of exchanges the idle flush had already emitted (dropped)."""
        self.trimmer = HeapTrimmer()
        # Entries user space removed from `conns` / `socks` (dead processes): the
        # eviction arithmetic in table_stats subtracts them.
        self.conns_deleted_user = 0
        self.socks_deleted_user = 0
        self.start_to_ready_s = 0.0
        self.compile_s = 0.0
        """Of the start: BCC's compile and load of bpf/agent.bpf.c (clang and LLVM in process)."""
        self.health_state = HealthState()
        self.health: HealthServer | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def stop(self, *_: object) -> None:
        """Ask the loop to finish (signal-safe)."""
        self._stop = True

    def hup(self, *_: object) -> None:
        """SIGHUP (signal-safe): noted here; the loop reloads the config (``_apply_reload``)."""
        self._hup = True

    def _apply_reload(self) -> None:
        """Re-read the config and apply what can change while running: process selection,
        exporters and the stats interval. Nothing in flight is lost: the assembler and the
        kernel state stay, old exporters export what they hold. Settings baked into the loaded
        BPF program are reported as needing a restart."""
        if self._reload is None:
            log.warning("SIGHUP: the agent was started without --config; nothing to reload")
            return
        try:
            new = self._reload()
        except ConfigError as e:
            log.error("SIGHUP: config not reloaded, still running the previous one: %s", e)
            return
        old = self.cfg
        assert self.registry is not None and self.fanout is not None
        applied: list[str] = []
        if new.selector != old.selector:
            self.cfg = replace(self.cfg, selector=new.selector)
            self._reselect(new.selector)
            applied.append(f"selection (now tracing {len(self.registry.known)} processes)")
        export_fields = ("exporters", "otlp_endpoint", "otlp_protocol", "jsonl_path",
                         "export_queue")
        if any(getattr(new, f) != getattr(old, f) for f in export_fields):
            self.cfg = replace(self.cfg, **{f: getattr(new, f) for f in export_fields})
            self.fanout.replace(self._make_batches(), 10.0)
            applied.append("exporters (" + ", ".join(self._describe_exporters()) + ")")
        if new.stats_interval_s != old.stats_interval_s:
            self.cfg = replace(self.cfg, stats_interval_s=new.stats_interval_s)
            applied.append(f"stats_interval_s={new.stats_interval_s:g}")
        handled = {"selector", "stats_interval_s", *export_fields}
        ignored = [f.name for f in fields(AgentConfig)
                   if f.name not in handled and getattr(new, f.name) != getattr(old, f.name)]
        log.info("SIGHUP: reloaded; applied: %s", ", ".join(applied) or "nothing changed")
        if ignored:
            log.warning("SIGHUP: %s changed but apply only at start: restart the agent",
                        ", ".join(ignored))

    def _reselect(self, selector: processes.Selector) -> None:
        """Trace what ``selector`` selects from now on; stop tracing what it no longer does."""
        assert self.registry is not None
        reg = self.registry
        reg.selector = selector
        table = self._bpf["exec_names"]
        table.clear()
        self._select_exec_names(self._bpf)
        listening: set[int] = set()
        if selector.ports:
            listening = processes.pids_listening_on(selector.ports, list(reg.known))
        # A process kept only because its parent was selected goes with the parent.
        keep = {pid for pid in reg.known if reg.wanted_alone(pid, listening)}
        for pid in list(reg.known):
            if pid not in keep and not reg.descends_from(pid, keep):
                reg.forget(pid)
        reg.rejected.clear()
        reg.scan()

    def _start_health(self) -> None:
        """Serve /healthz, /readyz and /metrics when --health-port is set (see health.py)."""
        if self.cfg.health_port is None:
            return
        try:
            self.health = HealthServer(self.cfg.health_address, self.cfg.health_port,
                                       self.health_state, lambda: agent_metrics(self))
        except OSError as e:
            raise AgentError(f"{e.strerror}: pass a free --health-port") from None
        log.info("health endpoint on http://%s:%d (/healthz /readyz /metrics)",
                 self.cfg.health_address, self.health.port)

    def _replace_pins_without_sys_admin(self, shared: bool) -> None:
        """BCC reopens a map that is already pinned with BPF_MAP_GET_FD_BY_ID, which the kernel
        allows only with CAP_SYS_ADMIN. Without it (the capability DaemonSet), the pins an
        earlier run left are removed so BCC creates and pins fresh maps: applications reopen
        them within a second (the SDK watches the pin's identity), and only context set before
        the restart is lost. With CAP_SYS_ADMIN the maps are reused and keep that context."""
        pins = [os.path.join(self.cfg.pin_dir, name) for name in (
            _abi.CTX_BY_TID_NAME, _abi.CTX_BY_CONN_NAME, _abi.CTX_CELLS_NAME,
            _abi.SERVER_BY_TID_NAME, _abi.ID_SALT_NAME)]
        left = [pin for pin in pins if os.path.exists(pin)]
        if not left or _has_effective_cap(_CAP_SYS_ADMIN):
            return
        if shared:
            raise AgentError(
                f"another agent uses the maps pinned in {self.cfg.pin_dir}, and without "
                "CAP_SYS_ADMIN this one cannot open them (BCC reopens pinned maps with "
                "BPF_MAP_GET_FD_BY_ID): give this agent its own pin_dir, or CAP_SYS_ADMIN"
            )
        log.warning(
            "replacing the maps an earlier agent pinned in %s (without CAP_SYS_ADMIN BCC "
            "cannot reopen them): applications switch to the new ones within a second; "
            "context they set before this start is dropped", self.cfg.pin_dir)
        for pin in left:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(pin)

    def _compile(self, shared_pins: bool = False) -> Any:
        check_probe_requirements()
        bcc = _load_bcc()
        cfg = self.cfg
        pin = os.path.join(cfg.pin_dir, _abi.CTX_BY_TID_NAME)
        os.makedirs(cfg.pin_dir, exist_ok=True)
        self._replace_pins_without_sys_admin(shared_pins)
        pages = cfg.ringbuf_mb * 1024 * 1024 // _PAGE
        cflags = [
            f"-I{bpf.SOURCE_DIR}",
            f"-DREQ_CAP={cfg.req_capture}",
            f"-DRESP_CAP={cfg.resp_capture}",
            f"-DCONN_MAX={cfg.max_connections}",
            f"-DSOCK_MAX={cfg.max_connections * 4}",
            f"-DTHREAD_MAX={cfg.max_threads}",
            f"-DRINGBUF_PAGES={pages}",
            # Possible CPUs, not online ones: every one of them may produce into the ring.
            f"-DNCPUS={possible_cpus()}",
            f'-DPIN_CTX_BY_TID="{pin}"',
            f'-DPIN_CTX_BY_CONN="{os.path.join(cfg.pin_dir, _abi.CTX_BY_CONN_NAME)}"',
            f'-DPIN_CTX_CELLS="{os.path.join(cfg.pin_dir, _abi.CTX_CELLS_NAME)}"',
            f'-DPIN_SERVER_BY_TID="{os.path.join(cfg.pin_dir, _abi.SERVER_BY_TID_NAME)}"',
            f'-DPIN_ID_SALT="{os.path.join(cfg.pin_dir, _abi.ID_SALT_NAME)}"',
            "-Wno-macro-redefined",
        ]
        if cfg.inject_traceparent:
            cflags.append("-DINJECT_TRACEPARENT")
        v6 = btf.sock_v6_offsets()
        if v6 is not None:
            cflags += [f"-DSKC_V6_DADDR_OFF={v6[0]}", f"-DSKC_V6_RCV_SADDR_OFF={v6[1]}"]
        else:
            log.info("no kernel BTF for struct sock_common (%s): same-node stitching learns "
                     "IPv4 socket addresses only", btf.VMLINUX_BTF)
        no_walk = bool(os.environ.get("EBPF_BRIDGE_NO_FD_WALK"))
        walk = None if no_walk else btf.member_offsets(btf.FD_WALK)
        if walk is not None:
            cflags += [f"-D{_FD_WALK_MACROS[name]}={off}" for name, off in walk.items()]
        elif no_walk:
            log.info("EBPF_BRIDGE_NO_FD_WALK is set: socket addresses are learned at each "
                     "connection's first send or receive (the fallback for kernels whose BTF "
                     "lacks the fd-table fields)")
        else:
            log.info("kernel BTF (%s) does not name the fd-table fields: socket addresses are "
                     "learned at each connection's first send or receive instead (two more "
                     "tracepoints on every socket send and receive)", btf.VMLINUX_BTF)
        src = (bpf.SOURCE_DIR / "agent.bpf.c").read_text()
        if cfg.inject_traceparent:
            # Appended, not #included: BCC makes programs only of the main file's functions.
            src += "\n" + (bpf.SOURCE_DIR / "inject.bpf.c").read_text()
        t0 = time.monotonic()
        try:
            b = bcc.BPF(text=src, cflags=cflags)
        except Exception as e:
            raise AgentError(
                f"loading the eBPF program failed: {e}. Run `ebpf-bridge doctor` to see which "
                "requirement is missing (kernel headers, tracefs, permissions)."
            ) from None
        self.compile_s = time.monotonic() - t0
        try:
            attach_data_exits(b)
        except Exception as e:
            b.cleanup()
            raise AgentError(f"attaching the syscall exit tracepoints failed: {e}") from None
        self._secure_pin(pin)
        self._secure_pin(os.path.join(cfg.pin_dir, _abi.CTX_BY_CONN_NAME))
        # Mapping the cells takes a read-write fd, which would let a member of the app group
        # read every thread's context: only root (and the agent) map them, whatever the group.
        os.chmod(os.path.join(cfg.pin_dir, _abi.CTX_CELLS_NAME), stat.S_IRUSR | stat.S_IWUSR)
        # Span ids are not secrets: the app group may read which exchange a thread serves.
        self._secure_pin(os.path.join(cfg.pin_dir, _abi.SERVER_BY_TID_NAME),
                         group_mode=stat.S_IRGRP)
        self._secure_pin(os.path.join(cfg.pin_dir, _abi.ID_SALT_NAME), group_mode=stat.S_IRGRP)
        # A fresh salt for this run, published for bridge.current_span_context().
        salt = b["id_salt"]
        leaf = salt.Leaf()
        ctypes.memmove(ctypes.addressof(leaf), self.ids.salt, _abi.ID_SALT_SIZE)
        salt[salt.Key(0)] = leaf
        return b

    def _secure_pin(self, pin: str, group_mode: int = stat.S_IWGRP) -> None:
        # Apps open the context maps write-only; only root (the agent) may read them.
        if self.cfg.app_group:
            try:
                gid = grp.getgrnam(self.cfg.app_group).gr_gid
            except KeyError:
                raise AgentError(
                    f"--app-group {self.cfg.app_group!r} is not a group on this host: "
                    "create it (groupadd) or pass an existing group"
                ) from None
            os.chown(pin, 0, gid)
            os.chmod(pin, stat.S_IRUSR | stat.S_IWUSR | group_mode)
        else:
            os.chmod(pin, stat.S_IRUSR | stat.S_IWUSR)

    def _make_batches(self) -> list[BatchExporter]:
        cfg = self.cfg
        batches = []
        for kind in cfg.resolved_exporters():
            exp = make_exporter(kind, endpoint=cfg.otlp_endpoint, protocol=cfg.otlp_protocol,
                                jsonl_path=cfg.jsonl_path, stream=self._out)
            batches.append(BatchExporter(exp, max_queue=cfg.export_queue))
        return batches

    def _make_fanout(self) -> Fanout:
        return Fanout(self._make_batches())

    def run(self) -> int:
        """Start, trace until stopped, flush, and return the exit code."""
        t0 = time.monotonic()
        _check_environment()
        try:
            self._pin_lock, holder = claim_pin_dir(self.cfg.pin_dir)
        except OSError as e:
            self._pin_lock, holder = None, None
            log.debug("pin directory lock not taken: %s", e)
        if holder is not None:
            log.warning(
                "another agent (pid %s) uses the pin directory %s: apps share one context map "
                "between you, and each agent publishes its own id salt there, so "
                "bridge.current_span_context() will name spans of only one of you. Give each "
                "agent its own pin_dir (config) and its apps the same EBPF_BRIDGE_PIN_DIR",
                holder or "?", self.cfg.pin_dir)
        self._start_health()
        self.fanout = self._make_fanout()
        b = self._bpf = self._compile(shared_pins=holder is not None)
        self._layout = ExchangeLayout.from_ctypes(b["conns"].Leaf)
        self._chunk_layout = ChunkLayout(b["chunk_scratch"].sLeaf)
        self.registry = ProcessRegistry(self.cfg.selector, b["procs"], os.getpid())
        self.tls = self.registry.tls = TlsProbes(b)
        if self.cfg.selector.exes or self.cfg.selector.select_all:
            self.tls.preattach_system()
        self._select_exec_names(b)
        self.assembler = SpanAssembler(
            self.registry, self.fanout.hold, route_heuristic=self.cfg.route_heuristic,
            parent_wait_s=self.cfg.parent_wait_s, stitch_wait_s=self.cfg.stitch_wait_s,
            ids=self.ids, peers=processes.PeerServers(),
        )
        register_all(self.assembler, raw_query_text=self.cfg.raw_query_text)
        self.streams = StreamSpans(self.assembler, max_connections=self.cfg.max_connections,
                                   route_heuristic=self.cfg.route_heuristic)
        self.assembler.set_stream_handler(self.streams)
        self._ring = ring.RingReader(b, "events", self._handle_record)
        if self.cfg.inject_traceparent:
            try:
                self.injector = Injector.attach(b, self.ids.salt)
            except InjectError as e:
                b.cleanup()
                raise AgentError(str(e)) from None
        self.registry.scan()
        release_compiler_memory()
        self.start_to_ready_s = time.monotonic() - t0
        log.info("attached %d tracepoints and %d uprobes in %.2f s (compile %.2f s); tracing %d "
                 "processes; exporting to %s", b.num_open_tracepoints(), b.num_open_uprobes(),
                 self.start_to_ready_s, self.compile_s, len(self.registry.known),
                 ", ".join(self._describe_exporters()))
        if self.cfg.ready_file:
            Path(self.cfg.ready_file).write_text(f"{os.getpid()}\n")
        self.health_state.mark_ready()
        log.info("compiled hot paths: %s", describe_accelerators())
        self.gc_clock.install()
        old = {s: signal.signal(s, self.stop) for s in (signal.SIGINT, signal.SIGTERM)}
        old[signal.SIGHUP] = signal.signal(signal.SIGHUP, self.hup)
        try:
            self._loop()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self._shutdown()
            self.gc_clock.remove()
        return 0

    def _select_exec_names(self, b: Any) -> None:
        """Let the kernel select, at exec, processes named by a wildcard-free ``--exe``."""
        ns = processes.pid_namespace(os.getpid())
        if ns is None:
            return
        # The agent's own pid namespace: also where the kernel forgets the context of exiting
        # threads of processes it does not trace (see forget_thread_ctx).
        dflt = b["default_ns"]
        dflt[dflt.Key(0)] = dflt.Leaf(ns[0], ns[1])
        names = {os.path.basename(e).encode()[:15] for e in self.cfg.selector.exes
                 if e and not any(c in e for c in "*?[")}
        table = b["exec_names"]
        for name in names:
            table[table.Key(name)] = table.Leaf(1)

    def _describe_exporters(self) -> list[str]:
        out = []
        for kind in self.cfg.resolved_exporters():
            if kind == "otlp":
                out.append(f"otlp {self.cfg.otlp_protocol} {self.cfg.otlp_endpoint}")
            elif kind == "jsonl":
                out.append(f"jsonl {os.path.abspath(self.cfg.jsonl_path)}")
            else:
                out.append(kind)
        return out

    def _loop(self) -> None:
        assert self.registry is not None and self.assembler is not None
        cfg = self.cfg
        idle_ns = cfg.idle_flush_ms * 1_000_000
        reader = self._ring
        assert reader is not None
        tick_s = drain_interval_s(cfg.idle_flush_ms)
        fanout = self.fanout
        assert fanout is not None
        next_scan = next_stats = time.monotonic()
        next_stats += cfg.stats_interval_s
        while not self._stop:
            if self._hup:
                self._hup = False
                self._apply_reload()
            reader.poll(int(tick_s * 1000))
            # Most events are submitted without a wakeup (see wakeup_flag in the C source), so
            # a poll that timed out has consumed nothing: drain explicitly.
            reader.consume()
            now = time.monotonic()
            self.health_state.beat(now)
            self._release_held(idle_ns)
            fanout.hand_over()
            if now >= next_scan:
                self.registry.scan()
                forgotten = self.registry.take_forgotten()
                if forgotten:
                    self._purge_processes(forgotten)
                if self.tls is not None:
                    self.tls.rescan(self.registry.known)
                next_scan = now + cfg.rescan_interval_s
            self.trimmer.maybe_trim(now)
            if cfg.stats_interval_s > 0 and now >= next_stats:
                log.info("stats %s", self.format_stats())
                next_stats = now + cfg.stats_interval_s

    def _shutdown(self) -> None:
        b = self._bpf
        self.health_state.ready = False
        try:
            if b is not None and self._ring is not None:
                self._ring.consume()
                self._flush_idle(0)
                self._ring.consume()
            if self.assembler is not None:
                if self.streams is not None:
                    self.streams.flush(time.monotonic_ns())
                self.assembler.flush()
        finally:
            if self.fanout is not None:
                self.fanout.shutdown(10.0)
            # After the exporters shut down, so spans dropped at shutdown are in the line.
            log.info("final stats %s", self.format_stats())
            if self.cfg.ready_file:
                Path(self.cfg.ready_file).unlink(missing_ok=True)
            if self.health is not None:  # before cleanup: /metrics reads the BPF maps
                self.health.stop()
            if self.injector is not None:
                self.injector.close()
            if self._ring is not None:
                self._ring.close()
            if b is not None:
                detach_in_parallel(b)
                b.cleanup()
            if self._pin_lock is not None:
                os.close(self._pin_lock)
                self._pin_lock = None

    # -- events -------------------------------------------------------------------------------

    def _handle_record(self, raw: bytes) -> None:
        """Handle one ring-buffer record; never raises (a bad record is counted and logged)."""
        try:
            kind = int.from_bytes(raw[:4], "little")
            if kind == EV_EXCHANGE_PACKED:
                assert self._layout is not None and self.assembler is not None
                ex = self._layout.decode_packed(raw)
                if self._flushed and self._flushed.pop(ex.exchange_id, 0):
                    self.idle_flush_repeats += 1
                else:
                    self.assembler.on_exchange(ex)
                if ex.closed:
                    self.assembler.forget_conn(ex)
            elif kind == EV_CHUNK:
                assert self._chunk_layout is not None and self.assembler is not None
                self.assembler.on_chunk(self._chunk_layout.decode(raw))
            elif kind == EV_PROC:
                assert self.registry is not None
                _t, what, pid, ppid, comm = PROC_EVENT.unpack_from(raw)
                self.registry.on_event(what, pid, ppid, comm.split(b"\0", 1)[0].decode(
                    "utf-8", "replace"))
        except Exception:
            # Never let one event take the agent down; count and carry on.
            self.callback_errors += 1
            log.exception("event handling failed")

    def _release_held(self, idle_ns: int) -> None:
        """Emit idle exchanges and release spans whose wait ran out. Like event handling, a
        bug here is counted and logged, never allowed to stop the agent."""
        assert self.assembler is not None
        try:
            self._flush_idle(idle_ns)
            self.assembler.tick()
        except Exception:
            self.callback_errors += 1
            log.exception("releasing held spans failed")

    _idle_walk_due_ns = 0
    """When ``_flush_idle`` next walks the maps (see there)."""

    def _flush_idle(self, idle_ns: int) -> None:
        """Emit exchanges whose response went quiet: the kernel only sees an exchange end at the
        next request or a close, which may never come on an idle keep-alive connection.

        User space never deletes the exchange from ``conns``: a delete cannot be made
        conditional, so one that raced the connection's next request (the kernel emitting this
        exchange and starting the next one in the same entry) emitted this exchange twice and
        threw the new one away. CI caught that race as a duplicate span id under load. The
        exchange now stays; the kernel emits it again when the connection moves on, and
        ``_on_event`` drops that copy by its exchange id.
        """
        now = time.monotonic_ns()
        if idle_ns:
            # Under load the loop wakes on every ring-buffer wakeup, many times per tick (about
            # 1,000 walks in 8 s at 5,000 req/s): walk the maps at most once per loop tick,
            # min(50 ms, idle / 2), so a quiet exchange still goes out within idle + one tick.
            if now < self._idle_walk_due_ns:
                return
            self._idle_walk_due_ns = now + min(50_000_000, idle_ns // 2)
        b = self._bpf
        assert self._layout is not None and self.assembler is not None
        inflight = b["inflight"]
        conns = b["conns"]
        flushed = self._flushed
        for key, started in list(inflight.items()):
            # ``inflight`` holds when the exchange's response started; it ended later, so a
            # response that started within the idle window is not idle: no ``conns`` read.
            if now - started.value < idle_ns:
                continue
            try:
                leaf = conns[key]
            except KeyError:
                take_if_unchanged(inflight, key, started)
                continue
            if now - leaf.resp_end_ns < idle_ns or leaf.resp_end_ns == 0:
                continue
            # Off the walk from now on, unless the kernel started another response since the
            # read (its fresh entry stays).
            take_if_unchanged(inflight, key, started)
            eid = leaf.exchange_id
            if eid in flushed:
                continue
            flushed[eid] = 1
            if len(flushed) > self.cfg.max_connections:
                # Each entry names an exchange still in `conns`, which holds no more than this:
                # past it, the oldest ones were evicted from `conns` and never come back.
                del flushed[next(iter(flushed))]
            self.idle_flushed += 1
            self.assembler.on_exchange(self._layout.decode(bytes(leaf)))

    @staticmethod
    def _delete(table: Any, key: Any) -> bool:
        try:
            del table[key]
        except KeyError:
            return False
        return True

    def _purge_processes(self, pids: set[int]) -> None:
        """Remove the connection state of processes that are gone.

        A process's sockets close at exit without a close() syscall, so the kernel never
        deletes their entries; left alone they would sit in the LRU maps until evicted (read as
        losses) or, worse, be found again by a new process that reuses the pid. Runs after the
        dead-process grace, when the idle flush has long emitted what they had finished.
        """
        b = self._bpf
        for name in ("conns", "inflight", "socks"):
            table = b[name]
            for key in [k for k in table if k.tgid in pids]:
                if self._delete(table, key):
                    if name == "conns":
                        self.conns_deleted_user += 1
                    elif name == "socks":
                        self.socks_deleted_user += 1

    # -- stats --------------------------------------------------------------------------------

    def kernel_stats(self) -> dict[str, int]:
        """The kernel's counters, summed over CPUs."""
        if self._bpf is None:
            return {}
        table = self._bpf["stats"]
        return {name: int(table.sum(table.Key(i)).value) for i, name in enumerate(STAT_NAMES)}

    def table_stats(self, kernel: dict[str, int] | None = None) -> dict[str, int]:
        """Live entries and LRU evictions of the connection maps.

        An LRU map evicts without telling anyone, so evictions are derived: entries created,
        minus those the kernel or user space deleted, minus those still there. ``socks_evicted``
        are connections whose later traffic went unseen; ``conns_evicted`` are exchanges in
        progress that were dropped without a span. Read under traffic the figure can be off by
        the few entries created or deleted while it is computed; it is exact when quiet.
        """
        if self._bpf is None:
            return {}
        k = kernel if kernel is not None else self.kernel_stats()
        conns_live = sum(1 for _ in self._bpf["conns"])
        socks_live = sum(1 for _ in self._bpf["socks"])
        conns_gone = k["connections"] - k["conns_deleted"] - self.conns_deleted_user
        socks_gone = k["socks_created"] - k["socks_deleted"] - self.socks_deleted_user
        return {
            "conns_live": conns_live,
            "conns_evicted": max(0, conns_gone - conns_live),
            "socks_live": socks_live,
            "socks_evicted": max(0, socks_gone - socks_live),
        }

    def format_stats(self) -> str:
        """One line with every counter a user needs to know what was seen and what was lost."""
        kernel = self.kernel_stats()
        parts = [f"{k}={v}" for k, v in kernel.items()]
        parts += [f"{k}={v}" for k, v in self.table_stats(kernel).items()]
        if self.assembler is not None:
            s = self.assembler.stats
            parts += [f"spans={s.spans}", f"unknown_protocol={s.unknown_protocol}",
                      f"parse_errors={s.parse_errors}", f"waiting_parent={self.assembler.waiting}",
                      f"parent_timeouts={s.parent_timeouts}", f"stitched={s.stitched}",
                      f"stitch_waited={s.stitch_waited}", f"stitch_timeouts={s.stitch_timeouts}",
                      f"stitch_wait_us_total={s.stitch_wait_us_total}",
                      f"stitch_wait_us_max={s.stitch_wait_us_max}"]
            parts.append(f"pending_overflow={s.pending_overflow}")
            parts.append(f"conn_states={self.assembler.conn_states}")
            parts += [f"sdk_covered={s.sdk_covered}", f"sdk_parented={s.sdk_parented}"]
        if self.streams is not None:
            parts.append(f"h2_conns_evicted={self.streams.evicted}")
        if self.registry is not None:
            parts.append(f"procs_full={self.registry.procs_full}")
        if self.tls is not None:
            parts += [f"tls_uprobes={self.tls.open_uprobes}",
                      f"tls_attach_errors={self.tls.attach_errors}",
                      f"tls_detach_errors={self.tls.detach_errors}"]
        if self.injector is not None:
            parts += [f"inject_{k}={v}" for k, v in self.injector.stats().items()]
        parts += [f"gc_collections={'/'.join(map(str, self.gc_clock.collections))}",
                  f"gc_ms={self.gc_clock.ns // 1_000_000}",
                  f"heap_trims={self.trimmer.trims}",
                  f"heap_trim_ms={self.trimmer.ns // 1_000_000}"]
        parts += [f"idle_flushed={self.idle_flushed}",
                  f"idle_flush_repeats={self.idle_flush_repeats}",
                  f"callback_errors={self.callback_errors}"]
        if self.fanout is not None:
            parts += [f"export_{k}={v}" for k, v in self.fanout.stats().items()]
        return " ".join(parts)


def install_signal_handlers(handler: Callable[[int, FrameType | None], object]) -> None:
    """Route SIGINT/SIGTERM to ``handler``."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, handler)
