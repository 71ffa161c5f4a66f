"""Functions that executor workers import *by reference* (the tests' sys.path reaches them).

Everything here runs inside a worker process unless said otherwise.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

__test__ = False

_state = {}


def add(a, b):
    return a + b


def echo(*args, **kwargs):
    return args, kwargs


def getpid():
    return os.getpid()


def pid_and_value(x):
    return os.getpid(), x


def sleep_then(seconds, value=None):
    time.sleep(seconds)
    return value


def wait_for_file(path, value=None, timeout=30.0):
    """Block until ``path`` exists (a gate the test opens), then return ``value``."""
    end = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise TimeoutError(f"gate {path} never opened")
        time.sleep(0.01)
    return value


def touch_then_wait(started, path, value=None):
    """Create ``started`` (the call is running in the worker now), then wait for ``path``."""
    with open(started, "w"):
        pass
    return wait_for_file(path, value)


def rendezvous(directory, me, others, timeout=20.0):
    """Mark ``me`` as running, wait until every one of ``others`` is running too."""
    open(os.path.join(directory, me), "w").close()
    end = time.monotonic() + timeout
    while not all(os.path.exists(os.path.join(directory, o)) for o in others):
        if time.monotonic() > end:
            raise TimeoutError(f"{me}: {others} never ran at the same time")
        time.sleep(0.01)
    return os.getpid()


class Namespace:
    class Inner:
        @staticmethod
        def triple(x):
            return 3 * x


# -- exceptions --------------------------------------------------------------------

class TwoArgError(Exception):
    def __init__(self, code, detail):
        super().__init__(code, detail)
        self.code = code
        self.detail = detail


class UnpicklableError(Exception):
    """Pickles its __dict__, which holds a lock: cannot travel."""

    def __init__(self, msg):
        super().__init__(msg)
        self.lock = threading.Lock()


class UnunpicklableError(Exception):
    """Pickles fine but cannot be rebuilt: ``args`` do not match ``__init__``."""

    def __init__(self, a, b):
        super().__init__(f"{a} and {b}")


class CodedError(Exception):
    """``__init__`` takes a code and a keyword-only message; ``args`` is the message."""

    def __init__(self, code, *, msg):
        super().__init__(msg)
        self.code = code
        self.notes_seen = []


def raise_coded_error(code, msg):
    exc = CodedError(code, msg=msg)
    exc.add_note("added in the worker") if hasattr(exc, "add_note") else setattr(
        exc, "__notes__", ["added in the worker"])
    exc.notes_seen.append("added in the worker")
    raise exc


def raise_value_error(msg):
    raise ValueError(msg)


def raise_two_arg_error(code, detail):
    raise TwoArgError(code, detail)


def raise_unpicklable_error(msg):
    raise UnpicklableError(msg)


def raise_ununpicklable_error(a, b):
    raise UnunpicklableError(a, b)


# -- crashes -----------------------------------------------------------------------

def stderr_then_exit(code, lines=()):
    for line in lines:
        sys.stderr.write(line + "\n")
    sys.stderr.flush()
    os._exit(code)


def kill_self(sig=signal.SIGKILL):
    os.kill(os.getpid(), sig)
    time.sleep(10)


def segfault():
    ctypes.string_at(0)


class DiesWhenPickled:
    def __reduce__(self):
        sys.stderr.write("dying in __reduce__\n")
        sys.stderr.flush()
        os._exit(7)


def return_dies_when_pickled():
    return DiesWhenPickled()


def return_lock():
    return threading.Lock()


class FailsToUnpickle:
    def __reduce__(self):
        return (_refuse, ())


def _refuse():
    raise RuntimeError("this object refuses to be rebuilt")


def return_fails_to_unpickle():
    return FailsToUnpickle()


# -- initializers ------------------------------------------------------------------

def init_set(key, value):
    _state[key] = value


def get_state(key):
    return _state.get(key)


def init_fail(marker_dir):
    # One file per attempt: the test counts how many workers ran the initializer.
    open(os.path.join(marker_dir, f"attempt-{os.getpid()}"), "w").close()
    raise RuntimeError("initializer refused")


# -- output ------------------------------------------------------------------------

def print_lines(n, prefix="line"):
    for i in range(n):
        print(f"{prefix} {i}")
        sys.stderr.write(f"err {prefix} {i}\n")
    sys.stdout.write("no newline at the end")
    return n


def log_message(level, msg, *args):
    logging.getLogger("user.module").log(level, msg, *args)
    return True


def open_fd_count():
    return len(os.listdir("/proc/self/fd"))


def fail_on(x, bad):
    if x == bad:
        raise ValueError(f"item {x} is bad")
    return x * 10


def limit_address_space(extra_mib):
    """Initializer: this worker may map only ``extra_mib`` MiB more than it has now."""
    import resource
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + (extra_mib << 20), resource.RLIM_INFINITY))


class InterruptsWhenUnpickled:
    def __reduce__(self):
        return (_interrupt, ())


def _interrupt():
    raise KeyboardInterrupt("raised by the payload, not by a Ctrl-C")


def return_interrupts_when_unpickled(with_array=False):
    if with_array:      # a result with an out-of-band part: decoded lazily, by whoever asks first
        import numpy as np
        return {"x": InterruptsWhenUnpickled(), "arr": np.zeros(1 << 16)}
    return InterruptsWhenUnpickled()


def raise_from_a_module_only_here(directory, message):
    """Raise an exception whose class lives in a module only this worker can import."""
    sys.path.insert(0, directory)
    import only_in_the_worker
    raise only_in_the_worker.OnlyHereError(message)


def instance_of_a_module_only_here(directory):
    """An object of a class from a module only this worker can import (a node pack's)."""
    sys.path.insert(0, directory)
    import only_in_the_worker
    return only_in_the_worker.Thing()


def exit_leaving_a_thread(code, marker=None):
    """Start a non-daemon thread that never ends, register an atexit handler that
    writes ``marker``, then ``sys.exit(code)``."""
    import atexit
    import threading
    threading.Thread(target=time.sleep, args=(1e6,), name="never-ends").start()
    if marker is not None:
        atexit.register(lambda: open(marker, "w").write("atexit ran"))
    sys.exit(code)


def leave_a_thread():
    """Start a non-daemon thread that never ends; return this worker's pid."""
    import threading
    threading.Thread(target=time.sleep, args=(1e6,), name="never-ends").start()
    return os.getpid()


def record_run(path, value, then_exit=None):
    """Append ``value`` and this process's pid to ``path`` (one line per run); exit with
    ``then_exit`` afterwards if given (a call that kills its worker after it ran)."""
    with open(path, "a") as f:
        f.write(f"{value} {os.getpid()}\n")
    if then_exit is not None:
        os._exit(then_exit)
    return value
