"""Where a call's CPU time goes, in the parent and in the worker (every thread), by function.

    PYTHONPATH=src python benchmarks/profile_calls.py [--n 2000] [--cuda 1048576]

Needs ``yappi`` in both processes (the workers run this interpreter).  Runs ``--n``
empty calls, then (``--cuda BYTES``) as many parent → worker calls of one CUDA tensor
of that size sent again each call (the parent's tensor, kept), and (``--fresh BYTES``)
as many worker → parent calls returning a new tensor of that size each, and prints for each the
functions with the most CPU time of their own (yappi's ``tsub``) per call, per
process.  yappi slows every Python function down, so read the split, not the totals;
benchmarks/bench_calls.py and bench_cuda.py give the real figures.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

import cloudpickle  # noqa: E402
import yappi  # noqa: E402

from comfy_env import IsolatedExecutor  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def w_nothing(*_args):
    return None


def w_fresh(nbytes):
    """A new CUDA tensor each call (a node's output)."""
    import torch
    return torch.empty(nbytes // 4, device="cuda")


def w_start():
    import yappi
    yappi.clear_stats()
    yappi.set_clock_type("cpu")
    yappi.start(builtins=True)


def w_stop(calls, top):
    import yappi
    yappi.stop()
    return _table(yappi.get_func_stats(), calls, top)


def _table(stats, calls, top):
    rows = sorted(stats, key=lambda s: s.tsub, reverse=True)[:top]
    out = io.StringIO()
    total = sum(s.tsub for s in stats)
    out.write(f"{'own µs/call':>11} {'incl µs/call':>12} {'ncalls/call':>11}  function\n")
    for s in rows:
        where = f"{os.path.basename(s.module)}:{s.lineno}" if s.module else ""
        out.write(f"{s.tsub / calls * 1e6:11.2f} {s.ttot / calls * 1e6:12.2f} {s.ncall / calls:11.2f}  "
                  f"{s.name} ({where})\n")
    out.write(f"{total / calls * 1e6:11.2f} {'':>12} {'':>11}  all functions\n")
    return out.getvalue()


def profile(ex, label, call, n, top):
    for _ in range(200):
        call()
    times = []
    for _ in range(300):              # the real figure, before yappi slows everything down
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    print(f"\n{label}: {statistics.median(times) * 1e6:.1f} µs per call (median of 300, unprofiled)")
    ex.submit(w_start).result()
    yappi.clear_stats()
    yappi.set_clock_type("cpu")
    yappi.start(builtins=True)
    for _ in range(n):
        call()
    yappi.stop()
    parent = _table(yappi.get_func_stats(), n, top)
    worker = ex.submit(w_stop, n + 1, top).result()
    print(f"\n=== {label}: parent (per call, CPU) ===\n{parent}")
    print(f"=== {label}: worker (per call, CPU) ===\n{worker}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--top", type=int, default=35)
    ap.add_argument("--cuda", type=int, default=0, help="also profile parent → worker of a CUDA tensor of this size")
    ap.add_argument("--fresh", type=int, default=0,
                    help="also profile worker → parent of a new CUDA tensor of this size each call")
    args = ap.parse_args()
    init = None
    if args.cuda or args.fresh:
        from comfy_env.ipc.cuda import install
        install()
        init = install
    with IsolatedExecutor(env=None, initializer=init) as ex:
        ex.submit(w_nothing).result()
        profile(ex, "empty call", lambda: ex.submit(w_nothing).result(), args.n, args.top)
        if args.cuda:
            import torch
            x = torch.ones(args.cuda // 4, device="cuda")
            torch.cuda.synchronize()

            def p2w():
                ex.submit(w_nothing, x).result()
                torch.cuda.synchronize()
            profile(ex, f"parent → worker, {args.cuda} bytes", p2w, args.n, args.top)
        if args.fresh:
            import torch

            def w2p_fresh():
                t = ex.submit(w_fresh, args.fresh).result()
                torch.cuda.synchronize()
                return t                  # dropped by the caller: the next call's tensor is new
            profile(ex, f"worker → parent, a new {args.fresh}-byte tensor each call", w2p_fresh, args.n, args.top)


if __name__ == "__main__":
    main()
