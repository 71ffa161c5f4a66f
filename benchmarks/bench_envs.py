"""Environment builds: first build, cache hit, locked rebuild.

    python benchmarks/bench_envs.py [--rounds 3] [--json PATH]

Two specs, both offline: ``tiny`` (one wheel written here, find-links) and ``real``
(numpy, pillow, scipy, requests from the local package index at /opt/pypi/simple,
skipped where it does not exist).  For each:

* first build, cold uv cache — a new machine: fresh comfy-env cache, fresh UV_CACHE_DIR
* first build, warm uv cache — a new spec on a machine that has the packages already
* locked rebuild — ``pylock.comfy-env.toml`` next to the spec, env removed, rebuilt
  (no resolution; warm uv cache)
* cache hit, in-process — ``Env.from_toml(path).create()`` on a built env, new Env each time
* cache hit, fresh process — the same call as a process's first, timed inside it (the
  interpreter's start-up and ``import comfy_env.envs`` are shown separately)

Prints medians (seconds / milliseconds) and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
sys.path.insert(0, SRC)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from comfy_env.envs import Env  # noqa: E402
from test_envs_helpers import demo_dep_wheel  # noqa: E402

LOCAL_INDEX = "/opt/pypi/simple"


def specs(work):
    wheels = os.path.join(work, "wheels")
    demo_dep_wheel(wheels, "1.0")
    out = {"tiny": textwrap.dedent(f"""
        requirements = ["demo_dep>=1"]
        find_links = ["{wheels}"]
        no_index = true
    """)}
    if os.path.isdir(LOCAL_INDEX):
        out["real"] = textwrap.dedent(f"""
            requirements = ["numpy", "pillow", "scipy", "requests"]
            index_url = "file://{LOCAL_INDEX}"
        """)
    return out


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


_FRESH = ("import sys, time; t0 = time.perf_counter(); from comfy_env.envs import Env; t1 = time.perf_counter(); "
          "Env.from_toml(sys.argv[1], cache_dir=sys.argv[2]).create(progress=False); "
          "print(t1 - t0, time.perf_counter() - t1)")


def bench_spec(name, text, work, rounds):
    res = {k: [] for k in ("first_cold_s", "first_warm_s", "locked_rebuild_s", "hit_inproc_ms",
                           "hit_fresh_create_ms", "hit_fresh_import_ms", "hit_fresh_process_ms",
                           "python_startup_ms")}
    spec_dir = os.path.join(work, name)
    os.makedirs(spec_dir)
    spec = os.path.join(spec_dir, "comfy-env.toml")
    with open(spec, "w") as f:
        f.write(text)
    env_vars = dict(os.environ, PYTHONPATH=SRC)
    for r in range(rounds):
        cache = os.path.join(work, f"cache-{name}-{r}")
        uv_cache = os.path.join(work, f"uv-cache-{name}-{r}")
        os.environ["UV_CACHE_DIR"] = uv_cache                  # cold: nothing downloaded or unpacked yet
        res["first_cold_s"].append(timed(lambda: Env.from_toml(spec, cache_dir=cache).create(progress=False)))
        env = Env.from_toml(spec, cache_dir=cache)
        env.remove()
        res["first_warm_s"].append(timed(lambda: Env.from_toml(spec, cache_dir=cache).create(progress=False)))
        Env.from_toml(spec, cache_dir=cache).lock(progress=False)
        Env.from_toml(spec, cache_dir=cache).create(progress=False)      # the locked env (a new key)
        Env.from_toml(spec, cache_dir=cache).remove()
        res["locked_rebuild_s"].append(timed(
            lambda: Env.from_toml(spec, cache_dir=cache).create(progress=False, locked=True)))
        for _ in range(200):
            res["hit_inproc_ms"].append(1e3 * timed(lambda: Env.from_toml(spec, cache_dir=cache).create(progress=False)))
        for _ in range(10):
            t = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", _FRESH, spec, cache], env=env_vars, check=True,
                                 capture_output=True, text=True).stdout.split()
            res["hit_fresh_process_ms"].append(1e3 * (time.perf_counter() - t))
            res["hit_fresh_import_ms"].append(1e3 * float(out[0]))
            res["hit_fresh_create_ms"].append(1e3 * float(out[1]))
            res["python_startup_ms"].append(1e3 * timed(
                lambda: subprocess.run([sys.executable, "-c", "pass"], check=True)))
        os.remove(os.path.join(spec_dir, "pylock.comfy-env.toml"))
        shutil.rmtree(uv_cache, ignore_errors=True)
    os.environ.pop("UV_CACHE_DIR", None)
    return {k: statistics.median(v) for k, v in res.items()}, {k: v for k, v in res.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=os.path.join(HERE, "results", "envs.json"))
    args = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="comfy-env-bench-envs-")
    results = {}
    try:
        for name, text in specs(work).items():
            results[name] = bench_spec(name, text, work, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [("first build, cold uv cache", "first_cold_s", "s"), ("first build, warm uv cache", "first_warm_s", "s"),
            ("locked rebuild (warm uv cache)", "locked_rebuild_s", "s"),
            ("cache hit, in-process create()", "hit_inproc_ms", "ms"),
            ("cache hit, fresh process: create()", "hit_fresh_create_ms", "ms"),
            ("  + import comfy_env.envs", "hit_fresh_import_ms", "ms"),
            ("  whole process (python -c ...)", "hit_fresh_process_ms", "ms"),
            ("  python -c pass, for reference", "python_startup_ms", "ms")]
    names = list(results)
    print(f"{'median of ' + str(args.rounds) + ' rounds':40s}" + "".join(f"{n:>12s}" for n in names))
    for label, key, unit in rows:
        cells = "".join(f"{results[n][0][key]:>10.3f} {unit:<1s}" if unit == "s" else f"{results[n][0][key]:>9.2f} ms"
                        for n in names)
        print(f"{label:40s}{cells}")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"machine": f"{platform.node()} ({os.cpu_count()} CPUs)", "python": platform.python_version(),
                   "rounds": args.rounds, "medians": {n: results[n][0] for n in names},
                   "samples": {n: results[n][1] for n in names}}, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
