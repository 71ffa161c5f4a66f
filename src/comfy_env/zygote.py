"""A zygote: a pre-started process of an environment from which workers fork.

``IsolatedExecutor(..., preload=["torch"])`` starts, at its first worker
start, one process of the worker's environment that imports the ``preload``
modules and then only waits.  Each worker is then a ``fork()`` of it, and its
start costs a fork instead of an interpreter start plus ``import torch``
(seconds): a worker that crashed or was killed for ``call_timeout`` is back in
milliseconds.

Rules (fork is only safe in a simple process):

* The zygote never initialises CUDA (a CUDA context does not survive fork):
  after the preload it checks ``torch.cuda.is_initialized()`` and refuses with
  an error naming the module that did it.
* It runs no threads of its own (it waits with ``select``), and a preload that
  started threads that a fork does not stop (a library's background thread)
  makes forking unsafe: the executor then warns and starts workers the usual
  way.  Threads are counted by the kernel (``/proc/self/task``), which sees C
  threads too, after one throw-away fork: pools that handle fork themselves
  (OpenBLAS, loaded by numpy and torch) stop their threads then.  Platforms without ``fork`` + pidfds (not Linux) never use a zygote.
* It holds no sockets of workers: each fork request brings the new worker's
  end of its own socketpair, its parent-death pipe and its stdout/stderr
  pipes (SCM_RIGHTS); the zygote closes its copies right after the fork.
* It dies with the parent: ``PR_SET_PDEATHSIG`` (armed as for every worker,
  see :mod:`comfy_env.forksafe`) and EOF on the parent-death pipe.  Its
  workers arm ``PR_SET_PDEATHSIG`` against the zygote and watch the parent's
  pipe as every worker does, so a SIGKILLed parent takes the zygote and its
  workers with it.

What the zygote itself prints (a preload's imports printing or warning, before any
worker forks) goes where the executor's ``worker_output`` sends its workers' output,
labelled ``[<name> zygote]``; a tail of its stderr is kept for start errors.

A forked worker is the zygote's child, not the parent's: the zygote reaps it
and reports its exit status (the parent's crash reports keep their exit codes
and signals), and hands the parent a pidfd of it, taken before the worker can
be reaped: the parent kills through the pidfd, so never a recycled pid.  The
worker's channel still reports its death by EOF as for spawned workers.
"""
from __future__ import annotations

import gc
import importlib
import itertools
import logging
import os
import pickle
import select
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import warnings
import weakref

from . import forksafe
from .proctree import unreaped_status
from .errors import WorkerStartError
from .ipc.calls import adopt_import_paths, parent_argv, parent_cwd
from .ipc.transport import Channel, ChannelClosed, wait_readable

__all__ = ["Zygote", "ZygoteError", "usable_here"]

log = logging.getLogger("comfy_env.zygote")

FORK_REPLY_TIMEOUT = 60.0       # seconds
# close(wait=True): how long each step may take (the zygote's exit, its reaping, each
# thread's end) before it is given up on; a zygote that does not exit in time is killed.
CLOSE_WAIT = 5.0                # seconds
# A worker that exited (its pidfd says so) but whose zygote has not reported its status
# (stopped, wedged, busy): how long the report is awaited before the kernel is asked.
REPORT_GRACE = 0.5              # seconds


class ZygoteError(WorkerStartError):
    """The zygote refused or failed to start (a preload failed or initialised CUDA).

    ``permanent``: starting it again would fail the same way (the preload's own
    failure), so the executor does not retry."""

    def __init__(self, *args, permanent=False):
        super().__init__(*args)
        self.permanent = permanent


