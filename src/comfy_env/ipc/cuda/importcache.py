"""Keep a peer's pool pointer (or ipc storage) mapped for a while after our last tensor on it died.

Why: importing a pool pointer (``cuMemPoolImportPointer``) maps it, and freeing the
import (``cuMemFreeAsync`` + ``cuStreamSynchronize``) unmaps it; on an H100 that pair
costs a few hundred microseconds per tensor, more for big ones.  A worker that hands
the parent the same tensor again and again (cached outputs, weights, a reused output
buffer) paid it on every call.  With this cache the second message finds the block
still imported and costs no driver call.

How, without touching the lifetime protocol: the cache is one more *user* of the
block's ledger record (``LEDGER.hold``).  While it holds the record, the record
cannot reach zero, so nothing is freed and no release goes upstream; the exporter
keeps the block alive (it does so until every release arrived) and never reuses it.
Eviction drops the cache's hold with ``LEDGER.unhold``; when that was the last user,
the ledger runs the plane's ``on_zero`` (free the import, synchronise) and only then
posts the release upstream.  So a block the importer still maps is never freed or
reused by the exporter.

Bounds (idle entries only: an entry still used by a tensor costs no extra memory).
A zero-copy block that came from its owner has no byte bound: while the owner still
uses the tensor (a cached output, weights) our mapping costs no memory on either side,
and once its tensor died there the owner says so (``("reclaim", keys)``, see
``Sender._tensor_died``) and the entry goes as soon as it is idle here.  So what we
pin is bounded by what the owner could reuse, not by a fixed size (a fixed 256 MiB
unmapped a 1 GiB result the worker kept, and every call mapped it again: ~4 ms).
``COMFY_ENV_CUDA_IMPORT_CACHE_MIB`` bounds pool blocks forwarded by a third process,
whose owner cannot tell us (default 256; 0 stops keeping any pool block), ``..._COUNT``
entries (default 256: a call returning 32 small tensors keeps a few calls' worth of
recycled staging blocks mapped), ``..._S`` seconds idle (default 1.0).  ``..._COUNT`` or ``..._S`` at
0 disables the cache; ``..._MIB`` at 0 stops keeping pool blocks, and
``COMFY_ENV_CUDA_STAGING_CACHE_MIB`` at 0 stops recycling staging blocks.
Released: on eviction (LRU, over a bound, or idle too long), on
``torch.cuda.empty_cache()`` (here), when the owner asks (its own ``empty_cache``),
and once the link to the owner closed.  A background thread does the evicting, so
freeing never happens on the decode path; it exits when the cache is empty.

Zero-copy ``ipc`` storages are kept like owned ``pool`` blocks, but only those their
owner says it sent before (``IpcMeta.sent_before``): the record then costs the next
send no release, fence or synchronise; a first sight (a call's new output) is not
kept, so the owner's caching allocator gets its memory back for the next output.

Zero-copy ``pool`` blocks are kept, and ``staging`` blocks too: a staging block is
the sender's copy of one tensor, which the sender *recycles* for later tensors once
we are done with it (parent → worker 1 GiB went from ~3.4 ms, an import and an unmap
per call, to one device copy).  For that, a kept staging record gets an ``on_idle``
hook (``Ledger.unhold`` runs it when only the cache's hold is left): the plane waits
for our reads and tells the sender the block is idle, still mapped here; the sender
may then copy the next tensor into it and lend it again, and our import is reused.
Staging entries have their own byte bound, ``COMFY_ENV_CUDA_STAGING_CACHE_MIB``
(default 4096): their memory is the sender's staging pool, which keeps it reserved
until the sender's ``empty_cache`` anyway.  ``vmm`` blocks are never kept.

Races: a new message can lease a cached record (``LEDGER.accept_lease``) before its
decode adds a user.  Eviction therefore checks, under the ledger's lock, that the
record's lease count is unchanged since the cache last saw it, and drops its hold
(and, if it was the last user, takes the record out of the ledger) in that same
critical section; a lease arriving later builds a fresh record.  The free itself
(``on_zero``) and the release run outside the lock, in that order.
"""
from __future__ import annotations

import collections
import os
import threading
import time

from ... import settings
from .. import lifetime

__all__ = ["ImportCache", "limits_from_env"]


def limits_from_env():
    """``(max_bytes, max_count, max_idle_s, max_staging_bytes)`` from the environment."""
    cfg = settings.read()
    return (int(cfg.cuda_import_cache_mib * (1 << 20)), cfg.cuda_import_cache_count,
            cfg.cuda_import_cache_s, int(cfg.cuda_staging_cache_mib * (1 << 20)))


