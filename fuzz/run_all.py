"""Run every parser's fuzz target for N seconds each: ``python fuzz/run_all.py --seconds N``.

Each target runs in its own process (atheris/libFuzzer owns the process) with a corpus seeded
from the captured fixtures under tests/unit/fixtures. Exit status is non-zero if any target
found a crash, a hang (one input over 10 s) or an out-of-memory; its reproducer is left in
the working directory as libFuzzer writes it (crash-*, timeout-*, oom-*).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from fuzz._common import SEEDS, write_corpus  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=int, default=60, help="time per target (default 60)")
    ap.add_argument("--only", action="append", choices=sorted(SEEDS), help="run only these")
    ap.add_argument("--corpus-dir", type=Path, help="keep corpora here (default: a temp dir)")
    ap.add_argument("--no-atheris", action="store_true", help="use the plain mutational loop")
    opts = ap.parse_args()
    root = opts.corpus_dir or Path(tempfile.mkdtemp(prefix="ebpf-bridge-fuzz-"))
    failed = []
    for proto in opts.only or sorted(SEEDS):
        corpus = root / proto
        n = write_corpus(proto, corpus)
        argv = [sys.executable, str(HERE / f"fuzz_{proto}.py"), "--seconds", str(opts.seconds)]
        argv += ["--no-atheris"] if opts.no_atheris else [str(corpus)]
        t0 = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, text=True)
        dt = time.monotonic() - t0
        tail = (proc.stdout + proc.stderr).strip().splitlines()
        runs = next((ln for ln in reversed(tail) if "Done" in ln or "mutated inputs" in ln), "")
        status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
        print(f"{proto:9} {status:18} {dt:6.1f} s  {n:3d} seeds  {runs.strip()}")
        if proc.returncode != 0:
            failed.append(proto)
            print("\n".join(tail[-40:]))
    print(f"corpora in {root}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
