"""RayExecutor: ``concurrent.futures.Executor`` whose calls are Ray tasks.

Ray schedules, starts worker processes and moves the data; this module keeps the
``concurrent.futures`` contract on top of it::

    submit ──> [waiting]  futures among the arguments not handed to Ray yet
                  │ all handed to Ray (their ObjectRefs exist) or, for foreign futures, done
                  v
               [pending]  FIFO; leaves when fewer than max_workers calls are in flight
                  │ f.remote(...) -> (status_ref, value_ref); future is now "running"
                  v
               [in flight] status_ref completes (Ray's callback thread) -> future done

Each task has two returns: a tiny status and the value.  Completing the future
needs only the status, so a result is fetched into the driver only when somebody
calls ``result()``; a future passed to another ``submit`` goes as its value's
``ObjectRef``, and Ray moves the data worker to worker.  Errors complete the
future at once (the status ref carries them), so ``wait(FIRST_EXCEPTION)`` and
``as_completed`` behave as in the standard library.
"""
from __future__ import annotations

import collections
import heapq
import itertools
import logging
import queue
import re
import sys
import threading
import time
import types
import uuid
import weakref
from collections import deque
from concurrent.futures import BrokenExecutor, CancelledError, Executor, Future

import ray

from ..errors import CallTimeout, InitializerFailed, RemoteError, RemoteTraceback, WorkerCrashed
from ..executor.executor import _by_reference, _find_futures, _pickle_by_value
from ..executor.futures import decode_error
from ..ipc.calls import chain_chunk_results
from .runtime_env import cluster_runtime_env, local_runtime_env
from .task import ByValue, Carried, Keywords, run_call, run_chunk_call

__all__ = ["RayExecutor", "RayFuture", "writable"]

log = logging.getLogger("comfy_env.ray")

_UNSET = object()
_ANY = object()
_REMOTES_KEPT = 256        # remote functions cached per executor (one per distinct fn)
# A caller that saw its call's outcome waits this long for Ray's callback thread to
# complete the future before doing it itself (Ray shut down under it: none will come).
_CALLBACK_GRACE_S = 1.0
_tls = threading.local()   # .completing: the executor whose future this thread is completing


