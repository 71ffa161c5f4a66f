"""The CPU data plane: numpy arrays and torch CPU tensors as shared-memory descriptors.

Sending an array:

* if its memory already lies in a comfy_env segment (received from a peer, made
  with ``shared_empty``/``shared_like``, a view of a moved tensor) only a descriptor
  travels, whatever its size and layout: segment, offset, dtype, shape, strides -- no
  copy, and the peer's writes reach this process's array;
* otherwise below ``INLINE_BYTES`` it travels inline, in the pickle (a descriptor would
  cost more): its raw bytes with dtype, shape and strides (compacted: C order, or F
  order if it was F-contiguous); torch CPU tensors likewise (torch's own pickle would
  run ``torch.save``/``torch.load`` on each);
* a torch CPU tensor of at least ``MOVE_MIN_BYTES`` that the executor sends
  (``share_tensors_in_place``, on by default) has its whole storage moved into
  an arena block once, as ``Tensor.share_memory_()`` does (:func:`move_storage`):
  that send costs the one copy, later ones none;
* otherwise its bytes are copied once (one memcpy of the span it covers, so
  views keep their strides and offset) into the frame's scratch segment from
  the arena, which usually has its pages faulted in already.

Receiving builds the array on the mapped segment: no copy.  One holder per
message and segment counts as a user of the segment (see lifetime.py) until
every array built on it is gone.

Nothing numpy-version specific goes on the wire: numpy's own pickles name
``numpy._core`` (numpy 2; numpy 1 cannot load them) or ``numpy.core`` (numpy 1;
deprecated in numpy 2), and dtype pickles of datetimes and aligned structs do not
cross either.  So numpy dtypes travel as builtins (:func:`_dtype_desc`), and numpy
scalars, dtype objects and masked arrays get descriptors too: a node env pinned to
``numpy<2`` and a numpy-2 host read each other's messages.  Object arrays keep
numpy's pickle (their elements are Python objects).  Torch dtypes go by name.
"""
from __future__ import annotations

import ctypes
import mmap
import pickle
import queue
import sys
import threading
from typing import TYPE_CHECKING, Any

from .. import forksafe, settings
from . import codec, lifetime, shm

if TYPE_CHECKING:       # annotations only: importing comfy_env never imports numpy
    import numpy

__all__ = ["INLINE_BYTES", "MOVE_MIN_BYTES", "NumpyPlane", "TorchCPUPlane", "move_storage",
           "tensor_on_record", "shared_empty", "shared_like"]

INLINE_BYTES = settings.read().inline_bytes


def _adopt_settings(values):
    # A worker imports this module before its handshake brings the parent's settings.
    global INLINE_BYTES
    INLINE_BYTES = values.inline_bytes


settings.on_install(_adopt_settings)

# Smaller storages are copied on every send rather than moved: a moved storage holds
# an arena segment of its own (at least 1 MiB) for as long as it lives, while copies of
# small tensors share the frame's scratch segment (see docs/dataplane.md).
MOVE_MIN_BYTES = 1 << 20
# Move the whole storage of a view only while it is at most this many times the bytes
# the view spans: x[:n] of a storage 100x bigger is copied, not moved.
_MOVE_SLACK = 8
# Copy a view's whole span (keeping its strides) unless the span is much bigger
# than the data: then compact it (x[::1000] of a huge array).
_SPAN_SLACK = 2
_SCRATCH_ALIGN = 64
_SCRATCH_SOLO = 16              # segments per frame before they grow (see _Scratch)
_SCRATCH_MAX = 256 << 20


def _missing(pkg, what):
    return codec.not_importable(pkg, f"a {what}")


def _span(ptr, shape, strides, itemsize):
    """Byte bounds ``[lo, hi)`` of the memory an array with these strides touches."""
    lo = hi = ptr
    for n, s in zip(shape, strides):
        if n == 0:
            return ptr, ptr
        if s < 0:
            lo += (n - 1) * s
        else:
            hi += (n - 1) * s
    return lo, hi + itemsize


def _in_segment(ptr):
    """Does the memory at ``ptr`` (an array's first element) lie in one of our segments?

    Its first byte tells for the whole array: every array or storage on a segment is
    built inside it (holder_for, tensor_on_record, move_storage), never across its end.
    """
    return shm.find_segment(ptr, 1) is not None


def _np_in_segment(a):
    """:func:`_in_segment` for a small numpy array, cheap for the common ones: an array
    that owns its memory (no ``base``: numpy allocated it) is in no segment, and
    nothing is while no segment is mapped."""
    if a.base is None or not a.size or not shm.ADDRESS_MAP:
        return False
    return _in_segment(a.__array_interface__["data"][0])


