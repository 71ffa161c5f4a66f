"""CUDA data plane benchmark (GPU): routes side by side in one run.

    PYTHONPATH=src python benchmarks/bench_cuda.py [--quick] [--lean]
    BENCH_SIZES=64MiB,1MiB PYTHONPATH=src python benchmarks/bench_cuda.py   (those rows, in that order)
    BENCH_ROUND_REPS=100 BENCH_WARM=10 ...   (timed calls per cell and round; untimed calls
                                              at the start of each block, both systems)

Every figure is the median of warm, back-to-back calls (no pause between calls: a
pause lets the worker's and the parent's threads fall asleep, and waking them costs
~1 ms, which earlier versions of this script counted in every call).  The empty
call's median is measured in the same run and printed beside the rest.

Measures, for 1 MiB, 64 MiB, 1 GiB and 4 GiB tensors:
  worker → parent (the same tensor every call, and a new one every call), parent → worker, worker A → worker B (through IsolatedExecutor),
  the CPU route (COMFY_ENV_CUDA_FORCE_CPU=1), and torch.multiprocessing legacy CUDA IPC
  (native allocator, in a process pair of its own, as torch users would do it; its
  cells and ours alternate in rounds, so both are measured under the same load; a pair
  that fails or hangs is reported as skipped, with why);
plus worker → parent per tensor (one call returning 32 tensors of 1 MiB against the
empty call, divided by 32), both for tensors the worker returns again (the import
cache's case) and for fresh tensors: the median of interleaved pairs (the headline:
it cancels the host's drift), the difference of two medians (the older figure), the
pairs again waiting for the caller's stream only, CPU time per tensor in each process,
and the parent's own decode time per tensor, all of it again against a worker with small
copies off (COMFY_ENV_CUDA_SMALL_COPY_MIB=0: every tensor exported, zero copy);
a worker's GPU footprint after a 4 GiB peak under each heap policy;
and parent → worker once more against a worker with staging recycling off
(COMFY_ENV_CUDA_STAGING_CACHE_MIB=0), the figure before recycling, in the same run.
Prints a table and writes benchmarks/results/cuda_<gpu>_<time>.json (and $OUT/).
"""
from __future__ import annotations

import collections
import gc
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync")
HERE = os.path.dirname(os.path.abspath(__file__))
# COMFY_ENV_BENCH_SRC: measure another tree (e.g. the last commit's) with the same script.
sys.path.insert(0, os.environ.get("COMFY_ENV_BENCH_SRC") or os.path.join(HERE, "..", "src"))

import cloudpickle  # noqa: E402
import torch  # noqa: E402

from _common import dump_to_out  # noqa: E402
from comfy_env import IsolatedExecutor  # noqa: E402
from comfy_env.ipc import lifetime  # noqa: E402
from comfy_env.ipc.cuda import install  # noqa: E402
from comfy_env.ipc.cuda import driver as D  # noqa: E402
from comfy_env.ipc.cuda.plane import PLANE  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])
MiB, GiB = 1 << 20, 1 << 30
SIZES = [("1MiB", MiB), ("64MiB", 64 * MiB), ("1GiB", GiB), ("4GiB", 4 * GiB)]
ROUNDS = 4        # ours and legacy IPC alternate this many times per size (see Legacy)
# Timed calls per cell and round (default: the size's reps spread over the rounds), and
# untimed calls at the start of each cell's block (ours and legacy's alike).
ROUND_REPS = int(os.environ.get("BENCH_ROUND_REPS") or 0)
WARM = int(os.environ.get("BENCH_WARM") or 1)


# -- worker side ---------------------------------------------------------------------------
def _cache():
    # These functions travel by value, so a module global would be a fresh dict on every
    # call; keep the worker's tensors somewhere that outlives one call.
    import builtins
    return builtins.__dict__.setdefault("_comfy_env_bench_cache", {})


