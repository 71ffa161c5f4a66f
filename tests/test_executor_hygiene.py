"""What an executor leaves behind: processes, zombies, fds; and where worker output goes."""
from __future__ import annotations

import gc
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import _funcs
from _log_records import collect_records
from comfy_env import CallTimeout, IsolatedExecutor, WorkerCrashed
from procstate import proc_state, wait_gone

_TESTS = os.path.dirname(os.path.abspath(__file__))


def _children():
    """pids whose parent is this process (zombies included)."""
    me = str(os.getpid())
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me:
                out.append(int(d))
    return out


def _fds():
    return sorted(os.listdir("/proc/self/fd"))


def _settled_fds(timeout=5.0):
    """This process's fds once they stop changing (an earlier test's workers may still be
    closing theirs)."""
    end = time.monotonic() + timeout
    last = _fds()
    while time.monotonic() < end:
        time.sleep(0.05)
        now = _fds()
        if now == last:
            return now
        last = now
    return last


# -- processes -------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_leaving_a_with_block_leaves_no_process_and_no_zombie(tmp_path):
    names = ["a", "b", "c"]
    with IsolatedExecutor(max_workers=3) as ex:
        pids = [f.result(20) for f in
                [ex.submit(_funcs.rendezvous, str(tmp_path), n, names) for n in names]]
        assert sorted(pids) == ex.worker_pids()
        assert set(pids) <= set(_children())
    # Reaped, not only dead: a zombie would still be listed in /proc.
    assert [proc_state(p) for p in pids] == [None, None, None]
    assert not set(pids) & set(_children())


@pytest.mark.timeout(30)
def test_crashed_and_timed_out_workers_are_reaped():
    failing = [(_funcs.stderr_then_exit, 3), (_funcs.kill_self,), (_funcs.segfault,),
               (_funcs.sleep_then, 60)]
    with IsolatedExecutor(call_timeout=1) as ex:
        dead = []
        for call in failing:
            dead.append(ex.submit(_funcs.getpid).result(15))
            assert isinstance(ex.submit(*call).exception(15), (WorkerCrashed, CallTimeout))
        # Gone from /proc, not a zombie: our child, so we reaped it.
        assert wait_gone(dead, 5) == []
        assert ex.submit(_funcs.getpid).result(15) not in dead


@pytest.mark.timeout(30)
def test_a_garbage_collected_executor_stops_its_workers():
    ex = IsolatedExecutor(max_workers=2)
    futs = [ex.submit(_funcs.sleep_then, 0.2) for _ in range(2)]
    for f in futs:
        f.result(15)
    pids = ex.worker_pids()
    assert len(pids) == 2
    del ex
    gc.collect()
    assert wait_gone(pids, 10) == []


@pytest.mark.timeout(30)
def test_shutdown_without_wait_lets_running_calls_finish_then_stops_the_workers(tmp_path):
    gate = tmp_path / "gate"
    ex = IsolatedExecutor()
    fut = ex.submit(_funcs.wait_for_file, str(gate), "finished")
    while not fut.running():
        time.sleep(0.01)
    pids = ex.worker_pids()
    ex.shutdown(wait=False)
    assert not fut.done()
    gate.touch()
    assert fut.result(15) == "finished"
    assert wait_gone(pids, 10) == []


_PARENT_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
from comfy_env import IsolatedExecutor
import _funcs

ex = IsolatedExecutor(max_workers=2)
busy = ex.submit(_funcs.sleep_then, 120)              # one worker in the middle of a call
idle = ex.submit(_funcs.getpid).result(20)            # one worker idle
while len(ex.worker_pids()) < 2 or not busy.running():
    time.sleep(0.01)
