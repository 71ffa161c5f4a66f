"""IsolatedExecutor with env=None: the concurrent.futures contract, how functions travel,
how failures (exceptions, crashes, timeouts, pickling, initializers) reach the futures.

Worker-side helpers live in ``_funcs`` (imported by reference in the workers); gates are
files in tmp_path that a worker polls, so no test depends on how fast the box is.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import (FIRST_COMPLETED, BrokenExecutor, CancelledError, Executor,
                                Future, as_completed, wait)
from concurrent.futures.process import BrokenProcessPool

import pytest

import _funcs
from pythons import ALL_PYTHONS, run_script
import comfy_env
from comfy_env import CallTimeout, IsolatedExecutor, PicklingFailed, RemoteError, WorkerCrashed
from comfy_env.errors import InitializerFailed, RemoteTraceback


def _wait_until(pred, timeout=10.0):
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.01)


@pytest.fixture
def gate(tmp_path):
    """A file path a worker waits on (``_funcs.wait_for_file``); ``open_gate()`` releases it."""
    path = tmp_path / "gate"

    class Gate:
        def __str__(self):
            return str(path)

        def open(self):
            path.touch()

    return Gate()


# -- the concurrent.futures contract -----------------------------------------------------

@pytest.mark.timeout(20)
def test_is_a_standard_executor_whose_futures_are_standard_futures():
    with IsolatedExecutor() as ex:
        assert isinstance(ex, Executor)
        fut = ex.submit(_funcs.add, 2, 3)
        assert isinstance(fut, Future)
        assert fut.result(timeout=15) == 5
        assert fut.done() and fut.exception() is None


@pytest.mark.timeout(20)
def test_calls_run_in_another_process_of_the_same_interpreter():
    with IsolatedExecutor() as ex:
        pid = ex.submit(_funcs.getpid).result(15)
        assert pid != os.getpid()
        assert ex.worker_pids() == [pid]
        assert ex.submit(lambda: sys.executable).result(15) == sys.executable
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        from comfy_env.executor.launch import interpreter_flags
        flags = [f.encode() for f in interpreter_flags()]     # the parent's own (-B here, say)
        assert argv[1:3 + len(flags)] == flags + [b"-m", b"comfy_env.worker"]
        assert ex.submit(_funcs.echo, 1, x=2).result(15) == ((1,), {"x": 2})


@pytest.mark.timeout(30)
def test_map_yields_in_order_with_several_iterables_and_chunks():
    with IsolatedExecutor(max_workers=2) as ex:
        assert list(ex.map(_funcs.add, range(10), range(100, 110))) == \
            [i + 100 + i for i in range(10)]
        assert list(ex.map(lambda x: x * x, range(11), chunksize=3)) == [i * i for i in range(11)]
        assert list(ex.map(_funcs.add, [], [])) == []


@pytest.mark.timeout(20)
def test_map_raises_the_first_failed_items_exception_when_reached():
    with IsolatedExecutor(max_workers=2) as ex:
        it = ex.map(_funcs.fail_on, range(6), [3] * 6)
        assert [next(it), next(it), next(it)] == [0, 10, 20]
        with pytest.raises(ValueError, match="item 3 is bad"):
            next(it)


@pytest.mark.timeout(20)
def test_map_raises_timeout_error_past_its_timeout(gate):
    with IsolatedExecutor() as ex:
        it = ex.map(_funcs.wait_for_file, [str(gate)], timeout=0.5)
        with pytest.raises(TimeoutError):
            next(it)
        gate.open()


@pytest.mark.timeout(20)
def test_submit_after_shutdown_raises_runtime_error():
    ex = IsolatedExecutor()
    ex.submit(_funcs.add, 1, 1).result(15)
    ex.shutdown()
    with pytest.raises(RuntimeError, match="shutdown"):
        ex.submit(_funcs.add, 1, 1)
    with IsolatedExecutor() as ex2:
        pass
    with pytest.raises(RuntimeError):
        ex2.submit(_funcs.add, 1, 1)


@pytest.mark.timeout(20)
def test_cancel_works_on_a_queued_call_and_not_on_a_running_one(gate):
    with IsolatedExecutor(max_workers=1) as ex:
        running = ex.submit(_funcs.wait_for_file, str(gate), "first")
        _wait_until(running.running)
        queued = ex.submit(_funcs.add, 1, 2)
        assert not running.cancel()
        assert queued.cancel()
        gate.open()
        assert running.result(15) == "first"
        assert queued.cancelled()
        with pytest.raises(CancelledError):
            queued.result()
        assert ex.submit(_funcs.add, 2, 2).result(15) == 4


@pytest.mark.timeout(20)
def test_shutdown_cancel_futures_cancels_what_has_not_started(gate):
    ex = IsolatedExecutor(max_workers=1)
    running = ex.submit(_funcs.wait_for_file, str(gate), "ran")
    _wait_until(running.running)
    queued = [ex.submit(_funcs.add, i, i) for i in range(3)]
    ex.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in queued)
    gate.open()
    assert running.result(15) == "ran"
    ex.shutdown(wait=True)


@pytest.mark.timeout(20)
def test_shutdown_wait_drains_queued_and_running_calls():
    ex = IsolatedExecutor(max_workers=2)
    futs = [ex.submit(_funcs.sleep_then, 0.1, i) for i in range(6)]
    ex.shutdown(wait=True)
    assert all(f.done() for f in futs)
    assert [f.result() for f in futs] == list(range(6))


@pytest.mark.timeout(20)
def test_wait_and_as_completed_see_the_fast_call_before_the_slow_one(gate):
    with IsolatedExecutor(max_workers=2) as ex:
        slow = ex.submit(_funcs.wait_for_file, str(gate), "slow")
        fast = ex.submit(_funcs.add, 1, 1)
        done, not_done = wait([slow, fast], timeout=15, return_when=FIRST_COMPLETED)
        assert done == {fast} and not_done == {slow}
        order = []
        for f in as_completed([slow, fast], timeout=15):
            order.append(f)
            if f is fast:
                gate.open()
        assert order == [fast, slow]
        done, not_done = wait([slow, fast], timeout=15)
        assert not not_done


@pytest.mark.timeout(30)
def test_max_workers_runs_that_many_calls_at_once_in_as_many_processes(tmp_path):
    names = ["a", "b", "c"]
    with IsolatedExecutor(max_workers=3) as ex:
        futs = [ex.submit(_funcs.rendezvous, str(tmp_path), n, names) for n in names]
        pids = [f.result(25) for f in futs]    # each waits until all three are running
        assert len(set(pids)) == 3
        assert sorted(pids) == ex.worker_pids()


@pytest.mark.timeout(30)
def test_several_threads_submitting_at_once_all_get_their_own_results():
    results = {}
    errors = []
    start = threading.Barrier(6)
    with IsolatedExecutor(max_workers=2) as ex:
        def submitter(t):
            try:
                start.wait()
                futs = [(i, ex.submit(_funcs.add, t * 1000, i)) for i in range(50)]
                results[t] = [(i, f.result(20)) for i, f in futs]
            except BaseException as exc:   # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=submitter, args=(t,)) for t in range(6)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(25)
    assert not errors
    for t in range(6):
        assert results[t] == [(i, t * 1000 + i) for i in range(50)]


# -- how functions travel --------------------------------------------------------------

def _make_adder(n):
    def adder(x):
        return x + n
    return adder


@pytest.mark.timeout(20)
def test_lambdas_and_closures_travel_by_value():
    offset = 7
    with IsolatedExecutor() as ex:
        assert ex.submit(lambda x: x + offset, 1).result(15) == 8
        assert ex.submit(_make_adder(5), 1).result(15) == 6


@pytest.mark.timeout(20)
def test_module_qualname_strings_are_resolved_in_the_worker():
    with IsolatedExecutor() as ex:
        assert ex.submit("_funcs:add", 1, 2).result(15) == 3
        assert ex.submit("_funcs:Namespace.Inner.triple", 4).result(15) == 12
        assert ex.submit("os.path:join", "a", "b").result(15) == os.path.join("a", "b")
        assert list(ex.map("_funcs:add", [1, 2], [3, 4])) == [4, 6]
        assert list(ex.map("_funcs:add", [1, 2, 3], [3, 4, 5], chunksize=2)) == [4, 6, 8]


@pytest.mark.timeout(20)
def test_a_missing_module_or_attribute_fails_that_future_only():
    with IsolatedExecutor() as ex:
        pid = ex.submit(_funcs.getpid).result(15)
        with pytest.raises(ImportError, match="no_such_module_xyz"):
            ex.submit("no_such_module_xyz.sub:f").result(15)
        with pytest.raises(AttributeError, match="does_not_exist"):
            ex.submit("_funcs:does_not_exist").result(15)
        with pytest.raises(AttributeError, match="Nope"):
            ex.submit("_funcs:Namespace.Nope").result(15)
        assert ex.submit(_funcs.getpid).result(15) == pid      # the worker survived


def test_a_malformed_reference_is_refused_at_submit():
    with IsolatedExecutor() as ex:
        for bad in ["no_colon", ":f", "mod:", "a:b:c"]:
            with pytest.raises(ValueError, match="package.module:qualname"):
                ex.submit(bad)
        with pytest.raises(TypeError):
            ex.submit(42)


@pytest.mark.timeout(30)
def test_functions_defined_in_main_travel_by_value(tmp_path):
    script = tmp_path / "main_script.py"
    script.write_text(textwrap.dedent("""
        from comfy_env import IsolatedExecutor

        def square(x):
            return x * x

        class Acc:
            def __init__(self, k):
                self.k = k
            def __call__(self, x):
                return self.k + x

        if __name__ == "__main__":
            with IsolatedExecutor() as ex:
                print(ex.submit(square, 7).result(20), ex.submit(Acc(3), 4).result(20))
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=25)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["49", "7"]


