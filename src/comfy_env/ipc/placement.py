"""Asking for a tensor to arrive on another device: ``to_device(t)``.

A CUDA tensor arrives on the GPU it left (``docs/devices.md``): the receiver maps the
sender's memory, zero copy, and the tensor keeps its device.  A call that wants it
elsewhere says so by wrapping it::

    ex = IsolatedExecutor(env, device="cuda:1")
    ex.submit(fn, to_device(latent))            # arrives on the worker's own GPU
    ex.submit(fn, to_device(latent, "cuda:1"))  # ... or on a GPU named by the sender

and a worker can return ``to_device(result, "cuda:0")`` the same way.  The tensor still
travels zero copy; the receiver then copies it device to device (``Tensor.to``: a
peer copy when the GPUs reach each other, never our host round trip), and only if it
is not on the target already.

``device``: ``None`` for the receiver's current CUDA device (a pinned worker's is its
pinned GPU; without CUDA the tensor is left where it is), ``"cpu"``, or a GPU in the
*sender's* numbering (``"cuda:N"``, an index, a ``torch.device``, a ``GPU-…`` UUID).
It is resolved to the GPU's UUID when wrapping, so both sides agree whatever each
one's ``CUDA_VISIBLE_DEVICES`` is.
"""
from __future__ import annotations

from typing import Any

__all__ = ["to_device"]


def to_device(tensor: Any, device: Any = None) -> Any:
    """Wrap ``tensor`` so that it arrives on ``device`` in the process that receives it.

    Use it in a ``submit`` argument, or in a worker's return value.  The tensor
    still travels zero copy; the receiver then moves it with ``Tensor.to``
    (device to device), only if it is not there already.

    ``device``: ``None`` for the receiver's current CUDA device (a pinned
    worker's own GPU; without CUDA the tensor is left where it is), ``"cpu"``,
    or a GPU in the *sender's* numbering (``"cuda:N"``, an index, a
    ``torch.device``, a ``GPU-...`` UUID), resolved to a UUID now, so both sides
    agree whatever their ``CUDA_VISIBLE_DEVICES``.  The wrapper is only for
    sending; it is not a tensor itself.

    Raises:
        TypeError: ``tensor`` is not a torch tensor.
        ValueError: ``device`` names no GPU of this process, or is malformed.
    """
    if not (hasattr(tensor, "to") and hasattr(tensor, "device")):
        raise TypeError(f"to_device() takes a torch tensor, not {type(tensor).__qualname__}")
    return _OnDevice(tensor, _target(device))


def _target(device):
    if device is None:
        return None
    if getattr(device, "type", device) == "cpu":
        return "cpu"
    from .gpu_names import parse_device
    want = parse_device(device)
    if isinstance(want, str):
        if not want.upper().startswith("GPU-"):
            raise ValueError(f"to_device(): MIG devices are not supported as targets, got {device!r}")
        hex32 = want[4:].replace("-", "").lower()
        if len(hex32) != 32:
            raise ValueError(f"to_device(): give the full GPU UUID (nvidia-smi -L), got {device!r}")
        return hex32
    from .cuda import devices
    from .cuda import driver as D
    try:
        return devices.uuid_of(want)
    except (D.CudaError, devices.UnknownDevice) as exc:
        raise ValueError(f"to_device({device!r}): no such GPU in this process ({exc})") from None


class _OnDevice:
    """What ``to_device`` returns: pickles as "rebuild the tensor, then move it"."""

    __slots__ = ("tensor", "target")

    def __init__(self, tensor, target):
        self.tensor = tensor
        self.target = target

    def __reduce__(self):
        # The tensor goes through the data planes like any other (a descriptor, no copy).
        return (_arrive, (self.tensor, self.target))

    def __repr__(self):
        return f"to_device({type(self.tensor).__qualname__}, {self.target or 'receiver'})"


def _arrive(tensor, target):
    import torch
    if target is None:
        if not torch.cuda.is_available():
            return tensor
        device = torch.device("cuda", torch.cuda.current_device())
    elif target == "cpu":
        device = torch.device("cpu")
    else:
        from .cuda import devices
        try:
            device = torch.device("cuda", devices.ordinal_of(target))
        except devices.UnknownDevice as exc:
            raise RuntimeError(f"to_device(): {exc}") from None
    return tensor if tensor.device == device else tensor.to(device)
