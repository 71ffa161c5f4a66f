"""Where CPU bytes live: memfd segments, an arena of pre-faulted ones, the address map.

Segments are anonymous ``memfd`` files (Linux): no name in ``/dev/shm``, so
nothing is left behind whoever dies; the fd crosses the socket with
SCM_RIGHTS and the peer maps it.  The memory goes away when the last process
unmaps it.

Fresh pages cost ~1 GiB/s to fault in on the 2-core box against ~13.5 GiB/s
for pages already faulted (design.md §4), so owned segments are recycled
through an :class:`Arena`: a bounded free list by size class that gives idle
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
import threading
import time
from typing import TYPE_CHECKING, Any

from . import lifetime

if TYPE_CHECKING:       # annotations only: importing comfy_env never imports numpy
    import numpy

__all__ = ["Segment", "Arena", "ARENA", "shared_empty", "shared_like", "find_segment",
           "PLANE_NAME"]

PLANE_NAME = "shm"
_PAGE = mmap.PAGESIZE
_ids = itertools.count(1)
_MIN_SEGMENT = 1 << 20          # 1 MiB: small copies share a message segment (see arrays.py)


def _env_int(name, default):
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


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
STATS = {"maps": 0, "copies": 0, "copied_bytes": 0}


class Segment:
    """One memfd, mapped on first use.

    A segment received from a peer is only mapped when something is built on
    it: a result the parent forwards to another worker (zero-copy chain) is
    never mapped in the parent.
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
        self.mm = mm
        # A ctypes view pins the mapping and gives its address; arrays are built on it.
        self.buf = (ctypes.c_ubyte * self.size).from_buffer(mm)
        self.addr = ctypes.addressof(self.buf)
        ADDRESS_MAP.add(self)

    def ensure_mapped(self):
        if self.mm is None:
            with self._lock:
                if self.mm is None:
                    if self.fd < 0:
                        raise RuntimeError(f"segment {self.key} is closed")
                    mm = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE)
                    STATS["maps"] += 1
                    self._attach(mm)
        return self.mm

    @classmethod
    def create(cls, size):
        fd = os.memfd_create("comfy_env", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        return cls((PLANE_NAME, lifetime.PROCESS_UID, next(_ids)), fd, size, mm)

    @classmethod
    def open(cls, key, fd, size):
        """A segment received from a peer (takes ownership of ``fd``; maps lazily)."""
        return cls(key, fd, size)

    def close(self):
        """Drop our references: the mapping goes when the last array built on it does."""
        if self.mm is not None:
            ADDRESS_MAP.remove(self)
        self.buf = None
        mm, self.mm = self.mm, None
        try:
            if mm is not None:
                mm.close()
        except BufferError:
            pass       # arrays still use it; the mmap object unmaps when they are gone
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1


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
        self.max_free_bytes = (_env_int("COMFY_ENV_ARENA_BYTES", 1 << 30)
                               if max_free_bytes is None else max_free_bytes)
        self.idle_seconds = (_env_int("COMFY_ENV_ARENA_IDLE_S", 30)
                             if idle_seconds is None else idle_seconds)
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


# -- public helpers ---------------------------------------------------------------
def shared_empty(shape: int | tuple[int, ...], dtype: Any = float,
                 order: str = "C") -> numpy.ndarray:
    """A numpy array in comfy_env shared memory: passed to workers with no copy at all.

    Like ``numpy.empty(shape, dtype, order)`` (the contents are undefined).
    Arrays received from workers already live there; this is for inputs you
    build yourself (fill it, then submit it).  A worker that writes into it
    writes into this process's array: the memory is shared, not copied.

    Raises:
        TypeError: ``dtype`` holds Python objects, which cannot live in shared memory.
    """
    import numpy as np

    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise TypeError(f"shared_empty: dtype {dtype} holds Python objects, which cannot live "
                        f"in shared memory")
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    rec = ARENA.allocate(max(nbytes, 1))
    holder = holder_for(rec)
    return np.ndarray(shape, dtype, buffer=holder, offset=0, order=order)


def shared_like(arr: Any) -> Any:
    """A copy of ``arr`` (numpy array or torch CPU tensor) in comfy_env shared memory.

    Returns the same kind of object: a C-contiguous numpy array (anything
    ``numpy.asarray`` accepts becomes one) or a torch CPU tensor (keeping
    ``requires_grad``).  Pay the copy once; every later ``submit`` of the copy
    sends it with no copy at all.

    Raises:
        ValueError: a CUDA tensor (those travel through CUDA pools already).
    """
    mod = type(arr).__module__
    if mod.startswith("torch"):
        import torch

        from .arrays import tensor_on_record
        t = arr.detach()
        if t.device.type != "cpu":
            raise ValueError(f"shared_like: tensor is on {t.device}; only CPU tensors live in "
                             f"shared memory (CUDA tensors travel through CUDA pools)")
        nbytes = t.numel() * t.element_size()
        rec = ARENA.allocate(max(nbytes, 1))
        out = tensor_on_record(rec, 0, t.dtype, tuple(t.shape), _contiguous_strides(t.shape))
        out.copy_(t)
        if arr.requires_grad:
            out.requires_grad_(True)
        return out
    import numpy as np

    arr = np.asarray(arr)
    out = shared_empty(arr.shape, arr.dtype)
    np.copyto(out, arr)
    return out


def _contiguous_strides(shape):
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


def holder_for(record):
    """A ctypes view of the whole segment that counts as one user of ``record`` while alive.

    Arrays built on it keep it alive (numpy's ``base`` chain, torch through numpy).
    """
    seg = record.resource
    holder = (ctypes.c_ubyte * seg.size).from_buffer(seg.ensure_mapped())
    lifetime.LEDGER.holder(record, holder)
    return holder
