"""Fakes of what the CUDA plane's sender reads of a torch CUDA tensor, and of the driver's
answers (CPU-only tests)."""
from __future__ import annotations

import contextlib

import torch

from comfy_env.ipc.cuda import driver as D

MiB = 1 << 20


class FakeStorage:
    """Torch keeps one Python object per live storage: so does this fake."""

    def __init__(self, ptr, nbytes):
        self.ptr, self.n = ptr, nbytes

    def data_ptr(self):
        return self.ptr

    def nbytes(self):
        return self.n


class FakeT:
    """What plane.encode reads of a CUDA tensor (float32, 1-D): ``nbytes`` of it at
    ``offset`` in ``storage`` (by default a storage of its own at ``ptr``, 1 MiB; a
    view of a given storage spans the rest of it unless ``nbytes`` says)."""
    is_cuda = True
    dtype = torch.float32
    layout = torch.strided
    is_quantized = False
    requires_grad = False

    def __init__(self, ptr=None, nbytes=None, storage=None, offset=0):
        if storage is None:
            storage = FakeStorage(ptr, MiB if nbytes is None else nbytes)
        self._storage = storage
        self._ptr = storage.ptr + offset
        self.shape = torch.Size([(storage.n - offset if nbytes is None else nbytes) // 4])

    def untyped_storage(self):
        return self._storage

    def get_device(self):
        return 0

    def stride(self):
        return (1,)

    def data_ptr(self):
        return self._ptr


def fake_torch_on_stream(cuda_stream=7, backend="native"):
    """torch's namespace with ``torch.cuda.current_stream()`` a fake stream (no GPU) and
    the allocator ``backend`` (the native one: no export heap, whatever the policy)."""
    import types
    ns = types.SimpleNamespace(**{k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    stream = types.SimpleNamespace(cuda_stream=cuda_stream)
    ns.cuda = types.SimpleNamespace(current_stream=lambda *a: stream, get_allocator_backend=lambda: backend)
    return ns


@contextlib.contextmanager
def ledger_records_dropped():
    """Drop the ledger records made inside (tests whose fake blocks nobody releases)."""
    from comfy_env.ipc import lifetime
    keys = set(lifetime.LEDGER._records)
    try:
        yield
    finally:
        with lifetime.LEDGER.lock:
            for k in set(lifetime.LEDGER._records) - keys:
                del lifetime.LEDGER._records[k]


def try_call_reader_busy(name, *args):
    """A fake ``driver.try_call``: every call succeeds, except that ``cuStreamQuery``
    answers NOT_READY (the reader's stream still has work queued), so releases are
    fenced and idle reports carry an event, as under a caller that did not synchronise."""
    return D.CUDA_ERROR_NOT_READY if name == "cuStreamQuery" else D.CUDA_SUCCESS
