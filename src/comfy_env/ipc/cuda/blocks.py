"""The CUDA plane's blocks: what a ledger record's ``resource`` is, one small class per kind.

Owns nothing shared: each object is the state of one block, reached through its
ledger record (``record.resource``).  Who changes which field is said per class.

Blocks we export (``record.owned``), made by the sending side (``sender.py``):

* :class:`OwnedPool`: an allocation of our export pool (a worker's torch heap), lent
  zero copy.  Keeps the storage alive until every peer released it.
* :class:`OwnedStaging`: a copy of a tensor in our staging pool.  Recycled: a peer
  that keeps it mapped reports it idle, and the next copy of a fitting size goes into
  it and is lent again under the same key.
* :class:`OwnedVmm`: a copy of a big tensor in a VMM allocation.
* :class:`OwnedIpc`: a storage in a ``cuMemAlloc`` allocation (torch's native caching
  allocator), lent zero copy by the allocation's legacy IPC handle.  Keeps the storage
  alive until every peer released it.

Blocks a peer lent us (made by the receiving side, ``receiver.py``), imported only
when something decodes them:

* :class:`RemotePool`: a pointer of a peer's pool (zero-copy or staging block).
* :class:`RemoteVmm`: a peer's VMM allocation, with its fd.
* :class:`RemoteIpc`: a storage in a peer's allocation, opened by its legacy IPC handle
  (one mapping per handle in this process, shared: ``ipchandles.IpcImports``).

``kind`` names the class for messages and stats; for a remote block it is the kind
of its meta (``"pool"`` or ``"vmm"``).
"""
from __future__ import annotations

__all__ = ["OwnedPool", "OwnedStaging", "OwnedVmm", "OwnedIpc", "RemotePool", "RemoteVmm", "RemoteIpc"]


class OwnedPool:
    """An allocation of our export pool, lent zero copy.

    ``keep`` is the storage (the memory, not the tensor: the tensor's death is the
    signal that a peer's cached import pins memory we could reuse, see ``watch``).
    ``ptrs``: the data pointers the sender's pointer index maps to this block.
    """
    kind = "pool"
    __slots__ = ("ordinal", "ptr", "meta", "keep", "gen", "base", "alloc", "ptrs", "watch")

    def __init__(self, ordinal, base, meta, keep, gen, alloc):
        self.ordinal = ordinal
        self.ptr = self.base = base   # the allocation's base: what the peer imports
        self.meta = meta              # wire form (layout.pool_meta)
        self.keep = keep
        self.gen = gen                # the pools.Generation it was allocated from
        self.alloc = alloc            # the allocation's size
        self.ptrs = []
        self.watch = None             # weakref to the tensor first lent (Sender._tensor_died)

    def forward_fd(self):
        return self.gen.fd


class OwnedStaging:
    """A block of our staging pool holding one lent copy.

    ``busy`` while a lend is unanswered, ``seq`` counts the lends, ``ready`` is the
    peer's event that orders its last reads before our next copy.  These three change
    only under the sender's lock (``Sender._take_idle_staging``, ``Sender.on_idle``).
    """
    kind = "staging"
    __slots__ = ("ordinal", "ptr", "meta", "gen", "stream", "size", "busy", "seq", "ready")

    def __init__(self, ordinal, ptr, meta, gen, stream, size):
        self.ordinal = ordinal
        self.ptr = ptr
        self.meta = meta              # wire form (layout.pool_meta)
        self.gen = gen
        self.stream = stream          # the stream of our last copy into it (the free orders after it)
        self.size = size              # bytes allocated
        self.busy = True
        self.seq = 0
        self.ready = None

    def forward_fd(self):
        return self.gen.fd


class OwnedVmm:
    """A VMM allocation holding one lent copy of a big tensor."""
    kind = "vmm"
    __slots__ = ("ordinal", "ptr", "meta", "vmm", "stream")

    def __init__(self, ordinal, vmm, meta, stream):
        self.ordinal = ordinal
        self.ptr = vmm.ptr
        self.meta = meta              # wire form (layout.vmm_meta)
        self.vmm = vmm                # the vmm.VmmBlock
        self.stream = stream          # the stream of our copy into it

    def forward_fd(self):
        return self.vmm.fd


class OwnedIpc:
    """A storage of ours lent by the legacy IPC handle of its allocation (zero copy).

    ``keep`` is the storage: while a peer may have the allocation mapped, torch's
    caching allocator must neither reuse these bytes nor free the allocation (CUDA
    requires importers to close before the exporter frees).  ``base`` is the
    allocation's base (the sender's handle cache is keyed by it).  ``watch``: as for
    :class:`OwnedPool`, on a storage sent before (peers keep its record cached).
    """
    kind = "ipc"
    __slots__ = ("ordinal", "ptr", "base", "meta", "keep", "watch")

    def __init__(self, ordinal, ptr, base, meta, keep):
        self.ordinal = ordinal
        self.ptr = ptr                # the storage's address: descriptors' offsets count from it
        self.base = base
        self.meta = meta              # wire form (layout.ipc_meta)
        self.keep = keep
        self.watch = None             # weakref to the tensor lent (Sender._tensor_died)

    def forward_fd(self):
        return None                   # the handle in the meta is all a peer needs


class RemotePool:
    """A pointer of a peer's pool.  The pool's fd lives in ``PoolImports``.

    ``ptr``, ``stream`` and ``ordinal`` are set once, by the first decode that imports
    it (under the receiver's lock); ``seq`` and ``read_stream`` by every decode of a
    staging block (echoed in our "idle" report).
    """
    kind = "pool"
    __slots__ = ("meta", "ptr", "stream", "ordinal", "seq", "read_stream")

    def __init__(self, meta):
        self.meta = meta              # layout.PoolMeta
        self.ptr = None
        self.stream = None
        self.ordinal = None
        self.seq = 0                  # staging blocks: the lend we last decoded
        self.read_stream = None       # ... and the stream that decode read on


class RemoteVmm:
    """A peer's VMM allocation: its fd until we map it, then the mapping owns the fd."""
    kind = "vmm"
    __slots__ = ("meta", "fd", "vmm", "ptr", "stream", "ordinal")

    def __init__(self, meta, fd):
        self.meta = meta              # layout.VmmMeta
        self.fd = fd
        self.vmm = None
        self.ptr = None
        self.stream = None
        self.ordinal = None


class RemoteIpc:
    """A storage in a peer's allocation, opened by its legacy IPC handle.

    ``ptr`` (the storage's address here: the mapping's base plus ``meta.offset``),
    ``stream`` and ``ordinal`` are set once, by the first decode that opens it (under
    the receiver's lock); a record that was never decoded (a block we only forward)
    opens nothing.
    """
    kind = "ipc"
    __slots__ = ("meta", "ptr", "stream", "ordinal")

    def __init__(self, meta):
        self.meta = meta              # layout.IpcMeta
        self.ptr = None
        self.stream = None
        self.ordinal = None
