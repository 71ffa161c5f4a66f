# ComfyUI runs this first thing, before it imports torch: the pack's worker starts
# now, in the background, and __init__.py's isolated_nodes() (same arguments) takes it over.
from comfy_env.comfyui import prestart_pack

prestart_pack(__file__, "nodes")
