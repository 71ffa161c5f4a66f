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
import select
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time

from .. import fncache
from .._version import PROTOCOL_VERSION, __version__
from ..errors import (CallTimeout, InitializerFailed, ProtocolMismatch, RemoteError,
                      RemoteTraceback, WorkerStartError)
from .. import settings
from ..ipc import codec, lifetime
from ..ipc.protocol import (Control, Exit, Hello, Init, InitFailed, Log, Ready, Result,
                            apply_control)
from ..ipc.transport import Channel, ChannelClosed, ProtocolError
from . import launch
from .workitem import Stage
from .futures import LazyResult, decode_error

WORKER_OUTPUT_MODES = ("stream", "logging", "discard")
STDERR_TAIL_LINES = 30
# faulthandler's dump of a fatal error is kept whole, up to this many lines (it
# prints at most 100 frames per thread).
FATAL_DUMP_LINES = 2000
MAX_LINE = 1 << 20              # characters; longer lines are forwarded in pieces
_READ_SIZE = 1 << 16
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
        self.channel = None
        self.link = lifetime.Link(self._send_control, name=f"{pool.name}#{index}")
        self.item = None              # the work item running in the worker
        self.deadline = None
        self.ready = False
        self.exiting = False          # we asked it to exit
        self.stderr_tail = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._fatal_dump = False      # a "Fatal Python error" dump is being kept whole
        self._output_done = threading.Event()
        self._exit_reported = threading.Event()     # on_exit ran: the watcher let go of it
        self._reader = None
        self._alive_w = None
        self._stack_fd = None         # read end of the worker's stack-dump pipe
        self._stack_lock = threading.Lock()     # reading it vs. closing it in _finish
        self._stack_signal = None
        self.timeout_stack = None     # the stack taken by kill_for_timeout ("" if none came)
        self.protocol_error = None    # the worker wrote bytes that are not a frame
        self.info = {}
        # The by-value functions this worker holds (the parent's books; see fncache).
        self.sent_functions = fncache.SentFunctions()

    # -- start ---------------------------------------------------------------
    def start(self):
        parent, child = Channel.pair()
        # The worker watches the read end: EOF means this process died.
        alive_r, self._alive_w = os.pipe()
        reported = self._exit_reported
        try:
            self.proc = launch.spawn(self.pool.wenv, child.fileno(), alive_r,
                                     on_exit=lambda: _process_exited(parent, reported),
                                     zygote=self.pool.zygote)
        except BaseException:
            os.close(self._alive_w)
            self._alive_w = None
            raise
        finally:
            child.close()
            os.close(alive_r)
        self.pid = self.proc.pid
        self.channel = parent
        self.logger = self.pool.logger
        threading.Thread(target=self._pump_output, name=f"comfy_env-output-{self.pid}",
                         daemon=True).start()
        self._reader = threading.Thread(target=self._read_loop, name=f"comfy_env-reader-{self.pid}",
                                        daemon=True)
        self._reader.start()

    # -- sending ---------------------------------------------------------------
    def _send_control(self, msgs):
        _, chunks = codec.encode_message(Control(msgs), self.link)
        self.channel.send(chunks)

    def send_call(self, item, chunks, fds):
        """Send an already-encoded call frame; the item is now this worker's."""
        self.item = item
        if self.pool.call_timeout is not None:
            self.deadline = time.monotonic() + self.pool.call_timeout
            self.pool.watchdog.watch(self)
        # Tensors the caller already dropped, and releases already queued for this
        # worker, go first: it applies them before the call, as it would have if the
        # ledger's flusher had got to them (it naps ``Ledger.BATCH_S`` after a burst).  So a caller
        # that drops a result before the next call always lets the worker recycle its
        # staging blocks ("idle" reports), instead of only when the flusher was quick.
        try:
            lifetime.LEDGER.drain()
        except Exception:           # a plane's free failed: the call still goes
            self.logger.exception("comfy_env: applying dropped blocks before a call failed")
        self.link.flush()
        self.channel.send(chunks, fds)

    def request_exit(self):
        if self.exiting:
            return
        self.exiting = True
        try:
            _, chunks = codec.encode_message(Exit(), self.link)
            self.channel.send(chunks)
        except (ChannelClosed, OSError):
            pass

    def kill(self):
        try:
            self.proc.kill()
        except (ProcessLookupError, OSError, AttributeError):
            pass

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

    def _read_stack(self, fd):
        try:
            # Popen.send_signal: never a reaped (possibly reused) pid.
            self.proc.send_signal(self._stack_signal)
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
        cfg = {
            "uid": lifetime.PROCESS_UID,
            "name": self.link.name,
            "sys_path": list(sys.path) if self.pool.wenv.is_current else None,
            "cwd": os.getcwd(),     # a foreign worker starts elsewhere (launch.py): it changes here
            "log_level": self.pool.worker_log_level,
            "settings": settings.to_wire(self.pool.settings),
        }
        objs = [self.pool.init_payload] if self.pool.init_payload is not None else []
        fb, chunks = codec.encode_message(Init(cfg), self.link, objs)
        self.channel.send(chunks, fb.fds)
        frame = self._recv_frame()
        kind = type(frame.envelope)
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
        try:
            self._handshake()
        except BaseException as exc:
            self._finish(start_error=exc)
            return
        self.ready = True
        pool.on_ready(self)
        try:
            while True:
                frame = self._recv_frame()
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
        except ChannelClosed:
            pass
        except ProtocolError as exc:
            # Stray bytes on the channel (a library writing to a reused fd number):
            # nothing after them can be trusted.  The death report names it.
            self.protocol_error = exc
            self.kill()
        except BaseException as exc:      # a bug here must not hang futures
            self.logger.error("comfy_env: reader of worker %s failed: %r", self.pid, exc,
                              exc_info=True)
            self.kill()
        self._finish()

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
        del item
        # Decode first, hand the worker back (which may send it the next call),
        # and complete the future last: the caller wakes up wanting the GIL, and
        # this thread gives it up as soon as it blocks in recv() again.
        if ok and frame.parts[0].refs is None:
            # Nothing in shared memory: decode here, no lazy bookkeeping.
            frame.close_fds()
            try:
                outcome = (True, codec.decode_part(frame, 0, self.link))
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
        self.pool.on_idle(self)
        kind, value = outcome
        if kind is True:
            fut.set_result(value)
        elif kind is None:
            fut._set_lazy_result(value)
        else:
            fut.set_exception(value)

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
        sel = selectors.DefaultSelector()
        streams = {self.proc.stdout: "stdout", self.proc.stderr: "stderr"}
        lines = {}
        for f in streams:
            sel.register(f, selectors.EVENT_READ)
            lines[f] = _LineSplitter(MAX_LINE)
        try:
            while streams:
                for key, _ in sel.select():
                    f = key.fileobj
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
            self._output_done.set()

    def _forward(self, stream, lines):
        """Hand complete lines ``[(text, end), ...]`` of one read to ``worker_output``."""
        if not lines:
            return
        if stream == "stderr":
            self._keep_tail(lines)
        mode = self.pool.worker_output
        if mode == "stream":
            prefix = f"[{self.link.name}] "
            text = "".join(f"{prefix}{line}{end or chr(10)}" for line, end in lines)
            _write_stream(stream, text)
        elif mode == "logging":
            logger = self.pool.logger
            if logger.isEnabledFor(logging.INFO):
                extra = {"worker_name": self.link.name, "worker_pid": self.pid, "stream": stream}
                for line, _ in lines:
                    logger.info("[%s] %s", self.pool.name, line, extra=extra)

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
        self.pool.on_death(self, item, code, start_error)

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
        return RemoteError(qual, f"{msg} (the exception could not be rebuilt in the parent: "
                           f"{why})", tb), tb


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


def _write_stream(stream, text):
    """Write to the parent's sys.stdout / sys.stderr as they are now, and flush.

    A missing or closed stream drops the text: the pump must keep draining the
    pipe, or the worker would block on its next print.
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
        except (OSError, ValueError):
            pass
