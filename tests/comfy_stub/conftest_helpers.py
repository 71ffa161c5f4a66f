"""Path and environment setup shared by tests/test_comfyui*.py."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PACKS = os.path.join(HERE, "packs")
SRC = os.path.join(os.path.dirname(os.path.dirname(HERE)), "src")


def setup_paths():
    try:
        import comfy_env  # noqa: F401
    except ImportError:
        sys.path.insert(0, SRC)
    for p in (PACKS, HERE):
        if p not in sys.path:
            sys.path.insert(0, p)
