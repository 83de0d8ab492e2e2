"""Cost of the asyncio step hook per task step: ns/step with the hook vs without, for tasks
with and without business context. Prints a table and JSON; never pass/fail on time.

    python bench/asyncio_bench.py [--steps N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import bridge
import bridge.asyncio


class _Yield:
    def __await__(self):  # type: ignore[no-untyped-def]
        yield None


async def _steps(n: int, ctx: bool) -> None:
    if ctx:
        bridge.annotate(tenant_id="acme")
    y = _Yield()
    for _ in range(n):
        await y


def _run(n: int, hook: bool, ctx: bool) -> float:
    async def main() -> float:
        if hook:
            bridge.asyncio.install()
        t0 = time.perf_counter_ns()
        await asyncio.get_running_loop().create_task(_steps(n, ctx))
        return (time.perf_counter_ns() - t0) / n

    return min(asyncio.run(main()) for _ in range(5))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200_000)
    args = ap.parse_args()
    rows = {}
    for ctx in (False, True):
        base = _run(args.steps, False, ctx)
        hooked = _run(args.steps, True, ctx)
        rows["with_context" if ctx else "no_context"] = {
            "ns_per_step_plain": round(base, 1), "ns_per_step_hooked": round(hooked, 1),
            "hook_overhead_ns": round(hooked - base, 1)}
    st = bridge.status()
    print(f"agent connected: {st.connected}")
    print(f"{'task':<14}{'plain ns/step':>15}{'hooked ns/step':>16}{'overhead ns':>13}")
    for k, r in rows.items():
        print(f"{k:<14}{r['ns_per_step_plain']:>15}{r['ns_per_step_hooked']:>16}"
              f"{r['hook_overhead_ns']:>13}")
    print(json.dumps({"connected": st.connected, "steps": args.steps, **rows}))


if __name__ == "__main__":
    main()
