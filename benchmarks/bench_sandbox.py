"""What the bubblewrap sandbox costs: warm call, worker start, a 64 MiB array round trip.

    python benchmarks/bench_sandbox.py [--calls 2000] [--starts 15] [--rounds 5] [--json PATH]

Three set-ups take turns (this box is shared and noisy: interleaving keeps a burst of
noise from landing on one of them only; the order rotates every round):

* ``plain``: ``IsolatedExecutor()``
* ``sandbox``: ``IsolatedExecutor(sandbox=Sandbox())`` (whole FS read-only, no network)
* ``sandbox-list``: ``Sandbox(readable=[])`` (only the env and system dirs mounted)

Warm call: ``submit(identity, 1).result()`` in a loop, median and p99 in µs.  Worker
start: executor creation to the first result (a fresh worker each time), median in ms.
Array: a 64 MiB float64 array from ``shared_empty`` echoed (by descriptor both ways).
Prints a table with the difference to ``plain``; writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_funcs import identity  # noqa: E402  (importable by reference in every worker)
from _common import cold_start, percentile  # noqa: E402

import numpy as np  # noqa: E402

from comfy_env import IsolatedExecutor, Sandbox, shared_empty  # noqa: E402
from comfy_env import sandbox as sbmod  # noqa: E402

SETUPS = {
    "plain": lambda: IsolatedExecutor(),
    "sandbox": lambda: IsolatedExecutor(sandbox=Sandbox()),
    "sandbox-list": lambda: IsolatedExecutor(sandbox=Sandbox(readable=[])),
}


def warm_calls(ex, n):
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        ex.submit(identity, 1).result()
        out.append(time.perf_counter() - t0)
    return out


def array_echo(ex, a, n=5):
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        b = ex.submit(identity, a).result()
        out.append(time.perf_counter() - t0)
        assert np.shares_memory(a, b)
        del b
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--starts", type=int, default=15, help="worker starts per set-up, in total")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                    "results", "sandbox.json"))
    args = ap.parse_args(argv)
    sbmod.check_available()
    starts = {k: [] for k in SETUPS}
    warm = {k: [] for k in SETUPS}
    echo = {k: [] for k in SETUPS}
    a = shared_empty((64 << 20) // 8, np.float64)
    a[...] = 1.0
    per_round = max(1, args.starts // args.rounds)
    for k, make in SETUPS.items():          # warm-up: bwrap probe, page cache, imports
        cold_start(make)
    names = list(SETUPS)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]    # no set-up always goes first
        for _ in range(per_round):
            for k in order:
                starts[k].append(cold_start(SETUPS[k]))
        for k in order:
            with SETUPS[k]() as ex:
                warm_calls(ex, 100)
                warm[k] += warm_calls(ex, args.calls // args.rounds)
                echo[k] += array_echo(ex, a)
    res = {}
    for k in SETUPS:
        res[k] = {
            "warm_call_median_us": statistics.median(warm[k]) * 1e6,
            "warm_call_p99_us": percentile(warm[k], 0.99) * 1e6,
            "worker_start_median_ms": statistics.median(starts[k]) * 1e3,
            "worker_start_p90_ms": percentile(starts[k], 0.9) * 1e3,
            "echo_64MiB_median_ms": statistics.median(echo[k]) * 1e3,
            "n_calls": len(warm[k]), "n_starts": len(starts[k]),
        }
    base = res["plain"]
    print(f"{'set-up':14s} {'warm call µs':>13s} {'p99 µs':>8s} {'Δ vs plain':>11s} "
          f"{'start ms':>9s} {'Δ vs plain':>11s} {'64MiB echo ms':>14s}")
    for k, v in res.items():
        print(f"{k:14s} {v['warm_call_median_us']:13.1f} {v['warm_call_p99_us']:8.1f} "
              f"{v['warm_call_median_us'] - base['warm_call_median_us']:+11.1f} "
              f"{v['worker_start_median_ms']:9.1f} "
              f"{v['worker_start_median_ms'] - base['worker_start_median_ms']:+11.1f} "
              f"{v['echo_64MiB_median_ms']:14.2f}")
    out = {"machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
           "python": platform.python_version(), "bwrap": sbmod.probe()[0],
           "calls": args.calls, "starts": args.starts, "rounds": args.rounds, "results": res}
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