class RayFuture(Future):
    """A ``concurrent.futures.Future`` for a Ray task.

    ``object_ref`` is the ``ray.ObjectRef`` of the call's value once the call has
    been handed to Ray (None before); the first of ``result()`` or ``exception()`` to
    look at a call that succeeded fetches it.  ``fetches`` counts those fetches (a
    chain that never asked for a result shows 0).

    A value can arrive intact and still fail to unpickle here (a class only the
    worker's env can import): the future is then that error, for both accessors,
    as an ``IsolatedFuture`` whose result fails to decode.  The outcome of the
    fetch lives in ``_fetched`` (None until fetched, then ``(True, value)`` or
    ``(False, exception)``), guarded by ``_fetch_lock``, so every caller gets the
    same value or the same exception object.  Chains never fetch: they take
    ``object_ref`` (and ask the base class, not ``exception()``, whether the call failed).
    """

    def __init__(self):
        super().__init__()
        self.object_ref = None
        self.fetches = 0
        self._fetched = None
        self._fetch_lock = threading.Lock()
        self._dispatched = []         # callbacks run once object_ref is set
        self._direct = None           # (executor, item) while the task is in flight
        self._ray_id = None           # the Ray session holding the value (see _fetch)

    def cancel(self):
        if not super().cancel():
            return False
        # Calls of any executor waiting for this call's ObjectRef (chains) learn that it
        # will never come: they fail with CancelledError instead of waiting for ever.
        _notify_dispatched(self)
        return True

    def result(self, timeout=None):
        deadline = _deadline(timeout)
        self._wait_here(deadline, with_value=True)
        value = super().result(_left(deadline))
        if value is not _UNSET:
            return value
        ok, outcome = self._fetch()
        if ok:
            return outcome
        raise outcome

    def exception(self, timeout=None):
        deadline = _deadline(timeout)
        self._wait_here(deadline, with_value=False)
        exc = super().exception(_left(deadline))
        if exc is not None:
            return exc
        # The call succeeded, but its value may not unpickle here: like result(), look
        # (the first of the two fetches; the outcome is fixed from then on).
        ok, outcome = self._fetch()
        return None if ok else outcome

    def _wait_here(self, deadline, with_value):
        """Wait for the task in this thread, with ``ray.get``: ``result()`` needs only the
        value's ``ray.get``, which also brings the value.

        The future itself is completed by Ray's callback thread (``_on_status``), which
        runs its done-callbacks after waking us, as the standard library's executors
        run them on their own thread: a callback never runs inside this ``result()``
        (one that takes a lock the caller holds would deadlock).  Only if that thread
        does not come (Ray was shut down under us) does this one complete it.
        """
        direct = self._direct
        if direct is None or self.done():
            return
        executor, item = direct
        if not ray.is_initialized():
            executor._fail_all_ray_gone()     # and ray.get would start a new local Ray
            return
        try:
            if with_value:
                # The value ref fails exactly when the status ref does.
                fetched = _get_value(self.object_ref, _left(deadline))
                if not fetched[0]:
                    # The value arrived but does not unpickle here: this future's outcome
                    # once done; the call's own outcome is the status's.
                    ray.get(item.status_ref, timeout=_left(deadline))
                with self._fetch_lock:
                    if self._fetched is None:
                        self.fetches += 1
                        self._fetched = fetched
            else:
                ray.get(item.status_ref, timeout=_left(deadline))
            exc = None
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError() from None
        except Exception as e:          # the call's outcome (KeyboardInterrupt is ours)
            if not executor._ray_alive():
                executor._fail_all_ray_gone()
                return
            exc = e
        left = _left(deadline)
        with self._condition:
            self._condition.wait_for(self.done, _CALLBACK_GRACE_S if left is None else min(left, _CALLBACK_GRACE_S))
        if not self.done():
            # Ray's callback thread has not come (a busy Ray, or one shut down under us):
            # complete the future from a thread of our own, so that its done-callbacks
            # still never run inside this result() (the caller may hold their lock).
            threading.Thread(target=executor._complete, args=(item, exc), daemon=True,
                             name="comfy_env-ray-complete").start()
            with self._condition:
                self._condition.wait_for(self.done, _left(deadline))

    def _fetch(self):
        """``(True, value)`` or ``(False, exception)``: fetched once, under the lock, and
        the same from then on (a concurrent caller waits for the first one's fetch)."""
        with self._fetch_lock:
            if self._fetched is None:
                self._fetched = self._fetch_now()
            return self._fetched

    def _fetch_now(self):
        if self._ray_id is not None and (not ray.is_initialized() or _ray_identity() != self._ray_id):
            # ray.get would start a new local Ray, which has no such object.
            return False, RuntimeError(
                "this call's value was in the object store of a Ray session that has "
                "ended (ray.shutdown(), or the cluster went away) before it was read: "
                "call result() before shutting Ray down")
        self.fetches += 1
        try:
            return _get_value(self.object_ref)
        except Exception as exc:        # KeyboardInterrupt may be Ctrl-C: the outcome stays open
            return False, _convert(exc, None)


def _get_value(ref, timeout=None):
    """``ray.get`` of a call's value: ``(True, value)``, or ``(False, error)`` where the
    value arrived but does not unpickle here (the unpickling's own error, as
    IsolatedExecutor gives it, where Ray wraps it); Ray's other errors are raised."""
    try:
        return True, ray.get(ref, timeout=timeout)
    except ray.exceptions.RaySystemError as exc:
        cause = getattr(exc, "client_exc", None)
        if not isinstance(cause, BaseException):
            raise
        return False, decode_error(cause)
    except (Exception, KeyboardInterrupt):
        raise
    except BaseException as exc:
        # Ray catches only Exception around unpickling: a value whose unpickling calls
        # sys.exit ends up here, and must not end the caller's thread.
        return False, decode_error(exc)


def _deadline(timeout):
    if timeout is None:
        return None
    return time.monotonic() + max(0.0, timeout)     # Executor.map passes what is left, maybe < 0


def _left(deadline):
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def writable(obj):
    """Make what Ray returned writable: read-only numpy arrays (anywhere in lists,
    tuples or dicts) are copied; everything else is returned as is.

    Ray hands out numpy arrays that view its shared object store, read-only so
    that no reader can change an object others may read too.  Copy the ones you
    want to modify in place (this is that copy, and nothing more).
    """
    t = type(obj)
    if t in (list, tuple):
        return t(writable(x) for x in obj)
    if t is dict:
        return {k: writable(v) for k, v in obj.items()}
    flags = getattr(obj, "flags", None)
    if flags is not None and hasattr(obj, "copy") and not getattr(flags, "writeable", True):
        return obj.copy()
    return obj


class _Item:
    __slots__ = ("future", "fn", "chunk", "args", "kwargs", "deps", "status_ref", "deadline",
                 "timed_out", "seq")

    def __init__(self, future, fn, chunk, args, kwargs, deps, seq):
        self.future = future
        self.fn = fn
        self.chunk = chunk
        self.args = args
        self.kwargs = kwargs
        self.deps = deps
        self.status_ref = None
        self.deadline = None
        self.timed_out = False
        self.seq = seq


