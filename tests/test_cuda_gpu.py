"""GPU tests of the CUDA plane through IsolatedExecutor (marker ``gpu``; skipped without a GPU).

Run this file once per parent allocator: with ``PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync``
(ComfyUI's default) and without it (the native allocator).  Each test runs the worker
under both allocators (``worker_alloc`` parameter).
"""
import contextlib
import os
import sys
import threading
import time

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import cloudpickle

from comfy_env import IsolatedExecutor, WorkerCrashed
from comfy_env.ipc.cuda import install
from comfy_env.ipc.cuda import driver as D
from comfy_env.ipc import lifetime
from comfy_env.ipc.cuda.plane import PLANE

# Worker functions below travel by value: the worker cannot import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])
install()
pytestmark = pytest.mark.gpu
GiB = 1 << 30
ASYNC = "backend:cudaMallocAsync"
PARENT_ASYNC = torch.cuda.get_allocator_backend() == "cudaMallocAsync"


@contextlib.contextmanager
def executor(worker_alloc, **kw):
    """An executor whose worker runs ``worker_alloc`` (its env is read at spawn)."""
    old = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    old_heap = os.environ.get("COMFY_ENV_CUDA_HEAP")
    if worker_alloc:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = worker_alloc
        # An async worker: the pool policy (the default, native, would take the backend out).
        os.environ.setdefault("COMFY_ENV_CUDA_HEAP", "pool")
    else:
        os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    try:
        ex = IsolatedExecutor(env=None, max_workers=1, initializer=install, **kw)
        assert ex.submit(w_backend).result(timeout=120) == ("cudaMallocAsync" if worker_alloc else "native")
    finally:
        if old is None:
            os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)
        else:
            os.environ["PYTORCH_CUDA_ALLOC_CONF"] = old
        if old_heap is None:
            os.environ.pop("COMFY_ENV_CUDA_HEAP", None)
        else:
            os.environ["COMFY_ENV_CUDA_HEAP"] = old_heap
    try:
        yield ex
    finally:
        ex.shutdown(wait=True)


WORKER_ALLOCS = pytest.mark.parametrize("worker_alloc", [ASYNC, ""], ids=["worker-async", "worker-native"])


def settle(flush=True):
    """Let finalizers run and releases travel (``flush``: drop the import cache too)."""
    import gc
    from comfy_env.ipc import lifetime
    for _ in range(5):
        gc.collect()
        lifetime.LEDGER.drain()
        if flush:
            PLANE.import_cache.flush()
        time.sleep(0.05)


# -- worker-side functions ------------------------------------------------------------------
def w_backend():
    import torch
    torch.zeros(1, device="cuda")
    return torch.cuda.get_allocator_backend()


def w_routes():
    from comfy_env.ipc.cuda.plane import PLANE
    return dict(PLANE.routes)


def w_make(n, dtype_name, device=0):
    import torch
    dt = getattr(torch, dtype_name)
    return (torch.arange(n, device=f"cuda:{device}") % 251).to(dt)


def w_views():
    import torch
    base = torch.arange(4 * 6, device="cuda", dtype=torch.float32).reshape(4, 6)
    return {"base": base, "row": base[1:], "col": base[:, 2], "t": base.t(), "step": base[::2, ::3],
            "scalar": base[2, 3], "empty": base[:0], "expand": base[0:1].expand(3, 6)}


def w_sum(t):
    return float(t.double().sum().item()), str(t.device), t.dtype, tuple(t.shape), tuple(t.stride())


def w_echo(t):
    return t


# dtypes no __cuda_array_interface__ typestr names: received over the integer of their size.
ALIASED = ["bfloat16", "float8_e4m3fn", "float8_e5m2", "complex32", "uint16", "uint32", "uint64"]


def w_bit_views(name):
    """Views of a tensor of dtype ``name`` whose bits are all distinct (made as integers)."""
    import torch
    dt = getattr(torch, name)
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    it = ints[dt.itemsize]
    base = (torch.arange(5 * 6, device="cuda", dtype=torch.int64) * 2654435761 % 251 - 120).to(it)
    base = base.view(dt).reshape(5, 6)
    return {"base": base, "row": base[1:], "col": base[:, 2], "t": base.t(), "step": base[::2, ::3],
            "scalar": base[2, 3], "expand": base[0:1].expand(3, 6)}


def w_bits_of(t):
    """What the worker got: its layout and its bits (as the integer of its size, on the CPU)."""
    import torch
    it = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return str(t.device), t.dtype, tuple(t.shape), tuple(t.stride()), t.view(it).cpu()


def w_add1(t):
    return t + 1


def w_sleep_then_fill(n):
    import torch
    t = torch.zeros(n, device="cuda")
    torch.cuda._sleep(1_000_000_000)        # ~0.5 s of GPU time before the fill
    t.fill_(42.0)
    return t                                # no synchronize: the event must order the reader


def w_same_twice():
    import torch
    t = torch.full((1024,), 7.0, device="cuda")
    return t, t, t[10:]


def w_keep(n):
    """The same worker tensor on every call (cached outputs, weights)."""
    import builtins
    import torch
    d = builtins.__dict__.setdefault("_comfy_env_test_keep", {})
    if n not in d:
        d[n] = torch.arange(n, device="cuda", dtype=torch.float32)
    return d[n]


def w_forget():
    import builtins
    import gc
    builtins.__dict__.pop("_comfy_env_test_keep", None)
    gc.collect()
    from comfy_env.ipc.cuda.plane import PLANE
    return PLANE.stats()


def w_stats():
    import gc
    gc.collect()
    from comfy_env.ipc import lifetime
    lifetime.LEDGER.drain()
    from comfy_env.ipc.cuda.plane import PLANE
    return PLANE.stats()


def w_exit():
    os._exit(3)


def w_peak_then_free(nbytes):
    import torch
    x = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    x.fill_(1)
    torch.cuda.synchronize()
    del x
    return True


def w_empty_cache():
    import torch
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    from comfy_env.ipc.cuda.plane import PLANE
    return PLANE.stats()


def w_big(nbytes):
    import torch
    t = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    t.fill_(9)
    t[-1] = 5
    return t


def w_check_big(t):
    return int(t[0].item()), int(t[-1].item()), t.numel()


