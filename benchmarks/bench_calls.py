"""Warm call latency and cold start: IsolatedExecutor vs ProcessPoolExecutor vs loky.

    python benchmarks/bench_calls.py [--calls 3000] [--rounds 5] [--json PATH] [--cuda-plane]

Each system runs ``submit(identity, 1).result()`` in a loop; the systems take
turns in several rounds (this box is shared and noisy: interleaving keeps a
burst of noise from landing on one system only).  Prints a table of medians
and p99 in microseconds, and the ratio to ProcessPoolExecutor; writes JSON.

``mp.Queue pair`` is no executor: one ``multiprocessing`` queue each way between
two processes, a call being one message out and one back (no futures, no
function lookup).  It is the floor an executor's warm call stands on, and the
round trip bench_cuda.py's legacy-IPC cells pay (``legacy ∅`` there).
``--cuda-plane`` installs comfy_env's CUDA plane in the parent and the workers
first (imports torch; on a GPU machine: what an empty call costs with it).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_funcs import identity  # noqa: E402  (importable by reference in every worker)
from _common import cold_start, percentile, write_results  # noqa: E402

from comfy_env import IsolatedExecutor  # noqa: E402


def _queue_child(calls, results):
    while True:
        msg = calls.get()
        if msg is None:
            return
        fn, args = msg
        results.put(fn(*args))


class QueuePair:
    """Two ``multiprocessing`` queues and a process that serves them, behind
    ``submit(fn, *args).result()``: the round trip without an executor."""

    def __init__(self):
        ctx = multiprocessing.get_context("spawn")
        self._calls, self._results = ctx.Queue(), ctx.Queue()
        self._proc = ctx.Process(target=_queue_child, args=(self._calls, self._results), daemon=True)
        self._proc.start()

    def submit(self, fn, *args):
        self._calls.put((fn, args))
        return self

    def result(self, timeout=60):
        return self._results.get(timeout=timeout)

    def shutdown(self):
        self._calls.put(None)
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
        self._calls.close()
        self._results.close()


def _systems(cuda_plane=False):
    init = None
    if cuda_plane:
        from comfy_env.ipc.cuda import install
        install()
        init = install
    systems = {
        "comfy_env": lambda: IsolatedExecutor(max_workers=1, initializer=init),
        "ProcessPoolExecutor": lambda: ProcessPoolExecutor(max_workers=1),
    }
    try:
        from loky import get_reusable_executor  # noqa: F401
        from loky import ProcessPoolExecutor as LokyPPE

        systems["loky"] = lambda: LokyPPE(max_workers=1)
    except ImportError:
        print("loky not installed: skipped (pip install loky)", file=sys.stderr)
    systems["mp.Queue pair"] = QueuePair
    return systems


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "calls.json"))
    ap.add_argument("--cuda-plane", action="store_true")
    args = ap.parse_args(argv)
    systems = _systems(args.cuda_plane)
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
    return write_results(args.json, "calls", rows, cuda_plane=args.cuda_plane)


if __name__ == "__main__":
    main()
