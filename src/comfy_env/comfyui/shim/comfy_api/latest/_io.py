"""Stand-in for ``comfy_api.latest.io`` inside isolated workers: enough to *define* V3 nodes.

A V3 pack imports ``from comfy_api.latest import io`` at module level, so its worker
must have one.  ComfyUI's own (``comfy_api/latest/_io.py``) imports torch, PIL, av and
much of ComfyUI; an isolated env usually has none of that.  This module mirrors the
parts node code touches: the typed inputs/outputs (``io.Int.Input(...)``,
``io.Image.Output()``, ``io.Custom("MY_TYPE")``), ``Schema``, ``Hidden``,
``ComfyNode``, ``NodeOutput``.  Each input renders (``as_dict()``) the same V1 options
as ComfyUI's, because that rendering is what comfy-env sends to the host, where a
real ``io.Schema`` is rebuilt from it (proxy.build_v3_proxy_class).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = ["Schema", "Hidden", "HiddenHolder", "ComfyNode", "NodeOutput", "Custom",
           "Input", "WidgetInput", "Output", "NumberDisplay", "UploadType", "FolderType"]


def prune_dict(d):
    return {k: v for k, v in d.items() if v is not None}


class FolderType(str, Enum):
    input = "input"
    output = "output"
    temp = "temp"


class UploadType(str, Enum):
    image = "image_upload"
    audio = "audio_upload"
    video = "video_upload"
    model = "file_upload"


class NumberDisplay(str, Enum):
    number = "number"
    slider = "slider"
    gradient_slider = "gradientslider"


class ControlAfterGenerate(str, Enum):
    fixed = "fixed"
    increment = "increment"
    decrement = "decrement"
    randomize = "randomize"


# V1 option names of keyword arguments whose V3 name differs (ComfyUI's as_dict()).
_V1_NAME = {"raw_link": "rawLink", "widget_type": "widgetType", "force_input": "forceInput",
            "dynamic_prompts": "dynamicPrompts", "display_mode": "display"}


def _plain(v):
    return v.value if isinstance(v, Enum) else v


class _IO_V3:
    Parent = None

    @property
    def io_type(self):
        return self.Parent.io_type

    def validate(self):
        pass


class Input(_IO_V3):
    """An input; type-specific keywords (min, max, default, multiline, ...) become V1 options."""

    _always = {}            # options ComfyUI renders even when falsy (String's multiline)

    def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None,
                 extra_dict=None, **options):
        self.id = id
        self.display_name = display_name
        self.optional = optional
        self.tooltip = tooltip
        self.lazy = lazy
        self.extra_dict = extra_dict if extra_dict is not None else {}
        self._v1 = {**self._always, **options}
        for k, v in self._v1.items():
            setattr(self, k, v)

    def as_dict(self):
        d = prune_dict({"display_name": self.display_name, "optional": self.optional,
                        "tooltip": self.tooltip, "lazy": self.lazy})
        for k, v in self._v1.items():
            if v is not None:
                d[_V1_NAME.get(k, k)] = _plain(v)
        return d | prune_dict(self.extra_dict)

    def get_io_type(self):
        return self._v1.get("widget_type") or self.io_type

    def get_all(self):
        return [self]


WidgetInput = Input


class _StringInput(Input):
    _always = {"multiline": False}


class _ComboInput(Input):
    def __init__(self, id, options=None, display_name=None, optional=False, tooltip=None,
                 lazy=None, default=None, upload=None, image_folder=None, **kw):
        if isinstance(options, type) and issubclass(options, Enum):
            options = [v.value for v in options]
        extra = {"multiselect": False, "options": options, "default": _plain(default),
                 "image_folder": _plain(image_folder)}
        if upload is not None:
            extra[_plain(upload)] = True
        super().__init__(id, display_name, optional, tooltip, lazy, **extra, **kw)


class _MultiComboInput(_ComboInput):
    def __init__(self, id, options=None, display_name=None, optional=False, tooltip=None,
                 lazy=None, default=None, placeholder=None, chip=None, **kw):
        super().__init__(id, options, display_name, optional, tooltip, lazy, default, **kw)
        self._v1["multiselect"] = True
        self._v1["multi_select"] = prune_dict({"placeholder": placeholder, "chip": chip})


class Output(_IO_V3):
    def __init__(self, id=None, display_name=None, tooltip=None, is_output_list=False, **_kw):
        self.id = id
        self.display_name = display_name if display_name else id
        self.tooltip = tooltip
        self.is_output_list = is_output_list

    def get_io_type(self):
        return self.io_type


def _comfytype(name, io_type, input_cls=Input):
    cls = type(name, (), {"io_type": io_type})
    cls.Input = type("Input", (input_cls,), {"Parent": cls})
    cls.Output = type("Output", (Output,), {"Parent": cls})
    return cls


def Custom(io_type):
    """A type of the node's own (``io.Custom("MY_TYPE")``)."""
    return _comfytype("CustomComfyType", io_type)


