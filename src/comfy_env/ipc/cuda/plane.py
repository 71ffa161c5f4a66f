"""The CUDA data plane: torch CUDA tensors as descriptors over exportable device memory.

Data flow of one tensor (sender on the left, receiver on the right)::

    encode(t)                                           decode(desc)
      route = paths.choose(...)                           rec = dec.record(desc.ref)
      pool:    export t's own allocation (zero copy)        (open_remote on first sight:
      staging: copy into our staging pool                    keep the fd, import nothing)
      vmm:     copy into a fresh VMM block                  import pointer / map VMM block
      record an interprocess event on t's stream  ---->     stream waits on the event
      add_ref(record, meta, fd if the peer lacks it)        wrap as a tensor, LEDGER.holder
                                                           ...tensor garbage collected...
      on_zero(owned): drop t / free staging / unmap  <----  on_zero(remote): free + sync,
                                                            then the ledger posts release

Block meta (``layout.pool_meta`` / ``vmm_meta``) plus the fd from :meth:`forward_fd`
are all a third process needs: the parent forwards worker A's blocks to worker B
without importing them (``open_remote`` is lazy), B imports from A's pool directly,
and B's releases flow back through the parent's ledger.

Per peer (``link.state["cuda"]``): which of our pools it has (their fd crosses once),
and what it reported after its first import of each kind (the probe: an import that
fails raises a clear error at the receiver, which tells us, and we stop using that
route for that peer).
"""
from __future__ import annotations

import collections
import functools
import itertools
import logging
import os
import sys
import threading
import warnings
import weakref
from typing import NamedTuple

from ... import settings
from .. import lifetime
from ..codec import EncodeError, Plane
from . import devices
from . import driver as D
from .events import EventRing, OpenedEvents
from .blocks import OwnedPool, OwnedStaging, OwnedVmm, RemotePool, RemoteVmm
from .importcache import ImportCache
from .layout import (CudaTensorDesc, VERSION, ITEMSIZE, pack_fields, pool_meta, span_bytes, unpack, validate,
                     validate_meta, vmm_meta)
from .paths import (FRESH_COPY_WHY, POOL_WHY, SMALL_COPY_WHY, Capabilities, PeerVerdicts, choose,
                    fresh_copy_limit, import_limit, small_copy_limit)
from .pools import Pools, PoolImports
from .vmm import VmmBlock

__all__ = ["CudaPlane", "CudaTransferError", "CudaFallbackWarning", "PLANE"]

log = logging.getLogger("comfy_env.cuda")


class CudaTransferError(RuntimeError):
    """A CUDA tensor could not be received (the reason names the driver error)."""


class CudaFallbackWarning(RuntimeWarning):
    """CUDA tensors go through host memory (slow); the message says why."""


def _storage_users(storage):
    """How many references torch counts on ``storage`` (tensors and storage objects), or
    None where this torch cannot say."""
    torch = sys.modules.get("torch")
    count = getattr(getattr(torch, "_C", None), "_storage_Use_Count", None)
    cdata = getattr(storage, "_cdata", None)
    if count is None or cdata is None:
        return None
    return count(cdata)


class _EncodeDevice(NamedTuple):
    """What encoding needs of one GPU, found the first time a frame meets it."""
    caps: Capabilities
    uuid: str
    heap: object              # pools.Pools of our export heap, or None
    stream: object            # torch's current stream there (a CUstream)
    pool_ok: bool             # a tensor in our export pool goes zero copy without asking choose()
    copy_ok: bool             # a first-seen storage goes by one copy without asking choose()


class _DecodeDevice(NamedTuple):
    """What decoding needs of one GPU, found the first time a message meets it."""
    ordinal: int
    device: object            # torch.device
    stream: object            # torch's current stream there


class _EncodeContext:
    """What encoding one frame computes once, not once per tensor."""
    __slots__ = ("st", "dev", "events", "ready_waited", "staged", "copies")

    def __init__(self, st):
        self.st = st
        self.dev = {}           # ordinal -> _EncodeDevice
        self.events = {}        # (ordinal, stream) -> the frame's event there (reserved, recorded at send)
        self.ready_waited = {}  # id -> a peer's "idle" event already waited on (kept alive: ids stay unique)
        self.staged = {}        # storage address -> (storage, encoder, ref, seq): staged once per part
        self.copies = {}        # (ordinal, stream) -> ([dst], [src], [nbytes], [source kept alive])


class _DecodeContext:
    """What decoding one message computes once, not once per tensor."""
    __slots__ = ("dev", "waited")

    def __init__(self):
        self.dev = {}           # device uuid -> _DecodeDevice
        self.waited = set()     # events already waited on, per stream


class _PeerState:
    __slots__ = ("pools_sent", "verdicts", "told", "__weakref__")

    def __init__(self):
        self.pools_sent = set()       # our pool keys whose fd this peer has
        self.verdicts = PeerVerdicts()
        self.told = set()             # kinds whose import outcome we reported to this peer


class _DeviceBytes:
    """``__cuda_array_interface__`` over raw device bytes.

    Torch keeps this object alive for as long as the storage built on it lives, so
    its death (a weakref finaliser, see LEDGER.holder) is exactly "nobody uses the
    bytes any more", whatever views the user made.
    """
    __slots__ = ("__cuda_array_interface__", "__weakref__")

    def __init__(self, ptr, nbytes, typestr="|u1", shape=None, strides=None):
        self.__cuda_array_interface__ = {"shape": (nbytes,) if shape is None else shape, "typestr": typestr,
                                         "data": (ptr, False), "version": 2, "strides": strides}


