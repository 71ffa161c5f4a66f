"""Functions pickled by value, sent once per worker.

A function the worker cannot import (defined in ``__main__``, a closure, a
lambda) travels pickled by value.  Pickling and unpickling it on every call
costs more than the rest of a small call, so the first call to a worker
carries the pickled bytes under their hash, and later calls carry only the
hash; the worker keeps the unpickled function.

Identity: the key is the hash of the pickled bytes, never the function object
or its name.  A redefined function, a closure over other values, a lambda made
per call pickle to other bytes and so to another key: a worker can only ever
run what pickling the function *now* would have sent.

Pickling itself is skipped only when provably unneeded: the parent remembers,
per function object (weakly), a *fingerprint* of everything cloudpickle puts
into the bytes (code object, name, defaults, closure cell contents, the
globals the code reads, ``__dict__``...), and reuses the bytes while the
fingerprint is unchanged.  A fingerprint is built only from values whose
pickled form is fixed by what the fingerprint records: immutable atoms
(compared by type and ``repr`` for floats, so ``-0.0`` and ``0.0`` differ),
tuples/frozensets of them, objects pickled by reference (modules, importable
functions and classes: identity, re-checked for being importable each call),
and by-value functions (recursively).  Anything else reachable (a list, a
dict, an array, an instance, a class defined in ``__main__``) can change
without the function object noticing, and a function whose code rebinds its
module globals (``global x; x = ...``) or calls ``globals()`` or has attributes
is not described by them: such a function gets no fingerprint and is pickled
on every call (its bytes' hash still spares the worker a re-send and an
unpickling when they did not change).

What a worker keeps between calls, as a ProcessPoolExecutor worker keeps its
copy of the module: its copy of a function, with the function's attributes and
the globals the function's calls set there (``global MODEL; MODEL = load()``, a
dict filled lazily), for as long as the parent's own values of what the function
reads stay the same; when they change, the bytes do, and the next call starts
from the parent's new values.  Functions pickled apart do not share globals: a
``load()`` and an ``infer()`` of the same script each see their own.  The submodule
imports cloudpickle records (``os.path`` used as ``os.path.join``) depend on
``sys.modules``; the fingerprint records its size, so any import in between
re-pickles.

The parent decides what each worker holds (:class:`SentFunctions`, one per
worker, LRU-bounded in count and bytes) and tells the worker which entries to
drop with each new one, so both sides agree by construction; a new worker
starts empty.
"""
from __future__ import annotations

import dis
import hashlib
import itertools
import operator
import sys
import types
import weakref
from collections import OrderedDict

from .ipc import mainspace, numpy_names

try:    # cloudpickle's own rules: the fingerprint must follow them exactly, or not be used.
    from cloudpickle.cloudpickle import _extract_code_globals, _should_pickle_by_reference
except ImportError:     # pragma: no cover - a cloudpickle without them: pickle every call
    _extract_code_globals = _should_pickle_by_reference = None

MAX_ENTRIES = 128               # functions a worker keeps
MAX_BYTES = 32 << 20            # their pickled bytes, in all
MAX_ONE = 4 << 20               # bigger functions travel with each call, as before

_ATOMS = (type(None), bool, int, str, bytes)
_MUTABLE = object()             # in a fingerprint's ``keep``: it read a dict, list or set
_NUMBERS = (float, complex)


class _NotFixed(Exception):
    """Something reachable from the function can change without the function noticing."""


def digest(blob: bytes) -> bytes:
    return hashlib.blake2b(blob, digest_size=16).digest()


# -- the parent's side --------------------------------------------------------------
class SentFunctions:
    """What one worker holds: digest -> size, in LRU order (the parent's books)."""

    def __init__(self, max_entries=None, max_bytes=None):
        self.max_entries = MAX_ENTRIES if max_entries is None else max_entries
        self.max_bytes = MAX_BYTES if max_bytes is None else max_bytes
        self.entries = OrderedDict()
        self.nbytes = 0

    def plan(self, key, size):
        """The message part for sending ``key``: ``("id", key)`` or ``("new", key, evict)``."""
        if key in self.entries:
            return ("id", key)
        evict = []
        n, total = len(self.entries), self.nbytes
        it = iter(self.entries.items())
        while n + 1 > self.max_entries or total + size > self.max_bytes:
            try:
                old, old_size = next(it)
            except StopIteration:
                break
            evict.append(old)
            n -= 1
            total -= old_size
        return ("new", key, tuple(evict))

    def commit(self, plan, size):
        """The call went out: the worker now holds what ``plan`` said."""
        if plan[0] == "id":
            self.entries.move_to_end(plan[1])
            return
        _, key, evict = plan
        for old in evict:
            self.nbytes -= self.entries.pop(old)
        self.entries[key] = size
        self.nbytes += size


