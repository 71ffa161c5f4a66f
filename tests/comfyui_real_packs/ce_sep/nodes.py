"""Runs in a separate env (demo_dep 1.0 from a local wheel): comfy-env's shim of ComfyUI."""
import os

import numpy as np
import demo_dep

import comfy.utils
from comfy_api.latest import io, ui


class Info:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}
    RETURN_TYPES = ("STRING",)
    FUNCTION = "run"
    CATEGORY = "ce/sep"

    def run(self, seed):
        import comfy
        shim = getattr(comfy, "COMFY_ENV_SHIM", False)
        pbar = comfy.utils.ProgressBar(2)
        pbar.update(1)
        pbar.update(1)
        return (f"demo_dep={demo_dep.VERSION} shim={shim} pid={os.getpid()}",)


class Gap:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}
    RETURN_TYPES = ("STRING",)
    FUNCTION = "run"
    CATEGORY = "ce/sep"

    def run(self, seed):
        import comfy.sd  # noqa: F401  (not in the shim)


class SepScale(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="CE3_SepScale", category="ce/sep", is_output_node=True,
                         inputs=[io.Image.Input("image"), io.Float.Input("factor", default=2.0)],
                         outputs=[io.Image.Output()])

    @classmethod
    def execute(cls, image, factor):
        arr = np.clip(image.numpy() * factor, 0, 1)
        import torch
        return io.NodeOutput(torch.from_numpy(arr),
                             ui=ui.PreviewText(f"demo_dep {demo_dep.VERSION}"))


class SepPreview(io.ComfyNode):
    """A preview saved by the shim's ui.PreviewImage (this env has no ComfyUI)."""

    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="CE3_SepPreview", category="ce/sep", is_output_node=True,
                         inputs=[io.Image.Input("image")], outputs=[],
                         hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo])

    @classmethod
    def execute(cls, image):
        return io.NodeOutput(ui=ui.PreviewImage(image, cls=cls))


class SepExpand:
    """Expands, with the shim's GraphBuilder, into CE_Add(a, b) -> CE_Add(that, that)."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("INT", {"default": 0}), "b": ("INT", {"default": 0})}}
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "ce/sep"

    def run(self, a, b):
        from comfy_execution.graph_utils import GraphBuilder
        g = GraphBuilder()
        total = g.node("CE_Add", a=a, b=b)
        double = g.node("CE_Add", a=total.out(0), b=total.out(0))
        return {"result": (double.out(0),), "expand": g.finalize()}


class SepBlock:
    """Blocks the nodes that use its output, with a message, through the shim's ExecutionBlocker."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"why": ("STRING", {"default": "blocked"})}}
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "ce/sep"

    def run(self, why):
        from comfy_execution.graph_utils import ExecutionBlocker
        return (ExecutionBlocker(why),)


NODE_CLASS_MAPPINGS = {"CE_SepInfo": Info, "CE_SepGap": Gap, "CE3_SepScale": SepScale,
                       "CE3_SepPreview": SepPreview, "CE_SepExpand": SepExpand, "CE_SepBlock": SepBlock}
