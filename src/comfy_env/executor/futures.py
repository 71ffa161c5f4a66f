"""Futures whose results stay in shared memory until somebody asks for them.

A worker's result arrives as a frame: an envelope, pickle bytes and the
blocks (shared-memory segments, CUDA exports) it refers to.  The parent takes
the leases on those blocks at once, so the memory stays valid, but only
decodes the pickle when ``result()`` is called.  Passing the future itself to
another executor's ``submit`` forwards the undecoded frame to the next worker:
the parent never maps, imports or copies the payload (zero-copy chains).
"""
from __future__ import annotations

import threading
import weakref
from concurrent.futures import Future
from typing import Any

from ..ipc import codec, lifetime

__all__ = ["IsolatedFuture", "LazyResult"]


class LazyResult:
    """An undecoded result: one part of a received frame plus the leases it holds."""

    def __init__(self, frame, link):
        self.frame = frame
        self.link = link
        self.records = codec.accept_part_leases(frame, 0, link)
        lifetime.LEDGER.hold_all(self.records)
        # The frame's fds now belong to the records (or were duplicates).
        frame.close_fds()
        self._finalizer = weakref.finalize(self, _drop_holds, list(self.records))
        self.materialisations = 0

    def materialise(self):
        """Decode the part (maps the segments, imports the tensors) in this process."""
        self.materialisations += 1
        return codec.decode_part(self.frame, 0, self.link, records=dict(enumerate(self.records)))

    @property
    def part(self):
        return self.frame.parts[0]

    def release(self):
        self._finalizer()

    def hold_extra(self):
        lifetime.LEDGER.hold_all(self.records)

    def unhold_extra(self):
        lifetime.LEDGER.unhold_all(self.records)


def _drop_holds(records):
    lifetime.LEDGER.unhold_all(records)


class IsolatedFuture(Future):
    """A ``concurrent.futures.Future`` whose result is decoded on first use.

    Returned by :meth:`IsolatedExecutor.submit`; every ``Future`` method works
    as usual.  A worker's result arrives as pickle bytes plus references to
    shared memory; it is decoded (segments mapped, tensors imported) by the
    first ``result()``, and later calls return the same object.  ``done()``,
    ``exception()``, ``cancelled()`` and ``add_done_callback()`` never decode,
    so a future that is only passed on to another executor's ``submit`` is
    forwarded worker to worker without the parent touching the data.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lazy = None
        self._materialise_lock = threading.Lock()

    def _set_lazy_result(self, lazy: LazyResult):
        self._lazy = lazy
        self.set_result(lazy)

    def result(self, timeout: float | None = None) -> Any:
        """The call's return value, decoded in this process on first use.

        Waits up to ``timeout`` seconds (``None``: no limit) and raises
        ``concurrent.futures.TimeoutError`` after that, ``CancelledError`` if
        the call was cancelled, or the call's exception.  If the value cannot be
        decoded here (a class or package this process lacks), that error is
        raised, now and on every later call.
        """
        value = super().result(timeout)
        if self._lazy is None or value is not self._lazy:
            return value
        with self._materialise_lock:
            lazy = self._lazy
            if lazy is None:
                return self._result
            try:
                value = lazy.materialise()
            except BaseException as exc:
                # The payload could not be decoded here (a missing package, a
                # class unknown to this process): report it as the call's error.
                self._result = None
                self._exception = exc
                self._lazy = None
                lazy.release()
                raise
            self._result = value
            self._lazy = None
        lazy.release()
        return value

    # exception() is the base class's: it must not decode the payload (chains
    # call it to see whether an input failed); a decode failure shows in result().

    def lazy_result(self) -> LazyResult | None:
        """The undecoded result, if the future is done and nobody decoded it yet.

        ``None`` before the call is done, after ``result()`` decoded it, and for
        a call that failed.  For diagnostics; pass the future itself on.
        """
        return self._lazy

    def _hold_lazy(self):
        """Like ``lazy_result`` but with an extra hold on its records (forwarding).

        Taken under the materialise lock, so a concurrent ``result()`` cannot
        release the records in between; the caller ends with ``unhold_extra()``.
        """
        with self._materialise_lock:
            lazy = self._lazy
            if lazy is not None:
                lazy.hold_extra()
            return lazy
