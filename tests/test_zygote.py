"""Workers forked from a per-environment zygote: ``IsolatedExecutor(preload=[...])``.

See src/comfy_env/zygote.py for the rules tested here.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
import warnings
from concurrent.futures import BrokenExecutor

import pytest

import _funcs
import _zygote_funcs as zf
from comfy_env import CallTimeout, IsolatedExecutor, WorkerCrashed, WorkerStartError
from pythons import ALL_PYTHONS, TESTS, run_script
from procstate import alive, proc_state

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="zygotes are Linux-only")

# A module nothing of comfy_env imports: its presence in a worker shows the preload.
PRELOADED = "xml.dom.minidom"


def zygote_pid(ex):
    return ex._pool.zygote._proc.pid


@pytest.mark.timeout(60)
def test_workers_fork_from_a_zygote_that_imported_the_preload():
    with IsolatedExecutor(preload=[PRELOADED]) as ex:
        assert ex.submit(zf.loaded, PRELOADED).result() is True
        zpid = zygote_pid(ex)
        assert ex.submit(zf.parent_pid).result() == zpid != os.getpid()
        # The CUDA plane knows a forked worker for a worker (zero-copy CUDA results).
        assert ex.submit(zf.is_worker_for_cuda).result() is True
    with IsolatedExecutor() as ex:
        assert ex.submit(zf.loaded, PRELOADED).result() is False
        assert ex.submit(zf.parent_pid).result() == os.getpid()


@pytest.mark.timeout(60)
def test_a_numpy_preload_forks_openblas_threads_stop_at_fork():
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with IsolatedExecutor(preload=["numpy"]) as ex:
            assert ex.submit(zf.parent_pid).result() == zygote_pid(ex)


@pytest.mark.timeout(60)
def test_a_preload_that_initialised_cuda_is_refused(monkeypatch):
    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    with IsolatedExecutor(preload=["_zygote_fake_cuda"]) as ex:
        with pytest.raises(WorkerStartError, match="initialised CUDA"):
            ex.submit(zf.pid).result()


@pytest.mark.timeout(60)
def test_a_preload_that_fails_to_import_says_which_at_once(caplog):
    """A preload that fails to import (a typo) breaks the executor at once: a second
    start would fail the same way, so it is not retried after a back-off with a warning."""
    t0 = time.monotonic()
    with IsolatedExecutor(preload=["no_such_module_xyz"]) as ex:
        with pytest.raises(WorkerStartError, match="no_such_module_xyz"):
            ex.submit(zf.pid).result()
        with pytest.raises(BrokenExecutor):
            ex.submit(zf.pid)
    assert time.monotonic() - t0 < 0.9 and "trying once more" not in caplog.text


_PRINTING_PRELOAD = """
import sys
print("preload says hello")
print("preload warns", file=sys.stderr)
"""


@pytest.mark.parametrize("mode", ["stream", "logging", "discard"])
@pytest.mark.timeout(60)
def test_what_the_preload_prints_goes_where_worker_output_says(mode, tmp_path, monkeypatch, capsys, caplog):
    """The zygote's own output (a preload's imports printing or warning) is handled as
    the workers' is: labelled ``[<name> zygote]`` on this process's streams, INFO
    records of the executor's logger, or dropped.  It went to /dev/null (stdout) and to
    an INFO record whatever the mode (stderr)."""
    import logging
    (tmp_path / "_printing_preload.py").write_text(_PRINTING_PRELOAD)
    monkeypatch.syspath_prepend(str(tmp_path))
    caplog.set_level(logging.INFO, logger="comfy_env.worker.zp")
    out = err = ""
    with IsolatedExecutor(name="zp", preload=["_printing_preload"], worker_output=mode) as ex:
        assert ex.submit(zf.parent_pid).result() == zygote_pid(ex)
        # Until the lines arrive; "discard" waits for nothing to come (the preload printed
        # before the zygote forked the worker that answered above).
        deadline = time.monotonic() + (10 if mode != "discard" else 1.5)
        while time.monotonic() < deadline:
            got = capsys.readouterr()
            out, err = out + got.out, err + got.err
            logged = [r.getMessage() for r in caplog.records if getattr(r, "worker_name", "") == "zp zygote"]
            if mode == "stream" and "preload warns" in err and "preload says hello" in out:
                break
            if mode == "logging" and len(logged) == 2:
                break
            time.sleep(0.05)
    if mode == "stream":
        assert "[zp zygote] preload says hello\n" in out and "[zp zygote] preload warns\n" in err
    elif mode == "logging":
        assert sorted(logged) == ["[zp] preload says hello", "[zp] preload warns"]
    if mode != "stream":
        assert "preload" not in out and "preload" not in err
    if mode == "discard":
        assert not [r for r in caplog.records if "preload" in r.getMessage()]


@pytest.mark.timeout(60)
def test_a_preload_that_left_threads_falls_back_to_spawn_with_a_warning():
    with pytest.warns(RuntimeWarning, match="threads running in the zygote.*preload-bg"):
        with IsolatedExecutor(preload=["_zygote_thread"]) as ex:
            assert ex.submit(zf.parent_pid).result() == os.getpid()
            assert ex.submit(_funcs.add, 1, 2).result() == 3


def test_preload_is_checked():
    with pytest.raises(TypeError, match="list of module names"):
        IsolatedExecutor(preload="torch")
    with pytest.raises(ValueError, match="module names"):
        IsolatedExecutor(preload=["torch", "not a module"])


@pytest.mark.timeout(60)
def test_crash_and_timeout_of_forked_workers_report_and_restart():
    with IsolatedExecutor(preload=[PRELOADED], call_timeout=1.0) as ex:
        ex.submit(zf.pid).result()
        zpid = zygote_pid(ex)
        with pytest.raises(WorkerCrashed, match=r"exited with code 7(.|\n)*last words"):
            ex.submit(_funcs.stderr_then_exit, 7, ["last words"]).result()
        with pytest.raises(WorkerCrashed, match="killed by signal SIGKILL"):
            ex.submit(_funcs.kill_self).result()
        with pytest.raises(WorkerCrashed, match="killed by signal SIGSEGV"):
            ex.submit(_funcs.segfault).result()
        with pytest.raises(CallTimeout):
            ex.submit(_funcs.sleep_then, 30).result()
        assert ex.submit(zf.parent_pid).result() == zpid    # still the same zygote
        assert ex.submit(zf.loaded, PRELOADED).result() is True


@pytest.mark.timeout(60)
def test_a_killed_zygote_is_replaced_and_its_worker_reported():
    with IsolatedExecutor(preload=[PRELOADED]) as ex:
        ex.submit(zf.pid).result()
        zpid = zygote_pid(ex)
        fut = ex.submit(_funcs.sleep_then, 30)
        time.sleep(0.5)
        os.kill(zpid, signal.SIGKILL)
        with pytest.raises(WorkerCrashed):
            fut.result(timeout=20)
        assert ex.submit(zf.loaded, PRELOADED).result() is True
        assert zygote_pid(ex) != zpid


def _fds():
    """Open fds (number -> what it is), less the wake-up pipes of the ledger and the launch
    keeper (each made once, on first use, and kept for the process's life)."""
    from comfy_env.executor.launch import KEEPER
    from comfy_env.ipc import lifetime

    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass        # the listing's own fd, closed by now
    for fd in (lifetime.LEDGER._wake_r, lifetime.LEDGER._wake_w, KEEPER._wake_r, KEEPER._wake_w):
        out.pop(fd, None)
    return out


def _zygote_threads():
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("comfy_env-zygote"))