# -- exceptions raised by fn -----------------------------------------------------------

@pytest.mark.timeout(20)
def test_exceptions_keep_their_type_and_args_and_carry_the_remote_traceback():
    with IsolatedExecutor() as ex:
        exc = ex.submit(_funcs.raise_value_error, "boom").exception(15)
        assert type(exc) is ValueError and exc.args == ("boom",)
        assert isinstance(exc.__cause__, RemoteTraceback)
        assert "raise_value_error" in str(exc.__cause__)      # the worker's frame
        assert "ValueError: boom" in str(exc.__cause__)

        exc = ex.submit(_funcs.raise_two_arg_error, 404, "gone").exception(15)
        assert type(exc) is _funcs.TwoArgError
        assert exc.args == (404, "gone") and exc.code == 404 and exc.detail == "gone"

        with pytest.raises(ZeroDivisionError):
            ex.submit(lambda: 1 / 0).result(15)


@pytest.mark.timeout(20)
def test_an_exception_that_cannot_be_pickled_arrives_as_a_substitute_naming_it():
    with IsolatedExecutor() as ex:
        exc = ex.submit(_funcs.raise_unpicklable_error, "the message").exception(15)
        assert isinstance(exc, RemoteError)
        assert exc.type_name == "_funcs.UnpicklableError"
        assert "the message" in str(exc)
        assert "raise_unpicklable_error" in exc.tb
        assert "raise_unpicklable_error" in str(exc.__cause__)
        assert ex.submit(_funcs.add, 1, 1).result(15) == 2


