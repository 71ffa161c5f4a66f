"""GPU probe: what legacy CUDA IPC costs through the driver, per size and allocator pair.

Legacy IPC here means ``cuIpcGetMemHandle`` on the base of the allocation that holds a
torch tensor (the exporter) and ``cuIpcOpenMemHandle`` / ``cuIpcCloseMemHandle`` of that
handle (the importer), the calls ``torch.multiprocessing`` makes, but made by us through
``libcuda`` so that the importer's own allocator does not matter.  For each exporter /
importer allocator pair it prints one JSON line per size: the exporter's handle call, the
importer's open and close (medians of ``--reps`` new tensors), whether a new tensor of
the same size reused the same allocation (same handle), and whether the values read
through the mapping were right.  Run on a GPU machine::

    PYTHONPATH=src python benchmarks/probe_legacy_ipc.py [--sizes-mib 1,64,1024,4096]
"""
from __future__ import annotations

import argparse
import ctypes as C
import json
import os
import statistics
import subprocess
import sys
import time

from comfy_env.ipc.cuda import driver as D

class _HANDLE(C.Structure):
    # CUipcMemHandle: 64 bytes passed by value (a ctypes array would go as a pointer).
    _fields_ = [("reserved", C.c_ubyte * 64)]


def _bind():
    lib = D.lib()
    get = lib.cuIpcGetMemHandle
    get.argtypes = [C.POINTER(_HANDLE), C.c_uint64]
    get.restype = C.c_int
    opn = lib.cuIpcOpenMemHandle_v2
    opn.argtypes = [C.POINTER(C.c_uint64), _HANDLE, C.c_uint]
    opn.restype = C.c_int
    close = lib.cuIpcCloseMemHandle
    close.argtypes = [C.c_uint64]
    close.restype = C.c_int
    return get, opn, close


def _check(rc, what):
    if rc != 0:
        name, text = D.error_text(rc)
        raise RuntimeError(f"{what}: {name} ({rc}): {text}")


def exporter():
    """Child: answers "new <bytes>" with the handle of a new tensor, "drop" frees it."""
    import torch
    torch.zeros(1, device="cuda")
    get, _, _ = _bind()
    held = None
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "new":
            held = None                      # the previous tensor dies first (a node's output)
            n = int(cmd[1])
            t = torch.full((n // 4,), float(cmd[2]), device="cuda")
            torch.cuda.synchronize()
            base, size = D.address_range(t.data_ptr())
            h = _HANDLE()
            a = time.perf_counter()
            rc = get(C.byref(h), base)
            dt = time.perf_counter() - a
            held = t
            out = {"rc": rc, "err": D.error_text(rc)[0] if rc else None, "get_us": dt * 1e6,
                   "handle": bytes(h).hex(), "offset": t.data_ptr() - base, "alloc": size}
        elif cmd[0] == "stop":
            return
        else:
            held = None
            out = {"ok": True}
        print(json.dumps(out), flush=True)


def importer(sizes, reps, exp_conf):
    import torch
    torch.zeros(1, device="cuda")
    _, opn, close = _bind()
    env = dict(os.environ)
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    if exp_conf:
        env["PYTORCH_CUDA_ALLOC_CONF"] = exp_conf
    child = subprocess.Popen([sys.executable, __file__, "--exporter"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)

    def ask(s):
        child.stdin.write(s + "\n")
        child.stdin.flush()
        return json.loads(child.stdout.readline())

    try:
        for n in sizes:
            opens, closes, gets, handles, ok = [], [], [], [], True
            err = None
            for i in range(reps + 1):
                val = float(i + 1)
                r = ask(f"new {n} {val}")
                if r["rc"]:
                    err = f"cuIpcGetMemHandle: {r['err']}"
                    break
                gets.append(r["get_us"])
                handles.append(r["handle"])
                h = _HANDLE.from_buffer_copy(bytes.fromhex(r["handle"]))   # not _HANDLE(b): stops at a NUL
                ptr = C.c_uint64()
                a = time.perf_counter()
                rc = opn(C.byref(ptr), h, 1)          # CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS
                t_open = time.perf_counter() - a
                if rc:
                    err = "cuIpcOpenMemHandle: " + D.error_text(rc)[0]
                    break
                got = C.c_float()
                D.call("cuMemcpyDtoH_v2", C.byref(got), ptr.value + r["offset"], 4)
                ok = ok and got.value == val
                a = time.perf_counter()
                _check(close(ptr.value), "cuIpcCloseMemHandle")
                t_close = time.perf_counter() - a
                opens.append(t_open * 1e6)
                closes.append(t_close * 1e6)
            med = (lambda v: statistics.median(v[1:]) if len(v) > 1 else None)
            print(json.dumps({
                "exporter": exp_conf or "native", "importer": os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or "native",
                "mib": n >> 20, "error": err, "get_us": med(gets), "open_us": med(opens),
                "close_us": med(closes), "first_open_us": opens[0] if opens else None,
                "same_handle_each_call": len(set(handles[1:])) == 1 if len(handles) > 2 else None,
                "values_ok": ok}), flush=True)
    finally:
        try:
            child.stdin.write("stop\n")
            child.stdin.flush()
        except OSError:
            pass
        child.wait(30)


def main():
    if "--exporter" in sys.argv:
        return exporter()
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes-mib", default="1,64,1024,4096")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--importer-run", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--exporter-conf", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    sizes = [int(s) << 20 for s in a.sizes_mib.split(",")]
    if a.importer_run is not None:
        return importer(sizes, a.reps, a.exporter_conf)
    for exp_conf, imp_conf in [("", "backend:cudaMallocAsync"), ("", ""),
                               ("expandable_segments:True", "backend:cudaMallocAsync"),
                               ("backend:cudaMallocAsync", "")]:
        env = dict(os.environ)
        env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
        if imp_conf:
            env["PYTORCH_CUDA_ALLOC_CONF"] = imp_conf
        subprocess.run([sys.executable, __file__, "--importer-run", "1", "--sizes-mib", a.sizes_mib,
                        "--reps", str(a.reps), "--exporter-conf", exp_conf], env=env, timeout=300)


if __name__ == "__main__":
    main()
