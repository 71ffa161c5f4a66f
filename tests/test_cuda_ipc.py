"""CPU-only tests (torch's CPU build, the CUDA driver faked) of the ``ipc`` route: a
storage of torch's native allocator lent zero copy by its allocation's legacy CUDA IPC
handle.

* route choice: a big storage in a ``cuMemAlloc`` allocation goes ``ipc``; a small one,
  pool memory, an allocation above the import limit, a process whose first handle call
  failed (the probe), a peer that failed to open one (its verdict) keep the old routes;
* the block meta is checked field by field, with clear errors;
* the importer opens each (owner, handle) once for every record on that allocation,
  closes it only after the last record went and after its reads, and only then are the
  releases posted; an open waits for a pending close of the same handle;
* a forwarding process (the parent between two workers) opens nothing and hands on no fd.
"""
import collections
import os
import threading
import time
import types

import pytest

torch = pytest.importorskip("torch")

from comfy_env.ipc import codec, lifetime, planes  # noqa: E402,F401
from comfy_env.ipc.cuda import devices, paths  # noqa: E402
from comfy_env.ipc.cuda import driver as D  # noqa: E402
from comfy_env.ipc.cuda.blocks import RemoteIpc  # noqa: E402
from comfy_env.ipc.cuda.errors import CudaTransferError  # noqa: E402
from comfy_env.ipc.cuda.ipchandles import IpcImports  # noqa: E402
from comfy_env.ipc.cuda.layout import VERSION, DescriptorError, IpcMeta, ipc_meta, pack_fields, unpack, validate_meta  # noqa: E402
from comfy_env.ipc.cuda.paths import Capabilities  # noqa: E402
from comfy_env.ipc.cuda.plane import CudaPlane  # noqa: E402
from comfy_env.ipc.protocol import Release  # noqa: E402

pytestmark = pytest.mark.timeout(30)

MiB = 1 << 20
UUID = "0123456789abcdef0123456789abcdef"
OWNER = "a" * 16

from _cuda_fakes import FakeStorage, fake_torch_on_stream, ledger_records_dropped, try_call_reader_busy  # noqa: E402
from _cuda_fakes import FakeT as _FakeT  # noqa: E402


def FakeT(storage, nbytes=None, offset=0):
    """A tensor over ``storage`` (this file's tests name the storage first)."""
    return _FakeT(storage=storage, nbytes=nbytes, offset=offset)


class FakeGen:
    def __init__(self, log):
        self.key = ("s" * 16, 1)
        self.fd = -1
        self.log = log
        self._next = 1 << 44

    def alloc(self, nbytes, stream):
        self._next += 1 << 33
        self.log.append(("alloc", nbytes))
        return self._next

    def export_pointer(self, ptr):
        return b"e" * 64


class FakeRing:
    def __init__(self):
        self.n = 0

    def reserve(self):
        self.n += 1
        return self.n, bytes([self.n % 256]) * 64

    def record(self, stream):
        return self.reserve()

    def record_reserved(self, slot, stream):
        pass

    def __len__(self):
        return self.n


class Allocations:
    """The fake driver's view of this process's memory: ``cuMemAlloc`` allocations
    (native allocator) by base, and which of them are a pool's."""

    def __init__(self, log):
        self.log = log
        self.allocs = {}          # base -> size
        self.pool = set()         # bases of pool allocations (cudaMallocAsync)
        self.refuse = None        # an error name: cuIpcGetMemHandle fails with it

    def add(self, base, size, pool=False):
        self.allocs[base] = size
        if pool:
            self.pool.add(base)
        return base

    def address_range(self, ptr):
        for base, size in self.allocs.items():
            if base <= ptr < base + size:
                return base, size
        raise D.CudaError("cuMemGetAddressRange_v2", 1)

    def get_handle(self, base):
        self.log.append(("cuIpcGetMemHandle", base))
        if self.refuse or base not in self.allocs or base in self.pool:
            raise D.CudaError("cuIpcGetMemHandle", 1, "invalid argument")
        return base.to_bytes(8, "little") * 8


@pytest.fixture
def parent(monkeypatch):
    """A parent-role plane on a fake GPU 0 whose torch runs the native allocator (no
    export heap); returns (plane, log, link, allocations)."""
    log = []
    mem = Allocations(log)
    monkeypatch.setattr(D, "call", lambda name, *args, detail="": log.append((name,) + args[:1]))
    monkeypatch.setattr(D, "try_call", try_call_reader_busy)
    monkeypatch.setattr(D, "address_range", mem.address_range)
    monkeypatch.setattr(D, "pointer_pool", lambda ptr: 99 if ptr in mem.pool else None)
    monkeypatch.setattr(D, "ipc_get_handle", mem.get_handle)
    monkeypatch.setattr(D, "copy_batch", lambda dsts, srcs, sizes, stream, ordinal: log.append(("copy_batch",)))
    monkeypatch.setattr(devices, "use", lambda o: None)
    monkeypatch.setattr(devices, "uuid_of", lambda o: UUID)
    for var in ("COMFY_ENV_CUDA_SMALL_COPY_MIB", "COMFY_ENV_CUDA_FRESH_COPY_MIB", "COMFY_ENV_CUDA_IPC_MIN_MIB"):
        monkeypatch.delenv(var, raising=False)
    pl = CudaPlane()
    pl.local.t()
    pl.local.torch = fake_torch_on_stream()
    pl.local.probed[0] = Capabilities(driver=True, pools=True, vmm=True, events=True)
    pl.local.staging[0] = types.SimpleNamespace(old=[], ordinal=0, current=FakeGen(log))
    pl.local.rings[0] = FakeRing()
    monkeypatch.setitem(codec._DISPATCH, _FakeT, (pl,))
    link = lifetime.Link(lambda msgs: None, "worker-1")
    link.uid = "w" * 16
    with ledger_records_dropped():
        yield pl, log, link, mem


