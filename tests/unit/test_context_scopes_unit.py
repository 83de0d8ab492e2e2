"""Context scopes without a kernel: asyncio task isolation, propagate, header mapping, route
templates, caller errors of annotate_connection (no agent: every write is a no-op)."""

from __future__ import annotations

import asyncio
import contextvars
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import bridge
import bridge.asyncio
from bridge import _env
from sdk_side import _writer
from sdk_side.integrations import header_map, template


@pytest.fixture(autouse=True)
def _no_agent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(_env.EBPF_BRIDGE_PIN_DIR, str(tmp_path / "none"))
    _writer.reconnect()


def _attrs() -> set[str]:
    c = _writer._ctx_get()
    return set() if c is None else set(c.recs)


def test_tasks_keep_their_own_context() -> None:
    async def req(n: int) -> tuple[int, set[str], bytes]:
        bridge.annotate(tenant_id=f"t{n}")
        await asyncio.sleep(0.001 * (5 - n))
        bridge.annotate(**{f"k{n}": n})
        await asyncio.sleep(0)
        c = _writer._ctx_get()
        assert c is not None
        return n, _attrs(), c.recs["tenant_id"]

    async def main() -> list[tuple[int, set[str], bytes]]:
        bridge.asyncio.install()
        assert bridge.asyncio.installed(asyncio.get_running_loop())
        return await asyncio.gather(*(req(n) for n in range(5)))

    for n, keys, tenant in asyncio.run(main()):
        assert keys == {"tenant_id", f"k{n}"}
        assert tenant.endswith(f"t{n}".encode())


def test_context_manager_and_clear_in_task() -> None:
    async def main() -> None:
        bridge.annotate(a="1")
        with bridge.context(b="2"):
            assert _attrs() == {"a", "b"}
        assert _attrs() == {"a"}
        bridge.clear()
        assert _attrs() == set()

    asyncio.run(main())


def test_caller_errors_raise_in_tasks() -> None:
    async def main() -> None:
        with pytest.raises(TypeError):
            bridge.annotate(tenant_id=object())  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            bridge.annotate(**{"bad key": "x"})
        with pytest.raises(ValueError):
            bridge.annotate(**{"k" * 49: "x"})

    asyncio.run(main())


def test_limits_in_task_scope() -> None:
    async def main() -> None:
        before = bridge.status()
        bridge.annotate(**{f"k{i}": "v" for i in range(12)})
        assert len(_attrs()) == 8
        bridge.annotate(long="x" * 500)
        after = bridge.status()
        assert after.dropped_attrs > before.dropped_attrs
        assert after.truncated_values > before.truncated_values

    asyncio.run(main())


def test_propagate_to_thread_pool() -> None:
    async def main() -> list[set[str]]:
        bridge.annotate(tenant_id="acme")

        def work() -> set[str]:
            bridge.annotate(step="worker")
            return _attrs()

        with ThreadPoolExecutor(2) as pool:
            wrapped = pool.submit(bridge.propagate(work)).result()
            plain = pool.submit(work).result()
            copied = pool.submit(contextvars.copy_context().run, work).result()
        assert _attrs() == {"tenant_id"}  # the worker's annotate did not leak back
        return [wrapped, plain, copied]

    wrapped, plain, copied = asyncio.run(main())
    assert wrapped == {"tenant_id", "step"}
    assert copied == {"tenant_id", "step"}
    assert plain == set()  # a thread-scoped worker: no task context


def test_annotate_connection_caller_errors() -> None:
    with pytest.raises(TypeError):
        bridge.annotate_connection("nope", tenant_id="a")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        bridge.annotate_connection(-1, tenant_id="a")
    with pytest.raises(TypeError):
        bridge.annotate_connection(3, tenant_id=[1])  # type: ignore[arg-type]
    bridge.annotate_connection(3, tenant_id="a")  # no agent: no-op
    bridge.clear_connection(3)


def test_header_map_and_templates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_env.EBPF_BRIDGE_HEADERS, "X-Tenant-ID=tenant_id, X-User-ID=user_id,bad")
    assert header_map(None) == {"x-tenant-id": "tenant_id", "x-user-id": "user_id"}
    assert header_map({"X-A": "a"}) == {"x-a": "a"}
    with pytest.raises(ValueError):
        header_map({"X-A": "bad key"})
    assert template("/orders/<int:id>") == "/orders/{id}"
    assert template("orders/<id>/items/<path:rest>") == "/orders/{id}/items/{rest}"


def test_fork_child_starts_fresh() -> None:
    bridge.annotate(tenant_id="parent")
    pid = os.fork()
    if pid == 0:  # child: works, fresh state
        try:
            bridge.annotate(tenant_id="child")
            os._exit(0 if getattr(_writer._tls, "s", None) is None
                     or _writer._tls.s.pid == os.getpid() else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
