"""The messages parent and worker exchange, defined once, and the one handler of ``ctl``.

Every frame's envelope is one of the message types below (the frame's parts, the
pickled objects, come after it: :mod:`comfy_env.ipc.codec`).  A message is a
tuple with named fields whose first item is its tag, so on the wire it is the plain tuple
``(tag, field, ...)`` -- a plain pickle of strings and numbers, as cheap to write
and read as the tuples it replaced -- and in memory a type both read loops
dispatch on (``type(msg) is Call``), as CPython's ``concurrent.futures.process``
does with ``_CallItem`` and ``_ResultItem``.  :func:`to_wire` and
:func:`from_wire` convert; a tag this module does not define is a
:class:`~comfy_env.ipc.transport.ProtocolError` for the reader.

==============  ==============  ==========================================================
message         direction       parts / fds
==============  ==============  ==========================================================
``Hello``       worker->parent  fds, each if present: the stack-dump pipe's read end, then the
                                taken-call slot (:mod:`comfy_env.ipc.taken`)
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

from operator import itemgetter

__all__ = [
    "Hello", "Init", "Ready", "InitFailed", "Call", "Result", "Log", "Control", "Exit",
    "Release", "PlaneMessage", "to_wire", "from_wire", "apply_control", "handles",
    "UnknownMessage",
]


class UnknownMessage(ValueError):
    """The peer sent a message this module does not define."""


class _Message(tuple):
    """A message: the tuple ``(tag, *fields)``, with its fields readable by name.

    (Not ``collections.namedtuple``: each of those compiles code when it is made,
    about a millisecond for this module, paid by every worker start.)"""

    __slots__ = ()
    _fields = ()
    tag = property(itemgetter(0), doc="The message's name on the wire.")

    @classmethod
    def _make(cls, wire):
        if len(wire) != len(cls._fields) + 1:
            raise TypeError(f"{cls.__name__} has {len(cls._fields)} fields, got {wire!r:.200}")
        return tuple.__new__(cls, wire)

    def __getnewargs__(self):           # copy and pickle call __new__ with the fields
        return tuple(self[1:])

    def __repr__(self):
        fields = ", ".join(f"{f}={v!r}" for f, v in zip(self._fields, self[1:]))
        return f"{type(self).__name__}({fields})"


def _message(cls):
    """Give ``cls`` a read-only property per name in ``cls._fields``."""
    for i, name in enumerate(cls._fields, 1):
        setattr(cls, name, property(itemgetter(i)))
    return cls


@_message
class Hello(_Message):
    """The worker's first message: ``info`` holds its protocol number, comfy_env and
    Python versions, executable, pid, uid and the stack-dump signal."""
    __slots__ = ()
    _fields = ("info",)

    def __new__(cls, info):
        return tuple.__new__(cls, ("hello", info))


@_message
class Init(_Message):
    """The parent's answer to ``Hello``: ``config`` holds the parent's uid, the worker's
    name, ``sys_path``, ``cwd`` and ``log_level``."""
    __slots__ = ()
    _fields = ("config",)

    def __new__(cls, config):
        return tuple.__new__(cls, ("init", config))


@_message
class Ready(_Message):
    """The worker is initialised and serves calls."""
    __slots__ = ()
    _fields = ()

    def __new__(cls):
        return tuple.__new__(cls, ("ready",))


@_message
class InitFailed(_Message):
    """The initializer raised; the exception is in the parts."""
    __slots__ = ()
    _fields = ()

    def __new__(cls):
        return tuple.__new__(cls, ("init_failed",))


@_message
class Call(_Message):
    """Run a call.  ``fn`` is None when part 0 names the function, else the by-value
    function held by the worker: ``("id", key)`` or ``("new", key, evict, blob)``
    (:mod:`comfy_env.fncache`)."""
    __slots__ = ()
    _fields = ("call_id", "fn")

    def __new__(cls, call_id, fn=None):
        return tuple.__new__(cls, ("call", call_id, fn))


@_message
class Result(_Message):
    """The outcome of call ``call_id``: a value (``ok``) or an exception."""
    __slots__ = ()
    _fields = ("call_id", "ok")

    def __new__(cls, call_id, ok):
        return tuple.__new__(cls, ("result", call_id, ok))


@_message
class Log(_Message):
    """A ``logging`` record of the worker, re-emitted by the parent."""
    __slots__ = ()
    _fields = ("levelno", "name", "message", "created")

    def __new__(cls, levelno, name, message, created):
        return tuple.__new__(cls, ("log", levelno, name, message, created))


@_message
class Control(_Message):
    """A batch of control messages (``Release``, ``PlaneMessage``, ``ImportPaths``)."""
    __slots__ = ()
    _fields = ("messages",)

    def __new__(cls, messages):
        return tuple.__new__(cls, ("ctl", messages))


@_message
class Exit(_Message):
    """The parent asks the worker to exit after what it is doing."""
    __slots__ = ()
    _fields = ()

    def __new__(cls):
        return tuple.__new__(cls, ("exit",))


@_message
class Release(_Message):
    """Control: the sender let go of ``n`` leases of the receiver's block ``key``."""
    __slots__ = ()
    _fields = ("key", "n")

    def __new__(cls, key, n):
        return tuple.__new__(cls, ("release", key, n))


@_message
class PlaneMessage(_Message):
    """Control: ``payload`` for data plane ``plane`` (its own small protocol)."""
    __slots__ = ()
    _fields = ("plane", "payload")

    def __new__(cls, plane, payload):
        return tuple.__new__(cls, ("plane", plane, payload))


@_message
class ImportPaths(_Message):
    """Control, parent to a worker of its own environment: the parent's ``sys.path`` now
    (it changed since the worker started: a plugin directory added at run time), to
    import the next call's function from as the parent could."""
    __slots__ = ()
    _fields = ("paths",)

    def __new__(cls, paths):
        return tuple.__new__(cls, ("paths", paths))


_FRAMES = {"hello": Hello, "init": Init, "ready": Ready, "init_failed": InitFailed,
           "call": Call, "result": Result, "log": Log, "ctl": Control, "exit": Exit}
_CONTROLS = {"release": Release, "plane": PlaneMessage, "paths": ImportPaths}


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
