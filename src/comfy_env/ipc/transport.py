"""Framed messages over one AF_UNIX stream socket, with file descriptors.

A worker and its parent share one ``socket.socketpair()``: it has no address in
the filesystem or the abstract namespace, so nobody else can connect to it.

Frame layout (little endian)::

    +----------------+---------+---------+---------------------+
    | body length u32| nfds u8 | pad x3  | body (length bytes) |
    +----------------+---------+---------+---------------------+
      fds ride as SCM_RIGHTS ancillary data on the 8 header bytes

Reads are buffered (one ``recvmsg`` usually returns a whole small frame, or
several); fds are queued in stream order and handed to frames as their headers
announce them.  A large body is read straight into its own buffer.  Sending is one ``sendmsg`` call per
frame, under a lock, so frames from several threads never interleave.

Why by hand: ``multiprocessing.connection`` frames but cannot pass fds with a
message, and ``SOCK_SEQPACKET`` caps a message at the socket buffer size.
"""
from __future__ import annotations

import array
import collections
import os
import socket
import struct
import threading

__all__ = ["Channel", "ChannelClosed", "MAX_FDS"]

_HEADER = struct.Struct("<IB3x")
MAX_FDS = 250  # SCM_MAX_FD is 253 on Linux
_FD_SIZE = array.array("i").itemsize
_READ_CHUNK = 64 * 1024


class ChannelClosed(EOFError):
    """The peer closed its end (or died)."""


class Channel:
    """One end of a framed, fd-capable, bidirectional message channel."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._send_lock = threading.Lock()
        self._closed = False
        self._anc_size = socket.CMSG_SPACE(MAX_FDS * _FD_SIZE)
        self._buf = bytearray()
        self._pos = 0
        # A fixed scratch buffer: recvmsg(N) would allocate (and page-fault) N bytes per call.
        self._scratch = bytearray(_READ_CHUNK)
        self._scratch_view = memoryview(self._scratch)
        self._fds = collections.deque()

    @classmethod
    def pair(cls):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return cls(a), cls(b)

    @classmethod
    def from_fd(cls, fd: int) -> "Channel":
        return cls(socket.socket(fileno=fd))

    def fileno(self) -> int:
        return self.sock.fileno()

    # -- sending -----------------------------------------------------------
    def send(self, chunks, fds=()) -> None:
        """Send one frame made of ``chunks`` (bytes-like objects, sent back to back).

        ``fds`` stay owned by the caller (the kernel duplicates them into the peer).
        """
        nfds = len(fds)
        if nfds > MAX_FDS:
            raise ValueError(f"a frame carries at most {MAX_FDS} fds, got {nfds}")
        if isinstance(chunks, (bytes, bytearray, memoryview)):
            chunks = [chunks]
        views = [memoryview(c).cast("B") for c in chunks]
        length = sum(v.nbytes for v in views)
        header = _HEADER.pack(length, nfds)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if nfds else []
        with self._send_lock:
            if self._closed:
                raise ChannelClosed("channel is closed")
            try:
                bufs = [memoryview(header)] + views
                sent = self.sock.sendmsg(bufs, anc)
                # A blocking stream socket can still return short (a signal,
                # a huge frame); the fds went with the first byte, the rest is
                # plain data.
                for buf in bufs:
                    if sent >= buf.nbytes:
                        sent -= buf.nbytes
                        continue
                    self.sock.sendall(buf[sent:])
                    sent = 0
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise ChannelClosed(str(exc)) from exc

    # -- receiving ---------------------------------------------------------
    def _fill(self):
        """One recvmsg into the read buffer; fds go to the FIFO in stream order.

        Each frame's fds ride on its first byte, so taking them first-in
        first-out as headers announce them matches them to their frames.
        """
        try:
            # MSG_CMSG_CLOEXEC: received fds are close-on-exec from the start (a process
            # the worker's call starts must not inherit shared memory or sockets).
            n, anc, flags, _ = self.sock.recvmsg_into([self._scratch], self._anc_size,
                                                      socket.MSG_CMSG_CLOEXEC)
        except ConnectionResetError as exc:
            raise ChannelClosed(str(exc)) from exc
        except OSError as exc:
            if self._closed:
                raise ChannelClosed(str(exc)) from exc
            raise
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[: len(payload) - (len(payload) % _FD_SIZE)])
                self._fds.extend(arr)
        if flags & socket.MSG_CTRUNC:
            raise OSError("file descriptors were truncated in transit (fd limit reached?)")
        if not n:
            raise ChannelClosed("peer closed the channel")
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += self._scratch_view[:n]

    def recv(self):
        """Receive one frame: ``(body, fds: list[int])``.

        Raises ChannelClosed on EOF.  The caller owns the returned fds.
        """
        buf = self._buf
        while len(buf) - self._pos < _HEADER.size:
            self._fill()
            buf = self._buf
        length, nfds = _HEADER.unpack_from(buf, self._pos)
        start = self._pos + _HEADER.size
        have = len(buf) - start
        if have >= length:
            body = bytes(buf[start:start + length])
            self._pos = start + length
        else:
            # Big frame: read the rest straight into its final buffer.
            body = bytearray(length)
            view = memoryview(body)
            view[:have] = buf[start:]
            self._pos = len(buf)
            got = have
            while got < length:
                n = self.sock.recv_into(view[got:], length - got)
                if n == 0:
                    raise ChannelClosed("peer closed the channel mid-frame")
                got += n
        fds = []
        while len(fds) < nfds:
            if not self._fds:
                # Cannot happen with a well-behaved peer: the fds precede the data.
                raise OSError(f"frame announced {nfds} fds but only {len(fds)} arrived")
            fds.append(self._fds.popleft())
        return body, fds

    def close(self) -> None:
        # No shutdown(): the other end may be shared with a child process
        # (the worker's end right after spawn), and shutdown acts on the socket
        # itself, not on this process's fd.
        with self._send_lock:
            self._closed = True
        self.sock.close()

    def shutdown_write(self) -> None:
        """Half-close: the peer sees EOF, we can still read what it sends."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
