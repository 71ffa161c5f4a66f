"""Exportable CUDA memory pools: ours (heap and staging), and the ones we import.

Exporting side
--------------
A :class:`Generation` is one pool created with the POSIX-fd handle type.  Its fd is
exported at creation, because ``cuMemPoolExportPointer`` fails with INVALID_VALUE
until the pool itself has been exported.  The fd crosses to each peer once.

An exportable pool gives freed memory back on ``cuMemPoolTrimTo`` (:meth:`Pools.trim`)
like any pool, except memory a peer imported a pointer of: that stays in the pool after
every free (free for the pool's own reuse) until ``cuMemPoolDestroy``, even once the
peer freed its import (H100, driver 580: ``benchmarks/probe_pool_trim.py``).  So what
trimming leaves is reclaimed by *generations*: :meth:`Pools.roll` makes a fresh pool
current, the old one receives no new allocations, and :meth:`Pools.reap` destroys it
once nothing in it is used any more (the ledger guarantees importers freed first),
telling peers to drop their import of it.

* ``heap`` pools are made the device's current pool, so torch's ``cudaMallocAsync``
  backend allocates from them (a ``pool`` worker's, the parent's by default): the
  process's tensors are exportable as they stand.
* ``staging`` pools are not current: we copy into them (``cuMemAllocFromPoolAsync``)
  without touching the process's allocator.

Importing side
--------------
:class:`PoolImports` holds each peer pool we know (its fd, kept for forwarding to a
third process, and the imported handle, made lazily) and the pointers imported from
it.  One import per exported pointer, reference counted: importing the same pointer
twice yields aliases whose first free unmaps both (NVIDIA bug 5570902).
"""
from __future__ import annotations

import ctypes as C
import itertools
import os
import threading

from . import devices
from . import driver as D
from .. import lifetime

__all__ = ["Generation", "Pools", "PoolImports", "ImportedPool", "ReadFences"]

_serial = itertools.count(1)


def _props(ordinal):
    p = D.MemPoolProps()
    p.allocType = D.MEM_ALLOCATION_PINNED
    p.handleTypes = D.HANDLE_POSIX_FD
    p.location = D.MemLocation(D.MEM_LOCATION_DEVICE, ordinal)
    return p


class Generation:
    """One exportable pool of ours.  ``key`` = (process uid, serial) names it to peers."""

    def __init__(self, ordinal, kind):
        devices.use(ordinal)
        self.ordinal = ordinal
        self.kind = kind
        self.serial = next(_serial)
        self.key = (lifetime.PROCESS_UID, self.serial)
        self.destroyed = False
        h = C.c_void_p()
        D.call("cuMemPoolCreate", C.byref(h), C.byref(_props(ordinal)), detail=f"{kind} pool, device {ordinal}")
        self.handle = h.value
        try:
            # Freed blocks stay in the pool for reuse until a trim (empty_cache):
            # re-mapping them per call would cost time.
            v = C.c_uint64(2 ** 64 - 1)
            D.call("cuMemPoolSetAttribute", self.handle, D.MEMPOOL_ATTR_RELEASE_THRESHOLD, C.byref(v))
            fd = C.c_int(-1)
            D.call("cuMemPoolExportToShareableHandle", C.byref(fd), self.handle, D.HANDLE_POSIX_FD, 0)
            self.fd = fd.value
        except BaseException:
            D.try_call("cuMemPoolDestroy", self.handle)
            raise

    def used(self) -> int:
        return D.pool_attribute(self.handle, D.MEMPOOL_ATTR_USED_MEM_CURRENT)

    def reserved(self) -> int:
        return D.pool_attribute(self.handle, D.MEMPOOL_ATTR_RESERVED_MEM_CURRENT)

    def alloc(self, nbytes, stream) -> int:
        ptr = C.c_uint64()
        D.call("cuMemAllocFromPoolAsync", C.byref(ptr), max(1, nbytes), self.handle, stream,
               detail=f"{nbytes} bytes from the {self.kind} pool")
        return ptr.value

    def trim(self) -> bool:
        """Give the device back this pool's free memory that no peer ever imported.
        Best effort (False if the driver refused): what stays is reclaimed by generations."""
        devices.use(self.ordinal)
        return D.try_call("cuMemPoolTrimTo", self.handle, 0) == D.CUDA_SUCCESS

    def export_pointer(self, ptr) -> bytes:
        ed = D.PoolPtrExportData()
        D.call("cuMemPoolExportPointer", C.byref(ed), ptr)
        return bytes(ed)

    def destroy(self):
        if self.destroyed:
            return
        self.destroyed = True
        devices.use(self.ordinal)
        D.call("cuMemPoolDestroy", self.handle, detail=f"{self.kind} pool {self.key}")
        os.close(self.fd)


