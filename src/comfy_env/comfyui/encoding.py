"""Tagged JSON for node metadata: keeps the tuple/list distinction ComfyUI relies on.

ComfyUI tells a combo widget from other inputs by ``isinstance(spec[0], list)`` and
expects ``RETURN_TYPES`` to be a tuple, so plain JSON (which turns tuples into
lists) would change behaviour.  The encoding is plain JSON with three tags:

    {"__tuple__": [...]}          a tuple
    {"__dict__": [[k, v], ...]}   a dict whose keys are not all str (or that would
                                  look like a tag)
    {"__pickle__": "base64"}      anything else (e.g. an enum used as a default);
                                  decoded with pickle on the host, or, when the host
                                  can't import its type, replaced by its plain value
                                  (``__plain__``: a str, int or float subclass, such as
                                  the popular ``AnyType(str)`` wildcard, as that base
                                  type) or else its repr.

Metadata is encoded in the worker (where node classes live) and decoded on the
host, and the same text is what the metadata cache stores.
"""
from __future__ import annotations

import base64
import logging
import pickle

__all__ = ["encode", "decode"]

_TAGS = ("__tuple__", "__dict__", "__pickle__", "__repr__", "__plain__")
_log = logging.getLogger(__name__)


def encode(value):
    """Turn a metadata value into JSON-compatible data (see module docstring)."""
    if value is None or type(value) in (bool, int, float, str):
        return value        # exact types: an IntEnum or str subclass must stay what it is
    if isinstance(value, tuple) and type(value) is tuple:
        return {"__tuple__": [encode(v) for v in value]}
    if isinstance(value, list) and type(value) is list:
        return [encode(v) for v in value]
    if isinstance(value, dict) and type(value) is dict:
        plain = all(isinstance(k, str) for k in value) and not (
            len(value) == 1 and next(iter(value)) in _TAGS)
        if plain:
            return {k: encode(v) for k, v in value.items()}
        return {"__dict__": [[encode(k), encode(v)] for k, v in value.items()]}
    try:
        out = {"__pickle__": base64.b64encode(pickle.dumps(value)).decode("ascii"),
               "__repr__": repr(value)}
    except Exception:
        out = None
    plain = _plain(value)
    if out is not None:
        if plain is not None:
            out["__plain__"] = plain
        return out
    if plain is not None:
        return plain
    # Not picklable: the host gets the text, which is what the UI would show anyway.
    return repr(value)


def decode(data):
    """Inverse of :func:`encode`."""
    if isinstance(data, list):
        return [decode(v) for v in data]
    if isinstance(data, dict):
        if len(data) == 1 and "__tuple__" in data:
            return tuple(decode(v) for v in data["__tuple__"])
        if len(data) == 1 and "__dict__" in data:
            return {_hashable(decode(k)): decode(v) for k, v in data["__dict__"]}
        if "__pickle__" in data and set(data) <= {"__pickle__", "__repr__", "__plain__"}:
            try:
                return pickle.loads(base64.b64decode(data["__pickle__"]))
            except Exception as exc:
                if "__plain__" in data:
                    return data["__plain__"]
                _log.warning("comfy-env: metadata value %s can't be rebuilt on the host (%s); "
                             "using its text", data.get("__repr__"), exc)
                return data.get("__repr__", "?")
        return {k: decode(v) for k, v in data.items()}
    return data


def _plain(value):
    """A str, int or float subclass's value as that base type (None for anything else)."""
    for base in (str, int, float):
        if isinstance(value, base) and not isinstance(value, bool):
            return base(value) if base is not str else str.__str__(value)
    return None


def _hashable(key):
    # JSON has no tuples; a decoded list key was a tuple or another sequence.
    return tuple(key) if isinstance(key, list) else key
