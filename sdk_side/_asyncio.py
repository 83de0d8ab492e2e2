"""The asyncio step hook: a task factory that keeps each thread's map entry in step with the
task that is running on it (see ``bridge.asyncio``)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Protocol

from sdk_side._writer import TaskStep


class _Factory(Protocol):
    def __call__(
        self, loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any
    ) -> asyncio.Future[Any]: ...


def _wrap(coro: Any) -> Any:
    if isinstance(coro, TaskStep) or not asyncio.iscoroutine(coro):
        return coro
    return TaskStep(coro)


def install(loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Install the step hook on ``loop`` (default: the running loop, else the current one).

    Every task created afterwards runs its coroutine through ``TaskStep``; an existing task
    factory is kept and called with the wrapped coroutine. Idempotent.
    """
    if loop is None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = asyncio.get_event_loop_policy().get_event_loop()
    prev: Any = loop.get_task_factory()
    if getattr(prev, "_ebpf_bridge", False):
        return

    def factory(
        loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any
    ) -> asyncio.Future[Any]:
        if prev is not None:
            result: asyncio.Future[Any] = prev(loop, _wrap(coro), **kwargs)
            return result
        return asyncio.Task(_wrap(coro), loop=loop, **kwargs)

    factory._ebpf_bridge = True  # type: ignore[attr-defined]
    loop.set_task_factory(factory)


def installed(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether ``install`` ran on ``loop``."""
    return bool(getattr(loop.get_task_factory(), "_ebpf_bridge", False))


def run_in_scope(coro: Coroutine[Any, Any, Any]) -> TaskStep[Any]:
    """``await`` ``coro`` under the step hook inside the current task, whether or not the task
    was created by the factory (the first request on a loop predates ``install``)."""
    return TaskStep(coro)