class Pools:
    """The generations of one kind (``heap`` or ``staging``) on one device."""

    def __init__(self, ordinal, kind):
        if kind not in ("heap", "staging"):
            raise ValueError(f"pool kind must be 'heap' or 'staging', not {kind!r}")
        self.ordinal = ordinal
        self.kind = kind
        self._lock = threading.Lock()
        self.current = None
        self.old = []                         # rolled generations, drained then destroyed
        self._roll()

    def _roll(self):
        gen = Generation(self.ordinal, self.kind)
        if self.kind == "heap":
            try:
                D.call("cuDeviceSetMemPool", self.ordinal, gen.handle)
            except BaseException:
                gen.destroy()
                raise
        if self.current is not None:
            self.old.append(self.current)
        self.current = gen

    def owner_of(self, pool_handle):
        """The live generation with this pool handle, or None."""
        cur = self.current
        if cur is not None and cur.handle == pool_handle:
            return cur
        for g in self.old:
            if g.handle == pool_handle:
                return g
        return None

    def idle_bytes(self) -> int:
        """Reserved but unused bytes in the current generation: what a roll could free."""
        cur = self.current
        return cur.reserved() - cur.used()

    def trim(self):
        """:meth:`Generation.trim` every live generation: what stays idle after it is
        memory peers imported, which only a roll (and the reap after it) gives back."""
        with self._lock:
            for g in self.old + [self.current]:
                if g is not None and not g.destroyed:
                    g.trim()

    def roll(self, min_idle=0, only_unused=False) -> bool:
        """Start a new generation if the current one holds more than ``min_idle`` idle
        bytes (and, with ``only_unused``, nothing in it is in use: it is then destroyed
        at the next :meth:`reap`)."""
        with self._lock:
            if self.idle_bytes() <= min_idle or (only_unused and self.current.used()):
                return False
            self._roll()
            return True

    def bytes_held(self):
        """``(used, reserved, used peak, reserved peak)`` over every live generation."""
        with self._lock:
            gens = [g for g in self.old + [self.current] if g is not None and not g.destroyed]
            return tuple(sum(D.pool_attribute(g.handle, a) for g in gens)
                         for a in (D.MEMPOOL_ATTR_USED_MEM_CURRENT, D.MEMPOOL_ATTR_RESERVED_MEM_CURRENT,
                                   D.MEMPOOL_ATTR_USED_MEM_HIGH, D.MEMPOOL_ATTR_RESERVED_MEM_HIGH))

    def reap(self):
        """Destroy old generations nobody uses any more; returns their keys (tell peers)."""
        done = []
        with self._lock:
            keep = []
            for g in self.old:
                devices.use(self.ordinal)
                if g.used() == 0:
                    g.destroy()
                    done.append(g.key)
                else:
                    keep.append(g)
            self.old = keep
        return done

    def close(self):
        """Destroy every generation (process teardown; nothing may be in use)."""
        with self._lock:
            if self.kind == "heap":
                dflt = C.c_void_p()
                if D.try_call("cuDeviceGetDefaultMemPool", C.byref(dflt), self.ordinal) == 0:
                    D.try_call("cuDeviceSetMemPool", self.ordinal, dflt)
            for g in self.old + [self.current]:
                if g is not None and not g.destroyed:
                    try:
                        g.destroy()
                    except D.CudaError:
                        pass
            self.old, self.current = [], None


