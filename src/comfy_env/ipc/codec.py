"""One pass over an object graph: small objects inline, bulk data as descriptors.

Encoding is a cloudpickle pass whose ``persistent_id`` hook hands arrays and
tensors to a *data plane* (CPU shared memory, CUDA pools).  The plane returns
a small descriptor that is pickled in the object's place, and it names the
*blocks* the descriptor refers to (see :mod:`comfy_env.ipc.lifetime`).  The
same module, imported by both sides, decodes.

A message body is::

    u32 envelope length | envelope (plain pickle) | part 0 | part 1 | ...

The envelope is ``(message, parts)``: the message (a :mod:`~comfy_env.ipc.protocol`
type, as its plain wire tuple) is read without touching the parts; ``parts`` is a
list of ``(length, refs)`` where ``refs`` lists the blocks a part leases, as
``(plane, key, fd_index, meta)``, or None for a part that holds no block.  Keeping
the refs outside the pickle lets the parent hold or forward a worker's result
(zero-copy chains) without decoding it.

Planes register by *type name* so that neither numpy nor torch is imported
until an object of theirs shows up.  This module knows no plane: they import it,
and :mod:`comfy_env.ipc.planes` registers them (the executor and the worker import it).
"""
from __future__ import annotations

import collections
import functools
import io
import logging
import os
import pickle
import struct
import sys
import traceback
from concurrent.futures import Future

import cloudpickle

from . import lifetime, numpy_names, protocol
from .protocol import PlaneMessage, Release

try:    # cloudpickle's own rule for pickling a function by name (see _is_plain)
    from cloudpickle.cloudpickle import _should_pickle_by_reference as _by_reference
except ImportError:     # pragma: no cover - such functions go through the Encoder
    _by_reference = None
try:    # cloudpickle's constructor of a class pickled by value (see _SlotsKept)
    from cloudpickle.cloudpickle import _make_skeleton_class
except ImportError:     # pragma: no cover - an older cloudpickle: slots are lost, as before
    _make_skeleton_class = None
try:    # cloudpickle's modules pickled by value (see _reduce_lru_cache)
    from cloudpickle.cloudpickle import _is_registered_pickle_by_value as _by_value_module
except ImportError:     # pragma: no cover - an older cloudpickle: by name, as pickle would
    def _by_value_module(mod):
        return False
_FunctionType = type(lambda: None)
_BuiltinType = type(len)

__all__ = [
    "Plane", "register_plane", "encode_message", "decode_envelope", "Part",
    "EncodeError", "Frame", "dumps_portable",
]

_U32 = struct.Struct("<I")
PROTOCOL = 5
log = logging.getLogger("comfy_env.codec")


class EncodeError(TypeError):
    """An object could not be encoded for the peer."""


class Plane:
    """A data plane.  Subclasses set ``name`` and ``types`` and implement the hooks."""

    name = "?"
    types = ()          # fully qualified type names, e.g. "numpy.ndarray"

    def encode(self, obj, enc: "Encoder"):
        """Return a picklable descriptor for ``obj``, or None to let pickle handle it."""
        raise NotImplementedError

    def decode(self, desc, dec: "Decoder"):
        raise NotImplementedError

    def open_remote(self, key, meta, fd):
        """Build the resource for a block first seen in a message (takes ownership of ``fd``)."""
        raise NotImplementedError

    def forward_fd(self, record):
        """An fd that lets another process open ``record``'s block (or None)."""
        return None

    def frame_fd(self, record, frame_builder):
        """:meth:`forward_fd` for one frame: a plane may hand out an fd that the frame
        owns (closed once ``frame_builder`` is gone)."""
        return self.forward_fd(record)

    def on_zero(self, record):
        """The record has no user left (recycle an owned block, drop a remote one).

        May return a callable that completes an asynchronous free; the ledger runs it
        (once per batch of frees) before it releases the block upstream."""

    def on_control(self, link, message):
        """A plane-specific control message arrived from ``link``."""

    def post(self, link, payload):
        """Queue ``payload`` for this plane's :meth:`on_control` in the peer behind ``link``."""
        link.post(PlaneMessage(self.name, payload))

    def reduce_portable(self, obj):
        """A ``__reduce__`` value for ``obj`` in bytes that travel outside a frame (a
        function pickled by value and what it captures), or None for pickle's own."""
        return None

    def plain_inline(self, obj) -> bool:
        """Whether ``obj`` travels whole in the pickle, as :meth:`reduce_portable` gives
        it, with no block and nothing to decode but that reduction (a small numpy
        array): then a part made of it and builtins stays plain (see _is_plain)."""
        return False


