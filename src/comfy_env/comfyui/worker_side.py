"""What runs inside a pack's worker process: load the pack, describe it, call nodes.

The host never imports the pack's node modules (their dependencies need not exist
in ComfyUI's environment); it calls these functions through the executor by
reference (``"comfy_env.comfyui.worker_side:<name>"``), so they work in a worker of
any Python version.  Only the standard library is imported at module level.

Order inside a fresh worker:
1. ``initialize`` (the executor's ``initializer``): makes ``comfy`` importable
   (ComfyUI's own if the worker can import it, else the shim in ``shim/``), installs a
   progress hook that forwards to the host, connects the side channel.
2. ``collect_metadata`` or ``call_node``: import the pack's node modules (once) and
   work on the classes in their ``NODE_CLASS_MAPPINGS``.
"""
from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import os
import re
import sys
import types

from . import encoding

__all__ = ["initialize", "collect_metadata", "call_node", "drop_instance", "in_worker"]

SHIM_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shim")

# Class attributes ComfyUI reads from a V1 node besides the ones found generically
# (any public UPPER_CASE data attribute is carried; these are the methods).
FORWARDED_METHODS = ("VALIDATE_INPUTS", "IS_CHANGED", "check_lazy_status")

_in_worker = False
_link = None            # sidechannel.WorkerLink once initialized
_packs = {}             # package name -> {node key: class}
_instances = {}         # host proxy instance id -> node instance


def in_worker() -> bool:
    """True inside a comfy-env pack worker (isolated_nodes() then does nothing)."""
    return _in_worker


# --------------------------------------------------------------------------- setup

def initialize(pack_name, comfy_mode="auto", sidechannel=None, folder_paths_snapshot=None,
               host_args=None):
    """Executor initializer: comfy API, progress forwarding, side channel."""
    global _in_worker, _link
    _in_worker = True
    os.environ["COMFY_ENV_PACK"] = pack_name
    _ensure_comfy(comfy_mode, host_args)
    if folder_paths_snapshot:
        _configure_folder_paths(folder_paths_snapshot)
    import comfy.model_management as mm
    import comfy.utils
    if sidechannel is not None:
        from .sidechannel import WorkerLink
        address, authkey = sidechannel
        _link = WorkerLink(address, authkey,
                           on_interrupt=lambda: mm.interrupt_current_processing(True),
                           clear_interrupt=lambda: mm.interrupt_current_processing(False))
    # Before any node code runs: a ProgressBar copies the global hook when built.
    comfy.utils.set_progress_bar_global_hook(_forwarding_hook)


def _forwarding_hook(value, total, preview_image=None, prompt_id=None, node_id=None):
    import comfy.model_management as mm
    # Like ComfyUI's own hook: a progress update is where an interrupt is noticed.
    mm.throw_exception_if_processing_interrupted()
    if _link is not None:
        _link.progress(value, total, preview_image, node_id)


def _ensure_comfy(mode, host_args=None):
    """Make ``import comfy.utils`` / ``comfy.model_management`` work in this worker.

    mode "auto": ComfyUI's own modules when they import here (env=None inside
    ComfyUI: same interpreter, same sys.path), else the shim.  "shim": always the
    shim.  "comfyui": ComfyUI's own or fail.
    """
    if mode not in ("auto", "shim", "comfyui"):
        raise ValueError(f"comfy_api must be 'auto', 'shim' or 'comfyui', not {mode!r}")
    if mode != "shim":
        try:
            if host_args:
                # Same settings as the host (--cpu, VRAM modes) before
                # model_management reads them at import.
                import comfy.cli_args
                for k, v in host_args.items():
                    setattr(comfy.cli_args.args, k, v)
            import comfy.model_management  # noqa: F401
            import comfy.utils  # noqa: F401
            return
        except Exception:
            if mode == "comfyui":
                raise
            # A half-imported ComfyUI (e.g. its torch missing here) must not shadow the shim.
            for name in list(sys.modules):
                if name == "comfy" or name.startswith("comfy.") or name == "folder_paths":
                    del sys.modules[name]
    sys.path.insert(0, SHIM_DIR)
    import comfy.model_management  # noqa: F401,F811
    import comfy.utils  # noqa: F401,F811


def _configure_folder_paths(snapshot):
    try:
        import folder_paths
    except Exception:
        return
    configure = getattr(folder_paths, "_configure", None)
    if configure is not None:          # only the shim takes a copy; ComfyUI's own is live
        configure(snapshot)


# ---------------------------------------------------------------------- pack loading

def _package_name(pack_dir):
    name = re.sub(r"\W", "_", os.path.basename(os.path.normpath(pack_dir)))
    return name if name and not name[0].isdigit() else "_" + name


