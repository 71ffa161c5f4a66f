"""Legacy CUDA IPC handles on the importing side: one mapping per peer allocation, shared.

A peer whose torch runs the native caching allocator lends a storage zero copy by the
legacy IPC handle of the ``cuMemAlloc`` allocation holding it (``ipc`` route, see
sender.py).  CUDA allows one ``cuIpcOpenMemHandle`` per allocation per process, and
several storages (records) can share one allocation, so :class:`IpcImports` opens each
``(owner, handle)`` once and counts the records using it.

When the last record of an allocation goes, the mapping is closed after our reads of
it completed, and only then may the records' releases go upstream: the exporter may
reuse the bytes (or free the allocation: CUDA requires every importer to have closed
by then) as soon as it reads the release.  Releases of records whose allocation stays
open wait for their reads the same way.  Both are deferred per batch (one fence per
read stream, one synchronise per GPU: ``pools.ReadFences``) and completed by
:meth:`IpcImports.finish`, which the ledger runs before it posts the batch's releases.

No cache of closed mappings (unlike pool imports): opening and closing cost ~100-150 µs
per allocation on the H100 (below a legacy IPC call of torch's, ~0.38 ms), and a kept
mapping would pin the exporter's memory after it dropped the tensor.

``_lock`` guards the dicts; the open itself runs under it (a second thread must not
open the same handle meanwhile), the synchronise and the close do not.  Nothing else
of ours is taken under it; it may be taken under the ledger's lock or the receiver's
import lock.
"""
from __future__ import annotations

import logging
import threading

from . import devices
from . import driver as D
from .pools import ReadFences

__all__ = ["IpcImports"]

log = logging.getLogger("comfy_env.cuda")


class IpcImports:
    """Peer allocations this process opened by legacy IPC handle, reference counted."""

    def __init__(self, fences=None):
        self._lock = threading.Lock()
        self._open = {}         # (owner, handle) -> [base, users, ordinal]
        self._bases = {}        # base -> ((owner, handle), size): our mappings, never re-exported
        # (owner, handle) -> threading.Event: its close is pending (deferred or running).
        # Opening the handle again before the close completed is refused by the driver
        # (one open per allocation per process), so an open waits for it.
        self._closing = {}
        self._deferred = threading.local()   # this thread's releases awaiting finish()
        self.fences = fences if fences is not None else ReadFences()
        self.made = 0           # opens so far (tests, benchmarks)
        self.closed = 0

    def open(self, owner, handle, size, ordinal) -> int:
        """The base here of the allocation ``handle`` (``size`` bytes) of process ``owner``
        on ``ordinal``: opened now, or a reference added to the mapping we have."""
        k = (owner, handle)
        while True:
            with self._lock:
                slot = self._open.get(k)
                if slot is not None:
                    slot[1] += 1
                    return slot[0]
                closing = self._closing.get(k)
                if closing is None:
                    devices.use(ordinal)
                    base = D.ipc_open(handle)
                    self._open[k] = [base, 1, ordinal]
                    self._bases[base] = (k, size)
                    self.made += 1
                    return base
            if any(item[0] == k for item in getattr(self._deferred, "pending", ())):
                self.finish()           # our own deferred close: complete it first
            else:
                closing.wait()          # another thread's close, about to complete

    def release(self, owner, handle, read_stream):
        """A record on ``(owner, handle)`` went: fence its reads on ``read_stream``; the
        last one also closes the mapping.  Deferred: the caller runs :meth:`finish` (same
        thread) before the records' releases go upstream."""
        k = (owner, handle)
        with self._lock:
            slot = self._open.get(k)
            if slot is None:
                raise LookupError(f"CUDA IPC handle of {owner} released more often than opened")
            slot[1] -= 1
            base, users, ordinal = slot
            done = None
            if users <= 0:
                del self._open[k]
                done = self._closing[k] = threading.Event()
        try:
            devices.use(ordinal)
            ours = self.fences.stream(ordinal, read_stream, self._batch_fences())
        except BaseException:
            if done is not None:
                D.try_call("cuStreamSynchronize", read_stream)   # no fence: wait for the reads here
                self._close(k, base, done, ordinal)
            raise
        self._deferred.pending.append((k if done is not None else None, base, done, ordinal, ours))

    def _batch_fences(self):
        d = self._deferred
        if not getattr(d, "pending", None):
            d.pending = []
            d.fenced = set()
        return d.fenced

    def finish(self):
        """Wait for this thread's fenced reads (one synchronise per GPU), then close the
        mappings whose last record went."""
        pending = getattr(self._deferred, "pending", None)
        if not pending:
            return
        self._deferred.pending = []
        synced = set()
        try:
            for _k, _base, _done, ordinal, ours in pending:
                if (ordinal, ours) not in synced:
                    synced.add((ordinal, ours))
                    devices.use(ordinal)
                    D.call("cuStreamSynchronize", ours)
        finally:
            for k, base, done, ordinal, _ours in pending:
                if done is not None:
                    self._close(k, base, done, ordinal)

    def _close(self, k, base, done, ordinal):
        try:
            devices.use(ordinal)
            D.ipc_close(base)
        except Exception:
            log.exception("comfy_env: closing a CUDA IPC mapping of %s failed", k[0])
        finally:
            with self._lock:
                if self._bases.get(base, (None,))[0] == k:
                    del self._bases[base]
                if self._closing.get(k) is done:
                    del self._closing[k]
                self.closed += 1
            done.set()

    def is_mapped(self, ptr) -> bool:
        """Whether ``ptr`` lies in a peer's allocation that we opened (the sender never
        exports those: a handle of a mapping is the owner's to give).  A scan: there are
        few mappings, and only storages above the IPC threshold ask."""
        for base, (_k, size) in list(self._bases.items()):
            if base <= ptr < base + size:
                return True
        return False

    def stats(self):
        with self._lock:
            return {"ipc_open": len(self._open), "ipc_opens_made": self.made, "ipc_closed": self.closed}