def usable_here() -> bool:
    """Can workers fork from a zygote on this platform (fork + pidfds: Linux)?"""
    return (sys.platform.startswith("linux") and hasattr(os, "fork")
            and hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal"))


def _send(channel, msg, fds=()):
    channel.send(pickle.dumps(msg, pickle.HIGHEST_PROTOCOL), fds)


def _recv(channel):
    body, fds = channel.recv()
    return pickle.loads(body), fds


# -- the parent's side ------------------------------------------------------------------
class ForkedWorker:
    """The parent's view of a worker forked by a zygote, shaped like ``subprocess.Popen``
    where ``WorkerHandle`` uses one (pid, stdout, stderr, kill, wait, poll)."""

    def __init__(self, pid, pidfd, stdout, stderr, on_exit):
        self.pid = pid
        self.stdout = stdout
        self.stderr = stderr
        self.returncode = None
        self._pidfd = pidfd
        self._on_exit = on_exit
        self._exited = threading.Event()
        self._lock = threading.Lock()

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def send_signal(self, sig):
        with self._lock:
            if self._pidfd is None:
                return          # exited (and its pid may be someone else's by now)
            try:
                signal.pidfd_send_signal(self._pidfd, sig)
            except ProcessLookupError:
                pass

    def poll(self):
        return self.returncode

    def wait(self, timeout=None):
        """The exit status, as its zygote reports it; where the worker is gone but the
        report is late (a stopped or wedged zygote reaps nothing), the status the kernel
        keeps for the unreaped worker, so a crash is not reported as "did not exit"
        seconds later."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            # Our own fd: _set_exited closes the shared one (and its number may be reused).
            fd = None if self._pidfd is None else os.dup(self._pidfd)
        if fd is not None:
            try:
                gone = wait_readable(fd, timeout)     # a pidfd reads ready once its process exited
            finally:
                os.close(fd)
            if gone and not self._exited.wait(REPORT_GRACE):
                code = unreaped_status(self.pid)
                if code is not None:
                    self._set_exited(code)
                else:
                    # Reaped meanwhile (its report is on the way), or no procfs.
                    self._exited.wait(None if end is None else max(0.0, end - time.monotonic()))
        if not self._exited.is_set():
            raise subprocess.TimeoutExpired(f"forked worker {self.pid}", timeout)
        return self.returncode

    def _set_exited(self, code):
        with self._lock:
            if self._exited.is_set():
                return
            self.returncode = code
            # Closed before wait() returns: a worker that was waited for left no fd.
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None
            self._exited.set()
        on_exit, self._on_exit = self._on_exit, None
        if on_exit is not None:
            try:
                on_exit()
            except Exception:
                pass


class Zygote:
    """One environment's zygote, started at the first :meth:`fork`; one per executor."""

    def __init__(self, wenv, preload, logger=None, start_timeout=None, output="stream", name=None):
        self.wenv = wenv
        self.preload = list(preload)
        self.logger = logger or log
        self.start_timeout = start_timeout
        self.output = output            # the executor's worker_output: where the zygote's own output goes
        self.name = name or wenv.label  # the executor's: its output is labelled "[<name> zygote]"
        self.pid = forksafe.PID         # the process this object belongs to
        self._lock = threading.Lock()   # one start, and fork requests in order
        self._proc = None
        self._channel = None
        self._alive_w = None
        self._unusable = None           # why workers are spawned instead (warned once)
        self._closed = False
        self._tokens = itertools.count(1)
        self._replies = {}              # token -> [Event, reply, fds]
        self._children = {}             # pid -> ForkedWorker
        self._early_exits = {}          # pid -> code, for an exit reported before its fork reply
        self._stderr_tail = []
        self._reader = None
        self._started = []              # _Started, one per zygote process not yet waited for
        self._starting = None           # the zygote process whose preload runs now (close kills it)
        _zygotes.add(self)

    @property
    def starts_on_next_fork(self) -> bool:
        """Whether the next :meth:`fork` starts the zygote first (runs the preload)."""
        return self._unusable is None and self._channel is None and not self._closed

    # -- used by launch.spawn ----------------------------------------------------
    def fork(self, child_fd, alive_fd, on_exit, tag=None):
        """A ForkedWorker running ``comfy_env.worker`` on ``child_fd``, or None where
        workers must be spawned (no fork here, or the preload started threads).
        ``tag``: what the worker tags the processes it starts with (proctree)."""
        if self._unusable is not None or forksafe.PID != self.pid:
            return None
        with self._lock:
            if self._closed:
                return None
            if self._channel is None:
                self._start()
                if self._unusable is not None:
                    return None
            channel = self._channel
            token = next(self._tokens)
            waiter = self._replies[token] = [threading.Event(), None, []]
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            try:
                _send(channel, ("fork", token, tag), [child_fd, alive_fd, out_w, err_w])
            except (ChannelClosed, OSError) as exc:
                with self._lock:
                    if self._channel is channel:
                        self._channel = None    # the next start begins a new zygote
                raise self._died(f"the zygote could not take a fork request: {exc}") from exc
            finally:
                os.close(out_w)
                os.close(err_w)
            # A fork takes milliseconds; a zygote that does not answer is wedged.
            limit = min(FORK_REPLY_TIMEOUT, self.start_timeout or FORK_REPLY_TIMEOUT)
            if not waiter[0].wait(limit):
                self._kill_wedged(channel)
                raise self._died(f"the zygote did not answer a fork request within "
                                 f"{limit:g} s and was killed")
            reply, fds = waiter[1], waiter[2]
            if reply is None:
                raise self._died("the zygote died before it forked the worker")
            if reply[0] != "forked":
                raise OSError(reply[1]) if reply[0] == "fork_failed_os" else ZygoteError(reply[1])
            pid = reply[2]
            stdout = os.fdopen(out_r, "rb", buffering=0)
            out_r = None
            stderr = os.fdopen(err_r, "rb", buffering=0)
            err_r = None
            proc = ForkedWorker(pid, fds[0], stdout, stderr, on_exit)
            with self._lock:
                self._children[pid] = proc
                code = self._early_exits.pop(pid, None)
            if code is not None:
                proc._set_exited(code)
            return proc
        finally:
            self._replies.pop(token, None)
            for fd in (out_r, err_r):
                if fd is not None:
                    os.close(fd)

    def _kill_wedged(self, channel):
        with self._lock:
            proc = self._proc if self._channel is channel else None
        if proc is not None:
            proc.kill()         # its reader then sees EOF and cleans up (_lost)

    def close(self, wait=False):
        """No more forks.  The zygote exits once its workers have (they are not killed).

        ``wait=True`` (the executor's ``shutdown(wait=True)``, after its workers
        exited): return once every zygote process this started is reaped and the
        threads that close its fds (reader, stderr drain, the keeper's pidfd) are
        done -- each step bounded by CLOSE_WAIT, and a zygote that does not exit
        in time is killed.
        """
        self._closed = True
        starting = self._starting
        if starting is not None:
            # Its preload runs now, under the lock (a slow import, or one that hangs):
            # no worker of it exists to wait for, and the start fails at once.
            starting.kill()
        with self._lock:
            channel, self._channel = self._channel, None
            started = list(self._started)
        if forksafe.PID != self.pid:
            return          # a fork child's copy: the zygote is the parent's
        if channel is not None:
            # shutdown, not only close: our reader thread blocks in recv on this
            # socket, which keeps it open (and the zygote waiting) until woken.
            try:
                channel.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            channel.close()
        if wait:
            for one in started:
                one.wait_gone(self.logger)
            with self._lock:
                self._started = [one for one in self._started if one not in started]

    # -- start ---------------------------------------------------------------------
    def _start(self):
        from .executor import launch

        if not usable_here():
            self._give_up(f"workers cannot fork from a zygote on {sys.platform} "
                          f"(needs Linux with pidfds)")
            return
        parent, child = Channel.pair()
        alive_r, alive_w = os.pipe()
        proc_box = []
        reaped = threading.Event()
        try:
            proc = launch.spawn(self.wenv, child.fileno(), alive_r,
                                on_exit=lambda: _reap(proc_box, reaped),
                                module="comfy_env.zygote", stdout=subprocess.PIPE)
        except BaseException:
            parent.close()
            os.close(alive_w)
            raise
        finally:
            child.close()
            os.close(alive_r)
        proc_box.append(proc)
        self._starting = proc
        forksafe.track_channel(parent)
        drain = threading.Thread(target=self._drain_output, args=(proc.pid, proc.stdout, proc.stderr),
                                 daemon=True, name=f"comfy_env-zygote-output-{proc.pid}")
        drain.start()
        # Also a zygote that failed or refused to start: it exits by itself, and
        # close(wait=True) waits for that as for any other.
        started = _Started(proc, reaped, drain)
        self._started = [one for one in self._started if not one.done()] + [started]
        cfg = {
            "preload": self.preload,
            "sys_path": list(sys.path) if self.wenv.is_current else None,
            "cwd": parent_cwd(),
            "argv": parent_argv(),      # the preload's imports may read the command line
        }
        timer = None
        if self.start_timeout is not None:
            timer = threading.Timer(self.start_timeout, proc.kill)
            timer.daemon = True
            timer.start()
        try:
            if self._closed:
                raise ChannelClosed("the executor was shut down while its zygote started")
            _send(parent, ("preload", cfg))
            msg, _ = _recv(parent)
        except (ChannelClosed, OSError) as exc:
            proc.kill()
            parent.close()
            os.close(alive_w)
            tail = "\n".join(self._stderr_tail[-20:])
            raise WorkerStartError(
                f"the zygote of environment {self.wenv.label!r} (preload={self.preload}) "
                f"died while starting: {exc}" + (f"; its stderr:\n{tail}" if tail else "")) from exc
        finally:
            self._starting = None
            if timer is not None:
                timer.cancel()
        kind = msg[0]
        if kind != "ready":
            parent.close()
            os.close(alive_w)
            if kind == "threads":
                self._give_up(msg[1])
                return
            raise ZygoteError(msg[1], permanent=kind == "failed")
        self._proc, self._channel, self._alive_w = proc, parent, alive_w
        self._reader = started.reader = threading.Thread(
            target=self._read_loop, args=(parent,), daemon=True, name=f"comfy_env-zygote-{proc.pid}")
        self._reader.start()

    def _give_up(self, why):
        self._unusable = why
        warnings.warn(f"comfy_env: {why}; workers of environment {self.wenv.label!r} are "
                      f"started the usual way (no zygote)", RuntimeWarning, stacklevel=4)

    def _drain_output(self, pid, out, err):
        """The zygote's own stdout and stderr (what the preload's imports print, before
        any worker forks) go where the executor's ``worker_output`` sends its workers'
        output, labelled ``[<name> zygote]``; a tail of stderr is kept for start errors.
        Until both pipes end; closes them."""
        from .executor.worker_handle import _READ_SIZE, MAX_LINE, _LineSplitter, forward_output
        streams = {out: "stdout", err: "stderr"}
        split = {f: _LineSplitter(MAX_LINE) for f in streams}
        sel = selectors.DefaultSelector()
        try:
            for f in streams:
                sel.register(f, selectors.EVENT_READ)
            while streams:
                for key, _ in sel.select():
                    f = key.fileobj
                    data = os.read(f.fileno(), _READ_SIZE)
                    stream = streams[f]
                    if not data:
                        sel.unregister(f)
                        del streams[f]
                    if stream == "stdout" and self.output == "discard":
                        continue        # read only to keep the pipe flowing (as a worker's pump)
                    lines = split[f].feed(data, final=not data)
                    if stream == "stderr":
                        self._stderr_tail.extend(line for line, _ in lines)
                        del self._stderr_tail[:-50]
                    forward_output(self.output, self.logger, self.name, f"{self.name} zygote", pid, stream, lines)
        except (OSError, ValueError):
            pass
        finally:
            sel.close()
            for f in (out, err):
                try:
                    f.close()
                except OSError:
                    pass

    # -- replies and exits -----------------------------------------------------------
    def _read_loop(self, channel):
        try:
            while True:
                msg, fds = _recv(channel)
                if msg[0] == "exited":
                    _, pid, code = msg
                    with self._lock:
                        proc = self._children.pop(pid, None)
                        if proc is None:
                            self._early_exits[pid] = code
                    if proc is not None:
                        proc._set_exited(code)
                elif msg[0] in ("forked", "fork_failed", "fork_failed_os"):
                    waiter = self._replies.get(msg[1])
                    if waiter is None:
                        for fd in fds:
                            os.close(fd)
                        continue
                    waiter[1], waiter[2] = msg, fds
                    waiter[0].set()
                else:
                    for fd in fds:
                        os.close(fd)
        except (ChannelClosed, OSError, EOFError, pickle.UnpicklingError):
            pass
        self._lost(channel)

    def _lost(self, channel):
        """The zygote is gone (or closed): its workers die with it (PDEATHSIG)."""
        with self._lock:
            if self._channel is channel:
                self._channel = None        # the next fork starts a new zygote
            children, self._children = self._children, {}
            replies = list(self._replies.values())
            alive_w, self._alive_w = self._alive_w, None
        for waiter in replies:
            waiter[0].set()
        try:
            channel.close()
        except OSError:
            pass
        if alive_w is not None:
            os.close(alive_w)
        for proc in children.values():
            # Reaped by init now, its status lost: wait until it is gone, then say
            # how it went (the kernel's parent-death signal).
            fd = proc._pidfd
            if fd is not None:
                try:
                    wait_readable(fd, 5.0)
                except OSError:
                    pass
            proc._set_exited(-signal.SIGKILL)

    def _died(self, why):
        return WorkerStartError(f"{why} (environment {self.wenv.label!r}); the next start "
                                f"begins a new zygote")


_zygotes = weakref.WeakSet()       # of this process, for the fork-child clean-up


def _after_fork_in_child():
    # A fork child of the parent (multiprocessing, a DataLoader) must not keep the
    # zygote's parent-death pipe or its workers' pidfds: the pipe would keep the
    # zygote alive after the parent died.  (The channel is tracked by forksafe.)
    for z in list(_zygotes):
        fds = [z._alive_w] + [c._pidfd for c in z._children.values()]
        z._alive_w = None
        z._lock = threading.Lock()
        z._closed = True
        z._channel = None
        z._children = {}
        z._started = []         # the parent's processes and threads
        for fd in fds:
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
    _zygotes.clear()


forksafe.on_fork_child(_after_fork_in_child)


def _reap(box, reaped):
    """The zygote process exited: reap it (quick, on the keeper thread, which has closed
    its pidfd of it by now)."""
    try:
        for proc in box:
            try:
                proc.wait(timeout=1)
            except Exception:
                pass
    finally:
        reaped.set()


class _Started:
    """One zygote process, and the parent's threads that close what it holds of it.

    Each piece has one owner, and closes it once the zygote is gone: the reader
    thread the channel and the parent-death pipe (``Zygote._lost``), the drain
    thread the stderr pipe, the keeper its pidfd (before it runs ``_reap``).
    ``wait_gone`` waits for all of them.
    """

    def __init__(self, proc, reaped, drain):
        self.proc = proc
        self.reaped = reaped        # set by _reap, on the keeper thread
        self.drain = drain
        self.reader = None          # only for a zygote that became ready

    def threads(self):
        return [t for t in (self.reader, self.drain) if t is not None]

    def done(self):
        return self.reaped.is_set() and not any(t.is_alive() for t in self.threads())

    def wait_gone(self, logger):
        proc = self.proc
        try:
            proc.wait(timeout=CLOSE_WAIT)
        except subprocess.TimeoutExpired:
            logger.warning("comfy_env: the zygote (pid %s) did not exit within %g s of "
                           "being closed; killing it", proc.pid, CLOSE_WAIT)
            proc.kill()
            try:
                proc.wait(timeout=CLOSE_WAIT)
            except subprocess.TimeoutExpired:
                pass
        self.reaped.wait(CLOSE_WAIT)
        me = threading.current_thread()
        for t in self.threads():
            if t is not me:
                t.join(CLOSE_WAIT)


# -- the zygote process -----------------------------------------------------------------
def _thread_count():
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def _threads_after_a_fork():
    """The threads still running after one throw-away fork.

    Native thread pools that know about fork (OpenBLAS, which numpy and torch
    load, starts one at import) stop their threads in a ``pthread_atfork``
    handler and start them again only when next used, which the zygote never
    does: after one fork they are gone, and forking is safe.  Threads that
    survive a fork know nothing of it, and could hold a lock the child needs.
    """
    import time

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)    # 3.12+: "multi-threaded fork"
        try:
            pid = os.fork()
        except OSError:
            return _thread_count()
    if pid == 0:
        os._exit(0)
    deadline = time.monotonic() + 5.0
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            break
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            break
        time.sleep(0.001)
    return _thread_count()


