"""A submitted call as the executor tracks it, and the stage it is in.

Shared by the pool (executor.py), which moves items between stages, and the
worker handles, whose readers hand results to the item's future: both sides
must read the same stage, so it lives here rather than in either.
"""
from __future__ import annotations

import enum
import itertools

_ids = itertools.count(1)


class Stage(enum.Enum):
    """Where a work item is.  ``worker.item`` is read by dispatch, the timer and the
    worker's reader; the transitions out of RUNNING happen under the pool lock."""
    QUEUED = "queued"           # waiting or pending; its future is not running yet
    RUNNING = "running"         # future set running; sent to a worker, or about to be
    TIMED_OUT = "timed-out"     # ran past call_timeout: its worker is being killed
    STOPPED = "stopped"         # the executor is stopping now (Ctrl-C): its worker is being killed


class WorkItem:
    __slots__ = ("future", "fn", "args", "kwargs", "call_id", "deps", "stage")

    def __init__(self, future, fn, args, kwargs, deps):
        self.future = future
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.call_id = next(_ids)
        self.deps = deps
        self.stage = Stage.QUEUED
