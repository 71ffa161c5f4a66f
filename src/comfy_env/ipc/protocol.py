"""The messages parent and worker exchange, defined once, and the one handler of ``ctl``.

Every frame's envelope is one of the message types below (the frame's parts, the
pickled objects, come after it: :mod:`comfy_env.ipc.codec`).  A message is a
named tuple whose first field is its tag, so on the wire it is the plain tuple
``(tag, field, ...)`` -- a plain pickle of strings and numbers, as cheap to write
and read as the tuples it replaced -- and in memory a type both read loops
dispatch on (``type(msg) is Call``), as CPython's ``concurrent.futures.process``
does with ``_CallItem`` and ``_ResultItem``.  :func:`to_wire` and
:func:`from_wire` convert; a tag this module does not define is a
:class:`~comfy_env.ipc.transport.ProtocolError` for the reader.

==============  ==============  ==========================================================
message         direction       parts / fds
==============  ==============  ==========================================================
``Hello``       worker->parent  fd: read end of the stack-dump pipe
``Init``        parent->worker  part 0: ``(initializer, initargs)`` if any
``Ready``       worker->parent  --
``InitFailed``  worker->parent  part 0: ``(exception, traceback)``; part 1: its text
``Call``        parent->worker  part 0: ``(fn, args, kwargs)``
``Result``      worker->parent  part 0: the value, or as ``InitFailed``
``Log``         worker->parent  --
``Control``     both            --  (holds ``Release`` and ``PlaneMessage`` items)
``Exit``        parent->worker  --
==============  ==============  ==========================================================

Control messages ride in a ``Control`` frame; either side may send them and both
apply them with :func:`apply_control`:

* ``Release(key, n)``: the peer let go of ``n`` leases of our block ``key``
  (:meth:`comfy_env.ipc.lifetime.Ledger.on_release`);
* ``PlaneMessage(plane, payload)``: a message for data plane ``plane``
  (:meth:`comfy_env.ipc.codec.Plane.on_control`).

This module imports nothing of comfy_env's: the ledger and the codec, which post
these messages, import it, and register what applies each control message
(:func:`handles`), so that ``apply_control`` needs neither of them.
"""
from __future__ import annotations

from collections import namedtuple

__all__ = [
    "Hello", "Init", "Ready", "InitFailed", "Call", "Result", "Log", "Control", "Exit",
    "Release", "PlaneMessage", "to_wire", "from_wire", "apply_control", "handles",
    "UnknownMessage",
]


class UnknownMessage(ValueError):
    """The peer sent a message this module does not define."""


class Hello(namedtuple("Hello", "tag info")):
    """The worker's first message: ``info`` holds its protocol number, comfy_env and
    Python versions, executable, pid, uid and the stack-dump signal."""
    __slots__ = ()

    def __new__(cls, info):
        return tuple.__new__(cls, ("hello", info))


class Init(namedtuple("Init", "tag config")):
    """The parent's answer to ``Hello``: ``config`` holds the parent's uid, the worker's
    name, ``sys_path``, ``cwd`` and ``log_level``."""
    __slots__ = ()

    def __new__(cls, config):
        return tuple.__new__(cls, ("init", config))


class Ready(namedtuple("Ready", "tag")):
    """The worker is initialised and serves calls."""
    __slots__ = ()

    def __new__(cls):
        return tuple.__new__(cls, ("ready",))


class InitFailed(namedtuple("InitFailed", "tag")):
    """The initializer raised; the exception is in the parts."""
    __slots__ = ()

    def __new__(cls):
        return tuple.__new__(cls, ("init_failed",))


class Call(namedtuple("Call", "tag call_id fn")):
    """Run a call.  ``fn`` is None when part 0 names the function, else the by-value
    function held by the worker: ``("id", key)`` or ``("new", key, evict, blob)``
    (:mod:`comfy_env.fncache`)."""
    __slots__ = ()

    def __new__(cls, call_id, fn=None):
        return tuple.__new__(cls, ("call", call_id, fn))


class Result(namedtuple("Result", "tag call_id ok")):
    """The outcome of call ``call_id``: a value (``ok``) or an exception."""
    __slots__ = ()

    def __new__(cls, call_id, ok):
        return tuple.__new__(cls, ("result", call_id, ok))


class Log(namedtuple("Log", "tag levelno name message created")):
    """A ``logging`` record of the worker, re-emitted by the parent."""
    __slots__ = ()

    def __new__(cls, levelno, name, message, created):
        return tuple.__new__(cls, ("log", levelno, name, message, created))


class Control(namedtuple("Control", "tag messages")):
    """A batch of control messages (``Release``, ``PlaneMessage``)."""
    __slots__ = ()

    def __new__(cls, messages):
        return tuple.__new__(cls, ("ctl", messages))


class Exit(namedtuple("Exit", "tag")):
    """The parent asks the worker to exit after what it is doing."""
    __slots__ = ()

    def __new__(cls):
        return tuple.__new__(cls, ("exit",))


class Release(namedtuple("Release", "tag key n")):
    """Control: the sender let go of ``n`` leases of the receiver's block ``key``."""
    __slots__ = ()

    def __new__(cls, key, n):
        return tuple.__new__(cls, ("release", key, n))


class PlaneMessage(namedtuple("PlaneMessage", "tag plane payload")):
    """Control: ``payload`` for data plane ``plane`` (its own small protocol)."""
    __slots__ = ()

    def __new__(cls, plane, payload):
        return tuple.__new__(cls, ("plane", plane, payload))


_FRAMES = {"hello": Hello, "init": Init, "ready": Ready, "init_failed": InitFailed,
           "call": Call, "result": Result, "log": Log, "ctl": Control, "exit": Exit}
_CONTROLS = {"release": Release, "plane": PlaneMessage}


def to_wire(msg) -> tuple:
    """The plain tuple a frame's envelope carries for ``msg``."""
    if type(msg) is Control:
        return ("ctl", [tuple(m) for m in msg.messages])
    return tuple(msg)


def from_wire(wire):
    """The message a frame's envelope tuple stands for (UnknownMessage if none)."""
    try:
        cls = _FRAMES[wire[0]]
        if cls is Control:
            return tuple.__new__(Control, ("ctl", [_CONTROLS[m[0]]._make(m) for m in wire[1]]))
        msg = cls._make(wire)
    except (KeyError, TypeError, IndexError) as exc:
        raise UnknownMessage(f"not a comfy_env message: {wire!r:.200}") from exc
    return msg


_HANDLERS = {}          # control message type -> callable(link, message)


def handles(kind):
    """Register the function that applies control messages of type ``kind``."""
    def register(fn):
        _HANDLERS[kind] = fn
        return fn
    return register


def apply_control(link, msgs) -> None:
    """Apply the control messages of one ``Control`` frame that came in on ``link``."""
    for msg in msgs:
        _HANDLERS[type(msg)](link, msg)
