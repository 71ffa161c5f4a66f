"""GPU probe: does an exportable (POSIX-fd) memory pool give freed memory back to the device?

docs/cuda.md says exportable pools never do while they exist (H100: trim, release
threshold 0 and empty_cache left a freed 4 GiB in use), which is why memory is reclaimed
by generations and why the parent's heap is opt-in.  This measures it case by case, with
the driver API alone (no torch), device-wide free memory (``cuMemGetInfo``) after each
step.  A peer process imports the pool (and, in some cases, a pointer) as a worker would.

    PYTHONPATH=src python benchmarks/probe_pool_trim.py [--gib 1]

Cases, each on a fresh pool with the release threshold at 0 and then ``cuMemPoolTrimTo(0)``:
  created:   pool made with the POSIX-fd handle type, never exported
  exported:  its fd exported (held open here), no importer
  imported:  a peer imported the pool (fd), imported no pointer of it
  other-ptr: the peer imported a pointer of another, live allocation of the pool
  same-ptr:  the peer imported the freed allocation's pointer and freed its import first
  late-free: the peer imported that pointer and freed its import only after our free and
             trim; trimmed again after (``after_late_trim``)
  peer-drop: as same-ptr, then the peer destroyed its import of the pool
  peer-exit: as same-ptr, then the peer process exited
  chunk:     32 allocations of 1/32 the size, one of them exported and imported (then
             freed) by the peer: how much of the pool stays held (the pinning's granularity)

After each trim, a new allocation of the pool is made, exported and (with a peer)
imported: ``reuse_ok`` says the pool still works after giving memory back.
"""
from __future__ import annotations

import ctypes as C
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from _common import dump_to_out  # noqa: E402
from comfy_env.ipc.cuda import devices  # noqa: E402
from comfy_env.ipc.cuda import driver as D  # noqa: E402
from comfy_env.ipc.cuda.pools import _props  # noqa: E402

MiB = 1 << 20

PEER = r"""
import ctypes as C, os, sys
sys.path.insert(0, sys.argv[2])
from comfy_env.ipc.cuda import devices, driver as D
D.lib(); devices.use(0)
fd = int(sys.argv[1])
pool = C.c_void_p()
D.call("cuMemPoolImportFromShareableHandle", C.byref(pool), C.c_void_p(fd), D.HANDLE_POSIX_FD, 0)
descs, n = devices.access_for(0, peers=False)
D.call("cuMemPoolSetAccess", pool, descs, n)
ptrs = []  # a stack: "free" frees the last import
print("ready", flush=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "import":
        ed = D.PoolPtrExportData()
        C.memmove(C.byref(ed), bytes.fromhex(cmd[1]), 64)
        p = C.c_uint64()
        D.call("cuMemPoolImportPointer", C.byref(p), pool, C.byref(ed))
        ptrs.append(p.value)
    elif cmd[0] == "free":
        D.call("cuMemFreeAsync", ptrs.pop(), None)
        D.call("cuCtxSynchronize")
    elif cmd[0] == "drop":
        D.call("cuMemPoolDestroy", pool)
    elif cmd[0] == "exit":
        break
    print("ok", flush=True)
"""


def free_mib():
    D.call("cuCtxSynchronize")
    return D.mem_get_info()[0] / MiB


def new_pool(export):
    h = C.c_void_p()
    D.call("cuMemPoolCreate", C.byref(h), C.byref(_props(0)))
    v = C.c_uint64(0)
    D.call("cuMemPoolSetAttribute", h, D.MEMPOOL_ATTR_RELEASE_THRESHOLD, C.byref(v))
    fd = None
    if export:
        f = C.c_int(-1)
        D.call("cuMemPoolExportToShareableHandle", C.byref(f), h, D.HANDLE_POSIX_FD, 0)
        fd = f.value
    return h.value, fd


