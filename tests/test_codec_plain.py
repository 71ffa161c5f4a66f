"""Small calls and results skip the cloudpickle Encoder (ipc/codec.py, ``_is_plain``).

The shortcut must change nothing a peer can see: the bytes are those the Encoder
writes, and anything that may hold an array, a tensor, a future or an object of
the user's goes through the Encoder as before.
"""
from __future__ import annotations

import io
from concurrent.futures import Future

import numpy as np
import pytest

import _funcs
from comfy_env.ipc import codec, lifetime, planes  # noqa: F401  (planes: registers the data planes)

LINK = lifetime.Link(lambda msgs: None, name="test")


def encoder_bytes(obj):
    buf = io.BytesIO()
    enc = codec.Encoder(buf, codec.FrameBuilder(LINK), LINK)
    enc.dump(obj)
    assert enc.plain
    return bytes(buf.getbuffer())


def encoded(obj):
    fb = codec.FrameBuilder(LINK)
    fb.encode_part(obj)
    return fb.parts[0]


PLAIN = [
    1, -2**70, 1.5, -0.0, complex(1, 2), "text", b"bytes", None, True,
    (None, (1,), {}),
    ("pkg.mod:fn", (1, "a", [2.0, None]), {"k": (1, 2), "n": {"deep": [1]}}),
    (_funcs.add, (1, 2), {}),             # a function pickled by name
    [list(range(64))],
]


@pytest.mark.parametrize("obj", PLAIN, ids=repr)
def test_plain_objects_take_the_shortcut_and_give_the_encoders_bytes(obj):
    assert codec._is_plain(obj)
    part = encoded(obj)
    assert part.refs is None
    assert bytes(part.data) == encoder_bytes(obj)


def _local():
    return 1


NOT_PLAIN = [
    (None, (np.zeros(1 << 16, np.uint8),), {}),     # an array: a plane's descriptor
    (None, (), {"a": [[[np.zeros(1 << 16)]]]}),
    (None, (Future(),), {}),                        # a future: forwarded
    (lambda: 1, (), {}),                            # pickled by value
    (_local, (), {}),                               # a test module's function: by value? asked
    (None, (object(),), {}),
    (None, (list(range(65)),), {}),                 # too big to check cheaply
    (None, ((((((1,),),),),),), {}),                 # too deep
    (None, (type("Sub", (int,), {})(1),), {}),      # a subclass may carry anything
]


@pytest.mark.parametrize("obj", NOT_PLAIN, ids=lambda o: type(o[1][0]).__name__ if o[1] else repr(o[0])[:20])
def test_anything_else_goes_through_the_encoder(obj):
    if obj[0] is _local:
        # A function cloudpickle pickles by name is plain; one it would pickle by value not.
        from cloudpickle.cloudpickle import _should_pickle_by_reference
        assert codec._is_plain(obj) == _should_pickle_by_reference(_local)
        return
    assert not codec._is_plain(obj)


def test_an_array_deep_in_small_containers_still_travels_by_descriptor():
    fb = codec.FrameBuilder(LINK)
    fb.encode_part((None, ([{"a": (np.arange(1 << 15),)}],), {}))
    try:
        assert fb.parts[0].refs, "the array went inline instead of through its plane"
    finally:
        fb.abort()