def _send(link, objs):
    """Encode one frame carrying ``objs``: ``(descriptors, part refs, frame builder)``."""
    fb, _chunks = codec.encode_message(("call", 1), link, [objs])
    part = fb.parts[0]
    descs = []

    class _D(codec.pickle.Unpickler):
        def persistent_load(self, pid):
            descs.append(unpack(pid[2]))

    _D(codec.io.BytesIO(part.data)).load()
    return descs, part.refs, fb


def _routes(link, objs):
    descs, _refs, fb = _send(link, objs)
    fb._lends.clear()                # nobody will release them: the fixture drops the records
    return [d.route for d in descs]


def _handle_calls(log):
    return [e for e in log if e[0] == "cuIpcGetMemHandle"]


# -- route choice -----------------------------------------------------------------------------
def test_a_big_storage_of_the_native_allocator_goes_by_its_allocations_handle(parent):
    pl, log, link, mem = parent
    base = mem.add(1 << 40, 256 * MiB)
    s = FakeStorage(base + 64 * MiB, 64 * MiB)         # a storage inside a bigger segment
    view = FakeT(s, nbytes=8 * MiB, offset=4 * MiB)
    descs, refs, fb = _send(link, [view])
    assert [d.route for d in descs] == ["ipc"] and pl.last_reasons["ipc"] == paths.IPC_WHY
    assert descs[0].offset == 4 * MiB                  # from the storage, as the meta says where it is
    (plane_name, key, fd_index, meta), = refs
    assert fd_index == -1                              # no fd travels: the handle is plain bytes
    m = validate_meta(meta)
    assert m == IpcMeta("ipc", lifetime.PROCESS_UID, base.to_bytes(8, "little") * 8, 64 * MiB, 64 * MiB,
                        256 * MiB, UUID)
    assert not [e for e in log if e[0] in ("copy_batch", "cuMemcpyDtoDAsync_v2", "alloc")]   # no copy
    # The record keeps the storage until the peer releases it; then it lets go.
    rec = lifetime.LEDGER.get(key)
    assert rec.resource.keep is s and link.lent[key] == 1
    lifetime.LEDGER.on_release(link, key, 1)
    assert lifetime.LEDGER.get(key) is None and rec.resource.keep is None
    assert not pl.sender._ipc_by_storage and not pl.sender._ipc_allocs


def test_storages_of_one_allocation_share_its_handle_and_a_storage_sent_again_its_record(parent):
    pl, log, link, mem = parent
    base = mem.add(1 << 40, 256 * MiB)
    a, b = FakeStorage(base, 64 * MiB), FakeStorage(base + 128 * MiB, 32 * MiB)
    descs, refs, fb = _send(link, [FakeT(a), FakeT(b), FakeT(a, nbytes=MiB, offset=MiB)])
    assert [d.route for d in descs] == ["ipc"] * 3
    assert len(refs) == 2 and descs[0].ref == descs[2].ref != descs[1].ref
    metas = [validate_meta(r[3]) for r in refs]
    assert metas[0].handle == metas[1].handle and [m.offset for m in metas] == [0, 128 * MiB]
    assert len(_handle_calls(log)) == 1                # the allocation's handle taken once
    descs2, refs2, fb2 = _send(link, [FakeT(a)])
    assert refs2[0][1] == refs[0][1]                   # the same record, lent again
    assert len(_handle_calls(log)) == 1


def test_every_tensor_of_a_frame_makes_its_gpus_context_current_again(parent, monkeypatch):
    """Each entry into the plane gives the caller's CUDA context back on the way out
    (devices.CALLER), so the second tensor of a frame cannot rely on the context the
    first one's encode made current: its driver calls come after a use() of its own."""
    pl, log, link, mem = parent
    monkeypatch.setattr(devices, "use", lambda o: log.append(("use", o)))
    base = mem.add(1 << 40, 256 * MiB)
    other = mem.add(1 << 41, 256 * MiB)
    descs, refs, fb = _send(link, [FakeT(FakeStorage(base, 64 * MiB)), FakeT(FakeStorage(other, 64 * MiB))])
    fb._lends.clear()
    assert [d.route for d in descs] == ["ipc", "ipc"]
    seen = [e[0] for e in log if e[0] in ("use", "cuIpcGetMemHandle")]
    assert seen.count("cuIpcGetMemHandle") == 2
    for i, name in enumerate(seen):
        if name == "cuIpcGetMemHandle":
            assert i > 0 and seen[i - 1] == "use", seen


def test_small_storages_keep_the_staging_copy_and_the_threshold_is_a_setting(parent, monkeypatch):
    pl, log, link, mem = parent
    assert pl.sender.ipc_min == 16 * MiB == paths.DEFAULT_SMALL_COPY
    base = mem.add(1 << 40, 256 * MiB)
    assert _routes(link, [FakeT(FakeStorage(base, MiB))]) == ["staging"]
    assert _routes(link, [FakeT(FakeStorage(base + 32 * MiB, 16 * MiB))]) == ["staging"]   # at the threshold
    assert not _handle_calls(log)
    assert _routes(link, [FakeT(FakeStorage(base + 64 * MiB, 16 * MiB + 4))]) == ["ipc"]
    monkeypatch.setenv("COMFY_ENV_CUDA_IPC_MIN_MIB", "100")
    assert paths.ipc_min_bytes() == 100 * MiB and CudaPlane().sender.ipc_min == 100 * MiB
    for bad in ("lots", "-1"):
        monkeypatch.setenv("COMFY_ENV_CUDA_IPC_MIN_MIB", bad)
        with pytest.raises(ValueError, match="COMFY_ENV_CUDA_IPC_MIN_MIB"):
            paths.ipc_min_bytes()


