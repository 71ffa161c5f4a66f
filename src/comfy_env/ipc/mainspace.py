"""A worker's copy of the parent's script module (``__main__``).

Functions and classes of the parent's script travel by value (cloudpickle): each
function arrives with a globals dict of its own, holding the parent's values of the
names it reads.  A ProcessPoolExecutor worker instead has one copy of the script's
module, and code that relies on that broke here:

* an initializer's ``global MODEL; MODEL = load()`` was not what a task's ``MODEL``
  read (each had its own globals), the standard ``initializer`` pattern;
* code in the worker that finds the script's objects *by name* found nothing: the
  worker's ``__main__`` was ``comfy_env.worker``.  ``pickle.dumps`` of an instance of
  a script class (``torch.save`` of a checkpoint, joblib), a ``functools.lru_cache``
  function (pickled by name), a ProcessPoolExecutor inside a call.

:func:`install` gives the worker a module of its own as ``sys.modules["__main__"]``
(the worker's code keeps its own globals), and the worker's unpickler
(:mod:`.numpy_names`) builds the script's functions over that module's namespace
and registers the script's top-level functions and classes there by name.

The parent's values of the names a function reads arrive with it, as before.  For
each name: where the parent's value changed since it last sent it, the worker takes
it (the parent's later ``K = 20`` reaches the worker, as it did before this module);
where the parent sends the value it sent before, the worker's stays, rebound there
(the initializer's ``MODEL``) or changed in place there (a dict filled lazily), as in a
ProcessPoolExecutor worker; so does a name code in the worker made before the parent
ever sent it (``globals()["MODEL"] = ...``).  A value that cannot be told apart (a big
array, an object pickle cannot write by itself) counts as changed.

Written by hand: cloudpickle rebuilds functions through ``_make_function`` and
``_function_setstate`` and classes through ``_class_setstate``, which the pickle
names; the unpickler substitutes the three below for them, and each calls
cloudpickle's own.  Nothing is patched in cloudpickle, and nothing changes in the
parent (``install`` runs in workers only).
"""
from __future__ import annotations

import pickle
import sys
import threading
import types

__all__ = ["install", "hook_for", "SPACE"]

class MainSpace:
    """The worker's ``__main__`` namespace and what the parent sent for each name."""

    def __init__(self, module, real=None):
        self.module = module
        self.real = real              # the module running the worker (the old __main__)
        self.ns = module.__dict__
        self._sent = {}               # name -> _digest of the parent's value it sent last
        self._by = {}                 # name -> the load (a held function's key) that sent it last
        self._load = None             # the load running now, and what it takes (see loading)
        self._took = None
        self._lock = threading.Lock()

    def take(self, name, value):
        """The parent's ``value`` of ``name``: set where the parent changed it since it
        last sent it (or where that cannot be told); else the worker's value stays,
        rebound (the initializer's ``MODEL``) or changed in place (a lazily filled dict)."""
        d = _digest(value)
        with self._lock:
            prev = self._sent.get(name, _NEVER)
            self._sent[name] = d
            self._by[name] = self._load
            if self._took is not None:
                # A script function or class has no digest: kept, to compare with
                # what the name holds later (see still_current).
                self._took.append((name, d, value if d is None and callable(value) else None))
            if name not in self.ns:
                self.ns[name] = value
            elif prev is _NEVER:
                pass                  # made here, never sent: the worker's own (globals()["X"] = ...)
            elif d is None or d != prev:
                self.ns[name] = value

    def loading(self, token, load):
        """``(load(), taken)``: run ``load`` (unpickling a function the worker keeps, under
        ``token``) and say which names it took and the digests it took them with."""
        saved = self._load, self._took
        self._load, self._took = token, []
        try:
            return load(), self._took
        finally:
            self._load, self._took = saved

    def still_current(self, token, taken):
        """Whether the names a kept function's load took still hold what it sent: then the
        function can run again as it is.  Not when another load sent one of them since
        with another value (the parent's value went 1, 2, then back to 1: the bytes of
        the first load come again, and the worker must see 1, not the 2 it holds now).
        A value with no digest (a big array) is current only if no other load sent it."""
        sent, by, ns = self._sent, self._by, self.ns
        for name, d, kept in taken:
            if d is not None:
                if sent.get(name, _NEVER) != d:
                    return False
            elif kept is not None:
                # Another function's bytes bring the same helper as a new object.
                if not _same_callable(ns.get(name, _NEVER), kept):
                    return False
            elif by.get(name) != token:
                return False
        return True

    def register(self, obj):
        """A top-level function or class of the script, findable by name here where the
        name is free.  A bound name is left alone: the parent's binding of it arrives
        with whatever reads it (``take``), and may be another object of that name (the
        ``lru_cache`` wrapper of a function, whose ``__name__`` it copies)."""
        name = getattr(obj, "__qualname__", None)
        if (type(name) is str and name.isidentifier() and getattr(obj, "__module__", None) == "__main__"
                and name == getattr(obj, "__name__", None)):
            with self._lock:
                current = self.ns.get(name, _NEVER)
                # A class the parent redefined replaces the one it sent before (a
                # notebook re-running a cell): pickling an instance here looks the name
                # up.  A function does not replace a bound name, which may be its own
                # wrapper (lru_cache copies its __name__).
                if current is _NEVER or (isinstance(obj, type) and isinstance(current, type)
                                         and self._sent.get(name, _NEVER) is None):
                    self.ns[name] = obj
                    self._sent[name] = None       # the parent's: its later binding replaces it


