"""Why parent → worker at 1 GiB is slower inside bench_cuda.py's rounds than alone (GPU; a diagnostic).

    PYTHONPATH=src python benchmarks/profile_p2w_rounds.py [--sizes 64,1024] [--rounds 4] [--per 5]

bench_cuda.py measures parent → worker (a tensor sent before) in rounds interleaved
with the other cells and legacy IPC, five samples a round at 1 GiB; the same call
timed back to back on a second executor (``p2w_no_recycle``) came out faster in every
run of session 15 (0.23–0.38 against 0.34–0.56 ms).  This times the same call

* back to back on the bench's default executor and on one with staging recycling off;
* in bench-like rounds (empty, w→p, w→p new, then p→w), each sample kept with its
  index in its round;
* in rounds where one thing before the p→w samples changes: nothing but empty calls,
  only w→p new, or a pause of 20 ms (legacy's turn);

and prints every sample (µs), so the slow ones can be placed.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_cuda as B  # noqa: E402  (puts the tree's src first on sys.path)
from _common import dump_to_out  # noqa: E402
import cloudpickle  # noqa: E402
import torch  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])
MiB = 1 << 20


def one(fn):
    t0 = time.perf_counter()
    r = fn()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    del r
    return dt * 1e6


def rounds(before, p2w, n_rounds, per):
    """``n_rounds`` of: ``before()``, then ``per`` + 1 p→w calls (the first untimed after
    round 0, as bench_cuda's warm=1).  Returns the samples per round."""
    out = []
    for i in range(n_rounds):
        before()
        if i:
            one(p2w)
        out.append([round(one(p2w), 1) for _ in range(per)])
    return out


def main():
    sizes = [int(s) * MiB for s in (sys.argv[sys.argv.index("--sizes") + 1].split(",")
                                      if "--sizes" in sys.argv else ("64", "1024"))]
    n_rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 4
    per = int(sys.argv[sys.argv.index("--per") + 1]) if "--per" in sys.argv else 5
    B.install()
    torch.zeros(1, device="cuda")
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} {torch.cuda.get_allocator_backend()}",
          flush=True)
    a = B.new_executor()
    c = B.new_executor({"COMFY_ENV_CUDA_STAGING_CACHE_MIB": "0"})
    res = {}
    try:
        for n in sizes:
            x = torch.ones(n // 4, device="cuda")
            row = res[n >> 20] = {}
            for _ in range(3):
                a.submit(B.w_touch, x).result()
                c.submit(B.w_touch, x).result()

            def p2w(ex=a):
                return ex.submit(B.w_touch, x).result()

            def empties(k=per + 1):
                for _ in range(k):
                    one(lambda: a.submit(B.w_nothing).result())

            def fresh(k=per + 1):
                for _ in range(k):
                    one(lambda: a.submit(B.w_fresh, 1, n).result())

            def bench_like():
                empties()
                for _ in range(per + 1):
                    one(lambda: a.submit(B.w_get, n).result())
                fresh()

            def pause():
                time.sleep(0.02)

            row["alone_a"] = [round(one(p2w), 1) for _ in range(40)]
            row["alone_c"] = [round(one(lambda: p2w(c)), 1) for _ in range(40)]
            row["rounds_bench_like"] = rounds(bench_like, p2w, n_rounds, per)
            row["rounds_empty_only"] = rounds(empties, p2w, n_rounds, per)
            row["rounds_fresh_only"] = rounds(fresh, p2w, n_rounds, per)
            row["rounds_pause"] = rounds(pause, p2w, n_rounds, per)
            row["rounds_bench_like_c"] = rounds(bench_like, lambda: p2w(c), n_rounds, per)
            row["alone_a_again"] = [round(one(p2w), 1) for _ in range(40)]
            a.submit(B.w_timers, True).result()
            for _ in range(40):
                one(p2w)
            row["worker_timers_alone"] = a.submit(B.w_timers, False).result()
            a.submit(B.w_timers, True).result()
            rounds(bench_like, p2w, n_rounds, per)
            row["worker_timers_bench_like"] = a.submit(B.w_timers, False).result()
            print(f"\n== {n >> 20} MiB", flush=True)
            for k, v in row.items():
                if k.startswith("worker_timers"):
                    print(f"  {k:<24} {v}")
                    continue
                flat = [s for r in v for s in r] if v and isinstance(v[0], list) else v
                print(f"  {k:<24} median {statistics.median(flat):8.1f}  {v}", flush=True)
            x = None
            B.settle()
    finally:
        a.shutdown()
        c.shutdown()
    dump_to_out("profile_p2w_rounds.json", res)


if __name__ == "__main__":
    main()