@pytest.mark.timeout(20)
def test_an_exception_whose_init_does_not_take_its_args_keeps_its_type():
    # UnunpicklableError(a, b) calls super().__init__(f"{a} and {b}"): pickle's rebuild,
    # UnunpicklableError("x and y"), fails (a RemoteError naming it before).
    with IsolatedExecutor() as ex:
        exc = ex.submit(_funcs.raise_ununpicklable_error, "x", "y").exception(15)
        assert type(exc) is _funcs.UnunpicklableError
        assert exc.args == ("x and y",) and str(exc) == "x and y"
        assert isinstance(exc.__cause__, RemoteTraceback)
        assert "raise_ununpicklable_error" in str(exc.__cause__)
        with pytest.raises(_funcs.UnunpicklableError, match="x and y"):
            ex.submit(_funcs.raise_ununpicklable_error, "x", "y").result(15)
        # Attributes __init__ set travel too; keyword-only parameters are no obstacle.
        exc = ex.submit(_funcs.raise_coded_error, 404, "not here").exception(15)
        assert type(exc) is _funcs.CodedError
        assert (exc.code, exc.args, exc.notes_seen) == (404, ("not here",), ["added in the worker"])
        assert exc.__notes__ == ["added in the worker"]
        assert ex.submit(_funcs.add, 1, 1).result(15) == 2


@pytest.mark.timeout(120)
@ALL_PYTHONS
def test_a_script_exception_whose_init_does_not_take_its_args_keeps_its_type(pyver, tmp_path):
    proc = run_script(pyver, textwrap.dedent("""
        from comfy_env import IsolatedExecutor

        class Coded(Exception):
            def __init__(self, code, *, why):
                super().__init__(f"{code}: {why}")
                self.code = code

        def fail(code):
            raise Coded(code, why="because")

        if __name__ == "__main__":
            with IsolatedExecutor() as ex:
                try:
                    ex.submit(fail, 7).result(30)
                except Coded as exc:
                    print("caught", type(exc).__name__, exc.code, exc)
    """), cwd=tmp_path, timeout=100)
    assert "caught Coded 7 7: because" in proc.stdout, (proc.stdout, proc.stderr)


# -- a worker that dies ------------------------------------------------------------------

@pytest.mark.timeout(20)
def test_os_exit_fails_the_call_with_worker_crashed_naming_the_code_and_stderr():
    with IsolatedExecutor() as ex:
        fut = ex.submit(_funcs.stderr_then_exit, 99, ["about to go", "last words"])
        exc = fut.exception(15)
        assert isinstance(exc, WorkerCrashed) and isinstance(exc, BrokenProcessPool)
        assert comfy_env.WorkerCrashed is WorkerCrashed
        assert exc.exitcode == 99
        assert "exited with code 99" in str(exc)
        assert "about to go\nlast words" in str(exc)
        assert exc.stderr_tail.endswith("last words")
        assert ex.submit(_funcs.add, 1, 1).result(15) == 2      # still usable


@pytest.mark.timeout(20)
@pytest.mark.parametrize("fn, signame", [
    (_funcs.kill_self, "SIGKILL"),
    (_funcs.segfault, "SIGSEGV"),
])
def test_death_by_signal_fails_the_call_with_worker_crashed_naming_the_signal(fn, signame):
    with IsolatedExecutor() as ex:
        exc = ex.submit(fn).exception(15)
        assert isinstance(exc, WorkerCrashed)
        assert exc.exitcode == -getattr(signal, signame)
        assert signame in str(exc)
        assert ex.submit(_funcs.add, 1, 1).result(15) == 2


@pytest.mark.timeout(20)
def test_sigkill_from_outside_fails_the_running_call(gate, tmp_path):
    # Killed once the worker runs the call (not merely once it was sent: a call the worker
    # had not taken yet is sent again to a fresh worker, and would wait on the gate there).
    started = tmp_path / "started"
    with IsolatedExecutor() as ex:
        fut = ex.submit(_funcs.touch_then_wait, str(started), str(gate))
        _wait_until(started.exists)
        (pid,) = ex.worker_pids()
        os.kill(pid, signal.SIGKILL)
        exc = fut.exception(15)
        assert isinstance(exc, WorkerCrashed) and "SIGKILL" in str(exc)
        assert ex.submit(_funcs.getpid).result(15) != pid


@pytest.mark.timeout(20)
def test_dying_while_pickling_the_result_is_a_crash():
    with IsolatedExecutor() as ex:
        exc = ex.submit(_funcs.return_dies_when_pickled).exception(15)
        assert isinstance(exc, WorkerCrashed)
        assert exc.exitcode == 7 and "dying in __reduce__" in str(exc)


@pytest.mark.timeout(20)
def test_sys_exit_in_the_call_ends_the_worker_like_a_crash():
    with IsolatedExecutor() as ex:
        exc = ex.submit(sys.exit, 5).exception(15)
        assert isinstance(exc, WorkerCrashed) and exc.exitcode == 5


@pytest.mark.timeout(30)
@pytest.mark.parametrize("code,status", [(3, 3), (None, 0), ("bye", 1)])
def test_sys_exit_with_a_non_daemon_thread_alive_still_ends_the_worker(tmp_path, code, status):
    """A call that started a thread which never ends and then calls ``sys.exit()``: the
    interpreter's shutdown would wait for the thread for ever, and the call never
    completed (with one worker, neither did any later call).  The worker ends now, with
    the exit status Python gives that argument, after its atexit handlers."""
    marker = tmp_path / "atexit"
    with IsolatedExecutor(max_workers=1) as ex:
        exc = ex.submit(_funcs.exit_leaving_a_thread, code, str(marker)).exception(15)
        assert isinstance(exc, WorkerCrashed) and exc.exitcode == status, repr(exc)
        assert ex.submit(sum, [1, 2]).result(15) == 3
    assert marker.read_text() == "atexit ran"


@pytest.mark.timeout(30)
def test_a_thread_a_call_left_running_does_not_keep_the_worker_after_shutdown(capfd):
    """A call started a non-daemon thread that never ends: at shutdown the worker gives
    such threads a grace period, then ends without them and says so on stderr (it
    waited for them for ever, and ``shutdown(wait=True)`` with it)."""
    from procstate import wait_gone
    from comfy_env import worker as worker_module
    ex = IsolatedExecutor(max_workers=1)
    pid = ex.submit(_funcs.leave_a_thread).result(15)
    t0 = time.monotonic()
    ex.shutdown(wait=True)
    assert time.monotonic() - t0 < worker_module.STRAY_THREAD_GRACE + 5
    assert wait_gone([pid], 5) == []
    assert "ending with 1 thread(s) a call started still running (never-ends)" in capfd.readouterr().err


