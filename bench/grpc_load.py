"""Unary gRPC load for protocol_bench.py: THREADS threads, each with its own channel (its own
HTTP/2 connection), call GetItem on tests/e2e/apps/h2_app.py's grpc-server for SECONDS, then
print the number of calls that returned.

    python bench/grpc_load.py PORT SECONDS THREADS
"""

from __future__ import annotations

import sys
import threading
import time

import grpc

SERVICE = "shop.v1.Catalog"


def _ident(b: bytes) -> bytes:
    return b


def main() -> int:
    port, seconds, threads = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    counts = [0] * threads
    start = threading.Barrier(threads + 1)

    def worker(i: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}",
                                   options=[("grpc.enable_http_proxy", 0)]) as ch:
            get = ch.unary_unary(f"/{SERVICE}/GetItem", request_serializer=_ident,
                                 response_deserializer=_ident)
            get(b"warm")  # connect before the clock starts
            start.wait()
            end = time.monotonic() + seconds
            n = 0
            while time.monotonic() < end:
                get(b"42")
                n += 1
            counts[i] = n

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    start.wait()
    for t in ts:
        t.join()
    print(sum(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