class _Chunk:
    """``map(chunksize=N)``: marks a submit whose one argument is a tuple of argument tuples."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn


def _connect(address):
    if ray.is_initialized():
        return
    # address=None: Ray itself connects to RAY_ADDRESS, or starts a local Ray.
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=True)


def _is_multi_node(address):
    if isinstance(address, str) and address.startswith("ray://"):
        return True   # a client: the driver's machine is not a node of the cluster
    try:
        return sum(1 for n in ray.nodes() if n.get("Alive")) > 1
    except Exception:
        return False


def _task_for(fn, setup, chunk, nested):
    """The Ray task body of one executor, for one function or (``fn=_ANY``) for any.

    A function that pickles by reference (a module-level function, a
    ``"module:qualname"`` string) rides in the task's definition, which Ray exports
    once, instead of being pickled into every call's arguments: a warm call then costs
    what a plain ``ray.remote`` call costs.  Anything else (lambdas, closures, callable
    objects, functions travelling by value) may change between calls, so it goes with
    each call, as ``IsolatedExecutor`` sends it.  ``nested`` (refs below the top
    level of the arguments, resolved by the task) is part of the definition too:
    Ray serializes every task argument separately, and even a flag costs.  Two
    returns: a tiny status that completes the future, and the value, fetched only
    when asked for.
    """
    if fn is _ANY:
        if chunk:
            def call(fn, items):
                return True, run_chunk_call(fn, setup, nested, items)
        else:
            def call(fn, /, *args, **kwargs):
                return True, run_call(fn, setup, nested, *args, **kwargs)
        return call
    if chunk:
        def call(items):
            return True, run_chunk_call(fn, setup, nested, items)
    else:
        def call(*args, **kwargs):
            return True, run_call(fn, setup, nested, *args, **kwargs)
    name = fn if isinstance(fn, str) else getattr(fn, "__qualname__", "call")
    call.__name__ = call.__qualname__ = str(name).replace(":", ".")
    return call


def _shipped_once(fn):
    """Is ``fn`` a module-level function (or a ``"module:qualname"`` string)?

    Such a function is exported to Ray once per executor, as ``@ray.remote`` exports
    a function: when it travels by value (defined in ``__main__``, or for a foreign
    env) the globals it reads are captured at its first call.  Lambdas, closures,
    partials and callable objects may differ from call to call, so they go with each
    call (as IsolatedExecutor sends every callable).
    """
    if isinstance(fn, str):
        return True
    if not isinstance(fn, (types.FunctionType, types.BuiltinFunctionType)):
        return False
    mod = sys.modules.get(getattr(fn, "__module__", None) or "")
    if mod is None:
        return False
    obj = mod
    for part in getattr(fn, "__qualname__", "<").split("."):
        obj = getattr(obj, part, None)
    return obj is fn


class RayExecutor(Executor):
    """Run callables as Ray tasks, in ``env``, behind ``concurrent.futures``.

    ``env``: as for ``IsolatedExecutor`` (None: the driver's interpreter; an ``Env``,
    a ``comfy-env.toml``, an interpreter or env directory); see docs/ray.md for how it
    becomes a Ray ``runtime_env`` on one node and on a cluster.
    ``max_workers``: calls in flight at once (None: as many as the cluster's
    resources allow; Ray queues the rest).  ``address``: None connects to
    ``RAY_ADDRESS`` or starts a local Ray; ``"auto"`` or ``"ray://host:port"`` as
    ``ray.init`` takes them (ignored when Ray is already initialised in this process).
    ``num_cpus`` / ``num_gpus``: the resources of each call's task.
    ``call_timeout``: seconds a call may take once handed to Ray; then its task is
    cancelled with force (its worker process is killed) and the future raises
    :class:`~comfy_env.errors.CallTimeout`.  ``initializer(*initargs)`` runs once in
    each Ray worker process before its first call of this executor.
    """

    def __init__(self, env=None, max_workers=None, *, address=None, num_cpus=1, num_gpus=0,
                 call_timeout=None, initializer=None, initargs=()):
        if max_workers is not None and (not isinstance(max_workers, int) or isinstance(max_workers, bool)
                                        or max_workers < 1):
            raise ValueError(f"max_workers must be greater than 0 (an int, or None), got {max_workers!r}")
        if call_timeout is not None and (not isinstance(call_timeout, (int, float))
                                         or isinstance(call_timeout, bool) or call_timeout <= 0):
            raise ValueError(f"call_timeout must be a positive number of seconds or None, "
                             f"got {call_timeout!r}")
        for name, value in (("num_cpus", num_cpus), ("num_gpus", num_gpus)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if initializer is not None and not (callable(initializer) or isinstance(initializer, str)):
            raise TypeError(f"initializer must be callable or a 'module:qualname' string, "
                            f"got {initializer!r}")
        _connect(address)
        self.multi_node = _is_multi_node(address)
        self.runtime_env = cluster_runtime_env(env) if self.multi_node else local_runtime_env(env)
        # In the driver's interpreter on its own machine, workers see the driver's
        # sys.path (local_runtime_env) and import the user's modules by reference;
        # anywhere else functions of modules the workers may not import (the user's
        # scripts, tests) travel by value.
        self._by_value = env is not None or self.multi_node
        self._init = None
        if initializer is not None:
            token = uuid.uuid4().hex
            self._init = (token, self._encode_fn(initializer), tuple(initargs))
            # Ray hands a worker process to any task of the same runtime_env, so two
            # executors would share what their initializers set up (each its own model
            # in a global, say).  A runtime_env of its own gives this executor worker
            # processes of its own, as each IsolatedExecutor has.
            self.runtime_env = {**self.runtime_env,
                                "env_vars": {**self.runtime_env.get("env_vars", {}),
                                             "COMFY_ENV_RAY_EXECUTOR": token}}
        self.max_workers = max_workers
        self.call_timeout = call_timeout
        options = dict(num_cpus=num_cpus, num_gpus=num_gpus, num_returns=2, max_retries=0,
                       retry_exceptions=False)
        if self.runtime_env:
            options["runtime_env"] = self.runtime_env
        if "py_executable" in self.runtime_env and not self.multi_node:
            # The env was built on this machine: its interpreter exists only here, so
            # the calls stay here even if more nodes join the cluster later.
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                ray.get_runtime_context().get_node_id(), soft=False)
        self._options = options
        self._remotes = collections.OrderedDict()     # (fn, chunk) -> remote function
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._waiting = []
        self._pending = deque()
        self._inflight = {}           # status_ref -> item
        self._deadlines = []          # heap of (deadline, seq, item)
        self._seq = itertools.count()
        self._shutdown = False
        self._broken = None
        self._watchdog = None
        self._wake = threading.Event()
        # Outcomes Ray reported, completed (done-callbacks included) on this executor's
        # own thread: Ray has one callback thread for the whole process, and a callback
        # waiting for another executor's calls must not hold up every future (_on_status).
        self._outcomes = queue.SimpleQueue()
        self._completer = None
        self._ray_id = _ray_identity()    # the Ray session our tasks belong to
        _live.add(self)

    # -- submitting ------------------------------------------------------------------
    def _encode_fn(self, fn):
        if isinstance(fn, str) or not self._by_value or _by_reference(fn):
            return fn
        return ByValue(_pickle_by_value(fn))

    def _remote_for(self, fn, chunk, nested):
        """(remote function, leading arguments) for a call of ``fn``."""
        once = _shipped_once(fn)
        key = (fn if once else _ANY, chunk, nested)
        with self._lock:
            remote = self._remotes.get(key)
            if remote is not None:
                self._remotes.move_to_end(key)
        if remote is not None and once:
            return remote, ()
        enc = self._encode_fn(fn)
        if remote is None:
            remote = ray.remote(_task_for(enc if once else _ANY, self._init, chunk, nested))
            remote = remote.options(**self._options)
            with self._lock:
                self._remotes[key] = remote
                while len(self._remotes) > _REMOTES_KEPT:
                    self._remotes.popitem(last=False)
        return remote, (() if once else (enc,))

    def submit(self, fn, /, *args, **kwargs):
        chunk = isinstance(fn, _Chunk)
        if chunk:
            fn = fn.fn
        if not (callable(fn) or isinstance(fn, str)):
            raise TypeError(f"fn must be a callable or a 'package.module:qualname' string, "
                            f"got {type(fn).__name__}")
        if isinstance(fn, str) and (fn.count(":") != 1 or fn.startswith(":") or fn.endswith(":")):
            raise ValueError(f"a function reference must look like 'package.module:qualname', "
                             f"got {fn!r}")
        deps = _find_futures(args, []) + _find_futures(kwargs, [])
        future = RayFuture()
        item = _Item(future, fn, chunk, args, kwargs, deps, next(self._seq))
        with self._lock:
            if self._broken is not None:
                raise BrokenExecutor(f"this RayExecutor is broken: {self._broken}")
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if deps:
                self._waiting.append(item)
            else:
                self._pending.append(item)
        for dep in deps:
            if isinstance(dep, RayFuture) and self.call_timeout is None:
                with dep._fetch_lock:
                    handed = dep.object_ref is not None or dep.done()
                    if not handed:
                        dep._dispatched.append(self._pump)
            else:
                dep.add_done_callback(lambda _f: self._pump())
        self._pump()
        return future

    def map(self, fn, *iterables, timeout=None, chunksize=1):
        if not isinstance(chunksize, int) or isinstance(chunksize, bool) or chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if chunksize == 1:
            return super().map(fn, *iterables, timeout=timeout)
        from ..executor.executor import _chunks
        results = super().map(_Chunk(fn), _chunks(zip(*iterables), chunksize), timeout=timeout)
        return chain_chunk_results(results)

    # -- scheduling ----------------------------------------------------------------------
    def _pump(self):
        """Move ready calls on to Ray while there is room; called after every change."""
        while True:
            with self._lock:
                still = []
                cancelled = []
                for item in self._waiting:
                    if item.future.cancelled():
                        cancelled.append(item)
                        continue
                    ready = _deps_ready(item, need_done=self.call_timeout is not None)
                    (self._pending if ready else still).append(item)
                self._waiting = still
                item = None
                while self._pending and (self.max_workers is None
                                         or len(self._inflight) < self.max_workers):
                    cand = self._pending.popleft()
                    if cand.future.set_running_or_notify_cancel():
                        item = cand
                        # Reserve the slot before leaving the lock: .remote() runs outside it.
                        self._inflight[item] = item
                        break
                if item is None:
                    self._idle.notify_all()
            for c in cancelled:
                # Tell wait() and as_completed(): Future.cancel() alone does not (it told
                # the chained calls waiting for it: RayFuture.cancel).
                try:
                    c.future.set_running_or_notify_cancel()
                except RuntimeError:
                    pass                # told already
            if item is None:
                return
            self._dispatch(item)

    def _dispatch(self, item):
        future = item.future
        try:
            failed = next((d for d in item.deps if d.done()
                           and (d.cancelled() or _call_failure(d) is not None)), None)
            if failed is not None:
                raise _call_failure(failed) if not failed.cancelled() else CancelledError(
                    "a future this call takes as an argument was cancelled")
            args, nested = _refs(item.args)
            kwargs, nested_kw = _refs(item.kwargs)
            if "self" in kwargs:
                # Ray's .remote(self, ...) would take it: the keywords go as one argument
                # (refs among them are then resolved by the task, like nested ones).
                args = tuple(args) + (Keywords(kwargs),)
                nested_kw = nested_kw or _has_ref(dict(kwargs))
                kwargs = {}
            remote, lead = self._remote_for(item.fn, item.chunk, nested or nested_kw)
            status_ref, value_ref = remote.remote(*lead, *args, **kwargs)
        except BaseException as exc:
            with self._lock:
                self._inflight.pop(item, None)
            future.set_exception(exc)
            _notify_dispatched(future)
            self._pump()
            return
        item.args = item.kwargs = item.fn = None
        with self._lock:
            del self._inflight[item]
            item.status_ref = status_ref
            self._inflight[status_ref] = item
            if self.call_timeout is not None:
                item.deadline = time.monotonic() + self.call_timeout
                heapq.heappush(self._deadlines, (item.deadline, item.seq, item))
            self._start_watchdog()      # deadlines, and Ray going away under the calls
        with future._fetch_lock:
            future.object_ref = value_ref
        _notify_dispatched(future)
        future._direct = (self, item)
        future._ray_id = self._ray_id
        status_ref.future().add_done_callback(lambda rf, item=item: self._on_status(item, rf))

    def _on_status(self, item, status_future):
        """Ray's callback thread: the call ended (value stored, raised, crashed or
        cancelled).  Handed to this executor's completer thread (see ``_outcomes``)."""
        self._outcomes.put((item, status_future))
        with self._lock:
            if self._completer is None:
                self._completer = threading.Thread(target=self._complete_outcomes, daemon=True,
                                                   name="comfy_env-ray-completer")
                self._completer.start()

    def _complete_outcomes(self):
        """The completer thread: completes what Ray reported, in order; leaves once the
        executor is shut down with nothing in flight (a later outcome starts another)."""
        while True:
            try:
                item, status_future = self._outcomes.get(timeout=0.5)
            except queue.Empty:
                with self._lock:
                    if self._outcomes.empty() and (self._shutdown or self._broken) and not self._inflight:
                        self._completer = None
                        return
                continue
            try:
                exc = status_future.exception()
            except BaseException as e:      # cancelled ray future
                exc = e
            try:
                self._complete(item, exc)
            except Exception:
                log.exception("comfy_env: completing a Ray call failed")

    # -- Ray going away under us -----------------------------------------------------------
    def _ray_alive(self):
        return ray.is_initialized() and _ray_identity() == self._ray_id

    def _fail_all_ray_gone(self):
        """Ray was shut down (or restarted) under this executor: its tasks' outcomes will
        never arrive, so every call not done fails (as ProcessPoolExecutor's calls do when
        its pool breaks) and the executor is broken."""
        err = BrokenExecutor("Ray was shut down (ray.shutdown(), or the cluster went away) while "
                             "this RayExecutor had calls in flight; make a new RayExecutor once "
                             "Ray runs again")
        with self._lock:
            if self._broken is None:
                self._broken = err
            items = list(self._inflight.values()) + list(self._pending) + self._waiting
            self._inflight.clear()
            self._pending.clear()
            self._waiting = []
            self._deadlines = []
            self._idle.notify_all()
        for item in items:
            f = item.future
            f._direct = None
            try:
                if f.running() or (not f.done() and f.set_running_or_notify_cancel()):
                    f.set_exception(err)
            except Exception:
                pass                    # cancelled, or completed meanwhile
            _notify_dispatched(f)

    def _complete(self, item, exc):
        """Complete the call's future from Ray's outcome; the first caller wins (Ray's
        callback thread, or a thread waiting in ``result()``, see RayFuture._wait_here)."""
        future = item.future
        with self._lock:
            if self._inflight.pop(item.status_ref, None) is None:
                return
        future._direct = None
        if exc is not None:
            try:
                exc = _convert(exc, item)
            except BaseException as bug:   # never leave the future hanging
                bug.__cause__ = exc
                exc = bug
        with self._lock:
            if isinstance(exc, InitializerFailed) and self._broken is None:
                self._broken = exc
                doomed = list(self._pending) + self._waiting
                self._pending.clear()
                self._waiting = []
            else:
                doomed = []
        if exc is not None and future.object_ref is not None:
            # The value ref holds the same error; Ray logs errors nobody retrieved
            # ("Unhandled error") when such a ref goes away.  It has been reported.
            try:
                future.object_ref.future()
            except Exception:
                pass
        if not future.done():           # a timed-out call was completed by the watchdog
            # Its done-callbacks run in set_*: a shutdown(wait=True) there must not wait
            # for this very thread (see shutdown).
            outer, _tls.completing = getattr(_tls, "completing", None), self
            try:
                if exc is None:
                    future.set_result(_UNSET)
                else:
                    future.set_exception(exc)
            finally:
                _tls.completing = outer
        for other in doomed:
            if other.future.set_running_or_notify_cancel():
                other.future.set_exception(BrokenExecutor(f"this RayExecutor is broken: {exc}"))
            _notify_dispatched(other.future)
        self._pump()

    # -- call_timeout ------------------------------------------------------------------
    def _start_watchdog(self):
        self._wake.set()
        if self._watchdog is None:
            self._watchdog = threading.Thread(target=self._watch, name="comfy_env-ray-watchdog",
                                              daemon=True)
            self._watchdog.start()

    def _watch(self):
        while True:
            if not self._ray_alive():
                self._fail_all_ray_gone()
            with self._lock:
                if not self._deadlines and not self._inflight:
                    # Nothing to watch: the thread ends (and holds no reference to the
                    # executor); the next call in flight starts another.
                    self._watchdog = None
                    return
                now = time.monotonic()
                expired = []
                while self._deadlines and self._deadlines[0][0] <= now:
                    _, _, item = heapq.heappop(self._deadlines)
                    if item.status_ref in self._inflight and not item.future.done():
                        item.timed_out = True
                        expired.append(item)
                delay = self._deadlines[0][0] - now if self._deadlines else 0.5
                self._wake.clear()
            for item in expired:
                item.future.set_exception(CallTimeout(
                    f"the call ran longer than call_timeout={self.call_timeout}s; its Ray task "
                    f"was cancelled with force (its worker process killed)"))
                try:
                    ray.cancel(item.status_ref, force=True)
                except Exception:
                    pass    # already finished: its callback frees the slot
            self._wake.wait(min(delay, 0.5))

    # -- shutting down -----------------------------------------------------------------
    def shutdown(self, wait=True, *, cancel_futures=False):
        if wait and getattr(_tls, "completing", None) is self:
            # A done-callback of one of our calls, on Ray's callback thread (or a caller
            # completing a call): that thread completes the calls this would wait for.
            # ThreadPoolExecutor raises here too; the shutdown itself goes ahead.
            self.shutdown(wait=False, cancel_futures=cancel_futures)
            raise RuntimeError(
                "shutdown(wait=True) was called from a done-callback, which runs on the "
                "thread that completes this executor's calls: it would wait for itself. "
                "The executor is shutting down; call shutdown(wait=False) from callbacks, "
                "or wait from another thread")
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                doomed = list(self._pending) + self._waiting
                self._pending.clear()
                self._waiting = []
            else:
                doomed = []
        for item in doomed:
            if item.future.cancel():      # (it tells the chained calls waiting for it)
                # Cancelled *and notified*: wait() and as_completed() count it as done.
                item.future.set_running_or_notify_cancel()
        self._wake.set()
        if wait:
            while True:
                with self._lock:
                    if not (self._pending or self._waiting or self._inflight):
                        break
                    self._idle.wait(0.5)
                if not self._ray_alive():
                    self._fail_all_ray_gone()    # nothing will complete: fail what is left

    def __repr__(self):
        state = "broken" if self._broken else "shut down" if self._shutdown else "running"
        env = self.runtime_env.get("py_executable") or ("uv" if "uv" in self.runtime_env else "driver")
        return (f"<RayExecutor env={env!r} in_flight={len(self._inflight)} "
                f"max_workers={self.max_workers} {state}>")


