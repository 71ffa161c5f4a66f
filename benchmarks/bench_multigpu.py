"""Multi-GPU CUDA data plane benchmark: same device vs cross device, in one run (issue #7).

    PYTHONPATH=src python benchmarks/bench_multigpu.py [--quick] [--budget SECONDS]

The directions and sizes of bench_cuda.py (1 MiB, 64 MiB, 1 GiB, 4 GiB; --quick: the
first two), each measured three ways:

  same device   the parent's tensor on cuda:0, workers pinned to cuda:0
                (w→p, p→w, worker A → worker B);
  cross device  w→p: a worker pinned to cuda:1 returns a tensor made on its own default
                device (it arrives in the parent as cuda:1); p→w: the parent's tensor on
                cuda:0 goes to a worker pinned to cuda:1; A→B: worker A pinned to cuda:0,
                worker B pinned to cuda:1 (``b.submit(w_touch, a.submit(w_get, n))``);
  cross + move  as cross device, and the receiver then calls ``.to(its own device)`` on
                what it got (what a user pays to compute on its GPU: a device-to-device
                copy, peer-to-peer where the GPUs allow it).

Every cell is checked once before it is timed (the values, and the GPU the tensor
arrived on, by UUID); a cell that fails is recorded as an error string and the run goes
on.  Figures are medians of warm back-to-back calls (bench_cuda's ``timed``), the
executor's call overhead included (the empty call is printed beside them).  Also
recorded: whether cuda:0 and cuda:1 can access each other peer-to-peer, and the
``nvidia-smi topo -m`` link between them.  With one GPU the same-device half runs and
the cross-device cells read "skipped: needs 2 GPUs (found 1)"; with none the script
exits with code 2.  Prints a table and writes
benchmarks/results/multigpu_<gpu>_<time>.json (and $OUT/multigpu_bench.json).

Every call is bounded (``call_timeout`` and ``result(timeout=...)``), an executor that
timed out is not used again, and the measurements stop at a time budget (--budget,
default 150 s after the workers started), so a hang cannot eat a device session.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(0, HERE)

try:
    import cloudpickle
    import torch

    import bench_cuda as B          # its helpers and worker functions (pickled by value there)
    from comfy_env import IsolatedExecutor
    from comfy_env.ipc.cuda import devices, install
    from comfy_env.ipc.cuda.plane import PLANE
except ImportError as exc:          # pragma: no cover - depends on the machine
    print(f"bench_multigpu: cannot run here: {exc} (needs torch with CUDA, cloudpickle, and "
          f"comfy_env on PYTHONPATH=src)", file=sys.stderr)
    sys.exit(2)

cloudpickle.register_pickle_by_value(sys.modules[__name__])
MiB, GiB = B.MiB, B.GiB
SIZES = B.SIZES
CALL_TIMEOUT = 60          # s, one call (the slowest expected: 4 GiB through host memory, < 2 s)
START_TIMEOUT = 120        # s, a worker's start (torch import, CUDA init)
CELL_BUDGET = 10.0         # s, the timed loop of one cell (bench_cuda's timed stops after it)
DIRS = ("w2p", "p2w", "a2b")
MODES = ("same", "cross", "move")


# -- worker side ---------------------------------------------------------------------------
def w_check(t, move):
    """Where ``t`` arrived (GPU UUID); after an optional move to this worker's default
    device, where it is, and its min and max."""
    import torch
    from comfy_env.ipc.cuda import devices
    arrived = devices.uuid_of(t.device.index) if t.is_cuda else "cpu"
    if move:
        t = t.to("cuda")
    lo, hi = torch.aminmax(t)
    lo, hi = float(lo), float(hi)
    return arrived, (devices.uuid_of(t.device.index) if t.is_cuda else "cpu"), lo, hi


def w_move(t):
    """Copy ``t`` onto this worker's default device (its pinned GPU) and wait for the copy."""
    import torch
    y = t.to("cuda")
    for d in {t.device.index, y.device.index}:
        torch.cuda.synchronize(d)
    del y
    return None