def w_get(nbytes):
    """Return a tensor that already lives in the worker (allocated once)."""
    import torch
    cache = _cache()
    t = cache.get(nbytes)
    if t is None:
        t = cache[nbytes] = torch.ones(nbytes // 4, device="cuda")
        torch.cuda.synchronize()
    return t


def w_many(k, nbytes):
    """The same ``k`` worker tensors on every call."""
    import torch
    cache = _cache()
    ts = cache.get(("many", k, nbytes))
    if ts is None:
        ts = cache[("many", k, nbytes)] = [torch.ones(nbytes // 4, device="cuda") for _ in range(k)]
        torch.cuda.synchronize()
    return ts


def w_fresh(k, nbytes):
    """``k`` new tensors on every call (the import cache cannot help)."""
    import torch
    return [torch.empty(nbytes // 4, device="cuda") for _ in range(k)]


def w_touch(t):
    return None


def w_nothing():
    return None


def w_backend():
    import torch
    return torch.cuda.get_allocator_backend()


def w_footprint(nbytes):
    import torch
    x = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    x.fill_(1)
    torch.cuda.synchronize()
    del x
    torch.cuda.synchronize()
    return True


def w_empty_cache():
    import torch
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    return True


def w_set_cpu(flag):
    from comfy_env.ipc.cuda.plane import PLANE
    PLANE.force_cpu = flag


# -- helpers -------------------------------------------------------------------------------
def settle():
    for _ in range(3):
        gc.collect()
        lifetime.LEDGER.drain()
        time.sleep(0.005)


def samples(fn, reps, warm=3, budget_s=None):
    """``reps`` warm calls made back to back (no pause), each timed (s); ``warm`` untimed first."""
    for _ in range(warm):
        r = fn()
        torch.cuda.synchronize()
        del r
    out = []
    t_end = None if budget_s is None else time.perf_counter() + budget_s
    for _ in range(reps):
        t0 = time.perf_counter()
        r = fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
        del r
        if t_end is not None and time.perf_counter() > t_end and len(out) >= 1:
            break
    return out


def timed(fn, reps, warm=3, budget_s=None):
    """Median of :func:`samples`."""
    return statistics.median(samples(fn, reps, warm, budget_s))


def block_start(blocks, head=5):
    """Whether a cell's first timed calls after the switch from the other system's block
    run slower than the rest: ``{cell: [median of the first head, median of the rest] µs}``
    over the rounds (the cells are medians of both together)."""
    out = {}
    for cell, bl in blocks.items():
        first = [t for b in bl for t in b[:head]]
        rest = [t for b in bl for t in b[head:]]
        if first and rest:
            out[cell] = [statistics.median(first) * 1e6, statistics.median(rest) * 1e6]
    return out


def reps_for(nbytes, cpu=False):
    if cpu:
        return 1 if nbytes >= GiB else 3
    return 10 if nbytes >= 4 * GiB else 20 if nbytes >= GiB else 100


class Timers:
    """Accumulate wall time of some functions of this process (monkeypatched) during a section."""

    def __init__(self, targets):
        self.targets = targets        # name -> (object, attribute)
        self.acc = {}
        self._saved = []

    def __enter__(self):
        for name, (obj, attr) in self.targets.items():
            fn = getattr(obj, attr)
            self._saved.append((obj, attr, fn, attr in vars(obj)))
            self.acc[name] = [0.0, 0]

            def wrap(*a, _fn=fn, _slot=self.acc[name], **k):
                t0 = time.perf_counter()
                try:
                    return _fn(*a, **k)
                finally:
                    _slot[0] += time.perf_counter() - t0
                    _slot[1] += 1
            setattr(obj, attr, wrap)
        return self

    def __exit__(self, *exc):
        for obj, attr, fn, own in reversed(self._saved):
            if own:
                setattr(obj, attr, fn)
            else:
                delattr(obj, attr)                 # the class's method shows again

    def per_call_us(self):
        return {k: (v[0] / v[1] * 1e6 if v[1] else None, v[1]) for k, v in self.acc.items()}


def parent_timers():
    # A tree from before the plane's split (BASE_SRC) keeps the opened events on the plane.
    events = PLANE.local.events if hasattr(PLANE, "local") else PLANE._events
    from comfy_env.ipc.cuda import pools
    return Timers({"decode": (PLANE, "decode"), "encode": (PLANE, "encode"),
                   "export_pointer": (pools.Generation, "export_pointer"),
                   "import_pointer": (PLANE.imports, "import_pointer"),
                   "release_pointer": (PLANE.imports, "release_pointer"),
                   "event_wait": (events, "wait")})


def new_executor(env_extra=None):
    old = dict(os.environ)
    os.environ.update(env_extra or {})
    try:
        ex = IsolatedExecutor(env=None, max_workers=1, initializer=install)
        ex.submit(w_nothing).result(timeout=120)
    finally:
        os.environ.clear()
        os.environ.update(old)
    return ex


def free_bytes():
    torch.cuda.synchronize()
    return D.mem_get_info()[0]


# -- legacy torch.multiprocessing IPC (native allocator) --------------------------------------
# A process pair of its own (legacy IPC needs the native allocator; ours runs under
# cudaMallocAsync), driven one command at a time over a pipe, so that its samples
# interleave with ours round by round: on a shared host the two are then measured under
# the same load, which one block of each at different minutes is not.  Every call of
# either ends with the parent's torch.cuda.synchronize() (ours in samples()), so the
# empty round trips compare like for like (until session 24 legacy's empty and
# parent → worker calls synchronised in the child or not at all, and its ∅ was one
# synchronise cheaper than ours).  The script runs
# from a file: "spawn" re-imports the parent's __main__ in the child, and with
# ``python -c`` there is none.
LEGACY = r"""
import json, os, queue, sys, time, torch, torch.multiprocessing as mp
DEV = os.environ.get("LEGACY_DEVICE", "cuda")
def sync():
    if DEV == "cuda": torch.cuda.synchronize()
def child(q_in, q_out):
    torch.zeros(1, device=DEV); cache = {}
    while True:
        msg = q_in.get()
        if msg[0] == "stop":
            q_out.put("bye"); return
        if msg[0] == "w2p":
            n = msg[1]
            if n not in cache:
                cache[n] = torch.ones(n // 4, device=DEV); sync()
            q_out.put(cache[n])
        elif msg[0] == "w2pf":
            q_out.put(torch.empty(msg[1] // 4, device=DEV))
        elif msg[0] == "p2w":
            x = msg[1]; del x; q_out.put(1)
        elif msg[0] == "empty":
            q_out.put(1)
        elif msg[0] == "drop":
            cache.clear(); q_out.put(1)
if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    qi, qo = ctx.Queue(), ctx.Queue(); p = ctx.Process(target=child, args=(qi, qo), daemon=True); p.start()
    torch.zeros(1, device=DEV); held = {}
    qi.put(("empty",)); qo.get(timeout=120)
    print("READY", flush=True)
    for line in sys.stdin:
        op, n, reps, timeout, *rest = json.loads(line)
        warm = rest[0] if rest else 1
        if op == "stop":
            break
        times = []
        try:
            if op == "drop":
                held.pop(n, None); qi.put(("drop",)); qo.get(timeout=timeout)
                if DEV == "cuda": torch.cuda.empty_cache()
            for i in range(reps + warm):       # the first ``warm`` untimed
                a = time.perf_counter()
                if op == "p2w":
                    y = held.get(n)
                    if y is None:
                        y = held[n] = torch.ones(n // 4, device=DEV); sync(); a = time.perf_counter()
                    qi.put(("p2w", y)); qo.get(timeout=timeout); sync()
                elif op in ("w2p", "w2pf"):
                    qi.put((op, n)); x = qo.get(timeout=timeout); sync(); del x
                else:
                    qi.put(("empty",)); qo.get(timeout=timeout); sync()
                if i >= warm:
                    times.append(time.perf_counter() - a)
        except queue.Empty:
            why = "the child process died" if not p.is_alive() else f"no answer within {timeout} s"
            print("ERROR", why, flush=True); p.kill(); sys.exit(1)
        print("RESULT", json.dumps(times), flush=True)
    qi.put(("stop",))
    try: qo.get(timeout=10)
    except Exception: pass
    p.join(10)
    if p.is_alive(): p.kill()
"""


class Legacy:
    """torch.multiprocessing's legacy CUDA IPC in its own process pair (see LEGACY).

    ``run(op, n, reps)`` returns that many samples (seconds); once the pair failed
    (died, hung, out of memory) every later call returns [] and ``error`` says why."""

    def __init__(self, start_timeout=180.0):
        import queue
        import tempfile
        import threading
        env = dict(os.environ)
        env.pop("PYTORCH_CUDA_ALLOC_CONF", None)         # legacy IPC needs the native allocator
        with tempfile.NamedTemporaryFile("w", suffix="_legacy_ipc.py", delete=False) as f:
            f.write(LEGACY)
            self._script = f.name
        self._err = tempfile.TemporaryFile("w+")
        self.error = None
        self._lines = queue.Queue()
        self.proc = subprocess.Popen([sys.executable, self._script], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._err, text=True, env=env)

        def read(out=self.proc.stdout, q=self._lines):
            for line in out:
                q.put(line)
            q.put(None)
        threading.Thread(target=read, daemon=True).start()
        self._expect("READY", start_timeout)

    def _expect(self, word, timeout):
        import queue
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            line = None
            why = f"no answer within {timeout:.0f} s"
        else:
            why = "it exited" if line is None else line.strip()
        if line is None or not line.startswith(word):
            self._fail(why)
            return None
        return line[len(word):].strip()

    def _fail(self, why):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._err.seek(0)
        tail = self._err.read()[-300:]
        self.error = f"{why}; stderr: {tail}" if tail.strip() else why

    def run(self, op, n=0, reps=0, timeout=60.0, warm=1):
        if self.error is not None:
            return []
        try:
            self.proc.stdin.write(json.dumps([op, n, reps, timeout, warm]) + "\n")
            self.proc.stdin.flush()
        except OSError as exc:
            self._fail(f"the pipe broke: {exc}")
            return []
        got = self._expect("RESULT", timeout * (reps + warm) + 30)
        return [] if got is None else json.loads(got)

    def close(self):
        try:
            if self.error is None:
                self.proc.stdin.write(json.dumps(["stop", 0, 0, 0]) + "\n")
                self.proc.stdin.close()
                self.proc.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._err.close()
        os.unlink(self._script)


def cpu_route(a, x, n, budget_s):
    """The CPU route (COMFY_ENV_CUDA_FORCE_CPU) both ways, within a time budget."""
    PLANE.force_cpu = True
    a.submit(w_set_cpu, True).result()
    try:
        rc = reps_for(n, cpu=True)
        warm = 0 if n >= GiB else 1
        w2p = timed(lambda: a.submit(w_get, n).result(), rc, warm=warm, budget_s=budget_s)
        p2w = timed(lambda: a.submit(w_touch, x).result(), rc, warm=warm, budget_s=budget_s)
    finally:
        PLANE.force_cpu = False
        a.submit(w_set_cpu, False).result()
    return w2p, p2w


def w_cpu():
    """The worker's CPU time so far (all its threads)."""
    import time
    return time.process_time()


def paired_per_tensor(a, fn, k, nbytes, reps, sync=None, call=None):
    """Per tensor µs from interleaved pairs (empty call, ``k``-tensor call): the median of
    the pairs' differences / k, with the 25th and 75th percentiles.  Pairing cancels the
    drift of a shared host, which a difference of two separately taken medians does not.

    ``sync``: what each call waits for before the clock stops; by default the whole
    device (``torch.cuda.synchronize``: every stream, the unmapping of imports freed
    after earlier calls included); ``"stream"``: the caller's current stream only,
    i.e. until the received tensors are ready for the caller's next kernel.  Each call's
    time includes dropping its result (what the parent does when the tensors die).
    ``call``: what the second call of a pair is, instead of ``fn(k, nbytes)`` in ``a``."""
    if call is None:
        def call():
            return a.submit(fn, k, nbytes).result()
    if sync == "stream":
        def wait():
            torch.cuda.current_stream().synchronize()
    else:
        wait = torch.cuda.synchronize
    for _ in range(5):
        a.submit(w_nothing).result()
        r = call()
        del r
    drain = lifetime.LEDGER.drain
    diffs = []
    for _ in range(reps):
        # Each call is timed with the parent's handling of its dropped result (holder
        # deaths: frees or "idle" reports), so that cost is not charged to the next call
        # of the pair (it would cancel out of the difference).
        t0 = time.perf_counter()
        r = a.submit(w_nothing).result()
        wait()
        del r
        drain()
        t1 = time.perf_counter()
        r = call()
        wait()
        del r
        drain()
        t2 = time.perf_counter()
        diffs.append(((t2 - t1) - (t1 - t0)) / k * 1e6)
    q = statistics.quantiles(diffs, n=4)
    return {"median_us": statistics.median(diffs), "p25_us": q[0], "p75_us": q[2], "pairs": reps}


def cpu_per_tensor(a, fn, k, nbytes, calls, args=None):
    """CPU µs per tensor in each process (all threads), k-tensor calls minus empty calls
    (``fn(*args)`` when given, else ``fn(k, nbytes)``).

    Less sensitive than wall time to a busy host's scheduling: it counts the work done."""
    def run(f, *f_args):
        settle()
        w0 = a.submit(w_cpu).result()
        p0 = time.process_time()
        for _ in range(calls):
            r = a.submit(f, *f_args).result()
            del r
        torch.cuda.synchronize()
        settle()
        p1 = time.process_time()
        w1 = a.submit(w_cpu).result()
        return p1 - p0, w1 - w0
    pe, we = run(w_nothing)
    pm, wm = run(fn, *(args if args is not None else (k, nbytes)))
    n = calls * k
    return {"parent_cpu_us": (pm - pe) / n * 1e6, "worker_cpu_us": (wm - we) / n * 1e6}


def w_timers(on):
    """Worker side: time the plane's decode and event waits from now (``on``), or stop and
    return the per-call figures."""
    from comfy_env.ipc import lifetime
    from comfy_env.ipc.cuda.plane import PLANE
    if on:
        events = PLANE.local.events if hasattr(PLANE, "local") else PLANE._events
        t = _cache()["timers"] = Timers({"decode": (PLANE, "decode"), "event_wait": (events, "wait"),
                                         "holder": (lifetime.LEDGER, "holder"),
                                         "import_pointer": (PLANE.imports, "import_pointer")})
        t.__enter__()
        return None
    t = _cache().pop("timers")
    t.__exit__(None, None, None)
    return t.per_call_us()


def p2w_detail(a, x, calls=200):
    """Where a parent → worker call of ``x`` (sent before) spends its time beyond the
    empty call: interleaved pairs, CPU per call in each process, the parent's encode and
    the worker's decode (µs per call)."""
    def call():
        return a.submit(w_touch, x).result()
    out = {"paired": paired_per_tensor(a, None, 1, 0, reps=calls, call=call),
           "cpu": cpu_per_tensor(a, w_touch, 1, 0, calls, args=(x,))}
    a.submit(w_timers, True).result()
    with parent_timers() as tm:
        for _ in range(calls):
            call()
    torch.cuda.synchronize()
    out["worker_timers"] = a.submit(w_timers, False).result()
    out["parent_timers"] = tm.per_call_us()
    out["calls"] = calls
    return out


def w_routes():
    from comfy_env.ipc.cuda.plane import PLANE
    return dict(PLANE.routes), PLANE.recycled


def per_tensor(a, empty, k=32, nbytes=MiB, reps=30, suffix=""):
    """Worker → parent per tensor: one call returning ``k`` tensors, minus the empty call
    (as a difference of medians, and from interleaved pairs), plus CPU time per tensor,
    and the routes the worker took for them."""
    out = {}
    for label, fn in (("same", w_many), ("fresh", w_fresh)):
        routes0, recycled0 = a.submit(w_routes).result()
        with parent_timers() as tm:
            call = timed(lambda: a.submit(fn, k, nbytes).result(), reps, warm=5)
        pt = tm.per_call_us()
        out[label] = {"call_ms": call * 1e3, "per_tensor_us": (call - empty) / k * 1e6,
                      "parent_decode_us": pt["decode"][0], "parent_import_us": pt["import_pointer"][0],
                      "imports": pt["import_pointer"][1], "parent_release_us": pt["release_pointer"][0],
                      "event_wait_us": pt["event_wait"][0], "decodes": pt["decode"][1]}
        out[label]["paired"] = paired_per_tensor(a, fn, k, nbytes, reps=max(100, reps))
        out[label]["paired_stream"] = paired_per_tensor(a, fn, k, nbytes, reps=max(100, reps), sync="stream")
        out[label]["cpu"] = cpu_per_tensor(a, fn, k, nbytes, calls=max(100, reps))
        routes1, recycled1 = a.submit(w_routes).result()
        out[label]["worker_routes"] = {r: routes1[r] - routes0.get(r, 0) for r in routes1
                                       if routes1[r] != routes0.get(r, 0)}
        out[label]["worker_recycled"] = recycled1 - recycled0
    return {k + suffix: v for k, v in out.items()}


def profile_fresh(a, k=32, nbytes=MiB, calls=20):
    """cProfile of the parent over ``calls`` calls returning ``k`` fresh tensors."""
    import cProfile
    import io
    import pstats
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        r = a.submit(w_fresh, k, nbytes).result()
        torch.cuda.synchronize()
        del r
    settle()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).strip_dirs().sort_stats("tottime").print_stats(25)
    return s.getvalue()


# -- main ----------------------------------------------------------------------------------------
def main():
    quick = "--quick" in sys.argv
    lean = "--lean" in sys.argv        # a short device run: no footprint, no 4 GiB CPU route
    sizes = SIZES[:2] if quick else SIZES
    if os.environ.get("BENCH_SIZES"):
        # BENCH_SIZES=64MiB,1MiB: those rows, in that order (does a row's place move it?)
        names = dict(SIZES)
        unknown = [n for n in os.environ["BENCH_SIZES"].split(",") if n not in names]
        if unknown:
            sys.exit(f"BENCH_SIZES: unknown sizes {unknown}; choose from {list(names)}")
        sizes = [(n, names[n]) for n in os.environ["BENCH_SIZES"].split(",")]
    t_main = time.perf_counter()
    out = os.environ.get("OUT")
    install()
    torch.zeros(1, device="cuda")
    gpu = torch.cuda.get_device_name()
    res = {"gpu": gpu, "torch": torch.__version__, "parent_backend": torch.cuda.get_allocator_backend(),
           # The policy (the tree's default unless set) and whether the heap was made.
           "parent_heap": getattr(PLANE.local, "parent_heap", "torch")
                          + ("" if PLANE.local.heap.get(0) else " (none made)"),
           "driver": _driver_version(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "method": "median of warm back-to-back calls",
           "import_cache": {"max_bytes": PLANE.import_cache.max_bytes, "max_count": PLANE.import_cache.max_count,
                            "max_idle_s": PLANE.import_cache.max_idle_s},
           "rows": {}}
    legacy = None
    a = new_executor()
    b = new_executor()
    # The same worker with staging recycling off: parent → worker as before it existed.
    c = new_executor({"COMFY_ENV_CUDA_STAGING_CACHE_MIB": "0"})
    # And one without small copies: every worker tensor goes zero copy (exported).
    z = new_executor({"COMFY_ENV_CUDA_SMALL_COPY_MIB": "0"})
    try:
        res["worker_backend"] = a.submit(w_backend).result()
        empty = timed(lambda: a.submit(w_nothing).result(), 300, warm=20)
        res["empty_call_us"] = empty * 1e3 * 1e3
        print(f"empty call {empty * 1e6:.0f} us (median, back to back)", flush=True)
        res["per_tensor_w2p"] = per_tensor(a, empty)
        empty_z = timed(lambda: z.submit(w_nothing).result(), 300, warm=20)
        res["per_tensor_w2p"].update(per_tensor(z, empty_z, suffix=" (zero copy only)"))
        for k, v in res["per_tensor_w2p"].items():
            pr, cpu = v["paired"], v["cpu"]
            print(f"w→p per tensor ({k} tensors, 32 × 1 MiB per call): {v['per_tensor_us']:.1f} us "
                  f"(paired: median {pr['median_us']:.1f}, p25 {pr['p25_us']:.1f}, p75 {pr['p75_us']:.1f}); "
                  f"CPU parent {cpu['parent_cpu_us']:.1f} + worker {cpu['worker_cpu_us']:.1f} us; "
                  f"parent decode {v['parent_decode_us']:.1f} us/tensor, imports {v['imports']}; "
                  f"worker routes {v['worker_routes']}, recycled {v['worker_recycled']}", flush=True)
        _dump_partial(res)
        res["profile_fresh_parent"] = profile_fresh(a)
        if out:
            with open(os.path.join(out, "profile_parent.txt"), "w") as f:
                f.write(res["profile_fresh_parent"])
        settle()
        res["legacy_ipc_native"] = {}
        legacy = legacy_why = None
        try:
            legacy = Legacy()
        except OSError as exc:
            legacy_why = f"could not start: {exc}"
        if legacy is not None and legacy.error is not None:
            legacy_why, legacy = legacy.error, legacy.close()
        for label, n in sizes:
            row = {}
            x = torch.ones(n // 4, device="cuda")
            r = reps_for(n)
            # The cells compared with legacy IPC, interleaved with it round by round.
            blocks = collections.defaultdict(list)      # cell -> one list of samples per round
            k = ROUND_REPS or -(-r // ROUNDS)
            with parent_timers() as tm:
                for i in range(ROUNDS):
                    # Untimed calls at the start of each block, ours and legacy's alike.
                    w = max(3, WARM) if i == 0 else WARM
                    blocks["empty"].append(samples(lambda: a.submit(w_nothing).result(), k, warm=w))
                    blocks["w2p"].append(samples(lambda: a.submit(w_get, n).result(), k, warm=w))
                    # A new tensor every call (a node's fresh output): staged when small, else exported.
                    blocks["w2p_fresh"].append(samples(lambda: a.submit(w_fresh, 1, n).result(), k, warm=w))
                    blocks["p2w"].append(samples(lambda: a.submit(w_touch, x).result(), k, warm=w))
                    if legacy is not None:
                        for op, cell in (("empty", "empty"), ("w2p", "w2p"), ("w2pf", "w2p_fresh"),
                                         ("p2w", "p2w")):
                            blocks["legacy_" + cell].append(legacy.run(op, n, k, warm=w))
            row["parent_timers"] = tm.per_call_us()
            got = {cell: [t for b in bl for t in b] for cell, bl in blocks.items()}
            for cell, v in got.items():
                if v:
                    row[cell] = statistics.median(v)
            row["block_start"] = block_start(blocks)
            row["empty_ms"] = row.pop("empty")
            res["legacy_ipc_native"][str(n)] = (
                {"n": n, **{c: row.pop("legacy_" + c) for c in ("empty", "w2p", "w2p_fresh", "p2w")
                            if "legacy_" + c in row}, "reps": len(got["legacy_p2w"])}
                if got["legacy_p2w"] else {"n": n, "skipped": (legacy.error if legacy else legacy_why) or "?"})
            if legacy is not None:
                legacy.run("drop", n)
            if n > PLANE.import_cache.max_bytes:
                # Bigger than the import cache's default bound: once more with a bound that fits.
                old = PLANE.import_cache.max_bytes
                PLANE.import_cache.max_bytes = 2 * n
                try:
                    row["w2p_cache_fits"] = timed(lambda: a.submit(w_get, n).result(), r)
                finally:
                    PLANE.import_cache.max_bytes = old
                    settle()
                    PLANE.import_cache.flush()
            if n in (MiB, 64 * MiB):
                row["p2w_detail"] = p2w_detail(a, x)
            row["p2w_no_recycle"] = timed(lambda: c.submit(w_touch, x).result(), r)
            row["a2b"] = timed(lambda: b.submit(w_touch, a.submit(w_get, n)).result(), r)
            if lean and n > GiB:
                row["cpu_w2p"] = row["cpu_p2w"] = None
            else:
                row["cpu_w2p"], row["cpu_p2w"] = cpu_route(a, x, n, budget_s=20)
            x = None
            settle()
            PLANE.import_cache.flush()
            res["rows"][label] = row
            _dump_partial(res)
            print(label, {k: f"{v * 1e3:.3f} ms" for k, v in row.items() if isinstance(v, float)}, flush=True)
        res["routes_parent"] = dict(PLANE.routes)
        res["routes_worker"], res["staging_recycled_worker"] = a.submit(w_routes).result()
        res["import_cache_stats"] = PLANE.import_cache.stats()
        ipc = getattr(PLANE.receiver, "ipc", None) if hasattr(PLANE, "receiver") else None
        res["ipc_stats_parent"] = ipc.stats() if ipc is not None else None
        print("parent routes", res["routes_parent"], "ipc mappings", res["ipc_stats_parent"], flush=True)
        res["staging_recycled"] = PLANE.recycled
    finally:
        if legacy is not None:
            legacy.close()
        a.shutdown()
        b.shutdown()
        c.shutdown()
        z.shutdown()
    settle()
    PLANE.import_cache.flush()
    torch.cuda.empty_cache()
    # footprint after a peak, per heap policy
    res["footprint"] = {}
    for heap in () if lean else ("pool", "staging"):
        ex = new_executor({"COMFY_ENV_CUDA_HEAP": heap})
        try:
            base = free_bytes()
            ex.submit(w_footprint, 4 * GiB).result()
            after_peak = free_bytes()
            ex.submit(w_empty_cache).result()
            settle()
            after_trim = free_bytes()
        finally:
            ex.shutdown()
        res["footprint"][heap] = {"held_after_peak_MiB": (base - after_peak) / MiB,
                                  "held_after_empty_cache_MiB": (base - after_trim) / MiB}
    leg = {int(k): v for k, v in res["legacy_ipc_native"].items()}
    res["bench_s"] = time.perf_counter() - t_main
    print_table(res, sizes, leg)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    tag = gpu.replace(" ", "_").replace("/", "_")
    path = os.path.join(HERE, "results", f"cuda_{tag}_{time.strftime('%Y%m%d_%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", path)
    if out:
        with open(os.path.join(out, f"cuda_bench_{res['parent_backend']}.json"), "w") as f:
            json.dump(res, f, indent=1)


def _driver_version():
    import ctypes
    v = ctypes.c_int()
    try:
        D.call("cuDriverGetVersion", ctypes.byref(v))
    except Exception:
        return None
    return f"{v.value // 1000}.{v.value % 1000 // 10}"


def _dump_partial(res):
    dump_to_out("cuda_bench_partial.json", res)


def _ms(v, w=8, d=3):
    return f"{v * 1e3:{w}.{d}f}" if isinstance(v, (int, float)) else f"{'n/a':>{w}}"


def _ratio(a, b):
    return f"{a / b:11.0f}×" if isinstance(a, float) and b else f"{'n/a':>12}"


def print_table(res, sizes, leg):
    print(f"\nGPU: {res['gpu']}  torch {res['torch']}  parent allocator {res['parent_backend']}  "
          f"(workers: {res.get('worker_backend', '?')}; parent heap: {res.get('parent_heap', 'torch')})")
    print(f"method: {res['method']}; empty call {res['empty_call_us']:.0f} µs")
    for k, v in res["per_tensor_w2p"].items():
        pr, cpu = v["paired"], v["cpu"]
        ps = v.get("paired_stream")
        print(f"worker → parent per tensor, {k} tensors (32 × 1 MiB per call): {pr['median_us']:.1f} µs "
              f"median of {pr['pairs']} interleaved pairs (p25 {pr['p25_us']:.1f}, p75 {pr['p75_us']:.1f}); "
              + (f"waiting for the caller's stream only {ps['median_us']:.1f} µs "
                 f"(p25 {ps['p25_us']:.1f}, p75 {ps['p75_us']:.1f}); " if ps else "") +
              f"difference of medians {v['per_tensor_us']:.1f} µs; CPU per tensor: parent "
              f"{cpu['parent_cpu_us']:.1f} µs, worker {cpu['worker_cpu_us']:.1f} µs; "
              f"parent decode {v['parent_decode_us']:.1f} µs/tensor, {v['imports']} imports in {v['decodes']} decodes; "
              f"worker routes {v.get('worker_routes')}, recycled {v.get('worker_recycled')}")
    hdr = (f"{'size':>6} | {'empty':>7} {'w→p':>8} {'w→p new':>8} {'p→w':>8} {'p→w¹':>8} {'A→B':>8} | "
           f"{'CPU w→p':>9} {'CPU p→w':>9} | "
           f"{'legacy ∅':>9} {'legacy w→p':>10} {'legacy new':>10} {'legacy p→w':>10} | "
           f"{'CPU/ours w→p':>12} {'CPU/ours p→w':>12}")
    print(hdr)
    print("-" * len(hdr))
    for label, n in sizes:
        r = res["rows"][label]
        lg = leg.get(n, {})
        lw = _ms(lg.get("w2p"), 10) if "skipped" not in lg else f"{'skipped':>10}"
        lp = _ms(lg.get("p2w"), 10) if "skipped" not in lg else f"{'skipped':>10}"
        lf = _ms(lg.get("w2p_fresh"), 10) if "skipped" not in lg else f"{'skipped':>10}"
        le = _ms(lg.get("empty"), 9) if "skipped" not in lg else f"{'':>9}"
        print(f"{label:>6} | {_ms(r['empty_ms'], 7)} {_ms(r['w2p'])} {_ms(r.get('w2p_fresh'))} {_ms(r['p2w'])} "
              f"{_ms(r.get('p2w_no_recycle'))} "
              f"{_ms(r['a2b'])} | "
              f"{_ms(r['cpu_w2p'], 9, 1)} {_ms(r['cpu_p2w'], 9, 1)} | {le} {lw} {lf} {lp} | "
              f"{_ratio(r['cpu_w2p'], r['w2p'])} {_ratio(r['cpu_p2w'], r['p2w'])}")
    print("(ms, medians of warm back-to-back calls, the executor's call overhead included: see 'empty'; "
          "w→p: the same worker tensor every call; w→p new: a new one every call; "
          "p→w¹: staging recycling off, COMFY_ENV_CUDA_STAGING_CACHE_MIB=0 in the worker; "
          f"empty, w→p, w→p new, p→w and the legacy cells (legacy ∅: its empty round trip) were "
          f"measured in {ROUNDS} alternating rounds per size)")
    for label, n in sizes:
        dt = res["rows"][label].get("p2w_detail")
        if dt:
            pr, cpu, wt, pt = dt["paired"], dt["cpu"], dt["worker_timers"], dt["parent_timers"]
            us = lambda t: f"{t[0]:.1f}" if t and t[0] is not None else "n/a"   # noqa: E731
            print(f"{label} p→w beyond the empty call: {pr['median_us']:.1f} µs (paired, p25 {pr['p25_us']:.1f}, "
                  f"p75 {pr['p75_us']:.1f}); CPU parent {cpu['parent_cpu_us']:.1f} µs, worker "
                  f"{cpu['worker_cpu_us']:.1f} µs; parent encode {us(pt.get('encode'))} µs; worker decode "
                  f"{us(wt.get('decode'))} µs, event wait {us(wt.get('event_wait'))} µs, "
                  f"holder {us(wt.get('holder'))} µs; in {dt.get('calls', '?')} calls the parent exported "
                  f"{(pt.get('export_pointer') or (0, 0))[1]} pointers, the worker imported "
                  f"{(wt.get('import_pointer') or (0, 0))[1]}")
    for label, n in sizes:
        bs = res["rows"][label].get("block_start")
        if bs:
            print(f"{label} first 5 timed calls of each block / the rest, µs: " + ", ".join(
                f"{cell} {a:.0f}/{b:.0f}" for cell, (a, b) in bs.items()))
    print(f"worker routes over the run: {res.get('routes_worker')}")
    for n, lg in leg.items():
        if "skipped" in lg:
            print(f"legacy IPC {n >> 20} MiB: skipped ({lg['skipped'][:200]})")
    for heap, f in res["footprint"].items():
        print(f"footprint heap={heap}: after a 4 GiB peak {f['held_after_peak_MiB']:.0f} MiB held, "
              f"after empty_cache {f['held_after_empty_cache_MiB']:.0f} MiB")
    for label, n in sizes:
        r = res["rows"][label]
        if "w2p_cache_fits" in r:
            print(f"{label} w→p with an import-cache bound that fits it: {_ms(r['w2p_cache_fits'])} ms "
                  f"(default bound {res['import_cache']['max_bytes'] >> 20} MiB: {_ms(r['w2p'])} ms)")
    print(f"bench took {res['bench_s']:.0f} s")

def compare(paths):
    """``--compare BEFORE.json AFTER.json``: the cells of two runs side by side (ms)."""
    runs = [json.load(open(p)) for p in paths]
    print(f"\nbefore: {paths[0]}\nafter:  {paths[1]}\nGPU: {runs[1]['gpu']} (before: {runs[0]['gpu']})")
    cells = [("empty_ms", "empty call"), ("w2p", "w→p same tensor"), ("w2p_fresh", "w→p new tensor"),
             ("p2w", "p→w"), ("p2w_no_recycle", "p→w recycling off"), ("a2b", "A→B")]
    print(f"{'size':>6} {'cell':<20} {'before':>9} {'after':>9} {'after/before':>12} {'legacy':>9}")
    for label, n in SIZES:
        rows = [r["rows"].get(label) for r in runs]
        if not all(rows):
            continue
        leg = runs[1].get("legacy_ipc_native", {}).get(str(n), {})
        for key, name in cells:
            b, a = rows[0].get(key), rows[1].get(key)
            lk = {"w2p": "w2p", "w2p_fresh": "w2p_fresh", "p2w": "p2w"}.get(key)
            lv = leg.get(lk) if lk else None
            ratio = f"{a / b:12.2f}" if isinstance(a, float) and isinstance(b, float) and b else f"{'':>12}"
            print(f"{label:>6} {name:<20} {_ms(b, 9)} {_ms(a, 9)} {ratio} {_ms(lv, 9) if lv else '':>9}")
    for k in runs[1].get("per_tensor_w2p", {}):
        v = [r.get("per_tensor_w2p", {}).get(k, {}).get("paired", {}).get("median_us") for r in runs]
        print(f"w→p per tensor, {k}: {v[0]} → {v[1]} µs (paired medians)")


if __name__ == "__main__":
    if "--compare" in sys.argv:
        i = sys.argv.index("--compare")
        compare(sys.argv[i + 1:i + 3])
    else:
        main()
