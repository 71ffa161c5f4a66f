"""Finding Python interpreters: inside an env directory, by version, and asking their version.

Two questions are answered here:

* "which interpreter lives in this directory?" — a venv, a conda env, or a pixi
  project/env (``env=`` given as a directory);
* "which interpreters of version X are on this machine?" — for the ``python = "3.12"``
  key of a ``comfy-env.toml``.  We look at the host's own interpreter, ``PATH``, pyenv's
  versions directory and the interpreters uv installed (``uv python install``; we read
  uv's install directory instead of running ``uv python find``, which fails outright
  when the first ``python3.X`` on PATH is a pyenv shim for another version).  With
  ``python_download = true`` a missing version is downloaded by ``uv python install``;
  otherwise nothing is downloaded and the error lists what was found.

Probing an interpreter means starting it once (~20 ms); answers are memoised per
(path, mtime, inode) in memory and in ``<cache root>/interpreters.json``, so a rebuilt
interpreter is probed again and a cache-hit ``create()`` in a fresh process starts none.
"""
from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass

from .errors import MIN_WORKER_PYTHON, EnvSpecError, InterpreterNotFound

__all__ = [
    "Interpreter",
    "interpreter_in",
    "probe",
    "host_interpreter",
    "find_interpreters",
    "find_interpreter_for_version",
    "download_interpreter",
    "uv_python_dir",
]

_IS_WINDOWS = sys.platform == "win32"

# Where an interpreter sits inside an environment directory, most specific first.
_RELATIVE_CANDIDATES = (
    ("Scripts", "python.exe") if _IS_WINDOWS else ("bin", "python"),
    ("python.exe",) if _IS_WINDOWS else ("bin", "python3"),
    (".pixi", "envs", "default", "python.exe") if _IS_WINDOWS
    else (".pixi", "envs", "default", "bin", "python"),
)


@dataclass(frozen=True)
class Interpreter:
    """A Python interpreter that we have actually run once."""

    path: str            # the path we were given (a venv's bin/python is kept, not resolved:
                         # resolving would escape the venv)
    version: tuple       # (major, minor, micro)
    executable: str      # sys.executable as the interpreter reports it
    base_executable: str  # the base interpreter behind a venv (itself otherwise)
    platform: str        # e.g. "linux-x86_64" plus the implementation, for cache keys

    @property
    def minor(self) -> tuple:
        return tuple(self.version[:2])

    @property
    def version_str(self) -> str:
        return ".".join(map(str, self.version))


_probe_cache: dict = {}
_probe_lock = threading.Lock()
_DISK_CACHE = "interpreters.json"


def _disk_cache_path():
    from .cache import cache_root

    try:
        return os.path.join(cache_root(), _DISK_CACHE)
    except Exception:  # no usable cache dir: memoise in memory only
        return None


def _disk_lookup(key):
    path = _disk_cache_path()
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            entry = json.load(f).get(key[0])
    except (OSError, ValueError):
        return None
    if not entry or entry.get("stamp") != [key[1], key[2]]:
        return None
    try:
        d = entry["interp"]
        return Interpreter(path=d["path"], version=tuple(d["version"]), executable=d["executable"],
                           base_executable=d["base_executable"], platform=d["platform"])
    except (KeyError, TypeError):
        return None


def _disk_store(key, interp):
    path = _disk_cache_path()
    if not path:
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            data = {}
        data[key[0]] = {"stamp": [key[1], key[2]], "interp": dict(interp.__dict__, version=list(interp.version))}
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # atomic: concurrent writers lose entries at worst, never corrupt
    except OSError:
        pass

# Runs on any Python >= 3.6; prints one line we parse below.
_PROBE_CODE = (
    "import sys, sysconfig, platform;"
    "print(repr((tuple(sys.version_info[:3]), sys.executable,"
    " getattr(sys, '_base_executable', sys.executable),"
    " sysconfig.get_platform() + '-' + platform.python_implementation())))"
)


