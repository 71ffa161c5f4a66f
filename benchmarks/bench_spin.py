"""What a worker's polling for its next call (``COMFY_ENV_WORKER_SPIN_US``) buys and costs.

    python benchmarks/bench_spin.py [--calls 3000] [--rounds 3] [--json PATH]

Rows, side by side in one run (the settings take turns in several rounds; this box is
shared and noisy), each with the worker polling (the default, 300 µs) and sleeping
(``COMFY_ENV_WORKER_SPIN_US=0``), and ProcessPoolExecutor beside them:

* **loop**: ``submit(f, i).result()`` one after the other, one worker: median µs per
  call, and the CPU time the worker process and the parent spent per call;
* **sparse**: the same with 2 ms of the caller's own work between calls (the worker
  should stop polling: its CPU per call shows whether it did);
* **bursts**: blocks of 16 calls back to back after 20 ms of idle (a graph queued again,
  a benchmark's next block): median µs per call within the blocks (the worker should
  poll again soon after a pause put it to sleep);
* **flood**: 4 workers on however many CPUs there are, ``submit`` 4,000 calls then wait
  for all: calls per second (polling workers must not slow a full machine down).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, wait

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_funcs import identity  # noqa: E402
from _common import write_results  # noqa: E402

from comfy_env import IsolatedExecutor  # noqa: E402


def _cpu_s(pid):
    """CPU seconds of all threads of ``pid`` (schedstat: nanoseconds, not clock ticks)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            pass
    return total / 1e9


def _self_cpu():
    return time.process_time()


def loop(ex, calls, pause=0.0):
    pids = ex.worker_pids() if hasattr(ex, "worker_pids") else []
    w0 = sum(_cpu_s(p) for p in pids)
    p0 = _self_cpu()
    times = []
    for i in range(calls):
        t = time.perf_counter()
        ex.submit(identity, i).result()
        times.append(time.perf_counter() - t)
        if pause:
            end = time.perf_counter() + pause
            while time.perf_counter() < end:        # the caller's own work
                pass
    w1 = sum(_cpu_s(p) for p in pids)
    p1 = _self_cpu()
    out = {"us": statistics.median(times) * 1e6}
    if pids:
        out["worker_cpu_us"] = (w1 - w0) / calls * 1e6
    # The parent's CPU includes the caller's own busy pause: take it out.
    out["parent_cpu_us"] = ((p1 - p0) - pause * calls) / calls * 1e6
    return out


def bursts(ex, blocks, size=16, idle=0.02):
    times = []
    for _ in range(blocks):
        time.sleep(idle)
        for i in range(size):
            t = time.perf_counter()
            ex.submit(identity, i).result()
            times.append(time.perf_counter() - t)
    return {"us": statistics.median(times) * 1e6}


def flood(ex, calls):
    t = time.perf_counter()
    futs = [ex.submit(identity, i) for i in range(calls)]
    wait(futs)
    return {"calls_per_s": calls / (time.perf_counter() - t)}


def _with_spin(value, make):
    old = os.environ.get("COMFY_ENV_WORKER_SPIN_US")
    if value is None:
        os.environ.pop("COMFY_ENV_WORKER_SPIN_US", None)      # the default
    else:
        os.environ["COMFY_ENV_WORKER_SPIN_US"] = str(value)
    try:
        return make()
    finally:
        if old is None:
            os.environ.pop("COMFY_ENV_WORKER_SPIN_US", None)
        else:
            os.environ["COMFY_ENV_WORKER_SPIN_US"] = old


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    systems = {
        "comfy_env (polls, default)": lambda n: _with_spin(None, lambda: IsolatedExecutor(max_workers=n)),
        "comfy_env (sleeps, SPIN_US=0)": lambda n: _with_spin(0, lambda: IsolatedExecutor(max_workers=n)),
        "ProcessPoolExecutor": lambda n: ProcessPoolExecutor(max_workers=n),
    }
    res = {name: {"loop": [], "sparse": [], "bursts": [], "flood": []} for name in systems}
    execs = {}
    try:
        for name, make in systems.items():
            one, four = make(1), make(4)
            one.submit(identity, 0).result()
            wait([four.submit(identity, i) for i in range(16)])
            execs[name] = (one, four)
        for r in range(a.rounds):
            for name, (one, four) in execs.items():
                loop(one, 200)
                res[name]["loop"].append(loop(one, a.calls))
                res[name]["sparse"].append(loop(one, max(50, a.calls // 20), pause=0.002))
                res[name]["bursts"].append(bursts(one, max(10, a.calls // 100)))
                res[name]["flood"].append(flood(four, 4000))
            print(f"round {r + 1} of {a.rounds} done", file=sys.stderr)
    finally:
        for one, four in execs.values():
            one.shutdown()
            four.shutdown()

    def med(rows, key):
        vals = [x[key] for x in rows if key in x]
        return statistics.median(vals) if vals else None

    ppe = med(res["ProcessPoolExecutor"]["loop"], "us")
    rows = []
    print(f"{len(os.sched_getaffinity(0))} CPUs, Python {sys.version.split()[0]}")
    print(f"{'system':<32} {'loop us':>8} {'vs PPE':>7} {'worker CPU':>11} {'parent CPU':>11} "
          f"{'sparse: worker CPU':>19} {'bursts us':>10} {'flood calls/s':>14}")
    for name in systems:
        d = res[name]
        row = {"system": name, "loop_us": med(d["loop"], "us"),
               "loop_worker_cpu_us": med(d["loop"], "worker_cpu_us"),
               "loop_parent_cpu_us": med(d["loop"], "parent_cpu_us"),
               "sparse_us": med(d["sparse"], "us"),
               "sparse_worker_cpu_us": med(d["sparse"], "worker_cpu_us"),
               "bursts_us": med(d["bursts"], "us"),
               "flood_calls_per_s": med(d["flood"], "calls_per_s")}
        row["loop_vs_ppe"] = row["loop_us"] / ppe
        rows.append(row)
        f = (lambda v: "n/a" if v is None else f"{v:.1f}")
        print(f"{name:<32} {row['loop_us']:8.1f} {row['loop_vs_ppe']:7.2f} {f(row['loop_worker_cpu_us']):>11} "
              f"{f(row['loop_parent_cpu_us']):>11} {f(row['sparse_worker_cpu_us']):>19} {f(row['bursts_us']):>10} "
              f"{row['flood_calls_per_s']:14.0f}")
    write_results(a.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "spin.json"),
                  "spin", rows)


if __name__ == "__main__":
    main()
