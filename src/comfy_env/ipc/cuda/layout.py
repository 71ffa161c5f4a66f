"""What travels in place of a CUDA tensor: the descriptor, and the arithmetic on it.

Pure Python, no torch and no CUDA: both sides validate what they receive here, and
the CPU-only tests pin the rules down.

A descriptor says where the tensor's bytes are (``route`` + ``ref``, the index of a
block in the message part's refs), how to view them (dtype, shape, strides in
elements, byte offset of the first element from the block's base), which GPU they
live on (UUID, plus the sender's index for messages), and which interprocess event
the receiver must wait on before reading.
"""
from __future__ import annotations

import struct
from typing import NamedTuple, Optional, Tuple

__all__ = ["CudaTensorDesc", "DescriptorError", "ITEMSIZE", "ROUTES", "span_bytes", "validate",
           "pack", "pack_fields", "unpack", "PoolMeta", "VmmMeta", "IpcMeta", "pool_meta", "vmm_meta", "ipc_meta",
           "validate_meta", "BLOCK_ROUTES"]

VERSION = 1

# Routes a tensor can take (see paths.py for how one is chosen):
ROUTES = (
    "pool",      # zero copy: the sender's export pool (worker heap), pointer exported
    "staging",   # one device copy into the sender's exportable staging pool
    "vmm",       # one device copy into a VMM allocation exported as an fd (any size)
    "empty",     # no elements: nothing to share
    "cpu",       # fallback through host memory; lands back on the same GPU
    "ipc",       # zero copy: the sender's allocation (native allocator), a legacy CUDA IPC handle
)

# Routes whose descriptor names a block in the part's refs.
BLOCK_ROUTES = frozenset(("pool", "staging", "vmm", "ipc"))

# Every torch dtype we can rebuild by reinterpreting raw bytes (name -> itemsize).
ITEMSIZE = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
    "complex128": 16, "complex64": 8, "complex32": 4,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1,
    "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1, "bool": 1,
}

MAX_DIMS = 64


class DescriptorError(ValueError):
    """A CUDA tensor descriptor (or block meta) is malformed."""


class CudaTensorDesc(NamedTuple):
    version: int
    route: str
    ref: int                      # index into the part's refs, -1 when no block
    dtype: str
    shape: Tuple[int, ...]
    strides: Tuple[int, ...]      # in elements
    offset: int                   # bytes from the block base to element [0, 0, ...]
    device_uuid: str              # 32 hex digits
    device_index: int             # the sender's ordinal (informational)
    event: Optional[tuple]        # (owner_uid, owner_ordinal, slot, handle: 64 bytes) or None
    requires_grad: bool
    host: object = None           # the CPU copy, route "cpu" only
    seq: int = 0                  # staging blocks: which lend of the block this is (see sender.py)


_new_desc = tuple.__new__


def span_bytes(shape, strides, itemsize) -> int:
    """Bytes from the first element to the end of the last one a strided view touches."""
    last = 0
    empty = False
    for n, s in zip(shape, strides):
        if s < 0:
            raise DescriptorError(f"negative strides are not supported: {tuple(strides)}")
        if n == 0:
            empty = True
        last += (n - 1) * s
    return 0 if empty else (last + 1) * itemsize


def _is_uuid(u) -> bool:
    if not isinstance(u, str) or len(u) != 32:
        return False
    try:
        int(u, 16)
    except ValueError:
        return False
    return True