def w_hold(t):
    """Keep the argument (the staging block stays busy) and return its sum."""
    import builtins
    builtins.__dict__.setdefault("_comfy_env_test_held", []).append(t)
    return float(t.double().sum().item())


def w_held_sums():
    import builtins
    return [float(t.double().sum().item()) for t in builtins.__dict__.get("_comfy_env_test_held", [])]


def w_drop_held():
    import builtins
    builtins.__dict__.pop("_comfy_env_test_held", None)


def w_slow_copy(t):
    """Read the argument late: a GPU sleep, then a copy kept for later; no synchronize."""
    import builtins
    import torch
    torch.cuda._sleep(500_000_000)          # ~0.25 s of GPU time before the read
    builtins.__dict__.setdefault("_comfy_env_test_held", []).append(t * 1)
    return None


def w_import_stats():
    from comfy_env.ipc.cuda.plane import PLANE
    return PLANE.imports.stats()


def free_bytes():
    torch.cuda.synchronize()
    return D.mem_get_info()[0]


# -- tests ----------------------------------------------------------------------------------
SMALL_COPY = pytest.mark.parametrize("small_copy", ["16", "0"], ids=["small-copy", "zero-copy-only"])


@WORKER_ALLOCS
@SMALL_COPY
def test_worker_to_parent_every_dtype_zero_copy_when_worker_is_async(worker_alloc, small_copy, monkeypatch):
    """Zero copy (``pool``) from an async worker once small copies are off; by default a
    small tensor sent once is staged (one copy), which must carry every dtype as well."""
    monkeypatch.setenv("COMFY_ENV_CUDA_SMALL_COPY_MIB", small_copy)
    dtypes = ["float32", "float16", "bfloat16", "float64", "int8", "uint8", "int32", "int64", "bool",
              "complex64"]
    with executor(worker_alloc) as ex:
        for name in dtypes:
            t = ex.submit(w_make, 1000, name).result(timeout=60)
            ref = (torch.arange(1000, device="cuda") % 251).to(getattr(torch, name))
            assert t.device == torch.device("cuda", 0) and t.dtype == ref.dtype
            assert torch.equal(t, ref), name
        routes = ex.submit(w_routes).result()
    want = "pool" if worker_alloc and small_copy == "0" else "staging"
    assert routes.get(want, 0) >= len(dtypes), routes


@WORKER_ALLOCS
def test_views_keep_shape_strides_and_values_both_ways(worker_alloc):
    with executor(worker_alloc) as ex:
        got = ex.submit(w_views).result(timeout=60)
        base = torch.arange(24, device="cuda", dtype=torch.float32).reshape(4, 6)
        want = {"base": base, "row": base[1:], "col": base[:, 2], "t": base.t(), "step": base[::2, ::3],
                "scalar": base[2, 3], "empty": base[:0], "expand": base[0:1].expand(3, 6)}
        for k, w in want.items():
            assert got[k].shape == w.shape and got[k].stride() == w.stride(), k
            assert torch.equal(got[k], w), k
        for k, w in want.items():                      # and parent -> worker
            s, dev, dt, shape, stride = ex.submit(w_sum, w).result(timeout=60)
            assert s == float(w.double().sum()) and dev == "cuda:0" and shape == tuple(w.shape), k
            assert stride == w.stride(), k


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@WORKER_ALLOCS
def test_views_of_dtypes_without_a_typestr_keep_layout_and_bits_both_ways(worker_alloc):
    """bfloat16, float8, complex32 and the wide unsigned ints have no typestr torch reads:
    they are built over the signed integer of their size and viewed; shape, strides and
    every bit must survive, including 0-d, transposed, strided and expanded views."""
    def bits(t):
        return w_bits_of(t)[4]
    with executor(worker_alloc) as ex:
        for name in ALIASED:
            got = ex.submit(w_bit_views, name).result(timeout=60)
            want = w_bit_views(name)
            for k, w in want.items():
                g = got[k]
                assert (g.device, g.dtype, g.shape, g.stride()) == (w.device, w.dtype, w.shape, w.stride()), (name, k)
                assert torch.equal(bits(g), bits(w)), (name, k)
                dev, dt, shape, stride, b = ex.submit(w_bits_of, w).result(timeout=60)   # parent -> worker
                assert (dev, dt, shape, stride) == ("cuda:0", w.dtype, tuple(w.shape), w.stride()), (name, k)
                assert torch.equal(b, bits(w)), (name, k)


@WORKER_ALLOCS
def test_parent_to_worker_staged_without_touching_parent_allocator(worker_alloc):
    backend = torch.cuda.get_allocator_backend()
    before = PLANE.routes["staging"]
    with executor(worker_alloc) as ex:
        x = torch.randn(1 << 20, device="cuda", dtype=torch.bfloat16)
        y = ex.submit(w_add1, x).result(timeout=60)
        assert torch.equal(y, x + 1)
    assert PLANE.routes["staging"] > before
    assert torch.cuda.get_allocator_backend() == backend


@WORKER_ALLOCS
def test_parent_to_worker_recycles_its_staging_block_without_stale_or_overwritten_data(worker_alloc):
    n = 1 << 20
    with executor(worker_alloc) as ex:
        recycled, made = PLANE.recycled, None
        for i in range(30):                    # a new tensor every call, one block for all
            x = torch.full((n,), float(i), device="cuda")
            assert ex.submit(w_sum, x).result(timeout=60)[0] == float(i) * n
            if i == 2:
                made = ex.submit(w_import_stats).result()["imports_made"]
        assert PLANE.recycled >= recycled + 25
        assert ex.submit(w_import_stats).result()["imports_made"] <= made + 1
        # A block the worker still holds is never copied into: the next tensor gets another.
        a, b = torch.full((n,), 1.0, device="cuda"), torch.full((n,), 2.0, device="cuda")
        assert ex.submit(w_hold, a).result(timeout=60) == n
        assert ex.submit(w_hold, b).result(timeout=60) == 2.0 * n
        assert ex.submit(w_held_sums).result(timeout=60) == [n, 2.0 * n]
        ex.submit(w_drop_held).result()
        # Reads the worker enqueued late finish before the parent copies the next tensor in.
        ex.submit(w_slow_copy, torch.full((n,), 5.0, device="cuda")).result(timeout=60)
        ex.submit(w_sum, torch.full((n,), 6.0, device="cuda")).result(timeout=60)
        assert ex.submit(w_held_sums).result(timeout=60) == [5.0 * n]
        ex.submit(w_drop_held).result()


