"""The application side against a real pinned BPF hash map: real bpf(2) calls, no agent.

Each test creates its own ``ctx_by_tid``-shaped map, pins it in a private directory under
/sys/fs/bpf, points ``EBPF_BRIDGE_PIN_DIR`` at it and reads entries back through a read-write
fd, the way the agent's probes would look them up.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import bridge
import bridge.asyncio
from bridge import _abi, _env
from bridge._abi import AttrValue
from sdk_side import _bpf, _writer
from tests.e2e.fastpath_trace import Cells

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="creating and pinning BPF maps needs root"),
    pytest.mark.skipif(not os.path.ismount("/sys/fs/bpf"), reason="bpffs is not mounted"),
]

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
NOBODY = 65534


@dataclass
class PinnedMap:
    """A test map pinned where the SDK looks for ``ctx_by_tid``."""

    dir: Path
    fd: int  # read-write: the test plays the agent
    cells: Cells | None = None  # ctx_cells beside the map, read as the probes read it

    @property
    def pin(self) -> Path:
        return self.dir / _abi.CTX_BY_TID_NAME

    def entry(
        self, tid: int | None = None, pidns: int | None = None
    ) -> dict[str, AttrValue] | None:
        """Decoded attributes of one thread's entry, or None if it has none."""
        value = self.raw(tid, pidns)
        if value is None:
            return None
        _, count, _, data_len, *_ = _abi.CTX_VALUE_HEADER.unpack_from(value)
        off = _abi.CTX_VALUE_HEADER.size
        return _abi.decode_attrs(value[off : off + data_len], count)

    def raw(self, tid: int | None = None, pidns: int | None = None) -> bytes | None:
        key = thread_key(threading.get_native_id() if tid is None else tid, pidns)
        if self.cells is not None:
            return self.cells.lookup(self.fd, key)
        return _bpf.map_lookup(self.fd, key, _abi.CTX_VALUE_SIZE)

    def delete(self, tid: int | None = None) -> None:
        """What the kernel side does when a new inbound request starts on the thread."""
        key = thread_key(threading.get_native_id() if tid is None else tid)
        if self.cells is not None:
            self.cells.delete(self.fd, key)
            return
        _bpf.map_delete(self.fd, key)

    def thread_keys(self) -> list[tuple[int, int]]:
        keys = [_abi.CTX_KEY.unpack(k)[:2] for k in _bpf.map_keys(self.fd, _abi.CTX_KEY.size)]
        if self.cells is not None:
            keys += self.cells.owners()
        return keys


def my_pidns() -> int:
    return os.stat("/proc/self/ns/pid").st_ino


def thread_key(tid: int, pidns: int | None = None) -> bytes:
    return _abi.CTX_KEY.pack(my_pidns() if pidns is None else pidns, tid, 0)


def create_map(max_entries: int = 1024) -> int:
    return _bpf.map_create(_abi.CTX_KEY.size, _abi.CTX_VALUE_SIZE, max_entries, name="bridge_test")


def make_pinned(base: Path, max_entries: int = 1024) -> PinnedMap:
    base.mkdir(mode=0o755)
    fd = create_map(max_entries)
    _bpf.obj_pin(fd, str(base / _abi.CTX_BY_TID_NAME))
    return PinnedMap(base, fd)


@pytest.fixture()
def pin_base() -> Iterator[Path]:
    base = Path(f"/sys/fs/bpf/ebpf_bridge_test_{os.getpid()}")
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(mode=0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture()
def use_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Path], bool]]:
    """Point the SDK at a pin directory and re-check now; restore afterwards."""

    def point(path: Path) -> bool:
        monkeypatch.setenv(_env.EBPF_BRIDGE_PIN_DIR, str(path))
        return _writer.reconnect()

    yield point
    bridge.clear()
    monkeypatch.undo()
    _writer.reconnect()


