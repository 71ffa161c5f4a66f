"""What a worker says reaches the user: its output (worker_output), its crash dump
(faulthandler) and, on call_timeout, its stack."""
from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
import time

import pytest

import _funcs
import _proc_funcs
from _log_records import collect_records
from comfy_env import CallTimeout, IsolatedExecutor, WorkerCrashed
from comfy_env.executor import worker_handle
from pythons import ALL_PYTHONS, script_env, user_python


def _wait_for(pred, timeout=15.0, what="condition"):
    end = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(0.02)


class _Sink:
    """Stands in for sys.stdout / sys.stderr: collects writes from any thread.

    (capsys can't be polled while a worker writes: readouterr() reads, then
    truncates, and a write from the output thread in between is lost.)
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._parts = []

    def write(self, text):
        with self._lock:
            self._parts.append(text)
        return len(text)

    def flush(self):
        pass

    @property
    def text(self):
        with self._lock:
            return "".join(self._parts)


class _Captured:
    def __init__(self, monkeypatch):
        self._out, self._err = _Sink(), _Sink()
        monkeypatch.setattr(sys, "stdout", self._out)
        monkeypatch.setattr(sys, "stderr", self._err)

    def read(self):
        self.out, self.err = self._out.text, self._err.text
        return self


@pytest.fixture
def capture(monkeypatch):
    """``cap = capture()`` in the test body (pytest's own capture resets sys.stdout
    between a fixture's setup and the test's call)."""
    return lambda: _Captured(monkeypatch)


# -- worker_output="stream" (the default) ----------------------------------------------

@pytest.mark.timeout(30)
def test_print_reaches_the_parents_stdout_prefixed_with_the_worker_name_before_the_result(
        capture, tmp_path):
    cap = capture()
    gate = tmp_path / "gate"
    with IsolatedExecutor(name="talker") as ex:
        fut = ex.submit(_proc_funcs.print_then_wait, str(gate))
        # The call cannot finish before the gate opens: the line must arrive while it runs.
        _wait_for(lambda: "[talker#1] before the gate\n" in cap.read().out and
                  "[talker#1] err before the gate\n" in cap.err, what="the worker's line")
        assert not fut.done()
        gate.touch()
        assert fut.result(15) == "done"
    assert "before the gate" not in cap.read().err.replace("err before the gate", "")


@pytest.mark.timeout(30)
def test_carriage_returns_end_lines_so_progress_bars_are_forwarded_as_they_are_drawn(capture):
    cap = capture()
    with IsolatedExecutor(name="bar") as ex:
        assert ex.submit(_proc_funcs.print_progress, 3).result(15) == 3
        _wait_for(lambda: "after the bar" in cap.read().out)
    assert cap.out == ("[bar#1] progress 0/3\r[bar#1] progress 1/3\r[bar#1] progress 2/3\r"
                       "[bar#1] progress 3/3\n[bar#1] after the bar\n")


@pytest.mark.timeout(60)
def test_output_without_newlines_is_forwarded_in_bounded_chunks_nothing_lost(capture):
    cap = capture()
    n = 3 * worker_handle.MAX_LINE + 12345
    payload = bytes(range(33, 127)) * (n // 94 + 1)
    payload = payload[:n]
    with IsolatedExecutor(name="long") as ex:
        assert ex.submit(_proc_funcs.write_raw, "stdout", payload + b"\ntail\n").result(30)
        _wait_for(lambda: "[long#1] tail\n" in cap.read().out)
    lines = cap.out.split("\n")
    assert lines[-2:] == ["[long#1] tail", ""]
    pieces = [ln[len("[long#1] "):] for ln in lines[:-2]]
    assert all(ln.startswith("[long#1] ") for ln in lines[:-2])
    assert max(len(p) for p in pieces) <= worker_handle.MAX_LINE
    assert "".join(pieces) == payload.decode()


@pytest.mark.timeout(30)
def test_utf8_split_across_reads_and_chunks_stays_whole(capture):
    cap = capture()
    text = ("é€😀" * (worker_handle.MAX_LINE // 2)) + "\n"
    with IsolatedExecutor(name="utf") as ex:
        ex.submit(_proc_funcs.write_raw, "stdout", text.encode()).result(15)
        ex.submit(_proc_funcs.write_raw, "stdout", b"end\n").result(15)
        _wait_for(lambda: "[utf#1] end\n" in cap.read().out)
    pieces = [ln[len("[utf#1] "):] for ln in cap.out.split("\n")[:-2]]
    assert "\ufffd" not in cap.out and "".join(pieces) + "\n" == text


@pytest.mark.timeout(30)
def test_worker_output_discard_prints_nothing_but_a_crash_still_shows_its_stderr(capture):
    cap = capture()
    with IsolatedExecutor(name="quiet", worker_output="discard") as ex:
        assert ex.submit(_funcs.print_lines, 3).result(15) == 3
        exc = ex.submit(_funcs.stderr_then_exit, 9, ["famous last words"]).exception(15)
    assert isinstance(exc, WorkerCrashed) and "famous last words" in str(exc)
    cap.read()
    assert "line" not in cap.out and "line" not in cap.err and "famous" not in cap.err


@pytest.mark.timeout(30)
def test_worker_output_logging_sends_lines_to_the_executors_logger_not_stdout(capture):
    cap = capture()
    with collect_records("comfy_env.worker.tolog") as records:
        with IsolatedExecutor(name="tolog", worker_output="logging") as ex:
            assert ex.submit(_proc_funcs.print_progress, 2).result(15) == 2
    msgs = [r.getMessage() for r in records if getattr(r, "stream", None) == "stdout"]
    assert msgs == ["[tolog] progress 0/2", "[tolog] progress 1/2", "[tolog] progress 2/2",
                    "[tolog] after the bar"]
    assert "progress" not in cap.read().out


@pytest.mark.timeout(30)
def test_worker_logging_records_keep_their_level_and_warnings_show_unconfigured(tmp_path):
    # A fresh interpreter with no logging configuration: WARNING+ records of the
    # worker reach stderr through logging's last-resort handler, INFO does not.
    script = tmp_path / "s.py"
    script.write_text(
        "import logging, sys\n"
        "sys.path.insert(0, %r)\n"
        "import _funcs\n"
        "from comfy_env import IsolatedExecutor\n"
        "with IsolatedExecutor(name='lg') as ex:\n"
        "    ex.submit(_funcs.log_message, logging.WARNING, 'a warning').result(15)\n"
        "    ex.submit(_funcs.log_message, logging.INFO, 'some info').result(15)\n"
        % os.path.dirname(_funcs.__file__))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=25, env=script_env())
    assert proc.returncode == 0, proc.stderr
    assert "a warning" in proc.stderr and "some info" not in proc.stderr + proc.stdout


def test_worker_output_is_validated():
    for bad in ("loud", None, 1):
        with pytest.raises(ValueError, match="worker_output"):
            IsolatedExecutor(worker_output=bad)


# -- crash dumps -------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_a_segfault_reports_the_python_stack_of_every_frame_in_worker_crashed(capture):
    cap = capture()
    depth = 60          # twice as many lines as the tail kept before a dump was recognised
    with IsolatedExecutor(name="crashy") as ex:
        exc = ex.submit(_proc_funcs.segfault_deep, depth).exception(15)
        assert ex.submit(_funcs.add, 1, 1).result(15) == 2
    assert isinstance(exc, WorkerCrashed) and "SIGSEGV" in str(exc)
    assert "Fatal Python error: Segmentation fault" in exc.stderr_tail
    assert "in segfault_deep" in exc.stderr_tail         # the bottom of the dump: nothing cut
    assert exc.stderr_tail.count("in _recurse") >= depth
    assert "in segfault_deep" in str(exc)


class _Hiccup(_Sink):
    """A host's stream interceptor that fails its first write (and only that one)."""

    def __init__(self):
        super().__init__()
        self.failed = False

    def write(self, text):
        if not self.failed:
            self.failed = True
            raise RuntimeError("the interceptor had a bad moment")
        return super().write(text)


