"""Flask: ``bridge_flask(app, headers=...)``.

Wraps ``app.wsgi_app`` in ``BridgeWSGIMiddleware`` (request scope, header mapping) and adds
the matched rule (``/orders/<int:id>`` -> ``/orders/{id}``) as ``http.route`` once Flask has
routed the request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sdk_side import _writer
from sdk_side.integrations import ROUTE_ATTR, template
from sdk_side.integrations.wsgi import BridgeWSGIMiddleware


def bridge_flask(app: Any, headers: Mapping[str, str] | None = None) -> Any:
    """Instrument a Flask app in place and return it."""
    from flask import request

    app.wsgi_app = BridgeWSGIMiddleware(app.wsgi_app, headers=headers)

    def _route() -> None:
        rule = request.url_rule
        if rule is not None:
            _writer.annotate(**{ROUTE_ATTR: template(rule.rule)})

    app.before_request(_route)
    return app
