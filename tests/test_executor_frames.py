"""Frames of any size, and bytes on the channel that are not frames."""
from __future__ import annotations

import os
import socket
import struct
from concurrent.futures import wait

import pytest

import _funcs
import _proc_funcs
from comfy_env import IsolatedExecutor, WorkerCrashed
from comfy_env.ipc import transport
from comfy_env.ipc.transport import Channel, ChannelClosed, FrameTooLarge, ProtocolError


def _raw_pair():
    s1, s2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return s1, Channel(s2)


# -- the header --------------------------------------------------------------------------

def test_the_length_field_holds_sizes_beyond_4_gib():
    for length in (0, 1, 2**32 - 1, 2**32, 2**32 + 5, 5 * 2**30 + 3):
        if length > transport.MAX_BODY:
            continue
        header = transport.frame_header(length, 7)
        assert len(header) == 16
        assert transport._check_header(header, 0) == (length, 7)


def test_a_frame_bigger_than_any_receiver_accepts_is_refused_before_sending():
    a, b = Channel.pair()
    try:
        huge = memoryview(bytearray(1 << 20))
        n = transport.MAX_BODY // (1 << 20) + 1
        with pytest.raises(FrameTooLarge, match="larger than this machine's memory"):
            a.send([huge] * n)
        a.send(b"the channel still works")
        assert b.recv() == (b"the channel still works", [])
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("garbage", [
    b"hello\n",                                   # shorter than a header: fails at once
    b"\x00\x01\x00\x00\x00\x00\x00\x00",           # the old u32 layout announcing 256 bytes
    b"\xff" * 64,                                  # a length of 2**64-1 under a wrong magic
])
def test_bytes_that_are_not_a_frame_are_refused_without_waiting(garbage):
    s1, b = _raw_pair()
    s1.sendall(garbage)          # the peer stays open: no EOF to fall back on
    with pytest.raises(ProtocolError, match="not a comfy_env frame"):
        b.recv()
    s1.close()
    b.close()


@pytest.mark.parametrize("fields, why", [
    ((transport.MAGIC, 99, 0, 0, 10), "frame format 99"),
    ((transport.MAGIC, transport.FRAME_VERSION, 0, 1, 10), "256 fds"),     # nfds is a u24
    ((transport.MAGIC, transport.FRAME_VERSION, 0, 0, 2**64 - 1), "body of 18446744073709551615"),
    ((transport.MAGIC, transport.FRAME_VERSION, 251, 0, 10), "251 fds"),
])
def test_a_header_with_a_valid_magic_is_still_checked_before_anything_is_allocated(fields, why):
    s1, b = _raw_pair()
    s1.sendall(struct.pack("<4sBBHQ", *fields))
    with pytest.raises(ProtocolError, match=why):
        b.recv()
    s1.close()
    b.close()


def test_a_big_body_arrives_intact():
    a, b = Channel.pair()
    data = os.urandom(3 << 20)
    import threading
    t = threading.Thread(target=a.send, args=([data[:1000], data[1000:]],))
    t.start()
    body, fds = b.recv()
    t.join()
    assert bytes(body) == data and fds == []
    a.close()
    b.close()


def test_a_frame_of_more_buffers_than_one_sendmsg_takes_arrives_intact():
    a, b = Channel.pair()
    r, w = os.pipe()
    try:
        chunks = [bytes([i % 251]) * (i % 7) for i in range(5000)]
        a.send(chunks, [r])
        body, fds = b.recv()
        assert bytes(body) == b"".join(chunks) and len(fds) == 1
        os.close(fds[0])
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


# -- through the executor -----------------------------------------------------------------

@pytest.mark.timeout(30)
@pytest.mark.parametrize("garbage", [b"garbage from a stray write\n", b"\x89", b"\xff" * 4096])
def test_garbage_on_the_channel_fails_that_worker_as_a_protocol_error(garbage):
    with IsolatedExecutor(name="garbled", worker_output="discard") as ex:
        # then_sleep: the call would run on for 60 s; the parent must not wait for it.
        exc = ex.submit(_proc_funcs.write_garbage_to_channel, garbage, 60).exception(20)
        assert isinstance(exc, WorkerCrashed)
        assert "protocol error" in str(exc) and "not a comfy_env frame" in str(exc)
        assert ex.submit(_funcs.add, 1, 2).result(15) == 3     # a fresh worker takes over


def _available_memory():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@pytest.mark.timeout(180)
def test_a_call_frame_above_4_gib_goes_through():
    # One 20.5 MiB result forwarded 205 times: a 4.1 GiB call frame that costs the
    # parent no copy (the parts are views of the one received frame) and the
    # receiving worker one 4.1 GiB buffer.
    part, refs = 41 << 19, 205
    if _available_memory() < 9 * 2**30:
        pytest.skip("needs ~5 GiB of free memory for the 4.1 GiB frame")
    with IsolatedExecutor(max_workers=2, name="big") as ex:
        fa = ex.submit(_proc_funcs.big_inline_result, part)
        wait([fa], 30)           # not exception(): that decodes, and the frame must forward it
        fut = ex.submit(_proc_funcs.count_forwarded, [fa] * refs)
        assert fut.result(150) == (refs, refs * part)
        assert refs * part > 2**32
        assert ex.submit(_funcs.add, 1, 2).result(15) == 3


@pytest.mark.timeout(60)
def test_a_call_frame_larger_than_memory_fails_that_call_cleanly(monkeypatch):
    # Two results of 8 MiB, forwarded, against a limit lowered to 12 MiB (a frame bigger
    # than this machine's memory otherwise; the same future referenced many times, which
    # used to make one, is forwarded once now, as pickle's memo sends any object once).
    part = 8 << 20
    with IsolatedExecutor(max_workers=1, name="toolarge") as ex:
        fa = ex.submit(_proc_funcs.big_inline_result, part)
        fb = ex.submit(_proc_funcs.big_inline_result, part)
        wait([fa, fb], 30)       # not exception(): that decodes, and the frame must forward it
        monkeypatch.setattr(transport, "MAX_BODY", part + part // 2)
        exc = ex.submit(_proc_funcs.count_forwarded, [fa, fb]).exception(30)
        monkeypatch.undo()
        assert isinstance(exc, FrameTooLarge) and "larger than this machine's memory" in str(exc)
        # Nothing was sent, nothing is left half-done: the one worker takes the next call.
        assert ex.submit(_proc_funcs.count_forwarded, [fa] * 2).result(30) == (2, 2 * part)


@pytest.mark.timeout(30)
def test_a_result_frame_too_large_to_send_fails_that_call_with_a_clear_error():
    from comfy_env import PicklingFailed
    with IsolatedExecutor(max_workers=1, name="bigresult") as ex:
        exc = ex.submit(_proc_funcs.result_above_max_body, 100_000, 200_000).exception(15)
        assert isinstance(exc, PicklingFailed) and "FrameTooLarge" in str(exc)
        assert ex.submit(_funcs.add, 1, 2).result(15) == 3      # the same worker goes on
