"""The bootstrap dir: how a worker in a foreign env imports *this* comfy_env.

A worker in another environment runs ``python -s -m comfy_env.worker`` with
``PYTHONPATH=<bootstrap dir>``.  The dir holds exactly two entries, ``comfy_env`` and
``cloudpickle``, linked to the parent's own package directories: the worker runs the
very same code as the parent (no embedded copy, nothing to install in the env), and
nothing else from the host's site-packages becomes visible.
"""
from __future__ import annotations

import os

from .cache import short_hash
from .links import materialise_dir

__all__ = ["bootstrap_dir", "bootstrap_sources"]


def bootstrap_sources() -> dict:
    """{name: package directory} for the packages a worker needs from the parent."""
    import cloudpickle

    comfy_env_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {
        "comfy_env": os.path.realpath(comfy_env_dir),
        "cloudpickle": os.path.realpath(os.path.dirname(os.path.abspath(cloudpickle.__file__))),
    }


def _tree_stamp(path: str) -> int:
    # Only matters when links fall back to copies: a code change must give a new dir.
    latest = 0
    for d, _dirs, files in os.walk(path):
        for f in files:
            if f.endswith(".py"):
                latest = max(latest, os.stat(os.path.join(d, f)).st_mtime_ns)
    return latest


def bootstrap_dir(root: str) -> str:
    """Create (once) and return the bootstrap dir under cache root ``root``."""
    sources = bootstrap_sources()
    probe_link = os.path.join(root, "bootstrap")
    linked = os.path.join(probe_link, short_hash({"sources": sources, "stamps": {}}))
    if os.path.isdir(linked):
        return linked           # made with symlinks once: usable from a read-only cache too
    os.makedirs(probe_link, exist_ok=True)
    key = short_hash({
        "sources": sources,
        # With symlinks the dir follows code edits by itself; stamps keep copies honest.
        "stamps": {} if _symlinks_work(probe_link) else {k: _tree_stamp(v) for k, v in sources.items()},
    })
    return materialise_dir(os.path.join(root, "bootstrap", key), sources)


_symlink_ok = None


def _symlinks_work(where: str) -> bool:
    global _symlink_ok
    if _symlink_ok is None:
        test = os.path.join(where, f".symlink-test-{os.getpid()}")
        try:
            os.symlink(where, test)
            os.unlink(test)
            _symlink_ok = True
        except (OSError, NotImplementedError):
            _symlink_ok = False
    return _symlink_ok