@pytest.mark.timeout(30)
def test_calls_queued_behind_a_crash_run_on_a_replacement_worker():
    with IsolatedExecutor(max_workers=1) as ex:
        first_pid = ex.submit(_funcs.getpid).result(15)
        crash = ex.submit(_funcs.stderr_then_exit, 99)
        queued = [ex.submit(_funcs.pid_and_value, i) for i in range(5)]
        assert isinstance(crash.exception(15), WorkerCrashed)
        results = [f.result(15) for f in queued]
        assert [v for _, v in results] == list(range(5))
        assert first_pid not in {p for p, _ in results}
        assert len({p for p, _ in results}) == 1                 # one replacement, max_workers=1
        assert ex.worker_pids() == [results[0][0]]


@pytest.mark.timeout(30)
def test_crashes_in_several_workers_leave_the_other_calls_alone(tmp_path):
    with IsolatedExecutor(max_workers=2) as ex:
        futs = []
        for i in range(6):
            futs.append(ex.submit(_funcs.stderr_then_exit, 3) if i % 2 else
                        ex.submit(_funcs.sleep_then, 0.05, i))
        for i, f in enumerate(futs):
            if i % 2:
                assert isinstance(f.exception(20), WorkerCrashed)
            else:
                assert f.result(20) == i


# -- initializer ---------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_initializer_runs_in_every_worker_before_its_calls(tmp_path):
    names = ["a", "b"]
    with IsolatedExecutor(max_workers=2, initializer=_funcs.init_set, initargs=("k", 42)) as ex:
        futs = [ex.submit(_funcs.rendezvous, str(tmp_path), n, names) for n in names]
        assert len({f.result(20) for f in futs}) == 2
        assert [f.result(20) for f in [ex.submit(_funcs.get_state, "k") for _ in range(4)]] == [42] * 4
    with IsolatedExecutor(initializer="_funcs:init_set", initargs=["k", "by string"]) as ex:
        assert ex.submit(_funcs.get_state, "k").result(15) == "by string"
    with IsolatedExecutor(initializer=lambda: _funcs.init_set("k", "by value")) as ex:
        assert ex.submit(_funcs.get_state, "k").result(15) == "by value"


@pytest.mark.timeout(30)
def test_a_failing_initializer_breaks_the_executor_without_a_restart_loop(tmp_path):
    ex = IsolatedExecutor(max_workers=2, initializer=_funcs.init_fail, initargs=(str(tmp_path),))
    futs = [ex.submit(_funcs.add, i, i) for i in range(4)]
    for f in futs:
        exc = f.exception(20)
        assert isinstance(exc, BrokenExecutor)
        assert isinstance(exc, InitializerFailed)
        # What ProcessPoolExecutor raises when its initializer fails: code written for
        # it catches ours unchanged.
        assert isinstance(exc, BrokenProcessPool)
        assert "initializer refused" in str(exc)
    with pytest.raises(BrokenProcessPool):
        ex.submit(_funcs.add, 1, 1)
    _wait_until(lambda: not ex.worker_pids())
    attempts = len(os.listdir(tmp_path))
    time.sleep(0.5)         # a restart loop would keep adding attempt files
    assert 1 <= attempts == len(os.listdir(tmp_path)) <= 2
    ex.shutdown(wait=True)


@pytest.mark.timeout(20)
def test_an_initializer_that_cannot_start_a_worker_breaks_the_executor():
    ex = IsolatedExecutor(initializer=_funcs.init_set, initargs=("k", threading.Lock()))
    exc = ex.submit(_funcs.add, 1, 1).exception(15)
    assert isinstance(exc, BrokenExecutor) and "pickle" in str(exc)
    ex.shutdown()
    ex = IsolatedExecutor(initializer=os._exit, initargs=(4,))
    exc = ex.submit(_funcs.add, 1, 1).exception(15)
    assert isinstance(exc, BrokenExecutor) and "exited with code 4" in str(exc)
    ex.shutdown()


# -- call_timeout ---------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_call_timeout_kills_the_call_and_its_worker_and_carries_on():
    with IsolatedExecutor(call_timeout=0.5) as ex:
        pid = ex.submit(_funcs.getpid).result(15)
        slow = ex.submit(_funcs.sleep_then, 60)
        after = ex.submit(_funcs.getpid)
        exc = slow.exception(20)
        assert isinstance(exc, CallTimeout) and isinstance(exc, TimeoutError)
        assert "call_timeout=0.5" in str(exc)
        new_pid = after.result(15)
        assert new_pid != pid
        _wait_until(lambda: not os.path.exists(f"/proc/{pid}"))   # killed and reaped
        assert ex.worker_pids() == [new_pid]


@pytest.mark.timeout(30)
def test_call_timeout_counts_from_the_start_of_each_call_not_from_submit():
    # Six 0.3 s calls on one worker take 1.8 s in all, longer than call_timeout.
    with IsolatedExecutor(call_timeout=1.5) as ex:
        futs = [ex.submit(_funcs.sleep_then, 0.3, i) for i in range(6)]
        assert [f.result(20) for f in futs] == list(range(6))


def test_bad_constructor_arguments_are_refused():
    for kwargs in [dict(call_timeout=0), dict(call_timeout=-1), dict(call_timeout="1")]:
        with pytest.raises(ValueError):
            IsolatedExecutor(**kwargs)
    for bad in (0, -1):           # ProcessPoolExecutor's words, which its own tests match
        with pytest.raises(ValueError, match="max_workers must be greater than 0"):
            IsolatedExecutor(max_workers=bad)
    for bad in (True, "2", 1.5):
        with pytest.raises(TypeError, match="max_workers must be an int or None"):
            IsolatedExecutor(max_workers=bad)
    with pytest.raises(TypeError):
        IsolatedExecutor(initializer=42)