# dtypes torch builds straight from a typed __cuda_array_interface__ (one call instead of
# as_tensor + view + as_strided); the others (bfloat16, float8, ...) go through bytes.
_TYPESTR = {"float64": "<f8", "float32": "<f4", "float16": "<f2", "complex128": "<c16", "complex64": "<c8",
            "int64": "<i8", "int32": "<i4", "int16": "<i2", "int8": "|i1", "uint8": "|u1", "bool": "|b1"}


class CudaPlane(Plane):
    name = "cuda"
    types = ("torch.Tensor",)

    def __init__(self):
        self._lock = threading.RLock()
        self.role = "parent"
        cfg = settings.read()
        self.heap_policy = cfg.cuda_heap
        self.limit = import_limit()
        # Diagnostics and benchmarks only: send every CUDA tensor through host memory.
        self.force_cpu = cfg.cuda_force_cpu
        self.roll_min_idle = cfg.cuda_roll_min_idle_mib << 20
        self.small_copy = small_copy_limit()
        self.fresh_copy = fresh_copy_limit(self.small_copy, self.limit)
        self._seen_small = {}         # storage address -> weakref to the storage last staged from it
        self._idle_local = threading.local()   # importer: idle staging blocks of this batch
        self._batch_copies = True     # cuMemcpyBatchAsync works here (until it fails once)
        self._caps = {}               # ordinal -> Capabilities
        self._heap = {}               # ordinal -> Pools (worker, cudaMallocAsync, policy pool)
        self._staging = {}            # ordinal -> Pools
        self._rings = {}              # ordinal -> EventRing
        self._events = OpenedEvents()
        self.imports = PoolImports()
        self.import_cache = ImportCache(lifetime.LEDGER)   # pool imports kept after use
        self._by_base = {}            # allocation base -> owned "pool" record (one key per allocation)
        self._by_ptr = {}             # data pointer -> live owned "pool" record (skips two driver calls)
        self._idle_staging = {}       # ordinal -> {block size -> [owned staging records a peer reported idle]}
        self.recycled = 0             # staging lends that reused a block a peer still had mapped
        self._serial = itertools.count(1)
        self._links = weakref.WeakSet()
        self._dead_links_seen = set()
        self._warned = set()
        self._torch = None
        self._dtypes = None           # torch dtype -> name
        self.routes = collections.Counter()   # route -> tensors sent (doctor, tests)
        self.last_reasons = {}        # route -> why it was last chosen

    # -- setup ---------------------------------------------------------------------
    def _t(self):
        if self._torch is None:
            import torch
            self._dtypes = {getattr(torch, n): n for n in ITEMSIZE if hasattr(torch, n)}
            self._torch = torch
        return self._torch

    def caps(self, ordinal) -> Capabilities:
        """What this process can do on ``ordinal``, found by doing it (once)."""
        c = self._caps.get(ordinal)
        if c is None:
            with self._lock:
                c = self._caps.get(ordinal)
                if c is None:
                    c = self._caps[ordinal] = self._probe_local(ordinal)
        return c

    def _probe_local(self, ordinal):
        try:
            D.lib()
            devices.use(ordinal)
        except D.CudaError as exc:
            return Capabilities.none(str(exc))
        reasons = {}
        pools = vmm = events = False
        try:
            if not D.device_attribute(D.DEV_ATTR_MEMORY_POOLS_SUPPORTED, ordinal):
                raise RuntimeError("the device does not support memory pools")
            if not D.device_attribute(D.DEV_ATTR_MEMPOOL_HANDLE_TYPES, ordinal) & D.HANDLE_POSIX_FD:
                raise RuntimeError("the device's pools cannot be shared as POSIX fds")
            # The probe *is* the staging pool: create it, export it, export a pointer.
            staging = Pools(ordinal, "staging")
            ptr = staging.current.alloc(1, None)
            try:
                staging.current.export_pointer(ptr)
            finally:
                D.call("cuMemFreeAsync", ptr, None)
            self._staging[ordinal] = staging
            pools = True
        except Exception as exc:
            reasons["pools"] = str(exc)
        try:
            if not D.device_attribute(D.DEV_ATTR_VMM_SUPPORTED, ordinal):
                raise RuntimeError("the device does not support virtual memory management")
            VmmBlock.create(ordinal, 1).close()
            vmm = True
        except Exception as exc:
            reasons["vmm"] = str(exc)
        try:
            ring = EventRing(ordinal)
            ring.record(None)
            self._rings[ordinal] = ring
            events = True
        except Exception as exc:
            reasons["events"] = str(exc)
        return Capabilities(driver=True, pools=pools, vmm=vmm, events=events, reasons=reasons)

    def ensure_heap(self, ordinal):
        """Worker side: make an export pool ``ordinal``'s current pool (torch allocates there)."""
        if self.role != "worker" or self.heap_policy != "pool" or ordinal in self._heap:
            return self._heap.get(ordinal)
        torch = self._t()
        if torch.cuda.get_allocator_backend() != "cudaMallocAsync":
            return None           # the native allocator ignores the device's pool
        with self._lock:
            if ordinal not in self._heap and self.caps(ordinal).pools:
                try:
                    self._heap[ordinal] = Pools(ordinal, "heap")
                except D.CudaError as exc:
                    self._warn_once(("heap", ordinal), f"no zero-copy export pool on GPU {ordinal}: {exc}")
                    self._heap[ordinal] = None
        return self._heap.get(ordinal)

    # -- per peer ------------------------------------------------------------------
    def _peer(self, link) -> _PeerState:
        st = link.state.get(self.name)
        if st is None:
            st = link.state[self.name] = _PeerState()
            self._links.add(link)
        return st

    def _warn_once(self, key, msg):
        if key in self._warned:
            return
        self._warned.add(key)
        warnings.warn(msg, CudaFallbackWarning, stacklevel=3)
        log.warning("%s", msg)

    # -- encode ----------------------------------------------------------------------
    def _encode_context(self, enc):
        state = enc.fb.plane_state
        ctx = state.get(self.name)
        if ctx is None:
            self._t()
            self._housekeeping()
            ctx = state[self.name] = _EncodeContext(self._peer(enc.link))
            enc.fb.before_send(lambda: self._finish_frame(ctx))
        return ctx

    def _finish_frame(self, ctx):
        """The frame is about to be sent (or aborted): enqueue its staging copies, then
        record its reserved events after them."""
        copies, ctx.copies = ctx.copies, {}
        events, ctx.events = ctx.events, {}
        # What pinned sources during encoding goes now: ``staged`` holds the encoders,
        # which hold this frame, which holds ``ctx`` (a cycle only the garbage collector
        # would break, keeping the user's tensors, and a worker's heap generation, alive).
        ctx.staged.clear()
        ctx.ready_waited.clear()
        try:
            for (ordinal, stream), (dsts, srcs, sizes, _keep) in copies.items():
                self._copy(ordinal, stream, dsts, srcs, sizes)
        finally:
            for (ordinal, stream), (_uid, _o, slot, _h) in events.items():
                self._rings[ordinal].record_reserved(slot, stream)

    def _copy(self, ordinal, stream, dsts, srcs, sizes):
        """Device copies of one frame on one stream: one batch call where the driver has
        it (a copy call costs ~8 µs of CPU on the H100 host), else one call each."""
        devices.use(ordinal)
        if len(dsts) > 1 and self._batch_copies:
            try:
                D.copy_batch(dsts, srcs, sizes, stream, ordinal)
                return
            except D.CudaError as exc:
                # Copies it did enqueue are enqueued again below: the same bytes.
                self._batch_copies = False
                log.warning("comfy_env: batched CUDA copies unavailable (%s); copying one by one", exc)
        for dst, src, n in zip(dsts, srcs, sizes):
            D.call("cuMemcpyDtoDAsync_v2", dst, src, n, stream, detail="into the staging pool")

    def _encode_device(self, ctx, ordinal):
        """The :class:`_EncodeDevice` of ``ordinal``, the first time a frame meets it.
        ``pool_ok``: a tensor in our export pool goes zero copy without asking
        :func:`choose`; ``copy_ok``: a small tensor first seen goes by one copy into the
        staging pool without asking it (what it would answer; the peer's verdict is read
        once per frame)."""
        caps = self.caps(ordinal)
        uuid = devices.uuid_of(ordinal)
        heap = stream = None
        if caps.driver:
            heap = self.ensure_heap(ordinal)
            devices.use(ordinal)
            stream = self._torch.cuda.current_stream(ordinal).cuda_stream
        pool_ok = (heap is not None and caps.pools and ctx.st.verdicts.ok("pool") is not False
                   and not self.force_cpu)
        copy_ok = pool_ok and self.fresh_copy > 0
        d = ctx.dev[ordinal] = _EncodeDevice(caps, uuid, heap, stream, pool_ok, copy_ok)
        return d

    def encode(self, obj, enc):
        if not obj.is_cuda:
            return None               # the CPU plane's
        ctx = self._encode_context(enc)
        torch = self._torch
        dtype = self._dtypes.get(obj.dtype)
        if dtype is None:
            raise EncodeError(f"CUDA tensors of dtype {obj.dtype} cannot be shared")
        ordinal = obj.get_device()
        d = ctx.dev.get(ordinal)
        caps, uuid, heap, stream, pool_ok, copy_ok = d if d is not None else self._encode_device(ctx, ordinal)
        if obj.layout != torch.strided or obj.is_quantized:
            self.routes["cpu"] += 1
            return self._encode_cpu(obj, dtype, ordinal, uuid, f"{obj.layout} tensors have no plain memory layout")
        shape = tuple(obj.shape)
        strides = tuple(obj.stride())
        nbytes = span_bytes(shape, strides, ITEMSIZE[dtype])
        in_pool, alloc, gen, base, ptr, copy, storage, snbytes = False, 0, None, 0, 0, False, None, 0
        if nbytes and heap is not None:
            ptr = obj.data_ptr()
            rec = self._by_ptr.get(ptr)
            if rec is not None and lifetime.LEDGER.get(rec.key) is rec:
                # A pointer we exported and whose record lives: its allocation is pinned
                # (the record keeps a tensor on it), so base and pool are still the same.
                res = rec.resource
                base, alloc, gen = res.base, res.alloc, res.gen
                in_pool = gen is not None
            else:
                if copy_ok:
                    storage = obj.untyped_storage()
                    snbytes = storage.nbytes()
                    if snbytes <= self.fresh_copy:
                        # Decided before the two driver calls below, which it does not need.
                        sptr = storage.data_ptr()
                        copy = sptr in ctx.staged or self._first_sight(storage, sptr)
                if not copy:
                    base, alloc = D.address_range(ptr)
                    gen = heap.owner_of(D.pointer_pool(base))
                    in_pool = gen is not None
        st = ctx.st
        if in_pool and pool_ok and alloc <= self.limit:
            route = "pool"            # choose()'s first answer, without the call
            self.last_reasons[route] = POOL_WHY
        elif copy:
            route = "staging"         # choose()'s answer for a first sight, without the call
            self.last_reasons[route] = SMALL_COPY_WHY if snbytes <= self.small_copy else FRESH_COPY_WHY
        else:
            route, why = choose(caps, st.verdicts, nbytes=nbytes, in_export_pool=in_pool,
                                alloc_bytes=alloc, limit=self.limit)
            if self.force_cpu and route != "empty":
                route, why = "cpu", "COMFY_ENV_CUDA_FORCE_CPU=1"
            self.last_reasons[route] = why
        self.routes[route] += 1
        if route == "empty":
            return pack_fields(VERSION, "empty", -1, dtype, shape, strides, 0, uuid, ordinal, None,
                               obj.requires_grad)
        if route == "cpu":
            return self._encode_cpu(obj, dtype, ordinal, uuid, why)
        seq = 0
        if route == "pool":
            ref = self._lend_pool_block(enc, st, obj, gen, base, alloc, ordinal, uuid, ptr)
            offset = ptr - base
        elif route == "staging":
            ref, seq, offset = self._stage(ctx, enc, obj, ptr or obj.data_ptr(), nbytes, ordinal, uuid, stream,
                                           storage)
        else:
            ref = self._lend_vmm(enc, obj, nbytes, ordinal, uuid, stream)
            offset = 0
        event = None
        if caps.events:
            event = self._event_for(ctx, ordinal, stream)
        else:
            # No interprocess events: the receiver must not read early, so wait here.
            D.call("cuStreamSynchronize", stream)
        return pack_fields(VERSION, route, ref, dtype, shape, strides, offset, uuid, ordinal, event,
                           obj.requires_grad, seq)

    def _event_for(self, ctx, ordinal, stream):
        """The event the receiver waits on: one per stream and frame, reserved now and
        recorded just before the frame is sent (:meth:`_finish_frame`), so it
        follows the producer's kernels and every copy the frame enqueued (one record
        per frame instead of one per copied tensor: ~5 µs each on the H100 host)."""
        key = (ordinal, stream)
        event = ctx.events.get(key)
        if event is None:
            slot, handle = self._rings[ordinal].reserve()
            event = ctx.events[key] = (lifetime.PROCESS_UID, ordinal, slot, handle)
        return event

    def _first_sight(self, storage, ptr):
        """Whether ``storage`` (at most ``fresh_copy``, not lent now) is one we have not sent before.

        A tensor sent once is likely fresh (a call's output): one device copy into a
        recycled staging block costs less than exporting its allocation, importing
        it and freeing the import (small: two driver calls per side; big: the peer maps
        and unmaps every page, ~2.5 ms per GiB on the H100 against ~0.8 ms for the
        copy).  A storage sent again, through any view (a cached output, a weight),
        goes zero copy, and the peer's import cache keeps it mapped.  Torch keeps one
        Python object per live storage, so a weak reference to it tells "the same
        storage" from "a new one at a reused address".  Only a hint: either route is
        correct.
        """
        seen = self._seen_small
        ref = seen.get(ptr)
        if ref is not None and ref() is storage:
            return False
        if len(seen) >= 4096:
            seen.clear()              # dead entries mostly; a live one only costs a copy
        seen[ptr] = weakref.ref(storage)
        return True

    def _stage(self, ctx, enc, obj, ptr, nbytes, ordinal, uuid, stream, storage=None):
        """Copy ``obj`` into a staging block: ``(ref, lend seq, offset of the view in it)``.

        A storage of at most ``COMFY_ENV_CUDA_SMALL_COPY_MIB`` is staged whole, once per
        message part: views of it still share memory on the other side, as they do
        here, and a tensor met twice is copied once.  A bigger storage: only the bytes
        the view spans (a small slice of a huge tensor copies only the slice).
        """
        if storage is None:
            storage = obj.untyped_storage()
        snbytes = storage.nbytes()
        if snbytes <= self.small_copy:
            sbase = storage.data_ptr()
            staged = ctx.staged.get(sbase)
            if staged is None or staged[0] is not storage or staged[1] is not enc:
                ref, seq = self._lend_staging(ctx, enc, sbase, snbytes, ordinal, uuid, stream, storage)
                staged = ctx.staged[sbase] = (storage, enc, ref, seq)   # keeps the storage: ptrs stay unique
            return staged[2], staged[3], ptr - sbase
        ref, seq = self._lend_staging(ctx, enc, ptr, nbytes, ordinal, uuid, stream, obj)
        return ref, seq, 0

    def _lend_pool_block(self, enc, st, obj, gen, base, alloc, ordinal, uuid, ptr):
        # Check-and-lend under the ledger's lock: a release on another thread must not
        # retire the record between our lookup and the lend (one key per allocation, so
        # the peer imports each pointer once).
        with lifetime.LEDGER.lock:
            rec = self._by_base.get(base)
            if rec is None or lifetime.LEDGER.get(rec.key) is not rec:
                export = gen.export_pointer(base)
                meta = pool_meta(gen.key, export, uuid, alloc)
                key = (self.name, lifetime.PROCESS_UID, next(self._serial))
                # The record keeps the storage (the memory), not the tensor: the tensor's
                # death is then our signal that the peer's cached import pins memory we
                # could reuse (see _tensor_died).
                storage = obj.untyped_storage()
                res = OwnedPool(ordinal, base, meta, storage, gen, alloc)
                rec = lifetime.LEDGER.add_owned(key, res, self.on_zero)
                self._by_base[base] = rec
                try:
                    res.watch = weakref.ref(obj, functools.partial(self._tensor_died, key, storage))
                except TypeError:
                    pass              # no signal: the peer's idle-time bound still applies
            if self._by_ptr.get(ptr) is not rec:
                self._by_ptr[ptr] = rec
                rec.resource.ptrs.append(ptr)
            return enc.add_ref(self, rec, rec.resource.meta, self._pool_fd_for(st, gen))

    def _tensor_died(self, key, storage, _ref):
        """The tensor of pool block ``key`` (its views keep it alive: ``_base``) died here.

        If nothing else of ours uses the storage (a tensor built on it independently, a
        Python storage object) only peers' import caches still pin the block: ask them
        to let it go ("reclaim"), so our allocator can reuse the memory.  A peer's tensor
        still alive on it keeps it until that dies.  Runs in a weakref callback: cheap,
        never raises.
        """
        try:
            users = _storage_users(storage)
            # Ours (the record's storage object) plus the dying tensor, which still
            # counts during its callback.
            if users is not None and users > 2:
                return
            rec = lifetime.LEDGER.get(key)
            if rec is None or not rec.owned:
                return
            for link in list(self._links):
                if link.lent.get(key) and not link.closed:
                    link.post(("plane", self.name, ("reclaim", [key])))
        except Exception:
            log.exception("comfy_env: could not ask peers to reclaim CUDA block %s", key)

    def _pool_fd_for(self, st, gen):
        """The pool's fd the first time this peer hears of it, else None."""
        if gen.key in st.pools_sent:
            return None
        st.pools_sent.add(gen.key)
        return gen.fd

    # -- staging: one device copy into a block we recycle --------------------------
    # A peer that keeps our staging block imported (its import cache) tells us when
    # nothing reads it any more ("idle", with an event after its last reads); the
    # block is then copied into and lent again under the same key, and the peer's
    # import is reused: no import, unmap or allocation per call.  A block the peer
    # does not keep is released as before and freed into the staging pool.
    _STAGING_ROUND = 2 << 20

    def _staging_size(self, nbytes):
        """Bytes to allocate for ``nbytes``: rounded up, so later tensors of nearby sizes fit."""
        if nbytes < self._STAGING_ROUND:
            size = 1 << max(9, (nbytes - 1).bit_length())          # powers of two from 512 B
        else:
            size = -(-nbytes // self._STAGING_ROUND) * self._STAGING_ROUND
        return max(nbytes, min(size, self.limit))

    def _take_idle_staging(self, ordinal, nbytes, gen):
        """The smallest idle staging block of the current generation that fits ``nbytes``
        (at most twice its rounded size; caller holds the ledger's lock), marked busy;
        None if there is none.

        Idle blocks are kept by size (sizes are rounded, see :meth:`_staging_size`, so
        there are few): the usual case, a block of the rounded size, is one dict lookup
        (a scan of every idle block took 12 µs per tensor with 32 blocks).
        """
        buckets = self._idle_staging.get(ordinal)
        if not buckets:
            return None
        want = self._staging_size(nbytes)
        rec = self._pop_idle(buckets, want, gen) if want in buckets else None
        if rec is None:
            for size in sorted(z for z in buckets if nbytes <= z <= 2 * want):
                rec = self._pop_idle(buckets, size, gen)
                if rec is not None:
                    break
        if rec is not None:
            res = rec.resource
            res.busy = True
            res.seq += 1
            self.recycled += 1
        return rec

    @staticmethod
    def _pop_idle(buckets, size, gen):
        """The last block idle in ``buckets[size]`` that is still ours and of ``gen``;
        the others met on the way were freed or belong to a rolled generation (which
        must drain, not be lent again): forgotten."""
        bucket = buckets[size]
        ledger = lifetime.LEDGER
        while bucket:
            rec = bucket.pop()
            if ledger.get(rec.key) is rec and rec.resource.gen is gen:
                if not bucket:
                    del buckets[size]
                return rec
        del buckets[size]
        return None

    def _enqueue_copy(self, ctx, ordinal, stream, dst, src, nbytes, keep):
        """A staging copy: enqueued with the frame's others just before it is sent (one
        batch call, see :meth:`_finish_frame`), or now where the device has no events
        (encode then synchronises per tensor, which must follow the copy)."""
        if not self.caps(ordinal).events:
            self._copy(ordinal, stream, [dst], [src], [nbytes])
            return
        batch = ctx.copies.get((ordinal, stream))
        if batch is None:
            batch = ctx.copies[(ordinal, stream)] = ([], [], [], [])
        batch[0].append(dst)
        batch[1].append(src)
        batch[2].append(nbytes)
        batch[3].append(keep)         # the source stays alive until its copy is enqueued

    def _lend_staging(self, ctx, enc, src, nbytes, ordinal, uuid, stream, keep):
        """Copy ``nbytes`` at device address ``src`` (memory of ``keep``) into a staging
        block (a recycled one when the peer reported one idle) and lend it: ``(ref, lend
        seq)``.  The copy itself is enqueued when the frame is sent."""
        st = ctx.st
        gen = self._staging[ordinal].current
        with lifetime.LEDGER.lock:
            rec = self._take_idle_staging(ordinal, nbytes, gen)
            if rec is not None:
                ref = enc.add_ref(self, rec, rec.resource.meta, self._pool_fd_for(st, gen))
        if rec is not None:
            res = rec.resource
            if res.ready is not None:
                ready, res.ready = res.ready, None
                # The peer's last reads first.  One "idle" message names one event for
                # all its blocks (the same object): wait once per frame and stream.  Not
                # by value: the peer may have re-recorded the slot for a later message.
                waited = ctx.ready_waited
                if waited.get((id(ready), stream)) is not ready:
                    waited[(id(ready), stream)] = ready
                    self._events.wait(ready, ordinal, stream)
            res.stream = stream
            self._enqueue_copy(ctx, ordinal, stream, res.ptr, src, nbytes, keep)
            return ref, res.seq
        size = self._staging_size(nbytes)
        ptr = gen.alloc(size, stream)
        try:
            export = gen.export_pointer(ptr)
        except BaseException:
            D.try_call("cuMemFreeAsync", ptr, stream)
            raise
        self._enqueue_copy(ctx, ordinal, stream, ptr, src, nbytes, keep)
        meta = pool_meta(gen.key, export, uuid, size)
        key = (self.name, lifetime.PROCESS_UID, next(self._serial))
        rec = lifetime.LEDGER.add_owned(key, OwnedStaging(ordinal, ptr, meta, gen, stream, size), self.on_zero)
        return enc.add_ref(self, rec, meta, self._pool_fd_for(st, gen)), 0

    def _on_idle(self, link, blocks, event):
        """A peer finished reading our staging blocks ``[(key, lend seq)]`` and keeps them
        mapped; ``event`` (one for all of them) follows its last reads."""
        with lifetime.LEDGER.lock:
            for key, seq in blocks:
                rec = lifetime.LEDGER.get(tuple(key))
                if rec is None or not rec.owned or rec.resource.kind != "staging":
                    continue          # freed meanwhile, or not ours to recycle
                res = rec.resource
                if not res.busy or res.seq != seq:
                    continue          # an answer to an older lend: the block is busy again
                res.busy = False
                res.ready = event
                self._idle_staging.setdefault(res.ordinal, {}).setdefault(res.size, []).append(rec)

    def _staging_idle(self, rec):
        """Importer side, ``Record.on_idle`` of a kept staging block: queue it for the
        owner; the returned finisher (run once per batch by the ledger) tells it."""
        res = rec.resource
        link = rec.upstream
        if link is None or link.closed or res.ptr is None:
            return None
        stream = res.read_stream if res.read_stream is not None else res.stream
        pending = getattr(self._idle_local, "pending", None)
        if pending is None:
            pending = self._idle_local.pending = []
        pending.append((rec.key, res.seq, link, res.ordinal, stream))
        return self._finish_idles

    def _finish_idles(self):
        """Tell owners which of their staging blocks went idle here: one event per GPU and
        read stream after our reads (not one per block), one message per owner and event."""
        pending = getattr(self._idle_local, "pending", None)
        if not pending:
            return
        self._idle_local.pending = []
        groups = {}
        for item in pending:
            groups.setdefault((item[3], item[4]), []).append(item)
        for (ordinal, stream), items in groups.items():
            event = None
            try:
                if self.caps(ordinal).events:
                    slot, handle = self._rings[ordinal].record(stream)
                    event = (lifetime.PROCESS_UID, ordinal, slot, handle)
                else:
                    devices.use(ordinal)
                    D.call("cuStreamSynchronize", stream)
            except Exception:
                # Without the ordering the owner must not recycle them: say nothing; the
                # blocks are released (and freed) when our cache lets them go.
                log.exception("comfy_env: could not order the reads of %d staging blocks", len(items))
                continue
            by_link = {}
            for key, seq, link, _o, _s in items:
                by_link.setdefault(link, []).append((key, seq))
            for link, blocks in by_link.items():
                if not link.closed:
                    link.post(("plane", self.name, ("idle", blocks, event)))

    def _lend_vmm(self, enc, obj, nbytes, ordinal, uuid, stream):
        key = (self.name, lifetime.PROCESS_UID, next(self._serial))
        blk = VmmBlock.create(ordinal, nbytes)
        try:
            D.call("cuMemcpyDtoDAsync_v2", blk.ptr, obj.data_ptr(), nbytes, stream, detail="into a VMM block")
        except BaseException:
            blk.close()
            raise
        meta = vmm_meta(blk.size, uuid)
        rec = lifetime.LEDGER.add_owned(key, OwnedVmm(ordinal, blk, meta, stream), self.on_zero)
        return enc.add_ref(self, rec, meta, blk.fd)

    def _encode_cpu(self, obj, dtype, ordinal, uuid, why):
        self._warn_once(("cpu", why), f"comfy_env: CUDA tensors go through host memory (slow): {why}")
        host = obj.detach().cpu()
        return CudaTensorDesc(VERSION, "cpu", -1, dtype, tuple(obj.shape), tuple(obj.stride()), 0, uuid,
                              ordinal, None, obj.requires_grad, host)

    # -- decode ------------------------------------------------------------------------
    def _decode_device(self, dec, ctx, uuid):
        """``(ctx, _DecodeDevice)`` the first time a message meets ``uuid``."""
        if ctx is None:
            ctx = _DecodeContext()
            try:
                dec._comfy_env_cuda = ctx
            except AttributeError:
                pass
        try:
            ordinal = devices.ordinal_of(uuid)
        except (devices.UnknownDevice, D.CudaError) as exc:
            raise CudaTransferError(str(exc)) from None
        torch = self._torch
        d = ctx.dev[uuid] = _DecodeDevice(ordinal, torch.device("cuda", ordinal),
                                          torch.cuda.current_stream(ordinal).cuda_stream)
        return ctx, d

    def decode(self, desc, dec):
        desc = unpack(desc) if type(desc) is bytes else validate(desc)    # unpack checks too
        torch = self._torch or self._t()
        ctx = getattr(dec, "_comfy_env_cuda", None)
        d = ctx.dev.get(desc.device_uuid) if ctx is not None else None
        if d is None:
            ctx, d = self._decode_device(dec, ctx, desc.device_uuid)
        ordinal, device, stream = d
        route = desc.route
        if route == "cpu":
            t = desc.host.to(device)
        elif route == "empty":
            t = torch.empty_strided(desc.shape, desc.strides, dtype=getattr(torch, desc.dtype), device=device)
        else:
            rec = dec.record(desc.ref)
            res = rec.resource
            base = res.ptr if (rec.owned or res.ptr is not None) else self._local_ptr(rec, ordinal, stream, dec.link)
            event = desc.event
            if event is not None and event[0] != lifetime.PROCESS_UID:
                key = (event, stream)
                if key not in ctx.waited:
                    # The whole message was encoded before it was sent, so the first wait
                    # already covers the latest recording of that slot it can mean.
                    ctx.waited.add(key)
                    self._events.wait(event, ordinal, stream)
            t, keeper = self._wrap(base + desc.offset, desc, ordinal, device)
            lifetime.LEDGER.holder(rec, keeper)
            if not rec.owned and res.kind == "pool":
                meta = res.meta
                owner = meta.owner
                if route == "pool":
                    self.import_cache.keep(rec, meta.alloc_size, owner)
                elif route == "staging":
                    # Echoed in our "idle" report (the keeper above is alive until we return).
                    res.seq = desc.seq
                    res.read_stream = stream
                    if rec.upstream is not None and rec.upstream.uid == owner:
                        # Only the owner's own blocks: a block forwarded by a third process
                        # would be reported idle to the forwarder, which cannot recycle it.
                        self.import_cache.keep(rec, meta.alloc_size, owner, on_idle=self._staging_idle)
        if desc.requires_grad:
            t.requires_grad_(True)
        return t

    def _wrap(self, ptr, desc, ordinal, device):
        """A tensor over device memory at ``ptr`` as ``desc`` describes it, and its keeper.

        ``torch.as_tensor`` without ``device=`` first: torch takes the device from the
        pointer, and the argument costs a no-op ``.to()`` (0.6–1 µs per tensor on the
        H100 host).  But memory imported with peer access from another GPU's pool can
        be attributed to another GPU (two H200s: a result of GPU 1 arrived labelled
        cuda:0): when the device torch inferred is not the descriptor's, the tensor is
        built again with ``device=`` (torch 2.11 builds it there, no copy).
        """
        torch = self._torch
        typestr = _TYPESTR.get(desc.dtype)
        if typestr is not None and desc.shape:
            item = ITEMSIZE[desc.dtype]
            keeper = _DeviceBytes(ptr, 0, typestr, desc.shape, tuple(map(item.__mul__, desc.strides)))
            t = torch.as_tensor(keeper)
            if t.get_device() != ordinal:
                t = torch.as_tensor(keeper, device=device)
            return t, keeper
        keeper = _DeviceBytes(ptr, span_bytes(desc.shape, desc.strides, ITEMSIZE[desc.dtype]))
        raw = torch.as_tensor(keeper)
        if raw.get_device() != ordinal:
            raw = torch.as_tensor(keeper, device=device)
        dtype = getattr(torch, desc.dtype)
        t = raw.view(dtype) if dtype != torch.uint8 else raw
        return t.as_strided(desc.shape, desc.strides), keeper

    def _local_ptr(self, rec, ordinal, stream, link):
        """The block's address in this process: ours, or imported now on first use."""
        res = rec.resource
        if rec.owned or res.ptr is not None:
            return res.ptr
        with self._lock:
            if res.ptr is not None:
                return res.ptr
            kind = res.kind
            try:
                if kind == "pool":
                    ptr = self.imports.import_pointer(res.meta.pool_key, res.meta.export)
                else:
                    res.vmm = VmmBlock.open(res.fd, res.meta.size, ordinal)
                    res.fd = -1           # the block owns it now
                    ptr = res.vmm.ptr
            except (D.CudaError, LookupError) as exc:
                self._tell(link, kind, False, str(exc))
                raise CudaTransferError(
                    f"could not import a CUDA {kind} block from {link.name}: {exc}. That route is now "
                    f"disabled for this peer; the next transfer takes another") from None
            res.ptr, res.stream, res.ordinal = ptr, stream, ordinal
        self._tell(link, kind, True, "")
        return ptr

    def _tell(self, link, kind, ok, reason):
        """Report the outcome of our first import of ``kind`` from ``link`` (the probe)."""
        st = self._peer(link)
        if kind in st.told and ok:
            return
        st.told.add(kind)
        link.post(("plane", self.name, ("verdict", kind, bool(ok), reason[:500])))

    # -- blocks --------------------------------------------------------------------------
    def open_remote(self, key, meta, fd):
        try:
            meta = validate_meta(meta)
        except Exception:
            if fd >= 0:
                os.close(fd)
            raise
        if meta.kind == "pool":
            if fd >= 0:
                self.imports.register(meta.pool_key, fd, meta.device_uuid)
            self.imports.pin(meta.pool_key)       # raises clearly if the pool's fd never came
            return RemotePool(meta)
        if fd < 0:
            raise CudaTransferError(f"CUDA VMM block {key} arrived without its fd")
        return RemoteVmm(meta, fd)

    def forward_fd(self, record):
        """An fd (still ours, valid while ``record`` lives) that opens the block elsewhere."""
        res = record.resource
        if record.owned:
            return res.forward_fd()
        if res.kind == "pool":
            return self.imports.get(res.meta.pool_key).fd
        return res.vmm.fd if res.vmm is not None else res.fd

    def on_zero(self, record):
        # Runs on the ledger's thread (or whichever released last): never raise from here.
        try:
            if record.owned:
                self._free_owned(record)
            elif self._free_remote(record):
                return self._finish_frees     # the ledger calls it once per batch
        except Exception:
            log.exception("comfy_env: freeing CUDA block %s failed", record.key)
        return None

    def _finish_frees(self):
        """Complete this thread's deferred frees of imported pointers (one synchronise per
        stream for the whole batch), before the ledger posts their releases."""
        try:
            self.imports.finish()
        except Exception:
            log.exception("comfy_env: waiting for freed CUDA imports failed")

    def _free_owned(self, record):
        res = record.resource
        if res.kind == "pool":
            with lifetime.LEDGER.lock:
                if self._by_base.get(res.base) is record:
                    del self._by_base[res.base]
                for ptr in res.ptrs:
                    if self._by_ptr.get(ptr) is record:
                        del self._by_ptr[ptr]
            res.keep = None           # torch frees it, stream-ordered, when the user did too
            res.watch = None          # its callback holds the storage too
            self._reap_old(res.ordinal)
        elif res.kind == "staging":
            with lifetime.LEDGER.lock:
                bucket = self._idle_staging.get(res.ordinal, {}).get(res.size)
                if bucket and record in bucket:
                    bucket.remove(record)
            devices.use(res.ordinal)
            # Every importer released it after its reads completed (that is what a
            # release means), so the free only needs ordering after our own copy.
            D.call("cuMemFreeAsync", res.ptr, res.stream)
            self._reap_old(res.ordinal)
        else:
            devices.use(res.ordinal)
            # The peer never read it if it released without decoding: our copy may be in flight.
            D.call("cuStreamSynchronize", res.stream)
            res.vmm.close()

    def _free_remote(self, record):
        """Unmap a peer's block; True when the free was deferred to :meth:`_finish_frees`."""
        res = record.resource
        if res.kind == "pool":
            pool_key, export = res.meta.pool_key, res.meta.export
            try:
                if res.ptr is not None:
                    return self.imports.release_pointer(pool_key, export, res.stream, defer=True)
            finally:
                self.imports.unpin(pool_key)
        elif res.vmm is not None:
            devices.use(res.ordinal)
            D.call("cuStreamSynchronize", res.stream)   # our reads are done before we unmap
            res.vmm.close()
        elif res.fd >= 0:
            os.close(res.fd)
            res.fd = -1

    # -- control ---------------------------------------------------------------------------
    def on_control(self, link, message):
        kind = message[0]
        if kind == "verdict":
            _, block_kind, ok, reason = message
            self._peer(link).verdicts.record(block_kind, ok, reason)
            if not ok:
                self._warn_once(("verdict", link.name, block_kind),
                                f"comfy_env: {link.name} cannot import CUDA {block_kind} blocks from this "
                                f"process ({reason}); using another route")
        elif kind == "idle":
            _, blocks, event = message
            self._on_idle(link, blocks, event)
        elif kind == "reclaim":
            # The owner no longer uses these blocks: our cache must not pin them.
            self.import_cache.reclaim([tuple(k) for k in message[1]])
        elif kind == "uncache":
            # The owner ran empty_cache: drop idle imports of its blocks so it can free them.
            self.import_cache.flush(owner=message[1])
        elif kind == "retire":
            self.imports.retire(tuple(message[1]))
        elif kind == "retire-owner":
            self.imports.forget_owner(message[1])
            self._events.forget_owner(message[1])
        else:
            log.warning("comfy_env: unknown CUDA plane message %r from %s", kind, link.name)

    def _housekeeping(self):
        """Notice peers that went away: their pools retire here and at those we forwarded to."""
        if self._heap or self._staging:
            self._reap_old()
        for link in list(self._links):
            if link.closed and id(link) not in self._dead_links_seen:
                self._dead_links_seen.add(id(link))
                if link.uid:
                    self.imports.forget_owner(link.uid)
                    self._events.forget_owner(link.uid)     # its interprocess events too
                    for other in list(self._links):
                        if not other.closed and other is not link:
                            other.post(("plane", self.name, ("retire-owner", link.uid)))

    # -- memory ---------------------------------------------------------------------------
    def trim(self):
        """Release what exportable pools can release: roll to new generations, destroy drained ones.

        Called by the ``torch.cuda.empty_cache`` hook.  Returns the retired pool keys.
        """
        # Our cached imports first: their releases let peers free (and us reap) blocks.
        self.import_cache.flush()
        # Peers may keep our heap and staging blocks imported after use (their import
        # cache): ask them to let go; the blocks are freed as their releases arrive and
        # the rolled generations destroyed then (_reap_old).
        for link in list(self._links):
            st = link.state.get(self.name)
            if st is not None and st.pools_sent and not link.closed:
                link.post(("plane", self.name, ("uncache", lifetime.PROCESS_UID)))
        with lifetime.LEDGER.lock:
            self._idle_staging.clear()    # not to be lent again: they go when released
        retired = []
        for pools in list(self._heap.values()) + list(self._staging.values()):
            if pools is None:
                continue
            devices.use(pools.ordinal)
            pools.roll(self.roll_min_idle)
            retired += pools.reap()
        self._post_retired(retired)
        return retired

    def _reap_old(self, ordinal=None):
        """Destroy rolled heap and staging generations that drained since the last trim.

        A peer's cached import can outlive ``empty_cache``: its release (asked for by
        ``uncache``) arrives later, and the generation is reaped then.
        """
        for o, pools in list(self._heap.items()) + list(self._staging.items()):
            if pools is None or not pools.old or (ordinal is not None and o != ordinal):
                continue
            devices.use(pools.ordinal)
            self._post_retired(pools.reap())

    def _post_retired(self, retired):
        if retired:
            for link in list(self._links):
                st = link.state.get(self.name)
                if st is None or link.closed:
                    continue
                for key in retired:
                    if key in st.pools_sent:
                        st.pools_sent.discard(key)
                        link.post(("plane", self.name, ("retire", key)))

    def stats(self):
        with self._lock:
            owned = sum(1 for r in lifetime.LEDGER.records() if r.owned and r.key[0] == self.name)
            remote = sum(1 for r in lifetime.LEDGER.records() if not r.owned and r.key[0] == self.name)
            return {"owned_blocks": owned, "remote_blocks": remote, **self.imports.stats(),
                    "import_cache": self.import_cache.stats(),
                    "staging_recycled": self.recycled,
                    "staging_idle": sum(len(b) for v in self._idle_staging.values() for b in v.values()),
                    "heap_generations": {o: (1 + len(p.old)) for o, p in self._heap.items() if p},
                    "staging_generations": {o: (1 + len(p.old)) for o, p in self._staging.items()},
                    "events": {o: len(r) for o, r in self._rings.items()}}


PLANE = CudaPlane()