class _Scratch:
    """Bump allocator over arena segments for the copies of one frame.

    Each segment is an fd in the frame, and a frame carries at most
    ``transport.MAX_FDS``: a result holding 300 arrays of 2 MiB each failed to
    send.  After ``_SCRATCH_SOLO`` segments, each new one is at least twice the
    previous (up to ``_SCRATCH_MAX``), so the count grows with the log of the
    bytes copied.  (Arrays packed together keep their whole segment alive on
    the peer until the last of them is gone: hence not from the start.)
    """

    __slots__ = ("record", "used", "count", "last_size")

    def __init__(self):
        self.record = None
        self.used = 0
        self.count = 0
        self.last_size = 0

    def take(self, nbytes):
        rec = self.record
        if rec is not None:
            off = (self.used + _SCRATCH_ALIGN - 1) // _SCRATCH_ALIGN * _SCRATCH_ALIGN
            if off + nbytes <= rec.resource.size:
                self.used = off + nbytes
                return rec, off
        want = nbytes
        if self.count >= _SCRATCH_SOLO:
            want = max(nbytes, min(2 * self.last_size, _SCRATCH_MAX))
        rec = shm.ARENA.allocate(want)
        self.record, self.used = rec, nbytes
        self.count += 1
        self.last_size = rec.resource.size
        return rec, 0


def _scratch(enc):
    s = getattr(enc.fb, "_scratch", None)
    if s is None:
        s = enc.fb._scratch = _Scratch()
    return s


def _place(plane, enc, ptr, lo, hi):
    """Make ``[lo, hi)`` available to the peer; returns ``(ref_index, offset of ptr)``."""
    seg = shm.find_segment(lo, hi - lo)
    rec = lifetime.LEDGER.get(seg.key) if seg is not None else None
    if rec is None:
        rec, off = _scratch(enc).take(hi - lo)
        seg = rec.resource
        ctypes.memmove(seg.addr + off, lo, hi - lo)
        shm.STATS["copies"] += 1
        shm.STATS["copied_bytes"] += hi - lo
        ptr = seg.addr + off + (ptr - lo)
    # The owner already has the segment open: no fd for it.
    fd = seg.fd_for(enc.fb) if enc.link.uid != seg.key[1] else None
    idx = enc.add_ref(plane, rec, meta=seg.size, fd=fd)
    return idx, ptr - seg.addr


def _holder(dec, ref_index):
    cache = dec.__dict__.setdefault("_shm_holders", {})
    h = cache.get(ref_index)
    if h is None:
        h = cache[ref_index] = shm.holder_for(dec.record(ref_index))
    return h


class _SegmentPlane(codec.Plane):
    def open_remote(self, key, meta, fd):
        if fd < 0:
            raise RuntimeError(f"shared-memory segment {key} arrived without its file "
                               f"descriptor (protocol error)")
        return shm.Segment.open(key, fd, meta)

    def frame_fd(self, record, frame_builder):
        return record.resource.fd_for(frame_builder)

    def on_zero(self, record):
        record.resource.close()

    # pickle calls persistent_id before it looks at its memo, so an array that
    # appears twice in one message ([a, a]) would be copied twice and arrive as
    # two unrelated arrays.  Returning the very same descriptor object makes
    # pickle memoize it; the decoder maps that one descriptor to one object.
    def encode(self, obj, enc):
        memo = enc.__dict__.setdefault("_plane_memo", {})
        hit = memo.get(id(obj))
        if hit is not None:
            return hit[1]
        desc = self._encode(obj, enc)
        if desc is not None:
            memo[id(obj)] = (obj, desc)       # keeps obj alive: its id is not reused
        return desc

    def decode(self, desc, dec):
        memo = dec.__dict__.setdefault("_plane_memo", {})
        hit = memo.get(id(desc))
        if hit is not None and hit[0] is desc:
            return hit[1]
        obj = self._decode(desc, dec)
        memo[id(desc)] = (desc, obj)
        return obj


# numpy's bit generators: (module under numpy.random, class), the same in numpy 1 and 2.
_BIT_GENERATORS = (("_pcg64", "PCG64"), ("_pcg64", "PCG64DXSM"), ("_mt19937", "MT19937"),
                   ("_philox", "Philox"), ("_sfc64", "SFC64"))


