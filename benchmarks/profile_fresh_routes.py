"""A new worker tensor each call, by route: where the time above the empty call goes (GPU; a diagnostic).

    PYTHONPATH=src python benchmarks/profile_fresh_routes.py [--sizes 1,64] [--reps 200]

For each worker configuration (the defaults; ``COMFY_ENV_CUDA_IPC_MIN_MIB=0``: a new
storage of any size lent by legacy IPC handle instead of copied into a recycled
staging block), under a ``cudaMallocAsync`` parent: the empty call, one new tensor per
call, the same tensor per call, and 32 × 1 MiB new tensors per call (per tensor, from
interleaved pairs), medians of back-to-back calls, each configuration measured in
alternating rounds.  Prints a table and the worker's route counts.
"""
from __future__ import annotations

import os
import statistics
import sys

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_cuda as B  # noqa: E402  (puts the tree's src first on sys.path)
from _common import dump_to_out  # noqa: E402
import cloudpickle  # noqa: E402
import torch  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])
MiB = 1 << 20
CONFS = {"default": {}, "ipc_min_0": {"COMFY_ENV_CUDA_IPC_MIN_MIB": "0"}}


def main():
    sizes = [int(float(s) * MiB) for s in (sys.argv[sys.argv.index("--sizes") + 1].split(",")
                                            if "--sizes" in sys.argv else ("1", "64"))]
    reps = int(sys.argv[sys.argv.index("--reps") + 1]) if "--reps" in sys.argv else 200
    B.install()
    torch.zeros(1, device="cuda")
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} {torch.cuda.get_allocator_backend()}",
          flush=True)
    exs = {name: B.new_executor(env) for name, env in CONFS.items()}
    got = {name: {} for name in exs}
    try:
        for rnd in range(4):
            for name, ex in exs.items():
                g = got[name]
                k = reps // 4
                g.setdefault("empty", []).extend(B.samples(lambda: ex.submit(B.w_nothing).result(), k, warm=5))
                for n in sizes:
                    g.setdefault(f"new {n >> 20}M", []).extend(
                        B.samples(lambda: ex.submit(B.w_fresh, 1, n).result(), k, warm=5))
                    g.setdefault(f"same {n >> 20}M", []).extend(
                        B.samples(lambda: ex.submit(B.w_get, n).result(), k, warm=5))
                pair = B.paired_per_tensor(ex, B.w_fresh, 32, MiB, reps=max(25, reps // 8))
                g.setdefault("per tensor new 32x1M", []).append(pair["median_us"])
        res = {}
        print(f"\n{'cell':<22}" + "".join(f"{n:>14}" for n in exs))
        for cell in got["default"]:
            vals = {n: statistics.median(got[n][cell]) for n in exs}
            res[cell] = vals
            unit = 1 if cell.startswith("per tensor") else 1e6
            print(f"{cell:<22}" + "".join(f"{vals[n] * unit:>14.1f}" for n in exs))
        print("(µs; per tensor: median over rounds of paired medians)")
        for name, ex in exs.items():
            routes, recycled = ex.submit(B.w_routes).result()
            print(f"{name}: worker routes {routes}, recycled {recycled}")
            res[name + "_routes"] = routes
    finally:
        for ex in exs.values():
            ex.shutdown()
    dump_to_out("profile_fresh_routes.json", res)


if __name__ == "__main__":
    main()
