"""Echo round trip of small numpy arrays (the inline route), two source trees side by side.

    python benchmarks/bench_small_arrays.py --src before=/path/to/old/src --src after=src \
        [--sizes 1K,16K] [--rounds 15] [--calls 200]

Each ``--src`` gets a driver process of its own (this script, ``--child``), running
``comfy_env`` from that tree with one warm ``IsolatedExecutor(env=None)`` worker.  The
drivers take turns round by round (the 2-core box is shared and noisy); in a round a
driver times ``--calls`` echo calls per size (``ex.submit(identity, x).result()``,
x a float64 array and, separately, a dict holding a float32 scalar and a dtype) and
reports the median (an ``int`` payload is the control: the fixed cost of a call).  The table shows the median of the round medians per tree, and
the ratio to the first tree.  JSON goes to benchmarks/results/small_arrays.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from _common import parse_size  # this script's own directory is first on sys.path

HERE = os.path.dirname(os.path.abspath(__file__))


def child(sizes, calls):
    """Driver: one warm executor; one line in -> one JSON line of medians (µs) out."""
    import numpy as np

    sys.path.insert(0, HERE)
    from _bench_funcs import identity

    from comfy_env import IsolatedExecutor

    payloads = {f"array {n // 1024} KiB": np.random.default_rng(0).random(n // 8) for n in sizes}
    payloads["scalars+dtype"] = {"s": np.float32(1.5), "i": np.int64(3), "d": np.dtype("f8")}
    payloads["int (control)"] = 1          # no numpy object: the call's fixed cost
    with IsolatedExecutor(max_workers=1, name="bench") as ex:
        for x in payloads.values():
            for _ in range(20):
                ex.submit(identity, x).result()
        print("ready", flush=True)
        for _line in sys.stdin:
            out = {}
            for name, x in payloads.items():
                ts = []
                for _ in range(calls):
                    t = time.perf_counter()
                    ex.submit(identity, x).result()
                    ts.append(time.perf_counter() - t)
                out[name] = statistics.median(ts) * 1e6
            print(json.dumps(out), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--src", action="append", required=True, help="label=path to a src dir")
    ap.add_argument("--sizes", default="1K,16K")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--json", default=os.path.join(HERE, "results", "small_arrays.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    if args.child:
        return child(sizes, args.calls)

    trees = [s.split("=", 1) for s in args.src]
    procs = []
    for label, path in trees:
        env = dict(os.environ, PYTHONPATH=os.path.abspath(path))
        p = subprocess.Popen([sys.executable, __file__, "--child", "--src", "x=.", "--sizes",
                              args.sizes, "--calls", str(args.calls)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        assert p.stdout.readline().strip() == "ready", f"driver for {label} failed to start"
        procs.append((label, p))
    rounds = {label: [] for label, _ in trees}
    try:
        for r in range(args.rounds):
            order = procs if r % 2 == 0 else procs[::-1]
            for label, p in order:
                p.stdin.write("go\n")
                p.stdin.flush()
                rounds[label].append(json.loads(p.stdout.readline()))
    finally:
        for _label, p in procs:
            p.stdin.close()
            p.wait(60)

    names = list(rounds[trees[0][0]][0])
    table = {label: {n: statistics.median(r[n] for r in rs) for n in names}
             for label, rs in rounds.items()}
    base = trees[0][0]
    print(f"echo round trip, median of {args.rounds} round medians ({args.calls} calls each), µs")
    print(f"{'payload':<16}" + "".join(f"{label:>14}" for label, _ in trees) + "   ratio")
    for n in names:
        row = "".join(f"{table[label][n]:>14.1f}" for label, _ in trees)
        ratios = " ".join(f"{table[label][n] / table[base][n]:.3f}" for label, _ in trees[1:])
        print(f"{n:<16}{row}   {ratios}")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"machine": f"{platform.node()} ({os.cpu_count()} cores)", "python": sys.version,
                   "rounds": args.rounds, "calls": args.calls, "medians_us": table,
                   "trees": dict(trees), "per_round": rounds}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