def validate(desc) -> CudaTensorDesc:
    """Check a received descriptor; returns it, or raises :class:`DescriptorError`."""
    if not isinstance(desc, CudaTensorDesc):
        raise DescriptorError(f"expected a CudaTensorDesc, got {type(desc).__name__}")
    if desc.version != VERSION:
        raise DescriptorError(f"descriptor version {desc.version!r}, this side speaks {VERSION} "
                              "(both sides must run the same comfy_env)")
    if desc.route not in ROUTES:
        raise DescriptorError(f"unknown route {desc.route!r}")
    if desc.dtype not in ITEMSIZE:
        raise DescriptorError(f"unsupported dtype {desc.dtype!r}")
    shape, strides = desc.shape, desc.strides
    if not isinstance(shape, tuple) or not isinstance(strides, tuple) or len(shape) != len(strides):
        raise DescriptorError(f"shape {shape!r} and strides {strides!r} must be tuples of one length")
    if len(shape) > MAX_DIMS:
        raise DescriptorError(f"{len(shape)} dimensions (at most {MAX_DIMS})")
    for v in shape + strides:
        if type(v) is not int or v < 0:
            raise DescriptorError(f"shape and strides must be non-negative ints: {shape}, {strides}")
    if type(desc.offset) is not int or desc.offset < 0:
        raise DescriptorError(f"bad offset {desc.offset!r}")
    if desc.offset % ITEMSIZE[desc.dtype]:
        raise DescriptorError(f"offset {desc.offset} is not a multiple of {desc.dtype}'s size")
    if not _is_uuid(desc.device_uuid):
        raise DescriptorError(f"bad device uuid {desc.device_uuid!r}")
    needs_block = desc.route in BLOCK_ROUTES
    if needs_block != (type(desc.ref) is int and desc.ref >= 0):
        raise DescriptorError(f"route {desc.route!r} with ref {desc.ref!r}")
    if desc.event is not None:
        ev = desc.event
        if (not isinstance(ev, tuple) or len(ev) != 4 or not isinstance(ev[3], bytes)
                or len(ev[3]) != 64 or type(ev[1]) is not int or type(ev[2]) is not int):
            raise DescriptorError(f"bad event {ev!r}")
    if desc.route == "cpu" and desc.host is None:
        raise DescriptorError("route 'cpu' without its host tensor")
    if type(desc.seq) is not int or desc.seq < 0:
        raise DescriptorError(f"bad lend sequence number {desc.seq!r}")
    return desc


# -- the wire form: one bytes object per descriptor ------------------------------------------
# Why by hand: pickling the named tuple costs a persistent_id call and a pickle opcode
# per field and per shape element (~20 per tensor), the largest share of a small
# tensor's encode and decode.  struct does it in one call each way; the result is
# still checked by validate() after unpacking.  The "cpu" route carries a host tensor
# and keeps the named tuple.
_DTYPES = tuple(ITEMSIZE)
_DTYPE_CODE = {name: i for i, name in enumerate(_DTYPES)}
_ROUTE_CODE = {name: i for i, name in enumerate(ROUTES)}
_HEAD = struct.Struct("<BBBBBiiQQ16s")   # version route dtype flags ndim ref index offset seq uuid
_EVENT = struct.Struct("<16sii64s")      # owner uid, owner ordinal, slot, handle
_GRAD, _HAS_EVENT = 1, 2


_DIMS = [struct.Struct(f"<{2 * n}q") for n in range(MAX_DIMS + 1)]
# Small caches of what every tensor of a device or an event slot repeats (a handful of
# GPUs per process; an event ring's slots): they skip a hex conversion or a struct
# call per tensor.  Bounded anyway: cleared when they outgrow _CACHED.
_CACHED = 4096
_UUID_BYTES = {}                         # uuid hex -> 16 bytes
_UUID_HEX = {}                           # 16 bytes -> uuid hex
_EVENT_BYTES = {}                        # event tuple -> packed
_EVENT_TUPLE = {}                        # packed -> event tuple


def _remember(cache, key, value):
    if len(cache) >= _CACHED:
        cache.clear()
    cache[key] = value
    return value


def pack(desc: CudaTensorDesc) -> bytes:
    """The descriptor as bytes (any route but "cpu")."""
    if desc.route == "cpu":
        raise DescriptorError("route 'cpu' descriptors carry a tensor and are not packed")
    return pack_fields(*desc[:11], seq=desc.seq)


def pack_fields(version, route, ref, dtype, shape, strides, offset, device_uuid, device_index, event,
                requires_grad, seq=0) -> bytes:
    """:func:`pack` without building the named tuple first (the encode path)."""
    n = len(shape)
    if n > MAX_DIMS:
        raise DescriptorError(f"{n} dimensions (at most {MAX_DIMS})")
    flags = (_GRAD if requires_grad else 0) | (_HAS_EVENT if event is not None else 0)
    try:
        uuid = _UUID_BYTES.get(device_uuid)
        if uuid is None:
            uuid = _remember(_UUID_BYTES, device_uuid, bytes.fromhex(device_uuid))
        out = (_HEAD.pack(version, _ROUTE_CODE[route], _DTYPE_CODE[dtype], flags, n, ref, device_index, offset,
                          seq, uuid)
               + _DIMS[n].pack(*shape, *strides))
        if event is not None:
            packed = _EVENT_BYTES.get(event)
            if packed is None:
                owner, ordinal, slot, handle = event
                packed = _remember(_EVENT_BYTES, event, _EVENT.pack(owner.encode("ascii"), ordinal, slot, handle))
            out += packed
    except (KeyError, ValueError, struct.error, AttributeError, TypeError) as exc:
        raise DescriptorError(f"cannot pack CUDA descriptor {(route, dtype, shape, strides)!r}: {exc}") from None
    return out


