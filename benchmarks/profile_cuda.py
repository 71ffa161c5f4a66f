"""Where the time of a CUDA transfer goes (GPU; a diagnostic, not a benchmark table).

    PYTHONPATH=src python benchmarks/profile_cuda.py [--tensors K] [--calls N] [--p2w-only MIB]

Profiles both processes (cProfile on the parent's main thread and on the worker's
main thread, where calls run and results are encoded) for

* worker → parent, ``K`` × 1 MiB tensors per call, the same tensors every call
  (the import cache's case) and fresh tensors every call;
* parent → worker, one 1 GiB tensor per call;

and prints per-call medians plus the top functions of each side, so that speed
work starts from a measurement.  Also times a few primitives on their own.
``--p2w-only MIB``: only parent → worker, one tensor of that size sent every call
(bench_cuda.py's p→w cell), ``--calls`` of them, both by own time and cumulative.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "src"))

import cloudpickle  # noqa: E402
import torch  # noqa: E402

import bench_cuda as B  # noqa: E402
from comfy_env.ipc.cuda.plane import PLANE  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])
MiB, GiB = 1 << 20, 1 << 30


def w_prof(on, top=30, sort=("tottime",)):
    """Start (on=True) or stop and report (on=False) a profile of the worker's main thread."""
    import builtins
    import cProfile
    import io
    import pstats
    if on:
        pr = builtins.__dict__["_comfy_env_prof"] = cProfile.Profile()
        pr.enable()
        return None
    pr = builtins.__dict__.pop("_comfy_env_prof")
    pr.disable()
    s = io.StringIO()
    for key in sort:
        pstats.Stats(pr, stream=s).sort_stats(key).print_stats(top)
    return s.getvalue()


def profiled(a, label, fn, calls, sort=("tottime",)):
    import cProfile
    import io
    import pstats
    for _ in range(5):
        r = fn()
        torch.cuda.synchronize()
        del r
    a.submit(w_prof, True).result()
    pr = cProfile.Profile()
    times = []
    pr.enable()
    for _ in range(calls):
        t0 = time.perf_counter()
        r = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        del r
    pr.disable()
    worker = a.submit(w_prof, False, 30, sort).result()
    s = io.StringIO()
    for key in sort:
        pstats.Stats(pr, stream=s).sort_stats(key).print_stats(30)
    print(f"\n===== {label}: median {statistics.median(times) * 1e3:.3f} ms/call under the profiler")
    print("----- parent (main thread)")
    print(s.getvalue())
    print("----- worker (main thread)")
    print(worker)


def primitives():
    from comfy_env.ipc.cuda import devices
    from comfy_env.ipc.cuda import driver as D
    from comfy_env.ipc.cuda.receiver import _DeviceBytes
    import weakref
    x = torch.ones(MiB // 4, device="cuda")
    ptr = x.data_ptr()

    def t(label, fn, n=2000):
        for _ in range(50):
            fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        print(f"  {label:<48} {(time.perf_counter() - t0) / n * 1e6:8.2f} µs")

    print("\n===== primitives (parent process)")
    t("torch.cuda.current_stream(0).cuda_stream", lambda: torch.cuda.current_stream(0).cuda_stream)
    t("devices.use(0)", lambda: devices.use(0))
    t("D.address_range(ptr)", lambda: D.address_range(ptr))
    t("D.pointer_pool(ptr)", lambda: D.pointer_pool(ptr))
    t("devices.uuid_of(0)", lambda: devices.uuid_of(0))
    t("torch.as_tensor(_DeviceBytes)", lambda: torch.as_tensor(_DeviceBytes(ptr, MiB), device="cuda"))
    t("weakref.finalize", lambda: weakref.finalize(_DeviceBytes(ptr, 4), int))
    t("x.view(float32).as_strided", lambda: x.view(torch.float32).as_strided((MiB // 4,), (1,)))


def main():
    k = int(sys.argv[sys.argv.index("--tensors") + 1]) if "--tensors" in sys.argv else 32
    calls = int(sys.argv[sys.argv.index("--calls") + 1]) if "--calls" in sys.argv else 40
    B.install()
    torch.zeros(1, device="cuda")
    print(torch.cuda.get_device_name(), torch.__version__, torch.cuda.get_allocator_backend())
    p2w_only = int(sys.argv[sys.argv.index("--p2w-only") + 1]) if "--p2w-only" in sys.argv else None
    if p2w_only is None:
        primitives()
    a = B.new_executor()
    try:
        if p2w_only is not None:
            x = torch.ones(p2w_only * MiB // 4, device="cuda")
            empty = B.timed(lambda: a.submit(B.w_nothing).result(), 300, warm=30)
            p2w = B.timed(lambda: a.submit(B.w_touch, x).result(), 300, warm=30)
            print(f"empty call {empty * 1e6:.1f} µs, p→w {p2w_only} MiB {p2w * 1e6:.1f} µs (no profiler)")
            profiled(a, f"p→w {p2w_only} MiB", lambda: a.submit(B.w_touch, x).result(), calls,
                     sort=("tottime", "cumulative"))
            profiled(a, "empty call", lambda: a.submit(B.w_nothing).result(), calls,
                     sort=("tottime", "cumulative"))
            return
        empty = B.timed(lambda: a.submit(B.w_nothing).result(), 200, warm=20)
        print(f"empty call {empty * 1e6:.0f} µs")
        for label, fn in (("same", B.w_many), ("fresh", B.w_fresh)):
            call = B.timed(lambda: a.submit(fn, k, MiB).result(), 40, warm=5)
            print(f"w→p {label}: {call * 1e3:.3f} ms/call, {(call - empty) / k * 1e6:.1f} µs/tensor (no profiler)")
        x = torch.ones(GiB // 4, device="cuda")
        p2w = B.timed(lambda: a.submit(B.w_touch, x).result(), 20)
        print(f"p→w 1 GiB: {p2w * 1e3:.3f} ms/call (no profiler)")
        profiled(a, f"w→p same, {k} × 1 MiB", lambda: a.submit(B.w_many, k, MiB).result(), calls)
        profiled(a, f"w→p fresh, {k} × 1 MiB", lambda: a.submit(B.w_fresh, k, MiB).result(), calls)
        profiled(a, "p→w 1 GiB", lambda: a.submit(B.w_touch, x).result(), 20)
        print("routes (parent):", dict(PLANE.routes))
    finally:
        a.shutdown()


if __name__ == "__main__":
    main()