def _preload(cfg):
    """Import the preload modules; ``None`` when fork is safe now, else the reason."""
    adopt_import_paths(cfg)
    for name in cfg["preload"]:
        try:
            importlib.import_module(name)
        except BaseException:
            return ("failed", f"preload module {name!r} failed to import in the zygote "
                              f"(Python {sys.version.split()[0]} at {sys.executable}):\n"
                              f"{traceback.format_exc()}")
        torch = sys.modules.get("torch")
        cuda = getattr(torch, "cuda", None)
        try:
            initialized = bool(cuda is not None and cuda.is_initialized())
        except Exception:
            initialized = False
        if initialized:
            return ("failed", f"preload module {name!r} initialised CUDA in the zygote; "
                              f"workers cannot fork from a process with a CUDA context. Preload "
                              f"only what imports without touching the GPU (e.g. 'torch', not "
                              f"code that allocates CUDA tensors at import)")
    threads = _thread_count()
    if threads > 1 and threading.active_count() == 1:
        threads = _threads_after_a_fork()
    if threads > 1 or threading.active_count() > 1:
        names = sorted(t.name for t in threading.enumerate() if t is not threading.main_thread())
        return ("threads", f"preload={cfg['preload']} left {threads} threads running in the "
                           f"zygote ({', '.join(names) or 'started by C code'}), and forking a "
                           f"process with threads is unsafe")
    return None


