"""A V3-only pack (comfy_entrypoint): scalars, hidden inputs, ui, async execute,
validate_inputs / fingerprint_inputs / check_lazy_status, the V3 progress API."""
import os

from comfy_api.latest import ComfyAPISync, ComfyExtension, io, ui


class AddV3(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="V3Add", display_name="Add (V3)", category="tests/v3",
            description="adds two ints",
            inputs=[io.Int.Input("a", default=1, min=0, max=100),
                    io.Int.Input("b", default=2, optional=True),
                    io.Combo.Input("mode", options=["plus", "minus"], default="plus")],
            outputs=[io.Int.Output("sum", display_name="sum"), io.String.Output()],
            hidden=[io.Hidden.unique_id],
            is_output_node=True)

    @classmethod
    def execute(cls, a, mode, b=2):
        total = a + b if mode == "plus" else a - b
        ComfyAPISync().execution.set_progress(1, 2)
        ComfyAPISync().execution.set_progress(2, 2)
        return io.NodeOutput(total, f"{cls.hidden.unique_id}:{os.getpid()}",
                             ui=ui.PreviewText(f"sum={total}"))

    @classmethod
    def validate_inputs(cls, a, mode=None):
        return True if a != 13 else "13 is unlucky"

    @classmethod
    def fingerprint_inputs(cls, a, **kwargs):
        return a


class LazyV3(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="V3Lazy", category="tests/v3",
                         inputs=[io.Boolean.Input("use_b"),
                                 io.Int.Input("a", lazy=True, optional=True),
                                 io.Int.Input("b", lazy=True, optional=True)],
                         outputs=[io.Int.Output()])

    @classmethod
    def check_lazy_status(cls, use_b, a=None, b=None):
        return ["b"] if use_b and b is None else ["a"] if not use_b and a is None else []

    @classmethod
    async def execute(cls, use_b, a=None, b=None):
        return io.NodeOutput(b if use_b else a)


class V3Extension(ComfyExtension):
    async def get_node_list(self):
        return [AddV3, LazyV3]


async def comfy_entrypoint():
    return V3Extension()