def test_a_small_storage_sent_again_goes_by_handle_and_says_so(parent):
    """Small storages keep the staging copy the first time; the same storage sent again
    goes zero copy by handle (its record kept by the peer), as pool blocks do; a new
    storage at the same address is a first sight again; two views of a small storage in
    one frame share its copy; a process whose torch allocates from pools skips it."""
    pl, log, link, mem = parent
    base = mem.add(1 << 40, 20 * MiB)                     # torch's segment of 1-10 MiB blocks
    s = FakeStorage(base + 2 * MiB, MiB)
    t = FakeT(s)
    assert _routes(link, [t, FakeT(s, nbytes=1024, offset=4096)]) == ["staging", "staging"]
    assert not _handle_calls(log)
    descs, refs, fb = _send(link, [t, FakeT(s, nbytes=1024, offset=4096)])
    fb._lends.clear()
    assert [d.route for d in descs] == ["ipc", "ipc"] and len(refs) == 1
    assert validate_meta(refs[0][3]).sent_before is True and len(_handle_calls(log)) == 1
    lifetime.LEDGER.on_release(link, refs[0][1], 2)
    del t, s
    assert _routes(link, [FakeT(FakeStorage(base + 2 * MiB, MiB))]) == ["staging"]   # a new storage there
    pl.sender._async_torch = True                         # cudaMallocAsync: pool memory, no handle
    s2 = FakeStorage(base + 4 * MiB, MiB)
    assert _routes(link, [FakeT(s2)]) == _routes(link, [FakeT(s2)]) == ["staging"]
    assert len(_handle_calls(log)) == 1


def test_a_small_first_seen_storage_is_staged_without_asking_the_ipc_route_or_choose(parent, monkeypatch):
    """No export heap (torch's native allocator): a call's new small output is staged
    straight away, with its own reason; sent again it still goes by handle."""
    pl, log, link, mem = parent
    base = mem.add(1 << 40, 64 * MiB)
    s = FakeStorage(base, MiB)
    refuse = lambda *a, **k: pytest.fail("asked although the answer was known")   # noqa: E731
    with monkeypatch.context() as m:
        m.setattr(pl.sender, "_lend_ipc", refuse)
        m.setattr("comfy_env.ipc.cuda.sender.choose", refuse)
        assert _routes(link, [FakeT(s), FakeT(s, nbytes=1024, offset=4096)]) == ["staging", "staging"]
    assert pl.last_reasons["staging"] == paths.NATIVE_COPY_WHY
    assert _routes(link, [FakeT(s)]) == ["ipc"] and len(_handle_calls(log)) == 1


def _cpu_stub(obj, dtype, ordinal, uuid, why):
    """_encode_cpu's place in a route test: no copy to host (the fakes have no memory)."""
    return pack_fields(VERSION, "empty", -1, dtype, tuple(obj.shape), tuple(obj.stride()), 0, uuid, ordinal,
                       None, False)


@pytest.mark.parametrize("case", ["fresh", "again", "verdict_pool", "verdict_ipc", "no_handles", "force_cpu",
                                  "ipc_min_0", "ipc_min_limit", "small_copy_0", "no_pools"])
def test_the_native_fast_path_picks_the_route_the_slow_path_picks(parent, monkeypatch, case):
    """The inline answer for a small first-seen storage is the one _lend_ipc and choose()
    give, whatever the settings, the peer's verdicts and this process's capabilities."""
    pl, log, link, mem = parent
    monkeypatch.setattr(pl.sender, "_encode_cpu", _cpu_stub)
    real = pl.sender._encode_device

    def routes(fast):
        def device(ctx, ordinal):
            d = real(ctx, ordinal)
            d = ctx.dev[ordinal] = d._replace(native_copy_ok=d.native_copy_ok and fast)
            return d
        pl.sender._seen_small.clear()
        pl.sender.ipc_export.clear()
        out = []
        with monkeypatch.context() as m:
            m.setattr(pl.sender, "_encode_device", device)
            for n, size in enumerate((512, MiB, 16 * MiB, 16 * MiB + 4, 64 * MiB)):
                st = FakeStorage(mem.add((1 << 40) + (2 * n + fast) * (1 << 30), 128 * MiB), size)
                for k in range(3 if case == "again" else 1):
                    if k == 2:
                        pl.sender._seen_small.clear()     # forgotten (a full table): its live record still counts
                    before = collections.Counter(pl.sender.routes)
                    descs, _refs, fb = _send(link, [FakeT(st), FakeT(st, nbytes=512, offset=0)])
                    fb._lends.clear()
                    out.append((size, dict(pl.sender.routes - before)))
        return out

    if case == "verdict_pool":
        pl.sender.peers.of(link).verdicts.record("pool", False, "x")
    elif case == "verdict_ipc":
        pl.sender.peers.of(link).verdicts.record("ipc", False, "x")
    elif case == "no_handles":
        mem.refuse = "CUDA_ERROR_INVALID_VALUE"
    elif case == "force_cpu":
        pl.sender.force_cpu = True
    elif case == "ipc_min_0":
        pl.sender.ipc_min = 0
    elif case == "ipc_min_limit":
        pl.sender.ipc_min = pl.sender.limit
    elif case == "small_copy_0":
        pl.sender.small_copy = pl.sender.fresh_copy = 0
    elif case == "no_pools":
        pl.local.probed[0] = Capabilities(driver=True, pools=False, vmm=False, events=True)
    if case == "verdict_pool":
        pl.local.probed[0] = Capabilities(driver=True, pools=True, vmm=False, events=True)
    slow = routes(False)
    assert routes(True) == slow
    if case == "fresh":
        assert [r for _size, r in slow] == [{"staging": 2}] * 3 + [{"ipc": 2}] * 2


def test_the_route_is_off_with_the_threshold_at_the_import_limit(parent, monkeypatch):
    monkeypatch.setenv("COMFY_ENV_CUDA_IPC_MIN_MIB", str(paths.import_limit() >> 20))
    pl = CudaPlane()
    parent[0].sender.ipc_min = pl.sender.ipc_min
    _pl, log, link, mem = parent
    base = mem.add(1 << 40, 256 * MiB)
    s = FakeStorage(base, 64 * MiB)
    assert _routes(link, [FakeT(s)]) == _routes(link, [FakeT(s)]) == ["staging"]
    assert not _handle_calls(log)


