"""IsolatedExecutor: a concurrent.futures executor over isolated worker processes.

Data flow::

    submit(fn, *args)                 reader thread of worker W
         |                                  ^   |
         v                                  |   v
    [waiting] --deps done--> [pending] --> W.send_call --> worker --> result frame
                                  ^                                        |
                                  +---------- W idle: next pending --------+

* ``waiting``: calls whose arguments hold futures that are not done yet
  (chains); they move to ``pending`` when the last one finishes.
* ``pending``: FIFO of calls ready to run.  A call is encoded for the worker
  that takes it (the data planes lend blocks per peer) by the thread that
  dispatches it, outside the pool lock.
* Workers are started on demand, up to ``max_workers``; one that dies is
  replaced when there is work for it.  A worker that dies before it is ready
  (bad interpreter, failed initializer) breaks the executor: restarting it
  would fail the same way forever.

All state lives in ``_Pool``; the executor object only holds it, so an
executor that is garbage collected without ``shutdown()`` is finalized.
"""
from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import sys
import threading
import time
import types
import weakref
from collections import deque
from concurrent.futures import BrokenExecutor, Executor, Future

import cloudpickle

from ..envs import resolve_env
from ..errors import CallTimeout, InitializerFailed, PicklingFailed, WorkerCrashed, WorkerStartError
from ..ipc import codec
from ..ipc.transport import ChannelClosed, MAX_FDS
from .devices import pin_environment
from .futures import IsolatedFuture
from .worker_handle import WorkerHandle

__all__ = ["IsolatedExecutor"]

_ids = itertools.count(1)
_names = itertools.count(1)
_live_pools = weakref.WeakSet()


class _WorkItem:
    __slots__ = ("future", "fn", "args", "kwargs", "call_id", "deps", "started")

    def __init__(self, future, fn, args, kwargs, deps):
        self.future = future
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.call_id = next(_ids)
        self.deps = deps
        self.started = False


