"""The CUDA plane's sending side: our blocks, the route of each tensor, and its lend.

Owns: the blocks this process exports (``blocks.OwnedPool`` / ``OwnedStaging`` /
``OwnedVmm`` / ``OwnedIpc``, reached through ledger records), the index from a pool
pointer to its record (``_by_base``, ``_by_ptr``: one key per allocation, so a peer
imports each pointer once), the index from a storage lent by legacy IPC handle to its
record and the handles of the allocations under them (``_ipc_by_storage``,
``_ipc_allocs``), whether this process can take such handles per GPU (``ipc_export``),
the staging blocks peers reported idle (``_idle_staging``: the owner side of
recycling), the storages sent before (``_seen_small``), and the route counts.

Data flow of one tensor::

    encode(t)
      route = pool | ipc | staging | vmm | cpu | empty   (paths.choose, or its first answers inline)
      pool:    lend t's own allocation (zero copy; the record keeps the storage)
      ipc:     lend t's storage by its allocation's legacy IPC handle (zero copy; the
               record keeps the storage; native allocator only)
      staging: copy into our staging pool, a recycled block when a peer reported one idle
      vmm:     copy into a fresh VMM block
      reserve the frame's event on t's stream; copies and the event's record are enqueued
      when the frame is sent (_finish_frame)
    ...the peer releases (ledger) -> free_owned: drop t / free the staging block / unmap

Locks, in the order they are taken (docs/architecture.md, "Locks"):

1. the ledger's lock (``lifetime.LEDGER.lock``): a check that a record still lives and
   the lend that follows are made under it, so that a release on another thread cannot
   retire the record between them;
2. ``Sender._lock`` guards this side's dicts (``_by_base``, ``_by_ptr``,
   ``_idle_staging``, ``_ipc_by_storage``, ``_ipc_allocs``) and the staging blocks'
   ``busy`` / ``seq`` / ``ready``.  Taken
   inside the ledger's lock or alone, never the other way round, and held only for
   that bookkeeping: no driver call, no post, no call into the ledger under it.
   Every change of those dicts is made under it; a read of one key of ``_by_base`` or
   ``_by_ptr`` is not (atomic under the GIL), because whoever reads a record there
   checks it against the ledger before using it.  ``_seen_small`` is a hint (either
   route is correct) and is not locked, as before the split.
"""
from __future__ import annotations

import collections
import functools
import itertools
import logging
import sys
import threading
import weakref
from typing import NamedTuple

from .. import lifetime
from ..codec import EncodeError
from . import devices
from . import driver as D
from .blocks import OwnedIpc, OwnedPool, OwnedStaging, OwnedVmm
from .layout import CudaTensorDesc, VERSION, ITEMSIZE, ipc_meta, pack_fields, pool_meta, span_bytes, vmm_meta
from .paths import FRESH_COPY_WHY, IPC_WHY, NATIVE_COPY_WHY, POOL_WHY, SMALL_COPY_WHY, Capabilities, choose
from .vmm import VmmBlock

__all__ = ["Sender"]

log = logging.getLogger("comfy_env.cuda")


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
    native_copy_ok: bool      # no export heap: a small first-seen storage goes by one copy without
                              # asking _lend_ipc() and choose()


class _EncodeContext:
    """What encoding one frame computes once, not once per tensor."""
    __slots__ = ("st", "hooked", "dev", "events", "settled", "ready_waited", "staged", "copies")

    def __init__(self, st):
        self.st = st
        self.hooked = False     # _finish_frame is registered with the frame
        self.dev = {}           # ordinal -> _EncodeDevice
        self.events = {}        # (ordinal, stream) -> the frame's event there (reserved, recorded at send)
        self.settled = {}       # (ordinal, stream) -> nothing was queued there when the frame first asked
        self.ready_waited = {}  # id -> a peer's "idle" event already waited on (kept alive: ids stay unique)
        self.staged = {}        # storage address -> (storage, encoder, ref, seq): staged once per part
        self.copies = {}        # (ordinal, stream) -> ([dst], [src], [nbytes], [source kept alive])


