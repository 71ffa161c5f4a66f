"""Chain latency A -> B: forwarding a future vs materialising its result in the parent.

    python benchmarks/bench_chains.py [--reps-small 100] [--reps-large 15] [--json PATH]

Worker A returns a uint8 array (built in shared memory); worker B receives it
and returns one byte of it.  For each size the modes take turns in every
repetition (the box is noisy: interleaving spreads bursts over all modes):

* ``chain``        ``fb = ex_b.submit(g, fa)``: the parent forwards fa's undecoded
                   result (no map, no copy in the parent);
* ``materialise``  ``x = fa.result(); ex_b.submit(g, x)``: the parent maps the segment
                   and sends the array back out by reference (still no copy: it lives
                   in shared memory already);
* ``parent copy``  ``x = np.array(fa.result()); ex_b.submit(g, x)``: what a system
                   without shared-memory-aware sending pays (a copy in the parent, a
                   copy into a segment on the way out).  Context only.

Two figures per mode, medians over the repetitions:

* ``handoff``: from "fa is done" to "fb's result is back" (the cost of the A -> B
  hand-off itself, g is O(1));
* ``end to end``: submit A's call and B's at once (chain mode submits fb before fa is
  done; the other modes must wait for fa first), until fb's result is back.

Prints a table (milliseconds) and writes JSON (default benchmarks/results/chains.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

MiB = 1 << 20
MODES = ("chain", "materialise", "parent copy")


# -- worker functions (env=None workers import this module by name) -----------------------
def make(nbytes, fill):
    from comfy_env.ipc import arrays

    a = arrays.shared_empty(nbytes, "uint8")
    a.fill(fill)
    return a


def first(x):
    return int(x[0])


# -- parent side ------------------------------------------------------------------------------
def _trip(a, b, mode, nbytes, fill, end_to_end=False):
    """Time A -> B in ``mode``: from A's result being ready (hand-off), or from
    submitting to A (``end_to_end``: A's filling of the array included)."""
    import numpy as np

    import bench_chains as me

    t0 = time.perf_counter()
    fa = a.submit(me.make, nbytes, fill)
    if not end_to_end:
        fa.exception()                               # done, not decoded
        t0 = time.perf_counter()
    if mode == "chain":
        fb = b.submit(me.first, fa)
    elif mode == "materialise":
        fb = b.submit(me.first, fa.result())
    else:
        fb = b.submit(me.first, np.array(fa.result()))
    got = fb.result()
    dt = time.perf_counter() - t0
    assert got == fill, (mode, got, fill)
    return dt


def _handoff(a, b, mode, nbytes, fill):
    return _trip(a, b, mode, nbytes, fill)


def _end_to_end(a, b, mode, nbytes, fill):
    return _trip(a, b, mode, nbytes, fill, end_to_end=True)


def run(sizes, reps):
    from comfy_env import IsolatedExecutor
    from comfy_env.ipc import shm

    import bench_chains as me

    results = {}
    with IsolatedExecutor(name="bench-A") as a, IsolatedExecutor(name="bench-B") as b:
        for ex in (a, b):
            ex.submit(me.first, b"\x01").result()
        for nbytes in sizes:
            n = reps[nbytes]
            samples = {m: {"handoff": [], "end_to_end": []} for m in MODES}
            # One warm-up round per mode: fault the arena's pages in, import numpy.
            for m in MODES:
                _handoff(a, b, m, nbytes, 1)
            chain_stats = None
            for i in range(n):
                fill = 2 + i % 200
                for m in MODES:
                    before = dict(shm.STATS)
                    samples[m]["handoff"].append(_handoff(a, b, m, nbytes, fill))
                    if m == "chain":
                        after = dict(shm.STATS)
                        chain_stats = {k: after[k] - before[k] for k in after}
                    samples[m]["end_to_end"].append(_end_to_end(a, b, m, nbytes, fill))
            results[nbytes] = {
                m: {k: {"median_ms": statistics.median(v) * 1e3,
                        "min_ms": min(v) * 1e3,
                        "samples_ms": [x * 1e3 for x in v]} for k, v in d.items()}
                for m, d in samples.items()
            }
            results[nbytes]["chain_parent_dataplane_delta"] = chain_stats
            results[nbytes]["reps"] = n
    return results


def make_cuda(nbytes, fill):
    import torch

    return torch.full((nbytes,), fill, dtype=torch.uint8, device="cuda")


def first_cuda(t):
    return int(t[0].item())


def run_gpu(nbytes, reps):
    """A -> B with a CUDA tensor: forwarded (the parent imports nothing) vs materialised
    in the parent (``fa.result()`` imports it, the next submit stages it again)."""
    import torch

    from comfy_env import IsolatedExecutor
    from comfy_env.ipc.cuda import install

    import bench_chains as me

    install()
    out = {m: [] for m in ("chain", "materialise")}
    with IsolatedExecutor(name="gpu-A", initializer=install) as a, \
            IsolatedExecutor(name="gpu-B", initializer=install) as b:
        for i in range(reps + 1):
            for m in out:
                fill = 1 + i % 200
                fa = a.submit(me.make_cuda, nbytes, fill)
                fa.exception()
                t0 = time.perf_counter()
                fb = b.submit(me.first_cuda, fa if m == "chain" else fa.result())
                got = fb.result()
                dt = time.perf_counter() - t0
                assert got == fill
                if i:                                  # round 0 warms up
                    out[m].append(dt)
                del fa, fb
        torch.cuda.synchronize()
    return {m: {"median_ms": statistics.median(v) * 1e3, "samples_ms": [x * 1e3 for x in v]}
            for m, v in out.items()}


def _label(nbytes):
    return f"{nbytes // MiB} MiB" if nbytes >= MiB else f"{nbytes // 1024} KiB"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps-small", type=int, default=100, help="repetitions for 1 MiB")
    ap.add_argument("--reps-large", type=int, default=15, help="repetitions for 256 MiB")
    ap.add_argument("--json", default=os.path.join(_HERE, "results", "chains.json"))
    ap.add_argument("--gpu", action="store_true",
                    help="only the GPU chain: a 1 GiB CUDA tensor A -> B (needs a CUDA GPU)")
    ap.add_argument("--gpu-reps", type=int, default=10)
    args = ap.parse_args(argv)
    if args.gpu:
        import torch

        res = run_gpu(1 << 30, args.gpu_reps)
        name = torch.cuda.get_device_name(0)
        print(f"\nGPU chain A -> B, 1 GiB CUDA tensor, {name}, parent allocator "
              f"{torch.cuda.get_allocator_backend()}: medians in ms")
        for m, r in res.items():
            print(f"  {m:<12} {r['median_ms']:9.2f}")
        path = args.json.replace("chains.json", "chains_gpu.json")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"benchmark": "chains-gpu", "gpu": name, "results": res}, f, indent=1)
        print(f"wrote {path}")
        return

    sizes = [1 * MiB, 256 * MiB]
    reps = {1 * MiB: args.reps_small, 256 * MiB: args.reps_large}
    res = run(sizes, reps)

    print(f"\nchain A -> B, medians in ms ({os.cpu_count()} CPUs, {platform.machine()}, "
          f"Python {platform.python_version()})")
    head = f"{'size':>8} | {'mode':<12} | {'handoff':>9} | {'end to end':>10}"
    print(head)
    print("-" * len(head))
    for nbytes in sizes:
        for m in MODES:
            r = res[nbytes][m]
            print(f"{_label(nbytes):>8} | {m:<12} | {r['handoff']['median_ms']:9.2f} | "
                  f"{r['end_to_end']['median_ms']:10.2f}")
        print(f"{'':>8}   parent maps/copies during a chain hand-off: "
              f"{res[nbytes]['chain_parent_dataplane_delta']}")

    out = {
        "benchmark": "chains",
        "machine": {"cpus": os.cpu_count(), "machine": platform.machine(),
                    "python": platform.python_version(), "platform": platform.platform()},
        "modes": list(MODES),
        "results": {_label(k): v for k, v in res.items()},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
