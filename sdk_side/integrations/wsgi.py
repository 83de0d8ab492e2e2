"""WSGI middleware: a request scope per call, header mapping, optional route template.

The context is cleared when the server closes the response iterable (after the body has been
written, so the server span still carries it), or at once if the application raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from sdk_side import _writer
from sdk_side.integrations import ROUTE_ATTR, attrs_from, header_map, port_of

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]


class _Closing:
    """The app's response iterable; clearing the context when the server closes it."""

    __slots__ = ("_inner", "_it")

    def __init__(self, inner: Iterable[bytes]) -> None:
        self._inner = inner
        self._it: Iterator[bytes] | None = None

    def __iter__(self) -> Iterator[bytes]:
        self._it = iter(self._inner)
        return self._it

    def close(self) -> None:
        try:
            close = getattr(self._inner, "close", None)
            if close is not None:
                close()
        finally:
            _writer.clear()


def environ_headers(environ: Environ) -> dict[str, str]:
    """Request headers of a WSGI environ, names lower-cased with dashes."""
    out: dict[str, str] = {}
    for k, v in environ.items():
        if k.startswith("HTTP_"):
            out[k[5:].replace("_", "-").lower()] = v
    return out


def begin_request(mapping: Mapping[str, str], headers: Mapping[str, str],
                  route: str | None = None, peer_port: int = 0) -> None:
    """Start a request scope on this thread: clear, bind the inbound connection (the client's
    ``peer_port``, 0 if unknown), then annotate mapped headers and route."""
    _writer.clear()
    if peer_port:
        _writer.bind_request(peer_port)
    attrs = attrs_from(mapping, headers)
    if route:
        attrs[ROUTE_ATTR] = route
    if attrs:
        _writer.annotate(**attrs)


class BridgeWSGIMiddleware:
    """Wrap a WSGI app: ``BridgeWSGIMiddleware(app, headers={"X-Tenant-ID": "tenant_id"})``.

    ``route(environ)`` may return the route template of the request (or None).
    """

    def __init__(self, app: WSGIApp, headers: Mapping[str, str] | None = None,
                 route: Callable[[Environ], str | None] | None = None) -> None:
        self.app = app
        self.headers = header_map(headers)
        self.route = route

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        try:
            route = self.route(environ) if self.route is not None else None
            begin_request(self.headers, environ_headers(environ) if self.headers else {}, route,
                          port_of(environ.get("REMOTE_PORT")))
        except (TypeError, ValueError):
            pass  # a header value or route the ABI refuses never fails the request
        try:
            result = self.app(environ, start_response)
        except BaseException:
            _writer.clear()
            raise
        return _Closing(result)