def _ray_identity():
    """Which Ray session this process is connected to: (job, node) ids, or None."""
    try:
        ctx = ray.get_runtime_context()
        return (ctx.get_job_id(), ctx.get_node_id())
    except Exception:
        return None


_live = weakref.WeakSet()


def _shutdown_all_at_exit():
    # As concurrent.futures (and IsolatedExecutor): calls submitted before the
    # interpreter exits still run, including those waiting in an executor for a slot.
    # threading's exit hooks run before atexit's, so Ray is still connected here.
    for ex in list(_live):
        try:
            ex.shutdown(wait=True)
        except Exception:
            pass


threading._register_atexit(_shutdown_all_at_exit)


def _notify_dispatched(future):
    with future._fetch_lock:
        callbacks, future._dispatched = future._dispatched, []
    for cb in callbacks:
        cb()


def _call_failure(dep):
    """A done input's exception.  A RayFuture's own call only: its value goes on as its
    ObjectRef, so whether it unpickles in the driver is no concern of the chain, and
    ``exception()`` would fetch it."""
    return Future.exception(dep) if isinstance(dep, RayFuture) else dep.exception()


def _deps_ready(item, need_done):
    """Can the call go to Ray?  A chained RayFuture needs only its ObjectRef (Ray waits
    for the value), unless call_timeout is set: then the call waits here until its
    inputs are done, so its clock does not run while an earlier call still computes them."""
    for d in item.deps:
        if isinstance(d, RayFuture) and not need_done:
            if d.object_ref is None and not d.done():
                return False
        elif not d.done():
            return False
    return True


