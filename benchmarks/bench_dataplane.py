"""Echo round trip of numpy arrays: comfy_env vs ProcessPoolExecutor vs the memcpy floor.

    python benchmarks/bench_dataplane.py [--sizes 1K,1M,64M,256M,1G] [--reps 7]

For each size, in one run:

* ``comfy_env``         -- ``ex.submit(identity, x).result()`` with x an ordinary array
                           (one copy into the arena on the way out, none on the way back);
* ``comfy_env shared``  -- the same with x made by ``comfy_env.shared_like`` (no copy at all);
* ``ProcessPoolExecutor`` -- pickles the array both ways;
* ``floor``             -- two memcpys of the same size into warm memory (one per direction).

Systems take turns rep by rep (the box is shared and noisy); the table shows
medians.  Writes JSON and a PNG plot (time against size, one line per system,
the floor drawn in) to docs/.
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
from concurrent.futures import ProcessPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_funcs import identity  # noqa: E402
from _common import label, parse_size  # noqa: E402

from comfy_env import IsolatedExecutor, shared_like  # noqa: E402
from comfy_env.ipc.arrays import INLINE_BYTES  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DOCS = os.path.join(os.path.dirname(HERE), "docs")
def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="1K,1M,64M,256M,1G")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--ppe-max", default="1G", help="largest size to run ProcessPoolExecutor on")
    ap.add_argument("--json", default=os.path.join(DOCS, "dataplane.json"))
    ap.add_argument("--png", default=os.path.join(DOCS, "dataplane.png"))
    args = ap.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    ppe_max = parse_size(args.ppe_max)

    ce = IsolatedExecutor()
    ppe = ProcessPoolExecutor(1)
    ce.submit(identity, 0).result()
    ppe.submit(identity, 0).result()
    rows = []
    for n in sizes:
        x = np.random.default_rng(0).integers(0, 255, n, dtype=np.uint8)
        xs = shared_like(x)
        dst = np.empty_like(x)
        np.copyto(dst, x)                        # fault the floor's destination in
        reps = args.reps if n <= (256 << 20) else max(3, args.reps // 2)
        res = {"comfy_env": [], "comfy_env shared": [], "ProcessPoolExecutor": [], "floor": []}
        # Warm-up: the arena's first segment of this size pays its page faults once.
        for _ in range(2):
            r = ce.submit(identity, x).result()
            assert r.shape == x.shape
            del r
            ce.submit(identity, xs).result()
        for _ in range(reps):
            dt, r = timed(lambda: ce.submit(identity, x).result())
            assert r[-1] == x[-1]
            del r
            res["comfy_env"].append(dt)
            dt, r = timed(lambda: ce.submit(identity, xs).result())
            # Below the inline threshold arrays are pickled: no sharing expected.
            assert np.shares_memory(r, xs) or n < INLINE_BYTES
            del r
            res["comfy_env shared"].append(dt)
            if n <= ppe_max:
                dt, r = timed(lambda: ppe.submit(identity, x).result())
                del r
                res["ProcessPoolExecutor"].append(dt)
            t = time.perf_counter()
            np.copyto(dst, x)
            np.copyto(dst, x)
            res["floor"].append(time.perf_counter() - t)
            gc.collect()
        row = {"bytes": n, "size": label(n)}
        for k, v in res.items():
            row[k + "_ms"] = statistics.median(v) * 1e3 if v else None
        row["ratio_to_floor"] = row["comfy_env_ms"] / row["floor_ms"]
        rows.append(row)
        del x, xs, dst
        gc.collect()
        print(f"{row['size']:>8}: comfy_env {row['comfy_env_ms']:.3f} ms, shared "
              f"{row['comfy_env shared_ms']:.3f} ms, PPE "
              f"{row['ProcessPoolExecutor_ms'] or float('nan'):.3f} ms, floor {row['floor_ms']:.3f} ms",
              flush=True)
    ce.shutdown()
    ppe.shutdown()

    print(f"\nnumpy echo round trip, median ms ({os.cpu_count()} CPUs, Python {platform.python_version()})")
    hdr = f"{'size':>9}{'comfy_env':>12}{'shared':>10}{'PPE':>11}{'floor(2 memcpy)':>17}{'/floor':>8}"
    print(hdr)
    for r in rows:
        ppe_ms = r["ProcessPoolExecutor_ms"]
        print(f"{r['size']:>9}{r['comfy_env_ms']:>12.3f}{r['comfy_env shared_ms']:>10.3f}"
              f"{(ppe_ms if ppe_ms is not None else float('nan')):>11.2f}{r['floor_ms']:>17.3f}"
              f"{r['ratio_to_floor']:>8.2f}")
    out = {"benchmark": "dataplane echo", "machine": {"cpus": os.cpu_count(),
           "python": platform.python_version(), "platform": platform.platform()},
           "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows}
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.json}")
    try:
        plot(rows, args.png)
        print(f"wrote {args.png}")
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["bytes"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, style in (("comfy_env_ms", "o-"), ("comfy_env shared_ms", "s-"),
                       ("ProcessPoolExecutor_ms", "^-"), ("floor_ms", "k--")):
        pts = [(x, r[key]) for x, r in zip(xs, rows) if r[key] is not None]
        name = key[:-3] if key != "floor_ms" else "floor: 2 x memcpy"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("array size (bytes)")
    ax.set_ylabel("echo round trip, median (ms)")
    ax.set_title("numpy echo round trip (2-core box)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
