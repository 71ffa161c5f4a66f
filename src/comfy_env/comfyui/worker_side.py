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

__all__ = ["initialize", "collect_metadata", "call_node", "drop_instance", "in_worker",
           "warm_up", "configure_folder_paths"]

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
               host_args=None, host_modules=None):
    """Executor initializer: comfy API, progress forwarding, side channel."""
    global _in_worker, _link
    _in_worker = True
    os.environ["COMFY_ENV_PACK"] = pack_name
    if _ensure_comfy(comfy_mode, host_args) and host_modules:
        _HostModules.install(host_modules)
    if folder_paths_snapshot:
        _configure_folder_paths(folder_paths_snapshot)
    import comfy.model_management as mm
    import comfy.utils
    if sidechannel is not None:
        from .sidechannel import WorkerLink
        address, authkey = sidechannel[:2]
        _link = WorkerLink(address, authkey,
                           on_interrupt=lambda: mm.interrupt_current_processing(True),
                           clear_interrupt=lambda: mm.interrupt_current_processing(False),
                           link_id=sidechannel[2] if len(sidechannel) > 2 else None)
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
            return True
        except Exception:
            if mode == "comfyui":
                raise
            # A half-imported ComfyUI (e.g. its torch missing here) must not shadow the shim.
            for name in list(sys.modules):
                if name.partition(".")[0] in _SHIM_PACKAGES:
                    del sys.modules[name]
    sys.path.insert(0, SHIM_DIR)
    sys.meta_path.append(_ShimGapFinder())
    import comfy.model_management  # noqa: F401,F811
    import comfy.utils  # noqa: F401,F811
    return False


class _HostModules:
    """First on sys.meta_path in a worker that runs ComfyUI's own modules: ComfyUI's
    top-level modules the host had imported (pack._host_top_modules) resolve to the
    host's files, whatever this worker's path says by the time they are imported
    (``utils``: ComfyUI's package, not ``comfy/utils.py``, which the path ComfyUI gives
    custom nodes puts first; a prestarted worker gets that path later).  Other names
    are left to the usual finders."""

    @classmethod
    def install(cls, modules):
        modules = {name: path for name, path in modules.items() if name not in sys.modules}
        if modules:
            sys.meta_path.insert(0, cls(modules))

    def __init__(self, modules):
        self.modules = modules

    def find_spec(self, name, path=None, target=None):
        where = self.modules.get(name) if path is None else None
        if where is None:
            return None
        package = os.path.basename(where) == "__init__.py"
        return importlib.util.spec_from_file_location(
            name, where, submodule_search_locations=[os.path.dirname(where)] if package else None)


_SHIM_PACKAGES = ("comfy", "comfy_api", "comfy_execution", "folder_paths")
# ComfyUI's top-level modules the shim has no stand-in for, named so that importing one
# in a shim worker says why it is missing (the finder is consulted last: a module of the
# env's own with such a name is found first).
_COMFYUI_ONLY = ("nodes", "server", "execution", "node_helpers", "latent_preview", "comfy_extras",
                 "comfy_api_nodes", "comfyui_version", "comfy_config")


class _ShimGapFinder:
    """Last on sys.meta_path: a ComfyUI module the shim lacks fails with a reason.

    Without it, ``import comfy.sd`` in a shim worker fails with a bare "No module
    named 'comfy.sd'", which reads like a broken install rather than a limit of the shim.
    """

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        if (top not in _SHIM_PACKAGES or fullname in _SHIM_PACKAGES) and top not in _COMFYUI_ONLY:
            return None
        from .shim import PROVIDES
        raise ModuleNotFoundError(
            f"No module named {fullname!r}: this node worker runs with comfy-env's shim of "
            f"ComfyUI (its env can't import ComfyUI's own modules, or the pack chose "
            f"comfy_api='shim'), which provides only {'; '.join(PROVIDES)}. Other ComfyUI "
            f"modules can't be used in an isolated env; run the pack with env=None "
            f"(ComfyUI's interpreter) to use them.", name=fullname)

    def invalidate_caches(self):
        pass


def configure_folder_paths(snapshot):
    """ComfyUI's folder configuration changed after this worker started (see
    IsolatedPack.adopt_host_state): the shim's copy follows it."""
    _configure_folder_paths(snapshot)


_FOLDER_KEYS = ("base_path", "models_dir", "output_directory", "temp_directory",
                "input_directory", "user_directory")


