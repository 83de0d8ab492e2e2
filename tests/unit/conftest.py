"""Unit-test hygiene: module-level protocol memory starts empty in every test.

The PostgreSQL span builder remembers, process-wide, which connections switched to TLS
(``postgres_spans._encrypted``, keyed by pid and connection id). In the agent there is one
assembler and connection ids are unique; in the test process many tests (and the fuzz seeds)
reuse the same made-up ids, so one test's TLS connection made another's plain queries look
encrypted, depending on which tests ran before.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kernel_side.protocols import postgres_spans


@pytest.fixture(autouse=True)
def _fresh_protocol_memory() -> Iterator[None]:
    postgres_spans._encrypted.clear()
    yield
    postgres_spans._encrypted.clear()
