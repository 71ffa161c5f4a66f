from comfy_api.latest import io


class V3Node(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="MixedV3", category="mixed",
                         inputs=[io.Int.Input("x", default=1)], outputs=[io.Int.Output()])

    @classmethod
    def execute(cls, x):
        return io.NodeOutput(x * 10)


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
