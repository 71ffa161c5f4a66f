"""``Env``: an environment declared by a ``comfy-env.toml``, built on demand and cached.

::

    env = Env.from_toml("nodes/sam3d/comfy-env.toml")
    env.path        # where it lives (or will): <cache>/envs/<key>
    env.create()    # builds once; later calls (any process) just find it
    env.python      # its interpreter; raises EnvNotBuilt before create()
    env.lock()      # resolve and write pylock.comfy-env.toml next to the toml

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
from .errors import EnvBuildError, EnvLockError, EnvNotBuilt, EnvSpecError, InterpreterNotFound
from .interpreters import download_interpreter, find_interpreter_for_version, host_interpreter
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
        self._lock = None          # (LockFile or None, why a lock next to the spec is not used)
        self.built_here = False    # whether the last create() built it (not the cache, not another process)

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
        """The base interpreter the env is (to be) built from; found on first use (never downloaded:
        with ``python_download = true``, ``create()`` downloads a missing one)."""
        return self._find_interpreter()

    def _find_interpreter(self, download_report=None):
        if self._interp is None:
            if self.spec.python is None:
                interp = host_interpreter()
            else:
                try:
                    interp = find_interpreter_for_version(self.spec.python, self.spec.source, self.spec.python_line,
                                                          download_hint=self.spec.python_download)
                except InterpreterNotFound:
                    if not (self.spec.python_download and download_report is not None):
                        raise
                    interp = download_interpreter(self.spec.python, download_report, self.spec.source,
                                                  self.spec.python_line)
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
    def lock_path(self) -> str | None:
        """Where this spec's lock file lives (``pylock.comfy-env.toml`` next to the toml)."""
        from .lockfile import spec_lock_path

        return spec_lock_path(self.spec)

    def _spec_lock(self):
        """(fresh LockFile or None, reason a lock file next to the spec is not used, or None)."""
        if self._lock is None:
            from .lockfile import read_lock, stale_reason

            lock = read_lock(self.lock_path) if self.lock_path and self.spec.requirements else None
            why = stale_reason(lock, self.spec, self.interpreter) if lock else None
            self._lock = (None, why) if why else (lock, None)
        return self._lock

    @property
    def key(self) -> str:
        """The cache key: a hash of the spec and the base interpreter."""
        if self._key is None:
            self._key = cache.env_key(self.spec, self.interpreter, self._spec_lock()[0])
        return self._key

    @property
    def path(self) -> str:
        """The env directory (it exists only once built)."""
        return os.path.join(cache.envs_dir(self.cache_root), self.key)

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
    def create(self, progress: bool | Callable[[str], Any] = True, *, locked: bool = False) -> "Env":
        """Build the env unless it is already in the cache.  Returns self.

        ``progress``: True prints the installer's output (and a heartbeat line while it
        is silent) to stderr; False only logs it (logger ``comfy_env.envs``, DEBUG); a
        callable gets each line.  ``locked``: install exactly what the lock next to the
        spec lists; raise EnvLockError if there is none or it is stale.
        Raises EnvBuildError (naming the spec and the installer's explanation) if
        installing fails.
        """
        from .builder import _make_reporter

        report = _make_reporter(progress, self.name)
        self._find_interpreter(download_report=report)
        lock, why_not = self._spec_lock()
        if locked and self.spec.requirements and lock is None:
            if why_not:
                raise EnvLockError(f"{self.lock_path} cannot be used: {why_not}. Run `comfy-env env lock "
                                   f"{os.path.dirname(self.spec.source)}` to update it.")
            raise EnvLockError(f"{self.spec.source or 'this Env'}: a locked build needs a lock file "
                               f"({self.lock_path or 'next to the spec'}), and there is none. Run `comfy-env "
                               "env lock` first.")
        self.built_here = False
        if self.is_built:
            return self
        if why_not:
            report(f"not using {self.lock_path}: {why_not}; resolving the spec instead "
                   "(`comfy-env env lock` updates the lock)")
        if self.spec.share:
            from .share import check_share_roots

            check_share_roots(self.spec)   # before building: a build that cannot be used is not kept
        # False when another process built it while this one waited for its lock.
        self.built_here = build_env(self.path, self.spec, self.interpreter, progress=report, label=self.name,
                                    key=self.key, lock=lock)
        return self

    def lock(self, progress=True) -> str:
        """Resolve the spec and write its lock next to the toml; returns the lock's path.

        Later builds install exactly what the lock lists (and resolve nothing) until the
        spec changes.  Needs uv.
        """
        import tempfile

        from .builder import _child_env, _make_reporter, find_uv, resolve_lock
        from .lockfile import write_lock

        if not self.spec.source or self.spec.source.endswith("<dict>"):
            raise EnvLockError("only an Env read from a comfy-env.toml can be locked (the lock lives next to it).")
        if not self.spec.requirements:
            raise EnvLockError(f"{self.spec.source}: the spec has no requirements; there is nothing to lock.")
        uv = find_uv()
        if not uv:
            raise EnvLockError("writing a lock needs uv (install the `uv` package or set COMFY_ENV_UV).")
        report = _make_reporter(progress, self.name)
        interp = self._find_interpreter(download_report=report)
        # Resolve for the env's interpreter without building the env: a throwaway venv.
        work = tempfile.mkdtemp(prefix="comfy-env-lock-")
        try:
            from .builder import _run

            venv = os.path.join(work, "venv")
            _run([uv, "venv", "--quiet", "--python", interp.executable, "--no-project", "--no-python-downloads",
                  venv], report, f"preparing to resolve {self.name}", _child_env(), uv=uv)
            try:
                text = resolve_lock(uv, env_python(venv), self.spec, report, self.name, _child_env())
            except EnvBuildError as e:
                raise EnvBuildError(f"{self.spec.source}: {e.summary}", e.output, e.returncode,
                                    detail=e.detail) from None
            write_lock(self.lock_path, text, self.spec, interp)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        self._lock = self._key = None
        return self.lock_path

    def remove(self) -> bool:
        """Delete the built env (if any).  Returns whether something was removed.

        Raises EnvInUse while workers run in it; waits for a build of it in progress.
        """
        return cache.remove_env(self.path)

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
            env_dir=self.path,
            rebuild=_Rebuild(self, progress),
            sandbox=self.spec.sandbox,
        )

    def __repr__(self) -> str:
        return f"Env(name={self.name!r}, source={self.spec.source!r})"


class _Rebuild:
    """Re-creates an env (and its bootstrap/share dirs) removed under a live executor."""

    def __init__(self, env, progress):
        self.env, self.progress = env, progress

    def __call__(self):
        self.env.worker_environment(progress=self.progress)
