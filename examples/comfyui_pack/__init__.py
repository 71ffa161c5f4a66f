"""ComfyUI entry point of the example pack: the node code runs in its own env.

ComfyUI imports this file; the nodes in nodes.py are imported only in a worker
process whose env is built from comfy-env.toml (numpy 1.x, while ComfyUI runs on
numpy 2.x).  ComfyUI itself sees proxy classes with the same inputs and outputs.
"""
from comfy_env.comfyui import isolated_nodes

NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = isolated_nodes(
    __file__, "nodes", env="comfy-env.toml")
