"""The worker process: ``python -m comfy_env.worker --fd N``.

Runs inside the target environment with the very same ``comfy_env`` package as
the parent (made importable through a bootstrap dir that holds only
``comfy_env`` and ``cloudpickle``).  Needs the standard library and cloudpickle;
numpy and torch are imported only when a payload carries them.

Threads::

    main thread    --  receives frames: runs calls (some libraries insist on the
                       main thread), applies control messages; EOF -> exit
    parent watch   --  blocks on a pipe only the parent writes to; EOF (the
                       parent died, even SIGKILLed, even mid-call) -> os._exit

Diagnostics, both from faulthandler's C signal handlers (they need no GIL, so
they work for code stuck in C holding it, where no Python thread could run)::

    fatal signals  -- (SIGSEGV, SIGABRT, ...) every thread's stack to stderr,
                      which the parent keeps whole for ``WorkerCrashed``
    STACK_SIGNAL   -- every thread's stack to a pipe whose read end went to the
                      parent with the handshake; the parent sends it on
                      ``call_timeout`` before it kills the worker (``CallTimeout``)
"""
from __future__ import annotations

import enum
import faulthandler
import gc
import logging
import os
import signal
import sys
import threading
import time
import traceback

from . import fncache, forksafe, proctree, settings
from ._version import PROTOCOL_VERSION, __version__
from .errors import PicklingFailed, RemoteError, portable_exception
from .ipc import codec, lifetime, mainspace, numpy_names, planes
from .ipc.calls import IMPORTING, adopt_import_paths, adopt_sys_path, completed, resolve_reference
from .ipc.protocol import (Call, Control, Exit, Hello, ImportPaths, Init, InitFailed, Log, Ready,
                           Result, apply_control, handles)
from .ipc.taken import WorkerSlot
from .ipc.transport import Channel, ChannelClosed


# Registered here, in the worker only: a parent never takes a sys.path from a worker.
@handles(ImportPaths)
def _apply_import_paths(link, msg):
    adopt_sys_path(msg.paths)

# A real-time signal: no library has a use for it, and unlike SIGUSR1 user code
# is unlikely to install its own handler over faulthandler's.
STACK_SIGNAL = signal.SIGRTMIN + 6 if hasattr(signal, "SIGRTMIN") else signal.SIGUSR2


def _register_stack_dump():
    """Make STACK_SIGNAL dump every thread's stack to a new pipe; returns its read end.

    The write end stays open for the process's life (faulthandler holds only the
    number) and blocks when full: the parent reads while the dump is written.
    Returns None where faulthandler cannot do it (the parent then kills without a stack).
    """
    try:
        r, w = os.pipe()
    except OSError:
        return None
    try:
        faulthandler.register(STACK_SIGNAL, file=w, all_threads=True, chain=False)
    except (ValueError, RuntimeError, OSError, AttributeError):
        os.close(r)
        os.close(w)
        return None
    return r



class _SpinPolicy:
    """When the worker polls for its next call instead of sleeping (``worker_spin_us``).

    A sleeping worker costs each call two wake-ups of a sleeping CPU (the parent's send
    wakes the worker, whose CPU had gone idle, and the kernel call that does it is slow
    too); polling for a moment after a result catches the next call of a caller that
    submits in a loop as it lands.  The price is CPU: up to the spin time per call.
    So the worker polls while the calls it polls for come in time, stops after
    ``MISSES`` in a row that did not, and from then on tries once every
    ``PROBE_EVERY`` results, or at once after a call that came within the spin time
    even though the worker slept: a gap measured asleep holds the worker's own wake-up,
    so the true gap was shorter still (a longer one can't say which it was).  It polls
    at all only with a CPU to spare: the parent sends 0 unless its workers are fewer
    than its CPUs (polling workers would take CPU from working ones, or from the
    parent's sending).
    """

    PROBE_EVERY = 16
    MISSES = 2

    __slots__ = ("spin", "sent_at", "missed", "polled", "skipped")

    def __init__(self, spin_us):
        self.spin = spin_us * 1e-6
        self.sent_at = None     # when the last result went out; None: not since a call came
        self.missed = 0         # calls in a row that came later than the spin time
        self.polled = False     # the worker polls (or polled) for the next call
        self.skipped = 0        # results after which it slept, since it last polled

    def before_recv(self):
        if self.sent_at is None or not self.spin:
            return 0.0          # no result went out since the last call (the first call)
        if self.missed >= self.MISSES:
            self.skipped += 1
            if self.skipped < self.PROBE_EVERY:
                self.polled = False
                return 0.0
        self.skipped = 0
        self.polled = True
        return self.spin

    def result_sent(self):
        if self.spin:
            self.sent_at = time.perf_counter()

    def call_came(self):
        if self.sent_at is not None:
            if time.perf_counter() - self.sent_at <= self.spin:
                self.missed = 0             # asleep or not: polling would have caught it
            elif self.polled:
                self.missed += 1
        self.sent_at = None