def alloc(pool, nbytes):
    p = C.c_uint64()
    D.call("cuMemAllocFromPoolAsync", C.byref(p), nbytes, pool, None)
    D.call("cuMemsetD8Async", p.value, 1, nbytes, None)
    D.call("cuCtxSynchronize")
    return p.value


def export(ptr):
    ed = D.PoolPtrExportData()
    D.call("cuMemPoolExportPointer", C.byref(ed), ptr)
    return bytes(ed).hex()


class Peer:
    def __init__(self, fd):
        src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
        self.p = subprocess.Popen([sys.executable, "-c", PEER, str(fd), src], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, pass_fds=(fd,))
        assert self.p.stdout.readline().strip() == "ready"

    def do(self, *cmd):
        self.p.stdin.write(" ".join(cmd) + "\n")
        self.p.stdin.flush()
        assert self.p.stdout.readline().strip() == "ok"

    def close(self):
        self.p.stdin.write("exit\n")
        self.p.stdin.flush()
        self.p.wait(30)


def case(name, nbytes):
    export_fd = name != "created"
    pool, fd = new_pool(export_fd)
    peer = Peer(fd) if name not in ("created", "exported") else None
    keep = None
    try:
        if name == "other-ptr":
            keep = alloc(pool, 2 * MiB)
            peer.do("import", export(keep))
        base = free_mib()
        if name == "chunk":
            parts = [alloc(pool, nbytes // 32) for _ in range(32)]
            peer.do("import", export(parts[5]))
            peer.do("free")
        else:
            parts = [alloc(pool, nbytes)]
        if name in ("same-ptr", "late-free", "peer-drop", "peer-exit"):
            peer.do("import", export(parts[0]))
            if name != "late-free":
                peer.do("free")
            if name == "peer-drop":
                peer.do("drop")
            elif name == "peer-exit":
                peer.close()
                peer = None
        held = base - free_mib()
        for ptr in parts:
            D.call("cuMemFreeAsync", ptr, None)
        after_free = base - free_mib()
        t0 = time.perf_counter()
        D.call("cuMemPoolTrimTo", pool, 0)
        trim_us = (time.perf_counter() - t0) * 1e6
        after_trim = base - free_mib()
        time.sleep(0.2)
        after_wait = base - free_mib()
        out = {"case": name, "alloc_MiB": nbytes / MiB, "held_MiB": round(held),
               "after_free_MiB": round(after_free), "after_trim_MiB": round(after_trim),
               "after_trim_0.2s_MiB": round(after_wait), "trim_us": round(trim_us)}
        if name == "late-free":
            peer.do("free")
            D.call("cuMemPoolTrimTo", pool, 0)
            out["after_late_trim_MiB"] = round(base - free_mib())
        try:
            again = alloc(pool, 64 * MiB)
            if peer is not None and name != "peer-drop":
                peer.do("import", export(again))
                peer.do("free")
            elif fd is not None:
                export(again)
            D.call("cuMemFreeAsync", again, None)
            out["reuse_ok"] = True
        except Exception as exc:
            out["reuse_ok"] = f"{type(exc).__name__}: {exc}"
    finally:
        if keep is not None:
            if peer is not None:
                peer.do("free")
            D.call("cuMemFreeAsync", keep, None)
        if peer is not None:
            peer.close()
        D.call("cuCtxSynchronize")
        D.call("cuMemPoolDestroy", pool)
        if fd is not None:
            os.close(fd)
    return out


def main():
    gib = float(sys.argv[sys.argv.index("--gib") + 1]) if "--gib" in sys.argv else 1.0
    D.lib()
    devices.use(0)
    res = []
    for name in ("created", "exported", "imported", "other-ptr", "same-ptr", "late-free", "peer-drop",
                 "peer-exit", "chunk"):
        try:
            r = case(name, int(gib * 1024) * MiB)
        except Exception as exc:
            r = {"case": name, "error": f"{type(exc).__name__}: {exc}"}
        res.append(r)
        print(json.dumps(r), flush=True)
    dump_to_out("probe_pool_trim.json", res)


if __name__ == "__main__":
    main()