def test_max_workers_none_is_one_per_cpu_this_process_may_use():
    ex = IsolatedExecutor(max_workers=None)
    try:
        assert ex._pool.max_workers == len(os.sched_getaffinity(0))
    finally:
        ex.shutdown()


@pytest.mark.timeout(30)
def test_arguments_and_results_of_many_mib_travel_intact():
    big = os.urandom(20 * 1024 * 1024 + 3)
    with IsolatedExecutor(max_workers=2) as ex:
        futs = [ex.submit(_funcs.echo, big, key=big[:10]) for _ in range(3)]
        for f in futs:
            args, kwargs = f.result(25)
            assert args[0] == big and kwargs == {"key": big[:10]}


# -- pickling failures ---------------------------------------------------------------------

@pytest.mark.timeout(20)
def test_an_unpicklable_argument_fails_that_future_and_the_worker_survives():
    with IsolatedExecutor() as ex:
        pid = ex.submit(_funcs.getpid).result(15)
        exc = ex.submit(_funcs.echo, 1, threading.Lock()).exception(15)
        assert isinstance(exc, PicklingFailed)
        assert "argument 1 (lock)" in str(exc) and "cannot pickle" in str(exc)
        exc = ex.submit(_funcs.echo, x=threading.Lock()).exception(15)
        assert isinstance(exc, PicklingFailed) and "keyword argument 'x'" in str(exc)
        lock = threading.Lock()
        exc = ex.submit(lambda: lock).exception(15)
        assert isinstance(exc, PicklingFailed) and "function" in str(exc)
        assert ex.submit(_funcs.getpid).result(15) == pid


@pytest.mark.timeout(20)
def test_an_unpicklable_result_fails_that_future_and_the_worker_survives():
    with IsolatedExecutor() as ex:
        pid = ex.submit(_funcs.getpid).result(15)
        exc = ex.submit(_funcs.return_lock).exception(15)
        assert isinstance(exc, PicklingFailed)
        assert "result" in str(exc) and "lock" in str(exc) and "cannot pickle" in str(exc)
        assert ex.submit(_funcs.getpid).result(15) == pid


@pytest.mark.timeout(60)
def test_workers_start_for_the_calls_there_are_not_more():
    """A call submitted while another worker still starts needs one more worker, not
    one for every call already covered (3 calls once started 8 of 8)."""
    for calls in (1, 2, 3):
        with IsolatedExecutor(max_workers=8) as ex:
            futs = [ex.submit(_funcs.add, i, 1) for i in range(calls)]
            assert [f.result(30) for f in futs] == [i + 1 for i in range(calls)]
            started = len(ex._pool.workers) + ex._pool.starting
            assert 1 <= started <= calls, (calls, started)


@pytest.mark.timeout(60)
def test_shutdown_cancel_futures_right_after_submit_still_runs_the_calls_workers_start_for():
    """As ProcessPoolExecutor (and its own test_cancel_futures): the calls handed to the
    workers being started run; the rest are cancelled; none is left pending."""
    ex = IsolatedExecutor(max_workers=2)
    futs = [ex.submit(_funcs.sleep_then, 0.05, i) for i in range(30)]
    ex.shutdown(wait=True, cancel_futures=True)
    cancelled = [f for f in futs if f.cancelled()]
    ran = [f for f in futs if not f.cancelled()]
    assert len(cancelled) > 20 and ran
    assert all(f.done() and f.exception() is None for f in ran)
    assert [f.result() for f in ran] == [futs.index(f) for f in ran]


@pytest.mark.timeout(60)
def test_map_with_chunks_is_a_generator_that_lets_go_of_what_it_yielded():
    import types
    import weakref
    with IsolatedExecutor(max_workers=2) as ex:
        it = ex.map(frozenset, [[i] for i in range(6)], chunksize=3)
        assert isinstance(it, types.GeneratorType)
        refs = []
        for got in it:
            refs.append(weakref.ref(got))
            del got
        assert [r() for r in refs] == [None] * 6       # nothing of the chunks kept them
        it = ex.map(_funcs.sleep_then, [0.2] * 8, range(8), chunksize=2)
        assert next(it) == 0
        it.close()                                      # the calls not reached are cancelled


@pytest.mark.timeout(90)
def test_a_call_that_kills_every_worker_receiving_it_fails_instead_of_being_resent_forever():
    """An argument too big for the worker's memory: the worker dies receiving it, the
    call is sent once more (the first worker might have died idle), then fails."""
    with IsolatedExecutor(initializer=_funcs.limit_address_space, initargs=(48,),
                          worker_output="discard") as ex:
        fut = ex.submit(len, bytes(160 << 20))
        exc = fut.exception(60)
        assert isinstance(exc, WorkerCrashed), exc
        assert "while the call was being sent to it" in str(exc) and "Cannot allocate memory" in str(exc)
        assert ex.submit(len, b"abc").result(30) == 3          # and the executor goes on


@pytest.mark.timeout(60)
def test_a_send_that_fails_on_our_side_stops_that_worker_and_the_call_runs_on_a_fresh_one(monkeypatch):
    """No buffer space (ENOBUFS), too many fds in flight: the worker is alive but the
    frame may be half out, so it is stopped; the call, not delivered, runs elsewhere."""
    import errno
    from comfy_env.executor import worker_handle
    real = worker_handle.WorkerHandle.send_call
    sends = []

    def fails_once(self, item, chunks, fds, *books):
        sends.append(self.pid)
        if len(sends) == 2:
            self.item = item
            raise OSError(errno.ENOBUFS, "No buffer space available")
        return real(self, item, chunks, fds, *books)

    monkeypatch.setattr(worker_handle.WorkerHandle, "send_call", fails_once)
    with IsolatedExecutor(max_workers=1) as ex:
        first = ex.submit(os.getpid).result(30)
        second = ex.submit(os.getpid).result(30)
        assert second != first and ex.worker_pids() == [second]
        assert ex.submit(_funcs.add, 1, 2).result(30) == 3


