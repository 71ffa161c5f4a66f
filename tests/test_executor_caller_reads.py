"""A caller waiting in ``result()`` reads its worker's channel itself (one thread
wake-up less per call): every frame is still handled as the reader thread handles
it, and timeouts, crashes and concurrent waiters behave as before."""
from __future__ import annotations

import textwrap
import threading
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import as_completed

import pytest

import _caller_read_funcs as cf
import _funcs
from _log_records import collect_records
from comfy_env import IsolatedExecutor, WorkerCrashed
from pythons import ALL_PYTHONS, TESTS, run_script


@pytest.fixture
def collected():
    with collect_records("comfy_env.worker.callerreads") as records:
        yield records


@pytest.mark.timeout(60)
def test_a_caller_reading_its_result_handles_the_log_records_before_it_in_order(collected):
    with IsolatedExecutor(name="callerreads") as ex:
        ex.submit(_funcs.add, 1, 1).result(30)          # worker up
        me = threading.current_thread().name
        for _ in range(3):
            collected.clear()
            assert ex.submit(cf.log_then_return, 40).result(30) == 40
            msgs = [r.getMessage() for r in collected]
            assert msgs == [f"[callerreads] user.caller_reads: record {i}" for i in range(40)]
            # The waiting caller read (some of) them itself, the reader thread stood aside.
            assert me in {r.threadName for r in collected}, [(r.getMessage(), r.threadName) for r in collected]


@pytest.mark.timeout(60)
def test_a_result_timeout_while_reading_gives_the_channel_back_and_loses_nothing():
    with IsolatedExecutor(max_workers=1) as ex:
        ex.submit(_funcs.add, 1, 1).result(30)
        slow = ex.submit(_funcs.sleep_then, 0.5, "late")
        with pytest.raises(FutureTimeout):
            slow.result(0.05)
        with pytest.raises(FutureTimeout):
            slow.exception(0.01)
        got = []
        t = threading.Thread(target=lambda: got.append(slow.result(30)))
        t.start()
        nxt = ex.submit(_funcs.add, 2, 3)           # queued behind the slow call
        assert nxt.result(30) == 5
        t.join(30)
        assert got == ["late"]
        assert slow.result(0) == "late"


@pytest.mark.timeout(60)
def test_a_result_nobody_waits_for_still_arrives_through_the_reader_thread():
    with IsolatedExecutor(max_workers=1) as ex:
        ex.submit(_funcs.add, 1, 1).result(30)
        slow = ex.submit(_funcs.sleep_then, 0.3, "late")
        with pytest.raises(FutureTimeout):
            slow.result(0.01)
        done = threading.Event()
        slow.add_done_callback(lambda f: done.set())
        assert done.wait(30)                      # nobody in result(): the reader read it
        assert slow.result(0) == "late"


@pytest.mark.timeout(60)
def test_a_worker_crash_while_the_caller_reads_is_WorkerCrashed_and_the_executor_goes_on():
    with IsolatedExecutor(max_workers=1) as ex:
        ex.submit(_funcs.add, 1, 1).result(30)
        fut = ex.submit(_funcs.stderr_then_exit, 3, ["last words"])
        with pytest.raises(WorkerCrashed) as info:
            fut.result(30)
        assert info.value.exitcode == 3
        assert "last words" in str(info.value)
        assert ex.submit(_funcs.add, 2, 2).result(30) == 4   # a new worker takes over


