"""VMM allocations exported as POSIX fds: the route for tensors of any size.

Why: importing one *pool* allocation larger than ~5.1 GiB kills the importing process
(H100, driver 580: 5,248 MiB fine, 5,264 MiB segfault, with or without torch).  A VMM
allocation (``cuMemCreate`` with the POSIX-fd handle type, exported with
``cuMemExportToShareableHandle``, imported with ``cuMemImportFromShareableHandle`` and
mapped with ``cuMemAddressReserve`` + ``cuMemMap`` + ``cuMemSetAccess``) imported
fine at 6 GiB and 12 GiB.  Each block is its own allocation, released (memory back to
the device at once, unlike a pool) when its last holder closes it.
"""
from __future__ import annotations

import ctypes as C
import os

from . import devices
from . import driver as D

__all__ = ["VmmBlock", "granularity"]

_gran = {}


def _prop(ordinal):
    p = D.AllocationProp()
    p.type = D.MEM_ALLOCATION_PINNED
    p.requestedHandleTypes = D.HANDLE_POSIX_FD
    p.location = D.MemLocation(D.MEM_LOCATION_DEVICE, ordinal)
    return p


def granularity(ordinal) -> int:
    g = _gran.get(ordinal)
    if g is None:
        v = C.c_size_t()
        D.call("cuMemGetAllocationGranularity", C.byref(v), C.byref(_prop(ordinal)), D.GRANULARITY_RECOMMENDED)
        g = _gran[ordinal] = v.value
    return g


class VmmBlock:
    """One mapped VMM allocation and the fd that shares it (owned by this object)."""

    __slots__ = ("ordinal", "size", "handle", "ptr", "fd", "closed")

    def __init__(self, ordinal, size, handle, ptr, fd):
        self.ordinal, self.size, self.handle, self.ptr, self.fd = ordinal, size, handle, ptr, fd
        self.closed = False

    @classmethod
    def create(cls, ordinal, nbytes):
        """A fresh allocation of at least ``nbytes``, mapped here and exported as an fd."""
        devices.use(ordinal)
        g = granularity(ordinal)
        size = max(g, (nbytes + g - 1) // g * g)
        h = C.c_uint64()
        D.call("cuMemCreate", C.byref(h), size, C.byref(_prop(ordinal)), 0, detail=f"{size} bytes")
        fd = C.c_int(-1)
        try:
            D.call("cuMemExportToShareableHandle", C.byref(fd), h.value, D.HANDLE_POSIX_FD, 0)
            ptr = _map(h.value, size, ordinal)
        except BaseException:
            if fd.value >= 0:
                os.close(fd.value)
            D.try_call("cuMemRelease", h.value)
            raise
        return cls(ordinal, size, h.value, ptr, fd.value)

    @classmethod
    def open(cls, fd, size, ordinal):
        """Map a peer's block from ``fd`` (kept open: we may forward it to a third process)."""
        devices.use(ordinal)
        h = C.c_uint64()
        D.call("cuMemImportFromShareableHandle", C.byref(h), C.c_void_p(fd), D.HANDLE_POSIX_FD,
               detail=f"VMM block of {size} bytes")
        try:
            ptr = _map(h.value, size, ordinal)
        except BaseException:
            D.try_call("cuMemRelease", h.value)
            raise
        return cls(ordinal, size, h.value, ptr, fd)

    def close(self):
        """Unmap and release (the caller made sure nothing still reads it)."""
        if self.closed:
            return
        self.closed = True
        devices.use(self.ordinal)
        try:
            D.call("cuMemUnmap", self.ptr, self.size)
            D.call("cuMemAddressFree", self.ptr, self.size)
            D.call("cuMemRelease", self.handle)
        finally:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


def _map(handle, size, ordinal) -> int:
    ptr = C.c_uint64()
    D.call("cuMemAddressReserve", C.byref(ptr), size, 0, 0, 0)
    try:
        D.call("cuMemMap", ptr.value, size, 0, handle, 0)
        try:
            descs, n = devices.access_for(ordinal)
            if n == 1 or D.try_call("cuMemSetAccess", ptr.value, size, descs, n) != D.CUDA_SUCCESS:
                # Peers refused (or none): the block's own GPU is what must work.
                descs, n = devices.access_for(ordinal, peers=False)
                D.call("cuMemSetAccess", ptr.value, size, descs, n)
        except BaseException:
            D.try_call("cuMemUnmap", ptr.value, size)
            raise
    except BaseException:
        D.try_call("cuMemAddressFree", ptr.value, size)
        raise
    return ptr.value