# The io types of ComfyUI 0.33's comfy_api.latest.io that carry plain data or tensors.
_TYPES = {
    "Boolean": "BOOLEAN", "Int": "INT", "Float": "FLOAT", "String": "STRING", "Combo": "COMBO",
    "MultiCombo": "COMBO", "Image": "IMAGE", "Mask": "MASK", "Latent": "LATENT",
    "Conditioning": "CONDITIONING", "Sampler": "SAMPLER", "Sigmas": "SIGMAS", "Noise": "NOISE",
    "Guider": "GUIDER", "Clip": "CLIP", "ControlNet": "CONTROL_NET", "Vae": "VAE",
    "Model": "MODEL", "ClipVision": "CLIP_VISION", "ClipVisionOutput": "CLIP_VISION_OUTPUT",
    "StyleModel": "STYLE_MODEL", "UpscaleModel": "UPSCALE_MODEL", "Audio": "AUDIO",
    "Video": "VIDEO", "SVG": "SVG", "Mesh": "MESH", "Voxel": "VOXEL", "Point": "POINT",
    "BBOX": "BBOX", "SEGS": "SEGS", "AnyType": "*", "Dict": "DICT", "Array": "ARRAY",
    "Webcam": "WEBCAM", "Tracks": "TRACKS", "Color": "COLOR", "BoundingBox": "BOUNDING_BOX",
}
_INPUT_CLASSES = {"String": _StringInput, "Combo": _ComboInput, "MultiCombo": _MultiComboInput}
for _name, _io_type in _TYPES.items():
    globals()[_name] = _comfytype(_name, _io_type, _INPUT_CLASSES.get(_name, Input))
__all__ += list(_TYPES)


class Hidden(str, Enum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"
    dynprompt = "DYNPROMPT"
    auth_token_comfy_org = "AUTH_TOKEN_COMFY_ORG"
    api_key_comfy_org = "API_KEY_COMFY_ORG"
    comfy_usage_source = "COMFY_USAGE_SOURCE"


class HiddenHolder:
    def __init__(self, values):
        for h in Hidden:
            setattr(self, h.name, values.get(h, values.get(h.value)))

    def __getattr__(self, key):
        return None


@dataclass
class Schema:
    node_id: str
    display_name: str = None
    category: str = "sd"
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    hidden: list = field(default_factory=list)
    description: str = ""
    search_aliases: list = field(default_factory=list)
    is_input_list: bool = False
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    is_dev_only: bool = False
    is_api_node: bool = False
    price_badge: Any = None
    not_idempotent: bool = False
    enable_expand: bool = False
    accept_all_inputs: bool = False
    essentials_category: str = None
    has_intermediate_output: bool = False

    def validate(self):
        ids = [x.id for i in self.inputs for x in i.get_all()]
        out = [o.id for o in self.outputs]
        if len(set(ids)) != len(ids) or len(set(out)) != len(out):
            raise ValueError(f"node {self.node_id!r}: input ids and output ids must be unique")

    def finalize(self):
        # The same additions as ComfyUI's Schema.finalize().
        self.inputs = self.inputs or []
        self.outputs = self.outputs or []
        self.hidden = self.hidden or []
        if self.is_api_node:
            for h in (Hidden.auth_token_comfy_org, Hidden.api_key_comfy_org,
                      Hidden.comfy_usage_source):
                if h not in self.hidden:
                    self.hidden.append(h)
        if self.is_output_node:
            for h in (Hidden.prompt, Hidden.extra_pnginfo):
                if h not in self.hidden:
                    self.hidden.append(h)
        for i, output in enumerate(self.outputs):
            if output.id is None:
                output.id = f"_{i}_{output.io_type}_"


class NodeOutput:
    def __init__(self, *args, ui=None, expand=None, block_execution=None):
        self.args = args
        self.ui = ui
        self.expand = expand
        self.block_execution = block_execution

    @property
    def result(self):
        return self.args if len(self.args) > 0 else None

    @classmethod
    def from_dict(cls, data):
        return cls(*(data.get("result") or ()), ui=data.get("ui"), expand=data.get("expand"))

    def __getitem__(self, index):
        return self.args[index]


class _ComfyNodeInternal:
    pass


class ComfyNode(_ComfyNodeInternal):
    """Base class of V3 nodes (the worker-side shim: schema and the class methods)."""

    SCHEMA = None
    hidden = None

    @classmethod
    def define_schema(cls):
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs):
        raise NotImplementedError

    @classmethod
    def validate_inputs(cls, **kwargs):
        raise NotImplementedError

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        raise NotImplementedError

    @classmethod
    def check_lazy_status(cls, **kwargs):
        return [name for name in kwargs if kwargs[name] is None]

    @classmethod
    def GET_BASE_CLASS(cls):
        return ComfyNode

    @classmethod
    def GET_SCHEMA(cls):
        schema = cls.define_schema()
        schema.finalize()
        schema.validate()
        cls.SCHEMA = schema
        return schema

    @classmethod
    def PREPARE_CLASS_CLONE(cls, v3_data):
        """A subclass whose ``hidden`` holds this run's hidden inputs (as ComfyUI does)."""
        clone = type(f"{cls.__name__}Clone", (cls,), {})
        clone.hidden = HiddenHolder((v3_data or {}).get("hidden_inputs") or {})
        return clone


def __getattr__(name):
    raise AttributeError(
        f"comfy_api.latest.io.{name} is not available in this worker: it runs comfy-env's shim "
        f"of comfy_api (the node's env can't import ComfyUI's own), which provides the io types "
        f"{', '.join(sorted(_TYPES))}, Custom, Schema, Hidden, ComfyNode and NodeOutput. "
        f"Use a plain io type or io.Custom(...), or run the pack with env=None / "
        f"comfy_api='comfyui' in an env that can import ComfyUI.")
