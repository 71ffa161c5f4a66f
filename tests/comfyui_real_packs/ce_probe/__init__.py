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


NODE_CLASS_MAPPINGS = {"CE_Probe": Probe}
