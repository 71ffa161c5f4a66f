"""The parent's handle on one worker process.

Per worker, two threads::

    reader  -- handshake, then frames from the worker: results -> futures,
               log records -> logging, releases -> ledger; EOF -> death report
    output  -- the worker's stdout/stderr pipes, line by line, to wherever
               ``worker_output`` says (see below), and a tail of stderr kept
               for crash reports

Worker output (``IsolatedExecutor(worker_output=...)``):

* ``"stream"`` (default): each line goes to the parent's ``sys.stdout`` /
  ``sys.stderr`` *as it is at the time* (pytest's capture, a redirected
  stream), prefixed with ``[<worker name>] ``, as soon as its end arrives.
* ``"logging"``: each line becomes an INFO record of the executor's logger
  ``comfy_env.worker.<name>`` (attributes ``stream``, ``worker_name``, ``worker_pid``).
* ``"discard"``: dropped.

In every mode the stderr tail is kept for ``WorkerCrashed``, and records of the
worker's ``logging`` go to the executor's logger at their own level: that is
where a program configures logging, and an unconfigured one still shows
WARNING and above through logging's last-resort handler.

A line ends at ``\n``, ``\r\n`` or a lone ``\r`` (progress bars redraw with
``\r``: forwarded with its ``\r``, a terminal still redraws in place), and is
cut into pieces of at most MAX_LINE characters, so output without line ends
costs linear time and bounded memory.

A caller waiting in ``result()`` (or ``exception()``) for a call this worker runs
reads the channel itself meanwhile (``read_for``), and handles every frame as the
reader would: its result then costs one thread wake-up, not two (the reader's,
then the caller's).  The reader thread stands aside while it does, and reads
whenever nobody waits that way (done-callbacks, ``as_completed``, log records
between calls).  Which thread reads is settled by the kernel: both wait on one
epoll set where the channel is armed one-shot (see ``_read_loop``).

Calls are sent by whichever thread dispatches them (the submitter's, or the
reader that just finished the previous call): no queue-feeder thread in
between, which is where most of ProcessPoolExecutor's latency goes.
"""
from __future__ import annotations

import codecs
import collections
import logging
import os
import re
import secrets
import select
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time

from .. import fncache, forksafe
from .._version import PROTOCOL_VERSION, __version__
from ..errors import (CallTimeout, InitializerFailed, PicklingFailed, ProtocolMismatch, RemoteError,
                      RemoteTraceback, WorkerCrashed, WorkerStartError)
from .. import settings
from ..ipc import codec, interrupts, lifetime
from ..ipc.calls import parent_argv, parent_cwd
from ..ipc.protocol import (Control, Exit, Hello, ImportPaths, Init, InitFailed, Log, Ready, Result,
                            apply_control)
from ..ipc.taken import ParentSlot
from ..ipc.transport import Channel, ChannelClosed, ProtocolError
from .. import proctree
from . import launch
from .workitem import DEFAULT, Stage
from .futures import LazyResult, decode_error

WORKER_OUTPUT_MODES = ("stream", "logging", "discard")
STDERR_TAIL_LINES = 30
# faulthandler's dump of a fatal error is kept whole, up to this many lines (it
# prints at most 100 frames per thread).
FATAL_DUMP_LINES = 2000
MAX_LINE = 1 << 20              # characters; longer lines are forwarded in pieces
_READ_SIZE = 1 << 16
_LONGEST_POLL_S = 3600.0        # a caller's read waits at most this long before looking again
# call_timeout: how long to wait for the worker's stack before killing it anyway,
# and the silence that says the dump is complete (faulthandler writes it in one go).
STACK_DUMP_WAIT = 1.0
STACK_DUMP_QUIET = 0.2
# One writer at a time on the parent's streams: lines of several workers never mix.
_stream_lock = threading.Lock()