def test_a_failed_first_handle_call_is_the_probe_and_keeps_the_old_route(parent):
    """cudaMallocAsync or expandable segments: cuIpcGetMemHandle refuses; the tensor
    takes the route it took before, and the failure is remembered (no second try)."""
    pl, log, link, mem = parent
    mem.refuse = "CUDA_ERROR_INVALID_VALUE"
    base = mem.add(1 << 40, 256 * MiB)
    assert _routes(link, [FakeT(FakeStorage(base, 64 * MiB))]) == ["staging"]
    assert "invalid argument" in pl.sender.ipc_export[0]
    mem.refuse = None
    assert _routes(link, [FakeT(FakeStorage(base + 64 * MiB, 64 * MiB))]) == ["staging"]
    assert len(_handle_calls(log)) == 1


def test_after_a_success_one_foreign_allocation_only_falls_back_itself(parent):
    pl, log, link, mem = parent
    base = mem.add(1 << 40, 256 * MiB)
    assert _routes(link, [FakeT(FakeStorage(base, 64 * MiB))]) == ["ipc"]
    other = 1 << 42                                   # memory the driver has no handle for
    mem.allocs[other] = 64 * MiB
    mem.refuse = "x"
    assert _routes(link, [FakeT(FakeStorage(other, 64 * MiB))]) == ["staging"]
    mem.refuse = None
    assert pl.sender.ipc_export[0] is True
    assert _routes(link, [FakeT(FakeStorage(base + 128 * MiB, 64 * MiB))]) == ["ipc"]


def test_pool_memory_big_allocations_peer_mappings_and_force_cpu_never_take_ipc(parent):
    pl, log, link, mem = parent
    pooled = mem.add(1 << 40, 64 * MiB, pool=True)   # a cudaMallocAsync parent's tensor
    assert _routes(link, [FakeT(FakeStorage(pooled, 64 * MiB))]) == ["staging"]
    huge = mem.add(1 << 41, pl.sender.limit + 2 * MiB)   # an allocation above the import limit
    assert _routes(link, [FakeT(FakeStorage(huge, 64 * MiB))]) == ["staging"]
    # A storage inside a peer's allocation we opened (a result passed on as an argument).
    mapped = mem.add(1 << 43, 128 * MiB)
    pl.receiver.ipc._bases[mapped] = (("w" * 16, b"h" * 64), 128 * MiB)
    assert _routes(link, [FakeT(FakeStorage(mapped + 32 * MiB, 64 * MiB))]) == ["staging"]
    assert not _handle_calls(log)
    pl.sender.force_cpu = True
    pl.sender._encode_cpu = lambda obj, dtype, ordinal, uuid, why: log.append(("cpu", why))
    native = mem.add(1 << 44, 64 * MiB)
    codec.encode_message(("call", 1), link, [[FakeT(FakeStorage(native, 64 * MiB))]])
    assert ("cpu", "COMFY_ENV_CUDA_FORCE_CPU=1") in log and not _handle_calls(log)


def test_a_peer_that_failed_to_open_a_handle_gets_the_old_route(parent):
    pl, log, link, mem = parent
    base = mem.add(1 << 40, 256 * MiB)
    with pytest.warns(RuntimeWarning, match="cannot import CUDA ipc blocks"):
        pl.on_control(link, ("verdict", "ipc", False, "cuIpcOpenMemHandle failed: CUDA_ERROR_INVALID_DEVICE"))
    assert _routes(link, [FakeT(FakeStorage(base, 64 * MiB))]) == ["staging"]
    assert not _handle_calls(log)
    other = lifetime.Link(lambda msgs: None, "worker-2")   # another peer: still tried
    assert _routes(other, [FakeT(FakeStorage(base + 64 * MiB, 64 * MiB))]) == ["ipc"]


# -- the block meta -----------------------------------------------------------------------------
GOOD = ipc_meta(OWNER, b"\0h" * 32, 4 * MiB, 64 * MiB, 128 * MiB, UUID)


def test_ipc_meta_roundtrip():
    m = validate_meta(GOOD)
    assert isinstance(m, IpcMeta) and m == GOOD and m.owner == OWNER and len(m.handle) == 64
    assert m.handle.startswith(b"\0")                 # NUL bytes survive (a c_char field would cut them)


@pytest.mark.parametrize("bad, match", [
    (GOOD[:7], "7 fields, expected 8"),
    (GOOD[:1] + ("",) + GOOD[2:], "owner"),
    (GOOD[:2] + (b"h" * 63,) + GOOD[3:], "64 bytes, got 63"),
    (GOOD[:2] + ("h" * 64,) + GOOD[3:], "64 bytes, got str"),
    (GOOD[:3] + (-1,) + GOOD[4:], "offset -1"),
    (GOOD[:4] + (0,) + GOOD[5:], "does not fit"),
    (GOOD[:3] + (100 * MiB,) + GOOD[4:], "does not fit"),
    (GOOD[:5] + (1.5,) + GOOD[6:], "alloc_size 1.5"),
    (GOOD[:6] + ("GPU-0", False), "device uuid"),
    (GOOD[:7] + (1,), "sent_before 1 must be a bool"),
])
def test_malformed_ipc_meta_gets_a_clear_error(bad, match):
    with pytest.raises(DescriptorError, match=match):
        validate_meta(bad)


def test_an_ipc_block_with_an_fd_is_refused_and_the_fd_closed():
    pl = CudaPlane()
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(CudaTransferError, match="arrived with an fd"):
        pl.open_remote(("cuda", OWNER, 1), GOOD, r)
    with pytest.raises(OSError):
        os.fstat(r)
    r2, w2 = os.pipe()
    os.close(w2)
    with pytest.raises(DescriptorError):
        pl.open_remote(("cuda", OWNER, 2), GOOD[:2] + (b"x",) + GOOD[3:], r2)
    with pytest.raises(OSError):
        os.fstat(r2)


