"""How a user names a GPU: ``parse_device``, shared by ``IsolatedExecutor(device=...)``
(the parent pins a worker to it: :mod:`comfy_env.executor.gpu_pinning`) and
``to_device()`` (a tensor's destination: :mod:`comfy_env.ipc.placement`).

Only syntax lives here; which GPUs exist is the driver's business
(:mod:`comfy_env.ipc.cuda.devices`).
"""
from __future__ import annotations

import re

__all__ = ["parse_device"]

_INDEX = re.compile(r"^(?:cuda:)?(\d+)$")


def parse_device(device):
    """``None``, an int, ``"cuda"``, ``"cuda:N"``, ``"N"``, a ``torch.device`` or a GPU/MIG UUID.

    Returns ``None``, an index (int) or a UUID string.
    """
    if device is None:
        return None
    if type(device).__name__ == "device" and hasattr(device, "type"):   # torch.device
        if device.type != "cuda":
            raise ValueError(f"device must be a CUDA device, got {device!r}")
        return device.index or 0
    if isinstance(device, bool):
        raise TypeError(f"device must be 'cuda:N', an index or a GPU UUID, not {device!r}")
    if isinstance(device, int):
        if device < 0:
            raise ValueError(f"device index must be >= 0, got {device}")
        return device
    if isinstance(device, str):
        d = device.strip()
        if d == "cuda":
            return 0
        m = _INDEX.match(d)
        if m:
            return int(m.group(1))
        if d.upper().startswith(("GPU-", "MIG-")) and len(d) > 8:
            return d
    raise ValueError(
        f"device must be 'cuda:N', an int index, or a GPU UUID like 'GPU-8e7c…' "
        f"(see nvidia-smi -L), got {device!r}"
    )