def _swap(obj, depth=0):
    """Futures -> what the task receives: a RayFuture's ObjectRef, another future's result."""
    if isinstance(obj, RayFuture):
        if obj.object_ref is None:      # cancelled or failed before reaching Ray
            raise obj.exception() if not obj.cancelled() else CancelledError(
                "a future this call takes as an argument was cancelled")
        return obj.object_ref
    if isinstance(obj, Future):
        return obj.result()
    if depth >= 20:
        return obj
    t = type(obj)
    if t in (list, tuple, set, frozenset):
        return t(_swap(x, depth + 1) for x in obj)
    if t is dict:
        return {k: _swap(v, depth + 1) for k, v in obj.items()}
    return obj


def _refs(container):
    """Swap futures for refs; and say whether any ref sits below the top level
    (Ray resolves only top-level task arguments; the task resolves the others)."""
    if not _find_futures(container, []):
        return container, False
    if isinstance(container, dict):
        out = {k: _swap(v) for k, v in container.items()}
        values = out.values()
    else:
        out = tuple(_swap(v) for v in container)
        values = out
    nested = any(not isinstance(v, ray.ObjectRef) and _has_ref(v) for v in values)
    return out, nested


def _has_ref(obj, depth=0):
    if isinstance(obj, ray.ObjectRef):
        return True
    if depth < 20 and type(obj) in (list, tuple, set, frozenset):
        return any(_has_ref(x, depth + 1) for x in obj)
    if depth < 20 and type(obj) is dict:
        return any(_has_ref(x, depth + 1) for x in obj.values())
    return False


