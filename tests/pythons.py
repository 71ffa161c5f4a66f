"""Every supported Python minor version, for tests that run real user scripts.

What touches interpreter start-up, exit, threads or pickling is tested on 3.10-3.13.
Each version gets a small venv (cached outside the repository, built once per machine
with uv) holding comfy_env's runtime dependencies; comfy_env itself comes from this
checkout's ``src`` through PYTHONPATH, so a script runs exactly the code under test.

    @ALL_PYTHONS
    def test_x(pyver, tmp_path):
        proc = run_script(pyver, "print('hi')", cwd=tmp_path)
"""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import sys

import pytest
from filelock import FileLock

VERSIONS = ("3.10", "3.11", "3.12", "3.13")
DEPENDENCIES = ("cloudpickle>=3.0", "numpy>=1.23", "uv>=0.4", "filelock>=3.12", "platformdirs>=3",
                "tomli>=2.0; python_version < '3.11'")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(REPO, "src")
TESTS = os.path.join(REPO, "tests")

ALL_PYTHONS = pytest.mark.parametrize("pyver", VERSIONS)


def _version_of(python):
    try:
        out = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def find_interpreter(ver):
    """A base interpreter of Python ``ver`` on this machine, or None."""
    candidates = [shutil.which(f"python{ver}")]
    # pyenv's shims answer only for the selected versions; its install dirs hold all.
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    candidates += sorted(glob.glob(os.path.join(root, "versions", f"{ver}.*", "bin", f"python{ver}")))
    candidates += [f"/usr/bin/python{ver}", f"/usr/local/bin/python{ver}"]
    for c in candidates:
        if c and os.path.exists(c) and _version_of(c) == ver:
            return c
    return None


def _cache_root():
    return os.environ.get("COMFY_ENV_TEST_PYTHONS",
                          os.path.join(os.path.expanduser("~"), ".cache", "comfy-env-tests", "pythons"))


def user_python(ver):
    """The venv interpreter of Python ``ver`` with comfy_env's dependencies; skips if none."""
    base = find_interpreter(ver)
    if base is None:
        pytest.skip(f"no Python {ver} interpreter on this machine")
    key = hashlib.sha256(repr((os.path.realpath(base), DEPENDENCIES)).encode()).hexdigest()[:12]
    root = _cache_root()
    os.makedirs(root, exist_ok=True)
    venv = os.path.join(root, f"py{ver}-{key}")
    python = os.path.join(venv, "bin", "python")
    with FileLock(venv + ".lock", timeout=600):
        if not os.path.exists(os.path.join(venv, ".complete")):
            from uv import find_uv_bin

            uv = find_uv_bin()
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([uv, "venv", "-q", "-p", base, venv], check=True, timeout=300)
            subprocess.run([uv, "pip", "install", "-q", "-p", python, *DEPENDENCIES],
                           check=True, timeout=600)
            open(os.path.join(venv, ".complete"), "w").close()
    return python


def script_env(extra=None):
    """The environment a user's script runs with: this checkout's comfy_env, nothing of pytest's."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST_", "COV_", "PYTHON")) and k != "VIRTUAL_ENV"}
    env["PYTHONPATH"] = SRC
    env.update(extra or {})
    return env


def run_script(ver, code, *, cwd, timeout=60, args=(), env=None, python=None, flags=()):
    """Run ``code`` (a script's text) as ``python [flags] script.py [args]`` under Python ``ver``.

    Returns the CompletedProcess; a script still running at ``timeout`` fails the
    test with its output so far (the hang is the finding, not a pytest timeout).
    """
    python = python or user_python(ver)
    path = os.path.join(str(cwd), "user_script.py")
    with open(path, "w") as f:
        f.write(code)
    try:
        return subprocess.run([python, *flags, path, *args], cwd=str(cwd), env=script_env(env),
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the script did not exit within {timeout} s on Python {ver}\n"
                    f"stdout:\n{exc.stdout}\nstderr:\n{exc.stderr}")


if __name__ == "__main__":          # build the cache ahead of a test run
    for v in VERSIONS:
        try:
            print(v, user_python(v))
        except BaseException as e:    # pytest.skip raises a BaseException subclass
            print(v, "skipped:", e, file=sys.stderr)