_PLANES = {}            # name -> plane
_BY_TYPENAME = {}       # "module.Qualname" -> [planes], asked in order
_DISPATCH = {}          # type -> tuple of planes | None (cache)


def register_plane(plane: Plane, first=False) -> None:
    """Register ``plane`` for its ``types``; ``first`` puts it before planes already there."""
    _PLANES[plane.name] = plane
    for tn in plane.types:
        lst = _BY_TYPENAME.setdefault(tn, [])
        if plane not in lst:
            lst.insert(0, plane) if first else lst.append(plane)
    _DISPATCH.clear()


_PROVIDERS = {}         # plane name -> callable that registers it (planes installed lazily)


def provide_plane(name, install):
    """``install()`` registers plane ``name``; called the first time a peer uses it."""
    _PROVIDERS[name] = install


def get_plane(name):
    """The plane called ``name``, installing it on first use (a receiver may never have
    encoded an object of that plane, e.g. a parent that only receives CUDA tensors)."""
    try:
        return _PLANES[name]
    except KeyError:
        install = _PROVIDERS.pop(name, None)
        if install is not None:
            install()
        try:
            return _PLANES[name]
        except KeyError:
            raise LookupError(f"the peer used data plane {name!r}, which this process cannot "
                              f"install (Python {sys.version.split()[0]} at {sys.executable})") from None


_FIRST_SIGHT = {}       # "module.Qualname" -> callable run once, before its first dispatch


def on_first_type(typename, hook):
    """Run ``hook()`` once, the first time an object of ``typename`` is encoded."""
    _FIRST_SIGHT[typename] = hook


def _plane_for(tp):
    try:
        return _DISPATCH[tp]
    except KeyError:
        pass
    for klass in getattr(tp, "__mro__", ()):
        hook = _FIRST_SIGHT.pop(f"{klass.__module__}.{klass.__qualname__}", None)
        if hook is not None:
            hook()
    planes = None
    for klass in getattr(tp, "__mro__", ()):
        found = _BY_TYPENAME.get(f"{klass.__module__}.{klass.__qualname__}")
        if found:
            planes = tuple(found)
            break
    _DISPATCH[tp] = planes
    return planes


# Types pickle handles natively and no plane ever claims: skip the lookup.
_PLAIN = frozenset([int, float, str, bytes, bool, type(None), tuple, list, dict, set,
                    frozenset, bytearray, complex])
# Of those, the ones that hold no other object.
_SCALARS = frozenset([int, float, str, bytes, bool, type(None), complex])
_PLAIN_ITEMS = 64       # a bigger container goes through the Encoder (checking it costs as much)
_PLAIN_DEPTH = 4


# _is_plain's answer for a graph that holds an object a plane sends inline: plain, but
# pickled by _InlinePickler (which writes that object as its plane's portable reduction).
INLINE = 2