class _Pickled:
    __slots__ = ("fingerprint", "keep", "blob", "key", "watch", "__weakref__")

    def __init__(self, fingerprint, keep, blob, key, watch):
        self.fingerprint = fingerprint
        self.keep = keep        # the objects the fingerprint names by id, kept alive
        self.blob = blob
        self.key = key
        self.watch = watch      # see _Watch; None: check the whole fingerprint each call


class _Watch:
    """The quick check for a *flat* function: the very objects its fingerprint was made of.

    A function is flat when everything its fingerprint reads is an immutable atom, a
    tuple or frozenset of such, a module, or an object pickled by reference (no
    function pickled by value, no annotations or keyword defaults, no ``__dict__``).
    For those, the same objects (``is``) mean the same fingerprint: atoms and tuples
    cannot change, so only the by-reference objects are asked again whether
    cloudpickle still pickles them by name, and modules are re-counted
    (``len(sys.modules)``, as in the fingerprint).  Any difference sends the call
    through the whole fingerprint, which decides.  It spares a warm call building
    the fingerprint's tuples, which cost as much as the rest of sending it.
    """

    __slots__ = ("code", "keys", "objects", "refs", "nmodules")

    def __init__(self, code, keys, objects, refs, nmodules):
        self.code = code
        self.keys = keys        # the globals read: cloudpickle's dunders, then the code's names
        self.objects = objects
        self.refs = refs
        self.nmodules = nmodules


_DUNDERS = ("__package__", "__name__", "__path__", "__file__")
_MISSING = object()


_ALWAYS_MISSING = itertools.repeat(_MISSING)


def _objects(fn, keys):
    """What :func:`fingerprint` reads of a flat function, as the objects themselves
    (``keys``: the globals it reads, :data:`_DUNDERS` first)."""
    # One flat tuple: each item is compared by identity.  (A function's closure has a
    # fixed number of cells, so the positions cannot shift between calls.)  Built with
    # map(): this runs before every warm call of a script's function.
    objects = (fn.__name__, fn.__qualname__, fn.__module__, fn.__doc__, fn.__defaults__)
    closure = fn.__closure__
    if closure:
        objects += tuple(map(_contents, closure))
    return objects + tuple(map(fn.__globals__.get, keys, _ALWAYS_MISSING))


def _contents(cell):
    try:
        return cell.cell_contents
    except ValueError:
        return _MISSING


def _watch(fn, names):
    """A :class:`_Watch` for ``fn`` if it is flat, else None."""
    if fn.__annotations__ or fn.__kwdefaults__ or fn.__dict__:
        return None
    keys = _DUNDERS + tuple(names)
    objects = _objects(fn, keys)
    refs = []
    modules = [False]
    for v in objects:
        if not _flat(v, refs, modules):
            return None
    return _Watch(fn.__code__, keys, objects, tuple(refs),
                  len(sys.modules) if modules[0] else None)


def _flat(v, refs, modules, depth=0):
    t = type(v)
    if t in _ATOMS or t in _NUMBERS or v is _MISSING:
        return True
    if t is tuple or t is frozenset:
        return depth <= 4 and len(v) <= 64 and all(_flat(x, refs, modules, depth + 1) for x in v)
    if t is types.ModuleType:
        modules[0] = True
        return True
    if t is types.BuiltinFunctionType:
        return _module_builtin(v)
    if t is types.FunctionType or isinstance(v, type):
        if _should_pickle_by_reference(v):
            refs.append(v)
            return True
    return False


def _module_builtin(v):
    """A builtin function of a module (``math.sqrt``, ``len``): pickled as that module's
    attribute, by name, so the same object pickles the same.  A builtin *method*
    (``L.append``) pickles its object, which may change: not this.  (cloudpickle's
    ``_should_pickle_by_reference`` refuses builtins with a TypeError.)"""
    owner = getattr(v, "__self__", None)
    return owner is None or type(owner) is types.ModuleType


def _unchanged(fn, watch):
    """Would ``fn``'s fingerprint equal the one ``watch`` was made with?  (False: maybe not.)"""
    if fn.__code__ is not watch.code or fn.__dict__ or fn.__annotations__ or fn.__kwdefaults__:
        return False
    if watch.nmodules is not None and len(sys.modules) != watch.nmodules:
        return False
    return (all(map(operator.is_, _objects(fn, watch.keys), watch.objects))
            and all(map(_should_pickle_by_reference, watch.refs)))


