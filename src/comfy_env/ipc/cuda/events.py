"""Stream order across processes without a device sync: interprocess CUDA events.

The sender records an event on its stream after the producer's kernels (and our
copy, if any); the receiver enqueues ``cuStreamWaitEvent`` on its own stream before
anything reads.  Measured on an H100: opening a received event handle ~260 us,
enqueuing the wait ~27 us.  So each process keeps a small ring of events per device
and each receiver opens each (owner, slot) once and reuses it.

Reuse is safe because a slot is re-recorded only once its previous recording has
completed: a receiver that waits on a newer recording of the slot than the one its
message meant waits for work that finishes no earlier than what it needed.  A
receiver that finds the event already complete skips the wait altogether.
"""
from __future__ import annotations

import ctypes as C
import threading

from . import devices
from . import driver as D

__all__ = ["EventRing", "OpenedEvents"]

_FLAGS = D.EVENT_DISABLE_TIMING | D.EVENT_INTERPROCESS


class EventRing:
    """Interprocess events of one device that this process records."""

    MAX = 256

    def __init__(self, ordinal):
        self.ordinal = ordinal
        self._lock = threading.Lock()
        self._events = []          # [(CUevent, handle bytes)]
        self._reserved = set()     # slots named by a frame being encoded, not yet recorded
        self._next = 0

    def _new(self):
        ev = C.c_void_p()
        D.call("cuEventCreate", C.byref(ev), _FLAGS)
        h = D.IpcEventHandle()
        try:
            D.call("cuIpcGetEventHandle", C.byref(h), ev)
        except BaseException:
            D.try_call("cuEventDestroy_v2", ev)
            raise
        # bytes(h), not bytes(h.reserved): a c_char array stops at the first NUL byte.
        self._events.append((ev.value, bytes(h)))
        return len(self._events) - 1

    def _free_slot_locked(self):
        """A slot whose last recording completed and that no frame reserved (caller holds
        the lock); a new one while under :attr:`MAX`."""
        n = len(self._events)
        reserved = self._reserved
        for i in range(n):
            k = (self._next + i) % n
            if k not in reserved and D.try_call("cuEventQuery", self._events[k][0]) == D.CUDA_SUCCESS:
                break
        else:
            if n < self.MAX or len(reserved) >= n:
                k = self._new()
            else:
                # Every slot still pending: wait for the oldest unreserved one rather than grow.
                k = next((self._next + i) % n for i in range(n) if (self._next + i) % n not in reserved)
                D.call("cuEventSynchronize", self._events[k][0])
        self._next = k + 1
        return k

    def record(self, stream):
        """Record a free slot on ``stream``; returns ``(slot, handle bytes)``."""
        devices.use(self.ordinal)
        with self._lock:
            slot = self._free_slot_locked()
            ev, handle = self._events[slot]
            D.call("cuEventRecord", ev, stream)
            return slot, handle

    def reserve(self):
        """A slot for a recording still to come: ``(slot, handle bytes)``.

        A frame's descriptors name the slot as they are encoded; the frame records it
        once, just before it is sent (:meth:`record_reserved`), after every copy it
        enqueued (one record per frame and stream instead of one per copied tensor).
        No other recording may take the slot meanwhile.
        """
        devices.use(self.ordinal)
        with self._lock:
            slot = self._free_slot_locked()
            self._reserved.add(slot)
            return slot, self._events[slot][1]

    def record_reserved(self, slot, stream):
        """Record reserved ``slot`` on ``stream`` and give the reservation back."""
        devices.use(self.ordinal)
        with self._lock:
            self._reserved.discard(slot)
            D.call("cuEventRecord", self._events[slot][0], stream)

    def __len__(self):
        return len(self._events)


class OpenedEvents:
    """Peers' events opened here, by (owner uid, owner ordinal, slot)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._events = {}

    def wait(self, event_desc, ordinal, stream):
        """Make ``stream`` wait for the peer's event (skipped when it already completed)."""
        owner, owner_ordinal, slot, handle = event_desc
        key = (owner, owner_ordinal, slot)
        ev = self._events.get(key)
        devices.use(ordinal)
        if ev is None:
            with self._lock:
                ev = self._events.get(key)
                if ev is None:
                    h = D.IpcEventHandle()
                    C.memmove(C.byref(h), handle, 64)
                    out = C.c_void_p()
                    D.call("cuIpcOpenEventHandle", C.byref(out), h, detail=f"event {key}")
                    ev = self._events[key] = out.value
        if D.try_call("cuEventQuery", ev) == D.CUDA_SUCCESS:
            return False
        D.call("cuStreamWaitEvent", stream, ev, 0)
        return True

    def forget_owner(self, owner):
        with self._lock:
            for key in [k for k in self._events if k[0] == owner]:
                D.try_call("cuEventDestroy_v2", self._events.pop(key))