def _same_callable(now, kept):
    """Whether ``now`` is ``kept``, or a function built from the same code, name and
    defaults (the parent's unchanged helper, arrived with another function's bytes)."""
    if now is kept:
        return True
    if type(now) is not types.FunctionType or type(kept) is not types.FunctionType:
        return False
    try:
        return bool(now.__code__ == kept.__code__ and now.__qualname__ == kept.__qualname__
                    and now.__defaults__ == kept.__defaults__
                    and now.__kwdefaults__ == kept.__kwdefaults__)
    except Exception:             # defaults whose == raises or is ambiguous (arrays)
        return False


def _digest(value):
    """What the parent's value was, to tell a value sent again from a changed one:
    its pickle (``0.0`` and ``-0.0`` differ, as do an empty and a filled dict), or None
    where there is none worth keeping (a big array, an object pickle cannot write by
    itself, such as a script function: it counts as changed)."""
    if callable(value) and getattr(value, "__module__", None) == "__main__":
        return None           # pickle writes the script's classes and functions by name only
    n = getattr(value, "nbytes", 0)       # a class may have an ``nbytes`` descriptor: ints only
    if type(n) is int and n > _DIGEST_MAX:
        return None
    try:
        data = pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    except Exception:
        return None
    return data if len(data) <= _DIGEST_MAX else None


_DIGEST_MAX = 1 << 16
_NEVER = object()         # a name the parent never sent

SPACE: MainSpace | None = None


def install():
    """Make this worker's ``__main__`` a module of its own (idempotent).

    It keeps the running module's ``__spec__`` (so ``calls.in_worker()`` and
    multiprocessing see the same main module as before) and nothing else of it: the
    script's names cannot collide with the worker's."""
    global SPACE
    if SPACE is not None:
        return SPACE
    real = sys.modules.get("__main__")
    module = types.ModuleType("__main__", "The parent's script, as this comfy_env worker holds it.")
    module.__spec__ = getattr(real, "__spec__", None)
    module.__builtins__ = __builtins__
    SPACE = MainSpace(module, real)
    sys.modules["__main__"] = module
    return SPACE


# -- cloudpickle's constructors, over the worker's __main__ ----------------------------------

def _make_function(code, globals, name, argdefs, closure):
    from cloudpickle import cloudpickle as cp
    space = SPACE
    if space is not None and globals.get("__name__") == "__main__":
        ns = space.ns
        for key in ("__package__", "__file__"):     # relative imports, code that reads __file__
            if key in globals and key not in ns:
                ns[key] = globals[key]
        globals = ns
    return cp._make_function(code, globals, name, argdefs, closure)


def _function_setstate(obj, state):
    from cloudpickle import cloudpickle as cp
    space = SPACE
    if space is None or obj.__globals__ is not space.ns:
        return cp._function_setstate(obj, state)
    state, slotstate = state
    slotstate = dict(slotstate)
    for key, value in slotstate.pop("__globals__").items():
        space.take(key, value)
    slotstate["__globals__"] = {}          # merged above; cloudpickle's update is then a no-op
    cp._function_setstate(obj, (state, slotstate))
    space.register(obj)
    return None


def _class_setstate(obj, state):
    from cloudpickle import cloudpickle as cp
    out = cp._class_setstate(obj, state)
    if SPACE is not None:
        SPACE.register(obj)
    return out


_HOOKS = {"_make_function": _make_function, "_function_setstate": _function_setstate,
          "_class_setstate": _class_setstate}


def hook_for(name):
    """Our stand-in for ``cloudpickle.cloudpickle.<name>`` while a worker's ``__main__`` is
    ours, else None."""
    return _HOOKS.get(name) if SPACE is not None else None
