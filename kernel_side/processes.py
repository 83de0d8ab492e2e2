"""Process discovery and selection from /proc, and the OpenTelemetry resource of each process.

The kernel program only traces processes listed in its ``procs`` map; this module decides which
ones go there (``--pid``, ``--exe``, ``--port``, or everything but the agent) and keeps the
per-process facts span assembly needs: resource attributes and listening ports.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from kernel_side import semconv
from kernel_side.model import AttrValue, Resource

log = logging.getLogger(__name__)

_PROC = Path("/proc")
_TCP_LISTEN = "0A"


@dataclass(frozen=True)
class Selector:
    """Which processes to trace. Empty selector = every process but the agent itself."""

    pids: tuple[int, ...] = ()
    exes: tuple[str, ...] = ()
    ports: tuple[tuple[int, int], ...] = ()

    @property
    def select_all(self) -> bool:
        """True when no criterion was given."""
        return not (self.pids or self.exes or self.ports)


@dataclass
class ProcInfo:
    """What the agent knows of one selected process."""

    pid: int
    ns_dev: int
    ns_ino: int
    resource: Resource
    listen_ports: dict[int, int] = field(default_factory=dict)
    """fd of a listening socket -> its local port; filled on demand."""


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def parse_environ(raw: bytes) -> dict[str, str]:
    """Parse a NUL-separated ``/proc/<pid>/environ`` block."""
    env: dict[str, str] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    return env


def parse_resource_attributes(value: str) -> dict[str, str]:
    """Parse ``OTEL_RESOURCE_ATTRIBUTES`` (``k=v,k2=v2``, values percent-decoded)."""
    from urllib.parse import unquote

    out: dict[str, str] = {}
    for part in value.split(","):
        key, sep, val = part.partition("=")
        key = key.strip()
        if sep and key:
            out[key] = unquote(val.strip())
    return out


def _start_time(pid: int) -> int:
    raw = _read(_PROC / str(pid) / "stat")
    if not raw:
        return 0
    # comm may contain spaces and parentheses: the fields we want follow the last ')'.
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return 0


def parent_pid(pid: int) -> int | None:
    """The parent of ``pid`` (None when it is gone)."""
    raw = _read(_PROC / str(pid) / "stat")
    if not raw:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return int(fields[1])
    except (IndexError, ValueError):
        return None


def exe_path(pid: int) -> str | None:
    """The executable of ``pid``, or None for kernel threads and vanished processes."""
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def build_resource(pid: int, host_name: str, sdk_version: str) -> Resource | None:
    """The resource for ``pid`` from its environment and executable; None if it is gone."""
    exe = exe_path(pid)
    if exe is None:
        return None
    exe_name = os.path.basename(exe.removesuffix(" (deleted)"))
    env = parse_environ(_read(_PROC / str(pid) / "environ") or b"")
    attrs: dict[str, AttrValue] = {}
    attrs.update(parse_resource_attributes(env.get("OTEL_RESOURCE_ATTRIBUTES", "")))
    service = env.get("OTEL_SERVICE_NAME") or str(attrs.get(semconv.SERVICE_NAME) or exe_name)
    attrs[semconv.SERVICE_NAME] = service
    attrs[semconv.PROCESS_PID] = pid
    attrs[semconv.PROCESS_EXECUTABLE_NAME] = exe_name
    attrs[semconv.HOST_NAME] = host_name
    attrs[semconv.TELEMETRY_SDK_NAME] = "ebpf-bridge"
    attrs[semconv.TELEMETRY_SDK_VERSION] = sdk_version
    return Resource(key=(pid, _start_time(pid)), attributes=attrs)


def renamed(resource: Resource, exe_name: str) -> Resource:
    """``resource`` after its process exec'd ``exe_name``; a service name that came from the
    executable follows it, one set by configuration stays."""
    attrs = dict(resource.attributes)
    if attrs.get(semconv.SERVICE_NAME) == attrs.get(semconv.PROCESS_EXECUTABLE_NAME):
        attrs[semconv.SERVICE_NAME] = exe_name
    attrs[semconv.PROCESS_EXECUTABLE_NAME] = exe_name
    return Resource(resource.key, attrs)


def pid_namespace(pid: int) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the PID namespace ``pid`` lives in, as bpf_get_ns_current_pid_tgid
    wants them."""
    try:
        st = os.stat(f"/proc/{pid}/ns/pid")
    except OSError:
        return None
    return st.st_dev, st.st_ino