def _load_pack(spec):
    """Import the pack's node modules; returns ({key: class}, {key: display name})."""
    pkg = spec["package"]
    if pkg in _packs:
        return _packs[pkg]
    pack_dir = spec["pack_dir"]
    if pkg not in sys.modules:
        # A package object for the pack dir *without* running its __init__.py: that
        # file is the host-side entry point (it calls isolated_nodes) and may import
        # host-only things.  Relative imports between the node modules still work.
        init = os.path.join(pack_dir, "__init__.py")
        package = types.ModuleType(pkg)
        package.__path__ = [pack_dir]
        package.__file__ = init if os.path.exists(init) else None
        package.__package__ = pkg
        package.__spec__ = importlib.util.spec_from_loader(pkg, loader=None, is_package=True)
        package.__spec__.submodule_search_locations = [pack_dir]
        sys.modules[pkg] = package
    classes, names = {}, {}
    for mod_name in spec["modules"]:
        module = importlib.import_module(f"{pkg}.{mod_name}")
        mapping = getattr(module, "NODE_CLASS_MAPPINGS", None)
        if mapping is None:
            if hasattr(module, "comfy_entrypoint"):
                raise NotImplementedError(
                    f"{pkg}.{mod_name} defines V3 nodes (comfy_entrypoint); comfy-env does not "
                    f"yet support V3 nodes (comfy_api io.ComfyNode) in isolated packs: keep them "
                    f"out of isolated_nodes() or write them as V1 nodes")
            raise AttributeError(f"{pkg}.{mod_name} has no NODE_CLASS_MAPPINGS")
        classes.update(mapping)
        names.update(getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", {}) or {})
    _packs[pkg] = (classes, names)
    return _packs[pkg]


def _is_v3(cls):
    return any(k.__name__ in ("_ComfyNodeInternal", "ComfyNode") and
               k.__module__.startswith("comfy_api") for k in getattr(cls, "__mro__", ()))


# ------------------------------------------------------------------------- metadata

def _method_info(cls, name):
    """How ``name`` is defined on the class and its signature, for an exact proxy."""
    for klass in cls.__mro__:
        if name in klass.__dict__:
            raw = klass.__dict__[name]
            break
    else:
        return None
    if isinstance(raw, classmethod):
        kind, func = "classmethod", raw.__func__
    elif isinstance(raw, staticmethod):
        kind, func = "staticmethod", raw.__func__
    elif callable(raw):
        kind, func = "function", raw
    else:
        return None
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        params = [["args", int(inspect.Parameter.VAR_POSITIONAL), False],
                  ["kwargs", int(inspect.Parameter.VAR_KEYWORD), False]]
    else:
        params = [[p.name, int(p.kind), p.default is not inspect.Parameter.empty]
                  for p in sig.parameters.values()]
    return {"kind": kind, "params": params,
            "is_async": inspect.iscoroutinefunction(func)}


def _describe(cls):
    attrs = {}
    for name in dir(cls):
        if not name.isupper() or name.startswith("_") or name == "INPUT_TYPES":
            continue
        value = getattr(cls, name)
        if callable(value) and not isinstance(value, (list, tuple, dict, str)):
            continue
        attrs[name] = encoding.encode(value)
    methods = {}
    for name in FORWARDED_METHODS:
        info = _method_info(cls, name)
        if info is not None:
            methods[name] = info
    function = getattr(cls, "FUNCTION", None)
    if not isinstance(function, str) or not hasattr(cls, function):
        raise AttributeError(f"node class {cls.__qualname__} has no FUNCTION method "
                             f"(FUNCTION = {function!r})")
    return {
        "class_name": cls.__name__,
        "qualname": cls.__qualname__,
        "module": cls.__module__,
        "doc": cls.__doc__,
        "attrs": attrs,
        "input_types": encoding.encode(cls.INPUT_TYPES()),
        "methods": methods,
        "function": _method_info(cls, function),
    }


def collect_metadata(spec):
    """Everything the host needs to build proxy classes, as tagged JSON data."""
    classes, names = _load_pack(spec)
    nodes, refused = {}, {}
    for key, cls in classes.items():
        if _is_v3(cls):
            refused[key] = (f"{cls.__qualname__} is a V3 node (comfy_api io.ComfyNode); comfy-env "
                            f"does not yet support V3 nodes in isolated packs")
            continue
        try:
            nodes[key] = _describe(cls)
        except Exception as exc:
            refused[key] = f"can't describe {cls!r}: {type(exc).__name__}: {exc}"
    return {"nodes": nodes, "display_names": {k: v for k, v in names.items() if k in nodes},
            "refused": refused,
            "python": list(sys.version_info[:3]),
            "comfy_api": "shim" if getattr(sys.modules.get("comfy"), "COMFY_ENV_SHIM", False)
            else "comfyui"}


# ---------------------------------------------------------------------------- calls

def call_node(spec, key, method, instance_id, args, kwargs, token=None):
    """Run ``method`` of node ``key`` on the class (instance_id None) or an instance.

    Instances live as long as the host's proxy instance (ComfyUI keeps one node
    object per node id and reuses it), so state kept on ``self`` survives between runs.
    """
    classes, _ = _load_pack(spec)
    try:
        cls = classes[key]
    except KeyError:
        raise KeyError(f"pack {spec['package']!r} has no node {key!r}") from None
    if instance_id is None:
        target = cls
    else:
        target = _instances.get(instance_id)
        if target is None:
            target = _instances[instance_id] = cls()
    if _link is not None and token is not None:
        _link.begin(token)
    try:
        result = getattr(target, method)(*args, **kwargs)
        if inspect.isawaitable(result):
            # Async node methods (ComfyUI awaits them): run to completion here.
            result = asyncio.run(_await(result))
        return result
    finally:
        if _link is not None and token is not None:
            _link.end(token)


async def _await(awaitable):
    return await awaitable


def drop_instance(instance_id):
    """The host's proxy instance is gone: let the node instance go too."""
    _instances.pop(instance_id, None)
