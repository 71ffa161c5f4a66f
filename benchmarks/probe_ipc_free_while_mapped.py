"""GPU probe: an exporter frees an allocation that an importer still has open by legacy IPC handle.

The ipc route's importer keeps a peer's allocation mapped after its last tensor on it
died (``ipc/cuda/ipchandles.py``), so the exporter's torch may free that allocation
(``empty_cache``, or its allocator under memory pressure) while the mapping is still
open.  CUDA's documentation calls that order undefined; this probe checks what the
driver does, in separate processes (a sticky CUDA error or a crash would stay there):

1. the exporter (native allocator) fills a tensor, sends its allocation's handle; the
   importer opens it and reads it;
2. the exporter frees the tensor and empties its cache (``cudaFree``): does it succeed,
   and does the device's free memory come back (it should not while we map it)?
3. the exporter allocates again, same size, new value: a new handle?  The importer
   opens it and reads the new value; the old mapping is still there;
4. the importer closes the old mapping: the memory comes back now?
5. the exporter fills the new tensor again, the importer reads through the new mapping,
   then the exporter *exits* while it is open: the importer reads again and closes.

Prints one JSON line per step and a verdict.  Run on a GPU machine::

    PYTHONPATH=src python benchmarks/probe_ipc_free_while_mapped.py [--mib 1024]
"""
from __future__ import annotations

import argparse
import ctypes as C
import json
import os
import subprocess
import sys

from comfy_env.ipc.cuda import driver as D


def exporter():
    import torch
    torch.zeros(1, device="cuda")
    held = None
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "new":
            n, val = int(cmd[1]), float(cmd[2])
            held = torch.full((n // 4,), val, device="cuda")
            torch.cuda.synchronize()
            base, size = D.address_range(held.data_ptr())
            out = {"handle": D.ipc_get_handle(base).hex(), "offset": held.data_ptr() - base, "alloc": size,
                   "base": base}
        elif cmd[0] == "fill":
            held.fill_(float(cmd[1]))
            torch.cuda.synchronize()
            out = {"ok": True}
        elif cmd[0] == "free":
            held = None
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.synchronize()
            out = {"ok": True, "reserved": torch.cuda.memory_reserved()}
        elif cmd[0] == "exit":
            print(json.dumps({"ok": True}), flush=True)
            os._exit(0)
        print(json.dumps(out), flush=True)


def read_f32(ptr):
    got = C.c_float()
    D.call("cuMemcpyDtoH_v2", C.byref(got), ptr, 4)
    return got.value


def main():
    if "--exporter" in sys.argv:
        return exporter()
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    n = ap.parse_args().mib << 20
    import torch
    torch.zeros(1, device="cuda")
    env = dict(os.environ)
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)            # the exporter: torch's native allocator
    child = subprocess.Popen([sys.executable, __file__, "--exporter"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)

    def ask(s):
        child.stdin.write(s + "\n")
        child.stdin.flush()
        return json.loads(child.stdout.readline())

    def free_mib():
        torch.cuda.synchronize()
        return D.mem_get_info()[0] / 2**20

    def say(step, **kw):
        print(json.dumps({"step": step, **kw}), flush=True)

    ok = True
    r1 = ask(f"new {n} 1.0")
    m1 = D.ipc_open(bytes.fromhex(r1["handle"]))
    v = read_f32(m1 + r1["offset"])
    say("1 open + read", value=v, free_mib=free_mib())
    ok &= v == 1.0
    before = free_mib()
    rf = ask("free")
    after = free_mib()
    say("2 exporter freed (cudaFree) while mapped", exporter_reserved=rf["reserved"],
        free_mib_before=before, free_mib_after=after, came_back_mib=after - before)
    r2 = ask(f"new {n} 2.0")
    same_base = r2["base"] == r1["base"]
    m2 = D.ipc_open(bytes.fromhex(r2["handle"]))
    v2 = read_f32(m2 + r2["offset"])
    say("3 new allocation", new_handle=r2["handle"] != r1["handle"], same_exporter_address=same_base,
        value=v2, free_mib=free_mib())
    ok &= v2 == 2.0 and r2["handle"] != r1["handle"]
    before = free_mib()
    D.ipc_close(m1)
    after = free_mib()
    say("4 closed the old mapping", came_back_mib=after - before)
    ask("fill 3.0")
    v3 = read_f32(m2 + r2["offset"])
    ask("exit")
    child.wait(30)
    v4 = read_f32(m2 + r2["offset"])
    D.ipc_close(m2)
    torch.cuda.synchronize()
    x = torch.ones(1 << 20, device="cuda")               # the context still works
    say("5 exporter exited while mapped", value_before_exit=v3, value_after_exit=v4,
        exporter_rc=child.returncode, context_ok=float(x.sum()) == float(1 << 20))
    ok &= v3 == 3.0
    print(json.dumps({"verdict": "ok" if ok else "FAILED"}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
