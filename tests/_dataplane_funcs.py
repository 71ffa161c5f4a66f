"""Functions that data-plane test workers import *by reference*.

Everything here runs inside a worker process unless said otherwise.
"""
from __future__ import annotations

import gc
import os
import sys
import time

__test__ = False

_kept = []


def echo(x):
    return x


def echo_many(*args, **kwargs):
    return args, kwargs


def pid():
    return os.getpid()


def settle(pred=None, timeout=10.0):
    """Collect garbage and let the ledger's flusher run, until ``pred()`` holds.

    Used on both sides: in a worker (no ``pred``: one pass) and by the tests.
    """
    import time

    from comfy_env.ipc import lifetime

    end = time.monotonic() + timeout
    while True:
        gc.collect()
        lifetime.LEDGER.drain()
        if pred is None or pred():
            return
        if time.monotonic() > end:
            raise AssertionError(
                f"not settled within {timeout}s: "
                f"{[(r.key, r.users, r.owned, r.upstream) for r in lifetime.LEDGER.records()]}")
        time.sleep(0.02)





def ledger_size():
    """Live blocks in this worker's ledger, after collecting garbage."""
    from comfy_env.ipc import lifetime

    settle()
    time.sleep(0.05)
    settle()
    return len(lifetime.LEDGER)


def ledger_keys():
    from comfy_env.ipc import lifetime

    settle()
    return sorted(str(r.key) for r in lifetime.LEDGER.records())


def open_fds():
    """The worker's open fds (targets), to compare before and after."""
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return out


def memfd_count():
    return sum(1 for t in open_fds().values() if "memfd:comfy_env" in t)


def in_segment(arr):
    """Does ``arr``'s memory (numpy or torch) lie in a comfy_env segment in this worker?"""
    from comfy_env.ipc import shm

    addr, n = _addr(arr)
    return shm.find_segment(addr, max(n, 1)) is not None


def _addr(arr):
    mod = type(arr).__module__
    if mod.startswith("torch"):
        return arr.data_ptr(), arr.numel() * arr.element_size()
    return arr.__array_interface__["data"][0], arr.nbytes


def describe(x):
    """What the worker received: type, dtype, shape, strides, flags, in-segment."""
    mod = type(x).__module__
    if mod.startswith("torch"):
        return ("torch", type(x).__name__, str(x.dtype), tuple(x.shape), tuple(x.stride()),
                x.storage_offset(), bool(x.requires_grad), x.grad_fn is None, in_segment(x))
    import numpy as np

    if isinstance(x, np.ndarray):
        return ("numpy", type(x).__name__, x.dtype.str, x.shape, x.strides,
                bool(x.flags.writeable), bool(x.flags.c_contiguous), bool(x.flags.f_contiguous),
                in_segment(x))
    return (mod, type(x).__name__)


def checksum(x):
    """A content hash of a numpy array / torch tensor (view-aware, computed in the worker)."""
    import hashlib

    import numpy as np

    if type(x).__module__.startswith("torch"):
        import torch

        x = x.detach().resolve_conj().resolve_neg().contiguous()
        if x.dim() == 0:
            x = x.reshape(1)
        x = x.view(torch.uint8).numpy() if x.numel() else np.zeros(0, np.uint8)
    return hashlib.sha1(np.ascontiguousarray(x).view(np.uint8).tobytes()).hexdigest()


