"""Run by ComfyUI first thing at start-up, before it imports torch or any pack.

Starts this pack's worker now, in the background: it builds/finds the env, starts,
and imports nodes.py while ComfyUI is still starting, so the node's first run after
ComfyUI is ready doesn't wait for that.  __init__.py's isolated_nodes() takes the
worker over; it must be given the same arguments (a worker started with other ones
is shut down with a warning, and the pack starts its own).
"""
from comfy_env.comfyui import prestart_pack

prestart_pack(__file__, "nodes", env="comfy-env.toml")