@pytest.mark.timeout(60)
def test_timeouts_are_checked_and_an_infinite_one_means_none():
    for name in ("call_timeout", "start_timeout"):
        with pytest.raises(ValueError, match=f"{name} must be a positive number of seconds"):
            IsolatedExecutor(**{name: float("nan")})
    with IsolatedExecutor(call_timeout=float("inf"), start_timeout=float("inf")) as ex:
        assert ex._pool.call_timeout is None and ex._pool.start_timeout is None
        assert ex.submit(_funcs.add, 1, 2).result(30) == 3


@pytest.mark.timeout(60)
def test_a_deadline_years_away_leaves_the_watchdog_working():
    """A start_timeout of 1e10 s overflowed the watchdog's wait and ended its thread:
    call_timeout then never fired."""
    with IsolatedExecutor(start_timeout=1e10, call_timeout=1) as ex:
        with pytest.raises(CallTimeout):
            ex.submit(_funcs.sleep_then, 30).result(20)


def test_worker_log_level_is_checked_when_the_executor_is_made():
    with pytest.raises(ValueError, match="worker_log_level must be a logging level name"):
        IsolatedExecutor(worker_log_level="LOUD")
    with IsolatedExecutor(worker_log_level="debug") as ex:       # any case
        assert ex._pool.worker_log_level == "DEBUG"


@pytest.mark.timeout(60)
def test_futures_cancelled_by_shutdown_are_done_for_wait_and_as_completed():
    from concurrent.futures import as_completed, wait
    ex = IsolatedExecutor(max_workers=1)
    ex.submit(_funcs.add, 1, 1).result(30)
    futs = [ex.submit(_funcs.sleep_then, 0.2, i) for i in range(10)]
    futs[5].cancel()                          # cancelled by the caller before, too
    ex.shutdown(wait=False, cancel_futures=True)
    done, not_done = wait(futs, timeout=20)
    assert not not_done and sum(f.cancelled() for f in futs) >= 8
    assert len(list(as_completed(futs, timeout=20))) == 10
    ex.shutdown(wait=True)


@pytest.mark.timeout(60)
def test_a_worker_that_cannot_be_started_leaves_no_socket_behind(monkeypatch):
    from comfy_env.executor import launch

    def refuse(*args, **kwargs):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(launch, "spawn", refuse)
    before = len(os.listdir("/proc/self/fd"))
    kept = []
    for _ in range(5):
        ex = IsolatedExecutor()
        with pytest.raises(Exception):
            ex.submit(_funcs.add, 1, 2).result(30)
        ex.shutdown(wait=True)
        kept.append(ex)                       # the error's traceback stays reachable
    assert len(os.listdir("/proc/self/fd")) <= before


@pytest.mark.timeout(60)
def test_a_path_added_to_sys_path_after_the_worker_started_is_the_workers_too(tmp_path):
    """env=None: code that adds a plugin directory at run time (as ComfyUI does) and
    imports from it; the worker, started before, imports the call's function from it."""
    import importlib
    import sys
    lib = tmp_path / "late_plugins"
    lib.mkdir()
    (lib / "late_plugin_mod.py").write_text("def triple(x):\n    return 3 * x\n")
    with IsolatedExecutor() as ex:
        ex.submit(_funcs.add, 1, 1).result(30)            # started before the path existed
        sys.path.insert(0, str(lib))
        try:
            mod = importlib.import_module("late_plugin_mod")
            assert ex.submit(mod.triple, 2).result(30) == 6
            assert ex.submit("late_plugin_mod:triple", 3).result(30) == 9
        finally:
            sys.path.remove(str(lib))
            sys.modules.pop("late_plugin_mod", None)


@pytest.mark.timeout(60)
def test_what_is_queued_for_a_worker_goes_in_the_same_write_as_the_call(tmp_path, monkeypatch):
    """Messages queued for a worker (here the new sys.path) travel ahead of the next
    call in the call's own write: one send, one wake-up of the worker, not two."""
    import importlib
    import sys

    from comfy_env.ipc.transport import Channel
    lib = tmp_path / "queued_plugins"
    lib.mkdir()
    (lib / "queued_plugin_mod.py").write_text("def twice(x):\n    return 2 * x\n")
    sends = []
    real_send = Channel.send

    def send(self, chunks, fds=(), *args, **kwargs):
        sends.append((self, bool(args and args[0]) or kwargs.get("before") is not None))
        return real_send(self, chunks, fds, *args, **kwargs)

    with IsolatedExecutor(max_workers=1) as ex:
        ex.submit(_funcs.add, 1, 1).result(30)
        monkeypatch.syspath_prepend(str(lib))
        monkeypatch.setattr(Channel, "send", send)
        try:
            mod = importlib.import_module("queued_plugin_mod")
            assert ex.submit(mod.twice, 4).result(30) == 8       # the worker took the path first
        finally:
            monkeypatch.setattr(Channel, "send", real_send)
            sys.modules.pop("queued_plugin_mod", None)
        (worker,) = ex._pool.workers
        assert [before for ch, before in sends if ch is worker.channel] == [True], sends


def test_a_failed_drain_before_a_call_still_sends_what_was_queued_in_the_calls_write(monkeypatch):
    """A plane's free that fails in the drain before a call is logged and the call goes;
    the messages queued for the worker until then go in the call's write too, not later."""
    from comfy_env.ipc import lifetime
    from comfy_env.ipc.protocol import ImportPaths
    from comfy_env.ipc.transport import Channel
    with IsolatedExecutor(max_workers=1) as ex:
        ex.submit(_funcs.add, 1, 1).result(30)
        (worker,) = ex._pool.workers
        real_drain, real_send = lifetime.Ledger._drain, Channel.send
        sends = []

        def failing_drain(self, keep=None):
            if keep is worker.link:
                keep._posts.append(ImportPaths(list(sys.path)))    # queued, then a free fails
                raise RuntimeError("a plane's free failed")
            return real_drain(self, keep)

        def send(self, chunks, fds=(), before=None):
            if self is worker.channel:
                sends.append(before is not None)
            return real_send(self, chunks, fds, before)

        monkeypatch.setattr(lifetime.Ledger, "_drain", failing_drain)
        monkeypatch.setattr(Channel, "send", send)
        try:
            assert ex.submit(_funcs.add, 2, 2).result(30) == 4
        finally:
            monkeypatch.undo()
        assert sends == [True] and not worker.link.take_posts()


