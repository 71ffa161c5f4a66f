"""Who may still read a block of shared memory: the per-process ledger.

A *block* is a unit of shared memory owned by exactly one process: a memfd
segment (CPU plane) or an exported CUDA allocation (CUDA plane).  Its *key*
is globally unique: ``(plane, owner_uid, local_id)``.

Each process keeps one :class:`Record` per block it knows.  ``users`` counts

* local holders: objects decoded on top of the block (one per message and
  block, kept alive by the arrays built on it) and lazy results, and
* lends: messages that carried the block to a peer and that the peer has
  not released yet.

When ``users`` drops to zero an owned block goes back to its plane (arena,
pool); a remote block is unmapped and the leases we took from our upstream
peer are released to it.  Leases form a tree: a record is kept alive through
exactly one upstream peer; a lease arriving from any other peer for a key we
already hold is released straight back, which is what keeps cycles (the
parent lends S to a worker that returns a view of S) from pinning memory.

Release messages are *posted*: finalizers run at arbitrary points (inside
the garbage collector, possibly while the socket's send lock is held by the
same thread), so they only append to a deque and poke a pipe; a daemon thread
does the actual sends.

Interpreter exit: once the process has begun to exit (:func:`exiting`), no
thread of comfy_env's may start (:func:`start_thread`).  Results still alive
then are freed by the interpreter's last garbage collection; their releases
stay queued (the workers are stopped by then, or stop with this process, and
their blocks go with them).
"""
from __future__ import annotations

import collections
import itertools
import os
import sys
import threading
import time
import uuid
import weakref

from . import interrupts, protocol
from .protocol import Release

__all__ = ["Ledger", "Record", "Link", "LEDGER", "PROCESS_UID", "exiting", "start_thread"]

# Identifies this process in block keys.  pids are reused; a uuid is not.
PROCESS_UID = uuid.uuid4().hex[:16]

_exiting = False


def exiting() -> bool:
    """Has this process begun to exit?  Then nothing of ours may start a thread or block.

    True once the interpreter finalises (``sys.is_finalizing()``), and already
    once the executor's at-exit shutdown is over (:func:`begin_exit`), when
    atexit callbacks follow.  (Python 3.12 refuses new threads even earlier, in
    threading's exit hooks: :func:`start_thread` then returns None too.)
    """
    return _exiting or sys.is_finalizing()


def begin_exit():
    """Mark the process as exiting (see :func:`exiting`); called at interpreter exit."""
    global _exiting
    _exiting = True


def start_thread(target, name, args=()):
    """Start a daemon thread running ``target(*args)``; None if no thread may start now.

    Every thread comfy_env starts lazily goes through here.  At interpreter exit
    ``Thread.start()`` waits forever on Python 3.10/3.11 (the new thread is never
    let run, so it never says it started) and raises RuntimeError on 3.12+ (from
    atexit callbacks too): a caller that gets None does its work inline, later,
    or not at all.
    """
    if exiting():
        return None
    t = threading.Thread(target=target, args=args, name=name, daemon=True)
    try:
        t.start()
    except RuntimeError:            # "can't create new thread at interpreter shutdown"
        return None
    return t


class Link:
    """One peer of this process (the parent, or one worker) as the data planes see it.

    ``post`` queues a control message for the peer; the ledger's flusher thread
    sends them.  A process about to send the peer a frame (a call, a result) drains
    inline first, so that its releases overtake that frame, and sends what is queued
    for that peer in the same write (``LEDGER.drain(keep=link)`` returns it).
    """

    def __init__(self, send_control, name="peer"):
        self._send_control = send_control   # callable(list_of_messages)
        self.name = name
        self.uid = None                     # the peer's PROCESS_UID, from the handshake
        self._closed = False
        self._posts = collections.deque()
        self.lent = collections.Counter()   # key -> outstanding lends to this peer
        self.held = 0                       # our records held through leases from this peer
        self.state = {}                     # plane name -> per-peer plane state

    # Changes whenever a link of this process closes: a plane that must notice closed
    # peers (the CUDA plane, before each frame) compares it instead of looking at every
    # link.  Each close stores a new number from one counter (``next`` is atomic; no lock,
    # which a forked child could inherit held: forksafe closes links there).
    closes = 0
    _close_serial = itertools.count(1)

    @property
    def closed(self) -> bool:
        """The peer is gone (set by ``LEDGER.link_closed``; never cleared)."""
        return self._closed

    @closed.setter
    def closed(self, value) -> None:
        if value and not self._closed:
            self._closed = True       # before the count: whoever sees the new count sees the flag
            Link.closes = next(Link._close_serial)
        elif not value and self._closed:
            raise ValueError("a closed link stays closed")

    def post(self, message) -> None:
        """Queue ``message`` for the peer.  Safe from finalizers and any thread."""
        if not self._closed:
            self._posts.append(message)
            LEDGER.poke(self)

    def requeue(self, messages) -> None:
        """Put back ``messages`` taken for a frame that was not sent (its encoding failed),
        for the next send or drain.  Never raises: the failure being handled may be the
        process running out of fds, and waking the flusher (its first wake makes a pipe)
        can then fail too; the messages stay queued for the next frame to take."""
        if self.closed or not messages:
            return
        self._posts.extend(messages)
        try:
            LEDGER.poke(self)
        except Exception:
            pass

    def take_posts(self):
        posts = self._posts
        if not posts:
            return []                     # the usual case: each call and result asks
        out = []
        while True:
            try:
                out.append(posts.popleft())
            except IndexError:
                return out

    def flush(self) -> None:
        if not self._posts:
            return                        # the common case before each call: nothing queued
        msgs = self.take_posts()
        if msgs and not self.closed:
            try:
                self._send_control(msgs)
            except Exception:
                # A dead peer needs no releases; close() will settle the counts.
                pass

    def __repr__(self):
        return f"<Link {self.name} uid={self.uid}>"