# function -> _Pickled; weak, so a dead function's entry (and bytes) go with it.
_pickled: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_code_info: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_MAX_REMEMBERED = 512


def pickled_once(fn, pickle):
    """``(blob, key)`` for a function to send once per worker, or None to send it
    with the call as before (its state is not fixed, or it is big).

    ``pickle(fn)`` runs now, unless the fingerprint proves its bytes would be
    those of last time."""
    entry = _pickled.get(fn)
    if entry is not None and entry.watch is not None and _unchanged(fn, entry.watch):
        return entry.blob, entry.key
    keep = []
    # The watch is taken before the fingerprint and the pickle and kept only if the
    # objects are still the same after them: it then describes what they saw (another
    # thread may change a global meanwhile).
    watch = _watch(fn, _info(fn.__code__)[0])
    try:
        fp = fingerprint(fn, keep)
    except _NotFixed:
        # Pickled on every call; bytes a worker already holds are not sent again, and
        # it keeps running its copy, whose globals keep what its earlier calls set there.
        _pickled.pop(fn, None)
        blob = pickle(fn)
        return (blob, digest(blob)) if len(blob) <= MAX_ONE else None
    if entry is not None and entry.fingerprint == fp:
        entry.watch = watch if watch is not None and _unchanged(fn, watch) else None
        return entry.blob, entry.key
    blob = pickle(fn)
    if len(blob) > MAX_ONE:
        return None
    key = digest(blob)
    try:
        # What another thread changed while it was pickled (a global's contents): the
        # bytes may hold either value, so they are not kept under either fingerprint.
        # Changed and changed back meanwhile, the fingerprint would not show it: where a
        # container is read, the bytes must also come out the same from a second pickle.
        settled = fingerprint(fn, []) == fp
        if settled and any(x is _MUTABLE for x in keep):
            settled = pickle(fn) == blob and fingerprint(fn, []) == fp
    except _NotFixed:
        settled = False
    if not settled:
        _pickled.pop(fn, None)
        return blob, key
    if watch is not None and not _unchanged(fn, watch):
        watch = None
    if len(_pickled) >= _MAX_REMEMBERED:
        _pickled.clear()
    _pickled[fn] = _Pickled(fp, keep, blob, key, watch)
    return blob, key


def cacheable(fn) -> bool:
    """A plain Python function (the only kind whose pickled form we reason about)."""
    return type(fn) is types.FunctionType and _should_pickle_by_reference is not None


def by_value_natively(fn) -> bool:
    """Would cloudpickle pickle ``fn`` by value without being asked to?"""
    # A script's function: cloudpickle's own first answer (its module lookup names
    # __main__), without the lookup, on every warm call of one.
    return fn.__module__ == "__main__" or not _should_pickle_by_reference(fn)


def fingerprint(fn, keep, memo=None):
    """Everything cloudpickle's bytes of ``fn`` depend on, or :class:`_NotFixed`."""
    if memo is None:
        # The top function is the cache's (weak) key: alive while its entry is,
        # so its id cannot be reused; holding it in ``keep`` would pin it forever.
        memo = {id(fn)}
    elif id(fn) in memo:
        return ("cycle", id(fn))        # recursion; the function is alive (key or in ``keep``)
    else:
        memo.add(id(fn))
        keep.append(fn)
    code = fn.__code__
    names, rebinds = _info(code)
    if rebinds or fn.__dict__:
        raise _NotFixed
    keep.append(code)
    g = fn.__globals__
    return (
        id(code), fn.__name__, fn.__qualname__, _value(fn.__module__, keep, memo),
        _value(fn.__doc__, keep, memo),
        _dict(fn.__annotations__, keep, memo), _dict(fn.__kwdefaults__, keep, memo),
        _value(fn.__defaults__, keep, memo),
        None if fn.__closure__ is None else tuple(_cell(c, keep, memo) for c in fn.__closure__),
        tuple(_value(g[k], keep, memo) if k in g else ("missing",) for k in
              ("__package__", "__name__", "__path__", "__file__")),
        tuple((k, _value(g[k], keep, memo)) if k in g else (k,) for k in names),
    )


def _info(code):
    info = _code_info.get(code)
    if info is None:
        names = tuple(_extract_code_globals(code))
        rebinds = "globals" in names or _rebinds_globals(code)
        info = _code_info[code] = (names, rebinds)
    return info


