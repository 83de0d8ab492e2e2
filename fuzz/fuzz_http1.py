"""Fuzz the HTTP/1.x parser: requests, responses, pipelining, truncation, route folding."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fuzz._instrument import instrumented

with instrumented(__name__ == "__main__"):
    from kernel_side.protocols import http1

from fuzz._common import extra, unpack
from fuzz._runner import main


def test_one_input(data: bytes) -> None:
    req, resp = unpack(data)
    more = extra(data)
    http1.looks_like_request(req)
    http1.looks_like_response(resp)
    reqs = http1.parse_requests(req, len(req) + more)
    assert len(reqs) <= len(req) // 4 + 1  # at most one request per 4 bytes ("GET ")
    http1.parse_responses(resp, len(resp) + more, [r.method for r in reqs])
    http1.parse_responses(resp, len(resp))
    for r in reqs:
        http1.route_heuristic(r.path)


if __name__ == "__main__":
    main("http1", test_one_input)
