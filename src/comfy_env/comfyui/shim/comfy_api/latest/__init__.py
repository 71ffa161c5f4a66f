"""Stand-in for ComfyUI's ``comfy_api.latest`` inside isolated workers.

Why a shim and not ComfyUI's own ``comfy_api``: a worker in a separate env usually
can't import ComfyUI's (it imports torch, PIL, av, aiohttp-era modules and much of
``comfy``), and the worker only needs to *define* nodes and report progress.  The
host never receives these objects: the schema travels as data and is rebuilt with
ComfyUI's real ``io`` classes there.  Provided: ``io`` (see _io.py), ``ui``
(previews), ``ComfyExtension``, ``ComfyAPI`` / ``ComfyAPISync`` with
``execution.set_progress``.
"""
from __future__ import annotations

from . import _io as io
from . import _ui as ui

IO = io
UI = ui

__all__ = ["ComfyAPI", "ComfyAPISync", "ComfyExtension", "io", "IO", "ui", "UI"]


class ComfyExtension:
    async def on_load(self):
        pass

    async def get_node_list(self):
        raise NotImplementedError


def get_progress_state():
    import comfy_execution.progress
    return comfy_execution.progress.get_progress_state()


def _set_progress(value, max_value, node_id=None, preview_image=None, ignore_size_limit=False):
    from comfy_execution.utils import get_executing_context
    ctx = get_executing_context()
    if node_id is None and ctx is not None:
        node_id = ctx.node_id
    if node_id is None:
        raise ValueError("node_id must be provided if not in executing context")
    image = preview_image
    if image is not None and hasattr(image, "shape"):
        import numpy as np
        from PIL import Image
        t = image[0] if len(image.shape) == 4 else image
        arr = t.cpu().numpy() if hasattr(t, "cpu") else np.asarray(t)
        image = Image.fromarray((arr * 255).astype(np.uint8))
    if image is not None and not isinstance(image, tuple):
        image = (getattr(image, "format", None) or "JPEG", image, None if ignore_size_limit else 512)
    # Looked up at call time: comfy-env points it at the host while a node runs.
    get_progress_state().update_progress(node_id=node_id, value=value, max_value=max_value,
                                         image=image)


class _Execution:
    async def set_progress(self, value, max_value, node_id=None, preview_image=None,
                           ignore_size_limit=False):
        _set_progress(value, max_value, node_id, preview_image, ignore_size_limit)


class _ExecutionSync:
    def set_progress(self, value, max_value, node_id=None, preview_image=None,
                     ignore_size_limit=False):
        _set_progress(value, max_value, node_id, preview_image, ignore_size_limit)


class ComfyAPI:
    def __init__(self):
        self.execution = _Execution()


class ComfyAPISync:
    def __init__(self):
        self.execution = _ExecutionSync()