def _configure_folder_paths(snapshot):
    try:
        import folder_paths
    except Exception:
        return
    configure = getattr(folder_paths, "_configure", None)
    if configure is not None:          # the shim (another env) takes a copy
        configure(snapshot)
        return
    if not snapshot:
        return
    # ComfyUI's own folder_paths (env=None), imported afresh in this process: the host's
    # --base-directory, --output-directory, --temp-directory, extra model paths and the
    # folders other packs added never reached it.  Take the host's configuration.
    for key in _FOLDER_KEYS:
        if isinstance(snapshot.get(key), str) and hasattr(folder_paths, key):
            setattr(folder_paths, key, snapshot[key])
    table = getattr(folder_paths, "folder_names_and_paths", None)
    if isinstance(table, dict) and snapshot.get("folder_names_and_paths"):
        table.clear()
        for name, (paths, extensions) in snapshot["folder_names_and_paths"].items():
            table[name] = (list(paths), set(extensions))
    cache = getattr(folder_paths, "filename_list_cache", None)
    if isinstance(cache, dict):
        cache.clear()


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
        if mapping is not None:
            # Like ComfyUI's load_custom_node: NODE_CLASS_MAPPINGS wins over comfy_entrypoint.
            classes.update(mapping)
            names.update(getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", {}) or {})
        elif hasattr(module, "comfy_entrypoint"):
            for cls in _entrypoint_nodes(module, f"{pkg}.{mod_name}"):
                schema = _v3_schema(cls)
                classes[schema.node_id] = cls
                if schema.display_name is not None:
                    names[schema.node_id] = schema.display_name
        else:
            raise AttributeError(f"{pkg}.{mod_name} has neither NODE_CLASS_MAPPINGS (V1) nor "
                                 f"comfy_entrypoint (V3): it defines no nodes")
    _packs[pkg] = (classes, names)
    return _packs[pkg]


def _entrypoint_nodes(module, where):
    """The node classes of a V3 module: ``comfy_entrypoint()`` -> ComfyExtension ->
    ``on_load()``, ``get_node_list()``, the same steps as ComfyUI's load_custom_node."""
    entrypoint = module.comfy_entrypoint
    if not callable(entrypoint):
        raise TypeError(f"comfy_entrypoint in {where} is not callable")

    async def load():
        extension = entrypoint()
        if inspect.isawaitable(extension):
            extension = await extension
        on_load = getattr(extension, "on_load", None)
        if on_load is not None:
            r = on_load()
            if inspect.isawaitable(r):
                await r
        nodes = extension.get_node_list()
        if inspect.isawaitable(nodes):
            nodes = await nodes
        return nodes

    nodes = asyncio.run(load())
    if not isinstance(nodes, list):
        raise TypeError(f"comfy_entrypoint in {where}: get_node_list() returned "
                        f"{type(nodes).__name__}, not a list of node classes")
    return nodes


def _is_v3(cls):
    return any(k.__name__ in ("_ComfyNodeInternal", "ComfyNode") and
               k.__module__.startswith("comfy_api") for k in getattr(cls, "__mro__", ()))


def _v3_schema(cls):
    """The finalized, validated schema, as ComfyUI's GET_SCHEMA makes it."""
    get = getattr(cls, "GET_SCHEMA", None)
    if get is not None:
        return get()
    schema = cls.define_schema()
    schema.finalize()
    schema.validate()
    return schema


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


# Schema fields that are plain data (copied as they are); inputs, outputs, hidden and
# price_badge are described separately.
_SCHEMA_FIELDS = ("node_id", "display_name", "category", "description", "search_aliases",
                  "is_input_list", "is_output_node", "is_deprecated", "is_experimental",
                  "is_dev_only", "is_api_node", "not_idempotent", "enable_expand",
                  "accept_all_inputs", "essentials_category", "has_intermediate_output")
# V3 class methods ComfyUI calls when the node overrides them (first_real_override).
V3_METHODS = ("validate_inputs", "fingerprint_inputs", "check_lazy_status")


def _overrides(cls, name):
    """Whether ``cls`` defines ``name`` below comfy_api's placeholder (first_real_override)."""
    for klass in cls.__mro__:
        if klass.__module__.startswith("comfy_api"):
            return False
        if name in klass.__dict__:
            return True
    return False


def _describe_v3(cls):
    """A V3 node's schema as data, with each input/output's V1 rendering.

    The host rebuilds a real ``io.Schema`` from this whose inputs/outputs render
    exactly the same (see proxy.build_v3_proxy_class); describing through
    ``as_dict()``/``get_io_type()`` works for ComfyUI's comfy_api and the shim alike.
    """
    schema = _v3_schema(cls)
    fields = {f: encoding.encode(getattr(schema, f)) for f in _SCHEMA_FIELDS
              if hasattr(schema, f)}
    inputs = []
    for i in schema.inputs or []:
        d = dict(i.as_dict())
        optional = bool(d.pop("optional", getattr(i, "optional", False)))
        inputs.append({"id": i.id, "io_type": encoding.encode(i.get_io_type()),
                       "options": encoding.encode(d), "optional": optional})
    outputs = []
    for o in schema.outputs or []:
        template = getattr(o, "template", None)
        outputs.append({"id": o.id, "io_type": encoding.encode(o.io_type),
                        "display_name": o.display_name, "tooltip": o.tooltip,
                        "is_output_list": bool(o.is_output_list),
                        "matchtype": getattr(template, "template_id", None)})
    badge = getattr(schema, "price_badge", None)
    methods = {}
    for name in V3_METHODS:
        if _overrides(cls, name):
            info = _method_info(cls, name)
            if info is not None:
                methods[name] = info
    execute = _method_info(cls, "execute")
    return {
        "api": "v3",
        "class_name": cls.__name__,
        "qualname": cls.__qualname__,
        "module": cls.__module__,
        "doc": cls.__doc__,
        "schema": fields,
        "inputs": inputs,
        "outputs": outputs,
        "hidden": [getattr(h, "value", h) for h in schema.hidden or []],
        "price_badge": encoding.encode(badge.as_dict(schema.inputs)) if badge is not None else None,
        "methods": methods,
        "function": execute,
    }


def collect_metadata(spec):
    """Everything the host needs to build proxy classes, as tagged JSON data."""
    classes, names = _load_pack(spec)
    nodes, refused = {}, {}
    for key, cls in classes.items():
        try:
            nodes[key] = _describe_v3(cls) if _is_v3(cls) else _describe(cls)
        except Exception as exc:
            refused[key] = f"can't describe {cls!r}: {type(exc).__name__}: {exc}"
    return {"nodes": nodes, "display_names": {k: v for k, v in names.items() if k in nodes},
            "refused": refused,
            "python": list(sys.version_info[:3]),
            "comfy_api": "shim" if getattr(sys.modules.get("comfy"), "COMFY_ENV_SHIM", False)
            else "comfyui"}


def warm_up(spec):
    """Import the pack's node modules now, so that the first node run doesn't (pre-start)."""
    _load_pack(spec)
    return os.getpid()


# ---------------------------------------------------------------------------- calls

RESULT_TAG = "comfy-env-node-result"    # call_node's result: (tag, progressed, value)


def call_node(spec, key, method, instance_id, args, kwargs, token=None, context=None,
              hidden=None, graph_prefix=None):
    """Run ``method`` of node ``key`` on the class (instance_id None) or an instance.

    Instances live as long as the host's proxy instance (ComfyUI keeps one node
    object per node id and reuses it), so state kept on ``self`` survives between runs.
    V3 methods (classmethods) are called the way ComfyUI's execution.py calls them:
    on a clone of the class whose ``hidden`` holds the hidden inputs (``hidden``).
    ``context``: the host's (prompt_id, node_id, list_index), set as the executing
    context here too, so ``get_executing_context()`` and the V3 progress API know the node.
    ``graph_prefix``: the host's ``GraphBuilder`` default prefix for this call, set here
    too, so a node that expands into a graph names its nodes as it would in ComfyUI
    (without it every worker counted from ``.0.0.``, and two packs expanding in one
    prompt overwrote each other's nodes).
    """
    classes, _ = _load_pack(spec)
    try:
        cls = classes[key]
    except KeyError:
        raise KeyError(f"pack {spec['package']!r} has no node {key!r}") from None
    v3 = _is_v3(cls)
    _patch_v3_progress()        # V1 nodes may use the V3 progress API too
    if v3:
        clone = cls.PREPARE_CLASS_CLONE({"hidden_inputs": _hidden_inputs(hidden)})
        target = getattr(cls, method).__func__.__get__(clone)
    elif instance_id is None:
        target = getattr(cls, method)
    else:
        obj = _instances.get(instance_id)
        if obj is None:
            obj = _instances[instance_id] = cls()
        target = getattr(obj, method)
    _set_graph_prefix(graph_prefix)
    linked = _link is not None and token is not None
    if linked:
        _link.begin(token)
    try:
        with _executing(context):
            result = target(*args, **kwargs)
            if inspect.isawaitable(result):
                # Async node methods (ComfyUI awaits them): run to completion here,
                # in a context that still knows the executing node.
                result = asyncio.run(_await(result))
        if v3 and method == "execute":
            result = _v3_output(result)
    except BaseException as exc:
        if linked:
            progressed = _link.end(token)
            try:
                # The host waits for the call's "end" only if it reported progress.
                exc._comfy_env_progressed = progressed
            except Exception:
                pass        # an exception that takes no attributes: the host guesses
        raise
    if token is None:
        return result
    return (RESULT_TAG, _link.end(token) if linked else False, result)


def _hidden_inputs(hidden):
    """{Hidden member: value} for PREPARE_CLASS_CLONE from the host's {"UNIQUE_ID": ...}."""
    if not hidden:
        return {}
    try:
        from comfy_api.latest import io
        return {io.Hidden(k): v for k, v in hidden.items()}
    except Exception:
        return dict(hidden)


def _v3_output(result):
    """A V3 execute() result as (args, ui, expand, block_execution) of plain data.

    The same normalization as ComfyUI's EXECUTE_NORMALIZED, done here so that what
    crosses is data (the host builds its own io.NodeOutput): a ``ui`` object becomes its
    ``as_dict()`` (a preview is saved in the worker, as it would be in ComfyUI).
    """
    if result is None:
        return ((), None, None, None)
    if isinstance(result, tuple):
        return (result, None, None, None)
    if isinstance(result, dict):
        r = result.get("result", ())
        return (tuple(r) if r is not None else (), _plain(result.get("ui")),
                result.get("expand"), None)
    if type(result).__name__ == "ExecutionBlocker":
        return ((), None, None, getattr(result, "message", None))
    if hasattr(result, "args") and hasattr(result, "ui"):
        ui = result.ui
        if ui is not None and not isinstance(ui, dict):
            ui = ui.as_dict()
        return (tuple(result.args), _plain(ui), getattr(result, "expand", None),
                getattr(result, "block_execution", None))
    raise TypeError(f"Invalid return type from node: {type(result)}")


def _plain(value):
    """UI data with dict/list/tuple subclasses (e.g. comfy_api's SavedResult) made plain."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _set_graph_prefix(prefix):
    if prefix is None:
        return
    mod = sys.modules.get("comfy_execution.graph_utils")
    if mod is None:
        try:
            import comfy_execution.graph_utils as mod
        except Exception:
            return          # no ComfyUI here (a separate env): node code has no GraphBuilder either
    gb = getattr(mod, "GraphBuilder", None)
    if gb is not None and hasattr(gb, "set_default_prefix"):
        gb.set_default_prefix(*prefix)


class _executing:
    """The host's executing-node context, set in this worker for the call."""

    def __init__(self, context):
        self._cm = None
        if context is not None:
            try:
                from comfy_execution.utils import CurrentNodeContext
            except Exception:
                return      # node code can't ask for it either
            self._cm = CurrentNodeContext(*context)

    def __enter__(self):
        if self._cm is not None:
            self._cm.__enter__()
        return self

    def __exit__(self, *exc):
        if self._cm is not None:
            return self._cm.__exit__(*exc)
        return False


class _ProgressForwarder:
    """Stands in for comfy_execution's progress registry in the worker: the V3 progress
    API (``ComfyAPI.execution.set_progress``) ends in ``update_progress``, which here goes
    to the host like a ProgressBar update with an explicit node id."""

    def update_progress(self, node_id, value, max_value, image=None):
        if _link is not None:
            _link.progress(value, max_value, image, node_id)

    def __getattr__(self, name):
        raise AttributeError(f"comfy-env: the progress registry of a node worker only "
                             f"forwards update_progress() to ComfyUI; {name!r} is not available")


_forwarder = _ProgressForwarder()


def _patch_v3_progress():
    for name in ("comfy_api.latest", "comfy_execution.progress"):
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "get_progress_state", None) is not _get_progress_state:
            mod.get_progress_state = _get_progress_state


def _get_progress_state():
    return _forwarder


async def _await(awaitable):
    return await awaitable


def drop_instance(instance_id):
    """The host's proxy instance is gone: let the node instance go too."""
    _instances.pop(instance_id, None)
