"""Fuzz the RESP parser (commands and replies, RESP2 and RESP3) and the Redis span builder."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fuzz._instrument import instrumented

with instrumented(__name__ == "__main__"):
    from kernel_side.protocols import redis, redis_spans

from fuzz._common import run_builder, unpack
from fuzz._runner import main


def test_one_input(data: bytes) -> None:
    req, resp = unpack(data)
    redis.looks_like_command(req)
    for c in redis.parse_commands(req):
        assert len(c.args) <= redis.MAX_ARGS_KEPT
    for r in redis.parse_replies(resp):
        if r.error is not None:
            redis.error_prefix(r.error)
    run_builder(redis_spans, req, resp, data)


if __name__ == "__main__":
    main("redis", test_one_input)
