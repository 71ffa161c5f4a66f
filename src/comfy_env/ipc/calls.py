"""What a call names, on both sides: ``"package.module:qualname"`` references and map chunks.

The parent checks a reference's form when it is submitted (:func:`check_reference`);
the worker resolves it (:func:`resolve_reference`).  :func:`run_chunk` is the function
a ``map(..., chunksize=N)`` call sends: the parent pickles it by reference, the worker
imports it from here.  :func:`adopt_import_paths` makes a worker (and a zygote) find
modules where the parent does.  Neither side imports the other; both import this module.
"""
from __future__ import annotations

import importlib
import os
import sys
import threading
import types

__all__ = ["IMPORTING", "adopt_import_paths", "adopt_sys_path", "parent_argv", "parent_cwd", "chain_chunk_results", "check_reference", "completed",
           "in_worker", "resolve_reference", "run_chunk"]


def in_worker() -> bool:
    """Whether this process is one of comfy_env's workers (spawned, or forked from a
    zygote, which marks them)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return getattr(spec, "name", None) == "comfy_env.worker" or os.environ.get("COMFY_ENV_ROLE") == "worker"


class _Importing:
    """``with IMPORTING:`` in a worker while it imports what a call names (the function's
    module, by reference or by string), on the thread that does it.  A submit from that
    thread then is module-level code of the call's own module starting work when
    imported -- a script without an ``if __name__ == "__main__":`` guard, submitting
    ``"script:fn"``: each worker would import it and start another worker, for ever."""

    __slots__ = ("thread",)

    def __init__(self):
        self.thread = None

    def __enter__(self):
        self.thread = threading.get_ident()

    def __exit__(self, *exc):
        self.thread = None

    def now(self) -> bool:
        return self.thread is not None and self.thread == threading.get_ident()


IMPORTING = _Importing()


def check_reference(ref: str) -> tuple[str, str]:
    """``(module, qualname)`` of a ``"package.module:qualname"`` string; ValueError if malformed."""
    if isinstance(ref, str) and ref.count(":") == 1:
        modname, qualname = ref.split(":")
        if modname and qualname:
            return modname, qualname
    raise ValueError(f"a function reference must look like 'package.module:qualname', got {ref!r}")


def resolve_reference(ref: str):
    """``"package.module:qualname"`` -> the object, imported in this process."""
    modname, qualname = check_reference(ref)
    module = importlib.import_module(modname)
    obj = module
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttributeError(
                f"module {modname!r} has no attribute {qualname!r} "
                f"(looked up in the worker, Python {sys.version.split()[0]} at {sys.executable})"
            ) from None
    return obj


def completed(result):
    """What a call returned, with an ``async def`` function's coroutine run to completion
    here, on its own loop: a coroutine object can't be sent back, and nobody in this
    process would await it."""
    if type(result) is types.CoroutineType:
        import asyncio
        return asyncio.run(result)
    return result


def run_chunk(fn, chunk):
    """``map(..., chunksize=N)``: one call runs several items (ProcessPoolExecutor's _process_chunk)."""
    if isinstance(fn, str):
        with IMPORTING:
            fn = resolve_reference(fn)
    return [completed(fn(*args)) for args in chunk]


def chain_chunk_results(results):
    """The items of each chunk's result list, in order, as ProcessPoolExecutor.map yields
    them: a generator (``close()`` cancels the calls not yet reached) that lets go of
    each item as it yields it, so the caller alone decides how long a result lives."""
    for chunk in results:
        chunk.reverse()
        while chunk:
            yield chunk.pop()


def adopt_sys_path(paths) -> None:
    """The parent's ``sys.path`` first, then what only this process added (its own extras)."""
    extra = [p for p in sys.path if p not in paths]
    sys.path[:] = list(paths) + extra


def parent_argv() -> list:
    """This process's ``sys.argv`` for its workers (``[""]`` where an embedding
    interpreter set none)."""
    return [str(a) for a in (getattr(sys, "argv", None) or [""])]


def parent_cwd():
    """This process's working directory, for its workers to take; None when it was
    removed under us (the worker then stays where it started, as for a cwd it cannot
    enter: a deleted directory failed every worker start)."""
    try:
        return os.getcwd()
    except OSError:
        return None


def adopt_import_paths(cfg) -> None:
    """Take the parent's ``sys.path`` (first, keeping our own extras after it), cwd and
    ``sys.argv``.

    ``cfg["sys_path"]`` is None for a worker of another environment: its own path
    is the right one.  A cwd that is gone or unreadable here is skipped (the call
    may not need it; an import that does fails with its own clear error).  The
    parent's ``sys.argv`` replaces the worker's own command line (its fds, nothing a
    module parsing the command line at import should see), as multiprocessing's
    spawn gives its children the parent's."""
    if cfg.get("argv") is not None:
        sys.argv[:] = list(cfg["argv"])
    if cfg.get("sys_path") is not None:
        adopt_sys_path(cfg["sys_path"])
    if cfg.get("cwd"):
        try:
            os.chdir(cfg["cwd"])
        except OSError:
            pass
