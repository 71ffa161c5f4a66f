"""Test nodes covering what ComfyUI reads from and does with V1 nodes."""
import asyncio
import logging
import time

import torch

import comfy.model_management
import comfy.utils

from .helpers import DemoNodeError, invert

log = logging.getLogger("demo_pack")


class InvertImage:
    """Inverts an image."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "the image"}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
                "mode": (["fast", "exact"], {"default": "fast"}),
            },
            "optional": {"mask": ("MASK",), "seed": ("INT", {"default": 0, "min": 0, "max": 2**63, "control_after_generate": True})},
            "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT", "dynprompt": "DYNPROMPT"},
        }

    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("inverted", "where")
    FUNCTION = "run"
    CATEGORY = "demo/image"
    DESCRIPTION = "Inverts an image in an isolated worker."
    OUTPUT_TOOLTIPS = ("the inverted image", "node id")
    SEARCH_ALIASES = ["negate", "invert colors"]
    EXPERIMENTAL = True
    DEPRECATED = False
    NOT_IDEMPOTENT = False

    @classmethod
    def VALIDATE_INPUTS(cls, strength, input_types=None):
        if strength > 0.99 and strength < 0.995:
            return "strength must not be 0.99..0.995"
        return True

    @classmethod
    def IS_CHANGED(cls, strength, mode="fast", **kwargs):
        return f"{strength}-{mode}"

    def run(self, image, strength, mode, mask=None, seed=0, unique_id=None, prompt=None, dynprompt=None):
        assert dynprompt is None           # live host objects can't travel
        out = invert(image, strength)
        if mask is not None:
            out = out * mask.unsqueeze(-1)
        return (out, f"{unique_id}:{torch.is_inference_mode_enabled()}")


class LatentDouble:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"samples": ("LATENT",), "factor": ("FLOAT", {"default": 2.0})}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "double"
    CATEGORY = "demo/latent"

    def double(self, samples, factor):
        out = dict(samples)
        out["samples"] = samples["samples"] * factor
        out["batch_index"] = list(samples.get("batch_index", [])) + [99]
        return (out,)


class ListNode:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"values": ("INT", {"default": 1}), "repeat": ("INT", {"default": 2})}}

    RETURN_TYPES = ("INT", "INT")
    OUTPUT_IS_LIST = (True, False)
    INPUT_IS_LIST = True
    FUNCTION = "go"
    CATEGORY = "demo/lists"

    def go(self, values, repeat):
        assert isinstance(values, list) and isinstance(repeat, list)
        return ([v * 10 for v in values] * repeat[0], sum(values))


class Counter:
    """Keeps state on self, like nodes that cache a loaded model."""

    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"step": ("INT", {"default": 1})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "count"
    CATEGORY = "demo"
    OUTPUT_NODE = True

    def __init__(self):
        self.total = 0

    def count(self, step):
        self.total += step
        return {"ui": {"text": [str(self.total)]}, "result": (self.total,)}


class SlowProgress:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"steps": ("INT", {"default": 5}), "delay": ("FLOAT", {"default": 0.01}),
                             "preview": ("BOOLEAN", {"default": False})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "work"
    CATEGORY = "demo"

    def work(self, steps, delay, preview):
        pbar = comfy.utils.ProgressBar(steps)
        done = 0
        for i in range(steps):
            time.sleep(delay)
            comfy.model_management.throw_exception_if_processing_interrupted()
            done += 1
            pbar.update_absolute(i + 1, steps, ("JPEG", [i, "preview"], 512) if preview else None)
        return (done,)


class ProgressOnly:
    """Only notices interrupts through its progress updates (like a sampler)."""

    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"steps": ("INT", {"default": 1000})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "work"
    CATEGORY = "demo"

    def work(self, steps):
        pbar = comfy.utils.ProgressBar(steps)
        for i in range(steps):
            time.sleep(0.01)
            pbar.update(1)
        return (steps,)


class Stubborn:
    """Never checks for interrupts."""

    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"seconds": ("FLOAT", {"default": 60.0})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "sleep"
    CATEGORY = "demo"

    def sleep(self, seconds):
        time.sleep(seconds)
        return (1,)


class Failing:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"kind": (["value", "custom", "local"],)}}

    RETURN_TYPES = ()
    FUNCTION = "fail"
    CATEGORY = "demo"
    OUTPUT_NODE = True

    def fail(self, kind):
        return self._deeper(kind)

    def _deeper(self, kind):
        if kind == "value":
            raise ValueError("bad value from the worker")
        if kind == "custom":
            raise DemoNodeError("custom failure", 42)

        class LocalError(Exception):
            """Can't be pickled by reference: the host can't rebuild its type."""
        raise LocalError("only the worker knows this type")


class Lazy:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"use_b": ("BOOLEAN", {"default": False}),
                             "a": ("INT", {"lazy": True}), "b": ("INT", {"lazy": True})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "pick"
    CATEGORY = "demo"

    def check_lazy_status(self, use_b, a=None, b=None):
        return ["b"] if use_b and b is None else (["a"] if not use_b and a is None else [])

    def pick(self, use_b, a=None, b=None):
        return (b if use_b else a,)


class AsyncNode:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"x": ("INT", {"default": 3})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "demo"

    async def run(self, x):
        await asyncio.sleep(0.01)
        return (x * 2,)


class Chatty:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"text": ("STRING", {"multiline": True, "default": "hi"})}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "talk"
    CATEGORY = "demo"

    # A plain function (no @classmethod), as some packs write it; ComfyUI calls it on the class.
    def IS_CHANGED(s, text):
        return text

    def talk(self, text):
        print(f"chatty says {text}", flush=True)
        log.warning("chatty logs %s", text)
        return (text.upper(),)


class Pid:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "pid"
    CATEGORY = "demo"

    def pid(self):
        import os
        return (os.getpid(),)


NODE_CLASS_MAPPINGS = {
    "DemoPid": Pid,
    "DemoInvertImage": InvertImage,
    "DemoLatentDouble": LatentDouble,
    "DemoList": ListNode,
    "DemoCounter": Counter,
    "DemoSlowProgress": SlowProgress,
    "DemoProgressOnly": ProgressOnly,
    "DemoStubborn": Stubborn,
    "DemoFailing": Failing,
    "DemoLazy": Lazy,
    "DemoAsync": AsyncNode,
    "DemoChatty": Chatty,
}
NODE_DISPLAY_NAME_MAPPINGS = {"DemoInvertImage": "Invert Image (isolated)"}
