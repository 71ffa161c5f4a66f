"""Processes as /proc tells them: killing a worker with the processes its calls left
running, and the status of an exited process nobody has reaped yet.

A worker that is killed (its call timed out, a read of its channel was interrupted, a
broken pool is torn down) may have started processes a call never waited for: a
subprocess, a server, a nested pool.  Killed alone, the worker leaves them to init,
running for ever.  :func:`kill_tree` kills them with it:

1. the worker is frozen (SIGSTOP): a stopped process forks nothing and reaps nothing,
   so what is found below stays its descendants and keeps its pid;
2. /proc is read for its children, each is frozen as it is found, and again until a
   pass finds nothing new (each pass first waits, briefly, for the last ones to be
   seen stopped, so none forks after the pass that missed its child);
3. all of them get SIGKILL, the worker last.

The worker's identity is its pid plus its start time (``/proc/<pid>/stat`` field 22,
read by :func:`start_ticks` right after it was started): a pid that names another
process now (the worker was reaped meanwhile) is never walked.

The walk cannot find processes that left the tree: a double-forked daemon, or the
processes of a worker that died by itself (the kernel hands them to init before anyone
can look).  :func:`kill_tagged` finds those by their environment instead.  The parent
gives each worker a tag of its own choosing, added to ``COMFY_ENV_WORKER_TAGS`` in the
environment the worker starts with where it is spawned, and by the worker itself
(:func:`tag_process`) where it is forked from a zygote; every process it starts
inherits the tag, unless it builds its environment from scratch.  The parent chooses
the tag, not the worker: a worker (sandboxed, untrusted) cannot point the kill at
another worker's processes.

Written by hand: psutil would walk the tree but is not a dependency, and the freeze
is what makes the walk safe.  Linux only (/proc); elsewhere only the worker is killed.
A leaf module (nothing of ours imported): the executor and the zygote both use it.
"""
from __future__ import annotations

import os
import select
import signal
import time

__all__ = ["kill_tagged", "kill_tree", "parent_of", "start_ticks", "tag_process", "unreaped_status"]

# The tags of the comfy_env workers a process descends from, oldest first, space-separated.
TAG_VAR = "COMFY_ENV_WORKER_TAGS"
_TAG_PREFIX = TAG_VAR.encode() + b"="
_MAX_TAGS = 16              # nesting depth kept (workers that start executors that start...)
# Passes of kill_tagged: each kills what it finds; a process forked meanwhile is the next one's.
_TAGGED_PASSES = 20
# How long a pass waits for the processes it just froze to show as stopped (a process in
# an uninterruptible wait stops only when it returns from it): the walk goes on after it.
SETTLE_S = 0.2
_STOPPED = frozenset(b"TtZXx")


def _fields(pid):
    """``/proc/<pid>/stat`` from field 3 (state) on, as bytes, or None when it is gone.
    The command name (field 2) is in parentheses and may hold spaces or ")"."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2:].split()


def _stat(pid):
    """``(state, ppid, start ticks)`` of ``pid``, or None when it is gone."""
    f = _fields(pid)
    return None if f is None else (f[0][0], int(f[1]), int(f[19]))


def start_ticks(pid):
    """When ``pid`` started (clock ticks since boot), to tell it from a later process
    given the same pid; None where /proc cannot say."""
    st = _stat(pid)
    return st[2] if st is not None else None


def parent_of(pid):
    """``pid``'s parent now, or None when it is gone."""
    st = _stat(pid)
    return st[1] if st is not None else None


def unreaped_status(pid):
    """The exit code (negative: the signal) of exited, unreaped process ``pid``, from its
    state and exit_code (field 52, Linux 3.5+); None when it can't be told (already
    reaped, running, or no procfs).  A zombie's pid is not reused until it is reaped."""
    f = _fields(pid)
    if f is None or len(f) < 50 or f[0] != b"Z":
        return None
    try:
        return os.waitstatus_to_exitcode(int(f[49]))     # field 52
    except ValueError:
        return None