# What bounds an entry's bytes (index into the per-kind byte bounds of sweep()).
_FORWARDED, _STAGING, _OWNED = 0, 1, 2


class _Entry:
    __slots__ = ("rec", "nbytes", "owner", "leases_seen", "idle_since", "kind", "doomed")

    def __init__(self, rec, nbytes, owner, kind):
        self.rec = rec
        self.nbytes = nbytes
        self.owner = owner              # the exporting process's uid (pool key[0])
        self.leases_seen = rec.leases_in
        self.idle_since = None
        # _STAGING: a recycled staging block (own byte bound, on_idle hook); _OWNED: a
        # zero-copy block that came from its owner, who tells us when it stops using it
        # ("reclaim"): no byte bound; _FORWARDED: one a third process forwarded (its
        # owner cannot tell us): the pool byte bound.
        self.kind = kind
        self.doomed = False             # the owner reclaimed it: evict once idle


class ImportCache:
    """Ledger records of imported pool blocks, kept alive by one extra hold each."""

    def __init__(self, ledger, max_bytes=None, max_count=None, max_idle_s=None, background=True,
                 max_staging_bytes=None):
        env = limits_from_env()
        self.ledger = ledger
        self.max_bytes = env[0] if max_bytes is None else int(max_bytes)
        self.max_staging_bytes = env[3] if max_staging_bytes is None else int(max_staging_bytes)
        self.max_count = env[1] if max_count is None else int(max_count)
        self.max_idle_s = env[2] if max_idle_s is None else float(max_idle_s)
        self._lock = threading.Lock()
        self._entries = collections.OrderedDict()     # record key -> _Entry, LRU first
        self._bytes = 0                               # of all entries, busy ones included
        self._thread = None
        self._wake = threading.Event()
        self._pid = os.getpid()
        self.background = background      # False: only explicit sweep() calls evict (tests)
        self._reclaimed = set()           # keys the owner reclaimed before we decoded them
        self.hits = self.kept = self.evicted = 0

    @property
    def enabled(self) -> bool:
        """Whether zero-copy pool imports are kept (staging ones: ``max_staging_bytes`` > 0 too)."""
        return self.max_bytes > 0 and self.max_count > 0 and self.max_idle_s > 0

    # -- decode side ------------------------------------------------------------------
    def keep(self, rec, nbytes, owner, on_idle=None) -> bool:
        """A tensor was just decoded on ``rec`` (it holds a user): keep the import after it.

        ``on_idle``: a staging block; the hook runs whenever only our hold is left.
        Returns True when the record was already cached (a hit).
        """
        staging = on_idle is not None
        if staging:
            kind, bound = _STAGING, self.max_staging_bytes
        elif rec.upstream is not None and rec.upstream.uid == owner:
            # The owner tells us when it could reuse the block ("reclaim"); until then our
            # mapping costs no memory on either side: no byte bound.
            kind, bound = _OWNED, (float("inf") if self.max_bytes > 0 else 0)
        else:
            kind, bound = _FORWARDED, self.max_bytes
        if self.max_count <= 0 or self.max_idle_s <= 0 or nbytes > bound or bound <= 0:
            return False
        # A hit needs only our lock: sweep() decides under it too, and a lease counted
        # after we read ``leases_in`` just makes the entry look busy to the next sweep.
        with self._lock:
            if self._hit_locked(rec):
                return True
        with self.ledger.lock:          # a miss: the ledger's lock first, as in sweep()
            with self._lock:
                if self._hit_locked(rec):
                    return True
                if rec.key in self._entries:   # a stale entry (cannot happen while we hold it)
                    return False
                if self._reclaimed and rec.key in self._reclaimed:
                    self._reclaimed.discard(rec.key)     # the owner let go before we decoded it
                    return False
                self.ledger.hold(rec)
                rec.on_idle = on_idle
                self._entries[rec.key] = _Entry(rec, nbytes, owner, kind)
                self._bytes += nbytes
                self.kept += 1
                # Wake the evictor early only when well over a bound (its sweep walks every
                # entry); otherwise its periodic sweep is enough.
                over = (len(self._entries) > 2 * self.max_count
                        or self._bytes > 2 * (self.max_bytes + self.max_staging_bytes))
                start = self.background and (self._thread is None or self._pid != os.getpid())
        if start:
            self._start()
        if over:
            self._wake.set()
        return False

    def _hit_locked(self, rec):
        """``rec`` is cached: mark it used now (caller holds our lock)."""
        e = self._entries.get(rec.key)
        if e is None or e.rec is not rec:
            return False
        e.leases_seen = rec.leases_in
        e.idle_since = None
        self._entries.move_to_end(rec.key)
        self.hits += 1
        return True

    # -- eviction -----------------------------------------------------------------------
    def _idle(self, e):
        rec = e.rec
        if rec.users > 1:
            return False
        # A lease taken since we last looked means a decode is about to add a user.
        return rec.upstream is None or rec.upstream.closed or rec.leases_in == e.leases_seen

    def sweep(self, now=None, *, flush=False, owner=None):
        """Evict what is over a bound or idle too long (``flush``: every idle entry,
        of ``owner`` only if given).  Returns the number evicted."""
        now = time.monotonic() if now is None else now
        with self.ledger.lock:
            with self._lock:
                idle = []
                for key, e in self._entries.items():
                    if self._idle(e):
                        if e.idle_since is None:
                            e.idle_since = now
                        idle.append(e)
                    else:
                        e.idle_since = None
                victims = []
                if flush:
                    victims = [e for e in idle if owner is None or e.owner == owner]
                else:
                    victims = [e for e in idle if e.doomed or e.rec.upstream is None or e.rec.upstream.closed
                               or now - e.idle_since >= self.max_idle_s]
                    rest = [e for e in idle if e not in victims]          # LRU order
                    nbytes = [0, 0, 0]
                    for e in rest:
                        nbytes[e.kind] += e.nbytes
                    bound = [self.max_bytes, self.max_staging_bytes, float("inf")]
                    count = len(rest)
                    for e in rest:
                        if count <= self.max_count and nbytes[0] <= bound[0] and nbytes[1] <= bound[1]:
                            break
                        if count > self.max_count or nbytes[e.kind] > bound[e.kind]:
                            count -= 1
                            nbytes[e.kind] -= e.nbytes
                            victims.append(e)
                for e in victims:
                    del self._entries[e.rec.key]
                    self._bytes -= e.nbytes
                    e.rec.on_idle = None
            # Drop our hold under the ledger's lock, in the same critical section as the
            # idle check: a lease that arrives after it finds no record and opens the
            # block afresh (PoolImports counts references per pointer, so a re-import
            # racing with our free either shares the mapping or maps it again).
            zero = [self.ledger.drop_locked(e.rec) for e in victims]
        # Free outside the ledger's lock (decodes must not wait for a free and a
        # synchronise), and release upstream only after the free, as Ledger.unhold does.
        n = len(victims)
        frees = [(e.rec, z) for e, z in zip(victims, zero) if z is not None]
        if frees:
            self.ledger.free_many(frees)
        self.evicted += n
        return n

    def reclaim(self, keys):
        """The owner stopped using blocks ``keys``: evict them now if idle, else once idle
        (the next sweep after our last tensor on them died); a key not cached yet is
        not kept when its decode arrives.  Returns the number evicted now."""
        doomed = False
        with self._lock:
            for key in keys:
                e = self._entries.get(key)
                if e is not None:
                    e.doomed = doomed = True
                else:
                    if len(self._reclaimed) >= 4096:
                        self._reclaimed.clear()  # keys whose decode never came; only a hint
                    self._reclaimed.add(key)
        if not doomed:
            return 0
        n = self.sweep()
        if self.background:
            self._wake.set()             # one still in use goes at the next sweep after it died
        return n

    def flush(self, owner=None):
        return self.sweep(flush=True, owner=owner)

    def _start(self):
        with self._lock:
            if self._thread is not None and self._pid == os.getpid():
                return
            self._pid = os.getpid()
            # None at interpreter exit (no thread may start then): nothing is evicted.
            self._thread = t = lifetime.start_thread(self._run, "comfy_env-cuda-import-cache")
        return t

    def _run(self):
        period = max(0.01, min(0.25, self.max_idle_s / 4))
        while True:
            self._wake.wait(period)
            self._wake.clear()
            try:
                self.sweep()
            except Exception:           # never kill the thread on one bad free
                import logging
                logging.getLogger("comfy_env.cuda").exception("comfy_env: import cache sweep failed")
            with self._lock:
                if not self._entries:
                    self._thread = None
                    return

    def __len__(self):
        return len(self._entries)

    def stats(self):
        with self._lock:
            return {"entries": len(self._entries), "bytes": sum(e.nbytes for e in self._entries.values()),
                    "hits": self.hits, "kept": self.kept, "evicted": self.evicted}