def _opened(before):
    """The fds open now that were not open (as the same thing) in ``before``."""
    return {fd: what for fd, what in _fds().items() if before.get(fd) != what}


@pytest.mark.timeout(60)
def test_no_fd_or_process_outlives_the_executor():
    before = _fds()
    ex = IsolatedExecutor(preload=[PRELOADED], max_workers=2)
    for _ in range(3):
        with pytest.raises(WorkerCrashed):
            ex.submit(_funcs.kill_self).result()
    assert sorted(f.result() for f in [ex.submit(_funcs.add, i, 1) for i in range(4)]) == [1, 2, 3, 4]
    zpid, wpids = zygote_pid(ex), ex.worker_pids()
    ex.shutdown()
    # At once, no polling: shutdown(wait=True) returns after the zygote and its workers
    # are reaped (gone from /proc, not zombies) and every fd and thread of theirs is closed.
    assert [proc_state(p) for p in [zpid, *wpids]] == [None] * (1 + len(wpids))
    assert _opened(before) == {}
    assert _zygote_threads() == []


class _SlowClose:
    """A zygote's output pipe whose close comes late (a drain thread the scheduler is slow to run)."""

    def __init__(self, f):
        self.f = f

    def fileno(self):
        return self.f.fileno()

    def close(self):
        time.sleep(0.3)
        self.f.close()


