"""The CPU data plane through a real executor: exact round trips, zero copy, containers, trimesh.

Arrays below ``arrays.INLINE_BYTES`` are pickled inline, so most arrays here are bigger;
the ``all_plane`` executor lowers the threshold to 0 (parent and worker) so that even
0-d and empty arrays travel as shared-memory descriptors.

Worker-side helpers live in ``_dataplane_funcs`` (imported by reference in the workers).
"""
from __future__ import annotations

import collections
import dataclasses
import gc
import pickle
import threading
import time
import warnings

import numpy as np
import pytest

import _dataplane_funcs as F
from comfy_env import IsolatedExecutor, shared_empty, shared_like
from comfy_env.ipc import arrays, codec, lifetime, shm

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental"),
              pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")]

BIG = 1 << 17      # elements: every dtype here is >= INLINE_BYTES at this count (1-byte ones: 128 KiB)


# -- helpers (parent side) ------------------------------------------------------------------

_settle = F.settle


def _ledger_keys():
    return {r.key for r in lifetime.LEDGER.records()}


def _addr(x):
    if isinstance(x, torch.Tensor):
        return x.data_ptr(), x.numel() * x.element_size()
    return x.__array_interface__["data"][0], x.nbytes


def in_segment(x):
    addr, n = _addr(x)
    return shm.find_segment(addr, max(n, 1)) is not None


def assert_same_array(got, want, strides=True):
    """Exact equality: type, dtype, shape, (strides), writeable flag, bytes (NaN-safe)."""
    assert type(got) is type(want), (type(got), type(want))
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.shape == want.shape
    if strides:
        assert got.strides == want.strides, (got.strides, want.strides)
    assert got.flags.writeable == want.flags.writeable
    if want.dtype.hasobject:
        assert got.tolist() == want.tolist()
    else:
        assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(want).tobytes()


def assert_same_tensor(got, want, strides=True):
    assert type(got) is type(want), (type(got), type(want))
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    if strides:
        assert got.stride() == want.stride(), (got.stride(), want.stride())
        assert got.storage_offset() == want.storage_offset(), \
            (got.storage_offset(), want.storage_offset())
    assert got.requires_grad == want.requires_grad
    assert got.grad_fn is None            # data only: no autograd graph travels
    assert got.device.type == "cpu"
    assert _tensor_bytes(got) == _tensor_bytes(want)


def _tensor_bytes(t):
    t = t.detach().contiguous()
    if t.dim() == 0:
        t = t.reshape(1)
    return bytes(t.view(torch.uint8).numpy()) if t.numel() else b""


@pytest.fixture(scope="module")
def ex():
    with IsolatedExecutor(max_workers=1, name="dataplane") as e:
        e.submit(F.warm).result(timeout=60)
        yield e


@pytest.fixture(scope="module")
def _all_plane_executor():
    """An executor whose worker sends every array through shared memory."""
    mp = pytest.MonkeyPatch()
    mp.setenv("COMFY_ENV_INLINE_BYTES", "0")       # read by the worker when it starts
    try:
        e = IsolatedExecutor(max_workers=1, name="all-plane")
        e.submit(F.warm).result(timeout=60)
    finally:
        mp.undo()
    with e:
        assert e.submit(F.inline_bytes).result(timeout=30) == 0
        yield e


@pytest.fixture
def all_plane(_all_plane_executor, monkeypatch):
    """... and the parent too, for the duration of one test."""
    monkeypatch.setattr(arrays, "INLINE_BYTES", 0)
    return _all_plane_executor


# -- dtypes --------------------------------------------------------------------------------

NUMPY_DTYPES = [
    "?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8",
    "f2", "f4", "f8", np.longdouble, "c8", "c16", np.clongdouble,
    ">i4", ">f8", "<u2", ">c16",                                   # byte order is part of the dtype
    "M8[ns]", "M8[D]", "M8[s]", "m8[us]", "m8[h]",
    "S7", "U3", "V12",
    np.dtype([("x", "f4"), ("y", "i2"), ("tag", "S3")]),            # packed structured
    np.dtype([("x", "f4"), ("y", "i2"), ("tag", "S3")], align=True),
    np.dtype([("pos", "f8", (3,)), ("id", ">u4")]),                # sub-array field, big endian
    np.dtype({"names": ["a", "b"], "formats": ["u1", "f8"], "offsets": [0, 16], "itemsize": 32}),
]


def _np_sample(dtype, n=BIG, seed=0):
    """``n`` elements of ``dtype`` with random bytes (valid bools, NaT/NaN patterns included)."""
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, n * dtype.itemsize, dtype=np.uint8)
    a = raw.view(dtype)         # no .copy(): a copy may leave struct padding uninitialised
    if dtype.kind == "b":
        a = (raw[:n] & 1).astype(bool)
    elif dtype.kind == "U":
        a = np.array(["".join(chr(0x41 + (int(b) + j) % 40) for j in range(3)) for b in raw[:n]],
                     dtype=dtype)
    return a


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", NUMPY_DTYPES, ids=lambda d: np.dtype(d).str
                         if np.dtype(d).names is None else "struct-" + str(np.dtype(d).itemsize))
def test_numpy_dtypes_round_trip_exactly_both_ways(ex, dtype):
    a = _np_sample(dtype)
    assert a.nbytes >= arrays.INLINE_BYTES
    # parent -> worker -> parent: the worker sees the same bytes, the echo is exact
    back = ex.submit(F.echo_and_hash, a).result(timeout=30)
    got, h, desc = back
    assert desc[0] == "numpy" and desc[8], desc           # numpy, and in a segment in the worker
    assert h == F.checksum(a)
    assert_same_array(got, a)
    assert in_segment(got)
    # worker -> parent: a fresh array of the worker's, copied once into its segment
    fresh = ex.submit(F.sample, np.dtype(dtype)).result(timeout=30)
    assert_same_array(fresh, a)
    assert in_segment(fresh)


_SUB_BYTE = {f"{p}{i}" for p in ("int", "uint") for i in range(1, 8)}


def _torch_dtypes():
    out = []
    for d in sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str):
        name = str(d).split(".")[1]
        if name.startswith("q") or name in _SUB_BYTE:
            continue        # quantized and sub-byte placeholders: no kernels to build them with
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")            # "ComplexHalf is experimental"
                _torch_sample(d, 16).clone()
        except Exception:
            continue
        out.append(d)
    return out