class Sender:
    """The sending side of the CUDA plane (see the module docstring)."""

    def __init__(self, plane, local, peers, warn_once, *, limit, force_cpu, small_copy, fresh_copy, ipc_min,
                 ipc_mapped):
        self.plane = plane            # the codec's plane: refs name it, records call its on_zero
        self.name = plane.name
        self.local = local            # LocalGpus
        self.peers = peers            # Peers
        self._warn_once = warn_once
        self.limit = limit
        # Diagnostics and benchmarks only: send every CUDA tensor through host memory.
        self.force_cpu = force_cpu
        self.small_copy = small_copy
        self.fresh_copy = fresh_copy
        self.ipc_min = ipc_min        # storages above this many bytes may go by legacy IPC handle when new
        self._ipc_mapped = ipc_mapped # ptr -> True inside a peer's allocation we opened (never re-exported)
        self._lock = threading.Lock()
        self._seen_small = {}         # storage address -> weakref to the storage last sent from it
        self._by_base = {}            # allocation base -> owned "pool" record (one key per allocation)
        self._by_ptr = {}             # data pointer -> live owned "pool" record (skips two driver calls)
        self._idle_staging = {}       # ordinal -> {block size -> [owned staging records a peer reported idle]}
        self._ipc_by_storage = {}     # storage address -> live owned "ipc" record
        self._ipc_allocs = {}         # allocation base -> [handle, live "ipc" records on it]
        # ordinal -> True once cuIpcGetMemHandle worked there; the error text when the first
        # try failed (this process's allocator cannot: cudaMallocAsync, expandable segments).
        self.ipc_export = {}
        # Whether torch here allocates from pools (cudaMallocAsync), whose memory has no
        # legacy handle: small storages sent again then skip two driver calls saying so.
        self._async_torch = None
        self.recycled = 0             # staging lends that reused a block a peer still had mapped
        self._serial = itertools.count(1)
        self.routes = collections.Counter()   # route -> tensors sent (doctor, tests)
        self.last_reasons = {}        # route -> why it was last chosen
        # Wrapped once (functools.wraps per frame cost more than the rest of a small send).
        self._finish_frame_kept = devices.keeps_caller_context(self._finish_frame)

    # -- encode ----------------------------------------------------------------------
    def _encode_context(self, enc):
        state = enc.fb.plane_state
        ctx = state.get(self.name)
        if ctx is None:
            self.local.t()
            self.plane.housekeeping()
            ctx = state[self.name] = _EncodeContext(self.peers.of(enc.link))
        return ctx

    def _finish_later(self, ctx, enc):
        """Have :meth:`_finish_frame` run before the frame is sent (or when it is aborted).
        Asked before a frame first reserves an event or stages a copy: a frame of
        tensors lent in place from settled streams has nothing to finish."""
        if not ctx.hooked:
            ctx.hooked = True
            enc.fb.before_send(functools.partial(self._finish_frame_kept, ctx))

    def _finish_frame(self, ctx):
        """The frame is about to be sent (or aborted): enqueue its staging copies, then
        record its reserved events after them."""
        ctx.hooked = False
        copies, ctx.copies = ctx.copies, {}
        events, ctx.events = ctx.events, {}
        # What pinned sources during encoding goes now: ``staged`` holds the encoders,
        # which hold this frame, which holds ``ctx`` (a cycle only the garbage collector
        # would break, keeping the user's tensors, and a worker's heap generation, alive).
        ctx.staged.clear()
        ctx.ready_waited.clear()
        ctx.settled.clear()
        try:
            for (ordinal, stream), (dsts, srcs, sizes, _keep) in copies.items():
                self.local.copy(ordinal, stream, dsts, srcs, sizes)
        finally:
            for (ordinal, stream), (_uid, _o, slot, _h) in events.items():
                self.local.rings[ordinal].record_reserved(slot, stream)

    def _encode_device(self, ctx, ordinal):
        """The :class:`_EncodeDevice` of ``ordinal``, the first time a frame meets it.
        ``pool_ok``: a tensor in our export pool goes zero copy without asking
        :func:`choose`; ``copy_ok``: a small tensor first seen goes by one copy into the
        staging pool without asking it (what it would answer; the peer's verdict is read
        once per frame)."""
        caps = self.local.caps(ordinal)
        uuid = devices.uuid_of(ordinal)
        heap = stream = None
        if caps.driver:
            heap = self.local.ensure_heap(ordinal)
            stream = self.local.current_stream(ordinal)
        stage_ok = caps.driver and caps.pools and ctx.st.verdicts.ok("pool") is not False and not self.force_cpu
        pool_ok = heap is not None and stage_ok
        copy_ok = pool_ok and self.fresh_copy > 0
        d = ctx.dev[ordinal] = _EncodeDevice(caps, uuid, heap, stream, pool_ok, copy_ok,
                                             heap is None and stage_ok)
        return d

    def encode(self, obj, enc):
        if not obj.is_cuda:
            return None               # the CPU plane's
        ctx = self._encode_context(enc)
        torch = self.local.torch
        dtype = self.local.dtypes.get(obj.dtype)
        if dtype is None:
            raise EncodeError(f"CUDA tensors of dtype {obj.dtype} cannot be shared")
        ordinal = obj.get_device()
        d = ctx.dev.get(ordinal)
        if d is None:
            d = self._encode_device(ctx, ordinal)
        # Each entry into the plane gives the caller its context back on the way out
        # (devices.CALLER): each driver call below makes ours current first.  A tensor
        # sent before, or copied into a recycled block, makes none while encoded.
        caps, uuid, heap, stream, pool_ok, copy_ok, native_copy_ok = d
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
                    devices.use(ordinal)
                    base, alloc = D.address_range(ptr)
                    gen = heap.owner_of(D.pointer_pool(base))
                    in_pool = gen is not None
        elif nbytes and native_copy_ok:
            # No export heap (torch's native allocator, the default worker): a storage of at
            # most ipc_min not lent now and not sent before is staged.  That is what
            # _lend_ipc() and choose() answer for it; asked here it costs no ledger lock
            # and no second look at the storage (a call's new outputs are this case).
            storage = obj.untyped_storage()
            snbytes = storage.nbytes()
            if snbytes <= self.ipc_min and snbytes <= self.limit:
                sptr = storage.data_ptr()
                rec = self._ipc_by_storage.get(sptr)
                if rec is None or lifetime.LEDGER.get(rec.key) is not rec:
                    copy = sptr in ctx.staged or self._first_sight(storage, sptr)
        st = ctx.st
        if in_pool and pool_ok and alloc <= self.limit:
            route = "pool"            # choose()'s first answer, without the call
            self.last_reasons[route] = POOL_WHY
        elif copy:
            route = "staging"         # choose()'s answer for a first sight, without the call
            # Decided above by the export heap's branch, or (no heap) the native one.
            self.last_reasons[route] = (NATIVE_COPY_WHY if heap is None else
                                        SMALL_COPY_WHY if snbytes <= self.small_copy else FRESH_COPY_WHY)
        else:
            ipc_ref = None
            if (nbytes and not in_pool and caps.driver and not self.force_cpu
                    and st.verdicts.ok("ipc") is not False and self.ipc_export.get(ordinal, True) is True):
                # Zero copy by legacy IPC handle where this storage's allocation has one.
                if storage is None:
                    storage = obj.untyped_storage()
                ipc_ref = self._lend_ipc(ctx, enc, obj, storage, ordinal, uuid)
            if ipc_ref is not None:
                route = "ipc"
                st.ipc_lent = True    # it may keep our allocations mapped: trim() tells it
                self.last_reasons[route] = IPC_WHY
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
        if route == "ipc":
            ref, offset = ipc_ref
        elif route == "pool":
            ref = self._lend_pool_block(enc, st, obj, gen, base, alloc, ordinal, uuid, ptr)
            offset = ptr - base
        elif route == "staging":
            self._finish_later(ctx, enc)
            ref, seq, offset = self._stage(ctx, enc, obj, ptr or obj.data_ptr(), nbytes, ordinal, uuid, stream,
                                           storage, snbytes)
        else:
            ref = self._lend_vmm(enc, obj, nbytes, ordinal, uuid, stream)
            offset = 0
        event = None
        if caps.events:
            if (route != "pool" and route != "ipc") or not self._settled(ctx, ordinal, stream):
                self._finish_later(ctx, enc)
                event = self._event_for(ctx, ordinal, stream)
        else:
            # No interprocess events: the receiver must not read early, so wait here.
            devices.use(ordinal)
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
            slot, handle = self.local.rings[ordinal].reserve()
            event = ctx.events[key] = (lifetime.PROCESS_UID, ordinal, slot, handle)
        return event

    def _settled(self, ctx, ordinal, stream):
        """Whether nothing is queued on ``stream`` any more, asked once per frame: then a
        tensor lent in place (pool, ipc) needs no event, its bytes are written already.

        The reserve, the record and the receiver's query of an event cost three driver
        calls and two context checks a frame, against one ``cuStreamQuery`` here; a
        tensor produced a while ago (a weight, a latent the caller kept, a cached
        output) is the common case.  Copies (staging, vmm) are queued on the stream
        by the send itself, so theirs always get the event.  The answer covers what
        ``stream`` itself ordered, as the event did for torch's streams (non-blocking:
        the legacy stream never waited for them); "Stream order" in docs/cuda.md says
        what the caller must order on the current stream either way.
        """
        key = (ordinal, stream)
        done = ctx.settled.get(key)
        if done is None:
            devices.use(ordinal)
            done = ctx.settled[key] = D.stream_done(stream)
        return done

    def _first_sight(self, storage, ptr):
        """Whether ``storage`` (not lent now) is one we have not sent before.

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

    def _stage(self, ctx, enc, obj, ptr, nbytes, ordinal, uuid, stream, storage=None, snbytes=0):
        """Copy ``obj`` into a staging block: ``(ref, lend seq, offset of the view in it)``.

        A storage of at most ``COMFY_ENV_CUDA_SMALL_COPY_MIB`` is staged whole, once per
        message part: views of it still share memory on the other side, as they do
        here, and a tensor met twice is copied once.  A bigger storage: only the bytes
        the view spans (a small slice of a huge tensor copies only the slice).
        """
        if storage is None:
            storage = obj.untyped_storage()
        if not snbytes:
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
            rec = self._by_base.get(base)     # a one-key read: checked against the ledger next
            if rec is None or lifetime.LEDGER.get(rec.key) is not rec:
                devices.use(ordinal)
                export = gen.export_pointer(base)
                meta = pool_meta(gen.key, export, uuid, alloc)
                key = (self.name, lifetime.PROCESS_UID, next(self._serial))
                # The record keeps the storage (the memory), not the tensor: the tensor's
                # death is then our signal that the peer's cached import pins memory we
                # could reuse (see _tensor_died).
                storage = obj.untyped_storage()
                res = OwnedPool(ordinal, base, meta, storage, gen, alloc)
                rec = lifetime.LEDGER.add_owned(key, res, self.plane.on_zero)
                with self._lock:
                    self._by_base[base] = rec
                try:
                    res.watch = weakref.ref(obj, functools.partial(self._tensor_died, key, storage))
                except TypeError:
                    pass              # no signal: the peer's idle-time bound still applies
            if self._by_ptr.get(ptr) is not rec:    # the usual case, a tensor sent before: no lock
                with self._lock:
                    if self._by_ptr.get(ptr) is not rec:
                        self._by_ptr[ptr] = rec
                        rec.resource.ptrs.append(ptr)
            return enc.add_ref(self.plane, rec, rec.resource.meta, self._pool_fd_for(st, gen))

    # -- ipc: a storage of torch's native allocator, by its allocation's legacy IPC handle --
    def _lend_ipc(self, ctx, enc, obj, storage, ordinal, uuid):
        """Lend ``storage`` (``obj``'s) by the legacy IPC handle of its allocation, zero copy:
        ``(ref, offset of the view in the storage)``, or None where this route does not
        apply (a small storage sent for the first time, memory of a pool or of a peer, an
        allocation above the import limit, a process whose allocator hands out no such
        memory).

        One record per storage (lent again while it lives: the peer maps it once), kept
        alive until every peer released it; storages of one allocation carry one handle
        (``_ipc_allocs``), which the peer opens once for all of them.  A small storage
        (at most ``ipc_min``) sent for the first time is copied instead (one copy into a
        block the peer keeps mapped costs less than a record, an open and a release);
        sent again, it goes by handle too, and the peer keeps its record.
        """
        snbytes = storage.nbytes()
        if snbytes > self.limit or self.ipc_min >= self.limit:
            return None               # too big to map safely; the route turned off
        sptr = storage.data_ptr()
        ledger = lifetime.LEDGER
        with ledger.lock:             # check-and-lend: see _lend_pool_block
            rec = self._ipc_by_storage.get(sptr)
            if rec is None or ledger.get(rec.key) is not rec:
                if sptr in ctx.staged:
                    return None       # staged in this frame already: its views share the copy
                first = self._first_sight(storage, sptr)
                if snbytes <= self.ipc_min and (first or self._torch_is_async()):
                    return None
                rec = self._new_ipc_record(obj, storage, sptr, snbytes, ordinal, uuid, sent_before=not first)
                if rec is None:
                    return None
            return enc.add_ref(self.plane, rec, rec.resource.meta, None), obj.data_ptr() - sptr

    def _torch_is_async(self):
        v = self._async_torch
        if v is None:
            try:
                v = self.local.torch.cuda.get_allocator_backend() == "cudaMallocAsync"
            except Exception:
                v = False             # cannot say: the driver calls will
            self._async_torch = v
        return v

    def _new_ipc_record(self, obj, storage, sptr, snbytes, ordinal, uuid, sent_before):
        """A record lending ``storage`` by its allocation's handle, or None (see _lend_ipc).
        The caller holds the ledger's lock.

        A storage sent before (``_first_sight``) says so in its meta: the peer then keeps
        the record (its import cache) and the next sends cost no record, release or
        synchronise; we ask it to let go once our tensor died (``watch``).  A first sight
        (a call's new output) is released as soon as the peer is done with it, so torch's
        allocator hands the same memory to the next one (keeping it would pin a second
        copy's worth of memory for every new output).
        """
        if self._ipc_mapped(sptr):
            return None               # a peer's allocation we opened: not ours to lend
        devices.use(ordinal)
        base, alloc = D.address_range(sptr)
        if alloc > self.limit or D.pointer_pool(base) is not None:
            return None               # too big to map safely; a pool's memory (cudaMallocAsync, imports)
        entry = self._ipc_allocs.get(base)
        if entry is not None:
            handle = entry[0]         # the allocation is pinned by a live record: same handle
        else:
            try:
                handle = D.ipc_get_handle(base)
            except D.CudaError as exc:
                if ordinal not in self.ipc_export:
                    # The first try is the probe: this allocator's memory has no handle.
                    self.ipc_export[ordinal] = str(exc)
                    log.debug("comfy_env: no legacy CUDA IPC handles on GPU %d: %s", ordinal, exc)
                return None           # after a success: this one allocation is not cuMemAlloc's
            self.ipc_export[ordinal] = True
        meta = ipc_meta(lifetime.PROCESS_UID, handle, sptr - base, snbytes, alloc, uuid, sent_before)
        key = (self.name, lifetime.PROCESS_UID, next(self._serial))
        res = OwnedIpc(ordinal, sptr, base, meta, storage)
        rec = lifetime.LEDGER.add_owned(key, res, self.plane.on_zero)
        if sent_before:
            try:
                res.watch = weakref.ref(obj, functools.partial(self._tensor_died, key, storage))
            except TypeError:
                pass                  # no signal: the peer's idle-time bound still applies
        with self._lock:
            self._ipc_by_storage[sptr] = rec
            entry = self._ipc_allocs.get(base)
            if entry is None:
                self._ipc_allocs[base] = [handle, 1]
            else:
                entry[1] += 1
        return rec

    def _tensor_died(self, key, storage, _ref, _sys=sys):
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
            for link in self.peers.links():
                if link.lent.get(key) and not link.closed:
                    link.post(("plane", self.name, ("reclaim", [key])))
        except Exception:
            # A tensor that outlives this module (kept on a global until the interpreter
            # exits) dies while modules are cleared: their globals are None by then, and
            # the peers go with the process.  ``_sys`` is bound at definition.
            if not _sys.is_finalizing():
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
        if nbytes <= 512:
            size = 512                # powers of two from 512 B
        elif nbytes < self._STAGING_ROUND:
            size = 1 << (nbytes - 1).bit_length()
        else:
            size = -(-nbytes // self._STAGING_ROUND) * self._STAGING_ROUND
        # Never above the import limit, never below what it must hold (size >= nbytes here).
        return size if size <= self.limit else max(nbytes, self.limit)

    def _take_idle_staging(self, ordinal, nbytes, gen):
        """The smallest idle staging block of the current generation that fits ``nbytes``
        (at most twice its rounded size), marked busy; None if there is none.  The caller
        holds the ledger's lock (the block must still live when it is lent).

        Idle blocks are kept by size (sizes are rounded, see :meth:`_staging_size`, so
        there are few): the usual case, a block of the rounded size, is one dict lookup
        (a scan of every idle block took 12 µs per tensor with 32 blocks).
        """
        with self._lock:
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
        must drain, not be lent again): forgotten.  Caller holds both locks."""
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
        if not self.local.caps(ordinal).events:
            self.local.copy(ordinal, stream, [dst], [src], [nbytes])
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
        gen = self.local.staging[ordinal].current
        with lifetime.LEDGER.lock:
            rec = self._take_idle_staging(ordinal, nbytes, gen)
            if rec is not None:
                ref = enc.add_ref(self.plane, rec, rec.resource.meta, self._pool_fd_for(st, gen))
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
                    self.local.events.wait(ready, ordinal, stream)
            res.stream = stream
            self._enqueue_copy(ctx, ordinal, stream, res.ptr, src, nbytes, keep)
            return ref, res.seq
        size = self._staging_size(nbytes)
        devices.use(ordinal)
        ptr = gen.alloc(size, stream)
        try:
            export = gen.export_pointer(ptr)
        except BaseException:
            D.try_call("cuMemFreeAsync", ptr, stream)
            raise
        self._enqueue_copy(ctx, ordinal, stream, ptr, src, nbytes, keep)
        meta = pool_meta(gen.key, export, uuid, size)
        key = (self.name, lifetime.PROCESS_UID, next(self._serial))
        rec = lifetime.LEDGER.add_owned(key, OwnedStaging(ordinal, ptr, meta, gen, stream, size), self.plane.on_zero)
        return enc.add_ref(self.plane, rec, meta, self._pool_fd_for(st, gen)), 0

    def on_idle(self, link, blocks, event):
        """A peer finished reading our staging blocks ``[(key, lend seq)]`` and keeps them
        mapped; ``event`` (one for all of them) follows its last reads.

        The ledger's lock is not needed: a record dropped after the check below is taken
        out of ``_idle_staging`` by :meth:`free_owned` (which waits for our lock), and
        :meth:`_pop_idle` checks again that a block still lives before it is lent."""
        with self._lock:
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

    def _lend_vmm(self, enc, obj, nbytes, ordinal, uuid, stream):
        key = (self.name, lifetime.PROCESS_UID, next(self._serial))
        devices.use(ordinal)
        blk = VmmBlock.create(ordinal, nbytes)
        try:
            D.call("cuMemcpyDtoDAsync_v2", blk.ptr, obj.data_ptr(), nbytes, stream, detail="into a VMM block")
        except BaseException:
            blk.close()
            raise
        meta = vmm_meta(blk.size, uuid)
        rec = lifetime.LEDGER.add_owned(key, OwnedVmm(ordinal, blk, meta, stream), self.plane.on_zero)
        return enc.add_ref(self.plane, rec, meta, blk.fd)

    def _encode_cpu(self, obj, dtype, ordinal, uuid, why):
        self._warn_once(("cpu", why), f"comfy_env: CUDA tensors go through host memory (slow): {why}")
        host = obj.detach().cpu()
        return CudaTensorDesc(VERSION, "cpu", -1, dtype, tuple(obj.shape), tuple(obj.stride()), 0, uuid,
                              ordinal, None, obj.requires_grad, host)

    # -- blocks going back -------------------------------------------------------------
    def free_owned(self, record):
        res = record.resource
        if res.kind == "pool":
            with self._lock:
                if self._by_base.get(res.base) is record:
                    del self._by_base[res.base]
                for ptr in res.ptrs:
                    if self._by_ptr.get(ptr) is record:
                        del self._by_ptr[ptr]
            res.keep = None           # torch frees it, stream-ordered, when the user did too
            res.watch = None          # its callback holds the storage too
            self.reap_old(res.ordinal)
        elif res.kind == "ipc":
            with self._lock:
                if self._ipc_by_storage.get(res.ptr) is record:
                    del self._ipc_by_storage[res.ptr]
                entry = self._ipc_allocs.get(res.base)
                if entry is not None:
                    entry[1] -= 1
                    if entry[1] <= 0:
                        del self._ipc_allocs[res.base]
            # Every peer closed its mapping (or released after its reads): torch may reuse
            # the bytes, and free the allocation, once the user dropped the tensor too.
            res.keep = None
        elif res.kind == "staging":
            with self._lock:
                bucket = self._idle_staging.get(res.ordinal, {}).get(res.size)
                if bucket and record in bucket:
                    bucket.remove(record)
            devices.use(res.ordinal)
            # Every importer released it after its reads completed (that is what a
            # release means), so the free only needs ordering after our own copy.
            D.call("cuMemFreeAsync", res.ptr, res.stream)
            self.reap_old(res.ordinal)
        else:
            devices.use(res.ordinal)
            # The peer never read it if it released without decoding: our copy may be in flight.
            D.call("cuStreamSynchronize", res.stream)
            res.vmm.close()

    def reap_old(self, ordinal=None):
        """Destroy rolled heap and staging generations that drained since the last trim.

        A peer's cached import can outlive ``empty_cache``: its release (asked for by
        ``uncache``) arrives later, and the generation is reaped then.
        """
        self.local.reap_old(self.post_retired, ordinal)

    def post_retired(self, retired):
        if retired:
            for link in self.peers.links():
                st = link.state.get(self.name)
                if st is None or link.closed:
                    continue
                for key in retired:
                    if key in st.pools_sent:
                        st.pools_sent.discard(key)
                        link.post(("plane", self.name, ("retire", key)))

    def trim(self):
        """Our part of ``empty_cache``: peers may keep our heap and staging blocks imported
        after use (their import cache): ask them to let go; the blocks are freed as their
        releases arrive and the rolled generations destroyed then (:meth:`reap_old`).
        Idle staging blocks are not lent again: they go when released."""
        for link in self.peers.links():
            st = link.state.get(self.name)
            if st is not None and (st.pools_sent or st.ipc_lent) and not link.closed:
                link.post(("plane", self.name, ("uncache", lifetime.PROCESS_UID)))
        with self._lock:
            self._idle_staging.clear()

    def stats(self):
        with self._lock:
            idle = sum(len(b) for v in self._idle_staging.values() for b in v.values())
        return {"staging_recycled": self.recycled, "staging_idle": idle}
