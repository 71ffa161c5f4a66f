"""Stand-in for comfy_execution/utils.py: which node is executing (a context variable).

comfy-env sets it around each node call from the host's own context, so node code
and the V3 progress API see the node id they would see in ComfyUI.
"""
import contextvars
from typing import NamedTuple, Optional


class ExecutionContext(NamedTuple):
    prompt_id: str
    node_id: str
    list_index: Optional[int]


current_executing_context = contextvars.ContextVar("current_executing_context", default=None)


def get_executing_context():
    return current_executing_context.get(None)


class CurrentNodeContext:
    def __init__(self, prompt_id, node_id, list_index=None):
        self.context = ExecutionContext(prompt_id, node_id, list_index)

    def __enter__(self):
        self.token = current_executing_context.set(self.context)
        return self

    def __exit__(self, *exc):
        current_executing_context.reset(self.token)
        return False
