"""Which route a CUDA tensor takes, from probed capabilities.  Pure logic, no CUDA.

Inputs are facts, never guesses: :class:`Capabilities` is what *this* process proved
by doing the operation (creating and exporting a pool, a VMM allocation, an event);
:class:`PeerVerdicts` is what the *peer* reported after it actually imported a block
of each kind from us (see receiver.py: the first import of each kind is the probe, and
its outcome is posted back).  Unknown means "not tried yet", and trying is allowed:
a failed import is reported to the caller as a clear error and demotes the route for
that peer, it never crashes a process.

Order of preference, per tensor (``ipc`` is decided by the sender before it asks
:func:`choose`: it needs a driver call on the tensor's allocation, see sender.py):

0. ``ipc``     zero copy: the storage is above ``COMFY_ENV_CUDA_IPC_MIN_MIB`` (16), or
               was sent before (any size), and lives in a ``cuMemAlloc`` allocation
               (torch's native caching allocator, without expandable segments) whose
               legacy IPC handle this process could take, of at most the import limit;
               the peer opens the handle (once per allocation) and keeps the record of
               a storage sent before.  Smaller storages sent for the first time keep
               the copy below (one copy into a block the peer keeps mapped is cheaper
               than a record, an open and a release).

1. ``pool``    zero copy: the tensor already lives in our export pool (a worker whose
               torch runs ``backend:cudaMallocAsync`` allocates there), and its
               allocation is small enough to import safely.  Except a *small* tensor
               sent for the first time (``small_copy``, at most
               ``COMFY_ENV_CUDA_SMALL_COPY_MIB``, default 16): it takes ``staging``, because
               one device copy into a block the peer keeps mapped costs less than a fresh
               export + import + unmap (H100: copy ~1 µs of GPU time per MiB against
               ~17 + 11 + 10 µs of driver calls).  Sent again, the same tensor goes zero
               copy, and the peer's import cache keeps it mapped.
2. ``staging`` one device copy into our exportable staging pool (a tensor outside our
               export pool: a parent's under ``COMFY_ENV_CUDA_PARENT_HEAP=torch``, or
               allocated before the heap was installed; a worker's on the native
               allocator, below the ``ipc`` route's bound).
3. ``vmm``     one device copy into a VMM allocation exported as an fd: any size.
               Taken whenever the bytes exceed the pool import limit, because importing
               one pool allocation above ~5.1 GiB kills the importer (H100, driver 580).
4. ``cpu``     through host memory, back onto the same GPU, with a one-time warning.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ... import settings

__all__ = ["Capabilities", "PeerVerdicts", "choose", "import_limit", "small_copy_limit", "DEFAULT_IMPORT_LIMIT",
           "DEFAULT_SMALL_COPY", "POOL_WHY", "SMALL_COPY_WHY", "FRESH_COPY_WHY", "fresh_copy_limit", "IPC_WHY",
           "ipc_min_bytes"]

POOL_WHY = "zero copy: the tensor lives in this process's export pool"
SMALL_COPY_WHY = ("one device copy into the staging pool: a small tensor sent for the first time "
                  "(cheaper than exporting its allocation; COMFY_ENV_CUDA_SMALL_COPY_MIB)")
DEFAULT_SMALL_COPY = int(settings.default("COMFY_ENV_CUDA_SMALL_COPY_MIB") * (1 << 20))
FRESH_COPY_WHY = ("one device copy into a recycled staging block: a tensor sent for the first time "
                  "(a copy is cheaper than mapping a new export in the peer; COMFY_ENV_CUDA_FRESH_COPY_MIB)")

NATIVE_COPY_WHY = ("one device copy into a recycled staging block: a storage of torch's native allocator sent "
                   "for the first time, at most COMFY_ENV_CUDA_IPC_MIN_MIB (a copy is cheaper than lending it by "
                   "IPC handle: a record, an open and a release)")

IPC_WHY = ("zero copy: the storage's allocation (torch's native allocator) is lent by its legacy CUDA IPC "
           "handle (above COMFY_ENV_CUDA_IPC_MIN_MIB)")

# Importing one pool allocation of 5,264 MiB segfaulted the importer, 5,248 MiB did not
# (H100, driver 580.159.04).  4 GiB leaves a margin for other drivers and GPUs.
DEFAULT_IMPORT_LIMIT = settings.default("COMFY_ENV_CUDA_POOL_IMPORT_LIMIT_MIB") << 20


def import_limit() -> int:
    """Largest single pool allocation we let a peer import (env override, in MiB)."""
    return settings.read().cuda_pool_import_limit_mib << 20


def fresh_copy_limit(small_copy: int, limit: int) -> int:
    """Bytes of storage up to which a tensor first sent goes by copy (env, in MiB; 0: small ones only).

    Above ``small_copy`` only the bytes the view spans are copied.  Default: the pool
    import limit (every first-seen storage a peer could import), or 0 when small copies
    are off.  Why copy big ones too: mapping a new export costs the peer ~2.5 ms per GiB
    (import plus unmap, H100), a device copy into a block the peer keeps mapped ~0.8 ms.
    """
    mib = settings.read().cuda_fresh_copy_mib
    if mib is None:
        return limit if small_copy > 0 else 0
    # Never above the import limit (the staging block must be importable); never below
    # small_copy (a small first-seen storage is staged whole, whatever this says).
    return min(limit, max(small_copy, int(mib * (1 << 20))))


def ipc_min_bytes() -> int:
    """Bytes of storage above which a tensor on the native allocator goes by legacy IPC
    handle (env, in MiB; above the import limit: never)."""
    return int(settings.read().cuda_ipc_min_mib * (1 << 20))


def small_copy_limit() -> int:
    """Bytes up to which a tensor first sent goes by copy, not by export (env, in MiB; 0: never)."""
    return int(settings.read().cuda_small_copy_mib * (1 << 20))


@dataclass(frozen=True)
class Capabilities:
    """What this process proved it can do (all False with a reason when there is no CUDA)."""
    driver: bool = False          # libcuda loads, cuInit succeeds, a device exists
    pools: bool = False           # exportable (POSIX fd) pool created and exported
    vmm: bool = False             # VMM allocation created and exported as an fd
    events: bool = False          # interprocess event created and its handle taken
    reasons: dict = field(default_factory=dict)   # capability -> why it is missing

    @classmethod
    def none(cls, why):
        return cls(reasons={"driver": why})


@dataclass
class PeerVerdicts:
    """What a peer reported after importing our blocks: kind -> True / False / None (untried)."""
    pool: object = None
    vmm: object = None
    ipc: object = None
    reasons: dict = field(default_factory=dict)

    def ok(self, kind):
        return getattr(self, kind)

    def record(self, kind, ok, reason=""):
        setattr(self, kind, bool(ok))
        if not ok:
            self.reasons[kind] = reason


def choose(caps: Capabilities, peer: PeerVerdicts, *, nbytes: int, in_export_pool: bool,
           alloc_bytes: int, limit: int, small_copy: bool = False):
    """``(route, why)`` for a tensor whose view covers ``nbytes`` bytes.

    ``in_export_pool``: its allocation belongs to our export (heap) pool, of
    ``alloc_bytes`` bytes.  ``limit``: the largest pool allocation a peer may import.
    ``small_copy``: a small tensor sent for the first time (the caller checked the
    size against ``COMFY_ENV_CUDA_SMALL_COPY_MIB``): staged rather than exported.
    """
    if nbytes < 0 or alloc_bytes < 0 or limit <= 0:
        raise ValueError(f"bad sizes: nbytes={nbytes} alloc_bytes={alloc_bytes} limit={limit}")
    if nbytes == 0:
        return "empty", "no elements"
    if not caps.driver:
        return "cpu", f"no usable CUDA driver here ({caps.reasons.get('driver', 'unknown')})"
    pool_ok = caps.pools and peer.ok("pool") is not False
    vmm_ok = caps.vmm and peer.ok("vmm") is not False
    if small_copy and pool_ok and nbytes <= limit:
        return "staging", SMALL_COPY_WHY
    if in_export_pool and pool_ok:
        if alloc_bytes <= limit:
            return "pool", POOL_WHY
        # A view of a huge allocation: copy only what it covers (below).
    if pool_ok and nbytes <= limit:
        why = ("one device copy into the staging pool: "
               + ("its allocation is above the import limit" if in_export_pool
                  else "the tensor was not allocated from an export pool"))
        return "staging", why
    if vmm_ok:
        why = (f"one device copy into a VMM allocation: {nbytes} bytes exceed the pool import "
               f"limit of {limit}" if nbytes > limit else
               "one device copy into a VMM allocation: pool import is unavailable "
               f"({_why_not(caps, peer, 'pool')})")
        return "vmm", why
    why = []
    if not pool_ok or nbytes > limit:
        why.append("pool: " + (_why_not(caps, peer, "pool") if not pool_ok
                               else f"{nbytes} bytes exceed the import limit of {limit}"))
    why.append("vmm: " + _why_not(caps, peer, "vmm"))
    return "cpu", "; ".join(why)


def _why_not(caps, peer, kind):
    cap_name = "pools" if kind == "pool" else "vmm"
    if not getattr(caps, cap_name):
        return "this process cannot export: " + caps.reasons.get(cap_name, "not supported")
    return "the peer failed to import: " + peer.reasons.get(kind, "unknown reason")
