"""Keeping our file descriptors off 0, 1 and 2 (stdin, stdout, stderr).

A process started with some of its standard fds closed (a daemon, ``prog >&- 2>&-``)
gets those numbers back from the next ``socketpair()`` or ``pipe()``.  Two things then
break: a child process gets its stdin, stdout and stderr ``dup2()``-ed onto 0-2 *after*
the fds it inherits through ``pass_fds`` are in place, so a passed fd numbered 0-2 is
replaced by a pipe (the worker read its channel from its own stdout); and anything
that writes to fd 1 or 2 in this process (a C library's message) would write into our
channel.  ``ProcessPoolExecutor`` has no such fds to lose.
"""
from __future__ import annotations

import fcntl
import os

__all__ = ["dup_above", "above", "close_all"]


def dup_above(fd: int) -> int:
    """A close-on-exec duplicate of ``fd`` numbered 3 or more."""
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)


def above(fds):
    """``(fds, made)``: ``fds`` with each one numbered 0-2 replaced by a duplicate above
    them; ``made`` lists those duplicates, which the caller closes once the child
    process started (it inherited its own copies)."""
    out, made = [], []
    try:
        for fd in fds:
            if 0 <= fd <= 2:
                fd = dup_above(fd)
                made.append(fd)
            out.append(fd)
    except BaseException:
        close_all(made)
        raise
    return tuple(out), made


def close_all(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
