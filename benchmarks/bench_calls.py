"""Warm call latency and cold start: IsolatedExecutor vs ProcessPoolExecutor vs loky.

    python benchmarks/bench_calls.py [--calls 3000] [--rounds 5] [--json PATH]

Each system runs ``submit(identity, 1).result()`` in a loop; the systems take
turns in several rounds (this box is shared and noisy: interleaving keeps a
burst of noise from landing on one system only).  Prints a table of medians
and p99 in microseconds, and the ratio to ProcessPoolExecutor; writes JSON.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_funcs import identity  # noqa: E402  (importable by reference in every worker)
from _common import cold_start, percentile, write_results  # noqa: E402

from comfy_env import IsolatedExecutor  # noqa: E402


def _systems():
    systems = {
        "comfy_env": lambda: IsolatedExecutor(max_workers=1),
        "ProcessPoolExecutor": lambda: ProcessPoolExecutor(max_workers=1),
    }
    try:
        from loky import get_reusable_executor  # noqa: F401
        from loky import ProcessPoolExecutor as LokyPPE

        systems["loky"] = lambda: LokyPPE(max_workers=1)
    except ImportError:
        print("loky not installed: skipped (pip install loky)", file=sys.stderr)
    return systems


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "calls.json"))
    args = ap.parse_args(argv)
    systems = _systems()
    samples = {name: [] for name in systems}
    colds = {name: [] for name in systems}
    executors = {}
    for name, make in systems.items():
        colds[name].append(cold_start(make))
        ex = make()
        for _ in range(300):
            ex.submit(identity, 1).result()
        executors[name] = ex
    for r in range(args.rounds):
        for name, ex in executors.items():
            ts = samples[name]
            for _ in range(args.calls // args.rounds):
                t = time.perf_counter()
                ex.submit(identity, 1).result()
                ts.append(time.perf_counter() - t)
        for name, make in systems.items():
            if r < 2:
                colds[name].append(cold_start(make))
    for ex in executors.values():
        ex.shutdown()

    base = statistics.median(samples["ProcessPoolExecutor"])
    rows = []
    for name, ts in samples.items():
        med = statistics.median(ts)
        rows.append({
            "system": name,
            "median_us": med * 1e6,
            "p99_us": percentile(ts, 0.99) * 1e6,
            "ratio_to_ProcessPoolExecutor": med / base,
            "cold_start_ms": statistics.median(colds[name]) * 1e3,
            "calls": len(ts),
        })
    print(f"\nwarm submit(identity, 1).result(), {platform.node()} "
          f"({os.cpu_count()} CPUs, Python {platform.python_version()})")
    print(f"{'system':<22}{'median us':>12}{'p99 us':>12}{'vs PPE':>10}{'cold start ms':>16}")
    for r in rows:
        print(f"{r['system']:<22}{r['median_us']:>12.1f}{r['p99_us']:>12.1f}"
              f"{r['ratio_to_ProcessPoolExecutor']:>10.2f}{r['cold_start_ms']:>16.1f}")
    return write_results(args.json, "calls", rows)


if __name__ == "__main__":
    main()
