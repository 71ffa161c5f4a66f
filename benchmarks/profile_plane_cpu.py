"""The CUDA plane's Python cost per tensor, on a machine without a GPU (a diagnostic).

    python benchmarks/profile_plane_cpu.py [--src DIR] [--tensors 32] [--busy] [--profile]

Worker → parent with the import cache's case (the same 32 pool tensors every call),
with the driver, torch's CUDA calls and the tensors themselves replaced by stand-ins
that cost next to nothing: what remains is comfy_env's own Python (codec, ledger,
plane, import cache, lazy result, holder deaths), which is most of the per-tensor
time on the GPU machine too (bench_cuda.py measures the real thing there).  Both
"processes" run here, one after the other: encode ``N`` messages, then decode them
as the parent would (LazyResult, materialise, drop).  ``--src`` measures another tree.
``--busy``: the producer's stream still has work queued (each frame then carries an
interprocess event); by default it has none, as for a tensor made a while ago.
``--new``: bench_cuda.py's other case, a new worker tensor every call: each goes by
one copy into a staging block (the copy faked), and after each frame the parent's
"idle" report of its blocks is handed to the worker's plane, so later frames recycle
them as they do on the GPU; the parent decodes into its kept imports and reports them
idle again.
"""
from __future__ import annotations

import os
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
_src = sys.argv[sys.argv.index("--src") + 1] if "--src" in sys.argv else os.path.join(HERE, "..", "src")
sys.path.insert(0, _src)

import torch  # noqa: E402

from comfy_env.executor.futures import LazyResult  # noqa: E402
from comfy_env.ipc import codec, lifetime, planes  # noqa: E402,F401
from comfy_env.ipc.cuda import devices  # noqa: E402
from comfy_env.ipc.cuda.paths import Capabilities  # noqa: E402
from comfy_env.ipc.cuda.blocks import OwnedPool  # noqa: E402
from comfy_env.ipc.cuda.layout import pool_meta  # noqa: E402
from comfy_env.ipc.cuda.plane import PLANE  # noqa: E402

# --tensors K: tensors per message (1 shows what each message costs on top of its tensor)
K = int(sys.argv[sys.argv.index("--tensors") + 1]) if "--tensors" in sys.argv else 32
NEW = "--new" in sys.argv
MiB = 1 << 20
UUID = "0123456789abcdef0123456789abcdef"


