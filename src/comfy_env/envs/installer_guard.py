"""Runs one installer command so that it dies with the process that started it.

Started by the builder as ``python -I installer_guard.py ALIVE_FD -- CMD...`` in a new
session (the guard leads its own process group, which uv and the build backends it
starts inherit).  The builder keeps the only write end of the pipe whose read end is
ALIVE_FD: when the builder dies, even by SIGKILL, the read returns EOF and the guard
kills its whole group.  ``PR_SET_PDEATHSIG`` alone would not do: it reaches only the
direct child, never uv's own children (the build backends that kept running and held
uv's locks when only the builder was killed), and it is Linux-only.

Run by path with ``-I``: it needs only the standard library and must not see the
builder's ``PYTHONPATH`` or working directory.
"""
import os
import signal
import subprocess
import sys
import threading


def _watch(fd):
    try:
        while os.read(fd, 64):
            pass
    except OSError:
        pass
    os.killpg(0, signal.SIGKILL)  # the builder is gone: take the installer and its children along


def main(argv):
    if len(argv) < 4 or argv[2] != "--":
        raise SystemExit("usage: installer_guard.py ALIVE_FD -- COMMAND...")
    alive_fd = int(argv[1])
    threading.Thread(target=_watch, args=(alive_fd,), daemon=True).start()
    try:
        proc = subprocess.Popen(argv[3:], stdin=subprocess.DEVNULL)
    except OSError as e:
        print(f"could not start {argv[3]!r}: {e}", flush=True)
        return 127
    rc = proc.wait()
    if rc < 0:  # report "killed by signal N" to the builder as such
        if -rc not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-rc, signal.SIG_DFL)
        os.kill(os.getpid(), -rc)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv))