class NumpyPlane(_SegmentPlane):
    """numpy arrays, and the numpy objects that travel with them (scalars, dtypes, masked
    arrays), described in builtins only, so that numpy 1 and numpy 2 read each other's
    messages (numpy's own pickle names ``numpy._core`` / ``numpy.core``: see
    :func:`_dtype_desc`).

    Descriptors (a tag, then what it needs)::

        ("i", head, raw)          an array below INLINE_BYTES: its bytes in the pickle
        ("m", head, ref, offset)  an array in a shared-memory segment
        ("g", dtype, raw)         a scalar (np.float32(1), np.datetime64(...), np.void)
        ("d", dtype)              a dtype object
        ("u", name)               one of numpy's ufuncs (np.add)
        ("ma", data, mask, fill_value, hard_mask)     a masked array; its parts nest
        ("o", array)              a read-only object array (numpy's pickle, flag restored)
        ("r", kind, name, state)  a random Generator ("g"), RandomState ("rs") or bit
                                  generator ("b") of numpy's bit generator ``name``, with
                                  its state (numpy 2 pickles these with the class where
                                  numpy 1 reads a name, and its own state layout)

    ``head`` is ``(dtype, shape, strides, writeable, subclass)`` on both routes: one
    builder (:func:`_build`) makes the array over the inline bytes or the mapped segment.
    """

    name = "np"
    types = ("numpy.ndarray", "numpy.generic", "numpy.dtype", "numpy.ufunc",
             "numpy.random._generator.Generator", "numpy.random.mtrand.RandomState",
             *(f"numpy.random.{m}.{c}" for m, c in _BIT_GENERATORS))

    def reduce_portable(self, obj):
        desc = self._encode(obj, None, inline=True)
        return None if desc is None else (_portable, (desc,))

    def plain_inline(self, obj):
        # A small plain array or scalar of one of numpy's own dtypes: its inline
        # descriptor is builtins only, so the part it is in stays plain (codec._is_plain).
        # Subclasses, object and user dtypes, and bigger arrays take the Encoder.
        np = sys.modules["numpy"]
        tp = type(obj)
        if tp is np.ndarray:
            if obj.nbytes >= INLINE_BYTES or _np_in_segment(obj):
                return False
            dtype = obj.dtype
        elif isinstance(obj, np.dtype):
            dtype = obj
        elif isinstance(obj, np.generic) and tp is obj.dtype.type:
            dtype = obj.dtype
        else:
            return False
        return dtype.isbuiltin == 1 and dtype.metadata is None and dtype.kind != "O"

    def _encode(self, a, enc, inline=False):
        np = sys.modules["numpy"]          # loaded: one of its objects is here
        cls = type(a)
        if cls is not np.ndarray:
            if isinstance(a, np.generic):
                return _encode_scalar(np, a)
            if isinstance(a, np.dtype):
                d = _dtype_desc(np, a)
                return None if isinstance(d, np.dtype) else ("d", d)
            if cls is np.ufunc:
                # numpy 1 pickles np.add as numpy.core._multiarray_umath.add (numpy 2
                # loads that through its deprecated numpy.core aliases): go by name.
                name = a.__name__
                return ("u", name) if getattr(np, name, None) is a else None
            if cls.__name__ == "MaskedArray" and cls.__module__.startswith("numpy.ma") \
                    and cls is np.ma.MaskedArray:
                return _encode_masked(np, a)
            if cls.__module__.startswith("numpy.random"):
                return _encode_random(np, a)
        sub = _subclass_ref(np, cls)
        if sub is False:
            return None           # a subclass with state of its own: its reduce knows it
        dtype = a.dtype
        if dtype.hasobject:
            if a.flags.writeable:
                return None
            # numpy's own pickle drops the writeable flag: send a writeable copy
            # (pickled by numpy, the nested persistent_id call returns None for it)
            # and make it read-only on arrival.
            return ("o", a.copy(order="K"))
        dt = _dtype_desc(np, dtype)
        writeable = bool(a.flags.writeable)
        # An array in one of our segments (shared_empty, a peer's) goes by descriptor
        # whatever its size or layout: a copy, inline or compacted, would break the
        # sharing that shared_empty promises (the worker's writes would stay there).
        if inline or (a.nbytes < INLINE_BYTES and not _np_in_segment(a)):
            return _encode_inline(np, a, cls, dt, writeable, sub)
        ptr = a.__array_interface__["data"][0]
        lo, hi = _span(ptr, a.shape, a.strides, dtype.itemsize)
        if hi - lo > _SPAN_SLACK * a.nbytes and not _in_segment(ptr):
            # Compact a sparse view (the flag is read above: the copy is writeable).
            a = np.ascontiguousarray(a) if not a.flags.f_contiguous else a
            ptr = a.__array_interface__["data"][0]
            lo, hi = _span(ptr, a.shape, a.strides, dtype.itemsize)
        idx, off = _place(self, enc, ptr, lo, hi)
        return ("m", (dt, a.shape, a.strides, writeable, sub), idx, off)

    def _decode(self, desc, dec):
        try:
            import numpy as np
        except ImportError:
            raise _missing("numpy", "numpy array") from None
        tag = desc[0]
        if tag == "i":
            raw = desc[2]
            if type(raw) is bytes:
                # A read-only array's bytes: a private copy, as a writeable array's
                # bytearray is, so the receiver may still set the flag back.
                raw = bytearray(raw)
            return _build(np, desc[1], raw, 0)
        if tag == "m":
            return _build(np, desc[1], _holder(dec, desc[2]), desc[3])
        if tag == "g":
            return np.ndarray((), _dtype(np, desc[1]), buffer=bytearray(desc[2]))[()]
        if tag == "d":
            return _dtype(np, desc[1])
        if tag == "u":
            return getattr(np, desc[1])
        if tag == "ma":
            _, data, mask, fill_value, hard = desc
            arr = np.ma.MaskedArray(data, mask=np.ma.nomask if mask is None else mask,
                                    hard_mask=hard, copy=False)
            # As the sender held it (a 0-d array of the dtype, or None for the default):
            # the public setter would rebuild it, losing e.g. a structured value's padding.
            arr._fill_value = fill_value
            return arr
        if tag == "o":
            arr = desc[1]
            arr.flags.writeable = False
            return arr
        if tag == "r":
            return _decode_random(np, *desc[1:])
        raise ValueError(f"unknown numpy descriptor tag {tag!r} (protocol error)")


def _portable(desc):
    """Unpickles what :meth:`NumpyPlane.reduce_portable` reduced (inline descriptors only)."""
    return NUMPY_PLANE._decode(desc, None)