def w_sleep_then_fill_many(k, n):
    import torch
    ts = [torch.zeros(n, device="cuda") for _ in range(k)]
    torch.cuda._sleep(1_000_000_000)        # ~0.5 s of GPU time before the fills
    for i, t in enumerate(ts):
        t.fill_(float(i + 1))
    return ts                               # staged in one batch of copies, no synchronize


@WORKER_ALLOCS
def test_receiver_waits_for_producer_kernels(worker_alloc):
    with executor(worker_alloc) as ex:
        t = ex.submit(w_sleep_then_fill, 1 << 20).result(timeout=60)
        assert float(t.min()) == 42.0 and float(t.max()) == 42.0
        # Several small results: their copies go in one batch call (off the legacy
        # default stream, which the batch call refuses): still after the producer.
        ts = ex.submit(w_sleep_then_fill_many, 6, 1 << 18).result(timeout=60)
        assert [(float(t.min()), float(t.max())) for t in ts] == [(i + 1.0, i + 1.0) for i in range(6)]
        # ... and the other way: the parent's copies of several tensors in one call.
        xs = [torch.zeros(1 << 18, device="cuda") for _ in range(6)]
        torch.cuda._sleep(1_000_000_000)
        for i, x in enumerate(xs):
            x.fill_(float(i + 1))
        assert [s for s, *_ in ex.submit(w_sums, xs).result(timeout=60)] == [(i + 1.0) * (1 << 18) for i in range(6)]


def w_sums(ts):
    return [w_sum(t) for t in ts]


def _current_context():
    import ctypes
    cur = ctypes.c_void_p()
    assert D.try_call("cuCtxGetCurrent", ctypes.byref(cur)) == 0
    return cur.value


