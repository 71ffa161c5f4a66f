"""Example isolated nodes: posterize an image with numpy 1.x.

Written like any ComfyUI V1 node; nothing here knows it runs in another process.
"""
import numpy as np
import torch

import comfy.model_management
import comfy.utils


class Posterize:
    """Reduces each channel to a few levels (numpy 1.x, in the pack's own env)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE",),
                "levels": ("INT", {"default": 4, "min": 2, "max": 256, "step": 1}),
                "dither": (["none", "ordered"], {"default": "none"}),
            },
        }

    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("image", "numpy_version")
    OUTPUT_TOOLTIPS = ("the posterized image", "numpy version the node ran with")
    FUNCTION = "posterize"
    CATEGORY = "examples/comfy-env"
    DESCRIPTION = "Posterizes an image using numpy 1.x from an isolated environment."

    def posterize(self, image, levels, dither):
        frames = image.cpu().numpy()               # [B, H, W, C] float32 in 0..1
        pbar = comfy.utils.ProgressBar(len(frames))
        out = np.empty_like(frames)
        bayer = np.array([[0, 8, 2, 10], [12, 4, 14, 6], [3, 11, 1, 9], [15, 7, 13, 5]]) / 16.0 - 0.5
        for i, frame in enumerate(frames):
            comfy.model_management.throw_exception_if_processing_interrupted()
            x = frame * (levels - 1)
            if dither == "ordered":
                h, w = frame.shape[:2]
                x = x + np.tile(bayer, (h // 4 + 1, w // 4 + 1))[:h, :w, None]
            out[i] = np.clip(np.round(x), 0, levels - 1) / (levels - 1)
            pbar.update(1)
        return (torch.from_numpy(out), np.__version__)


NODE_CLASS_MAPPINGS = {"ComfyEnvPosterize": Posterize}
NODE_DISPLAY_NAME_MAPPINGS = {"ComfyEnvPosterize": "Posterize (isolated, numpy 1.x)"}
