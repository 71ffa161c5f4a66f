"""Where a warm call's microseconds go: timestamps at each stage, parent and worker.

    python benchmarks/profile_warm_call.py [SRC] [--fn main|module] [--calls 2000]

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
        ("        wenv = self.wenv\n        if fn is not None",
         "        _tp.mark('Penc1')\n        wenv = self.wenv\n        if fn is not None"),
        ("            check_frame(chunks)\n            return chunks, (), codec.PLAIN_FRAME, fn_sent\n",
         "            check_frame(chunks)\n            _tp.mark('Penc2')\n            return chunks, (), codec.PLAIN_FRAME, fn_sent\n"),
        ("        return chunks, fb.fds, fb, fn_sent\n",
         "        _tp.mark('Penc2')\n        return chunks, fb.fds, fb, fn_sent\n"),
    ],
    "executor/worker_handle.py": [
        ("            books()\n        self.channel.send(chunks, fds)\n",
         "            books()\n        _tp.mark('P1')\n        self.channel.send(chunks, fds)\n        _tp.mark('P2')\n"),
        # The caller reads its own result (read_for -> _read_turn), on the caller's thread.
        ("            frame = self._recv_frame()\n            while True:\n",
         "            frame = self._recv_frame()\n            _tp.mark('R0')\n            while True:\n"),
        ("            self.pool.on_idle(self)\n",
         "            _tp.mark('R1')\n            self.pool.on_idle(self)\n            _tp.mark('R2')\n"),
        ("                    fut.set_result(value)\n",
         "                    fut.set_result(value)\n                    _tp.mark('R3')\n"),
    ],
    "worker.py": [
        ("                body, fds = channel.recv(spin.before_recv())\n",
         "                body, fds = channel.recv(spin.before_recv())\n                _tp.mark('W0')\n"),
        ("                frame.close_fds()\n                return\n",
         "                frame.close_fds()\n                _tp.dump()\n                return\n"),
        ("            result = completed(fn(*args, **kwargs))",
         "            _tp.mark('W1')\n            result = completed(fn(*args, **kwargs))\n            _tp.mark('W2')"),
        ("                    held = self.functions.take(",
         "                    _tp.mark('W0a')\n                    held = self.functions.take("),
        ("        fb, chunks = codec.encode_message(envelope, self.link, objs)\n",
         "        fb, chunks = codec.encode_message(envelope, self.link, objs)\n        _tp.mark('W2a')\n"),
        ("            self.send_parts(Result(call_id, True), [result])\n",
         "            self.send_parts(Result(call_id, True), [result])\n            _tp.mark('W3')\n"),
    ],
}
SEQ = ["P0", "Penc0", "Penc1", "Penc2", "P1", "P2", "W0", "W0a", "W1", "W2", "W2a", "W3",
       "R0", "R1", "R2", "R3", "P3"]
TP = '''import os, pickle, time
T = []
ns = time.perf_counter_ns
def mark(tag):
    T.append((tag, ns()))
def dump():
    with open(os.environ["COMFY_ENV_PROFILE_OUT"], "wb") as f:
        pickle.dump(T, f)
'''
IMPORTS = {"executor/executor.py": "from .. import _tp\n", "executor/worker_handle.py": "from .. import _tp\n",
           "worker.py": "from . import _tp\n"}

DRIVER = '''
import sys
sys.path.insert(0, {here!r})
from _bench_funcs import identity
from comfy_env import IsolatedExecutor, _tp
def main_identity(x):
    return x
f = main_identity if {fn!r} == "main" else identity
ex = IsolatedExecutor(max_workers=1)
for _ in range(300):
    ex.submit(f, 1).result()
_tp.T.clear()
for _ in range({calls}):
    ex.submit(f, 1).result()
    _tp.mark("P3")
ex.shutdown()
import pickle
pickle.dump(_tp.T, open({out!r}, "wb"))
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
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        dst = os.path.join(tmp, "src")
        for m in instrument(args.src, dst):
            print(f"mark not placed (its line changed): {m}", file=sys.stderr)
        pout, wout = os.path.join(tmp, "parent.pkl"), os.path.join(tmp, "worker.pkl")
        env = dict(os.environ, PYTHONPATH=dst, COMFY_ENV_PROFILE_OUT=wout)
        code = DRIVER.format(here=HERE, fn=args.fn, calls=args.calls, out=pout)
        subprocess.run([sys.executable, "-c", code], env=env, check=True)
        with open(pout, "rb") as f:
            parent = pickle.load(f)
        with open(wout, "rb") as f:
            worker = pickle.load(f)
    calls = _group(parent, "P0")
    wcalls = [w for w in _group(worker, "W0") if "W1" in w][-len(calls):]
    print(f"{args.src}: {args.fn} function, {len(calls)} warm calls, medians in us")
    total = 0.0
    for a, b in zip(SEQ, SEQ[1:]):
        ds = [(m[b] - m[a]) / 1e3 for m in ({**c, **w} for c, w in zip(calls, wcalls))
              if a in m and b in m]
        if ds:
            med = statistics.median(ds)
            total += med
            print(f"  {a:>6} -> {b:<6} {med:8.1f}")
    ends = [(c["P3"] - c["P0"]) / 1e3 for c in calls if "P3" in c]
    print(f"  sum of the stage medians {total:.1f}; median call {statistics.median(ends):.1f}")


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
