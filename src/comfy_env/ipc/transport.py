"""Framed messages over one AF_UNIX stream socket, with file descriptors.

A worker and its parent share one ``socket.socketpair()``: it has no address in
the filesystem or the abstract namespace, so nobody else can connect to it.

Frame layout (little endian)::

    +----------+------------+---------+---------+-----------------+---------------------+
    | magic 4s | version u8 | nfds u8 | zero u16| body length u64 | body (length bytes) |
    +----------+------------+---------+---------+-----------------+---------------------+
      fds ride as SCM_RIGHTS ancillary data on the 16 header bytes

The header is checked before anything it announces is believed: the magic (its
first byte is not ASCII, so stray text such as a ``print`` to the channel's fd
fails at once, byte by byte, without waiting for a whole header), the format
version, the zero field, the fd count and the body length (at most the machine's
physical memory: a bigger body could not be received anyway).  A bad header
raises :class:`ProtocolError`; the stream cannot be resynchronised after it, so
the channel is done.  A body of any size that passes goes through: lengths are
64-bit, and the sender refuses a frame the receiver would refuse
(:class:`FrameTooLarge`) before it sends a byte.

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
import mmap
import os
import select
import socket
import struct
import threading
import time

__all__ = ["Channel", "ChannelClosed", "ProtocolError", "FrameTooLarge", "MAX_FDS",
           "MAX_BODY", "frame_header", "check_frame"]

MAGIC = b"\x89CEF"
FRAME_VERSION = 1
_HEADER = struct.Struct("<4sBBHQ")
MAX_FDS = 250  # SCM_MAX_FD is 253 on Linux
_FD_SIZE = array.array("i").itemsize
_READ_CHUNK = 64 * 1024
# Plain ints: socket's constants are IntFlags, and an operation on one builds a new enum
# member (a few µs each on Python 3.11, twice per message received).
_RECV_FLAGS = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))
_RECV_FLAGS_NOWAIT = _RECV_FLAGS | int(socket.MSG_DONTWAIT)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
try:
    _IOV_MAX = max(16, os.sysconf("SC_IOV_MAX"))
except (ValueError, OSError, AttributeError):
    _IOV_MAX = 1024
HEADER_STALL = 5.0      # seconds a partial header may wait for the rest of itself
# Bodies this big or bigger are received into an anonymous mapping: its pages
# are zero and faulted in as the data lands, where bytearray(n) would first
# write n zero bytes.
_MAPPED_BODY = 1 << 20


def _physical_memory():
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


MAX_BODY = _physical_memory()


class ChannelClosed(EOFError):
    """The peer closed its end (or died)."""


class ProtocolError(OSError):
    """The peer sent bytes that are not a valid frame; the channel cannot be used any more."""


class FrameTooLarge(ValueError):
    """A frame's body is larger than a receiver accepts (:data:`MAX_BODY`); nothing was sent."""


def frame_header(length: int, nfds: int = 0) -> bytes:
    """The 16 header bytes of a frame whose body is ``length`` bytes and carries ``nfds`` fds."""
    if nfds > MAX_FDS:
        raise ValueError(f"a frame carries at most {MAX_FDS} fds, got {nfds}")
    if length > MAX_BODY:
        raise FrameTooLarge(
            f"a message of {length / 2**30:.1f} GiB is larger than this machine's memory "
            f"({MAX_BODY / 2**30:.1f} GiB), the most a receiver accepts; send less per call "
            f"(a value referenced many times travels once per reference)")
    return _HEADER.pack(MAGIC, FRAME_VERSION, nfds, 0, length)


def check_frame(chunks, fds=()) -> None:
    """Raise what :meth:`Channel.send` would for this frame, before it is sent."""
    frame_header(sum(memoryview(c).nbytes for c in chunks), len(fds))