def make_array(shape, dtype, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return (rng.random(shape) * 100).astype(dtype)


def make_range(n, dtype="float32"):
    import numpy as np

    return np.arange(n, dtype=dtype)


def make_view(n, recipe):
    """A fresh array in the worker, returned as a view (the span travels)."""
    import numpy as np

    base = np.arange(n, dtype=np.float64).reshape(-1, 64)
    return eval(recipe, {"np": np, "x": base})


def make_tensor(n, dtype_name="float32", requires_grad=False):
    import torch

    t = torch.arange(n, dtype=torch.float64).to(getattr(torch, dtype_name))
    if requires_grad:
        t.requires_grad_(True)
    return t


def tensor_view(t, recipe):
    """Return a view of the received tensor."""
    return eval(recipe, {"x": t})


def add_one_inplace(arr):
    arr += 1
    return None


def keep(x):
    """Keep ``x`` alive in the worker (to test lends that a worker holds)."""
    _kept.append(x)
    return len(_kept)


def drop_kept():
    _kept.clear()
    return ledger_size()


def unpicklable_of(x):
    """A result that cannot be pickled (the call's argument is dead by then)."""
    import threading
    return threading.Lock()


def hold_then_exit(x, code=0):
    os._exit(code)


def sigkill_self(x=None):
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def big_roundtrip_sum(arr):
    """Touch the whole array and return it (1 GiB test)."""
    return arr


def mesh_report(mesh):
    """Type of the mesh and whether its arrays live in shared memory here."""
    arrays = {"vertices": mesh.vertices, "faces": mesh.faces}
    return (type(mesh).__module__ + "." + type(mesh).__qualname__,
            {k: in_segment(v) for k, v in arrays.items()})


def make_mesh(subdivisions=5):
    """An icosphere with vertex normals (given: trimesh's fallback without scipy is slow)
    and per-vertex colours."""
    import numpy as np
    import trimesh

    s = trimesh.creation.icosphere(subdivisions=subdivisions)
    v = np.array(s.vertices)
    normals = v / np.linalg.norm(v, axis=1, keepdims=True)
    rng = np.random.default_rng(1)
    colors = rng.integers(0, 255, (len(v), 4), dtype=np.uint8)
    return trimesh.Trimesh(vertices=v, faces=np.array(s.faces), vertex_normals=normals,
                           vertex_colors=colors, process=False)


def torch_missing():
    """Initializer: make torch unimportable in this worker."""
    sys.modules["torch"] = None


def torch_importable():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def python_executable():
    return sys.executable


def warm():
    import numpy  # noqa: F401
    import torch  # noqa: F401
    return os.getpid()


def inline_bytes():
    from comfy_env.ipc import arrays

    return arrays.INLINE_BYTES


def echo_and_hash(x):
    return x, checksum(x), describe(x)


def sample(dtype, n=1 << 17, seed=0):
    """The same bytes as the test's ``_np_sample`` (made here, in the worker)."""
    import test_dataplane

    return test_dataplane._np_sample(dtype, n, seed)


def torch_sample(dtype_name, n=1 << 17, seed=0):
    import test_dataplane
    import torch

    return test_dataplane._torch_sample(getattr(torch, dtype_name), n, seed)


def view_of_fresh(shape, dtype, recipe):
    import numpy as np

    x = np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)
    v = eval(recipe, {"np": np, "x": x})
    return v


def torch_view_of_fresh(shape, dtype_name, recipe):
    import torch

    n = 1
    for s in shape:
        n *= s
    x = torch.arange(n, dtype=torch.float64).reshape(shape).to(getattr(torch, dtype_name))
    return eval(recipe, {"torch": torch, "x": x})


def tensor_traits(x):
    """How a received tensor holds its values: (contiguous, storage offset, storage bytes,
    storage resizable -- torch allocated it, it is no view of a buffer --, writable,
    in a segment)."""
    import torch

    s = x.untyped_storage()
    u = x.detach().reshape(-1).view(torch.uint8)
    before = u.clone()
    u.fill_(7)
    writable = bool((u == 7).all())
    u.copy_(before)
    return (x.is_contiguous(), x.storage_offset(), s.nbytes(), s.resizable(), writable,
            in_segment(x))


def small_tensors():
    """Small tensors made here, sent back inline: (name, tensor) pairs."""
    import torch

    leaf = torch.arange(6.0).reshape(2, 3).requires_grad_(True)
    return [
        ("bf16", torch.arange(12, dtype=torch.float32).reshape(3, 4).to(torch.bfloat16)),
        ("bool", torch.tensor([True, False, True])),
        ("0-d", torch.tensor(2.5, dtype=torch.float64)),
        ("empty", torch.empty(0, 4, dtype=torch.int16)),
        ("view", torch.arange(24, dtype=torch.int32).reshape(4, 6)[1:, ::2].t()),
        ("leaf", leaf),
        ("nonleaf", leaf * 2),
        ("param", torch.nn.Parameter(torch.ones(3, 2))),
        ("frozen", torch.nn.Parameter(torch.ones(3), requires_grad=False)),
    ]


def types_of(*xs):
    return [type(x).__module__ + "." + type(x).__qualname__ for x in xs]


def type_tree(x):
    """A comparable summary of the container types (and array types) in ``x``."""
    t = type(x)
    name = t.__module__ + "." + t.__qualname__
    if t in (list, tuple) or (isinstance(x, tuple) and hasattr(x, "_fields")):
        return (name, [type_tree(v) for v in x])
    if isinstance(x, (set, frozenset)):
        return (name, sorted(repr(type_tree(v)) for v in x))
    if isinstance(x, dict):
        return (name, sorted((repr(k), type(k).__name__, repr(type_tree(v))) for k, v in x.items()))
    if hasattr(x, "__dataclass_fields__"):
        return (name, type_tree(vars(x)))
    return name


def aliased(pair):
    a, b = pair
    a[0] = -1.0
    return bool(b[0] == -1.0) and a is b


def arena_counts():
    from comfy_env.ipc import shm

    return shm.ARENA.created + shm.ARENA.reused


def ledger_size_pair():
    return ledger_size(), ledger_size()


def range_at_rendezvous(directory, me, other, n):
    import numpy as np

    open(os.path.join(directory, me), "w").close()
    end = time.monotonic() + 30
    while not os.path.exists(os.path.join(directory, other)):
        if time.monotonic() > end:
            raise TimeoutError("the other call never ran")
        time.sleep(0.01)
    return os.getpid(), np.arange(n, dtype=np.float64)