class FakeCudaTensor:
    """What plane.encode reads of a CUDA tensor, as plain attributes."""
    is_cuda = True
    dtype = torch.float32
    layout = torch.strided
    is_quantized = False
    requires_grad = False
    shape = torch.Size([MiB // 4])

    def __init__(self, ptr):
        self._ptr = ptr

    def get_device(self):
        return 0

    def stride(self):
        return (1,)

    def data_ptr(self):
        return self._ptr


class FakeStorage:
    """A storage as the staging route reads it: its size and address; weakref-able."""
    __slots__ = ("_ptr", "__weakref__")

    def __init__(self, ptr):
        self._ptr = ptr

    def nbytes(self):
        return MiB

    def data_ptr(self):
        return self._ptr


class FakeNewCudaTensor(FakeCudaTensor):
    """A worker's new output: a new storage (torch may hand out the same address again)."""

    def __init__(self, ptr):
        self._ptr = ptr
        self._storage = FakeStorage(ptr)

    def untyped_storage(self):
        return self._storage


class FakeStagingGen:
    key = ("w" * 16, 2)       # the worker's (its uid): the parent keeps and reports its blocks
    fd = -1

    def __init__(self):
        self._next = 1 << 36

    def alloc(self, nbytes, stream):
        self._next += nbytes
        return self._next

    def export_pointer(self, ptr):
        return b"x" * 64


class FakeTensor:
    """What decode hands out: holds its keeper, as torch's storage does."""
    __slots__ = ("keeper",)

    def __init__(self, keeper, device=None):
        self.keeper = keeper

    def get_device(self):
        return 0


class FakeGen:
    key = ("w" * 16, 1)
    fd = -1


class FakeRing:
    def record(self, stream):
        return 3, b"h" * 64

    def reserve(self):
        return 3, b"h" * 64

    def record_reserved(self, slot, stream):
        pass


class FakeImports:
    def pin(self, key, n=1):
        pass

    def unpin(self, key):
        pass

    def import_pointer(self, key, export):
        return 1 << 40

    def release_pointer(self, key, export, stream):
        pass

    def stats(self):
        return {}


class FakeEvents:
    def wait(self, event, ordinal, stream):
        pass


def install_fakes():
    stream = types.SimpleNamespace(cuda_stream=0)
    fake_torch = types.SimpleNamespace(**{k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    fake_torch.cuda = types.SimpleNamespace(current_stream=lambda *a: stream)
    fake_torch.as_tensor = FakeTensor
    PLANE.local.t()
    PLANE.local.torch = fake_torch
    PLANE.role = "worker"
    PLANE.local.probed[0] = Capabilities(driver=True, pools=True, vmm=True, events=True)
    PLANE.local.heap[0] = types.SimpleNamespace(old=[], ordinal=0)
    PLANE.local.rings[0] = FakeRing()
    PLANE.receiver.imports = FakeImports()
    PLANE.local.events = FakeEvents()
    devices.uuid_of = lambda o: UUID
    devices.ordinal_of = lambda u: 0
    devices.use = lambda o: None
    from comfy_env.ipc.cuda import driver
    busy = "--busy" in sys.argv
    driver.stream_done = lambda stream: not busy
    codec._DISPATCH[FakeCudaTensor] = (PLANE,)
    codec._DISPATCH[FakeNewCudaTensor] = (PLANE,)
    if NEW:
        PLANE.local.staging[0] = types.SimpleNamespace(current=FakeStagingGen(), old=[])
        PLANE.local.copy = lambda ordinal, stream, dsts, srcs, sizes: None
        # The default worker: torch's native allocator, no export heap (bench_cuda.py's mixed).
        PLANE.local.heap[0] = None
        PLANE.sender.ipc_min = PLANE.sender.small_copy = 16 * MiB
        PLANE.sender.fresh_copy = 4096 * MiB


def worker_tensors():
    ts = []
    for i in range(K):
        base = (1 << 33) + i * 2 * MiB
        t = FakeCudaTensor(base)
        meta = pool_meta(FakeGen.key, b"e" * 64, UUID, 2 * MiB)
        rec = lifetime.LEDGER.add_owned(("cuda", "w" * 16, 10_000 + i),
                                        OwnedPool(0, base, meta, t, FakeGen, 2 * MiB),
                                        PLANE.on_zero)
        PLANE.sender._by_base[base] = rec
        PLANE.sender._by_ptr[base] = rec
        rec.resource.ptrs.append(base)
        ts.append(t)
    return ts


def new_tensors(frame):
    """K new outputs; torch's allocator hands out the same few addresses again."""
    return [FakeNewCudaTensor((1 << 34) + ((frame % 2) * K + i) * 2 * MiB) for i in range(K)]


def encode_new_frames(n, to_parent):
    """The worker's side of ``n`` calls returning K new tensors each: after each frame,
    the parent's "idle" report of the frame's staging blocks, as after its reads."""
    bodies = []
    for frame in range(n):
        fb, chunks = codec.encode_message(("result", 1, True), to_parent, [new_tensors(frame)])
        bodies.append((b"".join(bytes(c) for c in chunks), list(fb.fds)))
        keys = [(ref[1], lifetime.LEDGER.get(ref[1]).resource.seq) for ref in fb.parts[0].refs]
        PLANE.sender.on_idle(to_parent, keys, None)
    return bodies


def main(n=3000):
    install_fakes()
    ts = worker_tensors() if not NEW else None
    to_parent = lifetime.Link(lambda m: None, "parent")
    to_parent.uid = "p" * 16
    prof = None
    if "--profile" in sys.argv:
        import cProfile
        prof = cProfile.Profile()
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    if NEW:
        bodies = encode_new_frames(n, to_parent)
    else:
        bodies = []
        for _ in range(n):
            fb, chunks = codec.encode_message(("result", 1, True), to_parent, [ts])
            bodies.append((b"".join(bytes(c) for c in chunks), list(fb.fds)))
    enc = (time.perf_counter() - t0) / (n * K) * 1e6
    # Now the parent: forget the worker's side of the ledger, decode what it sent.
    with lifetime.LEDGER.lock:
        lifetime.LEDGER._records.clear()
    PLANE.sender._by_ptr.clear()
    PLANE.sender._by_base.clear()
    PLANE.role = "parent"
    to_worker = lifetime.Link(lambda m: None, "worker")
    to_worker.uid = "w" * 16
    first = LazyResult(codec.decode_envelope(*bodies[0]), to_worker).materialise()   # imports, cache fills
    del first
    lifetime.LEDGER.drain()
    t0 = time.perf_counter()
    for body, fds in bodies[1:]:
        out = LazyResult(codec.decode_envelope(body, fds), to_worker).materialise()
        del out
    lifetime.LEDGER.drain()
    dec = (time.perf_counter() - t0) / ((n - 1) * K) * 1e6
    if prof:
        prof.disable()
    if NEW:
        print(f"routes {dict(PLANE.sender.routes)}, recycled {PLANE.sender.recycled}, "
              f"parent's cache {PLANE.receiver.import_cache.stats()}")
    print(f"{_src}: worker encode {enc:.2f} µs/tensor, parent decode+drop {dec:.2f} µs/tensor "
          f"(Python only; torch and the driver faked)")
    if prof:
        import pstats
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
