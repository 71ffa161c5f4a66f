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


@pytest.mark.parametrize("obj", PLAIN + NOT_PLAIN + [(None, (np.zeros(4),), {})],
                         ids=lambda o: repr(o)[:30])
def test_is_plain_call_answers_as_is_plain_of_the_call_with_a_plain_function(obj):
    # The executor asks is_plain_call when the function is known plain (a name, None,
    # or pickled by name): the answer must be is_plain's, INLINE included.
    fn, args, kwargs = obj if type(obj) is tuple and len(obj) == 3 else (None, (obj,), {})
    for known in (None, "pkg.mod:fn", _funcs.add):
        assert codec.is_plain_call(args, kwargs) is codec._is_plain((known, args, kwargs))


def test_an_array_deep_in_small_containers_still_travels_by_descriptor():
    fb = codec.FrameBuilder(LINK)
    fb.encode_part((None, ([{"a": (np.arange(1 << 15),)}],), {}))
    try:
        assert fb.parts[0].refs, "the array went inline instead of through its plane"
    finally:
        fb.abort()


# -- small numpy arrays and scalars: plain parts too (pickled by _InlinePickler) ------------------
INLINE_PLAIN = [
    (None, (np.arange(6, dtype=np.int16).reshape(2, 3),), {}),
    (None, (np.float32(1.5), np.bool_(True), np.complex64(1 + 2j)), {}),
    {"scale": np.float32(0.5), "dtype": np.dtype("float16"), "idx": np.dtype("int32")},
    (None, (), {"img": np.ones((4, 4, 3), np.uint8), "n": 3}),
    [np.zeros(0), np.ones(3)[::2], np.asfortranarray(np.ones((2, 3)))],
]


@pytest.mark.parametrize("obj", INLINE_PLAIN, ids=lambda o: repr(o)[:30])
def test_small_arrays_keep_a_part_plain_and_load_with_pickle_alone(obj):
    assert codec._is_plain(obj) is codec.INLINE
    part = encoded(obj)
    assert part.refs is None                          # decoded by pickle.loads, no Decoder
    data = bytes(part.data)
    # numpy's own pickle names numpy._core (numpy 2) or numpy.core (numpy 1): never used.
    assert b"numpy._core" not in data and b"numpy.core" not in data and b"multiarray" not in data
    got = codec.pickle.loads(data)
    flat = lambda o: [o] if not isinstance(o, (list, tuple, dict)) else [  # noqa: E731
        y for x in (o.values() if isinstance(o, dict) else o) for y in flat(x)]
    for a, b in zip(flat(obj), flat(got)):
        assert type(a) is type(b)
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and a.shape == b.shape and (a == b).all()
            assert b.flags.writeable
            if a.flags.f_contiguous and not a.flags.c_contiguous:
                assert b.flags.f_contiguous           # F order kept, as the Encoder's inline route does
        else:
            assert a == b


def test_inline_plain_keeps_identity_and_the_writeable_flag():
    a = np.arange(4.0)
    ro = np.ones(3)
    ro.flags.writeable = False
    got = codec.pickle.loads(bytes(encoded([a, a, ro]).data))
    assert got[0] is got[1] and (got[0] == a).all() and got[0].base is not a
    assert got[0].flags.writeable and not got[2].flags.writeable
    got[0][0] = 9                                     # a private copy
    assert a[0] == 0


@pytest.mark.parametrize("obj", [
    np.zeros(1 << 16, np.uint8),                      # at INLINE_BYTES: a shared segment
    np.array([object()], dtype=object),               # object dtype: numpy's pickle
    np.array(["ab"]),                                 # a flexible dtype: the Encoder's descriptor
    np.datetime64("2020-01-01"),
    np.ma.array([1, 2], mask=[0, 1]),                 # a subclass
    np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8")]),  # a structured dtype
], ids=lambda o: f"{type(o).__name__}-{getattr(o, 'dtype', '')}")
def test_other_numpy_objects_still_go_through_the_encoder(obj):
    assert not codec._is_plain(obj) and not codec._is_plain((None, (obj,), {}))


