"""Processes seen through /proc, for the tests that check no process outlives its use."""
from __future__ import annotations

import time


def proc_state(pid):
    """The process state letter from /proc (``Z``: zombie), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def wait_gone(pids, timeout, zombie_ok=False):
    """Wait until none of ``pids`` runs; returns those still there after ``timeout``.

    ``zombie_ok``: a zombie counts as gone (an orphan belongs to init, which may not
    reap it while the test looks)."""
    end = time.monotonic() + timeout
    while True:
        left = [p for p in pids if _there(proc_state(p), zombie_ok)]
        if not left or time.monotonic() > end:
            return left
        time.sleep(0.02)


def _there(state, zombie_ok):
    return state is not None and not (zombie_ok and state == "Z")


def alive(pid) -> bool:
    """Whether ``pid`` still runs (a zombie has exited already)."""
    return proc_state(pid) not in (None, "Z")