class _LogForwarder(logging.Handler):
    """Sends the worker's log records to the parent, which re-emits them through ``logging``."""

    def __init__(self, worker):
        super().__init__(logging.NOTSET)
        self.worker = worker

    def emit(self, record):
        try:
            msg = record.getMessage()
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                msg = f"{msg}\n{record.exc_text}"
        except Exception:
            # A bad format string or argument: logging's own "--- Logging error ---"
            # report, on the worker's stderr (which the parent shows).
            self.handleError(record)
            return
        try:
            self.worker.send_plain(Log(record.levelno, record.name, msg, record.created))
        except Exception:
            pass  # logging must never take the worker down


class Handshake(enum.Enum):
    """How the worker's handshake ended."""
    READY = "ready"                 # initialised: serve calls
    INIT_FAILED = "init-failed"     # the initializer raised; the parent has been told
    PARENT_LEFT = "parent-left"     # the parent shut down while this worker started


class Worker:
    COLLECT_IDLE_S = 0.5        # the janitor collects once calls paused this long...
    COLLECT_MAX_S = 10.0        # ...or this long after a call first left leases behind

    def __init__(self, channel: Channel):
        self.parent_python = tuple(sys.version_info[:2])     # the Init says (handshake)
        self.channel = channel
        self.link = lifetime.Link(self._send_control, name="parent")
        self._gc_due = None             # when the janitor collects (see _collect_soon)
        self._gc_latest = 0.0           # ... at the latest
        self._busy = False              # a call is running
        self._janitor = None
        self.name = "worker"
        self.functions = fncache.HeldFunctions()     # by-value functions sent once
        self.spin_us = 0              # how long to poll for the next call (the handshake says)
        self.taken = None             # the slot that tells the parent which call we took (ipc/taken.py)

    # -- sending ---------------------------------------------------------------
    def _send_control(self, msgs):
        self.send_plain(Control(msgs))

    def send_plain(self, envelope):
        _, chunks = codec.encode_message(envelope, self.link)
        self.channel.send(chunks)

    def send_parts(self, envelope, objs, msgs=()):
        """Send ``envelope`` with ``objs``, and the control messages ``msgs`` (taken from
        the link: a call's releases, see _run_call) and whatever else is queued for the
        parent just ahead of it, in the same write."""
        try:
            fb, chunks = codec.encode_message(envelope, self.link, objs)
        except BaseException:
            self.link.requeue(msgs)   # not lost: the next send (or the flusher) takes them
            raise
        try:
            self.channel.send(chunks, fb.fds, codec.control_chunks(self.link, [*msgs, *self.link.take_posts()]))
        except BaseException:
            fb.abort()
            raise

    # -- handshake -----------------------------------------------------------------
    def handshake(self) -> "Handshake":
        stack_fd = _register_stack_dump()
        self.taken = WorkerSlot.create()
        hello = {
            "protocol": PROTOCOL_VERSION,
            "version": __version__,
            "python": tuple(sys.version_info[:3]),
            "executable": sys.executable,
            "pid": os.getpid(),
            "uid": lifetime.PROCESS_UID,
            # The hello's fds, in this order, each if present: the read end of the
            # stack-dump pipe, the taken-call slot.
            "stack_signal": int(STACK_SIGNAL) if stack_fd is not None else None,
            "taken_slot": self.taken is not None,
        }
        fds = [fd for fd in (stack_fd, self.taken and self.taken.fd) if fd is not None]
        _, chunks = codec.encode_message(Hello(hello), self.link)
        try:
            self.channel.send(chunks, fds)
        finally:
            if stack_fd is not None:
                os.close(stack_fd)
            if self.taken is not None:
                self.taken.close_fd()
        body, fds = self.channel.recv()
        frame = codec.decode_envelope(body, fds)
        msg = frame.envelope
        if type(msg) is Exit:
            # shutdown() while this worker was starting: the parent's exit frame (sent
            # by the shutting-down thread) can overtake its init frame (sent by the
            # reader thread).  Leave quietly instead of dying with a traceback.
            frame.close_fds()
            return Handshake.PARENT_LEFT
        if type(msg) is not Init:
            frame.close_fds()
            raise RuntimeError(f"expected Init from the parent, got {msg!r:.200}")
        cfg = msg.config
        self.link.uid = cfg["uid"]
        self.name = cfg.get("name", "worker")
        self.parent_python = tuple(cfg.get("python") or sys.version_info[:3])[:2]
        settings.install(cfg["settings"])     # the parent's values, not our environment's
        adopt_import_paths(cfg)
        self.spin_us = cfg.get("spin_us", 0)      # the parent's choice (executor.py)
        root = logging.getLogger()
        root.addHandler(_LogForwarder(self))
        if cfg.get("log_level") is not None:
            root.setLevel(cfg["log_level"])
        try:
            if frame.parts:
                initializer, initargs = codec.decode_part(frame, 0, self.link)
                if initializer is not None:
                    if isinstance(initializer, str):
                        initializer = resolve_reference(initializer)
                    initializer(*initargs)
        except BaseException as exc:
            self._send_exception(InitFailed(), exc)
            return Handshake.INIT_FAILED
        finally:
            frame.close_fds()
        self.send_plain(Ready())
        return Handshake.READY

    # -- the loops -----------------------------------------------------------------
    def serve(self):
        """Receive and run calls on this (the main) thread until told to exit.

        Receiving on the thread that runs the calls saves a thread hand-off
        per call; control messages that arrive during a long call simply wait
        for it to end.  The parent's death during a call is noticed by
        :func:`_watch_parent`.
        """
        channel = self.channel
        spin = _SpinPolicy(self.spin_us)
        taken = self.taken
        while True:
            try:
                body, fds = channel.recv(spin.before_recv())
            except ChannelClosed:
                # The parent is gone (or closed us): nobody is left to report to.
                os._exit(0)
            frame = codec.decode_envelope(body, fds)
            kind = type(frame.envelope)
            if kind is Call:
                if taken is not None:
                    taken.took(frame.envelope.call_id)      # first: from here on it may run
                spin.call_came()
                # Only a call whose arguments lease blocks can leave leases behind
                # (counting them walks every record: not for plain calls).
                leases = False
                for part in frame.parts:
                    if part.refs:
                        leases = True
                held = lifetime.LEDGER.leased_from(self.link) if leases else 0
                self._busy = True
                try:
                    self._run_call(frame)
                finally:
                    self._busy = False
                spin.result_sent()
                lifetime.LEDGER.hush()
                del frame
                lifetime.LEDGER.drain_hushed()     # release the arguments' blocks promptly
                if leases and lifetime.LEDGER.leased_from(self.link) > held:
                    self._collect_soon()
                elif self._gc_due is not None:      # not idle yet: later, within the cap
                    self._gc_due = min(time.monotonic() + self.COLLECT_IDLE_S, self._gc_latest)
            elif kind is Control:
                frame.close_fds()
                apply_control(self.link, frame.envelope.messages)
            elif kind is Exit:
                frame.close_fds()
                return
            else:
                frame.close_fds()

    def _collect_soon(self):
        """Run the cycle collector once the worker has been idle for a moment.

        Arguments caught in reference cycles (a trimesh, any graph with cycles)
        pin the parent's blocks until Python's next collection, which an idle
        worker may never run.  Collecting inline after every such call would
        cost milliseconds on a large heap; a janitor thread does it off the
        hot path instead (a lease still held on purpose costs one collection).
        """
        now = time.monotonic()
        if self._gc_due is None:
            self._gc_latest = now + self.COLLECT_MAX_S
        self._gc_due = min(now + self.COLLECT_IDLE_S, self._gc_latest)
        if self._janitor is None:
            # None at interpreter exit (no thread may start then).
            self._janitor = lifetime.start_thread(self._janitor_loop, "comfy_env-janitor")

    def _janitor_loop(self):
        while True:
            time.sleep(0.25)
            due = self._gc_due
            # Each call that ends pushes the due time back (up to COLLECT_MAX_S after
            # the first need): a full collection (tens of ms on a heap with torch)
            # stalls whatever call it overlaps.
            now = time.monotonic()
            if due is not None and now >= due and (not self._busy or now >= self._gc_latest):
                self._gc_due = None
                gc.collect()
                lifetime.LEDGER.drain()

    def _run_call(self, frame):
        call_id, fnref = frame.envelope.call_id, frame.envelope.fn
        try:
            with IMPORTING:         # what the call names may be imported now
                try:
                    # Before the arguments: the parent counts on this worker holding a
                    # function sent once even if this call's arguments fail to decode.
                    held = self.functions.take(fnref) if fnref is not None else None
                    try:
                        fn, args, kwargs = codec.decode_part(frame, 0, self.link)
                    except Exception as exc:
                        raise self._undecodable(exc) from exc
                finally:
                    frame.close_fds()
                if fnref is not None:
                    fn = self.functions.load(held)
                    held = None
                elif isinstance(fn, str):
                    fn = resolve_reference(fn)
                elif isinstance(fn, tuple) and fn and fn[0] == "by-value":
                    fn = numpy_names.loads(fn[1])
            result = completed(fn(*args, **kwargs))
        except BaseException as exc:
            if isinstance(exc, SystemExit):
                # sys.exit() in user code ends the worker like a crash would.
                _exit_now(exc)
            self._send_exception(Result(call_id, False), exc)
            return
        finally:
            # Their holders die here; we drain inline (below, or in serve()).
            lifetime.LEDGER.hush()
            args = kwargs = fn = held = None
        # Arguments the result does not keep are dead now: their releases go out
        # before the result (in its write), so the parent can recycle those blocks for
        # its next call.
        msgs = lifetime.LEDGER.drain_hushed(keep=self.link)
        try:
            self.send_parts(Result(call_id, True), [result], msgs)
        except ChannelClosed:
            raise
        except BaseException as exc:
            err = PicklingFailed(
                f"the result of the call ({type(result).__qualname__}) could not be sent "
                f"to the parent: {type(exc).__name__}: {exc}"
            )
            self._send_exception(Result(call_id, False), err, cause=exc)

    def _undecodable(self, exc):
        """The call's arguments did not unpickle here: under another Python minor version
        than the parent's, say why that is the likely cause (a class or function of the
        parent's script travels as code, which another version cannot load: the bare
        error was ``code expected at most 16 arguments``).  A module missing here says so
        itself."""
        ours = tuple(sys.version_info[:2])
        if self.parent_python == ours or isinstance(exc, ImportError):
            return exc
        v = ".".join
        return PicklingFailed(
            f"the call's arguments could not be unpickled in the worker ({type(exc).__name__}: {exc}). "
            f"The parent runs Python {v(map(str, self.parent_python))}, this environment Python "
            f"{v(map(str, ours))}: objects of classes (and functions) defined in the parent's script "
            f"travel as Python code, which only the same Python version can load. Pass plain data "
            f"(dicts, lists, numbers, strings, arrays), or define the class in a module both "
            f"environments import.")

    def _send_exception(self, envelope, exc, cause=None):
        """Send ``envelope`` (``Result(call_id, False)`` or ``InitFailed()``) with ``exc``."""
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        if cause is not None:
            tb = "".join(traceback.format_exception(type(cause), cause, cause.__traceback__)) + "\n" + tb
        qual = f"{type(exc).__module__}.{type(exc).__qualname__}"
        try:
            msg = str(exc)
        except Exception:
            msg = "<str() failed>"
        # Part 1 is a plain (type name, message, traceback) the parent can always
        # decode: an exception that pickles here may still fail to be rebuilt there
        # (its class is unknown to the parent, or its own __reduce__ fails), and the
        # substitute must then name the original type, not the decoding error.
        info = (qual, msg, tb)
        try:
            # The exception's own traceback must not travel (frames don't pickle).
            self.send_parts(envelope, [(portable_exception(_strip(exc)), tb), info])
            return
        except ChannelClosed:
            raise
        except BaseException:
            pass
        self.send_parts(envelope, [(RemoteError(qual, msg + " (the exception could not be pickled)", tb), tb),
                                   info])


