"""A submitted call as the executor tracks it, and the stage it is in.

Shared by the pool (executor.py), which moves items between stages, and the
worker handles, whose readers hand results to the item's future: both sides
must read the same stage, so it lives here rather than in either.
"""
from __future__ import annotations

import enum
import itertools

_ids = itertools.count(1)
DEFAULT = object()          # WorkItem.timeout: the executor's call_timeout


class Stage(enum.Enum):
    """Where a work item is.  ``worker.item`` is read by dispatch, the timer and the
    worker's reader; the transitions out of RUNNING happen under the pool lock."""
    QUEUED = "queued"           # waiting or pending; its future is not running yet
    RUNNING = "running"         # future set running; sent to a worker, or about to be
    TIMED_OUT = "timed-out"     # ran past call_timeout: its worker is being killed
    STOPPED = "stopped"         # the executor is stopping now (Ctrl-C): its worker is being killed


class WorkItem:
    __slots__ = ("future", "fn", "args", "kwargs", "call_id", "deps", "stage", "send_failures", "timeout")

    def __init__(self, future, fn, args, kwargs, deps):
        self.future = future
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.call_id = next(_ids)
        self.deps = deps
        self.stage = Stage.QUEUED
        self.send_failures = 0      # sends of it that failed (the worker died or the send broke)
        self.timeout = DEFAULT      # seconds it may run: DEFAULT is the executor's call_timeout

    def drop_inputs(self, keep_fn=False):
        """Let go of what the user submitted once nothing will send it again (the call
        was sent, failed, or was cancelled): its arrays and tensors are freed with the
        caller's last reference, not when the future goes.  ``keep_fn``: only the
        inputs go (a sent call keeps its function, as it always has: the inputs are
        what holds the caller's data)."""
        self.args = self.kwargs = None
        if not keep_fn:
            self.fn = None