def _is_plain(obj, depth=0):
    """Is ``obj`` built only of scalars and small tuples, lists and dicts of them?

    Then no plane and no future can be inside, and ``pickle.dumps`` writes exactly
    what the :class:`Encoder` would (cloudpickle only differs for objects its
    ``reducer_override`` sees, which these never reach): the small calls and results
    that make up warm-call latency skip building a cloudpickle Pickler.  Exact
    types only: a subclass may carry a plane's object in its ``__dict__``.

    Objects a plane sends whole inside the pickle (``Plane.plain_inline``: a small
    numpy array) keep a graph plain too; the answer is then :data:`INLINE` (truthy),
    and the part is pickled by :class:`_InlinePickler` and still loaded by a bare
    ``pickle.loads``: no Encoder, no Decoder, no lazy result for a small array.
    """
    tp = type(obj)
    if tp in _SCALARS:
        return True
    if depth >= _PLAIN_DEPTH:
        return False
    if tp is tuple or tp is list:
        return len(obj) <= _PLAIN_ITEMS and _all_plain(obj, depth + 1)
    if tp is dict:
        if len(obj) > _PLAIN_ITEMS:
            return False
        for k in obj:
            if type(k) not in _SCALARS:
                return False
        return _all_plain(obj.values(), depth + 1)
    if tp is _FunctionType:
        # A function cloudpickle pickles by reference: pickle does the same (by name).
        return _by_reference is not None and _by_reference(obj)
    if tp not in _PLAIN:
        for plane in _plane_for(tp) or ():
            if plane.plain_inline(obj):
                return INLINE
    return False


def _all_plain(items, depth):
    """:func:`_is_plain` of a container's items: False, True, or INLINE if one is."""
    res = True
    for x in items:
        if type(x) not in _SCALARS:
            r = _is_plain(x, depth)
            if not r:
                return False
            if r is INLINE:
                res = INLINE
    return res


class _InlinePickler(pickle.Pickler):
    """pickle (the C pickler: builtins never reach this hook), with the objects of a
    plane that sends them inline written as the plane's portable reduction."""

    def reducer_override(self, obj):
        for plane in _plane_for(type(obj)) or ():
            reduced = plane.reduce_portable(obj)
            if reduced is not None:
                return reduced
        return NotImplemented


def _dumps_plain(obj, flag):
    """The pickle of a plain ``obj``; ``flag``: what :func:`_is_plain` said of it."""
    if flag is not INLINE:
        return pickle.dumps(obj, PROTOCOL)
    buf = io.BytesIO()
    _InlinePickler(buf, PROTOCOL).dump(obj)
    return _bytes_of(buf)


def _bytes_of(buf):
    """``buf``'s contents.  ``getvalue()``, not ``getbuffer()``: CPython hands over its
    internal bytes (shrunk in place, not copied) when nothing exports the buffer, and
    a ``getbuffer()`` view kept in a part that ends up in a reference cycle (a
    traceback holding the frame) lets the collector free the BytesIO while the view
    exports it: "deallocated BytesIO object has exported buffers", then a segfault on
    Python 3.12."""
    return buf.getvalue()


class Part:
    """One encoded object graph: pickle bytes plus the blocks it leases.

    ``refs`` is None for a *plain* part: one without any descriptor, which
    decodes with a bare ``pickle.loads`` (the fast path of small calls).
    """

    __slots__ = ("data", "refs")

    def __init__(self, data, refs):
        self.data = data      # bytes-like
        self.refs = refs      # [(plane, key, fd_index, meta)] or None


def _rebuild_lru_cache(wrapped, maxsize, typed):
    return functools.lru_cache(maxsize=maxsize, typed=typed)(wrapped)


def _reduce_lru_cache(obj):
    """A ``functools.lru_cache`` function of the script (or of a module pickled by value)
    as its function and cache parameters: pickle writes it by name, which a worker
    cannot find (ipc/mainspace.py).  The worker's copy keeps a cache of its own, as a
    ProcessPoolExecutor worker's does."""
    mod = sys.modules.get(getattr(obj, "__module__", None) or "")
    wrapped = getattr(obj, "__wrapped__", None)
    if wrapped is not None and (mod is None or mod.__name__ == "__main__" or _by_value_module(mod)):
        params = obj.cache_parameters()
        return _rebuild_lru_cache, (wrapped, params["maxsize"], params["typed"])
    return obj.__reduce__()