class ReadFences:
    """Per GPU, a stream of ours made to wait for the reads enqueued so far on a reader's
    stream: what imports are unmapped on (``PoolImports``) or synchronised on before a
    mapping is closed (``ipchandles.IpcImports``), so that their releases leave only
    after our reads completed.

    Why not the read stream itself: synchronising it waits for everything the user
    enqueued there too (on the H100, a batch's synchronise took 3.2 ms on the read
    stream, 0.16 ms on a stream of our own), and the user's later work on that stream
    would queue behind our unmaps.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._streams = {}      # ordinal -> (stream, event)

    def stream(self, ordinal, read_stream, fenced):
        """Our stream on ``ordinal`` (its context current), made to wait for the reads
        enqueued so far on ``read_stream`` unless ``(ordinal, read_stream)`` is in
        ``fenced`` (the caller's batch: one fence per read stream), which it joins."""
        u = self._streams.get(ordinal)
        if u is None:
            with self._lock:
                u = self._streams.get(ordinal)
                if u is None:
                    s, ev = C.c_void_p(), C.c_void_p()
                    D.call("cuStreamCreate", C.byref(s), D.STREAM_NON_BLOCKING)
                    try:
                        D.call("cuEventCreate", C.byref(ev), D.EVENT_DISABLE_TIMING)
                    except BaseException:
                        D.try_call("cuStreamDestroy_v2", s)
                        raise
                    u = self._streams[ordinal] = (s.value, ev.value)
        ours, event = u
        if (ordinal, read_stream) not in fenced:
            # The freed tensors are dead, so no read of them can be enqueued after this.
            with self._lock:                 # one recording of the shared event at a time
                D.call("cuEventRecord", event, read_stream)
                D.call("cuStreamWaitEvent", ours, event, 0)
            fenced.add((ordinal, read_stream))
        return ours


class ImportedPool:
    """A peer's pool: the fd (kept so we can forward it) and, once used, our import."""

    __slots__ = ("key", "fd", "uuid", "ordinal", "handle", "live", "retired", "pins")

    def __init__(self, key, fd, uuid):
        self.key = key
        self.fd = fd
        self.uuid = uuid        # resolved to our ordinal only when we import (a parent that
        self.ordinal = None     # merely forwards the fd needs no GPU work at all)
        self.handle = None
        self.live = 0           # pointers imported from it and not yet freed
        self.pins = 0           # records that name it (need its fd to forward)
        self.retired = False    # the owner destroyed it: drop once idle


class PoolImports:
    """Every peer pool this process knows, and the pointers it imported from them."""

    def __init__(self):
        self._lock = threading.RLock()
        self._pools = {}        # pool key -> ImportedPool
        self._ptrs = {}         # (pool key, export data) -> [ptr, refcount]
        # (pool key, export data) -> threading.Event: our free of that import was enqueued
        # and has not completed.  Importing the pointer again before it completes would
        # alias the dying mapping (the driver returns the same address, and the pending
        # free unmaps both), so an import waits for it.
        self._freeing = {}
        self._deferred = threading.local()   # this thread's frees awaiting finish()
        self.fences = ReadFences()   # our unmap stream per GPU, fenced after the reads
        self.made = 0           # pointers imported so far (tests, benchmarks)

    def register(self, key, fd, uuid):
        """A message brought the fd of pool ``key``; we own ``fd`` from here on."""
        with self._lock:
            p = self._pools.get(key)
            if p is None:
                self._pools[key] = ImportedPool(key, fd, uuid)
                return
        # A forwarded copy of a pool we already know: one import is enough.
        os.close(fd)

    def get(self, key):
        p = self._pools.get(key)
        if p is None:
            raise LookupError(
                f"CUDA pool {key} was never received: the message that carried its fd was lost "
                "or not decoded")
        return p

    def pin(self, key, n=1):
        with self._lock:
            self.get(key).pins += n

    def unpin(self, key):
        with self._lock:
            p = self._pools.get(key)
            if p is not None:
                p.pins -= 1
                self._maybe_drop(p)

    def _ensure_imported(self, p):
        if p.handle is None:
            p.ordinal = devices.ordinal_of(p.uuid)
            devices.use(p.ordinal)
            h = C.c_void_p()
            D.call("cuMemPoolImportFromShareableHandle", C.byref(h), C.c_void_p(p.fd),
                   D.HANDLE_POSIX_FD, 0, detail=f"pool {p.key}")
            try:
                descs, n = devices.access_for(p.ordinal)
                if n == 1 or D.try_call("cuMemPoolSetAccess", h, descs, n) != D.CUDA_SUCCESS:
                    # Peers refused (or none): the pool's own GPU is what must work.
                    descs, n = devices.access_for(p.ordinal, peers=False)
                    D.call("cuMemPoolSetAccess", h, descs, n, detail=f"pool {p.key}")
            except BaseException:
                D.try_call("cuMemPoolDestroy", h)
                raise
            p.handle = h.value
        return p.handle

    def import_pointer(self, key, export_data: bytes) -> int:
        """Map pointer ``export_data`` of pool ``key`` (once; later calls add a reference)."""
        k = (key, export_data)
        while True:
            with self._lock:
                slot = self._ptrs.get(k)
                if slot is not None:
                    slot[1] += 1
                    return slot[0]
                freeing = self._freeing.get(k)
                if freeing is None:
                    p = self.get(key)
                    handle = self._ensure_imported(p)
                    # The pool was imported in an earlier entry into the plane, which gave
                    # the caller its context back (devices.CALLER).
                    devices.use(p.ordinal)
                    ed = D.PoolPtrExportData()
                    C.memmove(C.byref(ed), export_data, 64)
                    ptr = C.c_uint64()
                    D.call("cuMemPoolImportPointer", C.byref(ptr), handle, C.byref(ed), detail=f"pool {key}")
                    self._ptrs[k] = [ptr.value, 1]
                    p.live += 1
                    self.made += 1
                    return ptr.value
            if any(d[0] == k for d in getattr(self._deferred, "pending", ())):
                self.finish()           # our own deferred free: complete it first
            else:
                freeing.wait()          # another thread's free, about to complete

    def release_pointer(self, key, export_data: bytes, stream, defer=False) -> bool:
        """Drop one reference; the last one frees the import and waits for the free.

        The driver calls run outside our lock (an import on another thread must not
        wait for this free's synchronise).  ``defer``: do not wait here; the caller
        calls :meth:`finish` (same thread) once it has started a batch of frees, which
        then costs one synchronise per stream.  Returns True when a free was deferred.
        """
        k = (key, export_data)
        with self._lock:
            slot = self._ptrs.get(k)
            if slot is None:
                raise LookupError(f"pointer of pool {key} released more often than imported")
            slot[1] -= 1
            if slot[1] > 0:
                return False
            del self._ptrs[k]
            p = self._pools[key]
            done = self._freeing[k] = threading.Event()
        try:
            devices.use(p.ordinal)
            # A deferred free joins this thread's batch (one fence per read stream); an
            # immediate one fences on its own.
            unmap = self._unmap_stream(p.ordinal, stream, self._batch_fences() if defer else set())
            # Ordered after our reads (the fence above); the exporter may free as soon as
            # our release reaches it, so the free must have *completed* first.
            D.call("cuMemFreeAsync", slot[0], unmap, detail=f"imported pointer of pool {key}")
        except BaseException:
            self._freed(k, p, done)
            raise
        if defer:
            self._deferred.pending.append((k, p, done, p.ordinal, unmap))
            return True
        try:
            D.call("cuStreamSynchronize", unmap)
        finally:
            self._freed(k, p, done)
        return False

    def _batch_fences(self):
        """The read streams this thread's open batch already fenced; a new batch (nothing
        pending) starts with none: an older fence does not cover reads made since."""
        d = self._deferred
        if not getattr(d, "pending", None):
            d.pending = []
            d.fenced = set()
        return d.fenced

    def _unmap_stream(self, ordinal, read_stream, fenced):
        """The stream that frees (unmaps) our imports on ``ordinal``, fenced after the
        reads enqueued so far on ``read_stream`` (see :class:`ReadFences`)."""
        return self.fences.stream(ordinal, read_stream, fenced)

    def finish(self):
        """Wait for this thread's deferred frees: one synchronise per GPU."""
        pending = getattr(self._deferred, "pending", None)
        if not pending:
            return
        self._deferred.pending = []
        synced = set()
        try:
            for _k, _p, _done, ordinal, unmap in pending:
                if (ordinal, unmap) not in synced:
                    synced.add((ordinal, unmap))
                    devices.use(ordinal)
                    D.call("cuStreamSynchronize", unmap)
        finally:
            for k, p, done, _ordinal, _unmap in pending:
                self._freed(k, p, done)

    def _freed(self, k, p, done):
        with self._lock:
            if self._freeing.get(k) is done:
                del self._freeing[k]
            p.live -= 1
            self._maybe_drop(p)
        done.set()

    def retire(self, key):
        """The owner destroyed pool ``key``: close ours as soon as nothing uses it."""
        with self._lock:
            p = self._pools.get(key)
            if p is not None:
                p.retired = True
                self._maybe_drop(p)

    def forget_owner(self, owner_uid):
        """The owner process is gone: retire all its pools (tensors we hold stay valid)."""
        with self._lock:
            for key in [k for k in self._pools if k[0] == owner_uid]:
                self.retire(key)

    def _maybe_drop(self, p):
        if p.retired and p.live <= 0 and p.pins <= 0:
            del self._pools[p.key]
            if p.handle is not None:
                devices.use(p.ordinal)
                D.try_call("cuMemPoolDestroy", p.handle)
            os.close(p.fd)

    def stats(self):
        with self._lock:
            return {"pools": len(self._pools), "imported_pointers": len(self._ptrs), "imports_made": self.made,
                    "pool_imports": sum(1 for p in self._pools.values() if p.handle is not None)}
