"""Functions that chain-test workers run (they import it by reference when env=None,
or receive it by value in a foreign env: keep it to numpy and the standard library).

Everything here runs inside a worker process unless said otherwise.
"""
from __future__ import annotations

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
