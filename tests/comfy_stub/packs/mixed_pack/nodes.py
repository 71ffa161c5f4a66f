from comfy_api.latest import ComfyNode


class V3Node(ComfyNode):
    pass


class V1Node:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("INT", {"default": 1})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "mixed"

    def run(self, x):
        return (x + 1,)


NODE_CLASS_MAPPINGS = {"MixedV3": V3Node, "MixedV1": V1Node}
