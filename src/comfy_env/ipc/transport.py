"""Framed messages over one AF_UNIX stream socket, with file descriptors.

A worker and its parent share one ``socket.socketpair()``: it has no address in
the filesystem or the abstract namespace, so nobody else can connect to it.

Frame layout (little endian)::

    +----------+------------+----------+-----------------+---------------------+
    | magic 4s | version u8 | nfds u24 | body length u64 | body (length bytes) |
    +----------+------------+----------+-----------------+---------------------+
      fds ride as SCM_RIGHTS ancillary data on the frame's first bytes

A frame may carry any number of fds (up to 2**24 - 1, far beyond any fd limit), but
one ``sendmsg`` passes at most SCM_MAX_FD (253 on Linux): a frame with more than
:data:`MAX_FDS` sends them in batches of at most that many, each riding on one byte
of the frame (its first bytes, header first).  All of a frame's fds so arrive with
its own bytes, in stream order, and the receiver hands them out only once the
whole frame is read: no state spans frames, and a frame with few fds is sent and
received exactly as before.  (``nfds`` was a u8 followed by a zero u16: a frame
with at most 255 fds reads the same either way.)  The sender refuses a frame with
more fds than the receiver could open (:class:`TooManyFds`), before it sends a
byte, rather than have the kernel drop them on the receiving side.

The header is checked before anything it announces is believed: the magic (its
first byte is not ASCII, so stray text such as a ``print`` to the channel's fd
fails at once, byte by byte, without waiting for a whole header), the format
version, the fd count and the body length (at most the machine's
physical memory: a bigger body could not be received anyway).  A bad header
raises :class:`ProtocolError`; the stream cannot be resynchronised after it, so
the channel is done.  A body of any size that passes goes through: lengths are
64-bit, and the sender refuses a frame the receiver would refuse
(:class:`FrameTooLarge`) before it sends a byte.

Reads are buffered (one ``recvmsg`` usually returns a whole small frame, or
several); fds are queued in stream order and handed to frames as their headers
announce them.  A large body is read straight into its own buffer.  Sending is one ``sendmsg`` call per
frame (plus one per extra batch of fds), under a lock, so frames from several threads
never interleave.

Why by hand: ``multiprocessing.connection`` frames but cannot pass fds with a
message, and ``SOCK_SEQPACKET`` caps a message at the socket buffer size.
"""
from __future__ import annotations

import array
import collections
import errno
import mmap
import os
import select
import socket
import struct
import threading
import time

from .. import stdfds

__all__ = ["Channel", "ChannelClosed", "ProtocolError", "FrameTooLarge", "TooManyFds",
           "MAX_FDS", "MAX_FRAME_FDS", "MAX_BODY", "frame_header", "check_frame", "fd_room", "fd_limits", "wait_readable"]

MAGIC = b"\x89CEF"
FRAME_VERSION = 1
_HEADER = struct.Struct("<4sBBHQ")   # nfds u24 as its low byte and high u16 (little endian)
MAX_FDS = 250  # fds per sendmsg (SCM_MAX_FD is 253 on Linux); a frame sends more in batches
MAX_FRAME_FDS = (1 << 24) - 1   # what the header's u24 can announce
# The receiver's own fds (stdio, its channel, pipes, shared segments it keeps open):
# a frame may carry the soft fd limit less this (an eighth of it, at most 64).
_FD_RESERVE = 64
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


def _small_frame(chunks):
    """A small frame of ``chunks`` without fds (a warm call, its result, a control
    message) as one buffer, header included, or None.  Nothing in it for
    :func:`frame_header` to refuse, so its checks are skipped."""
    if len(chunks) > 4:
        return None
    length = 0
    for c in chunks:
        if type(c) is not bytes:
            return None
        length += len(c)
    if length > _READ_CHUNK:
        return None
    return b"".join((_HEADER.pack(MAGIC, FRAME_VERSION, 0, 0, length), *chunks))


