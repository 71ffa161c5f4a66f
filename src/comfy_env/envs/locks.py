"""The two file locks of a built env: who builds it, and who is using it.

::

    envs/<key>.lock   exclusive while a builder (or a remover) works on envs/<key>;
                      the file is deleted when the holder is done, so a failed or
                      finished build leaves nothing behind
    envs/<key>.use    held *shared* by every live worker of the env (the fd is inherited
                      by the worker, so the kernel drops it when the worker dies, SIGKILL
                      included); a remover needs it exclusive.  Its mtime is the env's
                      last use.

Both are ``flock`` locks, written here rather than taken from ``filelock``: we need a
lock file that its holder deletes on release (filelock keeps it, hence stale
``.lock`` files), a shared mode, and a descriptor a child process can inherit.
Deleting a lock file is safe only with the check in :func:`_open_locked`: a waiter that
wins the lock on a file that was unlinked meanwhile lets go and tries again on the
new file.  Where ``fcntl`` does not exist (Windows) the build lock falls back to
filelock and the in-use lease is not kept.
"""
from __future__ import annotations

import contextlib
import errno
import os
import time

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["build_lock", "try_build_lock", "hold_in_use", "exclusive_use", "is_in_use", "last_use",
           "use_file", "lock_file"]


def lock_file(env_dir: str) -> str:
    return env_dir + ".lock"


def use_file(env_dir: str) -> str:
    return env_dir + ".use"


_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


def _open(path: str) -> int:
    """An fd of lock file ``path``, made if missing; read-only where the cache is (a
    shared or read-only mount): flock needs no write access, so an existing lock file
    still works there.  Raises OSError where it cannot be opened at all."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno not in _READ_ONLY:
            raise
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise e from None             # cannot be made here: say why


def _open_locked(path: str, mode: int, blocking: bool):
    """Open ``path`` and flock it; return the fd, or None if ``blocking`` is False and it is taken."""
    while True:
        fd = _open(path)
        try:
            fcntl.flock(fd, mode | (0 if blocking else fcntl.LOCK_NB))
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raise
        # The previous holder may have deleted the file between our open and our lock:
        # then we hold a lock nobody else can see; start over on the current file.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _unlock_and_delete(fd: int, path: str) -> None:
    try:
        os.unlink(path)  # while still held: nobody can be holding it after us
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def build_lock(env_dir: str, on_wait=None, heartbeat: float = 10.0):
    """Hold the build lock of ``env_dir``.  While waiting, ``on_wait(seconds_waited)`` is
    called at once and then every ``heartbeat`` seconds, so a waiting build says so."""
    path = lock_file(env_dir)
    if fcntl is None:  # pragma: no cover - Windows
        import filelock

        with filelock.FileLock(path):
            yield
        return
    fd = _open_locked(path, fcntl.LOCK_EX, blocking=False)
    if fd is None:
        t0 = time.monotonic()
        while fd is None:
            if on_wait is not None:
                on_wait(time.monotonic() - t0)
            deadline = time.monotonic() + heartbeat
            while fd is None and time.monotonic() < deadline:
                time.sleep(min(0.05, heartbeat))
                fd = _open_locked(path, fcntl.LOCK_EX, blocking=False)
    try:
        yield
    finally:
        _unlock_and_delete(fd, path)


@contextlib.contextmanager
def _try_exclusive(path: str, delete: bool):
    """Yield True holding ``path`` exclusively, or False (holding nothing) if someone else has it.

    ``delete``: remove the file when letting go of it."""
    fd = _open_locked(path, fcntl.LOCK_EX, blocking=False)
    if fd is None:
        yield False
        return
    try:
        yield True
    finally:
        if delete:
            _unlock_and_delete(fd, path)
        else:
            os.close(fd)


@contextlib.contextmanager
def try_build_lock(env_dir: str, delete: bool = True):
    """Yield True holding the build lock, or False (holding nothing) if someone else has it.

    ``delete=False`` keeps the lock file (a dry run that only asks)."""
    if fcntl is None:  # pragma: no cover - Windows
        with build_lock(env_dir):
            yield True
        return
    with _try_exclusive(lock_file(env_dir), delete) as ours:
        yield ours


def hold_in_use(env_dir: str):
    """Take a shared in-use lease on ``env_dir``; return its fd (for a worker to inherit) or None.

    Marks the env as used now (the file's mtime).  The caller passes the fd to the
    worker and closes its own copy: the lease then lives exactly as long as the worker.
    """
    if fcntl is None:  # pragma: no cover - Windows
        return None
    path = use_file(env_dir)
    try:
        fd = _open_locked(path, fcntl.LOCK_SH, blocking=True)
    except OSError as e:
        if e.errno not in _READ_ONLY:
            raise
        return None           # a read-only cache with no lease file: nobody can remove the env anyway
    try:
        os.utime(fd)
    except OSError:
        pass
    return fd


@contextlib.contextmanager
def exclusive_use(env_dir: str, delete: bool = False):
    """Yield True holding the in-use lock exclusively (nobody uses the env), else False.

    ``delete``: remove the file on the way out (the env itself was removed)."""
    if fcntl is None:  # pragma: no cover - Windows
        yield True
        return
    path = use_file(env_dir)
    if not os.path.exists(path):
        yield True
        return
    with _try_exclusive(path, delete) as free:
        yield free


def is_in_use(env_dir: str) -> bool:
    with exclusive_use(env_dir) as free:
        return not free


def last_use(env_dir: str) -> float | None:
    try:
        return os.stat(use_file(env_dir)).st_mtime
    except OSError:
        return None
