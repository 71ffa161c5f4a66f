"""The two-process capability probe: real transfers between this process and a worker.

A probe vouches only for what it did, where it did it.  So this starts a real worker
(``IsolatedExecutor``, the current interpreter unless told otherwise), sends it a
CUDA tensor, has it send one back, and checks the values on both sides.  The routes
reported are the ones the plane chose for those tensors; an import that failed is
reported with the driver's error, as the running plane would report it.

A diagnostic beside the CLI (it starts an executor, so it is no part of the data
plane it examines).  Used by :mod:`comfy_env.cuda_doctor`; the functions named ``_in_worker_*`` run inside the worker.
"""
from __future__ import annotations

import os

__all__ = ["local_report", "pair_probe"]


def local_report():
    """This process's own findings (driver, devices, allocator, capabilities, routes used)."""
    out = {"pid": os.getpid(), "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}
    try:
        import torch
    except ImportError:
        out["torch"] = None
        return out
    out["torch"] = torch.__version__
    out["cuda_available"] = torch.cuda.is_available()
    if not out["cuda_available"]:
        return out
    from .ipc.cuda import devices
    from .ipc.cuda import driver as D
    from .ipc.cuda.plane import PLANE
    out["backend"] = torch.cuda.get_allocator_backend()
    v = __import__("ctypes").c_int()
    D.call("cuDriverGetVersion", __import__("ctypes").byref(v))
    out["driver_version"] = f"{v.value // 1000}.{v.value % 1000 // 10}"
    out["devices"] = [(i, devices.name_of(i), devices.uuid_of(i)) for i in range(devices.count())]
    caps = PLANE.caps(torch.cuda.current_device())
    out["caps"] = {"pools": caps.pools, "vmm": caps.vmm, "events": caps.events, "reasons": dict(caps.reasons)}
    out["role"] = PLANE.role
    out["heap_pool"] = bool(PLANE.local.heap.get(torch.cuda.current_device()))
    out["routes"] = dict(PLANE.routes)
    out["reasons"] = dict(PLANE.last_reasons)
    return out


def _in_worker_check_and_echo(t, expect_sum):
    """Worker: check what the parent sent, return a fresh tensor allocated here."""
    import torch
    got = float(t.double().sum().item())
    out = torch.arange(t.numel(), device=t.device, dtype=torch.float32)
    return got == expect_sum, out, local_report()


def _in_worker_report():
    return local_report()


def _legacy_ipc_probe():
    """Whether torch's legacy CUDA IPC can *export* here (it cannot under cudaMallocAsync)."""
    import torch
    from torch.multiprocessing.reductions import reduce_tensor
    try:
        reduce_tensor(torch.ones(4, device="cuda"))
        return True, "reduce_tensor works (not used: the pool routes cover every allocator)"
    except Exception as exc:
        return False, str(exc).splitlines()[0][:160]


def pair_probe(env=None, timeout=120):
    """Run real transfers both ways with one worker; returns a dict of findings."""
    import torch

    from .executor import IsolatedExecutor
    from .ipc.cuda import install
    from .ipc.cuda.plane import PLANE

    install()
    res = {"parent": None, "worker": None, "to_worker": None, "to_parent": None, "error": None}
    n = 1 << 16
    x = torch.ones(n, device="cuda", dtype=torch.float32)
    before = dict(PLANE.routes)
    try:
        with IsolatedExecutor(env=env, max_workers=1, initializer=install, call_timeout=timeout) as ex:
            ok, back, wrep = ex.submit(_in_worker_check_and_echo, x, float(n)).result(timeout=timeout)
            res["to_worker"] = {"ok": ok, "route": _diff(before, PLANE.routes), "why": dict(PLANE.last_reasons)}
            expect = torch.arange(n, device="cuda", dtype=torch.float32)
            # Ask again: the routes of the result were chosen after the first report was made.
            wrep = ex.submit(_in_worker_report).result(timeout=timeout)
            res["to_parent"] = {"ok": bool(torch.equal(back, expect)), "device": str(back.device),
                                "route": _diff({}, wrep["routes"]), "why": wrep.get("reasons", {})}
            res["worker"] = wrep
            del back
    except Exception as exc:
        res["error"] = f"{type(exc).__name__}: {exc}"
    res["parent"] = local_report()
    res["legacy_ipc_parent"] = _legacy_ipc_probe()
    return res


def _diff(before, after):
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