def wait_readable(fd, timeout):
    """Whether ``fd`` reads ready within ``timeout`` seconds (None: no limit).  poll, not
    select: a process's fds may be numbered above select's 1024 (a child keeps the
    numbers its parent passed)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(None if timeout is None else timeout * 1000))


class ChannelClosed(EOFError):
    """The peer closed its end (or died)."""


class ProtocolError(OSError):
    """The peer sent bytes that are not a valid frame; the channel cannot be used any more."""


class FrameTooLarge(ValueError):
    """A frame's body is larger than a receiver accepts (:data:`MAX_BODY`); nothing was sent."""


class TooManyFds(ValueError):
    """A frame carries more fds than the receiver can open (:func:`fd_room`); nothing was sent."""


def fd_room() -> int:
    """How many fds one frame may carry: what a receiver can open at once.

    The receiver's limit is not known here; this process's soft RLIMIT_NOFILE stands
    for it (the parent raises its soft limit to the hard one before it starts a worker,
    and workers inherit it), less what the receiver itself keeps open.
    """
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, ValueError, OSError):
        return MAX_FRAME_FDS
    if soft == getattr(resource, "RLIM_INFINITY", -1) or soft > MAX_FRAME_FDS:
        return MAX_FRAME_FDS
    return max(0, soft - min(_FD_RESERVE, soft // 8))


# What to do when a message needs more fds than a process can open (said by the sender's
# refusal here and by the executor when the parent itself ran out while encoding).
FD_ADVICE = ("Raise the hard limit before Python starts (`ulimit -Hn`, LimitNOFILE= for a "
             "systemd service; comfy_env raises the soft limit to it), or send fewer separate "
             "blocks: stack many small arrays into one, or copy tensors instead of moving "
             "each storage into a segment of its own (share_tensors_in_place=False)")


def fd_limits() -> str:
    """This process's fd limits, as the messages about running out of fds name them."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, ValueError, OSError):
        return "RLIMIT_NOFILE unknown"
    return f"RLIMIT_NOFILE {soft}, hard limit {hard}"


def _too_many_fds(nfds, room):
    return TooManyFds(
        f"this message would carry {nfds} file descriptors (one per shared-memory block "
        f"it refers to), more than the receiving process can open ({fd_limits()}), which "
        f"leaves room for {room} in one message. " + FD_ADVICE)


def frame_header(length: int, nfds: int = 0) -> bytes:
    """The 16 header bytes of a frame whose body is ``length`` bytes and carries ``nfds`` fds."""
    if nfds > MAX_FDS:
        # Only frames that need several batches ask (getrlimit is a system call).
        room = min(fd_room(), MAX_FRAME_FDS)
        if nfds > room:
            raise _too_many_fds(nfds, room)
        if -(-nfds // MAX_FDS) > _HEADER.size + length:
            # Each batch rides on a byte of its own: only a frame of (almost) no bytes
            # and thousands of fds lacks them; a frame's body names what its fds are.
            raise ValueError(f"a frame of {length} bytes carries at most "
                             f"{(_HEADER.size + length) * MAX_FDS} fds, got {nfds}")
    if length > MAX_BODY:
        raise FrameTooLarge(
            f"a message of {length / 2**30:.1f} GiB is larger than this machine's memory "
            f"({MAX_BODY / 2**30:.1f} GiB), the most a receiver accepts; send less per call")
    return _HEADER.pack(MAGIC, FRAME_VERSION, nfds & 0xFF, nfds >> 8, length)


def check_frame(chunks, fds=()) -> int:
    """Raise what :meth:`Channel.send` would for this frame, before it is sent; else
    return its body's length in bytes."""
    length = 0
    for c in chunks:
        length += len(c) if type(c) is bytes else memoryview(c).nbytes
    if length > MAX_BODY or len(fds) > MAX_FDS:     # all frame_header refuses
        frame_header(length, len(fds))
    return length


def _check_header(buf, pos):
    """``(length, nfds)`` of the header at ``buf[pos:]``, or ProtocolError."""
    magic, version, nfds, nfds_hi, length = _HEADER.unpack_from(buf, pos)
    if magic != MAGIC:
        raise ProtocolError(f"not a comfy_env frame: the header starts with {magic!r} "
                            f"instead of {MAGIC!r} (something else wrote to the channel)")
    if version != FRAME_VERSION:
        raise ProtocolError(f"frame format {version}, this comfy_env reads {FRAME_VERSION}")
    if nfds_hi:
        nfds |= nfds_hi << 8
        if -(-nfds // MAX_FDS) > _HEADER.size + length:
            raise ProtocolError(f"corrupt frame header {bytes(buf[pos:pos + _HEADER.size])!r} "
                                f"({nfds} fds, more than a body of {length} bytes can carry)")
    if length > MAX_BODY:
        raise ProtocolError(f"corrupt frame header {bytes(buf[pos:pos + _HEADER.size])!r} "
                            f"({nfds} fds, body of {length} bytes)")
    return length, nfds


def _above_std(sock):
    """``sock``, moved off fds 0-2 if it got one (see comfy_env/stdfds.py)."""
    if sock.fileno() > 2:
        return sock
    try:
        moved = socket.socket(fileno=stdfds.dup_above(sock.fileno()))
    finally:
        sock.close()
    return moved


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
        return cls(_above_std(a)), cls(_above_std(b))

    @classmethod
    def from_fd(cls, fd: int) -> "Channel":
        return cls(socket.socket(fileno=fd))

    def fileno(self) -> int:
        return self.sock.fileno()

    # -- sending -----------------------------------------------------------
    def send(self, chunks, fds=(), before=None) -> None:
        """Send one frame made of ``chunks`` (bytes-like objects, sent back to back).

        ``fds`` stay owned by the caller (the kernel duplicates them into the peer).
        ``before``: the chunks of a frame without fds (a control message) to send just
        ahead of this one, in the same write where both are small: the peer then gets
        both with one wake-up and one read.
        """
        if isinstance(chunks, (bytes, bytearray, memoryview)):
            chunks = [chunks]
        small = None if fds else _small_frame(chunks)
        pre = None
        if before is not None:
            pre = _small_frame(before)
            if pre is None:
                self.send(before)             # a big one (control messages never are): alone
            elif small is not None:
                small, pre = pre + small, None
        if small is None:
            views = [memoryview(c).cast("B") for c in chunks]
            nfds = len(fds)
            try:
                header = frame_header(sum(v.nbytes for v in views), nfds)   # refuses before anything is sent
            except Exception:
                if pre is not None:
                    self.send(before)     # only this frame is refused: what was to go ahead of it goes
                raise
            batches = None
            if nfds <= MAX_FDS:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if nfds else []
            else:   # several batches (see the module docstring)
                batches = [array.array("i", fds[i:i + MAX_FDS]) for i in range(0, nfds, MAX_FDS)]
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, batches.pop())]
            bufs = [memoryview(header)] + views
        with self._send_lock:
            if self._closed:
                raise ChannelClosed("channel is closed")
            try:
                if small is not None:
                    self.sock.sendall(small)
                    return
                if pre is not None:
                    self.sock.sendall(pre)
                # A blocking stream socket can still return short (a signal, a
                # huge frame), and one call takes at most IOV_MAX buffers (a call
                # that forwards one result many times has a part per reference):
                # go on from where it stopped.  The fds go with the first byte.
                i = 0
                if batches:
                    # More fds than one sendmsg takes: all batches but the last ride on
                    # one byte each (a one-byte send is never short), the last on the rest.
                    for batch in batches:
                        while not bufs[i].nbytes:
                            i += 1
                        self.sock.sendmsg([bufs[i][:1]],
                                          [(socket.SOL_SOCKET, socket.SCM_RIGHTS, batch)])
                        bufs[i] = bufs[i][1:]
                    while not bufs[i].nbytes:       # frame_header saw a byte left for the last
                        i += 1
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
        self._keep(self._recv_scratch(spin))

    def _keep(self, n):
        """Append the ``n`` bytes :meth:`_recv_scratch` got to the read buffer."""
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += self._scratch_view[:n]

    def _recv_scratch(self, spin):
        """One recvmsg into the scratch buffer (fds to the FIFO): how many bytes came."""
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
        if anc or flags & _MSG_CTRUNC:
            self._take_fds(anc, flags)
        if not n:
            raise ChannelClosed("peer closed the channel")
        return n

    def _take_fds(self, anc, flags):
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[: len(payload) - (len(payload) % _FD_SIZE)])
                self._fds.extend(arr)
        if flags & _MSG_CTRUNC:
            # EMFILE: the control buffer fits every fd a frame may carry, so a truncation
            # is this process's fd limit (a shortage callers may wait out, launch.is_transient).
            raise OSError(errno.EMFILE, f"file descriptors were truncated in transit: this process could "
                          f"not open all the fds a message carried, its fd limit ({fd_limits()}) reached?")

    def buffered(self) -> bool:
        """Bytes of a frame are already read (``recv`` starts on them without waiting on
        the socket): a thread that waits for readability must not poll then."""
        return len(self._buf) > self._pos

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
        if self._pos == len(self._buf):
            # Nothing buffered (the usual case): a small frame that came alone and
            # without fds -- a warm call, its result -- is taken from the scratch
            # buffer as it is; anything else goes through the read buffer below.
            n = self._recv_scratch(spin)
            spin = 0.0
            if n >= _HEADER.size:
                magic, version, nfds, nfds_hi, length = _HEADER.unpack_from(self._scratch, 0)
                if n - _HEADER.size == length and magic == MAGIC and version == FRAME_VERSION \
                        and not nfds and not nfds_hi:
                    return bytes(self._scratch_view[_HEADER.size:n]), []
            self._keep(n)
        buf = self._buf
        while len(buf) - self._pos < _HEADER.size:
            # Check the magic as it arrives: a stray write shorter than a header
            # must not leave us waiting for the rest of one.
            have = buf[self._pos:self._pos + len(MAGIC)]
            if have != MAGIC[:len(have)]:
                raise ProtocolError(f"not a comfy_env frame: the header starts with "
                                    f"{bytes(have)!r} instead of {MAGIC!r} (something else "
                                    f"wrote to the channel)")
            if have and not wait_readable(self.sock.fileno(), HEADER_STALL):
                # A sender writes a header in one piece with its body's start: a
                # part of one that stays alone is a stray write that looked like one.
                raise ProtocolError(f"not a comfy_env frame: {len(buf) - self._pos} bytes "
                                    f"{bytes(buf[self._pos:])!r} and then nothing for "
                                    f"{HEADER_STALL:g} s (something else wrote to the channel)")
            self._fill(spin)
            spin = 0.0
            buf = self._buf
        length, nfds = _check_header(buf, self._pos)
        if nfds and len(self._fds) < min(nfds, _HEADER.size * MAX_FDS):
            # Batch i of a frame's fds rides on its byte i: those on the header's bytes
            # came with them.  Without them the header lies, and waiting for its body
            # could wait for ever.
            header = bytes(buf[self._pos:self._pos + _HEADER.size])
            raise ProtocolError(f"corrupt frame header {header!r}: it announces {nfds} fds, "
                                f"{len(self._fds)} came with it")
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
                if len(self._fds) < nfds:
                    # The frame's last batches of fds ride on bytes still to come (a
                    # frame with thousands): recv() would drop them.
                    n, anc, flags, _ = self.sock.recvmsg_into([view[got:]], self._anc_size,
                                                              _RECV_FLAGS)
                    self._take_fds(anc, flags)
                else:
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

