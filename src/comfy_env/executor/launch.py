"""Starting a worker process: the platform-specific part, kept apart from scheduling.

The worker is ``python -m comfy_env.worker --fd N`` where N is the worker's
end of a socketpair, inherited through ``pass_fds`` and nothing else (every
other fd of the parent is close-on-exec).  stdout and stderr are pipes that
the parent turns into log records.

Every worker is started by one long-lived thread, the *keeper*, which then
watches it until it exits:

* the worker arms ``PR_SET_PDEATHSIG`` (see :mod:`comfy_env.forksafe`), which
  fires when the *thread* that forked it ends.  Workers are started on demand
  by whichever thread dispatches a call, often a short-lived user thread that
  submits and leaves: forking there would kill the worker with that thread.
  The keeper lives as long as any worker it started does.
* the keeper holds a pidfd per worker and reports its exit (``on_exit``), so
  the parent learns of a worker's death from the process itself, not only from
  EOF on its socket: a grandchild that inherited the worker's end of the socket
  (C code that forks without exec) would otherwise hide the death for as long
  as it lives.
"""
from __future__ import annotations

import collections
import errno
import os
import selectors
import subprocess
import threading

import comfy_env

from .. import forksafe, proctree, stdfds
from ..envs import WorkerEnvironment

# The directory that holds the comfy_env package the parent runs: the worker
# of the current interpreter must import the very same code.
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(comfy_env.__file__)))

# Errors of a start that may succeed later: fds or memory are short right now.
_TRANSIENT = frozenset([errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN])


# Interpreter flags a worker of the parent's own interpreter must not take: they would
# hide the PYTHONPATH (or site-packages) it imports comfy_env and its dependencies from
# before the handshake hands it the parent's sys.path.
_FLAGS_NOT_PASSED = frozenset(["-E", "-I", "-S"])


def interpreter_flags() -> list:
    """The parent's interpreter flags (``-W``, ``-X``, ``-O``, ``-B``, ...) for a worker of
    the same interpreter, as multiprocessing passes them to its spawned children.
    ``subprocess._args_from_interpreter_flags`` is what multiprocessing itself uses: no
    public function lists them."""
    try:
        flags = subprocess._args_from_interpreter_flags()
    except Exception:       # pragma: no cover - a Python without it: start plain
        return []
    return [f for f in flags if f not in _FLAGS_NOT_PASSED]


def worker_command(wenv: WorkerEnvironment, fd: int, alive_fd: int = None,
                   module: str = "comfy_env.worker"):
    cmd = [wenv.python]
    if wenv.is_current:
        cmd += interpreter_flags()
    else:
        cmd.append("-s")            # no user site-packages in a foreign env
    cmd += ["-m", module, "--fd", str(fd)]
    if alive_fd is not None:
        cmd += ["--alive-fd", str(alive_fd)]
    cmd += ["--parent-pid", str(os.getpid())]
    return cmd