def _serve(channel, alive):
    """Fork workers on request.  Returns (in a forked child only) the worker's argv."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    signal.signal(signal.SIGCHLD, lambda *a: None)
    signal.set_wakeup_fd(wake_w)
    children = set()
    closing = False
    ctl = channel.fileno()
    # poll, not select: the fds the parent passed keep its numbers, which may be above
    # select()'s 1024 (a parent with many files open).
    poller = select.poll()
    for fd in (wake_r, alive, ctl):
        poller.register(fd, select.POLLIN)
    watching_ctl = True
    while True:
        if closing and watching_ctl:
            poller.unregister(ctl)
            watching_ctl = False
        try:
            ready = [fd for fd, _ in poller.poll()]
        except InterruptedError:
            ready = []
        if alive in ready:
            os._exit(0)             # the parent died: our workers follow (PDEATHSIG)
        if wake_r in ready:
            try:
                while os.read(wake_r, 512):
                    pass
            except (BlockingIOError, OSError):
                pass
        # Reap every child that exited; the parent learns its status.
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                children.clear()
                break
            if pid == 0:
                break
            children.discard(pid)
            code = os.waitstatus_to_exitcode(status)
            if not closing:
                try:
                    _send(channel, ("exited", pid, code))
                except (ChannelClosed, OSError):
                    closing = True
        if closing:
            if not children:
                os._exit(0)
            continue
        if ctl not in ready:
            continue
        try:
            msg, fds = _recv(channel)
        except (ChannelClosed, OSError, EOFError, pickle.UnpicklingError):
            # The executor closed us: stay until our workers have exited (they
            # die with us otherwise), then go.
            closing = True
            if not children:
                os._exit(0)
            continue
        if msg[0] != "fork" or len(fds) != 4:
            for fd in fds:
                os.close(fd)
            continue
        token = msg[1]
        tag = msg[2] if len(msg) > 2 else None
        sock_fd, alive_fd, out_w, err_w = fds
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            _send(channel, ("fork_failed_os", token, f"the zygote could not fork: {exc}"))
            continue
        if pid == 0:
            # The worker: drop everything of the zygote's, keep only our own fds.
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for fd in (wake_r, wake_w, alive):
                os.close(fd)
            forksafe._close_channel(channel)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            os.close(out_w)
            os.close(err_w)
            # Our __main__ is the zygote, not comfy_env.worker: say what we are (the
            # CUDA plane makes workers export their results zero-copy by this).
            os.environ["COMFY_ENV_ROLE"] = "worker"
            return (["--fd", str(sock_fd), "--alive-fd", str(alive_fd),
                     "--parent-pid", str(os.getppid())] + (["--tag", tag] if tag else []))
        children.add(pid)
        # The worker's ends are its own now: closed before the parent hears of it, so
        # that no end of the worker's stays here once the parent uses it (a stopped or
        # wedged zygote must not keep the worker's death from being EOF there).
        for fd in fds:
            os.close(fd)
        # Taken before we can reap it: the pid is still this child's.
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as exc:
            os.kill(pid, signal.SIGKILL)
            _send(channel, ("fork_failed_os", token, f"pidfd_open failed: {exc}"))
        else:
            try:
                _send(channel, ("forked", token, pid), [pidfd])
            except (ChannelClosed, OSError):
                closing = True
            os.close(pidfd)


def main(argv=None):
    from .worker import _parse_args

    fd, alive, parent, _tag = _parse_args(sys.argv[1:] if argv is None else argv)
    forksafe.protect_worker((fd, alive), parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # as the workers: the parent decides
    channel = Channel.from_fd(fd)
    try:
        msg, _ = _recv(channel)
    except (ChannelClosed, OSError):
        return 0
    from . import worker   # noqa: F401  (what every forked worker runs: imported once, here)
    refusal = _preload(msg[1])
    if refusal is None:
        # The preloaded objects move to a generation the collector never visits: a
        # worker's collections then do not write to (and so copy) the zygote's pages.
        gc.collect()
        gc.freeze()
    try:
        _send(channel, refusal or ("ready", {"pid": os.getpid()}))
    except (ChannelClosed, OSError):
        return 0
    if refusal is not None:
        return 0
    worker_argv = _serve(channel, alive)
    # Only a forked worker gets here, with a clean zygote stack: it runs as a worker
    # would, and exits through the interpreter's usual finalisation.
    from . import worker
    return worker.main(worker_argv)


if __name__ == "__main__":
    sys.exit(main())