@pytest.mark.timeout(30)
def test_a_parent_stream_that_raises_once_drops_that_text_and_output_goes_on(monkeypatch):
    """The output thread drops what a raising stream refused and keeps draining the
    worker's pipe: it died before, and every later print of the worker failed with a
    broken pipe, and a crash's stderr was lost."""
    out, err = _Hiccup(), _Sink()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    with IsolatedExecutor(name="hiccup") as ex:
        assert ex.submit(_funcs.print_lines, 2, "call0").result(15) == 2
        # The refused write first: the output thread may read several calls' lines in
        # one chunk, and a busy host would then drop call1's with call0's.
        _wait_for(lambda: out.failed, what="the refused write")
        for i in range(1, 4):
            assert ex.submit(_funcs.print_lines, 2, f"call{i}").result(15) == 2
        _wait_for(lambda: "call3" in out.text, what="the last call's lines")
        exc = ex.submit(_proc_funcs.segfault_deep, 3).exception(15)
    assert out.failed and "call1" in out.text
    assert isinstance(exc, WorkerCrashed) and "in segfault_deep" in exc.stderr_tail


# -- call_timeout: the worker's stack ------------------------------------------------------

@pytest.mark.timeout(30)
@pytest.mark.parametrize("fn", [_proc_funcs.stuck_in_c_holding_the_gil, _proc_funcs.spin_in_python])
def test_call_timeout_reports_where_the_worker_was_stuck(fn, capture):
    cap = capture()
    with IsolatedExecutor(name="stuck", call_timeout=1.5) as ex:
        exc = ex.submit(fn, 30).exception(20)
        assert ex.submit(_funcs.add, 1, 1).result(15) == 2      # carries on
    assert isinstance(exc, CallTimeout) and isinstance(exc, TimeoutError)
    assert f"in {fn.__name__}" in exc.worker_stack
    assert "most recent call first" in exc.worker_stack
    assert "Stack of the worker" in str(exc) and f"in {fn.__name__}" in str(exc)
    assert "call_timeout=1.5" in str(exc)


