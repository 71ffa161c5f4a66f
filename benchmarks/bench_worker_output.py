"""Parent CPU spent forwarding a worker's output, by output shape and ``worker_output`` mode.

A worker writes N MiB to its stdout (no newline at all, ``\\r``-separated progress
updates, or 80-character lines); the parent's process CPU time from the call's
submission to the end of the output pump (shutdown) is measured, minus the same
executor's cost for a call that prints nothing.  "stream" output goes to
/dev/null (sys.stdout is swapped for it during the run).

    python benchmarks/bench_worker_output.py [--sizes 16,64] [--repeat 3]

Writes benchmarks/results/worker_output.json.  Runs against the comfy_env on
PYTHONPATH; a comfy_env without ``worker_output`` is measured in its only mode
(logging, as "logging").
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from comfy_env import IsolatedExecutor  # noqa: E402

import _proc_funcs  # noqa: E402


def _payload(shape, mib):
    n = mib << 20
    if shape == "no newline":
        return b"x" * n
    if shape == "\\r progress":
        unit = b"\r progress 0123456789 |#####     | 50%"
        return unit * (n // len(unit))
    unit = b"y" * 79 + b"\n"
    return unit * (n // len(unit))


def _run(mode, payload):
    kwargs = {} if mode is None else {"worker_output": mode}
    ex = IsolatedExecutor(name="bench", **kwargs)
    ex.submit(_proc_funcs.write_raw, "stdout", b"").result(60)     # worker started
    t0 = time.process_time()
    w0 = time.perf_counter()
    ex.submit(_proc_funcs.write_raw, "stdout", payload).result(600)
    ex.shutdown(wait=True)          # the pump ends at the worker's EOF
    return time.process_time() - t0, time.perf_counter() - w0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="16,64")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    has_modes = "worker_output" in inspect.signature(IsolatedExecutor).parameters
    modes = ["stream", "logging", "discard"] if has_modes else [None]
    rows = []
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        base = {m: statistics.median(_run(m, b"")[0] for _ in range(args.repeat)) for m in modes}
        for shape in ("no newline", "\\r progress", "80-char lines"):
            for mib in map(int, args.sizes.split(",")):
                payload = _payload(shape, mib)
                for mode in modes:
                    runs = [_run(mode, payload) for _ in range(args.repeat)]
                    cpu = statistics.median(r[0] for r in runs) - base[mode]
                    wall = statistics.median(r[1] for r in runs)
                    rows.append({"shape": shape, "MiB": mib, "mode": mode or "logging",
                                 "parent_cpu_s": round(cpu, 3), "wall_s": round(wall, 3)})
    print(f"{'output':<14} {'MiB':>5} {'mode':<8} {'parent CPU s':>13} {'wall s':>8}")
    for r in rows:
        print(f"{r['shape']:<14} {r['MiB']:>5} {r['mode']:<8} {r['parent_cpu_s']:>13.3f} "
              f"{r['wall_s']:>8.3f}")
    out = os.path.join(HERE, "results", "worker_output.json")
    with open(out, "w") as f:
        json.dump({"python": sys.version.split()[0], "repeat": args.repeat,
                   "has_worker_output": has_modes, "rows": rows}, f, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
