"""Every failure mode of comfy_env has a named exception (loky's lesson)."""
from __future__ import annotations

from concurrent.futures.process import BrokenProcessPool

__all__ = [
    "WorkerCrashed", "CallTimeout", "WorkerStartError", "InitializerFailed",
    "RemoteTraceback", "RemoteError", "ProtocolMismatch", "PicklingFailed",
]


class WorkerCrashed(BrokenProcessPool):
    """The worker process died while running the call (exit code or signal in the message).

    Only the call it was running fails; queued calls run on a fresh worker.
    ``exitcode`` is the process's return code (negative: killed by that signal),
    ``stderr_tail`` the last lines the worker wrote to stderr, and the whole
    fatal-error dump when the worker crashed with one (faulthandler is on in
    workers: a segfault's Python stack is there).  A worker that broke the
    channel's protocol (wrote bytes that are not a message to it) is stopped
    and reported with "protocol error" in the message.
    """

    def __init__(self, message: str, exitcode: int | None = None, stderr_tail: str = "") -> None:
        super().__init__(message)
        self.exitcode = exitcode
        self.stderr_tail = stderr_tail

    def __reduce__(self):
        return (type(self), (self.args[0] if self.args else "", self.exitcode, self.stderr_tail))


class CallTimeout(TimeoutError):
    """The call ran longer than ``call_timeout``; its worker was killed.

    Only that call fails; the executor starts a fresh worker for the next one.
    A ``TimeoutError``, so ``except TimeoutError`` catches it too.
    ``worker_stack`` is the worker's Python stack at the timeout, every thread,
    most recent call first (faulthandler's format, taken without the GIL, so it
    shows code stuck in C too); the message carries it after a line that starts
    with ``Stack of the worker``.  Empty when the worker could not dump it.
    """

    def __init__(self, message, worker_stack=""):
        super().__init__(message)
        self.worker_stack = worker_stack

    def __reduce__(self):
        return (type(self), (self.args[0] if self.args else "", self.worker_stack))


class WorkerStartError(BrokenProcessPool):
    """A worker could not be started (bad interpreter, failed handshake, version mismatch).

    The executor is broken: pending calls fail with it and ``submit`` raises it,
    since a restart would fail the same way.  A ``BrokenProcessPool`` (so a
    ``concurrent.futures.BrokenExecutor``), as ``ProcessPoolExecutor`` raises when its
    initializer fails: code written for that catches it unchanged.
    """


class InitializerFailed(WorkerStartError):
    """The executor's ``initializer`` raised in a worker; the executor is broken."""


class ProtocolMismatch(WorkerStartError):
    """Parent and worker speak different protocol versions."""


class PicklingFailed(TypeError):
    """An argument or a result could not be pickled; the message says which and why.

    Also raised for a function that would have to be pickled by value into a
    worker of another Python minor version (pass a ``"module:qualname"`` string).
    """


class RemoteTraceback(Exception):
    """Carries the worker's formatted traceback; attached as ``__cause__``."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class RemoteError(Exception):
    """Stands in for a remote exception that could not travel (unpicklable, or unknown here).

    ``type_name`` is the original exception's qualified type name, ``message``
    its ``str()``, and the remote traceback is the ``__cause__``.
    """

    def __init__(self, type_name: str, message: str, tb: str = "") -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.tb = tb

    def __reduce__(self):
        return (RemoteError, (self.type_name, self.message, self.tb))


def rebuild_exception(cls, args, state=None):
    """An exception of ``cls`` with ``args`` and the attributes ``state``, made without
    calling ``__init__``, whose parameters need not be its ``args`` (``Coded(code, msg)``
    calling ``super().__init__(msg)``: pickle's ``cls(*args)`` fails for it).  Used
    where such an exception crosses to the parent and where a chained call copies its
    input's exception."""
    new = cls.__new__(cls, *args)
    new.args = args
    if state:
        new.__dict__.update(state)
    return new


class _Rebuilt:
    """Pickles as :func:`rebuild_exception` of ``exc``: its class, args and attributes,
    without ``__init__`` where it is unpickled."""
    __slots__ = ("exc",)

    def __init__(self, exc):
        self.exc = exc

    def __reduce__(self):
        exc = self.exc
        return rebuild_exception, (type(exc), exc.args, getattr(exc, "__dict__", None) or None)


def portable_exception(exc):
    """``exc`` as a worker pickles it for the parent.

    Pickle rebuilds an exception as ``type(exc)(*exc.args)`` and then sets its
    attributes; an ``__init__`` whose parameters are not its ``args`` (``Coded(code,
    msg)`` calling ``super().__init__(msg)``, keyword-only ones) fails there, and the
    parent got a RemoteError instead of the exception.  Such an exception (tried in the
    worker, where its class surely exists) travels as one :func:`rebuild_exception`
    makes again.  One with a ``__reduce__`` of its own (``OSError``'s, a library's)
    pickles as it says."""
    cls = type(exc)
    if cls.__reduce__ is not BaseException.__reduce__ or cls.__reduce_ex__ is not BaseException.__reduce_ex__:
        return exc
    try:
        cls(*exc.args)
    except Exception:
        return _Rebuilt(exc)
    return exc