def probe(path) -> Interpreter:
    """Run the interpreter at ``path`` once and report its version (memoised per path+mtime)."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise InterpreterNotFound(f"Python interpreter {path!r} does not exist ({e.strerror}).") from None
    key = (os.path.abspath(path), st.st_mtime_ns, st.st_ino)
    with _probe_lock:
        hit = _probe_cache.get(key)
    if hit is None:
        hit = _disk_lookup(key)
    if hit is not None:
        with _probe_lock:
            _probe_cache[key] = hit
        return hit
    try:
        out = subprocess.run(
            [path, "-I", "-c", _PROBE_CODE],
            capture_output=True, text=True, timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise InterpreterNotFound(f"{path!r} could not be run as a Python interpreter: {e}") from None
    if out.returncode != 0:
        raise InterpreterNotFound(
            f"{path!r} is not a working Python interpreter (exit code {out.returncode}): "
            f"{(out.stderr or out.stdout).strip()[-500:]}"
        )
    try:
        import ast

        version, executable, base, plat = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    except Exception:
        raise InterpreterNotFound(f"{path!r} did not answer like a Python interpreter: {out.stdout[-300:]!r}") from None
    interp = Interpreter(
        path=os.path.abspath(path), version=tuple(version), executable=executable,
        base_executable=base or executable, platform=plat,
    )
    with _probe_lock:
        _probe_cache[key] = interp
    _disk_store(key, interp)
    return interp


def interpreter_in(path) -> str:
    """The interpreter for ``env=path``: the file itself, or the one inside an env directory.

    Raises InterpreterNotFound naming the path and the places that were looked at.
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.exists(path):
        raise InterpreterNotFound(
            f"env path {path!r} does not exist (nor is it a command on PATH); expected a Python "
            "interpreter, an environment directory (venv, conda, pixi) or a comfy-env.toml."
        )
    if os.path.isfile(path):
        if not os.access(path, os.X_OK):
            raise InterpreterNotFound(f"env path {path!r} is a file but not executable; expected a Python interpreter or a comfy-env.toml.")
        return path
    looked = []
    for parts in _RELATIVE_CANDIDATES:
        cand = os.path.join(path, *parts)
        looked.append(os.path.join(*parts))
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    raise InterpreterNotFound(
        f"env directory {path!r} holds no Python interpreter (looked for {', '.join(looked)}) "
        "and no comfy-env.toml; pass a venv/conda/pixi env directory, an interpreter, or a comfy-env.toml."
    )


