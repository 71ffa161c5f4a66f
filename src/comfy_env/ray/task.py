"""What runs inside a Ray worker: one call, as ``comfy_env.worker`` runs it.

Ray resolves ``ObjectRef`` arguments given at the top level of a task (the
chained results of other calls); refs nested in lists, tuples or dicts are
resolved here, so a future may sit anywhere in the arguments, as with
``IsolatedExecutor``.
"""
from __future__ import annotations

from ..errors import InitializerFailed, portable_exception
from ..ipc import numpy_names
from ..ipc.calls import completed, resolve_reference, run_chunk

__all__ = ["run_call", "run_chunk_call", "ByValue", "Carried"]


class Carried(Exception):
    """A ``KeyboardInterrupt`` or ``StopIteration`` the call raised, carried to the
    driver as an ordinary exception, which unwraps it (``executor._convert``): Ray takes
    a task's ``KeyboardInterrupt`` for its own cancellation, and a ``StopIteration``
    reaching the driver breaks a generator of Ray's there (PEP 479)."""

    def __init__(self, exc):
        super().__init__(exc)
        self.exc = exc


class ByValue:
    """A callable pickled by value for a worker that cannot import its module."""

    __slots__ = ("blob",)

    def __init__(self, blob):
        self.blob = blob


def _function(fn):
    if isinstance(fn, str):
        return resolve_reference(fn)
    if isinstance(fn, ByValue):
        return numpy_names.loads(fn.blob)
    return fn


def _resolve_nested(obj, depth=0):
    import ray

    if isinstance(obj, ray.ObjectRef):
        return ray.get(obj)
    if depth >= 20:
        return obj
    t = type(obj)
    if t in (list, tuple, set, frozenset):
        return t(_resolve_nested(x, depth + 1) for x in obj)
    if t is dict:
        return {k: _resolve_nested(v, depth + 1) for k, v in obj.items()}
    return obj


class Keywords(dict):
    """A call's keyword arguments passed as one positional argument: Ray's ``.remote()``
    has a parameter named ``self`` of its own, so ``submit(fn, self=...)`` goes this way."""


def run_call(fn, setup, nested, /, *args, **kwargs):
    """The Ray task behind ``RayExecutor.submit``.

    ``setup``: the executor's initializer (see :func:`_setup`), or None.
    ``nested``: whether ``args``/``kwargs`` hold refs below the top level.
    """
    if setup is not None:
        _setup(setup)
    if args and type(args[-1]) is Keywords:
        kwargs = dict(args[-1])
        args = args[:-1]
    if nested:
        args = _resolve_nested(args)
        kwargs = _resolve_nested(kwargs)
    try:
        return completed(_function(fn)(*args, **kwargs))
    except (KeyboardInterrupt, StopIteration) as exc:
        raise Carried(exc) from exc
    except Exception as exc:
        _carry_if_not_rebuilt(exc)
        raise


def run_chunk_call(fn, setup, nested, chunk):
    """``map(..., chunksize=N)``: one task runs N items (comfy_env.worker.run_chunk)."""
    if setup is not None:
        _setup(setup)
    if nested:
        chunk = _resolve_nested(chunk)
    try:
        return run_chunk(_function(fn), chunk)
    except (KeyboardInterrupt, StopIteration) as exc:
        raise Carried(exc) from exc
    except Exception as exc:
        _carry_if_not_rebuilt(exc)
        raise


def _carry_if_not_rebuilt(exc):
    """An exception pickle cannot rebuild in the driver (its ``__init__`` takes other
    arguments than its ``args``) goes carried, in the form the driver rebuilds with its
    type (as IsolatedExecutor's worker sends it)."""
    portable = portable_exception(exc)
    if portable is not exc:
        raise Carried(portable) from exc


_done_setups = set()


def _setup(setup):
    """Once per worker process and executor (Ray reuses processes across tasks):
    ``setup = (token, initializer, initargs)``; the initializer runs as
    IsolatedExecutor runs it, once per worker."""
    token, initializer, initargs = setup
    if token in _done_setups:
        return
    try:
        _function(initializer)(*initargs)
    except BaseException as exc:
        # The executor breaks on this (as IsolatedExecutor does): every later call
        # would fail the same way.
        raise InitializerFailed(f"the initializer failed in a Ray worker: "
                                f"{type(exc).__name__}: {exc}") from exc
    _done_setups.add(token)