def _encode_inline(np, a, cls, dt, writeable, sub):
    """``("i", head, raw)``: the bytes of a small array, compacted (C order, or F order
    when it is F-contiguous) so that ``head``'s strides describe ``raw``.

    ``raw`` is a PickleBuffer over the array's memory: pickle copies it once, straight
    into the message, and a writeable array's arrives as a bytearray (a read-only
    one's as bytes), which the received array is built on."""
    if cls is not np.ndarray:
        a = a.view(np.ndarray)
    if not (a.flags.c_contiguous or a.flags.f_contiguous):
        a = a.copy(order="C")
        if not writeable:
            a.flags.writeable = False
    if a.nbytes == 0:
        raw = bytearray() if writeable else b""
    else:
        flat = a.reshape(-1) if a.flags.c_contiguous else a.T.reshape(-1)
        raw = pickle.PickleBuffer(flat.view(np.uint8))
    return ("i", (dt, a.shape, a.strides, writeable, sub), raw)


def _build(np, head, buf, offset):
    """The array ``head`` describes, over ``buf`` (inline bytes or a mapped segment)."""
    dt, shape, strides, writeable, sub = head
    arr = np.ndarray(shape, _dtype(np, dt), buffer=buf, offset=offset, strides=strides)
    if not writeable:
        arr.flags.writeable = False
    if sub is not None:
        try:
            arr = arr.view(getattr(np, sub) if type(sub) is str else sub)
        except Exception:
            pass
    return arr


def _encode_random(np, obj):
    """``("r", kind, name, state)`` for numpy's own Generator, RandomState or bit
    generator (exact classes: a subclass may hold more), else None.  The state crosses;
    a bit generator's seed sequence (what ``spawn`` draws from) does not."""
    random = np.random
    cls = type(obj)
    if cls is random.Generator:
        kind, bg = "g", obj.bit_generator
    elif cls is random.RandomState:
        kind, bg = "rs", obj._bit_generator
    else:
        kind, bg = "b", obj
    name = type(bg).__name__
    if getattr(random, name, None) is not type(bg):
        return None
    state = obj.get_state(legacy=False) if kind == "rs" else bg.state
    return ("r", kind, name, state)


def _decode_random(np, kind, name, state):
    cls = getattr(np.random, name, None)
    if cls is None:
        raise ValueError(f"this numpy ({np.__version__}) has no bit generator {name!r}, which the "
                         f"peer's random generator uses")
    if kind == "rs":
        rs = np.random.RandomState(cls())
        rs.set_state(state)
        return rs
    bg = cls()
    bg.state = state
    return np.random.Generator(bg) if kind == "g" else bg


def _encode_scalar(np, s):
    dtype = s.dtype
    if type(s) is not dtype.type or dtype.hasobject:
        return None               # a user's scalar subclass: its own pickle
    dt = _dtype_desc(np, dtype)
    if isinstance(dt, np.dtype):
        return None               # a user-defined dtype's scalar (e.g. ml_dtypes)
    return ("g", dt, s.tobytes())


def _encode_masked(np, m):
    """``("ma", data, mask, fill_value, hard_mask)``: data and mask travel as arrays
    (inline or in a segment, like any other); numpy's pickle would send the data as
    bytes in the message, whatever its size."""
    mask = m._mask
    if mask is np.ma.nomask:
        mask = None
    return ("ma", m.data, mask, m._fill_value, bool(m._hardmask))


# numpy's ndarray subclasses whose state is the data alone, named rather than pickled:
# recarray's class lives in numpy.rec in numpy 2, which numpy 1 cannot import.
_NUMPY_SUBCLASSES = ("recarray", "matrix", "memmap")


def _subclass_ref(np, cls):
    """How a receiver rebuilds ``cls`` with ``view()``: None for ndarray, a numpy name,
    the class itself (pickled by reference), or False when its state is more than data."""
    if cls is np.ndarray:
        return None
    name = cls.__name__
    if name in _NUMPY_SUBCLASSES and getattr(np, name, None) is cls:
        return name
    if f"{cls.__module__}.{cls.__qualname__}" == "trimesh.caching.TrackedArray":
        return cls
    return False


def _dtype_desc(np, dtype):
    """``dtype`` in builtins only: numpy 1 and 2 both rebuild it exactly (:func:`_dtype`).

    Plain dtypes are their ``str`` (byte order, size, datetime unit included: '<f8',
    '>i4', '<M8[ns]', '<U3', '|V12'); sub-arrays, structured dtypes (names, formats,
    offsets, titles, itemsize, alignment, record type) and metadata nest.  A dtype
    numpy does not define (ml_dtypes' bfloat16, a legacy user dtype) is returned as
    is: pickled by its own reduce, it crosses wherever its package is importable."""
    if dtype.isbuiltin == 1 and dtype.metadata is None and dtype.kind != "O":
        return dtype.str          # numpy's canonical dtypes: the common case
    if dtype.isbuiltin == 2:
        return dtype
    if dtype.subdtype is not None:
        base, shape = dtype.subdtype
        inner = _dtype_desc(np, base)
        if isinstance(inner, np.dtype):
            return dtype
        d = ("a", inner, shape)
    elif dtype.names is not None:
        if dtype.type is not np.void and dtype.type is not np.record:
            return dtype
        fields = dtype.fields
        formats, offsets, titles = [], [], []
        for n in dtype.names:
            f = fields[n]
            inner = _dtype_desc(np, f[0])
            if isinstance(inner, np.dtype):
                return dtype
            formats.append(inner)
            offsets.append(f[1])
            titles.append(f[2] if len(f) > 2 else None)
        d = ("s", dtype.names, tuple(formats), tuple(offsets),
             tuple(titles) if any(t is not None for t in titles) else None,
             dtype.itemsize, bool(dtype.isalignedstruct), dtype.type is np.record)
    elif dtype.kind in "biufcmMSUV" and dtype.type.__module__ == "numpy":
        d = dtype.str
    else:
        return dtype
    if dtype.metadata is not None:
        d = ("md", d, dict(dtype.metadata))
    return d