def host_interpreter() -> Interpreter:
    """The base interpreter behind the running one (a venv's python resolves to its base)."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    if not (base and os.path.isfile(base)):
        base = sys.executable
    # We *are* (a venv of) that interpreter: describe it without starting it.
    import platform
    import sysconfig

    return Interpreter(
        path=os.path.abspath(base), version=tuple(sys.version_info[:3]), executable=os.path.abspath(base),
        base_executable=os.path.abspath(base),
        platform=sysconfig.get_platform() + "-" + platform.python_implementation(),
    )


def _candidate_paths():
    seen = set()

    def add(p):
        if p and os.path.isfile(p) and os.access(p, os.X_OK):
            real = os.path.realpath(p)
            if real not in seen:
                seen.add(real)
                yield p

    yield from add(getattr(sys, "_base_executable", None))
    yield from add(sys.executable)
    names = ["python3", "python"] + [f"python3.{n}" for n in range(8, 20)]
    for d in os.environ.get("PATH", "").split(os.pathsep):
        # pyenv shims are shell scripts that fail for versions not "activated"; the real
        # interpreters are picked up from the versions directory below.
        if not d or os.path.basename(d.rstrip(os.sep)) == "shims":
            continue
        for n in names:
            yield from add(os.path.join(d, n + (".exe" if _IS_WINDOWS else "")))
    pyenv_root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    for p in sorted(glob.glob(os.path.join(pyenv_root, "versions", "*", "bin", "python3"))):
        yield from add(p)
    uv_dir = uv_python_dir()
    exe = ("python.exe",) if _IS_WINDOWS else ("bin", "python3")
    for p in sorted(glob.glob(os.path.join(uv_dir, "*", *exe)), reverse=True):  # newest first
        yield from add(p)


def uv_python_dir() -> str:
    """Where ``uv python install`` puts interpreters (uv's own rule)."""
    if os.environ.get("UV_PYTHON_INSTALL_DIR"):
        return os.path.abspath(os.path.expanduser(os.environ["UV_PYTHON_INSTALL_DIR"]))
    if _IS_WINDOWS:  # pragma: no cover
        return os.path.join(os.environ.get("APPDATA", os.path.expanduser("~")), "uv", "data", "python")
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(data, "uv", "python")


def find_interpreters(usable_only=False) -> list:
    """Every working Python interpreter we can find on this machine (host first).

    ``usable_only``: only those a worker can run on (>= 3.10), newest version first.
    """
    found = []
    for p in _candidate_paths():
        try:
            found.append(probe(p))
        except InterpreterNotFound:
            continue
    if usable_only:
        found = sorted((i for i in found if i.minor >= MIN_WORKER_PYTHON), key=lambda i: i.version, reverse=True)
    return found


_VERSION_RE = re.compile(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?\s*$")


def parse_version(text, where=None, line=None) -> tuple:
    m = _VERSION_RE.match(str(text))
    if not m:
        raise EnvSpecError(
            f"python = {text!r} is not a version; expected \"MAJOR.MINOR\" or \"MAJOR.MINOR.MICRO\" (e.g. \"3.12\").",
            where, line,
        )
    version = tuple(int(g) for g in m.groups() if g is not None)
    if version[:2] < MIN_WORKER_PYTHON:
        raise EnvSpecError(
            f"python = {text!r}: comfy-env workers need Python {'.'.join(map(str, MIN_WORKER_PYTHON))} or newer.",
            where, line,
        )
    return version


def find_interpreter_for_version(version: tuple, where=None, line=None, download_hint=False) -> Interpreter:
    """The first interpreter whose version starts with ``version`` (host preferred)."""
    host = host_interpreter()
    if tuple(host.version[: len(version)]) == tuple(version):
        return host
    for p in _candidate_paths():  # stop at the first match; list them all only on failure
        try:
            interp = probe(p)
        except InterpreterNotFound:
            continue
        if tuple(interp.version[: len(version)]) == tuple(version):
            return interp
    found = find_interpreters()
    listing = "\n".join(f"  {i.version_str}  {i.executable}" for i in found) or "  (none)"
    raise InterpreterNotFound(
        (f"{where}" + (f", line {line}" if line else "") + ": " if where else "")
        + f"no Python {'.'.join(map(str, version))} interpreter found on this machine. "
        f"Interpreters found:\n{listing}\n"
        + ("python_download = true: Env.create() (or `comfy-env env create`) downloads it with uv."
           if download_hint else
           "Install that version (e.g. `uv python install X.Y` or pyenv), set `python_download = true` "
           "in the spec, or change `python`.")
    )


def download_interpreter(version: tuple, report, where=None, line=None) -> Interpreter:
    """``uv python install`` the version, then find it like any other interpreter."""
    from .builder import _child_env, _run, find_uv
    from .errors import EnvBuildError

    want = ".".join(map(str, version))
    uv = find_uv()
    if not uv:
        raise InterpreterNotFound(f"{where}: python_download = true needs uv to download Python {want}, "
                                  "and uv was not found (install the `uv` package or set COMFY_ENV_UV).")
    try:
        _run([uv, "python", "install", want], report, f"downloading Python {want}", _child_env(), uv=uv)
    except EnvBuildError as e:
        raise InterpreterNotFound(
            (f"{where}" + (f", line {line}" if line else "") + ": " if where else "")
            + f"python_download = true, but uv could not download Python {want} (no network access, "
            f"or no such release?). Install it yourself (`uv python install {want}`, pyenv) or "
            f"change `python`.\n{e.detail or e.output}"
        ) from None
    return find_interpreter_for_version(version, where, line)
