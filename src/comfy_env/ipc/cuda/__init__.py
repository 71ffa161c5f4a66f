"""The CUDA data plane: torch CUDA tensors between processes without host copies.

Importing this package loads nothing: no torch, no ``libcuda``.  :func:`install`
registers the plane with the codec (the CPU plane calls it the first time it sees a
``torch.Tensor``); CUDA itself is touched only when a CUDA tensor shows up.

Modules: ``plane`` (the codec plane, wiring the three parts below), ``sender`` (our
blocks, routes, lends), ``receiver`` (imports, tensors built on peers' blocks, frees),
``local`` (per-GPU state: probing, pools, event rings), ``blocks`` (one class per block
kind), ``peers``, ``errors``; beneath them ``driver`` (ctypes over libcuda), ``devices``
(UUIDs, contexts), ``pools`` (export/staging pools, imports), ``vmm`` (big tensors),
``events`` (stream order), ``importcache``, ``ipchandles`` (peers' allocations opened by
legacy IPC handle), ``layout`` (the descriptor), ``paths`` (route choice).
The diagnostics that start a worker to test it live beside the CLI:
:mod:`comfy_env.cuda_probe`, :mod:`comfy_env.cuda_doctor`.
"""
from __future__ import annotations

import threading

__all__ = ["install", "set_role", "trim"]

_lock = threading.RLock()
_installed = False
_installing = False      # install() runs now in the thread holding _lock


def install() -> None:
    """Register the CUDA plane for ``torch.Tensor`` (idempotent; does not initialise CUDA)."""
    global _installed, _installing
    if _installed:
        return
    with _lock:
        # Re-entry from the same thread: install() imports torch, and the worker's
        # import hook calls install() once torch is imported; the outer call finishes.
        if _installed or _installing:
            return
        _installing = True
        try:
            from ..codec import register_plane
            from .plane import PLANE
            register_plane(PLANE, first=True)
            from ..calls import in_worker
            if in_worker():
                set_role("worker")
            else:
                _heap_at_cuda_init()      # the parent's, under COMFY_ENV_CUDA_PARENT_HEAP=pool
            _hook_empty_cache()
            _installed = True
        finally:
            _installing = False


def set_role(role: str) -> None:
    """``"worker"``: make an export pool torch's current pool at CUDA init (zero-copy
    results) where ``COMFY_ENV_CUDA_HEAP=pool``."""
    if role not in ("parent", "worker"):
        raise ValueError(f"role must be 'parent' or 'worker', not {role!r}")
    from .plane import PLANE
    PLANE.role = role
    _heap_at_cuda_init()


def _heap_at_cuda_init():
    """Where this process's heap policy asks for it, make an export pool torch's current
    pool when torch initialises CUDA (or now, if it has): allocations made after that
    land in the pool and leave zero copy."""
    from .plane import PLANE
    if not PLANE.local.wants_heap():
        return
    import torch

    def _at_cuda_init():
        # torch turns an exception here into a failed CUDA init for the user's code:
        # without an export pool the process still works (what it sends is staged).
        try:
            PLANE.ensure_heap(torch.cuda.current_device())
        except Exception as exc:
            import logging
            logging.getLogger("comfy_env.cuda").warning(
                "comfy_env: no zero-copy export pool in this %s: %s", PLANE.role, exc)

    # Runs at torch's lazy CUDA init (or now, if CUDA is already up): we never
    # initialise CUDA ourselves, and allocations made after this land in the pool.
    torch.cuda._lazy_call(_at_cuda_init)
    _hook_memory_stats()


def trim():
    """Give back what exportable pools can give back (see docs/cuda.md, "Memory")."""
    from .plane import PLANE
    return PLANE.trim()


def _hook_empty_cache():
    """``torch.cuda.empty_cache()`` must also release our exportable pools' idle memory."""
    import torch
    mem = torch.cuda.memory
    original = mem.empty_cache
    if getattr(original, "_comfy_env_hook", False):
        return

    def empty_cache():
        original()
        if torch.cuda.is_initialized():
            try:
                trim()
            except Exception as exc:       # never break the caller's empty_cache
                import logging
                logging.getLogger("comfy_env.cuda").warning("comfy_env: trimming CUDA pools failed: %s", exc)

    empty_cache.__doc__ = original.__doc__
    empty_cache._comfy_env_hook = True
    mem.empty_cache = empty_cache
    torch.cuda.empty_cache = empty_cache


_STAT_KEYS = (("allocated_bytes.all.current", 0), ("active_bytes.all.current", 0),
              ("reserved_bytes.all.current", 1), ("allocated_bytes.all.peak", 2),
              ("active_bytes.all.peak", 2), ("reserved_bytes.all.peak", 3))


def _hook_memory_stats():
    """``torch.cuda.memory_stats()`` must count our export heap.

    torch's ``cudaMallocAsync`` backend reads its figures from the device's *default*
    pool; with our heap made the current pool, the memory torch allocates is in ours
    and those figures leave it out (``memory_reserved()`` near 0 while gigabytes are
    held).  ComfyUI decides what to offload from them, so they get our heap's bytes
    added (peaks: the sum of each pool's peak, an upper bound).
    """
    import torch
    mem = torch.cuda.memory
    original = mem.memory_stats
    if getattr(original, "_comfy_env_hook", False):
        return
    from .plane import PLANE

    def memory_stats(device=None):
        stats = original(device=device)
        if not PLANE.local.heap or not stats:
            return stats
        try:
            held = PLANE.local.heap_bytes(torch.cuda._utils._get_device_index(device, optional=True))
        except Exception as exc:           # never break the caller's figures
            import logging
            logging.getLogger("comfy_env.cuda").warning("comfy_env: reading the export heap's size failed: %s",
                                                        exc)
            return stats
        if held:
            for key, i in _STAT_KEYS:
                if key in stats:
                    stats[key] += held[i]
        return stats

    memory_stats.__doc__ = original.__doc__
    memory_stats._comfy_env_hook = True
    mem.memory_stats = memory_stats
    torch.cuda.memory_stats = memory_stats
