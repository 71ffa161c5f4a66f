"""Fork children, inherited fds and parent death (issue 15, items 1-3).

What happens at fork, exit and on signals depends on the interpreter: the script
tests run on Python 3.10-3.13 (tests/pythons.py).
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from comfy_env import IsolatedExecutor, WorkerCrashed
from pythons import ALL_PYTHONS, run_script, script_env, user_python
from procstate import proc_state, wait_gone


def _kill(pids):
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# -- 1. a fork child of a process holding an executor -------------------------------------

_FORK_CHILD = r"""
import multiprocessing as mp, os, time
from comfy_env import IsolatedExecutor

def child(ex, q):
    try:
        ex.submit(pow, 2, 3)
    except RuntimeError as exc:
        q.put(f"RuntimeError: {exc}")
    except BaseException as exc:
        q.put(f"other {type(exc).__name__}: {exc}")
    else:
        q.put("no error")

def run_child(ctx, ex, q, join):
    p = ctx.Process(target=child, args=(ex, q))
    p.start()
    msg = q.get(timeout=30)
    p.join(join)
    code = p.exitcode
    if code is None:
        p.kill()
        p.join()
    return msg, code

if __name__ == "__main__":
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    ex = IsolatedExecutor()
    assert ex.submit(pow, 2, 3).result(30) == 8
    pids = ex.worker_pids()
    # A child forked while the executor is idle: its exit must leave the workers alone.
    msg, code = run_child(ctx, ex, q, 20)
    print("IDLE", code, msg, flush=True)
    print("IDLE_AFTER", ex.submit(pow, 2, 10).result(30), ex.worker_pids() == pids, flush=True)
    # A child forked while a call runs: it must not wait for that call to leave (one
    # that did would outlast the join by over a second).
    fut = ex.submit(time.sleep, 6)
    while not fut.running():
        time.sleep(0.01)
    time.sleep(0.2)
    msg, code = run_child(ctx, ex, q, 4)
    print("BUSY", code, fut.done(), msg, flush=True)
    fut.result(30)
    print("BUSY_AFTER", ex.submit(pow, 2, 5).result(30), ex.worker_pids() == pids, flush=True)
    ex.shutdown()
"""


@ALL_PYTHONS
@pytest.mark.timeout(150)
def test_a_fork_child_is_inert_exits_at_once_and_leaves_the_parents_workers_alone(pyver, tmp_path):
    out = run_script(pyver, _FORK_CHILD, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = {ln.split()[0]: ln.split(None, 1)[1] for ln in out.stdout.splitlines() if ln}
    expected = ("RuntimeError: this executor was created in the parent process (pid ")
    # The child exits with 0 at once, and submit raised there.
    code, msg = lines["IDLE"].split(None, 1)
    assert code == "0" and msg.startswith(expected) and "create a new IsolatedExecutor in " \
        "the child" in msg, lines["IDLE"]
    assert lines["IDLE_AFTER"] == "1024 True"
    code, done, msg = lines["BUSY"].split(None, 2)
    assert (code, done) == ("0", "False") and msg.startswith(expected), lines["BUSY"]
    assert lines["BUSY_AFTER"] == "32 True"


# -- 2. inherited fds keep orphans alive --------------------------------------------------

_FORKED_ORPHAN = r"""
import os, sys, time
from comfy_env import IsolatedExecutor

ex = IsolatedExecutor()
wpid = ex.submit(os.getpid).result(30)
ours = []
for w in ex._pool.workers:
    ours += [w.channel.fileno(), w._alive_w]
pid = os.fork()
if pid == 0:
    still = []
    for fd in ours:
        try:
            os.fstat(fd)
            still.append(fd)
        except OSError:
            pass
    print("CHILD", *still, flush=True)
    time.sleep(60)
    os._exit(0)
