"""The CUDA data plane: torch CUDA tensors as descriptors over exportable device memory.

Data flow of one tensor (sender on the left, receiver on the right)::

    Sender.encode(t)                                    Receiver.decode(desc)
      route = paths.choose(...)                           rec = dec.record(desc.ref)
      pool:    export t's own allocation (zero copy)        (open_remote on first sight:
      ipc:     t's allocation's legacy IPC handle          keep the fd, import nothing)
               (zero copy; native allocator)              import pointer / map VMM block /
      staging: copy into our staging pool                 open the IPC handle (once per
      vmm:     copy into a fresh VMM block                allocation)
      record an interprocess event on t's stream  ---->     stream waits on the event
      add_ref(record, meta, fd if the peer lacks it)        wrap as a tensor, LEDGER.holder
                                                           ...tensor garbage collected...
      on_zero(owned): drop t / free staging / unmap  <----  on_zero(remote): free + sync,
      (Sender.free_owned)                                   then the ledger posts release
                                                            (Receiver.free_remote)

Block meta (``layout.pool_meta`` / ``vmm_meta`` / ``ipc_meta``) plus the fd from
:meth:`forward_fd` (none for ``ipc``) are all a third process needs: the parent
forwards worker A's blocks to worker B without importing them (``open_remote`` is
lazy), B imports from A's pool (or opens A's handle) directly, and B's releases flow
back through the parent's ledger.

Per peer (``peers.PeerState``): which of our pools it has (their fd crosses once),
and what it reported after its first import of each kind (the probe: an import that
fails raises a clear error at the receiver, which tells us, and we stop using that
route for that peer).

This module is the codec's :class:`~comfy_env.ipc.codec.Plane`; it owns no state of
its own but the wiring.  The state lives in three parts, split along the wire:

* :class:`~.sender.Sender`: our blocks, route choice, lends, the owner side of
  recycling staging blocks;
* :class:`~.receiver.Receiver`: imports of peers' blocks, wrapping them as tensors,
  idle reports, frees;
* :class:`~.local.LocalGpus`: per-GPU state of this process both sides use (probing,
  pools and their generations, event rings, opened peer events).

It routes each control message to the side it is for, and does what spans the
sides: noticing dead peers, ``trim`` (``torch.cuda.empty_cache``), ``stats``.

Every entry point here is called from code we don't own (the codec on the caller's
thread, the ledger, torch's ``empty_cache``) and keeps the caller's current CUDA
context: a tensor of another GPU must not change ``torch.cuda.current_device()``
(``devices.CALLER``).
"""
from __future__ import annotations

import logging

from ... import settings
from .. import lifetime
from ..codec import Plane
from .devices import keeps_caller_context
from .errors import CudaFallbackWarning, CudaTransferError, WarnOnce
from .local import LocalGpus
from .paths import Capabilities, fresh_copy_limit, import_limit, ipc_min_bytes, small_copy_limit
from .peers import Peers
from .receiver import Receiver
from .sender import Sender

__all__ = ["CudaPlane", "CudaTransferError", "CudaFallbackWarning", "PLANE"]

log = logging.getLogger("comfy_env.cuda")


