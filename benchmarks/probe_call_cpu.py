"""The caller's CPU per warm call: comfy_env's empty call beside a multiprocessing.Queue pair.

    PYTHONPATH=src python benchmarks/probe_call_cpu.py [--plane [--sync]] [--calls 3000] [--rounds 3]

Times ``submit(identity, 1).result()`` and one ``Queue.put`` + ``Queue.get`` round trip
with a process that echoes it (the round trip legacy CUDA IPC stands on in
bench_cuda.py), alternating in one process, and prints per call: the median wall time,
the calling thread's CPU (``time.thread_time``) and the whole process's CPU (the pair's
feeder thread included).  A call whose caller is on the CPU for most of its wall time is
bound by the caller's own Python, not by waking processes.  ``--plane`` installs the
CUDA plane in the parent and the worker first (a GPU host), ``--sync`` adds
``torch.cuda.synchronize()`` after each call of either, as bench_cuda.py does.

``--count`` then counts the function calls our caller makes per empty call
(``sys.setprofile`` on the calling thread: Python functions by file, and C functions),
for comparing two trees where the wall and CPU figures are within the noise.  It has two
modes: the profiler slows the caller, so the parent's reader thread sometimes reads the
result first and the caller only waits on its future; ``executor/worker_handle.py``
then counts 4 calls instead of 7.  Compare runs in the same mode.
"""
from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from _bench_funcs import identity  # noqa: E402
from comfy_env import IsolatedExecutor  # noqa: E402


def _echo(q_in, q_out):
    # Not bench_calls.QueuePair, which sends a function and its arguments and calls it:
    # its caller uses about 6 µs more CPU per round trip (2-core box), and legacy IPC's
    # empty round trip in bench_cuda.py sends a bare message, as this does.
    while True:
        m = q_in.get()
        if m is None:
            return
        q_out.put(m)


def measure(fn, calls, warm=300):
    """``(median wall µs, calling thread's CPU µs, process CPU µs)`` per call."""
    for _ in range(warm):
        fn()
    walls = []
    c0, p0 = time.thread_time(), time.process_time()
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t)
    c1, p1 = time.thread_time(), time.process_time()
    return statistics.median(walls) * 1e6, (c1 - c0) / calls * 1e6, (p1 - p0) / calls * 1e6


def count_calls(fn, calls=2000):
    """``(Python calls, C calls, {file: Python calls})`` per call of ``fn`` on this thread."""
    for _ in range(300):
        fn()
    counts = collections.Counter()

    def prof(frame, event, arg):
        if event == "call":
            path = frame.f_code.co_filename
            counts["/".join(path.split(os.sep)[-2:])] += 1
        elif event == "c_call":
            counts[None] += 1

    sys.setprofile(prof)
    try:
        for _ in range(calls):
            fn()
    finally:
        sys.setprofile(None)
    c = counts.pop(None, 0)
    return sum(counts.values()) / calls, c / calls, {k: v / calls for k, v in counts.most_common()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--plane", action="store_true")
    ap.add_argument("--sync", action="store_true")
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--count", action="store_true")
    args = ap.parse_args()
    sync = init = None
    if args.plane:
        import torch
        from comfy_env.ipc.cuda import install
        install()
        torch.zeros(1, device="cuda")
        init = install
        if args.sync:
            sync = torch.cuda.synchronize
    ex = IsolatedExecutor(max_workers=1, initializer=init)
    ctx = mp.get_context("spawn")
    q_in, q_out = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_echo, args=(q_in, q_out), daemon=True)
    proc.start()
    q_in.put(1)
    q_out.get()

    def ours():
        ex.submit(identity, 1).result()
        if sync is not None:
            sync()

    def pair():
        q_in.put(1)
        q_out.get()
        if sync is not None:
            sync()

    try:
        print(f"plane={args.plane} sync={args.sync}: µs per call, wall (median) / caller thread CPU / "
              f"process CPU (means)")
        for _ in range(args.rounds):
            for name, fn in (("comfy_env", ours), ("mp.Queue pair", pair)):
                wall, cpu, pcpu = measure(fn, args.calls)
                print(f"  {name:<14} {wall:7.1f} {cpu:7.1f} {pcpu:7.1f}", flush=True)
        if args.count:
            py, c, by_file = count_calls(ours)
            print(f"comfy_env's caller per empty call: {py:.1f} Python function calls, {c:.1f} C calls; "
                  f"Python calls by file:")
            for f, n in by_file.items():
                if n >= 0.5:
                    print(f"  {f:<40} {n:5.1f}")
    finally:
        q_in.put(None)
        proc.join(5)
        ex.shutdown()


if __name__ == "__main__":
    main()
