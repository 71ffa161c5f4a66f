"""Interpreter exit with results, calls and workers still alive: real scripts on Python 3.10-3.13.

Nothing of comfy_env may start a thread, block or print once the interpreter is
finalising: a result still referenced when the script ends is freed by the
interpreter's last garbage collection, and starting the ledger's flusher thread
from there hangs Python 3.10/3.11 for good and makes 3.12+ print a RuntimeError.
"""
from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time

import pytest

from pythons import ALL_PYTHONS, run_script, script_env, user_python
from procstate import proc_state

HOLDERS = {
    # The README's first snippet: the result stays in a module global.
    "global": """
        ex = IsolatedExecutor()
        r = ex.submit(ones).result()
        print("got", r.shape)
    """,
    "with-block": """
        with IsolatedExecutor() as ex:
            r = ex.submit(ones).result()
        print("got", r.shape)
    """,
    "list": """
        ex = IsolatedExecutor(max_workers=2)
        rs = [f.result() for f in [ex.submit(ones) for _ in range(6)]]
        print("got", len(rs))
    """,
    # Dropped while the interpreter runs its atexit callbacks, after comfy_env's own
    # at-exit shutdown: the holder dies when no new thread may start.
    "dropped-in-atexit": """
        import atexit
        ex = IsolatedExecutor()
        rs = [ex.submit(ones).result() for _ in range(3)]
        atexit.register(rs.clear)
        print("got", len(rs))
    """,
    # Kept where the interpreter clears it after comfy_env's modules: their globals are
    # None by then when the holder dies (a TypeError was printed, "Exception ignored").
    "kept-on-sys": """
        import sys
        ex = IsolatedExecutor()
        sys._kept = ex.submit(ones).result()
        print("got", sys._kept.shape)
    """,
    "worker-keeps-on-sys": """
        import numpy as np

        def keep(a):
            import sys
            sys._kept = a
            return a.shape

        with IsolatedExecutor() as ex:
            print("got", ex.submit(keep, np.ones(100_000)).result())
    """,
    # A call still running when the script ends: at exit it is waited for
    # (concurrent.futures' contract), then its result is dropped in finalisation.
    "running-call": """
        ex = IsolatedExecutor(call_timeout=60)
        f = ex.submit(ones, 0.5)
        print("got", 1)
    """,
}

PRELUDE = """
from comfy_env import IsolatedExecutor

def ones(delay=0):
    import time
    import numpy as np
    time.sleep(delay)
    return np.ones(1 << 18)
"""


@ALL_PYTHONS
@pytest.mark.parametrize("holder", sorted(HOLDERS))
@pytest.mark.timeout(120)
def test_a_script_holding_results_exits_at_once_and_quietly(pyver, holder, tmp_path):
    code = PRELUDE + textwrap.dedent(HOLDERS[holder])
    proc = run_script(pyver, code, cwd=tmp_path, timeout=45)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("got"), proc.stdout
    assert proc.stderr == ""


@ALL_PYTHONS
@pytest.mark.timeout(120)
def test_calls_queued_when_the_script_ends_still_run_on_the_workers_there_are(pyver, tmp_path):
    code = PRELUDE + textwrap.dedent("""
        ex = IsolatedExecutor(max_workers=2)
        for i in range(6):
            ex.submit(ones, 0.2).add_done_callback(lambda f, i=i: print("done", i, f.result().shape))
    """)
    proc = run_script(pyver, code, cwd=tmp_path, timeout=45)
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.splitlines()) == [f"done {i} (262144,)" for i in range(6)]
    assert proc.stderr == ""


CTRL_C = {
    "no-with": """
        ex = IsolatedExecutor()
        print(ex.submit(os.getpid).result(), flush=True)
        f = ex.submit(time.sleep, 30)
        print("running", flush=True)
        f.result()
    """,
    "with-block": """
        with IsolatedExecutor() as ex:
            print(ex.submit(os.getpid).result(), flush=True)
            f = ex.submit(time.sleep, 30)
            print("running", flush=True)
            f.result()
    """,
    # Ctrl-C while the script already waits in the at-exit shutdown for a running call.
    "during-exit": """
        ex = IsolatedExecutor()
        print(ex.submit(os.getpid).result(), flush=True)
        f = ex.submit(time.sleep, 30)
        print("running", flush=True)
    """,
}