STRAY_THREAD_GRACE = 5.0        # seconds a thread a call left running may take at exit


def _end_without_stray_threads(grace=STRAY_THREAD_GRACE):
    """The parent said exit: threads that calls started and left running get ``grace``
    seconds to end, then the worker ends without them.  Interpreter shutdown would join
    them, and one that never ends would keep the worker alive for ever (the parent's
    ``shutdown(wait=True)`` waiting on it).  Says so on stderr."""
    me = threading.current_thread()
    deadline = time.monotonic() + grace
    for t in threading.enumerate():
        if t is not me and not t.daemon:
            t.join(max(0.0, deadline - time.monotonic()))
    left = [t.name for t in threading.enumerate() if t is not me and not t.daemon and t.is_alive()]
    if left:
        print(f"comfy_env worker: ending with {len(left)} thread(s) a call started still running "
              f"({', '.join(left[:5])})", file=sys.stderr)
        _exit_now(SystemExit(0))


def _exit_now(exc: SystemExit):
    """End the worker as ``sys.exit()`` would, without waiting for the call's non-daemon
    threads: interpreter shutdown joins them, and one that never ends would keep the
    worker (and its call) alive for ever; the parent learns of the exit only when the
    process ends.  atexit handlers run, and output is flushed, as at a normal exit."""
    code = exc.code
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        try:
            print(code, file=sys.stderr)        # as Python prints a non-int exit argument
        except Exception:
            pass
        status = 1
    try:
        import atexit
        atexit._run_exitfuncs()     # the public atexit module runs them only at shutdown
    except BaseException:
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(status & 0xFF)           # what the OS keeps of any exit status