class _Watchdog:
    """Kills workers whose call ran past ``call_timeout`` (one thread per executor, on demand)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._heap = []
        self._seq = itertools.count()
        self._thread = None
        self._stop = False

    def watch(self, worker):
        with self._cond:
            heapq.heappush(self._heap, (worker.deadline, next(self._seq), worker, worker.item))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="comfy_env-watchdog",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()

    def stop(self):
        with self._cond:
            self._stop = True
            self._cond.notify()

    def _run(self):
        with self._cond:
            while not self._stop:
                if not self._heap:
                    self._cond.wait()
                    continue
                deadline, _, worker, item = self._heap[0]
                now = time.monotonic()
                if deadline > now:
                    self._cond.wait(deadline - now)
                    continue
                heapq.heappop(self._heap)
                # Stale entry: the call finished or another one started since.  The
                # entry names its call: checking only ``worker.item is not None`` could
                # kill the *next* call, dispatched to the worker right after this one
                # finished at its deadline.  Under the pool lock, which the reader holds
                # to take the item when a result or the worker's death arrives.
                with worker.pool.lock:
                    if item is not None and worker.item is item:
                        item.started = "timed-out"
                        worker.kill()


def _find_futures(obj, out, depth=0):
    """Futures anywhere in args/kwargs (lists, tuples, dicts, sets): the call waits for them."""
    if isinstance(obj, Future):
        out.append(obj)
    elif depth < 20 and type(obj) in (list, tuple, set, frozenset):
        for x in obj:
            _find_futures(x, out, depth + 1)
    elif depth < 20 and type(obj) is dict:
        for x in obj.values():
            _find_futures(x, out, depth + 1)
    return out


def _by_reference(fn):
    """Can a worker of a *foreign* env import ``fn`` by its module and qualname?"""
    mod = getattr(fn, "__module__", None)
    qual = getattr(fn, "__qualname__", "")
    if not mod or mod == "__main__" or "<" in qual:
        return False
    module = sys.modules.get(mod)
    if module is None:
        return False
    path = getattr(module, "__file__", None) or ""
    # Installed code (site-packages) is expected in the env too, and comfy_env
    # itself always is; anything else (the user's scripts, test modules) travels by value.
    return (mod.split(".")[0] == "comfy_env" or "site-packages" in path
            or "dist-packages" in path or path.startswith(sys.base_prefix))


_by_value_lock = threading.Lock()


def _pickle_by_value(fn):
    mod = sys.modules.get(getattr(fn, "__module__", None) or "")
    if mod is None or mod.__name__ == "__main__":
        return cloudpickle.dumps(fn)
    with _by_value_lock:
        registered = False
        try:
            cloudpickle.register_pickle_by_value(mod)
            registered = True
        except ValueError:
            pass
        try:
            return cloudpickle.dumps(fn)
        finally:
            if registered:
                cloudpickle.unregister_pickle_by_value(mod)


class _Pool:
    def __init__(self, wenv, max_workers, init_payload, call_timeout, name, logger,
                 worker_log_level):
        self.wenv = wenv
        self.max_workers = max_workers
        self.init_payload = init_payload
        self.call_timeout = call_timeout
        self.name = name
        self.logger = logger
        self.worker_log_level = worker_log_level
        self.lock = threading.RLock()
        self.pending = deque()
        self.waiting = set()
        self.idle = []
        self.workers = set()
        self.starting = 0
        self.broken = None
        self.shutting_down = False
        self.watchdog = _Watchdog()
        self._worker_index = itertools.count(1)
        self.all_done = threading.Condition(self.lock)
        _live_pools.add(self)

    # -- submission ------------------------------------------------------------------
    def submit(self, item):
        with self.lock:
            self._check_open()
            if item.deps:
                self.waiting.add(item)
        if item.deps:
            remaining = [len(item.deps)]
            counter_lock = threading.Lock()
            # The callbacks stay in each input future's _done_callbacks for the
            # future's whole life; they must not keep the item (whose args hold
            # the inputs) reachable once it ran, or every chained input sits in a
            # reference cycle (fa -> callback -> item -> args -> fa) and its
            # shared memory is only released by the cyclic GC, not when the
            # caller drops fa.  The last callback takes the item out of the cell.
            cell = [item]

            def dep_done(_f):
                with counter_lock:
                    remaining[0] -= 1
                    it = cell.pop() if remaining[0] == 0 and cell else None
                if it is not None:
                    self._deps_ready(it)

            for dep in item.deps:
                dep.add_done_callback(dep_done)
            return
        with self.lock:
            self.pending.append(item)
        self.dispatch()

    def _check_open(self):
        if self.broken is not None:
            raise type(self.broken)(str(self.broken)) from self.broken
        if self.shutting_down:
            raise RuntimeError("cannot schedule new calls after shutdown")

    def _deps_ready(self, item):
        # The inputs are done: the item no longer needs to list them (it keeps
        # them in args until they are sent; see the comment in submit).
        deps, item.deps = item.deps, ()
        with self.lock:
            if item not in self.waiting:
                item.args = item.kwargs = item.fn = None
                return          # cancelled by shutdown
            self.waiting.discard(item)
        fut = item.future
        for dep in deps:
            exc = None
            if dep.cancelled():
                from concurrent.futures import CancelledError
                exc = CancelledError(f"an input future of this call was cancelled: {dep!r}")
            else:
                exc = dep.exception()
            if exc is not None:
                if fut.set_running_or_notify_cancel():
                    err = type(exc)(*exc.args) if _copyable(exc) else RuntimeError(str(exc))
                    err.__cause__ = exc
                    fut.set_exception(err)
                # Drop the other inputs now (a diamond's good branch), and let
                # dispatch retire idle workers if shutdown(wait=False) was only
                # waiting for this call.
                item.args = item.kwargs = item.fn = None
                self._notify_done()
                self.dispatch()
                return
        with self.lock:
            if self.broken is not None:
                fail = self.broken
            else:
                fail = None
                self.pending.append(item)
        if fail is not None:
            item.args = item.kwargs = item.fn = None
            if fut.set_running_or_notify_cancel():
                fut.set_exception(fail)
            return
        self.dispatch()

    # -- dispatch --------------------------------------------------------------------
    def dispatch(self):
        while True:
            with self.lock:
                if not self.pending:
                    self._retire_idle_locked()
                    return
                if not self.idle:
                    n = self._workers_to_start_locked()
                    break
                worker = self.idle.pop()
                item = self.pending.popleft()
            if not item.started:
                if not item.future.set_running_or_notify_cancel():
                    item.args = item.kwargs = item.fn = None    # cancelled: drop its inputs
                    self._back_to_idle(worker)
                    continue
                item.started = True
            try:
                chunks, fds, fb = self._encode(item, worker)
            except BaseException as exc:
                item.future.set_exception(exc)
                item.args = item.kwargs = item.fn = None
                self._back_to_idle(worker)
                continue
            try:
                worker.send_call(item, chunks, fds)
            except (ChannelClosed, OSError):
                # Died between calls: the reader reports it; the call was not
                # delivered, so it goes back to the front of the queue.
                fb.abort()
                # Requeue only if the worker's reader has not claimed the item for
                # its death report already (WorkerHandle._finish): a call both failed
                # and re-run would set its future twice.
                with self.lock:
                    if worker.item is item:
                        worker.item = None
                        self.pending.appendleft(item)
                continue
            item.args = item.kwargs = None      # the worker has them now
        for _ in range(n):
            self._start_worker()

    def _encode(self, item, worker):
        fn = item.fn
        wenv = self.wenv
        if not isinstance(fn, str) and not wenv.is_current and not _by_reference(fn):
            if tuple(wenv.python_version[:2]) != tuple(sys.version_info[:2]):
                raise PicklingFailed(
                    f"{getattr(fn, '__qualname__', fn)!r} would be pickled by value, which only "
                    f"works on the same Python minor version: the parent runs Python "
                    f"{sys.version_info[0]}.{sys.version_info[1]}, the worker's environment "
                    f"{wenv.label!r} runs Python {wenv.python_version[0]}.{wenv.python_version[1]}. "
                    f"Pass the function as a 'package.module:qualname' string that the worker can import."
                )
            try:
                fn = ("by-value", _pickle_by_value(fn))
            except Exception as exc:
                raise PicklingFailed(f"the function {fn!r} could not be pickled: {exc}") from exc
        # Check the fd limit before building the frame: a call refused for too
        # many blocks (easy to hit with a list of forwarded futures) must undo
        # every lend it took (fb.abort), or the blocks would never be released
        # in the parent nor in the producing worker.
        fb = codec.FrameBuilder(worker.link)
        try:
            try:
                fb.encode_part((fn, item.args, item.kwargs), self._forward_future)
            except BaseException as exc:
                raise _explain_pickling(exc, item) from exc
            if len(fb.fds) > MAX_FDS:
                raise PicklingFailed(f"the call's arguments span {len(fb.fds)} shared blocks; "
                                     f"at most {MAX_FDS} fit in one message")
            chunks = fb.build(("call", item.call_id))
        except BaseException:
            fb.abort()
            raise
        return chunks, fb.fds, fb

    @staticmethod
    def _forward_future(fut, fb):
        """Encode a done future's undecoded result as a forwarded part (zero-copy chain)."""
        # Take the lazy result *with a hold on its records*: a concurrent
        # fa.result() releases the lazy result's own hold once it decoded, and
        # if the decoded value is dropped at once the blocks would be freed (fd
        # closed, number reused) between lazy_result() and the lends below.
        hold = getattr(fut, "_hold_lazy", None)
        lazy = hold() if hold is not None else None
        if lazy is None:
            return None
        try:
            return fb.forward_part(lazy.part, lazy.records)
        finally:
            lazy.unhold_extra()

    def _workers_to_start_locked(self):
        """How many workers to start for the pending calls (reserved in ``starting``)."""
        if self.broken is not None or self.shutting_down and not self.pending:
            return 0
        live = len(self.workers) + self.starting
        busy = live - len(self.idle)
        want = min(self.max_workers, busy + len(self.pending))
        n = max(0, want - live)
        self.starting += n
        return n

    def _start_worker(self):
        worker = WorkerHandle(self, next(self._worker_index))
        with self.lock:
            self.starting -= 1
            self.workers.add(worker)
        try:
            worker.start()      # Popen only; the handshake happens on the reader thread
        except BaseException as exc:
            with self.lock:
                self.workers.discard(worker)
            self._break(exc if isinstance(exc, BrokenExecutor) else WorkerStartError(str(exc)))

    def _back_to_idle(self, worker):
        with self.lock:
            if worker in self.workers:
                self.idle.append(worker)
        self._notify_done()

    # -- events from worker readers --------------------------------------------------------
    def on_ready(self, worker):
        with self.lock:
            if worker in self.workers and not worker.exiting:
                self.idle.append(worker)
        self.dispatch()

    def on_idle(self, worker):
        with self.lock:
            if worker in self.workers and not worker.exiting:
                self.idle.append(worker)
            self.all_done.notify_all()
            # Unlocked-read safe: a submit() that adds work after this calls
            # dispatch() itself and finds the worker idle.
            busy = self.pending or self.shutting_down
        if busy:
            self.dispatch()

    def on_death(self, worker, item, code, start_error):
        with self.lock:
            self.workers.discard(worker)
            if worker in self.idle:
                self.idle.remove(worker)
            # After shutdown(wait=False) (or garbage collection) nothing else stops the
            # watchdog thread; once the last worker is gone and nothing can run, it ends.
            finished = (self.shutting_down and not self.workers and not self.starting
                        and not self.pending and not self.waiting)
        if finished:
            self.watchdog.stop()
        if item is not None and not item.future.done():
            if item.started == "timed-out":
                item.future.set_exception(CallTimeout(
                    f"the call ran longer than call_timeout={self.call_timeout}s; its worker "
                    f"(pid {worker.pid}) was killed"))
            else:
                msg, tail = worker.describe_exit(code)
                item.future.set_exception(WorkerCrashed(
                    f"the worker died while running the call: {msg}", exitcode=code,
                    stderr_tail=tail))
        if not worker.ready and not worker.exiting:
            if start_error is None or isinstance(start_error, ChannelClosed):
                msg, _ = worker.describe_exit(code)
                start_error = WorkerStartError(f"a worker failed to start: {msg}")
            elif not isinstance(start_error, BrokenExecutor):
                err = WorkerStartError(f"a worker failed to start: {start_error!r}")
                err.__cause__ = start_error
                start_error = err
            self._break(start_error)
        self._notify_done()
        self.dispatch()

    def _break(self, exc):
        with self.lock:
            if self.broken is None:
                self.broken = exc
            items = list(self.pending)
            self.pending.clear()
            waiting = list(self.waiting)
            self.waiting.clear()
            workers = list(self.workers)
        for item in items + waiting:
            fut = item.future
            if item.started or fut.set_running_or_notify_cancel():
                if not fut.done():
                    fut.set_exception(_clone(exc))
        for w in workers:
            w.request_exit()
        self._notify_done()

    # -- shutdown --------------------------------------------------------------------------
    def _retire_idle_locked(self):
        if self.shutting_down and not self.pending and not self.waiting:
            for w in self.idle:
                w.request_exit()
            self.idle.clear()

    def _notify_done(self):
        with self.lock:
            self.all_done.notify_all()

    def shutdown(self, wait=True, cancel_futures=False):
        with self.lock:
            self.shutting_down = True
            if cancel_futures:
                items = list(self.pending) + list(self.waiting)
                self.pending.clear()
                self.waiting.clear()
            else:
                items = []
        for item in items:
            if item.started:
                # Re-queued after its worker died before delivery: it was
                # already running, so it fails rather than being cancelled.
                item.future.set_exception(RuntimeError("shutdown(cancel_futures=True) dropped "
                                                       "this call before it was delivered"))
            else:
                item.future.cancel()
        self.dispatch()
        if wait:
            with self.lock:
                while self.pending or self.waiting or any(w.item is not None for w in self.workers) \
                        or self.starting:
                    self.all_done.wait(0.1)
                    if self.broken is not None and not any(w.item for w in self.workers):
                        break
                workers = list(self.workers)
                for w in workers:
                    w.request_exit()
            for w in workers:
                w.join()
            self.watchdog.stop()
        else:
            with self.lock:
                self._retire_idle_locked()


