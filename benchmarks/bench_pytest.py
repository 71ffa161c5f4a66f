"""Per-test overhead of isolated tests: in-process vs --isolated vs pytest-forked vs a
plain subprocess per test.

    python benchmarks/bench_pytest.py [--rounds 3] [--json PATH]

Two generated suites: 200 trivial tests, and 50 tests that each import numpy in
their body.  Each pytest mode runs the suite in its own pytest process; a conftest
hook times every test's whole protocol (setup, call, teardown, and whatever a
plugin wraps around it: the fork, the worker call).  "plain subprocess" starts
``python -c "import test_mod; test_mod.test_i()"`` per test (no pytest at all:
the floor of a process per test).  Modes take turns in several rounds (the box
is shared and noisy).  Reported: the median per-test time, and the overhead =
median(mode) - median(in-process) of the same suite; "warm" leaves out each
run's first test (the isolated worker's start).  Needs pytest-forked for its
column (skipped without it).  Writes JSON under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFTEST = '''
import json, os, time
import pytest

_times = []

@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    t0 = time.perf_counter()
    yield
    _times.append(time.perf_counter() - t0)

def pytest_sessionfinish(session):
    path = os.environ.get("BENCH_TIMES")
    if path:
        with open(path, "w") as f:
            json.dump(_times, f)
'''


def make_suites(root):
    trivial = ["def test_%d():\n    assert %d == %d\n" % (i, i, i) for i in range(200)]
    numpy = ["def test_%d():\n    import numpy as np\n    assert int(np.arange(%d).sum()) >= 0\n"
             % (i, i + 1) for i in range(50)]
    suites = {}
    for name, body, n in (("trivial", trivial, 200), ("numpy", numpy, 50)):
        d = os.path.join(root, name)
        os.makedirs(d)
        with open(os.path.join(d, "conftest.py"), "w") as f:
            f.write(CONFTEST)
        with open(os.path.join(d, f"test_{name}.py"), "w") as f:
            f.write("\n".join(body))
        suites[name] = (d, n)
    return suites


def run_pytest(d, extra):
    fd, times_path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    env = dict(os.environ, BENCH_TIMES=times_path)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra, d],
                          cwd=d, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"pytest {extra} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(times_path) as f:
        times = json.load(f)
    os.unlink(times_path)
    return times, wall


def run_subprocesses(d, n, name):
    times = []
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import test_{name} as m; m.test_{i}()"], cwd=d,
                       check=True)
        times.append(time.perf_counter() - t)
    return times, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=os.path.join(REPO, "benchmarks", "results", "pytest.json"))
    args = ap.parse_args()

    modes = {"in-process": [], "isolated": ["--isolated"]}
    try:
        import pytest_forked  # noqa: F401
        modes["pytest-forked"] = ["--forked"]
    except ImportError:
        print("pytest-forked not installed: its column is skipped", file=sys.stderr)
    probe = subprocess.run([sys.executable, "-m", "pytest", "--help"], capture_output=True, text=True)
    if "--isolated" not in probe.stdout:
        sys.exit("the comfy_env pytest plugin is not registered: pip install -e . first")

    with tempfile.TemporaryDirectory() as root:
        suites = make_suites(root)
        samples = {(s, m): [] for s in suites for m in list(modes) + ["plain subprocess"]}
        walls = {k: [] for k in samples}
        for r in range(args.rounds):
            for sname, (d, n) in suites.items():
                for mname, extra in modes.items():
                    times, wall = run_pytest(d, extra)
                    assert len(times) == n, (mname, len(times))
                    samples[(sname, mname)].append(times)
                    walls[(sname, mname)].append(wall)
                times, wall = run_subprocesses(d, n, sname)
                samples[(sname, "plain subprocess")].append(times)
                walls[(sname, "plain subprocess")].append(wall)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    results = []
    for sname, (_, n) in suites.items():
        base_all = statistics.median(t for run in samples[(sname, "in-process")] for t in run)
        base_warm = statistics.median(t for run in samples[(sname, "in-process")] for t in run[1:])
        for mname in list(modes) + ["plain subprocess"]:
            runs = samples[(sname, mname)]
            all_t = [t for run in runs for t in run]
            warm_t = [t for run in runs for t in run[1:]]
            first = statistics.median(run[0] for run in runs)
            results.append({
                "suite": sname, "tests": n, "mode": mname,
                "median_ms": 1e3 * statistics.median(all_t),
                "warm_median_ms": 1e3 * statistics.median(warm_t),
                "warm_overhead_ms": 1e3 * (statistics.median(warm_t) - base_warm),
                "overhead_ms": 1e3 * (statistics.median(all_t) - base_all),
                "p90_warm_ms": 1e3 * statistics.quantiles(warm_t, n=10)[-1],
                "first_test_ms": 1e3 * first,
                "session_wall_s": statistics.median(walls[(sname, mname)]),
            })

    hdr = (f"{'suite':8} {'mode':17} {'warm median':>12} {'warm overhead':>14} {'p90 warm':>9} "
           f"{'first test':>11} {'session':>8}")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        print(f"{r['suite']:8} {r['mode']:17} {r['warm_median_ms']:10.3f}ms {r['warm_overhead_ms']:12.3f}ms "
              f"{r['p90_warm_ms']:7.2f}ms {r['first_test_ms']:9.1f}ms {r['session_wall_s']:7.2f}s")
    for sname in suites:
        iso = next(r for r in results if r["suite"] == sname and r["mode"] == "isolated")
        forked = next((r for r in results if r["suite"] == sname and r["mode"] == "pytest-forked"), None)
        line = f"{sname}: isolated warm overhead {iso['warm_overhead_ms']:.3f} ms per test"
        if forked:
            line += (f", pytest-forked {forked['warm_overhead_ms']:.3f} ms "
                     f"(isolated/forked = {iso['warm_overhead_ms'] / forked['warm_overhead_ms']:.2f})")
        print(line)

    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                               "platform": platform.platform()},
                   "rounds": args.rounds, "results": results}, f, indent=1)
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