# -- the importer --------------------------------------------------------------------------------
class _PostLog(lifetime.Link):
    """A link that writes its posts into the driver log (their order against the calls)."""

    def __init__(self, log):
        super().__init__(lambda msgs: None, "worker-1")
        self.log = log
        self.uid = OWNER

    def post(self, message):
        self.log.append(("post", message))


@pytest.fixture
def importer(monkeypatch):
    """A plane whose driver opens and closes IPC handles in a log; returns (plane, log, link)."""
    log = []
    bases = iter(range(1 << 40, 1 << 48, 1 << 34))

    def call(name, *args, detail=""):
        log.append((name,) + args[:1])

    def ipc_open(handle):
        base = next(bases)
        log.append(("open", handle, base))
        return base

    monkeypatch.setattr(D, "call", call)
    monkeypatch.setattr(D, "try_call", try_call_reader_busy)
    monkeypatch.setattr(D, "ipc_open", ipc_open)
    monkeypatch.setattr(D, "ipc_close", lambda base: log.append(("close", base)))
    monkeypatch.setattr(devices, "use", lambda o: None)
    pl = CudaPlane()
    pl.receiver.ipc.background = False                 # idle mappings close on sweep() only
    link = _PostLog(log)
    with ledger_records_dropped():
        yield pl, log, link


def _leases(pl, link, metas, serial=0):
    """Take a lease on one block per meta, as a decoder would (records, in order)."""
    keys = [("cuda", OWNER, serial + i) for i in range(len(metas))]
    return lifetime.LEDGER.accept_leases(link, keys, lambda i: (pl.open_remote(keys[i], metas[i], -1), pl.on_zero))


def _names(log, *names):
    return [e for e in log if e[0] in names]


def _three_on_one_handle(pl, log, link):
    handle = b"\0H" * 32
    metas = [ipc_meta(OWNER, handle, i * 64 * MiB, 64 * MiB, 256 * MiB, UUID) for i in range(3)]
    recs = _leases(pl, link, metas)
    assert not _names(log, "open")                     # open_remote opens nothing
    ptrs = []
    for rec in recs:
        lifetime.LEDGER.hold(rec)                      # a tensor on it
        ptrs.append(pl.receiver._local_ptr(rec, 0, 7, link))
    opens = _names(log, "open")
    assert len(opens) == 1 and opens[0][1] == handle
    assert ptrs == [opens[0][2] + i * 64 * MiB for i in range(3)]
    assert ("post", ("plane", "cuda", ("verdict", "ipc", True, ""))) in log
    # The first record goes: its reads are waited for before its release; nothing closes.
    del log[:]
    lifetime.LEDGER.unhold(recs[0])
    names = [e[0] for e in log]
    assert "close" not in names and ("post", Release(recs[0].key, 1)) in log
    assert names.index("cuStreamSynchronize") < names.index("post")
    del log[:]
    return metas, recs, opens[0][2]


def test_with_the_cache_off_the_last_record_closes_the_mapping_before_its_release(importer):
    pl, log, link = importer
    pl.receiver.ipc.max_count = 0
    metas, recs, mapped = _three_on_one_handle(pl, log, link)
    # The other two go in one batch: one synchronise, one close, then both releases.
    lifetime.LEDGER.unhold_all(recs[1:])
    names = [e[0] for e in log]
    assert names == ["cuEventRecord", "cuStreamWaitEvent", "cuStreamSynchronize", "close", "post", "post"]
    assert log[3] == ("close", mapped)
    assert [e[1] for e in log[4:]] == [Release(recs[1].key, 1), Release(recs[2].key, 1)]
    assert pl.receiver.ipc.stats() == {"ipc_open": 0, "ipc_idle": 0, "ipc_opens_made": 1, "ipc_hits": 2,
                                       "ipc_closed": 1}
    # Opened again after the close: a fresh mapping.
    again = _leases(pl, link, metas[:1], serial=10)[0]
    lifetime.LEDGER.hold(again)
    pl.receiver._local_ptr(again, 0, 7, link)
    assert len(_names(log, "open")) == 1 and pl.receiver.ipc.stats()["ipc_open"] == 1
    lifetime.LEDGER.unhold(again)


@pytest.mark.parametrize("keep", [True, False])
def test_a_release_after_reads_that_completed_is_neither_fenced_nor_synchronised(importer, monkeypatch, keep):
    """A reader that synchronised (its stream has nothing queued): the release goes at
    once, with no fence and no synchronise (~20 µs on the H100 host), and a mapping the
    cache does not keep is still closed before the release."""
    pl, log, link = importer
    if not keep:
        pl.receiver.ipc.max_count = 0
    metas, recs, mapped = _three_on_one_handle(pl, log, link)
    monkeypatch.setattr(D, "try_call", lambda name, *a: log.append((name,) + a[:1]) or D.CUDA_SUCCESS)
    lifetime.LEDGER.unhold_all(recs[1:])
    names = [e[0] for e in log]
    assert names == ["cuStreamQuery"] * 2 + (["close"] if not keep else []) + ["post", "post"]
    assert log[0] == ("cuStreamQuery", 7)
    assert [e[1] for e in log if e[0] == "post"] == [Release(recs[1].key, 1), Release(recs[2].key, 1)]
    assert pl.receiver.ipc.stats()["ipc_idle"] == (1 if keep else 0)


