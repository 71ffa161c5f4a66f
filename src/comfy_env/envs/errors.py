"""Exceptions raised while turning ``env=`` into a worker environment.

All of them derive from :class:`EnvError` so callers can catch "anything went wrong
with the environment" in one place; each message names the file, key or path that
was wrong and what to do about it.
"""
from __future__ import annotations

__all__ = [
    "EnvError",
    "EnvSpecError",
    "InterpreterNotFound",
    "EnvBuildError",
    "EnvNotBuilt",
    "UnsupportedInterpreter",
    "EnvLockError",
    "EnvInUse",
]

# Worker code (comfy_env + cloudpickle) runs on these Pythons and newer.
MIN_WORKER_PYTHON = (3, 10)


class EnvError(Exception):
    """Base class for every environment problem (bad spec, missing interpreter, failed build)."""


class EnvSpecError(EnvError, ValueError):
    """A ``comfy-env.toml`` (or an ``env=`` argument) is malformed.

    ``path`` is the offending file, ``line`` the 1-based line when known.
    """

    def __init__(self, message: str, path=None, line: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}"
            if line is not None:
                where += f", line {line}"
            where += ": "
        super().__init__(where + message)
        self.path = path
        self.line = line


class InterpreterNotFound(EnvError, FileNotFoundError):
    """No Python interpreter matches what was asked for (a path or a version)."""


class UnsupportedInterpreter(EnvError, ValueError):
    """The interpreter is older than the oldest Python a worker can run on (3.10)."""


class EnvBuildError(EnvError, RuntimeError):
    """Creating the venv or installing into it failed.

    ``output`` holds the installer's combined stdout/stderr, ``returncode`` its exit code.
    ``detail``: the installer's own explanation (its error lines), shown instead of the
    last lines of its output.
    """

    def __init__(self, message: str, output: str = "", returncode: int | None = None, *, detail=None):
        text = message
        if detail:
            text += "\n" + detail
        elif output:
            text += "\n--- installer output (last lines) ---\n" + _tail(output, 60)
        super().__init__(text)
        self.summary = message
        self.detail = detail
        self.output = output
        self.returncode = returncode


class EnvLockError(EnvError):
    """A locked build (``create(locked=True)``, ``env create --locked``) found no usable lock."""


class EnvInUse(EnvError):
    """An env cannot be removed: live workers are running in it."""


class EnvNotBuilt(EnvError):
    """An :class:`~comfy_env.envs.Env` was asked for its interpreter before it was built."""


def _tail(text: str, n: int) -> str:
    lines = text.rstrip("\n").splitlines()
    if len(lines) > n:
        lines = [f"... ({len(lines) - n} earlier lines cut)"] + lines[-n:]
    return "\n".join(lines)