class WorkerHandle:
    def __init__(self, pool, index):
        self.pool = pool
        self.index = index
        self.proc = None
        self.pid = None
        self._ticks = None            # proctree.start_ticks of the process
        self._tag = None              # the tag the processes it starts carry (proctree), ours to choose
        self.channel = None
        self.link = lifetime.Link(self._send_control, name=f"{pool.name}#{index}")
        self.item = None              # the work item running in the worker
        self.deadline = None
        self.ready = False
        self.exiting = False          # we asked it to exit
        self.made_after_failures = 0  # the pool's failed-start count when it was made (_start_failed)
        self._exit_lock = threading.Lock()      # request_exit vs. start() making the channel
        self.stderr_tail = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._fatal_dump = False      # a "Fatal Python error" dump is being kept whole
        self._output_done = threading.Event()     # the worker's own output is all forwarded
        self._exited_fd = None        # eventfd: _finish tells the pump the process is gone
        self._exited_lock = threading.Lock()    # writing it vs. the pump closing it
        self._exit_reported = threading.Event()     # on_exit ran: the watcher let go of it
        self._reader = None
        self._alive_w = None
        self._stack_fd = None         # read end of the worker's stack-dump pipe
        self._stack_lock = threading.Lock()     # reading it vs. closing it in _finish
        self._stack_signal = None
        self._taken = None            # the worker's taken-call slot (ipc/taken.py), from its handshake
        self.timeout_stack = None     # the stack taken by kill_for_timeout ("" if none came)
        self.protocol_error = None    # the worker wrote bytes that are not a frame
        self.read_interrupted = None  # a send or a caller's read was cut short (stop_interrupted)
        self.info = {}
        # The by-value functions this worker holds (the parent's books; see fncache).
        self.sent_functions = fncache.SentFunctions()
        # The read role: one thread at a time reads the channel -- the reader thread, or a
        # caller waiting in result() for a call of this worker (it reads its own result:
        # one thread wake-up less).  _role_lock guards these fields; _role is its
        # condition, which only the reader thread waits on (while _aside says so: the
        # callers' warm path takes the bare lock and notifies only then).
        self._role_lock = threading.Lock()
        self._role = threading.Condition(self._role_lock)
        self._aside = False           # the reader thread waits on _role
        self._reader_ident = None     # the reader thread's ident, once it runs
        self._waiter = None           # the future a caller in read_for waits for
        self._waiter_thread = None    # ... and that caller's thread
        self._waiter_token = None     # ... and its own mark (see read_for)
        self._read_end = None         # the channel ended (a caller may have read it first)
        self._rearm = False           # a caller left abnormally: the reader re-arms the channel
        self._handed = None           # ... after dispatching this frame the caller read
        self._epoll = self._wake = None
        self._owner_pid = forksafe.PID
        # Futures a caller completed while reading its own result: their done-callbacks
        # run on the reader thread (see _on_result).
        self._deferred = collections.deque()
        # This process's sys.path as the worker last had it (env=None workers only):
        # a change goes with the next call (ImportPaths), as code adds plugin paths at run time.
        self._sent_path = None

    # -- start ---------------------------------------------------------------
    def start(self):
        parent, child = Channel.pair()
        # The worker watches the read end: EOF means this process died.
        alive_r, self._alive_w = os.pipe()
        reported = self._exit_reported
        self._tag = secrets.token_hex(8)
        try:
            self.proc = launch.spawn(self.pool.wenv, child.fileno(), alive_r,
                                     on_exit=lambda: _process_exited(parent, reported),
                                     zygote=self.pool.zygote, tag=self._tag)
        except BaseException:
            os.close(self._alive_w)
            self._alive_w = None
            parent.close()          # nothing will read it (the error's traceback keeps this frame)
            raise
        finally:
            child.close()
            os.close(alive_r)
        self.pid = self.proc.pid
        self._ticks = proctree.start_ticks(self.pid)     # its identity for kill_tree
        with self._exit_lock:
            self.channel = parent
            asked = self.exiting
        if asked:
            self._send_exit(parent)     # request_exit came before the channel (see there)
        self.logger = self.pool.logger
        self._exited_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            threading.Thread(target=self._pump_output, name=f"comfy_env-output-{self.pid}",
                             daemon=True).start()
        except BaseException:
            os.close(self._exited_fd)
            self._exited_fd = None
            raise
        self._reader = threading.Thread(target=self._read_loop, name=f"comfy_env-reader-{self.pid}",
                                        daemon=True)
        self._reader.start()

    # -- sending ---------------------------------------------------------------
    def _send_control(self, msgs):
        _, chunks = codec.encode_message(Control(msgs), self.link)
        self.channel.send(chunks)

    def send_call(self, item, chunks, fds, books=None):
        """Send an already-encoded call frame; the item is now this worker's.

        ``books()`` (the executor's ``fn_sent``) records what the worker holds after
        this frame, just before it goes out: once it is out the worker may answer, and
        another thread hand it its next call, planned from these books, before this
        thread runs again.  A send that fails leaves the worker dead or stopped, and
        its books with it."""
        self.item = item
        item.future._worker = self
        timeout = self.pool.call_timeout if item.timeout is DEFAULT else item.timeout
        if timeout is not None:
            self.deadline = time.monotonic() + timeout
            self.pool.watchdog.watch(self)
        # Tensors the caller already dropped, and releases already queued for this
        # worker, go first: it applies them before the call, as it would have if the
        # ledger's flusher had got to them (it naps ``Ledger.BATCH_S`` after a burst).  So a caller
        # that drops a result before the next call always lets the worker recycle its
        # staging blocks ("idle" reports), instead of only when the flusher was quick.
        # What is queued for this worker goes in the call's own write (keep=).
        link = self.link
        try:
            msgs = lifetime.LEDGER.drain(keep=link)
        except Exception:           # a plane's free failed: the call still goes
            self.logger.exception("comfy_env: applying dropped blocks before a call failed")
            msgs = link.take_posts()    # what was queued before the failure still goes first
        sent = self._sent_path
        if sent is not None and sys.path != sent:
            self._sent_path = list(sys.path)
            msgs.append(ImportPaths(self._sent_path))
        before = codec.control_chunks(link, msgs)
        if books is not None:
            books()
        self.channel.send(chunks, fds, before)

    def stop_interrupted(self, exc):
        """A send or a read of this worker's channel was cut short by ``exc`` (a signal
        handler raising on the main thread): the channel's state is unknown, so the
        worker is killed; the death report names the interruption."""
        self.read_interrupted = exc
        self.kill()

    def request_exit(self):
        with self._exit_lock:
            if self.exiting:
                return
            self.exiting = True
            channel = self.channel
        if channel is not None:
            self._send_exit(channel)
        # else: counted by the pool but not started yet (a pool broken meanwhile):
        # start() sends it once the channel exists, and the worker leaves at its handshake.

    def _send_exit(self, channel):
        try:
            _, chunks = codec.encode_message(Exit(), self.link)
            channel.send(chunks)
        except (ChannelClosed, OSError):
            pass

    @interrupts.holds
    def kill(self):
        """SIGKILL the worker and the processes its calls left running (proctree): its
        tree, then those that left the tree but carry its tag.  Held against Ctrl-C: cut
        between the freeze and the kill, it would leave them stopped."""
        proc = self.proc
        if proc is not None:
            proctree.kill_tree(proc, self._ticks)
            self._kill_tagged()

    def _kill_tagged(self):
        """Kill what the worker started and left running outside its tree now (a daemon,
        or everything once the worker died by itself and init adopted it).  Once: the
        worker is dead or dying, so nothing new gets its tag after this."""
        tag, self._tag = self._tag, None
        if tag is not None:
            try:
                proctree.kill_tagged(tag)
            except Exception:       # a /proc we cannot read as expected: nothing more to do
                self.logger.debug("comfy_env: looking for worker %s's processes failed", self.pid,
                                  exc_info=True)

    # -- call_timeout --------------------------------------------------------------------
    def kill_for_timeout(self):
        """``call_timeout`` passed: take the worker's stack (every thread), then kill it.

        The timer thread calls this (after it released the pool lock); the wait for
        the dump (at most STACK_DUMP_WAIT) happens on a thread of its own, so that
        the timer's other deadlines are not held up.  The worker is
        marked as exiting first: a result that still comes in meanwhile completes
        its call, but the worker gets no other call.
        """
        self.exiting = True
        if self._stack_fd is None or self.proc is None:
            self.timeout_stack = ""
            self.kill()
            return
        try:
            threading.Thread(target=self._stack_then_kill, daemon=True,
                             name=f"comfy_env-stack-{self.pid}").start()
        except RuntimeError:            # interpreter shutdown: no new threads
            self.timeout_stack = ""
            self.kill()

    def _stack_then_kill(self):
        try:
            self.timeout_stack = self._take_stack()
        except Exception:
            self.timeout_stack = ""
        finally:
            self.kill()                 # after the stack is stored: the death report reads it

    def _take_stack(self):
        """Ask the worker for its stack (faulthandler, no GIL needed) and read it."""
        with self._stack_lock:
            if self._stack_fd is None:
                return ""
            return self._read_stack(self._stack_fd)

    def _signal_worker(self, sig):
        """``sig`` to the worker's own process: ``proc``, or where ``proc`` is a wrapper
        (bubblewrap, whose default action for the stack signal would end it, and the
        worker with it) the process below it that the handshake named.  False where that
        process is not ``proc``'s child now (nothing is sent: never a pid not ours)."""
        inner = (self.info or {}).get("pid")
        if inner is None or inner == self.proc.pid:
            self.proc.send_signal(sig)      # Popen.send_signal: never a reaped (reused) pid
            return True
        if proctree.parent_of(inner) != self.proc.pid:
            return False
        os.kill(inner, sig)
        return True

    def _read_stack(self, fd):
        try:
            if not self._signal_worker(self._stack_signal):
                return ""
        except OSError:
            return ""
        if self.proc.returncode is not None:
            return ""
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        chunks = []
        end = time.monotonic() + STACK_DUMP_WAIT
        while True:
            left = end - time.monotonic()
            if left <= 0:
                break
            wait = min(left, STACK_DUMP_QUIET) if chunks else left
            if not poller.poll(wait * 1000):
                if chunks:
                    break               # silence after the dump: it is complete
                continue
            data = os.read(fd, _READ_SIZE)
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks).decode("utf-8", "replace")

    def timeout_error(self, call_timeout):
        """The CallTimeout for the call this worker was killed for (with its stack)."""
        stack = (self.timeout_stack or "").rstrip()
        msg = (f"the call ran longer than call_timeout={call_timeout}s; its worker "
               f"(pid {self.pid}, {self.pool.wenv.label}) was killed")
        if stack:
            msg += (f"\nStack of the worker (pid {self.pid}) when it was stopped, every "
                    f"thread, most recent call first:\n{stack}")
        else:
            msg += " (it did not dump its stack in time)"
        return CallTimeout(msg, worker_stack=stack)

    def join(self, timeout=None):
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout)

    # -- reading -------------------------------------------------------------------
    def _recv_frame(self):
        """The next frame; bytes that do not decode are a ProtocolError (the channel is done)."""
        body, fds = self.channel.recv()
        try:
            return codec.decode_envelope(body, fds)
        except Exception as exc:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            raise ProtocolError(f"a message from the worker does not decode: "
                                f"{type(exc).__name__}: {exc}") from exc

    def _handshake(self):
        frame = self._recv_frame()
        msg = frame.envelope
        if type(msg) is not Hello or not isinstance(msg.info, dict):
            frame.close_fds()
            raise WorkerStartError(f"worker sent {msg!r:.200} instead of its handshake")
        info = msg.info
        if info.get("stack_signal") and frame.fds:
            self._stack_fd = frame.fds.pop(0)
            self._stack_signal = info["stack_signal"]
        if info.get("taken_slot") and frame.fds:
            try:
                self._taken = ParentSlot(frame.fds.pop(0))
            except OSError:
                pass                # as without a slot: every call counts as taken
        frame.close_fds()
        self.info = info
        if info.get("protocol") != PROTOCOL_VERSION:
            raise ProtocolMismatch(
                f"the worker (comfy_env {info.get('version')}, Python {info.get('python')}) speaks "
                f"protocol {info.get('protocol')}, the parent (comfy_env {__version__}) speaks "
                f"{PROTOCOL_VERSION}: the worker must import the same comfy_env as the parent"
            )
        # The handshake carries comfy_env's and Python's versions too; they were not
        # checked.  Another comfy_env may speak the same protocol number while its
        # message contents differ, and a worker on another Python than its
        # environment claims breaks the by-value pickling decision (_encode).
        if info.get("version") != __version__:
            raise ProtocolMismatch(
                f"the worker runs comfy_env {info.get('version')} (from "
                f"{info.get('executable')}), the parent comfy_env {__version__}: the worker "
                f"must import the same comfy_env as the parent"
            )
        worker_py = tuple(info.get("python") or ())[:2]
        env_py = tuple(self.pool.wenv.python_version[:2])
        if worker_py != env_py:
            raise WorkerStartError(
                f"the worker's interpreter {info.get('executable')} runs Python "
                f"{'.'.join(map(str, worker_py))}, but its environment "
                f"{self.pool.wenv.label!r} says Python {'.'.join(map(str, env_py))}"
            )
        self.link.uid = info["uid"]
        if self.pool.wenv.is_current:
            self._sent_path = list(sys.path)
        cfg = {
            "uid": lifetime.PROCESS_UID,
            "name": self.link.name,
            "sys_path": self._sent_path,
            "cwd": parent_cwd(),    # a worker starts elsewhere (launch.py): it changes here
            "argv": parent_argv(),
            "python": tuple(sys.version_info[:3]),
            "log_level": self.pool.worker_log_level,
            "settings": settings.to_wire(self.pool.settings),
            "spin_us": self.pool.worker_spin_us,
        }
        objs = [self.pool.init_payload] if self.pool.init_payload is not None else []
        try:
            fb, chunks = codec.encode_message(Init(cfg), self.link, objs)
        except Exception as exc:
            if not objs:
                raise
            raise _init_payload_error(self.pool.init_payload, exc) from exc
        self.channel.send(chunks, fb.fds)
        while True:
            frame = self._recv_frame()
            kind = type(frame.envelope)
            if kind is not Log and kind is not Control:
                break
            # The initializer's log records, and releases of the arguments it was sent,
            # come before Ready.
            self._dispatch_frame(frame)
        if kind is InitFailed:
            try:
                exc, tb = _decode_remote_exception(frame, self.link)
            finally:
                frame.close_fds()
            err = InitializerFailed(
                f"the initializer failed in worker pid {self.pid}: {type(exc).__name__}: {exc}")
            err.__cause__ = RemoteTraceback(tb)
            raise err
        frame.close_fds()
        if kind is not Ready:
            raise WorkerStartError(f"worker sent {frame.envelope!r:.200} instead of Ready")

    def _read_loop(self):
        pool = self.pool
        self._reader_ident = threading.get_ident()
        ep = None
        try:
            self._handshake()
            # One epoll set, waited on by this thread and by at most one caller in
            # result() (read_for).  The channel is armed one-shot: the thread its event
            # goes to holds the read role until it re-arms, and the kernel hands an
            # exclusive epoll wait's event to the thread that waited last -- the caller,
            # which so reads its own result with no thread in between.  Made in the
            # start's try: no fd for them (EMFILE) is a failed start, not a dead reader.
            ep = select.epoll()
            wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except BaseException as exc:
            if ep is not None:
                ep.close()
            self._finish(start_error=exc)
            return
        self._epoll, self._wake = ep, wake
        sock = self.channel.fileno()
        ep.register(sock, _ARMED)
        ep.register(self._wake, select.EPOLLIN | select.EPOLLET)
        role_lock = self._role_lock
        self.ready = True
        try:
            # Inside the try: a bug raised here must kill this worker (and so start
            # another for the queued calls), not end this thread and leave them pending.
            pool.on_ready(self)
            while True:
                # The channel's turn first: a re-arm asked for below must not
                # hand the channel to another thread while this one reads it.
                for fd, _ in sorted(ep.poll(), key=lambda e: e[0] != sock):
                    if fd == sock:
                        self._read_turn()
                        self._run_deferred()    # the channel is armed again: a caller may read
                        self._stand_aside()
                    else:
                        self._drain_wake()
                if self._deferred:
                    self._run_deferred()
                with role_lock:
                    rearm, handed = self._rearm, self._handed
                    self._handed = None
                    end = self._read_end
                if end is not None:
                    if isinstance(end, (ChannelClosed, ProtocolError)):
                        raise end
                    # A caller's turn was cut short (a signal handler raised on the
                    # main thread, or a bug): where the channel stands is unknown.
                    self.stop_interrupted(end)
                    break
                if rearm:
                    # A caller left the channel to this thread: interrupted around its
                    # wait (it may have taken the channel's event without reading), or
                    # on the main thread with a control message in hand (see
                    # _read_turn).  Nobody else holds the channel now (the caller's
                    # slot stays taken until here): finish the turn, then re-arm.
                    if handed is not None:
                        self._dispatch_frame(handed)
                        while self.channel.buffered():
                            self._dispatch_frame(self._recv_frame())
                    with role_lock:
                        ep.modify(sock, _ARMED)
                        self._rearm = False
                        self._waiter = self._waiter_thread = self._waiter_token = None
                    self._run_deferred()
        except ChannelClosed:
            pass
        except ProtocolError as exc:
            # Stray bytes on the channel (a library writing to a reused fd number):
            # nothing after them can be trusted.  The death report names it.
            self.protocol_error = exc
            self.kill()
        except BaseException as exc:      # no memory for a frame, or a bug: must not hang futures
            self.logger.error("comfy_env: reader of worker %s failed: %r", self.pid, exc,
                              exc_info=True)
            self.stop_interrupted(exc)    # the death report names it
        with role_lock:
            if self._read_end is None:
                self._read_end = ChannelClosed("the worker's channel is done")
            if self._waiter is not None:
                os.eventfd_write(self._wake, 1)
            self._wait_aside()
        self._run_deferred()        # no caller reads any more: nothing is deferred after this
        ep.close()
        os.close(self._wake)
        self._finish()

    @interrupts.holds
    def _read_turn(self, unheld=False):
        """This thread got the channel's one-shot event: read what is there, re-arm.

        Frames already in the channel's buffer are read too: no event announces them.
        When the channel ends (or this turn is cut short, so that the channel's or a
        frame's state is unknown), ``_read_end`` says so and the reader thread reports
        it, whichever thread read it: the worker is then killed (see read_for).

        ``unheld``: this is the main thread, where Python runs signal handlers, and a
        Ctrl-C is not held back here (a program's own SIGINT handler; see
        ipc/interrupts.py), so it may raise between any two lines.  Control messages
        change the process-wide ledger, which must never be left half-updated: the
        main thread then hands the first one it meets, and what follows it, to the
        reader thread and returns False (it waits for its future as any caller does).
        """
        try:
            frame = self._recv_frame()
            while True:
                if unheld and type(frame.envelope) is Control:
                    with self._role_lock:
                        self._handed = frame
                        self._rearm = True
                    os.eventfd_write(self._wake, 1)
                    return False
                self._dispatch_frame(frame)
                if not self.channel.buffered():
                    break
                frame = self._recv_frame()
        except BaseException as exc:
            with self._role_lock:
                self._read_end = exc
            os.eventfd_write(self._wake, 1)     # whoever waits on the set learns it
            raise
        self._epoll.modify(self.channel.fileno(), _ARMED)
        return True

    def _queue_callbacks(self, fut):
        """Reader thread, in a read turn: ``fut``'s done-callbacks run once the turn is
        over and the channel armed again (_read_loop), so that a callback that blocks --
        on a lock a caller holds while it waits in read_for for its next result -- does
        not keep that caller from reading it.  A caller waiting for ``fut`` itself is
        woken now."""
        if self._waiter is fut:
            os.eventfd_write(self._wake, 1)
        self._deferred.append(fut)

    def _defer_callbacks(self, fut):
        """A caller completed ``fut`` while reading its own result: its done-callbacks
        run here, on the reader thread, as if this thread had read it."""
        self._deferred.append(fut)
        os.eventfd_write(self._wake, 1)

    def _run_deferred(self):
        deferred = self._deferred
        while deferred:
            deferred.popleft()._run_done_callbacks()

    def _drain_wake(self):
        """Take the wake-up eventfd's count (edge-triggered: it must be read to fire again)."""
        try:
            os.eventfd_read(self._wake)
        except BlockingIOError:
            pass

    def _stand_aside(self):
        """After this thread's turn: while a caller waits in read_for, stand aside.

        The caller watches the channel meanwhile (nothing is missed); were this
        thread to wait on the epoll set again it would be the last to wait, and so
        get the next event instead of the caller.  When the turn completed the
        caller's future (or the channel ended), wake it first.
        """
        with self._role_lock:
            fut = self._waiter
            if fut is None:
                return
            if fut.done() or self._read_end is not None:
                os.eventfd_write(self._wake, 1)
            # Not the future itself while waiting: a finished call must hold nothing.
            del fut
            self._wait_aside()

    def _wait_aside(self):
        """Reader thread, holding the role's lock: wait until no caller reads (or one
        left the channel to this thread).  ``_aside`` tells the callers to notify."""
        self._aside = True
        try:
            while self._waiter is not None and not self._rearm:
                self._role.wait()
        finally:
            self._aside = False

    def _dispatch_frame(self, frame):
        kind = type(frame.envelope)
        if kind is Result:
            self._on_result(frame)
        elif kind is Control:
            frame.close_fds()
            apply_control(self.link, frame.envelope.messages)
        elif kind is Log:
            frame.close_fds()
            self._on_log(frame.envelope)
        else:
            frame.close_fds()

    def reads_on(self, thread):
        """Whether ``thread`` reads this worker's results now (done-callbacks run there).

        A caller that left its read to the reader thread (``_rearm``) keeps its slot
        until that thread finished the turn, which may complete the caller's future
        first: the caller is not reading any more (it may shut the executor down)."""
        return self._reader is thread or (self._waiter_thread is thread and not self._rearm)

    # On the main thread a Ctrl-C waits while this takes or gives back the read role
    # and reads frames, and cuts in only while it waits (ipc/interrupts.py).
    @interrupts.holds
    def read_for(self, fut, timeout):
        """Wait for ``fut`` by reading this worker's channel on the calling thread.

        Returns when ``fut`` is done, the timeout passed, or the channel ended (the
        reader thread reports that).  Does nothing when another caller already waits
        this way, in a fork child, or before the worker is ready: the caller then
        waits on the future as usual.
        """
        main = interrupts.on_main()
        role_lock = self._role_lock
        token = object()        # which caller holds the role: this one, if it matches below
        clean = False
        try:
            with role_lock:
                if (self._waiter is not None or self._read_end is not None or not self.ready
                        or self._owner_pid != forksafe.PID):
                    return
                self._waiter_token = token
                self._waiter = fut
                self._waiter_thread = threading.current_thread()
            ep = self._epoll
            sock = self.channel.fileno()
            # Where a Ctrl-C can't be held back (a program's own SIGINT handler), control
            # messages go to the reader thread (see _read_turn).
            unheld = main and interrupts.may_raise()
            end = None if timeout is None else time.monotonic() + timeout
            while not fut._settled():
                if end is None:
                    left = -1
                else:
                    left = end - time.monotonic()
                    if left <= 0:
                        break
                    # epoll takes whole milliseconds as a C int (24.8 days at most): a
                    # longer timeout waits in slices, the loop looking again after each.
                    left = min(left, _LONGEST_POLL_S)
                if main:
                    with interrupts.waiting():      # the one place a Ctrl-C may cut in
                        events = ep.poll(left, 1)
                else:
                    events = ep.poll(left, 1)
                for fd, _ in events:
                    if fd == sock:
                        try:
                            if not self._read_turn(unheld):
                                return      # handed to the reader thread, which re-arms
                        except (ChannelClosed, ProtocolError):
                            clean = True
                            return
                        except Exception:
                            # This read failed (no memory for the frame): the reader
                            # thread stops the worker (_read_end), and the death report,
                            # naming the error, is the future's outcome for every
                            # accessor alike.
                            clean = True
                            return
                    else:
                        self._drain_wake()
                if self._read_end is not None:      # set under the role's lock; read whole
                    clean = True
                    return
            clean = True
        finally:
            with role_lock:
                if self._waiter_token is token:
                    if clean or self._read_end is not None:
                        self._waiter = self._waiter_thread = self._waiter_token = None
                    else:
                        # Interrupted (a Ctrl-C in the wait) between taking the channel's
                        # event and reading, perhaps: the reader thread re-arms it.
                        self._rearm = True
                        os.eventfd_write(self._wake, 1)
                    if self._aside:
                        self._role.notify_all()

    def _on_result(self, frame):
        call_id, ok = frame.envelope.call_id, frame.envelope.ok
        # Take the item under the pool lock: the watchdog and dispatch() check
        # ``worker.item`` under it too (see executor.py), so exactly one of them owns it.
        with self.pool.lock:
            item = self.item
            if item is None or item.call_id != call_id:
                item = None
            elif item.stage is Stage.TIMED_OUT:
                # Finished while its stack was being taken (the dump signal can
                # cut a C sleep short): it still timed out, and the death report
                # says so.
                item = None
            else:
                self.item = None
                self.deadline = None
        if item is None:
            frame.close_fds()
            return
        fut = item.future
        fut._worker = None
        del item
        # On the main thread (a caller reading its own result) a signal handler may
        # raise anywhere below: the future is completed whatever happens, with the
        # outcome if it was decoded, and the interruption goes on up.
        outcome = None
        try:
            outcome = self._outcome(frame, ok)
            self.pool.on_idle(self)
        finally:
            if outcome is None:
                outcome = (False, WorkerCrashed(
                    f"worker pid {self.pid}: reading the call's result was interrupted "
                    f"(a signal handler raised on the thread reading it)"))
            kind, value = outcome
            # Done-callbacks run on the reader thread, as on ProcessPoolExecutor's manager
            # thread, and a caller waiting in result() returns as soon as the outcome is
            # there: a callback may wait for a lock the caller holds, or take long.
            if threading.get_ident() == self._reader_ident:
                fut._callbacks_to = self._queue_callbacks
            else:
                fut._callbacks_to = self._defer_callbacks     # a caller read its own result
            try:
                if kind is True:
                    fut.set_result(value)
                elif kind is None:
                    fut._set_lazy_result(value)
                else:
                    fut.set_exception(value)
            finally:
                fut._callbacks_to = None

    def _outcome(self, frame, ok):
        """Decode a result frame: ``(True, value)``, ``(None, LazyResult)`` or ``(False, exc)``.

        Decode first, hand the worker back (which may send it the next call), and
        complete the future last: the caller wakes up wanting the GIL.
        """
        if ok and frame.parts[0].refs is None:
            # Nothing in shared memory: decode here, no lazy bookkeeping.
            frame.close_fds()
            try:
                outcome = (True, codec.decode_part(frame, 0, self.link))
            except KeyboardInterrupt as exc:
                if interrupts.maybe_ctrl_c():
                    raise           # maybe Ctrl-C on the main thread: not the payload's fault
                # Elsewhere, or with Ctrl-C held back or impossible, only the payload raises it.
                outcome = (False, decode_error(exc))
            except BaseException as exc:
                outcome = (False, decode_error(exc))
        elif ok:
            try:
                outcome = (None, LazyResult(frame, self.link))
            except BaseException as exc:
                frame.close_fds()
                outcome = (False, decode_error(exc))
        else:
            try:
                exc, tb = _decode_remote_exception(frame, self.link)
            finally:
                frame.close_fds()
            if tb:
                exc.__cause__ = RemoteTraceback(tb)
            outcome = (False, exc)
        return outcome

    def _on_log(self, log):
        _, levelno, name, msg, created = log
        logger = self.logger
        if logger.isEnabledFor(levelno):
            rec = logger.makeRecord(logger.name, levelno, "(worker)", 0,
                                    "[%s] %s: %s", (self.pool.name, name, msg), None,
                                    extra={"worker_name": self.link.name, "worker_pid": self.pid,
                                           "worker_logger": name, "stream": "logging"})
            rec.created = created
            logger.handle(rec)

    def _pump_output(self):
        """Forward the worker's stdout and stderr until both reach EOF.

        A process the call started may hold the pipes after the worker exited, so EOF
        can come much later: once _finish says the worker is gone (``_exited_fd``),
        what the worker wrote is all in the pipes, and ``_output_done`` is set as soon
        as nothing is left to read -- the death report waits for that, not for EOF --
        while that other process's lines are still forwarded until it closes them."""
        sel = selectors.DefaultSelector()
        streams = {self.proc.stdout: "stdout", self.proc.stderr: "stderr"}
        lines = {}
        for f in streams:
            sel.register(f, selectors.EVENT_READ)
            lines[f] = _LineSplitter(MAX_LINE)
        exited = self._exited_fd
        sel.register(exited, selectors.EVENT_READ)
        draining = False
        try:
            while streams:
                ready = sel.select(0 if draining else None)
                if draining and not any(key.fileobj in streams for key, _ in ready):
                    draining = False
                    self._output_done.set()
                    continue
                for key, _ in ready:
                    f = key.fileobj
                    if f is exited:
                        sel.unregister(exited)
                        draining = True
                        continue
                    data = os.read(f.fileno(), _READ_SIZE)
                    name = streams[f]
                    if not data:
                        sel.unregister(f)
                        del streams[f]
                    if name == "stdout" and self.pool.worker_output == "discard":
                        continue        # read only to keep the pipe flowing
                    self._forward(name, lines[f].feed(data, final=not data))
        finally:
            sel.close()
            for f in (self.proc.stdout, self.proc.stderr):
                try:
                    f.close()
                except OSError:
                    pass
            with self._exited_lock:
                self._exited_fd = None
                os.close(exited)
            self._output_done.set()

    def _tell_pump_exited(self):
        with self._exited_lock:
            if self._exited_fd is not None:
                os.eventfd_write(self._exited_fd, 1)

    def _forward(self, stream, lines):
        """Hand complete lines ``[(text, end), ...]`` of one read to ``worker_output``."""
        if not lines:
            return
        if stream == "stderr":
            self._keep_tail(lines)
        forward_output(self.pool.worker_output, self.pool.logger, self.pool.name, self.link.name, self.pid,
                       stream, lines)

    def _keep_tail(self, lines):
        for line, _ in lines:
            if not self._fatal_dump and line.startswith("Fatal Python error: "):
                # faulthandler's dump follows: keep all of it, plus what came before.
                self._fatal_dump = True
                self.stderr_tail = collections.deque(
                    self.stderr_tail, maxlen=STDERR_TAIL_LINES + FATAL_DUMP_LINES)
            self.stderr_tail.append(line)

    # -- death -----------------------------------------------------------------------
    def _finish(self, start_error=None):
        """The channel is closed: reap the process and report what it was doing."""
        try:
            self.channel.close()
        except OSError:
            pass
        if self._alive_w is not None:
            os.close(self._alive_w)
            self._alive_w = None
        if self.exiting and start_error is None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()
        else:
            # EOF without being asked to exit: it is dying, or wedged with a
            # closed socket.  Give it a moment, then make sure.
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.kill()
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        if code is not None:
            if code != 0 or not self.exiting:
                # It died by itself (a crash, os._exit, the OOM killer), even while asked
                # to exit: what it started is init's now, and would run on with nobody to
                # stop it.  A worker that exits when asked leaves its processes alone, as
                # any process's normal exit does.
                self._kill_tagged()
            self._tell_pump_exited()
        self._output_done.wait(timeout=2)
        if code is not None:
            # Whoever watches the process (the keeper, or the zygote that forked it)
            # closes its pidfd before it reports the exit: once it has, a joined
            # worker has left no fd behind.
            self._exit_reported.wait(timeout=2)
        with self._stack_lock:          # waits for a stack being read
            fd, self._stack_fd = self._stack_fd, None
        if fd is not None:
            os.close(fd)
        lifetime.LEDGER.link_closed(self.link)
        with self.pool.lock:        # vs. dispatch()'s requeue, see _on_result
            item, self.item = self.item, None
        if item is not None:
            item.future._worker = None
        try:
            self.pool.on_death(self, item, code, start_error)
        finally:
            if self._taken is not None:
                self._taken.close()
                self._taken = None

    def took(self, call_id):
        """Whether the worker took call ``call_id`` off its channel (ipc/taken.py): False
        when it had not when it died, so nothing of the call ran there; None when it
        can't be told (no slot)."""
        slot = self._taken
        return None if slot is None else slot.last() == call_id

    def describe_exit(self, code):
        if code is None:
            how = "did not exit"
        elif code < 0:
            try:
                how = f"was killed by signal {signal.Signals(-code).name} ({-code})"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with code {code}"
        if self.protocol_error is not None:
            how = (f"broke the channel's protocol (protocol error: {self.protocol_error}) and "
                   f"was stopped; it {how}")
        elif self.read_interrupted is not None:
            how = (f"was stopped because a read or a send on its channel failed or was "
                   f"interrupted ({type(self.read_interrupted).__name__} raised there: "
                   f"{self.read_interrupted}; the channel's state was unknown); it {how}")
        tail = "\n".join(self.stderr_tail)
        msg = f"worker pid {self.pid} ({self.pool.wenv.label}) {how}"
        if tail:
            msg += f"; last lines of its stderr:\n{tail}"
        return msg, tail


