"""Packs whose worker was started by their ``prestartup_script.py``, until adopted.

ComfyUI runs every pack's ``prestartup_script.py`` first thing in ``main.py``,
before it imports torch, and imports the packs themselves last, a fraction of a
second before it reports ready.  A worker started from the prestartup script
(``prestart_pack``) imports torch, ComfyUI's ``comfy`` and the pack's node modules
while ComfyUI starts, instead of after it::

    prestartup_script.py: prestart_pack(__file__, "nodes", env=...)
        -> IsolatedPack(...).start_early()       (background thread; returns at once)
        -> kept here, keyed by the pack's directory
    __init__.py:          isolated_nodes(__file__, "nodes", env=...)
        -> adopt(): the early pack, if its worker options are the same
                    (else it is shut down, saying what differed, and a fresh pack is used)

A pack started early but never adopted (its ``__init__.py`` failed, or ComfyUI
stopped during start-up) is shut down at exit like any pack (atexit), and its
worker also ends with ComfyUI's process if that is killed (the executor's
parent-death watch).
"""
from __future__ import annotations

import logging
import threading

__all__ = ["register", "adopt"]

_log = logging.getLogger("comfy_env.comfyui")
_lock = threading.Lock()
_early = {}         # pack directory -> IsolatedPack started early, not adopted yet


def register(pack):
    """Start ``pack``'s worker early, once per pack directory (a second call is ignored)."""
    with _lock:
        if pack.pack_dir in _early:
            return _early[pack.pack_dir]
        _early[pack.pack_dir] = pack
    pack.start_early()
    return pack


def adopt(pack):
    """The early-started pack for ``pack``'s directory when it has the same worker
    options (its host-side settings taken from ``pack``), else ``pack`` itself."""
    with _lock:
        early = _early.pop(pack.pack_dir, None)
    if early is None:
        return pack
    mine, theirs = early.worker_options(), pack.worker_options()
    if mine != theirs:
        diff = ", ".join(f"{k}={mine[k]!r} in prestartup_script.py vs {theirs[k]!r} in "
                         f"isolated_nodes()" for k in mine if mine[k] != theirs[k])
        _log.warning("comfy-env: [%s] the worker started by prestartup_script.py was "
                     "started with other options than isolated_nodes() gives (%s): it is "
                     "shut down and the pack gets a worker of its own; pass prestart_pack() "
                     "the same arguments as isolated_nodes()", pack.name, diff)
        early.shutdown(wait=False)
        return pack
    early.module_name = pack.module_name
    early.interrupt_grace = pack.interrupt_grace
    early.adopt_host_state()
    return early