class CudaPlane(Plane):
    name = "cuda"
    types = ("torch.Tensor",)

    def __init__(self):
        cfg = settings.read()
        self._warn_once = WarnOnce()
        self.roll_min_idle = cfg.cuda_roll_min_idle_mib << 20
        self.local = LocalGpus(cfg.cuda_heap, self._warn_once, cfg.cuda_parent_heap)
        self.peers = Peers(self.name)
        limit = import_limit()
        small_copy = small_copy_limit()
        self.receiver = Receiver(self, self.local, self.peers)
        self.sender = Sender(self, self.local, self.peers, self._warn_once, limit=limit,
                             force_cpu=cfg.cuda_force_cpu, small_copy=small_copy,
                             fresh_copy=fresh_copy_limit(small_copy, limit), ipc_min=ipc_min_bytes(),
                             ipc_mapped=self.receiver.ipc.is_mapped)
        # One object for the ledger's finisher de-duplication (it compares finishers).
        self._finish_frees = keeps_caller_context(self.receiver.finish_frees)

    # -- what other modules read (doctor, probe, tests, benchmarks) --------------------
    @property
    def role(self):
        return self.local.role

    @role.setter
    def role(self, role):
        self.local.role = role

    @property
    def force_cpu(self):
        return self.sender.force_cpu

    @force_cpu.setter
    def force_cpu(self, flag):
        self.sender.force_cpu = flag

    @property
    def routes(self):
        return self.sender.routes

    @property
    def last_reasons(self):
        return self.sender.last_reasons

    @property
    def recycled(self):
        return self.sender.recycled

    @property
    def imports(self):
        return self.receiver.imports

    @property
    def import_cache(self):
        return self.receiver.import_cache

    @keeps_caller_context
    def caps(self, ordinal) -> Capabilities:
        return self.local.caps(ordinal)

    @keeps_caller_context
    def ensure_heap(self, ordinal):
        return self.local.ensure_heap(ordinal)

    # -- the codec's hooks -------------------------------------------------------------
    @keeps_caller_context
    def encode(self, obj, enc):
        return self.sender.encode(obj, enc)

    @keeps_caller_context
    def decode(self, desc, dec):
        return self.receiver.decode(desc, dec)

    @keeps_caller_context
    def open_remote(self, key, meta, fd):
        return self.receiver.open_remote(key, meta, fd)

    @keeps_caller_context
    def forward_fd(self, record):
        """An fd (still ours, valid while ``record`` lives) that opens the block elsewhere."""
        if record.owned:
            return record.resource.forward_fd()
        return self.receiver.forward_fd(record)

    @keeps_caller_context
    def on_zero(self, record):
        # Runs on the ledger's thread (or whichever released last): never raise from here.
        try:
            if record.owned:
                self.sender.free_owned(record)
            elif self.receiver.free_remote(record):
                return self._finish_frees     # the ledger calls it once per batch
        except Exception:
            log.exception("comfy_env: freeing CUDA block %s failed", record.key)
        return None

    # -- control ---------------------------------------------------------------------------
    @keeps_caller_context
    def on_control(self, link, message):
        kind = message[0]
        if kind == "verdict":
            _, block_kind, ok, reason = message
            self.peers.of(link).verdicts.record(block_kind, ok, reason)
            if not ok:
                self._warn_once(("verdict", link.name, block_kind),
                                f"comfy_env: {link.name} cannot import CUDA {block_kind} blocks from this "
                                f"process ({reason}); using another route")
        elif kind == "idle":
            _, blocks, event = message
            self.sender.on_idle(link, blocks, event)
        elif kind == "reclaim":
            self.receiver.on_reclaim(message[1])
        elif kind == "uncache":
            self.receiver.on_uncache(message[1])
        elif kind == "retire":
            self.receiver.on_retire(message[1])
        elif kind == "retire-owner":
            self.receiver.forget_owner(message[1])
        else:
            log.warning("comfy_env: unknown CUDA plane message %r from %s", kind, link.name)

    @keeps_caller_context
    def housekeeping(self):
        """Before each frame we encode: reap drained generations, and notice peers that
        went away: their pools retire here and at those we forwarded to."""
        if self.local.heap or self.local.staging:
            self.sender.reap_old()
        for link in self.peers.newly_closed():
            if link.uid:
                self.receiver.forget_owner(link.uid)    # its pools and interprocess events
                for other in self.peers.links():
                    if not other.closed and other is not link:
                        other.post(("plane", self.name, ("retire-owner", link.uid)))

    # -- memory ---------------------------------------------------------------------------
    @keeps_caller_context
    def trim(self):
        """Release what exportable pools can release: roll to new generations, destroy drained ones.

        Called by the ``torch.cuda.empty_cache`` hook.  Returns the retired pool keys.
        """
        # Our cached imports first: their releases let peers free (and us reap) blocks.
        self.receiver.import_cache.flush()
        self.receiver.ipc.flush()
        self.sender.trim()
        retired = self.local.roll_and_reap(self.roll_min_idle)
        self.sender.post_retired(retired)
        return retired

    @keeps_caller_context
    def stats(self):
        records = lifetime.LEDGER.records()
        owned = sum(1 for r in records if r.owned and r.key[0] == self.name)
        remote = sum(1 for r in records if not r.owned and r.key[0] == self.name)
        return {"owned_blocks": owned, "remote_blocks": remote, **self.receiver.stats(), **self.sender.stats(),
                **self.local.stats()}


PLANE = CudaPlane()