def all_pids() -> list[int]:
    """Every process id currently in /proc."""
    return [int(name) for name in os.listdir(_PROC) if name.isdigit()]


def _socket_inodes(pid: int) -> dict[int, int]:
    """socket inode -> fd for the sockets ``pid`` holds."""
    out: dict[int, int] = {}
    base = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(base)
    except OSError:
        return out
    for fd in fds:
        try:
            target = os.readlink(f"{base}/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out[int(target[8:-1])] = int(fd)
    return out


def listening_sockets(pid: int) -> dict[int, int]:
    """Listening TCP sockets of ``pid``'s network namespace: inode -> local port."""
    out: dict[int, int] = {}
    for name in ("tcp", "tcp6"):
        raw = _read(_PROC / str(pid) / "net" / name)
        if not raw:
            continue
        for line in raw.splitlines()[1:]:
            cols = line.split()
            if len(cols) > 9 and cols[3] == _TCP_LISTEN.encode():
                port = int(cols[1].rsplit(b":", 1)[1], 16)
                out[int(cols[9])] = port
    return out


def listen_port_of_fd(pid: int, fd: int) -> int | None:
    """The local port of the listening socket ``fd`` in ``pid``, if it is one."""
    try:
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None
    if not target.startswith("socket:["):
        return None
    return listening_sockets(pid).get(int(target[8:-1]))


def pids_listening_on(ports: Iterable[tuple[int, int]], candidates: Iterable[int]) -> set[int]:
    """Those of ``candidates`` that listen on a TCP port inside one of the ``ports`` ranges."""
    ranges = list(ports)
    found: set[int] = set()
    by_netns: dict[int, dict[int, int]] = {}
    for pid in candidates:
        try:
            netns = os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError:
            continue
        if netns not in by_netns:
            by_netns[netns] = listening_sockets(pid)
        listening = by_netns[netns]
        wanted = {ino for ino, port in listening.items() if any(a <= port <= b for a, b in ranges)}
        if wanted and wanted & _socket_inodes(pid).keys():
            found.add(pid)
    return found


def _proc_addr(field: bytes) -> tuple[str, int]:
    """An ``ADDR:PORT`` column of /proc/net/tcp{,6} (the address in host-order 32-bit words)."""
    addr, port = field.rsplit(b":", 1)
    raw = bytes.fromhex(addr.decode())
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    if len(words) == 4:
        ip = ipaddress.IPv4Address(words)
    else:
        v6 = ipaddress.IPv6Address(words)
        ip = v6.ipv4_mapped or v6
    return str(ip), int(port, 16)


_Endpoint = tuple[str, int]


@dataclass(frozen=True, slots=True)
class TcpSocket:
    """One line of /proc/net/tcp{,6}."""

    local: _Endpoint
    remote: _Endpoint
    listening: bool


def tcp_sockets(pid: int) -> dict[int, TcpSocket]:
    """Every TCP socket of ``pid``'s network namespace, by inode."""
    out: dict[int, TcpSocket] = {}
    for name in ("tcp", "tcp6"):
        for line in (_read(_PROC / str(pid) / "net" / name) or b"").splitlines()[1:]:
            cols = line.split()
            if len(cols) > 9 and cols[9] != b"0":
                try:
                    out[int(cols[9])] = TcpSocket(_proc_addr(cols[1]), _proc_addr(cols[2]),
                                                  cols[3] == _TCP_LISTEN.encode())
                except ValueError:
                    continue
    return out


def _holder(inode: int, netns: int) -> int | None:
    """The process of network namespace ``netns`` that holds socket ``inode``."""
    wanted = f"socket:[{inode}]"
    for cand in all_pids():
        try:
            if os.stat(f"/proc/{cand}/ns/net").st_ino != netns:
                continue
            fds = os.listdir(f"/proc/{cand}/fd")
        except OSError:
            continue
        for name in fds:
            try:
                if os.readlink(f"/proc/{cand}/fd/{name}") == wanted:
                    return cand
            except OSError:
                continue
    return None


def _server_socket(socks: dict[int, TcpSocket], mine: TcpSocket | None,
                   peer: _Endpoint) -> int | None:
    """The inode of the local socket serving ``peer``: the other end of ``mine`` (the client's
    socket, when it still exists), else a listener on ``peer`` that is surely local (bound to
    that very address, or a wildcard listener when ``peer`` is a loopback address)."""
    if mine is not None:
        return next((ino for ino, s in socks.items()
                     if s.local == mine.remote and s.remote == mine.local), None)
    loopback = ipaddress.ip_address(peer[0]).is_loopback
    for ino, s in socks.items():
        if not s.listening or s.local[1] != peer[1]:
            continue
        if s.local[0] == peer[0] or (loopback and ipaddress.ip_address(s.local[0]).is_unspecified):
            return ino
    return None


def local_peer_executable(pid: int, fd: int, peer: _Endpoint) -> str | None:
    """The executable name of the process serving ``peer`` to TCP socket ``fd`` of ``pid``,
    when that server runs on this host in the same network namespace; None when it is remote
    or not found.

    While the connection is open the server is the holder of the socket whose endpoints are
    this one's swapped, so a remote server on a port a local process also listens on is never
    mistaken for it. Once the client closed it (the agent looks a little later than the kernel
    saw the bytes), a listener on ``peer`` that is surely local stands in.
    """
    try:
        netns = os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None
    try:
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        target = ""
    socks = tcp_sockets(pid)
    mine = socks.get(int(target[8:-1])) if target.startswith("socket:[") else None
    if mine is not None and mine.remote != peer:
        mine = None  # the fd now names another connection
    try:
        inode = _server_socket(socks, mine, peer)
    except ValueError:
        return None
    holder = _holder(inode, netns) if inode is not None else None
    exe = exe_path(holder) if holder is not None else None
    return os.path.basename(exe.removesuffix(" (deleted)")) if exe else None


class PeerServers:
    """Executable names of local servers that traced clients talk to, cached per (client
    network namespace, server address, port), so /proc is scanned once per server."""

    def __init__(self, ttl_s: float = 300.0, miss_ttl_s: float = 30.0,
                 max_entries: int = 4096) -> None:
        self._ttl_s = ttl_s
        self._miss_ttl_s = miss_ttl_s
        self._max = max_entries
        self._cache: dict[tuple[int, str, int], tuple[float, str | None]] = {}

    def server_executable(self, tgid: int, fd: int, address: str, port: int) -> str | None:
        """The executable of the local process serving ``address:port`` to ``tgid``'s socket
        ``fd``; None for a remote or unknown server (asked again after a shorter TTL)."""
        try:
            netns = os.stat(f"/proc/{tgid}/ns/net").st_ino
        except OSError:
            return None
        key = (netns, address, port)
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < (self._ttl_s if hit[1] else self._miss_ttl_s):
            return hit[1]
        exe = local_peer_executable(tgid, fd, (address, port))
        if len(self._cache) >= self._max:
            self._cache.clear()
        self._cache[key] = (now, exe)
        return exe


def matches_exe(pid: int, globs: Iterable[str]) -> bool:
    """Whether ``pid``'s executable (full path or base name) or comm matches one of ``globs``."""
    exe = exe_path(pid)
    if exe is None:
        return False
    comm = (_read(_PROC / str(pid) / "comm") or b"").decode("utf-8", "replace").strip()
    names = (exe, os.path.basename(exe), comm)
    return any(fnmatch.fnmatchcase(n, g) for g in globs for n in names)


def host_name() -> str:
    """This node's host name."""
    return socket.gethostname()
