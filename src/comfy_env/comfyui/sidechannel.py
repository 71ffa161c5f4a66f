"""Out-of-band messages between a running node call and the host, while it runs.

A node call travels through ``IsolatedExecutor.submit`` and its result comes back
through the executor; but ComfyUI also needs two things *during* the call, which
the executor's request/response channel does not carry (yet):

- progress, worker -> host: ``comfy.utils.ProgressBar`` updates (and preview
  images) made by node code, so the bar in ComfyUI's UI moves;
- interrupt, host -> worker: ComfyUI's interrupt flag is a per-process global, so
  the host's interrupt has to be copied into the worker's flag.

Data flow::

    host process                                    worker process
    ------------                                    --------------
    SideChannelHub (one per process)                WorkerLink (one per worker)
      Listener on AF_UNIX <tmp 0700 dir>/sock  <---   Client(address, authkey)
      accept thread -> one reader thread per          sends ("hello", pid, link id)
      worker connection                               reader thread: ("interrupt", token)
                                                         -> interrupt_current_processing()
      CallChannel(token).queue  <-----------------    ("start", token) / ("progress", token, ...)
        (drained by the thread that waits for         / ("end", token), only for a call
         the node's future: see pack.py)                that reports progress
      CallChannel.interrupt()  ------------------->   ("interrupt", token)

Each node call gets a token; the worker tags everything it sends with the token of
the call it is running, so several packs and calls can share one hub.  A call that
reports no progress sends nothing here: waking the hub's reader thread twice per
call costs, in ComfyUI's busy process, more than the rest of a small call.  So the
host reaches a pack's worker through its *link id* (one per pack, given to the
worker in ``initargs``): the hub keeps the connection and pid of the newest worker
that said hello with it, which is where an interrupt for that pack's call goes (the
worker keeps an interrupt for a call it has not begun yet) and how a node that
ignores interrupts gets its worker killed after the grace period.  Whether the
host must wait for a call's "end" (its last progress may still be in flight when
the result is there: two sockets) comes with the result (see pack.py).

Trust: the socket lives in a private 0700 directory and the connection is
authenticated with a random key that reaches workers only through the executor's
own channel (``initargs``); messages are pickles, decoded only from connections that
passed that check.  When the executor grows an event channel of its own, this module
is the one to move onto it: pack.py only uses ``hub()``, ``CallChannel`` and the
message shapes above; worker_side.py only uses ``WorkerLink``.
"""
from __future__ import annotations

import atexit
import itertools
import logging
import os
import queue
import shutil
import tempfile
import threading
from multiprocessing.connection import Client, Listener

__all__ = ["SideChannelHub", "CallChannel", "WorkerLink", "hub", "DONE", "WORKER_GONE"]

_log = logging.getLogger(__name__)

# Markers a CallChannel's queue can hold besides ("progress", ...) tuples.
DONE = ("done",)              # put by pack.py when the call's future completes
WORKER_GONE = ("worker-gone",)  # the worker running the call closed its connection
END = ("end",)                # the worker finished running the call


class CallChannel:
    """The host's view of one node call: its progress queue, its worker, its interrupt."""

    def __init__(self, hub_, token, link_id):
        self._hub = hub_
        self.token = token
        self.link_id = link_id
        self.queue = queue.Queue()
        self.started = threading.Event()    # the call reported progress ("start" came)
        self.ended = threading.Event()
        self._conn = None
        self._pid = None
        self._lock = threading.Lock()

    @property
    def pid(self):
        """The pid of the worker running the call (the pack's newest worker), or None."""
        with self._lock:
            if self._pid is not None:
                return self._pid
        link = self._hub._links.get(self.link_id)
        return link[1] if link is not None else None

    def interrupt(self):
        """Ask the worker to raise ComfyUI's interrupt in this call (now, or when it
        begins: the worker keeps it)."""
        with self._lock:
            conn = self._conn
        if conn is None:
            link = self._hub._links.get(self.link_id)
            conn = link[0] if link is not None else None
        if conn is not None:
            self._hub._send(conn, ("interrupt", self.token))

    def close(self):
        self._hub._calls.pop(self.token, None)

    # Called from the hub's reader thread.
    def _on_start(self, conn, pid):
        with self._lock:
            self._conn, self._pid = conn, pid
        self.started.set()


