import os
import signal
import time

import comfy.model_management
import comfy.utils


class Invert:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}}
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    CATEGORY = "ce/v1"

    def run(self, image):
        return (1.0 - image,)


class Passthrough:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    CATEGORY = "ce/v1"

    def run(self, image, seed):
        return (image,)


class Add:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("INT", {"default": 0, "min": -2**31, "max": 2**31}),
                             "b": ("INT", {"default": 0, "min": -2**31, "max": 2**31})}}
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "ce/v1"

    def run(self, a, b):
        return (a + b,)


class FastProgress:
    """Two updates within microseconds: 1/2 then 2/2 (ComfyUI sends both)."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "ce/v1"

    def run(self, seed):
        pbar = comfy.utils.ProgressBar(2)
        pbar.update(1)
        pbar.update(1)
        return (seed,)


class Fail:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("INT", {"default": 42})}}
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "ce/v1"

    def run(self, x):
        return self._check(x)

    def _check(self, x):
        raise ValueError(f"bad value {x}")


class WaitProgress:
    """Runs until interrupted; notices it at a progress update."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "ce/v1"

    def run(self, seed):
        pbar = comfy.utils.ProgressBar(1000)
        for i in range(600):
            pbar.update_absolute(i + 1, 1000)
            time.sleep(0.05)
        return (seed,)


class WaitFlag:
    """Runs until interrupted; notices it through throw_exception_if_processing_interrupted."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "ce/v1"

    def run(self, seed):
        for _ in range(600):
            comfy.model_management.throw_exception_if_processing_interrupted()
            time.sleep(0.05)
        return (seed,)


class Sleep:
    """Runs for a while and never checks for an interrupt: stopped by killing its worker."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "ce/v1"

    def run(self, seed):
        time.sleep(60)
        return (seed,)


class Crash:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "ce/v1"

    def run(self, seed):
        os.kill(os.getpid(), signal.SIGKILL)


class Pid:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}
    RETURN_TYPES = ("STRING",)
    FUNCTION = "run"
    CATEGORY = "ce/v1"

    def run(self, seed):
        return (str(os.getpid()),)


class Text:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": "hi"})}}
    RETURN_TYPES = ("STRING",)
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "ce/v1"

    def run(self, text):
        return {"ui": {"text": [text.upper()]}, "result": (text.upper(),)}


NODE_CLASS_MAPPINGS = {
    "CE_Invert": Invert, "CE_Passthrough": Passthrough, "CE_Add": Add,
    "CE_FastProgress": FastProgress, "CE_Fail": Fail, "CE_WaitProgress": WaitProgress,
    "CE_WaitFlag": WaitFlag, "CE_Sleep": Sleep, "CE_Crash": Crash, "CE_Pid": Pid, "CE_Text": Text,
}
NODE_DISPLAY_NAME_MAPPINGS = {"CE_Invert": "Invert (isolated)"}


class Folders:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}
    RETURN_TYPES = ("STRING",)
    FUNCTION = "run"
    CATEGORY = "ce/v1"

    def run(self, seed):
        import json
        import folder_paths
        import utils                              # ComfyUI's package, as in the host
        from server import PromptServer           # imports utils.install_util
        return (json.dumps({"utils": utils.__file__, "server": PromptServer.__module__,
                            "output": folder_paths.get_output_directory(),
                            "temp": folder_paths.get_temp_directory(),
                            "input": folder_paths.get_input_directory(),
                            "checkpoints": folder_paths.get_folder_paths("checkpoints")}),)


class Validated:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("INT", {"default": 2})}}
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "ce/v1"

    @classmethod
    def VALIDATE_INPUTS(cls, x):
        return True if x % 2 == 0 else f"x must be even, got {x}"

    def run(self, x):
        return (x,)


NODE_CLASS_MAPPINGS["CE_Folders"] = Folders
NODE_CLASS_MAPPINGS["CE_Validated"] = Validated


class Expand:
    """Expands into CE_Add(a, b) -> CE_Add(that, 1): a node whose output is a subgraph."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("INT", {"default": 0}), "b": ("INT", {"default": 0})}}
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "ce/v1"

    def run(self, a, b):
        from comfy_execution.graph_utils import GraphBuilder
        g = GraphBuilder()
        first = g.node("CE_Add", a=a, b=b)
        second = g.node("CE_Add", a=first.out(0), b=1)
        return {"result": (second.out(0),), "expand": g.finalize()}


NODE_CLASS_MAPPINGS["CE_Expand"] = Expand
