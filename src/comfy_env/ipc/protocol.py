"""The messages both sides read, applied by the one function both import.

A ``("ctl", [msg, ...])`` frame carries control messages that either side may send
and both handle alike (the parent's reader thread, the worker's main loop):

* ``("release", key, n)``: the peer let go of ``n`` leases of our block ``key``
  (:meth:`comfy_env.ipc.lifetime.Ledger.on_release`);
* ``("plane", name, payload)``: a message for data plane ``name``
  (:meth:`comfy_env.ipc.codec.Plane.on_control`).
"""
from __future__ import annotations

from . import codec, lifetime

__all__ = ["apply_control"]


def apply_control(link, msgs) -> None:
    """Apply the control messages of one ``ctl`` frame that came in on ``link``."""
    for msg in msgs:
        kind = msg[0]
        if kind == "release":
            lifetime.LEDGER.on_release(link, msg[1], msg[2])
        elif kind == "plane":
            codec.get_plane(msg[1]).on_control(link, msg[2])