print("PIDS", wpid, pid, flush=True)
time.sleep(60)
"""


@ALL_PYTHONS
@pytest.mark.timeout(60)
def test_a_fork_child_holds_no_fd_of_the_executor_and_workers_die_with_a_sigkilled_parent(
        pyver, tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(_FORKED_ORPHAN)
    parent = subprocess.Popen([user_python(pyver), str(script)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=script_env(),
                              cwd=str(tmp_path))
    pids = []
    try:
        lines = {}
        while len(lines) < 2:
            line = parent.stdout.readline()
            assert line, parent.stderr.read()
            key, *rest = line.split()
            lines[key] = rest
        worker, child = map(int, lines["PIDS"])
        pids = [worker, child]
        # The child closed the socket and the parent-death pipe it inherited.
        assert lines["CHILD"] == []
        parent.kill()                   # SIGKILL: nothing runs in the parent
        parent.wait(10)
        # The fork child lives on; the worker must not.
        assert wait_gone([worker], 10, zombie_ok=True) == []
        assert proc_state(child) not in (None, "Z")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        _kill(pids)


def _leave_a_grandchild_and_die(path, explicit):
    """Start ``sleep 60`` that inherits the worker's fds, then die."""
    if explicit:
        # A grandchild that holds the channel whatever we do (C code forking without
        # exec would): the parent must see the worker's death all the same.
        from _proc_funcs import channel_fd
        p = subprocess.Popen(["sleep", "60"], pass_fds=(channel_fd(),))
    else:
        p = subprocess.Popen(["sleep", "60"], close_fds=False)
    with open(path, "w") as f:
        f.write(str(p.pid))
    os._exit(7)


@pytest.mark.parametrize("explicit", [False, True], ids=["close_fds_False", "pass_fds"])
@pytest.mark.timeout(60)
def test_a_worker_that_dies_while_its_grandchild_lives_fails_the_call(tmp_path, explicit):
    path = tmp_path / "grandchild"
    ex = IsolatedExecutor()
    try:
        fut = ex.submit(_leave_a_grandchild_and_die, str(path), explicit)
        exc = fut.exception(20)
        assert isinstance(exc, WorkerCrashed) and exc.exitcode == 7, exc
        # And the executor carries on.
        assert ex.submit(pow, 2, 3).result(20) == 8
    finally:
        if path.exists():
            _kill([int(path.read_text())])
    ex.shutdown()


# -- 3. a worker holding the GIL in C when its parent is SIGKILLed ------------------------

_GIL_HOLDER = r"""
import ctypes, os, sys, time
from comfy_env import IsolatedExecutor

def hold_gil(path):
    open(path, "w").close()
    # A PyDLL call keeps the GIL: no Python thread of the worker runs until it returns.
    ctypes.PyDLL(None).sleep(120)

if __name__ == "__main__":
    ex = IsolatedExecutor()
    fut = ex.submit(hold_gil, sys.argv[1])
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.01)
    print(*ex.worker_pids(), flush=True)
    time.sleep(120)
"""