async def _async_double(x):
    import asyncio
    await asyncio.sleep(0.01)
    return 2 * x


@pytest.mark.timeout(60)
def test_an_async_function_runs_to_completion_in_the_worker():
    with IsolatedExecutor() as ex:
        assert ex.submit(_async_double, 21).result(30) == 42
        assert list(ex.map(_async_double, [1, 2])) == [2, 4]
        assert list(ex.map(_async_double, range(5), chunksize=2)) == [0, 2, 4, 6, 8]


def test_an_executor_sent_as_an_argument_says_what_to_do_instead():
    import pickle
    with IsolatedExecutor() as ex:
        with pytest.raises(TypeError, match="cannot be pickled or sent to a worker"):
            pickle.dumps(ex)
        with pytest.raises(PicklingFailed, match="cannot be pickled or sent to a worker"):
            ex.submit(_funcs.echo, ex).result(30)


@pytest.mark.timeout(60)
def test_a_result_whose_unpickling_raises_keyboardinterrupt_off_the_main_thread_is_a_pickling_failure():
    """Off the main thread no Ctrl-C arrives: a KeyboardInterrupt while decoding is the
    payload's, a PicklingFailed of that call, not a broken reader and a killed worker."""
    import threading
    with IsolatedExecutor() as ex:
        pid = ex.submit(os.getpid).result(30)
        fut = ex.submit(_funcs.return_interrupts_when_unpickled)
        out = []
        t = threading.Thread(target=lambda: out.append(fut.exception(30)))
        t.start()
        t.join(40)
        assert isinstance(out[0], PicklingFailed) and "KeyboardInterrupt" in str(out[0]), out
        assert ex.submit(os.getpid).result(30) == pid          # the worker goes on


@pytest.mark.timeout(60)
def test_a_result_whose_unpickling_raises_keyboardinterrupt_on_the_main_thread_is_a_pickling_failure():
    """On the main thread too: decoding holds Ctrl-C back (comfy_env's SIGINT handler),
    so a KeyboardInterrupt raised there is the payload's; every accessor gives the same
    PicklingFailed (it was a KeyboardInterrupt on the main thread, another thread's)."""
    from comfy_env.ipc import interrupts
    with IsolatedExecutor() as ex:
        if interrupts.may_raise():
            pytest.skip("another SIGINT handler is in place: a real Ctrl-C could land there")
        for with_array in (False, True):
            fut = ex.submit(_funcs.return_interrupts_when_unpickled, with_array)
            exc = fut.exception(30)
            assert isinstance(exc, PicklingFailed) and "KeyboardInterrupt" in str(exc), with_array
            with pytest.raises(PicklingFailed) as info:
                fut.result(5)
            assert info.value is exc


def test_the_worker_spin_setting_has_an_upper_bound(monkeypatch):
    from comfy_env import settings
    with pytest.raises(settings.SettingsError, match="COMFY_ENV_WORKER_SPIN_US"):
        settings.read({"COMFY_ENV_WORKER_SPIN_US": "99999999999999"})
    assert settings.read({"COMFY_ENV_WORKER_SPIN_US": "100000"}).worker_spin_us == 100_000


@pytest.mark.timeout(60)
def test_a_futures_repr_names_the_result_type_not_the_lazy_wrapper():
    np = pytest.importorskip("numpy")
    with IsolatedExecutor() as ex:
        fut = ex.submit(_funcs.echo, np.zeros(1 << 20))
        from concurrent.futures import wait
        wait([fut], timeout=30)                  # done, not decoded (exception() decodes)
        assert "returned an undecoded result" in repr(fut), repr(fut)
        fut.result()
        assert "returned tuple" in repr(fut), repr(fut)


@pytest.mark.timeout(30)
def test_a_result_of_a_class_only_the_worker_has_says_to_return_plain_data(tmp_path):
    """The parent cannot import a class of the worker's own modules (a node pack's): the
    error says so and what to return instead, not to install or share it into an env."""
    (tmp_path / "only_in_the_worker.py").write_text("class Thing:\n    pass\n")
    with IsolatedExecutor() as ex:
        exc = ex.submit(_funcs.instance_of_a_module_only_here, str(tmp_path)).exception(20)
        assert ex.submit(_funcs.add, 1, 2).result(20) == 3
    assert isinstance(exc, ModuleNotFoundError) and exc.name == "only_in_the_worker"
    msg = str(exc)
    assert "a worker sent" in msg and "Return plain data" in msg, msg
    assert "share" not in msg and "comfy-env.toml" not in msg, msg


@pytest.mark.timeout(30)
def test_an_exception_of_a_class_only_the_worker_has_keeps_its_message(tmp_path):
    (tmp_path / "only_in_the_worker.py").write_text("class OnlyHereError(Exception):\n    pass\n")
    from comfy_env.comfyui.errors import named_like_original
    with IsolatedExecutor() as ex:
        exc = ex.submit(_funcs.raise_from_a_module_only_here, str(tmp_path), "the original words").exception(20)
    assert isinstance(exc, RemoteError) and exc.type_name == "only_in_the_worker.OnlyHereError"
    assert exc.message == "the original words"
    assert "could not be rebuilt in the parent" in str(exc)
    shown = named_like_original(exc)
    assert type(shown).__qualname__ == "OnlyHereError" and str(shown) == "the original words"