@ALL_PYTHONS
@pytest.mark.parametrize("case", sorted(CTRL_C))
@pytest.mark.timeout(90)
def test_ctrl_c_during_a_long_call_exits_promptly_and_stops_the_workers(pyver, case, tmp_path):
    python = user_python(pyver)
    code = "import os, time\nfrom comfy_env import IsolatedExecutor\n" + textwrap.dedent(CTRL_C[case])
    path = tmp_path / "user_script.py"
    path.write_text(code)
    # Its own process group: SIGINT goes to the script and its workers, as a
    # terminal's Ctrl-C does.
    proc = subprocess.Popen([python, str(path)], cwd=str(tmp_path), env=script_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        worker_pid = int(proc.stdout.readline())
        assert proc.stdout.readline().strip() == "running"
        time.sleep(1.0)             # the call is in the worker (and the script in its wait)
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=15)   # the call would take 30 s
        except subprocess.TimeoutExpired:
            pytest.fail(f"Python {pyver}: the script did not exit within 15 s of Ctrl-C")
        stderr = proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    end = time.monotonic() + 10
    while proc_state(worker_pid) not in (None, "Z") and time.monotonic() < end:
        time.sleep(0.05)
    assert proc_state(worker_pid) in (None, "Z"), f"worker {worker_pid} outlived the script"
    if case != "during-exit":       # there the exit's own wait takes the interrupt, quietly
        assert "KeyboardInterrupt" in stderr
    assert "Exception ignored" not in stderr and "RuntimeError" not in stderr, stderr


@ALL_PYTHONS
@pytest.mark.timeout(120)
def test_a_failed_call_kept_in_a_traceback_cycle_is_collected_without_a_crash(pyver, tmp_path):
    """The frame a failed start or encode left in its traceback (a reference cycle) used
    to hold a view exporting a BytesIO: the collector freed the BytesIO first
    ("deallocated BytesIO object has exported buffers"), and Python 3.12 segfaulted."""
    code = textwrap.dedent("""
        import gc
        from comfy_env import IsolatedExecutor

        def init():
            1 / 0

        ex = IsolatedExecutor(initializer=init)
        try:
            ex.submit(sum, [1, 2]).result(60)
        except Exception as e:
            print("failed:", type(e).__name__, flush=True)
        ex.shutdown()
        del ex
        gc.collect()
        with IsolatedExecutor() as ex:
            print("then:", ex.submit(sum, [1, 2]).result(60), flush=True)
    """)
    proc = run_script(pyver, code, cwd=tmp_path, timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["failed: InitializerFailed", "then: 3"], proc.stdout
    assert "Exception ignored" not in proc.stderr and "SystemError" not in proc.stderr, proc.stderr


@pytest.mark.timeout(120)
def test_a_script_without_a_main_guard_submitting_itself_by_name_fails_clearly(tmp_path):
    """Its workers import the script, which submits again when imported: each would
    start another worker, for ever (processes grew without bound).  The submit made
    while a worker imports the call's module is refused instead, saying why."""
    code = textwrap.dedent("""
        from comfy_env import IsolatedExecutor

        def work(x):
            return x + 1

        ex = IsolatedExecutor(worker_output="discard")
        fut = ex.submit("user_script:work", 1)          # the worker imports this script
        exc = fut.exception(60)
        print(type(exc).__name__, "__main__" in str(exc))
        exc = ex.submit(lambda: list(map(int, "12"))).exception(60)
        print("then", exc)
    """)
    proc = run_script("3.11", code, cwd=tmp_path, timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["RuntimeError True", "then None"], proc.stdout + proc.stderr


@pytest.mark.timeout(120)
def test_an_executor_marked_stop_at_exit_kills_its_running_call_when_the_program_ends(tmp_path):
    code = textwrap.dedent("""
        import time
        from comfy_env import IsolatedExecutor

        ex = IsolatedExecutor()
        ex._pool.stop_at_exit = True          # what the ComfyUI adapter sets on a pack's
        ex.submit(time.sleep, 60)
        time.sleep(1)
        print("ending", flush=True)
    """)
    t0 = time.monotonic()
    proc = run_script("3.11", code, cwd=tmp_path, timeout=50)
    assert proc.returncode == 0 and proc.stdout.strip() == "ending", proc.stdout + proc.stderr
    assert time.monotonic() - t0 < 20


_STRAY_THREADS = textwrap.dedent("""
    import sys, threading, time
    from comfy_env import IsolatedExecutor, WorkerCrashed

    def leave():
        threading.Thread(target=time.sleep, args=(1e6,), name="never-ends").start()
        return 1

    def leave_and_exit():
        leave()
        sys.exit(4)

    if __name__ == "__main__":
        t0 = time.monotonic()
        with IsolatedExecutor(max_workers=1) as ex:
            e = ex.submit(leave_and_exit).exception(30)
            print(type(e).__name__, e.exitcode)
            print(ex.submit(leave).result(30))
        print("done", time.monotonic() - t0 < 20)
""")


@ALL_PYTHONS
@pytest.mark.timeout(120)
def test_threads_a_call_left_running_never_keep_a_worker(pyver, tmp_path):
    """``sys.exit()`` in a call that left a non-daemon thread running ends the worker
    (its call fails with WorkerCrashed and the exit code; it hung for ever), and at the
    executor's end a worker whose call left such a thread ends after a grace period
    instead of keeping ``shutdown`` (and the script) waiting."""
    proc = run_script(pyver, _STRAY_THREADS, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["WorkerCrashed", "4", "1", "done", "True"], proc.stdout + proc.stderr
    assert "ending with 1 thread(s) a call started still running (never-ends)" in proc.stderr
