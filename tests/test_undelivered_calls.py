"""A call sent to a worker that dies before it takes the call off its channel runs on a
new worker: nothing of it ran (the worker says which call it took last, ipc/taken.py).
A call the worker took is never run twice.

The race is made certain by stopping the worker (SIGSTOP) before the submit: the frame
then sits in the socket, unread, until the SIGKILL.  Killing an idle worker and
submitting at once hits the same window on its own, every time on the 2-core box.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

import numpy as np
import pytest

import _funcs
from comfy_env import CallTimeout, IsolatedExecutor, WorkerCrashed
from pythons import ALL_PYTHONS, TESTS, run_script

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="memfd slots are Linux-only")


def runs(path):
    """``[(value, pid)]`` of every run recorded in ``path``."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [tuple(line.split()) for line in f]


def submit_to_a_dying_worker(ex, fn, *args, **kwargs):
    """Submit while the only worker is stopped, then kill it: the call is sent (it sits
    in the socket) and never read."""
    (pid,) = ex.worker_pids()
    os.kill(pid, signal.SIGSTOP)
    try:
        fut = ex.submit(fn, *args, **kwargs)
    finally:
        os.kill(pid, signal.SIGKILL)
    return fut, pid


@pytest.mark.parametrize("preload", [None, ["json"]], ids=["spawned", "zygote"])
@pytest.mark.timeout(90)
def test_a_call_its_worker_died_before_taking_runs_once_on_a_new_worker(tmp_path, preload):
    path = str(tmp_path / "runs")
    with IsolatedExecutor(max_workers=1, preload=preload) as ex:
        assert ex.submit(_funcs.record_run, path, "warm").result(30) == "warm"
        for i in range(3):
            fut, dead = submit_to_a_dying_worker(ex, _funcs.record_run, path, str(i))
            assert fut.result(30) == str(i)
            assert dead not in ex.worker_pids()
    done = runs(path)
    assert [v for v, _ in done] == ["warm", "0", "1", "2"]      # each once, in order
    assert len({p for _, p in done}) == 4                      # each on a new worker


@pytest.mark.parametrize("preload", [None, ["json"]], ids=["spawned", "zygote"])
@pytest.mark.timeout(90)
def test_a_call_sent_again_after_shutdown_without_waiting_still_runs(tmp_path, preload):
    # The dead worker was the pool's last: the call queued again must still get a new
    # worker (from the zygote too), not find the pool finished.
    path = str(tmp_path / "runs")
    ex = IsolatedExecutor(max_workers=1, preload=preload)
    ex.submit(_funcs.add, 1, 2).result(30)
    (pid,) = ex.worker_pids()
    os.kill(pid, signal.SIGSTOP)
    fut = ex.submit(_funcs.record_run, path, "late")
    ex.shutdown(wait=False)
    os.kill(pid, signal.SIGKILL)
    assert fut.result(30) == "late"
    ex.shutdown(wait=True)
    assert [v for v, _ in runs(path)] == ["late"]


@pytest.mark.timeout(90)
def test_a_call_sent_again_after_shutdown_without_waiting_keeps_its_time_limit():
    ex = IsolatedExecutor(max_workers=1, call_timeout=1)
    ex.submit(_funcs.add, 1, 2).result(30)
    (pid,) = ex.worker_pids()
    os.kill(pid, signal.SIGSTOP)
    fut = ex.submit(_funcs.sleep_then, 60, "late")
    ex.shutdown(wait=False)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(CallTimeout):
        fut.result(30)
    ex.shutdown(wait=True)


@pytest.mark.timeout(90)
def test_a_worker_killed_while_idle_then_sent_a_call_at_once_runs_it(tmp_path):
    path = str(tmp_path / "runs")
    with IsolatedExecutor(max_workers=1) as ex:
        for i in range(10):
            ex.submit(_funcs.record_run, path, f"w{i}").result(30)
            os.kill(ex.worker_pids()[0], signal.SIGKILL)
            assert ex.submit(_funcs.record_run, path, str(i)).result(30) == str(i)
    values = [v for v, _ in runs(path)]
    assert values == [x for i in range(10) for x in (f"w{i}", str(i))]