def _process_exited(channel, reported):
    """The worker process is gone (its pidfd said so): the reader gets EOF after what the
    worker sent, even while a process the call started still holds the worker's end."""
    try:
        channel.sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    reported.set()


def _init_payload_error(payload, exc):
    """The error of an initializer or initargs that do not pickle: which one, and what
    to do (every start would fail the same way, so the executor breaks with it)."""
    initializer, initargs = payload
    what = "the initializer"
    for i, arg in enumerate(initargs):
        try:
            codec.dumps_portable(arg)
        except Exception:
            what = f"initargs[{i}] ({type(arg).__qualname__})"
            break
    return PicklingFailed(
        f"{what} could not be pickled for the worker: {type(exc).__name__}: {exc}. Pass "
        f"initargs that pickle (plain data, arrays, tensors), or let the initializer make "
        f"the object in the worker")


def _decode_remote_exception(frame, link):
    """``(exception, traceback text)`` of an ``init_failed`` or failed ``result`` frame.

    When the exception cannot be rebuilt here (``type(exc)(*args)`` fails, or its
    class is not importable in the parent), the substitute names the *original*
    type, message and traceback, taken from the plain part 1 the worker sends along
    (it used to name the decoding error instead and lose the traceback).
    """
    try:
        return codec.decode_part(frame, 0, link)
    except BaseException as dexc:
        why = f"{type(dexc).__name__}: {dexc}"
        try:
            qual, msg, tb = codec.decode_part(frame, 1, link)
        except BaseException:
            return RemoteError(type(dexc).__name__, f"the worker's exception could not be "
                               f"decoded in the parent: {why}"), ""
        err = RemoteError(qual, msg, tb)
        # The original message stays .message (a stand-in named like the original, as
        # the ComfyUI adapter makes, shows just it); str() says why it is a RemoteError.
        err.args = (f"{qual}: {msg} (the exception could not be rebuilt in the parent: {why})",)
        return err, tb


