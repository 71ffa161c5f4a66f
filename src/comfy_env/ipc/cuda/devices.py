"""Devices by identity: UUIDs, ordinals, and making a device's context current.

Two processes can number the same GPU differently (each may run under its own
``CUDA_VISIBLE_DEVICES``), so descriptors name a device by its UUID and each side
maps the UUID to its own ordinal.  Torch's device index and the driver ordinal are
the same number within one process (both count visible devices).

Driver calls that touch memory need a context current in the calling thread; the
ledger's flusher thread frees imported memory, so :func:`use` makes the device's
primary context (the one torch shares) current wherever we are.

That switch must not leak into the caller's code: the current context *is* torch's
current device (``torch.cuda.current_device()`` asks the runtime, which answers from
the thread's current primary context), so decoding a tensor of ``cuda:1`` would leave
a caller on ``cuda:0`` allocating on ``cuda:1`` afterwards.  Every entry into the plane
from code we don't own runs under :data:`CALLER` (or :func:`keeps_caller_context`),
which puts back the context :func:`use` displaced.
"""
from __future__ import annotations

import ctypes as C
import functools
import threading

from . import driver as D

__all__ = ["uuid_of", "ordinal_of", "use", "count", "name_of", "peers_of", "access_for", "UnknownDevice",
           "CALLER", "keeps_caller_context"]


class UnknownDevice(LookupError):
    """A descriptor names a GPU this process cannot see."""


_lock = threading.Lock()
_uuids = {}          # ordinal -> uuid hex
_by_uuid = {}        # uuid hex -> ordinal
_contexts = {}       # ordinal -> primary CUcontext (retained for the process's life)
_peers = {}          # ordinal -> ordinals that can access its memory peer-to-peer

# Per thread: how deep in CALLER scopes we are, and the context the first use() in the
# outermost scope displaced (_UNSET: none displaced; None: no context was current).
_tls = threading.local()
_UNSET = object()


def count() -> int:
    n = C.c_int()
    D.call("cuDeviceGetCount", C.byref(n))
    return n.value


def uuid_of(ordinal: int) -> str:
    """The GPU's UUID as 32 hex digits (what ``nvidia-smi -L`` shows, without dashes)."""
    u = _uuids.get(ordinal)
    if u is not None:
        return u
    n = count()
    if not 0 <= ordinal < n:
        raise UnknownDevice(f"CUDA device {ordinal} does not exist here ({n} visible)")
    raw = D.Uuid()
    name = "cuDeviceGetUuid_v2" if D.has("cuDeviceGetUuid_v2") else "cuDeviceGetUuid"
    D.call(name, C.byref(raw), ordinal)
    u = bytes(raw.bytes).hex()
    with _lock:
        _uuids[ordinal] = u
        _by_uuid[u] = ordinal
    return u


def ordinal_of(uuid: str) -> int:
    """This process's ordinal for the GPU with ``uuid``; :class:`UnknownDevice` if not visible."""
    o = _by_uuid.get(uuid)
    if o is not None:
        return o
    for i in range(count()):
        if uuid_of(i) == uuid:
            return i
    raise UnknownDevice(
        f"the tensor lives on GPU {uuid}, which this process cannot see "
        f"(check CUDA_VISIBLE_DEVICES of both processes)")


def name_of(ordinal: int) -> str:
    buf = C.create_string_buffer(256)
    D.call("cuDeviceGetName", buf, 256, ordinal)
    return buf.value.decode(errors="replace")


def use(ordinal: int) -> None:
    """Make ``ordinal``'s primary context current in this thread.

    Checked on every call rather than cached per thread: torch switches contexts
    behind our back (``torch.cuda.device(...)``), and a pool or stream call made in
    the wrong context fails or lands on the wrong GPU.
    """
    ctx = _contexts.get(ordinal)
    if ctx is None:
        with _lock:
            ctx = _contexts.get(ordinal)
            if ctx is None:
                h = C.c_void_p()
                # Retained, never released: torch shares this context and our pools and
                # imports live in it for the whole process.
                D.call("cuDevicePrimaryCtxRetain", C.byref(h), ordinal)
                ctx = _contexts[ordinal] = h.value
    cur = C.c_void_p()
    if D.try_call("cuCtxGetCurrent", C.byref(cur)) != 0 or cur.value != ctx:
        if getattr(_tls, "depth", 0) and _tls.displaced is _UNSET:
            _tls.displaced = cur.value
        D.call("cuCtxSetCurrent", ctx)


class _CallerContext:
    """``with CALLER:`` — the calling thread's current CUDA context (so torch's current
    device) is on exit what it was on entry, however many devices :func:`use` visited.

    Costs nothing when no device switch happened: :func:`use` already reads the
    current context before it switches, and notes the one it displaced.  Scopes nest;
    the outermost restores.  Re-entrant per thread, shared across threads (the state
    is thread-local)."""
    __slots__ = ()

    def __enter__(self):
        depth = getattr(_tls, "depth", 0)
        if depth == 0:
            _tls.displaced = _UNSET
        _tls.depth = depth + 1
        return self

    def __exit__(self, *exc):
        _tls.depth -= 1
        if _tls.depth == 0 and _tls.displaced is not _UNSET:
            ctx, _tls.displaced = _tls.displaced, _UNSET
            # Not raising: the scope's own result or error is what the caller must see,
            # and a context that can't be made current again has nothing left to run.
            D.try_call("cuCtxSetCurrent", ctx)
        return False


CALLER = _CallerContext()


def keeps_caller_context(fn):
    """Decorator: ``fn`` runs under :data:`CALLER`.

    :class:`_CallerContext`'s steps written out inline: the plane's per-tensor hooks
    run under it, and a ``with`` block's two method calls cost ~0.5 µs a tensor."""
    tls = _tls

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        depth = getattr(tls, "depth", 0)
        if depth == 0:
            tls.displaced = _UNSET
        tls.depth = depth + 1
        try:
            return fn(*args, **kwargs)
        finally:
            tls.depth = depth
            if depth == 0 and tls.displaced is not _UNSET:
                ctx, tls.displaced = tls.displaced, _UNSET
                D.try_call("cuCtxSetCurrent", ctx)
    return wrapper


def peers_of(ordinal: int):
    """Other visible GPUs that can read and write ``ordinal``'s memory peer-to-peer."""
    p = _peers.get(ordinal)
    if p is None:
        out = []
        for other in range(count()):
            if other == ordinal:
                continue
            v = C.c_int(0)
            if D.try_call("cuDeviceCanAccessPeer", C.byref(v), other, ordinal) == 0 and v.value:
                out.append(other)
        p = _peers[ordinal] = tuple(out)
    return p


def access_for(ordinal: int, peers: bool = True):
    """``(descs, n)``: read-write access to memory on ``ordinal`` for ``ordinal`` itself and,
    with ``peers``, for every GPU that can reach it peer-to-peer (so a tensor received
    on one GPU is readable by kernels and copies running on another: multi-GPU hand-off
    without a trip through host memory)."""
    devs = (ordinal,) + (peers_of(ordinal) if peers else ())
    arr = (D.MemAccessDesc * len(devs))(
        *[D.MemAccessDesc(D.MemLocation(D.MEM_LOCATION_DEVICE, o), D.ACCESS_READWRITE) for o in devs])
    return arr, len(devs)