@pytest.mark.timeout(60)
def test_a_call_pickled_without_shared_blocks_is_sent_again_too():
    # os.getpid and a tiny array: not the plain shortcut's frame (a builtin goes
    # through the pickler), but nothing lent, so its inputs are still here.
    with IsolatedExecutor(max_workers=1) as ex:
        ex.submit(_funcs.add, 1, 2).result(30)
        fut, dead = submit_to_a_dying_worker(ex, os.getpid)
        assert fut.result(30) not in (dead, os.getpid())
        fut, _ = submit_to_a_dying_worker(ex, _funcs.echo, np.arange(3), key=os.getpid)
        args, kwargs = fut.result(30)
        assert args[0].tolist() == [0, 1, 2] and kwargs == {"key": os.getpid}


@pytest.mark.timeout(90)
def test_a_call_the_worker_took_is_not_run_again(tmp_path):
    path = str(tmp_path / "runs")
    with IsolatedExecutor(max_workers=1) as ex:
        fut = ex.submit(_funcs.record_run, path, "once", 3)      # runs, then the worker exits
        with pytest.raises(WorkerCrashed, match="died while running the call") as info:
            fut.result(30)
        assert info.value.exitcode == 3
        assert ex.submit(_funcs.add, 1, 2).result(30) == 3
    assert [v for v, _ in runs(path)] == ["once"]


@pytest.mark.timeout(90)
def test_a_call_whose_inputs_went_with_the_send_fails_saying_it_never_ran(tmp_path):
    # A big array is handed to the worker with the send (shared memory) and not kept:
    # the call can't be sent again, and its error says nothing of it ran.
    path = str(tmp_path / "runs")
    with IsolatedExecutor(max_workers=1) as ex:
        ex.submit(_funcs.add, 1, 2).result(30)
        fut, _ = submit_to_a_dying_worker(ex, _funcs.record_run, path, np.zeros(1 << 20))
        with pytest.raises(WorkerCrashed, match=r"before it took the call off its channel \(nothing of the "
                                                r"call ran\).*SIGKILL"):
            fut.result(30)
        assert ex.submit(_funcs.add, 2, 3).result(30) == 5
    assert runs(path) == []


@pytest.mark.timeout(90)
def test_only_a_small_call_keeps_its_inputs_after_the_send(monkeypatch):
    # What can be sent again: the inputs of a call without shared blocks whose message
    # is at most KEEP_INPUTS_MAX.  Big ones are let go at the send, as before.
    from comfy_env.executor import executor as ex_mod
    from comfy_env.executor.worker_handle import WorkerHandle
    sent = []
    real = WorkerHandle.send_call

    def spy(self, item, *args, **kwargs):
        sent.append(item)
        return real(self, item, *args, **kwargs)

    monkeypatch.setattr(WorkerHandle, "send_call", spy)
    small, big = b"x" * 1000, b"x" * (ex_mod.KEEP_INPUTS_MAX + 1)
    with IsolatedExecutor(max_workers=1) as ex:
        ex.submit(_funcs.add, 1, 2).result(30)
        for arg, kept in ((small, True), (big, False), (np.zeros(1 << 20), False)):
            fut = ex.submit(_funcs.sleep_then, 0.3, arg)     # sent (and so judged) by now
            assert (sent[-1].args is not None) is kept, type(arg)
            fut.result(30)


