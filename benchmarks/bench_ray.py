"""IsolatedExecutor vs RayExecutor (local Ray) vs plain ``ray.remote``, in one run.

    python benchmarks/bench_ray.py [--rounds 3] [--json PATH]

Measured (medians over rounds; the systems take turns inside each round, the box
is shared and noisy):

* warm call latency: ``submit(noop).result()`` (``ray.get(noop.remote())``), after warm-up
  (``noop`` is defined in this script, ``__main__``, as a user's function would be);
* numpy echo 64 / 256 MiB: the driver sends an array, the worker returns it, the
  driver holds the result (each system's own zero-copy view, none copied out);
* chain A -> B 256 MiB: A makes 256 MiB, B (another executor) receives A's future
  and returns a checksum; the driver never asks for A's value.  Also reported: how
  much the driver's RSS grew over the chain, and as a control, how much it grows
  when the driver does fetch and read A's 256 MiB (measured first, on fresh pages).

Needs Ray (``pip install 'comfy-env[ray]'``).  Writes JSON under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "ray.json")


def noop():
    return None


def echo(a):
    return a


def produce(mib):
    import numpy as np
    a = np.empty(mib << 20, dtype=np.uint8)
    a[::4096] = 1            # every page written once
    return a


def checksum(a):
    return int(a[::4096].sum())


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(fn, reps):
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=200, help="warm calls per system per round")
    ap.add_argument("--json", default=RESULTS)
    args = ap.parse_args(argv)

    import numpy as np
    import ray

    from comfy_env import IsolatedExecutor
    from comfy_env.ray import RayExecutor

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    r_noop, r_echo = ray.remote(noop), ray.remote(echo)
    r_produce, r_checksum = ray.remote(produce), ray.remote(checksum)

    iso, iso_b = IsolatedExecutor(max_workers=1), IsolatedExecutor(max_workers=1)
    rex, rex_b = RayExecutor(), RayExecutor()
    arrays = {64: np.ones(64 << 20, dtype=np.uint8), 256: np.ones(256 << 20, dtype=np.uint8)}

    systems = {
        "IsolatedExecutor": {
            "call": lambda: iso.submit(noop).result(),
            "echo": lambda a: iso.submit(echo, a).result(),
            "chain": lambda: iso_b.submit(checksum, iso.submit(produce, 256)).result(),
            "fetch": lambda: checksum(iso.submit(produce, 256).result()),
        },
        "RayExecutor": {
            "call": lambda: rex.submit(noop).result(),
            "echo": lambda a: rex.submit(echo, a).result(),
            "chain": lambda: rex_b.submit(checksum, rex.submit(produce, 256)).result(),
            "fetch": lambda: checksum(rex.submit(produce, 256).result()),
        },
        "ray.remote": {
            "call": lambda: ray.get(r_noop.remote()),
            "echo": lambda a: ray.get(r_echo.remote(a)),
            "chain": lambda: ray.get(r_checksum.remote(r_produce.remote(256))),
            "fetch": lambda: checksum(ray.get(r_produce.remote(256))),
        },
    }
    # Control for the RSS column, before any warm-up touched the pages: the same
    # 256 MiB fetched into the driver and read there (a chain that materialised its
    # input in the driver would grow by this much).
    control = {}
    for name, s in systems.items():
        gc.collect()
        time.sleep(1.0)       # what the previous system freed is given back first
        before = rss()
        assert s["fetch"]() == 65536
        control[name] = rss() - before
    # Warm-up: workers started, code imported, object store and arenas touched.
    for s in systems.values():
        for _ in range(20):
            s["call"]()
        for a in arrays.values():
            s["echo"](a)
        assert s["chain"]() == 65536

    samples = {name: {"call": [], "echo_64": [], "echo_256": [], "chain_256": [], "chain_rss": []}
               for name in systems}
    # Systems alternate call by call (latency) and repetition by repetition (data), in
    # an order that rotates, so that the load of the shared box (and what the previous
    # system left behind: freed pages, a busy object store) falls on all of them alike.
    names = list(systems)

    def turns(i):
        k = i % len(names)
        return [(n, systems[n]) for n in names[k:] + names[:k]]

    for rnd in range(args.rounds):
        for i in range(args.calls):
            for name, s in turns(i):
                samples[name]["call"] += timed(s["call"], 1)
        for i in range(6):
            for name, s in turns(i):
                samples[name]["echo_64"] += timed(lambda: s["echo"](arrays[64]), 1)
        for i in range(6):
            for name, s in turns(i):
                samples[name]["echo_256"] += timed(lambda: s["echo"](arrays[256]), 1)
        for i in range(6):
            for name, s in turns(i):
                before = rss()
                t0 = time.perf_counter()
                assert s["chain"]() == 65536
                samples[name]["chain_256"].append(time.perf_counter() - t0)
                samples[name]["chain_rss"].append(rss() - before)
        print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)

    med = {name: {k: statistics.median(v) for k, v in d.items()} for name, d in samples.items()}
    base = med["ray.remote"]
    print(f"\nRayExecutor vs ray.remote vs IsolatedExecutor, medians "
          f"({os.cpu_count()} CPUs, Python {platform.python_version()}, Ray {ray.__version__})")
    head = f"{'':18}{'warm call':>12}{'echo 64 MiB':>14}{'echo 256 MiB':>14}{'chain 256 MiB':>15}" \
           f"{'chain RSS':>11}"
    print(head)
    for name, m in med.items():
        print(f"{name:18}{m['call'] * 1e3:>9.3f} ms{m['echo_64'] * 1e3:>11.1f} ms"
              f"{m['echo_256'] * 1e3:>11.1f} ms{m['chain_256'] * 1e3:>12.1f} ms"
              f"{m['chain_rss'] / 2**20:>7.1f} MiB")
    ratios = {name: {k: m[k] / base[k] for k in ("call", "echo_64", "echo_256", "chain_256")}
              for name, m in med.items()}
    print("control, driver RSS growth when it fetches and reads A's 256 MiB itself: " +
          ", ".join(f"{n} {v / 2**20:.0f} MiB" for n, v in control.items()))
    for name in ("RayExecutor", "IsolatedExecutor"):
        r = ratios[name]
        print(f"{name} / ray.remote: call {r['call']:.2f}x, echo 64 {r['echo_64']:.2f}x, "
              f"echo 256 {r['echo_256']:.2f}x, chain {r['chain_256']:.2f}x")

    out = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "platform": platform.platform(), "ray": ray.__version__},
           "rounds": args.rounds, "calls_per_round": args.calls,
           "median_s": {n: {k: v for k, v in m.items() if k != "chain_rss"} for n, m in med.items()},
           "chain_driver_rss_growth_bytes": {n: m["chain_rss"] for n, m in med.items()},
           "control_fetch_rss_growth_bytes": control,
           "ratio_to_ray_remote": ratios}
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.json}")
    for e in (iso, iso_b, rex, rex_b):
        e.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