def w_drop():
    """Free the tensors bench_cuda's ``w_get`` keeps in this worker."""
    import builtins
    import torch
    builtins.__dict__.get("_comfy_env_bench_cache", {}).clear()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return True


# -- parent side ----------------------------------------------------------------------------
def pinned(device):
    """A one-worker executor pinned to ``device``, every call bounded (not yet started)."""
    return IsolatedExecutor(env=None, max_workers=1, initializer=install, device=device,
                            call_timeout=CALL_TIMEOUT, name=f"bench-{device.replace(':', '')}")


def start(executors):
    """Start the workers side by side; returns {name: error string} for those that failed."""
    futs = {k: ex.submit(B.w_nothing) for k, ex in executors.items()}
    bad = {}
    for k, f in futs.items():
        try:
            f.result(timeout=START_TIMEOUT)
        except BaseException as exc:
            bad[k] = f"worker {k} did not start: {type(exc).__name__}: {exc}"[:400]
    return bad


def close(ex, wait_s=30.0):
    """Shut an executor down; kill its workers (ours) if that does not finish in ``wait_s``."""
    t = threading.Thread(target=ex.shutdown, kwargs={"cancel_futures": True}, daemon=True)
    t.start()
    t.join(wait_s)
    if t.is_alive():
        for pid in ex.worker_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def sync(devs):
    for d in devs:
        torch.cuda.synchronize(d)


def synced(fn, devs):
    """``fn`` followed by a synchronize of every device in ``devs`` (``timed`` only syncs
    the current one, and cross-device cells leave work on the other)."""
    def call():
        r = fn()
        sync(devs)
        return r
    return call


def parent_receive(ex, n, move):
    """Check of w→p: where the worker's tensor arrived, where it is after an optional move."""
    t = ex.submit(B.w_get, n).result(timeout=CALL_TIMEOUT + 30)
    arrived = devices.uuid_of(t.device.index)
    if move:
        t = t.to("cuda:0")
    lo, hi = torch.aminmax(t)
    return arrived, devices.uuid_of(t.device.index), float(lo), float(hi)


def _norm_uuid(u):
    u = u.strip().lower()
    if u.startswith("gpu-"):
        u = u[4:]
    return u.replace("-", "")


def topology(uuids):
    """``nvidia-smi topo -m`` and the link between our cuda:0 and cuda:1 (matched by UUID,
    nvidia-smi numbers GPUs in PCI order, torch may not).  Never raises."""
    info = {}
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        smi = {}
        for line in q.stdout.splitlines():
            if "," in line:
                i, u = line.split(",", 1)
                smi[_norm_uuid(u)] = int(i)
        r = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=30)
        text = re.sub(r"\x1b\[[0-9;]*m", "", r.stdout)
        info["topo_m"] = text if r.returncode == 0 else f"rc {r.returncode}: {r.stderr[-300:]}"
        idx = [smi.get(u) for u in uuids]
        info["nvidia_smi_index"] = idx
        if len(idx) >= 2 and None not in idx[:2]:
            lines = [ln for ln in text.splitlines() if ln.strip()]
            header = next(ln for ln in lines if ln[:1].isspace() and "GPU" in ln).split()
            row = next(ln for ln in lines if not ln[:1].isspace() and ln.split()[0] == f"GPU{idx[0]}")
            info["line"] = row.rstrip()
            info["link_0_1"] = row.split()[1 + header.index(f"GPU{idx[1]}")]
    except Exception as exc:                     # no nvidia-smi, another layout: keep going
        info["error"] = f"{type(exc).__name__}: {exc}"[:300]
    return info