_ARMED = select.EPOLLIN | select.EPOLLONESHOT


_LINE_END = re.compile(r"\r\n|\r|\n")


class _LineSplitter:
    """Bytes of one stream -> ``(text, end)`` lines, in linear time and bounded memory.

    ``end`` is ``"\n"`` (for ``\n`` and ``\r\n``), ``"\r"``, or ``""`` for a piece
    cut at ``max_line`` characters or the unterminated end of the stream.  UTF-8
    is decoded incrementally, so a character split between reads stays whole.
    Empty ``\r`` lines (a progress bar's leading ``\r``) are dropped.
    """

    def __init__(self, max_line):
        self.max_line = max_line
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._parts = []            # the unfinished line, in pieces (joined once)
        self._size = 0
        self._cr = False            # the last read ended in "\r": is it "\r\n"?

    def feed(self, data, final=False):
        text = self._decoder.decode(data, final)
        out = []
        if self._cr:
            if text.startswith("\n"):
                text = text[1:]
                self._cr = False
                self._end("\n", out)
            elif text or final:
                self._cr = False
                self._end("\r", out)
        if "\r" not in text:
            # The common case, at str.split's speed.
            lines = text.split("\n")
            last = lines.pop()
            for line in lines:
                if self._parts or len(line) > self.max_line:
                    self._add(line, out)
                    self._end("\n", out)
                else:
                    out.append((line, "\n"))
            self._add(last, out)
            if final and self._parts:
                self._end("", out)
            return out
        pos = 0
        for m in _LINE_END.finditer(text):
            self._add(text[pos:m.start()], out)
            pos = m.end()
            if m.group() != "\r":
                self._end("\n", out)
            elif pos == len(text) and not final:
                self._cr = True     # a "\n" may open the next read
            else:
                self._end("\r", out)
        self._add(text[pos:], out)
        if final and self._parts:
            self._end("", out)
        return out

    def _add(self, text, out):
        while text:
            room = self.max_line - self._size
            if len(text) <= room:
                self._parts.append(text)
                self._size += len(text)
                return
            if room:
                self._parts.append(text[:room])
                text = text[room:]
            self._size = self.max_line
            self._end("", out)

    def _end(self, end, out):
        line = "".join(self._parts)
        self._parts.clear()
        self._size = 0
        if line or end != "\r":
            out.append((line, end))