def test_the_last_records_mapping_is_kept_and_a_new_storage_on_it_opens_nothing(importer):
    pl, log, link = importer
    metas, recs, mapped = _three_on_one_handle(pl, log, link)
    # The other two go in one batch: one synchronise, both releases, and the mapping stays.
    lifetime.LEDGER.unhold_all(recs[1:])
    names = [e[0] for e in log]
    assert names == ["cuEventRecord", "cuStreamWaitEvent", "cuStreamSynchronize", "post", "post"]
    assert [e[1] for e in log[3:]] == [Release(recs[1].key, 1), Release(recs[2].key, 1)]
    assert pl.receiver.ipc.stats() == {"ipc_open": 0, "ipc_idle": 1, "ipc_opens_made": 1, "ipc_hits": 2,
                                       "ipc_closed": 0}
    # The owner's next tensor in the same allocation (its next call's new output): a new
    # record, the same handle, no open; the mapping's address serves its offset.
    del log[:]
    again = _leases(pl, link, [ipc_meta(OWNER, b"\0H" * 32, 8 * MiB, MiB, 256 * MiB, UUID)], serial=10)[0]
    lifetime.LEDGER.hold(again)
    assert pl.receiver._local_ptr(again, 0, 7, link) == mapped + 8 * MiB
    assert not _names(log, "open", "close")
    assert pl.receiver.ipc.stats()["ipc_hits"] == 3 and pl.receiver.ipc.stats()["ipc_idle"] == 0
    # In use, a sweep long after leaves it alone; idle again, the sweep closes it once
    # it has been idle for the cache's time, not before.
    assert pl.receiver.ipc.sweep(now=time.monotonic() + 3600) == 0
    lifetime.LEDGER.unhold(again)
    ipc = pl.receiver.ipc
    assert ipc.sweep(now=time.monotonic() + ipc.max_idle_s / 2) == 0 and not _names(log, "close")
    assert ipc.sweep(now=time.monotonic() + ipc.max_idle_s + 0.01) == 1
    assert _names(log, "close") == [("close", mapped)]
    assert ipc.stats() == {"ipc_open": 0, "ipc_idle": 0, "ipc_opens_made": 1, "ipc_hits": 3, "ipc_closed": 1}
    assert not ipc.is_mapped(mapped)


def test_two_handles_two_mappings(importer):
    pl, log, link = importer
    recs = _leases(pl, link, [ipc_meta(OWNER, bytes([i]) * 64, 0, 64 * MiB, 64 * MiB, UUID) for i in range(2)])
    for rec in recs:
        lifetime.LEDGER.hold(rec)
        pl.receiver._local_ptr(rec, 0, 7, link)
    assert len(_names(log, "open")) == 2
    lifetime.LEDGER.unhold_all(recs)
    assert not _names(log, "close") and pl.receiver.ipc.stats()["ipc_idle"] == 2
    pl.trim()                                          # our empty_cache closes every idle mapping
    assert len(_names(log, "close")) == 2 and pl.receiver.ipc.stats()["ipc_idle"] == 0


def _idle_mappings(pl, link, owners_handles):
    recs = []
    for i, (owner, h) in enumerate(owners_handles):
        rec = _leases(pl, link, [ipc_meta(owner, h, 0, 64 * MiB, 64 * MiB, UUID)], serial=100 + i)[0]
        lifetime.LEDGER.hold(rec)
        recs.append((rec, pl.receiver._local_ptr(rec, 0, 7, link)))
        lifetime.LEDGER.unhold(rec)
    return [p for _r, p in recs]


def test_idle_mappings_are_bounded_by_count_oldest_first(importer):
    pl, log, link = importer
    pl.receiver.ipc.max_count = 2
    ptrs = _idle_mappings(pl, link, [(OWNER, bytes([i]) * 64) for i in range(4)])
    # Each went idle in turn; over the bound of 2, the oldest two were closed.
    assert _names(log, "close") == [("close", ptrs[0]), ("close", ptrs[1])]
    assert pl.receiver.ipc.stats()["ipc_idle"] == 2


def test_the_owners_uncache_and_its_link_closing_close_only_its_idle_mappings(importer):
    pl, log, link = importer
    other = "9" * 16
    ptrs = _idle_mappings(pl, link, [(OWNER, b"a" * 64), (other, b"b" * 64), (OWNER, b"c" * 64)])
    del log[:]
    pl.on_control(link, ("uncache", OWNER))            # the owner ran empty_cache: it may free them
    assert sorted(_names(log, "close")) == sorted([("close", ptrs[0]), ("close", ptrs[2])])
    del log[:]
    pl.receiver.forget_owner(other)                    # the other owner's link closed
    assert _names(log, "close") == [("close", ptrs[1])]
    assert pl.receiver.ipc.stats()["ipc_idle"] == 0


