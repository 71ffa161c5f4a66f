"""Stand-in for ``comfy_api.latest.ui`` inside isolated workers: preview outputs.

A preview is saved in the worker (into ComfyUI's temp directory, copied from the
host: see shim/folder_paths.py), as ComfyUI's own ``ui.PreviewImage`` does in-process;
comfy-env sends the host the ``as_dict()`` of the ui object.
"""
from __future__ import annotations

import json
import os
import random

__all__ = ["SavedResult", "SavedImages", "PreviewImage", "PreviewMask", "PreviewText"]


class SavedResult(dict):
    def __init__(self, filename, subfolder, type):
        super().__init__(filename=filename, subfolder=subfolder, type=getattr(type, "value", type))


class _UIOutput:
    def as_dict(self):
        raise NotImplementedError


class SavedImages(_UIOutput):
    def __init__(self, results, is_animated=False):
        self.results = results
        self.is_animated = is_animated

    def as_dict(self):
        data = {"images": self.results}
        if self.is_animated:
            data["animated"] = (True,)
        return data


def _png_metadata(cls, PngInfo):
    """The prompt and extra_pnginfo of the node's run, as ComfyUI writes them into a
    preview (dragging the image back into ComfyUI loads its workflow); None under the
    host's --disable-metadata or without hidden inputs."""
    import folder_paths
    hidden = getattr(cls, "hidden", None) if cls is not None else None
    if getattr(folder_paths, "disable_metadata", False) or not hidden:
        return None
    metadata = PngInfo()
    if hidden.prompt:
        metadata.add_text("prompt", json.dumps(hidden.prompt))
    if hidden.extra_pnginfo:
        for key in hidden.extra_pnginfo:
            metadata.add_text(key, json.dumps(hidden.extra_pnginfo[key]))
    return metadata


def _save_temp_images(images, prefix, cls=None):
    """ComfyUI's ``ImageSaveHelper.save_images`` into the temp folder: numbered after the
    files already there, with the run's metadata."""
    import numpy as np
    try:
        from PIL import Image
        from PIL.PngImagePlugin import PngInfo
    except ImportError as exc:
        raise ImportError("comfy-env's ui.PreviewImage needs Pillow in the node's env "
                          "(add 'pillow' to its requirements)") from exc
    import folder_paths
    out_dir = folder_paths.get_temp_directory()
    if not out_dir:
        raise RuntimeError("comfy-env: ComfyUI's temp directory is unknown in this worker")
    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
        prefix, out_dir, images[0].shape[1], images[0].shape[0])
    metadata = _png_metadata(cls, PngInfo)
    results = []
    for batch_number, image in enumerate(images):
        arr = image.cpu().numpy() if hasattr(image, "cpu") else np.asarray(image)
        img = Image.fromarray(np.clip(255.0 * arr, 0, 255).astype(np.uint8))
        name = f"{filename.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"
        img.save(os.path.join(folder, name), pnginfo=metadata, compress_level=1)
        results.append(SavedResult(name, subfolder, "temp"))
        counter += 1
    return results


class PreviewImage(_UIOutput):
    def __init__(self, image, animated=False, cls=None, **kwargs):
        prefix = "ComfyUI_temp_" + "".join(random.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5))
        self.values = _save_temp_images(image, prefix, cls)
        self.animated = animated

    def as_dict(self):
        return {"images": self.values, "animated": (self.animated,)}


class PreviewMask(PreviewImage):
    def __init__(self, mask, animated=False, cls=None, **kwargs):
        preview = mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1])).movedim(1, -1).expand(-1, -1, -1, 3)
        super().__init__(preview, animated, cls, **kwargs)


class PreviewText(_UIOutput):
    def __init__(self, value, **kwargs):
        self.value = value

    def as_dict(self):
        return {"text": (self.value,)}


def __getattr__(name):
    raise AttributeError(f"comfy_api.latest.ui.{name} is not available in comfy-env's shim of "
                         f"comfy_api (it provides {', '.join(__all__)}); return the ui data as "
                         f"a dict instead, e.g. io.NodeOutput(..., ui={{'text': ['...']}})")