def write_and_pid(arrs, value):
    for a in arrs:
        a[0] = value
    return os.getpid(), [in_segment(a) for a in arrs]


def memfd_maps():
    """Mappings of comfy_env memfds in this process (memory held even with the fd closed)."""
    return memfd_maps_of("self")


def memfd_maps_of(pid):
    try:
        with open(f"/proc/{pid}/maps") as f:
            return sum(1 for line in f if "memfd:comfy_env" in line)
    except OSError:
        return 0


def memfd_fds_of(pid):
    n = 0
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    for fd in names:
        try:
            if "memfd:comfy_env" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                n += 1
        except OSError:
            pass
    return n


def hygiene():
    """(ledger records, memfd fds, memfd mappings) after collecting garbage and emptying the arena."""
    from comfy_env.ipc import shm

    n = ledger_size()
    shm.ARENA.trim()
    return n, memfd_fds_of("self"), memfd_maps_of("self")


def copy_of(x):
    """A fresh copy (the worker's own memory, sent back through its arena)."""
    import numpy as np

    return np.array(x, copy=True)


def arena_config():
    from comfy_env.ipc import shm

    return shm.ARENA.max_free_bytes, shm.ARENA.idle_seconds


def strided_sum(x, step=4096):
    """A cheap check of a huge array: sum of every ``step``-th element, plus its last one."""
    import numpy as np

    flat = x.reshape(-1)
    return float(np.sum(flat[::step], dtype=np.float64)), float(flat[-1])


def sleep_holding(x, seconds):
    time.sleep(seconds)
    return None


def echo_and_sample(x, step=4096):
    return x, strided_sum(x, step)


def many_arrays(count, nbytes):
    import numpy as np

    return [np.full(nbytes // 8, i, dtype=np.float64) for i in range(count)]


def with_worker_only_class(n):
    """An array plus an instance of a class the parent cannot import."""
    import types

    import numpy as np

    mod = types.ModuleType("only_in_the_worker")
    exec("class Thing:\n    pass\n", mod.__dict__)
    mod.Thing.__module__ = "only_in_the_worker"
    sys.modules["only_in_the_worker"] = mod
    return np.arange(n, dtype=np.float64), mod.Thing()


def unpicklable_result(n):
    import threading

    import numpy as np

    return np.arange(n, dtype=np.float64), threading.Lock()


_cached_tensor = None


def cached_tensor(n):
    """The same worker-owned tensor on every call (a worker's cache, a model's weights)."""
    global _cached_tensor
    import torch

    if _cached_tensor is None or _cached_tensor.numel() != n:
        _cached_tensor = torch.arange(n, dtype=torch.float32)
    return _cached_tensor


def cached_tensor_head():
    return float(_cached_tensor[0])


_full_collections = [0]


def _count_full(phase, info):
    if phase == "start" and info.get("generation") == 2:
        _full_collections[0] += 1


def keep_in_cycle(x, collect_max_s=None):
    """Drop ``x`` inside a reference cycle, with automatic collection off: only the
    worker's janitor (an explicit full collection) can release it.  Counts full
    collections from now on (``full_collections``)."""
    if collect_max_s is not None:
        # The worker runs as ``python -m comfy_env.worker``: its classes are those of the
        # module that was __main__ (ipc/mainspace.py gave the script's a __main__ of its own).
        from comfy_env.ipc import mainspace
        main = mainspace.SPACE.real if mainspace.SPACE is not None else None
        if getattr(getattr(main, "__spec__", None), "name", None) != "comfy_env.worker":
            import comfy_env.worker as main
        main.Worker.COLLECT_MAX_S = collect_max_s
    gc.disable()
    if _count_full not in gc.callbacks:
        gc.callbacks.append(_count_full)
    _full_collections[0] = 0
    box = {"x": x}
    box["self"] = box
    return None


def full_collections():
    return _full_collections[0]


def typed_report(t):
    """What a tensor subclass / a tensor with attributes is, as received: (class name,
    attributes, requires_grad, leaf, values' checksum, data in a segment)."""
    import torch

    with torch._C.DisableTorchFunctionSubclass():
        data = t.detach()
        attrs = sorted((k, repr(v)) for k, v in t.__dict__.items())
        return (type(t).__qualname__, attrs, t.requires_grad, t.is_leaf,
                float(data.double().sum()), in_segment(data))


def typed_cases(n):
    """The test's tensor subclasses and tensors with attributes, made in the worker."""
    import test_dataplane

    return test_dataplane._typed_cases(n)


def wrapped_report(w):
    """A wrapper subclass as received: (class name, sum of its inner tensor, inner tensor
    in a segment)."""
    return type(w).__qualname__, float(w.elem.sum()), in_segment(w.elem)
