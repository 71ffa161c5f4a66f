"""Warm call latency of two comfy_env source trees, interleaved: did a change cost time?

    python benchmarks/bench_trees.py OLD_SRC NEW_SRC [--calls 2000] [--rounds 8] [--json PATH]

Each round runs one subprocess per tree (``PYTHONPATH=<tree>``): it starts an
``IsolatedExecutor(max_workers=1)``, warms it, then times ``submit(identity, 1).result()``
and ``submit(identity, <1 MiB numpy array>).result()`` ``--calls`` times each.  The trees
alternate (and swap order every round), so a burst of noise on this shared box does not
land on one tree only.  Prints the median over rounds of each round's median, in
microseconds, and the ratio new/old; writes JSON.
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

HERE = os.path.dirname(os.path.abspath(__file__))

_CHILD = r"""
import json, statistics, sys, time
sys.path.insert(0, sys.argv[2])
from _bench_funcs import identity
import numpy as np
from comfy_env import IsolatedExecutor
n = int(sys.argv[1])
arr = np.ones(1 << 18, dtype=np.float32)        # 1 MiB: goes through shared memory
out = {}
with IsolatedExecutor(max_workers=1) as ex:
    for name, arg in (("identity", 1), ("array_1MiB", arr)):
        for _ in range(200):
            ex.submit(identity, arg).result()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            ex.submit(identity, arg).result()
            ts.append(time.perf_counter() - t0)
        out[name] = statistics.median(ts) * 1e6
print(json.dumps(out))
"""


def run_tree(src, calls):
    env = dict(os.environ, PYTHONPATH=os.path.abspath(src))
    out = subprocess.run([sys.executable, "-c", _CHILD, str(calls), HERE], env=env,
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"tree {src}: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--json", default=os.path.join(HERE, "results", "trees.json"))
    args = ap.parse_args(argv)
    trees = {"old": args.old, "new": args.new}
    per = {"old": [], "new": []}
    for r in range(args.rounds):
        order = ("old", "new") if r % 2 == 0 else ("new", "old")
        for name in order:
            per[name].append(run_tree(trees[name], args.calls))
    cases = sorted(per["old"][0])
    rows = {}
    print(f"{'case':<14}{'old µs':>10}{'new µs':>10}{'new/old':>10}")
    for case in cases:
        old = statistics.median(r[case] for r in per["old"])
        new = statistics.median(r[case] for r in per["new"])
        rows[case] = {"old_us": old, "new_us": new, "ratio": new / old,
                      "old_rounds": [r[case] for r in per["old"]], "new_rounds": [r[case] for r in per["new"]]}
        print(f"{case:<14}{old:>10.1f}{new:>10.1f}{new / old:>10.3f}")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"machine": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
                   "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "calls": args.calls,
                   "rounds": args.rounds, "trees": trees, "results": rows}, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