@pytest.mark.parametrize("preload", [[PRELOADED], None], ids=["zygote", "spawned"])
@pytest.mark.timeout(60)
def test_shutdown_waits_for_the_threads_that_close_fds(preload, monkeypatch):
    # The threads that close fds after a process exits, each made slow: the zygote's
    # reader (its parent-death pipe), its output drain, and the keeper, which closes a
    # process's pidfd (and its selector after the last one) before it reports the exit.
    # shutdown(wait=True) must wait for each of them, bounded; before it did not, and the
    # fds were still open when it returned.
    from comfy_env import zygote
    from comfy_env.executor import launch

    lost, drain, report = zygote.Zygote._lost, zygote.Zygote._drain_output, launch._report

    def slow_lost(self, channel):
        time.sleep(0.3)
        lost(self, channel)

    def slow_report(on_exit):
        time.sleep(0.3)
        report(on_exit)

    monkeypatch.setattr(zygote.Zygote, "_lost", slow_lost)
    monkeypatch.setattr(zygote.Zygote, "_drain_output",
                        lambda self, pid, out, err: drain(self, pid, _SlowClose(out), _SlowClose(err)))
    monkeypatch.setattr(launch, "_report", slow_report)
    for _ in range(2):
        before = _fds()
        ex = IsolatedExecutor(preload=preload, max_workers=2)
        assert sorted(f.result() for f in [ex.submit(_funcs.add, i, 1) for i in range(4)]) == [1, 2, 3, 4]
        pids = ex.worker_pids() + ([zygote_pid(ex)] if preload else [])
        ex.shutdown()
        assert [proc_state(p) for p in pids] == [None] * len(pids)
        assert _opened(before) == {}
        assert _zygote_threads() == []


@pytest.mark.timeout(60)
def test_shutdown_kills_a_zygote_that_does_not_exit(monkeypatch, caplog):
    from comfy_env import zygote

    monkeypatch.setattr(zygote, "CLOSE_WAIT", 0.5)
    before = _fds()
    ex = IsolatedExecutor(preload=[PRELOADED])
    with pytest.raises(WorkerCrashed):
        ex.submit(_funcs.kill_self).result()      # no worker left
    zpid = zygote_pid(ex)
    os.kill(zpid, signal.SIGSTOP)       # it cannot see that it was closed
    try:
        ex.shutdown()
    finally:
        if proc_state(zpid) is not None:
            os.kill(zpid, signal.SIGKILL)
    assert proc_state(zpid) is None
    assert "did not exit within" in caplog.text
    assert _opened(before) == {}
    assert _zygote_threads() == []


