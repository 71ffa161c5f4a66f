"""What the CUDA plane raises and warns, shared by its sending and receiving sides.

Owns: the exception and warning classes, and :class:`WarnOnce` (one plane's record
of the warnings it already gave).
"""
from __future__ import annotations

import logging
import warnings

__all__ = ["CudaTransferError", "CudaFallbackWarning", "WarnOnce"]

log = logging.getLogger("comfy_env.cuda")


class CudaTransferError(RuntimeError):
    """A CUDA tensor could not be received (the reason names the driver error)."""


class CudaFallbackWarning(RuntimeWarning):
    """CUDA tensors go through host memory (slow); the message says why."""


class WarnOnce:
    """A :class:`CudaFallbackWarning` (and a log line) once per key."""

    def __init__(self):
        self._warned = set()

    def __call__(self, key, msg):
        if key in self._warned:
            return
        self._warned.add(key)
        warnings.warn(msg, CudaFallbackWarning, stacklevel=3)
        log.warning("%s", msg)
