"""Futures whose results stay in shared memory until somebody asks for them.

A worker's result arrives as a frame: an envelope, pickle bytes and the
blocks (shared-memory segments, CUDA exports) it refers to.  The parent takes
the leases on those blocks at once, so the memory stays valid, but only
decodes the pickle when somebody looks at the outcome.  Passing the future
itself to another executor's ``submit`` forwards the undecoded frame to the
next worker: the parent never maps, imports or copies the payload (zero-copy
chains).

Where decoding happens decides what the future *is*.  A result can arrive
intact and still fail to decode here (a class this process cannot import, an
object whose unpickling raises or calls ``sys.exit``).  The future is then an
exception, for every accessor alike: the first of ``result()`` or
``exception()`` to look (a done-callback that asks included) decodes, under a
lock, and the outcome -- a value or an exception -- is fixed from then on, so
a concurrent or later caller gets the same answer.  Decoding stays lazy so
that chains keep forwarding undecoded; the chain machinery asks
:meth:`IsolatedFuture.undecoded_failure`, which never decodes.  One
consequence: ``wait(return_when=FIRST_EXCEPTION)`` counts an arrived but
undecoded result as a success until somebody looks at it.
"""
from __future__ import annotations

import threading
import time
import weakref
from concurrent.futures import Future
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED
from typing import Any

from ..errors import PicklingFailed
from ..ipc import codec, interrupts, lifetime

__all__ = ["IsolatedFuture", "LazyResult", "decode_error"]

_DONE_STATES = frozenset((CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED))


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
        # Not at exit: the workers are gone by then (their blocks with them), and
        # a release sent or freed from an atexit callback could start a thread.
        self._finalizer.atexit = False

    def materialise(self):
        """Decode the part (maps the segments, imports the tensors) in this process."""
        return codec.decode_part(self.frame, 0, self.link, records=dict(enumerate(self.records)))

    @property
    def part(self):
        return self.frame.parts[0]

    def release(self):
        """Drop the holds and the frame: the decoded value (if any) holds the blocks now."""
        self._finalizer()
        self.frame = None
        self.records = ()

    def hold_extra(self):
        lifetime.LEDGER.hold_all(self.records)


def _drop_holds(records):
    lifetime.LEDGER.unhold_all(records)