@pytest.mark.timeout(60)
def test_after_shutdown_without_wait_the_zygote_exits_with_the_last_worker():
    ex = IsolatedExecutor(preload=[PRELOADED])
    ex.submit(zf.pid).result()
    zpid = zygote_pid(ex)
    fut = ex.submit(_funcs.sleep_then, 1.0, "done")
    ex.shutdown(wait=False)
    assert alive(zpid)
    assert fut.result() == "done"
    deadline = time.monotonic() + 10
    while alive(zpid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(zpid)


SIGKILLED = """
import os, signal, sys, time
sys.path.insert(0, {tests!r})
import _funcs, _zygote_funcs as zf
from comfy_env import IsolatedExecutor

ex = IsolatedExecutor(preload=["xml.dom.minidom"], max_workers=2)
busy = ex.submit(_funcs.sleep_then, 60)                 # one worker mid-call
idle = ex.submit(zf.pid).result()
time.sleep(0.3)
if {fork_child!r}:
    # A fork child of the parent outlives it: it must hold nothing that keeps the
    # zygote or its workers alive (the parent-death pipes).
    child = os.fork()
    if child == 0:
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 1)        # not the script's pipes: the test reads them to EOF
        os.dup2(null, 2)
        time.sleep(30)
        os._exit(0)
    print(child, end=" ")
print(ex._pool.zygote._proc.pid, *ex.worker_pids(), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@ALL_PYTHONS
@pytest.mark.parametrize("fork_child", [False, True])
@pytest.mark.timeout(120)
def test_a_sigkilled_parent_takes_the_zygote_and_its_workers_along(pyver, fork_child, tmp_path):
    proc = run_script(pyver, SIGKILLED.format(tests=TESTS, fork_child=fork_child), cwd=tmp_path,
                      timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    pids = [int(p) for p in proc.stdout.split()]
    if fork_child:
        child, pids = pids[0], pids[1:]
    assert len(pids) == 3, (proc.stdout, proc.stderr)
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert [p for p in pids if alive(p)] == []
    finally:
        if fork_child:
            os.kill(child, signal.SIGKILL)


LIFECYCLE = """
import os, sys
sys.path.insert(0, {tests!r})
import _funcs, _zygote_funcs as zf
from comfy_env import IsolatedExecutor, WorkerCrashed

ex = IsolatedExecutor(preload=["xml.dom.minidom"])
out = [ex.submit(zf.loaded, "xml.dom.minidom").result()]
out.append(ex.submit(zf.parent_pid).result() == ex._pool.zygote._proc.pid)
try:
    ex.submit(_funcs.stderr_then_exit, 5, ["bye"]).result()
except WorkerCrashed as e:
    out.append("code 5" in str(e) and "bye" in str(e))
out.append(ex.submit(_funcs.add, 2, 3).result())
print(out)
r = ex.submit(zf.pid)                   # still queued or running when the script ends
"""


@ALL_PYTHONS
@pytest.mark.timeout(120)
def test_forked_workers_start_report_and_exit_with_the_script(pyver, tmp_path):
    proc = run_script(pyver, LIFECYCLE.format(tests=TESTS), cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[True, True, True, 5]", proc.stderr
    # Nothing but the crashing worker's own stderr line, streamed (worker_output="stream").
    assert proc.stderr.splitlines() == ["[local-1#1] bye"], proc.stderr


PRINTING_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import _zygote_funcs as zf
from comfy_env import IsolatedExecutor

with IsolatedExecutor(name="zp", preload=["_printing_preload"]) as ex:
    print(ex.submit(zf.parent_pid).result() == ex._pool.zygote._proc.pid, flush=True)
"""


@ALL_PYTHONS
@pytest.mark.timeout(120)
def test_what_the_preload_prints_is_shown_labelled_on_every_python(pyver, tmp_path):
    (tmp_path / "_printing_preload.py").write_text(_PRINTING_PRELOAD)
    proc = run_script(pyver, PRINTING_SCRIPT.format(tests=TESTS), cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.splitlines()) == ["True", "[zp zygote] preload says hello"], proc.stdout
    assert proc.stderr.splitlines() == ["[zp zygote] preload warns"], proc.stderr


@pytest.mark.timeout(60)
def test_submit_does_not_wait_for_the_preload_and_stopping_ends_a_hanging_one_at_once():
    ex = IsolatedExecutor(preload=["_zygote_hang"], start_timeout=None)
    t0 = time.monotonic()
    fut = ex.submit(_funcs.add, 1, 2)
    assert time.monotonic() - t0 < 2            # the preload runs on another thread
    time.sleep(1)
    zygote = ex._pool.zygote._starting
    assert zygote is not None and zygote.poll() is None       # importing, for ever
    t0 = time.monotonic()
    ex._pool.stop_now()                         # what a Ctrl-C leaving `with` does
    assert time.monotonic() - t0 < 5
    assert fut.cancelled() or isinstance(fut.exception(5), Exception)
    zygote.wait(timeout=5)                      # killed, and reaped


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how,code", [("exit", 3), ("sigkill", -signal.SIGKILL)])
def test_a_worker_dying_under_a_stopped_zygote_is_reported_at_once_with_its_status(how, code):
    """A stopped zygote reaps nothing and reports nothing: the crash is still reported
    within a second, with the status the kernel keeps for the unreaped worker (before:
    12 s later, as "did not exit")."""
    with IsolatedExecutor(max_workers=1, preload=[PRELOADED]) as ex:
        ex.submit(os.getpid).result(30)
        zpid = zygote_pid(ex)
        os.kill(zpid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            # Calls that end their worker themselves: taken, so never sent again (which
            # would wait for a fork from the stopped zygote).
            if how == "exit":
                fut = ex.submit(_funcs.stderr_then_exit, 3)
            else:
                fut = ex.submit(_funcs.kill_self, signal.SIGKILL)
            with pytest.raises(WorkerCrashed) as info:
                fut.result(30)
            took = time.monotonic() - t0
        finally:
            os.kill(zpid, signal.SIGCONT)
    assert info.value.exitcode == code, info.value
    assert took < 5, took


STOPPED_ZYGOTE_SCRIPT = """
import os, resource, signal, sys, time
sys.path.insert(0, {tests!r})
import _funcs
from comfy_env import IsolatedExecutor, WorkerCrashed

# A process with many files open: the executor's fds are numbered above select()'s 1024.
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 4096), hard), hard))
held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]

with IsolatedExecutor(max_workers=1, preload=["xml.dom.minidom"]) as ex:
    ex.submit(os.getpid).result(30)
    zpid = ex._pool.zygote._proc.pid
    os.kill(zpid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        try:
            ex.submit(_funcs.stderr_then_exit, 3).result(30)
        except WorkerCrashed as exc:
            print(exc.exitcode, time.monotonic() - t0 < 5, flush=True)
    finally:
        os.kill(zpid, signal.SIGCONT)
"""


@ALL_PYTHONS
@pytest.mark.timeout(120)
def test_a_worker_dying_under_a_stopped_zygote_is_reported_at_once_on_every_python(pyver, tmp_path):
    """... with over a thousand files open (fds past select()'s limit)."""
    proc = run_script(pyver, STOPPED_ZYGOTE_SCRIPT.format(tests=TESTS), cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["3", "True"], (proc.stdout, proc.stderr)


def test_the_status_of_an_unreaped_process_comes_from_the_kernel():
    from comfy_env.proctree import unreaped_status
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    try:
        deadline = time.monotonic() + 10
        while unreaped_status(pid) is None and time.monotonic() < deadline:
            time.sleep(0.01)                  # until it is a zombie
        assert unreaped_status(pid) == 7
    finally:
        os.waitpid(pid, 0)
    assert unreaped_status(pid) is None      # reaped: nothing to tell
    assert unreaped_status(os.getpid()) is None   # running


@pytest.mark.timeout(90)
def test_a_wedged_zygote_holds_a_worker_start_for_start_timeout_not_a_minute():
    with IsolatedExecutor(preload=[PRELOADED], start_timeout=3) as ex:
        ex.submit(zf.pid).result(30)
        zpid = zygote_pid(ex)
        os.kill(zpid, signal.SIGSTOP)
        try:
            with pytest.raises(WorkerCrashed):
                ex.submit(os._exit, 1).result(30)      # its replacement needs the zygote
            t0 = time.monotonic()
            assert ex.submit(_funcs.add, 1, 2).result(40) == 3
            assert time.monotonic() - t0 < 20
            assert zygote_pid(ex) != zpid           # the wedged one was killed, a new one started
        finally:
            try:
                os.kill(zpid, signal.SIGCONT)
            except ProcessLookupError:
                pass
