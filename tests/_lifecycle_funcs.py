"""Worker-side helpers for test_executor_lifecycle.py (importable by name in env=None workers)."""
from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np


def array(nbytes, value=1):
    return np.full(nbytes, value, np.uint8)


def _rebuild(kind, payload, delay):
    # Runs only where the object is unpickled: in the parent.
    time.sleep(delay)
    if kind == "exit":
        sys.exit(7)
    raise LookupError("this object cannot be rebuilt in the parent")


class Bomb:
    """Pickles fine in the worker; unpickling it in the parent raises or calls sys.exit."""

    def __init__(self, kind, payload, delay):
        self.kind, self.payload, self.delay = kind, payload, delay

    def __reduce__(self):
        return (_rebuild, (self.kind, self.payload, self.delay))


def make_bomb(kind, big, delay=0.0):
    """``big``: the payload lives in shared memory, so the result is decoded lazily."""
    return Bomb(kind, np.zeros((1 << 20) if big else 4, np.uint8), delay)


def kill_self_first_time(marker_dir):
    """Initializer: the first worker is SIGKILLed while it starts (as the OOM killer does)."""
    n = len(os.listdir(marker_dir))
    open(os.path.join(marker_dir, f"start-{n}"), "w").close()
    if n == 0:
        os.kill(os.getpid(), signal.SIGKILL)


def kill_self_first_n(marker_dir, n):
    """Initializer: the first ``n`` workers to start are SIGKILLed while they start (one
    event that kills several starting workers, as the OOM killer may); a worker claims
    a slot with an exclusive create, so workers starting together each get their own."""
    for i in range(n):
        try:
            os.close(os.open(os.path.join(marker_dir, f"killed-{i}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        os.kill(os.getpid(), signal.SIGKILL)


def kill_self_always(marker_dir):
    n = len(os.listdir(marker_dir))
    open(os.path.join(marker_dir, f"start-{n}"), "w").close()
    os.kill(os.getpid(), signal.SIGKILL)


def hang(seconds):
    time.sleep(seconds)


def mark_and_len(directory, data):
    """Leave a file in ``directory`` (the call ran), return ``len(data)``."""
    import tempfile
    tempfile.NamedTemporaryFile(dir=directory, delete=False).close()
    return len(data)
