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
import itertools
import logging
import os
import sys
import threading
import warnings
import weakref

from .. import lifetime
from ..codec import EncodeError, Plane
from . import devices
from . import driver as D
from .events import EventRing, OpenedEvents
from .importcache import ImportCache
from .layout import (CudaTensorDesc, VERSION, ITEMSIZE, pool_meta, span_bytes, validate,
                     validate_meta, vmm_meta)
from .paths import Capabilities, PeerVerdicts, choose, import_limit
from .pools import Pools, PoolImports
from .vmm import VmmBlock

__all__ = ["CudaPlane", "CudaTransferError", "CudaFallbackWarning", "PLANE"]

log = logging.getLogger("comfy_env.cuda")


class CudaTransferError(RuntimeError):
    """A CUDA tensor could not be received (the reason names the driver error)."""


class CudaFallbackWarning(RuntimeWarning):
    """CUDA tensors go through host memory (slow); the message says why."""


class _Owned:
    """A block we export.  ``keep`` holds what must stay alive until every peer released."""
    __slots__ = ("kind", "ordinal", "ptr", "keep", "gen", "stream", "vmm", "meta", "base")

    def __init__(self, kind, ordinal, ptr, meta, *, keep=None, gen=None, stream=None, vmm=None, base=None):
        self.kind, self.ordinal, self.ptr, self.meta = kind, ordinal, ptr, meta
        self.keep, self.gen, self.stream, self.vmm, self.base = keep, gen, stream, vmm, base


class _Remote:
    """A peer's block as we know it: imported only when something decodes it."""
    __slots__ = ("meta", "fd", "ptr", "vmm", "stream", "ordinal")

    def __init__(self, meta, fd):
        self.meta = meta
        self.fd = fd            # VMM blocks: their own fd (pools: the fd lives in PoolImports)
        self.ptr = None
        self.vmm = None
        self.stream = None
        self.ordinal = None


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

    def __init__(self, ptr, nbytes):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False),
                                         "version": 2, "strides": None}