def test_the_sweeper_thread_closes_idle_mappings_after_the_idle_time_and_exits(importer):
    pl, log, link = importer
    ipc = pl.receiver.ipc
    ipc.background, ipc.max_idle_s = True, 0.05
    ptr = _idle_mappings(pl, link, [(OWNER, b"t" * 64)])[0]
    deadline = time.monotonic() + 5
    while ipc.stats()["ipc_idle"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _names(log, "close") == [("close", ptr)]
    while ipc._thread is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ipc._thread is None


def test_a_sender_that_lent_by_ipc_handle_asks_its_peer_to_uncache_on_empty_cache(parent):
    pl, log, link, mem = parent
    base = mem.add(1 << 40, 256 * MiB)
    posts = []
    link.post = posts.append
    pl.sender.trim()
    assert not posts                                   # nothing lent to it: nothing to ask
    _descs, _refs, fb = _send(link, [FakeT(FakeStorage(base, 64 * MiB))])
    fb._lends.clear()
    pl.sender.trim()
    assert posts == [("plane", "cuda", ("uncache", lifetime.PROCESS_UID))]


def test_a_failed_open_is_a_clear_error_and_a_verdict(importer, monkeypatch):
    pl, log, link = importer

    def refuse(handle):
        raise D.CudaError("cuIpcOpenMemHandle_v2", 101, "invalid device")

    monkeypatch.setattr(D, "ipc_open", refuse)
    rec = _leases(pl, link, [GOOD])[0]
    with pytest.raises(CudaTransferError, match="could not import a CUDA ipc block from worker-1"):
        pl.receiver._local_ptr(rec, 0, 7, link)
    posts = [e[1] for e in log if e[0] == "post"]
    assert posts[0][2][:3] == ("verdict", "ipc", False) and "invalid device" in posts[0][2][3]
    lifetime.LEDGER.sweep([rec])                       # never opened: released, nothing closed
    assert not _names(log, "close") and ("post", Release(rec.key, 1)) in log


def test_a_descriptor_overrunning_its_ipc_block_or_naming_another_kind_is_refused(importer):
    pl, log, link = importer
    rec = _leases(pl, link, [GOOD])[0]
    from comfy_env.ipc.cuda.layout import VERSION, pack_fields

    class Dec:
        _comfy_env_cuda = None

        def record(self, ref):
            return rec

    pl.local.torch = torch
    pl.receiver._decode_device = lambda dec, ctx, uuid: (
        types.SimpleNamespace(dev={}, waited=set()), (0, torch.device("cpu"), 7))
    over = pack_fields(VERSION, "ipc", 0, "float32", (16 * MiB + 1,), (1,), 0, UUID, 0, None, False)
    with pytest.raises(CudaTransferError, match="overruns its IPC block"):
        pl.decode(over, Dec())
    wrong = pack_fields(VERSION, "pool", 0, "float32", (4,), (1,), 0, UUID, 0, None, False)
    with pytest.raises(CudaTransferError, match="route 'pool' names a ipc block"):
        pl.decode(wrong, Dec())
    assert not _names(log, "open")
    lifetime.LEDGER.sweep([rec])


def test_an_open_waits_for_a_pending_close_of_the_same_handle(importer):
    _pl, log, _link = importer
    ipc = IpcImports(max_count=0)                      # no idle mappings: the last release closes
    h = b"z" * 64
    ipc.open(OWNER, h, MiB, 0)
    ipc.release(OWNER, h, 7)                           # deferred: the close is pending
    # Same thread: the open completes our own pending close first.
    ipc.open(OWNER, h, MiB, 0)
    names = [e[0] for e in log]
    assert names.index("close") < len(names) - 1 - names[::-1].index("open")
    # Another thread's pending close: the open waits until it completed.
    ipc.release(OWNER, h, 7)
    got = []
    th = threading.Thread(target=lambda: got.append(ipc.open(OWNER, h, MiB, 0)))
    th.start()
    th.join(0.2)
    assert th.is_alive() and not got
    ipc.finish()
    th.join(5)
    assert got and not th.is_alive() and [e[0] for e in log].count("open") == 3
    with pytest.raises(LookupError, match="released more often than opened"):
        ipc.release(OWNER, b"y" * 64, 7)


# -- forwarding: the parent between two workers opens nothing -------------------------------------
def test_a_forwarded_ipc_block_is_not_opened_and_carries_no_fd(importer):
    pl, log, link = importer
    rec = _leases(pl, link, [GOOD])[0]
    assert isinstance(rec.resource, RemoteIpc) and rec.resource.ptr is None
    assert pl.forward_fd(rec) is None
    worker_b = lifetime.Link(lambda msgs: None, "worker-2")
    fb = codec.FrameBuilder(worker_b)
    part = codec.Part(b"data", [("cuda", rec.key, -1, GOOD)])
    fb.forward_part(part, [rec])
    assert fb.parts[0].refs == [("cuda", rec.key, -1, GOOD)] and not fb.fds
    assert worker_b.lent[rec.key] == 1
    lifetime.LEDGER.on_release(worker_b, rec.key, 1)   # B is done: back to the owner, nothing to close
    lifetime.LEDGER.sweep([rec])
    assert not _names(log, "open", "close", "cuStreamSynchronize")
    assert ("post", Release(rec.key, 1)) in log


# -- end to end through the codec: what the sender encodes, the receiver opens once ------------
class _Tensorish:
    """Stands for the tensor Receiver._wrap would build (weak-referenceable, like torch's)."""

    def __init__(self, ptr):
        self.ptr = ptr


def test_encoded_by_the_sender_decoded_by_the_receiver_one_open_then_close_then_releases(parent, monkeypatch):
    pl, log, link, mem = parent
    base = mem.add(1 << 40, 256 * MiB)
    a, b = FakeStorage(base + 32 * MiB, 64 * MiB), FakeStorage(base + 128 * MiB, 32 * MiB)
    _descs, refs, fb = _send(link, [FakeT(a), FakeT(a, nbytes=MiB, offset=8 * MiB), FakeT(b)])
    fb._lends.clear()
    # The receiving process: another plane, its own keys for the blocks (as a peer's).
    rpl = _receiving_plane(monkeypatch, log)
    peer = _PostLog(log)
    del log[:]
    got, rkeys = _receive(rpl, peer, fb, 0)
    mapped = 1 << 45
    assert [t.ptr for t in got] == [mapped + 32 * MiB, mapped + 40 * MiB, mapped + 128 * MiB]
    assert [e[0] for e in log if e[0] in ("open", "close")] == ["open"]
    del log[:]
    del got
    lifetime.LEDGER.drain()          # or the ledger's thread, which may have taken the batch first
    deadline = time.monotonic() + 5
    while [e[0] for e in log].count("post") < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    names = [e[0] for e in log]
    assert names.count("close") == 0 and names.count("post") == 2      # kept mapped, idle
    assert names.index("cuStreamSynchronize") < names.index("post")
    assert {e[1].key for e in log if e[0] == "post"} == set(rkeys)
    assert rpl.receiver.ipc.stats() == {"ipc_open": 0, "ipc_idle": 1, "ipc_opens_made": 1, "ipc_hits": 1,
                                        "ipc_closed": 0}
    rpl.receiver.ipc.flush()
    assert [e[0] for e in log].count("close") == 1


# -- a storage sent again: the peer keeps its record until the owner reclaims it ------------
def _receive(rpl, peer, fb, serial):
    """Decode ``fb``'s first part in the receiving plane ``rpl``, the blocks renamed as a
    peer's keys (both planes share this process's ledger): ``(tensors, renamed keys)``."""
    part = fb.parts[0]
    rrefs = [(name, ("cuda", "f" * 16, serial + i), fd, meta) for i, (name, _k, fd, meta) in enumerate(part.refs)]
    frame = codec.Frame.__new__(codec.Frame)
    frame.envelope, frame.parts, frame.fds = None, [codec.Part(part.data, rrefs)], []
    return codec.decode_part(frame, 0, peer), [r[1] for r in rrefs]


def _receiving_plane(monkeypatch, log):
    opened = iter(range(1 << 45, 1 << 48, 1 << 40))
    monkeypatch.setattr(D, "ipc_open", lambda handle: (log.append(("open", handle)), next(opened))[1])
    monkeypatch.setattr(D, "ipc_close", lambda b_: log.append(("close", b_)))
    rpl = CudaPlane()
    rpl.local.torch = torch
    rpl.receiver._decode_device = lambda dec, ctx, uuid: (
        types.SimpleNamespace(dev={}, waited=set()), (0, torch.device("cpu"), 7))
    rpl.receiver._wrap = lambda ptr, desc, ordinal, device: (lambda t: (t, t))(_Tensorish(ptr))
    rpl.receiver.import_cache.background = False      # evicts on sweep() / reclaim only
    monkeypatch.setitem(codec._PLANES, "cuda", rpl)
    return rpl


def _posts_after_drain(log, n):
    lifetime.LEDGER.drain()          # or the ledger's thread, which may have taken the batch first
    deadline = time.monotonic() + 5
    while len([e for e in log if e[0] == "post"]) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return [e[1] for e in log if e[0] == "post"]


def test_a_storage_sent_again_is_kept_by_the_peer_until_the_owner_reclaims_it(parent, monkeypatch):
    """A first sight (a call's new output) is released as soon as the peer's tensor died;
    the same storage sent again says so (``sent_before``): the peer keeps the record, so
    later sends reuse it (no open, no synchronise, no release per call), and it is
    released once the owner's tensor died (the owner's "reclaim")."""
    pl, log, link, mem = parent
    base = mem.add(1 << 40, 256 * MiB)
    posts = []
    link.post = posts.append
    s = FakeStorage(base, 64 * MiB)
    t = FakeT(s)
    rpl = _receiving_plane(monkeypatch, log)
    peer = _PostLog(log)

    _d, refs1, fb1 = _send(link, [t])
    fb1._lends.clear()
    assert validate_meta(refs1[0][3]).sent_before is False
    assert lifetime.LEDGER.get(refs1[0][1]).resource.watch is None
    got, rkeys1 = _receive(rpl, peer, fb1, 0)
    del log[:]
    del got
    assert _posts_after_drain(log, 1) == [Release(rkeys1[0], 1)]      # released at once
    lifetime.LEDGER.on_release(link, refs1[0][1], 1)                  # ... and the owner frees its record
    assert lifetime.LEDGER.get(refs1[0][1]) is None

    del log[:]
    _d, refs2, fb2 = _send(link, [t])                                 # the same storage again
    fb2._lends.clear()
    key2 = refs2[0][1]
    assert key2 != refs1[0][1] and validate_meta(refs2[0][3]).sent_before is True
    got, rkeys2 = _receive(rpl, peer, fb2, 10)
    rrec = lifetime.LEDGER.get(rkeys2[0])
    del got
    lifetime.LEDGER.drain()
    time.sleep(0.05)
    assert lifetime.LEDGER.get(rkeys2[0]) is rrec                     # kept: no release, no sync
    assert not _names(log, "post", "cuStreamSynchronize", "open", "close")
    assert rpl.receiver.import_cache.stats()["entries"] == 1

    # Sent a third time: the owner lends the same record, and the peer reuses its import.
    _d, refs3, fb3 = _send(link, [t])
    fb3._lends.clear()
    assert refs3[0][1] == key2 and link.lent[key2] == 2
    got, rkeys3 = _receive(rpl, peer, fb3, 10)
    assert got[0].ptr == (1 << 45) and not _names(log, "open", "post")
    del got
    lifetime.LEDGER.drain()

    # The owner's tensor dies: it asks the peer to let go; the peer releases once idle.
    del t
    assert posts == [("plane", "cuda", ("reclaim", [key2]))]
    rpl.on_control(peer, ("reclaim", [rkeys2[0]]))                    # (the peer's name for it)
    assert _posts_after_drain(log, 1) == [Release(rkeys2[0], 2)]
    assert lifetime.LEDGER.get(rkeys2[0]) is None
    lifetime.LEDGER.on_release(link, key2, 2)
    assert lifetime.LEDGER.get(key2) is None and not pl.sender._ipc_by_storage
    del s

    # A new storage at the same address (the allocator's next output): a first sight.
    _d, refs4, fb4 = _send(link, [FakeT(FakeStorage(base, 64 * MiB))])
    fb4._lends.clear()
    assert validate_meta(refs4[0][3]).sent_before is False
    lifetime.LEDGER.on_release(link, refs4[0][1], 1)



def test_a_lent_tensor_dying_while_the_interpreter_exits_is_silent(monkeypatch):
    """A worker's tensor kept on a global until exit dies while modules are cleared
    (their globals are None): its reclaim hook must neither raise nor log ("Exception
    ignored in ... _tensor_died" was printed by an H100 run's worker at exit)."""
    from comfy_env.ipc.cuda import sender as sender_mod
    monkeypatch.setattr(sender_mod, "_storage_users", None)
    monkeypatch.setattr(sender_mod, "log", None)

    class Finalizing:
        @staticmethod
        def is_finalizing():
            return True
    sender_mod.Sender._tensor_died(object(), ("cuda", "uid", 1), object(), None, _sys=Finalizing)