class Run:
    def __init__(self, ngpu, budget_s, res, out):
        self.ngpu = ngpu
        self.res = res
        self.out = out
        self.deadline = None
        self.budget_s = budget_s
        self.bad = {}                 # executor name -> why it is not used again
        self.ex = {}

    def left(self):
        return self.deadline - time.perf_counter()

    def cell(self, label, key, n, uses, devs, fn, check, want_arrived, want_final):
        """One measurement: the check, then the median of ``fn``; ms (float) or an error string."""
        detail = self.res["detail"].setdefault(label, {})
        bad = [self.bad[u] for u in uses if u in self.bad]
        if bad:
            v = "skipped: " + bad[0]
        elif self.left() <= 0:
            v = f"skipped: time budget spent ({self.budget_s:.0f} s)"
        else:
            try:
                arrived, final, lo, hi = check()
                sync(devs)
                problems = []
                if arrived != want_arrived:
                    problems.append(f"arrived on GPU {arrived}, expected {want_arrived}")
                if final != want_final:
                    problems.append(f"ended on GPU {final}, expected {want_final}")
                if lo != 1.0 or hi != 1.0:
                    problems.append(f"values min {lo} max {hi}, expected all 1.0")
                if problems:
                    v = "error: check failed: " + "; ".join(problems)
                else:
                    reps = B.reps_for(n)
                    t0 = time.perf_counter()
                    med = B.timed(synced(fn, devs), reps, warm=2 if n >= GiB else 3,
                                  budget_s=max(0.5, min(CELL_BUDGET, self.left())))
                    v = med * 1e3
                    detail[key] = {"reps_max": reps, "s": time.perf_counter() - t0,
                                   "arrived": arrived, "final": final}
            except Exception as exc:
                if isinstance(exc, TimeoutError):   # CallTimeout or result(timeout=...)
                    for u in uses:
                        self.bad.setdefault(u, f"executor {u} timed out in {label} {key}")
                v = f"error: {type(exc).__name__}: {exc}"[:400]
            finally:
                B.settle()
        self.res["rows"].setdefault(label, {})[key] = v
        self.dump_partial()
        return v

    def size(self, label, n):
        T = CALL_TIMEOUT + 30
        ex = self.ex
        u0 = devices.uuid_of(0)
        x = torch.ones(n // 4, device="cuda:0")
        torch.cuda.synchronize(0)
        try:
            s_a, s_b = ex.get("s_a"), ex.get("s_b")
            self.cell(label, "same_w2p", n, ["s_a"], (0,),
                      lambda: s_a.submit(B.w_get, n).result(timeout=T),
                      lambda: parent_receive(s_a, n, False), u0, u0)
            self.cell(label, "same_p2w", n, ["s_a"], (0,),
                      lambda: s_a.submit(B.w_touch, x).result(timeout=T),
                      lambda: s_a.submit(w_check, x, False).result(timeout=T), u0, u0)
            self.cell(label, "same_a2b", n, ["s_a", "s_b"], (0,),
                      lambda: s_b.submit(B.w_touch, s_a.submit(B.w_get, n)).result(timeout=T),
                      lambda: s_b.submit(w_check, s_a.submit(B.w_get, n), False).result(timeout=T),
                      u0, u0)
            if self.ngpu < 2:
                for mode in ("cross", "move"):
                    for d in DIRS:
                        self.res["rows"].setdefault(label, {})[f"{mode}_{d}"] = \
                            f"skipped: needs 2 GPUs (found {self.ngpu})"
                self.dump_partial()
                return
            u1 = devices.uuid_of(1)
            x1 = ex.get("x1")
            both = (0, 1)
            self.cell(label, "cross_w2p", n, ["x1"], both,
                      lambda: x1.submit(B.w_get, n).result(timeout=T),
                      lambda: parent_receive(x1, n, False), u1, u1)
            self.cell(label, "cross_p2w", n, ["x1"], both,
                      lambda: x1.submit(B.w_touch, x).result(timeout=T),
                      lambda: x1.submit(w_check, x, False).result(timeout=T), u0, u0)
            self.cell(label, "cross_a2b", n, ["s_a", "x1"], both,
                      lambda: x1.submit(B.w_touch, s_a.submit(B.w_get, n)).result(timeout=T),
                      lambda: x1.submit(w_check, s_a.submit(B.w_get, n), False).result(timeout=T),
                      u0, u0)
            self.cell(label, "move_w2p", n, ["x1"], both,
                      lambda: x1.submit(B.w_get, n).result(timeout=T).to("cuda:0"),
                      lambda: parent_receive(x1, n, True), u1, u0)
            self.cell(label, "move_p2w", n, ["x1"], both,
                      lambda: x1.submit(w_move, x).result(timeout=T),
                      lambda: x1.submit(w_check, x, True).result(timeout=T), u0, u1)
            self.cell(label, "move_a2b", n, ["s_a", "x1"], both,
                      lambda: x1.submit(w_move, s_a.submit(B.w_get, n)).result(timeout=T),
                      lambda: x1.submit(w_check, s_a.submit(B.w_get, n), True).result(timeout=T),
                      u0, u1)
        finally:
            del x
            for k, e in ex.items():            # free this size's worker tensors
                if k not in self.bad:
                    try:
                        e.submit(w_drop).result(timeout=T)
                    except Exception as exc:
                        if isinstance(exc, TimeoutError):
                            self.bad.setdefault(k, f"executor {k} timed out freeing its tensors")
            B.settle()
            PLANE.import_cache.flush()
            torch.cuda.empty_cache()

    def dump_partial(self):
        if self.out:
            with open(os.path.join(self.out, "multigpu_partial.json"), "w") as f:
                json.dump(self.res, f, indent=1, default=str)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 MiB and 64 MiB only")
    ap.add_argument("--budget", type=float, default=150.0,
                    help="seconds for the measurements once the workers run (default 150)")
    args = ap.parse_args()
    ngpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if ngpu == 0:
        print(f"bench_multigpu: no CUDA GPU here (torch {torch.__version__}, "
              f"torch.cuda.is_available() is False): this benchmark needs one GPU for its "
              f"same-device half and two for the cross-device half; nothing measured.",
              file=sys.stderr)
        return 2
    sizes = SIZES[:2] if args.quick else SIZES
    t_main = time.perf_counter()
    out = os.environ.get("OUT")
    install()
    torch.cuda.set_device(0)
    torch.zeros(1, device="cuda:0")
    uuids = [devices.uuid_of(i) for i in range(ngpu)]
    res = {"gpus": [{"index": i, "name": torch.cuda.get_device_name(i), "uuid": uuids[i]}
                    for i in range(ngpu)],
           "gpu_count": ngpu, "torch": torch.__version__,
           "parent_backend": torch.cuda.get_allocator_backend(), "driver": B._driver_version(),
           "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "method": "median of warm back-to-back calls (ms), executor call overhead included; "
                     "each cell checked once (values, arrival GPU by UUID) before timing",
           "cells": {"same": "parent tensor on cuda:0, workers pinned to cuda:0",
                     "cross": "w2p: worker pinned to cuda:1 returns its tensor (arrives as cuda:1); "
                              "p2w: parent cuda:0 tensor to a worker pinned to cuda:1; "
                              "a2b: A pinned to cuda:0, B pinned to cuda:1",
                     "move": "as cross, then the receiver calls .to(its own device) and syncs"},
           "import_cache_max_bytes": PLANE.import_cache.max_bytes,
           "sizes": [label for label, _ in sizes], "rows": {}, "detail": {}}
    if ngpu >= 2:
        res["peer_access"] = {"0->1": torch.cuda.can_device_access_peer(0, 1),
                              "1->0": torch.cuda.can_device_access_peer(1, 0),
                              "plane_peers_of_0": list(devices.peers_of(0))}
    else:
        res["peer_access"] = f"n/a: {ngpu} GPU"
    res["topology"] = topology(uuids)
    run = Run(ngpu, args.budget, res, out)
    names = {"s_a": "cuda:0", "s_b": "cuda:0"}
    if ngpu >= 2:
        names["x1"] = "cuda:1"
    for k, dev in names.items():
        try:
            run.ex[k] = pinned(dev)
        except Exception as exc:
            run.bad[k] = f"executor {k} ({dev}) not made: {type(exc).__name__}: {exc}"[:400]
    run.bad.update(start({k: e for k, e in run.ex.items() if k not in run.bad}))
    res["start_s"] = time.perf_counter() - t_main
    res["worker_problems"] = dict(run.bad)
    print(f"workers started in {res['start_s']:.1f} s" +
          (f"; problems: {run.bad}" if run.bad else ""), flush=True)
    run.deadline = time.perf_counter() + args.budget
    try:
        for k in ("s_a", "x1"):
            if k in run.ex and k not in run.bad:
                try:
                    e = run.ex[k]
                    res[f"empty_call_us_{k}"] = B.timed(
                        lambda: e.submit(B.w_nothing).result(timeout=CALL_TIMEOUT + 30), 200, warm=10) * 1e6
                except Exception as exc:
                    res[f"empty_call_us_{k}"] = f"error: {type(exc).__name__}: {exc}"[:300]
        for label, n in sizes:
            run.size(label, n)
            row = res["rows"].get(label, {})
            print(label, {k: (f"{v:.3f} ms" if isinstance(v, float) else v[:60]) for k, v in row.items()},
                  flush=True)
        res["routes_parent"] = dict(PLANE.routes)
    finally:
        for k, e in run.ex.items():
            close(e, wait_s=5 if k in run.bad else 30)
    res["bench_s"] = time.perf_counter() - t_main
    print_table(res, sizes)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", res["gpus"][0]["name"]) + f"_x{ngpu}"
    path = os.path.join(HERE, "results", f"multigpu_{tag}_{time.strftime('%Y%m%d_%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1, default=str)
    print("wrote", path)
    if out:
        with open(os.path.join(out, "multigpu_bench.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)
    return 0


def _cell(v, w=9):
    if isinstance(v, float):
        return f"{v:{w}.3f}"
    if v is None:
        return f"{'—':>{w}}"
    return f"{'skipped' if v.startswith('skipped') else 'ERROR':>{w}}"


def print_table(res, sizes):
    g = res["gpus"]
    print("\nGPUs: " + "; ".join(f"cuda:{d['index']} {d['name']} ({d['uuid'][:8]}…)" for d in g) +
          f"  torch {res['torch']}  parent allocator {res['parent_backend']}  driver {res['driver']}")
    topo = res["topology"]
    print(f"peer access: {res['peer_access']}; nvidia-smi link cuda:0-cuda:1: "
          f"{topo.get('link_0_1', topo.get('error', 'n/a'))}")
    if topo.get("line"):
        print(f"topo: {topo['line']}")
    who = {"s_a": "worker on cuda:0", "x1": "worker on cuda:1"}
    empty = [f"{who.get(k[len('empty_call_us_'):], k)} {v:.0f} µs" if isinstance(v, float) else f"{k}: {v}"
             for k, v in res.items() if k.startswith("empty_call_us_")]
    print(f"method: {res['method']}; empty call: {', '.join(empty) or 'n/a'}")
    w = 9
    groups = [("same device", "same"), ("cross device", "cross"), ("cross + .to(own)", "move")]
    print(f"{'':>6} | " + " | ".join(f"{t:^{3 * w + 2}}" for t, _ in groups))
    hdr = f"{'size':>6} | " + " | ".join(" ".join(f"{d:>{w}}" for d in ("w→p", "p→w", "A→B")) for _ in groups)
    print(hdr)
    print("-" * len(hdr))
    notes = {}
    for label, _ in sizes:
        row = res["rows"].get(label, {})
        cells = []
        for _, mode in groups:
            part = []
            for d in DIRS:
                v = row.get(f"{mode}_{d}")
                part.append(_cell(v, w))
                if isinstance(v, str):
                    notes.setdefault(v, []).append(f"{label} {mode} {d}")
            cells.append(" ".join(part))
        print(f"{label:>6} | " + " | ".join(cells))
    print("(ms; w→p worker → parent, p→w parent → worker, A→B worker → worker; "
          "cross: the receiver works on cuda:1 while the tensor lives on cuda:0, or the reverse)")
    for why, where in notes.items():
        shown = ", ".join(where) if len(where) <= 4 else f"{', '.join(where[:3])} … ({len(where)} cells)"
        print(f"  {shown}: {why[:300]}")
    print(f"bench took {res['bench_s']:.0f} s (workers started in {res['start_s']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