@pytest.mark.timeout(30)
def test_a_worker_that_cannot_dump_its_stack_is_still_killed_at_the_timeout(capture):
    cap = capture()
    with IsolatedExecutor(name="stopped", call_timeout=1) as ex:
        exc = ex.submit(_proc_funcs.stop_self).exception(20)
        assert ex.submit(_funcs.add, 1, 1).result(15) == 2
    assert isinstance(exc, CallTimeout) and exc.worker_stack == ""
    assert "did not dump its stack" in str(exc)


# -- real user scripts, every supported Python -------------------------------------------

_PROMPT_SCRIPT = """
import os, sys, time
from comfy_env import IsolatedExecutor

def chatty(gate):
    print("hello from the worker")
    while not os.path.exists(gate):
        time.sleep(0.01)
    return 42

if __name__ == "__main__":
    with IsolatedExecutor(name="demo") as ex:
        print("result", ex.submit(chatty, sys.argv[1]).result(30), flush=True)
"""


@ALL_PYTHONS
@pytest.mark.timeout(120)
def test_a_user_script_sees_worker_prints_on_its_stdout_while_the_call_runs(pyver, tmp_path):
    python = user_python(pyver)
    (tmp_path / "user_script.py").write_text(_PROMPT_SCRIPT)
    gate = tmp_path / "gate"
    proc = subprocess.Popen([python, "user_script.py", str(gate)], cwd=tmp_path,
                            env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    try:
        seen = b""
        end = time.monotonic() + 60
        while b"\n" not in seen and time.monotonic() < end:
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                seen += chunk
        # The call waits for the gate, so this line came while it ran.
        assert seen == b"[demo#1] hello from the worker\n", (seen, proc.poll())
        gate.touch()
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert out == b"result 42\n" and err == b""


_DIAG_SCRIPT = """
import ctypes
from comfy_env import IsolatedExecutor, CallTimeout, WorkerCrashed

def crash_here():
    ctypes.string_at(0)

def hang_here():
    ctypes.PyDLL(None).sleep(30)

if __name__ == "__main__":
    with IsolatedExecutor(name="diag") as ex:
        exc = ex.submit(crash_here).exception(30)
        assert isinstance(exc, WorkerCrashed), exc
        print("CRASH:", exc)
    with IsolatedExecutor(name="diag2", call_timeout=1) as ex:
        exc = ex.submit(hang_here).exception(30)
        assert isinstance(exc, CallTimeout), exc
        print("TIMEOUT:", exc)
        print("STACK:", exc.worker_stack)
"""


@ALL_PYTHONS
@pytest.mark.timeout(120)
def test_a_user_script_learns_where_a_worker_crashed_or_hung(pyver, tmp_path):
    from pythons import run_script
    proc = run_script(pyver, _DIAG_SCRIPT, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    crash = proc.stdout.split("TIMEOUT:")[0]
    assert "SIGSEGV" in crash and "Fatal Python error: Segmentation fault" in crash
    assert "in crash_here" in crash
    # The dump also went to the script's stderr as it happened, prefixed.
    assert "[diag#1] Fatal Python error: Segmentation fault" in proc.stderr
    timeout = proc.stdout.split("TIMEOUT:")[1]
    assert "Stack of the worker" in timeout and "in hang_here" in timeout
    assert "in hang_here" in timeout.split("STACK:")[1]


# -- the line splitter on its own ----------------------------------------------------------

def _feed_all(reads, max_line=8):
    sp = worker_handle._LineSplitter(max_line)
    out = []
    for data in reads:
        out += sp.feed(data)
    return out + sp.feed(b"", final=True)


def test_line_ends_are_found_across_reads():
    assert _feed_all([b"abc\r", b"\ndef\n"]) == [("abc", "\n"), ("def", "\n")]
    assert _feed_all([b"a\r", b"b\n"]) == [("a", "\r"), ("b", "\n")]
    assert _feed_all([b"a\r"]) == [("a", "\r")]
    assert _feed_all([b"\r\r1\r2", b"\r", b"", b"3\n"]) == [("1", "\r"), ("2", "\r"), ("3", "\n")]
    assert _feed_all([b"no end"]) == [("no end", "")]
    assert _feed_all([b"\n\n"]) == [("", "\n"), ("", "\n")]
    assert _feed_all([b"\xc3", b"\xa9\n"]) == [("\u00e9", "\n")]


def test_long_lines_are_cut_at_max_line_and_a_line_of_exactly_max_line_stays_whole():
    assert _feed_all([b"12345678\n"]) == [("12345678", "\n")]
    assert _feed_all([b"123456789\n"]) == [("12345678", ""), ("9", "\n")]
    assert _feed_all([b"1234", b"5678", b"9abc", b"\r"]) == [("12345678", ""), ("9abc", "\r")]


def test_output_without_line_ends_keeps_at_most_max_line_pending():
    sp = worker_handle._LineSplitter(1000)
    got = 0
    for _ in range(2000):
        got += sum(len(t) for t, _ in sp.feed(b"x" * 777))
        assert sp._size <= 1000
    got += sum(len(t) for t, _ in sp.feed(b"", final=True))
    assert got == 2000 * 777


@pytest.mark.timeout(60)
def test_a_process_holding_the_workers_pipes_does_not_delay_its_death_report(capfd):
    """A process the call started keeps the worker's stdout/stderr open, so EOF comes
    only when it exits: the report waits for what the worker itself wrote, not for
    EOF (it waited 2 s), and that process's later lines are still forwarded."""
    with IsolatedExecutor(name="held") as ex:
        ex.submit(_funcs.add, 1, 1).result(30)
        t0 = time.monotonic()
        with pytest.raises(WorkerCrashed) as info:
            ex.submit(_proc_funcs.start_chatty_grandchild_then_exit, 1.5).result(30)
        assert time.monotonic() - t0 < 1.2
        assert "worker's last words" in str(info.value)
        deadline = time.monotonic() + 10
        out = ""
        while "grandchild late line" not in out and time.monotonic() < deadline:
            time.sleep(0.1)
            out += capfd.readouterr().out
        assert "worker last line" in out and "[held#1] grandchild late line" in out, out