@pytest.mark.timeout(60)
def test_a_function_of_a_module_loaded_from_a_file_path_runs_by_value(tmp_path):
    """Plugin systems load modules by path (spec_from_file_location) into sys.modules; a
    worker cannot import those by name, so they travel by value.  Importable modules
    still go by name."""
    import importlib.util

    from comfy_env.executor import executor as ex_mod

    path = tmp_path / "plugin_impl.py"
    path.write_text("FACTOR = 11\n\ndef run(x):\n    return x * FACTOR\n")
    spec = importlib.util.spec_from_file_location("comfy_env_test_plugin", path)
    plugin = importlib.util.module_from_spec(spec)
    sys.modules["comfy_env_test_plugin"] = plugin
    try:
        spec.loader.exec_module(plugin)
        with IsolatedExecutor() as ex:
            assert ex.submit(plugin.run, 2).result(timeout=30) == 22
            assert ex.submit(_funcs.echo, 1).result(timeout=30) == ((1,), {})
        assert ex_mod._importable["comfy_env_test_plugin"] is False
        assert ex_mod._importable["_funcs"] is True
    finally:
        sys.modules.pop("comfy_env_test_plugin", None)


class _RaisesKeyboardInterrupt:
    def __reduce__(self):
        raise KeyboardInterrupt("raised by __reduce__")


@pytest.mark.timeout(60)
def test_an_argument_whose_pickling_raises_keyboardinterrupt_fails_only_its_call():
    """Not a Ctrl-C (ours is held back while a call is handed over): the call fails with
    PicklingFailed, nothing is put back for ever, the executor carries on."""
    import threading

    with IsolatedExecutor() as ex:
        ex.submit(_funcs.echo, 0).result(timeout=30)
        before = threading.active_count()
        fut = ex.submit(_funcs.echo, _RaisesKeyboardInterrupt())
        with pytest.raises(PicklingFailed, match="KeyboardInterrupt"):
            fut.result(timeout=30)
        time.sleep(0.3)
        assert threading.active_count() <= before + 2
        assert ex.submit(_funcs.echo, 2).result(timeout=30) == ((2,), {})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("handler", ["SIG_IGN", "SIG_DFL"])
def test_keyboardinterrupts_of_the_payload_are_its_own_where_sigint_is_ignored(handler):
    """A program a shell started in the background (``&``, ``nohup``) has SIGINT ignored:
    no Ctrl-C can raise there, so a KeyboardInterrupt from an argument's ``__reduce__`` or
    a result's unpickling on the main thread is the payload's (PicklingFailed), as where
    our handler holds Ctrl-C back.  Taken for a Ctrl-C, it escaped the caller (it ended
    this test session, run in the background)."""
    import signal
    old = signal.signal(signal.SIGINT, getattr(signal, handler))
    try:
        with IsolatedExecutor() as ex:
            with pytest.raises(PicklingFailed, match="KeyboardInterrupt"):
                ex.submit(_funcs.echo, _RaisesKeyboardInterrupt()).result(timeout=30)
            for with_array in (False, True):
                fut = ex.submit(_funcs.return_interrupts_when_unpickled, with_array)
                exc = fut.exception(30)
                assert isinstance(exc, PicklingFailed) and "KeyboardInterrupt" in str(exc), with_array
            assert ex.submit(_funcs.echo, 2).result(timeout=30) == ((2,), {})
    finally:
        signal.signal(signal.SIGINT, old)


@pytest.mark.timeout(60)
def test_shutdown_cancel_futures_marks_the_calls_it_lets_run_as_running():
    """Calls handed to a worker that is still starting run after shutdown(cancel_futures=
    True), as ProcessPoolExecutor's handed-over calls do, and say so: running, not
    cancellable; the others are cancelled."""
    ex = IsolatedExecutor(max_workers=1)
    fs = [ex.submit(time.sleep, 0.3) for _ in range(3)]
    ex.shutdown(wait=False, cancel_futures=True)
    first = fs[0]
    assert first.running() or first.done()
    assert not first.cancel()
    assert all(f.cancelled() for f in fs[1:])
    assert first.result(timeout=30) is None
    ex.shutdown()


@pytest.mark.timeout(60)
def test_a_module_loaded_by_path_under_a_name_found_elsewhere_runs_by_value(tmp_path, monkeypatch):
    """The worker would import another file under that name: the parent's code travels."""
    import importlib.util

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "comfy_env_test_shadowed.py").write_text("def which():\n    return 'A (sys.path)'\n")
    (tmp_path / "b" / "comfy_env_test_shadowed.py").write_text("def which():\n    return 'B (by path)'\n")
    monkeypatch.syspath_prepend(str(tmp_path / "a"))
    spec = importlib.util.spec_from_file_location("comfy_env_test_shadowed", tmp_path / "b" / "comfy_env_test_shadowed.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "comfy_env_test_shadowed", mod)
    spec.loader.exec_module(mod)
    with IsolatedExecutor() as ex:
        assert ex.submit(mod.which).result(timeout=30) == "B (by path)"


EMFILE_SCRIPT = r"""
import resource, numpy as np
from comfy_env import IsolatedExecutor, PicklingFailed, shared_like
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
def total(*arrs):
    return len(arrs)
with IsolatedExecutor() as ex:
    arrs = [shared_like(np.ones(1 << 17)) for _ in range(600)]
    try:
        ex.submit(total, *arrs).result(timeout=60)
        print("sent")
    except PicklingFailed as exc:
        print("refused:", str(exc)[:160])
    del arrs
    print(ex.submit(total, 1, 2).result(timeout=60))
"""


@pytest.mark.timeout(120)
def test_running_out_of_fds_while_sending_says_so_not_that_the_function_failed(tmp_path):
    from pythons import run_script
    proc = run_script("3.11", EMFILE_SCRIPT, cwd=tmp_path, timeout=100)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "sent" in out or "ran out of file descriptors" in out or "file descriptors" in out, out
    assert "the function" not in out, out
    assert out.strip().splitlines()[-1] == "2", out