def unpack(data: bytes) -> CudaTensorDesc:
    """Inverse of :func:`pack`, checked as :func:`validate` checks (the fields' types are
    struct's, so only their values need checking); malformed input raises
    :class:`DescriptorError`."""
    try:
        version, route, dtype, flags, n, ref, index, offset, seq, uuid = _HEAD.unpack_from(data, 0)
        if version != VERSION:
            raise DescriptorError(f"descriptor version {version!r}, this side speaks {VERSION} "
                                  "(both sides must run the same comfy_env)")
        if n > MAX_DIMS:
            raise DescriptorError(f"{n} dimensions (at most {MAX_DIMS})")
        pos = _HEAD.size
        dims = _DIMS[n].unpack_from(data, pos)
        pos += 16 * n
        event = None
        if flags & _HAS_EVENT:
            raw = data[pos:pos + _EVENT.size]
            event = _EVENT_TUPLE.get(raw)
            if event is None:
                owner, ordinal, slot, handle = _EVENT.unpack(raw)
                event = _remember(_EVENT_TUPLE, raw, (owner.decode("ascii"), ordinal, slot, handle))
            pos += _EVENT.size
        if pos != len(data):
            raise DescriptorError(f"{len(data) - pos} stray bytes after the descriptor")
        route = ROUTES[route]
        dtype = _DTYPES[dtype]
    except DescriptorError:
        raise
    except (struct.error, IndexError, UnicodeDecodeError, TypeError) as exc:
        raise DescriptorError(f"malformed CUDA descriptor ({len(data)} bytes): {exc}") from None
    if route == "cpu":
        raise DescriptorError("route 'cpu' cannot come packed (it carries a host tensor)")
    if dims and min(dims) < 0:
        raise DescriptorError(f"shape and strides must be non-negative: {dims[:n]}, {dims[n:]}")
    if offset % ITEMSIZE[dtype]:
        raise DescriptorError(f"offset {offset} is not a multiple of {dtype}'s size")
    if (route in BLOCK_ROUTES) != (ref >= 0):
        raise DescriptorError(f"route {route!r} with ref {ref!r}")
    hexed = _UUID_HEX.get(uuid)
    if hexed is None:
        hexed = _remember(_UUID_HEX, uuid, uuid.hex())
    # tuple.__new__: the named tuple without its Python-level __new__ (the fields are checked above).
    return _new_desc(CudaTensorDesc, (version, route, ref, dtype, dims[:n], dims[n:], offset, hexed, index, event,
                                      bool(flags & _GRAD), None, seq))


# -- block meta: rides in the part's refs, outside the pickle, so that the parent can
#    forward a worker's block to another worker without decoding anything.  On the wire
#    it is a plain tuple (the envelope is a plain pickle: no class of ours to look up);
#    validate_meta() gives the receiver the named form, equal to it field for field.
class PoolMeta(NamedTuple):
    """A pointer exported from one of the sender's pools."""
    kind: str                     # "pool"
    pool_key: Tuple[str, int]     # (owner_uid, generation serial): names the pool, whose fd travels once
    export: bytes                 # cuMemPoolExportPointer's 64 bytes
    device_uuid: str
    alloc_size: int               # bytes of the allocation (what an importer maps)

    @property
    def owner(self) -> str:
        return self.pool_key[0]


class VmmMeta(NamedTuple):
    """A VMM allocation; its fd travels with every message that names it."""
    kind: str                     # "vmm"
    size: int
    device_uuid: str