def decode_error(exc):
    """What a future reports when its result could not be decoded in this process.

    An ``Exception`` stays as it is (a ``ModuleNotFoundError`` says what to
    install).  Any other ``BaseException`` -- an object that calls ``sys.exit``
    or raises ``GeneratorExit`` while it is unpickled -- becomes a
    :class:`PicklingFailed`: it belongs to the payload, and must not end the
    caller's program or thread when ``result()`` re-raises it.
    """
    if isinstance(exc, Exception):
        return exc
    err = PicklingFailed(f"the call's result could not be decoded in this process: "
                         f"unpickling it raised {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


class IsolatedFuture(Future):
    """A ``concurrent.futures.Future`` whose result is decoded on first use.

    Returned by :meth:`IsolatedExecutor.submit`; every ``Future`` method works
    as usual.  A worker's result arrives as pickle bytes plus references to
    shared memory; it is decoded (segments mapped, tensors imported) the first
    time ``result()`` or ``exception()`` looks at it, and later calls return the
    same object or the same exception.  ``done()``, ``cancelled()`` and
    ``add_done_callback()`` never decode, so a future that is only passed on to
    another executor's ``submit`` is forwarded worker to worker without the
    parent touching the data.

    The base class holds a :class:`LazyResult` as its result; the outcome of
    decoding it lives here, in ``_decoded`` (None until decoded, then
    ``(True, value)`` or ``(False, exception)``), guarded by ``_decode_lock``.
    Future's own fields are only ever set through its public methods.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lazy = None
        self._decoded = None
        self._decode_lock = threading.Lock()
        self._worker = None         # the worker running the call (its reader role, see result())
        self._callbacks_to = None   # set while a caller completes it: who runs the callbacks

    def _invoke_callbacks(self):
        # Future.set_result / set_exception end here, on the completing thread.  A caller
        # that read its own result hands the callbacks to the worker's reader thread
        # (WorkerHandle._on_result); everywhere else they run here, as in the base class.
        to = self._callbacks_to
        if to is not None and self._done_callbacks:
            self._callbacks_to = None
            to(self)
        else:
            super()._invoke_callbacks()

    def _run_done_callbacks(self):
        Future._invoke_callbacks(self)

    def _settled(self):
        """``done()`` without taking the future's lock, for the loops that wait for a result
        while reading it (a warm call asks several times): the state is one attribute,
        read whole, and an answer a moment old only means one more look."""
        return self._state in _DONE_STATES

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
        worker = self._worker
        if worker is not None and not self._settled():
            timeout = self._read_own(worker, timeout)
        if self._state == FINISHED and self._exception is None:
            # What the base class returns for a finished call, without its lock (set_result
            # sets the result before the state).
            value = self._result
        else:
            value = super().result(timeout)
        if type(value) is not LazyResult:
            return value
        ok, outcome = self._decode()
        if ok:
            return outcome
        raise outcome

    def _read_own(self, worker, timeout):
        """Read the worker's channel on this thread until done; the timeout left."""
        if timeout is None:
            worker.read_for(self, None)
            return None
        end = time.monotonic() + timeout
        worker.read_for(self, timeout)
        return max(0.0, end - time.monotonic())

    def exception(self, timeout=None):
        worker = self._worker
        if worker is not None and not self._settled():
            timeout = self._read_own(worker, timeout)
        exc = super().exception(timeout)
        if exc is not None:
            return exc
        # Finished without an exception: result(0) cannot block or raise here.
        if type(super().result(0)) is not LazyResult:
            return None
        ok, outcome = self._decode()
        return None if ok else outcome

    # Mapping the blocks updates the ledger: on the main thread a Ctrl-C waits until
    # that is done (ipc/interrupts.py).
    @interrupts.holds
    def _decode(self):
        with self._decode_lock:
            if self._decoded is None:
                lazy = self._lazy
                try:
                    value = lazy.materialise()
                except KeyboardInterrupt as exc:
                    if interrupts.maybe_ctrl_c():
                        # Maybe Ctrl-C (this step holds it back only with our SIGINT
                        # handler in place): the outcome stays open, a later caller
                        # decodes again.
                        raise
                    # Off the main thread, with Ctrl-C held back, or with SIGINT ignored
                    # (interrupts.may_raise): the payload raised it.
                    self._decoded = (False, decode_error(exc))
                except BaseException as exc:
                    self._decoded = (False, decode_error(exc))
                else:
                    self._decoded = (True, value)
                self._lazy = None
                lazy.release()
            return self._decoded

    def __repr__(self):
        # The base class names its result's type: here a LazyResult until decoded.
        r = super().__repr__()
        if " returned LazyResult>" in r:
            decoded = self._decoded
            what = ("an undecoded result" if decoded is None else type(decoded[1]).__name__ if decoded[0]
                    else f"a result that failed to decode ({type(decoded[1]).__name__})")
            r = r.replace(" returned LazyResult>", f" returned {what}>")
        return r

    def undecoded_failure(self):
        """The call's exception, without decoding its result (chains ask this).

        None when the call returned a value: undecoded (it will be forwarded as
        it is), or decoded successfully.  A decode that already failed counts as
        the call's failure.
        """
        exc = super().exception(0)
        if exc is not None:
            return exc
        decoded = self._decoded
        if decoded is not None and not decoded[0]:
            return decoded[1]
        return None

    def lazy_result(self) -> LazyResult | None:
        """The undecoded result, if the future is done and nobody decoded it yet.

        ``None`` before the call is done, after ``result()`` decoded it, and for
        a call that failed.  For diagnostics; pass the future itself on.
        """
        return self._lazy

    def _hold_lazy(self):
        """``(part, records)`` of the undecoded result with an extra hold on the records
        (forwarding), or None once decoded.

        Taken under the decode lock, so a concurrent ``result()`` cannot release
        the records in between (nor drop the frame); the caller ends with
        ``LEDGER.unhold_all(records)``.
        """
        with self._decode_lock:
            lazy = self._lazy
            if lazy is None:
                return None
            lazy.hold_extra()
            return lazy.part, lazy.records