def _torch_sample(dtype, n=BIG, seed=0):
    item = torch.empty((), dtype=dtype).element_size()
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n * item,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        return (raw[:n] & 1).bool()
    return raw.view(dtype)


TORCH_DTYPES = _torch_dtypes()


def test_torch_dtype_list_covers_the_usual_ones():
    names = {str(d) for d in TORCH_DTYPES}
    for want in ("bool", "uint8", "int8", "int16", "int32", "int64", "float16", "bfloat16",
                 "float32", "float64", "complex64", "complex128", "uint16", "uint32", "uint64",
                 "float8_e4m3fn", "float8_e5m2"):
        assert f"torch.{want}" in names


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=lambda d: str(d).split(".")[1])
def test_torch_dtypes_round_trip_exactly_both_ways(ex, dtype):
    t = _torch_sample(dtype)
    got, h, desc = ex.submit(F.echo_and_hash, t).result(timeout=30)
    assert desc[0] == "torch" and desc[2] == str(dtype) and desc[-1], desc
    assert h == F.checksum(t)
    assert_same_tensor(got, t)
    assert in_segment(got)
    fresh = ex.submit(F.torch_sample, str(dtype).split(".")[1]).result(timeout=30)
    assert_same_tensor(fresh, t)
    assert in_segment(fresh)


# -- views ------------------------------------------------------------------------------------

# Recipes applied to x = arange(...).reshape(R, C) (and to a Fortran copy of it).
NP_VIEWS = [
    "x", "x[1:]", "x[:, ::2]", "x.T", "x[::-1]", "x[:, ::-1]", "x[3:-3, 5:-7]", "x[::3]",
    "x[:, 7]", "x[5]", "x.reshape(-1)[3:]", "x[None, :, None]", "x.T[::2]",
    "np.asfortranarray(x)", "np.asfortranarray(x)[1:]", "np.asfortranarray(x)[:, 2:]",
    "np.lib.stride_tricks.as_strided(x, shape=(x.shape[0] - 1, 2, x.shape[1]), "
    "strides=(x.strides[0], x.strides[0], x.strides[1]))",        # overlapping rows
    "x.view(np.uint8)[:, 3:-5]",                                   # unaligned start
    "x[:, :1]",                                                    # sparse: compacted
    "np.broadcast_to(x[0], (4000, x.shape[1]))",                   # zero strides, read-only
]


def _np_base(dtype="f8", rows=512, cols=96):
    return np.arange(rows * cols, dtype=dtype).reshape(rows, cols)


def _strides_kept(v):
    """Views whose span is at most twice their bytes keep their strides (the plane's rule)."""
    ptr = v.__array_interface__["data"][0]
    lo, hi = arrays._span(ptr, v.shape, v.strides, v.itemsize)
    return hi - lo <= arrays._SPAN_SLACK * v.nbytes


@pytest.mark.timeout(60)
@pytest.mark.parametrize("recipe", NP_VIEWS)
def test_numpy_views_keep_shape_strides_and_flags_both_ways(ex, recipe):
    x = _np_base()
    v = eval(recipe, {"np": np, "x": x})
    if v.nbytes < arrays.INLINE_BYTES:
        x = _np_base(rows=4096)
        v = eval(recipe, {"np": np, "x": x})
    keep = _strides_kept(v)
    got, h, desc = ex.submit(F.echo_and_hash, v).result(timeout=30)
    assert h == F.checksum(v)
    assert_same_array(got, v, strides=keep)
    if not keep:
        assert got.flags.c_contiguous or got.flags.f_contiguous
    assert desc[2:5] == (v.dtype.str, v.shape, v.strides if keep else desc[4])
    # The worker builds the same view on its own array and sends it: same layout back.
    fresh = ex.submit(F.view_of_fresh, x.shape, x.dtype.str, recipe).result(timeout=30)
    assert_same_array(fresh, v, strides=keep)
    # Read-only views stay read-only, both ways.
    ro = v.view()
    ro.flags.writeable = False
    got, _, desc = ex.submit(F.echo_and_hash, ro).result(timeout=30)
    assert desc[5] is False
    assert_same_array(got, ro, strides=keep)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("recipe", ["x", "x[0, 0]", "x[:0]", "x[:, :0]", "x[::-1]", "x[2:, ::2].T",
                                    "np.asfortranarray(x)", "x[1:].view(np.complex128)"])
def test_tiny_zero_d_and_empty_arrays_through_the_plane(all_plane, recipe):
    x = _np_base(rows=6, cols=8)
    v = eval(recipe, {"np": np, "x": x})
    v = v if isinstance(v, np.ndarray) else np.asarray(v)
    got, h, desc = all_plane.submit(F.echo_and_hash, v).result(timeout=30)
    assert desc[8], desc                     # it did go through a segment
    assert h == F.checksum(v)
    assert_same_array(got, v)
    fresh = all_plane.submit(F.view_of_fresh, x.shape, x.dtype.str, recipe).result(timeout=30)
    assert_same_array(np.asarray(fresh), v)


@pytest.mark.timeout(60)
def test_zero_d_array_of_a_big_dtype_goes_through_the_plane(ex):
    dt = np.dtype([("blob", "f8", (20000,))])
    z = np.zeros((), dt)
    z["blob"] = np.arange(20000)
    got, h, desc = ex.submit(F.echo_and_hash, z).result(timeout=30)
    assert desc[8] and desc[3] == ()
    assert_same_array(got, z)


@pytest.mark.timeout(60)
def test_object_arrays_and_subclasses_keep_their_own_path(ex):
    obj = np.array([{"a": 1}, None, "s", 3.5] * 5000, dtype=object)
    got = ex.submit(F.echo, obj).result(timeout=30)
    assert got.dtype == object and got.tolist() == obj.tolist()
    m = np.ma.masked_array(np.arange(20000.0), mask=np.arange(20000) % 3 == 0)
    gm = ex.submit(F.echo, m).result(timeout=30)
    assert type(gm) is np.ma.MaskedArray
    assert (gm.mask == m.mask).all() and (gm.data == m.data).all()
    mat = np.asmatrix(np.arange(40000.0).reshape(200, 200))
    gmat = ex.submit(F.echo, mat).result(timeout=30)
    assert type(gmat) is np.matrix and (gmat == mat).all()


