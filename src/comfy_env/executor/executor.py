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
  replaced when there is work for it.  A worker that fails to start is tried
  once more after a back-off (the OOM killer may have picked it); a second
  failure in a row, a failed initializer, a protocol mismatch, or a start that
  ran past ``start_timeout`` breaks the executor: restarting would fail the
  same way forever.
* One timer thread per executor (``_Timer``, started on demand) enforces
  ``call_timeout`` and ``start_timeout`` and fires start retries.  Its entries
  name a call by id, never the work item: a finished call must not stay
  reachable (with its result) until its deadline.

Who dispatches the next call: the thread that made a call ready -- the caller's
thread in ``submit``, a worker's reader after its handshake (``on_ready``) and after
each result (``on_idle``, before it sets that result's future), a done-callback when a chained call's last input finishes,
the timer thread after a start retry.  The other threads that move state: the
keeper (starts workers, reports their exits), each worker's output pump, the
ledger's flusher (sends releases).  docs/architecture.md, "Threads", has them all.

Locks: ``_Pool.lock`` guards the scheduling state only.  Nothing that talks to
a worker (sends, kills, joins) runs under it, and no future is completed under
it (its callbacks run user code).

Exit: at interpreter exit the executors that were not shut down finish their
calls, as concurrent.futures' do -- unless the program is ending on a
KeyboardInterrupt (or one arrives while exit waits): then queued calls are
cancelled, running calls fail with CancelledError and the workers are killed,
so one Ctrl-C ends the program at once.  Leaving a ``with`` block on a
KeyboardInterrupt does the same.  (In an interactive session ``sys.last_value``
keeps the last uncaught error, so an earlier Ctrl-C there also counts.)

Done-callbacks run on the thread that completed the future, usually a worker's
reader.  ``shutdown(wait=True)`` from there would wait for results that thread
reads: it raises RuntimeError instead (after starting the shutdown), as
ProcessPoolExecutor does.

All state lives in ``_Pool``; the executor object only holds it, so an
executor that is garbage collected without ``shutdown()`` is finalized.
"""
from __future__ import annotations

import dataclasses
import errno
import heapq
import itertools
import logging
import math
import os
import sys
import threading
import time
import weakref
from collections import deque
from concurrent.futures import BrokenExecutor, CancelledError, Executor, Future
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterable, Iterator

import cloudpickle

from .. import fncache, forksafe, settings
from ..envs import resolve_env
from ..errors import PicklingFailed, WorkerCrashed, WorkerStartError, rebuild_exception
from ..ipc import codec, interrupts, lifetime, numpy_names, planes  # noqa: F401  (planes: registers the data planes)
from ..ipc.calls import IMPORTING, chain_chunk_results, check_reference, run_chunk
from ..ipc.protocol import Call
from ..ipc.transport import FD_ADVICE, ChannelClosed, TooManyFds, check_frame, fd_limits
from . import launch
from .gpu_pinning import pin_environment
from .worker_allocator import allocator_environment
from .futures import IsolatedFuture
from ..zygote import Zygote
from .worker_handle import WORKER_OUTPUT_MODES, WorkerHandle
from .workitem import DEFAULT, Stage, WorkItem

__all__ = ["IsolatedExecutor"]

_names = itertools.count(1)
_live_pools = weakref.WeakSet()
_exit_started = False           # the at-exit shutdown runs: a failed start is not retried

DEFAULT_START_TIMEOUT = 300.0   # seconds: a cold import of torch plus an initializer loading a model
START_RETRY_BACKOFF = 1.0       # seconds before a failed worker start is tried once more
MAX_SEND_FAILURES = 2           # a call whose send failed this often fails (WorkerCrashed)
KEEP_INPUTS_MAX = 1 << 20       # a sent call keeps its inputs (to send again) up to this message size


# What a timer entry is for, besides a call (named by its call id).
_LONGEST_WAIT = 3600.0          # seconds the watchdog sleeps at most before it looks again
_START = "start"                # the worker must be ready by then
_RETRY = "retry"                # start a worker again (after a failed start)


class _Timer:
    """The executor's deadlines: ``call_timeout``, ``start_timeout``, start retries.

    One thread per executor, started on the first deadline.  An entry is
    ``(when, seq, worker, what)``; ``what`` is a call id, ``_START`` or ``_RETRY``
    (never the work item: see the module docstring).  Due entries go to
    ``_Pool.on_deadline``, outside this timer's lock.
    """

    def __init__(self, pool):
        self._pool = weakref.ref(pool)
        self._cond = threading.Condition()
        self._heap = []
        self._seq = itertools.count()
        self._thread = None
        self._stop = False

    def watch(self, worker):
        """The call just sent to ``worker`` must end by ``worker.deadline``."""
        item = worker.item
        if item is not None:
            self.at(worker.deadline, worker, item.call_id)

    def at(self, when, worker, what):
        """Call ``on_deadline(worker, what)`` at ``when``.  False if no timer can run
        (the interpreter is exiting): the caller must not count on it."""
        with self._cond:
            if self._stop:
                return False
            heapq.heappush(self._heap, (when, next(self._seq), worker, what))
            if self._thread is None:
                self._thread = lifetime.start_thread(self._run, "comfy_env-watchdog")
                if self._thread is None:
                    self._heap.clear()
                    return False
            self._cond.notify()
            return True

    def stop(self):
        """Stop the thread; returns how many start retries it dropped (unfired)."""
        with self._cond:
            self._stop = True
            dropped = sum(1 for entry in self._heap if entry[3] == _RETRY)
            self._heap.clear()
            self._cond.notify()
            return dropped

    def _run(self):
        while True:
            with self._cond:
                while True:
                    if self._stop:
                        return
                    if not self._heap:
                        self._cond.wait()
                        continue
                    when = self._heap[0][0]
                    now = time.monotonic()
                    if when <= now:
                        break
                    # Capped: a deadline years away (a huge timeout) would overflow the wait.
                    self._cond.wait(min(when - now, _LONGEST_WAIT))
                _, _, worker, what = heapq.heappop(self._heap)
            pool = self._pool()
            if pool is None:
                return
            try:
                pool.on_deadline(worker, what)
            except Exception:           # never let one bad entry end the timer
                pool.logger.exception("comfy_env: handling a deadline failed")
            del pool, worker


# Types that are never a future nor hold one: skipped without a call (a list of 128
# floats was 129 calls per submit).
_LEAVES = frozenset([int, float, str, bytes, bool, type(None), complex, bytearray])
_CONTAINERS = frozenset([list, tuple, set, frozenset])


def _find_futures(obj, out, depth=0):
    """Futures anywhere in args/kwargs (lists, tuples, dicts, sets): the call waits for them."""
    tp = type(obj)
    if tp in _CONTAINERS or tp is dict:
        if depth < 20:
            for x in (obj.values() if tp is dict else obj):
                if type(x) not in _LEAVES:
                    _find_futures(x, out, depth + 1)
    elif isinstance(obj, Future):
        out.append(obj)
    return out


class _InputsNotDone(Exception):
    """A call's encoding met futures that are not done (``futures``): it waits for them."""

    def __init__(self, futures):
        super().__init__(f"{len(futures)} input future(s) not done")
        self.futures = futures


class _Sink:
    __slots__ = ()

    def write(self, data):
        return len(data)


class _FutureFinder(cloudpickle.Pickler):
    """Walks what the Encoder would (cloudpickle's pass over the call), noting the futures
    that are not done; arrays, tensors and futures are not looked into."""

    def __init__(self):
        super().__init__(_Sink(), protocol=codec.PROTOCOL)
        self.pending = {}           # id -> future (pickle asks persistent_id at each reference)

    def persistent_id(self, obj):
        tp = type(obj)
        if tp in _CONTAINERS or tp in _LEAVES or tp is dict:
            return None
        if isinstance(obj, Future):
            if not obj.done():
                self.pending[id(obj)] = obj
            return 0
        if codec._plane_for(tp) is not None:
            return 0
        return None


def _pending_inputs(call):
    """The futures in ``call`` that are not done, wherever pickle finds them.  Only when
    the Encoder met one (rare: submit() waits for those it finds, see _find_futures), so
    every submit need not walk its arguments' objects."""
    finder = _FutureFinder()
    try:
        finder.dump(call)
    except Exception:
        pass            # something further on does not pickle: the next encode says so
    return list(finder.pending.values())


def _by_reference(fn):
    """Can a worker of a *foreign* env import ``fn`` by its module and qualname?"""
    mod = getattr(fn, "__module__", None)
    qual = getattr(fn, "__qualname__", "")
    if not mod or mod == "__main__" or "<" in qual:
        return False
    if mod in sys.builtin_module_names:
        return True             # compiled into every interpreter (sum, time.sleep, os.getpid)
    module = sys.modules.get(mod)
    if module is None:
        return False
    path = getattr(module, "__file__", None) or ""
    # Installed code (site-packages) is expected in the env too, and comfy_env
    # itself always is; anything else (the user's scripts, test modules) travels by value.
    return (mod.split(".")[0] == "comfy_env" or "site-packages" in path
            or "dist-packages" in path or path.startswith(sys.base_prefix))


_by_value_lock = threading.Lock()
_importable = {}        # module name -> whether a worker finds it by name (see below)


def _findable(modname, module):
    """Whether a worker of this interpreter, starting with the same ``sys.path``,
    imports ``module`` by its name ``modname``: an import system finder of this process
    finds that name by itself (``sys.modules`` aside: the path finder, an editable
    install's own finder, the builtin and frozen importers), and finds the same file
    (a module loaded from another path under a name that exists elsewhere, or under a
    standard module's name, is not what the worker would import)."""
    parent, _, _ = modname.rpartition(".")
    path = None
    if parent:
        package = sys.modules.get(parent)
        path = getattr(package, "__path__", None)
        if path is None or not _findable(parent, package):
            return False
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if find is None:
            continue
        try:
            spec = find(modname, path)
        except Exception:
            continue          # a finder that cannot answer for this name
        if spec is None:
            continue
        ours = getattr(module, "__file__", None)
        origin = spec.origin if spec.has_location else None
        return ours is None or origin is None or os.path.realpath(ours) == os.path.realpath(origin)
    return False


def _send_unimportable_by_value(fn):
    """Register ``fn``'s module with cloudpickle to travel by value when a worker of
    this interpreter could not import it by name: a module a plugin system loaded from
    a file path (``spec_from_file_location``) and put in ``sys.modules``, or one made in
    memory.  Pickled by name, it failed in the worker (``No module named ...``); by
    value it runs as ``__main__``'s functions do.  Decided once per module."""
    modname = getattr(fn, "__module__", None)
    if not modname or modname == "__main__" or modname in _importable:
        return
    module = sys.modules.get(modname)
    ok = module is None or modname in sys.builtin_module_names or _findable(modname, module)
    _importable[modname] = ok
    if not ok:
        with _by_value_lock:
            try:
                cloudpickle.register_pickle_by_value(module)
            except ValueError:
                pass


def _pickle_by_value(fn):
    mod = sys.modules.get(getattr(fn, "__module__", None) or "")
    # dumps_portable: numpy objects the function captures must load under another numpy.
    if mod is None or mod.__name__ == "__main__":
        return codec.dumps_portable(fn)
    with _by_value_lock:
        registered = False
        try:
            cloudpickle.register_pickle_by_value(mod)
            registered = True
        except ValueError:
            pass
        try:
            return codec.dumps_portable(fn)
        finally:
            if registered:
                cloudpickle.unregister_pickle_by_value(mod)


def _worker_spin_us(values, max_workers):
    """How long this pool's workers poll for their next call (worker.py, _SpinPolicy).

    Only where each worker can have a CPU and one is left over for the parent: polling
    workers that outnumber the CPUs take them from the workers that have calls to run
    (4 workers on 2 CPUs: 22 % fewer calls per second in a flood, measured).
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return values.worker_spin_us if max_workers < cpus else 0


class _Pool:
    def __init__(self, wenv, max_workers, init_payload, call_timeout, name, logger,
                 worker_log_level, worker_output="stream", start_timeout=DEFAULT_START_TIMEOUT,
                 preload=None, *, values):
        self.wenv = wenv
        # Workers fork from it when preload is given (see comfy_env.zygote).
        self.zygote = Zygote(wenv, preload, logger, start_timeout, output=worker_output,
                             name=name) if preload else None
        self.max_workers = max_workers
        self.init_payload = init_payload
        self.call_timeout = call_timeout
        self.start_timeout = start_timeout
        self.name = name
        self.logger = logger
        self.worker_log_level = worker_log_level
        self.worker_output = worker_output
        # Not re-entrant: nothing that holds it calls back into the pool.  A finalizer
        # (which the cycle collector may run on a thread inside it) never takes it:
        # see _finalize_pool.
        self.lock = threading.Lock()
        self.pending = deque()
        self.waiting = set()
        self.idle = []
        self.workers = set()
        self.starting = 0           # workers reserved but not started yet (and start retries)
        # Calls taken from the queue and not yet a worker's (being encoded and sent):
        # shutdown(wait=True) must not ask the workers to exit meanwhile.
        self.handing = 0
        self.start_failures = 0     # failed starts in a row (see _start_failed)
        self.start_failure_seq = 0  # failed starts counted so far (a worker notes it when made)
        self.doomed = set()         # workers we are killing: never handed a call again
        # At interpreter exit: stop at once instead of letting running calls finish (set
        # by the ComfyUI adapter: a node's result has nobody to go to once ComfyUI ends).
        self.stop_at_exit = False
        self.start_timed_out = set()    # ... because they ran past start_timeout
        self.broken = None
        self.shutting_down = False
        self.watchdog = _Timer(self)
        self.share_tensors_in_place = True
        self.settings = values         # read by IsolatedExecutor; sent to every worker
        self.worker_spin_us = _worker_spin_us(values, max_workers)
        self._worker_index = itertools.count(1)
        self.all_done = threading.Condition(self.lock)
        _live_pools.add(self)
        forksafe.track_pool(self)       # inert in fork children

    # -- submission ------------------------------------------------------------------
    # Queued and handed over as one step for a Ctrl-C (ipc/interrupts.py): a call is
    # never left queued by a submit() that raised, with no thread to hand it over.
    @interrupts.holds
    def submit(self, item):
        forksafe.check_owner(self)      # before the lock: a fork child must not touch it
        if not item.deps:
            with self.lock:
                self._check_open()
                if self.pending or not self.idle:
                    self.pending.append(item)
                    worker = None
                else:
                    # Nothing queued ahead of it and a worker idle (a warm call): handed
                    # over at once, as dispatch() would, with one lock round fewer.
                    worker = self.idle.pop()
                    self.handing += 1
            if worker is not None:
                self._handing_over(worker, item)
                if not self.pending and not self.shutting_down:
                    return      # dispatch()'s own unlocked look after a hand-over
            self.dispatch()
            return
        with self.lock:
            self._check_open()
            self.waiting.add(item)
        self._wait_for_deps(item)

    def _wait_for_deps(self, item):
        """``item`` (in ``waiting``) goes on once every future in ``item.deps`` is done."""
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

    def _check_open(self):
        if self.broken is not None:
            raise type(self.broken)(str(self.broken)) from self.broken
        if self.shutting_down:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if lifetime.exiting():
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    def _deps_ready(self, item):
        # The inputs are done: the item no longer needs to list them (it keeps
        # them in args until they are sent; see the comment in submit).
        deps, item.deps = item.deps, ()
        with self.lock:
            if item not in self.waiting:
                item.drop_inputs()
                return          # cancelled by shutdown
            self.waiting.discard(item)
        fut = item.future
        # An item that waited for inputs found only while it was encoded is running already.
        queued = item.stage is Stage.QUEUED
        for dep in deps:
            exc = _input_failure(dep)
            if exc is not None:
                if not queued or fut.set_running_or_notify_cancel():
                    err = _copy_exception(exc)
                    err.__cause__ = exc
                    fut.set_exception(err)
                # Drop the other inputs now (a diamond's good branch), and let
                # dispatch retire idle workers if shutdown(wait=False) was only
                # waiting for this call.
                item.drop_inputs()
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
            item.drop_inputs()
            if not queued or fut.set_running_or_notify_cancel():
                fut.set_exception(fail)
            return
        self.dispatch()

    # -- dispatch --------------------------------------------------------------------
    def dispatch(self):
        while True:
            more = self._dispatch_one()
            if more is not True:
                break
            if not self.pending and not self.shutting_down:
                # Unlocked look (the usual case, one call handed over): nothing queued is
                # left, and nothing to retire.  A call queued since is handed over by the
                # dispatch() of the submit() that queued it, and shutdown() dispatches
                # once it has set shutting_down.
                return
        retired, n = more
        for w in retired:
            w.request_exit()
        if n and self.zygote is not None and self.zygote.starts_on_next_fork:
            # The first fork starts the zygote, which runs the preload (seconds, or a
            # hang that start_timeout ends): not on the thread calling submit().
            for _ in range(n):
                if lifetime.start_thread(self._start_worker, "comfy_env-start") is None:
                    self._start_worker()        # interpreter exit: it fails the calls clearly
            return
        for _ in range(n):
            self._start_worker()

    # On the main thread one call's hand-over (taking it from the queue, encoding it,
    # sending it) is one step that a Ctrl-C must not cut in two (ipc/interrupts.py).
    @interrupts.holds
    def _dispatch_one(self):
        """Hand one queued call to an idle worker: True, or, when there is nothing to
        hand over, ``(idle workers to retire, workers to start)``."""
        with self.lock:
            if not self.pending:
                return self._retire_idle_locked(), 0
            if not self.idle:
                return (), self._workers_to_start_locked()
            worker = self.idle.pop()
            item = self.pending.popleft()
            self.handing += 1
        return self._handing_over(worker, item)

    def _handing_over(self, worker, item):
        """_hand_over, counted in ``handing`` (taken under the lock with ``worker``) until
        it is done: shutdown waits for hand-overs in progress."""
        try:
            return self._hand_over(worker, item)
        finally:
            with self.lock:
                self.handing -= 1
                if self.shutting_down:
                    self.all_done.notify_all()

    def _hand_over(self, worker, item):
        """_dispatch_one's second half, outside the lock: encode ``item`` and send it to
        ``worker`` (or put it back, or fail its future).  True."""
        if item.stage is Stage.QUEUED:
            if not item.future.set_running_or_notify_cancel():
                item.drop_inputs()    # cancelled: drop its inputs
                self._back_to_idle(worker)
                return True
            item.stage = Stage.RUNNING
        try:
            chunks, fds, fb, fn_sent, size = self._encode(item, worker)
        except KeyboardInterrupt as exc:
            if not interrupts.maybe_ctrl_c():
                # Off the main thread, with Ctrl-C held back (this step holds it), or
                # with SIGINT ignored or left to the OS (interrupts.may_raise): no
                # Ctrl-C, the arguments' own code raised it (a __reduce__). Putting
                # the call back would raise it again on every hand-over, for ever.
                item.future.set_exception(PicklingFailed(
                    f"the call's arguments could not be pickled for the worker: pickling "
                    f"them raised KeyboardInterrupt ({exc})"))
                item.drop_inputs()
                self._back_to_idle(worker)
                return True
            # A Ctrl-C that was not held back (a program's own SIGINT handler, see
            # ipc/interrupts.py): the call goes back to the front of the queue
            # untouched, the worker back to idle, and the interruption on up; a
            # thread hands the call over.
            with self.lock:
                self.pending.appendleft(item)
            self._back_to_idle(worker)
            lifetime.start_thread(self.dispatch, "comfy_env-redispatch")
            raise
        except _InputsNotDone as late:
            # Futures submit() does not look for (in an object's attributes, a
            # container subclass, deeper than _find_futures goes) that were not done
            # yet: the call waits for them like for the others, then is encoded again.
            item.deps = late.futures
            with self.lock:
                self.waiting.add(item)
            self._back_to_idle(worker)
            self._wait_for_deps(item)
            return True
        except BaseException as exc:
            item.future.set_exception(exc)
            item.drop_inputs()
            self._back_to_idle(worker)
            return True
        try:
            worker.send_call(item, chunks, fds, fn_sent)
        except (ChannelClosed, OSError) as exc:
            fb.abort()
            # The worker died between calls (killed while idle), or while it received
            # this one: the call goes back to the front of the queue, once.  A second
            # failure is left to the death report (WorkerCrashed): a call whose frame
            # kills every worker it reaches (an argument too big for the worker's
            # memory) must fail, not start workers forever.  Counted and requeued here
            # only if the worker's reader has not claimed the item for its death report
            # already (WorkerHandle._finish): that report counts this failed delivery
            # then (on_death), and a call both failed and re-run would set its future twice.
            # Nor if the watchdog claimed it meanwhile (its call_timeout ran out while the
            # frame was still going out, or shutdown stopped it): the death report fails
            # it, with CallTimeout; requeued, it ran again with nobody to take its result.
            with self.lock:
                if (worker.item is item and item.stage is Stage.RUNNING
                        and self._send_again_locked(item)):
                    worker.item = None
            if not isinstance(exc, ChannelClosed):
                # Our side of the send failed (no buffer space, too many fds in flight)
                # with part of the frame perhaps out: the channel can't be trusted, and
                # the worker, alive, would wait for the rest forever.
                worker.stop_interrupted(exc)
            return True
        except BaseException as exc:
            # Cut short while sending (a signal handler that was not held back):
            # part of the frame may be out, so the channel can't be trusted.  The
            # worker is stopped, and its death report fails the call with
            # WorkerCrashed saying why (it may have started: it is not run again).
            fb.abort()
            worker.stop_interrupted(exc)
            raise
        if fb.lends or size > KEEP_INPUTS_MAX:
            # The worker has them now: big inputs (shared blocks, a big message) are not
            # pinned here for the call's length.  A small call's stay until its result,
            # so that it can be sent again if the worker dies before it takes the call
            # (on_death).
            item.drop_inputs(keep_fn=True)
        return True

    def _encode(self, item, worker):
        """``(chunks, fds, frame builder, fn_sent, body bytes)``: ``fn_sent()`` updates the worker's
        books (the function the frame carries, what it evicts; see fncache) and must run
        as the frame goes out (WorkerHandle.send_call)."""
        fn = item.fn
        fnref = fn_sent = None
        fn_plain = False        # known to pickle by name (is_plain need not ask again)
        if self.wenv.is_current and not isinstance(fn, str):
            _send_unimportable_by_value(fn)
        if not isinstance(fn, str) and fncache.cacheable(fn):
            if self.wenv.is_current and not fncache.by_value_natively(fn):
                # The worker imports what cloudpickle pickles by reference, and pickle
                # writes such a function as cloudpickle does: by its name.
                fn_plain = True
                once = None
            else:
                once = self._pickled_once(fn)
            if once is not None:
                blob, key = once
                sent = worker.sent_functions
                plan = sent.plan(key, len(blob))
                fnref = plan if plan[0] == "id" else plan + (blob,)
                fn = None

                def fn_sent():
                    sent.commit(plan, len(blob))
        wenv = self.wenv
        if fn is not None and not isinstance(fn, str) and not wenv.is_current \
                and not _by_reference(fn):
            self._check_same_python(fn)
            try:
                fn = ("by-value", _pickle_by_value(fn))
            except Exception as exc:
                raise PicklingFailed(f"the function {fn!r} could not be pickled: {exc}") from exc
        call = (fn, item.args, item.kwargs)
        if fn_plain or fn is None or type(fn) is str:
            plain = codec.is_plain_call(item.args, item.kwargs)
        else:
            plain = codec.is_plain(call)
        if plain:
            if plain is codec.INLINE:
                # A plane's inline objects (small numpy arrays) are written by its code:
                # a failure there is the arguments' fault, as on the Encoder's path.
                try:
                    chunks = codec.plain_chunks(Call(item.call_id, fnref), (call,), (plain,))
                except KeyboardInterrupt:
                    raise
                except BaseException as exc:
                    raise _explain_pickling(exc, item, _plain_dumps) from exc
            else:
                chunks = codec.plain_chunks(Call(item.call_id, fnref), (call,), (plain,))
            size = check_frame(chunks)
            return chunks, (), codec.PLAIN_FRAME, fn_sent, size
        # A call refused for too many blocks (more fds than the worker can open, see
        # transport.fd_room) must undo every lend it took (fb.abort), or the blocks
        # would never be released in the parent nor in the producing worker.
        fb = codec.FrameBuilder(worker.link)
        fb.share_tensors_in_place = self.share_tensors_in_place
        try:
            try:
                fb.encode_part(call, self._forward_future, plain)
            except KeyboardInterrupt:
                raise               # Ctrl-C while pickling: not the arguments' fault
            except BaseException as exc:
                late = _pending_inputs(call) if isinstance(exc, codec.EncodeError) else None
                if late:
                    raise _InputsNotDone(late) from None
                raise _explain_pickling(exc, item) from exc
            chunks = fb.build(Call(item.call_id, fnref))
            try:
                size = check_frame(chunks, fb.fds)
            except TooManyFds as exc:
                raise PicklingFailed(f"the call's arguments span {len(fb.fds)} shared "
                                     f"blocks: {exc}") from None
        except BaseException:
            fb.abort()
            raise
        return chunks, fb.fds, fb, fn_sent, size

    def _pickled_once(self, fn):
        """``(blob, key)`` when ``fn`` goes by value and can be sent once per worker
        (fncache says when), else None: it then travels with each call as before.
        ``fn`` of a worker of this interpreter goes by value natively (_encode asks)."""
        if not self.wenv.is_current:
            if _by_reference(fn):
                return None
            mod = sys.modules.get(getattr(fn, "__module__", None) or "")
            if mod is not None and mod.__name__ != "__main__":
                # _pickle_by_value registers its module by value: other bytes than
                # the fingerprint describes.  Such functions travel with each call.
                return None
            self._check_same_python(fn)
        try:
            return fncache.pickled_once(fn, codec.dumps_portable)
        except Exception as exc:
            raise PicklingFailed(f"the function {fn!r} could not be pickled: {exc}") from exc

    def _check_same_python(self, fn):
        wenv = self.wenv
        if tuple(wenv.python_version[:2]) != tuple(sys.version_info[:2]):
            raise PicklingFailed(
                f"{getattr(fn, '__qualname__', fn)!r} would be pickled by value, which only "
                f"works on the same Python minor version: the parent runs Python "
                f"{sys.version_info[0]}.{sys.version_info[1]}, the worker's environment "
                f"{wenv.label!r} runs Python {wenv.python_version[0]}.{wenv.python_version[1]}. "
                f"Pass the function as a 'package.module:qualname' string that the worker can import."
            )

    @staticmethod
    def _forward_future(fut, fb):
        """Encode a done future's undecoded result as a forwarded part (zero-copy chain).

        A future met again in the same frame gets the part it got the first time: the
        worker decodes a part once, so it arrives as one object, as pickle's memo makes
        of any object passed twice (and its blocks are lent, and its bytes sent, once)."""
        forwarded = fb.forwarded_futures
        entry = forwarded.get(id(fut))
        if entry is not None:
            return entry[1]
        index = _Pool._forward_future_once(fut, fb)
        forwarded[id(fut)] = (fut, index)      # the future, kept: its id stays its own
        return index

    @staticmethod
    def _forward_future_once(fut, fb):
        # Take the lazy result *with a hold on its records*: a concurrent
        # fa.result() releases the lazy result's own hold once it decoded, and
        # if the decoded value is dropped at once the blocks would be freed (fd
        # closed, number reused) between lazy_result() and the lends below.
        hold = getattr(fut, "_hold_lazy", None)
        held = hold() if hold is not None else None
        if held is None:
            return None
        part, records = held
        try:
            return fb.forward_part(part, records)
        finally:
            lifetime.LEDGER.unhold_all(records)

    def _workers_to_start_locked(self):
        """How many workers to start for the pending calls (reserved in ``starting``)."""
        if self.broken is not None or self.shutting_down and not self.pending:
            return 0
        live = len(self.workers) + self.starting
        # Workers still starting (or handshaking) will each take a pending call: only
        # those running one are busy.
        running = sum(1 for w in self.workers if w.item is not None)
        want = min(self.max_workers, running + len(self.pending))
        n = max(0, want - live)
        self.starting += n
        return n

    def _start_worker(self):
        if lifetime.exiting():
            # No reader thread could start (Thread.start hangs or raises by now).
            with self.lock:
                self.starting -= 1
            self._start_failed(WorkerStartError("cannot start a worker after interpreter shutdown"))
            return
        with self.lock:
            if self.shutting_down and not self.pending:
                self.starting -= 1      # stopped meanwhile: nothing left to run
                return
        worker = WorkerHandle(self, next(self._worker_index))
        with self.lock:
            self.starting -= 1
            self.workers.add(worker)
            worker.made_after_failures = self.start_failure_seq
        try:
            worker.start()      # Popen only; the handshake happens on the reader thread
        except BaseException as exc:
            # The process may be running already (a thread could not start after it).
            worker.kill()
            with self.lock:
                self.workers.discard(worker)
            if isinstance(exc, BrokenExecutor):
                err = exc
            else:
                err = WorkerStartError(f"could not start a worker: {exc!r}")
                err.__cause__ = exc
            if getattr(exc, "permanent", False):
                self._break(err)        # a preload that failed to import: it would only repeat
            else:
                self._start_failed(err, transient=launch.is_transient(exc), worker=worker)
            return
        if self.start_timeout is not None:
            self.watchdog.at(time.monotonic() + self.start_timeout, worker, _START)

    def _start_failed(self, error, transient=False, worker=None):
        """A worker failed to start in a way that may not happen again (killed while it
        started, a transient OSError): try once more after a back-off; a second failure
        in a row breaks the executor, unless it was a shortage of fds or memory
        (``transient``), which says nothing about the environment.

        Only a start made after the last counted failure counts: workers started
        together and killed together (the OOM killer) are one failure, each retried,
        not a second failure in a row."""
        with self.lock:
            if worker is None or worker.made_after_failures >= self.start_failure_seq:
                self.start_failures += 1
                self.start_failure_seq += 1
            retry = (self.start_failures < 2 and self.broken is None
                     and not _exit_started and not lifetime.exiting())
            if retry:
                self.starting += 1      # held for the retry, so shutdown waits for it
        if retry:
            if self.watchdog.at(time.monotonic() + START_RETRY_BACKOFF, None, _RETRY):
                self.logger.warning("comfy_env: a worker of %r failed to start; trying once "
                                    "more in %.1f s: %s", self.name, START_RETRY_BACKOFF, error)
                return
            with self.lock:
                self.starting -= 1
        if transient:
            self._start_failed_for_now(error.__cause__ or error)
        else:
            self._break(error)

    def _start_failed_for_now(self, exc):
        """No fds (or memory) to start a worker right now: that says nothing about the
        environment, so the executor is not broken; the next call tries again.  Calls
        that no live worker can take fail now rather than wait for a start nobody retries."""
        err = WorkerStartError(f"could not start a worker for now: {exc} (the executor "
                               f"tries again with the next call)")
        err.__cause__ = exc
        with self.lock:
            stuck = not self.workers and not self.starting
            items = list(self.pending) if stuck else []
            if stuck:
                self.pending.clear()
        for item in items:
            fut = item.future
            item.drop_inputs()
            if (item.stage is not Stage.QUEUED or fut.set_running_or_notify_cancel()) \
                    and not fut.done():
                fut.set_exception(_clone(err))
        self._notify_done()

    def _back_to_idle(self, worker):
        with self.lock:
            if worker in self.workers and worker not in self.doomed:
                self.idle.append(worker)
        self._notify_done()

    # -- events from worker readers and the timer -------------------------------------------
    def on_ready(self, worker):
        with self.lock:
            self.start_failures = 0
            if worker in self.workers and not worker.exiting and worker not in self.doomed:
                self.idle.append(worker)
        self.dispatch()

    def on_idle(self, worker):
        with self.lock:
            if worker in self.workers and not worker.exiting and worker not in self.doomed:
                self.idle.append(worker)
            if self.shutting_down:          # only shutdown(wait=True) waits on all_done
                self.all_done.notify_all()
            # Unlocked-read safe: a submit() that adds work after this calls
            # dispatch() itself and finds the worker idle.
            busy = self.pending or self.shutting_down
        if busy:
            self.dispatch()

    def on_deadline(self, worker, what):
        """A timer entry is due (on the timer's thread)."""
        if what == _RETRY:
            with self.lock:
                self.starting -= 1
            self.dispatch()
            return
        # A stale entry is ignored: the call finished, or the worker became ready.
        # It names its call: checking only ``worker.item is not None`` could kill
        # the *next* call, dispatched to the worker right after this one finished.
        with self.lock:
            if worker not in self.workers or worker in self.doomed:
                return
            if what == _START:
                if worker.ready or worker.exiting:
                    return
                self.start_timed_out.add(worker)
            else:
                item = worker.item
                if item is None or item.call_id != what or item.stage is not Stage.RUNNING:
                    return
                item.stage = Stage.TIMED_OUT
            self.doomed.add(worker)
        # Outside the lock: a timed-out call's worker first has its stack collected
        # (kill_for_timeout), and a result that arrives meanwhile is dropped (the call
        # still timed out).  The worker is doomed: it gets no further call.
        if what == _START:
            worker.kill()
        else:
            worker.kill_for_timeout()

    def on_death(self, worker, item, code, start_error):
        taken = None if item is None else worker.took(item.call_id)
        with self.lock:
            self.workers.discard(worker)
            if worker in self.idle:
                self.idle.remove(worker)
            killed_by_us = worker in self.doomed
            self.doomed.discard(worker)
            if taken is False and self._deliver_again_locked(worker, item, killed_by_us):
                item = None         # queued again: before `finished` below, which it changes
            start_timed_out = worker in self.start_timed_out
            self.start_timed_out.discard(worker)
            # After shutdown(wait=False) (or garbage collection) nothing else stops the
            # timer thread; once the last worker is gone and nothing can run, it ends.
            finished = (self.shutting_down and not self.workers and not self.starting
                        and not self.pending and not self.waiting)
        if finished:
            self._stop_timer()
            self._close_zygote()
        if item is not None and not item.future.done():
            if item.stage is Stage.TIMED_OUT:
                item.future.set_exception(worker.timeout_error(
                    self.call_timeout if item.timeout is DEFAULT else item.timeout))
            elif item.stage is Stage.STOPPED:
                item.future.set_exception(CancelledError(
                    f"the executor {self.name!r} was stopped (KeyboardInterrupt, or interpreter "
                    f"exit after one) while this call ran; its worker (pid {worker.pid}) was killed"))
            else:
                msg, tail = worker.describe_exit(code)
                if taken is not True and item.send_failures:
                    what = (f"the worker died while the call was being sent to it, and so did "
                            f"the one before it (the call itself may kill them: an argument too "
                            f"big for the worker's memory?): {msg}" if item.send_failures > 1 else
                            f"the call could not be sent to the worker: {msg}")
                elif taken is False:
                    what = (f"the worker died before it took the call off its channel (nothing "
                            f"of the call ran): {msg}")
                else:
                    what = f"the worker died while running the call: {msg}"
                item.future.set_exception(WorkerCrashed(what, exitcode=code, stderr_tail=tail))
        if not worker.ready and not worker.exiting:
            if start_timed_out:
                msg, _ = worker.describe_exit(code)
                self._break(WorkerStartError(
                    f"a worker did not become ready within start_timeout={self.start_timeout}s "
                    f"(a hanging interpreter start or initializer) and was killed: {msg}"))
            elif not killed_by_us:
                # Died, or its channel broke, while it started (the OOM killer, a
                # transient fault): worth one more try.  A failure the worker reported
                # (initializer, protocol or version mismatch) would only repeat.
                retryable = start_error is None or isinstance(start_error, (ChannelClosed, OSError))
                if start_error is None or isinstance(start_error, ChannelClosed):
                    msg, _ = worker.describe_exit(code)
                    start_error = WorkerStartError(f"a worker failed to start: {msg}")
                elif not isinstance(start_error, BrokenExecutor):
                    err = WorkerStartError(f"a worker failed to start: {start_error!r}")
                    err.__cause__ = start_error
                    start_error = err
                if retryable:
                    # A shortage of fds or memory (the handshake's fds truncated) says
                    # nothing about the environment: it must not break the executor.
                    self._start_failed(start_error, transient=launch.is_transient(start_error), worker=worker)
                else:
                    self._break(start_error)
        self._notify_done()
        self.dispatch()

    def _deliver_again_locked(self, worker, item, killed_by_us):
        """``worker`` died with ``item`` sent but not taken (nothing of it ran there): put
        it back at the front of the queue, as a call whose send failed, and True.  Not
        when its inputs were let go at the send (shared blocks or a message over
        KEEP_INPUTS_MAX: see _hand_over), it
        was sent MAX_SEND_FAILURES times, we stopped the worker, or the pool is broken:
        its death report then says the call never ran.  Caller holds the pool lock."""
        if (killed_by_us or item.args is None or item.stage is not Stage.RUNNING
                or item.future.done() or self.broken is not None
                or worker.read_interrupted is not None or worker.protocol_error is not None):
            return False
        return self._send_again_locked(item)

    def _send_again_locked(self, item):
        """Count a failed delivery of ``item`` (taken from its worker by the caller, who
        holds the pool lock) and put it back at the front of the queue: True.  False once
        it failed MAX_SEND_FAILURES times: its death report fails it."""
        item.send_failures += 1
        if item.send_failures >= MAX_SEND_FAILURES:
            return False
        self.pending.appendleft(item)
        return True

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
            if item.stage is not Stage.QUEUED or fut.set_running_or_notify_cancel():
                if not fut.done():
                    fut.set_exception(_clone(exc))
        for w in workers:
            w.request_exit()
        self._notify_done()

    # -- shutdown --------------------------------------------------------------------------
    def _retire_idle_locked(self):
        """The idle workers to ask to exit once shut down and out of work (the caller
        sends the requests, outside the lock)."""
        if self.shutting_down and not self.pending and not self.waiting and self.idle:
            retired, self.idle = self.idle, []
            return retired
        return ()

    def _notify_done(self):
        with self.lock:
            self.all_done.notify_all()

    def _stop_timer(self):
        dropped = self.watchdog.stop()
        if dropped:
            with self.lock:
                self.starting -= dropped

    def _on_reader_thread(self):
        me = threading.current_thread()
        with self.lock:
            return any(w.reads_on(me) for w in self.workers)

    @staticmethod
    def _cancel(items):
        for item in items:
            if item.stage is not Stage.QUEUED:
                # Re-queued after its worker died before delivery: it was
                # already running, so it fails rather than being cancelled.
                item.future.set_exception(RuntimeError("the executor was shut down before this "
                                                       "call could be delivered"))
            elif item.future.cancel():
                # Tell wait() and as_completed() too (Future.cancel alone does not;
                # ProcessPoolExecutor does when its queue reaches the call).
                try:
                    item.future.set_running_or_notify_cancel()
                except RuntimeError:
                    pass            # told already
            item.drop_inputs()

    def shutdown(self, wait=True, cancel_futures=False):
        if forksafe.inherited(self):
            return      # a fork child's copy: the parent's calls and workers are not ours
        if wait and self._on_reader_thread():
            # A done-callback on the reader thread of one of our workers: that thread
            # reads the results this would wait for.  ProcessPoolExecutor raises here
            # too; the shutdown itself goes ahead.
            self.shutdown(wait=False, cancel_futures=cancel_futures)
            raise RuntimeError(
                "shutdown(wait=True) was called from a done-callback, which runs on the "
                "thread that reads this executor's results: it would wait for itself. "
                "The executor is shutting down; call shutdown(wait=False) from callbacks, "
                "or wait from another thread")
        with self.lock:
            self.shutting_down = True
            if cancel_futures:
                # As ProcessPoolExecutor, whose queue hands calls to its processes before
                # they run: the calls workers are being started for still run.
                coming = self.starting + sum(1 for w in self.workers if not w.ready and not w.exiting)
                keep = [self.pending.popleft() for _ in range(min(coming, len(self.pending)))]
                for it in keep:
                    # Running from now, as ProcessPoolExecutor marks the calls it handed
                    # over: not cancellable any more, since they will run.
                    if it.stage is Stage.QUEUED and it.future.set_running_or_notify_cancel():
                        it.stage = Stage.RUNNING
                items = list(self.pending) + list(self.waiting)
                self.pending.clear()
                self.pending.extend(keep)
                self.waiting.clear()
            else:
                items = []
        self._cancel(items)
        self.dispatch()
        if not wait:
            return
        with self.lock:
            while self.pending or self.waiting or any(w.item is not None for w in self.workers) \
                    or self.starting or self.handing:
                self.all_done.wait(0.1)
                if self.broken is not None and not any(w.item for w in self.workers):
                    break
            workers = list(self.workers)
        for w in workers:
            w.request_exit()
        for w in workers:
            w.join()
        self._close_zygote(wait=True)
        self._stop_timer()

    def _close_zygote(self, wait=False):
        if self.zygote is not None:
            # It exits once the workers it forked have; wait=True: return once it has
            # been reaped and every fd of it is closed (the workers are gone by then).
            self.zygote.close(wait=wait)

    def stop_now(self):
        """Stop at once: cancel queued calls, fail running ones, kill every worker.

        For Ctrl-C: a KeyboardInterrupt leaving a ``with`` block, or ending the
        program (see ``_shutdown_all_at_exit``).  Workers ignore SIGINT (the parent
        decides), so without this the exit would wait for the running calls.
        """
        if forksafe.inherited(self):
            return      # a fork child's copy: the workers are the parent's, not ours to kill
        with self.lock:
            self.shutting_down = True
            items = list(self.pending) + list(self.waiting)
            self.pending.clear()
            self.waiting.clear()
            workers = list(self.workers)
            for w in workers:
                if w.item is not None and w.item.stage is Stage.RUNNING:
                    w.item.stage = Stage.STOPPED
            self.doomed.update(workers)
            self.idle.clear()
        self._cancel(items)
        for w in workers:
            w.kill()
        for w in workers:
            w.join(5)
        self._close_zygote(wait=True)
        self._stop_timer()
        self._notify_done()


def _seconds(name, value):
    """A timeout argument checked: a positive number of seconds, or None (no limit;
    ``float("inf")`` means the same)."""
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds or None, got {value!r}")
    return None if math.isinf(value) else value


def _log_level(value):
    """``worker_log_level`` checked here rather than by each worker's start: a level
    name (any case) or number, or None."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    if isinstance(value, str) and isinstance(logging.getLevelName(value.upper()), int):
        return value.upper()
    raise ValueError(f"worker_log_level must be a logging level name (DEBUG, INFO, WARNING, ERROR, "
                     f"CRITICAL) or number, or None, got {value!r}")


def _max_workers(value):
    """``max_workers`` checked; None is the number of CPUs this process may run on."""
    if value is None:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except (AttributeError, OSError):
            return os.cpu_count() or 1
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"max_workers must be an int or None, got {value!r}")
    if value < 1:
        raise ValueError(f"max_workers must be greater than 0, got {value}")
    return value


def _input_failure(dep):
    """Why a chained call cannot run with ``dep`` as an input (None: it can).

    An IsolatedFuture's result is not decoded for this: it is forwarded as it is.
    """
    if dep.cancelled():
        return CancelledError(f"an input future of this call was cancelled: {dep!r}")
    undecoded = getattr(dep, "undecoded_failure", None)
    return undecoded() if undecoded is not None else dep.exception()


def _copy_exception(exc, fallback=None):
    """A copy of ``exc`` for a chained call that fails with its input: its type, args
    and attributes, with a traceback of its own (raising the input's exception object
    itself would grow its traceback in each call that raises it).

    Made without calling ``__init__`` (an exception whose ``__init__`` takes other
    arguments than its ``args``, ``Coded(code, msg)``, lost its type before): the class's
    ``__new__`` with the args (OSError's fills errno and filename there), then its
    ``__dict__`` (what ``__init__`` set, notes included).  Where even that fails:
    ``fallback(exc)``, by default a RuntimeError saying what it was."""
    cls = type(exc)
    try:
        new = rebuild_exception(cls, exc.args, getattr(exc, "__dict__", None))
        if isinstance(exc, OSError):        # not in args: OSError(errno, strerror, filename)
            for name in ("errno", "strerror", "filename", "filename2"):
                setattr(new, name, getattr(exc, name))
        return new
    except Exception:
        return fallback(exc) if fallback is not None else RuntimeError(f"{cls.__qualname__}: {exc}")


def _clone(exc):
    """The executor's breaking exception again, for one more future."""
    new = _copy_exception(exc, lambda e: BrokenProcessPool(str(e)))
    new.__cause__ = exc.__cause__ or exc
    return new


def _plain_dumps(obj):
    return codec._dumps_plain(obj, codec.is_plain(obj))


def _explain_pickling(exc, item, dumps=codec.dumps_portable):
    """Say which argument could not be pickled, and why (``dumps``: the way they were
    pickled, tried on each argument alone)."""
    if isinstance(exc, PicklingFailed):
        return exc
    if isinstance(exc, OSError) and exc.errno == errno.EMFILE:
        # Not one argument's fault: each shared block the arguments refer to takes an
        # fd while the call is sent, and this process ran out of them.
        return PicklingFailed(
            f"this process ran out of file descriptors while sending the call's arguments "
            f"({fd_limits()}): each shared-memory block they refer to "
            f"takes one while the call is sent ({exc}). " + FD_ADVICE)
    what = None
    for i, a in enumerate(item.args or ()):
        if _find_futures(a, []):
            continue        # chained inputs are forwarded, never pickled: not the culprit
        try:
            dumps(a)
        except Exception:
            what = f"argument {i} ({type(a).__qualname__})"
            break
    if what is None:
        for k, v in (item.kwargs or {}).items():
            if _find_futures(v, []):
                continue
            try:
                dumps(v)
            except Exception:
                what = f"keyword argument {k!r} ({type(v).__qualname__})"
                break
    if what is None:
        what = f"the function {getattr(item.fn, '__qualname__', item.fn)!r}"
    return PicklingFailed(f"{what} could not be pickled for the worker: {type(exc).__name__}: {exc}")


class IsolatedExecutor(Executor):
    """Run callables in worker processes of another (or this) Python environment.

    A ``concurrent.futures.Executor``: ``submit``, ``map``, ``shutdown``, the
    ``with`` statement, ``concurrent.futures.wait`` and ``as_completed`` behave as
    in the standard library.  Workers are started on demand (the first call pays
    for interpreter start-up) and stopped by ``shutdown()``; they also die with
    the parent.  What happens on crashes, timeouts, Ctrl-C, exit and in fork
    children: ``docs/reliability.md``.

    Args:
        env: where the workers run.  ``None``: this interpreter, in new processes
            (workers start with this process's ``sys.path`` and working
            directory).  A path: a ``comfy-env.toml`` (or the directory holding
            one; built with uv on first use and cached), an environment directory
            (venv, conda, pixi) or a Python interpreter.  Or an
            :class:`~comfy_env.Env`.  A worker of another environment sees that
            environment's packages, ``comfy_env`` and ``cloudpickle`` (linked
            from the parent) and what the spec's ``share`` adds, nothing else of
            the parent's: not its ``sys.path``, not its working directory.
        max_workers: how many calls run in parallel (one worker process each,
            started when calls need them).  ``None``: the number of CPUs this
            process may run on, as for ``ProcessPoolExecutor``.
        initializer: a callable, or a ``"package.module:qualname"`` string, run
            as ``initializer(*initargs)`` once in each worker before its first
            call.  If it raises, the executor is broken
            (:class:`~comfy_env.InitializerFailed`).
        initargs: arguments for ``initializer``.
        call_timeout: seconds a call may run.  A call past it has its worker
            killed and fails with :class:`~comfy_env.CallTimeout`; the executor
            carries on with a fresh worker.  ``None``: no limit.
        name: the workers' name in log lines and output prefixes (default: the
            environment's label and a number).
        worker_log_level: level set on the workers' root logger (``logging``
            records of the workers are re-emitted in the parent under
            ``comfy_env.worker.<name>``).
        worker_output: where the workers' ``print()`` and stderr go:
            ``"stream"`` (default: this process's stdout/stderr, each line
            prefixed with ``[<name>#<n>] ``), ``"logging"`` (INFO records of the
            ``comfy_env.worker.<name>`` logger) or ``"discard"``.  Either way the
            last lines of stderr (and a crash's whole faulthandler dump) are kept
            for :class:`~comfy_env.WorkerCrashed`, and the workers' ``logging``
            records go to that logger at their own level (an unconfigured program
            shows WARNING and above).  On ``call_timeout`` the worker's stack
            (every thread) is taken before it is killed and reported in
            :class:`~comfy_env.CallTimeout` (``worker_stack``).
        start_timeout: seconds a worker may take to start, initializer included
            (default 300; ``None``: no bound).  A worker not ready by then is
            killed and the executor is broken (:class:`~comfy_env.WorkerStartError`).
            A worker that dies while it starts is started once more, after a
            one-second back-off, before that.
        device: pin the workers to one GPU: ``"cuda:N"`` or an index in this
            process's numbering, ``"cuda"``, a ``torch.device`` or a GPU UUID.  It
            becomes the workers' ``cuda:0``; the other GPUs stay visible
            (``docs/devices.md``).
        sandbox: a :class:`~comfy_env.Sandbox` to run the workers in (bubblewrap:
            no network, read-only file system but for ``writable``;
            ``docs/sandbox.md``).  ``None``: what the env's ``[sandbox]`` table
            says (unsandboxed if it has none); ``False``: unsandboxed even if it
            has one.  Raises :class:`~comfy_env.SandboxUnavailable` here, at
            construction, where bubblewrap can't run.
        share_tensors_in_place: move a torch CPU tensor argument's storage into
            shared memory the first time it is sent, as ``Tensor.share_memory_()``
            does (default ``True``): the tensor keeps its identity and values, later
            calls send it with no copy, and a worker that writes into it writes into
            the caller's tensor.  ``False``: copy it on every call, so the worker
            gets a private copy.  See ``docs/dataplane.md``.
        preload: module names (e.g. ``["torch", "numpy"]``) imported once in a
            *zygote*, a pre-started process of the environment from which the
            workers fork: a worker then starts in milliseconds, also after a
            crash or a ``call_timeout`` kill, instead of re-importing them
            (``docs/performance.md``).  Linux only; where forking is unsafe (a
            preload that starts threads) a warning says so and workers start
            as usual.  A preload that initialises CUDA is refused
            (:class:`~comfy_env.WorkerStartError`).  What the preload prints goes
            where ``worker_output`` says, as ``[<name> zygote]``.  Default: no
            zygote.

    Raises:
        ValueError / TypeError: a bad argument, at construction.
        comfy_env.settings.SettingsError: a ``COMFY_ENV_*`` variable holds a bad value
            (a ValueError; the message names it and what it accepts).
        comfy_env.envs.EnvError: ``env`` cannot be found, parsed or built.
    """

    def __init__(self, env: Any = None, max_workers: int | None = 1, *,
                 initializer: Callable[..., Any] | str | None = None, initargs: Iterable[Any] = (),
                 call_timeout: float | None = None, name: str | None = None,
                 worker_log_level: int | str | None = None, device: Any = None,
                 worker_output: str = "stream",
                 start_timeout: float | None = DEFAULT_START_TIMEOUT, sandbox: Any = None,
                 share_tensors_in_place: bool = True,
                 preload: Iterable[str] | None = None) -> None:
        if not isinstance(share_tensors_in_place, bool):
            raise TypeError(f"share_tensors_in_place must be True or False, "
                            f"got {share_tensors_in_place!r}")
        max_workers = _max_workers(max_workers)
        call_timeout = _seconds("call_timeout", call_timeout)
        start_timeout = _seconds("start_timeout", start_timeout)
        worker_log_level = _log_level(worker_log_level)
        if initializer is not None and not (callable(initializer) or isinstance(initializer, str)):
            raise TypeError(f"initializer must be callable or a 'module:qualname' string, "
                            f"got {initializer!r}")
        if not isinstance(initargs, tuple):
            initargs = tuple(initargs)
        if not isinstance(worker_output, str) or worker_output not in WORKER_OUTPUT_MODES:
            raise ValueError(f"worker_output must be one of {', '.join(map(repr, WORKER_OUTPUT_MODES))}, "
                             f"got {worker_output!r}")
        if preload is not None:
            if isinstance(preload, str):
                raise TypeError(f"preload must be a list of module names, got the string "
                                f"{preload!r} (write preload=[{preload!r}])")
            preload = list(preload)
            bad = [m for m in preload if not isinstance(m, str) or not m
                   or not all(p.isidentifier() for p in m.split("."))]
            if bad:
                raise ValueError(f"preload must hold module names like 'torch' or 'numpy.linalg', "
                                 f"got {bad!r}")
        # Read once, here: a bad COMFY_ENV_* value fails now, and every worker gets
        # these values in its handshake (comfy_env.settings).
        values = settings.read()
        if values.cuda_parent_heap == "pool":
            # Our export pool must be torch's current pool before the parent allocates
            # what it will send (docs/cuda.md, "The parent's heap").
            planes.install_cuda_plane_with_torch()
        wenv = resolve_env(env)
        pin = pin_environment(device)
        pin.update(allocator_environment(values.cuda_heap, wenv.env_vars))
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
            _pickle_by_value(initializer)       # fails here, not at the first start
            init_payload = (_ByValue(initializer), initargs)
        interrupts.install()     # Ctrl-C on the main thread never cuts a frame in two
        self._pool = _Pool(wenv, max_workers, init_payload, call_timeout, self.name, logger,
                           worker_log_level, worker_output, start_timeout, preload, values=values)
        self._pool.share_tensors_in_place = share_tensors_in_place
        self._finalizer = weakref.finalize(self, _finalize_pool, self._pool)

    @property
    def max_workers(self) -> int:
        """The most worker processes this executor runs at once."""
        return self._pool.max_workers

    def submit(self, fn: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> IsolatedFuture:
        """Schedule ``fn(*args, **kwargs)`` to run in a worker; return its future.

        ``fn`` is a callable or a ``"package.module:qualname"`` string that the
        worker imports.  A callable travels by reference when the worker can
        import it by name, otherwise by value (cloudpickle): functions of
        ``__main__`` always go by value; for a worker of another environment,
        so do those of your own modules (only installed packages and
        ``comfy_env`` go by reference there), which needs that environment to
        run the parent's Python minor version (``PicklingFailed`` says so
        otherwise).  An ``async def`` function runs to completion in the worker
        (``asyncio.run``) and its future holds what it returned.

        Arguments and the result are pickled once; numpy arrays and torch
        tensors of 64 KiB or more travel through shared memory (CUDA tensors
        stay on their GPU) without being copied through the socket.  A future
        of any ``IsolatedExecutor`` anywhere in the arguments (also nested in
        lists, tuples, sets and dicts) makes this call wait for it; its result
        then goes from worker to worker without being decoded in the parent
        (``docs/chains.md``).

        The future's ``result()`` returns the value (decoded on first use) or
        raises the worker's exception with its traceback as ``__cause__``,
        :class:`~comfy_env.WorkerCrashed`, :class:`~comfy_env.CallTimeout` or
        :class:`~comfy_env.PicklingFailed`.

        Raises:
            TypeError: ``fn`` is neither callable nor a string.
            ValueError: ``fn`` is a string not of the form ``"module:qualname"``.
            RuntimeError: the executor was shut down, or was created by the
                parent of this fork child (create a new one in the child).
            concurrent.futures.BrokenExecutor: the executor is broken (a worker
                could not start or its initializer failed).
        """
        return self._submit(fn, args, kwargs, DEFAULT)

    def _submit_timed(self, timeout, fn, /, *args, **kwargs) -> IsolatedFuture:
        """``submit`` with this call's own time limit (seconds, or None for none) in place
        of ``call_timeout``: for comfy_env's own preparation calls (the pytest plugin
        imports a test module before the timed test)."""
        return self._submit(fn, args, kwargs, _seconds("timeout", timeout))

    def _submit(self, fn, args, kwargs, timeout):
        if not (callable(fn) or isinstance(fn, str)):
            raise TypeError(f"fn must be a callable or a 'package.module:qualname' string, "
                            f"got {type(fn).__name__}")
        if isinstance(fn, str):
            check_reference(fn)
        if IMPORTING.now():
            raise RuntimeError(
                "submit() ran while this worker imported the module its call names, so that "
                "module submits work when imported: each worker would import it and start "
                "another.  Put the module's own work under `if __name__ == \"__main__\":` (a "
                "script that submits \"script:fn\" is imported by its workers), or move the "
                "function the workers run into a module of its own")
        deps = _find_futures(args, [])
        if kwargs:
            _find_futures(kwargs, deps)
        fut = IsolatedFuture()
        item = WorkItem(fut, fn, args, kwargs, deps)
        item.timeout = timeout
        self._pool.submit(item)
        return fut

    def map(self, fn: Callable[..., Any] | str, *iterables: Iterable[Any],
            timeout: float | None = None, chunksize: int = 1) -> Iterator[Any]:
        """``fn`` applied to the items of ``iterables`` in the workers, results in order.

        As ``concurrent.futures.Executor.map``: all calls are submitted at once,
        the returned iterator yields each result in input order (raising a
        call's exception when it is reached), and ``timeout`` (seconds, from
        the call to ``map``) raises ``concurrent.futures.TimeoutError`` if a
        result is not ready in time.  ``chunksize`` > 1 sends that many items per message, as
        ``ProcessPoolExecutor`` does: fewer round trips for many small calls.
        ``fn`` may be a callable or a ``"package.module:qualname"`` string.
        """
        if not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if chunksize == 1:
            return super().map(fn, *iterables, timeout=timeout)
        chunks = _chunks(zip(*iterables), chunksize)
        results = super().map(run_chunk, itertools.repeat(fn), chunks, timeout=timeout)
        return chain_chunk_results(results)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting calls and stop the workers once their work is done.

        ``wait=True`` returns when every submitted call has finished, every
        worker process (and a ``preload`` zygote) has exited and been reaped, and
        every fd and thread the executor kept for them is closed -- except the
        thread forwarding a worker's output while a process that worker started
        still holds its stdout or stderr: it forwards that process's lines until
        it closes them, then ends.  ``wait=False``
        returns at once; the calls still run and the workers exit after them.
        ``cancel_futures=True`` cancels the calls that have not started (queued,
        or waiting for an input future), except those already handed to a worker
        that is starting: as in ProcessPoolExecutor, they run, and are marked
        running at once.  Futures already done keep their results, which stay
        valid after the workers have exited.

        Leaving a ``with`` block calls ``shutdown(wait=True)``, except on a
        ``KeyboardInterrupt``: then queued calls are cancelled, running calls
        fail with ``CancelledError`` and their workers are killed at once.
        From a done-callback (it runs on the thread that reads this executor's
        results) ``wait=True`` would wait for itself: it starts the shutdown,
        then raises ``RuntimeError``.  In a fork child this does nothing (the
        workers are the parent's).
        """
        self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)
        if wait:
            self._finalizer.detach()

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> bool:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            # Ctrl-C: don't wait for the running calls (the workers ignore SIGINT).
            self._pool.stop_now()
            self._finalizer.detach()
        else:
            self.shutdown(wait=True)
        return False

    def worker_pids(self) -> list[int]:
        """PIDs of the live workers (for diagnostics and tests)."""
        with self._pool.lock:
            return sorted(w.pid for w in self._pool.workers if w.pid)

    def __reduce__(self):
        raise TypeError(
            f"an IsolatedExecutor cannot be pickled or sent to a worker ({self.name!r}): its "
            f"workers are this process's children.  Make an executor where it is used (a worker "
            f"may make its own), or pass the executor's futures on: they travel (docs/chains.md)")

    def __repr__(self):
        p = self._pool
        state = "broken" if p.broken else "shut down" if p.shutting_down else "running"
        return (f"<IsolatedExecutor {self.name!r} env={p.wenv.label!r} workers={len(p.workers)}/"
                f"{p.max_workers} {state}>")


def _finalize_pool(pool):
    """An executor was garbage collected without ``shutdown()``: shut its pool down
    (without waiting).

    This runs wherever the collector runs: the cycle collector may start at any
    allocation, also on a thread inside ``pool.lock`` (a reader dispatching the next
    call), and the lock is not re-entrant.  So the shutdown runs on a thread of its
    own.  When no thread may start (the interpreter is exiting) it runs here: by
    then the at-exit shutdown has stopped every pool and no thread of ours holds a
    pool's lock.
    """
    if lifetime.start_thread(pool.shutdown, "comfy_env-finalize", args=(False, False)) is None:
        pool.shutdown(False, False)


def _sandbox_arg(sandbox):
    from ..sandbox import Sandbox
    if sandbox is False:
        return None
    if not isinstance(sandbox, Sandbox):
        raise TypeError(f"sandbox must be a comfy_env.Sandbox, False or None, not {sandbox!r}")
    return sandbox


class _ByValue:
    """An initializer pickled by value for a foreign env (see ``_by_reference``).

    Pickled again for each worker start (an initializer runs once per worker,
    so there is nothing to send once): a worker started after the user changed
    what the initializer uses runs it as it is now, as in ProcessPoolExecutor
    and as in the current env.  The worker gets the function itself."""

    def __init__(self, fn):
        self.fn = fn

    def __reduce__(self):
        return numpy_names.loads, (_pickle_by_value(self.fn),)


def _chunks(it, size):
    it = iter(it)
    while True:
        chunk = tuple(itertools.islice(it, size))
        if not chunk:
            return
        yield chunk


def _shutdown_all_at_exit():
    # Like concurrent.futures: let submitted work finish, then stop the workers --
    # unless the program ends on a Ctrl-C (the interpreter has printed the
    # KeyboardInterrupt and kept it in sys.last_value), or one arrives while this
    # waits: then stop at once, as ProcessPoolExecutor's workers, which get the
    # SIGINT too, do.  Quiet either way: the program is ending.  Afterwards no
    # thread of ours starts (lifetime.begin_exit).
    global _exit_started
    _exit_started = True
    pools = list(_live_pools)
    for pool in [p for p in pools if p.stop_at_exit]:
        try:
            pool.stop_now()
        except Exception:
            pass
    pools = [p for p in pools if not p.stop_at_exit]
    interrupted = isinstance(getattr(sys, "last_value", None), KeyboardInterrupt)
    if not interrupted:
        try:
            for pool in pools:
                try:
                    pool.shutdown(wait=True)
                except Exception:
                    pass
        except KeyboardInterrupt:
            interrupted = True
    if interrupted:
        for pool in pools:
            try:
                pool.stop_now()
            except Exception:
                pass
    lifetime.begin_exit()


if hasattr(threading, "_register_atexit"):
    threading._register_atexit(_shutdown_all_at_exit)
else:  # pragma: no cover
    import atexit
    atexit.register(_shutdown_all_at_exit)
