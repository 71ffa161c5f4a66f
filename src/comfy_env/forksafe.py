"""What a process inherits from us, and how a worker dies with its parent.

Fork children.  ``multiprocessing``'s fork start method (torch DataLoader
workers, ``multiprocessing.Pool``) copies a parent that holds executors into a
child that has none of their threads, and runs ``threading._shutdown()`` there:
the executors' at-exit shutdown, which would wait for calls only the parent
can read or send "exit" to the parent's workers over the inherited sockets.
After a fork every executor of the parent is *inert* in the child: it sends
nothing, waits for nothing, and ``submit`` raises.  The child also closes the
fds it inherited from them (sockets, the parent-death pipe): a live fork child
holding them would keep the workers from seeing the parent die.

Workers.  A worker makes its own fds close-on-exec (``pass_fds`` cleared the
flag), so processes its calls start cannot hold the channel open after the
worker dies; and it asks the kernel for SIGKILL when its parent dies
(``PR_SET_PDEATHSIG``), which needs no Python thread and so no GIL.  The
signal fires when the *thread* that forked the worker ends, which is why
``executor.launch`` starts every worker from one long-lived thread.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import weakref

__all__ = ["PID", "track_pool", "track_channel", "check_owner", "inherited", "protect_worker"]

# The pid the objects created "here" belong to; updated in every fork child.
PID = os.getpid()

_pools = weakref.WeakSet()          # executor pools of this process (and, after a fork, the parent's)
_channels = weakref.WeakSet()       # channels whose fds a fork child must not keep
_child_hooks = []                   # more work for a fork child (other modules' state)


def track_pool(pool) -> None:
    """``pool`` (an executor's ``_Pool``) becomes inert in fork children; it records ``pid``."""
    pool.pid = PID
    _pools.add(pool)


def track_channel(channel) -> None:
    """A fork child closes its copy of ``channel``'s socket."""
    _channels.add(channel)


def on_fork_child(fn) -> None:
    """Run ``fn()`` in every fork child, after this module's own clean-up."""
    _child_hooks.append(fn)


def inherited(obj) -> bool:
    """Was ``obj`` (tracked with its ``pid``) created by an ancestor of this process?"""
    return obj.pid != PID


def check_owner(pool) -> None:
    if pool.pid != PID:
        raise RuntimeError(
            f"this executor was created in the parent process (pid {pool.pid}); create a new "
            f"IsolatedExecutor in the child (a forked process cannot use its parent's workers)")


def _close_channel(channel):
    # No lock: another thread of the parent may have held the send lock when we were
    # forked, and it will never be released here.  A fresh one lets a late send fail
    # cleanly (ChannelClosed) instead of blocking forever.
    channel._send_lock = threading.Lock()
    channel._closed = True
    try:
        # detach(), then close the number ourselves: the socket object no longer
        # owns it, so a later close() cannot hit a number reused since.
        fd = channel.sock.detach()
    except OSError:
        return
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


def _neutralize_worker(handle):
    link = getattr(handle, "link", None)
    if link is not None:
        link.closed = True          # no releases from here for the parent's blocks
    alive_w = getattr(handle, "_alive_w", None)
    if alive_w is not None:
        handle._alive_w = None
        try:
            os.close(alive_w)
        except OSError:
            pass
    if getattr(handle, "channel", None) is not None:
        _close_channel(handle.channel)
    proc = getattr(handle, "proc", None)
    for f in (getattr(proc, "stdout", None), getattr(proc, "stderr", None)):
        if f is not None:
            try:
                f.close()
            except (OSError, ValueError):
                pass


def _after_fork_in_child():
    global PID
    PID = os.getpid()
    for pool in list(_pools):
        # The parent's threads may have held these: nothing here may block on them.
        pool.lock = threading.Lock()
        pool.all_done = threading.Condition(pool.lock)
        for handle in list(pool.workers):
            _neutralize_worker(handle)
    _pools.clear()
    for channel in list(_channels):
        _close_channel(channel)
    _channels.clear()
    from .ipc import lifetime
    # Blocks this process creates must not carry the parent's identity: a peer that
    # sees the parent's uid in a key takes the block for one the parent owns.
    lifetime.PROCESS_UID = _new_uid()
    for fn in _child_hooks:
        try:
            fn()
        except Exception:       # never let clean-up take the child down
            pass


def _new_uid():
    import uuid
    return uuid.uuid4().hex[:16]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# -- worker side --------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def protect_worker(fds, parent_pid) -> None:
    """Called first thing in a worker: our fds close on exec; die with the parent.

    ``parent_pid``: the pid that started us.  The death signal is armed, then the
    parent is checked: had it died before ``prctl``, we would have been re-parented
    already and would never get the signal.
    """
    for fd in fds:
        if fd is not None:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass
    if parent_pid is None or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        ok = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        ok = False
    ppid = os.getppid()
    if ok and ppid != parent_pid:
        # A sandboxed worker's parent is bubblewrap, whose parent is ours (bwrap runs no
        # pid namespace here, and dies with our parent itself).  Anything else, init or
        # a subreaper, means the parent is already gone: nobody to work for.  Where
        # /proc can't tell, the parent-death pipe still does (worker.py).
        grandparent = _parent_of(ppid)
        if grandparent is not None and grandparent != parent_pid:
            os._exit(0)


def _parent_of(pid):
    """The parent pid of ``pid`` from /proc, or None where it can't be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        return int(stat[stat.rindex(b")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return None
