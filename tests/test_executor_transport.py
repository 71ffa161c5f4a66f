"""The worker channel (framed AF_UNIX socketpair with SCM_RIGHTS fds) and the handshake."""
from __future__ import annotations

import os
import select
import socket
import struct
import sys
import threading
from concurrent.futures import BrokenExecutor

import pytest

import _funcs
from comfy_env import IsolatedExecutor, ProtocolMismatch, WorkerStartError
from comfy_env._version import PROTOCOL_VERSION, __version__
from comfy_env.envs import WorkerEnvironment
from comfy_env.ipc.transport import MAX_FDS, Channel, ChannelClosed, frame_header


@pytest.fixture
def pair():
    a, b = Channel.pair()
    yield a, b
    a.close()
    b.close()


def _pipe_with(data: bytes):
    """A pipe whose read end yields ``data``: returns the read fd (the caller closes it)."""
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    return r


def _read_fd(fd):
    try:
        return os.read(fd, 1024)
    finally:
        os.close(fd)


# -- frames ------------------------------------------------------------------------------

def test_a_frame_arrives_whole_from_several_chunks(pair):
    a, b = pair
    a.send([b"ab", bytearray(b"cd"), memoryview(b"ef")])
    a.send(b"")
    a.send(b"single")
    assert b.recv() == (b"abcdef", [])
    assert b.recv() == (b"", [])
    assert b.recv() == (b"single", [])


def test_fds_travel_with_their_frame_and_stay_the_senders(pair):
    a, b = pair
    r = _pipe_with(b"through the pipe")
    a.send(b"here is an fd", [r])
    os.fstat(r)               # still open here: the kernel duplicated it for the peer
    os.close(r)
    body, fds = b.recv()
    assert body == b"here is an fd" and len(fds) == 1
    assert _read_fd(fds[0]) == b"through the pipe"


def test_back_to_back_frames_each_get_their_own_fds(pair):
    # All frames are written before the first recv, so one read sees several of them.
    a, b = pair
    plan = [[], [b"x1", b"x2"], [], [b"y"], [], [b"z1", b"z2", b"z3"]]
    for i, payloads in enumerate(plan):
        fds = [_pipe_with(p) for p in payloads]
        a.send(f"frame {i}".encode(), fds)
        for fd in fds:
            os.close(fd)
    for i, payloads in enumerate(plan):
        body, fds = b.recv()
        assert body == f"frame {i}".encode()
        assert [_read_fd(fd) for fd in fds] == payloads


class _CountingSocket:
    """The channel's socket, counting its writes."""

    def __init__(self, sock):
        self.sock, self.writes = sock, 0

    def sendall(self, data):
        self.writes += 1
        return self.sock.sendall(data)

    def sendmsg(self, *args):
        self.writes += 1
        return self.sock.sendmsg(*args)

    def __getattr__(self, name):
        return getattr(self.sock, name)


@pytest.mark.parametrize("before, body, with_fd", [
    ([b"control"], [b"call"], False),                    # both small: one write
    ([b"control"], [b"x" * (200 << 10)], False),         # the frame is big
    ([b"control"], [b"call"], True),                     # the frame carries an fd
    ([b"c" * (100 << 10)], [b"call"], False),            # the control frame is big
])
def test_a_frame_sent_before_another_arrives_first_and_whole(pair, before, body, with_fd):
    a, b = pair
    counting = a.sock = _CountingSocket(a.sock)
    fds = [_pipe_with(b"the call's fd")] if with_fd else []
    a.send(body, fds, before=before)
    for fd in fds:
        os.close(fd)
    if len(before[0]) < 1024 and len(body[0]) < 1024 and not with_fd:
        assert counting.writes == 1
    assert b.recv() == (b"".join(before), [])
    got, got_fds = b.recv()
    assert got == b"".join(body)
    assert [_read_fd(fd) for fd in got_fds] == ([b"the call's fd"] if with_fd else [])
    a.sock = counting.sock


def test_a_refused_frame_still_sends_what_was_to_go_before_it(pair, monkeypatch):
    """The control messages that ride ahead of a frame (a call's releases) were taken
    from the link for it: a frame refused before anything is sent (too big, too many
    fds) must not take them with it, or the peer never learns of the releases."""
    from comfy_env.ipc import transport
    a, b = pair
    monkeypatch.setattr(transport, "MAX_BODY", 100 << 10)
    with pytest.raises(transport.FrameTooLarge):
        a.send([b"x" * (200 << 10)], before=[b"control"])
    assert select.select([b.sock], [], [], 5)[0], "what was to go before the frame was lost"
    assert b.recv() == (b"control", [])
    a.send([b"next"])                       # the channel is still in step
    assert b.recv() == (b"next", [])


def test_many_fds_in_one_frame(pair):
    a, b = pair
    fds = [_pipe_with(str(i).encode()) for i in range(MAX_FDS)]
    try:
        a.send(b"max", fds)
    finally:
        for fd in fds:
            os.close(fd)
    body, got = b.recv()
    assert body == b"max"
    assert [_read_fd(fd) for fd in got] == [str(i).encode() for i in range(MAX_FDS)]