class Record:
    """What this process knows of one block."""

    __slots__ = ("key", "resource", "users", "upstream", "leases_in", "owned", "on_zero", "on_idle",
                 "__weakref__")

    def __init__(self, key, resource, owned, upstream=None, on_zero=None):
        self.key = key
        self.resource = resource        # plane-specific: a segment, an imported pointer, ...
        self.owned = owned
        self.upstream = upstream        # Link we hold leases from (remote blocks)
        self.leases_in = 0              # leases taken from upstream, released at zero
        self.users = 0
        self.on_zero = on_zero          # callable(record): recycle / unmap
        # callable(record), set by a cache that holds one user of the record: runs when
        # ``users`` falls back to 1, i.e. when nothing but that cache uses the block.
        # It may return a callable that finishes the batch (see Ledger.unhold_all).
        self.on_idle = None


class Ledger:
    """All records of this process, plus the thread that sends posted releases."""

    BATCH_S = 0.0002            # the flusher's nap after a wake-up (see _run)

    def __init__(self):
        self._lock = threading.RLock()
        self._records = {}
        self._holders = {}              # id(weakref) -> (weakref, record): see holder()
        self._dirty = collections.deque()
        self._wake_r = self._wake_w = None
        self._wake_pending = False      # a byte is in the pipe: no need to write another
        self._burst = False             # holders died since the flusher last woke (see _run)
        self._hushed = False            # dead holders do not wake the flusher (see hush)
        self._thread = None
        # One drain at a time.  A caller that drains inline does so to order what it sends
        # next after every release queued so far; without this, the flusher could have
        # popped a dead holder and be freeing it (its release not posted yet) while the
        # inline drain finds nothing queued and returns, so the call overtook its release.
        self._drain_lock = threading.RLock()

    # -- records -----------------------------------------------------------
    def get(self, key):
        return self._records.get(key)

    def add_owned(self, key, resource, on_zero):
        with self._lock:
            rec = Record(key, resource, owned=True, on_zero=on_zero)
            self._records[key] = rec
            return rec

    def accept_lease(self, key, link, make_resource, on_zero):
        """A message from ``link`` lent us ``key``.  Returns the record.

        ``make_resource()`` builds the plane resource for a block we did not
        know yet.  A redundant lease (we own the block or hold it through
        another peer) is released straight back.
        """
        return self.accept_leases(link, (key,), lambda _i: (make_resource(), on_zero))[0]

    def accept_leases(self, link, keys, make, out=None):
        """:meth:`accept_lease` for each of ``keys``, in order, under one acquisition of
        the lock.  ``make(i)`` returns ``(resource, on_zero)`` for ``keys[i]`` when the
        block is new here.  Records are appended to ``out`` (returned) as they are
        taken, so that a caller whose ``make`` raised knows which leases it holds.
        """
        if out is None:
            out = []
        redundant = None
        try:
            with self._lock:
                records = self._records
                for i, key in enumerate(keys):
                    rec = records.get(key)
                    if rec is None:
                        resource, on_zero = make(i)
                        rec = records[key] = Record(key, resource, owned=False, upstream=link, on_zero=on_zero)
                        link.held += 1
                    if rec.upstream is link:
                        rec.leases_in += 1
                    else:
                        if redundant is None:
                            redundant = []
                        redundant.append(key)
                    out.append(rec)
        finally:
            if redundant:
                for key in redundant:
                    link.post(Release(key, 1))
        return out

    def hold(self, rec, n=1):
        with self._lock:
            rec.users += n

    def hold_all(self, recs):
        """:meth:`hold` each of ``recs`` once, under one acquisition of the lock."""
        with self._lock:
            for rec in recs:
                rec.users += 1

    @property
    def lock(self):
        """The ledger's (re-entrant) lock, for planes that check and lend atomically."""
        return self._lock

    def unhold(self, rec, n=1):
        """Drop ``n`` users; free the record when none is left.

        When only one user is left and the record has an ``on_idle`` hook (a cache
        holds that last user), the hook runs, outside the lock.
        """
        self.unhold_all((rec,), n)

    def unhold_all(self, recs, n=1):
        """:meth:`unhold` each of ``recs``: the bookkeeping under one acquisition of the
        lock, then the frees (as one batch, :meth:`free_many`) and idle hooks outside it."""
        frees = idles = None
        with self._lock:
            for rec in recs:
                last = self.drop_locked(rec, n)
                if last is not None:
                    if frees is None:
                        frees = []
                    frees.append((rec, last))
                elif rec.users == 1 and rec.on_idle is not None:
                    if idles is None:
                        idles = []
                    idles.append((rec, rec.on_idle))
        if frees:
            self.free_many(frees)
        if idles:
            # A hook may return a finisher that completes the batch (the CUDA plane
            # records one event per stream and sends one message per peer): each
            # distinct finisher runs once, after every hook.
            finishers = []
            for rec, idle in idles:
                fin = idle(rec)
                if fin is not None and fin not in finishers:
                    finishers.append(fin)
            for fin in finishers:
                fin()

    def drop_locked(self, rec, n=1):
        """``unhold``'s bookkeeping half; the caller holds :attr:`lock`.

        Returns ``(upstream, leases)`` when that was the last user (then call
        :meth:`free`, outside the lock if the free may block), else None.
        """
        rec.users -= n
        if rec.users > 0:
            return None
        upstream, leases = rec.upstream, rec.leases_in
        if self._records.get(rec.key) is rec:
            del self._records[rec.key]
            if upstream is not None:
                upstream.held -= 1
        rec.leases_in = 0
        return upstream, leases

    def free_many(self, items):
        """``unhold``'s second half for ``(record, last)`` pairs, as one batch: free the
        blocks, then release them upstream.

        Free first, release after: the exporter may reuse or free the block as
        soon as it reads the release, so our unmap / CUDA free must be done by then.

        A plane's ``on_zero`` may start an asynchronous free and return a callable
        that completes it (the CUDA plane: one stream synchronise for a whole batch
        of imported pointers instead of one each).  Every distinct one runs once,
        after all the frees started and before any release is posted.
        """
        finishers = []
        try:
            for rec, _last in items:
                if rec.on_zero is not None:
                    fin = rec.on_zero(rec)
                    if fin is not None and fin not in finishers:
                        finishers.append(fin)
        finally:
            # Even if a plane's on_zero raised: the frees it started must complete.
            for fin in finishers:
                fin()
        for rec, (upstream, leases) in items:
            if upstream is not None and leases:
                upstream.post(Release(rec.key, leases))

    def sweep(self, recs):
        """Free records that a failed or empty decode left with no user."""
        with self._lock:
            idle = [rec for rec in recs if rec.users <= 0 and self._records.get(rec.key) is rec]
            for rec in idle:
                rec.users += 1
        if idle:
            self.unhold_all(idle)

    def lend(self, rec, link, n=1):
        with self._lock:
            rec.users += n
            link.lent[rec.key] += n

    def holder(self, rec, obj):
        """Count ``obj`` (anything weak-referenceable) as a user of ``rec`` while it lives."""
        self.hold(rec)
        # A bare weakref with a callback, kept here: a third of weakref.finalize's cost
        # (no registry, no atexit hook), which is paid once per decoded array or tensor.
        ref = weakref.ref(obj, self._holder_died)
        self._holders[id(ref)] = (ref, rec)

    @interrupts.holds
    def _holder_died(self, ref, _sys=sys):
        # Runs inside the garbage collector: never block, never send here.  The record
        # is queued before its entry goes: a signal handler raising in between (Ctrl-C
        # on the main thread) then leaves a stale entry, never a block nobody releases.
        entry = self._holders.get(id(ref))
        if entry is not None:
            self._dirty.append(entry[1])
            self._holders.pop(id(ref), None)
            self._burst = True
            try:
                self._wake()
            except Exception:
                # An object torn down after this module (kept on sys or builtins) dies
                # while the interpreter clears modules: their globals are None by then,
                # and the process's segments go with it.  ``_sys`` is bound at definition.
                if not _sys.is_finalizing():
                    raise

    # -- control messages ---------------------------------------------------
    def on_release(self, link, key, n):
        with self._lock:
            if link.lent[key] < n:
                n = link.lent[key]
            if n <= 0:
                return
            link.lent[key] -= n
            if not link.lent[key]:
                del link.lent[key]
            rec = self._records.get(key)
        if rec is not None:
            self.unhold(rec, n)

    def link_closed(self, link):
        """The peer is gone: its lends will never be released; its leases need no release."""
        link.closed = True
        with self._lock:
            lent = dict(link.lent)
            link.lent.clear()
            for rec in self._records.values():
                if rec.upstream is link:
                    rec.leases_in = 0
                    rec.upstream = None
            link.held = 0
        for key, n in lent.items():
            rec = self._records.get(key)
            if rec is not None:
                self.unhold(rec, n)

    # -- the flusher ----------------------------------------------------------
    def poke(self, link):
        self._dirty.append(link)
        self._wake()

    def hush(self):
        """Until :meth:`drain_hushed`, what is queued does not wake the flusher.

        For a thread about to drop objects and drain inline right after (the worker,
        once a call returned: its arguments' holders die): waking the flusher would
        only cost a syscall, a thread switch and the GIL handed back and forth, in the
        middle of sending the result.  Whatever any thread queues meanwhile is drained
        by that :meth:`drain_hushed`."""
        self._hushed = True

    def drain_hushed(self, keep=None):
        """Drain what was queued, then end :meth:`hush` (anything queued after this wakes
        the flusher as usual).  ``keep``: as for :meth:`drain`, whose answer it returns.

        Still hushed while it drains: the frees it runs post releases, which this same
        drain sends; waking the flusher for them only had it find nothing to do."""
        try:
            kept = self.drain(keep)
        finally:
            self._hushed = False
        if self._dirty:
            self._wake()              # queued by another thread after the drain's last look
        return kept

    def _wake(self):
        # One byte in the pipe is enough: the flusher clears the flag before it drains,
        # so whatever was queued before this call is drained after it (one write per
        # burst of dead holders, not one syscall per tensor).
        if self._wake_pending or self._hushed:
            return
        if self._thread is None and not self._start():
            return                        # exiting: what is queued stays queued
        self._wake_pending = True
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass                          # the pipe is full: a wake-up is pending anyway

    def _start(self):
        """Start the flusher; False when no thread may start (the process is exiting)."""
        if exiting():
            return False
        with self._lock:
            if self._thread is not None:
                return True
            r, w = os.pipe()
            os.set_blocking(w, False)
            self._wake_r, self._wake_w = r, w
            t = start_thread(self._run, "comfy_env-ledger")
            if t is None:
                os.close(r)
                os.close(w)
                self._wake_r = self._wake_w = None
                return False
            self._thread = t
            return True

    def _run(self):
        while True:
            try:
                os.read(self._wake_r, 4096)
            except OSError:
                return
            # Holders died: let the burst finish first.  Dropping a list of tensors kills
            # their holders one by one, and torch releases the GIL while it frees each
            # tensor: a flusher that runs at once takes the GIL there, drains one holder
            # and sleeps again, for every tensor (a thread switch each way).  After a
            # short nap it drains the whole burst in one go; releases leave at most this
            # much later (and the executor flushes them before it sends the next call).
            if self._burst:
                self._burst = False
                time.sleep(self.BATCH_S)
            self._wake_pending = False
            self.drain()

    def drain(self, keep=None):
        """Apply dead holders and send posted messages.  Called by the flusher, or inline:
        when it returns, whatever was queued before the call has been sent, even if the
        flusher had started on it.

        ``keep``: a link whose messages are not sent but returned (taken under the drain
        lock, so the flusher cannot send them meanwhile, after the caller's frame): the
        caller is about to send that peer a frame and sends them in the same write, ahead
        of it (one send and one wake-up of the peer instead of two).  None without it."""
        with self._drain_lock:
            self._drain(keep)
            return keep.take_posts() if keep is not None else None

    def _drain(self, keep=None):
        dirty = self._dirty
        while dirty:
            links = set()
            dead = []
            while True:
                try:
                    item = dirty.popleft()
                except IndexError:
                    break
                if type(item) is Record:
                    dead.append(item)
                else:
                    links.add(item)
            if dead:
                self.unhold_all(dead)     # frees post releases: sent by the next pass
            for link in links:
                if link is not keep:
                    link.flush()

    def __len__(self):
        return len(self._records)

    def leased_from(self, link):
        """How many blocks this process holds through leases from ``link``."""
        return link.held

    def records(self):
        with self._lock:
            return list(self._records.values())


LEDGER = Ledger()


@protocol.handles(Release)
def _apply_release(link, msg):
    LEDGER.on_release(link, msg.key, msg.n)


def _after_fork_in_child():
    # The flusher thread and its pipe belong to the parent: start afresh (records of
    # the parent's blocks mean nothing in a forked child).
    LEDGER.__init__()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

# For processes without an executor (workers); the executor's at-exit hook calls
# begin_exit() itself when it is done.
if hasattr(threading, "_register_atexit"):
    threading._register_atexit(begin_exit)
else:  # pragma: no cover
    import atexit
    atexit.register(begin_exit)
