"""Example orders service: the revenue path, instrumented with one call to bridge.annotate.

A thread-per-request HTTP server (the standard library's ThreadingHTTPServer). Each request
names its tenant and user in headers, as an API gateway would forward them; the handler
annotates them and then, on the same thread:

1. asks the inventory service for stock over HTTP/1.1;
2. with ``--redis``, looks the tenant's price up in Redis; on a miss, and with ``--pricing``,
   asks the pricing service over HTTP/2 (h2c, prior knowledge) and caches the answer;
3. with ``--postgres``, records the order in PostgreSQL (table ``orders``, created at start);

and answers with JSON. Every dependency but inventory is optional, so the service also runs
alone with the standard library and ``bridge``.

    python orders.py --port 8081 --inventory http://127.0.0.1:8082 [--ready-file PATH]
        [--pricing http://127.0.0.1:8083] [--postgres "host=... port=... user=... dbname=..."]
        [--redis redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

import argparse
import json
import queue
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import bridge

PRICE_TTL_S = 30
SCHEMA = """CREATE TABLE IF NOT EXISTS orders (
    id text NOT NULL, tenant text NOT NULL, sku text NOT NULL, cents int,
    created timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (tenant, id))"""
RECORD = """INSERT INTO orders (id, tenant, sku, cents) VALUES (%s, %s, %s, %s)
    ON CONFLICT (tenant, id) DO UPDATE SET cents = EXCLUDED.cents, created = now()"""


class Backends:
    """The optional clients. Connections open lazily, on the first request that needs them,
    and are then reused (so they exist only once the service is serving)."""

    def __init__(self, inventory: str, pricing: str | None, postgres: str | None,
                 redis_url: str | None) -> None:
        self.inventory = inventory.rstrip("/")
        self.pricing_url = pricing.rstrip("/") if pricing else None
        self.postgres = postgres
        self.redis: Any = None
        self.pricing: Any = None
        self._pg_idle: queue.SimpleQueue[Any] = queue.SimpleQueue()
        if redis_url:
            import redis

            self.redis = redis.Redis.from_url(redis_url, socket_timeout=5)
        if pricing:
            import httpx

            # HTTP/2 with prior knowledge: one multiplexed h2c connection for all threads.
            self.pricing = httpx.Client(http1=False, http2=True, timeout=5)
        if postgres:
            import psycopg

            with psycopg.connect(postgres, autocommit=True) as conn:
                conn.execute(SCHEMA)

    @contextmanager
    def pg(self) -> Iterator[Any]:
        """A pooled PostgreSQL connection (autocommit)."""
        import psycopg

        try:
            conn = self._pg_idle.get_nowait()
        except queue.Empty:
            conn = psycopg.connect(self.postgres, autocommit=True)
        try:
            yield conn
        except BaseException:
            conn.close()
            raise
        self._pg_idle.put(conn)

    def stock(self, sku: str) -> dict[str, Any]:
        """Inventory over HTTP/1.1; raises urllib.error.HTTPError/OSError."""
        with urllib.request.urlopen(f"{self.inventory}/stock/{sku}", timeout=5) as r:
            data: dict[str, Any] = json.loads(r.read())
            return data

    def price(self, tenant: str, sku: str) -> int | None:
        """The tenant's price in cents: Redis first, then pricing over HTTP/2."""
        key = f"price:{tenant}:{sku}"
        if self.redis is not None:
            cached = self.redis.get(key)
            if cached is not None:
                return int(cached)
        if self.pricing is None:
            return None
        r = self.pricing.get(f"{self.pricing_url}/price/{sku}", params={"tenant": tenant})
        r.raise_for_status()
        cents = int(r.json()["cents"])
        if self.redis is not None:
            self.redis.set(key, cents, ex=PRICE_TTL_S)
        return cents

    def record(self, order_id: str, tenant: str, sku: str, cents: int | None) -> None:
        """Write the order row."""
        if self.postgres:
            with self.pg() as conn:
                conn.execute(RECORD, (order_id, tenant, sku, cents))


class OrdersHandler(BaseHTTPRequestHandler):
    """GET /orders/<id>: annotate, call the backends, answer."""

    protocol_version = "HTTP/1.1"
    backends: Backends

    def do_GET(self) -> None:
        tenant = self.headers.get("X-Tenant-ID", "anonymous")
        user = self.headers.get("X-User-ID", "guest")
        flag = "new-checkout" if tenant.endswith("a") else "classic-checkout"
        bridge.annotate(tenant_id=tenant, user_id=user, feature_flag=flag)
        if not self.path.startswith("/orders/"):
            self._reply(404, {"error": "not found"})
            return
        order_id = self.path.rsplit("/", 1)[-1]
        sku = f"sku-{order_id}"
        b = self.backends
        try:
            stock = b.stock(sku)
        except urllib.error.HTTPError as e:
            self._reply(502, {"error": f"inventory answered {e.code}"})
            return
        except OSError as e:
            self._reply(503, {"error": f"inventory unreachable: {e}"})
            return
        try:
            cents = b.price(tenant, sku)
            b.record(order_id, tenant, sku, cents)
        except Exception as e:  # any backend failure is the caller's 503
            self._reply(503, {"error": f"{type(e).__name__}: {e}"})
            return
        self._reply(200, {"order": order_id, "tenant": tenant, "in_stock": stock["count"] > 0,
                          "cents": cents, "thread": threading.get_native_id()})

    def _reply(self, status: int, body: dict[str, object]) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the agent is the one telling what happened."""


def main() -> None:
    """Serve until killed."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=8081)
    ap.add_argument("--inventory", default="http://127.0.0.1:8082")
    ap.add_argument("--pricing", metavar="URL", help="pricing service, spoken to over h2c")
    ap.add_argument("--postgres", metavar="DSN", help="libpq DSN; orders are recorded there")
    ap.add_argument("--redis", metavar="URL", help="Redis URL; prices are cached there")
    ap.add_argument("--ready-file")
    args = ap.parse_args()
    OrdersHandler.backends = Backends(args.inventory, args.pricing, args.postgres, args.redis)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), OrdersHandler)
    server.daemon_threads = True
    if args.ready_file:
        # Write then rename, so a watcher never reads a half-written file.
        tmp = Path(args.ready_file + ".tmp")
        tmp.write_text(str(server.server_address[1]))
        tmp.rename(args.ready_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