def _pids():
    """Every process's pid in /proc now (none where it cannot be read)."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    return [int(name) for name in names if name.isdigit()]


def _children(of):
    """The pids whose parent is in ``of``, now."""
    return [pid for pid in _pids() if (st := _stat(pid)) is not None and st[1] in of]


def _settle(pids, deadline):
    """Wait (until ``deadline``) for ``pids`` to be stopped or gone."""
    waiting = list(pids)
    while waiting:
        waiting = [p for p in waiting if (st := _stat(p)) is not None and st[0] not in _STOPPED]
        if not waiting or time.monotonic() >= deadline:
            return
        time.sleep(0.001)


def kill_tree(proc, ticks):
    """SIGKILL ``proc`` (a ``subprocess.Popen``, or anything with ``pid``,
    ``send_signal`` and ``kill`` that refuse a reaped pid) and every process below it.

    ``ticks``: :func:`start_ticks` of ``proc.pid`` when it was started; None kills the
    worker alone.  Never raises for a process already gone.
    """
    pid = proc.pid
    found = []
    if ticks is not None and start_ticks(pid) == ticks:
        try:
            proc.send_signal(signal.SIGSTOP)
        except OSError:
            pass
        try:
            _settle([pid], time.monotonic() + SETTLE_S)
            tree = {pid}
            fresh = _children(tree)
            while fresh and start_ticks(pid) == ticks:
                for child in fresh:
                    try:
                        os.kill(child, signal.SIGSTOP)
                    except OSError:
                        pass
                found.extend(fresh)
                tree.update(fresh)
                _settle(fresh, time.monotonic() + SETTLE_S)
                fresh = [p for p in _children(tree) if p not in tree]
        except Exception:       # a /proc we cannot read as expected: the worker alone
            pass
        if start_ticks(pid) != ticks:
            found = []          # not our worker's tree any more: touch nothing of it
    for child in found:
        try:
            os.kill(child, signal.SIGKILL)
        except OSError:
            pass
    try:
        proc.kill()
    except (ProcessLookupError, OSError, AttributeError):
        pass


def tags_with(held, tag):
    """The value of ``TAG_VAR`` for a worker tagged ``tag`` whose environment had ``held``
    (the tags of the workers it descends from, kept: their deaths take it too)."""
    held = (held or "").split()
    if held and held[-1] == tag:
        return " ".join(held)
    return " ".join(held[-(_MAX_TAGS - 1):] + [tag])


def tag_process(tag):
    """Give every process started from here from now on worker tag ``tag``."""
    os.environ[TAG_VAR] = tags_with(os.environ.get(TAG_VAR), tag)


def _tagged(pid, tag):
    """Whether ``pid``'s environment (as it was exec'd) carries worker ``tag``."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            data = f.read()
    except OSError:             # gone, a zombie's, or another user's
        return False
    if tag not in data:
        return False
    for item in data.split(b"\0"):
        if item.startswith(_TAG_PREFIX):
            return tag in item[len(_TAG_PREFIX):].split()
    return False


def _exited(pidfd):
    """Whether the process ``pidfd`` names has exited (its pid may name another by now)."""
    poller = select.poll()      # (not select(): a pidfd may be above FD_SETSIZE)
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def kill_tagged(tag):
    """SIGKILL every process (of this user) whose environment carries worker ``tag``
    (:func:`tag_process`), wherever it sits in the process tree now; the number killed.

    Each process is signalled through a pidfd opened before its environment is read
    again, so a pid reused meanwhile by a process that is not tagged is never touched.
    Passes repeat until one finds nothing: a process forked before its parent was
    killed carries the tag too.  Without pidfds (Linux < 5.3) nothing is done.
    """
    if not tag or not hasattr(os, "pidfd_open"):
        return 0
    tag = tag.encode()
    me = os.getpid()
    done = {}                   # pid -> pidfd of the process killed under it
    killed = 0
    try:
        for _ in range(_TAGGED_PASSES):
            fresh = 0
            for pid in _pids():
                if pid == me or not _tagged(pid, tag):
                    continue
                old = done.get(pid)
                if old is not None:
                    if not _exited(old):
                        continue            # killed, not dead yet
                    os.close(done.pop(pid))     # the pid names a new process
                try:
                    fd = os.pidfd_open(pid)
                except OSError:
                    continue
                if not _tagged(pid, tag):   # the pid now names another process
                    os.close(fd)
                    continue
                done[pid] = fd
                try:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                except OSError:
                    continue                # it exited meanwhile
                fresh += 1
            killed += fresh
            if not fresh:
                break
    finally:
        for fd in done.values():
            os.close(fd)
    return killed