def _refuse_open_file(obj):
    """An open text file does not cross: cloudpickle would send a snapshot of its
    contents as a ``StringIO`` (the worker then reads, or writes, something that is not
    the file).  Refused, as pickle refuses it (binary files already are)."""
    raise pickle.PicklingError(
        f"an open file ({getattr(obj, 'name', '?')!r}, mode {getattr(obj, 'mode', '?')!r}) cannot be sent to "
        f"another process: pass its path and open it there, or pass its contents (f.read())")


# Ours first, then cloudpickle's (which chains copyreg's): the C pickler reads it per instance.
_PICKLE_DISPATCH = collections.ChainMap({functools._lru_cache_wrapper: _reduce_lru_cache,
                                         io.TextIOWrapper: _refuse_open_file},
                                        cloudpickle.Pickler.dispatch_table)


class _SlotsKept:
    """cloudpickle, keeping a class's ``__slots__`` when it pickles the class by value.

    cloudpickle builds such a class empty and sets ``__slots__`` on it afterwards, with
    the rest of its attributes, which makes no slots: instances made on the other side
    get a ``__dict__``, and their state no longer fits the class this side knows (a
    script class with ``__slots__`` could not come back from a worker:
    "'P' object has no attribute '__dict__'").  Here the class is built with its
    ``__slots__``, as its ``class`` statement did."""

    def reducer_override(self, obj):
        rv = super().reducer_override(obj)
        # Not a tuple subclass: a named tuple's empty __slots__ only keeps a __dict__
        # away, and typing.NamedTuple, which cloudpickle rebuilds from its original
        # bases, refuses __slots__ in the class body.
        if (type(rv) is tuple and len(rv) > 1 and rv[0] is _make_skeleton_class
                and isinstance(obj, type) and "__slots__" in obj.__dict__
                and not issubclass(obj, tuple)):
            args = list(rv[1])
            args[3] = dict(args[3], __slots__=obj.__dict__["__slots__"])
            rv = (rv[0], tuple(args)) + rv[2:]
        return rv


class Encoder(_SlotsKept, cloudpickle.Pickler):
    """Pickles one object graph for ``link``; planes turn bulk data into descriptors."""

    dispatch_table = _PICKLE_DISPATCH

    def __init__(self, file, frame_builder, link, forward_future=None):
        super().__init__(file, protocol=PROTOCOL)
        self.fb = frame_builder
        self.link = link
        self.refs = []                    # this part's refs
        self._ref_index = {}              # key -> index in self.refs
        self._forward_future = forward_future
        self.plain = True                 # no persistent id emitted: decodes with pickle.loads

    def persistent_id(self, obj):
        tp = type(obj)
        if tp in _PLAIN:
            return None
        planes = _plane_for(tp)
        if planes is not None:
            for plane in planes:
                desc = plane.encode(obj, self)
                if desc is not None:
                    self.plain = False
                    return ("p", plane.name, desc)
            return None
        if isinstance(obj, Future):
            self.plain = False
            return self._encode_future(obj)
        if self.plain and (tp is _FunctionType or tp is _BuiltinType or isinstance(obj, type)):
            mod = getattr(obj, "__module__", None) or ""
            if mod == "__main__" or mod.startswith("numpy"):
                # The part decodes through the Decoder, whose unpickler reads either
                # numpy's names for its classes and functions (numpy.bool, numpy._core...)
                # and, in a worker, builds the script's over the worker's __main__
                # (ipc/mainspace.py).
                self.plain = False
        return None

    def _encode_future(self, fut):
        if not fut.done():
            raise EncodeError("a Future passed as an argument must be done before it is encoded")
        if self._forward_future is not None:
            part_index = self._forward_future(fut, self.fb)
            if part_index is not None:
                return ("f", part_index)
        return ("v", fut.result())

    # -- used by planes ---------------------------------------------------------
    def add_ref(self, plane, record, meta=None, fd=None):
        """Say that this part refers to ``record``'s block; returns the ref index.

        ``fd`` (owned by the caller) travels with the frame when the peer may
        not have the block open yet.
        """
        key = record.key
        idx = self._ref_index.get(key)
        if idx is not None:
            return idx
        fd_index = self.fb.add_fd(fd) if fd is not None else -1
        idx = len(self.refs)
        self.refs.append((plane.name, key, fd_index, meta))
        self._ref_index[key] = idx
        self.fb.lend(record)
        return idx


