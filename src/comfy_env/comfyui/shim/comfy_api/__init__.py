"""comfy-env's stand-in for ComfyUI's ``comfy_api`` inside isolated workers (see latest/)."""
COMFY_ENV_SHIM = True
