"""Fuzz the HTTP/2 (and gRPC) connection parser with interleaved, truncated chunks."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fuzz._instrument import instrumented

with instrumented(__name__ == "__main__"):
    from kernel_side.protocols import http2

from fuzz._common import http2_chunks
from fuzz._runner import main


def test_one_input(data: bytes) -> None:
    conn = http2.H2Connection()
    http2.looks_like_h2_preface(data[3:])
    for i, (from_client, chunk) in enumerate(http2_chunks(data)):
        # Every fourth chunk claims more bytes than were captured (a truncated read).
        total = len(chunk) + (i % 4 == 3) * 5000
        conn.feed(from_client, chunk, total, i)
        assert conn.open_streams <= http2.MAX_OPEN_STREAMS
    conn.close(10**6)
    assert conn.open_streams == 0


if __name__ == "__main__":
    main("http2", test_one_input)
