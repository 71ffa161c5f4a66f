"""Worker-side helpers of the output, crash-report, timeout-stack and frame tests.

Imported by reference in env=None workers (tests/ is on their sys.path).
"""
from __future__ import annotations

import ctypes
import os
import sys
import time

__test__ = False


def wait_for_file(path, timeout=30.0):
    end = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise TimeoutError(f"gate {path} never opened")
        time.sleep(0.01)


def print_then_wait(path, text="before the gate"):
    """Print a line, then wait for the parent to open the gate: only a prompt forward lets it."""
    print(text)
    sys.stderr.write(f"err {text}\n")
    wait_for_file(path)
    return "done"


def write_raw(stream, data):
    """Write ``data`` (bytes) to the worker's stdout or stderr fd, as C code would."""
    fd = 1 if stream == "stdout" else 2
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
    return len(data)


def print_progress(steps):
    """A ``\\r`` progress bar as tqdm draws it, then a newline and a normal line."""
    for i in range(steps + 1):
        sys.stdout.write(f"\rprogress {i}/{steps}")
    sys.stdout.write("\n")
    print("after the bar")
    return steps


def _recurse(depth, fn):
    if depth:
        return _recurse(depth - 1, fn)
    return fn()


def segfault_deep(depth):
    """Segfault ``depth`` frames below here: the dump is longer than any short tail."""
    return _recurse(depth, lambda: ctypes.string_at(0))


def stuck_in_c_holding_the_gil(seconds):
    """libc's sleep() called through PyDLL, which keeps the GIL: no Python code runs meanwhile."""
    return ctypes.PyDLL(None).sleep(int(seconds))


def spin_in_python(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def channel_fd():
    """The fd of the worker's end of the channel (``--fd N`` on its own command line:
    ``sys.argv`` is the parent's)."""
    with open("/proc/self/cmdline", "rb") as f:
        cmd = f.read().split(b"\0")
    return int(cmd[cmd.index(b"--fd") + 1])


def write_garbage_to_channel(data, then_sleep=0.0):
    """What a stray write (a C library printing to a reused fd number) does to the channel."""
    os.write(channel_fd(), data)
    time.sleep(then_sleep)
    return "should not arrive"


class Shrinks:
    """Pickles to ``len(data)``: a big inline part that decodes to a small int."""

    def __init__(self, nbytes):
        self.data = b"x" * nbytes

    def __reduce__(self):
        return (len, (self.data,))


def big_inline_result(nbytes):
    """A result the parent keeps undecoded (it holds an array in shared memory) with a
    ``nbytes`` inline part: forwarding it makes a frame of at least ``nbytes``."""
    import numpy as np
    return (np.ones(32768), Shrinks(nbytes))


def count_forwarded(items):
    assert all(float(a.sum()) == 32768.0 for a, _ in items)
    return len(items), sum(n for _, n in items)


def stop_self():
    """SIGSTOP: a process that runs no handler at all until it is killed."""
    import signal
    os.kill(os.getpid(), signal.SIGSTOP)
    return "continued"


def result_above_max_body(limit, size):
    """Lower this worker's frame limit, then return more than it: the worker side of FrameTooLarge."""
    from comfy_env.ipc import transport
    transport.MAX_BODY = limit
    return b"x" * size


def start_chatty_grandchild_then_exit(seconds, code=3):
    """Start a process that inherits the worker's stdout and stderr and writes a line
    after ``seconds``, then end the worker.  The process's environment lacks the
    worker's tag (as one built from scratch would), so the worker's death leaves it
    running (proctree.kill_tagged would find it otherwise)."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "COMFY_ENV_WORKER_TAGS"}
    subprocess.Popen([sys.executable, "-c",
                      f"import time; time.sleep({seconds}); print('grandchild late line', flush=True)"],
                     env=env)
    print("worker last line", flush=True)
    sys.stderr.write("worker's last words\n")
    sys.stderr.flush()
    os._exit(code)
