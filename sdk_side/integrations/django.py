"""Django: add ``"sdk_side.integrations.django.BridgeMiddleware"`` to ``MIDDLEWARE``.

Header mapping comes from the ``EBPF_BRIDGE_HEADERS`` setting (a dict) or the environment
variable of the same name. The route is ``request.resolver_match.route``
(``orders/<int:id>`` -> ``/orders/{id}``). The context is cleared when the server closes the
response, after the body has been written.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from sdk_side import _writer
from sdk_side.integrations import ROUTE_ATTR, header_map, port_of, template
from sdk_side.integrations.wsgi import begin_request


class BridgeMiddleware:
    """Django middleware (synchronous, WSGI)."""

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response
        headers = None
        try:
            from django.conf import settings

            headers = getattr(settings, "EBPF_BRIDGE_HEADERS", None)
        except ImportError:
            pass
        self.headers = header_map(headers)

    def __call__(self, request: Any) -> Any:
        try:
            got = {k.lower(): v for k, v in request.headers.items()} if self.headers else {}
            meta = getattr(request, "META", None) or {}
            begin_request(self.headers, got, peer_port=port_of(meta.get("REMOTE_PORT")))
        except (TypeError, ValueError):
            pass
        try:
            response = self.get_response(request)
        except BaseException:
            _writer.clear()
            raise
        closers = getattr(response, "_resource_closers", None)
        if closers is not None:
            closers.append(_writer.clear)
        else:
            _writer.clear()
        return response

    def process_view(self, request: Any, view: Any, args: Any, kwargs: Any) -> None:
        match = getattr(request, "resolver_match", None)
        route = getattr(match, "route", None)
        if route:
            with contextlib.suppress(TypeError, ValueError):
                _writer.annotate(**{ROUTE_ATTR: template(route)})
