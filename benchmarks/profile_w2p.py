"""Where worker → parent time per tensor goes (GPU; a diagnostic beside bench_cuda.py).

    PYTHONPATH=src python benchmarks/profile_w2p.py [--tensors K] [--calls N] [--primitives | --primitives-only] [--e2e-only]
                                                  [--fresh-phases] [--fresh-driver] [--worker-env K=V ...]
    COMFY_ENV_BENCH_SRC=<other tree>/src python benchmarks/profile_w2p.py   # the same, another tree

One call returns ``K`` × 1 MiB worker tensors, the same ones every call (the import
cache's case, the issue's "once the pool is known"), and again fresh ones.  Prints

* the end-to-end figure as bench_cuda.py computes it: (call − empty call) / K,
  medians of back-to-back calls without any instrumentation;
* then, in separate calls, the wall time per tensor of the functions on the path,
  in both processes (wrapped with perf_counter: ~0.1 µs of overhead per wrapper,
  nested wrappers included in their callers);
* with ``--primitives``, ways to build a tensor over foreign device memory, timed
  in the parent.

Writes ``$OUT/profile_w2p_<label>.json`` when ``$OUT`` is set.  A cProfile of both
processes over the same calls: ``benchmarks/profile_cuda.py``.
"""
from __future__ import annotations

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_cuda as B  # noqa: E402  (puts the tree's src first on sys.path)
from _common import dump_to_out  # noqa: E402
import cloudpickle  # noqa: E402
import torch  # noqa: E402

import comfy_env  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])
MiB = 1 << 20


def _targets(side):
    """What to time on ``side`` ("parent" or "worker"): name -> (object, attribute)."""
    from comfy_env.ipc import codec, lifetime, planes  # noqa: F401
    from comfy_env.ipc.cuda import receiver as R, sender as S
    from comfy_env.ipc.cuda.plane import PLANE
    common = {"LEDGER.drain": (lifetime.LEDGER, "drain")}
    snd, rcv = PLANE.sender, PLANE.receiver
    if side == "worker":
        t = {"encode_message": (codec, "encode_message"), "plane.encode": (PLANE, "encode"),
             "choose": (S, "choose"), "pack_fields": (S, "pack_fields"),
             "_lend_pool_block": (snd, "_lend_pool_block"), "_event_for": (snd, "_event_for"),
             "_lend_staging": (snd, "_lend_staging"), "_take_idle_staging": (snd, "_take_idle_staging"),
             "on_control": (PLANE, "on_control"), "free_owned": (snd, "free_owned"),
             "LEDGER.release": (lifetime.LEDGER, "release")}
    else:
        t = {"accept_part_leases": (codec, "accept_part_leases"), "decode_part": (codec, "decode_part"),
             "plane.decode": (PLANE, "decode"), "unpack": (R, "unpack"), "_wrap": (rcv, "_wrap"),
             "LEDGER.holder": (lifetime.LEDGER, "holder"), "import_cache.keep": (PLANE.import_cache, "keep"),
             "_local_ptr": (rcv, "_local_ptr"), "import_pointer": (PLANE.imports, "import_pointer"),
             "import_cache.sweep": (PLANE.import_cache, "sweep"), "free_remote": (rcv, "free_remote"),
             "finish_frees": (rcv, "finish_frees"), "LEDGER.free_many": (lifetime.LEDGER, "free_many"),
             "staging_idle": (rcv, "staging_idle")}
    t.update({k: v for k, v in common.items()})
    return {k: v for k, v in t.items() if hasattr(v[0], v[1])}


def driver_timers(on):
    """Start (on=True) or stop and return (on=False) timing of every driver entry point
    of this process: name -> [seconds, calls]."""
    import builtins
    import time as _time
    from comfy_env.ipc.cuda import driver as DD
    if on:
        DD.lib()
        acc = builtins.__dict__["_comfy_env_dtimers"] = {}
        saved = builtins.__dict__["_comfy_env_dsaved"] = dict(DD._funcs)
        for name, fn in saved.items():
            slot = acc.setdefault(name, [0.0, 0])

            def wrap(*a, _fn=fn, _slot=slot):
                t0 = _time.perf_counter()
                try:
                    return _fn(*a)
                finally:
                    _slot[0] += _time.perf_counter() - t0
                    _slot[1] += 1
            DD._funcs[name] = wrap
        return None
    DD._funcs.update(builtins.__dict__.pop("_comfy_env_dsaved"))
    return {k: v for k, v in builtins.__dict__.pop("_comfy_env_dtimers").items() if v[1]}