# Ray's ways of saying that the process running a task is gone.
_CRASHES = tuple(getattr(ray.exceptions, n) for n in (
    "WorkerCrashedError", "NodeDiedError", "LocalRayletDiedError", "OwnerDiedError",
    "ObjectLostError", "OutOfMemoryError") if hasattr(ray.exceptions, n))


# Ray's stand-in for a task exception that could not be unpickled in the driver.
_UNSERIALIZABLE = getattr(ray.exceptions, "UnserializableException", None)


def _failed_input(item):
    """What a failed future among ``item``'s arguments raised, or None if none is known
    to have failed yet.  A producer cancelled for its ``call_timeout`` is known by its
    item before its future completes; one that crashed may not be done yet (the caller
    then maps Ray's error type)."""
    for dep in item.deps:
        direct = getattr(dep, "_direct", None)
        if direct is not None and direct[1].timed_out:
            return CallTimeout("a call this one takes as an argument ran longer than its call_timeout; "
                               "its Ray task was cancelled")
        if dep.done() and not dep.cancelled():
            err = Future.exception(dep)         # the outcome alone: no Ray wait
            if err is not None:
                return err
    return None


def _convert(exc, item):
    """A Ray exception -> what IsolatedExecutor would raise for the same failure."""
    from ..envs.errors import EnvBuildError

    if item is not None and item.timed_out:
        return CallTimeout("the call ran longer than call_timeout; its Ray task was cancelled")
    if isinstance(exc, ray.exceptions.RayTaskError):
        # Ray raises a "dual" instance (a subclass of RayTaskError and the cause's
        # type) whose __getattr__ forwards to the cause; its str() is Ray's text of
        # the remote traceback, which RayTaskError itself keeps in traceback_str.
        cause = exc.__dict__.get("cause")
        tb = exc.__dict__.get("traceback_str") or str(exc)
        system = isinstance(cause, ray.exceptions.RayError) and not isinstance(cause, ray.exceptions.RayTaskError)
        failed = _failed_input(item) if system and item is not None else None
        if failed is not None:
            # A future among the arguments failed (Ray reports it as this task's own
            # error, by Ray's type): the call fails as that future did.
            return failed
        if system and isinstance(cause, _CRASHES):
            err = WorkerCrashed(f"the Ray worker running a call this one takes as an argument died: "
                                f"{type(cause).__name__}")
        elif system and isinstance(cause, ray.exceptions.TaskCancelledError):
            err = CancelledError("the Ray task of a call this one takes as an argument was cancelled")
        elif system and isinstance(getattr(cause, "client_exc", None), BaseException):
            # An argument (a chained value) arrived but did not unpickle in the worker:
            # the unpickling's own error, as IsolatedExecutor's worker reports it.
            err = decode_error(cause.client_exc)
        elif system:
            # Ray's stand-in for an exception that could not be pickled; its message
            # names the original type ("Exception mod.Type isn't serializable: ...").
            m = re.search(r"Exception (\S+) isn't serializable", str(cause))
            err = RemoteError(m.group(1) if m else type(cause).__name__,
                              str(cause).split("\n")[0], tb)
        elif isinstance(cause, Carried):
            err = cause.exc
        elif isinstance(cause, BaseException):
            err = cause
        else:
            err = RemoteError(type(exc).__name__, str(exc), tb)
        err.__cause__ = RemoteTraceback(tb)
        return err
    if _UNSERIALIZABLE is not None and isinstance(exc, _UNSERIALIZABLE):
        # The task's exception pickled but cannot be rebuilt here (its __init__ takes
        # other arguments than its args): Ray's message carries the remote traceback,
        # whose last line names the type and the message, as RemoteError keeps them.
        tb = re.sub(r"\x1b\[[0-9;]*m", "", str(exc).split("Original exception:\n", 1)[-1]).strip()
        name, _, msg = (tb.splitlines()[-1] if tb else "").partition(": ")
        err = RemoteError(name or "Exception", msg, tb)
        err.__cause__ = RemoteTraceback(tb)
        return err
    if isinstance(exc, ray.exceptions.RuntimeEnvSetupError):
        err = EnvBuildError(f"Ray could not set up the call's environment: {exc}")
        err.__cause__ = exc
        return err
    if isinstance(exc, _CRASHES):
        err = WorkerCrashed(f"the Ray worker running the call died: {type(exc).__name__}: {exc}")
        err.__cause__ = exc
        return err
    if isinstance(exc, ray.exceptions.TaskCancelledError):
        err = CancelledError("the call's Ray task was cancelled")
        err.__cause__ = exc
        return err
    return exc