class _PortablePickler(_SlotsKept, cloudpickle.Pickler):
    """cloudpickle, with the objects a plane knows in the plane's portable form."""

    dispatch_table = _PICKLE_DISPATCH

    def reducer_override(self, obj):
        tp = type(obj)
        if tp not in _PLAIN:
            for plane in _plane_for(tp) or ():
                reduced = plane.reduce_portable(obj)
                if reduced is not None:
                    return reduced
        return super().reducer_override(obj)


def dumps_portable(obj) -> bytes:
    """Pickle ``obj`` outside a frame (a function pickled by value) for a peer that may
    run other versions of the data's packages: numpy objects the function captures go
    as the numpy plane describes them, not as numpy's pickle (which names
    ``numpy._core``, absent from numpy 1)."""
    buf = io.BytesIO()
    _PortablePickler(buf, protocol=PROTOCOL).dump(obj)
    return buf.getvalue()


def _nbytes(data):
    return len(data) if type(data) is bytes else memoryview(data).nbytes


def _envelope_chunk(envelope, metas):
    """A frame's first chunk: ``u32 length | (message's wire tuple, part metas)``."""
    env = pickle.dumps((protocol.to_wire(envelope), metas), PROTOCOL)
    return _U32.pack(len(env)) + env


class FrameBuilder:
    """Collects the parts, fds and lends of one outgoing frame."""

    def __init__(self, link):
        self.link = link
        self.parts = []
        self.fds = []
        self._lends = []
        self._before_send = []            # callables run once, when the frame is built or aborted
        self.plane_state = {}             # plane name -> what it computes once per frame
        self.forwarded_futures = {}       # id -> (future, part index): forwarded once per frame
        # May a torch CPU tensor's storage be moved into shared memory for good (see
        # arrays.move_storage)?  Only the executor's calls say yes: a worker's results
        # must not alias the worker's own tensors.
        self.share_tensors_in_place = False

    def before_send(self, fn):
        """Run ``fn()`` once the frame's parts are encoded, before it is sent (or when it is
        aborted): e.g. the CUDA plane records one event per stream after all its copies."""
        self._before_send.append(fn)

    def _run_before_send(self):
        hooks, self._before_send = self._before_send, []
        for fn in hooks:
            fn()

    def add_fd(self, fd):
        self.fds.append(fd)
        return len(self.fds) - 1

    def lend(self, record):
        # Count the lend before the frame leaves: the peer may release it at once.
        lifetime.LEDGER.lend(record, self.link)
        self._lends.append(record)

    def encode_part(self, obj, forward_future=None, plain=None):
        """Encode ``obj`` as the next part; its index.  ``plain``: what :func:`_is_plain`
        says of ``obj``, when the caller asked already (None: ask here)."""
        if plain is None:
            plain = _is_plain(obj)
        if plain:
            self.parts.append(Part(_dumps_plain(obj, plain), None))
            return len(self.parts) - 1
        # Reserve the slot first: forwarded parts are appended while this one encodes.
        index = len(self.parts)
        self.parts.append(None)
        buf = io.BytesIO()
        enc = Encoder(buf, self, self.link, forward_future)
        enc.dump(obj)
        self.parts[index] = Part(_bytes_of(buf), None if enc.plain else enc.refs)
        return index

    def forward_part(self, part, records):
        """Append a received, undecoded part for this frame's peer (zero-copy chains).

        ``records`` are the part's blocks, in ``part.refs`` order.  Each block's fd
        comes from its plane (``forward_fd``) and its ref is rebased onto this
        frame's fds; the lends go to this frame's peer.
        """
        refs = []
        for (plane_name, key, _fd, meta), rec in zip(part.refs, records):
            fd = get_plane(plane_name).frame_fd(rec, self)
            refs.append((plane_name, key, self.add_fd(fd) if fd is not None else -1, meta))
            self.lend(rec)
        self.parts.append(Part(part.data, refs))
        return len(self.parts) - 1

    @property
    def lends(self):
        """Whether the frame lends shared blocks (its own, or forwarded parts')."""
        return bool(self._lends)

    def abort(self):
        """The frame will not be sent: undo its lends (after the hooks, which may hold
        resources such as reserved events)."""
        try:
            self._run_before_send()
        except Exception:
            log.exception("comfy_env: a plane's frame hook failed while aborting a frame")
        lends, self._lends = self._lends, []
        for rec in lends:
            lifetime.LEDGER.on_release(self.link, rec.key, 1)

    def build(self, envelope):
        if self._before_send:
            self._run_before_send()
        parts = self.parts
        chunks = [_envelope_chunk(envelope, [(_nbytes(p.data), p.refs) for p in parts])]
        chunks.extend(p.data for p in parts)
        # The lends stay recorded: abort() still undoes them if the send fails.
        return chunks


