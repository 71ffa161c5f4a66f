"""A minimal ``comfy`` / ``comfy_api`` / ``folder_paths`` for workers whose env can't import ComfyUI.

worker_side.py puts this directory on the worker's ``sys.path`` when ComfyUI's own
``comfy`` package is not importable there (the usual case for an env built from a
comfy-env.toml), or when the pack asks for it (``comfy_api="shim"``).  It holds only
what node code commonly touches:

- ``comfy.utils``: ProgressBar (throttled like ComfyUI 0.33), the global progress hook;
- ``comfy.model_management``: the interrupt API and exception, device helpers;
- ``folder_paths``: a read-only copy of the host's folders;
- ``comfy_api.latest``: ``io`` / ``ui`` / ``ComfyExtension`` to define V3 nodes, and the
  progress API (``ComfyAPI[Sync]().execution.set_progress``);
- ``comfy_execution.utils``: the executing-node context;
- ``comfy_execution.graph_utils``: ``GraphBuilder`` for nodes that expand into a
  subgraph, ``ExecutionBlocker``.

Anything else of ComfyUI (models, samplers, ``comfy.sd``, ...) is not available in an
isolated env by design; importing it fails with an error that says so (PROVIDES).
"""
PROVIDES = ("comfy.utils", "comfy.model_management", "folder_paths", "comfy_api.latest "
            "(io, ui, ComfyExtension, ComfyAPI/ComfyAPISync)", "comfy_execution.utils",
            "comfy_execution.progress", "comfy_execution.graph_utils (GraphBuilder, ExecutionBlocker)")