def forward_output(mode, logger, pool_name, label, pid, stream, lines):
    """Hand complete lines ``[(text, end), ...]`` of a process's ``stream`` to
    ``worker_output`` ``mode`` (see the module docstring); ``label`` names the process
    (a worker, or an executor's zygote)."""
    if not lines:
        return
    if mode == "stream":
        prefix = f"[{label}] "
        _write_stream(stream, "".join(f"{prefix}{line}{end or chr(10)}" for line, end in lines))
    elif mode == "logging":
        if logger.isEnabledFor(logging.INFO):
            extra = {"worker_name": label, "worker_pid": pid, "stream": stream}
            for line, _ in lines:
                logger.info("[%s] %s", pool_name, line, extra=extra)


def _write_stream(stream, text):
    """Write to the parent's sys.stdout / sys.stderr as they are now, and flush.

    A missing or closed stream, or one that raises anything else (a host's
    interceptor having a bad moment), drops the text: the pump must keep draining
    the pipe, or the worker would block on its next print (a dead pump broke every
    later print of the worker and lost a crash's stderr).
    """
    with _stream_lock:
        f = sys.stdout if stream == "stdout" else sys.stderr
        if f is None:
            return
        try:
            try:
                f.write(text)
            except UnicodeEncodeError:
                enc = getattr(f, "encoding", None) or "ascii"
                f.write(text.encode(enc, "backslashreplace").decode(enc, "replace"))
            f.flush()
        except Exception:
            pass