def _check_header(buf, pos):
    """``(length, nfds)`` of the header at ``buf[pos:]``, or ProtocolError."""
    magic, version, nfds, zero, length = _HEADER.unpack_from(buf, pos)
    if magic != MAGIC:
        raise ProtocolError(f"not a comfy_env frame: the header starts with {magic!r} "
                            f"instead of {MAGIC!r} (something else wrote to the channel)")
    if version != FRAME_VERSION:
        raise ProtocolError(f"frame format {version}, this comfy_env reads {FRAME_VERSION}")
    if zero or nfds > MAX_FDS or length > MAX_BODY:
        raise ProtocolError(f"corrupt frame header {bytes(buf[pos:pos + _HEADER.size])!r} "
                            f"(reserved field {zero}, {nfds} fds, body of {length} bytes)")
    return length, nfds


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
        if isinstance(chunks, (bytes, bytearray, memoryview)):
            chunks = [chunks]
        small = None
        if not fds and len(chunks) <= 4 and all(type(c) is bytes for c in chunks):
            # A small message (a warm call, its result, a control message): one
            # buffer, one sendall.
            length = sum(map(len, chunks))
            if length <= _READ_CHUNK:
                small = frame_header(length, 0) + b"".join(chunks)
        if small is None:
            views = [memoryview(c).cast("B") for c in chunks]
            nfds = len(fds)
            header = frame_header(sum(v.nbytes for v in views), nfds)   # refuses before anything is sent
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if nfds else []
            bufs = [memoryview(header)] + views
        with self._send_lock:
            if self._closed:
                raise ChannelClosed("channel is closed")
            try:
                if small is not None:
                    self.sock.sendall(small)
                    return
                # A blocking stream socket can still return short (a signal, a
                # huge frame), and one call takes at most IOV_MAX buffers (a call
                # that forwards one result many times has a part per reference):
                # go on from where it stopped.  The fds go with the first byte.
                i = 0
                while i < len(bufs):
                    sent = self.sock.sendmsg(bufs[i:i + _IOV_MAX], anc)
                    anc = []
                    while i < len(bufs) and sent >= bufs[i].nbytes:
                        sent -= bufs[i].nbytes
                        i += 1
                    if sent:
                        bufs[i] = bufs[i][sent:]
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise ChannelClosed(str(exc)) from exc

    # -- receiving ---------------------------------------------------------
    def _fill(self, spin=0.0):
        """One recvmsg into the read buffer; fds go to the FIFO in stream order.

        Each frame's fds ride on its first byte, so taking them first-in
        first-out as headers announce them matches them to their frames.
        ``spin``: poll without blocking for up to that many seconds first (see recv).
        """
        try:
            # Received fds are close-on-exec, like every fd Python opens: a
            # process the worker or the parent starts must not inherit them.
            got = None
            if spin:
                end = time.perf_counter() + spin
                while True:
                    try:
                        got = self.sock.recvmsg_into([self._scratch], self._anc_size,
                                                     _RECV_FLAGS_NOWAIT)
                        break
                    except BlockingIOError:
                        if time.perf_counter() >= end:
                            break
            n, anc, flags, _ = got or self.sock.recvmsg_into([self._scratch], self._anc_size,
                                                             _RECV_FLAGS)
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
        if flags & _MSG_CTRUNC:
            raise OSError("file descriptors were truncated in transit (fd limit reached?)")
        if not n:
            raise ChannelClosed("peer closed the channel")
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += self._scratch_view[:n]

    def buffered(self) -> bool:
        """Bytes of a frame are already read (``recv`` starts on them without waiting on
        the socket): a thread that waits for readability must not poll then."""
        return len(self._buf) > self._pos

    def _wait_readable(self, timeout):
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        return bool(poller.poll(timeout * 1000))

    def recv(self, spin=0.0):
        """Receive one frame: ``(body, fds: list[int])``.

        Raises ChannelClosed on EOF, ProtocolError on bytes that are not a frame.
        The caller owns the returned fds.  ``body`` is a bytes-like object.

        ``spin`` (seconds): when nothing is buffered, poll the socket without blocking
        for up to that long before sleeping in ``recvmsg``.  A process that sleeps is
        woken by the sender's kernel call, which costs tens of microseconds on a
        virtual machine (the sleeping CPU must be woken) on both sides; one that polls
        sees the bytes as they land.
        """
        buf = self._buf
        while len(buf) - self._pos < _HEADER.size:
            # Check the magic as it arrives: a stray write shorter than a header
            # must not leave us waiting for the rest of one.
            have = buf[self._pos:self._pos + len(MAGIC)]
            if have != MAGIC[:len(have)]:
                raise ProtocolError(f"not a comfy_env frame: the header starts with "
                                    f"{bytes(have)!r} instead of {MAGIC!r} (something else "
                                    f"wrote to the channel)")
            if have and not self._wait_readable(HEADER_STALL):
                # A sender writes a header in one piece with its body's start: a
                # part of one that stays alone is a stray write that looked like one.
                raise ProtocolError(f"not a comfy_env frame: {len(buf) - self._pos} bytes "
                                    f"{bytes(buf[self._pos:])!r} and then nothing for "
                                    f"{HEADER_STALL:g} s (something else wrote to the channel)")
            self._fill(spin)
            spin = 0.0
            buf = self._buf
        length, nfds = _check_header(buf, self._pos)
        start = self._pos + _HEADER.size
        have = len(buf) - start
        if have >= length:
            with memoryview(buf) as view:       # one copy (a bytearray slice would be two)
                body = bytes(view[start:start + length])
            self._pos = start + length
        else:
            # Big frame: read the rest straight into its final buffer.
            body = mmap.mmap(-1, length) if length >= _MAPPED_BODY else bytearray(length)
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
                raise ProtocolError(f"frame announced {nfds} fds but only {len(fds)} arrived")
            fds.append(self._fds.popleft())
        return body, fds

    def close(self) -> None:
        # No shutdown(): the other end may be shared with a child process
        # (the worker's end right after spawn), and shutdown acts on the socket
        # itself, not on this process's fd.
        with self._send_lock:
            self._closed = True
        self.sock.close()

