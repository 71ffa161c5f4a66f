"""An ordinary in-process output node: reports what it received in its ui (for tests)."""


class Probe:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("*",)}, "optional": {"tag": ("STRING", {"default": ""})}}
    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "ce/probe"

    @classmethod
    def VALIDATE_INPUTS(cls, input_types):
        return True

    def run(self, value, tag=""):
        if hasattr(value, "shape"):
            v = value.float()
            info = {"shape": list(value.shape), "dtype": str(value.dtype), "sum": float(v.sum()),
                    "first": v.flatten()[:4].tolist(), "last": v.flatten()[-4:].tolist()}
        else:
            info = {"value": value if isinstance(value, (int, float, str, bool)) else repr(value)}
        info["tag"] = tag
        return {"ui": {"probe": [info]}}


class Tick:
    """Passes its value on and reports when it ran (perf_counter_ns), for benchmarks."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("*",), "seed": ("INT", {"default": 0, "min": 0, "max": 2**62})}}
    RETURN_TYPES = ("*",)
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "ce/probe"

    @classmethod
    def VALIDATE_INPUTS(cls, input_types):
        return True

    def run(self, value, seed):
        import time
        return {"ui": {"tick": [time.perf_counter_ns()]}, "result": (value,)}


NODE_CLASS_MAPPINGS = {"CE_Probe": Probe, "CE_Tick": Tick}
