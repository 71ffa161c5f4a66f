"""ce_v1's node classes loaded in-process (not isolated), as LOCAL_<key>: the baseline
for benchmarks/bench_comfyui.py.  Same code, so the difference is comfy-env's."""
import importlib.util
import os

_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ce_v1", "nodes.py")
_spec = importlib.util.spec_from_file_location("ce_local_nodes", _path)
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)

NODE_CLASS_MAPPINGS = {"LOCAL_" + k: v for k, v in _mod.NODE_CLASS_MAPPINGS.items()}