def worker_environ(wenv: WorkerEnvironment, tag: str = None):
    env = dict(os.environ)
    if tag is not None:
        env[proctree.TAG_VAR] = proctree.tags_with(env.get(proctree.TAG_VAR), tag)
    if wenv.is_current:
        paths = [_PACKAGE_PARENT]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
    else:
        # A foreign env sees its own site-packages plus exactly what the
        # WorkerEnvironment lists (bootstrap dir, shared packages).
        paths = list(wenv.pythonpath)
        for var in ("PYTHONHOME", "VIRTUAL_ENV", "CONDA_PREFIX", "PYTHONSTARTUP"):
            env.pop(var, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["PYTHONUNBUFFERED"] = "1"       # print() lines reach the parent as they happen
    env.update({str(k): str(v) for k, v in (wenv.env_vars or {}).items()})
    return env


def is_transient(exc) -> bool:
    """Did a worker fail to start for want of fds or memory (worth retrying later)?"""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in _TRANSIENT:
            return True
        exc = exc.__cause__
    return False


def spawn(wenv: WorkerEnvironment, child_fd: int, alive_fd: int = None,
          on_exit=None, *, zygote=None, module: str = "comfy_env.worker",
          stdout=subprocess.PIPE, tag: str = None) -> subprocess.Popen:
    """Start a worker.  ``alive_fd``: read end of a pipe whose write end only the parent holds.

    ``on_exit()`` runs (on the keeper thread: it must be quick and must not block)
    once the process has exited and the keeper has closed its pidfd of it.
    ``zygote``: fork the worker from it (a :class:`comfy_env.zygote.ForkedWorker`
    comes back), unless it says workers must be spawned here.  ``module``: what the process runs (the zygote's own start).
    ``tag``: the worker's tag (proctree.kill_tagged): in its environment from the start
    where it is spawned (its fork children show it too; a sandbox passes ``COMFY_ENV_*``
    on), handed to the worker to set where it is forked from the zygote.
    """
    raise_fd_limit()
    if zygote is not None:
        proc = zygote.fork(child_fd, alive_fd, on_exit, tag)
        if proc is not None:
            return proc
    # envs/: rebuild an env removed under us; the worker inherits the env's in-use lease.
    lease = wenv.prepare_launch()
    # None of them may be 0-2: the child's stdin/stdout/stderr would replace them.
    try:
        passed, moved = stdfds.above((child_fd,) + (() if alive_fd is None else (alive_fd,)) + tuple(lease))
    except BaseException:
        stdfds.close_all(lease)
        raise
    child_fd, alive_fd = passed[0], (None if alive_fd is None else passed[1])
    try:
        kwargs = dict(
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.PIPE,
            pass_fds=passed,
            env=worker_environ(wenv, tag),
            close_fds=True,
            cwd=wenv.start_cwd,     # not the parent's: it would come first on sys.path
            # The parent's process group: a Ctrl-C in the terminal reaches the workers too,
            # which ignore SIGINT; the parent decides (it stops its running calls).
            start_new_session=False,
        )
        cmd, popen = worker_command(wenv, child_fd, alive_fd, module), subprocess.Popen
        if wenv.sandbox is not None:    # bubblewrap in front of the command (sandbox.py)
            from ..sandbox import wrap
            cmd, kwargs["env"], popen = wrap(wenv.sandbox, wenv, cmd, kwargs["env"], _PACKAGE_PARENT)
        return KEEPER.spawn(cmd, kwargs, on_exit, popen)
    except OSError as exc:
        from ..errors import WorkerStartError

        raise WorkerStartError(
            f"could not start a worker with interpreter {wenv.python!r} "
            f"(environment {wenv.label!r}): {exc}"
        ) from exc
    finally:
        stdfds.close_all(moved)
        for fd in lease:
            os.close(fd)


# -- the fd limit ---------------------------------------------------------------------

_limit_raised = False


def raise_fd_limit():
    """Raise this process's soft RLIMIT_NOFILE to its hard limit, once.

    The common soft limit of 1,024 is a relic of select(); shared memory, sockets
    and pipes of many workers can need more, and servers routinely raise it at
    start-up.  Workers inherit the raised limit.
    """
    global _limit_raised
    if _limit_raised:
        return
    _limit_raised = True
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY or soft < hard:
            target = hard
            if target == resource.RLIM_INFINITY:
                target = 1 << 20     # Linux's default nr_open: an infinite hard limit isn't settable
            if soft != resource.RLIM_INFINITY and target > soft:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):
        pass


# -- the keeper thread ------------------------------------------------------------------------

class _Request:
    __slots__ = ("argv", "kwargs", "on_exit", "popen", "done", "proc", "error")

    def __init__(self, argv, kwargs, on_exit, popen):
        self.argv = argv
        self.kwargs = kwargs
        self.on_exit = on_exit
        self.popen = popen          # subprocess.Popen, or sandbox.SandboxedPopen
        self.done = threading.Event()
        self.proc = None
        self.error = None