def _calls(a, fn, k, calls):
    """Seconds for ``calls`` back-to-back calls of ``fn(k, 1 MiB)``, each waited for."""
    t0 = time.perf_counter()
    for _ in range(calls):
        r = a.submit(fn, k, MiB).result()
        torch.cuda.synchronize()
        del r
    return time.perf_counter() - t0


def fresh_driver(a, k, calls):
    """Driver time per fresh tensor, both processes (calls made back to back)."""
    for _ in range(5):
        a.submit(B.w_fresh, k, MiB).result()
    B.settle()
    a.submit(driver_timers, True).result()
    driver_timers(True)
    wall = _calls(a, B.w_fresh, k, calls)
    B.settle()
    parent = driver_timers(False)
    worker = a.submit(driver_timers, False).result()
    n = calls * k
    out = {"wall_per_tensor_us": wall / n * 1e6}
    for side, acc in (("parent", parent), ("worker", worker)):
        for name, (secs, count) in sorted(acc.items(), key=lambda kv: -kv[1][0]):
            out[f"{side}:{name}"] = {"us_per_tensor": secs / n * 1e6, "us_per_call": secs / count * 1e6,
                                     "count_per_tensor": count / n}
    return out


def w_timers(on, bench_dir=None):
    """Start (on=True) or stop and return (on=False) timers in the worker."""
    import builtins
    if bench_dir not in sys.path:
        sys.path.insert(0, bench_dir)
    import bench_cuda as BB
    if on:
        tm = builtins.__dict__["_comfy_env_timers"] = BB.Timers(_targets("worker"))
        tm.__enter__()
        return None
    tm = builtins.__dict__.pop("_comfy_env_timers")
    tm.__exit__(None, None, None)
    return {k: v for k, v in tm.acc.items()}


