"""FastAPI and Starlette: ``bridge_fastapi(app, headers=...)`` adds ``BridgeASGIMiddleware``;
the route template is ``scope["route"].path`` after routing (``/orders/{id}``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sdk_side.integrations.asgi import BridgeASGIMiddleware


def bridge_fastapi(app: Any, headers: Mapping[str, str] | None = None) -> Any:
    """Instrument a FastAPI or Starlette app in place and return it."""
    app.add_middleware(BridgeASGIMiddleware, headers=headers)
    return app


bridge_starlette = bridge_fastapi
