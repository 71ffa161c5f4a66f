"""Just enough of comfy_api for a V3 node class to exist (the adapter must refuse it)."""


class _ComfyNodeInternal:
    pass


class ComfyNode(_ComfyNodeInternal):
    @classmethod
    def define_schema(cls):
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs):
        raise NotImplementedError
