"""Legacy CUDA IPC handles on the importing side: one mapping per peer allocation, shared and kept.

A peer whose torch runs the native caching allocator lends a storage zero copy by the
legacy IPC handle of the ``cuMemAlloc`` allocation (torch's "segment") holding it
(``ipc`` route, see sender.py).  CUDA allows one ``cuIpcOpenMemHandle`` per allocation
per process, and several storages (records) can share one allocation, so
:class:`IpcImports` opens each ``(owner, handle)`` once and counts the records using it.

When the last record of an allocation goes, its releases may go upstream only after
our reads of it completed (the exporter reuses the bytes as soon as it reads the
release): the reads are fenced per batch (one fence per read stream, one synchronise
per GPU: ``pools.ReadFences``) and completed by :meth:`IpcImports.finish`, which the
ledger runs before it posts the batch's releases.

**The mapping is kept after that** (a cache of idle mappings), because what it maps is
the owner's *segment*, which outlives the storage: torch's caching allocator serves the
owner's next tensor of a like size from the same segment, so a new tensor each call
(a node's fresh output) arrives under the same handle and costs no open.  An open and
close cost ~70-150 µs per allocation (~340 µs at 4 GiB) on the H100.  A kept mapping
pins nothing the owner could use: the bytes are the owner's to reuse once released.
If the owner frees the segment itself (its ``empty_cache``, or its allocator under
memory pressure) while we keep it mapped, the driver keeps the physical memory until
we close (CUDA calls the order undefined; NVIDIA's UCX keeps such mappings too, and
``benchmarks/probe_ipc_free_while_mapped.py`` checks it on the GPU), and a segment the
owner allocates later has a new handle, so a kept mapping never serves new memory.
(A storage its owner sent before is kept one level up, as a record in the receiver's
import cache, until the owner reclaims it: see importcache.py.)
What bounds the cache: the owner's ``empty_cache`` (``uncache``: its mappings close at
once), the link closing, our own ``empty_cache``, and ``COMFY_ENV_CUDA_IMPORT_CACHE_S``
(1 s idle) / ``..._COUNT`` (256 idle mappings), either at 0 turning the cache off.

``_lock`` guards the dicts; the open itself runs under it (a second thread must not
open the same handle meanwhile), the synchronise and the close do not.  Nothing else
of ours is taken under it; it may be taken under the ledger's lock or the receiver's
import lock.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
import time

from ... import settings
from .. import lifetime
from . import devices
from . import driver as D
from .pools import ReadFences

__all__ = ["IpcImports"]

log = logging.getLogger("comfy_env.cuda")

# A release whose reads had completed when it was made: no fence, nothing to wait for.
_READS_DONE = object()


class _Mapping:
    __slots__ = ("base", "users", "ordinal", "size")

    def __init__(self, base, ordinal, size):
        self.base = base
        self.users = 1                # records on it
        self.ordinal = ordinal
        self.size = size


class IpcImports:
    """Peer allocations this process opened by legacy IPC handle, reference counted,
    kept mapped for a while after their last record went."""

    def __init__(self, fences=None, *, max_count=None, max_idle_s=None, background=True):
        cfg = settings.read()
        self.max_count = cfg.cuda_import_cache_count if max_count is None else int(max_count)
        self.max_idle_s = cfg.cuda_import_cache_s if max_idle_s is None else float(max_idle_s)
        self.background = background  # False: only sweep() / flush() close idle mappings (tests)
        self._lock = threading.Lock()
        self._open = {}         # (owner, handle) -> _Mapping (idle ones included)
        self._idle = collections.OrderedDict()   # (owner, handle) -> idle since (monotonic), LRU first
        self._bases = {}        # base -> ((owner, handle), size): our mappings, never re-exported
        # (owner, handle) -> threading.Event: its close is pending (deferred or running).
        # Opening the handle again before the close completed is refused by the driver
        # (one open per allocation per process), so an open waits for it.
        self._closing = {}
        self._deferred = threading.local()   # this thread's releases awaiting finish()
        self._thread = None
        self._pid = os.getpid()
        self.fences = fences if fences is not None else ReadFences()
        self.made = 0           # opens so far (tests, benchmarks)
        self.closed = 0
        self.hits = 0           # opens served by a mapping we had (kept idle, or in use)

    @property
    def keeps(self) -> bool:
        return self.max_count > 0 and self.max_idle_s > 0

    def open(self, owner, handle, size, ordinal) -> int:
        """The base here of the allocation ``handle`` (``size`` bytes) of process ``owner``
        on ``ordinal``: opened now, or a reference added to the mapping we have."""
        k = (owner, handle)
        while True:
            with self._lock:
                m = self._open.get(k)
                if m is not None:
                    if m.users == 0:
                        self._idle.pop(k, None)
                    m.users += 1
                    self.hits += 1
                    return m.base
                closing = self._closing.get(k)
                if closing is None:
                    devices.use(ordinal)
                    base = D.ipc_open(handle)
                    self._open[k] = _Mapping(base, ordinal, size)
                    self._bases[base] = (k, size)
                    self.made += 1
                    return base
            if any(item[0] == k and item[2] is not None for item in getattr(self._deferred, "pending", ())):
                self.finish()           # our own deferred close: complete it first
            else:
                closing.wait()          # another thread's close, about to complete

    def release(self, owner, handle, read_stream):
        """A record on ``(owner, handle)`` went: fence its reads on ``read_stream``.
        Deferred: the caller runs :meth:`finish` (same thread) before the records'
        releases go upstream; the last record's mapping is kept (or closed, with the
        cache off) then."""
        k = (owner, handle)
        with self._lock:
            m = self._open.get(k)
            if m is None or m.users <= 0:
                raise LookupError(f"CUDA IPC handle of {owner} released more often than opened")
            m.users -= 1
            base, ordinal = m.base, m.ordinal
            last = m.users == 0
            done = None
            if last and not self.keeps:
                del self._open[k]
                done = self._closing[k] = threading.Event()
        try:
            devices.use(ordinal)
            fenced = self._batch_fences()
            # Reads already completed (a caller that synchronised): nothing to fence or
            # wait for (a fence and its synchronise cost ~20 µs on the H100 host).
            ours = _READS_DONE if D.stream_done(read_stream) else self.fences.stream(ordinal, read_stream, fenced)
        except BaseException:
            if done is not None:
                D.try_call("cuStreamSynchronize", read_stream)   # no fence: wait for the reads here
                self._close(k, base, done, ordinal)
            raise
        self._deferred.pending.append((k if (done is not None or last) else None, base, done, ordinal, ours))

    def _batch_fences(self):
        d = self._deferred
        if not getattr(d, "pending", None):
            d.pending = []
            d.fenced = set()
        return d.fenced

    def finish(self):
        """Wait for this thread's fenced reads (one synchronise per GPU), then close the
        mappings whose last record went, or keep them idle."""
        pending = getattr(self._deferred, "pending", None)
        if not pending:
            return
        self._deferred.pending = []
        synced = set()
        try:
            for _k, _base, _done, ordinal, ours in pending:
                if ours is not _READS_DONE and (ordinal, ours) not in synced:
                    synced.add((ordinal, ours))
                    devices.use(ordinal)
                    D.call("cuStreamSynchronize", ours)
        finally:
            idle = False
            for k, base, done, ordinal, _ours in pending:
                if done is not None:
                    self._close(k, base, done, ordinal)
                elif k is not None:
                    idle = self._went_idle(k) or idle
            if idle:
                self._evict_over_count()
                self._start()

    def _went_idle(self, k) -> bool:
        """Our last record on ``k`` went and its reads are done: keep the mapping idle
        (unless a decode took it again meanwhile)."""
        with self._lock:
            m = self._open.get(k)
            if m is None or m.users != 0 or k in self._idle:
                return False
            self._idle[k] = time.monotonic()
            return True

    # -- closing kept mappings ----------------------------------------------------------
    def _take_idle_locked(self, keys):
        out = []
        for k in keys:
            m = self._open.pop(k)
            del self._idle[k]
            done = self._closing[k] = threading.Event()
            out.append((k, m.base, done, m.ordinal))
        return out

    def _close_all(self, victims):
        for k, base, done, ordinal in victims:
            self._close(k, base, done, ordinal)
        return len(victims)

    def _evict_over_count(self):
        with self._lock:
            extra = len(self._idle) - max(0, self.max_count)
            victims = self._take_idle_locked(list(self._idle)[:extra]) if extra > 0 else []
        return self._close_all(victims)

    def sweep(self, now=None, *, flush=False, owner=None) -> int:
        """Close idle mappings: those idle longer than the bound (``flush``: every one, of
        ``owner`` only if given).  Returns how many were closed."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if flush:
                keys = [k for k in self._idle if owner is None or k[0] == owner]
            else:
                keys = [k for k, since in self._idle.items() if now - since >= self.max_idle_s]
            victims = self._take_idle_locked(keys)
        return self._close_all(victims) + (0 if flush else self._evict_over_count())

    def flush(self, owner=None) -> int:
        """Close every idle mapping (of ``owner``'s allocations only, if given): our
        ``empty_cache``, the owner's (``uncache``), or the owner gone."""
        return self.sweep(flush=True, owner=owner)

    def _start(self):
        if not self.background:
            return
        with self._lock:
            if not self._idle or (self._thread is not None and self._pid == os.getpid()):
                return
            self._pid = os.getpid()
            # None at interpreter exit (no thread may start then): the process's exit unmaps.
            self._thread = lifetime.start_thread(self._run, "comfy_env-cuda-ipc-cache")

    def _run(self):
        while True:
            with self._lock:
                if not self._idle:
                    self._thread = None
                    return
                first = next(iter(self._idle.values()))
            time.sleep(max(0.01, first + self.max_idle_s - time.monotonic()))
            try:
                self.sweep()
            except Exception:           # never kill the thread on one bad close
                log.exception("comfy_env: closing idle CUDA IPC mappings failed")

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
            return {"ipc_open": len(self._open) - len(self._idle), "ipc_idle": len(self._idle),
                    "ipc_opens_made": self.made, "ipc_hits": self.hits, "ipc_closed": self.closed}
