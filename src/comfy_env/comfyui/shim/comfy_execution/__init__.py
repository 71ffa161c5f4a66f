"""comfy-env's stand-in for ComfyUI's ``comfy_execution`` inside isolated workers."""
COMFY_ENV_SHIM = True