def _fd_room_for(n):
    """Make room for ``n`` more fds in this process (raise the soft limit), or skip."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = len(os.listdir("/proc/self/fd")) + n + 64
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"needs {need} fds, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


@pytest.mark.timeout(30)
def test_a_frame_carries_more_fds_than_one_sendmsg_takes(pair):
    """One sendmsg passes at most SCM_MAX_FD (253) fds: a frame with more sends them in
    batches, and they all come out with their own frame, in order (it used to refuse)."""
    a, b = pair
    n = 3 * MAX_FDS + 7
    _fd_room_for(2 * n + 4)
    plan = [(b"before", [b"b"]), (b"many " * 40, [str(i).encode() for i in range(n)]),
            (b"none", []), (b"after", [b"a1", b"a2"])]
    for body, payloads in plan:
        fds = [_pipe_with(p) for p in payloads]
        try:
            a.send([body[:3], body[3:]], fds)
        finally:
            for fd in fds:
                os.close(fd)
    for body, payloads in plan:
        got_body, got = b.recv()
        assert bytes(got_body) == body
        assert [_read_fd(fd) for fd in got] == payloads


@pytest.mark.timeout(30)
def test_thousands_of_fds_ride_on_the_body_too(pair):
    """Past 16 batches (the header's bytes) the batches ride on the body's first bytes:
    received with the buffered reads, and with a big body's direct reads alike."""
    a, b = pair
    n = 17 * MAX_FDS + 3
    _fd_room_for(2 * n + 4)
    r = _pipe_with(b"one pipe")
    ino = os.fstat(r).st_ino
    big = os.urandom(2 * 1024 * 1024 + 5)
    # The big frame fills the socket buffer: its sender blocks until we read.
    sender = threading.Thread(target=lambda: (a.send(b"small body", [r] * n), a.send(big, [r] * n),
                                              a.send(b"last", [r])))
    sender.start()
    try:
        for want in (b"small body", big):
            body, got = b.recv()
            assert bytes(body) == want and len(got) == n
            assert len(set(got)) == n and {os.fstat(fd).st_ino for fd in got} == {ino}
            for fd in got:
                os.close(fd)
        body, got = b.recv()
        assert body == b"last" and _read_fd(got[0]) == b"one pipe"
    finally:
        sender.join()
        os.close(r)


@pytest.mark.timeout(30)
def test_more_fds_than_the_receiver_can_open_are_refused_before_anything_is_sent(pair, monkeypatch):
    from comfy_env.ipc import transport

    a, b = pair
    monkeypatch.setattr(transport, "fd_room", lambda: MAX_FDS + 1)
    r = _pipe_with(b"kept")
    try:
        with pytest.raises(transport.TooManyFds, match="RLIMIT_NOFILE"):
            a.send(b"too many", [r] * (MAX_FDS + 2))
        a.send(b"fits", [r] * (MAX_FDS + 1))
        monkeypatch.setattr(transport, "fd_room", lambda: 1 << 20)
        with pytest.raises(ValueError, match="carries at most"):
            a.send(b"", [r] * (17 * MAX_FDS))        # a batch per byte: 16 bytes, 17 batches
    finally:
        os.close(r)
    body, got = b.recv()
    assert body == b"fits" and len(got) == MAX_FDS + 1
    for fd in got:
        os.close(fd)


@pytest.mark.timeout(30)
def test_big_frames_over_a_mib_arrive_intact_with_their_fds(pair):
    a, b = pair
    big = os.urandom(5 * 1024 * 1024 + 17)
    r = _pipe_with(b"big one's fd")
    r2 = _pipe_with(b"small one's fd")
    # The socket buffer is far smaller than the frame: the sender blocks until we read.
    sender = threading.Thread(target=lambda: (a.send([big[:1000], big[1000:]], [r]),
                                              a.send(b"small after", [r2]), a.send(big)))
    sender.start()
    body, fds = b.recv()
    assert bytes(body) == big
    assert _read_fd(fds[0]) == b"big one's fd"
    body, fds = b.recv()
    assert body == b"small after" and _read_fd(fds[0]) == b"small one's fd"
    body, fds = b.recv()
    assert bytes(body) == big and fds == []
    sender.join(10)
    os.close(r)
    os.close(r2)


@pytest.mark.timeout(30)
def test_frames_sent_from_several_threads_never_interleave(pair):
    a, b = pair
    sizes = [10, 70_000, 3, 300_000, 1500]

    def send(tag):
        for i in range(40):
            a.send(bytes([tag]) * sizes[i % len(sizes)])

    threads = [threading.Thread(target=send, args=(t,)) for t in range(1, 5)]
    for t in threads:
        t.start()
    seen = {t: 0 for t in range(1, 5)}
    for _ in range(4 * 40):
        body, _fds = b.recv()
        tag = body[0]
        assert body == bytes([tag]) * len(body)                  # one sender's bytes only
        assert len(body) == sizes[seen[tag] % len(sizes)]        # each sender's frames in order
        seen[tag] += 1
    for t in threads:
        t.join(10)
    assert seen == {t: 40 for t in range(1, 5)}


def test_eof_raises_channel_closed(pair):
    a, b = pair
    a.send(b"last")
    a.close()
    assert b.recv() == (b"last", [])
    with pytest.raises(ChannelClosed):
        b.recv()
    assert issubclass(ChannelClosed, EOFError)


def test_eof_in_the_middle_of_a_frame_raises_channel_closed():
    s1, s2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b = Channel(s2)
    s1.sendall(frame_header(100, 0) + b"only ten b")
    s1.close()
    with pytest.raises(ChannelClosed):
        b.recv()
    b.close()


def test_sending_on_a_closed_channel_or_to_a_gone_peer_raises_channel_closed(pair):
    a, b = pair
    b.close()
    with pytest.raises(ChannelClosed):
        a.send(b"x" * 1_000_000)       # peer gone: EPIPE
    a.close()
    with pytest.raises(ChannelClosed):
        a.send(b"x")


# -- handshake -----------------------------------------------------------------------

# Runs the real worker after changing what it announces in its handshake.
_FAKE_WORKER = f"""#!/bin/sh
exec {sys.executable} -c '
import os, sys
import comfy_env._version as v
v.PROTOCOL_VERSION = int(os.environ.get("FAKE_PROTOCOL", v.PROTOCOL_VERSION))
v.__version__ = os.environ.get("FAKE_VERSION", v.__version__)
import runpy
runpy.run_module("comfy_env.worker", run_name="__main__")
' "$@"
"""


def _fake_env(tmp_path, **env_vars):
    script = tmp_path / "fake-python"
    script.write_text(_FAKE_WORKER)
    script.chmod(0o755)
    return WorkerEnvironment(python=str(script), python_version=tuple(sys.version_info[:2]),
                             env_vars=env_vars, is_current=True, label="fake")


@pytest.mark.timeout(20)
def test_the_fake_worker_itself_works_when_it_announces_the_truth(tmp_path):
    with IsolatedExecutor(env=_fake_env(tmp_path)) as ex:
        assert ex.submit(_funcs.add, 1, 2).result(15) == 3


@pytest.mark.timeout(20)
def test_a_protocol_mismatch_is_a_clear_error_not_a_hang(tmp_path):
    ex = IsolatedExecutor(env=_fake_env(tmp_path, FAKE_PROTOCOL="999"))
    futs = [ex.submit(_funcs.add, 1, 2) for _ in range(3)]
    for f in futs:
        exc = f.exception(15)
        assert isinstance(exc, ProtocolMismatch) and isinstance(exc, BrokenExecutor)
        assert "protocol 999" in str(exc) and str(PROTOCOL_VERSION) in str(exc)
    with pytest.raises(ProtocolMismatch):
        ex.submit(_funcs.add, 1, 2)
    ex.shutdown(wait=True)
    assert ex.worker_pids() == []


@pytest.mark.timeout(20)
def test_a_comfy_env_version_mismatch_is_a_clear_error(tmp_path):
    with IsolatedExecutor(env=_fake_env(tmp_path, FAKE_VERSION="0.0.1-other")) as ex:
        exc = ex.submit(_funcs.add, 1, 2).exception(15)
    assert isinstance(exc, ProtocolMismatch)
    assert "0.0.1-other" in str(exc) and __version__ in str(exc)


@pytest.mark.timeout(20)
def test_a_worker_on_another_python_than_its_environment_says_is_a_clear_error():
    wenv = WorkerEnvironment(python=sys.executable, python_version=(3, 2), is_current=True,
                             label="stale")
    with IsolatedExecutor(env=wenv) as ex:
        exc = ex.submit(_funcs.add, 1, 2).exception(15)
    assert isinstance(exc, WorkerStartError)
    assert "3.2" in str(exc) and "%d.%d" % sys.version_info[:2] in str(exc)


@pytest.mark.timeout(20)
def test_an_interpreter_that_cannot_start_is_a_worker_start_error(tmp_path):
    wenv = WorkerEnvironment(python=str(tmp_path / "no-such-python"),
                             python_version=tuple(sys.version_info[:2]), label="missing")
    with IsolatedExecutor(env=wenv) as ex:
        exc = ex.submit(_funcs.add, 1, 2).exception(15)
    assert isinstance(exc, WorkerStartError) and "no-such-python" in str(exc)


@pytest.mark.timeout(20)
def test_a_worker_that_dies_before_its_handshake_is_a_worker_start_error(tmp_path):
    script = tmp_path / "dying-python"
    script.write_text("#!/bin/sh\necho 'cannot even start' >&2\nexit 42\n")
    script.chmod(0o755)
    wenv = WorkerEnvironment(python=str(script), python_version=tuple(sys.version_info[:2]),
                             label="dying")
    with IsolatedExecutor(env=wenv) as ex:
        exc = ex.submit(_funcs.add, 1, 2).exception(15)
    assert isinstance(exc, WorkerStartError)
    assert "exited with code 42" in str(exc) and "cannot even start" in str(exc)
