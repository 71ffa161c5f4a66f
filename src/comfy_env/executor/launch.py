"""Starting a worker process: the platform-specific part, kept apart from scheduling.

The worker is ``python -m comfy_env.worker --fd N`` where N is the worker's
end of a socketpair, inherited through ``pass_fds`` and nothing else (every
other fd of the parent is close-on-exec).  stdout and stderr are pipes that
the parent turns into log records.
"""
from __future__ import annotations

import os
import subprocess
import sys

import comfy_env

from ..envs import WorkerEnvironment

# The directory that holds the comfy_env package the parent runs: the worker
# of the current interpreter must import the very same code.
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(comfy_env.__file__)))


def worker_command(wenv: WorkerEnvironment, fd: int, alive_fd: int = None):
    cmd = [wenv.python]
    if not wenv.is_current:
        cmd.append("-s")            # no user site-packages in a foreign env
    cmd += ["-m", "comfy_env.worker", "--fd", str(fd)]
    if alive_fd is not None:
        cmd += ["--alive-fd", str(alive_fd)]
    return cmd


def worker_environ(wenv: WorkerEnvironment):
    env = dict(os.environ)
    if wenv.is_current:
        paths = [_PACKAGE_PARENT]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
    else:
        # A foreign env sees its own site-packages plus exactly what the
        # WorkerEnvironment lists (bootstrap dir, shared packages).
        paths = list(wenv.pythonpath)
        for var in ("PYTHONHOME", "VIRTUAL_ENV", "CONDA_PREFIX", "PYTHONSTARTUP"):
            env.pop(var, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["PYTHONUNBUFFERED"] = "1"       # print() lines reach the parent as they happen
    env.update({str(k): str(v) for k, v in (wenv.env_vars or {}).items()})
    return env


def spawn(wenv: WorkerEnvironment, child_fd: int, alive_fd: int = None) -> subprocess.Popen:
    """Start a worker.  ``alive_fd``: read end of a pipe whose write end only the parent holds."""
    fds = (child_fd,) if alive_fd is None else (child_fd, alive_fd)
    # envs/: rebuild an env removed under us; the worker inherits the env's in-use lease.
    lease = wenv.prepare_launch()
    try:
        cmd, env, popen = worker_command(wenv, child_fd, alive_fd), worker_environ(wenv), subprocess.Popen
        if wenv.sandbox is not None:    # bubblewrap in front of the command (sandbox.py)
            from ..sandbox import wrap
            cmd, env, popen = wrap(wenv.sandbox, wenv, cmd, env, _PACKAGE_PARENT)
        return popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=fds + lease,
            env=env,
            close_fds=True,
            cwd=wenv.start_cwd,     # not the parent's: it would come first on sys.path
            # Own process group: a Ctrl-C in the parent's terminal is the
            # parent's to handle; it then shuts its workers down.
            start_new_session=False,
        )
    except OSError as exc:
        from ..errors import WorkerStartError

        raise WorkerStartError(
            f"could not start a worker with interpreter {wenv.python!r} "
            f"(environment {wenv.label!r}): {exc}"
        ) from exc
    finally:
        for fd in lease:
            os.close(fd)


def parent_python():
    return tuple(sys.version_info[:2])