class SideChannelHub:
    """Host end: a listener that workers connect to, routing messages by call token."""

    def __init__(self):
        self._dir = tempfile.mkdtemp(prefix="comfy-env-")       # mode 0700
        self.address = os.path.join(self._dir, "sc")
        if len(self.address) > 100 and os.name == "posix":
            # AF_UNIX paths are limited to ~107 bytes; Linux abstract names are not files.
            self.address = "\0comfy-env-" + os.urandom(8).hex()
        self.authkey = os.urandom(32)
        self._listener = Listener(self.address, family="AF_UNIX", authkey=self.authkey)
        self._calls = {}
        self._links = {}        # link id -> (connection, pid) of the newest worker with it
        self._tokens = itertools.count(1)
        self._send_locks = {}
        self._closed = False
        threading.Thread(target=self._accept_loop, name="comfy-env-sidechannel",
                         daemon=True).start()

    def open_call(self, link_id=None) -> CallChannel:
        token = f"{os.getpid()}-{next(self._tokens)}"
        ch = CallChannel(self, token, link_id)
        self._calls[token] = ch
        return ch

    @staticmethod
    def new_link_id():
        """An id for one pack's workers (see the module docstring)."""
        return os.urandom(8).hex()

    def close(self):
        self._closed = True
        try:
            self._listener.close()
        except OSError:
            pass
        shutil.rmtree(self._dir, ignore_errors=True)

    def _send(self, conn, msg):
        lock = self._send_locks.setdefault(id(conn), threading.Lock())
        try:
            with lock:
                conn.send(msg)
        except (OSError, EOFError, ValueError):
            pass    # the worker is gone; the executor reports that through the future

    def _accept_loop(self):
        while not self._closed:
            try:
                conn = self._listener.accept()
            except OSError:
                if self._closed:
                    return
                continue
            except Exception as exc:   # a failed authentication: ignore that peer
                _log.warning("comfy-env: rejected a side-channel connection: %s", exc)
                continue
            threading.Thread(target=self._reader, args=(conn,), daemon=True,
                             name="comfy-env-sidechannel-reader").start()

    def _reader(self, conn):
        pid = link_id = None
        mine = set()
        try:
            while True:
                msg = conn.recv()
                kind = msg[0]
                if kind == "hello":
                    pid = msg[1]
                    link_id = msg[2] if len(msg) > 2 else None
                    if link_id is not None:
                        self._links[link_id] = (conn, pid)
                    continue
                ch = self._calls.get(msg[1])
                if ch is None:
                    continue        # a call the host stopped waiting for
                if kind == "start":
                    mine.add(ch)
                    ch._on_start(conn, pid)
                elif kind == "progress":
                    ch.queue.put(msg)
                elif kind == "end":
                    mine.discard(ch)
                    ch.ended.set()
                    ch.queue.put(END)
        except (EOFError, OSError):
            pass
        except Exception:
            _log.exception("comfy-env: side channel reader failed")
        finally:
            if link_id is not None and self._links.get(link_id, (None,))[0] is conn:
                del self._links[link_id]
            for ch in mine:
                ch.ended.set()          # no "end" will come: don't make the host wait for it
                ch.queue.put(WORKER_GONE)
            self._send_locks.pop(id(conn), None)
            try:
                conn.close()
            except OSError:
                pass


_hub = None
_hub_lock = threading.Lock()


def hub() -> SideChannelHub:
    """The process-wide hub, started on first use."""
    global _hub
    with _hub_lock:
        if _hub is None:
            _hub = SideChannelHub()
            atexit.register(_hub.close)
        return _hub


class WorkerLink:
    """Worker end: tags progress with the running call's token, applies interrupts.

    ``on_interrupt`` is called (from the link's reader thread) when the host
    interrupts the call that is running; ``clear_interrupt`` at each call start.
    Nothing is sent for a call until it reports progress (then "start" first, and
    "end" when it returns).
    """

    _KEEP_PENDING = 16      # interrupts for calls not begun yet (normally at most one)

    def __init__(self, address, authkey, on_interrupt, clear_interrupt, link_id=None):
        self._conn = Client(address, family="AF_UNIX", authkey=authkey)
        self._lock = threading.Lock()         # the call state below
        self._send_lock = threading.Lock()    # one message at a time on the connection
        self._current = None
        self._started = False
        self._pending = []      # tokens interrupted before their call began
        self._on_interrupt = on_interrupt
        self._clear_interrupt = clear_interrupt
        self._send(("hello", os.getpid(), link_id))
        threading.Thread(target=self._reader, name="comfy-env-link", daemon=True).start()

    @property
    def current(self):
        return self._current

    def begin(self, token):
        # A stale interrupt from an earlier call must not stop this one (ComfyUI
        # likewise clears the flag when a prompt starts).
        self._clear_interrupt()
        with self._lock:
            self._current = token
            self._started = False
            early = token in self._pending
            if early:
                self._pending.remove(token)
        if early:
            self._on_interrupt()

    def end(self, token):
        """The call returned; True when it reported progress (the host then waits for "end")."""
        with self._lock:
            self._current = None
            started, self._started = self._started, False
        if started:
            self._send(("end", token))
        return started

    def progress(self, value, total, preview, node_id):
        with self._lock:
            token = self._current
            if token is None:
                return      # progress outside a node call (e.g. at import): nobody to tell
            start, self._started = not self._started, True
        if start:
            self._send(("start", token))
        try:
            self._send(("progress", token, value, total, preview, node_id))
        except Exception:
            # An unpicklable preview must not break the node: send the numbers only.
            self._send(("progress", token, value, total, None, node_id))

    def _send(self, msg):
        with self._send_lock:
            try:
                self._conn.send(msg)
            except (OSError, EOFError, BrokenPipeError):
                pass        # host gone: the worker is about to be stopped anyway

    def _reader(self):
        try:
            while True:
                kind, token = self._conn.recv()
                if kind != "interrupt" or token is None:
                    continue
                with self._lock:
                    now = token == self._current
                    if not now:
                        self._pending = self._pending[-(self._KEEP_PENDING - 1):] + [token]
                if now:
                    self._on_interrupt()
        except (EOFError, OSError):
            pass
