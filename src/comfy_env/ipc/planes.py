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
  installs it as soon as torch is imported (:func:`install_cuda_plane_with_torch`), so
  that its export pool is torch's current pool before the user's code allocates; so
  does a parent under ``COMFY_ENV_CUDA_PARENT_HEAP=pool`` when it makes an executor.
"""
from __future__ import annotations

import sys

from . import arrays, codec

__all__ = ["install_cuda_plane", "install_cuda_plane_with_torch"]


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


class _TorchImportHook:
    """Installs the CUDA plane as soon as the program imports torch.

    An export pool (a worker's, or the parent's under ``COMFY_ENV_CUDA_PARENT_HEAP=pool``)
    must be torch's current pool *before* the first CUDA allocation, i.e. the plane must
    be installed between ``import torch`` and CUDA's lazy init.  Importing torch
    ourselves would cost every process a second; this meta-path finder waits for the
    program's own import instead.
    """

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        try:
            sys.meta_path.remove(self)
        except ValueError:
            return None
        import importlib.util

        spec = importlib.util.find_spec("torch")
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module):
            run(module)
            install_cuda_plane()

        loader.exec_module = exec_module
        return spec


def install_cuda_plane_with_torch() -> None:
    """:func:`install_cuda_plane` now if torch is imported, else right after its import."""
    if "torch" in sys.modules:
        install_cuda_plane()
    elif not any(isinstance(f, _TorchImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchImportHook())


codec.register_plane(arrays.NUMPY_PLANE)
codec.register_plane(arrays.TORCH_CPU_PLANE)
codec.on_first_type("torch.Tensor", install_cuda_plane)
codec.provide_plane("cuda", install_cuda_plane)