class _PlainFrame:
    """The frame builder of a frame made by :func:`plain_chunks`: no fds, nothing lent."""

    __slots__ = ()
    fds = ()
    lends = False

    def abort(self):
        pass


PLAIN_FRAME = _PlainFrame()


# Public name of the check (the executor asks it once per call, then passes the answer).
is_plain = _is_plain


def is_plain_call(args, kwargs):
    """:func:`is_plain` of a call ``(fn, args, kwargs)`` whose ``fn`` is known to be plain
    (a name, None, or a function pickled by name): its arguments alone are looked at."""
    return _all_plain((args, kwargs), 1)


def plain_flags(objs):
    """:func:`_is_plain` of each of ``objs`` (each object graph is walked once)."""
    return [_is_plain(obj) for obj in objs]


def plain_chunks(envelope, objs, flags):
    """The chunks of a frame of ``objs``, every one of them plain (``flags``: what
    :func:`plain_flags` said of each): what :func:`encode_message` would send, without
    a :class:`FrameBuilder` (warm calls and their results take this way)."""
    if len(objs) == 1:          # a call or a result: no loops to build
        data = _dumps_plain(objs[0], flags[0])
        return [_envelope_chunk(envelope, [(len(data), None)]), data]
    datas = [_dumps_plain(obj, flag) for obj, flag in zip(objs, flags)]
    return [_envelope_chunk(envelope, [(len(d), None) for d in datas]), *datas]


def encode_message(envelope, link, objs=(), forward_future=None):
    """Encode ``objs`` as parts 0.. of one frame.  Returns ``(frame builder, chunks)``
    (the builder's ``fds`` go with the chunks; ``abort()`` it if they are not sent)."""
    flags = plain_flags(objs)
    if all(flags):
        return PLAIN_FRAME, plain_chunks(envelope, objs, flags)
    fb = FrameBuilder(link)
    try:
        for obj, plain in zip(objs, flags):
            fb.encode_part(obj, forward_future, plain)
        return fb, fb.build(envelope)
    except BaseException:
        fb.abort()
        raise


def control_chunks(link, msgs):
    """Control messages ``msgs`` for ``link``'s peer as the chunks of one frame, to go
    ahead of the frame about to be sent to it (``Channel.send(before=)``); None when
    there are none, or when they cannot be encoded (dropped and logged, as
    ``Link.flush`` drops what cannot be sent)."""
    if not msgs:
        return None
    try:
        return encode_message(protocol.Control(msgs), link)[1]
    except Exception:
        log.exception("comfy_env: could not encode %d control messages for %s", len(msgs), link.name)
        return None


