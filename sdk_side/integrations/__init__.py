"""Framework integrations: bind a request scope, pass the route template to the agent, and map
request headers to business attributes.

Standard library only at import; each framework is imported lazily by its own module:

- ``sdk_side.integrations.wsgi.BridgeWSGIMiddleware`` (any WSGI app)
- ``sdk_side.integrations.asgi.BridgeASGIMiddleware`` (any ASGI app; installs the asyncio hook)
- ``sdk_side.integrations.flask.bridge_flask(app)``
- ``sdk_side.integrations.fastapi.bridge_fastapi(app)`` (FastAPI and Starlette)
- ``sdk_side.integrations.django.BridgeMiddleware`` (add to ``MIDDLEWARE``)

Each integration also names the request's inbound connection (``bridge.bind_request`` with the
client's port: ``scope["client"]``, ``REMOTE_PORT``), so the agent parents the request's outgoing
calls under its own server span even on an event loop serving many requests.

The route template travels as the reserved attribute ``http.route``: the agent sets it on the
server span and names the span ``"{METHOD} {route}"``. Header mapping: ``headers={"X-Tenant-ID":
"tenant_id"}``, or the ``EBPF_BRIDGE_HEADERS`` environment variable
(``"X-Tenant-ID=tenant_id,X-User-ID=user_id"``) when ``headers`` is not given.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from bridge import _abi, _env

ROUTE_ATTR = "http.route"
"""The reserved business attribute carrying the route template."""

_PARAM = re.compile(r"<(?:[^<>:]+:)?([^<>]+)>")


def template(rule: str) -> str:
    """A Flask/Werkzeug or Django route rule in OpenTelemetry ``{param}`` style, with a leading
    slash: ``/orders/<int:id>`` and ``orders/<int:id>`` become ``/orders/{id}``."""
    out = _PARAM.sub(r"{\1}", rule)
    if not out.startswith("/"):
        out = "/" + out
    return out


def header_map(headers: Mapping[str, str] | None) -> dict[str, str]:
    """Header name (lower case) -> attribute key, from ``headers`` or ``EBPF_BRIDGE_HEADERS``.

    Raises ``ValueError`` for an attribute key the ABI does not accept (a configuration error
    found at start-up, never per request)."""
    raw = _env.header_map() if headers is None else {k.lower(): v for k, v in headers.items()}
    for header, attr in raw.items():
        if not _abi.valid_key(attr):
            raise ValueError(f"header {header!r} maps to an invalid attribute key {attr!r}")
    return raw


def port_of(value: object) -> int:
    """A client port from a server's request data (``scope["client"][1]``, ``REMOTE_PORT``):
    an int or a decimal string in 1-65535; anything else (unix sockets, missing) is 0."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, str):
        value = value.strip()
        if not value.isdigit() or len(value) > 5:
            return 0
        value = int(value)
    if isinstance(value, int) and 0 < value <= 0xFFFF:
        return value
    return 0


def attrs_from(mapping: Mapping[str, str], get: Mapping[str, str]) -> dict[str, _abi.AttrValue]:
    """The business attributes for one request: ``get`` maps lower-case header names to values."""
    out: dict[str, _abi.AttrValue] = {}
    for header, attr in mapping.items():
        value = get.get(header)
        if value:
            out[attr] = value
    return out


__all__ = ["ROUTE_ATTR", "attrs_from", "header_map", "port_of", "template"]
