"""What a future and an executor hold, report and do, from submit to shutdown.

- a finished call drops everything it held at once (not at call_timeout's deadline);
- a result that arrives but cannot be decoded here is the future's exception for
  every accessor and every caller, never a SystemExit;
- shutdown(wait=True) from a done-callback raises instead of hanging;
- nothing that talks to a worker runs under the pool lock;
- a worker killed while it starts is started once more; a hanging start is bounded.
"""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from concurrent.futures import FIRST_EXCEPTION, as_completed, wait

import pytest

import _funcs
import _lifecycle_funcs as lf
from comfy_env import IsolatedExecutor, PicklingFailed, WorkerStartError
from comfy_env.executor.worker_handle import WorkerHandle
from comfy_env.ipc import lifetime

_TESTS = os.path.dirname(os.path.abspath(__file__))
_SRC = os.path.join(os.path.dirname(_TESTS), "src")


def _settles(predicate, within):
    end = time.monotonic() + within
    while True:
        lifetime.LEDGER.drain()
        if predicate():
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.02)


# -- a finished call holds nothing -----------------------------------------------------------
@pytest.mark.timeout(60)
def test_a_finished_call_drops_its_result_at_once_even_with_a_long_call_timeout():
    with IsolatedExecutor(call_timeout=60) as ex:
        ex.submit(_funcs.add, 1, 1).result(30)          # worker up, ledger settled
        assert _settles(lambda: True, 0.2)
        base = len(lifetime.LEDGER)
        for _ in range(3):
            fut = ex.submit(lf.array, 4 << 20)
            value = fut.result(30)
            assert value.nbytes == 4 << 20
            assert len(lifetime.LEDGER) > base
            gone = weakref.ref(fut)
            del fut, value
            # Not the cyclic GC, not the deadline: nothing may keep the future.
            assert gone() is None, gc.get_referrers(gone())
            assert _settles(lambda: len(lifetime.LEDGER) == base, 10), \
                "the result's shared memory was not released"


# -- decode failures are the future's exception ------------------------------------------
@pytest.fixture(scope="module")
def ex():
    with IsolatedExecutor() as e:
        yield e


@pytest.mark.timeout(60)
def test_concurrent_result_callers_all_raise_the_decode_error(ex):
    fut = ex.submit(lf.make_bomb, "raise", True, 0.5)   # decoding takes 0.5 s, then fails
    wait([fut], 30)
    outcomes = []
    barrier = threading.Barrier(4)

    def call():
        barrier.wait()
        try:
            outcomes.append(("value", fut.result()))
        except BaseException as exc:
            outcomes.append(("raised", exc))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(outcomes) == 4
    assert all(kind == "raised" for kind, _ in outcomes), outcomes
    errors = {id(exc) for _, exc in outcomes}
    assert len(errors) == 1 and isinstance(outcomes[0][1], LookupError)
    assert fut.exception() is outcomes[0][1]


@pytest.mark.parametrize("big", [True, False], ids=["shared-memory", "inline"])
@pytest.mark.timeout(60)
def test_a_decode_failure_shows_in_exception_callbacks_wait_and_as_completed(ex, big):
    fut = ex.submit(lf.make_bomb, "raise", big)
    seen = []
    fut.add_done_callback(lambda f: seen.append(f.exception()))
    done, _ = wait([fut], 30, return_when=FIRST_EXCEPTION)
    assert fut in done
    exc = fut.exception()                   # before anybody called result()
    assert isinstance(exc, LookupError)
    # Callbacks run on the reader thread after waiters are woken (as Future.set_result
    # orders them): wait for it.
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen == [exc]
    assert [f.exception() for f in as_completed([fut], 30)] == [exc]
    with pytest.raises(LookupError) as info:
        fut.result()
    assert info.value is exc
    assert ex.submit(_funcs.add, 2, 3).result(30) == 5     # the executor is fine


@pytest.mark.parametrize("big", [True, False], ids=["shared-memory", "inline"])
@pytest.mark.timeout(60)
def test_a_result_that_calls_sys_exit_while_decoded_is_an_ordinary_error(ex, big):
    fut = ex.submit(lf.make_bomb, "exit", big)
    try:
        fut.result(30)
    except SystemExit:
        pytest.fail("SystemExit escaped from result()")
    except PicklingFailed as exc:
        assert "SystemExit" in str(exc) and isinstance(exc.__cause__, SystemExit)
    else:
        pytest.fail("result() returned a value")
    assert isinstance(fut.exception(), PicklingFailed)
    assert ex.submit(_funcs.add, 2, 3).result(30) == 5


# -- shutdown from a done-callback -------------------------------------------------------------
_SHUTDOWN_IN_CALLBACK = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    import _funcs
    from comfy_env import IsolatedExecutor

    ex = IsolatedExecutor()
    errors = []
    def on_done(f):
        try:
            ex.shutdown(wait=True)
        except RuntimeError as exc:
            errors.append(str(exc))
    f1 = ex.submit(_funcs.sleep_then, 0.3, 1)
    f1.add_done_callback(on_done)
    f2 = ex.submit(_funcs.add, 1, 1)        # queued behind f1
    r = f2.result(timeout=20)
    for _ in range(500):                    # the callback runs on the reader thread
        if errors:
            break
        time.sleep(0.01)
    print(r, errors[0] if errors else "no error", flush=True)