def test_a_small_array_round_trips_through_a_worker_as_a_plain_result():
    from comfy_env import IsolatedExecutor
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    with IsolatedExecutor(max_workers=1) as ex:
        got = ex.submit(_funcs.echo, a, s=np.int64(7)).result(timeout=60)
    args, kwargs = got
    assert type(args[0]) is np.ndarray and args[0].dtype == np.float32 and (args[0] == a).all()
    assert type(kwargs["s"]) is np.int64 and kwargs["s"] == 7


_SMALL_ARRAYS_SCRIPT = r"""
import numpy as np
from comfy_env import IsolatedExecutor

def echo(*args, **kwargs):
    return args, kwargs

if __name__ == "__main__":
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    ro = np.ones(2)
    ro.flags.writeable = False
    with IsolatedExecutor(max_workers=1) as ex:
        (x, y, z), kw = ex.submit(echo, a, a, ro, s=np.int64(7), f=np.asfortranarray(a)).result(timeout=60)
    assert type(x) is np.ndarray and x.dtype == np.float32 and (x == a).all() and x is y
    assert not z.flags.writeable and (z == 1).all()
    assert type(kw["s"]) is np.int64 and kw["s"] == 7
    assert kw["f"].flags.f_contiguous and (kw["f"] == a).all()
    print("ok")
"""


from pythons import ALL_PYTHONS, run_script  # noqa: E402


@ALL_PYTHONS
@pytest.mark.timeout(300)
def test_small_arrays_cross_as_plain_parts_on_every_python(pyver, tmp_path):
    proc = run_script(pyver, _SMALL_ARRAYS_SCRIPT, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


def test_a_failure_writing_an_inline_array_is_a_pickling_error_naming_the_argument(monkeypatch):
    from comfy_env import IsolatedExecutor, PicklingFailed
    from comfy_env.ipc import arrays

    def boom(self, obj):
        raise ValueError("cannot write this array")

    with IsolatedExecutor(max_workers=1) as ex:
        monkeypatch.setattr(arrays.NumpyPlane, "reduce_portable", boom)
        with pytest.raises(PicklingFailed, match=r"argument 1 \(ndarray\).*cannot write this array"):
            ex.submit(_funcs.echo, 1, np.ones(4)).result(timeout=60)
        monkeypatch.undo()
        assert ex.submit(_funcs.add, 1, 2).result(timeout=60) == 3      # the pool goes on


# -- what pickle writes by name, and what must not cross -----------------------------------

def _open_text(path):
    return open(path)


@pytest.mark.timeout(60)
def test_an_open_text_file_is_refused_both_ways_naming_what(tmp_path):
    """cloudpickle would send a snapshot of the file as a StringIO; pickle (and
    ProcessPoolExecutor) refuse it: so do we, saying which value and what to pass."""
    from comfy_env import IsolatedExecutor, PicklingFailed
    p = tmp_path / "f.txt"
    p.write_text("line1\nline2\n")
    with open(p) as fh, IsolatedExecutor() as ex:
        with pytest.raises(PicklingFailed, match=r"argument 0 \(TextIOWrapper\).*open file.*pass its path"):
            ex.submit(_funcs.echo, fh).result(timeout=30)
        with pytest.raises(PicklingFailed, match=r"result of the call \(TextIOWrapper\).*open file"):
            ex.submit(_open_text, str(p)).result(timeout=30)
        assert ex.submit(_funcs.echo, 1).result(timeout=30) == ((1,), {})


def test_a_scripts_lru_cache_function_pickles_by_value_and_an_importable_one_by_name():
    import functools
    import pickle

    ns = {"__name__": "__main__"}
    exec("import functools\n@functools.lru_cache(maxsize=8, typed=True)\ndef f(x):\n    return x * 2\n", ns)
    fn, args = codec._reduce_lru_cache(ns["f"])
    assert fn is codec._rebuild_lru_cache and args[1:] == (8, True)
    back = fn(*args)
    assert back(21) == 42 and back.cache_parameters() == {"maxsize": 8, "typed": True}
    # An importable one stays by name, as pickle writes it.
    assert codec._reduce_lru_cache(functools.lru_cache(_funcs.echo)) == "echo"
    assert pickle.loads(pickle.dumps(codec._reduce_lru_cache)) is codec._reduce_lru_cache
