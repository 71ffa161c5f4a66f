"""The CUDA plane's per-GPU state in this process, shared by its sending and receiving sides.

Owns, per device ordinal: what this process can do there (:meth:`LocalGpus.caps`,
found by doing it once), our exportable pools (the worker's ``heap`` that torch
allocates from, and the ``staging`` pool we copy into), our interprocess event ring,
and the trimming of those pools by generations (roll, reap).  Also the peers' events
we opened (:class:`~.events.OpenedEvents`), how device copies are enqueued (one batch
call where the driver has it), and the torch module once a tensor needed it.

``_lock`` guards probing and heap creation only (each happens once per device; heap
creation probes under it, hence re-entrant); the dicts are read without it (a dict
read is atomic, and an entry, once made, stays).  Nothing of ours is locked or posted
under it: it may be taken under the ledger's lock or alone.
"""
from __future__ import annotations

import logging
import threading

from . import devices
from . import driver as D
from .events import EventRing, OpenedEvents
from .layout import ITEMSIZE
from .paths import Capabilities
from .pools import Pools
from .vmm import VmmBlock

__all__ = ["LocalGpus"]

log = logging.getLogger("comfy_env.cuda")


class LocalGpus:
    def __init__(self, heap_policy, warn_once, parent_heap="torch"):
        self._lock = threading.RLock()
        self.role = "parent"
        self.heap_policy = heap_policy      # a worker's (COMFY_ENV_CUDA_HEAP)
        self.parent_heap = parent_heap      # the parent's (COMFY_ENV_CUDA_PARENT_HEAP)
        self._warn_once = warn_once
        self.torch = None
        self.dtypes = None            # torch dtype -> name
        self.batch_copies = True      # cuMemcpyBatchAsync works here (until it fails once)
        self.probed = {}              # ordinal -> Capabilities
        self.heap = {}                # ordinal -> Pools (worker, cudaMallocAsync, policy pool) or None
        self.staging = {}             # ordinal -> Pools
        self.rings = {}               # ordinal -> EventRing
        self.events = OpenedEvents()  # peers' events we opened
        self._raw_stream = None       # (torch, its _cuda_getCurrentRawStream) once it agreed

    def t(self):
        """The torch module (imported on first use: only a tensor brings us here)."""
        if self.torch is None:
            import torch
            self.dtypes = {getattr(torch, n): n for n in ITEMSIZE if hasattr(torch, n)}
            self.torch = torch
        return self.torch

    def current_stream(self, ordinal):
        """torch's current stream on ``ordinal``, as the raw ``CUstream`` driver calls take.

        One C call where this torch has it: ``current_stream(i).cuda_stream`` checks the
        device argument and builds a Stream object first, which a message paid once per
        GPU on each side."""
        torch = self.torch
        raw = self._raw_stream
        if raw is not None and raw[0] is torch:
            return raw[1](ordinal)
        stream = torch.cuda.current_stream(ordinal).cuda_stream     # initialises torch's CUDA
        fn = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        if fn is not None and fn(ordinal) == stream:
            self._raw_stream = (torch, fn)
        return stream

    # -- probing -------------------------------------------------------------------
    def caps(self, ordinal) -> Capabilities:
        """What this process can do on ``ordinal``, found by doing it (once)."""
        c = self.probed.get(ordinal)
        if c is None:
            with self._lock:
                c = self.probed.get(ordinal)
                if c is None:
                    c = self.probed[ordinal] = self._probe(ordinal)
        return c

    def _probe(self, ordinal):
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
            self.staging[ordinal] = staging
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
            self.rings[ordinal] = ring
            events = True
        except Exception as exc:
            reasons["events"] = str(exc)
        return Capabilities(driver=True, pools=pools, vmm=vmm, events=events, reasons=reasons)

    def wants_heap(self) -> bool:
        """Whether this process's policy asks for an export pool as torch's current pool:
        a worker under ``COMFY_ENV_CUDA_HEAP=pool``, the parent under
        ``COMFY_ENV_CUDA_PARENT_HEAP=pool``."""
        if self.role == "worker":
            return self.heap_policy == "pool"
        return self.parent_heap == "pool"

    def ensure_heap(self, ordinal):
        """Make an export pool ``ordinal``'s current pool (torch allocates there) where
        :meth:`wants_heap` and torch runs ``cudaMallocAsync``; the heap, or None."""
        if ordinal in self.heap or not self.wants_heap():
            return self.heap.get(ordinal)
        torch = self.t()
        if torch.cuda.get_allocator_backend() != "cudaMallocAsync":
            return None           # the native allocator ignores the device's pool
        failed = None
        with self._lock:
            if ordinal not in self.heap and self.caps(ordinal).pools:
                try:
                    self.heap[ordinal] = Pools(ordinal, "heap")
                except D.CudaError as exc:
                    failed = exc
                    self.heap[ordinal] = None
        if failed is not None:
            self._warn_once(("heap", ordinal), f"no zero-copy export pool on GPU {ordinal}: {failed}")
        return self.heap.get(ordinal)

    # -- device copies -------------------------------------------------------------
    def copy(self, ordinal, stream, dsts, srcs, sizes):
        """Device copies of one frame on one stream: one batch call where the driver has
        it (a copy call costs ~8 µs of CPU on the H100 host), else one call each."""
        devices.use(ordinal)
        if len(dsts) > 1 and self.batch_copies:
            try:
                D.copy_batch(dsts, srcs, sizes, stream, ordinal)
                return
            except D.CudaError as exc:
                # Copies it did enqueue are enqueued again below: the same bytes.
                self.batch_copies = False
                log.warning("comfy_env: batched CUDA copies unavailable (%s); copying one by one", exc)
        for dst, src, n in zip(dsts, srcs, sizes):
            D.call("cuMemcpyDtoDAsync_v2", dst, src, n, stream, detail="into the staging pool")

    # -- memory ----------------------------------------------------------------------
    def _all_pools(self):
        return list(self.heap.items()) + list(self.staging.items())

    def roll_and_reap(self, min_idle):
        """Trim every pool, roll each still holding more than ``min_idle`` idle bytes (memory
        peers imported) to a new generation, destroy drained old ones; returns the retired
        pool keys (peers must be told).

        The parent's heap rolls only when nothing in it is in use: its long-lived tensors
        (a ComfyUI parent's models) would pin the old generation, idle bytes included,
        while the new one draws fresh memory for the same work; kept current, the pool
        hands its idle bytes to the parent's next allocations instead."""
        retired = []
        for _o, pools in self._all_pools():
            if pools is None:
                continue
            devices.use(pools.ordinal)
            pools.trim()
            pools.roll(min_idle, only_unused=(pools.kind == "heap" and self.role != "worker"))
            retired += pools.reap()
        return retired

    def reap_old(self, on_retired, ordinal=None):
        """Destroy rolled generations (of ``ordinal``, or every device) that drained since
        the last trim; ``on_retired(keys)`` after each pool kind's (peers must be told,
        even if a later destroy fails)."""
        for o, pools in self._all_pools():
            if pools is None or not pools.old or (ordinal is not None and o != ordinal):
                continue
            devices.use(pools.ordinal)
            on_retired(pools.reap())

    def heap_bytes(self, ordinal):
        """``(used, reserved, used peak, reserved peak)`` bytes of our heap pools on
        ``ordinal`` (every live generation), or None without a heap there."""
        pools = self.heap.get(ordinal)
        if pools is None:
            return None
        return pools.bytes_held()

    def stats(self):
        return {"heap_generations": {o: (1 + len(p.old)) for o, p in self.heap.items() if p},
                "staging_generations": {o: (1 + len(p.old)) for o, p in self.staging.items()},
                "events": {o: len(r) for o, r in self.rings.items()}}
