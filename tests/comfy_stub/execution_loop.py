"""Runs nodes the way ComfyUI's execution.py does, without a server or a graph.

Follows comfyanonymous/ComfyUI execution.py (get_input_data,
_async_map_node_over_list, get_output_from_returns/merge_result_data,
validate_inputs, IsChangedCache, the except clauses of execute()) and main.py's
hijack_progress hook, reduced to what node classes can observe.
"""
import inspect
import sys
import traceback

import torch

import comfy.model_management
import comfy.utils
from comfy_execution.utils import CurrentNodeContext, get_executing_context


class ProgressRecorder:
    """A global progress hook shaped like main.py's hijack_progress hook."""

    def __init__(self):
        self.events = []   # (node_id, value, total, preview)

    def __call__(self, value, total, preview_image, prompt_id=None, node_id=None):
        ctx = get_executing_context()
        if node_id is None and ctx is not None:
            node_id = ctx.node_id
        # ComfyUI notices interrupts here: that is how sampling is stopped.
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.events.append((node_id, value, total, preview_image))

    def install(self):
        comfy.utils.set_progress_bar_global_hook(self)
        return self


def get_input_data(class_def, inputs, unique_id="1", prompt=None, extra_data=None):
    """inputs: name -> constant widget value, or ("link", [values...]) for a linked output list."""
    valid_inputs = class_def.INPUT_TYPES()
    data = {}
    for name, value in inputs.items():
        if isinstance(value, tuple) and len(value) == 2 and value[0] == "link":
            data[name] = value[1]
        elif name in valid_inputs.get("required", {}) or name in valid_inputs.get("optional", {}):
            data[name] = [value]
    for name, kind in valid_inputs.get("hidden", {}).items():
        if kind == "PROMPT":
            data[name] = [prompt or {}]
        if kind == "EXTRA_PNGINFO":
            data[name] = [(extra_data or {}).get("extra_pnginfo")]
        if kind == "UNIQUE_ID":
            data[name] = [unique_id]
        if kind == "DYNPROMPT":
            data[name] = [object()]      # a host-only object, like DynamicPrompt
    return data


def map_node_over_list(obj, input_data_all, func, unique_id="1", allow_interrupt=False):
    input_is_list = getattr(obj, "INPUT_IS_LIST", False)
    max_len = max((len(v) for v in input_data_all.values()), default=0)

    def slice_dict(d, i):
        return {k: v[i if len(v) > i else -1] for k, v in d.items()}

    results = []

    def process(inputs, index=None):
        if allow_interrupt:
            # nodes.before_node_execution()
            comfy.model_management.throw_exception_if_processing_interrupted()
        f = getattr(obj, func)
        with CurrentNodeContext("prompt-1", unique_id, index):
            results.append(f(**inputs))

    if input_is_list:
        process(input_data_all, 0)
    elif max_len == 0:
        process({})
    else:
        for i in range(max_len):
            process(slice_dict(input_data_all, i), i)
    return results


def get_output_from_returns(return_values, obj):
    results, uis = [], []
    for r in return_values:
        if isinstance(r, dict):
            if "ui" in r:
                uis.append(r["ui"])
            if "result" in r:
                results.append(r["result"])
        else:
            results.append(r)
    output = []
    if results:
        output_is_list = getattr(obj, "OUTPUT_IS_LIST", [False] * len(results[0]))
        for i, is_list in zip(range(len(results[0])), output_is_list):
            if is_list:
                output.append([x for o in results for x in o[i]])
            else:
                output.append([o[i] for o in results])
    ui = {}
    if uis:
        ui = {k: [y for x in uis for y in x[k]] for k in uis[0].keys()}
    return output, ui


def full_type_name(klass):
    module = klass.__module__
    if module == "builtins":
        return klass.__qualname__
    return module + "." + klass.__qualname__


def execute_node(class_def, inputs, unique_id="1", obj=None, prompt=None, extra_data=None):
    """Execute one node like execution.execute(); returns (status, outputs_or_error, ui).

    status is "success", "pending" (check_lazy_status asked for inputs; the list is
    returned), "interrupted" or "error" (with ComfyUI's error_details dict).
    """
    input_data_all = None
    try:
        with torch.inference_mode():
            input_data_all = get_input_data(class_def, inputs, unique_id, prompt, extra_data)
            if obj is None:
                obj = class_def()
            if getattr(obj, "check_lazy_status", None) is not None:
                needed = map_node_over_list(obj, input_data_all, "check_lazy_status", unique_id, allow_interrupt=True)
                needed = set(sum([r for r in needed if isinstance(r, list)], []))
                missing = [x for x in needed if isinstance(x, str) and (x not in input_data_all or input_data_all[x] == [None])]
                if missing:
                    return "pending", sorted(missing), {}
            returns = map_node_over_list(obj, input_data_all, obj.FUNCTION, unique_id, allow_interrupt=True)
            output, ui = get_output_from_returns(returns, obj)
            return "success", output, ui
    except comfy.model_management.InterruptProcessingException:
        return "interrupted", {"node_id": unique_id}, {}
    except Exception as ex:
        typ, _, tb = sys.exc_info()
        details = {
            "node_id": unique_id,
            "exception_message": str(ex),
            "exception_type": full_type_name(typ),
            "traceback": traceback.format_tb(tb),
            "current_inputs": {k: [str(x) for x in v] for k, v in (input_data_all or {}).items()},
            "exception": ex,
        }
        return "error", details, {}


def validate_node(class_def, inputs, received_types=None):
    """The custom-validation part of execution.validate_inputs; returns a list of error dicts."""
    validate_function = getattr(class_def, "VALIDATE_INPUTS", None)
    if validate_function is None:
        return []
    argspec = inspect.getfullargspec(validate_function)
    fn_inputs = argspec.args
    has_kwargs = argspec.varkw is not None
    input_data_all = get_input_data(class_def, inputs)
    filtered = {k: v for k, v in input_data_all.items() if k in fn_inputs or has_kwargs}
    if "input_types" in fn_inputs:
        filtered["input_types"] = [received_types or {}]
    errors = []
    for r in map_node_over_list(class_def, filtered, "VALIDATE_INPUTS"):
        if r is not True:
            errors.append({"type": "custom_validation_failed", "details": "" if r is False else str(r)})
    return errors


def is_changed(class_def, inputs):
    """IsChangedCache.get: IS_CHANGED over the constant inputs; errors become NaN."""
    if not hasattr(class_def, "IS_CHANGED"):
        return False
    try:
        return map_node_over_list(class_def, get_input_data(class_def, inputs), "IS_CHANGED")
    except Exception:
        return float("nan")
