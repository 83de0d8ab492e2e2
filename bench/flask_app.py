"""The Flask service ``flask_bench.py`` drives under gunicorn (not run directly).

``/hello`` returns a tiny body. ``/order`` does one PostgreSQL query (a primary-key lookup in
``items``) and one Redis GET per request, then answers with JSON. Connections open lazily in
the worker (after gunicorn forks it) and are reused.

``BENCH_MODE`` picks what each request adds on top:

- ``bare``: nothing;
- ``otel``: the same three business attributes set on the current OpenTelemetry span (the
  process runs under ``opentelemetry-instrument``, which creates that span);
- ``agent``: ``bridge.annotate(tenant_id=..., user_id=..., feature_flag=...)``;
- ``agent-only`` (or anything else): nothing (the agent runs, the app does not annotate).

``BENCH_PG`` is a libpq DSN, ``BENCH_REDIS`` a redis:// URL.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

from flask import Flask, jsonify

import bridge

MODE = os.environ.get("BENCH_MODE", "bare")
app = Flask(__name__)
_counter = itertools.count()
_conns: dict[str, Any] = {}

if MODE == "otel":
    from opentelemetry import trace

    def _context(n: int) -> None:
        trace.get_current_span().set_attributes(
            {"tenant_id": "acme", "user_id": f"u-{n % 1000}", "feature_flag": "new-checkout"}
        )
elif MODE == "agent":

    def _context(n: int) -> None:
        bridge.annotate(tenant_id="acme", user_id=f"u-{n % 1000}", feature_flag="new-checkout")
else:

    def _context(n: int) -> None:
        return None


def _pg() -> Any:
    conn = _conns.get("pg")
    if conn is None:
        import psycopg

        conn = _conns["pg"] = psycopg.connect(os.environ["BENCH_PG"], autocommit=True)
    return conn


def _redis() -> Any:
    r = _conns.get("redis")
    if r is None:
        import redis

        r = _conns["redis"] = redis.Redis.from_url(os.environ["BENCH_REDIS"], socket_timeout=5)
    return r


@app.get("/hello")
def hello() -> str:
    _context(next(_counter))
    return "hello\n"


@app.get("/order")
def order() -> Any:
    n = next(_counter)
    _context(n)
    item = n % 1000
    row = _pg().execute("SELECT sku, cents FROM items WHERE id = %s", (item,)).fetchone()
    price = _redis().get(f"price:{item}")
    return jsonify(
        item=item, sku=row[0] if row else None, cents=row[1] if row else None,
        price=price.decode() if price else None,
    )
