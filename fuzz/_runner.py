"""Run one fuzz target: under atheris (coverage-guided) when it is installed, else a plain
mutational loop over the seeds, so the command works everywhere."""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fuzz._common import SEEDS

_INTERESTING = [b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff",
                b"\x00\x00\x00\x08", b"-1\r\n", b"9999999999"]


def _mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(6)
        if op == 0 and b:  # flip a byte
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 1 and b:  # truncate
            del b[rng.randrange(len(b)) :]
        elif op == 2:  # insert random bytes
            i = rng.randint(0, len(b))
            b[i:i] = rng.randbytes(rng.randint(1, 32))
        elif op == 3 and b:  # duplicate a slice (pipelining, repeated headers)
            i = rng.randrange(len(b))
            j = min(len(b), i + rng.randint(1, 256))
            b[j:j] = b[i:j] * rng.randint(1, 4)
        elif op == 4 and pool:  # splice with another input (interleaving)
            other = rng.choice(pool)
            i = rng.randint(0, len(b))
            b[i:] = other[rng.randint(0, len(other)) :]
        elif op == 5 and b:  # interesting integers in length fields
            i = rng.randrange(len(b))
            b[i : i + 4] = rng.choice(_INTERESTING)
    return bytes(b)


def main(proto: str, test_one_input: Callable[[bytes], None]) -> None:
    """``python fuzz/fuzz_<proto>.py [--seconds N] [libFuzzer flags] [corpus dirs]``."""
    args = sys.argv[1:]
    seconds = 30
    if "--seconds" in args:
        i = args.index("--seconds")
        seconds = int(args[i + 1])
        del args[i : i + 2]
    try:
        import atheris
    except ImportError:
        atheris = None
    if atheris is not None and "--no-atheris" not in args:
        corpus = [a for a in args if not a.startswith("-")]
        if not corpus:
            from fuzz._common import write_corpus

            d = Path(f"/tmp/ebpf-bridge-fuzz/{proto}")
            write_corpus(proto, d)
            args.append(str(d))
        flags = [a for a in args if a.startswith("-")]
        if not any(a.startswith("-max_total_time") for a in flags):
            args.insert(0, f"-max_total_time={seconds}")
        if not any(a.startswith("-rss_limit_mb") for a in flags):
            args.insert(0, "-rss_limit_mb=2048")
        if not any(a.startswith("-timeout") for a in flags):
            args.insert(0, "-timeout=10")  # one input taking 10 s is a hang: fail
        atheris.Setup([sys.argv[0], *args], test_one_input)
        atheris.Fuzz()
        return
    rng = random.Random(0)
    pool = list(SEEDS[proto]())
    deadline = time.monotonic() + seconds
    runs = 0
    for seed in pool:
        test_one_input(seed)
    while time.monotonic() < deadline:
        data = _mutate(rng, rng.choice(pool), pool)
        t = time.monotonic()
        test_one_input(data)
        if time.monotonic() - t > 10:
            raise AssertionError(f"{proto}: one input took over 10 s: {data!r}")
        runs += 1
        if runs % 97 == 0 and len(pool) < 4096:
            pool.append(data)
    print(f"{proto}: {runs} mutated inputs, no failure (plain mutation, no atheris)")
