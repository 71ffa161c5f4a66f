from comfy_api.latest import ComfyNode


class V3Node(ComfyNode):
    @classmethod
    def execute(cls, x):
        return x


NODE_CLASS_MAPPINGS = {"V3Only": V3Node}
