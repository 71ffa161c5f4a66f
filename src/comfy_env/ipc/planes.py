"""Wiring the data planes into the codec: the one place that does it.

The codec knows planes only through :func:`codec.register_plane`; the planes
import the codec (for :class:`codec.Plane`), never the other way round.  The
executor and the worker import this module before the first message is built
or read; a process that imports the codec alone has no planes (pickle then
copies arrays inline, which is correct and slow).

* numpy arrays and torch CPU tensors: :mod:`.arrays` (imports neither numpy nor torch);
* torch CUDA tensors: :mod:`.cuda`, installed in front of the CPU plane the first
  time a ``torch.Tensor`` is encoded, or when a peer's message names it, and never
  at import: a process without CUDA or torch must not touch either.  The worker also
  installs it as soon as torch is imported (:func:`install_cuda_plane`), so that its
  export pool is torch's current pool before the user's code allocates.
"""
from __future__ import annotations

from . import arrays, codec

__all__ = ["install_cuda_plane"]


def install_cuda_plane() -> None:
    """Register the CUDA plane if this process can have it; otherwise do nothing.

    Without it CUDA tensors take the copying routes (torch's own pickle), so a
    failure here is not an error for the caller.
    """
    try:
        from . import cuda
        cuda.install()
    except Exception:
        pass


codec.register_plane(arrays.NUMPY_PLANE)
codec.register_plane(arrays.TORCH_CPU_PLANE)
codec.on_first_type("torch.Tensor", install_cuda_plane)
codec.provide_plane("cuda", install_cuda_plane)
