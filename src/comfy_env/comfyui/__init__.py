"""Run a ComfyUI custom-node pack's node code in an isolated environment.

In the pack's ``__init__.py``::

    from comfy_env.comfyui import isolated_nodes
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = isolated_nodes(
        __file__, "nodes", env="comfy-env.toml")

and optionally, with the same arguments, in its ``prestartup_script.py``::

    from comfy_env.comfyui import prestart_pack
    prestart_pack(__file__, "nodes", env="comfy-env.toml")

(the worker then starts while ComfyUI starts).  ComfyUI then sees proxy classes (same inputs, outputs, widgets, categories, ...)
whose calls run the real node code in a worker process of that env.  See
docs/comfyui.md for the behaviour (progress, interrupts, errors, caching) and
limits.  Nothing here imports ComfyUI at import time; ``comfy.*`` is imported when
a node runs, so this module is safe to import anywhere.

Modules: pack.py (host side of a pack), early.py (workers started by prestartup
scripts until their pack loads), proxy.py (proxy classes), worker_side.py
(what runs in the worker), sidechannel.py (progress / interrupt while a call runs),
metadata_cache.py, encoding.py, errors.py, shim/ (a minimal ``comfy`` for workers).
"""
from __future__ import annotations

import logging
import os
import sys

from .. import settings
from .errors import PackLoadError

__all__ = ["isolated_nodes", "prestart_pack", "IsolatedPack", "PackLoadError"]

_log = logging.getLogger(__name__)


def isolated_nodes(pack_file, *modules, env=None, name=None, interrupt_grace=None,
                   call_timeout=None, comfy_api="auto", prestart=None, sandbox=None,
                   preload=None):
    """Load a pack's node modules in a worker; return ComfyUI's two mappings.

    pack_file: the pack's ``__file__`` (or its directory).
    modules: node module names relative to the pack (``"nodes"``, ``"nodes.image"``);
        each must define ``NODE_CLASS_MAPPINGS`` (V1 and/or V3 node classes; may define
        ``NODE_DISPLAY_NAME_MAPPINGS``) or ``comfy_entrypoint`` (V3: returns a
        ``ComfyExtension``).  They are imported only in the worker.
    env: where the worker runs: a ``comfy-env.toml`` / env dir / python path
        (relative paths are relative to the pack), a ``comfy_env.Env``, or None for
        ComfyUI's own interpreter.
    name: the pack's name in logs and the metadata cache (default: directory name).
    interrupt_grace: seconds a node gets to stop after ComfyUI's interrupt before its
        worker is killed (default 5, or ``$COMFY_ENV_INTERRUPT_GRACE``).
    call_timeout: seconds after which any single node call is killed (default none).
    comfy_api: what ``import comfy.utils`` gives node code in the worker: "auto"
        (ComfyUI's own modules when the worker can import them, else comfy-env's
        shim), "shim" or "comfyui".  The same goes for ``comfy_api`` (V3 nodes) and
        ``comfy_execution``.
    prestart: start the pack's worker (and import its node modules there) in the
        background right after loading, so the first node run doesn't wait for it
        (default True, or ``$COMFY_ENV_PRESTART`` = 0/1).
    sandbox: a ``comfy_env.Sandbox`` to run the pack's worker in (docs/sandbox.md);
        None: what the env's ``[sandbox]`` table says; False: unsandboxed.
    preload: modules the pack's *zygote* imports, from which its workers fork, so a
        worker replacing one killed after an interrupt or a crash starts without
        importing them again (``IsolatedExecutor(preload=...)``).  None: ``["torch"]``
        with ``env=None``, none (no zygote) for a separate env; ``[]``: no zygote.

    A worker the pack's ``prestartup_script.py`` started (``prestart_pack`` with the
    same arguments) becomes the pack's worker here.

    Returns ``(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS)``.  Raises
    PackLoadError (an ImportError, so ComfyUI lists the pack as failed with the
    reason and keeps starting) when the env or the node modules can't be loaded.
    Inside the pack's own worker it returns two empty dicts and does nothing.
    """
    from . import worker_side
    if worker_side.in_worker():
        return {}, {}
    caller = sys._getframe(1).f_globals.get("__name__")
    pack = _pack(pack_file, modules, caller, env=env, name=name,
                 interrupt_grace=interrupt_grace, call_timeout=call_timeout,
                 comfy_api=comfy_api, sandbox=sandbox, preload=preload)
    from . import early
    pack = early.adopt(pack)
    if prestart is None:
        prestart = settings.read().prestart
    try:
        mappings = pack.node_mappings(keep_worker=prestart)
    except PackLoadError as exc:
        # ComfyUI prints the traceback of a failed import; say it plainly first.
        _log.error("%s", exc)
        raise
    _log.info("comfy-env: [%s] %d isolated node(s) (metadata from %s%s)",
              pack.name, len(mappings[0]), pack.metadata_source,
              "; worker started by prestartup_script.py" if pack.started_early else "")
    if prestart and mappings[0] and not pack.started_early:
        pack.prestart()
    return mappings


