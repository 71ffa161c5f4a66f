"""Helpers the benchmark scripts share.

Standard library only (plus :mod:`_bench_funcs`): a driver such as
bench_small_arrays.py imports this before it picks which comfy_env tree to load.
"""
from __future__ import annotations

import json
import os
import platform
import time

from _bench_funcs import identity

UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(s):
    """``"64K"``, ``"16MiB"``, ``"1G"`` or a plain byte count -> bytes."""
    s = s.strip().upper().rstrip("IB")
    return int(s[:-1]) * UNITS[s[-1]] if s[-1] in UNITS else int(s)


def label(n):
    """Bytes -> ``"16 MiB"`` (the largest unit that divides ``n``), else ``"n B"``."""
    for u in ("G", "M", "K"):
        if n >= UNITS[u] and n % UNITS[u] == 0:
            return f"{n // UNITS[u]} {u}iB"
    return f"{n} B"


def percentile(xs, q):
    """The ``q`` quantile of ``xs`` (nearest rank, no interpolation)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def cold_start(make, fn=identity, *args):
    """Seconds from making an executor to the result of its first call, ``fn(*args)``
    (default ``identity(1)``); the executor is shut down afterwards."""
    args = args or ((1,) if fn is identity else ())
    t0 = time.perf_counter()
    ex = make()
    ex.submit(fn, *args).result()
    dt = time.perf_counter() - t0
    ex.shutdown()
    return dt


def write_results(path, benchmark, rows, **extra):
    """Write a benchmark's JSON (its name, the machine, the time, ``extra``, the rows)
    to ``path``; returns what was written."""
    out = {"benchmark": benchmark, **extra,
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "platform": platform.platform()},
           "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {path}")
    return out


def dump_to_out(name, res):
    """Write ``res`` as ``$OUT/name`` (JSON) when ``$OUT`` is set: what a device call
    brings back (benchmarks/_gpu_run.sh)."""
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, name), "w") as f:
            json.dump(res, f, indent=1, default=str)
