"""The pytest session's workers: one executor per (environment, device, timeout).

Workers are reused across tests (a warm test costs one call, not a process start);
the executor itself replaces a worker that crashed or was killed for a timeout.
``call_timeout`` is per executor, so each distinct timeout gets its own executor;
only the most recently used few are kept, the others are shut down.

A worker in a *foreign* environment needs pytest (assertion rewriting, outcomes,
``pytest.raises``): the host's pytest and its dependency closure are shared into
it the way ``share = [...]`` shares packages (``envs.share``), placed after
comfy_env's bootstrap dir and before the env's own site-packages, so the worker
runs the very pytest the parent does (the two exchange pytest's report objects).
"""
from __future__ import annotations

import collections
import dataclasses
import os
import signal
import tempfile
import threading
import time

PREPARE = "comfy_env.testing.worker_side:prepare"
MAX_KEPT = 6            # executors kept alive at once (distinct env/device/timeout)


class SetupFailed(Exception):
    """The environment of an isolated test could not be prepared (the message says why)."""


@dataclasses.dataclass(frozen=True)
class Isolation:
    """Where and how one test runs (the ``isolated`` marker, merged with the options)."""

    env: object = None
    timeout: float = None
    device: str = None
    fresh: bool = False
    base_dir: str = None        # relative env paths are taken from the test file's dir

    def env_key(self):
        env = self.env
        if env is None:
            return None
        if isinstance(env, (str, os.PathLike)):
            return ("path", self.resolved_path())
        try:
            hash(env)
            return ("object", env)
        except TypeError:
            return ("repr", repr(env))

    def resolved_path(self):
        path = os.path.expanduser(os.fspath(self.env))
        if not os.path.isabs(path) and self.base_dir:
            path = os.path.join(self.base_dir, path)
        return os.path.abspath(path)

    def key(self):
        return (self.env_key(), self.device, self.timeout)


class Executors:
    """The executors of one pytest session (one per xdist worker: each has its own)."""

    def __init__(self):
        self._kept = collections.OrderedDict()       # key -> _Slot
        self._envs = {}                              # env key -> WorkerEnvironment or SetupFailed
        self._lock = threading.Lock()
        self._tmp = None
        self._slots = 0

    def slot(self, iso: Isolation, initargs):
        """A ``_Slot`` (executor + capture files) for ``iso``; fresh=True: a new one.
        ``initargs``: what ``worker_side.prepare`` gets in each new worker."""
        if iso.fresh:
            return self._new_slot(iso, initargs)
        key = iso.key()
        with self._lock:
            slot = self._kept.get(key)
            if slot is not None:
                self._kept.move_to_end(key)
                return slot
        slot = self._new_slot(iso, initargs)
        with self._lock:
            self._kept[key] = slot
            old = []
            while len(self._kept) > MAX_KEPT:
                old.append(self._kept.popitem(last=False)[1])
        for s in old:
            s.close(wait=False)
        return slot

    def _new_slot(self, iso, initargs):
        from ..executor import IsolatedExecutor

        wenv = self._worker_env(iso)
        try:
            ex = IsolatedExecutor(wenv, device=iso.device, call_timeout=iso.timeout,
                                  name=f"pytest-{wenv.label}", initializer=PREPARE,
                                  initargs=initargs)
        except Exception as exc:
            raise SetupFailed(f"could not create the executor for env {iso.env!r} "
                              f"(device={iso.device!r}): {type(exc).__name__}: {exc}") from exc
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="comfy_env-pytest-")
        self._slots += 1
        base = os.path.join(self._tmp, str(self._slots))
        return _Slot(ex, (base + ".out", base + ".err"))

    def _worker_env(self, iso):
        key = iso.env_key()
        cached = self._envs.get(key)
        if isinstance(cached, SetupFailed):
            raise cached
        if cached is not None:
            return cached
        try:
            wenv = _resolve(iso)
        except SetupFailed as exc:
            self._envs[key] = exc     # a broken spec fails every test of it at once, no rebuilds
            raise
        self._envs[key] = wenv
        return wenv

    def close(self):
        with self._lock:
            slots = list(self._kept.values())
            self._kept.clear()
        for s in slots:
            s.close(wait=True)
        if self._tmp is not None:
            import shutil
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


class _Slot:
    def __init__(self, executor, capture_paths):
        self.executor = executor
        self.capture_paths = capture_paths
        self.sent_sys_path = None      # the sys.path last sent (current-env workers)
        self._imported = ((), set())   # (worker pids, test modules those workers imported)
        self._views = ((), {})         # (worker pids, what they were told of namespaces)

    def needs_import(self, modname):
        """Whether the worker may not have imported test module ``modname`` yet (then the
        plugin imports it with a call of its own first, and says so: :meth:`imported`).
        A new worker (a crash, a timeout, a fresh slot) has imported nothing."""
        pids, modules = self._imported
        return not pids or pids != tuple(self.executor.worker_pids()) or modname not in modules

    def imported(self, modname):
        pids = tuple(self.executor.worker_pids())
        seen, modules = self._imported
        if pids != seen:
            modules = set()
        modules.add(modname)
        self._imported = (pids, modules)

    def namespace_views(self):
        """A copy of what this slot's worker was told of the test modules' and classes'
        namespaces (plugin._namespace_changes updates it); a new worker was told nothing."""
        pids, views = self._views
        if not pids or pids != tuple(self.executor.worker_pids()):
            return {}
        return {key: dict(view) for key, view in views.items()}

    def told(self, views):
        """The worker ran a test with ``views``' changes applied: they are what it knows
        now (its pids taken now: a worker started for that very test counts)."""
        self._views = (tuple(self.executor.worker_pids()), views)

    def kill_workers(self):
        """A wait interrupted in the parent (Ctrl-C, pytest-timeout): the worker must not
        go on running the abandoned test into the next one.  The executor reports the
        death to the abandoned future and starts a new worker for the next call."""
        for pid in self.executor.worker_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def read_capture(self):
        out = []
        for path in self.capture_paths:
            try:
                with open(path, "rb") as f:
                    out.append(f.read().decode("utf-8", "replace"))
            except OSError:
                out.append("")
        return out

    def close(self, wait=True):
        ex = self.executor
        ex.shutdown(wait=False, cancel_futures=True)
        if wait:
            deadline = time.monotonic() + 5
            while ex.worker_pids() and time.monotonic() < deadline:
                time.sleep(0.01)
            self.kill_workers()
            ex.shutdown(wait=True)
        for path in self.capture_paths:
            try:
                os.unlink(path)
            except OSError:
                pass


def _resolve(iso):
    from ..envs import EnvError, resolve_env

    env = iso.env
    if isinstance(env, (str, os.PathLike)):
        env = iso.resolved_path()
    try:
        wenv = resolve_env(env)
    except (EnvError, OSError, TypeError, ValueError) as exc:
        raise SetupFailed(f"the environment {iso.env!r} of this isolated test could not be "
                          f"prepared: {type(exc).__name__}: {exc}") from exc
    if wenv.is_current:
        return wenv
    return dataclasses.replace(wenv, pythonpath=tuple(wenv.pythonpath) + (_pytest_share_dir(env),))


def _pytest_share_dir(env):
    from ..envs import Env
    from ..envs.cache import cache_root
    from ..envs.share import share_dir

    root = env.cache_root if isinstance(env, Env) else cache_root()
    try:
        return share_dir(root, ["pytest"])
    except Exception as exc:
        raise SetupFailed(f"could not share the host's pytest with the worker's environment: "
                          f"{type(exc).__name__}: {exc}") from exc
