"""comfy-env's stand-in for ComfyUI's ``comfy`` package inside isolated workers."""
COMFY_ENV_SHIM = True