def test_a_thread_with_no_cuda_context_sends_several_tensors_in_one_call():
    """Each driver call of the sending side makes its context current first: a caller
    thread where no CUDA context is current (it never used CUDA itself) sends, in one
    call, tensors through each way that makes a driver call while encoding (a new
    pointer exported or a new storage's handle taken, a first copy into a new staging
    block, a view of a tensor sent before) after one that makes none, and has no
    context current after ``submit`` either."""
    n = 1 << 20
    big = torch.arange(n, dtype=torch.float32, device="cuda")          # 4 MiB: zero copy when sent again
    with executor("") as ex:
        assert ex.submit(w_sum, big).result(timeout=60)[0] == float(n * (n - 1) // 2)   # sent before now
        fresh_big = torch.full((4 * n,), 2.0, device="cuda")            # 16 MiB, first sight
        small = [torch.full((1000,), float(i), device="cuda") for i in range(3)]
        torch.cuda.synchronize()
        out, errors = {}, []

        def caller():
            try:
                out["before"] = _current_context()
                fut = ex.submit(w_sums, [big, fresh_big, *small, big[10:20], fresh_big[:5]])
                out["after"] = _current_context()
                out["sums"] = [s for s, *_ in fut.result(timeout=60)]
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=caller)
        t.start()
        t.join(120)
        assert not t.is_alive() and not errors, errors
        assert out["before"] is None and out["after"] is None
        assert out["sums"] == [float(n * (n - 1) // 2), 8.0 * n, 0.0, 1000.0, 2000.0, float(sum(range(10, 20))),
                               10.0]


def test_a_tensor_sent_again_while_a_kernel_still_writes_it_is_read_after_the_kernel():
    """A tensor lent in place names an event only while its stream has work queued:
    sent again right after a slow kernel and an in-place fill (no synchronise), the
    worker reads the filled values."""
    n = 1 << 20
    x = torch.zeros(n, device="cuda")
    with executor("") as ex:
        assert ex.submit(w_sum, x).result(timeout=60)[0] == 0.0       # sent before: zero copy now
        for v in (3.0, 4.0):
            torch.cuda._sleep(1_000_000_000)                           # ~0.5 s of GPU time first
            x.fill_(v)
            assert ex.submit(w_sum, x).result(timeout=60)[0] == v * n
        torch.cuda.synchronize()
        assert ex.submit(w_sum, x).result(timeout=60)[0] == 4.0 * n    # settled: no event needed


@SMALL_COPY
def test_same_pointer_twice_is_one_import_and_aliases_survive_each_other(small_copy, monkeypatch):
    monkeypatch.setenv("COMFY_ENV_CUDA_SMALL_COPY_MIB", small_copy)   # staged whole, or exported
    with executor(ASYNC) as ex:
        a, b, c = ex.submit(w_same_twice).result(timeout=60)
        assert a.data_ptr() == b.data_ptr() and c.data_ptr() == a.data_ptr() + 40
        assert PLANE.imports.stats()["imported_pointers"] >= 1
        del a
        settle()
        assert float(b.sum()) == 7.0 * 1024 and float(c.sum()) == 7.0 * 1014
        # and again in a second call while b is still alive
        a2, _, _ = ex.submit(w_same_twice).result(timeout=60)
        del b, c
        settle()
        assert float(a2.sum()) == 7.0 * 1024


def test_import_cache_reuses_the_import_and_releases_after_free():
    with executor(ASYNC) as ex:
        n = 1 << 18
        ref = torch.arange(n, device="cuda", dtype=torch.float32)
        t = ex.submit(w_keep, n).result(timeout=60)         # first sight: staged (one copy)
        assert torch.equal(t, ref) and ex.submit(w_routes).result().get("pool", 0) == 0
        t = ex.submit(w_keep, n).result(timeout=60)         # sent again: zero copy from now on
        assert torch.equal(t, ref) and ex.submit(w_routes).result().get("pool", 0) == 1
        ptr = t.data_ptr()
        del t
        settle(flush=False)
        imported = PLANE.imports.stats()["imported_pointers"]
        hits = PLANE.import_cache.stats()["hits"]
        for _ in range(20):                        # the same block again: no new import
            t = ex.submit(w_keep, n).result(timeout=60)
            assert t.data_ptr() == ptr and torch.equal(t, ref)
            del t
        assert PLANE.import_cache.stats()["hits"] >= hits + 20
        assert PLANE.imports.stats()["imported_pointers"] == imported
        # The worker still lends the block (no release went upstream) while it keeps it.
        assert ex.submit(w_stats).result()["owned_blocks"] >= 1
        torch.cuda.empty_cache()                   # releases our cached imports
        settle()
        assert PLANE.import_cache.stats()["entries"] == 0
        assert ex.submit(w_stats).result()["owned_blocks"] == 0
        # The idle timer alone releases too.
        t = ex.submit(w_keep, n).result(timeout=60)   # the same storage: zero copy again
        del t
        deadline = time.monotonic() + 10
        while PLANE.import_cache.stats()["entries"] and time.monotonic() < deadline:
            time.sleep(0.05)
        settle(flush=False)
        assert ex.submit(w_stats).result()["owned_blocks"] == 0
        # Once the worker drops its tensor it asks us to let the block go ("reclaim"):
        # released without our idle time (set out of reach here) or empty_cache.
        old_idle = PLANE.import_cache.max_idle_s
        PLANE.import_cache.max_idle_s = 1000.0
        try:
            t = ex.submit(w_keep, n).result(timeout=60)
            assert torch.equal(t, ref)
            del t
            settle(flush=False)
            assert PLANE.import_cache.stats()["entries"] >= 1
            ex.submit(w_forget).result()
            deadline = time.monotonic() + 10
            while PLANE.import_cache.stats()["entries"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert PLANE.import_cache.stats()["entries"] == 0
            settle(flush=False)
            assert ex.submit(w_stats).result()["owned_blocks"] == 0
        finally:
            PLANE.import_cache.max_idle_s = old_idle


def w_keep_big(n):
    """A worker tensor far above the old fixed import-cache bound (256 MiB), kept."""
    import builtins
    import torch
    d = builtins.__dict__.setdefault("_comfy_env_test_keep_big", {})
    if n not in d:
        d[n] = torch.full((n,), 5, dtype=torch.uint8, device="cuda")
    return d[n]


def test_a_big_repeated_result_stays_imported_and_a_big_fresh_one_is_staged_and_recycled():
    """1 GiB: the worker's kept tensor is mapped once (no byte bound for its owner's
    blocks), a fresh one each call takes one copy into a block we keep mapped."""
    with executor(ASYNC) as ex:
        n = GiB
        t = ex.submit(w_keep_big, n).result(timeout=120)   # first sight: copied
        assert int(t[0]) == 5 and int(t[-1]) == 5
        del t
        settle(flush=False)
        made = PLANE.imports.stats()["imports_made"]
        for _ in range(5):                                  # sent again: zero copy, imported once
            t = ex.submit(w_keep_big, n).result(timeout=120)
            assert int(t[-1]) == 5
            del t
        assert PLANE.imports.stats()["imports_made"] == made + 1
        routes = ex.submit(w_routes).result()
        assert routes.get("pool", 0) == 5, routes
        recycled0 = ex.submit(w_staging_stats).result()[0]
        made = PLANE.imports.stats()["imports_made"]
        for i in range(6):                                  # fresh each call: staged, block recycled
            t = ex.submit(w_fresh, n // 4, float(i)).result(timeout=120)
            assert float(t[0]) == float(i) and float(t[-1]) == float(i)
            del t
        recycled, routes = ex.submit(w_staging_stats).result()
        assert recycled - recycled0 >= 4, (recycled, recycled0)
        assert PLANE.imports.stats()["imports_made"] - made <= 2
        ex.submit(w_forget_big).result()
        torch.cuda.empty_cache()
        settle()


def w_forget_big():
    import builtins
    builtins.__dict__.pop("_comfy_env_test_keep_big", None)


@SMALL_COPY
def test_worker_crash_leaves_parent_tensors_valid(small_copy, monkeypatch):
    monkeypatch.setenv("COMFY_ENV_CUDA_SMALL_COPY_MIB", small_copy)   # its staging pool, or its heap
    with executor(ASYNC) as ex:
        t = ex.submit(w_make, 1 << 20, "float32").result(timeout=60)
        ref = (torch.arange(1 << 20, device="cuda") % 251).float()
        with pytest.raises(WorkerCrashed):
            ex.submit(w_exit).result(timeout=60)
        assert torch.equal(t, ref)                 # the exporter is gone, the data is not
        t2 = ex.submit(w_make, 16, "float32").result(timeout=60)   # a fresh worker works
        assert torch.equal(t2, ref[:16])
        del t
        settle()


def w_fresh(n, value):
    import torch
    return torch.full((n,), value, device="cuda")


def w_fresh_many(k, n, value):
    import torch
    return [torch.full((n,), value + i, device="cuda") for i in range(k)]


def w_staging_stats():
    from comfy_env.ipc.cuda.plane import PLANE
    return PLANE.recycled, dict(PLANE.routes)


def test_fresh_results_are_staged_and_recycled():
    with executor(ASYNC) as ex:
        n = 1 << 18                                    # 1 MiB of float32
        imports0 = PLANE.imports.stats()["imports_made"]
        for i in range(40):                            # fresh tensors, dropped before the next call
            ts = ex.submit(w_fresh_many, 4, n, float(i)).result(timeout=60)
            assert [float(t[0]) for t in ts] == [float(i + j) for j in range(4)]
            assert [float(t[-1]) for t in ts] == [float(i + j) for j in range(4)]
            del ts
        recycled, routes = ex.submit(w_staging_stats).result()
        assert routes.get("staging", 0) == 160 and routes.get("pool", 0) == 0, routes
        assert recycled >= 140, recycled               # the parent reported its blocks idle in time
        assert PLANE.imports.stats()["imports_made"] - imports0 <= 20     # not one per tensor
        # A block the parent still holds is never copied into: held results keep their values.
        held = [ex.submit(w_fresh, n, float(i)).result(timeout=60) for i in range(8)]
        assert [float(t.sum()) for t in held] == [float(i) * n for i in range(8)]
        # Above the 16 MiB small-copy default: a fresh one is copied too (the span only).
        big = ex.submit(w_fresh, (16 << 20) // 4 + 1, 3.0).result(timeout=60)
        assert float(big[-1]) == 3.0
        routes = ex.submit(w_staging_stats).result()[1]
        assert routes.get("pool", 0) == 0 and routes.get("staging", 0) == 169, routes
        del held, big
        settle()


@pytest.mark.filterwarnings("ignore:Casting complex values to real")   # w_sum of complex64
def test_a_received_view_keeps_its_bytes_and_lets_them_go_with_it():
    """Every dtype both ways from a native worker (staged), and a result's lifetime: a view
    of a dtype other than the result's keeps the staging block it arrived in out of
    recycling (later results do not overwrite it), and its death releases the block."""
    with executor("") as ex:
        for name in ["float32", "float16", "bfloat16", "float64", "int8", "uint8", "int32", "int64", "bool",
                     "complex64"]:
            t = ex.submit(w_make, 1000, name).result(timeout=60)
            ref = (torch.arange(1000, device="cuda") % 251).to(getattr(torch, name))
            assert t.device == torch.device("cuda", 0) and t.dtype == ref.dtype
            assert torch.equal(t, ref), name
            s, dev, dt, shape, _ = ex.submit(w_sum, ref[3:]).result(timeout=60)
            assert (s, dev, dt, shape) == (float(ref[3:].double().sum()), "cuda:0", ref.dtype, (997,)), name
        del t
        settle(flush=False)
        holders0 = len(lifetime.LEDGER._holders)
        n = 1 << 18
        t = ex.submit(w_fresh, n, 1.0).result(timeout=60)
        v = t[10:20].view(torch.int32)
        del t
        recycled0 = ex.submit(w_staging_stats).result()[0]
        for i in range(20):
            assert float(ex.submit(w_fresh, n, float(i + 2)).result(timeout=60)[0]) == float(i + 2)
        assert torch.equal(v, torch.full((10,), 1.0, device="cuda").view(torch.int32))
        assert ex.submit(w_staging_stats).result()[0] >= recycled0 + 10    # the others were recycled
        settle(flush=False)
        assert len(lifetime.LEDGER._holders) > holders0          # the view keeps its bytes held
        del v
        settle(flush=False)
        assert len(lifetime.LEDGER._holders) == holders0         # and lets them go with it
        settle()


def test_chain_worker_a_to_worker_b_without_parent_import():
    with executor(ASYNC) as a, executor(ASYNC) as b:
        imports_before = PLANE.imports.stats()["imported_pointers"]
        fa = a.submit(w_make, 1 << 20, "float32")
        fb = b.submit(w_sum, fa)
        s, dev, *_ = fb.result(timeout=60)
        ref = (torch.arange(1 << 20, device="cuda") % 251).float()
        assert s == float(ref.double().sum()) and dev == "cuda:0"
        assert PLANE.imports.stats()["imported_pointers"] == imports_before


def test_chain_1gib_parent_gpu_memory_does_not_move():
    """Issue 6: a 1 GiB tensor A -> B; the parent imports nothing and uses no GPU memory."""
    with executor(ASYNC) as a, executor(ASYNC) as b:
        torch.cuda.synchronize()
        imports_before = PLANE.imports.stats()["imported_pointers"]
        reserved_before = torch.cuda.memory_reserved()
        n = GiB // 4                                   # float32: 1 GiB
        fa = a.submit(w_make, n, "float32")
        s, dev, dtype, shape, _ = b.submit(w_sum, fa).result(timeout=120)
        assert shape == (n,) and dev == "cuda:0"
        assert PLANE.imports.stats()["imported_pointers"] == imports_before
        assert torch.cuda.memory_reserved() == reserved_before
        # Only materialising in the parent imports it (lazily, on result()).
        t = fa.result(timeout=60)
        assert t.shape == (n,) and PLANE.imports.stats()["imported_pointers"] == imports_before + 1
        del t, fa
        settle()


@WORKER_ALLOCS
def test_no_gpu_memory_growth_over_10000_calls(worker_alloc):
    with executor(worker_alloc) as ex:
        x = torch.ones(1 << 16, device="cuda")
        for _ in range(200):                                   # warm pools
            ex.submit(w_add1, x).result()
        settle()
        start = free_bytes()
        t0 = time.perf_counter()
        for i in range(10_000):
            y = ex.submit(w_add1, x).result()
            if i % 1000 == 0:
                assert float(y[0]) == 2.0
            del y
        dt = time.perf_counter() - t0
        settle()
        grown = start - free_bytes()
        print(f"10000 round trips ({worker_alloc or 'native'} worker): {dt:.1f} s, growth {grown / 2**20:.1f} MiB, "
              f"{PLANE.stats()}")
        assert grown < 64 << 20, f"GPU memory grew by {grown / 2**20:.1f} MiB"
        # The worker may still keep our recycled staging block mapped (idle, for the next
        # call), and, under a native parent, the record of x (sent again each call: the
        # ipc route, kept while we keep x): empty_cache asks it to let go, after which
        # nothing is lent or held.
        assert PLANE.stats()["owned_blocks"] <= 3
        torch.cuda.empty_cache()
        deadline = time.monotonic() + 10
        while (PLANE.stats()["owned_blocks"] or PLANE.stats()["remote_blocks"]) and time.monotonic() < deadline:
            settle()
        assert PLANE.stats()["owned_blocks"] == 0 and PLANE.stats()["remote_blocks"] == 0


@pytest.mark.parametrize("heap", ["pool", "staging"])
def test_empty_cache_in_worker_releases_peak(heap, monkeypatch):
    monkeypatch.setenv("COMFY_ENV_CUDA_HEAP", heap)
    with executor(ASYNC) as ex:
        t = ex.submit(w_make, 1024, "float32").result()   # pool fd known, then dropped
        del t
        settle()
        base = free_bytes()
        assert ex.submit(w_peak_then_free, 4 * GiB).result(timeout=60)
        peak = free_bytes()
        stats = ex.submit(w_empty_cache).result(timeout=60)
        settle()
        t = ex.submit(w_make, 1024, "float32").result()   # still works after a roll
        assert torch.equal(t, (torch.arange(1024, device="cuda") % 251).float())
        del t
        settle()
        after = free_bytes()
        print(f"heap={heap}: worker peak 4 GiB: free {base >> 20} -> {peak >> 20} MiB after free -> "
              f"{after >> 20} MiB after empty_cache ({stats})")
        if heap == "pool":
            assert base - peak > 3 * GiB, "expected the exportable pool to keep its peak until empty_cache"
        assert base - after < 512 << 20, "empty_cache in the worker did not release the peak"


@pytest.mark.slow
@pytest.mark.parametrize("gib", [5, 6, 12])
def test_big_tensors_both_ways_never_kill_the_parent(gib):
    n = gib * GiB
    with executor(ASYNC) as ex:
        t = ex.submit(w_big, n).result(timeout=300)
        assert t.numel() == n and int(t[0]) == 9 and int(t[-1]) == 5
        del t
        settle()
        x = torch.full((n,), 3, dtype=torch.uint8, device="cuda")
        x[-1] = 4
        assert ex.submit(w_check_big, x).result(timeout=300) == (3, 4, n)
        del x
        settle()
        routes = ex.submit(w_routes).result()
    assert routes.get("vmm", 0) >= 1 and PLANE.routes["vmm"] >= 1
    torch.cuda.empty_cache()


# -- the ipc route: legacy IPC handles of a native-allocator process's allocations -------------
def w_fresh_each_call(n, value):
    """A new tensor each call (a node's output); the previous one is dropped by the caller."""
    import torch
    t = torch.full((n // 4,), value, device="cuda")
    t[-1] = value + 1
    return t


def w_ipc_stats():
    import gc
    gc.collect()
    from comfy_env.ipc import lifetime
    lifetime.LEDGER.drain()
    from comfy_env.ipc.cuda.plane import PLANE
    return dict(PLANE.routes), PLANE.stats(), dict(PLANE.sender.ipc_export)


def w_two_in_one_segment(n):
    """Two tensors torch places in one cached segment (it splits a freed bigger one), and
    how many segments hold them (per the driver)."""
    import torch
    from comfy_env.ipc.cuda import driver as D
    big = torch.empty(4 * n, dtype=torch.uint8, device="cuda")
    del big
    a = torch.full((n // 4,), 1.0, device="cuda")
    b = torch.full((n // 4,), 2.0, device="cuda")
    torch.cuda.synchronize()
    segments = {D.address_range(a.data_ptr())[0], D.address_range(b.data_ptr())[0]}
    return a, b, len(segments)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mib", [64, 1024])
def test_native_worker_returns_a_new_tensor_each_call_by_ipc_handle_without_growth(mib):
    """Worker on torch's native allocator: a new result each call goes zero copy by the
    legacy IPC handle of its allocation (route ``ipc``); torch serves the next result from
    the same cached segment, whose mapping the parent kept, so the calls open (almost)
    nothing; 200 calls leave no GPU memory behind, and the worker's ``empty_cache``
    closes the parent's kept mappings and gives the memory back."""
    n = mib << 20
    with executor("") as ex:
        for i in range(10):                                   # warm the worker's allocator
            t = ex.submit(w_fresh_each_call, n, float(i)).result(timeout=120)
            assert float(t[0]) == float(i) and float(t[-1]) == float(i) + 1
            del t
        settle()
        start = free_bytes()
        ipc0 = PLANE.receiver.ipc.stats()
        for i in range(200):
            t = ex.submit(w_fresh_each_call, n, float(i)).result(timeout=120)
            if i % 20 == 0 or i == 199:
                assert float(t[0]) == float(i) and float(t[n // 4 - 2]) == float(i), i
                assert float(t[-1]) == float(i) + 1, i
            del t
        settle()
        grown = start - free_bytes()
        routes, wstats, export = ex.submit(w_ipc_stats).result(timeout=60)
        ipc = PLANE.receiver.ipc.stats()
        opened = ipc["ipc_opens_made"] - ipc0["ipc_opens_made"]
        print(f"{mib} MiB x 200 new tensors by ipc: growth {grown / 2**20:.1f} MiB, worker {routes}, "
              f"parent {ipc}, opened {opened}")
        assert export == {0: True}, export
        assert routes.get("ipc", 0) == 210 and routes.get("staging", 0) == 0, routes
        assert opened <= 10 and ipc["ipc_hits"] - ipc0["ipc_hits"] >= 190, ipc   # kept mappings served them
        assert ipc["ipc_open"] == 0 and ipc["ipc_idle"] >= 1, ipc
        assert wstats["owned_blocks"] == 0, wstats            # every record released
        assert grown < 64 << 20, f"GPU memory grew by {grown / 2**20:.1f} MiB"
        # The worker frees its segments: it asks us to close our mappings of them first-ish
        # ("uncache"); the memory comes back once we did.
        before_trim = free_bytes()
        ex.submit(w_empty_cache).result(timeout=60)
        deadline = time.monotonic() + 10
        while PLANE.receiver.ipc.stats()["ipc_idle"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert PLANE.receiver.ipc.stats()["ipc_idle"] == 0
        assert free_bytes() - before_trim >= n - (64 << 20), "the worker's segment was not given back"


def test_storages_of_one_allocation_are_opened_once():
    with executor("") as ex:
        opens0 = PLANE.receiver.ipc.stats()["ipc_opens_made"]
        a, b, segments = ex.submit(w_two_in_one_segment, 64 << 20).result(timeout=120)
        assert float(a[0]) == 1.0 and float(b[-1]) == 2.0
        assert PLANE.receiver.ipc.stats()["ipc_opens_made"] - opens0 == segments
        del a
        settle()
        assert float(b[0]) == 2.0 and float(b[-1]) == 2.0     # the mapping outlives a's record
        del b
        settle()
        assert PLANE.receiver.ipc.stats()["ipc_open"] == 0
        assert ex.submit(w_ipc_stats).result(timeout=60)[1]["owned_blocks"] == 0


@WORKER_ALLOCS
def test_parent_on_the_native_allocator_sends_a_big_tensor_by_ipc_handle(worker_alloc):
    """Parent → worker: zero copy by legacy IPC handle when the parent runs the native
    allocator; under ``cudaMallocAsync`` (no handle for pool memory) staged as before."""
    n = 256 << 20
    with executor(worker_alloc) as ex:
        before = dict(PLANE.routes)
        x = torch.full((n // 4,), 3.0, device="cuda")
        x[-1] = 5.0
        s, dev, *_ = ex.submit(w_sum, x).result(timeout=120)
        assert s == 3.0 * (n // 4 - 1) + 5.0 and dev == "cuda:0"
        x2 = x[1024:]                                          # a view: same storage, its record again
        assert ex.submit(w_sum, x2).result(timeout=120)[0] == s - 3.0 * 1024
        got = {k: PLANE.routes[k] - before.get(k, 0) for k in ("ipc", "staging", "pool")}
        if PARENT_ASYNC:
            # Pool memory: no handle is even asked for.  The parent's heap (the default)
            # sends the storage's second send zero copy; torch's default pool stages both.
            heap = PLANE.local.heap.get(0) is not None
            assert got == ({"ipc": 0, "staging": 1, "pool": 1} if heap else {"ipc": 0, "staging": 2, "pool": 0}), got
            assert PLANE.sender.ipc_export.get(0) is not True
        else:
            assert got == {"ipc": 2, "staging": 0, "pool": 0}, got
            assert PLANE.sender.ipc_export.get(0) is True
        assert float(x[-1]) == 5.0 and float(x[0]) == 3.0      # the parent's tensor intact
        # The parent lets go: whatever the worker still keeps (the storage was sent twice,
        # so its import cache may hold the record) it is asked to reclaim; then nothing of
        # ours is lent and the worker has nothing of ours mapped in use.
        del x, x2
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            settle()
            wstats = ex.submit(w_ipc_stats).result(timeout=60)[1]
            if not PLANE.stats()["owned_blocks"] and not wstats["ipc_open"]:
                break
        assert PLANE.stats()["owned_blocks"] == 0              # released: our storage let go
        assert wstats["ipc_open"] == 0, wstats


def test_a_native_workers_kept_result_is_kept_by_the_parent_until_the_worker_drops_it():
    """Worker on torch's native allocator returning a tensor it keeps (64 MiB, the ``ipc``
    route): the first call is released at once (a first sight: a new output must not be
    pinned), from the second on the parent keeps the record, so every later call lends the
    same record again (no record, open, synchronise or release per call); once the worker
    drops the tensor it asks the parent to let go ("reclaim"), and nothing stays lent."""
    n = 64 << 20
    with executor("") as ex:
        t = ex.submit(w_keep_big, n).result(timeout=120)
        assert int(t[0]) == 5 and int(t[-1]) == 5
        del t
        settle(flush=False)
        assert ex.submit(w_stats).result(timeout=60)["owned_blocks"] == 0     # first sight: released
        old_idle = PLANE.import_cache.max_idle_s
        PLANE.import_cache.max_idle_s = 1000.0                 # only the reclaim lets it go
        try:
            hits = PLANE.import_cache.stats()["hits"]
            opens = PLANE.receiver.ipc.stats()["ipc_opens_made"]
            for _ in range(20):
                t = ex.submit(w_keep_big, n).result(timeout=120)
                assert int(t[-1]) == 5
                del t
            settle(flush=False)
            assert PLANE.import_cache.stats()["hits"] >= hits + 19
            assert PLANE.receiver.ipc.stats()["ipc_opens_made"] == opens
            routes, wstats, _export = ex.submit(w_ipc_stats).result(timeout=60)
            assert routes.get("ipc", 0) == 21 and routes.get("staging", 0) == 0, routes
            assert wstats["owned_blocks"] == 1, wstats         # one record, lent again each call
            ex.submit(w_forget_big).result(timeout=60)
            deadline = time.monotonic() + 10
            while PLANE.import_cache.stats()["entries"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert PLANE.import_cache.stats()["entries"] == 0
            settle(flush=False)
            assert ex.submit(w_stats).result(timeout=60)["owned_blocks"] == 0
        finally:
            PLANE.import_cache.max_idle_s = old_idle


def test_chain_native_worker_a_to_b_by_ipc_handle_without_parent_open():
    with executor("") as a, executor("") as b:
        opens0 = PLANE.receiver.ipc.stats()["ipc_opens_made"]
        fa = a.submit(w_fresh_each_call, 64 << 20, 4.0)
        s, dev, *_ = b.submit(w_sum, fa).result(timeout=120)
        assert s == 4.0 * ((16 << 20) - 1) + 5.0 and dev == "cuda:0"
        assert PLANE.receiver.ipc.stats()["ipc_opens_made"] == opens0     # the parent opened nothing
        assert a.submit(w_ipc_stats).result(timeout=60)[0].get("ipc", 0) == 1
        assert b.submit(w_ipc_stats).result(timeout=60)[1]["ipc_opens_made"] == 1
        del fa
        settle()


_CRASH_SCRIPT = r"""
import os, sys, torch
from comfy_env import IsolatedExecutor, WorkerCrashed
from comfy_env.ipc.cuda import install
install()
os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)     # the worker: native allocator

def make(n):
    import torch
    return torch.full((n // 4,), 7.0, device="cuda")

def die():
    os._exit(3)

def routes():
    from comfy_env.ipc.cuda.plane import PLANE
    return dict(PLANE.routes)

with IsolatedExecutor(env=None, max_workers=1, initializer=install) as ex:
    t = ex.submit(make, 64 << 20).result(timeout=120)
    print("routes", ex.submit(routes).result(timeout=60))
    try:
        ex.submit(die).result(timeout=60)
    except WorkerCrashed:
        pass
    torch.cuda.synchronize()
    print("after crash", float(t[0]), float(t[-1]), float(t.double().sum()))
    torch.cuda.synchronize()
    del t
"""


@pytest.mark.timeout(300)
def test_native_worker_crash_and_the_parents_ipc_tensor():
    """Legacy IPC asks that the exporter outlive the importer's use; whether a tensor the
    parent opened by handle stays readable after the native worker died is measured
    here, in a child process (an invalid mapping would leave a sticky CUDA error)."""
    import subprocess
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "src"),
                                         env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", _CRASH_SCRIPT], capture_output=True, text=True, timeout=240, env=env)
    print(r.stdout, r.stderr[-3000:])
    assert "'ipc': 1" in r.stdout, r.stdout + r.stderr[-3000:]
    assert r.returncode == 0 and f"after crash 7.0 7.0 {7.0 * (16 << 20)}" in r.stdout, r.stdout + r.stderr[-3000:]


def test_doctor_report_names_routes():
    from comfy_env import cuda_doctor as doctor
    text = doctor.report()
    print(text)
    assert "parent → worker: ok" in text and "worker → parent: ok" in text


# -- the parent's heap: COMFY_ENV_CUDA_PARENT_HEAP=pool (default) ---------------------------------
_PARENT_HEAP_SCRIPT = r"""
import gc, os, sys, time, torch
from comfy_env import IsolatedExecutor
from comfy_env.ipc import lifetime
from comfy_env.ipc.cuda.plane import PLANE

GiB = 1 << 30

def w_sum(t):
    import torch
    return float(t.double().sum()), int(t[-1]), str(t.device)

def w_add1(t):
    t.add_(1)
    return None

def settle():
    for _ in range(5):
        gc.collect(); lifetime.LEDGER.drain(); time.sleep(0.05)

with IsolatedExecutor(env=None, max_workers=1) as ex:   # installs the plane: the heap is current
    torch.zeros(1, device="cuda")
    heap = PLANE.local.heap.get(0)
    print("heap", heap is not None, torch.cuda.get_allocator_backend())
    ex.submit(w_sum, torch.ones(4, device="cuda")).result(timeout=120)   # the worker's context, the pools
    settle()
    def held():             # bytes the parent's heap holds from the device (every generation)
        torch.cuda.synchronize()
        return heap.bytes_held()[1]
    n = 256 << 20
    x = torch.full((n // 4,), 2.0, device="cuda")
    x[-1] = 7.0
    before = dict(PLANE.routes)
    want = 2.0 * (n // 4 - 1) + 7.0
    sums = [ex.submit(w_sum, x).result(timeout=120) for _ in range(4)]
    got = {k: PLANE.routes[k] - before.get(k, 0) for k in ("pool", "staging", "ipc")}
    print("sums ok", all(s[0] == want and s[1] == 7 and s[2] == "cuda:0" for s in sums), "routes", got)
    ex.submit(w_add1, x).result(timeout=60)               # zero copy: the worker's write is the parent's
    torch.cuda.synchronize()
    print("in place", float(x[0]), float(x[-1]))
    reserved = torch.cuda.memory_reserved()
    print("stats count the heap", reserved >= n, torch.cuda.memory_allocated() >= n)
    del x, sums
    settle()
    keep = torch.ones(1 << 20, device="cuda")             # a long-lived tensor (a model's weights)
    torch.cuda.empty_cache(); settle()
    pinned = held()         # x's bytes: a worker imported them, so the pool keeps them
    y = torch.empty(GiB, dtype=torch.uint8, device="cuda"); y.fill_(1); del y
    torch.cuda.empty_cache(); settle()
    unsent = held()         # never sent: given back, as torch's own pool does
    z = torch.empty(n, dtype=torch.uint8, device="cuda"); z.fill_(2)
    again = held()          # the kept bytes are the pool's to reuse
    del z
    print(f"kept after empty_cache {pinned >> 20} MiB, after a 1 GiB peak never sent {unsent >> 20} MiB, "
          f"after a new 256 MiB tensor {again >> 20} MiB, generations {1 + len(heap.old)}")
    del keep
    deadline = time.monotonic() + 20
    while True:                 # the worker drops its import of the old pool when told: a lag
        settle()
        torch.cuda.empty_cache()
        settle()
        left = held()
        if left < (64 << 20) or time.monotonic() > deadline:
            break
    print(f"drained: {left >> 20} MiB held, generations {1 + len(heap.old)}")
    print("stats after drain", torch.cuda.memory_allocated() < (1 << 20))
"""


@pytest.mark.timeout(300)
def test_parent_heap_pool_sends_parent_tensors_zero_copy_and_gives_memory_back():
    """The parent's heap (``COMFY_ENV_CUDA_PARENT_HEAP=pool``, the default) in a
    ``cudaMallocAsync`` parent (ComfyUI's): the parent's tensors live in an exportable
    pool; one sent again goes zero copy (``pool`` route, a worker's in-place write
    reaches it) and torch's memory figures count the pool.  ``empty_cache`` gives back
    what no worker imported (a 1 GiB peak), keeps what one did for the parent's own reuse
    while a long-lived tensor is in the pool (no second generation drawing fresh memory),
    and gives that back too once nothing in the pool is used.  Run in a child process:
    the policy is read when the plane is made."""
    import subprocess
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "src"),
                                         env.get("PYTHONPATH", "")])
    env["PYTORCH_CUDA_ALLOC_CONF"] = ASYNC
    env.pop("COMFY_ENV_CUDA_PARENT_HEAP", None)                       # the default: pool
    r = subprocess.run([sys.executable, "-c", _PARENT_HEAP_SCRIPT], capture_output=True, text=True, timeout=240,
                       env=env)
    out = r.stdout
    print(out, r.stderr[-3000:])
    assert r.returncode == 0, out + r.stderr[-3000:]
    assert "heap True cudaMallocAsync" in out, out
    # The first send of a new storage is a copy; from the second on, zero copy.
    assert "sums ok True routes {'pool': 3, 'staging': 1, 'ipc': 0}" in out, out
    assert "in place 3.0 8.0" in out, out
    assert "stats count the heap True True" in out, out
    mib = {k: int(out.split(k + " ")[1].split()[0]) for k in
           ("kept after empty_cache", "never sent", "new 256 MiB tensor", "drained:")}
    assert out.split("generations ")[1].split()[0] == "1", out          # no roll while in use
    assert mib["kept after empty_cache"] <= 256 + 64, out              # at most x's bytes stay
    assert mib["never sent"] - mib["kept after empty_cache"] < 64, out  # the 1 GiB went back
    assert mib["new 256 MiB tensor"] - mib["never sent"] <= 256 + 16, out   # kept bytes reused, no more
    assert mib["drained:"] < 64, out
    assert "stats after drain True" in out, out