""")


@pytest.mark.timeout(60)
def test_shutdown_wait_from_a_done_callback_raises_instead_of_hanging(tmp_path):
    # A subprocess: the hang this guards against would also hang this process's exit.
    code = _SHUTDOWN_IN_CALLBACK.format(tests=_TESTS)
    env = dict(os.environ, PYTHONPATH=_SRC)
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=40, env=env, cwd=str(tmp_path))
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"shutdown(wait=True) in a done-callback hung: {exc.stdout} {exc.stderr}")
    assert proc.returncode == 0, proc.stderr
    value, _, message = proc.stdout.strip().partition(" ")
    assert value == "2"                     # the queued call still ran
    assert "done-callback" in message, proc.stdout


# -- I/O out of the pool lock -----------------------------------------------------------------
class _OwnedLock:
    """The pool's (plain, not re-entrant) lock, telling which thread holds it."""

    def __init__(self):
        self._lock = threading.Lock()
        self.owner = None

    def acquire(self, blocking=True, timeout=-1):
        got = self._lock.acquire(blocking, timeout)
        if got:
            self.owner = threading.get_ident()
        return got

    def release(self):
        self.owner = None
        self._lock.release()

    __enter__ = acquire

    def __exit__(self, *exc):
        self.release()

    def _is_owned(self):
        return self.owner == threading.get_ident()


@pytest.mark.timeout(60)
def test_no_worker_is_sent_to_or_killed_under_the_pool_lock(monkeypatch):
    under_lock = []
    orig_exit, orig_kill = WorkerHandle.request_exit, WorkerHandle.kill

    def request_exit(self):
        under_lock.append(("request_exit", self.pool.lock._is_owned()))
        return orig_exit(self)

    def kill(self):
        under_lock.append(("kill", self.pool.lock._is_owned()))
        return orig_kill(self)

    monkeypatch.setattr(WorkerHandle, "request_exit", request_exit)
    monkeypatch.setattr(WorkerHandle, "kill", kill)
    e = IsolatedExecutor(max_workers=2, call_timeout=1)
    e._pool.lock = _OwnedLock()
    e._pool.all_done = threading.Condition(e._pool.lock)
    fs = [e.submit(_funcs.add, i, 1) for i in range(4)]
    assert [f.result(30) for f in fs] == [1, 2, 3, 4]
    slow = e.submit(lf.hang, 30)
    with pytest.raises(TimeoutError):
        slow.result(30)                     # the timer kills the worker
    e.shutdown(wait=False)                  # idle workers retire here
    e.shutdown(wait=True)
    assert {name for name, _ in under_lock} == {"request_exit", "kill"}
    assert not [name for name, owned in under_lock if owned], under_lock


# -- worker starts -------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_a_worker_killed_while_it_starts_is_started_once_more(tmp_path):
    with IsolatedExecutor(initializer=lf.kill_self_first_time, initargs=(str(tmp_path),)) as e:
        assert e.submit(_funcs.add, 2, 2).result(30) == 4
    assert len(os.listdir(tmp_path)) == 2


@pytest.mark.timeout(60)
def test_workers_killed_together_while_they_start_are_one_failure_not_two(tmp_path):
    """Two workers starting at once, both killed (one event): that is one failed start,
    retried, not two in a row (which broke the executor); the calls run."""
    with IsolatedExecutor(max_workers=2, initializer=lf.kill_self_first_n, initargs=(str(tmp_path), 2),
                          worker_output="discard") as e:
        fs = [e.submit(_funcs.add, i, i) for i in range(2)]
        assert [f.result(30) for f in fs] == [0, 2]
    assert sorted(os.listdir(tmp_path)) == ["killed-0", "killed-1"]


@pytest.mark.timeout(60)
def test_a_worker_that_dies_at_every_start_breaks_the_executor_after_one_retry(tmp_path):
    e = IsolatedExecutor(initializer=lf.kill_self_always, initargs=(str(tmp_path),))
    try:
        with pytest.raises(WorkerStartError, match="SIGKILL"):
            e.submit(_funcs.add, 2, 2).result(30)
        with pytest.raises(WorkerStartError):
            e.submit(_funcs.add, 2, 2)
    finally:
        e.shutdown(wait=True)
    assert len(os.listdir(tmp_path)) == 2


@pytest.mark.timeout(60)
def test_a_hanging_initializer_is_bounded_by_start_timeout():
    e = IsolatedExecutor(initializer=lf.hang, initargs=(120,), start_timeout=2)
    try:
        with pytest.raises(WorkerStartError, match="start_timeout=2"):
            e.submit(_funcs.add, 2, 2).result(30)
        assert e.worker_pids() == []
    finally:
        e.shutdown(wait=True)