TORCH_VIEWS = ["x", "x[1:]", "x[:, ::2]", "x.t()", "x[3:-3, 5:-7]", "x[:, 7]", "x[5]",
               "x.reshape(-1)[3:]", "x.unsqueeze(0)[:, 1:]", "x.t()[::2]", "x[::3]",
               "x.as_strided((x.shape[0] - 1, 2, x.shape[1]), (x.stride(0), x.stride(0), 1))",
               "x.view(torch.uint8)[:, 3:-5]", "x[-2:]", "x.permute(1, 0)[2:]",
               "x[0].expand(4000, x.shape[1])", "x[:, :1]"]


def _torch_strides_kept(v):
    item = v.element_size()
    lo, hi = arrays._span(v.data_ptr(), v.shape, [s * item for s in v.stride()], item)
    return hi - lo <= arrays._SPAN_SLACK * v.numel() * item


def _offset_kept(v):
    """Storage offsets survive when the skipped prefix costs at most the data again."""
    return v.storage_offset() * v.element_size() <= v.numel() * v.element_size()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("recipe", TORCH_VIEWS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_views_keep_strides_and_storage_offset_both_ways(ex, recipe, dtype):
    x = torch.arange(512 * 96, dtype=torch.float64).reshape(512, 96).to(getattr(torch, dtype))
    v = eval(recipe, {"torch": torch, "x": x})
    inline = v.numel() * v.element_size() < arrays.INLINE_BYTES      # arrives compacted
    keep = not inline and _torch_strides_kept(v)
    keep_off = keep and _offset_kept(v)
    got, h, desc = ex.submit(F.echo_and_hash, v).result(timeout=30)
    assert h == F.checksum(v)
    fresh = ex.submit(F.torch_view_of_fresh, tuple(x.shape), dtype, recipe).result(timeout=30)
    for t in (got, fresh):
        assert_same_tensor(t, v, strides=False)
        if inline:
            assert t.is_contiguous() and t.storage_offset() == 0 and not in_segment(t)
        if keep:
            assert t.stride() == v.stride()
        if keep_off:
            assert t.storage_offset() == v.storage_offset()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("n", [10, 100_000])
def test_torch_lazy_conjugate_and_negative_views_arrive_resolved(ex, n):
    z = torch.randn(n, dtype=torch.complex64)
    for v in (z.conj(), z.conj()[1:], torch._neg_view(z.real), z.conj().imag):
        assert v.is_conj() or v.is_neg()
        got = ex.submit(F.echo, v).result(timeout=30)
        assert torch.equal(got, v)
        assert not got.is_conj() and not got.is_neg()           # resolved, inline or not
        assert in_segment(got) == (n > 1000)
        assert ex.submit(F.checksum, v).result(timeout=30) == F.checksum(v.resolve_conj().resolve_neg())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("recipe", ["x", "x[0, 0]", "x[:0]", "x[:, :0]", "x[2:, ::2].t()",
                                    "x[1:]", "x[0].expand(5, 8)"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "bool"])
def test_torch_tiny_zero_d_and_empty_tensors_through_the_plane(all_plane, recipe, dtype):
    x = torch.arange(48, dtype=torch.float64).reshape(6, 8).to(getattr(torch, dtype))
    v = eval(recipe, {"torch": torch, "x": x})
    got, h, desc = all_plane.submit(F.echo_and_hash, v).result(timeout=30)
    assert desc[-1] or v.numel() == 0, desc  # through a segment (empty: data_ptr() is 0)
    assert h == F.checksum(v)
    assert_same_tensor(got, v)
    fresh = all_plane.submit(F.torch_view_of_fresh, (6, 8), dtype, recipe).result(timeout=30)
    assert_same_tensor(fresh, v)


@pytest.mark.timeout(60)
def test_small_arrays_go_inline_and_skip_the_arena(ex):
    before, wbefore = _arena_counts(), ex.submit(F.arena_counts).result(timeout=30)
    small = np.arange(arrays.INLINE_BYTES // 8 - 1, dtype=np.float64)
    got, _, desc = ex.submit(F.echo_and_hash, small).result(timeout=30)
    assert desc[8] is False and not in_segment(got) and np.array_equal(got, small)
    t = torch.arange(1000.0)
    assert not in_segment(ex.submit(F.echo, t).result(timeout=30))
    assert _arena_counts() == before
    assert ex.submit(F.arena_counts).result(timeout=30) == wbefore
    # ... and a read-only small array stays read-only
    small.flags.writeable = False
    got = ex.submit(F.echo, [small, small]).result(timeout=30)
    assert got[0].flags.writeable is False and got[0] is got[1]


# -- small torch tensors: inline, as raw bytes --------------------------------------------------

def assert_owned_compact(t):
    """A received small tensor: C-contiguous at offset 0 of a storage of its own that torch
    allocated (resizable: no view of the frame's bytes or of a peer's memory), writable.

    Check it before anything calls ``.numpy()`` on ``t``: that makes the storage unresizable."""
    s = t.untyped_storage()
    assert t.is_contiguous() and t.storage_offset() == 0
    assert s.nbytes() == t.numel() * t.element_size() and s.resizable()
    assert not in_segment(t)
    u = t.detach().reshape(-1).view(torch.uint8)
    before = u.clone()
    u.fill_(7)
    assert bool((u == 7).all())
    u.copy_(before)


def _small_traits(t):
    """What tensor_traits reports for ``t`` received inline."""
    return (True, 0, t.numel() * t.element_size(), True, True, False)


def _loopback(obj):
    """Encode ``obj`` as a message and decode it in this process: (part refs, object)."""
    link = lifetime.Link(lambda msgs: None, name="loopback")
    _fb, chunks = codec.encode_message(("result", 1, True), link, [obj])
    frame = codec.decode_envelope(b"".join(bytes(c) for c in chunks), [])
    return frame.parts[0].refs, codec.decode_part(frame, 0, link)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=lambda d: str(d).split(".")[1])
def test_small_torch_tensors_of_every_dtype_travel_inline_both_ways(ex, dtype):
    t = _torch_sample(dtype, 16)
    assert t.numel() * t.element_size() < arrays.INLINE_BYTES
    got, h, desc = ex.submit(F.echo_and_hash, t).result(timeout=30)
    assert h == F.checksum(t)
    assert desc[-1] is False                       # inline: not in a segment, in the worker either
    assert ex.submit(F.tensor_traits, t).result(timeout=30) == _small_traits(t)
    assert_owned_compact(got)
    assert_same_tensor(got, t)
    fresh = ex.submit(F.torch_sample, str(dtype).split(".")[1], 16).result(timeout=30)
    assert_owned_compact(fresh)
    assert_same_tensor(fresh, t)


SMALL_TORCH_VIEWS = ["x", "x[0, 0]", "x[:0]", "x[:, :0]", "x[2:, ::2].t()", "x[1:]", "x.t()",
                     "x[:, 3]", "x[0].expand(5, 8)", "x.unsqueeze(1)[::2]"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("recipe", SMALL_TORCH_VIEWS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "bool", "complex64", "uint16"])
def test_small_torch_views_zero_d_and_empty_arrive_compact_both_ways(ex, recipe, dtype):
    x = torch.arange(48, dtype=torch.float64).reshape(6, 8).to(getattr(torch, dtype))
    v = eval(recipe, {"torch": torch, "x": x})
    got, h, desc = ex.submit(F.echo_and_hash, v).result(timeout=30)
    assert h == F.checksum(v) and desc[-1] is False
    assert ex.submit(F.tensor_traits, v).result(timeout=30) == _small_traits(v)
    assert_owned_compact(got)
    assert_same_tensor(got, v, strides=False)      # values, dtype and shape; compacted
    assert torch.equal(got, v)
    fresh = ex.submit(F.torch_view_of_fresh, (6, 8), dtype, recipe).result(timeout=30)
    assert_owned_compact(fresh)
    assert_same_tensor(fresh, v, strides=False)


@pytest.mark.timeout(60)
def test_small_torch_requires_grad_and_parameters_travel_like_big_ones(ex):
    leaf = torch.arange(6.0).reshape(2, 3).requires_grad_(True)
    sent = [leaf, leaf * 2, leaf.t(), torch.nn.Parameter(torch.ones(3, 2)),
            torch.nn.Parameter(torch.ones(3), requires_grad=False),
            torch.nn.Parameter(torch.ones(4, 4)[:, ::2]),          # non-contiguous Parameter
            torch.nn.Parameter(torch.randn(3, dtype=torch.complex64).conj())]

    def check(got, want):
        assert type(got) is type(want), (type(got), type(want))
        assert got.requires_grad == want.requires_grad
        assert got.is_leaf and got.grad_fn is None           # data only: no graph travels
        assert torch.equal(got.detach(), want.detach())
        assert_owned_compact(got)

    for got, want in zip(ex.submit(F.echo, sent).result(timeout=30), sent):
        check(got, want)
    # The big path gives the same types and flags.
    for t in sent:
        big = t.detach().repeat_interleave(10_000)
        big = torch.nn.Parameter(big, requires_grad=t.requires_grad) if type(t) is not torch.Tensor \
            else big.requires_grad_(t.requires_grad)
        gb = ex.submit(F.echo, big).result(timeout=30)
        assert in_segment(gb) and type(gb) is type(t) and gb.requires_grad == t.requires_grad
    # ... and the worker's own small tensors.
    fresh = ex.submit(F.small_tensors).result(timeout=30)
    for (name, got), (_, want) in zip(fresh, F.small_tensors()):
        check(got, want)
        assert got.dtype == want.dtype and got.shape == want.shape, name


@pytest.mark.timeout(60)
def test_small_torch_tensors_keep_identity_and_share_nothing(ex):
    t = torch.arange(10.0)
    got = ex.submit(F.echo, [t, t, t[2:]]).result(timeout=30)
    assert got[0] is got[1]                        # one tensor sent twice arrives as one
    assert torch.equal(got[0], t) and torch.equal(got[2], t[2:])
    a, b = got[0].untyped_storage(), got[2].untyped_storage()
    assert a.data_ptr() != b.data_ptr()
    got[2].zero_()
    assert torch.equal(got[0], t)                  # the view arrived as a copy of its own


def test_small_torch_tensors_do_not_go_through_torch_save(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.save called to send a small tensor")

    monkeypatch.setattr(torch, "save", refuse)
    z = torch.randn(5, dtype=torch.complex64)
    for t in (torch.ones(4), torch.arange(24, dtype=torch.int16).reshape(4, 6)[:, 1::2],
              torch.tensor(1.5, dtype=torch.bfloat16), torch.empty(0, 3, dtype=torch.bool),
              torch.ones(3).to(torch.float8_e4m3fn), z.conj(), torch._neg_view(z.real),
              torch.nn.Parameter(torch.ones(2, 2)), torch.ones(3, requires_grad=True) * 2):
        refs, got = _loopback(t)
        assert refs == []                          # a descriptor, and no shared-memory block
        assert type(got) is type(t) and got.requires_grad == t.requires_grad
        assert got.dtype == t.dtype and got.shape == t.shape
        assert torch.equal(got.detach(), t.detach().resolve_conj().resolve_neg())
        assert_owned_compact(got)


class _TaggedTensor(torch.Tensor):
    pass


class _TaggedParameter(torch.nn.Parameter):
    pass


class GGMLLike(torch.Tensor):
    """The shape of ComfyUI-GGUF's quantized weight: attributes, and a ``shape`` that is not
    its data's (the dequantized one)."""

    def __new__(cls, data, tensor_type=None, tensor_shape=None):
        t = torch.Tensor._make_subclass(cls, data, False)
        t.tensor_type, t.tensor_shape = tensor_type, tensor_shape
        return t

    @property
    def shape(self):
        return self.tensor_shape


class Params4bitLike(torch.nn.Parameter):
    """The shape of bitsandbytes' Params4bit: a Parameter subclass with attributes."""

    def __new__(cls, data, blocksize=64, requires_grad=False):
        p = torch.nn.Parameter._make_subclass(cls, data, requires_grad)
        p.blocksize = blocksize
        return p


class StatefulTensor(torch.Tensor):
    """A subclass with its own __getstate__/__setstate__ (torch's rebuild calls them)."""

    def __getstate__(self):
        return {"packed": self.__dict__.get("note", "")[::-1]}

    def __setstate__(self, state):
        self.note = state["packed"][::-1]
        self.restored = True


class Wrapped(torch.Tensor):
    """A wrapper subclass (``_make_wrapper_subclass``: no storage of its own) with a
    ``__torch_dispatch__`` and its own reduce."""

    @staticmethod
    def __new__(cls, elem):
        r = torch.Tensor._make_wrapper_subclass(cls, elem.shape, dtype=elem.dtype,
                                                device=elem.device)
        r.elem = elem
        return r

    def __reduce_ex__(self, proto):
        return (Wrapped, (self.elem,))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda x: x.elem if isinstance(x, Wrapped) else x  # noqa: E731
        return func(*[unwrap(a) for a in args], **{k: unwrap(v) for k, v in (kwargs or {}).items()})


class OwnReduce(torch.Tensor):
    """A subclass whose own __reduce_ex__ says how it travels (the plane must not guess)."""

    def __reduce_ex__(self, proto):
        return (_own_reduce_rebuild, (self.detach().as_subclass(torch.Tensor).clone(),))


def _own_reduce_rebuild(data):
    t = data.as_subclass(OwnReduce)
    t.rebuilt_by_own_reduce = True
    return t


def _typed_cases(n):
    """Tensor subclasses and tensors with Python attributes of ``n`` float32 elements."""
    tagged = torch.arange(n, dtype=torch.float32)
    tagged.note = "kept"
    stateful = torch.arange(n, dtype=torch.float32).as_subclass(StatefulTensor)
    stateful.note = "abc"
    tagged_param = torch.nn.Parameter(torch.arange(n, dtype=torch.float32))
    tagged_param.note = {"x": 1}
    return [GGMLLike(torch.arange(n, dtype=torch.float32), "Q4_K", (2, n // 2)),
            Params4bitLike(torch.arange(n, dtype=torch.float32), blocksize=128),
            Params4bitLike(torch.arange(n, dtype=torch.float32), requires_grad=True),
            torch.arange(n, dtype=torch.float32).as_subclass(_TaggedTensor),
            _TaggedParameter(torch.arange(n, dtype=torch.float32)),
            tagged, tagged_param, stateful,
            GGMLLike(torch.arange(2 * n, dtype=torch.float32)[::2], "F16", (n,))]   # a view


def _expected_state(t):
    """``t.__dict__`` as it arrives (a StatefulTensor's __setstate__ marks it restored)."""
    return {**t.__dict__, "restored": True} if type(t) is StatefulTensor else t.__dict__


def _assert_same_typed(got, want):
    assert type(got) is type(want), (type(got), type(want))
    assert got.__dict__ == _expected_state(want), (got.__dict__, want.__dict__)
    assert got.requires_grad == want.requires_grad and got.is_leaf
    with torch._C.DisableTorchFunctionSubclass():
        assert got.size() == want.size() and got.dtype == want.dtype
        assert torch.equal(got.detach(), want.detach())


@pytest.mark.timeout(90)
@pytest.mark.parametrize("n", [16, 1 << 14, 1 << 20], ids=["inline", "64KiB", "4MiB"])
def test_tensor_subclasses_and_attributes_keep_class_and_state_at_every_size(ex, n):
    """A subclass (GGUF's GGMLTensor, bitsandbytes' Params4bit) or a tensor with Python
    attributes arrives with its class and its state, whatever its size, both ways; its data
    takes the plane's route (inline, a copy into a segment, or moved in place)."""
    for t in _typed_cases(n):
        report = ex.submit(F.typed_report, t).result(timeout=30)
        with torch._C.DisableTorchFunctionSubclass():
            nbytes = t.numel() * t.element_size()
        want = F.typed_report(t)
        attrs = sorted((k, repr(v)) for k, v in _expected_state(t).items())
        assert report == (want[0], attrs, *want[2:-1], nbytes >= arrays.INLINE_BYTES), (t, report)
        _assert_same_typed(ex.submit(F.echo, t).result(timeout=30), t)
    # The worker's own.
    for got, want in zip(ex.submit(F.typed_cases, n).result(timeout=30), _typed_cases(n)):
        _assert_same_typed(got, want)


@pytest.mark.timeout(60)
def test_a_big_subclass_tensor_is_moved_in_place_then_sent_by_descriptor(ex):
    g = GGMLLike(torch.arange(1 << 20, dtype=torch.float32), "Q8_0", (1024, 1024))
    before = shm.STATS["copies"], shm.STATS["moves"]
    backs = [ex.submit(F.echo, g).result(timeout=30) for _ in range(3)]
    assert (shm.STATS["copies"], shm.STATS["moves"]) == (before[0], before[1] + 1)
    assert in_segment(g) and type(g) is GGMLLike and g.tensor_type == "Q8_0"
    for b in backs:                      # the caller's own memory came back, as a GGMLLike
        assert type(b) is GGMLLike and b.data_ptr() == g.data_ptr() and b.tensor_shape == (1024, 1024)
    ex.submit(F.add_one_inplace, g).result(timeout=30)
    assert g[0].item() == 1.0            # shared: the worker wrote into the caller's tensor


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
@pytest.mark.parametrize("n", [3, 1 << 18], ids=["inline", "big"])
def test_tensors_torch_must_pickle_keep_its_path(n):
    """Other layouts, quantized and nested tensors, wrapper / ``__torch_dispatch__``
    subclasses and classes with their own ``__reduce_ex__``: the plane declines them and
    torch's (or the class's) reduce sends them, as before (the plain tensors that reduce
    hands over, a sparse tensor's indices or a wrapper's inner tensor, then take the plane)."""
    plane = arrays.TorchCPUPlane()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")            # prototype / beta / deprecated
        nested = torch.nested.nested_tensor([torch.ones(n), torch.ones(3)])
        cases = [torch.arange(float(n)).to_sparse(), torch.eye(3).to_sparse_csr(),
                 torch.quantize_per_tensor(torch.ones(n), 0.1, 0, torch.quint8),
                 Wrapped(torch.arange(float(n))), torch.arange(float(n)).as_subclass(OwnReduce)]
    for t in cases + [nested]:
        assert plane._encode(t, None) is None, t
    if n > 3:
        return                                     # the executor tests send big ones
    for t in cases:
        refs, got = _loopback(t)
        assert not refs                            # nothing in shared memory
        want = pickle.loads(pickle.dumps(t))       # what torch's pickle makes of it
        assert type(got) is type(want) and got.layout == t.layout
        if t.is_quantized:
            got, t = got.dequantize(), t.dequantize()
        if isinstance(t, Wrapped):
            got, t = got.elem, t.elem
        assert torch.equal(got.to_dense(), t.to_dense())
    assert _loopback(cases[-1])[1].rebuilt_by_own_reduce


@pytest.mark.timeout(60)
def test_wrapper_subclasses_travel_whole_and_their_inner_tensor_through_the_plane(ex):
    w = Wrapped(torch.ones(1 << 20))                # 4 MiB: once failed to send at all
    assert ex.submit(F.wrapped_report, w).result(timeout=30) == ("Wrapped", float(1 << 20), True)
    back = ex.submit(F.echo, w).result(timeout=30)
    assert type(back) is Wrapped and torch.equal(back.elem, w.elem)


@pytest.mark.timeout(60)
def test_an_unpicklable_attribute_fails_naming_the_argument_not_the_function(ex):
    from comfy_env import PicklingFailed

    for n in (16, 1 << 20):
        t = GGMLLike(torch.zeros(n), "Q4_K", (n,))
        t.lock = threading.Lock()                  # torch's pickle cannot send it either
        with pytest.raises(PicklingFailed, match=r"argument 1 \(GGMLLike\)"):
            ex.submit(F.echo_many, 1, t).result(timeout=30)
        assert ex.submit(F.echo, 5).result(timeout=30) == 5     # the executor carries on


@pytest.mark.timeout(60)
def test_torch_requires_grad_and_parameters_travel_as_data_only(ex):
    leaf = torch.randn(300, 300, requires_grad=True)
    got = ex.submit(F.echo, leaf).result(timeout=30)
    assert got.requires_grad and got.is_leaf and got.grad_fn is None
    assert torch.equal(got.detach(), leaf.detach())
    # A non-leaf (has a graph in the parent): data arrives as a leaf that requires grad.
    y = leaf * 2
    desc = ex.submit(F.describe, y).result(timeout=30)
    assert desc[6] is True and desc[7] is True      # requires_grad, no grad_fn
    got = ex.submit(F.echo, y).result(timeout=30)
    assert got.requires_grad and got.grad_fn is None
    assert torch.equal(got.detach(), y.detach())
    p = torch.nn.Parameter(torch.randn(200, 200))
    gp = ex.submit(F.echo, p).result(timeout=30)
    assert type(gp) is torch.nn.Parameter and gp.requires_grad
    assert torch.equal(gp.detach(), p.detach())
    sparse = torch.nn.Parameter(torch.randn(2000, 300)[:, :2])          # compacted on the way
    gs = ex.submit(F.echo, sparse).result(timeout=30)
    assert type(gs) is torch.nn.Parameter and gs.requires_grad and torch.equal(gs, sparse)
    frozen = torch.nn.Parameter(torch.randn(200, 200), requires_grad=False)
    gf = ex.submit(F.echo, frozen).result(timeout=30)
    assert type(gf) is torch.nn.Parameter and not gf.requires_grad
    # The worker makes one too.
    t = ex.submit(F.make_tensor, 40000, "float32", True).result(timeout=30)
    assert t.requires_grad and t.is_leaf and torch.equal(t.detach(), torch.arange(40000.0))


@pytest.mark.timeout(60)
def test_numpy_stays_numpy_and_torch_stays_torch(ex):
    a = np.arange(50000.0)
    t = torch.arange(50000.0)
    shared_np = torch.from_numpy(np.arange(50000.0))       # a tensor over numpy memory
    ra, rt, rs = ex.submit(F.echo_many, a, t, shared_np).result(timeout=30)[0]
    assert type(ra) is np.ndarray and type(rt) is torch.Tensor and type(rs) is torch.Tensor
    assert ex.submit(F.types_of, a, t).result(timeout=30) == ["numpy.ndarray", "torch.Tensor"]
    # a numpy view of a received tensor is sent as numpy, and vice versa
    back = ex.submit(F.echo_many, rt.numpy(), torch.from_numpy(ra)).result(timeout=30)[0]
    assert type(back[0]) is np.ndarray and type(back[1]) is torch.Tensor
    assert np.shares_memory(back[0], rt.numpy()) and np.shares_memory(back[1].numpy(), ra)


# -- containers -----------------------------------------------------------------------------

Point = collections.namedtuple("Point", "x y")


@dataclasses.dataclass
class Holder:
    name: str
    data: object


@pytest.mark.timeout(60)
def test_containers_keep_their_types(ex):
    a = np.arange(40000.0)
    t = torch.arange(40000.0)
    payload = {
        "tuple": (1, a, "x"),
        "list": [a, t],
        "set": {1, 2, 3},
        "frozenset": frozenset({"a", 1}),
        1: "int key",
        2.5: "float key",
        (1, 2): "tuple key",
        None: "none key",
        "nested": {"inner": [(a, {7: t})]},
        "ordered": collections.OrderedDict([(3, "c"), (1, "a")]),
        "default": collections.defaultdict(list, {1: [2]}),
        "named": Point(a, 2),
        "holder": Holder("h", t),
        "bytes": b"\x00\x01", "bytearray": bytearray(b"ab"), "complex": 1 + 2j,
        "range": range(3, 9, 2), "empty": ((), [], {}, set()),
    }
    got = ex.submit(F.echo, payload).result(timeout=30)
    assert type(got) is dict and set(got) == set(payload)
    for k in (1, 2.5, (1, 2), None):
        assert got[k] == payload[k]
    assert type(got["tuple"]) is tuple and np.array_equal(got["tuple"][1], a)
    assert type(got["list"]) is list and isinstance(got["list"][1], torch.Tensor)
    assert type(got["set"]) is set and got["set"] == {1, 2, 3}
    assert type(got["frozenset"]) is frozenset and got["frozenset"] == frozenset({"a", 1})
    inner = got["nested"]["inner"][0]
    assert type(inner) is tuple and list(inner[1]) == [7] and torch.equal(inner[1][7], t)
    assert type(got["ordered"]) is collections.OrderedDict and list(got["ordered"]) == [3, 1]
    assert type(got["default"]) is collections.defaultdict and got["default"][5] == []
    assert type(got["named"]) is Point and np.array_equal(got["named"].x, a)
    assert type(got["holder"]) is Holder and torch.equal(got["holder"].data, t)
    assert got["range"] == range(3, 9, 2) and got["empty"] == ((), [], {}, set())
    assert type(got["bytearray"]) is bytearray
    # The worker sees the same types.
    assert ex.submit(F.type_tree, payload).result(timeout=30) == F.type_tree(payload)


@pytest.mark.timeout(60)
def test_one_array_twice_in_a_message_arrives_as_one_array(ex):
    a = np.arange(40000.0)
    t = torch.arange(40000.0)
    got = ex.submit(F.echo, [a, a, {"again": a}, t, t]).result(timeout=30)
    assert got[0] is got[1] is got[2]["again"]
    assert got[3] is got[4]
    # The worker sees the aliasing too: writing through one name shows through the other.
    assert ex.submit(F.aliased, [a, a]).result(timeout=30) is True


# -- zero copy ----------------------------------------------------------------------------------

def _arena_counts():
    return shm.ARENA.created + shm.ARENA.reused


@pytest.mark.timeout(60)
def test_a_fresh_array_costs_exactly_one_copy_and_none_on_receipt(ex):
    a = np.random.default_rng(0).random(200_000)          # 1.6 MB, not in a segment
    assert not in_segment(a)
    before, wbefore = _arena_counts(), ex.submit(F.arena_counts).result(timeout=30)
    got = ex.submit(F.echo, a).result(timeout=30)
    # One scratch segment taken in the parent; the worker returned it by descriptor (no copy
    # there); the parent maps its own segment again (no copy on receipt).
    assert _arena_counts() - before == 1
    assert ex.submit(F.arena_counts).result(timeout=30) == wbefore
    assert in_segment(got) and not np.shares_memory(got, a)
    assert np.array_equal(got, a)


@pytest.mark.timeout(60)
def test_shared_arrays_go_by_descriptor_with_no_copy(ex):
    x = shared_empty((1000, 300), np.float32)
    x[...] = np.arange(300_000, dtype=np.float32).reshape(1000, 300)
    assert in_segment(x)
    before, wbefore = _arena_counts(), ex.submit(F.arena_counts).result(timeout=30)
    back = ex.submit(F.echo, x).result(timeout=30)
    view = ex.submit(F.tensor_view, x, "x[10:, ::2]").result(timeout=30)
    assert np.shares_memory(back, x) and back.__array_interface__ == x.__array_interface__
    assert np.shares_memory(view, x) and view.__array_interface__ == x[10:, ::2].__array_interface__
    assert _arena_counts() == before
    assert ex.submit(F.arena_counts).result(timeout=30) == wbefore
    # The worker writes into the very memory the parent holds.
    assert ex.submit(F.add_one_inplace, x[5:]).result(timeout=30) is None
    assert x[0, 0] == 0 and x[5, 0] == 1500 + 1 and x[-1, -1] == 300_000
    # Fortran order and shared_like.
    f = shared_empty((300, 400), "c8", order="F")
    assert f.flags.f_contiguous and in_segment(f)
    s = shared_like(np.arange(100_000, dtype=np.int16))
    assert in_segment(s) and np.array_equal(s, np.arange(100_000, dtype=np.int16))
    gf, gs = ex.submit(F.echo_many, f, s).result(timeout=30)[0]
    assert np.shares_memory(gf, f) and gf.flags.f_contiguous and np.shares_memory(gs, s)


@pytest.mark.timeout(60)
def test_small_shared_arrays_and_tensors_go_by_descriptor_too(ex):
    """shared_empty / shared_like promise shared memory at every size: below the inline
    threshold (and for sparse views, which a copy would compact) the descriptor goes too,
    so a worker's writes reach the caller."""
    for n in (1, 16, arrays.INLINE_BYTES // 8 - 1):
        a = shared_empty((n,), np.float64)
        a[:] = 0
        t = shared_like(torch.zeros(n, dtype=torch.float64))
        assert a.nbytes < arrays.INLINE_BYTES and not codec.is_plain([a])
        before = _arena_counts()
        for x in (a, t):
            assert ex.submit(F.add_one_inplace, x).result(timeout=30) is None
            assert x[0] == 1 and x[n - 1] == 1
            back, _, desc = ex.submit(F.echo_and_hash, x).result(timeout=30)
            assert desc[-1] is True                    # in a segment in the worker
            assert _addr(back) == _addr(x) and in_segment(back)
        assert _arena_counts() == before               # no copy anywhere
    # A sparse view of a shared array (span > twice its data) is not compacted either.
    big = shared_empty((1000, 300), np.float32)
    big[:] = 0
    for v in (big[::50, ::30], big[3:, 7]):
        ex.submit(F.add_one_inplace, v).result(timeout=30)
        assert np.all(v == 1)
    assert big.sum() == big[::50, ::30].size + big[3:, 7].size    # disjoint: col 7 vs ::30
    # Ordinary small arrays still travel inline (the plain route).
    small = np.zeros(16)
    assert codec.is_plain([small]) and not in_segment(ex.submit(F.echo, small).result(timeout=30))


@pytest.mark.timeout(60)
def test_results_sent_back_go_by_descriptor(ex):
    r = ex.submit(F.make_range, 300_000).result(timeout=30)
    assert in_segment(r)
    before, wbefore = _arena_counts(), ex.submit(F.arena_counts).result(timeout=30)
    again = ex.submit(F.echo, r[1:]).result(timeout=30)
    assert np.shares_memory(again, r) and again[0] == 1
    assert _arena_counts() == before
    assert ex.submit(F.arena_counts).result(timeout=30) == wbefore
    # And the worker writes into its own memory that the parent sees.
    ex.submit(F.add_one_inplace, r).result(timeout=30)
    assert r[0] == 1 and again[0] == 2


@pytest.mark.timeout(60)
def test_torch_shared_tensors_go_by_descriptor(ex):
    t = shared_like(torch.arange(200_000, dtype=torch.float32))
    assert type(t) is torch.Tensor and in_segment(t)
    g = shared_like(torch.ones(100, 1000, requires_grad=True))
    assert g.requires_grad and g.is_leaf and in_segment(g)
    before = _arena_counts()
    back = ex.submit(F.echo, t).result(timeout=30)
    view = ex.submit(F.tensor_view, t, "x[7:]").result(timeout=30)
    gb = ex.submit(F.echo, g).result(timeout=30)
    assert back.data_ptr() == t.data_ptr() and view.data_ptr() == t[7:].data_ptr()
    assert view.storage_offset() == 7
    assert gb.data_ptr() == g.data_ptr() and gb.requires_grad
    assert _arena_counts() == before
    ex.submit(F.add_one_inplace, t).result(timeout=30)
    assert t[0].item() == 1 and back[0].item() == 1
    with pytest.raises(ValueError, match="only CPU tensors"):
        shared_like(torch.empty(3, device="meta"))


@pytest.mark.timeout(60)
def test_result_of_one_worker_reaches_another_without_a_copy(tmp_path):
    with IsolatedExecutor(max_workers=2, name="two") as ex2:
        # Two calls that must run at the same time: one array from each worker.
        fa = ex2.submit(F.range_at_rendezvous, str(tmp_path), "a", "b", 300_000)
        fb = ex2.submit(F.range_at_rendezvous, str(tmp_path), "b", "a", 300_000)
        (pa, ra), (pb, rb) = fa.result(timeout=60), fb.result(timeout=60)
        assert pa != pb
        before = _arena_counts()
        # Whichever worker runs this, one of the two arrays is the other worker's: it is
        # forwarded by descriptor (the parent passes the fd on) and written in place.
        pid, shared = ex2.submit(F.write_and_pid, [ra, rb[5:]], 42.0).result(timeout=30)
        assert pid in (pa, pb)
        assert ra[0] == 42.0 and rb[5] == 42.0 and rb[4] == 4.0
        assert shared == [True, True]
        assert _arena_counts() == before


@pytest.mark.timeout(60)
def test_hundreds_of_arrays_in_one_message_both_ways(ex):
    # Each copied array used to take its own segment, hence an fd: past 250 the frame failed.
    arrs = [np.full(150_000, i, dtype=np.float64) for i in range(300)]
    got = ex.submit(F.echo, arrs).result(timeout=60)
    assert all(g[0] == i and g[-1] == i and in_segment(g) for i, g in enumerate(got))
    made = ex.submit(F.many_arrays, 300, 1_200_000).result(timeout=60)
    assert len(made) == 300
    assert all(m[0] == i and m[-1] == i and in_segment(m) for i, m in enumerate(made))


# -- trimesh ------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_trimesh_arrives_as_trimesh_with_its_arrays_in_shared_memory(ex):
    trimesh = pytest.importorskip("trimesh")
    m = F.make_mesh(6)
    m.metadata["name"] = "sphere"
    m.vertex_attributes["heat"] = np.arange(len(m.vertices), dtype=np.float32)
    rep = ex.submit(F.mesh_report, m).result(timeout=60)
    assert rep[0] == "trimesh.base.Trimesh"
    assert all(rep[1].values()), rep               # every array in a segment in the worker
    got = ex.submit(F.echo, m).result(timeout=60)
    assert type(got) is trimesh.Trimesh
    assert np.array_equal(got.vertices, m.vertices) and np.array_equal(got.faces, m.faces)
    assert np.allclose(got.vertex_normals, m.vertex_normals)
    assert np.array_equal(got.visual.vertex_colors, m.visual.vertex_colors)
    assert got.metadata["name"] == "sphere"
    assert np.array_equal(got.vertex_attributes["heat"], m.vertex_attributes["heat"])
    for arr in (got.vertices, got.faces, got.visual.vertex_colors, got.vertex_normals):
        assert in_segment(np.asarray(arr))
    # made in the worker
    made = ex.submit(F.make_mesh, 6).result(timeout=60)
    assert type(made) is trimesh.Trimesh and len(made.faces) == len(m.faces)
    for arr in (made.vertices, made.faces, made.visual.vertex_colors, made.vertex_normals):
        assert in_segment(np.asarray(arr))
    assert made.is_watertight


# -- missing torch --------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_receiver_without_torch_names_the_package_and_its_python():
    _settle()
    base = _ledger_keys()
    with IsolatedExecutor(initializer=F.torch_missing, name="no-torch") as ex:
        assert ex.submit(F.torch_importable).result(timeout=60) is False
        exe = ex.submit(F.python_executable).result(timeout=30)
        for t in (torch.arange(100_000.0), torch.arange(10.0)):          # plane and inline
            with pytest.raises(ImportError) as info:
                ex.submit(F.echo, t).result(timeout=30)
            msg = str(info.value)
            assert "torch" in msg and exe in msg, msg
        # numpy still works in that worker, and the failed call lent nothing for good
        assert np.array_equal(ex.submit(F.echo, np.arange(100_000.0)).result(timeout=30),
                              np.arange(100_000.0))
        _settle(lambda: _ledger_keys() <= base)
        # Releases travel asynchronously: the worker's ledger empties shortly after ours.
        _settle(lambda: ex.submit(F.ledger_size).result(timeout=30) == 0, timeout=5)


# -- concurrency -------------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_many_concurrent_transfers_from_several_threads():
    errors = []
    _settle()
    base = _ledger_keys()
    with IsolatedExecutor(max_workers=2, name="threads") as ex2:
        shared = shared_like(np.arange(100_000, dtype=np.int64))

        def worker(tid):
            try:
                rng = np.random.default_rng(tid)
                for i in range(15):
                    n = int(rng.integers(10_000, 400_000))
                    a = rng.integers(0, 1 << 40, n)
                    t = torch.from_numpy(a.astype(np.float32).copy())[1:]
                    futs = [ex2.submit(F.echo_and_hash, a), ex2.submit(F.echo, (t, shared)),
                            ex2.submit(F.make_array, (n // 7, 7), "f4", tid * 100 + i)]
                    got, h, _ = futs[0].result(timeout=60)
                    assert h == F.checksum(a) and np.array_equal(got, a)
                    gt, gs = futs[1].result(timeout=60)
                    assert torch.equal(gt, t) and gt.storage_offset() == 1
                    assert np.shares_memory(gs, shared)
                    assert np.array_equal(futs[2].result(timeout=60),
                                          F.make_array((n // 7, 7), "f4", tid * 100 + i))
            except BaseException as exc:       # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(80)
        assert not errors, errors
        assert np.array_equal(shared, np.arange(100_000))
        del shared
        _settle(lambda: _ledger_keys() <= base)
        _settle(lambda: all(n == 0 for n in ex2.submit(F.ledger_size_pair).result(timeout=30)), timeout=5)
