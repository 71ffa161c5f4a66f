"""Torch CPU tensors shared in place: comfy_env beside ProcessPoolExecutor and loky, one run.

    python benchmarks/bench_tensor_share.py [--sizes 1M,64M,256M] [--reps 7] [--crossover]

Rows (echo round trip ``submit(identity, x).result()``, median ms):

* ``same tensor``  -- one torch tensor sent again and again (comfy_env moves its storage
                      into shared memory on the first send; PPE and loky go through
                      torch's ``share_memory_()`` reductions);
* ``new tensor``   -- a fresh tensor each call (made outside the timed part);
* ``numpy``        -- a numpy array echoed (must not change with this feature).

Columns: comfy_env (default options), comfy_env freeing a moved tensor's old memory inline
(as before the releaser; when the tree has one), comfy_env with ``share_tensors_in_place=False``
(when the tree has the option), ProcessPoolExecutor, loky.  Systems take turns rep by
rep.  ``--crossover`` times a re-sent tensor of 64 KiB..4 MiB with moving forced on
(``MOVE_MIN_BYTES = 0``) and off, to place the move threshold.
Writes JSON under benchmarks/results/.
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
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_funcs import identity  # noqa: E402
from _common import label, parse_size  # noqa: E402

import comfy_env  # noqa: E402
from comfy_env import IsolatedExecutor  # noqa: E402
from comfy_env.ipc import arrays  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
def timed(ex, box, drop=False):
    """One echo of ``box[0]``; with ``drop`` the input is dropped inside the timed part
    (a loop that makes a tensor per call frees one per call too, whichever system it uses:
    comfy_env frees the old memory when it moves a storage, the others when the caller
    lets go of it)."""
    shape = box[0].shape
    t = time.perf_counter()
    r = ex.submit(identity, box[0]).result()
    ok = r.shape == shape
    del r
    if drop:
        box.clear()
    dt = time.perf_counter() - t
    assert ok
    return dt


class _FreeInline:
    """comfy_env as it was before the releaser: a move frees the tensor's old memory
    inside ``submit`` (the releaser's ``release`` swapped for an inline free around
    this system's calls only, so both variants take turns in one run)."""

    def __init__(self, ex):
        self.ex = ex

    def submit(self, *a):
        rel = getattr(arrays, "_RELEASER", None)
        if rel is None:
            return self.ex.submit(*a)
        rel.release = list.clear     # the storage in the box, freed by torch right here
        try:
            return self.ex.submit(*a)
        finally:
            del rel.release

    def shutdown(self):
        self.ex.shutdown()


def systems(others=True):
    out = {"comfy_env": IsolatedExecutor(name="on")}
    if hasattr(arrays, "_RELEASER"):
        out["comfy_env free inline"] = _FreeInline(IsolatedExecutor(name="inline"))
    try:
        out["comfy_env off"] = IsolatedExecutor(name="off", share_tensors_in_place=False)
    except TypeError:           # a tree without the option (the "before" run)
        pass
    if others:
        out["ProcessPoolExecutor"] = ProcessPoolExecutor(1)
        try:
            from loky import get_reusable_executor
            out["loky"] = get_reusable_executor(max_workers=1)
        except ImportError:
            pass
    for ex in out.values():
        ex.submit(identity, 0).result()
    return out


def run_rows(sizes, reps, others=True, cases=("same tensor", "new tensor", "numpy")):
    exs = systems(others)
    rows = []
    for n in sizes:
        for kind in cases:
            res = {k: [] for k in exs}
            same = {k: torch.randint(0, 255, (n,), dtype=torch.uint8) for k in exs}
            arr = np.random.default_rng(0).integers(0, 255, n, dtype=np.uint8)
            for rep in range(reps + 2):            # 2 warm-up rounds, not counted
                for name, ex in exs.items():
                    if kind == "same tensor":
                        box = [same[name]]
                    elif kind == "new tensor":
                        box = [torch.empty(n, dtype=torch.uint8).fill_(rep % 251)]
                    else:
                        box = [arr]
                    dt = timed(ex, box, drop=kind == "new tensor")
                    if rep >= 2:
                        res[name].append(dt)
                    del box
                    gc.collect()
            row = {"case": kind, "bytes": n, "size": label(n)}
            for k, v in res.items():
                row[k + "_ms"] = statistics.median(v) * 1e3
            ppe = row.get("ProcessPoolExecutor_ms")
            row["ratio_to_ppe"] = row["comfy_env_ms"] / ppe if ppe else None
            rows.append(row)
            print("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in row.items()), flush=True)
            del same, arr
            gc.collect()
    for ex in exs.values():
        ex.shutdown()
    return rows, list(exs)


def crossover(reps):
    sizes = [64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20, 2 << 20, 4 << 20]
    on = IsolatedExecutor(name="on")
    off = IsolatedExecutor(name="off", share_tensors_in_place=False)
    for ex in (on, off):
        ex.submit(identity, 0).result()
    saved = arrays.MOVE_MIN_BYTES
    arrays.MOVE_MIN_BYTES = 0
    rows = []
    try:
        for n in sizes:
            t_on = torch.zeros(n, dtype=torch.uint8)
            t_off = torch.zeros(n, dtype=torch.uint8)
            a, b = [], []
            for rep in range(reps * 3 + 2):
                da, db = timed(on, [t_on]), timed(off, [t_off])
                if rep >= 2:
                    a.append(da)
                    b.append(db)
            row = {"bytes": n, "size": label(n), "moved_ms": statistics.median(a) * 1e3,
                   "copied_ms": statistics.median(b) * 1e3}
            rows.append(row)
            print(f"{row['size']:>9}: moved once then by descriptor {row['moved_ms']:.3f} ms, "
                  f"copied each call {row['copied_ms']:.3f} ms", flush=True)
    finally:
        arrays.MOVE_MIN_BYTES = saved
        on.shutdown()
        off.shutdown()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="1M,64M,256M")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--crossover", action="store_true")
    ap.add_argument("--comfy-only", action="store_true",
                    help="leave ProcessPoolExecutor and loky out (they take seconds at 256 MiB)")
    ap.add_argument("--cases", default="same tensor,new tensor,numpy")
    ap.add_argument("--tag", default="after")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    out = {"benchmark": "tensor share", "tag": args.tag, "comfy_env_src": os.path.relpath(comfy_env.__file__, os.path.dirname(HERE)),
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "torch": torch.__version__, "platform": platform.platform()},
           "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if args.crossover:
        out["crossover"] = crossover(args.reps)
    else:
        rows, names = run_rows([parse_size(s) for s in args.sizes.split(",")], args.reps,
                               not args.comfy_only, tuple(args.cases.split(",")))
        out["rows"] = rows
        print(f"\necho round trip, median ms ({os.cpu_count()} CPUs, torch {torch.__version__})")
        print(f"{'case':>12}{'size':>9}" + "".join(f"{n:>22}" for n in names)
              + (f"{'/PPE':>7}" if "ProcessPoolExecutor" in names else ""))
        for r in rows:
            print(f"{r['case']:>12}{r['size']:>9}"
                  + "".join(f"{r[n + '_ms']:>22.3f}" for n in names)
                  + (f"{r['ratio_to_ppe']:>7.2f}" if r["ratio_to_ppe"] else ""))
    path = args.json or os.path.join(HERE, "results", f"tensor_share_{args.tag}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
