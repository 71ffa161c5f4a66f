"""Ctrl-C on the main thread, held back while a step of ours must not be cut in two.

Python runs signal handlers on the main thread only, between any two lines of Python.
The main thread is also where most programs submit calls and wait for results, and
with that it sends frames, reads its worker's frames (a caller reads its own result,
see worker_handle.py), and updates the process-wide ledger of shared blocks.  A
``KeyboardInterrupt`` raised halfway through one of those steps would leave a frame
half sent or half read (the worker's channel is then useless) or the ledger half
updated (a block leaked, or freed while in use).

So the functions that make such steps are marked with :func:`holds`, and while one of
them is on the main thread's stack a SIGINT is put off: the handler has it delivered
again a millisecond later (``signal.pthread_kill`` to the main thread) and returns, until it finds no
held step, and then raises the ``KeyboardInterrupt``.  A step is a few to a few hundred
microseconds; a wait is never held (:func:`waiting` marks one inside a held step), so
Ctrl-C still interrupts at once as far as a person can tell.

Why the stack and not a counter entered and left around each step: a counter can
itself be cut between its update and the ``try`` that undoes it, and one left raised
would put off every later Ctrl-C for good.  The stack can't be left in a wrong state;
marking costs nothing per call (a code object in a set), only a signal pays for the walk.

:func:`install` puts :func:`_on_sigint` in place of SIGINT's handler only when that is
Python's ``default_int_handler``, and it behaves as that one does outside a held step.
A program's own SIGINT handler is left alone (and then nothing is held back: the
steps fall back to what they do when cut short, e.g. the worker is stopped and its call
fails with ``WorkerCrashed``); so are the handlers of other signals (SIGALRM, SIGTERM).
"""
from __future__ import annotations

import _thread
import signal
import sys
import threading

from .. import forksafe

try:
    # The C function: signal.getsignal converts what it returns to the Handlers enum,
    # which for a function handler costs a failed enum lookup (an exception, ~3 µs),
    # and installed() runs once per call.
    from _signal import getsignal as _getsignal
except ImportError:     # pragma: no cover - other interpreters
    _getsignal = signal.getsignal
_SIGINT = int(signal.SIGINT)

__all__ = ["install", "installed", "may_raise", "maybe_ctrl_c", "holds", "waiting", "on_main"]

_HELD = set()           # code objects of the marked functions
_waiting = False        # the main thread waits inside a held step: not held now


def holds(fn):
    """Mark ``fn``: while it runs on the main thread, a Ctrl-C waits for it to return."""
    _HELD.add(fn.__code__)
    return fn


class waiting:
    """``with waiting():`` around a wait inside a held step: a Ctrl-C interrupts it."""

    __slots__ = ()

    def __enter__(self):
        global _waiting
        _waiting = True

    def __exit__(self, *exc):
        global _waiting
        _waiting = False


# How soon a put-off Ctrl-C is tried again: after 1 ms, then twice as long each time up
# to 64 ms (a held step that runs long: sending a big argument).
# Not at once from the handler itself: the handler's own next line would run it again,
# nested, until the recursion limit.
RETRY_S = 0.001
_MAX_DOUBLINGS = 6
_retries = 0            # tries since the last Ctrl-C was raised


def _on_sigint(signum, frame):
    """SIGINT's handler once installed: ``default_int_handler``, unless a step is held."""
    global _retries
    if not _waiting:
        f = frame
        while f is not None:
            if f.f_code in _HELD:
                _again(signum)
                return
            f = f.f_back
    _retries = 0
    raise KeyboardInterrupt


def _again(signum):
    """Deliver the signal to the main thread again shortly (it is held now)."""
    global _retries
    delay = RETRY_S * (1 << min(_retries, _MAX_DOUBLINGS))
    _retries += 1
    t = threading.Timer(delay, _redeliver, (signum,))
    t.daemon = True
    try:
        t.start()
    except RuntimeError:        # interpreter exit: no thread may start; raise it now
        raise KeyboardInterrupt from None


def _redeliver(signum):
    """A real signal to the main thread, not ``_thread.interrupt_main``: that one only
    flags the signal for the interpreter's next bytecode, so a main thread that went on
    into a blocking wait (epoll, a lock, a sleep) would not see it until the wait ended.

    Dropped once our handler is no longer SIGINT's (the program put its own in place:
    it decides about later signals) or the interpreter is exiting (the default action
    is back then: the process would die of the signal in the middle of its exit)."""
    if sys.is_finalizing() or not installed():
        return
    try:
        signal.pthread_kill(threading.main_thread().ident, signum)
    except (AttributeError, OSError, ValueError):
        _thread.interrupt_main(signum)


def install() -> bool:
    """Hold SIGINT back during our steps, if SIGINT has Python's default handler.

    Does something only on the main thread (``signal.signal`` refuses elsewhere);
    returns whether the handler is ours now.  Idempotent.
    """
    if threading.current_thread() is not threading.main_thread():
        return installed()
    try:
        current = signal.getsignal(signal.SIGINT)
        if current is _on_sigint:
            return True
        if current is signal.default_int_handler:
            signal.signal(signal.SIGINT, _on_sigint)
            return True
    except (ValueError, OSError):       # not the main interpreter, or no signals here
        pass
    return False


def installed() -> bool:
    """Whether SIGINT is held back now (a program may have put its own handler since)."""
    try:
        return _getsignal(_SIGINT) is _on_sigint
    except ValueError:
        return False


def may_raise() -> bool:
    """Whether a Ctrl-C can raise ``KeyboardInterrupt`` at any line of the main thread now:
    SIGINT's handler is a Python one that is not ours (a program's own, or Python's
    default where ours could not be installed).  Not when it is ours (it holds Ctrl-C
    back during our steps), nor when SIGINT is ignored (a program a shell started in the
    background, ``nohup``: ``SIG_IGN``) or left to the OS (``SIG_DFL``: the process dies,
    nothing is raised); a ``KeyboardInterrupt`` then is the code's own (an argument's
    ``__reduce__``, a result's unpickling)."""
    try:
        handler = _getsignal(_SIGINT)
    except ValueError:
        return False
    return callable(handler) and handler is not _on_sigint


# The main thread's ident, for on_main() on every call (two Python calls fewer than
# comparing Thread objects).  A fork child's main thread is the one that forked:
# threading's own at-fork hook, registered before forksafe's, has made it main_thread().
_main_ident = threading.main_thread().ident


def _after_fork_in_child():
    global _main_ident
    _main_ident = threading.main_thread().ident


forksafe.on_fork_child(_after_fork_in_child)


def on_main() -> bool:
    return _thread.get_ident() == _main_ident


def maybe_ctrl_c() -> bool:
    """Whether a ``KeyboardInterrupt`` caught on this thread now may be the user's Ctrl-C
    (to raise on) rather than the payload's own (an argument's ``__reduce__``, a result's
    unpickling): only on the main thread, with a SIGINT handler that raises at any line
    (:func:`may_raise`)."""
    return on_main() and may_raise()