def prestart_pack(pack_file, *modules, env=None, name=None, interrupt_grace=None,
                  call_timeout=None, comfy_api="auto", prestart=None, sandbox=None,
                  preload=None):
    """Start a pack's worker from its ``prestartup_script.py``; returns at once.

    ComfyUI runs each pack's ``prestartup_script.py`` at the very start of ``main.py``,
    before it imports torch, and imports the packs themselves only at the end of its
    start.  Started from there, the pack's worker imports torch, ComfyUI's ``comfy``
    and the pack's node modules in the background while ComfyUI starts, so a node's
    first run after ComfyUI is ready does not wait for them.  ``isolated_nodes()``
    in the pack's ``__init__.py`` then takes this worker over.

    Takes exactly the arguments of ``isolated_nodes()``, and must get the same ones
    (pack_file: the prestartup script's ``__file__``, which lies in the pack): the
    options that decide the worker (modules, env, name, comfy_api, call_timeout,
    sandbox, preload) are compared, and a worker started with other options is shut
    down with a warning saying what differed, the pack getting a worker of its own.

    Does nothing inside a worker, with ``prestart=False`` or ``$COMFY_ENV_PRESTART=0``,
    or when the pack's content failed to load before (cached failure).  Never raises:
    a bad argument or a failed start is logged once, and ``isolated_nodes()`` then
    starts the worker the usual way (and reports what is wrong with the pack).  The
    worker never outlives ComfyUI: it is shut down at exit, also when the pack is
    never loaded.  Nothing here imports torch or initialises CUDA in ComfyUI's process.
    """
    from . import worker_side
    if worker_side.in_worker():
        return None
    if prestart is None:
        prestart = settings.read().prestart
    if not prestart:
        return None
    try:
        pack = _pack(pack_file, modules, None, env=env, name=name,
                     interrupt_grace=interrupt_grace, call_timeout=call_timeout,
                     comfy_api=comfy_api, sandbox=sandbox, preload=preload)
        failed = pack.cached_failure()
        if failed is not None:
            _log.debug("comfy-env: [%s] not started early: %s", pack.name, failed)
            return None
        from . import early
        early.register(pack)
    except Exception as exc:
        _log.warning("comfy-env: prestart_pack(%r) did not start the worker: %s: %s "
                     "(the pack starts it when it loads)", os.fspath(pack_file)
                     if isinstance(pack_file, (str, os.PathLike)) else pack_file,
                     type(exc).__name__, exc)
    return None


def _pack(pack_file, modules, caller, *, interrupt_grace, **options):
    """The IsolatedPack for isolated_nodes()/prestart_pack() arguments."""
    if not isinstance(pack_file, (str, os.PathLike)):
        raise TypeError(f"isolated_nodes() takes the pack's __file__ first, not {pack_file!r}")
    flat = []
    for m in modules:
        flat.extend(m if isinstance(m, (list, tuple)) else [m])
    pack_dir = os.fspath(pack_file)
    if not os.path.isdir(pack_dir):
        pack_dir = os.path.dirname(os.path.abspath(pack_dir))
    if interrupt_grace is None:
        interrupt_grace = settings.read().interrupt_grace
    from .pack import IsolatedPack
    return IsolatedPack(pack_dir, flat, module_name=caller or os.path.basename(pack_dir),
                        interrupt_grace=interrupt_grace, **options)


def __getattr__(name):
    if name == "IsolatedPack":
        from .pack import IsolatedPack
        return IsolatedPack
    raise AttributeError(name)