def _rebinds_globals(code):
    for ins in dis.get_instructions(code):
        if ins.opname in ("STORE_GLOBAL", "DELETE_GLOBAL"):
            return True
    return any(isinstance(c, types.CodeType) and _rebinds_globals(c) for c in code.co_consts)


def _cell(cell, keep, memo):
    try:
        return _value(cell.cell_contents, keep, memo)
    except ValueError:
        return ("empty",)


def _dict(d, keep, memo):
    if d is None:
        return None
    if type(d) is not dict or len(d) > 64 or any(type(k) is not str for k in d):
        raise _NotFixed
    return tuple((k, _value(v, keep, memo)) for k, v in d.items())


def _value(v, keep, memo, depth=0):
    t = type(v)
    if t in _ATOMS:
        return (t, v)
    if t in _NUMBERS:
        return (t, repr(v))
    if t is tuple or t is frozenset:
        if depth > 4 or len(v) > 64:
            raise _NotFixed
        items = tuple(_value(x, keep, memo, depth + 1) for x in v)
        return (t, tuple(sorted(items, key=repr)) if t is frozenset else items)
    if t is dict or t is list or t is set:
        # A small mutable global (a cache the worker fills while the parent's stays
        # empty, a config dict): by its contents, read now, so a change in place is
        # seen; and by its id, since two names bound to one dict pickle as one object
        # and to two equal dicts as two.  Pickling such a function on every call cost
        # ~1 ms with torch imported (cloudpickle scans sys.modules for each module a
        # function names).  A snapshot of the items: another thread may change it.
        if depth > 4 or len(v) > 64:
            raise _NotFixed
        keep.append(v)
        keep.append(_MUTABLE)
        if t is dict:
            items = tuple((_value(k, keep, memo, depth + 1), _value(x, keep, memo, depth + 1))
                          for k, x in tuple(v.items()))
        else:
            items = tuple(_value(x, keep, memo, depth + 1) for x in tuple(v))
            if t is set:
                items = tuple(sorted(items, key=repr))
        return (t, id(v), items)
    if t is types.FunctionType:
        if _should_pickle_by_reference(v):
            keep.append(v)
            return ("ref", id(v))
        return ("fn", fingerprint(v, keep, memo))
    if t is types.ModuleType:
        # Pickled by name; which of its submodules cloudpickle lists depends on sys.modules.
        keep.append(v)
        return ("module", id(v), len(sys.modules))
    if t is types.BuiltinFunctionType and _module_builtin(v):
        keep.append(v)
        return ("ref", id(v))
    if isinstance(v, type) and _should_pickle_by_reference(v):
        keep.append(v)
        return ("ref", id(v))
    raise _NotFixed


# -- the worker's side --------------------------------------------------------------
class _Held:
    """One function a worker holds: its bytes, and once unpickled, the function and the
    script globals its load took (:meth:`~.mainspace.MainSpace.loading`)."""

    __slots__ = ("key", "blob", "fn", "taken")

    def __init__(self, key, blob):
        self.key = key
        self.blob = blob
        self.fn = None
        self.taken = ()


class HeldFunctions:
    """The worker's functions by digest; the parent says what to add and drop."""

    def __init__(self):
        self.entries = {}       # key -> _Held

    def take(self, ref):
        """Apply the parent's ``("new", key, evict, blob)`` or look up ``("id", key)``.

        Done before anything else of the call can fail, so the parent's books
        stay right even when the call's arguments do not decode here."""
        if ref[0] == "new":
            _, key, evict, blob = ref
            for old in evict:
                self.entries.pop(old, None)
            entry = self.entries[key] = _Held(key, blob)
            return entry
        return self.entries.get(ref[1])

    @staticmethod
    def load(entry):
        if entry is None:
            raise RuntimeError("comfy_env internal error: the parent referred to a function "
                               "this worker does not hold (please report it)")
        space = mainspace.SPACE
        if entry.fn is None or (space is not None and not space.still_current(entry.key, entry.taken)):
            # Unpickled at first use, and again where the script's globals it brought were
            # changed since by another function's bytes (ipc/mainspace.py): its own values
            # come back with it.  A failure (a module missing here) repeats on every call,
            # as it would if the bytes came each time.
            if space is None:
                entry.fn = numpy_names.loads(entry.blob)
            else:
                entry.fn, entry.taken = space.loading(entry.key, lambda: numpy_names.loads(entry.blob))
        return entry.fn
