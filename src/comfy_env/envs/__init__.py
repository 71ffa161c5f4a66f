"""Where a worker runs: turning the ``env=`` argument into a WorkerEnvironment.

The executor only needs to know *how to start* a worker: which interpreter,
which extra ``PYTHONPATH`` entries (the bootstrap dir that exposes this very
``comfy_env`` package plus ``cloudpickle``, and shared host packages), and which
environment variables.  Everything about building environments lives in this
package; the executor calls :func:`resolve_env` and nothing else.

Modules: ``spec`` (comfy-env.toml), ``interpreters`` (finding/probing/downloading
Pythons), ``cache`` (directory layout, keys, listing, removal, pruning), ``builder``
(uv/pip, atomic rename, progress), ``installer_guard`` (installers die with the
builder), ``locks`` (the build lock and the in-use lease), ``lockfile`` (pylock files),
``bootstrap`` and ``share`` (what goes on a foreign worker's PYTHONPATH), ``env`` (the
public ``Env``), ``cli`` (``comfy-env env ...``), ``doctor`` (its part of ``comfy-env doctor``).
"""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field

from .errors import (
    MIN_WORKER_PYTHON, EnvBuildError, EnvError, EnvInUse, EnvLockError, EnvNotBuilt, EnvSpecError,
    InterpreterNotFound, UnsupportedInterpreter,
)

__all__ = [
    "WorkerEnvironment",
    "resolve_env",
    "Env",
    "EnvError",
    "EnvSpecError",
    "EnvBuildError",
    "EnvNotBuilt",
    "InterpreterNotFound",
    "UnsupportedInterpreter",
    "EnvLockError",
    "EnvInUse",
]


@dataclass(frozen=True)
class WorkerEnvironment:
    """Everything needed to start a worker process in some Python environment."""

    python: str                                   # interpreter to run
    python_version: tuple                         # (major, minor) of that interpreter
    env_vars: dict = field(default_factory=dict)  # extra environment for the worker
    pythonpath: tuple = ()                        # PYTHONPATH entries, first wins
    is_current: bool = False                      # True: same interpreter as the parent; the
                                                  # worker gets the parent's sys.path and cwd
    label: str = "local"                          # short name for logs and errors
    env_dir: str | None = None                    # a built env of the cache: held in use by workers
    rebuild: object = field(default=None, compare=False, repr=False)  # re-creates what was removed
    sandbox: object = None                        # a comfy_env.Sandbox: launch.py wraps the worker in it

    @property
    def start_cwd(self):
        """The directory a worker starts in.

        ``python -m`` puts the working directory first on ``sys.path``, before the
        standard library; a worker started in the parent's directory would import a
        ``nodes.py`` or ``utils/`` found there instead of the env's, or a ``queue.py`` or
        ``random.py`` instead of the standard library's while comfy_env itself imports
        (no worker of the current interpreter could start).  A foreign worker starts in
        the bootstrap dir (already on its path, holding only comfy_env and cloudpickle),
        a worker of the current interpreter in the directory comfy_env was imported from
        (already on the parent's path); both change to the parent's working directory
        once they run, before any code of the user's (``ipc.calls.adopt_import_paths``).
        """
        if self.is_current:
            import comfy_env
            return os.path.dirname(os.path.dirname(os.path.abspath(comfy_env.__file__)))
        return self.pythonpath[0] if self.pythonpath else os.path.dirname(self.python)

    def prepare_launch(self) -> tuple:
        """Called right before a worker starts; returns fds the worker must inherit.

        Re-creates the env (and its bootstrap/share dirs) if it was removed since the
        executor was made, and takes the env's in-use lease (see locks.py): the worker
        inherits the returned fd, so the env counts as in use exactly while a worker
        lives.  The caller closes its copies once the worker was started.
        """
        fds = []
        if self.env_dir:
            from .locks import hold_in_use

            fd = hold_in_use(self.env_dir)
            if fd is not None:
                fds.append(fd)
        try:
            if self.rebuild is not None and not (
                    os.path.exists(self.python) and all(os.path.isdir(p) for p in self.pythonpath)):
                self.rebuild()
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return tuple(fds)


from .env import Env  # noqa: E402  (Env refers back to WorkerEnvironment)


def resolve_env(env, *, progress=True) -> WorkerEnvironment:
    """Turn the ``env`` argument of IsolatedExecutor into a WorkerEnvironment.

    ``env`` may be None (this interpreter), a WorkerEnvironment (used as is), an
    :class:`Env`, or a path: a ``comfy-env.toml``, a directory holding one, a Python
    interpreter, or an environment directory (venv, conda, pixi).  An Env/toml is built
    first if it is not in the cache yet (its installer output goes to stderr).
    """
    if env is None:
        return WorkerEnvironment(
            python=sys.executable,
            python_version=tuple(sys.version_info[:2]),
            is_current=True,
            label="local",
        )
    if isinstance(env, WorkerEnvironment):
        return env
    if isinstance(env, Env):
        return env.worker_environment(progress=progress)
    if isinstance(env, (str, os.PathLike)):
        return _resolve_path(env, progress)
    raise TypeError(
        "env must be None, a path (interpreter, env directory or comfy-env.toml), "
        f"an Env or a WorkerEnvironment, not {type(env).__name__!r}"
    )


def _resolve_path(env, progress) -> WorkerEnvironment:
    from .bootstrap import bootstrap_dir
    from .cache import META_FILENAME, cache_root
    from .interpreters import interpreter_in, probe
    from .spec import SPEC_FILENAME

    path = os.path.abspath(os.path.expanduser(os.fspath(env)))
    if path.endswith(".toml") or (os.path.isdir(path) and os.path.isfile(os.path.join(path, SPEC_FILENAME))):
        return Env.from_toml(path).worker_environment(progress=progress)
    name = os.fspath(env)
    if not os.path.exists(path) and os.sep not in name and shutil.which(name):
        # A bare command name ("python3.12"), as a shell or subprocess would find it.
        path = os.path.abspath(shutil.which(name))
    python = interpreter_in(path)  # raises InterpreterNotFound naming the path
    interp = probe(python)
    if interp.minor < MIN_WORKER_PYTHON:
        raise UnsupportedInterpreter(
            f"{python!r} is Python {interp.version_str}; comfy-env workers need Python "
            f"{'.'.join(map(str, MIN_WORKER_PYTHON))} or newer. Use an environment with a newer Python."
        )
    root = path if os.path.isdir(path) else os.path.dirname(os.path.dirname(python))
    cache = cache_root()
    return WorkerEnvironment(
        python=python,
        python_version=interp.minor,
        env_vars={},
        pythonpath=(bootstrap_dir(cache),),
        is_current=False,
        label=os.path.basename(root.rstrip(os.sep)) or python,
        # A comfy-env env given by its directory is held in use like one given by its spec.
        env_dir=root if os.path.isfile(os.path.join(root, META_FILENAME)) else None,
        rebuild=_Bootstrap(cache),
    )


class _Bootstrap:
    """Re-creates the bootstrap dir if it was removed (``comfy-env env remove --all``)."""

    def __init__(self, root):
        self.root = root

    def __call__(self):
        from .bootstrap import bootstrap_dir

        bootstrap_dir(self.root)
