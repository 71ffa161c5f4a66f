"""``Env``: an environment declared by a ``comfy-env.toml``, built on demand and cached.

::

    env = Env.from_toml("nodes/sam3d/comfy-env.toml")
    env.path        # where it lives (or will): <cache>/envs/<name>-<key>
    env.create()    # builds once; later calls (any process) just find it
    env.python      # its interpreter; raises EnvNotBuilt before create()

``IsolatedExecutor(env=env)`` (or ``env="path/to/comfy-env.toml"``) calls
``create()`` itself, so explicit creation is only needed to build ahead of time.
``.python`` does not build on demand on purpose: a property that may run an installer
for minutes would surprise; ``create()`` says that it does.
"""
from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING, Any, Callable

from . import cache
from .builder import build_env, env_python
from .errors import EnvNotBuilt, EnvSpecError
from .interpreters import find_interpreter_for_version, host_interpreter
from .spec import EnvSpec, load_spec, spec_from_dict

if TYPE_CHECKING:
    from . import WorkerEnvironment

__all__ = ["Env"]


class Env:
    """A comfy-env environment: a spec plus the cache it is built in.

    Made with :meth:`from_toml` or :meth:`from_dict`; pass it as
    ``IsolatedExecutor(env=...)``, which builds it if needed.  Nothing is built
    or probed until a property or method needs it.
    """

    def __init__(self, spec: EnvSpec, *, cache_dir: str | os.PathLike | None = None) -> None:
        if not isinstance(spec, EnvSpec):
            raise TypeError(f"Env() takes an EnvSpec; use Env.from_toml(path) or Env.from_dict({{...}}), "
                            f"not {type(spec).__name__}")
        self.spec = spec
        self.cache_root = cache.cache_root(cache_dir)
        self._interp = None
        self._key = None

    @classmethod
    def from_toml(cls, path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> "Env":
        """Load a ``comfy-env.toml`` (or a directory holding one).

        ``cache_dir``: where built environments live (default:
        ``$COMFY_ENV_CACHE_DIR``, else the user cache directory).  Raises ``EnvSpecError`` naming
        the file and line of a malformed spec.
        """
        return cls(load_spec(path), cache_dir=cache_dir)

    @classmethod
    def from_dict(cls, data: dict, *, base_dir: str | os.PathLike | None = None,
                  cache_dir: str | os.PathLike | None = None) -> "Env":
        """Build from a dict with the toml's keys; relative paths are taken from ``base_dir``."""
        source = os.path.join(os.path.abspath(base_dir), "<dict>") if base_dir else None
        return cls(spec_from_dict(dict(data), source=source), cache_dir=cache_dir)

    # -- identity -------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The spec's ``name``."""
        return self.spec.name

    @property
    def interpreter(self):
        """The base interpreter the env is (to be) built from; found on first use."""
        if self._interp is None:
            if self.spec.python is None:
                interp = host_interpreter()
            else:
                interp = find_interpreter_for_version(self.spec.python, self.spec.source, self.spec.python_line)
            if self.spec.share and interp.minor != host_interpreter().minor:
                raise EnvSpecError(
                    f"share = {list(self.spec.share)} needs the env's Python to match the host's "
                    f"({'.'.join(map(str, host_interpreter().minor))}), but the env uses "
                    f"{interp.version_str}: shared packages are compiled for the host's Python. "
                    "Drop `share` or set `python` to the host's version.",
                    self.spec.source, self.spec.python_line,
                )
            self._interp = interp
        return self._interp

    @property
    def key(self) -> str:
        """The cache key: a hash of the spec and the base interpreter."""
        if self._key is None:
            self._key = cache.env_key(self.spec, self.interpreter)
        return self._key

    @property
    def path(self) -> str:
        """The env directory (it exists only once built)."""
        return os.path.join(cache.envs_dir(self.cache_root), f"{self.spec.name}-{self.key}")

    @property
    def is_built(self) -> bool:
        """Whether the env is in the cache, complete."""
        return os.path.isfile(os.path.join(self.path, cache.META_FILENAME))

    @property
    def python(self) -> str:
        """The env's interpreter.  Raises EnvNotBuilt if ``create()`` has not run yet."""
        if not self.is_built:
            where = self.spec.source or "this Env"
            raise EnvNotBuilt(
                f"environment {self.name!r} ({where}) is not built yet; call Env.create() "
                f"or run `comfy-env env create {self.spec.source or '<toml>'}`."
            )
        return env_python(self.path)

    @property
    def python_version(self) -> tuple:
        """``(major, minor)`` of the env's Python."""
        return self.interpreter.minor

    @property
    def environment(self) -> dict:
        """The spec's extra environment variables for the workers (a copy)."""
        return dict(self.spec.environment)

    # -- lifecycle ------------------------------------------------------------------
    def create(self, progress: bool | Callable[[str], Any] = True) -> "Env":
        """Build the env unless it is already in the cache.  Returns self.

        ``progress``: True prints the installer's output to stderr line by line; False
        only logs it (logger ``comfy_env.envs``, DEBUG); a callable gets each line.
        Raises EnvBuildError (with the installer's output) if installing fails.
        """
        build_env(self.path, self.spec, self.interpreter, progress=progress, label=self.name, key=self.key)
        return self

    def remove(self) -> bool:
        """Delete the built env (if any).  Returns whether something was removed."""
        import filelock

        path = self.path
        with filelock.FileLock(path + ".lock"):
            if not os.path.exists(path):
                return False
            shutil.rmtree(path)
            return True

    def installed(self) -> list:
        """Normalised names of the distributions the env installed itself (read at build time)."""
        meta = cache.read_meta(self.path) or {}
        return list(meta.get("installed", ()))

    def worker_environment(self, progress: bool | Callable[[str], Any] = True) -> WorkerEnvironment:
        """Build if needed and describe how to start a worker in this env."""
        from . import WorkerEnvironment
        from .bootstrap import bootstrap_dir
        from .share import share_dir

        self.create(progress=progress)
        pythonpath = [bootstrap_dir(self.cache_root)]
        shared = share_dir(self.cache_root, self.spec.share, exclude=self.installed(), source=self.spec.source)
        if shared:
            pythonpath.append(shared)
        return WorkerEnvironment(
            python=env_python(self.path),
            python_version=self.interpreter.minor,
            env_vars=dict(self.spec.environment),
            pythonpath=tuple(pythonpath),
            is_current=False,
            label=self.name,
        )

    def __repr__(self) -> str:
        return f"Env(name={self.name!r}, source={self.spec.source!r})"
