"""A minimal ``comfy`` / ``folder_paths`` for workers whose env can't import ComfyUI.

worker_side.py puts this directory on the worker's ``sys.path`` when ComfyUI's own
``comfy`` package is not importable there (the usual case for an env built from a
comfy-env.toml).  It holds only what node code commonly touches: the progress bar,
the interrupt functions and exception, device helpers, and read-only folder paths
copied from the host.  Anything else of ComfyUI (models, samplers, ...) is not
available in an isolated env by design.
"""