@pytest.fixture(params=["accelerated", "cells", "ctypes"])
def pinned(
    request: pytest.FixtureRequest,
    pin_base: Path,
    use_dir: Callable[[Path], bool],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[PinnedMap]:
    """A fresh pinned map the SDK is connected to, once through each write path: the C
    accelerator (what ``pip install`` builds: ``annotate``'s common calls in C) and the
    fallback without it (the Python ``annotate`` over ctypes); and the accelerator with
    ``ctx_cells`` beside the map, as the agent pins it (root apps write memory, not the map)."""
    if request.param == "ctypes":
        # Before connecting: the new map's thread states are built with the fallback handles.
        monkeypatch.setattr(_bpf, "elem_handle", _bpf._ctypes_handle)
        monkeypatch.setattr(_writer, "_elem_update", _bpf._ctypes_update)
        monkeypatch.setattr(_writer, "_elem_delete", _bpf._ctypes_delete)
        monkeypatch.setattr(_writer, "_fast_annotate", None)
        monkeypatch.setattr(_writer, "annotate", _writer._annotate_py)
        monkeypatch.setattr(bridge, "annotate", _writer._annotate_py)
    elif not _bpf.ACCELERATED:
        pytest.fail("sdk_side._fastbpf is not built: run scripts/install.sh (pip install -e .)")
    m = make_pinned(pin_base / "v1")
    if request.param == "cells":
        m.cells = Cells(m.dir)
    assert use_dir(m.dir)
    assert bridge.status().cells == (request.param == "cells"), bridge.status()
    bridge.clear()
    yield m
    bridge.clear()
    if m.cells is not None:
        # The writer's mapping goes with the connection; ours with the test.
        monkeypatch.undo()
        _writer.reconnect()
        m.cells.close()
    os.close(m.fd)
    # Thread states hold handles of this test's write path: none may outlive it.
    _writer._P.gen += 1


def wait_for(cond: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


# --- thread scope and request semantics -----------------------------------------------------


def test_each_thread_writes_its_own_entry(pinned: PinnedMap) -> None:
    n = 6
    ready = threading.Barrier(n + 1)
    done = threading.Event()
    tids: dict[int, int] = {}

    def work(i: int) -> None:
        bridge.annotate(tenant_id=f"t{i}", worker=i)
        bridge.annotate(even=i % 2 == 0)
        tids[i] = threading.get_native_id()
        ready.wait()
        done.wait()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    ready.wait()
    try:
        for i in range(n):
            assert pinned.entry(tids[i]) == {"tenant_id": f"t{i}", "worker": i, "even": i % 2 == 0}
        assert {tid for _, tid in pinned.thread_keys()} == set(tids.values())
        assert {ns for ns, _ in pinned.thread_keys()} == {my_pidns()}
    finally:
        done.set()
        for t in threads:
            t.join()
    # A thread's entry goes with the thread, so a recycled tid never inherits it.
    wait_for(lambda: pinned.thread_keys() == [])


def test_merge_within_a_request(pinned: PinnedMap) -> None:
    bridge.annotate(tenant_id="acme", attempt=1)
    bridge.annotate(user_id="u-42")
    bridge.annotate(attempt=2, ratio=0.5)
    assert pinned.entry() == {"tenant_id": "acme", "attempt": 2, "user_id": "u-42", "ratio": 0.5}
    version, count, flags, *_ = _abi.CTX_VALUE_HEADER.unpack_from(pinned.raw() or b"")
    assert (version, count, flags) == (_abi.ABI_VERSION, 4, 0)
    # Re-annotating the same values rewrites the entry (the kernel may have cleared it).
    before = bridge.status().writes
    bridge.annotate(tenant_id="acme")
    assert bridge.status().writes == before + 1


def test_new_request_does_not_inherit_the_old_context(pinned: PinnedMap) -> None:
    bridge.annotate(tenant_id="acme", user_id="u-42")
    pinned.delete()  # the kernel saw a new inbound request on this thread
    bridge.annotate(feature_flag="new-checkout")
    assert pinned.entry() == {"feature_flag": "new-checkout"}
    bridge.annotate(user_id="u-7")
    assert pinned.entry() == {"feature_flag": "new-checkout", "user_id": "u-7"}


@pytest.mark.parametrize("lengths", [[1] * 6, [3, 3, 3, 1, 1, 4, 2, 2], [1, 5, 1, 1, 7]])
def test_requests_of_any_length_merge_within_and_never_across(
        pinned: PinnedMap, lengths: list[int]) -> None:
    """The writer guesses from the previous request's number of calls whether the kernel has
    cleared the entry, and tries that write first; whatever the guess, each request's entry
    holds exactly its own attributes, merged."""
    for req, n in enumerate(lengths):
        if req:
            pinned.delete()  # the kernel: a new inbound request on this thread
        expected: dict[str, AttrValue] = {}
        for call in range(n):
            attrs: dict[str, AttrValue] = {"req": req, f"k{call % 5}": f"v{req}-{call}"}
            if call % 2:
                attrs["tenant_id"] = f"t{req}"
            bridge.annotate(**attrs)
            expected.update(attrs)
            assert pinned.entry() == expected, (req, call)
    status = bridge.status()
    assert (status.errors, status.map_full) == (0, 0)


def test_calls_never_cleared_by_the_kernel_keep_merging(pinned: PinnedMap) -> None:
    """A thread the kernel never clears (no inbound requests on it): every call merges."""
    for i in range(40):
        bridge.annotate(**{f"k{i % 8}": i})
        assert pinned.entry() == {f"k{j}": j + 8 * ((i - j) // 8) for j in range(min(i + 1, 8))}
    assert bridge.status().errors == 0


def test_first_call_of_a_new_request_drops_the_bound_connection(pinned: PinnedMap) -> None:
    for i in range(3):
        if i:
            pinned.delete()
        bridge.bind_request(5000)
        bridge.annotate(tenant_id="acme")
        raw = pinned.raw()
        assert raw is not None and _abi.CTX_VALUE_HEADER.unpack_from(raw)[4] == 5000
    pinned.delete()
    bridge.annotate(tenant_id="next")  # no bind_request in this request
    raw = pinned.raw()
    assert raw is not None and _abi.CTX_VALUE_HEADER.unpack_from(raw)[4] == 0
    assert pinned.entry() == {"tenant_id": "next"}
    with bridge.context(step="inner"):
        assert pinned.entry() == {"tenant_id": "next", "step": "inner"}
    assert pinned.entry() == {"tenant_id": "next"}


def test_shrinking_value_leaves_no_stale_bytes(pinned: PinnedMap) -> None:
    bridge.annotate(tenant_id="a" * 100, other="b" * 100)
    pinned.delete()
    bridge.annotate(x=1)
    raw = pinned.raw()
    assert raw is not None
    data_len = _abi.CTX_VALUE_HEADER.unpack_from(raw)[3]
    assert raw[_abi.CTX_VALUE_HEADER.size + data_len :] == bytes(_abi.ATTR_BYTES - data_len)


def test_context_restores_previous(pinned: PinnedMap) -> None:
    bridge.annotate(tenant_id="acme", step="outer")
    with bridge.context(step="inner", extra=True):
        assert pinned.entry() == {"tenant_id": "acme", "step": "inner", "extra": True}
        with bridge.context(depth=2):
            assert pinned.entry() == {
                "tenant_id": "acme",
                "step": "inner",
                "extra": True,
                "depth": 2,
            }
        assert pinned.entry() == {"tenant_id": "acme", "step": "inner", "extra": True}
    assert pinned.entry() == {"tenant_id": "acme", "step": "outer"}
    # Merging after the block continues from the restored context.
    bridge.annotate(more=1)
    assert pinned.entry() == {"tenant_id": "acme", "step": "outer", "more": 1}


def test_context_on_empty_deletes_on_exit(pinned: PinnedMap) -> None:
    with bridge.context(tenant_id="acme"):
        assert pinned.entry() == {"tenant_id": "acme"}
    assert pinned.entry() is None


def test_context_restores_on_exception(pinned: PinnedMap) -> None:
    bridge.annotate(a=1)
    with pytest.raises(RuntimeError), bridge.context(a=2):
        raise RuntimeError("boom")
    assert pinned.entry() == {"a": 1}


def test_context_does_not_resurrect_an_earlier_request(pinned: PinnedMap) -> None:
    bridge.annotate(tenant_id="old")
    with bridge.context(b=1):
        pinned.delete()  # a new request began inside the block
    assert pinned.entry() is None
    bridge.annotate(tenant_id="old")
    pinned.delete()  # the kernel cleared it before the block: nothing of this request to keep
    with bridge.context(b=1):
        assert pinned.entry() == {"b": 1}
    assert pinned.entry() is None


def test_clear_deletes(pinned: PinnedMap) -> None:
    bridge.annotate(tenant_id="acme")
    assert pinned.entry() is not None
    bridge.clear()
    assert pinned.entry() is None
    bridge.clear()  # idempotent
    bridge.annotate(user_id="u-1")
    assert pinned.entry() == {"user_id": "u-1"}


def test_task_context_rewritten_after_a_contextless_step(pinned: PinnedMap) -> None:
    """A step of a task without context (asyncio's accept task, a new request's first step)
    deletes the loop thread's entry; the next step of the task that owned it must write it
    again before its I/O (the one-loop e2e test's untagged HTTP client span)."""
    seen: list[dict[str, AttrValue] | None] = []

    async def main() -> None:
        bridge.asyncio.install()
        annotated, go = asyncio.Event(), asyncio.Event()

        async def request() -> None:
            bridge.annotate(tenant_id="a")
            annotated.set()
            await go.wait()
            seen.append(pinned.entry())  # what the kernel would snapshot for I/O here

        async def contextless() -> None:
            go.set()

        task = asyncio.create_task(request())
        await annotated.wait()
        assert pinned.entry() == {"tenant_id": "a"}
        await asyncio.create_task(contextless())
        await task

    asyncio.run(main())
    assert seen == [{"tenant_id": "a"}]


def test_truncation_and_budget_are_counted_and_flagged(pinned: PinnedMap) -> None:
    before = bridge.status()
    bridge.annotate(long="é" * 200)
    got = pinned.entry()
    assert got is not None
    assert isinstance(got["long"], str)
    assert len(got["long"].encode()) == _abi.MAX_STR_LEN
    raw = pinned.raw() or b""
    assert _abi.CTX_VALUE_HEADER.unpack_from(raw)[2] & _abi.CTX_F_TRUNCATED
    bridge.annotate(**{f"k{i}": "v" * 100 for i in range(4)})
    got = pinned.entry()
    assert got is not None
    assert "k0" in got
    assert "k3" not in got
    after = bridge.status()
    assert after.truncated_values - before.truncated_values == 1
    assert after.dropped_attrs - before.dropped_attrs >= 2


def test_app_fd_is_write_only(pinned: PinnedMap) -> None:
    bridge.annotate(tenant_id="acme")
    with pytest.raises(OSError) as exc:
        _bpf.map_lookup(_writer._P.fd, thread_key(threading.get_native_id()), 360)
    assert exc.value.errno == errno.EPERM


# --- degradation --------------------------------------------------------------------------------


def test_map_full_is_counted_not_raised(pin_base: Path, use_dir: Callable[[Path], bool]) -> None:
    m = make_pinned(pin_base / "full", max_entries=1)
    assert use_dir(m.dir)
    try:
        other_tid: list[int] = []

        hold = threading.Event()

        def fill() -> None:
            bridge.annotate(owner="other")
            other_tid.append(threading.get_native_id())
            hold.wait()

        other = threading.Thread(target=fill)
        other.start()
        wait_for(lambda: other_tid)
        before = bridge.status()
        bridge.annotate(tenant_id="acme")
        bridge.annotate(tenant_id="acme", more=1)
        after = bridge.status()
        assert after.map_full - before.map_full == 2
        assert after.errors == before.errors
        assert m.entry() is None
        assert m.entry(other_tid[0]) == {"owner": "other"}
        hold.set()
        other.join()
        # Once there is room, the next call writes (and never the lost attributes).
        wait_for(lambda: m.thread_keys() == [])
        bridge.annotate(user_id="u-1")
        assert m.entry() == {"user_id": "u-1"}
    finally:
        bridge.clear()
        os.close(m.fd)


def test_agent_started_later_is_picked_up(pin_base: Path, use_dir: Callable[[Path], bool]) -> None:
    assert not use_dir(pin_base / "later")
    before = bridge.status()
    bridge.annotate(tenant_id="early")
    m = make_pinned(pin_base / "later")
    try:
        bridge.annotate(tenant_id="early")  # within the retry interval: still a no-op
        assert bridge.status().noop_calls - before.noop_calls == 2
        time.sleep(_writer.RETRY_INTERVAL_S + 0.05)
        bridge.annotate(tenant_id="late")
        assert bridge.status().connected
        assert m.entry() == {"tenant_id": "late"}
    finally:
        bridge.clear()
        os.close(m.fd)


def test_recreated_map_is_reopened(pin_base: Path, use_dir: Callable[[Path], bool]) -> None:
    first = make_pinned(pin_base / "agent")
    assert use_dir(first.dir)
    bridge.annotate(tenant_id="acme")
    assert first.entry() == {"tenant_id": "acme"}
    # Agent restart: the old pin goes away and a new map is pinned at the same path.
    first.pin.unlink()
    second_fd = create_map()
    _bpf.obj_pin(second_fd, str(first.pin))
    second = PinnedMap(first.dir, second_fd)
    try:
        time.sleep(_writer.RETRY_INTERVAL_S + 0.05)
        bridge.annotate(user_id="u-1")
        # A new map holds nothing of ours: the old request's attributes are not carried over.
        assert second.entry() == {"user_id": "u-1"}
        # Agent gone: writes stop, calls become no-ops.
        second.pin.unlink()
        time.sleep(_writer.RETRY_INTERVAL_S + 0.05)
        before = bridge.status()
        bridge.annotate(user_id="u-2")
        after = bridge.status()
        assert not after.connected
        assert after.noop_calls - before.noop_calls == 1
        assert second.entry() == {"user_id": "u-1"}
    finally:
        os.close(first.fd)
        os.close(second_fd)


def test_fork_child_gets_fresh_state(pinned: PinnedMap) -> None:
    bridge.annotate(tenant_id="parent")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            bridge.annotate(child=True)
            os.write(w, str(threading.get_native_id()).encode())
        finally:
            os._exit(0)
    os.close(w)
    child_tid = int(os.read(r, 64))
    os.close(r)
    os.waitpid(pid, 0)
    assert child_tid != threading.get_native_id()
    assert pinned.entry(child_tid) == {"child": True}
    assert pinned.entry() == {"tenant_id": "parent"}
    pinned.delete(child_tid)


# --- permissions and namespaces ---------------------------------------------------------------

CHILD = r"""
import json, os, sys, threading
import bridge
from sdk_side import _bpf
pin = sys.argv[1]
bridge.annotate(tenant_id="nobody", uid=os.getuid())
opens = {}
for name, flags in (("rdwr", _bpf.BPF_F_RDWR), ("rdonly", _bpf.BPF_F_RDONLY)):
    try:
        os.close(_bpf.obj_get(pin, flags))
        opens[name] = 0
    except OSError as exc:
        opens[name] = exc.errno
st = bridge.status()
print(json.dumps({"tid": threading.get_native_id(), "pid": os.getpid(),
                  "pidns": os.stat("/proc/self/ns/pid").st_ino, "opens": opens,
                  "connected": st.connected, "writes": st.writes, "noop": st.noop_calls,
                  "errors": st.errors, "last_error": st.last_error}), flush=True)
sys.stdin.readline()  # stay alive (and keep the entry) until the parent has looked
"""


def run_child(argv: list[str], pin: Path) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    env = {
        "PATH": "/usr/bin:/bin",
        _env.EBPF_BRIDGE_PIN_DIR: str(pin.parent),
        "PYTHONPATH": str(REPO),
    }
    proc = subprocess.Popen(
        [*argv, PYTHON, "-c", CHILD, str(pin)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(10)
        raise AssertionError(f"child failed: {proc.stderr.read() if proc.stderr else ''}")
    return proc, json.loads(line)


def finish(proc: subprocess.Popen[str]) -> None:
    proc.communicate("\n", timeout=10)
    assert proc.returncode == 0


SETPRIV = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is missing")
def test_unprivileged_app_can_write_a_world_writable_pin(pinned: PinnedMap) -> None:
    os.chmod(pinned.pin, 0o666)
    proc, got = run_child(SETPRIV, pinned.pin)
    try:
        assert got["connected"] is True
        assert got["writes"] == 1
        assert pinned.entry(int(got["tid"])) == {"tenant_id": "nobody", "uid": NOBODY}
        # 0666 also lets every local user READ the map (other tenants' context): the agent
        # must pin with a write-only mode for apps (see the group test below).
        assert got["opens"] == {"rdwr": 0, "rdonly": 0}
    finally:
        finish(proc)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is missing")
@pytest.mark.parametrize(("mode", "gid"), [(0o620, NOBODY), (0o622, 0)])
def test_write_only_pin_admits_writes_but_not_reads(pinned: PinnedMap, mode: int, gid: int) -> None:
    # The deployment shape: root:appgroup 0620, the app's group may write but not read.
    os.chown(pinned.pin, 0, gid)
    os.chmod(pinned.pin, mode)
    proc, got = run_child(SETPRIV, pinned.pin)
    try:
        assert got["connected"] is True
        assert got["writes"] == 1
        assert got["opens"] == {"rdwr": errno.EACCES, "rdonly": errno.EACCES}
        assert pinned.entry(int(got["tid"])) == {"tenant_id": "nobody", "uid": NOBODY}
    finally:
        finish(proc)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is missing")
def test_unprivileged_app_without_permission_is_a_silent_noop(pinned: PinnedMap) -> None:
    os.chmod(pinned.pin, 0o600)
    proc, got = run_child(SETPRIV, pinned.pin)
    try:
        assert got["connected"] is False
        assert got["writes"] == 0
        assert got["noop"] == 1
        assert got["errors"] == 0
        assert "Permission denied" in str(got["last_error"])
        assert pinned.thread_keys() == []
    finally:
        finish(proc)


@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare (util-linux) is missing")
def test_app_in_its_own_pid_namespace_writes_namespaced_key(pinned: PinnedMap) -> None:
    proc, got = run_child(["unshare", "--pid", "--fork", "--mount-proc"], pinned.pin)
    try:
        # The Python process is a child of unshare; find its host pid.
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(children) == 1
        host_pid = int(children[0])
        host_view_ns = os.stat(f"/proc/{host_pid}/ns/pid").st_ino
        assert host_view_ns != my_pidns()
        assert got["pidns"] == host_view_ns
        assert got["pid"] == 1  # pid 1 of the new namespace
        assert got["tid"] == 1
        assert host_pid != 1
        assert pinned.thread_keys() == [(host_view_ns, 1)]
        assert pinned.entry(1, pidns=host_view_ns) == {"tenant_id": "nobody", "uid": 0}
    finally:
        finish(proc)


def test_sdk_span_written_restored_and_never_resurrects_an_earlier_request(
        pinned: PinnedMap) -> None:
    """BridgeSpanProcessor's writes against a real map: the active SDK span goes into the
    entry beside the attributes, the outer span comes back when the inner one ends, and after
    the kernel cleared the entry (a new request) a new span does not bring back the earlier
    request's attributes."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import SpanKind

    from sdk_side.otel import BridgeSpanProcessor

    def sdk_of(value: bytes | None) -> tuple[int, int] | None:
        sdk = _abi.sdk_span_of(value or b"")
        return None if sdk is None else (int.from_bytes(sdk.span_id, "big"), sdk.kind)

    provider = TracerProvider()
    processor = BridgeSpanProcessor()
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("t")
    try:
        with tracer.start_as_current_span("GET /x", kind=SpanKind.SERVER) as server:
            bridge.annotate(tenant_id="acme")
            assert server.attributes is not None and server.attributes["tenant_id"] == "acme"
            sid = server.get_span_context().span_id
            assert sdk_of(pinned.raw()) == (sid, _abi.SDK_KIND_SERVER)
            with tracer.start_as_current_span("GET", kind=SpanKind.CLIENT) as client:
                # A span started later in the request carries the business attributes.
                assert client.attributes is not None and client.attributes["tenant_id"] == "acme"
                assert sdk_of(pinned.raw()) == (client.get_span_context().span_id,
                                                _abi.SDK_KIND_CLIENT)
            assert sdk_of(pinned.raw()) == (sid, _abi.SDK_KIND_SERVER)
            assert pinned.entry() == {"tenant_id": "acme"}
        # The outermost server span stays recorded: the response is written after it ends.
        assert sdk_of(pinned.raw()) == (sid, _abi.SDK_KIND_SERVER)
        pinned.delete()  # the kernel: a new request on this thread
        with tracer.start_as_current_span("GET /y", kind=SpanKind.SERVER) as second:
            assert sdk_of(pinned.raw()) == (second.get_span_context().span_id,
                                            _abi.SDK_KIND_SERVER)
            assert pinned.entry() == {}  # not the earlier request's tenant
        with tracer.start_as_current_span("job", kind=SpanKind.INTERNAL):
            pass
        # An INTERNAL span that ends with nothing around it leaves no SDK span behind.
        assert sdk_of(pinned.raw()) is None
    finally:
        processor.shutdown()
        bridge.clear()


def test_sdk_span_follows_the_running_asyncio_task(pinned: PinnedMap) -> None:
    """On one event loop, two requests' SDK spans interleave: at every step the entry holds
    the SDK span (and tenant) of the task that runs, and a client span's end brings back its
    own task's server span, not the other task's."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import SpanKind

    from sdk_side.otel import BridgeSpanProcessor

    provider = TracerProvider()
    processor = BridgeSpanProcessor()
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("t")
    seen: list[tuple[str, str, int | None, object]] = []

    def active() -> tuple[int | None, object]:
        raw = pinned.raw()
        sdk = _abi.sdk_span_of(raw or b"")
        entry = pinned.entry() or {}
        return (None if sdk is None else int.from_bytes(sdk.span_id, "big"),
                entry.get("tenant_id"))

    async def request(name: str, mine: asyncio.Event, theirs: asyncio.Event) -> None:
        with tracer.start_as_current_span(f"srv-{name}", kind=SpanKind.SERVER) as srv:
            bridge.annotate(tenant_id=name)
            sid = srv.get_span_context().span_id
            mine.set()
            await theirs.wait()  # the other request runs in between
            with tracer.start_as_current_span("GET", kind=SpanKind.CLIENT) as cl:
                await asyncio.sleep(0)
                seen.append((name, "client", cl.get_span_context().span_id, active()))
            await asyncio.sleep(0)
            seen.append((name, "server", sid, active()))

    async def main() -> None:
        bridge.asyncio.install()
        ea, eb = asyncio.Event(), asyncio.Event()
        await asyncio.gather(asyncio.create_task(request("a", ea, eb)),
                             asyncio.create_task(request("b", eb, ea)))

    try:
        asyncio.run(main())
    finally:
        processor.shutdown()
    assert len(seen) == 4
    for name, what, span_id, (active_id, tenant) in seen:
        assert (active_id, tenant) == (span_id, name), (name, what)


# --- ctx_cells ------------------------------------------------------------------------------


@pytest.fixture()
def with_cells(pin_base: Path, use_dir: Callable[[Path], bool]) -> Iterator[PinnedMap]:
    if not _bpf.ACCELERATED:
        pytest.fail("sdk_side._fastbpf is not built: run scripts/install.sh (pip install -e .)")
    m = make_pinned(pin_base / "v1")
    m.cells = Cells(m.dir)
    assert use_dir(m.dir) and bridge.status().cells, bridge.status()
    yield m
    bridge.clear()
    _writer._P.gen += 1
    m.cells.close()
    os.close(m.fd)


def _run_in_thread(fn: Callable[[], Any]) -> Any:
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def test_thread_whose_cell_is_taken_writes_the_map(with_cells: PinnedMap) -> None:
    assert with_cells.cells is not None
    cells = with_cells.cells
    mem = cells.mem

    def work() -> tuple[int, int, bytes | None, bytes]:
        tid = threading.get_native_id()
        owner = _abi.cell_owner(my_pidns(), tid)
        off = _abi.cell_index(owner) * _abi.CTX_CELL_SIZE
        # Another thread (same id, another PID namespace) holds the cell, with live context.
        other = (0xFFFFFFFF << 32) | tid
        before = other.to_bytes(8, "little") + (1).to_bytes(4, "little") + bytes(4) + \
            b"\x07" * _abi.CTX_VALUE_SIZE
        mem[off : off + _abi.CTX_CELL_SIZE] = before
        fallbacks = bridge.status().cell_fallbacks
        bridge.annotate(tenant_id="collided")
        in_map = _bpf.map_lookup(with_cells.fd, thread_key(tid), _abi.CTX_VALUE_SIZE)
        return tid, bridge.status().cell_fallbacks - fallbacks, in_map, \
            bytes(mem[off : off + _abi.CTX_CELL_SIZE])

    tid, fallbacks, in_map, cell_after = _run_in_thread(work)
    assert fallbacks == 1
    assert in_map is not None
    _, count, _, data_len, *_ = _abi.CTX_VALUE_HEADER.unpack_from(in_map)
    off = _abi.CTX_VALUE_HEADER.size
    assert _abi.decode_attrs(in_map[off : off + data_len], count) == {"tenant_id": "collided"}
    # The holder's cell is untouched.
    other = (0xFFFFFFFF << 32) | tid
    assert cell_after[:8] == other.to_bytes(8, "little")
    assert cell_after[16:] == b"\x07" * _abi.CTX_VALUE_SIZE


def test_cell_of_a_dead_thread_is_freed(with_cells: PinnedMap) -> None:
    assert with_cells.cells is not None
    cells = with_cells.cells

    def work() -> tuple[int, int | None]:
        bridge.annotate(tenant_id="short-lived")
        key = thread_key(threading.get_native_id())
        return threading.get_native_id(), cells.offset(key)

    tid, off = _run_in_thread(work)
    assert off is not None, "the thread did not claim its cell"
    # The thread's state dies with its thread-local: the entry is deleted and the cell freed.
    wait_for(lambda: _abi.CTX_CELL_HEADER.unpack_from(cells.mem, off) == (0, 0))
    assert with_cells.raw(tid) is None


def test_replaced_cells_are_mapped_again(with_cells: PinnedMap) -> None:
    bridge.annotate(tenant_id="one")
    key = thread_key(threading.get_native_id())
    assert with_cells.cells is not None and with_cells.cells.offset(key) is not None
    # An agent replaces ctx_cells alone (or between the writer's two opens): the writer maps
    # the new one at its next check instead of writing cells nobody reads.
    with_cells.cells.close()
    with_cells.cells = Cells(with_cells.dir)
    assert _writer.reconnect()
    assert bridge.status().cells
    bridge.annotate(tenant_id="two")
    assert with_cells.cells.offset(key) is not None
    assert with_cells.entry() == {"tenant_id": "two"}
