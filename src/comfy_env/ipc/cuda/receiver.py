"""The CUDA plane's receiving side: peers' blocks we import, the tensors we build on them.

Owns: the peer pools we know and the pointers imported from them (``imports``,
:class:`~.pools.PoolImports`), the peer allocations opened by legacy IPC handle
(``ipc``, :class:`~.ipchandles.IpcImports`), the imports kept after use
(``import_cache``), and this thread's staging blocks that went idle and are not yet
reported (``_idle_local``).  Blocks are ``blocks.RemotePool`` / ``RemoteVmm`` /
``RemoteIpc``, reached through ledger records.

Data flow of one tensor::

    open_remote(key, meta, fd)     first sight (in the ledger's lock): keep the fd, import nothing
    decode(desc)                   import the pointer / map the VMM block / open the IPC handle
                                   on first use, wait on the sender's event, wrap as a tensor,
                                   LEDGER.holder
    ...tensor garbage collected...
    staging_idle(rec)              a kept staging block is idle: report it ("idle", with an
                                   event after our reads) so its owner can recycle it
    free_remote(rec)               the last user went: free (or close the IPC mapping once no
                                   record uses it) after our reads; then the ledger posts the
                                   release

Locks (docs/architecture.md, "Locks"): ``_import_lock`` makes the first import of a
block happen once; decode takes it outside the ledger's lock, and nothing of ours but
``PoolImports``' lock is taken under it (the verdict a failed import posts waits until
it is released).  ``PoolImports`` and the import cache have their own locks, taken
after the ledger's.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import NamedTuple

from .. import lifetime
from . import devices
from . import driver as D
from .blocks import RemoteIpc, RemotePool, RemoteVmm
from .errors import CudaTransferError
from .importcache import ImportCache
from .ipchandles import IpcImports
from .layout import ITEMSIZE, span_bytes, unpack, validate, validate_meta
from .pools import PoolImports
from .vmm import VmmBlock

__all__ = ["Receiver"]

log = logging.getLogger("comfy_env.cuda")


class _DecodeDevice(NamedTuple):
    """What decoding needs of one GPU, found the first time a message meets it."""
    ordinal: int
    device: object            # torch.device
    stream: object            # torch's current stream there


class _DecodeContext:
    """What decoding one message computes once, not once per tensor."""
    __slots__ = ("dev", "waited")

    def __init__(self):
        self.dev = {}           # device uuid -> _DecodeDevice
        self.waited = set()     # events already waited on, per stream


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


# How a tensor is built from a typed __cuda_array_interface__: its typestr, and the dtype
# to view the result as (None: none).  Torch builds the dtypes a typestr can name in one
# call; the others (bfloat16, float8, complex32, the wide unsigned ints) over the signed
# integer of their size, then one dtype view, which keeps shape and strides because the
# element size is the same (cheaper than bytes + view + as_strided).
_TYPESTR = {"float64": ("<f8", None), "float32": ("<f4", None), "float16": ("<f2", None),
            "complex128": ("<c16", None), "complex64": ("<c8", None), "int64": ("<i8", None),
            "int32": ("<i4", None), "int16": ("<i2", None), "int8": ("|i1", None), "uint8": ("|u1", None),
            "bool": ("|b1", None)}
_TYPESTR.update((name, ({1: "|i1", 2: "<i2", 4: "<i4", 8: "<i8"}[ITEMSIZE[name]], name))
                for name in ITEMSIZE if name not in _TYPESTR)


class Receiver:
    """The receiving side of the CUDA plane (see the module docstring)."""

    def __init__(self, plane, local, peers):
        self.name = plane.name
        self.local = local            # LocalGpus
        self.peers = peers            # Peers
        self._import_lock = threading.Lock()
        self._idle_local = threading.local()   # idle staging blocks of this thread's batch
        self.imports = PoolImports()
        self.ipc = IpcImports(self.imports.fences)   # one fence stream per GPU for both
        self.import_cache = ImportCache(lifetime.LEDGER)   # pool imports kept after use

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
        torch = self.local.torch
        d = ctx.dev[uuid] = _DecodeDevice(ordinal, torch.device("cuda", ordinal),
                                          self.local.current_stream(ordinal))
        return ctx, d

    def decode(self, desc, dec):
        desc = unpack(desc) if type(desc) is bytes else validate(desc)    # unpack checks too
        torch = self.local.torch or self.local.t()
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
            if (route == "ipc") != (res.kind == "ipc"):
                raise CudaTransferError(f"a CUDA tensor of route {route!r} names a {res.kind} block")
            if (route == "ipc" and not rec.owned
                    and desc.offset + span_bytes(desc.shape, desc.strides, ITEMSIZE[desc.dtype]) > res.meta.size):
                raise CudaTransferError(
                    f"a CUDA tensor of {desc.shape} at offset {desc.offset} overruns its IPC block of "
                    f"{res.meta.size} bytes (a malformed message)")
            base = res.ptr if (rec.owned or res.ptr is not None) else self._local_ptr(rec, ordinal, stream, dec.link)
            event = desc.event
            if event is not None and event[0] != lifetime.PROCESS_UID:
                key = (event, stream)
                if key not in ctx.waited:
                    # The whole message was encoded before it was sent, so the first wait
                    # already covers the latest recording of that slot it can mean.
                    ctx.waited.add(key)
                    self.local.events.wait(event, ordinal, stream)
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
                        self.import_cache.keep(rec, meta.alloc_size, owner, on_idle=self.staging_idle)
            elif not rec.owned and res.kind == "ipc" and res.meta.sent_before:
                # An ipc storage its owner sent before: likely sent again.  Kept, the next
                # message reuses the record (no release, no fence, no synchronise per call)
                # until the owner reclaims it; a first sight is released as before.
                self.import_cache.keep(rec, res.meta.size, res.meta.owner)
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
        torch = self.local.torch
        if desc.shape:     # (0-d tensors, rare, go through bytes below)
            typestr, view = _TYPESTR[desc.dtype]
            item = ITEMSIZE[desc.dtype]
            keeper = _DeviceBytes(ptr, 0, typestr, desc.shape, tuple(map(item.__mul__, desc.strides)))
            t = torch.as_tensor(keeper)
            if t.get_device() != ordinal:
                t = torch.as_tensor(keeper, device=device)
            return (t if view is None else t.view(getattr(torch, view))), keeper
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
        kind = res.kind
        failed = None
        with self._import_lock:
            if res.ptr is not None:
                return res.ptr
            try:
                if kind == "pool":
                    ptr = self.imports.import_pointer(res.meta.pool_key, res.meta.export)
                elif kind == "ipc":
                    meta = res.meta
                    ptr = self.ipc.open(meta.owner, meta.handle, meta.alloc_size, ordinal) + meta.offset
                else:
                    res.vmm = VmmBlock.open(res.fd, res.meta.size, ordinal)
                    res.fd = -1           # the block owns it now
                    ptr = res.vmm.ptr
            except (D.CudaError, LookupError) as exc:
                failed = str(exc)
            else:
                res.ptr, res.stream, res.ordinal = ptr, stream, ordinal
        if failed is not None:
            self._tell(link, kind, False, failed)
            raise CudaTransferError(
                f"could not import a CUDA {kind} block from {link.name}: {failed}. That route is now "
                f"disabled for this peer; the next transfer takes another") from None
        self._tell(link, kind, True, "")
        return ptr

    def _tell(self, link, kind, ok, reason):
        """Report the outcome of our first import of ``kind`` from ``link`` (the probe)."""
        st = self.peers.of(link)
        if kind in st.told and ok:
            return
        st.told.add(kind)
        link.post(("plane", self.name, ("verdict", kind, bool(ok), reason[:500])))

    # -- recycled staging blocks: the importer's side --------------------------------
    @devices.keeps_caller_context
    def staging_idle(self, rec):
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

    @devices.keeps_caller_context
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
                devices.use(ordinal)
                if D.stream_done(stream):
                    # Our reads completed already (a caller that synchronised): the owner
                    # has nothing to wait for, and an event recorded now could still be
                    # pending when its next copy into the block asks, making it wait on
                    # our context across processes.
                    pass
                elif self.local.caps(ordinal).events:
                    slot, handle = self.local.rings[ordinal].record(stream)
                    event = (lifetime.PROCESS_UID, ordinal, slot, handle)
                else:
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

    # -- blocks ----------------------------------------------------------------------------
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
        if meta.kind == "ipc":
            if fd >= 0:
                os.close(fd)
                raise CudaTransferError(f"CUDA IPC block {key} arrived with an fd (it needs none)")
            return RemoteIpc(meta)                # opened by the first decode, not here
        if fd < 0:
            raise CudaTransferError(f"CUDA VMM block {key} arrived without its fd")
        return RemoteVmm(meta, fd)

    def forward_fd(self, record):
        """A peer's block: the fd (still ours, valid while ``record`` lives) that opens it elsewhere."""
        res = record.resource
        if res.kind == "pool":
            return self.imports.get(res.meta.pool_key).fd
        if res.kind == "ipc":
            return None               # the handle in the meta is all a third process needs
        return res.vmm.fd if res.vmm is not None else res.fd

    def free_remote(self, record):
        """Unmap a peer's block; True when the free was deferred to :meth:`_finish_frees`."""
        res = record.resource
        if res.kind == "pool":
            pool_key, export = res.meta.pool_key, res.meta.export
            try:
                if res.ptr is not None:
                    return self.imports.release_pointer(pool_key, export, res.stream, defer=True)
            finally:
                self.imports.unpin(pool_key)
        elif res.kind == "ipc":
            if res.ptr is not None:
                # Deferred: the reads fenced now, the mapping closed (if this was its last
                # record) in finish_frees, before the ledger posts the release.
                self.ipc.release(res.meta.owner, res.meta.handle, res.stream)
                return True
        elif res.vmm is not None:
            devices.use(res.ordinal)
            D.call("cuStreamSynchronize", res.stream)   # our reads are done before we unmap
            res.vmm.close()
        elif res.fd >= 0:
            os.close(res.fd)
            res.fd = -1

    def finish_frees(self):
        """Complete this thread's deferred frees of imported pointers and closes of IPC
        mappings (one synchronise per stream for the whole batch), before the ledger posts
        their releases."""
        try:
            self.imports.finish()
        except Exception:
            log.exception("comfy_env: waiting for freed CUDA imports failed")
        try:
            self.ipc.finish()
        except Exception:
            log.exception("comfy_env: waiting for closed CUDA IPC mappings failed")

    # -- what owners tell us -------------------------------------------------------------
    def on_reclaim(self, keys):
        """The owner no longer uses these blocks: our cache must not pin them."""
        self.import_cache.reclaim([tuple(k) for k in keys])

    def on_uncache(self, owner):
        """The owner ran empty_cache: drop idle imports of its blocks so it can free them,
        and close our idle mappings of its allocations (it may have freed them)."""
        self.import_cache.flush(owner=owner)
        self.ipc.flush(owner)

    def on_retire(self, pool_key):
        self.imports.retire(tuple(pool_key))

    def forget_owner(self, owner):
        """``owner`` is gone (or a forwarder told us so): drop its pools and events."""
        self.imports.forget_owner(owner)
        self.ipc.flush(owner)
        self.local.events.forget_owner(owner)

    def stats(self):
        return {**self.imports.stats(), **self.ipc.stats(), "import_cache": self.import_cache.stats()}
