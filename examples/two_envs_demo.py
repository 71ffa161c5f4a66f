"""Two environments with conflicting versions of one package, side by side.

    python examples/two_envs_demo.py [--keep]

Works offline: it writes two tiny wheels, ``demo_dep`` 1.0 and 2.0, into a temporary
directory, declares one environment for each (numpy is shared from this interpreter
instead of installed), builds both with uv, then sends arrays through both workers at
once.  Each step prints how long it took.  ``demo_dep.transform`` multiplies by the
package's major version, so the results show which version ran.  The parent itself
never imports either version.

Timed steps that repeat show the first call and the warm median next to each other:
a first call pays one-off costs (worker start-up, imports, fresh shared memory), which
later calls don't.  The README's figures are warm medians.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.util
import os
import shutil
import statistics
import tempfile
import textwrap
import time
import zipfile
from contextlib import contextmanager

import numpy as np

from comfy_env import Env, IsolatedExecutor


@contextmanager
def step(title):
    t0 = time.perf_counter()
    yield
    print(f"  {(time.perf_counter() - t0) * 1000:9.1f} ms  {title}")


def first_and_warm(title, fn, repeat=9):
    """Time ``fn()`` once (first call), then ``repeat`` more times: print both."""
    times = []
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1000)
    warm = times[1:]
    print(f"  {times[0]:9.1f} ms  {title}: first call")
    print(f"  {statistics.median(warm):9.1f} ms  {title}: warm, median of {repeat} "
          f"({min(warm):.1f} to {max(warm):.1f})")
    return out


def write_wheel(outdir, name, version, files):
    """A minimal pure-Python wheel (zip + METADATA/WHEEL/RECORD); no build backend needed."""
    dist_info = f"{name}-{version}.dist-info"
    files = dict(files)
    files[f"{dist_info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    files[f"{dist_info}/WHEEL"] = "Wheel-Version: 1.0\nGenerator: demo\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist_info}/RECORD"] = "\n".join(record + [f"{dist_info}/RECORD,,"]) + "\n"
    path = os.path.join(outdir, f"{name}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as z:
        for p, text in files.items():
            z.writestr(p, text)
    return path


def demo_dep_source(version):
    return textwrap.dedent(f"""
        VERSION = {version!r}

        def describe():
            import sys
            return f"demo_dep {{VERSION}} on Python {{sys.version_info[0]}}.{{sys.version_info[1]}}"

        def transform(a):
            return a * float(VERSION.split(".")[0])

        def echo(a):
            return a
    """)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (and its env cache)")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="comfy-env-demo-")
    cache_dir = os.path.join(work, "cache")   # a fresh cache, so the first build really builds
    try:
        print(f"working in {work}")
        with step("wrote demo_dep 1.0 and 2.0 wheels"):
            wheels = os.path.join(work, "wheels")
            os.makedirs(wheels)
            for v in ("1.0", "2.0"):
                write_wheel(wheels, "demo_dep", v, {"demo_dep/__init__.py": demo_dep_source(v)})

        envs = []
        for v in ("1.0", "2.0"):
            d = os.path.join(work, f"node-{v}")
            os.makedirs(d)
            with open(os.path.join(d, "comfy-env.toml"), "w") as f:
                f.write(textwrap.dedent(f"""
                    name = "demo-{v}"
                    requirements = ["demo_dep=={v}"]
                    find_links = ["{wheels}"]
                    no_index = true          # offline: only the wheels above
                    share = ["numpy"]        # use this interpreter's numpy, don't install it
                """))
            env = Env.from_toml(d, cache_dir=cache_dir)
            with step(f"built env {env.name} (uv venv + install)"):
                env.create(progress=False)
            envs.append(env)
        with step("create() again for both: cache hits, no installer"):
            for env in envs:
                Env.from_toml(os.path.dirname(env.spec.source), cache_dir=cache_dir).create(progress=False)

        assert importlib.util.find_spec("demo_dep") is None, "the parent must see neither version"
        with step("started one worker in each env"):
            ex1 = IsolatedExecutor(env=envs[0])
            ex2 = IsolatedExecutor(env=envs[1])
        with ex1, ex2:
            with step("first call in each (worker start-up included)"):
                d1 = ex1.submit("demo_dep:describe")
                d2 = ex2.submit("demo_dep:describe")
                print(f"             env 1 says: {d1.result()}\n             env 2 says: {d2.result()}")
            x = np.arange(12, dtype=np.float32).reshape(3, 4)
            with step("one small array through both envs at once (workers import numpy)"):
                y1 = ex1.submit("demo_dep:transform", x)
                y2 = ex2.submit("demo_dep:transform", x)
                y1, y2 = y1.result(), y2.result()
            print(f"             x.sum() = {x.sum():g}, env 1 -> {y1.sum():g}, env 2 -> {y2.sum():g}")
            assert np.array_equal(y1, x) and np.array_equal(y2, 2 * x)
            big = np.random.default_rng(0).random((4096, 4096), dtype=np.float32)  # 64 MiB
            mib = big.nbytes >> 20
            out = first_and_warm(
                f"{mib} MiB array transformed in env 1, then in env 2",
                lambda: ex2.submit("demo_dep:transform",
                                   ex1.submit("demo_dep:transform", big).result()).result())
            assert np.allclose(out, big * 2)
            out = first_and_warm(f"{mib} MiB echo through env 1 (fn returns its argument)",
                                 lambda: ex1.submit("demo_dep:echo", big).result())
            assert np.array_equal(out, big)
            del out
            first_and_warm("20 small calls alternating between the envs",
                           lambda: [ex.submit("demo_dep:transform", x).result()
                                    for _ in range(10) for ex in (ex1, ex2)])
        print(textwrap.dedent(f"""
            Why first calls cost more: a worker's first call starts it and imports numpy
            there (the steps above), and the first big call faults fresh shared memory in
            (about 1 GiB/s on a small box); later calls reuse recycled, already-faulted
            segments.  Warm, the transform row is two hops: env 1 gets a copy of the input
            in shared memory, env 2 gets env 1's result with no copy (it already lives
            there), each worker computes a new {mib} MiB array and copies it once on the
            way out, and results arrive without a copy.  The echo row is the transport
            alone (one copy in, none back): the figure the README's table reports.  An
            input made with comfy_env.shared_like() would not be copied at all.
        """).rstrip())
        print("ok: each worker saw its own demo_dep, the parent saw neither")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