class Frame:
    """A received frame: its message (``envelope``, a :mod:`~comfy_env.ipc.protocol`
    type) plus undecoded parts and the fds that came with it."""

    def __init__(self, body, fds):
        view = memoryview(body)
        (n,) = _U32.unpack_from(view, 0)
        wire, metas = pickle.loads(view[4:4 + n])
        self.envelope = protocol.from_wire(wire)
        off = 4 + n
        self.parts = []
        for length, refs in metas:
            self.parts.append(Part(view[off:off + length], refs))
            off += length
        self.fds = fds

    def close_fds(self):
        fds, self.fds = self.fds, []
        for fd in fds:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass


def decode_envelope(body, fds):
    return Frame(body, fds)


class Decoder(numpy_names.Unpickler):
    """Decodes one part; plane descriptors become objects built on shared blocks (numpy's
    own pickles of either numpy major version read through :mod:`.numpy_names`)."""

    def __init__(self, frame, part_index, link, cache, records=None):
        part = frame.parts[part_index]
        super().__init__(io.BytesIO(part.data))
        self.frame = frame
        self.part = part
        self.link = link
        self._cache = cache        # part index -> decoded object (nested parts decode once)
        self._records = dict(records or {})   # ref index -> record (pre-accepted: lazy results)

    def persistent_load(self, pid):
        tag = pid[0]
        if tag == "p":
            return get_plane(pid[1]).decode(pid[2], self)
        if tag == "v":
            return pid[1]
        if tag == "f":
            return decode_part(self.frame, pid[1], self.link, self._cache)
        raise pickle.UnpicklingError(f"unknown persistent id tag {tag!r}")

    def record(self, ref_index):
        """The record for ref ``ref_index`` of this part, taking the peer's lease on first use."""
        rec = self._records.get(ref_index)
        if rec is None:
            refs = self.part.refs
            rec = lifetime.LEDGER.accept_leases(self.link, (refs[ref_index][1],),
                                                lambda _i: _open_ref(self.frame, refs[ref_index]))[0]
            self._records[ref_index] = rec
        return rec


def _open_ref(frame, ref):
    """``(resource, on_zero)`` for a block first seen in ``frame`` (its fd, if any, moves
    from the frame to the plane)."""
    plane_name, key, fd_index, meta = ref
    plane = get_plane(plane_name)
    fd = -1
    if fd_index >= 0:
        fd = frame.fds[fd_index]
        frame.fds[fd_index] = -1          # the plane owns it now
    return plane.open_remote(key, meta, fd), plane.on_zero


def accept_part_leases(frame, part_index, link):
    """Take the leases of a part without decoding it (lazy results): returns records.

    All or nothing: if a block cannot be opened, the leases taken so far and the
    ones not reached are given back before the error propagates.
    """
    refs = frame.parts[part_index].refs
    if not refs:
        return []
    taken = []
    try:
        return lifetime.LEDGER.accept_leases(link, [ref[1] for ref in refs],
                                             lambda i: _open_ref(frame, refs[i]), taken)
    except BaseException:
        lifetime.LEDGER.sweep(taken)
        for _plane, key, _fd, _meta in refs[len(taken):]:
            link.post(Release(key, 1))
        raise


def _explain_missing(exc):
    """Pickle's bare "No module named 'torch._utils'" says neither which package is
    missing nor where: name the package and this process's Python."""
    if sys.executable in str(exc) or not exc.name:
        return exc              # already explained (the data planes' own errors)
    pkg = exc.name.split(".")[0]
    version = _installed_version(pkg) if pkg != exc.name else None
    if version is not None:
        # The package is here, a module of it is not: the peer pickled the object with
        # another version of it (numpy 2 pickles name numpy._core, which numpy 1 lacks).
        hint = (" comfy_env sends numpy arrays, scalars, dtypes and masked arrays in a form "
                "every numpy version reads; this object took numpy's own pickle (an object "
                "array, or a numpy object comfy_env does not describe): convert it to plain "
                "Python or numpy data, or" if pkg == "numpy" else " Convert it to plain data, or")
        return ModuleNotFoundError(
            f"{exc}: the message holds an object pickled by another version of {pkg} than "
            f"this process has ({pkg} {version}, Python {sys.version.split()[0]} at "
            f"{sys.executable}), and that version's pickle names a module this one lacks."
            f"{hint} use the same major version of {pkg} on both sides", name=exc.name)
    return not_importable(pkg, f"an object of package {pkg!r}", prefix=f"{exc}: ")