def test_start_timeout_is_checked_and_has_a_default():
    with pytest.raises(ValueError, match="start_timeout"):
        IsolatedExecutor(start_timeout=0)
    import inspect
    default = inspect.signature(IsolatedExecutor).parameters["start_timeout"].default
    assert isinstance(default, (int, float)) and default > 0


@pytest.mark.timeout(60)
def test_a_spawn_that_fails_once_with_emfile_is_retried(monkeypatch):
    import errno

    from comfy_env.executor import launch

    real_spawn, calls = launch.spawn, []

    def spawn(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise WorkerStartError("could not start a worker: " + os.strerror(errno.EMFILE))
        return real_spawn(*args, **kwargs)

    monkeypatch.setattr(launch, "spawn", spawn)
    with IsolatedExecutor() as e:
        assert e.submit(_funcs.add, 3, 4).result(30) == 7
    assert len(calls) == 2


@pytest.mark.timeout(60)
def test_a_bug_raised_when_a_worker_becomes_ready_replaces_that_worker_instead_of_hanging(monkeypatch):
    from comfy_env.executor import executor as executor_mod

    real, raised = executor_mod._Pool.on_ready, []

    def on_ready(self, worker):
        if not raised:
            raised.append(worker.pid)
            raise RuntimeError("a bug in on_ready")
        return real(self, worker)

    monkeypatch.setattr(executor_mod._Pool, "on_ready", on_ready)
    with IsolatedExecutor(max_workers=1) as e:
        assert e.submit(_funcs.add, 2, 5).result(30) == 7   # hung before: the reader thread was gone
        assert raised and raised[0] not in e.worker_pids()


@pytest.mark.timeout(60)
def test_initargs_that_do_not_pickle_break_the_executor_naming_the_argument():
    e = IsolatedExecutor(max_workers=1, initializer=_funcs.init_set, initargs=("key", threading.Lock()))
    try:
        with pytest.raises(WorkerStartError, match=r"initargs\[1\] \(lock\) could not be pickled") as info:
            e.submit(_funcs.add, 1, 2).result(30)
        assert isinstance(info.value.__cause__, PicklingFailed)
        assert "let the initializer make the object in the worker" in str(info.value)
        with pytest.raises(WorkerStartError, match="could not be pickled"):
            e.submit(_funcs.add, 1, 2)
    finally:
        e.shutdown(wait=True)
    assert e.worker_pids() == []


@pytest.mark.timeout(90)
def test_a_call_timeout_that_runs_out_while_the_call_is_sent_fails_it_once(tmp_path):
    """The watchdog claims a call whose frame is still going out (the worker reads
    nothing: stopped here; a big pickled argument on a slow worker does the same): it
    fails with CallTimeout and never runs.  It was put back in the queue when the send
    failed, ran on the next worker with nobody to take its result, and its future,
    shutdown(wait=True) and the interpreter's exit waited for ever."""
    import signal

    from comfy_env import CallTimeout
    e = IsolatedExecutor(max_workers=1, call_timeout=1)
    try:
        (pid,) = {e.submit(_funcs.getpid).result(30)}
        os.kill(pid, signal.SIGSTOP)            # reads nothing now: the send blocks
        fut = e.submit(lf.mark_and_len, str(tmp_path), b"y" * (64 << 20))
        with pytest.raises(CallTimeout):
            fut.result(30)
        assert e.submit(_funcs.add, 2, 3).result(30) == 5     # a fresh worker
        assert os.listdir(tmp_path) == []                       # the timed-out call never ran
    finally:
        done = threading.Event()
        threading.Thread(target=lambda: (e.shutdown(wait=True), done.set()), daemon=True).start()
        assert done.wait(30), "shutdown(wait=True) hung"


@pytest.mark.timeout(60)
def test_a_pool_broken_while_a_worker_is_being_started_stops_that_worker_too(monkeypatch):
    """The pool breaks (a second failed start, elsewhere) after a worker was counted but
    before its process exists: asking it to exit must not fail on the missing channel
    (it raised on the breaking reader thread, and the pool hung), and the worker, once
    started, leaves at its handshake; shutdown returns and no process is left."""
    from comfy_env import WorkerStartError
    real = WorkerHandle.start
    paused, go = threading.Event(), threading.Event()
    started = []

    def start(self):
        if self.index == 2:
            paused.set()
            go.wait(20)
        real(self)
        started.append(self)

    monkeypatch.setattr(WorkerHandle, "start", start)
    ex = IsolatedExecutor(max_workers=2, worker_output="discard")
    first = ex.submit(_funcs.sleep_then, 1.0, "a")
    second = []
    t = threading.Thread(target=lambda: second.append(ex.submit(_funcs.sleep_then, 0.1, "b")))
    t.start()
    assert paused.wait(20)
    ex._pool._break(WorkerStartError("broken for the test"))
    go.set()
    t.join(20)
    with pytest.raises(WorkerStartError):
        second[0].result(20)
    ex.shutdown(wait=True)
    assert [w.proc.poll() is not None for w in started] == [True, True]
    assert first.done()