@pytest.mark.timeout(120)
def test_threads_waiting_on_calls_of_the_same_worker_all_get_their_own_results():
    with IsolatedExecutor(max_workers=1) as ex:
        ex.submit(_funcs.add, 1, 1).result(30)
        errors = []

        def caller(k):
            try:
                for i in range(60):
                    assert ex.submit(_funcs.add, k, i).result(30) == k + i
                    if i % 10 == 0:     # futures nobody waits on in result() too
                        futs = [ex.submit(_funcs.add, k, j) for j in range(5)]
                        assert sorted(f.result(30) for f in as_completed(futs, 30)) == \
                            [k + j for j in range(5)]
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=caller, args=(k * 1000,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(100)
        assert not errors, errors
        assert not any(t.is_alive() for t in threads)


@pytest.mark.timeout(60)
def test_ctrl_c_while_the_caller_waits_on_the_channel_loses_no_result():
    import signal
    import time
    with IsolatedExecutor(max_workers=1) as ex:
        ex.submit(_funcs.add, 1, 1).result(30)
        for delay in (0.02, 0.1):
            fut = ex.submit(_funcs.sleep_then, 0.3, "after ctrl-c")
            main = threading.get_ident()
            timer = threading.Timer(delay, signal.pthread_kill, (main, signal.SIGINT))
            timer.start()
            try:
                with pytest.raises(KeyboardInterrupt):
                    fut.result(30)
                    time.sleep(30)      # the signal came after the result: wait for it
            finally:
                timer.join()
            assert fut.result(30) == "after ctrl-c"
            assert ex.submit(_funcs.add, 2, 3).result(30) == 5


@pytest.mark.timeout(60)
def test_shutdown_wait_from_a_callback_run_by_a_reading_caller_raises_instead_of_hanging():
    ex = IsolatedExecutor(max_workers=1)
    ex.submit(_funcs.add, 1, 1).result(30)
    fut = ex.submit(_funcs.sleep_then, 0.2, "v")
    seen = []

    def callback(f):
        try:
            ex.shutdown(wait=True)
        except RuntimeError as exc:
            seen.append(exc)

    fut.add_done_callback(callback)
    assert fut.result(30) == "v"
    ex.shutdown(wait=True)              # after the callback's: the reader thread ran it
    assert len(seen) == 1 and "done-callback" in str(seen[0])


@pytest.mark.timeout(60)
def test_a_reading_callers_done_callbacks_run_on_the_reader_thread_not_inside_its_result():
    """As with ProcessPoolExecutor: a callback may take a lock the caller holds while it
    waits, or take long, and result() still returns as soon as the outcome is in."""
    import time
    with IsolatedExecutor(max_workers=1) as ex:
        ex.submit(_funcs.add, 1, 1).result(30)
        lock = threading.Lock()
        ran = []

        def needs_the_lock(f):
            with lock:
                ran.append((threading.current_thread().name, f.result()))

        for i in range(5):
            fut = ex.submit(_funcs.sleep_then, 0.05, i)
            fut.add_done_callback(needs_the_lock)
            with lock:
                assert fut.result(30) == i      # hung here when the caller ran the callback
            slow = ex.submit(_funcs.add, i, 1)
            returned = threading.Event()
            slow.add_done_callback(lambda f, returned=returned: returned.wait(10))
            t0 = time.monotonic()
            assert slow.result(30) == i + 1
            returned.set()
            assert time.monotonic() - t0 < 8       # not after the callback gave up waiting
        # The same worker goes on reading results (no caller is stuck holding its channel).
        assert ex.submit(_funcs.add, 2, 3).result(30) == 5
    assert [r[1] for r in ran] == list(range(5))
    assert all(name.startswith("comfy_env-reader-") for name, _ in ran), ran


@ALL_PYTHONS
@pytest.mark.timeout(120)
def test_a_script_whose_main_thread_reads_its_results_times_out_and_is_interrupted(pyver, tmp_path):
    code = textwrap.dedent("""
        import concurrent.futures as cf, signal, threading, time
        from comfy_env import IsolatedExecutor

        def f(x):
            return x

        def slow(x):
            time.sleep(0.3)
            return x

        with IsolatedExecutor(max_workers=1) as ex:
            assert [ex.submit(f, i).result() for i in range(200)] == list(range(200))
            s = ex.submit(slow, 7)
            try:
                s.result(0.05)
                raise SystemExit("result(0.05) did not time out")
            except cf.TimeoutError:
                pass
            s2 = ex.submit(slow, 8)
            threading.Timer(0.05, signal.pthread_kill,
                            (threading.get_ident(), signal.SIGINT)).start()
            try:
                s2.result()
                time.sleep(10)
            except KeyboardInterrupt:
                pass
            assert (s.result(5), s2.result(5)) == (7, 8)
            assert ex.submit(f, 9).result(5) == 9
        print("ok")
    """)
    proc = run_script(pyver, code, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    assert proc.stderr == ""


# -- Ctrl-C (a signal handler raising on the main thread) at every step of a call ---------
# The main thread sends calls and, waiting in result(), reads their results: Python runs
# signal handlers there, between any two lines.  Each test below makes one step raise
# KeyboardInterrupt, as a Ctrl-C landing there would, and checks that nothing is lost:
# the interruption reaches the caller, every future still finishes, the executor goes on.
def _raise_once_on_main(monkeypatch, owner, name, after=None):
    """Make ``owner.name`` raise KeyboardInterrupt once, on the main thread (after
    calling through when ``after`` is true).  Returns the list of hits."""
    real = getattr(owner, name)
    hits = []

    def wrapper(*args, **kwargs):
        if hits or threading.current_thread() is not threading.main_thread():
            return real(*args, **kwargs)
        hits.append(1)
        if after:
            real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(owner, name, wrapper)
    return hits


def test_under_a_programs_own_sigint_handler_control_messages_go_to_the_reader_thread(monkeypatch):
    # With its own SIGINT handler a program's Ctrl-C can't be held back (see
    # ipc/interrupts.py): the main thread must then never apply a control message.
    import signal

    def own(signum, frame):
        raise KeyboardInterrupt

    np = pytest.importorskip("numpy")
    monkeypatch.setattr(signal, "_own_restore", signal.signal(signal.SIGINT, own), raising=False)
    from comfy_env.executor import worker_handle
    from comfy_env.ipc.lifetime import LEDGER
    real = worker_handle.apply_control
    threads = []

    def recording(link, msgs):
        threads.append(threading.current_thread().name)
        return real(link, msgs)

    monkeypatch.setattr(worker_handle, "apply_control", recording)
    before = len(LEDGER.records())
    try:
        with IsolatedExecutor(max_workers=1) as ex:
            ex.submit(_funcs.add, 1, 1).result(30)
            for i in range(10):
                arr = np.full(1 << 20, float(i))               # 8 MiB: lent in shared memory
                assert ex.submit(cf.total, arr, 0.01).result(30) == float(i) * (1 << 20)
                del arr
    finally:
        signal.signal(signal.SIGINT, signal._own_restore)
    assert threads, "no control message came back: the test does not test anything"
    assert "MainThread" not in threads, threads
    assert len(LEDGER.records()) <= before


@pytest.mark.timeout(60)
def test_a_ctrl_c_while_the_main_thread_reads_its_result_is_raised_once_the_read_is_done(monkeypatch):
    import os
    import signal
    import time
    from comfy_env.ipc import codec
    real = codec.decode_part
    sent = []

    def decode_with_ctrl_c(*args, **kwargs):
        if not sent and threading.current_thread() is threading.main_thread():
            sent.append(1)
            os.kill(os.getpid(), signal.SIGINT)     # lands in the middle of the read
            time.sleep(0.05)
        return real(*args, **kwargs)

    with IsolatedExecutor(max_workers=1) as ex:
        ex.submit(_funcs.add, 1, 1).result(30)
        pid = ex.worker_pids()[0]
        monkeypatch.setattr(codec, "decode_part", decode_with_ctrl_c)
        for _ in range(10):
            fut = ex.submit(_funcs.sleep_then, 0.1, "v")
            try:
                fut.result(30)
            except KeyboardInterrupt:
                break
        monkeypatch.undo()
        assert sent, "the main thread never read a result"
        # Held back until the read was complete: the result is there, the worker lives on.
        assert fut.result(5) == "v"
        assert ex.worker_pids() == [pid]
        assert ex.submit(_funcs.add, 2, 3).result(30) == 5


@pytest.mark.timeout(60)
def test_ctrl_c_while_the_main_thread_decodes_its_result_finishes_the_future(monkeypatch):
    from comfy_env.ipc import codec, interrupts
    with IsolatedExecutor(max_workers=1) as ex:
        ex.submit(_funcs.add, 1, 1).result(30)
        for _ in range(10):         # until the main thread read a result itself
            hits = _raise_once_on_main(monkeypatch, codec, "decode_part")
            # A Ctrl-C lands in a read only where the program put its own SIGINT handler
            # (ours holds it back there; a KeyboardInterrupt raised there with ours in
            # place, or with SIGINT ignored, is the payload's: test_executor.py).
            monkeypatch.setattr(interrupts, "may_raise", lambda: True)
            fut = ex.submit(_funcs.sleep_then, 0.1, "v")
            try:
                assert fut.result(30) == "v"
            except KeyboardInterrupt:
                pass
            monkeypatch.undo()
            if hits:
                break
        assert hits, "the main thread never decoded a result"
        assert fut.done()
        err = fut.exception(5)
        assert isinstance(err, WorkerCrashed) and "interrupted" in str(err), err
        assert ex.submit(_funcs.add, 2, 3).result(30) == 5


@pytest.mark.timeout(60)
def test_ctrl_c_while_the_main_thread_hands_its_worker_back_keeps_the_result(monkeypatch):
    from comfy_env.executor import executor
    with IsolatedExecutor(max_workers=1) as ex:
        ex.submit(_funcs.add, 1, 1).result(30)
        for _ in range(10):
            hits = _raise_once_on_main(monkeypatch, executor._Pool, "on_idle")
            fut = ex.submit(_funcs.sleep_then, 0.1, "v")
            try:
                fut.result(30)
            except KeyboardInterrupt:
                pass
            monkeypatch.undo()
            if hits:
                break
        assert hits, "the main thread never read a result"
        assert fut.result(5) == "v"          # decoded before the interruption: kept
        assert [ex.submit(_funcs.add, i, 1).result(30) for i in range(3)] == [1, 2, 3]


@pytest.mark.timeout(60)
def test_ctrl_c_while_submit_encodes_a_call_requeues_it_and_it_still_runs(monkeypatch, tmp_path):
    import time
    from comfy_env.executor import executor
    marker = tmp_path / "ran"
    with IsolatedExecutor(max_workers=1) as ex:
        ex.submit(_funcs.add, 1, 1).result(30)
        hits = _raise_once_on_main(monkeypatch, executor._Pool, "_encode")
        # A Ctrl-C reaches the encoding only where the program put its own SIGINT
        # handler (ours holds it back there; a KeyboardInterrupt raised there with ours
        # in place is the arguments' own, and fails the call: test_executor.py).
        monkeypatch.setattr(executor.interrupts, "may_raise", lambda: True)
        with pytest.raises(KeyboardInterrupt):
            ex.submit(cf.touch, str(marker))
        monkeypatch.undo()
        assert hits
        # submit() raised, but the call was queued before it was encoded: it still runs
        # (as a call submitted just before the Ctrl-C would), on a thread of ours.
        deadline = time.monotonic() + 20
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert marker.exists()
        assert ex.submit(_funcs.add, 4, 5).result(30) == 9


@pytest.mark.timeout(60)
def test_ctrl_c_while_a_call_is_sent_fails_it_with_WorkerCrashed_and_the_executor_goes_on(monkeypatch):
    from comfy_env.ipc import transport
    with IsolatedExecutor(max_workers=1) as ex:
        ex.submit(_funcs.add, 1, 1).result(30)
        pid = ex.worker_pids()[0]
        _raise_once_on_main(monkeypatch, transport.Channel, "send", after=True)
        with pytest.raises(KeyboardInterrupt):
            ex.submit(_funcs.sleep_then, 0.2, "v")
        monkeypatch.undo()
        assert ex.submit(_funcs.add, 2, 3).result(30) == 5
        assert pid not in ex.worker_pids()


SIGINT_STORM = """
import random, signal, sys, threading, time
from concurrent.futures import wait
import numpy as np
sys.path.insert(0, {tests!r})
import _funcs, _caller_read_funcs as cf
from comfy_env import IsolatedExecutor, WorkerCrashed
from comfy_env.ipc.lifetime import LEDGER

main = threading.get_ident()
go, stop = threading.Event(), threading.Event()

def pester():
    # The storm starts only once the main thread is inside the loop's try: a Ctrl-C
    # landing in t.start() (waiting for the thread to run) is the script's, not ours.
    go.wait()
    rnd = random.Random({seed})
    while not stop.is_set():
        time.sleep(rnd.uniform(0.0003, 0.002))
        signal.pthread_kill(main, signal.SIGINT)

before = len(LEDGER.records())
futs, interrupted, answered, succeeded = [], 0, 0, 0
ex = IsolatedExecutor(max_workers=1, worker_output="discard")
ex.submit(_funcs.add, 1, 1).result(30)
arr = np.ones(1 << 18)                                  # 2 MiB: lent in shared memory
t = threading.Thread(target=pester, daemon=True)
t.start()
end = time.monotonic() + 3.0
i = 0
while True:
    # The inner loop's jump back is where Python runs a signal that came during the
    # except clause: outside that try, so a second try around the loop counts it too.
    try:
        while True:
            try:
                go.set()
                if time.monotonic() > end:
                    # Stopped from inside the try: a signal sent before the storm's
                    # thread ended, or one put off and delivered again by comfy-env up
                    # to 64 ms later, is raised here and counted, not after the loop.
                    stop.set()
                    t.join()
                    signal.signal(signal.SIGINT, lambda *a: None)
                    break
                i += 1
                kind = i % 3
                if kind == 0:
                    f = ex.submit(_funcs.add, i, 1); want = i + 1
                elif kind == 1:
                    f = ex.submit(cf.chatter, i); want = i
                else:
                    f = ex.submit(cf.total, arr); want = float(1 << 18)
                futs.append((f, want))
                if f.result(30) == want:
                    answered += 1
            except KeyboardInterrupt:
                interrupted += 1
    except KeyboardInterrupt:
        interrupted += 1
        continue
    break
done, not_done = wait([f for f, _ in futs], timeout=60)
assert not not_done, f"{{len(not_done)}} calls never finished"
for f, want in futs:
    err = f.exception(0)
    if err is None:
        assert f.result(0) == want, (f.result(0), want)
        succeeded += 1
    else:
        assert isinstance(err, WorkerCrashed) and "interrupted" in str(err), repr(err)
assert ex.submit(_funcs.add, 2, 3).result(30) == 5
del futs, f, arr
ex.shutdown(wait=True)
deadline = time.monotonic() + 10
while len(LEDGER.records()) > before and time.monotonic() < deadline:
    time.sleep(0.05)
assert len(LEDGER.records()) <= before, LEDGER.records()
print("ok", interrupted, answered, succeeded)
"""


@ALL_PYTHONS
@pytest.mark.timeout(180)
def test_a_storm_of_ctrl_c_on_the_main_thread_loses_no_call_and_leaks_nothing(pyver, tmp_path):
    proc = run_script(pyver, SIGINT_STORM.format(tests=TESTS, seed=7), cwd=tmp_path, timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ok, interrupted, answered, succeeded = proc.stdout.split()
    # The storm did land, and calls still went through under it.  Counted by the calls
    # that ended with their result, not by the reads the storm left alone: on a loaded
    # box a call can take longer than the storm's gaps, and then every read is cut.
    assert int(interrupted) > 100 and int(succeeded) > 50, proc.stdout


@pytest.mark.timeout(60)
def test_a_ctrl_c_sent_from_a_done_callback_lands_on_the_main_thread_and_kills_nothing():
    import os
    import signal
    import time
    ran = []

    def callback(f):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)                 # held back until this returns
        ran.append(threading.current_thread() is threading.main_thread())

    with IsolatedExecutor(max_workers=1) as ex:
        ex.submit(_funcs.add, 1, 1).result(30)
        pid = ex.worker_pids()[0]
        fut = ex.submit(_funcs.sleep_then, 0.1, "v")
        fut.add_done_callback(callback)
        with pytest.raises(KeyboardInterrupt):
            fut.result(30)
            time.sleep(5)               # the reader thread runs it: the Ctrl-C lands here
        deadline = time.monotonic() + 5
        while not ran and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ran == [False]           # not the main thread, which read the result
        assert fut.result(5) == "v"
        assert ex.worker_pids() == [pid]
        assert ex.submit(_funcs.add, 2, 3).result(30) == 5


def test_a_caller_that_handed_its_read_over_may_shut_down_as_soon_as_its_result_is_in(monkeypatch):
    # Under a program's own SIGINT handler the main thread hands a control message (and
    # its turn) to the reader thread, which may complete the caller's future before it
    # clears the caller's slot: shutdown(wait=True) right then is not "from a callback".
    import signal
    import time

    def own(signum, frame):
        raise KeyboardInterrupt

    np = pytest.importorskip("numpy")
    from comfy_env.executor import worker_handle
    real = worker_handle.WorkerHandle._dispatch_frame
    handed = []

    from comfy_env.ipc.protocol import Result

    def slow_after_handed_result(self, frame):
        real(self, frame)
        if (type(frame.envelope) is Result and self._rearm
                and threading.current_thread() is self._reader):
            handed.append(1)
            time.sleep(0.3)                 # the caller's result is in, its slot not yet freed

    old = signal.signal(signal.SIGINT, own)
    try:
        monkeypatch.setattr(worker_handle.WorkerHandle, "_dispatch_frame", slow_after_handed_result)
        for _ in range(10):
            ex = IsolatedExecutor(max_workers=1)
            try:
                ex.submit(_funcs.add, 1, 1).result(30)
                for i in range(10):
                    arr = np.full(1 << 20, float(i))       # 8 MiB: its release is a control message
                    assert ex.submit(cf.total, arr, 0.01).result(30) == float(i) * (1 << 20)
                    del arr
                    if handed:
                        break
            finally:
                ex.shutdown(wait=True)      # raised RuntimeError while the slot was still taken
            if handed:
                break
    finally:
        signal.signal(signal.SIGINT, old)
    assert handed, "the main thread never handed a turn over: the test does not test anything"


@pytest.mark.parametrize("who", ["caller", "reader"])
@pytest.mark.timeout(120)
def test_a_result_this_process_has_no_memory_for_is_one_WorkerCrashed_naming_it(who, tmp_path):
    """The parent can't map a big result's frame (ENOMEM): whoever reads it, the
    future's outcome is a WorkerCrashed naming the error, the same for every accessor
    (result() raised the raw OSError when the caller read it), and the worker is stopped."""
    import subprocess
    import sys
    code = textwrap.dedent(f"""
        import os, resource, time
        from comfy_env import IsolatedExecutor, WorkerCrashed

        def big(n):
            return b"z" * n

        with IsolatedExecutor(worker_output="discard") as ex:
            pid = ex.submit(os.getpid).result(60)
            with open("/proc/self/status") as f:
                vm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize"))
            resource.setrlimit(resource.RLIMIT_AS, (vm + (200 << 20), resource.RLIM_INFINITY))
            fut = ex.submit(big, 400 << 20)
            if {who!r} == "reader":
                while not fut.done():
                    time.sleep(0.02)
            try:
                fut.result(60)
            except WorkerCrashed as exc:
                first = exc
            resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY,) * 2)
            assert fut.exception(10) is first, (fut.exception(), first)
            assert "Cannot allocate memory" in str(first), first
            print("ok", ex.submit(os.getpid).result(60) != pid)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=100,
                          cwd=str(tmp_path))
    assert proc.stdout.strip() == "ok True", proc.stdout + proc.stderr


@ALL_PYTHONS
@pytest.mark.timeout(120)
def test_a_ctrl_c_put_off_by_a_held_step_interrupts_the_blocking_wait_after_it(pyver, tmp_path):
    """The put-off Ctrl-C is delivered again as a real signal: a flag for the next
    bytecode (``_thread.interrupt_main``) did not wake a wait the main thread went on
    into, so it came only when that wait ended (here 30 s later)."""
    code = textwrap.dedent("""
        import os, signal, threading, time
        from comfy_env.ipc import interrupts

        assert interrupts.install()

        @interrupts.holds
        def step():
            time.sleep(0.3)               # a step that must not be cut in two

        t0 = time.monotonic()
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
        try:
            step()
            threading.Event().wait(30)    # a blocking wait right after it
            print("not interrupted")
        except KeyboardInterrupt:
            print("interrupted after %.1f s" % (time.monotonic() - t0))
    """)
    proc = run_script(pyver, code, cwd=tmp_path, timeout=60)
    out = proc.stdout.strip()
    assert out.startswith("interrupted after") and float(out.split()[2]) < 5, (out, proc.stderr)


@ALL_PYTHONS
@pytest.mark.timeout(120)
def test_a_script_whose_callback_takes_the_lock_held_around_result_finishes(pyver, tmp_path):
    code = textwrap.dedent("""
        import threading
        from comfy_env import IsolatedExecutor

        lock = threading.Lock()
        seen = []

        def on_done(f):
            with lock:
                seen.append(f.result())

        with IsolatedExecutor() as ex:
            for i in range(20):
                fut = ex.submit(pow, i, 2)
                fut.add_done_callback(on_done)
                with lock:
                    assert fut.result(30) == i * i
        print(sorted(seen) == [i * i for i in range(20)])
    """)
    proc = run_script(pyver, code, cwd=tmp_path, timeout=90)
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stdout + proc.stderr


def test_a_held_ctrl_c_is_not_redelivered_once_the_program_replaced_the_handler():
    """A Ctrl-C put off by a held step is sent again shortly; if the program has put its
    own SIGINT handler in place meanwhile (or the interpreter is exiting, when the
    default action is back and the signal would kill the process mid-exit), it is
    dropped: that Ctrl-C was for our handler."""
    import signal
    import time
    from comfy_env.ipc import interrupts
    got = []
    old = signal.signal(signal.SIGINT, lambda *a: got.append(1))
    try:
        interrupts._redeliver(signal.SIGINT)
        time.sleep(0.05)                     # a delivered signal runs its handler by now
        assert got == []
    finally:
        signal.signal(signal.SIGINT, old)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("timeout", [30 * 86400.0, 1e8])
def test_a_timeout_longer_than_epoll_takes_still_waits_for_the_result(timeout):
    """result()/exception() accept any timeout ProcessPoolExecutor's futures accept: a
    caller reading its own result must not hand epoll more milliseconds than a C int
    holds (24.8 days; it raised OverflowError)."""
    with IsolatedExecutor(max_workers=1) as ex:
        ex.submit(_funcs.add, 1, 1).result(30)
        assert ex.submit(_funcs.sleep_then, 0.2, "late").exception(timeout) is None
        assert ex.submit(_funcs.sleep_then, 0.2, "late").result(timeout) == "late"
        assert list(ex.map(_funcs.add, [1, 2], [3, 4], timeout=timeout)) == [4, 6]
