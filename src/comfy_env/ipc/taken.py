"""Which call a worker last took off its channel: one slot both processes map.

A worker killed while idle (the OOM killer, a test's ``SIGKILL``) can be handed a call
between the signal and the kernel closing its end of the socket: the send succeeds,
the bytes die with the process, and nothing of the call ran.  The socket cannot tell
afterwards (the dead end's queue is freed with it), so the worker says it: as it takes
each call off the channel, before anything of it is decoded, it writes the call's id
into an 8-byte slot of shared memory (a memfd it creates and hands the parent with its
handshake).  After the death the parent reads the slot: another id means the call
never left the channel, so it can go to another worker (executor.py, ``on_death``).

Both sides close the fd once mapped: the slot costs a page per worker, no fd.
"""
from __future__ import annotations

import os

from .shm import map_fd

__all__ = ["WorkerSlot", "ParentSlot"]

_SIZE = 8
# Not "comfy_env-...": that prefix names the data plane's segments, which tests and
# diagnostics count; this is one fixed page per worker.
_NAME = "comfy-env-taken-call"


def _cell(fd):
    """The slot of ``fd`` as one unsigned 64-bit integer (mapped without keeping an fd)."""
    return memoryview(map_fd(fd, _SIZE)).cast("B").cast("Q")


class WorkerSlot:
    """The worker's side: :meth:`create` it, hand :attr:`fd` to the parent, then
    :meth:`took` each call as it comes."""
    __slots__ = ("fd", "_cell")

    def __init__(self, fd):
        self.fd = fd                        # the memfd, until handed over (close_fd)
        self._cell = _cell(fd)

    @classmethod
    def create(cls):
        """A new slot, or None where this system has no memfd (the parent then treats
        every call as taken, as before the slot existed)."""
        try:
            fd = os.memfd_create(_NAME, os.MFD_CLOEXEC)
        except (AttributeError, OSError):
            return None
        try:
            os.ftruncate(fd, _SIZE)
            return cls(fd)
        except OSError:
            os.close(fd)
            return None

    def close_fd(self):
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def took(self, call_id):
        self._cell[0] = call_id


class ParentSlot:
    """The parent's view of a worker's slot."""
    __slots__ = ("_cell",)

    def __init__(self, fd):
        """Maps ``fd`` (the worker's memfd, from its handshake) and closes it, whatever
        happens.  Raises OSError if it cannot be mapped."""
        try:
            self._cell = _cell(fd)
        finally:
            os.close(fd)

    def last(self):
        """The id of the last call the worker took (0: none yet)."""
        return self._cell[0]

    def close(self):
        self._cell.release()
