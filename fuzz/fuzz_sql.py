"""Fuzz the SQL obfuscator and the operation/collection extractors."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fuzz._instrument import instrumented

with instrumented(__name__ == "__main__"):
    from kernel_side.protocols import sql

from fuzz._runner import main


def test_one_input(data: bytes) -> None:
    q = data.decode("utf-8", "replace")
    out = sql.obfuscate(q)
    assert len(out) <= 4 * len(q) + 16
    sql.operation_name(q)
    sql.collection_name(q)


if __name__ == "__main__":
    main("sql", test_one_input)
