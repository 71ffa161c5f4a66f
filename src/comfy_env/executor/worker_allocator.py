"""Which CUDA caching allocator a worker's torch runs: ``COMFY_ENV_CUDA_HEAP=native``.

torch picks its allocator backend from ``PYTORCH_CUDA_ALLOC_CONF`` (``PYTORCH_ALLOC_CONF``
in newer releases) once, when ``import torch`` loads its CUDA library, so the choice
has to be in the worker's environment before it starts; a worker inherits the
parent's, and ComfyUI sets ``backend:cudaMallocAsync``.  With the ``native`` heap
policy the worker's copy of those variables loses its ``backend`` entry (the rest of
the settings stay), so its torch runs the native caching allocator, whose results
the CUDA plane lends zero copy by legacy IPC handle (docs/cuda.md, the ``ipc`` route)
whatever allocator the parent runs.
"""
from __future__ import annotations

import os

__all__ = ["allocator_environment", "ALLOC_CONF_VARS"]

# Both names torch reads (the second is the newer, device-neutral one).
ALLOC_CONF_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def _without_backend(conf: str) -> str:
    """``conf`` (torch's ``key:value,key:value`` form) without its ``backend`` entries."""
    keep = [item for item in conf.split(",")
            if item.strip() and item.split(":", 1)[0].strip() != "backend"]
    return ",".join(keep)


def allocator_environment(heap_policy, env_vars=None, environ=None) -> dict:
    """The variables to set in a worker's environment for ``heap_policy`` (a
    ``COMFY_ENV_CUDA_HEAP`` value): under ``native``, each allocator variable that names
    a backend, without it (the worker's own ``env_vars`` first, then ``environ``);
    otherwise nothing (the worker inherits the parent's allocator)."""
    if heap_policy != "native":
        return {}
    environ = os.environ if environ is None else environ
    env_vars = env_vars or {}
    out = {}
    for var in ALLOC_CONF_VARS:
        conf = env_vars.get(var, environ.get(var))
        if conf is None:
            continue
        stripped = _without_backend(str(conf))
        if stripped != conf:
            out[var] = stripped           # empty: torch's defaults, the native allocator
    return out
