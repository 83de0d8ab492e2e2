"""ASGI middleware: a task-scoped request context, header mapping, route template.

Installs the asyncio step hook on the running loop (``bridge.asyncio.install``) and runs the
app under it, so the context follows the request's task across ``await``s even on a loop that
serves many requests at once. The route comes from ``route(scope)`` or, after routing, from
``scope["route"].path`` (Starlette, FastAPI), and is attached before the response starts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from sdk_side import _asyncio, _writer
from sdk_side.integrations import ROUTE_ATTR, attrs_from, header_map, port_of

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def scope_route(scope: Scope) -> str | None:
    """The route template a router left in the scope (Starlette/FastAPI), if any."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) and path else None


class BridgeASGIMiddleware:
    """Wrap an ASGI app: ``BridgeASGIMiddleware(app, headers={"X-Tenant-ID": "tenant_id"})``."""

    def __init__(self, app: ASGIApp, headers: Mapping[str, str] | None = None,
                 route: Callable[[Scope], str | None] | None = None) -> None:
        self.app = app
        self.headers = header_map(headers)
        self.route = route or scope_route
        self._loops: set[int] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        import asyncio

        loop = asyncio.get_running_loop()
        if id(loop) not in self._loops:
            _asyncio.install(loop)
            self._loops.add(id(loop))
        token = _writer.request_scope()
        try:
            client = scope.get("client")
            port = port_of(client[1]) if isinstance(client, (list, tuple)) and client[1:] else 0
            if port:
                _writer.bind_request(port)
            if self.headers:
                got = {k.decode("latin-1").lower(): v.decode("latin-1")
                       for k, v in scope.get("headers", ())}
                attrs = attrs_from(self.headers, got)
                if attrs:
                    with contextlib.suppress(TypeError, ValueError):
                        _writer.annotate(**attrs)
            route_of = self.route

            async def send_with_route(message: Message) -> None:
                if message.get("type") == "http.response.start":
                    route = route_of(scope)
                    if route:
                        _writer.annotate(**{ROUTE_ATTR: route})
                await send(message)

            await _asyncio.run_in_scope(self.app(scope, receive, send_with_route))  # type: ignore[arg-type]
        finally:
            _writer.clear()
            _writer._task_ctx.reset(token)
