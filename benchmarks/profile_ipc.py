"""GPU profile: where a worker → parent call of the ``ipc`` route spends its time.

Parent and worker on torch's native allocator (run with ``PYTORCH_CUDA_ALLOC_CONF=``).
For each size: the median of back-to-back calls returning the same worker tensor, then
the same calls under cProfile in the parent and in the worker (the worker's encode runs
on its calling thread), top functions by own time.  Beside it, the staging route for the
same tensor (``COMFY_ENV_CUDA_IPC_MIN_MIB`` above the size) and an empty call.

    PYTORCH_CUDA_ALLOC_CONF= PYTHONPATH=src python benchmarks/profile_ipc.py [--mib 64,1024,4096]
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import statistics
import sys
import time

import cloudpickle
import torch

from comfy_env import IsolatedExecutor
from comfy_env.ipc import lifetime
from comfy_env.ipc.cuda import install
from comfy_env.ipc.cuda.plane import PLANE

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def w_get(n):
    import builtins
    import torch
    cache = builtins.__dict__.setdefault("_profile_ipc_cache", {})
    t = cache.get(n)
    if t is None:
        t = cache[n] = torch.ones(n // 4, device="cuda")
        torch.cuda.synchronize()
    return t


def w_nothing():
    return None


def w_prof(on):
    import builtins
    import cProfile
    import io
    import pstats
    if on:
        builtins._profile_ipc_prof = p = cProfile.Profile()
        p.enable()
        return None
    p = builtins._profile_ipc_prof
    p.disable()
    s = io.StringIO()
    pstats.Stats(p, stream=s).sort_stats("cumtime").print_stats("comfy_env|built-in|method", 45)
    return s.getvalue()


def w_stats():
    from comfy_env.ipc.cuda.plane import PLANE
    return dict(PLANE.routes)


def timed(fn, reps):
    for _ in range(5):
        r = fn()
        torch.cuda.synchronize()
        del r
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        r = fn()
        torch.cuda.synchronize()
        del r
        out.append(time.perf_counter() - t0)
    return statistics.median(out) * 1e3, statistics.quantiles(out, n=4)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", default="64,1024,4096")
    ap.add_argument("--reps", type=int, default=100)
    a = ap.parse_args()
    install()
    torch.zeros(1, device="cuda")
    print("parent allocator", torch.cuda.get_allocator_backend(), flush=True)
    old = dict(os.environ)
    ex = IsolatedExecutor(env=None, max_workers=1, initializer=install)
    os.environ["COMFY_ENV_CUDA_IPC_MIN_MIB"] = "100000"
    st = IsolatedExecutor(env=None, max_workers=1, initializer=install)
    os.environ.clear()
    os.environ.update(old)
    try:
        ex.submit(w_nothing).result()
        st.submit(w_nothing).result()
        print(f"empty call {timed(lambda: ex.submit(w_nothing).result(), 300)[0]:.3f} ms", flush=True)
        for mib in map(int, a.mib.split(",")):
            n = mib << 20
            ms, q = timed(lambda: ex.submit(w_get, n).result(), a.reps)
            ms_st, _ = timed(lambda: st.submit(w_get, n).result(), a.reps)
            ms_e, _ = timed(lambda: ex.submit(w_nothing).result(), a.reps)
            print(f"{mib} MiB same tensor: ipc {ms:.3f} ms (q {[round(x * 1e3, 3) for x in q]}), "
                  f"staging {ms_st:.3f} ms, empty {ms_e:.3f} ms; parent ipc {PLANE.receiver.ipc.stats()}",
                  flush=True)
            ex.submit(w_prof, True).result()
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(a.reps):
                r = ex.submit(w_get, n).result()
                torch.cuda.synchronize()
                del r
            prof.disable()
            wtext = ex.submit(w_prof, False).result()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("cumtime").print_stats("comfy_env|built-in|method", 60)
            print(f"--- parent profile, {mib} MiB, {a.reps} calls\n{s.getvalue()}", flush=True)
            print(f"--- worker profile, {mib} MiB\n{wtext}", flush=True)
            gc.collect()
            lifetime.LEDGER.drain()
        print("worker routes", ex.submit(w_stats).result(), "staging worker", st.submit(w_stats).result())
    finally:
        ex.shutdown()
        st.shutdown()


if __name__ == "__main__":
    main()
