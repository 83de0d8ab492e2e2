"""The C id derivation (``kernel_side._fastspan``) against IdSource's Python methods, which
stay the reference: the same bytes for every input, edge cases first, then random ones."""

from __future__ import annotations

import random

import pytest

from bridge import _abi
from kernel_side import assembly
from kernel_side.assembly import IdSource

pytestmark = pytest.mark.skipif(not assembly.ACCELERATED,
                                reason="kernel_side._fastspan is not built")

EDGES = [0, 1, 2, 0xFFFF, 0x10000, 2**31 - 1, 2**32, 2**47, 2**48 - 1, 2**48, 2**63,
         2**64 - 1, 2**64, 2**70 + 5]


def _pairs(seed: int, n: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    out = [(a, b) for a in EDGES for b in EDGES]
    for _ in range(n):
        bits = rng.choice((8, 16, 32, 48, 64))
        out.append((rng.getrandbits(bits), rng.getrandbits(rng.choice((4, 16, 20)))))
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_c_ids_equal_python_ids(seed: int) -> None:
    salt = random.Random(seed).randbytes(_abi.ID_SALT_SIZE)
    ids = IdSource(salt)
    py = IdSource.__dict__  # the class's Python methods, which the instance's C ones shadow
    assert ids.span_id is not py["span_id"].__get__(ids)
    checked = 0
    for a, b in _pairs(seed, 20_000):
        assert ids.span_id(a, b) == py["span_id"](ids, a, b), (a, b)
        assert ids.trace_id(a, b) == py["trace_id"](ids, a, b), (a, b)
        assert ids.stream_span_id(a, b) == py["stream_span_id"](ids, a, b), (a, b)
        assert ids.stream_trace_id(a, b) == py["stream_trace_id"](ids, a, b), (a, b)
        checked += 1
    assert ids.span_id(7) == py["span_id"](ids, 7) and ids.trace_id(7) == py["trace_id"](ids, 7)
    assert checked > 20_000


def test_c_ids_match_what_applications_compute() -> None:
    # bridge._abi names the kernel's server span from the application side: the same salt and
    # exchange id must give the same ids there.
    salt = bytes(range(_abi.ID_SALT_SIZE))
    ids = IdSource(salt)
    for ex in (1, 99, 2**40 + 3):
        assert ids.span_id(ex) == _abi.exchange_span_id(salt, ex)
        assert ids.trace_id(ex) == _abi.exchange_trace_id(salt, ex)


def test_c_ids_refuse_what_python_refuses() -> None:
    ids = IdSource(bytes(_abi.ID_SALT_SIZE))
    for bad in ("1", 1.0, None, b"\x01"):
        with pytest.raises(TypeError):
            ids.span_id(bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            ids.trace_id(1, bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ids.span_id()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        ids.stream_span_id(1)  # type: ignore[call-arg]
    from kernel_side import _fastspan

    with pytest.raises(ValueError, match="24 bytes"):
        _fastspan.Ids(b"short")
