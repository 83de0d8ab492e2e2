"""asyncio support: context in a ``contextvars`` variable, written to the thread's map entry
whenever a task resumes with a context other than the one the entry holds.

    import bridge.asyncio
    bridge.asyncio.install()          # once, on the running loop (the ASGI middleware does it)

``bridge.annotate``/``context``/``clear`` called inside a task then apply to that task (and the
tasks it creates, which copy its context), never to the other requests the loop serves.
"""

from __future__ import annotations

from sdk_side._asyncio import install, installed

__all__ = ["install", "installed"]