def primitives(k=200):
    """Ways to make a tensor over device memory we do not own, in this process."""
    from comfy_env.ipc.cuda.receiver import _DeviceBytes
    import weakref
    x = torch.ones(MiB // 4, device="cuda")
    ptr = x.data_ptr()
    dev = torch.device("cuda", 0)
    out = {}

    def t(label, fn, n=3000):
        for _ in range(k):
            fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        out[label] = (time.perf_counter() - t0) / n * 1e6
        print(f"  {label:<58} {out[label]:8.2f} µs")

    print("\n===== primitives (parent process)")
    t("as_tensor(CAI typed, device=)", lambda: torch.as_tensor(
        _DeviceBytes(ptr, 0, "<f4", (MiB // 4,), (4,)), device=dev))
    t("as_tensor(CAI typed)", lambda: torch.as_tensor(_DeviceBytes(ptr, 0, "<f4", (MiB // 4,), (4,))))
    t("_DeviceBytes + weakref.ref", lambda: weakref.ref(_DeviceBytes(ptr, 0, "<f4", (MiB // 4,), (4,))))
    # A dtype with no __cuda_array_interface__ typestr (bfloat16, float8): today bytes, a dtype
    # view and as_strided; the candidate: the same-size integer typed, then one dtype view.
    t("bfloat16 2-d: as_tensor(CAI bytes) + view + as_strided", lambda: torch.as_tensor(
        _DeviceBytes(ptr, 512 * 1024 * 2)).view(torch.bfloat16).as_strided((512, 1024), (1024, 1)))
    t("bfloat16 2-d: as_tensor(CAI <i2 typed) + view", lambda: torch.as_tensor(
        _DeviceBytes(ptr, 0, "<i2", (512, 1024), (2048, 2))).view(torch.bfloat16))
    # The receiver's own wrap, as this tree (or COMFY_ENV_BENCH_SRC's) builds it.
    from types import SimpleNamespace
    from comfy_env.ipc.cuda.receiver import Receiver
    me = SimpleNamespace(local=SimpleNamespace(torch=torch))
    for label, dtype, shape, strides in (("float32 1-d", "float32", (MiB // 4,), (1,)),
                                         ("bfloat16 2-d", "bfloat16", (512, 1024), (1024, 1)),
                                         ("bfloat16 2-d transposed", "bfloat16", (1024, 512), (1, 1024)),
                                         ("float8_e4m3fn 1-d", "float8_e4m3fn", (MiB,), (1,)),
                                         ("float32 0-d", "float32", (), ())):
        desc = SimpleNamespace(dtype=dtype, shape=shape, strides=strides)
        t(f"Receiver._wrap {label}", lambda desc=desc: Receiver._wrap(me, ptr, desc, 0, dev))
    t("torch.empty((0,), device=)", lambda: torch.empty((0,), dtype=torch.float32, device=dev))
    if hasattr(torch._C, "_construct_storage_from_data_pointer"):
        mk = torch._C._construct_storage_from_data_pointer
        t("_construct_storage_from_data_pointer", lambda: mk(ptr, dev, MiB))
        empty = torch.empty(0, dtype=torch.float32, device=dev)
        t("storage + empty(0).set_", lambda: torch.empty(0, dtype=torch.float32, device=dev).set_(
            mk(ptr, dev, MiB), 0, (MiB // 4,), (1,)))
        t("storage + new_empty(0).set_", lambda: empty.new_empty(0).set_(
            mk(ptr, dev, MiB), 0, (MiB // 4,), (1,)))
        # (torch.tensor(storage) crashed the process on torch 2.11: not tried)
        t("weakref to storage", lambda: weakref.ref(mk(ptr, dev, MiB)))
        s = mk(ptr, dev, MiB)
        v = empty.new_empty(0).set_(s, 0, (MiB // 4,), (1,))
        died = []
        r = weakref.ref(s, lambda _r: died.append(1))
        del s
        alive_with_view = not died
        w = v[1:]
        del v
        alive_with_slice = not died
        del w
        import gc
        gc.collect()
        print(f"  storage weakref: alive while a view lives {alive_with_view}, while a slice of it lives "
              f"{alive_with_slice}, dead after both {bool(died)} (ref {r() is None})")
        out["storage_weakref_ok"] = alive_with_view and alive_with_slice and bool(died)
    return out


def end_to_end(a, k, reps):
    empty = B.timed(lambda: a.submit(B.w_nothing).result(), 300, warm=30)
    res = {"empty_us": empty * 1e6}
    from comfy_env.ipc.cuda.plane import PLANE
    for label, fn in (("same", B.w_many), ("fresh", B.w_fresh)):
        w0, r0 = a.submit(B.w_routes).result()
        i0 = PLANE.imports.stats()["imports_made"]
        call = B.timed(lambda: a.submit(fn, k, MiB).result(), reps, warm=10)
        res[label] = {"call_ms": call * 1e3, "per_tensor_us": (call - empty) / k * 1e6,
                      "paired": B.paired_per_tensor(a, fn, k, MiB, reps=reps),
                      "paired_stream": B.paired_per_tensor(a, fn, k, MiB, reps=reps, sync="stream"),
                      "cpu": B.cpu_per_tensor(a, fn, k, MiB, calls=reps)}
        w1, r1 = a.submit(B.w_routes).result()
        res[label]["counts"] = {"routes": {r: w1[r] - w0.get(r, 0) for r in w1 if w1[r] != w0.get(r, 0)},
                                "recycled": r1 - r0, "parent_imports": PLANE.imports.stats()["imports_made"] - i0,
                                "cache": PLANE.import_cache.stats()}
    return res


def _e2e_line(e):
    def one(v):
        return (f"{v['per_tensor_us']:.1f} (paired {v['paired']['median_us']:.1f} "
                f"[{v['paired']['p25_us']:.1f}..{v['paired']['p75_us']:.1f}], stream-synced "
                f"{v['paired_stream']['median_us']:.1f}; CPU parent "
                f"{v['cpu']['parent_cpu_us']:.1f} + worker {v['cpu']['worker_cpu_us']:.1f})")
    def counts(v):
        c = v.get("counts", {})
        return f"routes {c.get('routes')} recycled {c.get('recycled')} parent imports {c.get('parent_imports')}"
    return (f"empty {e['empty_us']:.1f} µs; per tensor µs: same {one(e['same'])}, fresh {one(e['fresh'])}\n"
            f"    same: {counts(e['same'])}; fresh: {counts(e['fresh'])}; cache {e['fresh'].get('counts', {}).get('cache')}")


def phases(a, k, calls, fn=None):
    """Per tensor µs of each timed function, both sides, over ``calls`` calls (same
    tensors unless ``fn`` says otherwise)."""
    fn = fn or B.w_many
    for _ in range(10):
        a.submit(fn, k, MiB).result()
    B.settle()
    a.submit(w_timers, True, HERE).result()
    with B.Timers(_targets("parent")) as tm:
        wall = _calls(a, fn, k, calls)
        B.settle()
    worker = a.submit(w_timers, False, HERE).result()
    n = calls * k
    out = {"wall_per_tensor_us": wall / n * 1e6}
    for side, acc in (("parent", tm.acc), ("worker", worker)):
        for name, (secs, count) in acc.items():
            if count:
                out[f"{side}:{name}"] = {"us_per_tensor": secs / n * 1e6, "count_per_call": count / calls}
    return out


def main():
    k = int(sys.argv[sys.argv.index("--tensors") + 1]) if "--tensors" in sys.argv else 32
    calls = int(sys.argv[sys.argv.index("--calls") + 1]) if "--calls" in sys.argv else 200
    label = sys.argv[sys.argv.index("--label") + 1] if "--label" in sys.argv else "tree"
    # --worker-env K=V (repeatable): the worker's environment, e.g. COMFY_ENV_CUDA_HEAP=staging
    wenv = dict(sys.argv[i + 1].split("=", 1) for i, v in enumerate(sys.argv) if v == "--worker-env")
    B.install()
    torch.zeros(1, device="cuda")
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} {torch.cuda.get_allocator_backend()} "
          f"comfy_env from {os.path.dirname(comfy_env.__file__)}")
    res = {"label": label, "tensors": k, "gpu": torch.cuda.get_device_name()}
    if "--primitives" in sys.argv or "--primitives-only" in sys.argv:
        res["primitives"] = primitives()
    if "--primitives-only" in sys.argv:
        dump_to_out(f"profile_w2p_{label}.json", res)
        return
    a = B.new_executor(wenv)
    res["worker_env"] = wenv
    try:
        res["e2e"] = end_to_end(a, k, reps=max(30, calls // 2))
        print(f"\n[{label}] {k} × 1 MiB per call: {_e2e_line(res['e2e'])}")
        if "--e2e-only" not in sys.argv:
            res["phases"] = ph = phases(a, k, calls)
            print(f"[{label}] instrumented wall per tensor {ph['wall_per_tensor_us']:.1f} µs; per tensor by function:")
            for name, v in ph.items():
                if isinstance(v, dict):
                    print(f"    {name:<32} {v['us_per_tensor']:7.2f} µs   ({v['count_per_call']:.1f} per call)")
        if "--fresh-phases" in sys.argv:
            res["fresh_phases"] = ph = phases(a, k, calls, B.w_fresh)
            print(f"[{label}] fresh tensors, instrumented wall per tensor {ph['wall_per_tensor_us']:.1f} µs; "
                  f"per tensor by function:")
            for name, v in ph.items():
                if isinstance(v, dict):
                    print(f"    {name:<32} {v['us_per_tensor']:7.2f} µs   ({v['count_per_call']:.1f} per call)")
        if "--fresh-driver" in sys.argv:
            res["fresh_driver"] = fd = fresh_driver(a, k, max(20, calls // 4))
            print(f"[{label}] fresh tensors, driver calls (wall {fd['wall_per_tensor_us']:.1f} µs per tensor "
                  f"with the timers):")
            for name, v in fd.items():
                if isinstance(v, dict):
                    print(f"    {name:<44} {v['us_per_tensor']:7.2f} µs/tensor  {v['us_per_call']:7.2f} µs/call  "
                          f"{v['count_per_tensor']:.2f} calls/tensor")
        res["e2e_again"] = end_to_end(a, k, reps=max(30, calls // 2))
        print(f"[{label}] again: {_e2e_line(res['e2e_again'])}")
    finally:
        a.shutdown()
    dump_to_out(f"profile_w2p_{label}.json", res)


if __name__ == "__main__":
    main()
