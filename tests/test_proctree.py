"""A killed worker takes the processes its calls left running with it (proctree.py):
a call timed out, the executor shut down with calls running; spawned and zygote-forked
workers.  So does a worker that died by itself, and a daemon that left the tree goes
too (both found by the tag in their environment).  A call that ends normally, and a
worker that exits when asked, leave their processes alone, and a pid that no longer
names the worker is never walked."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from comfy_env import CallTimeout, IsolatedExecutor, WorkerCrashed
from comfy_env import proctree
from pythons import ALL_PYTHONS, run_script

pytestmark = pytest.mark.timeout(120)


def _alive(pid):
    st = proctree._stat(pid)
    return st is not None and st[0] not in b"ZX"


def _gone_within(pids, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.02)
    return False


def _sandbox(tmp_path):
    """A sandbox that may write ``tmp_path``; the test skips where bubblewrap cannot run."""
    from comfy_env import Sandbox
    from comfy_env import sandbox as sbmod
    _bwrap, problem = sbmod.probe()
    if problem is not None:
        pytest.skip(f"bubblewrap cannot run here: {problem}")
    return Sandbox(writable=[str(tmp_path)])


def _assert_gone(pids, after):
    assert _gone_within(pids, 5), f"left running after {after}: {[p for p in pids if _alive(p)]}"


def start_family_then(path, then="hang"):
    """A child that starts a grandchild, their pids written to ``path``; then the call
    hangs (``then="hang"``) or the worker dies by itself (``"exit"``: ``os._exit``;
    ``"sigkill"``), leaving them to init."""
    import os
    import signal
    import subprocess
    import sys
    import time
    code = ("import subprocess, sys, time\n"
            "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            "print(g.pid, flush=True)\n"
            "time.sleep(120)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    grandchild = int(child.stdout.readline())
    with open(path, "w") as f:
        f.write(f"{child.pid} {grandchild}")
    if then == "exit":
        os._exit(7)
    if then == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(120)


def start_child(path):
    import subprocess
    import sys
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    with open(path, "w") as f:
        f.write(str(child.pid))
    return child.pid


def _pids(path):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if os.path.exists(path) and open(path).read().strip():
            return [int(p) for p in open(path).read().split()]
        time.sleep(0.02)
    raise AssertionError("the call never wrote its processes' pids")


def _kill(pids):
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


@pytest.mark.parametrize("preload", [None, ["json"]], ids=["spawned", "zygote-forked"])
def test_a_timed_out_call_takes_its_child_and_grandchild_with_its_worker(tmp_path, preload):
    path = str(tmp_path / "pids")
    with IsolatedExecutor(max_workers=1, call_timeout=3, preload=preload) as ex:
        fut = ex.submit(start_family_then, path)
        pids = _pids(path)
        try:
            assert all(_alive(p) for p in pids)
            with pytest.raises(CallTimeout):
                fut.result(timeout=60)
            _assert_gone(pids, "the timeout")
            assert ex.submit(sum, [1, 2]).result(timeout=60) == 3      # the executor goes on
        finally:
            _kill(pids)


def test_a_sandboxed_workers_timeout_has_its_stack_and_takes_its_child(tmp_path):
    # The worker runs below bubblewrap: the stack signal goes to the worker itself (sent to
    # bwrap, its default action ended bwrap and the worker with it: no stack, and the
    # child orphaned before the walk), and the walk starts at bwrap.
    path = str(tmp_path / "pids")
    with IsolatedExecutor(max_workers=1, call_timeout=3, sandbox=_sandbox(tmp_path)) as ex:
        fut = ex.submit(start_family_then, path)
        pids = _pids(path)
        try:
            with pytest.raises(CallTimeout) as info:
                fut.result(timeout=60)
            assert "start_family_then" in info.value.worker_stack, str(info.value)
            _assert_gone(pids, "the timeout")
        finally:
            _kill(pids)


def test_ctrl_c_leaving_the_with_block_takes_the_running_calls_children(tmp_path):
    # KeyboardInterrupt out of the ``with`` block: running calls are cancelled and their
    # workers killed at once (shutdown's documented path), their families with them.
    path = str(tmp_path / "pids")
    pids = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with IsolatedExecutor(max_workers=1) as ex:
                ex.submit(start_family_then, path)
                pids = _pids(path)
                raise KeyboardInterrupt
        assert pids
        _assert_gone(pids, "Ctrl-C")
    finally:
        _kill(pids)


def _crash_takes_what_the_call_started(tmp_path, fn, *args, **executor_kw):
    """Run ``fn(path, *args)``, which writes the pids of processes it started to ``path``
    and then kills its worker: the call fails with WorkerCrashed, those processes are
    gone soon after, and the executor goes on."""
    path = str(tmp_path / "pids")
    with IsolatedExecutor(max_workers=1, **executor_kw) as ex:
        with pytest.raises(WorkerCrashed):
            ex.submit(fn, path, *args).result(timeout=120)
        pids = _pids(path)
        try:
            _assert_gone(pids, "the crash")
            assert ex.submit(sum, [1, 2]).result(timeout=60) == 3
        finally:
            _kill(pids)


@pytest.mark.parametrize("how", ["exit", "sigkill"])
@pytest.mark.parametrize("kind", ["spawned", "zygote-forked", "sandboxed"])
def test_a_worker_that_dies_by_itself_takes_its_calls_processes(tmp_path, kind, how):
    # Re-parented to init before the parent hears of the death: no walk can find them, so
    # they are found by the worker's tag in their environment.
    kw = ({"preload": ["json"]} if kind == "zygote-forked" else
          {"sandbox": _sandbox(tmp_path)} if kind == "sandboxed" else {})
    _crash_takes_what_the_call_started(tmp_path, start_family_then, how, **kw)


def fork_then_die(path):
    """A fork child of the worker (no exec: its environment in /proc is the one the worker
    was started with), its pid written to ``path``; then the worker dies."""
    import os
    import time
    pid = os.fork()
    if pid == 0:
        time.sleep(120)
        os._exit(0)
    with open(path, "w") as f:
        f.write(str(pid))
    os._exit(4)


def test_a_spawned_worker_that_dies_takes_its_fork_children(tmp_path):
    _crash_takes_what_the_call_started(tmp_path, fork_then_die)


def nested_family_then_die(path):
    """Start an executor here (a worker of our own), have its worker start a child, then
    die: the inner worker and its child carry our tag as well as theirs."""
    import os
    from comfy_env import IsolatedExecutor
    ex = IsolatedExecutor(max_workers=1)
    inner = ex.submit(os.getpid).result(timeout=60)
    child = ex.submit(start_child, path + ".child").result(timeout=60)
    with open(path, "w") as f:
        f.write(f"{inner} {child}")
    os._exit(9)


def test_a_worker_that_dies_takes_the_workers_of_its_own_executor_and_their_processes(tmp_path):
    _crash_takes_what_the_call_started(tmp_path, nested_family_then_die)


def start_daemon_then_hang(path):
    """A double-forked daemon (it leaves the worker's tree, in a session of its own); its
    pid written to ``path``; then hang."""
    import subprocess
    import sys
    import time
    code = ("import os, sys, time\n"
            "if os.fork(): os._exit(0)\n"
            "os.setsid()\n"
            "if os.fork(): os._exit(0)\n"
            "open(sys.argv[1], 'w').write(str(os.getpid()))\n"
            "time.sleep(120)\n")
    subprocess.run([sys.executable, "-c", code, path], check=True)
    time.sleep(120)


def test_a_daemon_that_left_the_tree_goes_with_a_timed_out_calls_worker(tmp_path):
    path = str(tmp_path / "pid")
    with IsolatedExecutor(max_workers=1, call_timeout=3) as ex:
        fut = ex.submit(start_daemon_then_hang, path)
        pids = _pids(path)
        try:
            with pytest.raises(CallTimeout):
                fut.result(timeout=60)
            _assert_gone(pids, "the timeout (a daemon)")
        finally:
            _kill(pids)


def _sleeper(tags):
    env = dict(os.environ)
    env.pop(proctree.TAG_VAR, None)
    if tags is not None:
        env[proctree.TAG_VAR] = tags
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)


def test_kill_tagged_kills_exactly_the_processes_carrying_the_tag():
    # (Popen returns once the child has exec'd: its environment is its own by then.)
    procs = {tags: _sleeper(tags) for tags in ("a1 b2", "b2", "c3", "b22", None)}
    try:
        assert proctree.kill_tagged("b2") == 2
        assert procs["a1 b2"].wait(timeout=10) == -signal.SIGKILL
        assert procs["b2"].wait(timeout=10) == -signal.SIGKILL
        for tags in ("c3", "b22", None):      # another tag, a longer one, none
            assert procs[tags].poll() is None, tags
        assert proctree.kill_tagged("") == 0 and proctree.kill_tagged("nobody") == 0
    finally:
        for p in procs.values():
            p.kill()
            p.wait()


def test_tag_process_adds_the_workers_tag_after_its_ancestors(monkeypatch):
    monkeypatch.delenv(proctree.TAG_VAR, raising=False)
    proctree.tag_process("aa")
    assert os.environ[proctree.TAG_VAR] == "aa"
    proctree.tag_process("bb")                # a worker started by a worker
    assert os.environ[proctree.TAG_VAR] == "aa bb"
    proctree.tag_process("bb")                # spawned with it, and told it again
    assert os.environ[proctree.TAG_VAR] == "aa bb"
    for i in range(40):
        proctree.tag_process(f"u{i}")
    held = os.environ[proctree.TAG_VAR].split()
    assert len(held) == proctree._MAX_TAGS and held[-1] == "u39"


def test_a_call_that_returns_and_a_worker_asked_to_exit_leave_their_child_alone(tmp_path):
    # Shutdown is a normal exit: a process a call started on purpose outlives the worker,
    # as it would outlive any process that started it and exited.
    path = str(tmp_path / "pid")
    pid = None
    try:
        with IsolatedExecutor(max_workers=1) as ex:
            pid = ex.submit(start_child, path).result(timeout=60)
            time.sleep(0.2)
            assert _alive(pid)
        time.sleep(0.3)
        assert _alive(pid), "the worker's shutdown took the process its call started"
    finally:
        _kill([pid] if pid else [])


class _Proc:
    """Stands for the worker's Popen: pid, send_signal, kill."""
    def __init__(self, popen):
        self.pid = popen.pid
        self._p = popen
        self.signals = []

    def send_signal(self, sig):
        self.signals.append(sig)
        self._p.send_signal(sig)

    def kill(self):
        self.signals.append(signal.SIGKILL)
        self._p.kill()


def _parent_with_child():
    code = ("import subprocess, sys, time\n"
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            "print(c.pid, flush=True)\n"
            "time.sleep(120)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    return p, int(p.stdout.readline())


def test_kill_tree_kills_the_process_and_what_it_started():
    p, child = _parent_with_child()
    try:
        proctree.kill_tree(_Proc(p), proctree.start_ticks(p.pid))
        assert p.wait(timeout=10) == -signal.SIGKILL
        assert _gone_within([child], 5)
    finally:
        _kill([p.pid, child])
        p.stdout.close()


@pytest.mark.parametrize("ticks", ["another", None], ids=["pid-names-another-process", "no-start-time"])
def test_a_worker_whose_identity_is_not_certain_is_killed_alone(ticks):
    # "another": the recorded start time does not match (the pid names another process now);
    # None: it could not be read at spawn.  Either way: no freeze, no walk.
    p, child = _parent_with_child()
    try:
        proc = _Proc(p)
        proctree.kill_tree(proc, proctree.start_ticks(p.pid) - 1 if ticks == "another" else None)
        assert proc.signals == [signal.SIGKILL]
        assert p.wait(timeout=10) == -signal.SIGKILL
        time.sleep(0.2)
        assert _alive(child), "the walk reached a process that was not the worker's"
    finally:
        _kill([p.pid, child])
        p.stdout.close()


def test_kill_tree_of_a_process_already_reaped_does_not_raise():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    ticks = proctree.start_ticks(p.pid)
    p.wait()
    proctree.kill_tree(p, ticks)


def test_stat_reads_a_command_name_with_spaces_and_parentheses(tmp_path):
    odd = tmp_path / "a) b ("
    shutil.copy(sys.executable, odd) if not os.path.islink(sys.executable) else os.symlink(
        os.path.realpath(sys.executable), odd)
    p = subprocess.Popen([str(odd), "-c", "import time; time.sleep(30)"])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and b"a) b" not in open(f"/proc/{p.pid}/stat", "rb").read():
            time.sleep(0.01)
        state, ppid, ticks = proctree._stat(p.pid)
        assert ppid == os.getpid() and ticks == proctree.start_ticks(p.pid) and state in b"SR"
    finally:
        p.kill()
        p.wait()
    assert proctree.start_ticks(2 ** 22 + 12345) is None


_SCRIPT = r'''
import os, sys, time
from comfy_env import IsolatedExecutor, CallTimeout, WorkerCrashed

def family(path, then):
    import subprocess, sys, time, os
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with open(path, "w") as f:
        f.write(str(child.pid))
    if then == "die":
        os._exit(5)
    time.sleep(60)

def gone(path):
    pid = int(open(path).read())
    deadline = time.time() + 5
    while time.time() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                st = f.read()
        except OSError:
            return True
        if st[st.rindex(")") + 2] in "ZX":
            return True
        time.sleep(0.05)
    os.kill(pid, 9)
    return False

if __name__ == "__main__":
    out = []
    with IsolatedExecutor(call_timeout=2) as ex:
        for then, error in (("hang", CallTimeout), ("die", WorkerCrashed)):
            path = os.path.join(sys.argv[1], then)
            try:
                ex.submit(family, path, then).result()
            except error:
                pass
            out.append("gone" if gone(path) else f"left running after {then}")
    print(" ".join(out))
'''


@ALL_PYTHONS
def test_a_timed_out_or_crashed_calls_child_is_gone_on_every_python(pyver, tmp_path):
    proc = run_script(pyver, _SCRIPT, cwd=tmp_path, args=(str(tmp_path),), timeout=90)
    assert proc.returncode == 0 and proc.stdout.strip() == "gone gone", proc.stdout + proc.stderr
