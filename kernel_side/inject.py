"""Opt-in W3C ``traceparent`` injection into outgoing HTTP/1.1 requests (bpf/inject.bpf.c).

The programs are compiled into the agent's own BPF object (``-DINJECT_TRACEPARENT``) so they
read its connection state. This module loads them, wires the tail calls, and attaches:

- ``inject_sockops`` (sock_ops) to the cgroup v2 root, through a BPF link: traced processes'
  TCP client connections go into the ``inject_socks`` sockhash;
- ``inject_msg`` (sk_msg verdict) to that sockhash, also through a link.

Links, not plain attachments: a link goes away with the agent's file descriptors, so an agent
that dies (even by SIGKILL) stops injecting; a program attached the old way would stay on the
cgroup after its loader's death.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("ebpf_bridge.inject")

__all__ = ["CGROUP2_CANDIDATES", "INJECT_STAT_NAMES", "InjectError", "Injector",
           "find_cgroup2_root"]

INJECT_STAT_NAMES = (
    "injected", "present", "not_http", "incomplete", "unknown_trace", "mid_request",
    "untraced", "failed", "sockets", "taken",
)
"""The slots of the ``inject_stats`` map, in bpf/inject.bpf.c's order (IS_*). ``taken``: ids
the agent's start_exchange gave a client span; it falls short of ``injected`` when a request
went out with an id that no span got."""

CGROUP2_CANDIDATES = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")

# enum bpf_attach_type (include/uapi/linux/bpf.h)
_BPF_CGROUP_SOCK_OPS = 3
_BPF_SK_MSG_VERDICT = 7


class InjectError(RuntimeError):
    """Injection cannot be set up here; the message names what was refused and the fix."""


def find_cgroup2_root() -> str:
    """The cgroup v2 mount whose root holds every process (sock_ops attaches there)."""
    from kernel_side.doctor import mounted_fstype

    for path in CGROUP2_CANDIDATES:
        if mounted_fstype(path) == "cgroup2":
            return path
    raise InjectError(
        "traceparent injection needs the cgroup v2 hierarchy mounted, and none is: "
        "`mount -t cgroup2 none /sys/fs/cgroup/unified` (scripts/install.sh does it)"
    )


@dataclass
class Injector:
    """The loaded and attached injection programs of one agent run."""

    bpf: Any
    cgroup: str
    links: list[int] = field(default_factory=list)

    @classmethod
    def attach(cls, b: Any, salt: bytes, cgroup: str | None = None) -> Injector:
        """Load the programs from the agent's BPF object ``b`` and attach them; ``salt`` is the
        agent's id salt (``IdSource.salt``), from which the kernel derives the ids it writes."""
        import bcc

        root = cgroup or find_cgroup2_root()
        inj = cls(b, root)
        table = b["inject_salt"]
        leaf = table.Leaf()
        ctypes.memmove(ctypes.addressof(leaf), salt, min(len(salt), ctypes.sizeof(leaf)))
        table[table.Key(0)] = leaf
        try:
            progs = b["inject_progs"]
            for slot, name in enumerate(("inject_decide", "inject_nested", "inject_push")):
                fn = b.load_func(name, bcc.BPF.SK_MSG)
                progs[ctypes.c_int(slot)] = ctypes.c_int(fn.fd)
            msg = b.load_func("inject_msg", bcc.BPF.SK_MSG)
            sockops = b.load_func("inject_sockops", bcc.BPF.SOCK_OPS)
        except Exception as e:
            raise InjectError(f"the kernel refused the injection programs: {e}") from None
        lib = bcc.libbcc.lib
        lib.bpf_link_create.restype = ctypes.c_int
        lib.bpf_link_create.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                        ctypes.c_void_p]
        sockhash_fd = lib.bpf_table_fd(b.module, b"inject_socks")
        if sockhash_fd < 0:
            raise InjectError("the inject_socks sockhash was not created")
        link = lib.bpf_link_create(msg.fd, sockhash_fd, _BPF_SK_MSG_VERDICT, None)
        if link < 0:
            raise InjectError(
                f"attaching the sk_msg program to its sockhash was refused: "
                f"{os.strerror(-link)} (needs Linux 6.10+ for sockmap "
                "links)")
        inj.links.append(link)
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            link = lib.bpf_link_create(sockops.fd, fd, _BPF_CGROUP_SOCK_OPS, None)
        finally:
            os.close(fd)
        if link < 0:
            inj.close()
            raise InjectError(
                f"attaching the sock_ops program to cgroup {root} was refused: "
                f"{os.strerror(-link)}")
        inj.links.append(link)
        log.info("traceparent injection on: HTTP/1.1 requests of traced processes' TCP client "
                 "connections opened from now on (cgroup %s)", root)
        return inj

    def stats(self) -> dict[str, int]:
        """The injector's counters, summed over CPUs."""
        table = self.bpf["inject_stats"]
        out: dict[str, int] = {}
        for i, name in enumerate(INJECT_STAT_NAMES):
            out[name] = int(sum(table[table.Key(i)]))
        return out

    def close(self) -> None:
        """Detach: closing a link detaches its program."""
        while self.links:
            os.close(self.links.pop())