_DTYPES = {}            # dtype str -> dtype, on the receiving side


def _dtype(np, d):
    """The dtype a :func:`_dtype_desc` describes (or ``d`` itself, a pickled dtype)."""
    if type(d) is str:
        dt = _DTYPES.get(d)
        if dt is None:
            dt = np.dtype(d)
            if len(_DTYPES) >= 4096:          # string lengths vary: stay bounded
                _DTYPES.clear()
            _DTYPES[d] = dt
        return dt
    if isinstance(d, np.dtype):
        return d
    tag = d[0]
    if tag == "a":
        return np.dtype((_dtype(np, d[1]), d[2]))
    if tag == "s":
        _, names, formats, offsets, titles, itemsize, aligned, record = d
        spec = {"names": list(names), "formats": [_dtype(np, f) for f in formats],
                "offsets": list(offsets), "itemsize": itemsize}
        if titles is not None:
            spec["titles"] = list(titles)
        dt = np.dtype(spec, align=aligned)
        return np.dtype((np.record, dt)) if record else dt
    if tag == "md":
        return np.dtype(_dtype(np, d[1]), metadata=d[2])
    raise ValueError(f"unknown dtype descriptor {d!r} (protocol error)")


def _torch_dtype(name):
    import torch

    return getattr(torch, name)


def _dtype_name(dtype):
    return str(dtype).rsplit(".", 1)[1]


def _plain_values(t):
    """``(t, requires_grad, param)`` with ``t``'s values in memory as they read.

    Lazy conjugate/negative views hold the unconjugated values and the bit would
    not travel: they are materialised (one copy, as pickle would).  The flags are
    read first (``.detach()`` of a Parameter is a plain Tensor).
    """
    import torch

    param = isinstance(t, torch.nn.Parameter)
    requires_grad = bool(t.requires_grad)
    if t.is_conj() or t.is_neg():
        t = t.detach().resolve_conj().resolve_neg()
    return t, requires_grad, param


def _with_grad(t, requires_grad, param):
    """The received data ``t`` as the sender had it: a leaf (no graph travels),
    a Parameter where it was one."""
    import torch

    if param:
        return torch.nn.Parameter(t, requires_grad=requires_grad)
    if requires_grad:
        t.requires_grad_(True)
    return t


def _inline_tensor(t, nbytes, requires_grad, param):
    """The inline descriptor of a small tensor: ``(None, raw, dtype, shape, requires_grad, param)``.

    ``t`` is plain (a Tensor or Parameter without Python attributes: :func:`_typed_tensor`
    sends the others) with its values as they read (:func:`_plain_values`).  ``raw`` holds
    them in C order (views are compacted).
    """
    if not t.is_contiguous():
        t = t.detach().contiguous()
    # The bytes of the dtype as they lie, whatever it is (bfloat16, float8, bool,
    # complex...): no detour through numpy dtypes.
    raw = ctypes.string_at(t.data_ptr(), nbytes) if nbytes else b""
    return (None, raw, _dtype_name(t.dtype), tuple(t.shape), requires_grad, param)


def _typed_tensor(plane, torch, t, enc):
    """``("x", cls, data, requires_grad, state)`` for a tensor subclass, or a tensor with
    Python attributes, whose data is ordinary memory; None for torch's pickle.

    What torch's own ``Tensor.__reduce_ex__`` sends (the data, the class, and the state
    from ``torch._utils._get_obj_state``), with the data as the plane sends a plain
    tensor: inline when small, else through shared memory -- moved in place like any
    other, so the subclass tensor, which shares the storage, lives there too.
    :func:`_rebuild_typed` makes the class and state again as torch's
    ``_rebuild_from_type_v2`` does.

    Declined (None), so that torch's pickle (or the class's own) sends them whole: a
    class with its own ``__reduce_ex__`` (its reduce knows what it needs), and one with a
    ``__torch_dispatch__`` (a wrapper subclass made by ``_make_wrapper_subclass`` has no
    storage of its own, and detaching it would hand back whatever its dispatch returns).
    A Parameter subclass keeps its class (torch's pickle makes it a plain Parameter).
    """
    cls = type(t)
    tensor = torch.Tensor
    if cls.__torch_dispatch__ is not tensor.__torch_dispatch__ \
            or (cls.__reduce_ex__ is not tensor.__reduce_ex__
                and cls.__reduce_ex__ is not torch.nn.Parameter.__reduce_ex__):
        return None
    # The class's __torch_function__ stays out of it: it may rewrap what detach()
    # returns, or override what a plain tensor reports (ComfyUI-GGUF's GGMLTensor's
    # ``shape`` is the dequantized shape, not its data's).
    with torch._C.DisableTorchFunctionSubclass():
        requires_grad = bool(t.requires_grad)
        data = t.detach()                 # a plain tensor on the same storage
    state = torch._utils._get_obj_state(t)
    desc = plane._encode(data, enc)
    if desc is None:
        return None                       # sparse, quantized, on another device...
    return ("x", cls, desc, requires_grad, state)


