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
import re
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
    return dataclasses.replace(wenv, pythonpath=tuple(wenv.pythonpath) + (_pytest_share_dir(env, wenv),))


def _pytest_share_dir(env, wenv):
    from ..envs import Env
    from ..envs.cache import cache_root
    from ..envs.share import share_dir

    root = env.cache_root if isinstance(env, Env) else cache_root()
    try:
        extra = _pytest_needs_there(wenv)
        return share_dir(root, ["pytest", *extra])
    except SetupFailed:
        raise
    except Exception as exc:
        raise SetupFailed(f"could not share the host's pytest with the worker's environment: "
                          f"{type(exc).__name__}: {exc}") from exc


def _pytest_needs_there(wenv):
    """The host distributions to share besides pytest's closure: the dependencies that
    pytest (and its dependencies) need on the env's Python only.  The closure's markers
    are evaluated for the host's Python: on a host of 3.11+ it leaves out
    ``exceptiongroup`` and ``tomli``, which pytest imports on 3.10.  Each is shared
    from the host where the host has it; one that neither the host nor the env has
    fails the env's tests at once (SetupFailed), naming what to install."""
    import importlib.metadata as md
    import sys

    from ..envs.share import share_closure
    from ..envs.spec import normalize_dist_name

    try:
        from packaging.markers import Marker
    except ImportError:
        return []
    version = tuple(wenv.python_version)[:2]
    if version == tuple(sys.version_info[:2]):
        return []
    where = {"python_version": "%d.%d" % version, "python_full_version": "%d.%d.0" % version,
             "extra": ""}
    closure = share_closure(["pytest"])
    have = {normalize_dist_name(d.metadata["Name"]) for d in closure}
    needed = {}
    for dist in closure:
        for req in dist.requires or ():
            name, _, marker = req.partition(";")
            name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", name)
            if not name or not marker.strip() or "extra" in marker:
                continue
            try:
                applies = Marker(marker.strip()).evaluate(where)
            except Exception:
                continue
            if applies and normalize_dist_name(name.group(1)) not in have:
                needed[normalize_dist_name(name.group(1))] = req.strip()
    shared, missing = [], []
    for name, req in needed.items():
        try:
            md.distribution(name)
            shared.append(name)
        except md.PackageNotFoundError:
            missing.append((name, req))
    if missing and not _env_has([n for n, _ in missing], wenv):
        names = " ".join(n for n, _ in missing)
        listed = " and ".join(n for n, _ in missing)
        raise SetupFailed(
            f"the host's pytest {md.version('pytest')} needs {', '.join(repr(r) for _, r in missing)} "
            f"on the environment's Python {'%d.%d' % version}, and neither the host (Python "
            f"{sys.version_info[0]}.{sys.version_info[1]}, where pytest does not need "
            f"{'it' if len(missing) == 1 else 'them'}) nor the environment has "
            f"{'it' if len(missing) == 1 else 'them'}: add {listed} to the environment's "
            f"requirements (or pytest itself), or install {'it' if len(missing) == 1 else 'them'} "
            f"into {wenv.python} (`{wenv.python} -m pip install {names}`)")
    return shared


def _env_has(names, wenv):
    """Whether the env's interpreter finds all of the distributions ``names``."""
    import subprocess

    code = ("import importlib.metadata as m, sys\n"
            "for n in sys.argv[1:]: m.distribution(n)\n")
    env = dict(os.environ)
    env.update(wenv.env_vars or {})
    env["PYTHONPATH"] = os.pathsep.join(wenv.pythonpath)
    try:
        return subprocess.run([wenv.python, "-c", code, *names], env=env, timeout=60,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
