"""Warm calls with a ``__main__`` function vs a module function, and worker restarts.

    python benchmarks/bench_perf.py [--calls 2000] [--rounds 4] [--restarts 5] [--json PATH]

Rows, each system side by side in one run (ProcessPoolExecutor, loky, comfy_env):

* warm ``submit(f, 1).result()`` with ``f`` defined in this script (``__main__``:
  comfy_env and loky pickle it by value) and with ``f`` imported from a module;
* cold start: a new executor until its first call that needs torch returns;
* restart after a crash: a worker that imported torch dies (``os._exit``), then
  the time until the next call that needs torch returns a result
  (ProcessPoolExecutor breaks on a crash: rebuilding it is its restart);
* restart after a timeout (comfy_env's ``call_timeout`` only): from the
  CallTimeout of a hung call to the next result that needs torch.

The systems take turns in several rounds (this box is shared and noisy).
Prints medians; writes JSON.
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
from _bench_funcs import crash, hang, identity, import_torch  # noqa: E402
from _common import cold_start, write_results  # noqa: E402

from comfy_env import IsolatedExecutor  # noqa: E402


def main_identity(x):
    """Defined in ``__main__``: pickled by value by comfy_env and loky."""
    return x


def _systems(preload):
    systems = {"comfy_env": lambda: IsolatedExecutor(max_workers=1)}
    if preload:
        systems["comfy_env preload=torch"] = lambda: IsolatedExecutor(max_workers=1, preload=["torch"])
    systems["ProcessPoolExecutor"] = lambda: ProcessPoolExecutor(max_workers=1)
    try:
        from loky import ProcessPoolExecutor as LokyPPE

        systems["loky"] = lambda: LokyPPE(max_workers=1)
    except ImportError:
        print("loky not installed: skipped (pip install loky)", file=sys.stderr)
    return systems


def _restart(ex, make):
    """Crash the worker, then time until a call needing torch has its result.

    ProcessPoolExecutor breaks on a crash: it must be rebuilt (counted)."""
    try:
        ex.submit(crash).result()
    except Exception:
        pass
    t0 = time.perf_counter()
    try:
        ex.submit(import_torch).result()
    except Exception:       # BrokenProcessPool: a new pool is the restart
        ex.shutdown()
        ex = make()
        ex.submit(import_torch).result()
    return time.perf_counter() - t0, ex


def _restart_after_timeout(ex):
    try:
        ex.submit(hang).result()
    except Exception:
        pass
    t0 = time.perf_counter()
    ex.submit(import_torch).result()
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--restarts", type=int, default=5)
    ap.add_argument("--cold", type=int, default=3)
    ap.add_argument("--label", default="")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "perf.json"))
    args = ap.parse_args(argv)
    import inspect
    preload = "preload" in inspect.signature(IsolatedExecutor).parameters
    systems = _systems(preload)
    funcs = {"__main__ fn": main_identity, "module fn": identity}
    samples = {(s, f): [] for s in systems for f in funcs}
    restarts = {s: [] for s in systems}
    executors = {}
    for name, make in systems.items():
        ex = make()
        for f in funcs.values():
            for _ in range(200):
                ex.submit(f, 1).result()
        executors[name] = ex
    for r in range(args.rounds):
        for name, ex in executors.items():
            for fname, f in funcs.items():
                ts = samples[(name, fname)]
                for _ in range(args.calls // args.rounds):
                    t = time.perf_counter()
                    ex.submit(f, 1).result()
                    ts.append(time.perf_counter() - t)
    for name, ex in executors.items():
        ex.submit(import_torch).result()
    for _ in range(args.restarts):
        for name in systems:
            dt, executors[name] = _restart(executors[name], systems[name])
            restarts[name].append(dt)
    for ex in executors.values():
        ex.shutdown()
    colds = {s: [] for s in systems}
    for _ in range(args.cold):
        for name, make in systems.items():
            colds[name].append(cold_start(make, import_torch))
    timeouts = {}
    for name in systems:
        if name.startswith("comfy_env"):
            kw = {"preload": ["torch"]} if "preload" in name else {}
            ex = IsolatedExecutor(max_workers=1, call_timeout=5.0, **kw)   # > a cold import of torch
            ex.submit(import_torch).result()
            timeouts[name] = statistics.median(_restart_after_timeout(ex) for _ in range(3))
            ex.shutdown()

    rows = []
    base = {f: statistics.median(samples[("ProcessPoolExecutor", f)]) for f in funcs}
    for name in systems:
        row = {"system": name}
        for fname in funcs:
            med = statistics.median(samples[(name, fname)])
            row[f"{fname} us"] = med * 1e6
            row[f"{fname} vs PPE"] = med / base[fname]
        row["cold start ms"] = statistics.median(colds[name]) * 1e3
        row["restart after crash ms"] = statistics.median(restarts[name]) * 1e3
        row["restart after timeout ms"] = timeouts[name] * 1e3 if name in timeouts else None
        rows.append(row)
    print(f"\n{args.label} {platform.node()} ({os.cpu_count()} CPUs, Python {platform.python_version()})")
    print("warm call: submit(f, 1).result(); times to a result of a call that imports torch")
    print(f"{'system':<26}{'__main__ fn us':>16}{'vs PPE':>8}{'module fn us':>14}{'vs PPE':>8}"
          f"{'cold ms':>10}{'crash ms':>10}{'timeout ms':>12}")
    for r in rows:
        t = r["restart after timeout ms"]
        print(f"{r['system']:<26}{r['__main__ fn us']:>16.1f}{r['__main__ fn vs PPE']:>8.2f}"
              f"{r['module fn us']:>14.1f}{r['module fn vs PPE']:>8.2f}{r['cold start ms']:>10.0f}"
              f"{r['restart after crash ms']:>10.0f}{'n/a' if t is None else format(t, '.0f'):>12}")
    return write_results(args.json, "perf", rows, label=args.label)


if __name__ == "__main__":
    main()
