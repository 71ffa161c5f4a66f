import asyncio
import os

from comfy_api.latest import ComfyAPISync, ComfyExtension, io, ui


class Scale(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CE3_Scale", display_name="Scale (V3, isolated)", category="ce/v3",
            description="multiplies an image",
            inputs=[io.Image.Input("image"),
                    io.Float.Input("factor", default=0.5, min=0.0, max=2.0, step=0.1)],
            outputs=[io.Image.Output("scaled"), io.String.Output("who")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True)

    @classmethod
    def execute(cls, image, factor):
        api = ComfyAPISync()
        api.execution.set_progress(1, 2)
        out = (image * factor).clamp(0, 1)
        api.execution.set_progress(2, 2)
        return io.NodeOutput(out, f"{cls.hidden.unique_id}:{os.getpid()}",
                             ui=ui.PreviewImage(out, cls=cls))


class Text(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="CE3_Text", category="ce/v3",
                         inputs=[io.String.Input("value", default="v3")],
                         outputs=[io.String.Output()], is_output_node=True)

    @classmethod
    async def execute(cls, value):
        await asyncio.sleep(0.01)
        return io.NodeOutput(value[::-1], ui=ui.PreviewText(value[::-1]))


class Even(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="CE3_Even", category="ce/v3",
                         inputs=[io.Int.Input("x", default=2)], outputs=[io.Int.Output()])

    @classmethod
    def validate_inputs(cls, x):
        return True if x % 2 == 0 else f"x must be even, got {x}"

    @classmethod
    def execute(cls, x):
        return io.NodeOutput(x // 2)


class Expand(io.ComfyNode):
    """Expands into CE_Add(x, x) -> CE_Add(that, that): 4x, as a subgraph."""
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="CE3_Expand", category="ce/v3", enable_expand=True,
                         inputs=[io.Int.Input("x", default=1)], outputs=[io.Int.Output()])

    @classmethod
    def execute(cls, x):
        from comfy_execution.graph_utils import GraphBuilder
        g = GraphBuilder()
        double = g.node("CE_Add", a=x, b=x)
        quad = g.node("CE_Add", a=double.out(0), b=double.out(0))
        return io.NodeOutput(quad.out(0), expand=g.finalize())


class Extension(ComfyExtension):
    async def get_node_list(self):
        return [Scale, Text, Even, Expand]


def comfy_entrypoint():
    return Extension()
