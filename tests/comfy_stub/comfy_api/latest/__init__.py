"""The stand-in ComfyUI's comfy_api.latest: comfy-env's worker shim of it.

The shim has ComfyUI's API for *defining* V3 nodes (io types, Schema, ComfyNode,
NodeOutput, ComfyExtension), which is what the stand-in needs for packs to describe
their nodes and for V3 proxies to be built and called.  How ComfyUI itself treats V3
proxies is tested against the real ComfyUI (tests/test_comfyui_real.py).
"""
import os

import comfy_env.comfyui.shim as _shim

_dir = os.path.join(os.path.dirname(_shim.__file__), "comfy_api", "latest")
__path__ = [_dir]          # the submodules (_io, _ui) are the shim's
with open(os.path.join(_dir, "__init__.py")) as _f:
    exec(compile(_f.read(), os.path.join(_dir, "__init__.py"), "exec"))
