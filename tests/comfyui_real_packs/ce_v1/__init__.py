from comfy_env.comfyui import isolated_nodes

NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = isolated_nodes(__file__, "nodes")
