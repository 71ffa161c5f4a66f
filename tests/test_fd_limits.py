"""File descriptors are scarce (issue 15, item 6): results held in shared memory cost none,
the soft limit is raised, and running out of fds for a while breaks nothing for good.

Each test runs a script under a lowered RLIMIT_NOFILE in a subprocess.
"""
from __future__ import annotations

import pytest

from pythons import ALL_PYTHONS, run_script

_HOLD_RESULTS = r"""
import os, resource, sys
# soft == hard: nothing can raise it, what is held must fit.
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
import numpy as np
from comfy_env import IsolatedExecutor

def make(i):
    import numpy as np
    return np.full(16384, i, np.float32)          # 64 KiB: travels in shared memory

def first_sum(*arrs):
    return float(sum(float(a[0]) for a in arrs))

def main():
    # In a function: the results die with it, before the interpreter exits.
    with IsolatedExecutor() as ex:
        held = [ex.submit(make, i).result(30) for i in range(1000)]          # decoded
        futs = [ex.submit(make, i) for i in range(1000)]                      # never decoded
        for f in futs:
            f.exception(30)
        # Both kinds still travel to a worker: decoded ones as arguments, futures
        # forwarded undecoded (a chain).
        print("SEND", ex.submit(first_sum, *held[-200:]).result(30))
        print("CHAIN", ex.submit(first_sum, *futs[-200:]).result(30))
        print("HELD", sum(float(a[0]) for a in held), sum(float(f.result()[0]) for f in futs))
        # One frame of 1,000 arrays: packed into a few segments, a few fds.
        many = [np.full(16384, i, np.float32) for i in range(1000)]
        print("MANY", ex.submit(first_sum, *many).result(30))
        print("FDS", len(os.listdir("/proc/self/fd")) < 128)

if __name__ == "__main__":
    main()
"""


@ALL_PYTHONS
@pytest.mark.timeout(180)
def test_two_thousand_held_results_fit_under_a_soft_limit_of_256(pyver, tmp_path):
    out = run_script(pyver, _HOLD_RESULTS, cwd=tmp_path, timeout=150)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(ln.split(None, 1) for ln in out.stdout.splitlines())
    total = float(sum(range(800, 1000)))
    assert float(lines["SEND"]) == total
    assert float(lines["CHAIN"]) == total
    assert lines["HELD"].split() == [str(float(sum(range(1000))))] * 2
    assert float(lines["MANY"]) == float(sum(range(1000)))
    assert lines["FDS"] == "True"


_RAISE = r"""
import resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
import os
from comfy_env import IsolatedExecutor

def limit():
    import resource
    return resource.getrlimit(resource.RLIMIT_NOFILE)

with IsolatedExecutor() as ex:
    print(tuple(ex.submit(limit).result(30)) == (hard, hard),
          resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard))
"""


@pytest.mark.timeout(60)
def test_the_soft_fd_limit_is_raised_to_the_hard_limit_for_parent_and_workers(tmp_path):
    import resource
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] <= 256:
        pytest.skip("the hard fd limit is too low to see a raise")
    out = run_script("3.12", _RAISE, cwd=tmp_path, timeout=45)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["True", "True"]


_EMFILE = r"""
import os, resource
resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))
from comfy_env import IsolatedExecutor, WorkerStartError

ex = IsolatedExecutor()
assert ex.submit(pow, 2, 3).result(30) == 8
# The worker dies; while its replacement is due, the process has no fd left.
fut = ex.submit(os._exit, 3)
fut.exception(30)
hog = []
try:
    while True:
        hog.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
try:
    exc = ex.submit(pow, 2, 3).exception(30)
except Exception as e:
    exc = e
print("STARVED", type(exc).__name__, "Too many open files" in str(exc))
for fd in hog:
    os.close(fd)
print("AFTER", ex.submit(pow, 2, 5).result(30), ex.submit(pow, 2, 6).result(30))
ex.shutdown()
"""


@pytest.mark.timeout(60)
def test_running_out_of_fds_while_a_worker_restarts_does_not_break_the_executor(tmp_path):
    out = run_script("3.12", _EMFILE, cwd=tmp_path, timeout=45)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(ln.split(None, 1) for ln in out.stdout.splitlines())
    assert lines["STARVED"] == "WorkerStartError True"
    assert lines["AFTER"] == "32 64"


_FEW_FDS_MANY_WORKERS = r"""
import os, resource, sys, time
sys.path.insert(0, {tests!r})
resource.setrlimit(resource.RLIMIT_NOFILE, (36, 36))      # room for a few workers, not 8
import _funcs
from comfy_env import IsolatedExecutor

with IsolatedExecutor(max_workers=8) as ex:
    futs = [ex.submit(_funcs.sleep_then, 0.5, i) for i in range(8)]
    out = []
    for f in futs:
        try:
            out.append(f.result(60))
        except Exception as exc:
            out.append(type(exc).__name__)
    print("RESULTS", out)
    print("AFTER", ex.submit(_funcs.add, 2, 3).result(60))
"""


@pytest.mark.timeout(120)
def test_a_pool_bigger_than_the_fd_limit_allows_runs_every_call_on_the_workers_that_started(tmp_path):
    """Workers whose start runs out of fds (the handshake's fds truncated, EMFILE) are a
    shortage, not a broken environment: the calls run on the workers that did start
    (before: every call but the first failed with WorkerStartError and the executor
    broke), and a reader thread that finds no fd for its epoll set fails that start
    instead of dying with an uncaught exception."""
    from pythons import TESTS
    out = run_script("3.12", _FEW_FDS_MANY_WORKERS.format(tests=TESTS), cwd=tmp_path, timeout=90)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(ln.split(None, 1) for ln in out.stdout.splitlines())
    assert lines["RESULTS"] == str(list(range(8))), (out.stdout, out.stderr[-2000:])
    assert lines["AFTER"] == "5"
    assert "Exception in thread" not in out.stderr, out.stderr[-3000:]
