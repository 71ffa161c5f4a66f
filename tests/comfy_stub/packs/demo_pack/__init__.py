# The host-side entry point, exactly as a real pack would write it.
from comfy_env.comfyui import isolated_nodes

NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = isolated_nodes(__file__, "nodes", env=None)
