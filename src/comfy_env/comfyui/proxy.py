"""Host-side stand-ins for node classes that live in a worker.

A proxy class carries every data attribute ComfyUI reads from a V1 node (copied
from the worker's class: INPUT_TYPES' result, RETURN_TYPES, FUNCTION, CATEGORY, ...
and any other public UPPER_CASE attribute), and only those the original has, since
ComfyUI asks ``hasattr`` for several of them.  Methods ComfyUI calls are forwarders
with the original's kind (classmethod / staticmethod / plain) and signature,
because ComfyUI inspects them (``inspect.getfullargspec(VALIDATE_INPUTS).args``
decides which inputs it passes and whether it checks min/max itself).
"""
from __future__ import annotations

import copy
import inspect
import uuid
import weakref

from . import encoding

__all__ = ["IsolatedNodeProxy", "build_proxy_class"]


class _WorkerDefault:
    """Default value shown in a proxy signature: the real default lives in the worker."""

    def __repr__(self):
        return "<default in worker>"


_WORKER_DEFAULT = _WorkerDefault()


class IsolatedNodeProxy:
    """Base class of all proxy node classes.  Defines no ComfyUI attribute itself."""

    _comfy_env_pack = None       # the IsolatedPack that runs this node
    _comfy_env_key = None        # the node's key in NODE_CLASS_MAPPINGS

    def __init__(self):
        # ComfyUI keeps one node object per node id and reuses it across runs; the
        # worker keeps a twin under this id, dropped when ComfyUI drops ours.
        self._comfy_env_instance = uuid.uuid4().hex
        fin = weakref.finalize(self, self._comfy_env_pack.drop_instance, self._comfy_env_instance)
        fin.atexit = False


def _signature(params):
    out = []
    for name, kind, has_default in params:
        out.append(inspect.Parameter(
            name, inspect._ParameterKind(kind),
            default=_WORKER_DEFAULT if has_default else inspect.Parameter.empty))
    try:
        return inspect.Signature(out)
    except ValueError:
        return None


def _forwarder(key, name, info, drop):
    kind = info["kind"]

    def forward(*args, **kwargs):
        if kind == "classmethod":
            cls, args = args[0], args[1:]
            instance_id = None
        elif kind == "function" and args and isinstance(args[0], IsolatedNodeProxy):
            cls, instance_id, args = type(args[0]), args[0]._comfy_env_instance, args[1:]
        else:
            # staticmethod, or a plain function called on the class: the worker calls
            # it on the class the same way, with the same outcome.
            cls, instance_id = forward._comfy_env_owner, None
        return cls._comfy_env_pack.call(key, name, instance_id, args, kwargs, drop=drop)

    forward.__name__ = name
    sig = _signature(info["params"])
    if sig is not None:
        forward.__signature__ = sig
    if kind == "classmethod":
        return classmethod(forward), forward
    if kind == "staticmethod":
        return staticmethod(forward), forward
    return forward, forward


def build_proxy_class(pack, key, meta, module_name):
    """The proxy class for node ``key`` described by ``meta`` (see worker_side._describe)."""
    attrs = {name: encoding.decode(value) for name, value in meta["attrs"].items()}
    input_types = encoding.decode(meta["input_types"])
    hidden = input_types.get("hidden", {}) if isinstance(input_types, dict) else {}
    # DYNPROMPT is a live host object (the graph being executed): it can't be sent to
    # another process; the node receives None there.
    drop = frozenset(n for n, t in hidden.items() if t == "DYNPROMPT")

    def INPUT_TYPES(cls):
        # A copy each time: callers may modify what they get, the next caller must not see it.
        return copy.deepcopy(input_types)

    ns = dict(attrs)
    ns["INPUT_TYPES"] = classmethod(INPUT_TYPES)
    ns["__module__"] = module_name
    ns["__qualname__"] = meta["qualname"]
    ns["__doc__"] = meta.get("doc")
    owners = []
    function = attrs["FUNCTION"]
    run_info = dict(meta.get("function") or {"params": [["self", 1, False], ["kwargs", 4, False]]})
    run_info["kind"] = "function"          # always called on the node object
    ns[function], f = _forwarder(key, function, run_info, drop)
    owners.append(f)
    for name, info in meta["methods"].items():
        ns[name], f = _forwarder(key, name, info, drop)
        owners.append(f)
    cls = type(meta["class_name"], (IsolatedNodeProxy,), ns)
    cls._comfy_env_pack = pack
    cls._comfy_env_key = key
    for f in owners:
        f._comfy_env_owner = cls
    return cls