def _copyable(exc):
    try:
        type(exc)(*exc.args)
        return True
    except Exception:
        return False


def _clone(exc):
    try:
        new = type(exc)(*exc.args)
    except Exception:
        new = BrokenExecutor(str(exc))
    new.__cause__ = exc.__cause__ or exc
    return new


def _explain_pickling(exc, item):
    """Say which argument could not be pickled, and why."""
    if isinstance(exc, PicklingFailed):
        return exc
    what = None
    for i, a in enumerate(item.args or ()):
        if _find_futures(a, []):
            continue        # chained inputs are forwarded, never pickled: not the culprit
        try:
            cloudpickle.dumps(a)
        except Exception:
            what = f"argument {i} ({type(a).__qualname__})"
            break
    if what is None:
        for k, v in (item.kwargs or {}).items():
            if _find_futures(v, []):
                continue
            try:
                cloudpickle.dumps(v)
            except Exception:
                what = f"keyword argument {k!r} ({type(v).__qualname__})"
                break
    if what is None:
        what = f"the function {getattr(item.fn, '__qualname__', item.fn)!r}"
    return PicklingFailed(f"{what} could not be pickled for the worker: {type(exc).__name__}: {exc}")


class IsolatedExecutor(Executor):
    """Run callables in worker processes of another (or this) Python environment.

    ``env``: None (this interpreter, in new processes), a path to an
    interpreter / environment directory / ``comfy-env.toml``, or an ``Env``.
    ``max_workers`` workers run calls in parallel.  ``initializer(*initargs)``
    runs once in each worker; if it raises, the executor is broken.
    ``call_timeout`` (seconds) bounds each call: the worker is killed, the
    future raises :class:`CallTimeout`, the executor carries on.
    ``device`` (``"cuda:N"`` in this process's numbering, or a GPU UUID) pins
    the workers to one GPU: it becomes their ``cuda:0`` (see devices.py).
    ``name`` prefixes the workers' log lines; ``worker_log_level`` sets the
    workers' root logger level.
    """

    def __init__(self, env=None, max_workers=1, *, initializer=None, initargs=(),
                 call_timeout=None, name=None, worker_log_level=None, device=None,
                 sandbox=None):
        if not isinstance(max_workers, int) or isinstance(max_workers, bool) or max_workers < 1:
            raise ValueError(f"max_workers must be an int >= 1, got {max_workers!r}")
        if call_timeout is not None:
            if not isinstance(call_timeout, (int, float)) or isinstance(call_timeout, bool) \
                    or call_timeout <= 0:
                raise ValueError(f"call_timeout must be a positive number of seconds or None, "
                                 f"got {call_timeout!r}")
        if initializer is not None and not (callable(initializer) or isinstance(initializer, str)):
            raise TypeError(f"initializer must be callable or a 'module:qualname' string, "
                            f"got {initializer!r}")
        if not isinstance(initargs, tuple):
            initargs = tuple(initargs)
        wenv = resolve_env(env)
        pin = pin_environment(device)
        if pin:
            wenv = dataclasses.replace(wenv, env_vars={**(wenv.env_vars or {}), **pin})
        if sandbox is not None:
            wenv = dataclasses.replace(wenv, sandbox=_sandbox_arg(sandbox))
        if wenv.sandbox is not None:
            from ..sandbox import check_available
            check_available()           # bwrap can't run here: say so now, never run unsandboxed
        self.device = device
        self.env = wenv
        self.name = name or f"{wenv.label}-{next(_names)}"
        logger = logging.getLogger(f"comfy_env.worker.{self.name}")
        init_payload = (initializer, initargs) if initializer is not None else None
        if init_payload is not None and not isinstance(initializer, str) and not wenv.is_current \
                and not _by_reference(initializer):
            init_payload = (_ByValue(_pickle_by_value(initializer)), initargs)
        self._pool = _Pool(wenv, max_workers, init_payload, call_timeout, self.name, logger,
                           worker_log_level)
        self._finalizer = weakref.finalize(self, _Pool.shutdown, self._pool, False, False)

    @property
    def max_workers(self):
        return self._pool.max_workers

    def submit(self, fn, /, *args, **kwargs):
        if not (callable(fn) or isinstance(fn, str)):
            raise TypeError(f"fn must be a callable or a 'package.module:qualname' string, "
                            f"got {type(fn).__name__}")
        if isinstance(fn, str) and (fn.count(":") != 1 or fn.startswith(":") or fn.endswith(":")):
            raise ValueError(f"a function reference must look like 'package.module:qualname', "
                             f"got {fn!r}")
        deps = _find_futures(args, []) + _find_futures(kwargs, [])
        fut = IsolatedFuture()
        self._pool.submit(_WorkItem(fut, fn, args, kwargs, deps))
        return fut

    def map(self, fn, *iterables, timeout=None, chunksize=1):
        if not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if chunksize == 1:
            return super().map(fn, *iterables, timeout=timeout)
        from ..worker import run_chunk
        chunks = _chunks(zip(*iterables), chunksize)
        results = super().map(run_chunk, itertools.repeat(fn), chunks, timeout=timeout)
        return itertools.chain.from_iterable(results)

    def shutdown(self, wait=True, *, cancel_futures=False):
        self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)
        if wait:
            self._finalizer.detach()

    def worker_pids(self):
        """PIDs of the live workers (for diagnostics and tests)."""
        with self._pool.lock:
            return sorted(w.pid for w in self._pool.workers if w.pid)

    def __repr__(self):
        p = self._pool
        state = "broken" if p.broken else "shut down" if p.shutting_down else "running"
        return (f"<IsolatedExecutor {self.name!r} env={p.wenv.label!r} workers={len(p.workers)}/"
                f"{p.max_workers} {state}>")


def _sandbox_arg(sandbox):
    from ..sandbox import Sandbox
    if sandbox is False:
        return None
    if not isinstance(sandbox, Sandbox):
        raise TypeError(f"sandbox must be a comfy_env.Sandbox, False or None, not {sandbox!r}")
    return sandbox


class _ByValue:
    """An initializer pickled by value for a foreign env (see ``_by_reference``)."""

    def __init__(self, blob):
        self.blob = blob

    def __call__(self, *args):
        return cloudpickle.loads(self.blob)(*args)


def _chunks(it, size):
    it = iter(it)
    while True:
        chunk = tuple(itertools.islice(it, size))
        if not chunk:
            return
        yield chunk


def _shutdown_all_at_exit():
    # Like concurrent.futures: let submitted work finish, then stop the workers.
    for pool in list(_live_pools):
        try:
            pool.shutdown(wait=True)
        except Exception:
            pass


if hasattr(threading, "_register_atexit"):
    threading._register_atexit(_shutdown_all_at_exit)
else:  # pragma: no cover
    import atexit
    atexit.register(_shutdown_all_at_exit)
