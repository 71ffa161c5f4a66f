"""The parent's handle on one worker process.

Per worker, two threads::

    reader  -- handshake, then frames from the worker: results -> futures,
               log records -> logging, releases -> ledger; EOF -> death report
    output  -- the worker's stdout/stderr pipes, line by line -> logging, and
               a tail of stderr kept for crash reports

Calls are sent by whichever thread dispatches them (the submitter's, or the
reader that just finished the previous call): no queue-feeder thread in
between, which is where most of ProcessPoolExecutor's latency goes.
"""
from __future__ import annotations

import collections
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time

from .._version import PROTOCOL_VERSION, __version__
from ..errors import (CallTimeout, InitializerFailed, ProtocolMismatch, RemoteError,
                      RemoteTraceback, WorkerCrashed, WorkerStartError)
from ..ipc import codec, lifetime
from ..ipc.transport import Channel, ChannelClosed
from . import launch
from .futures import LazyResult, decode_error

STDERR_TAIL_LINES = 30


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
        self._output_done = threading.Event()
        self._reader = None
        self._alive_w = None
        self.info = {}

    # -- start ---------------------------------------------------------------
    def start(self):
        parent, child = Channel.pair()
        # The worker watches the read end: EOF means this process died.
        alive_r, self._alive_w = os.pipe()
        try:
            self.proc = launch.spawn(self.pool.wenv, child.fileno(), alive_r,
                                     on_exit=lambda: _process_exited(parent),
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
        _, chunks = codec.encode_message(("ctl", msgs), self.link)
        self.channel.send(chunks)

    def send_call(self, item, chunks, fds):
        """Send an already-encoded call frame; the item is now this worker's."""
        self.item = item
        if self.pool.call_timeout is not None:
            self.deadline = time.monotonic() + self.pool.call_timeout
            self.pool.watchdog.watch(self)
        # Tensors the caller already dropped, and releases already queued for this
        # worker, go first: it applies them before the call, as it would have if the
        # ledger's flusher had got to them (it naps 0.2 ms after a burst).  So a caller
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
            _, chunks = codec.encode_message(("exit",), self.link)
            self.channel.send(chunks)
        except (ChannelClosed, OSError):
            pass

    def kill(self):
        try:
            self.proc.kill()
        except (ProcessLookupError, OSError, AttributeError):
            pass

    def join(self, timeout=None):
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout)

    # -- reading -------------------------------------------------------------------
    def _handshake(self):
        body, fds = self.channel.recv()
        frame = codec.decode_envelope(body, fds)
        frame.close_fds()
        kind, info = frame.envelope
        if kind != "hello":
            raise WorkerStartError(f"worker sent {kind!r} instead of its handshake")
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
        }
        objs = [self.pool.init_payload] if self.pool.init_payload is not None else []
        fb, chunks = codec.encode_message(("init", cfg), self.link, objs)
        self.channel.send(chunks, fb.fds)
        body, fds = self.channel.recv()
        frame = codec.decode_envelope(body, fds)
        kind = frame.envelope[0]
        if kind == "init_failed":
            try:
                exc, tb = _decode_remote_exception(frame, self.link)
            finally:
                frame.close_fds()
            err = InitializerFailed(
                f"the initializer failed in worker pid {self.pid}: {type(exc).__name__}: {exc}")
            err.__cause__ = RemoteTraceback(tb)
            raise err
        frame.close_fds()
        if kind != "ready":
            raise WorkerStartError(f"worker sent {kind!r} instead of 'ready'")

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
                body, fds = self.channel.recv()
                frame = codec.decode_envelope(body, fds)
                kind = frame.envelope[0]
                if kind == "result":
                    self._on_result(frame)
                elif kind == "ctl":
                    frame.close_fds()
                    from ..worker import _apply_control
                    _apply_control(self.link, frame.envelope[1])
                elif kind == "log":
                    frame.close_fds()
                    self._on_log(frame.envelope)
                else:
                    frame.close_fds()
        except ChannelClosed:
            pass
        except BaseException as exc:      # a bug here must not hang futures
            self.logger.error("comfy_env: reader of worker %s failed: %r", self.pid, exc,
                              exc_info=True)
            self.kill()
        self._finish()

    def _on_result(self, frame):
        _, call_id, ok = frame.envelope
        # Take the item under the pool lock: the watchdog and dispatch() check
        # ``worker.item`` under it too (see executor.py), so exactly one of them owns it.
        with self.pool.lock:
            item = self.item
            if item is None or item.call_id != call_id:
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

    def _on_log(self, envelope):
        _, levelno, name, msg, created = envelope
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
        for f in streams:
            sel.register(f, selectors.EVENT_READ)
        partial = {f: b"" for f in streams}
        logger = self.pool.logger
        try:
            while streams:
                for key, _ in sel.select():
                    f = key.fileobj
                    data = os.read(f.fileno(), 65536)
                    if not data:
                        sel.unregister(f)
                        name = streams.pop(f)
                        if partial[f]:
                            self._emit_line(logger, name, partial[f])
                        continue
                    data = partial[f] + data
                    *lines, partial[f] = data.split(b"\n")
                    for line in lines:
                        self._emit_line(logger, streams[f], line)
        finally:
            sel.close()
            for f in (self.proc.stdout, self.proc.stderr):
                try:
                    f.close()
                except OSError:
                    pass
            self._output_done.set()

    def _emit_line(self, logger, stream, raw):
        line = raw.decode("utf-8", "replace").rstrip("\r")
        if stream == "stderr":
            self.stderr_tail.append(line)
        level = logging.INFO
        if logger.isEnabledFor(level):
            logger.info("[%s] %s", self.pool.name, line,
                        extra={"worker_name": self.link.name, "worker_pid": self.pid,
                               "stream": stream})

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
        tail = "\n".join(self.stderr_tail)
        msg = f"worker pid {self.pid} ({self.pool.wenv.label}) {how}"
        if tail:
            msg += f"; last lines of its stderr:\n{tail}"
        return msg, tail


def _process_exited(channel):
    """The worker process is gone (its pidfd said so): the reader gets EOF after what the
    worker sent, even while a process the call started still holds the worker's end."""
    try:
        channel.sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass


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