class IpcMeta(NamedTuple):
    """A storage in one of the sender's ``cuMemAlloc`` allocations (torch's native caching
    allocator), named by the allocation's legacy IPC handle.  No fd: the handle is plain
    bytes, so any process on the machine that sees the GPU opens it (a forwarder opens
    nothing)."""
    kind: str                     # "ipc"
    owner: str                    # the exporting process's uid (the handle's key with it)
    handle: bytes                 # cuIpcGetMemHandle's 64 bytes, of the allocation's base
    offset: int                   # bytes from the allocation's base to the storage
    size: int                     # bytes of the storage (what descriptors may view)
    alloc_size: int               # bytes of the allocation (what an importer maps)
    device_uuid: str
    # The owner sent this storage before (the same storage object, not only its address):
    # likely sent again (a kept output, weights), so the importer keeps the record in its
    # import cache until the owner reclaims it.  A first sight (a call's new output) is
    # released at once, so the owner's allocator can hand its memory to the next one.
    sent_before: bool = False


def pool_meta(pool_key, export_data: bytes, device_uuid, alloc_size):
    """The wire form of a pointer exported from pool ``pool_key`` = (owner_uid, generation serial)."""
    return ("pool", tuple(pool_key), bytes(export_data), device_uuid, int(alloc_size))


def vmm_meta(size, device_uuid):
    """The wire form of a VMM allocation of ``size`` bytes."""
    return ("vmm", int(size), device_uuid)


def ipc_meta(owner, handle: bytes, offset, size, alloc_size, device_uuid, sent_before=False):
    """The wire form of a storage at ``offset`` in an allocation of ``alloc_size`` bytes
    whose legacy IPC handle is ``handle``, exported by process ``owner`` (``sent_before``:
    see :class:`IpcMeta`)."""
    return ("ipc", owner, bytes(handle), int(offset), int(size), int(alloc_size), device_uuid, bool(sent_before))


def validate_meta(meta):
    """Check a received block meta (the wire form); returns its named form
    (:class:`PoolMeta`, :class:`VmmMeta` or :class:`IpcMeta`), or raises
    :class:`DescriptorError`."""
    if not isinstance(meta, tuple) or not meta:
        raise DescriptorError(f"bad CUDA block meta {meta!r}")
    kind = meta[0]
    if kind == "pool":
        if (len(meta) != 5 or not isinstance(meta[1], tuple) or len(meta[1]) != 2
                or not isinstance(meta[2], bytes) or len(meta[2]) != 64
                or not _is_uuid(meta[3]) or type(meta[4]) is not int or meta[4] <= 0):
            raise DescriptorError(f"bad pool block meta {meta!r}")
        return PoolMeta._make(meta)
    elif kind == "vmm":
        if len(meta) != 3 or type(meta[1]) is not int or meta[1] <= 0 or not _is_uuid(meta[2]):
            raise DescriptorError(f"bad VMM block meta {meta!r}")
        return VmmMeta._make(meta)
    elif kind == "ipc":
        return _validate_ipc_meta(meta)
    raise DescriptorError(f"unknown CUDA block kind {kind!r}")


def _validate_ipc_meta(meta):
    if len(meta) != 8:
        raise DescriptorError(f"bad CUDA IPC block meta: {len(meta)} fields, expected 8 "
                              "(kind, owner, handle, offset, size, alloc_size, device_uuid, sent_before)")
    _kind, owner, handle, offset, size, alloc_size, uuid, sent_before = meta
    if not isinstance(owner, str) or not owner:
        raise DescriptorError(f"bad CUDA IPC block meta: owner {owner!r} is not a process uid")
    if not isinstance(handle, bytes) or len(handle) != 64:
        raise DescriptorError(f"bad CUDA IPC block meta: the handle must be 64 bytes, got "
                              f"{len(handle) if isinstance(handle, bytes) else type(handle).__name__}")
    for name, v in (("offset", offset), ("size", size), ("alloc_size", alloc_size)):
        if type(v) is not int or v < 0:
            raise DescriptorError(f"bad CUDA IPC block meta: {name} {v!r} must be an int >= 0")
    if size <= 0 or offset + size > alloc_size:
        raise DescriptorError(f"bad CUDA IPC block meta: a storage of {size} bytes at offset {offset} "
                              f"does not fit its allocation of {alloc_size} bytes")
    if not _is_uuid(uuid):
        raise DescriptorError(f"bad CUDA IPC block meta: device uuid {uuid!r}")
    if type(sent_before) is not bool:
        raise DescriptorError(f"bad CUDA IPC block meta: sent_before {sent_before!r} must be a bool")
    return IpcMeta._make(meta)