def _strip(exc):
    exc.__traceback__ = None
    exc.__context__ = None
    exc.__cause__ = None
    return exc


def _parse_args(argv):
    fd = alive = parent = tag = None
    it = iter(argv)
    for a in it:
        if a == "--fd":
            fd = int(next(it))
        elif a == "--alive-fd":
            alive = int(next(it))
        elif a == "--parent-pid":
            parent = int(next(it))
        elif a == "--tag":
            tag = next(it)
    if fd is None:
        raise SystemExit("usage: python -m comfy_env.worker --fd N [--alive-fd M] "
                         "[--parent-pid P] [--tag T] (started by IsolatedExecutor)")
    return fd, alive, parent, tag


def _watch_parent(fd):
    """Exit as soon as the parent dies, even in the middle of a call.

    ``fd`` is the read end of a pipe whose only write end the parent holds:
    the kernel closes it when the parent dies (SIGKILL included), and the
    read returns EOF.  This thread needs the GIL, so a call holding it in C
    would outlive the parent: ``PR_SET_PDEATHSIG`` (forksafe.protect_worker)
    covers that case; the pipe remains where prctl is not available.
    """
    try:
        while os.read(fd, 64):
            pass
    except OSError:
        pass
    os._exit(0)


def main(argv=None):
    fd, alive, parent, tag = _parse_args(sys.argv[1:] if argv is None else argv)
    # Close-on-exec for our fds, and death with the parent even while a call holds the GIL.
    forksafe.protect_worker((fd, alive), parent)
    # Every process started from here carries the tag the parent gave us: if we die, the
    # parent finds and kills those that would outlive us (proctree).  A spawned worker
    # has it in its environment already; one forked from a zygote is told it here.
    if tag:
        proctree.tag_process(tag)
    # Ctrl-C in the terminal reaches the whole process group: the parent
    # decides what happens to calls; the worker must not die under them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A crash in C (a segfault in an extension) prints every thread's Python
    # stack to stderr; the parent keeps the whole dump for WorkerCrashed.
    if sys.__stderr__ is not None:
        try:
            faulthandler.enable(file=sys.__stderr__, all_threads=True)
        except (ValueError, RuntimeError, OSError):
            pass
    if alive is not None:
        threading.Thread(target=_watch_parent, args=(alive,), name="comfy_env-parent-watch",
                         daemon=True).start()
    # The parent's script functions arrive by value: give them one __main__ to share,
    # where code in the worker finds them by name (ipc/mainspace.py).
    mainspace.install()
    worker = Worker(Channel.from_fd(fd))
    forksafe.track_channel(worker.channel)     # a fork child of the worker closes it
    planes.install_cuda_plane_with_torch()    # before the initializer, which may import torch
    try:
        outcome = worker.handshake()
    except ChannelClosed:
        os._exit(0)
    if outcome is Handshake.PARENT_LEFT:
        return 0
    if outcome is Handshake.INIT_FAILED:
        # Stay until the parent has read the failure, then go.
        time.sleep(0.05)
        return 3
    worker.serve()
    _end_without_stray_threads()
    return 0


if __name__ == "__main__":
    sys.exit(main())
