"""Functions that chain-test workers run (they import it by reference when env=None,
or receive it by value in a foreign env: keep it to numpy and the standard library).

Everything here runs inside a worker process unless said otherwise.
"""
from __future__ import annotations

import dataclasses
import gc
import os
import time

__test__ = False


def make(nbytes, fill=1):
    """A uint8 array of ``nbytes`` built directly in shared memory (no copy on return)."""
    from comfy_env.ipc import arrays

    a = arrays.shared_empty(nbytes, "uint8")
    a.fill(fill)
    return a


def make_plain(nbytes, fill=1):
    """A uint8 array in private memory: copied into a segment on return."""
    import numpy as np

    return np.full(nbytes, fill, dtype=np.uint8)


def add(x, k=1):
    """``x + k`` in a fresh shared-memory array (one pass, no private temporary)."""
    from comfy_env.ipc import arrays
    import numpy as np

    out = arrays.shared_empty(x.shape, x.dtype)
    np.add(x, k, out=out, casting="unsafe")
    return out


def summary(x):
    """Small facts about an array: enough to check the data, nothing bulky to send back."""
    import numpy as np

    x = np.asarray(x)
    return {"shape": x.shape, "dtype": str(x.dtype), "first": int(x.flat[0]),
            "last": int(x.flat[-1]), "sum": int(x.sum(dtype=np.int64)), "pid": os.getpid()}


def combine(*args, **kwargs):
    """Walk nested args/kwargs; every array becomes its summary (diamonds, nesting)."""
    import numpy as np

    def walk(o):
        if isinstance(o, np.ndarray):
            return ("arr", int(o.flat[0]), o.size)
        if isinstance(o, (list, tuple)):
            return type(o)(walk(v) for v in o)
        if isinstance(o, dict):
            return {k: walk(v) for k, v in o.items()}
        return o

    return {"args": walk(list(args)), "kwargs": walk(kwargs), "pid": os.getpid()}


def identity(x):
    return x


def fail(msg="boom"):
    raise ValueError(msg)


def slow(seconds, value=None):
    time.sleep(seconds)
    return value


def pid():
    return os.getpid()


def called(path, x=None):
    """Leaves a mark in ``path`` (the test checks that the function never ran)."""
    with open(path, "a") as f:
        f.write("called\n")
    return None


def ledger_size():
    """Live blocks in this worker's ledger, after collecting garbage and flushing releases."""
    from comfy_env.ipc import lifetime

    for _ in range(2):
        gc.collect()
        lifetime.LEDGER.drain()
        time.sleep(0.05)
    return len(lifetime.LEDGER)


def stats():
    from comfy_env.ipc import shm

    return dict(shm.STATS)


def make_many(n, nbytes, fd_room=None):
    """``n`` arrays of ``nbytes``, each in a segment of its own (array ``i`` filled with
    ``i % 256``): a result that refers to ``n`` blocks, hence carries ``n`` fds.
    ``fd_room``: pretend the next message of more than MAX_FDS fds may carry that many."""
    if fd_room is not None:
        from comfy_env.ipc import transport

        real = transport.fd_room

        def once():
            transport.fd_room = real
            return fd_room

        transport.fd_room = once
    return [make(nbytes, i % 256) for i in range(n)]


@dataclasses.dataclass
class Box:
    """An object that holds a future in an attribute (submit() does not look there)."""
    item: object


class MyList(list):
    pass


def slow_make(seconds, nbytes, fill=1):
    time.sleep(seconds)
    return make(nbytes, fill)


def slow_fail(seconds, msg="boom"):
    time.sleep(seconds)
    raise ValueError(msg)


def arrays_in(o):
    """``("arr", first value, size)`` of each array in ``o``, through lists, tuples,
    dicts and objects' attributes, in order."""
    import numpy as np

    out = []

    def walk(o):
        if isinstance(o, np.ndarray):
            out.append(("arr", int(o.flat[0]), o.size))
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)
        elif hasattr(o, "__dict__"):
            walk(vars(o))

    walk(o)
    return out


def same(x, y):
    """Did ``x`` and ``y`` arrive as one object?  (And do they share memory?)"""
    import numpy as np

    return x is y, bool(np.shares_memory(x, y))


class Coded(Exception):
    """An exception whose __init__ takes other arguments than its args."""

    def __init__(self, code, msg):
        super().__init__(f"{code}: {msg}")
        self.code, self.msg = code, msg

    def __reduce__(self):
        return (Coded, (self.code, self.msg))


def raise_coded(code, msg):
    err = Coded(code, msg)
    err.add_note("raised in the producer") if hasattr(err, "add_note") else None
    raise err


def open_missing(path):
    open(path)