@pytest.mark.timeout(90)
def test_a_call_that_kills_each_worker_before_it_is_taken_is_sent_twice_then_fails(tmp_path, monkeypatch):
    # Two deaths before delivery, as a call whose frame kills every worker reading it:
    # sent twice (MAX_SEND_FAILURES), then it fails, and the executor goes on.
    from comfy_env.executor import worker_handle
    real = worker_handle.WorkerHandle.send_call
    killed = []

    def send_then_kill(self, item, chunks, fds, books=None):
        if item.args and item.args[0] == "doomed":
            os.kill(self.pid, signal.SIGSTOP)
            try:
                return real(self, item, chunks, fds, books)
            finally:
                killed.append(self.pid)
                os.kill(self.pid, signal.SIGKILL)
        return real(self, item, chunks, fds, books)

    monkeypatch.setattr(worker_handle.WorkerHandle, "send_call", send_then_kill)
    with IsolatedExecutor(max_workers=1) as ex:
        fut = ex.submit(_funcs.echo, "doomed")
        with pytest.raises(WorkerCrashed, match="and so did the one before it"):
            fut.result(60)
        assert len(killed) == 2
        assert ex.submit(_funcs.add, 2, 3).result(30) == 5


@pytest.mark.timeout(60)
def test_a_failed_send_whose_death_report_came_first_is_counted_once(tmp_path, monkeypatch):
    # The send fails because the worker died, and its reader claims the call for the
    # death report before the sender looks: one failed delivery, counted once (it was
    # counted by both and so failed as a second one, "and so did the one before it").
    from comfy_env.executor import executor as ex_mod
    from comfy_env.executor.worker_handle import WorkerHandle
    from comfy_env.ipc.transport import ChannelClosed
    path = str(tmp_path / "runs")
    real_send, real_death, real_hand = WorkerHandle.send_call, ex_mod._Pool.on_death, ex_mod._Pool._hand_over
    handed = threading.Event()
    doomed = [True]                           # the first delivery only

    def send_call(self, item, chunks, fds, books=None):
        if doomed and item.args and item.args[1] == "doomed":
            doomed.clear()
            self.item = item                  # what send_call does first, then the send fails
            item.future._worker = self
            os.kill(self.pid, signal.SIGKILL)
            deadline = time.monotonic() + 20
            while self.item is item and time.monotonic() < deadline:
                time.sleep(0.005)             # the reader claimed it for the death report
            raise ChannelClosed("the worker died while the call was sent (test)")
        return real_send(self, item, chunks, fds, books)

    def hand_over(self, worker, item):
        try:
            return real_hand(self, worker, item)
        finally:
            if item.args and item.args[1] == "doomed":
                handed.set()

    def on_death(self, worker, item, code, start_error):
        if item is not None and item.args and item.args[1] == "doomed":
            handed.wait(20)                   # the sender has handled its failure by now
        return real_death(self, worker, item, code, start_error)

    monkeypatch.setattr(WorkerHandle, "send_call", send_call)
    monkeypatch.setattr(ex_mod._Pool, "_hand_over", hand_over)
    monkeypatch.setattr(ex_mod._Pool, "on_death", on_death)
    with IsolatedExecutor(max_workers=1) as ex:
        ex.submit(_funcs.add, 1, 2).result(30)
        assert ex.submit(_funcs.record_run, path, "doomed").result(30) == "doomed"
    assert [v for v, _ in runs(path)] == ["doomed"]


SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import _funcs
from comfy_env import IsolatedExecutor
path = os.path.join(os.getcwd(), "runs")
with IsolatedExecutor(max_workers=1) as ex:
    ex.submit(_funcs.add, 1, 2).result(30)
    (pid,) = ex.worker_pids()
    os.kill(pid, signal.SIGSTOP)
    fut = ex.submit(_funcs.record_run, path, "sent")
    os.kill(pid, signal.SIGKILL)
    print(fut.result(30), ex.worker_pids()[0] != pid)
print(open(path).read().split()[0])
"""


@ALL_PYTHONS
@pytest.mark.timeout(120)
def test_redelivery_on_every_python(pyver, tmp_path):
    proc = run_script(pyver, SCRIPT.format(tests=TESTS), cwd=tmp_path, timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["sent", "True", "sent"], (proc.stdout, proc.stderr)
