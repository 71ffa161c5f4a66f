"""CUDA data plane benchmark (GPU): routes side by side in one run.

    PYTHONPATH=src python benchmarks/bench_cuda.py [--quick]

Measures, for 1 MiB, 64 MiB, 1 GiB and 4 GiB tensors:
  worker → parent, parent → worker, worker A → worker B (through IsolatedExecutor),
  the CPU route (COMFY_ENV_CUDA_FORCE_CPU=1), and torch.multiprocessing legacy CUDA IPC
  (native allocator, in a separate process pair, as torch users would do it);
plus the per-tensor cost of worker → parent once the pool is known (100 tensors per call,
minus an empty call), and a worker's GPU footprint after a 4 GiB peak under each heap policy.
Prints a table and writes benchmarks/results/cuda_<gpu>_<time>.json.
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

import cloudpickle  # noqa: E402
import torch  # noqa: E402

from comfy_env import IsolatedExecutor  # noqa: E402
from comfy_env.ipc import lifetime  # noqa: E402
from comfy_env.ipc.cuda import install  # noqa: E402
from comfy_env.ipc.cuda import driver as D  # noqa: E402
from comfy_env.ipc.cuda.plane import PLANE  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])
MiB, GiB = 1 << 20, 1 << 30
SIZES = [("1MiB", MiB), ("64MiB", 64 * MiB), ("1GiB", GiB), ("4GiB", 4 * GiB)]


# -- worker side ---------------------------------------------------------------------------
def _cache():
    # These functions travel by value, so a module global would be a fresh dict on every
    # call; keep the worker's tensors somewhere that outlives one call.
    import builtins
    return builtins.__dict__.setdefault("_comfy_env_bench_cache", {})


def w_get(nbytes):
    """Return a tensor that already lives in the worker (allocated once)."""
    import torch
    cache = _cache()
    t = cache.get(nbytes)
    if t is None:
        t = cache[nbytes] = torch.ones(nbytes // 4, device="cuda")
        torch.cuda.synchronize()
    return t


def w_many(k):
    import torch
    cache = _cache()
    ts = cache.get(("many", k))
    if ts is None:
        ts = cache[("many", k)] = [torch.ones(256, device="cuda") for _ in range(k)]
        torch.cuda.synchronize()
    return ts


def w_touch(t):
    return None


def w_nothing():
    return None


def w_footprint(nbytes):
    import torch
    x = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    x.fill_(1)
    torch.cuda.synchronize()
    del x
    torch.cuda.synchronize()
    return True


def w_empty_cache():
    import torch
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    return True


def w_set_cpu(flag):
    from comfy_env.ipc.cuda.plane import PLANE
    PLANE.force_cpu = flag


# -- helpers -------------------------------------------------------------------------------
def settle():
    for _ in range(3):
        gc.collect()
        lifetime.LEDGER.drain()
        time.sleep(0.005)


def timed(fn, reps):
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
        del r
        settle()
    return statistics.median(out)


def reps_for(nbytes, cpu=False):
    if cpu:
        return 1 if nbytes >= GiB else 3
    return 3 if nbytes >= 4 * GiB else 5 if nbytes >= GiB else 15


def new_executor(env_extra=None):
    old = dict(os.environ)
    os.environ.update(env_extra or {})
    try:
        ex = IsolatedExecutor(env=None, max_workers=1, initializer=install)
        ex.submit(w_nothing).result(timeout=120)
    finally:
        os.environ.clear()
        os.environ.update(old)
    return ex


def free_bytes():
    torch.cuda.synchronize()
    return D.mem_get_info()[0]


# -- legacy torch.multiprocessing IPC (native allocator) --------------------------------------
LEGACY = r'''
import json, statistics, sys, time, torch, torch.multiprocessing as mp
def child(q_in, q_out, sizes):
    torch.zeros(1, device="cuda")
    for n in sizes:
        t = torch.ones(n // 4, device="cuda"); torch.cuda.synchronize()
        for _ in range(REPS(n)):
            q_out.put(t); q_in.get()            # child -> parent
        for _ in range(REPS(n)):
            x = q_in.get(); torch.cuda.synchronize(); del x; q_out.put(1)   # parent -> child
def REPS(n): return 3 if n >= 4 << 30 else 7 if n >= 1 << 30 else 30
if __name__ == "__main__":
    sizes = json.loads(sys.argv[1]); ctx = mp.get_context("spawn")
    qi, qo = ctx.Queue(), ctx.Queue(); p = ctx.Process(target=child, args=(qi, qo, sizes)); p.start()
    torch.zeros(1, device="cuda"); out = {}
    for n in sizes:
        w2p, p2w = [], []
        for _ in range(REPS(n)):
            t0 = time.perf_counter(); x = qo.get(); torch.cuda.synchronize(); w2p.append(time.perf_counter() - t0)
            del x; qi.put(1)
        y = torch.ones(n // 4, device="cuda"); torch.cuda.synchronize()
        for _ in range(REPS(n)):
            t0 = time.perf_counter(); qi.put(y); qo.get(); p2w.append(time.perf_counter() - t0)
        del y
        out[n] = (statistics.median(w2p), statistics.median(p2w))
    p.join(60); print("RESULT", json.dumps(out))
'''


def legacy_ipc(sizes):
    env = dict(os.environ)
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)         # legacy IPC needs the native allocator
    r = subprocess.run([sys.executable, "-c", LEGACY, json.dumps(sizes)], env=env, capture_output=True,
                       text=True, timeout=600)
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return {int(k): v for k, v in json.loads(line[7:]).items()}
    return {"error": (r.stderr or r.stdout)[-500:]}


# -- main ----------------------------------------------------------------------------------------
def main():
    quick = "--quick" in sys.argv
    sizes = SIZES[:2] if quick else SIZES
    install()
    torch.zeros(1, device="cuda")
    gpu = torch.cuda.get_device_name()
    res = {"gpu": gpu, "torch": torch.__version__, "parent_backend": torch.cuda.get_allocator_backend(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": {}}
    a = new_executor()
    b = new_executor()
    try:
        # per-tensor cost, worker -> parent, pool known
        for _ in range(3):
            a.submit(w_many, 100).result()
            a.submit(w_nothing).result()
        settle()
        empty = timed(lambda: a.submit(w_nothing).result(), 50)
        many = timed(lambda: a.submit(w_many, 100).result(), 30)
        res["per_tensor_w2p_us"] = (many - empty) / 100 * 1e6
        res["empty_call_us"] = empty * 1e6
        print(f"per tensor w2p {res['per_tensor_w2p_us']:.1f} us, empty call {empty * 1e6:.0f} us", flush=True)
        for label, n in sizes:
            row = {}
            x = torch.ones(n // 4, device="cuda")
            a.submit(w_get, n).result()
            b.submit(w_get, n).result()
            a.submit(w_touch, x).result()
            settle()
            r = reps_for(n)
            row["w2p"] = timed(lambda: a.submit(w_get, n).result(), r)
            row["p2w"] = timed(lambda: a.submit(w_touch, x).result(), r)
            row["a2b"] = timed(lambda: b.submit(w_touch, a.submit(w_get, n)).result(), r)
            # CPU route, same run
            PLANE.force_cpu = True
            a.submit(w_set_cpu, True).result()
            rc = reps_for(n, cpu=True)
            row["cpu_w2p"] = timed(lambda: a.submit(w_get, n).result(), rc)
            row["cpu_p2w"] = timed(lambda: a.submit(w_touch, x).result(), rc)
            PLANE.force_cpu = False
            a.submit(w_set_cpu, False).result()
            del x
            settle()
            res["rows"][label] = row
            _dump_partial(res)
            print(label, {k: f"{v * 1e3:.3f} ms" for k, v in row.items()}, flush=True)
        res["routes_parent"] = dict(PLANE.routes)
    finally:
        a.shutdown()
        b.shutdown()
    settle()
    torch.cuda.empty_cache()
    # footprint after a peak, per heap policy
    res["footprint"] = {}
    for heap in ("pool", "staging"):
        ex = new_executor({"COMFY_ENV_CUDA_HEAP": heap})
        try:
            base = free_bytes()
            ex.submit(w_footprint, 4 * GiB).result()
            after_peak = free_bytes()
            ex.submit(w_empty_cache).result()
            settle()
            after_trim = free_bytes()
        finally:
            ex.shutdown()
        res["footprint"][heap] = {"held_after_peak_MiB": (base - after_peak) / MiB,
                                  "held_after_empty_cache_MiB": (base - after_trim) / MiB}
    leg = legacy_ipc([n for _, n in sizes])
    res["legacy_ipc_native"] = {str(k): v for k, v in leg.items()}
    print_table(res, sizes, leg)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    tag = gpu.replace(" ", "_").replace("/", "_")
    path = os.path.join(HERE, "results", f"cuda_{tag}_{time.strftime('%Y%m%d_%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", path)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "cuda_bench.json"), "w") as f:
            json.dump(res, f, indent=1)


def _dump_partial(res):
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "cuda_bench_partial.json"), "w") as f:
            json.dump(res, f, indent=1)


def print_table(res, sizes, leg):
    print(f"\nGPU: {res['gpu']}  torch {res['torch']}  parent allocator {res['parent_backend']}")
    print(f"worker → parent, pool known: {res['per_tensor_w2p_us']:.1f} µs per tensor "
          f"(100 tensors per call; empty call {res['empty_call_us']:.0f} µs)")
    hdr = f"{'size':>6} | {'w→p':>9} {'p→w':>9} {'A→B':>9} | {'CPU w→p':>9} {'CPU p→w':>9} | " \
          f"{'legacy w→p':>10} {'legacy p→w':>10} | {'CPU/ours p→w':>12}"
    print(hdr)
    print("-" * len(hdr))
    for label, n in sizes:
        r = res["rows"][label]
        lg = leg.get(n) if isinstance(leg, dict) else None
        lw = f"{lg[0] * 1e3:9.3f}" if lg else "       n/a"
        lp = f"{lg[1] * 1e3:9.3f}" if lg else "       n/a"
        print(f"{label:>6} | {r['w2p'] * 1e3:8.3f}m {r['p2w'] * 1e3:8.3f}m {r['a2b'] * 1e3:8.3f}m | "
              f"{r['cpu_w2p'] * 1e3:8.1f}m {r['cpu_p2w'] * 1e3:8.1f}m | {lw}m {lp}m | "
              f"{r['cpu_p2w'] / r['p2w']:11.0f}×")
    print("(times are medians per call in ms, call overhead included)")
    for heap, f in res["footprint"].items():
        print(f"footprint heap={heap}: after a 4 GiB peak {f['held_after_peak_MiB']:.0f} MiB held, "
              f"after empty_cache {f['held_after_empty_cache_MiB']:.0f} MiB")


if __name__ == "__main__":
    main()