def not_importable(pkg, what, prefix=""):
    """The error for a message holding ``what`` when ``pkg`` cannot be imported here:
    names the package, this process's Python, and the ways to fix it (a worker's
    environment can get the package; the parent, receiving a worker's object, cannot)."""
    from .calls import in_worker
    if not in_worker():
        return ModuleNotFoundError(
            f"{prefix}a worker sent {what}, but {pkg} is not importable in this (the "
            f"calling) process (Python {sys.version.split()[0]} at {sys.executable}): a "
            f"class defined in the worker's own modules (a node pack's, for instance) "
            f"cannot be rebuilt here.  Return plain data (dicts, lists, numbers, strings, "
            f"arrays, tensors) or objects of packages this process has, or install {pkg} "
            f"here as well", name=pkg)
    return ModuleNotFoundError(
        f"{prefix}this message holds {what}, but {pkg} is not importable in this process "
        f"(Python {sys.version.split()[0]} at {sys.executable}): install {pkg} in this "
        f"environment, or share it from the host (share = [\"{pkg}\"] in comfy-env.toml)",
        name=pkg,
    )


def _installed_version(pkg):
    """``pkg``'s version if it is importable here (without importing it), else None."""
    import importlib.metadata           # only on this error path: it imports a lot
    import importlib.util

    mod = sys.modules.get(pkg)
    if mod is None:
        try:
            if importlib.util.find_spec(pkg) is None:
                return None
        except (ImportError, ValueError):
            return None
    version = getattr(mod, "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version(pkg)
        except Exception:
            version = "unknown version"
    return str(version)


def _release_untaken(dec):
    """Give back the leases of refs the decode never reached (it failed first: a
    missing package, a class unknown here); otherwise the peer's lends would pin
    its blocks for as long as the link lives.  Their fds are closed with the frame."""
    refs = dec.part.refs or ()
    if len(dec._records) == len(refs):
        return
    for i, (_plane, key, _fd, _meta) in enumerate(refs):
        if i not in dec._records:
            dec.link.post(Release(key, 1))


def decode_part(frame, index, link, cache=None, records=None):
    if cache is None:
        cache = {}
    if index in cache:
        return cache[index]
    part = frame.parts[index]
    if part.refs is None:
        try:
            obj = pickle.loads(part.data)
        except ModuleNotFoundError as exc:
            raise _explain_missing(exc) from exc
        cache[index] = obj
        return obj
    dec = Decoder(frame, index, link, cache, records)
    try:
        obj = dec.load()
    except BaseException as exc:
        # The traceback keeps its frames, and they keep the decoder, whose stack and
        # memo hold what was decoded so far: arrays on the peer's blocks, pinned for as
        # long as the exception lives (a failed future keeps it).  Let go of them.
        recs = list(dec._records.values())
        _release_untaken(dec)
        dec = None
        traceback.clear_frames(exc.__traceback__)
        lifetime.LEDGER.sweep(recs)
        if isinstance(exc, ModuleNotFoundError):
            raise _explain_missing(exc) from exc
        raise
    lifetime.LEDGER.sweep(list(dec._records.values()))
    _release_untaken(dec)
    cache[index] = obj
    return obj


@protocol.handles(PlaneMessage)
def _apply_plane_message(link, msg):
    get_plane(msg.plane).on_control(link, msg.payload)