def _rebuild_typed(torch, cls, t, requires_grad, state):
    """The tensor :func:`_typed_tensor` described, of class ``cls``, over the plain
    received tensor ``t`` (no copy), a leaf like every received tensor."""
    if cls is torch.Tensor:
        if requires_grad:
            t.requires_grad_(True)
    else:
        # What Parameter.__new__ does for a subclass; as_subclass (torch's rebuild)
        # would keep an autograd edge to ``t`` where the sender had a leaf.
        t = torch.Tensor._make_subclass(cls, t, requires_grad)
    # torch's own rebuild restores the state: the class's __setstate__, or the
    # attributes (and slots) set one by one.
    return torch._tensor._rebuild_from_type_v2(_same, cls, (t,), state)


def _same(t):
    return t


def _inline_tensor_decode(desc):
    import torch

    _, raw, dtype_name, shape, requires_grad, param = desc
    # A tensor of its own (resizable, writable), not a view of the frame's bytes.
    t = torch.empty(shape, dtype=_torch_dtype(dtype_name))
    nbytes = t.numel() * t.element_size()
    if len(raw) != nbytes:
        raise ValueError(f"inline tensor of {dtype_name}{list(shape)} arrived with "
                         f"{len(raw)} bytes, not {nbytes} (protocol error)")
    if nbytes:
        ctypes.memmove(t.data_ptr(), raw, nbytes)
    return _with_grad(t, requires_grad, param)


def _may_move(t, lo, hi):
    """Should the executor move ``t``'s storage into shared memory before sending it?"""
    storage = t.untyped_storage()
    size = storage.nbytes()
    if size < MOVE_MIN_BYTES or size > _MOVE_SLACK * (hi - lo):
        return None
    # Only memory torch's own allocator gave (resizable storages): a storage over
    # numpy's memory (torch.from_numpy), a buffer, a mapped file (torch.load(mmap=True))
    # or one of our segments must keep aliasing what it aliases.  So must a storage in
    # torch's shared memory (``share_memory_()``, a torch.multiprocessing queue): it
    # reports resizable(), but other processes may have it mapped, and after a move
    # they would no longer see this process's writes, nor it theirs.
    if not storage.resizable() or storage.is_shared() \
            or shm.find_segment(storage.data_ptr(), size) is not None:
        return None
    try:
        if t.is_pinned():             # page-locked for fast host-to-GPU copies: keep it so
            return None
    except RuntimeError:              # no CUDA: nothing is pinned
        pass
    return storage


def move_storage(storage):
    """Move a torch CPU storage into an arena block in place: True once it lives in one
    (moved now, or by another thread meanwhile), False where torch cannot.

    What ``Tensor.share_memory_()`` does, into our memfd arena rather than torch's
    ``/dev/shm`` files (which hold one fd per storage for its whole life, and a
    64 MiB ``/dev/shm`` in a container cannot take them): the bytes are copied once
    into a block, then the storage's data pointer is swapped for the block's, so
    every tensor and view on this storage -- the caller's own objects -- now reads
    and writes the block.  The block counts one user (its holder, kept by the
    storage's deleter) until the storage is freed, then it goes back to the arena;
    the arena only ever trims free blocks.

    The old memory is no longer the storage's once this returns: it is freed on the
    releaser thread (:class:`_Releaser`), not here, so the sender does not wait for
    the unmapping of a big allocation.  The caller must not be computing on the
    storage in another thread meanwhile, and raw-pointer exports made before
    (``t.numpy()``, DLPack) are left pointing at freed memory -- ``share_memory_()``
    has the same rules.
    The storage can no longer grow (``resize_`` past its size raises): the block is
    fixed-size, and the storage now has torch's non-resizable deleter-backed kind.
    """
    import torch

    swap = getattr(storage, "_swap_data_ptr_", None)    # private torch API: may go away
    if swap is None:
        return False
    nbytes = storage.nbytes()
    # Two threads sending the same tensor: the second must not copy from memory the
    # first has just freed (the memmove releases the GIL), nor move it twice.
    with _move_lock:
        if shm.find_segment(storage.data_ptr(), nbytes) is not None:
            return True             # moved meanwhile
        rec = shm.ARENA.allocate(nbytes)
        holder = shm.holder_for(rec)
        # A storage of exactly nbytes over the block; it keeps ``holder`` alive.
        block = torch.frombuffer(holder, dtype=torch.uint8, count=nbytes).untyped_storage()
        ctypes.memmove(block.data_ptr(), storage.data_ptr(), nbytes)
        try:
            swap(block)
        except (RuntimeError, TypeError):
            return False            # torch refused: nothing changed; the block goes back
        shm.STATS["moves"] += 1
        shm.STATS["moved_bytes"] += nbytes
    # ``block`` now owns the old memory: the box holds its only reference, so the
    # memory is freed where the releaser empties the box.
    box = [block]
    del block
    _RELEASER.release(box)
    return True


