"""Where CPU bytes live: memfd segments, an arena of pre-faulted ones, the address map.

Segments are anonymous ``memfd`` files (Linux): no name in ``/dev/shm``, so
nothing is left behind whoever dies; the fd crosses the socket with
SCM_RIGHTS and the peer maps it.  The memory goes away when the last process
unmaps it.

Faulting fresh pages in costs an order of magnitude more than writing pages
already faulted (figures: docs/dataplane.md, "The arena"), so owned segments are
recycled through an :class:`Arena`: a bounded free list by size class that gives idle
memory back after a while.

Every mapped segment (owned or received) is entered in an address map, so an
array that already lives in shared memory (received from a peer, or made
with :func:`shared_empty`) is sent by reference: no copy at all.
"""
from __future__ import annotations

import bisect
import ctypes
import itertools
import mmap
import os
import resource
import threading
import time
import weakref

from .. import forksafe, settings
from . import lifetime


__all__ = ["Segment", "Arena", "ARENA", "holder_for", "find_segment",
           "PLANE_NAME"]

PLANE_NAME = "shm"
_PAGE = mmap.PAGESIZE
_ids = itertools.count(1)
_MIN_SEGMENT = 1 << 20          # 1 MiB: small copies share a message segment (see arrays.py)


def _size_class(n):
    """Round up to 1, 1.25, 1.5, 1.75 x a power of two (at most 25 % slack), page aligned."""
    n = max(n, _MIN_SEGMENT)
    p = 1 << (n - 1).bit_length()          # next power of two
    for f in (5, 6, 7, 8):
        c = (p // 8) * f
        if c >= n and p >= 8:
            break
    else:
        c = p
    return (c + _PAGE - 1) // _PAGE * _PAGE


# What the data plane did in this process (tests and benchmarks read these).
STATS = {"maps": 0, "copies": 0, "copied_bytes": 0, "moves": 0, "moved_bytes": 0}


class Segment:
    """One memfd, mapped on first use.

    A segment received from a peer is only mapped when something is built on
    it: a result the parent forwards to another worker (zero-copy chain) is
    never mapped in the parent.

    fds are the scarce resource (a soft limit of 1,024 is common), not
    mappings: a mapped segment does not need its fd, so it keeps one only while
    few segments do (:func:`_keep_fd`), and a received one gives it up as soon
    as it is mapped.  A frame that must carry the segment asks :meth:`fd_for`
    for an fd of its own: a dup, or the segment reopened through its mapping
    (``/proc/self/map_files``), closed once the frame is gone.
    """

    __slots__ = ("key", "fd", "size", "mm", "buf", "addr", "last_used", "_lock")

    def __init__(self, key, fd, size, mm=None):
        self.key = key
        self.fd = fd
        self.size = size
        self.mm = None
        self.buf = None
        self.addr = 0
        self.last_used = time.monotonic()
        self._lock = threading.Lock()
        if mm is not None:
            self._attach(mm)

    def _attach(self, mm):
        # ``mm`` is a ctypes array over the mapping (see _map); arrays are built on it.
        self.mm = self.buf = mm
        self.addr = ctypes.addressof(mm)
        ADDRESS_MAP.add(self)

    def ensure_mapped(self):
        if self.mm is None:
            with self._lock:
                if self.mm is None:
                    if self.fd < 0:
                        raise RuntimeError(f"segment {self.key} is closed")
                    mm = map_fd(self.fd, self.size)
                    STATS["maps"] += 1
                    self._attach(mm)
                    if _can_reopen():
                        # Mapped: the fd is no longer needed (fd_for reopens it).
                        _drop_fd(self)
        return self.mm

    def fd_for(self, frame_builder):
        """An fd of this segment for one outgoing frame, closed when the frame is gone.

        Always the frame's own: the segment's fd may be closed meanwhile by another
        thread (mapping it, or the last user dropping it) and its number reused.
        """
        fds = _frame_fds_of(frame_builder)
        fd = fds.get(self.key)
        if fd is not None:
            return fd               # many arrays of one frame share this segment
        with self._lock:
            if self.fd >= 0:
                fd = os.dup(self.fd)            # non-inheritable (PEP 446)
            elif self.mm is not None:
                fd = os.open(_map_files_path(self.addr, self.size), os.O_RDWR | os.O_CLOEXEC)
            else:
                raise RuntimeError(f"segment {self.key} is closed")
        fds[self.key] = fd
        return fd

    @classmethod
    def create(cls, size):
        fd = os.memfd_create("comfy_env", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            mm = map_fd(fd, size)
        except BaseException:
            os.close(fd)
            raise
        if not _keep_fd():
            os.close(fd)
            fd = -1
        return cls((PLANE_NAME, lifetime.PROCESS_UID, next(_ids)), fd, size, mm)

    @classmethod
    def open(cls, key, fd, size):
        """A segment received from a peer (takes ownership of ``fd``; maps lazily while
        few segments hold fds, at once otherwise)."""
        if _keep_fd():
            return cls(key, fd, size)
        try:
            mm = map_fd(fd, size)
        finally:
            os.close(fd)
        STATS["maps"] += 1
        return cls(key, -1, size, mm)

    def close(self):
        """Drop our references: the mapping goes when the last array built on it does."""
        if self.mm is not None:
            ADDRESS_MAP.remove(self)
        self.mm = self.buf = None
        with self._lock:
            _drop_fd(self)


# -- mappings without fds ------------------------------------------------------------------
# mmap.mmap keeps a dup of the fd it maps for as long as it lives (before 3.13's
# trackfd=False): one fd per mapped segment, on top of the segment's own.  Mapping
# through libc keeps none; the ctypes array over the mapping unmaps it when the last
# object built on it is gone.

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_int64]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


def map_fd(fd, size):
    """``size`` bytes of ``fd`` mapped shared, read-write, holding no fd (a ctypes array;
    unmapped when the last object built on it is gone)."""
    addr = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of a {size}-byte shared segment failed: {os.strerror(err)}")
    mm = (ctypes.c_ubyte * size).from_address(addr)
    fin = weakref.finalize(mm, _libc.munmap, addr, size)
    fin.atexit = False          # at exit the process unmaps; objects may still use it until then
    return mm


def _map_files_path(addr, size):
    return f"/proc/self/map_files/{addr:x}-{addr + size:x}"


_reopen_ok = None


def _can_reopen():
    """Can a mapped segment be reopened from its mapping?  (Needs /proc and, before
    Linux 4.3 or under some security policies, privileges.)  Checked once."""
    global _reopen_ok
    if _reopen_ok is None:
        ok = False
        try:
            fd = os.memfd_create("comfy_env-probe", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, _PAGE)
                mm = map_fd(fd, _PAGE)
            finally:
                os.close(fd)
            fd = os.open(_map_files_path(ctypes.addressof(mm), _PAGE), os.O_RDWR | os.O_CLOEXEC)
            os.close(fd)
            ok = True
        except OSError:
            pass
        _reopen_ok = ok
    return _reopen_ok


_fd_lock = threading.Lock()
_fds_held = 0                   # segments of this process that hold an fd


def _keep_fd():
    """May one more segment keep its fd?  Yes while few do (an eighth of the fd limit,
    at most 256): sending those costs no reopen.  Counts it if so."""
    global _fds_held
    if not _can_reopen():
        _count_fd(1)
        return True
    with _fd_lock:
        if _fds_held < _fd_budget():
            _fds_held += 1
            return True
    return False


def _count_fd(n):
    global _fds_held
    with _fd_lock:
        _fds_held += n


def _drop_fd(seg):
    """Close ``seg``'s fd (the caller holds ``seg._lock``)."""
    fd, seg.fd = seg.fd, -1
    if fd >= 0:
        _count_fd(-1)
        try:
            os.close(fd)
        except OSError:
            pass


def _fd_budget():
    try:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ValueError, OSError):
        return 64
    if soft == resource.RLIM_INFINITY:
        return 256
    return max(8, min(256, soft // 8))


# fds lent to frames: closed when the frame (its FrameBuilder) is garbage.
_frame_fds = {}                 # id(weakref) -> (weakref, {segment key: fd})


def _frame_fds_of(frame_builder):
    fds = frame_builder.__dict__.get("_shm_fds")
    if fds is None:
        fds = frame_builder._shm_fds = {}
        ref = weakref.ref(frame_builder, _frame_gone)
        _frame_fds[id(ref)] = (ref, fds)
    return fds


def _frame_gone(ref):
    entry = _frame_fds.pop(id(ref), None)
    if entry is not None:
        for fd in entry[1].values():
            try:
                os.close(fd)
            except OSError:
                pass


class _AddressMap:
    """Sorted map of mapped segments, to find the segment an array's memory lies in."""

    def __init__(self):
        self._lock = threading.Lock()
        self._starts = []
        self._segs = []

    def add(self, seg):
        with self._lock:
            i = bisect.bisect_left(self._starts, seg.addr)
            self._starts.insert(i, seg.addr)
            self._segs.insert(i, seg)

    def remove(self, seg):
        with self._lock:
            i = bisect.bisect_left(self._starts, seg.addr)
            if i < len(self._segs) and self._segs[i] is seg:
                del self._starts[i]
                del self._segs[i]

    def find(self, addr, nbytes):
        """The segment holding ``[addr, addr + nbytes)``, or None."""
        starts = self._starts
        if not starts:
            return None
        with self._lock:
            i = bisect.bisect_right(starts, addr) - 1
            if i < 0:
                return None
            seg = self._segs[i]
        if addr + nbytes <= seg.addr + seg.size:
            return seg
        return None

    def __len__(self):
        return len(self._starts)


ADDRESS_MAP = _AddressMap()


def find_segment(addr, nbytes):
    return ADDRESS_MAP.find(addr, nbytes)


class Arena:
    """Recycles owned segments so copies land in already-faulted pages.

    ``max_free_bytes`` bounds what is kept while unused (env
    ``COMFY_ENV_ARENA_BYTES``, default 1 GiB); segments unused for
    ``idle_seconds`` (env ``COMFY_ENV_ARENA_IDLE_S``, default 30) are given
    back to the system by a timer thread.
    """

    def __init__(self, max_free_bytes=None, idle_seconds=None):
        if max_free_bytes is None or idle_seconds is None:
            cfg = settings.read()
            max_free_bytes = cfg.arena_bytes if max_free_bytes is None else max_free_bytes
            idle_seconds = cfg.arena_idle_s if idle_seconds is None else idle_seconds
        self.max_free_bytes = max_free_bytes
        self.idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._free = {}                # size class -> [Segment]
        self.free_bytes = 0
        self._timer = None
        self.created = 0               # counters for tests and benchmarks
        self.reused = 0

    def allocate(self, nbytes):
        """An owned segment of at least ``nbytes``, registered in the ledger with no user yet."""
        size = _size_class(nbytes)
        with self._lock:
            lst = self._free.get(size)
            seg = lst.pop() if lst else None
            if seg is not None:
                self.free_bytes -= size
                self.reused += 1
        if seg is None:
            seg = Segment.create(size)
            self.created += 1
        seg.last_used = time.monotonic()
        return lifetime.LEDGER.add_owned(seg.key, seg, self._recycle)

    def _recycle(self, record):
        seg = record.resource
        seg.last_used = time.monotonic()
        with self._lock:
            if seg.size <= self.max_free_bytes:
                self._free.setdefault(seg.size, []).append(seg)
                self.free_bytes += seg.size
                drop = self._over_budget_locked()
            else:
                drop = [seg]
            start_timer = self._timer is None and self.idle_seconds >= 0
            if start_timer:
                self._timer = True          # claimed: started below, outside the lock
        for s in drop:
            s.close()
        if start_timer:
            # None at interpreter exit (no thread may start then): idle segments stay.
            self._timer = lifetime.start_thread(self._trim_loop, "comfy_env-arena")

    def _over_budget_locked(self):
        drop = []
        if self.free_bytes <= self.max_free_bytes:
            return drop
        # Oldest first.
        segs = sorted((s for lst in self._free.values() for s in lst), key=lambda s: s.last_used)
        for s in segs:
            if self.free_bytes <= self.max_free_bytes:
                break
            self._free[s.size].remove(s)
            self.free_bytes -= s.size
            drop.append(s)
        return drop

    def trim(self, older_than=0.0):
        """Give back free segments unused for ``older_than`` seconds (0: all)."""
        now = time.monotonic()
        drop = []
        with self._lock:
            for size, lst in self._free.items():
                keep = []
                for s in lst:
                    (drop if now - s.last_used >= older_than else keep).append(s)
                self._free[size] = keep
            self.free_bytes -= sum(s.size for s in drop)
        for s in drop:
            s.close()
        return len(drop)

    def _trim_loop(self):
        while True:
            time.sleep(max(1.0, self.idle_seconds / 4))
            self.trim(self.idle_seconds)


ARENA = Arena()


def holder_for(record):
    """A ctypes view of the whole segment that counts as one user of ``record`` while alive.

    Arrays built on it keep it alive (numpy's ``base`` chain, torch through numpy).
    """
    seg = record.resource
    holder = (ctypes.c_ubyte * seg.size).from_buffer(seg.ensure_mapped())
    lifetime.LEDGER.holder(record, holder)
    return holder


def _after_fork_in_child():
    # The arena's free segments are the parent's memory too: a child that reused one
    # would write into blocks the parent hands out.  It starts with an empty arena; its
    # copies of the parent's free segments (mappings, fds) go.
    free = [seg for lst in ARENA._free.values() for seg in lst]
    ARENA.__init__()
    ADDRESS_MAP._lock = threading.Lock()
    global _fd_lock
    _fd_lock = threading.Lock()
    for seg in free:
        seg._lock = threading.Lock()
        seg.close()
    for _ref, fds in list(_frame_fds.values()):
        for fd in fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        fds.clear()


forksafe.on_fork_child(_after_fork_in_child)
