"""Framed messages over one AF_UNIX stream socket, with file descriptors.

A worker and its parent share one ``socket.socketpair()``: it has no address in
the filesystem or the abstract namespace, so nobody else can connect to it.

Frame layout (little endian)::

    +----------------+---------+---------+---------------------+
    | body length u32| nfds u8 | pad x3  | body (length bytes) |
    +----------------+---------+---------+---------------------+
      fds ride as SCM_RIGHTS ancillary data on the 8 header bytes

The header is read with ``recvmsg`` so that the ancillary data arrives with
it; the body follows with ``recv_into``.  Sending is one ``sendmsg`` call per
frame, under a lock, so frames from several threads never interleave.

Why by hand: ``multiprocessing.connection`` frames but cannot pass fds with a
message, and ``SOCK_SEQPACKET`` caps a message at the socket buffer size.
"""
from __future__ import annotations

import array
import os
import socket
import struct
import threading

__all__ = ["Channel", "ChannelClosed", "MAX_FDS"]

_HEADER = struct.Struct("<IB3x")
MAX_FDS = 250  # SCM_MAX_FD is 253 on Linux
_FD_SIZE = array.array("i").itemsize


class ChannelClosed(EOFError):
    """The peer closed its end (or died)."""


class Channel:
    """One end of a framed, fd-capable, bidirectional message channel."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._send_lock = threading.Lock()
        self._closed = False
        self._anc_size = socket.CMSG_SPACE(MAX_FDS * _FD_SIZE)

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
    def recv(self):
        """Receive one frame: ``(body: bytearray, fds: list[int])``.

        Raises ChannelClosed on EOF.  The caller owns the returned fds.
        """
        sock = self.sock
        try:
            data, anc, flags, _ = sock.recvmsg(_HEADER.size, self._anc_size, socket.MSG_WAITALL)
        except (ConnectionResetError, OSError) as exc:
            if isinstance(exc, ConnectionResetError) or self._closed:
                raise ChannelClosed(str(exc)) from exc
            raise
        fds = []
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[: len(payload) - (len(payload) % _FD_SIZE)])
                fds.extend(arr)
        if len(data) < _HEADER.size:
            for fd in fds:
                os.close(fd)
            raise ChannelClosed("peer closed the channel")
        if flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            raise OSError("file descriptors were truncated in transit (fd limit reached?)")
        length, nfds = _HEADER.unpack(data)
        body = bytearray(length)
        view = memoryview(body)
        got = 0
        try:
            while got < length:
                n = sock.recv_into(view[got:], length - got)
                if n == 0:
                    raise ChannelClosed("peer closed the channel mid-frame")
                got += n
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
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
