"""Fuzz the PostgreSQL wire parser (startup, frontend messages, result matching) and its
span builder."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fuzz._instrument import instrumented

with instrumented(__name__ == "__main__"):
    from kernel_side.protocols import postgres, postgres_spans

from fuzz._common import extra, run_builder, unpack
from fuzz._runner import main


def test_one_input(data: bytes) -> None:
    req, resp = unpack(data)
    total = len(req) + extra(data)
    postgres.parse_startup(req)
    postgres.looks_like_frontend(req, total)
    fe = postgres.parse_frontend(req, total)
    postgres.match_results(fe, resp)
    postgres.error_fields(resp)
    run_builder(postgres_spans, req, resp, data)


if __name__ == "__main__":
    main("postgres", test_one_input)
