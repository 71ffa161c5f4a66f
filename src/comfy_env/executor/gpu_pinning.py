"""Pinning an executor's workers to one GPU: ``IsolatedExecutor(env, device="cuda:1")``.

The worker's ``CUDA_VISIBLE_DEVICES`` is the parent's visible list *reordered*
so that the chosen GPU comes first: inside the worker it is ``cuda:0``, torch's
default device, while every other GPU the parent sees stays visible (a tensor
that lives on another GPU can still arrive on the device it left; the CUDA
plane matches devices by UUID, not by number).

``device`` is given in the parent's numbering, which honours a
``CUDA_VISIBLE_DEVICES`` the user set for the parent: ``"cuda:1"`` is the
parent's second visible GPU.  A UUID (``"GPU-…"``, as ``nvidia-smi -L`` prints
it) names a GPU independently of any numbering.
"""
from __future__ import annotations

import os

from ..ipc.gpu_names import parse_device

__all__ = ["pin_environment"]


def _format_uuid(hex32):
    h = hex32.replace("-", "").lower()
    if len(h) != 32:
        return hex32
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def visible_devices(environ=None, driver_uuids=None):
    """The parent's visible GPUs, in its own numbering, as CUDA_VISIBLE_DEVICES entries.

    From ``CUDA_VISIBLE_DEVICES`` when the user set it, else from the driver
    (UUIDs).  ``driver_uuids`` lets tests inject what the driver would report.
    """
    environ = os.environ if environ is None else environ
    cvd = environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return [e.strip() for e in cvd.split(",") if e.strip() and e.strip() != "-1"]
    if driver_uuids is None:
        driver_uuids = _driver_uuids()
    return [_format_uuid(u) for u in driver_uuids]


def _driver_uuids():
    try:
        from ..ipc.cuda import devices
        return [devices.uuid_of(i) for i in range(devices.count())]
    except Exception as exc:
        raise RuntimeError(
            f"device= needs a CUDA GPU, but the CUDA driver is not usable here ({exc}); "
            f"leave device=None on machines without a GPU"
        ) from exc


def pin_environment(device, environ=None, driver_uuids=None):
    """Environment variables that pin a worker to ``device`` ({} for None)."""
    want = parse_device(device)
    if want is None:
        return {}
    visible = visible_devices(environ, driver_uuids)
    if isinstance(want, int):
        if want >= len(visible):
            raise ValueError(
                f"device={device!r}: this process sees {len(visible)} GPU(s) "
                f"({', '.join(visible) or 'none'}); valid indices are 0..{len(visible) - 1}"
            )
        chosen = visible[want]
        rest = visible[:want] + visible[want + 1:]
    else:
        norm = want.lower()
        matches = [v for v in visible if v.lower() == norm or v.lower().startswith(norm)]
        # A UUID the parent does not list (it hides it) is still passed on: the
        # driver resolves UUIDs, and the error then names the device clearly.
        chosen = matches[0] if matches else want
        rest = [v for v in visible if v is not chosen]
    return {"CUDA_VISIBLE_DEVICES": ",".join([chosen] + rest)}
