"""Host-side stand-ins for node classes that live in a worker.

V1 nodes (below) become plain classes; V3 nodes become real ``io.ComfyNode``
subclasses rebuilt from the worker's schema (``build_v3_proxy_class``).

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

__all__ = ["IsolatedNodeProxy", "build_proxy_class", "build_v3_proxy_class"]


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


# Hooks ComfyUI awaits while it validates a prompt being queued, on the server's event loop.
_VALIDATION_HOOKS = frozenset({"VALIDATE_INPUTS", "validate_inputs"})


def _awaits_validation():
    """Whether this ComfyUI validates prompts with coroutines (``execution.validate_inputs``
    is ``async``, as in 0.33): a validation hook may then be async too."""
    import sys
    execution = sys.modules.get("execution")
    return inspect.iscoroutinefunction(getattr(execution, "validate_inputs", None))


def _off_the_loop(call):
    """``call`` as an async function run in a thread: a validation hook waits for the
    pack's worker, which may be running a node for seconds; on ComfyUI's event loop that
    wait froze its whole HTTP server (queueing, /interrupt, /system_stats)."""
    import asyncio

    async def forward(*args, **kwargs):
        return await asyncio.to_thread(call, *args, **kwargs)
    return forward


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

    if name in _VALIDATION_HOOKS and _awaits_validation():
        # (The synchronous forward reads its owner from the name ``forward``: the
        # attribute set on what is returned, this async function.)
        forward = _off_the_loop(forward)

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


# ------------------------------------------------------------------------------- V3

def _v3_record_types():
    """Input/Output classes of the host's comfy_api that render recorded V1 data.

    A V3 proxy must be a real ``io.ComfyNode`` subclass (execution.py tells V3 from V1
    with ``issubclass(class_def, _ComfyNodeInternal)``) whose ``define_schema()`` returns
    a real ``io.Schema``: ComfyUI derives INPUT_TYPES, RETURN_TYPES, OUTPUT_NODE, ... and
    /object_info from it.  ComfyUI only reads an input through ``as_dict()`` /
    ``get_io_type()`` / ``get_all()`` and an output through its ``io_type``, ``id``,
    ``display_name``, ``tooltip``, ``is_output_list``, so inputs and outputs that return
    what the worker's rendered give the same node, whichever ``comfy_api`` (ComfyUI's or
    the shim) defined it there.
    """
    from comfy_api.latest import io

    class RecordedInput(io.Input):
        def __init__(self, rec):
            super().__init__(rec["id"], optional=rec["optional"])
            self._io_type = encoding.decode(rec["io_type"])
            self._options = encoding.decode(rec["options"])

        @property
        def io_type(self):
            return self._io_type

        def get_io_type(self):
            return self._io_type

        def as_dict(self):
            return {**copy.deepcopy(self._options), "optional": self.optional}

    class RecordedOutput(io.Output):
        def __init__(self, rec):
            super().__init__(rec["id"], rec["display_name"], rec["tooltip"], rec["is_output_list"])
            # Output.__init__ takes the id for a missing display name, and the id of an
            # output declared without one is the "_0_STRING_" that finalize() gave it in
            # the worker: the slot's label is then its type, as in-process.
            self.display_name = rec["display_name"]
            self._io_type = encoding.decode(rec["io_type"])

        @property
        def io_type(self):
            return self._io_type

        def get_io_type(self):
            return self._io_type

    match_base = getattr(getattr(io, "MatchType", None), "Output", None)

    class RecordedMatchOutput(match_base or RecordedOutput):
        # ComfyUI reports a MatchType output's template id (an isinstance check).
        def __init__(self, rec):
            io.Output.__init__(self, rec["id"], rec["display_name"], rec["tooltip"],
                               rec["is_output_list"])
            self.display_name = rec["display_name"]        # as in RecordedOutput
            self._io_type = encoding.decode(rec["io_type"])
            self.template = type("Template", (), {"template_id": rec["matchtype"]})()

        @property
        def io_type(self):
            return self._io_type

        def get_io_type(self):
            return self._io_type

    class RecordedBadge:
        def __init__(self, data):
            self._data = data

        def validate(self):
            pass

        def as_dict(self, _inputs):
            return copy.deepcopy(self._data)

    return io, RecordedInput, RecordedOutput, RecordedMatchOutput, RecordedBadge


_record_types = None


def _hidden_values(cls, hidden_names):
    """The hidden inputs ComfyUI put on the (cloned) class, as {"UNIQUE_ID": value}."""
    holder = getattr(cls, "hidden", None)
    out = {}
    if holder is None:
        return out
    for name in hidden_names:
        if name == "DYNPROMPT":
            continue        # the live graph: not data, can't cross (the node sees None)
        out[name] = getattr(holder, name.lower(), None)
    return out


def build_v3_proxy_class(pack, key, meta, module_name):
    """A real ``io.ComfyNode`` subclass for the V3 node ``key`` (see _v3_record_types)."""
    import dataclasses
    global _record_types
    if _record_types is None:
        _record_types = _v3_record_types()
    io, RecordedInput, RecordedOutput, RecordedMatchOutput, RecordedBadge = _record_types
    known = {f.name for f in dataclasses.fields(io.Schema)}
    fields = {k: encoding.decode(v) for k, v in meta["schema"].items() if k in known}
    hidden = []
    for value in meta["hidden"]:
        try:
            hidden.append(io.Hidden(value))
        except ValueError:
            pass            # a hidden input this ComfyUI doesn't know: it can't supply it
    hidden_names = [h.value for h in hidden]
    badge = encoding.decode(meta["price_badge"]) if meta.get("price_badge") is not None else None

    def define_schema(cls):
        # Fresh objects each time: ComfyUI finalizes (mutates) the schema it gets.
        kw = dict(copy.deepcopy(fields))
        if "price_badge" in known:
            kw["price_badge"] = RecordedBadge(badge) if badge is not None else None
        return io.Schema(
            inputs=[RecordedInput(r) for r in meta["inputs"]],
            outputs=[RecordedMatchOutput(r) if r.get("matchtype") is not None
                     else RecordedOutput(r) for r in meta["outputs"]],
            hidden=list(hidden), **kw)

    def execute(cls, **kwargs):
        args, ui, expand, block = cls._comfy_env_pack.call(
            key, "execute", None, (), kwargs, hidden=_hidden_values(cls, hidden_names))
        return io.NodeOutput(*args, ui=ui, expand=expand, block_execution=block)

    execute.__signature__ = _signature(meta["function"]["params"]) if meta.get("function") else None
    ns = {"define_schema": classmethod(define_schema), "execute": classmethod(execute),
          "__module__": module_name, "__qualname__": meta["qualname"], "__doc__": meta.get("doc"),
          "_comfy_env_key": key}
    for name, info in meta["methods"].items():
        ns[name] = classmethod(_v3_forwarder(key, name, info, hidden_names))
    cls = type(meta["class_name"], (io.ComfyNode,), ns)
    cls._comfy_env_pack = pack
    return cls


def _v3_forwarder(key, name, info, hidden_names):
    def forward(cls, *args, **kwargs):
        return cls._comfy_env_pack.call(key, name, None, args, kwargs,
                                        hidden=_hidden_values(cls, hidden_names))

    if name in _VALIDATION_HOOKS and _awaits_validation():
        forward = _off_the_loop(forward)

    forward.__name__ = name
    sig = _signature(info["params"])
    if sig is not None:
        # ComfyUI reads inspect.getfullargspec(validate_inputs).args to pick the inputs.
        forward.__signature__ = sig
    return forward