_move_lock = threading.Lock()


def _free(box):
    """Drop the storage in ``box`` (its only reference): torch frees its memory here.

    Torch frees a storage with the GIL held, and unmapping a big allocation is mostly
    giving back its pages: a free on another thread would still stall the sender's
    Python for that long.  So the whole pages inside the allocation are given back
    first with ``madvise(MADV_DONTNEED)`` through ctypes, which releases the GIL; the
    contents are dead anyway (the data now lives in the arena block), and the memory
    stays mapped and owned by the allocator, which then frees an empty range.
    """
    storage = box[0]
    lo = -(-storage.data_ptr() // _PAGE) * _PAGE
    hi = (storage.data_ptr() + storage.nbytes()) // _PAGE * _PAGE
    if _madvise is not None and hi - lo >= _MADVISE_MIN:
        _madvise(lo, hi - lo, mmap.MADV_DONTNEED)     # best effort: on failure torch frees all
    del storage
    box.clear()


_PAGE = mmap.PAGESIZE
_MADVISE_MIN = 1 << 20          # below this the free is cheap: one call is not worth it
try:
    _madvise = ctypes.CDLL(None, use_errno=True).madvise
    _madvise.restype = ctypes.c_int
    _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    mmap.MADV_DONTNEED  # noqa: B018 -- Linux/BSD only
except (AttributeError, OSError):
    _madvise = None


class _Releaser:
    """Frees the memory moved storages leave behind, on a thread of its own.

    Freeing a big allocation (an munmap of every page) costs about as much as the copy
    that moved it; done inside ``submit`` it would make a new tensor's first send
    slower than copying it, which frees that memory only when the caller drops the
    tensor.  The queue is bounded: a sender that outruns the releaser waits for it
    (back-pressure), so at most ``maxsize`` old allocations are pending at any time.
    Where no thread may start (interpreter exit) the memory is freed inline, as
    before.  A fork child starts with a fresh queue and no thread (its copy of the
    parent's queue may hold a lock of a thread that does not exist there).
    """

    def __init__(self, maxsize=2):
        self._maxsize = maxsize
        self._lock = threading.Lock()
        self._queue = queue.Queue(maxsize)
        self._thread = None

    def release(self, box):
        # At exit a daemon thread may already be frozen: never wait on it then.
        if lifetime.exiting() or not self._running():
            _free(box)
            return
        self._queue.put(box)            # blocks while maxsize boxes are pending

    def _running(self):
        if self._thread is not None and self._thread.is_alive():
            return True
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                # A fresh queue: anything the old one still holds was never taken
                # (no thread ran it) and is freed with it.
                self._queue = queue.Queue(self._maxsize)
                self._thread = lifetime.start_thread(
                    self._run, "comfy_env-releaser", (self._queue,))
            return self._thread is not None

    @staticmethod
    def _run(q):
        while True:
            box = q.get()
            try:
                _free(box)
            finally:
                del box
                q.task_done()

    def join(self):
        """Wait until every pending allocation is freed."""
        self._queue.join()

    def _after_fork(self):
        self._lock = threading.Lock()
        self._queue = queue.Queue(self._maxsize)
        self._thread = None


_RELEASER = _Releaser()
forksafe.on_fork_child(_RELEASER._after_fork)


class TorchCPUPlane(_SegmentPlane):
    """torch CPU tensors.  Descriptors::

        (None, raw, dtype, shape, requires_grad, param)     a small tensor, inline
        (ref, offset, dtype, shape, strides, requires_grad, param, start)
                                                            in a shared-memory segment
        ("x", cls, data, requires_grad, state)              a subclass, or a tensor with
                                                            Python attributes: ``data`` is
                                                            one of the above (_typed_tensor)
    """

    name = "tcpu"
    types = ("torch.Tensor",)

    def _encode(self, t, enc):
        torch = sys.modules["torch"]      # loaded: one of its tensors is here
        tp = type(t)
        if (tp is not torch.Tensor and tp is not torch.nn.Parameter) or t.__dict__:
            return _typed_tensor(self, torch, t, enc)
        if t.device.type != "cpu" or t.layout is not torch.strided or t.is_quantized \
                or t.is_nested:
            return None
        item = t.element_size()
        nbytes = t.numel() * item
        orig = t
        t, requires_grad, param = _plain_values(t)
        ptr = t.data_ptr()
        # Small tensors travel inline, unless they already live in one of our segments
        # (shared_like, a view of a moved storage, a peer's): a copy would break the
        # sharing, so the descriptor goes whatever the size.
        shared = nbytes > 0 and _in_segment(ptr)
        if nbytes < INLINE_BYTES and not shared:
            return _inline_tensor(t, nbytes, requires_grad, param)
        strides_b = [s * item for s in t.stride()]
        lo, hi = _span(ptr, t.shape, strides_b, item)
        if not shared and t is orig and enc.fb.share_tensors_in_place:
            storage = _may_move(t, lo, hi)
            if storage is not None and move_storage(storage):
                ptr = t.data_ptr()
                lo, hi = _span(ptr, t.shape, strides_b, item)
                shared = True
        # A sparse view is compacted (one copy of its values) unless its memory is
        # shared already: then the descriptor costs nothing.
        if not shared and hi - lo > _SPAN_SLACK * nbytes:
            t = t.contiguous()
            ptr = t.data_ptr()
            strides_b = [s * item for s in t.stride()]
            lo, hi = _span(ptr, t.shape, strides_b, item)
        # Keep storage_offset: start the copy at the storage's start when that
        # costs at most as much again (t[1:] yes, t[-1000:] of a huge tensor no).
        start = t.untyped_storage().data_ptr()
        if start < lo and lo - start <= nbytes:
            lo = start
        idx, off = _place(self, enc, ptr, lo, hi)
        seg_start = off - (ptr - lo)
        return (idx, off, _dtype_name(t.dtype), tuple(t.shape), tuple(t.stride()),
                requires_grad, param, seg_start)

    def _decode(self, desc, dec):
        try:
            import torch
        except ImportError:
            raise _missing("torch", "torch.Tensor") from None
        head = desc[0]
        if head is None:             # a small tensor, inline
            return _inline_tensor_decode(desc)
        if type(head) is str:        # "x": a subclass or a tensor with attributes
            _, cls, data, requires_grad, state = desc
            return _rebuild_typed(torch, cls, self._decode(data, dec), requires_grad, state)
        idx, off, dtype_name, shape, strides, requires_grad, param, start = desc
        rec = dec.record(idx)
        t = tensor_on_record(rec, off, _torch_dtype(dtype_name), shape, strides,
                             holder=_holder(dec, idx), start=start)
        return _with_grad(t, requires_grad, param)


def tensor_on_record(record, offset, dtype, shape, strides, holder=None, start=0):
    """A torch tensor over ``record``'s segment: storage from byte ``start``, element 0 at ``offset``."""
    try:
        import numpy as np
    except ImportError:
        raise _missing("numpy", "torch.Tensor (torch tensors are mapped through numpy)") from None
    import torch

    if holder is None:
        holder = shm.holder_for(record)
    item = torch.empty((), dtype=dtype).element_size()
    if (offset - start) % item or start % item:
        raise ValueError(f"tensor data at byte {offset} is not aligned to its {item}-byte dtype")
    size = record.resource.size
    count = (size - start) // item * item
    base = torch.from_numpy(np.frombuffer(holder, dtype=np.uint8, count=count, offset=start))
    flat = base.view(dtype) if dtype != torch.uint8 else base
    return torch.as_strided(flat, shape, strides, (offset - start) // item)


# -- public helpers: arrays born in shared memory -----------------------------------
def shared_empty(shape: int | tuple[int, ...], dtype: Any = float,
                 order: str = "C") -> numpy.ndarray:
    """A numpy array in comfy_env shared memory: passed to workers with no copy at all.

    Like ``numpy.empty(shape, dtype, order)`` (the contents are undefined).
    Arrays received from workers already live there; this is for inputs you
    build yourself (fill it, then submit it).  A worker that writes into it
    writes into this process's array: the memory is shared, not copied.

    Raises:
        TypeError: ``dtype`` holds Python objects, which cannot live in shared memory.
    """
    import numpy as np

    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise TypeError(f"shared_empty: dtype {dtype} holds Python objects, which cannot live "
                        f"in shared memory")
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    rec = shm.ARENA.allocate(max(nbytes, 1))
    holder = shm.holder_for(rec)
    return np.ndarray(shape, dtype, buffer=holder, offset=0, order=order)


def shared_like(arr: Any) -> Any:
    """A copy of ``arr`` (numpy array or torch CPU tensor) in comfy_env shared memory.

    Returns the same kind of object: a C-contiguous numpy array (anything
    ``numpy.asarray`` accepts becomes one) or a torch CPU tensor (keeping
    ``requires_grad``).  Pay the copy once; every later ``submit`` of the copy
    sends it with no copy at all.

    Raises:
        ValueError: a CUDA tensor (those travel through CUDA pools already).
    """
    mod = type(arr).__module__
    if mod.startswith("torch"):
        import torch

        t = arr.detach()
        if t.device.type != "cpu":
            raise ValueError(f"shared_like: tensor is on {t.device}; only CPU tensors live in "
                             f"shared memory (CUDA tensors travel through CUDA pools)")
        nbytes = t.numel() * t.element_size()
        rec = shm.ARENA.allocate(max(nbytes, 1))
        out = tensor_on_record(rec, 0, t.dtype, tuple(t.shape), _contiguous_strides(t.shape))
        out.copy_(t)
        if arr.requires_grad:
            out.requires_grad_(True)
        return out
    import numpy as np

    arr = np.asarray(arr)
    out = shared_empty(arr.shape, arr.dtype)
    np.copyto(out, arr)
    return out


def _contiguous_strides(shape):
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


# The instances planes.py registers with the codec (portable pickles use NUMPY_PLANE too).
NUMPY_PLANE = NumpyPlane()
TORCH_CPU_PLANE = TorchCPUPlane()
