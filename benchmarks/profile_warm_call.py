"""Where a warm call's microseconds go: timestamps at each stage, parent and worker.

    python benchmarks/profile_warm_call.py [SRC] [--fn main|module] [--calls 2000]
    python benchmarks/profile_warm_call.py [SRC] --case p2w|w2p_new|w2p_same [--mib 1]   (GPU)

Copies the comfy_env source tree ``SRC`` (default: this checkout's ``src``) to a
temporary directory, puts ``perf_counter_ns`` marks into the copy at the stages
below (by matching lines of code: a mark whose line is not found is reported and
its stage left out), runs ``submit(f, 1).result()`` warm, and prints the median of
each stage.  The worker writes its marks when it is told to exit.  Both processes
read the same clock (CLOCK_MONOTONIC), so the wire stages are real.

    P0 submit -> Penc0 encode starts -> Penc1 function handled -> Penc2 call pickled
    -> P1 send -> P2 sent -> W0 worker received -> W0a envelope decoded -> W1 call
    starts -> W2 call returned -> W2a result pickled -> W3 sent -> R0 the caller, in
    result(), received the frame -> R1 claimed and decoded -> R2 worker handed back
    -> R3 future set -> P3 result() returns

With ``--case`` (a GPU, a ``cudaMallocAsync`` parent, default workers) the call moves
a CUDA tensor of ``--mib`` MiB: ``p2w`` the same parent tensor every call, ``w2p_new`` a
new worker tensor every call, ``w2p_same`` the same worker tensor; the parent
synchronises after each ``result()`` as bench_cuda.py does, and the empty call runs in
the same process before it, so the two columns compare stage by stage.  Marks inside
the CUDA plane, named by the process they ran in (P or W): s0/s1 the sender's encode of
a tensor (s0a-s0d inside it: the frame's plane context, the device's, the route, the
lend), f0/f1 the frame's copies and event records just before sending, d0/d1 the
receiver's decode of a tensor (d0a-d0e inside it: record, event wait, wrap, holder);
Wz the call's arguments' holders gone, Wr their releases drained.

The marks match the code of this checkout: an older tree whose lines differ gets the
marks that still match (the others are reported, and their stages left out).
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
MARKS = {
    "executor/executor.py": [
        ("        if not (callable(fn) or isinstance(fn, str)):\n",
         "        _tp.mark('P0')\n        if not (callable(fn) or isinstance(fn, str)):\n"),
        ("        try:\n            chunks, fds, fb, fn_sent = self._encode(item, worker)",
         "        _tp.mark('Penc0')\n        try:\n            chunks, fds, fb, fn_sent = self._encode(item, worker)"),
        ("        try:\n            chunks, fds, fb, fn_sent, size = self._encode(item, worker)",
         "        _tp.mark('Penc0')\n        try:\n            chunks, fds, fb, fn_sent, size = self._encode(item, worker)"),
        ("        wenv = self.wenv\n        if fn is not None",
         "        _tp.mark('Penc1')\n        wenv = self.wenv\n        if fn is not None"),
        ("            check_frame(chunks)\n            return chunks, (), codec.PLAIN_FRAME, fn_sent\n",
         "            check_frame(chunks)\n            _tp.mark('Penc2')\n            return chunks, (), codec.PLAIN_FRAME, fn_sent\n"),
        ("        return chunks, fb.fds, fb, fn_sent\n",
         "        _tp.mark('Penc2')\n        return chunks, fb.fds, fb, fn_sent\n"),
        # (trees since the frame's size is returned too)
        ("            size = check_frame(chunks)\n            return chunks, (), codec.PLAIN_FRAME, fn_sent, size\n",
         "            size = check_frame(chunks)\n            _tp.mark('Penc2')\n"
         "            return chunks, (), codec.PLAIN_FRAME, fn_sent, size\n"),
        ("        return chunks, fb.fds, fb, fn_sent, size\n",
         "        _tp.mark('Penc2')\n        return chunks, fb.fds, fb, fn_sent, size\n"),
    ],
    "executor/worker_handle.py": [
        ("            books()\n        self.channel.send(chunks, fds)\n",
         "            books()\n        _tp.mark('P1')\n        self.channel.send(chunks, fds)\n        _tp.mark('P2')\n"),
        ("            books()\n        self.channel.send(chunks, fds, before)\n",
         "            books()\n        _tp.mark('P1')\n        self.channel.send(chunks, fds, before)\n        _tp.mark('P2')\n"),
        # The caller reads its own result (read_for -> _read_turn), on the caller's thread.
        ("            frame = self._recv_frame()\n            while True:\n",
         "            frame = self._recv_frame()\n            _tp.mark('R0')\n            while True:\n"),
        ("            self.pool.on_idle(self)\n",
         "            _tp.mark('R1')\n            self.pool.on_idle(self)\n            _tp.mark('R2')\n"),
        ("                    fut.set_result(value)\n",
         "                    fut.set_result(value)\n                    _tp.mark('R3')\n"),
    ],
    "ipc/cuda/sender.py": [
        ("    def encode(self, obj, enc):\n        if not obj.is_cuda:\n",
         "    def encode(self, obj, enc):\n        _tp.mark('S0')\n        if not obj.is_cuda:\n"),
        ("        ctx = self._encode_context(enc)\n",
         "        ctx = self._encode_context(enc)\n        _tp.mark('S0a')\n"),
        ("        if nbytes and heap is not None:\n",
         "        _tp.mark('S0b')\n        if nbytes and heap is not None:\n"),
        ("        seq = 0\n        if route == \"ipc\":\n",
         "        _tp.mark('S0c')\n        seq = 0\n        if route == \"ipc\":\n"),
        ("        event = None\n        if caps.events:\n",
         "        _tp.mark('S0d')\n        event = None\n        if caps.events:\n"),
        ("        return pack_fields(VERSION, route, ref, dtype, shape, strides, offset, uuid, ordinal, event,\n",
         "        _tp.mark('S1')\n        return pack_fields(VERSION, route, ref, dtype, shape, strides, offset, uuid, ordinal, event,\n"),
        ("        copies, ctx.copies = ctx.copies, {}\n",
         "        _tp.mark('F0')\n        copies, ctx.copies = ctx.copies, {}\n"),
        ("                self.local.rings[ordinal].record_reserved(slot, stream)\n",
         "                self.local.rings[ordinal].record_reserved(slot, stream)\n            _tp.mark('F1')\n"),
    ],
    "ipc/cuda/receiver.py": [
        ("            rec = dec.record(desc.ref)\n",
         "            _tp.mark('D0a')\n            rec = dec.record(desc.ref)\n            _tp.mark('D0b')\n"),
        ("            t, keeper = self._wrap(base + desc.offset, desc, ordinal, device)\n"
         "            lifetime.LEDGER.holder(rec, keeper)\n",
         "            _tp.mark('D0c')\n            t, keeper = self._wrap(base + desc.offset, desc, ordinal, device)\n"
         "            _tp.mark('D0d')\n            lifetime.LEDGER.holder(rec, keeper)\n            _tp.mark('D0e')\n"),
        ("    def decode(self, desc, dec):\n",
         "    def decode(self, desc, dec):\n        _tp.mark('D0')\n"),
        ("        if desc.requires_grad:\n            t.requires_grad_(True)\n        return t\n",
         "        if desc.requires_grad:\n            t.requires_grad_(True)\n        _tp.mark('D1')\n        return t\n"),
    ],
    "worker.py": [
        ("            args = kwargs = fn = held = None\n",
         "            args = kwargs = fn = held = None\n            _tp.mark('Wz')\n"),
        ("        lifetime.LEDGER.drain_hushed()\n        try:\n            self.send_parts(",
         "        lifetime.LEDGER.drain_hushed()\n        _tp.mark('Wr')\n        try:\n            self.send_parts("),
        ("        msgs = lifetime.LEDGER.drain_hushed(keep=self.link)\n        try:\n            self.send_parts(",
         "        msgs = lifetime.LEDGER.drain_hushed(keep=self.link)\n        _tp.mark('Wr')\n        try:\n            self.send_parts("),
        ("                body, fds = channel.recv(spin.before_recv())\n",
         "                body, fds = channel.recv(spin.before_recv())\n                _tp.mark('W0')\n"),
        ("                frame.close_fds()\n                return\n",
         "                frame.close_fds()\n                _tp.dump()\n                return\n"),
        ("            result = completed(fn(*args, **kwargs))",
         "            _tp.mark('W1')\n            result = completed(fn(*args, **kwargs))\n            _tp.mark('W2')"),
        ("                    held = self.functions.take(",
         "                    _tp.mark('W0a')\n                    held = self.functions.take("),
        ("\n        fb, chunks = codec.encode_message(envelope, self.link, objs)\n",
         "\n        fb, chunks = codec.encode_message(envelope, self.link, objs)\n        _tp.mark('W2a')\n"),
        ("            raise\n        try:\n            self.channel.send(chunks, fb.fds, codec.control_chunks(",
         "            raise\n        _tp.mark('W2a')\n        try:\n            self.channel.send(chunks, fb.fds, codec.control_chunks("),
        ("            self.send_parts(Result(call_id, True), [result])\n",
         "            self.send_parts(Result(call_id, True), [result])\n            _tp.mark('W3')\n"),
        ("            self.send_parts(Result(call_id, True), [result], msgs)\n",
         "            self.send_parts(Result(call_id, True), [result], msgs)\n            _tp.mark('W3')\n"),
    ],
}
TP = '''import os, pickle, time
T = []
ns = time.perf_counter_ns
def mark(tag):
    T.append((tag, ns()))
CUT = {}
def cut(name):
    CUT[name] = list(T)
    T.clear()
def dump():
    with open(os.environ["COMFY_ENV_PROFILE_OUT"], "wb") as f:
        pickle.dump(CUT or {"empty": T}, f)
'''
IMPORTS = {"executor/executor.py": "from .. import _tp\n", "executor/worker_handle.py": "from .. import _tp\n",
           "worker.py": "from . import _tp\n", "ipc/cuda/sender.py": "from ... import _tp\n",
           "ipc/cuda/receiver.py": "from ... import _tp\n"}
# Plane marks are named by the process they run in (S0 in the parent is Ps0, in the worker Ws0).
PLANE_TAGS = {t: t.lower() for t in ("S0", "S0a", "S0b", "S0c", "S0d", "S1", "F0", "F1",
                                     "D0", "D0a", "D0b", "D0c", "D0d", "D0e", "D1")}

DRIVER = '''
import sys
sys.path.insert(0, {here!r})
from _bench_funcs import identity
from comfy_env import IsolatedExecutor, _tp
case, mib = {case!r}, {mib!r}
def main_identity(x):
    return x
def cache():
    import builtins
    return builtins.__dict__.setdefault("_profile_cache", {{}})
def w_touch(t):
    return None
def w_new(n):
    import torch
    return torch.empty(n // 4, device="cuda")
def w_same(n):
    import torch
    c = cache()
    if n not in c:
        c[n] = torch.ones(n // 4, device="cuda"); torch.cuda.synchronize()
    return c[n]
f = main_identity if {fn!r} == "main" else identity
sync = lambda: None
init = None
if case != "empty":
    import torch
    from comfy_env.ipc.cuda import install
    install()
    init, sync = install, torch.cuda.synchronize
    n = mib << 20
    x = torch.ones(n // 4, device="cuda")
ex = IsolatedExecutor(max_workers=1, initializer=init)
def run(case):
    if case == "empty":
        r = ex.submit(f, 1).result()
    elif case == "p2w":
        r = ex.submit(w_touch, x).result()
    elif case == "w2p_new":
        r = ex.submit(w_new, n).result()
    else:
        r = ex.submit(w_same, n).result()
    sync()
    del r
out = {{}}
for c in (["empty"] if case == "empty" else ["empty", case]):
    for _ in range(300):
        run(c)
    _tp.T.clear()
    for _ in range({calls}):
        run(c)
        _tp.mark("P3")
    out[c] = list(_tp.T)
    _tp.T.clear()
    ex.submit(_tp.cut, c).result()
ex.shutdown()
import pickle
pickle.dump(out, open({out!r}, "wb"))
'''


def instrument(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    pkg = os.path.join(dst, "comfy_env")
    with open(os.path.join(pkg, "_tp.py"), "w") as f:
        f.write(TP)
    missing = []
    for rel, pairs in MARKS.items():
        path = os.path.join(pkg, rel)
        with open(path) as f:
            text = f.read()
        for old, new in pairs:
            if text.count(old) == 1:
                text = text.replace(old, new)
        for old, new in pairs:      # some marks have two spellings (older trees)
            tags = re.findall(r"_tp\.mark\('(\w+)'\)", new)
            if tags and not all(f"_tp.mark('{t}')" in text for t in tags):
                missing.append(f"{rel}: {old.strip()[:60]}")
        # after the module docstring and `from __future__`
        head, sep, rest = text.partition("from __future__ import annotations\n")
        text = head + sep + IMPORTS[rel] + rest
        with open(path, "w") as f:
            f.write(text)
    return missing


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", nargs="?", default=os.path.join(os.path.dirname(HERE), "src"))
    ap.add_argument("--fn", choices=["main", "module"], default="main")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--case", choices=["empty", "p2w", "w2p_new", "w2p_same"], default="empty")
    ap.add_argument("--mib", type=int, default=1)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        dst = os.path.join(tmp, "src")
        for m in instrument(args.src, dst):
            print(f"mark not placed (its line changed): {m}", file=sys.stderr)
        pout, wout = os.path.join(tmp, "parent.pkl"), os.path.join(tmp, "worker.pkl")
        env = dict(os.environ, PYTHONPATH=dst, COMFY_ENV_PROFILE_OUT=wout)
        if args.case != "empty":
            env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync")
        code = DRIVER.format(here=HERE, fn=args.fn, calls=args.calls, out=pout, case=args.case, mib=args.mib)
        subprocess.run([sys.executable, "-c", code], env=env, check=True)
        with open(pout, "rb") as f:
            parent = pickle.load(f)
        with open(wout, "rb") as f:
            worker = pickle.load(f)
    cases = list(parent)
    stages = {c: stage_medians(parent[c], worker.get(c, [])) for c in cases}
    # One row per pair of consecutive marks, in the order of the last case's median times.
    order = stages[cases[-1]][0]
    label = f", {args.mib} MiB" if args.case != "empty" else ""
    print(f"{args.src}: {args.fn} function{label}, {args.calls} warm calls per case, medians in us")
    print(f"  {'stage':<16}" + "".join(f"{c:>10}" for c in cases))
    for a, b in zip(order, order[1:]):
        print(f"  {a + ' -> ' + b:<16}" + "".join(
            f"{stages[c][1].get((a, b), float('nan')):10.1f}" for c in cases))
    print(f"  {'sum of stages':<16}" + "".join(f"{sum(stages[c][1].values()):10.1f}" for c in cases))
    print(f"  {'median call':<16}" + "".join(f"{stages[c][2]:10.1f}" for c in cases))


def stage_medians(pmarks, wmarks):
    """``(tags in order, {(a, b): median us}, median call us)`` of one case's marks.

    Plane marks fire in both processes: named here by where they ran (``Ps0``, ``Wd0``).
    The order is that of the median time of each mark after P0."""
    pmarks = [("P" + PLANE_TAGS[t] if t in PLANE_TAGS else t, v) for t, v in pmarks]
    wmarks = [("W" + PLANE_TAGS[t] if t in PLANE_TAGS else t, v) for t, v in wmarks]
    calls = _group(pmarks, "P0")
    wcalls = [w for w in _group(wmarks, "W0") if "W3" in w][-len(calls):]
    merged = [{**c, **w} for c, w in zip(calls, wcalls)]
    tags = {t for m in merged for t in m}
    offset = {t: statistics.median([m[t] - m["P0"] for m in merged if t in m]) for t in tags}
    order = sorted(tags, key=offset.get)
    out = {}
    for a, b in zip(order, order[1:]):
        ds = [(m[b] - m[a]) / 1e3 for m in merged if a in m and b in m]
        if ds:
            out[(a, b)] = statistics.median(ds)
    ends = [(c["P3"] - c["P0"]) / 1e3 for c in calls if "P3" in c]
    return order, out, statistics.median(ends)


def _group(marks, first):
    out = []
    for tag, t in marks:
        if tag == first:
            out.append({})
        if out:
            out[-1][tag] = t
    return out


if __name__ == "__main__":
    main()