class CudaPlane(Plane):
    name = "cuda"
    types = ("torch.Tensor",)

    def __init__(self):
        self._lock = threading.RLock()
        self.role = "parent"
        self.heap_policy = os.environ.get("COMFY_ENV_CUDA_HEAP", "pool")
        if self.heap_policy not in ("pool", "staging"):
            raise ValueError(f"COMFY_ENV_CUDA_HEAP must be 'pool' or 'staging', not {self.heap_policy!r}")
        self.limit = import_limit()
        # Diagnostics and benchmarks only: send every CUDA tensor through host memory.
        self.force_cpu = os.environ.get("COMFY_ENV_CUDA_FORCE_CPU") == "1"
        self.roll_min_idle = int(os.environ.get("COMFY_ENV_CUDA_ROLL_MIN_IDLE_MIB", "64")) << 20
        self._caps = {}               # ordinal -> Capabilities
        self._heap = {}               # ordinal -> Pools (worker, cudaMallocAsync, policy pool)
        self._staging = {}            # ordinal -> Pools
        self._rings = {}              # ordinal -> EventRing
        self._events = OpenedEvents()
        self.imports = PoolImports()
        self.import_cache = ImportCache(lifetime.LEDGER)   # pool imports kept after use
        self._by_base = {}            # allocation base -> owned "pool" record (one key per allocation)
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
    def encode(self, obj, enc):
        if obj.device.type != "cuda":
            return None               # the CPU plane's
        torch = self._t()
        dtype = self._dtypes.get(obj.dtype)
        if dtype is None:
            raise EncodeError(f"CUDA tensors of dtype {obj.dtype} cannot be shared")
        ordinal = obj.device.index
        link = enc.link
        st = self._peer(link)
        self._housekeeping()
        caps = self.caps(ordinal)
        uuid = devices.uuid_of(ordinal)
        if obj.layout != torch.strided or obj.is_quantized:
            self.routes["cpu"] += 1
            return self._encode_cpu(obj, dtype, ordinal, uuid, f"{obj.layout} tensors have no plain memory layout")
        itemsize = ITEMSIZE[dtype]
        shape = tuple(obj.shape)
        strides = tuple(obj.stride())
        nbytes = span_bytes(shape, strides, itemsize)
        in_pool, alloc, gen, base = False, 0, None, 0
        heap = self.ensure_heap(ordinal) if nbytes else None
        if heap is not None:
            devices.use(ordinal)
            base, alloc = D.address_range(obj.data_ptr())
            gen = heap.owner_of(D.pointer_pool(base))
            in_pool = gen is not None
        route, why = choose(caps, st.verdicts, nbytes=nbytes, in_export_pool=in_pool,
                            alloc_bytes=alloc, limit=self.limit)
        if self.force_cpu and route != "empty":
            route, why = "cpu", "COMFY_ENV_CUDA_FORCE_CPU=1"
        self.routes[route] += 1
        self.last_reasons[route] = why
        if route == "empty":
            return CudaTensorDesc(VERSION, "empty", -1, dtype, shape, strides, 0, uuid, ordinal, None,
                                  obj.requires_grad)
        if route == "cpu":
            return self._encode_cpu(obj, dtype, ordinal, uuid, why)
        devices.use(ordinal)
        stream = torch.cuda.current_stream(ordinal).cuda_stream
        if route == "pool":
            rec, ref = self._lend_pool_block(enc, st, obj, gen, base, alloc, ordinal, uuid)
            offset = obj.data_ptr() - base
        else:
            rec, ref = self._lend_copy(enc, st, route, obj, nbytes, ordinal, uuid, stream)
            offset = 0
        event = None
        if caps.events:
            event = self._event_for(enc, route, ordinal, stream)
        else:
            # No interprocess events: the receiver must not read early, so wait here.
            D.call("cuStreamSynchronize", stream)
        return CudaTensorDesc(VERSION, route, ref, dtype, shape, strides, offset, uuid, ordinal, event,
                              obj.requires_grad)

    def _event_for(self, enc, route, ordinal, stream):
        """The event the receiver waits on: one recording per stream and message.

        A zero-copy tensor needs only what was enqueued before the message began
        (the producer's kernels), so it shares the message's last recording on its
        stream; a copied one needs a recording after our copy.
        """
        try:
            recorded = enc._comfy_env_cuda_events
        except AttributeError:
            recorded = None
            try:
                recorded = enc._comfy_env_cuda_events = {}
            except AttributeError:         # an encoder without a __dict__: no sharing
                pass
        if route == "pool" and recorded is not None:
            event = recorded.get((ordinal, stream))
            if event is not None:
                return event
        slot, handle = self._rings[ordinal].record(stream)
        event = (lifetime.PROCESS_UID, ordinal, slot, handle)
        if recorded is not None:
            recorded[(ordinal, stream)] = event
        return event

    def _lend_pool_block(self, enc, st, obj, gen, base, alloc, ordinal, uuid):
        # Check-and-lend under the ledger's lock: a release on another thread must not
        # retire the record between our lookup and the lend (one key per allocation, so
        # the peer imports each pointer once).
        with lifetime.LEDGER.lock:
            rec = self._by_base.get(base)
            if rec is None or lifetime.LEDGER.get(rec.key) is not rec:
                export = gen.export_pointer(base)
                meta = pool_meta(gen.key, export, uuid, alloc)
                key = (self.name, lifetime.PROCESS_UID, next(self._serial))
                res = _Owned("pool", ordinal, base, meta, keep=obj, gen=gen, base=base)
                rec = lifetime.LEDGER.add_owned(key, res, self.on_zero)
                self._by_base[base] = rec
            ref = enc.add_ref(self, rec, rec.resource.meta, self._pool_fd_for(st, gen))
        return rec, ref

    def _pool_fd_for(self, st, gen):
        """The pool's fd the first time this peer hears of it, else None."""
        if gen.key in st.pools_sent:
            return None
        st.pools_sent.add(gen.key)
        return gen.fd

    def _lend_copy(self, enc, st, route, obj, nbytes, ordinal, uuid, stream):
        src = obj.data_ptr()
        key = (self.name, lifetime.PROCESS_UID, next(self._serial))
        if route == "staging":
            gen = self._staging[ordinal].current
            ptr = gen.alloc(nbytes, stream)
            try:
                D.call("cuMemcpyDtoDAsync_v2", ptr, src, nbytes, stream, detail="into the staging pool")
                export = gen.export_pointer(ptr)
            except BaseException:
                D.try_call("cuMemFreeAsync", ptr, stream)
                raise
            meta = pool_meta(gen.key, export, uuid, nbytes)
            rec = lifetime.LEDGER.add_owned(key, _Owned("staging", ordinal, ptr, meta, gen=gen, stream=stream),
                                            self.on_zero)
            fd = self._pool_fd_for(st, gen)
        else:
            blk = VmmBlock.create(ordinal, nbytes)
            try:
                D.call("cuMemcpyDtoDAsync_v2", blk.ptr, src, nbytes, stream, detail="into a VMM block")
            except BaseException:
                blk.close()
                raise
            meta = vmm_meta(blk.size, uuid)
            rec = lifetime.LEDGER.add_owned(key, _Owned("vmm", ordinal, blk.ptr, meta, vmm=blk, stream=stream),
                                            self.on_zero)
            fd = blk.fd
        return rec, enc.add_ref(self, rec, meta, fd)

    def _encode_cpu(self, obj, dtype, ordinal, uuid, why):
        self._warn_once(("cpu", why), f"comfy_env: CUDA tensors go through host memory (slow): {why}")
        host = obj.detach().cpu()
        return CudaTensorDesc(VERSION, "cpu", -1, dtype, tuple(obj.shape), tuple(obj.stride()), 0, uuid,
                              ordinal, None, obj.requires_grad, host)

    # -- decode ------------------------------------------------------------------------
    def decode(self, desc, dec):
        validate(desc)
        torch = self._t()
        try:
            ordinal = devices.ordinal_of(desc.device_uuid)
        except (devices.UnknownDevice, D.CudaError) as exc:
            raise CudaTransferError(str(exc)) from None
        dtype = getattr(torch, desc.dtype)
        device = torch.device("cuda", ordinal)
        if desc.route == "cpu":
            t = desc.host.to(device)
        elif desc.route == "empty":
            t = torch.empty_strided(desc.shape, desc.strides, dtype=dtype, device=device)
        else:
            rec = dec.record(desc.ref)
            stream = torch.cuda.current_stream(ordinal).cuda_stream
            base = self._local_ptr(rec, ordinal, stream, dec.link)
            if desc.event is not None and desc.event[0] != lifetime.PROCESS_UID:
                self._wait_once(dec, desc.event, ordinal, stream)
            nbytes = span_bytes(desc.shape, desc.strides, ITEMSIZE[desc.dtype])
            keeper = _DeviceBytes(base + desc.offset, nbytes)
            raw = torch.as_tensor(keeper, device=device)
            lifetime.LEDGER.holder(rec, keeper)
            if desc.route == "pool" and not rec.owned and rec.resource.meta[0] == "pool":
                meta = rec.resource.meta
                self.import_cache.keep(rec, meta[4], meta[1][0])
            t = raw.view(dtype) if dtype != torch.uint8 else raw
            t = t.as_strided(desc.shape, desc.strides)
        if desc.requires_grad:
            t.requires_grad_(True)
        return t

    def _wait_once(self, dec, event, ordinal, stream):
        """Wait on a peer's event once per message and stream.

        The whole message was encoded before it was sent, so the first wait already
        covers the latest recording of that slot the message can mean.
        """
        key = (event[0], event[1], event[2], ordinal, stream)
        try:
            waited = dec._comfy_env_cuda_waited
        except AttributeError:
            waited = None
            try:
                waited = dec._comfy_env_cuda_waited = set()
            except AttributeError:
                pass
        if waited is not None:
            if key in waited:
                return
            waited.add(key)
        self._events.wait(event, ordinal, stream)

    def _local_ptr(self, rec, ordinal, stream, link):
        """The block's address in this process: ours, or imported now on first use."""
        res = rec.resource
        if rec.owned:
            return res.ptr
        with self._lock:
            if res.ptr is not None:
                return res.ptr
            kind = res.meta[0]
            try:
                if kind == "pool":
                    _, pool_key, export, _uuid, _size = res.meta
                    ptr = self.imports.import_pointer(pool_key, export)
                else:
                    res.vmm = VmmBlock.open(res.fd, res.meta[1], ordinal)
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
            validate_meta(meta)
        except Exception:
            if fd >= 0:
                os.close(fd)
            raise
        if meta[0] == "pool":
            pool_key = meta[1]
            if fd >= 0:
                self.imports.register(pool_key, fd, meta[3])
            self.imports.pin(pool_key)       # raises clearly if the pool's fd never came
            return _Remote(meta, -1)
        if fd < 0:
            raise CudaTransferError(f"CUDA VMM block {key} arrived without its fd")
        return _Remote(meta, fd)

    def forward_fd(self, record):
        """An fd (still ours, valid while ``record`` lives) that opens the block elsewhere."""
        res = record.resource
        if record.owned:
            return res.vmm.fd if res.kind == "vmm" else res.gen.fd
        if res.meta[0] == "pool":
            return self.imports.get(res.meta[1]).fd
        return res.vmm.fd if res.vmm is not None else res.fd

    def on_zero(self, record):
        # Runs on the ledger's thread (or whichever released last): never raise from here.
        try:
            if record.owned:
                self._free_owned(record)
            else:
                self._free_remote(record)
        except Exception:
            log.exception("comfy_env: freeing CUDA block %s failed", record.key)

    def _free_owned(self, record):
        res = record.resource
        if res.kind == "pool":
            with lifetime.LEDGER.lock:
                if self._by_base.get(res.base) is record:
                    del self._by_base[res.base]
            res.keep = None           # torch frees it, stream-ordered, when the user did too
            self._reap_heap(res.ordinal)
        elif res.kind == "staging":
            devices.use(res.ordinal)
            D.call("cuMemFreeAsync", res.ptr, res.stream)
        else:
            devices.use(res.ordinal)
            # The peer never read it if it released without decoding: our copy may be in flight.
            D.call("cuStreamSynchronize", res.stream)
            res.vmm.close()

    def _free_remote(self, record):
        res = record.resource
        if res.meta[0] == "pool":
            pool_key, export = res.meta[1], res.meta[2]
            try:
                if res.ptr is not None:
                    self.imports.release_pointer(pool_key, export, res.stream)
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
        elif kind == "uncache":
            # The owner ran empty_cache: drop idle imports of its blocks so it can free them.
            self.import_cache.flush(owner=message[1])
        elif kind == "retire":
            self.imports.retire(tuple(message[1]))
        elif kind == "retire-owner":
            self.imports.forget_owner(message[1])
        else:
            log.warning("comfy_env: unknown CUDA plane message %r from %s", kind, link.name)

    def _housekeeping(self):
        """Notice peers that went away: their pools retire here and at those we forwarded to."""
        if self._heap:
            self._reap_heap()
        for link in list(self._links):
            if link.closed and id(link) not in self._dead_links_seen:
                self._dead_links_seen.add(id(link))
                if link.uid:
                    self.imports.forget_owner(link.uid)
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
        if any(p is not None for p in self._heap.values()):
            # Peers may keep our heap blocks imported after use (their import cache):
            # ask them to let go, so a later empty_cache here can give the memory back.
            for link in list(self._links):
                st = link.state.get(self.name)
                if st is not None and st.pools_sent and not link.closed:
                    link.post(("plane", self.name, ("uncache", lifetime.PROCESS_UID)))
        retired = []
        for pools in list(self._heap.values()) + list(self._staging.values()):
            if pools is None:
                continue
            devices.use(pools.ordinal)
            pools.roll(self.roll_min_idle)
            retired += pools.reap()
        self._post_retired(retired)
        return retired

    def _reap_heap(self, ordinal=None):
        """Destroy rolled heap generations that drained since the last trim.

        A peer's cached import can outlive ``empty_cache``: its release (asked for by
        ``uncache``) arrives later, and the generation is reaped then.
        """
        for o, pools in list(self._heap.items()):
            if pools is None or not pools.old or (ordinal is not None and o != ordinal):
                continue
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
                    "heap_generations": {o: (1 + len(p.old)) for o, p in self._heap.items() if p},
                    "staging_generations": {o: (1 + len(p.old)) for o, p in self._staging.items()},
                    "events": {o: len(r) for o, r in self._rings.items()}}


PLANE = CudaPlane()