class _Keeper:
    """Starts workers on one thread and watches them (pidfds) until they exit.

    The thread runs while a start is requested or a worker it started is alive,
    and ends after that (a new one starts with the next worker): no thread is
    left behind by an executor that is gone, and none ends under a live worker.
    """

    POLL_S = 0.2                    # without a pidfd (old kernel, no fd left): poll

    def __init__(self):
        self._lock = threading.Lock()
        self._requests = collections.deque()
        self._watched = {}              # pidfd -> on_exit
        self._polled = {}               # Popen -> on_exit, where no pidfd could be had
        self._thread = None
        self._sel = None
        self._wake_r = self._wake_w = None

    def spawn(self, argv, kwargs, on_exit, popen=subprocess.Popen):
        if threading.current_thread() is self._thread:
            proc = popen(argv, **kwargs)
            self._watch(proc, on_exit)
            return proc
        req = _Request(argv, kwargs, on_exit, popen)
        with self._lock:
            if self._wake_w is None:
                self._wake_r, self._wake_w = os.pipe()
                os.set_blocking(self._wake_w, False)
            self._requests.append(req)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="comfy_env-keeper",
                                                daemon=True)
                self._thread.start()
            try:
                os.write(self._wake_w, b"x")
            except (BlockingIOError, InterruptedError):
                pass                # the pipe is full: a wake-up is pending anyway
        req.done.wait()
        if req.error is not None:
            raise req.error
        return req.proc

    def _watch(self, proc, on_exit):
        try:
            pidfd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            self._polled[proc] = on_exit
            return
        self._watched[pidfd] = on_exit
        self._sel.register(pidfd, selectors.EVENT_READ)

    def _poll(self, exited):
        for proc, on_exit in list(self._polled.items()):
            try:
                # WNOWAIT: look, don't reap (the worker's handle reaps it).
                done = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                done = True         # reaped already
            except OSError:
                done = proc.returncode is not None
            if done:
                del self._polled[proc]
                exited.append(on_exit)

    def _run(self):
        self._sel = sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ)
        for pidfd in self._watched:     # left by a thread whose loop failed
            sel.register(pidfd, selectors.EVENT_READ)
        exited = []                 # on_exit of processes gone, not reported yet
        try:
            while True:
                with self._lock:
                    reqs = list(self._requests)
                    self._requests.clear()
                    if not reqs and not self._watched and not self._polled:
                        self._thread = None
                        break
                # Reported only once the thread knows it goes on: the last exit is
                # reported after the selector is closed (below), so whoever waits for
                # its processes' on_exit finds no fd of the keeper's left but the
                # wake-up pipe.
                _report_all(exited)
                for req in reqs:
                    try:
                        req.proc = req.popen(req.argv, **req.kwargs)
                        self._watch(req.proc, req.on_exit)
                    except BaseException as exc:
                        req.error = exc
                    finally:
                        req.done.set()
                if reqs:
                    continue        # look for requests that came meanwhile first
                for key, _ in sel.select(self.POLL_S if self._polled else None):
                    if key.fd == self._wake_r:
                        try:
                            os.read(self._wake_r, 4096)
                        except OSError:
                            pass
                        continue
                    sel.unregister(key.fd)
                    os.close(key.fd)
                    exited.append(self._watched.pop(key.fd, None))
                if self._polled:
                    self._poll(exited)
        except BaseException:
            # The loop itself failed: let the next start begin a new thread, and fail
            # the starts this one will never serve.
            with self._lock:
                if self._thread is threading.current_thread():
                    self._thread = None
                reqs = list(self._requests)
                self._requests.clear()
            for req in reqs:
                req.error = OSError(errno.EAGAIN, "the worker keeper thread failed")
                req.done.set()
            raise
        finally:
            sel.close()
            _report_all(exited)

    def _after_fork_in_child(self):
        # The thread is the parent's; the pidfds and the pipe are copies we must not keep
        # (the workers they watch are the parent's).
        for fd in list(self._watched) + [self._wake_r, self._wake_w]:
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        if self._sel is not None:
            try:
                self._sel.close()
            except OSError:
                pass
        self.__init__()


def _report_all(exited):
    while exited:
        _report(exited.pop(0))


def _report(on_exit):
    if on_exit is not None:
        try:
            on_exit()
        except Exception:
            pass


KEEPER = _Keeper()
forksafe.on_fork_child(KEEPER._after_fork_in_child)