print(*ex.worker_pids(), flush=True)
time.sleep(120)
"""


@pytest.mark.timeout(40)
def test_workers_exit_on_their_own_when_the_parent_is_sigkilled(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(_PARENT_SCRIPT.format(tests=_TESTS))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        line = parent.stdout.readline()
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2, parent.stderr.read() if not line else line
        assert all(proc_state(p) not in (None, "Z") for p in pids)
        parent.kill()                       # SIGKILL: no atexit, no finalizer runs
        parent.wait(10)
        # The spec says about a second; allow for a loaded box.  Once they exit, the
        # orphans belong to init/a subreaper, which may not reap them: a zombie is gone.
        assert wait_gone(pids, 5, zombie_ok=True) == []
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for p in locals().get("pids", []):
            try:
                os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


_EXIT_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from comfy_env import IsolatedExecutor
import _funcs

ex = IsolatedExecutor(max_workers=2)
futs = [ex.submit(_funcs.sleep_then, 0.2, i) for i in range(4)]
print(*ex.worker_pids(), flush=True)
# No shutdown(): leaving the interpreter must still run the calls and stop the workers.
"""


@pytest.mark.timeout(40)
def test_a_parent_that_exits_without_shutdown_finishes_its_calls_and_leaves_nothing(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(_EXIT_SCRIPT.format(tests=_TESTS))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    pids = [int(p) for p in out.stdout.split()]
    assert pids and wait_gone(pids, 5, zombie_ok=True) == []


# -- file descriptors ----------------------------------------------------------------------

@pytest.mark.timeout(45)
def test_no_fd_leaks_across_a_thousand_calls_with_errors_and_crashes():
    before = _settled_fds()
    with IsolatedExecutor() as ex:
        worker_before = ex.submit(_funcs.open_fd_count).result(15)
        parent_during = _fds()
        for i in range(1000):
            if i % 100 == 99:
                with pytest.raises(ValueError):
                    ex.submit(_funcs.raise_value_error, str(i)).result(15)
            else:
                assert ex.submit(_funcs.add, i, 1).result(15) == i + 1
        assert ex.submit(_funcs.open_fd_count).result(15) == worker_before
        assert _fds() == parent_during
        for _ in range(3):
            assert isinstance(ex.submit(_funcs.stderr_then_exit, 1).exception(15), WorkerCrashed)
        assert ex.submit(_funcs.add, 1, 1).result(15) == 2
    # Every socket and pipe of the four workers is closed again.  (Subset: an fd that
    # something else closed meanwhile is no leak of ours.)
    after = _fds()
    assert set(after) <= set(before), sorted(set(after) - set(before))


# -- worker output through logging ------------------------------------------------------

@pytest.fixture
def worker_log():
    """Records of the logger of the executor named "logtest"."""
    with collect_records("comfy_env.worker.logtest") as records:
        yield records


@pytest.mark.timeout(30)
def test_worker_stdout_and_stderr_arrive_as_whole_log_lines_none_lost(worker_log):
    n = 3000
    with IsolatedExecutor(name="logtest", worker_output="logging") as ex:
        ex.submit(lambda: print("x" * 300_000)).result(15)     # longer than any read chunk
        assert ex.submit(_funcs.print_lines, n).result(15) == n
        (pid,) = ex.worker_pids()
        # The last stdout line has no newline: it arrives when the worker exits.
    by_stream = {"stdout": [], "stderr": []}
    for r in worker_log:
        if getattr(r, "stream", None) in by_stream:
            assert r.worker_pid == pid and r.worker_name.startswith("logtest")
            assert r.name == "comfy_env.worker.logtest"
            by_stream[r.stream].append(r.getMessage())
    out, err = by_stream["stdout"], by_stream["stderr"]
    assert [m.split("] ", 1)[1] for m in out] == \
        ["x" * 300_000] + [f"line {i}" for i in range(n)] + ["no newline at the end"]
    assert [m.split("] ", 1)[1] for m in err] == [f"err line {i}" for i in range(n)]


@pytest.mark.timeout(20)
def test_worker_logging_records_arrive_through_the_executors_logger(worker_log):
    with IsolatedExecutor(name="logtest") as ex:
        assert ex.submit(_funcs.log_message, logging.WARNING, "careful now").result(15)
        assert ex.submit(_funcs.log_message, logging.INFO, "not shown by default").result(15)
        pid = ex.worker_pids()[0]
    msgs = [r for r in worker_log if getattr(r, "stream", None) == "logging"]
    assert len(msgs) == 1
    (rec,) = msgs
    assert rec.levelno == logging.WARNING and "careful now" in rec.getMessage()
    assert rec.worker_pid == pid and rec.worker_name.startswith("logtest")
    assert rec.worker_logger == "user.module"


@pytest.mark.timeout(30)
def test_an_initializer_that_logs_starts_the_worker_and_its_records_arrive(worker_log):
    """Records the initializer logs (a model loading warns) come before the worker's
    Ready: they reach the executor's logger, and the worker starts (it failed to)."""
    with IsolatedExecutor(name="logtest", initializer=_funcs.log_message,
                          initargs=(logging.WARNING, "weights are in fp16")) as ex:
        assert ex.submit(_funcs.add, 1, 2).result(15) == 3
        pid = ex.worker_pids()[0]
    msgs = [r for r in worker_log if getattr(r, "stream", None) == "logging"]
    assert [r.getMessage().split(": ", 1)[1] for r in msgs] == ["weights are in fp16"], msgs
    assert msgs[0].worker_pid == pid and msgs[0].levelno == logging.WARNING


@pytest.mark.timeout(20)
def test_a_worker_log_call_with_a_bad_format_reports_it_on_stderr_as_logging_does(worker_log):
    with IsolatedExecutor(name="logtest", worker_output="logging") as ex:
        ex.submit(_funcs.log_message, logging.WARNING, "%d apples", "many").result(15)
    err = [r.getMessage() for r in worker_log if getattr(r, "stream", None) == "stderr"]
    assert any("--- Logging error ---" in m for m in err), err
    assert any("%d format: a real number is required" in m for m in err), err


@pytest.mark.timeout(20)
def test_worker_log_level_lets_lower_records_through(worker_log):
    with IsolatedExecutor(name="logtest", worker_log_level=logging.INFO) as ex:
        ex.submit(_funcs.log_message, logging.INFO, "now it shows").result(15)
        ex.submit(_funcs.log_message, logging.DEBUG, "still hidden").result(15)
    msgs = [r.getMessage() for r in worker_log if getattr(r, "stream", None) == "logging"]
    assert len(msgs) == 1 and "now it shows" in msgs[0]


@pytest.mark.timeout(30)
def test_shutdown_while_a_worker_is_starting_lets_it_leave_quietly(worker_log):
    for _ in range(3):
        ex = IsolatedExecutor(name="logtest", worker_output="logging")
        fut = ex.submit(_funcs.add, 1, 2)          # starts a worker; the call is still queued
        ex.shutdown(wait=True, cancel_futures=True)
        assert fut.cancelled() or fut.result() == 3
        assert ex.worker_pids() == []
    # The exit request may overtake the worker's init message; that is no crash.
    assert [r.getMessage() for r in worker_log if getattr(r, "stream", None) == "stderr"] == []


@pytest.mark.timeout(30)
def test_no_thread_is_left_behind_once_the_workers_are_gone():
    import threading

    def ours():
        return {t for t in threading.enumerate() if t.name.startswith("comfy_env-")
                and t.name != "comfy_env-ledger"}      # the ledger's flusher is per process

    before = ours()
    for wait in (True, False):
        ex = IsolatedExecutor(max_workers=2, call_timeout=30)
        assert [f.result(15) for f in [ex.submit(_funcs.add, i, 0) for i in range(4)]] == [0, 1, 2, 3]
        pids = ex.worker_pids()
        ex.shutdown(wait=wait)
        assert wait_gone(pids, 10) == []
    end = time.monotonic() + 10
    while ours() - before and time.monotonic() < end:
        time.sleep(0.02)
    assert sorted(t.name for t in ours() - before) == []


@pytest.mark.timeout(30)
def test_a_finalizer_run_inside_the_pool_lock_does_not_deadlock():
    """The cycle collector may finalize an executor at any allocation, also on a
    thread that holds the pool's lock (which is not re-entrant): the finalizer
    must not take it there."""
    import threading

    ex = IsolatedExecutor()
    ex.submit(_funcs.add, 1, 2).result(15)
    pids = ex.worker_pids()
    pool, finalizer = ex._pool, ex._finalizer
    done = threading.Event()

    def collect_inside_the_lock():
        with pool.lock:
            finalizer()
        done.set()

    threading.Thread(target=collect_inside_the_lock, daemon=True).start()
    assert done.wait(10), "the finalizer deadlocked on the pool's lock"
    assert wait_gone(pids, 10) == []
    del ex
