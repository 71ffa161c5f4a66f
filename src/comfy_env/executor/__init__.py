"""Scheduling, worker lifecycle, futures, timeouts, crash -> restart."""
from .executor import IsolatedExecutor
from .futures import IsolatedFuture

__all__ = ["IsolatedExecutor", "IsolatedFuture"]