@ALL_PYTHONS
@pytest.mark.timeout(60)
def test_a_worker_holding_the_gil_in_c_dies_with_its_sigkilled_parent(pyver, tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(_GIL_HOLDER)
    marker = tmp_path / "in_call"
    parent = subprocess.Popen([user_python(pyver), str(script), str(marker)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=script_env(), cwd=str(tmp_path))
    pids = []
    try:
        line = parent.stdout.readline()
        assert line, parent.stderr.read()
        pids = [int(p) for p in line.split()]
        time.sleep(0.3)                 # let it enter sleep() with the GIL held
        parent.kill()
        parent.wait(10)
        # About a second on an idle box (the call would hold it for 120 s); allow for load.
        assert wait_gone(pids, 10, zombie_ok=True) == []
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        _kill(pids)


_THREAD_EXIT = r"""
import os, threading, time
from comfy_env import IsolatedExecutor

ex = IsolatedExecutor()
first = []
t = threading.Thread(target=lambda: first.append(ex.submit(os.getpid).result(30)))
t.start()
t.join()
time.sleep(1.0)         # the thread that submitted (and started the worker) is gone
print(ex.submit(os.getpid).result(30) == first[0], ex.worker_pids() == first)
ex.shutdown()
"""


@ALL_PYTHONS
@pytest.mark.timeout(60)
def test_a_worker_outlives_the_short_lived_thread_whose_submit_started_it(pyver, tmp_path):
    out = run_script(pyver, _THREAD_EXIT, cwd=tmp_path, timeout=45)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"], out.stderr


_FORK_FROM_A_THREAD = r"""
import os, threading
from comfy_env import IsolatedExecutor
from comfy_env.ipc import interrupts

print("parent", interrupts.on_main(), flush=True)

def fork_here():
    print("thread", interrupts.on_main(), flush=True)
    pid = os.fork()
    if pid == 0:
        # The forking thread is the child's main thread: Ctrl-C is raised on it, and a
        # caller there reads its own result with Ctrl-C held back (interrupts.py).
        ok = interrupts.on_main()
        with IsolatedExecutor(max_workers=1) as ex:
            v = ex.submit(divmod, 7, 2).result(30)
        print("child", ok, v, flush=True)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    print("status", status, flush=True)

t = threading.Thread(target=fork_here)
t.start()
t.join()
"""


@ALL_PYTHONS
@pytest.mark.timeout(60)
def test_the_thread_that_forks_is_the_childs_main_thread_for_ctrl_c(pyver, tmp_path):
    out = run_script(pyver, _FORK_FROM_A_THREAD, cwd=tmp_path, timeout=45)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:4] == ["parent True", "thread False", "child True (3, 1)",
                                          "status 0"], out.stdout + out.stderr


_FORK_LEASES = r"""
import gc, multiprocessing as mp, time
import numpy as np
from comfy_env import IsolatedExecutor, shared_empty
from comfy_env.ipc import lifetime, shm

def make(i):
    import numpy as np
    return np.full(1 << 18, i, np.float32)          # 1 MiB: one segment of the worker's

def child(q):
    global held, fut
    # Everything the child inherited of the parent's results dies here.
    held = fut = None
    gc.collect()
    b = shared_empty(1 << 18, np.float32)
    b[:] = 7
    reused = shm.ARENA.reused
    # The child's own executor works: its own workers, keeper thread and blocks.
    with IsolatedExecutor() as ex2:
        own = float(ex2.submit(np.max, b).result(30)) + float(ex2.submit(make, 5).result(30)[0])
    q.put((reused, lifetime.PROCESS_UID, own))
    time.sleep(0.5)         # time for a flusher thread, were one to send anything

if __name__ == "__main__":
    ex = IsolatedExecutor()
    held = [ex.submit(make, i).result(30) for i in range(1, 4)]
    fut = ex.submit(make, 9)
    fut.exception(30)                                 # done, not decoded
    a = shared_empty(1 << 18, np.float32)
    del a                                             # a free segment in the parent's arena
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=child, args=(q,))
    p.start()
    reused, uid, own = q.get(timeout=60)
    p.join(30)
    print("CHILD", p.exitcode, reused, uid != lifetime.PROCESS_UID, own, flush=True)
    # The worker still counts the parent's leases: new results land in other segments.
    more = [ex.submit(make, 100 + i).result(30) for i in range(6)]
    print("HELD", *[float(x[0]) for x in held], float(fut.result()[0]),
          float(ex.submit(np.max, fut).result(30)), flush=True)
    ex.shutdown()
"""


@ALL_PYTHONS
@pytest.mark.timeout(90)
def test_a_fork_child_dropping_inherited_results_releases_nothing_of_the_parents(
        pyver, tmp_path):
    out = run_script(pyver, _FORK_LEASES, cwd=tmp_path, timeout=75)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(ln.split(None, 1) for ln in out.stdout.splitlines())
    # The child's arena started empty (it reused none of the parent's free segments),
    # its blocks carry an identity of their own, and a new executor works there.
    assert lines["CHILD"] == "0 0 True 12.0"
    assert lines["HELD"] == "1.0 2.0 3.0 9.0 9.0"


def _inheritable_fds(arr):
    """In the worker: its fds (besides stdio) that a process it starts would inherit."""
    import fcntl
    out = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2:
            continue
        try:
            if not fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC:
                out.append((fd, os.readlink(f"/proc/self/fd/{fd}")))
        except OSError:
            pass        # the listing's own fd, closed by now
    return out, float(arr[0])


@pytest.mark.timeout(30)
def test_no_fd_of_a_worker_is_inherited_by_what_its_calls_start():
    import numpy as np
    with IsolatedExecutor() as ex:
        # The channel and parent-death pipe (pass_fds cleared their flag) and a shared
        # segment received with the call.
        fds, first = ex.submit(_inheritable_fds, np.full(1 << 16, 5.0)).result(20)
    assert (fds, first) == ([], 5.0)
