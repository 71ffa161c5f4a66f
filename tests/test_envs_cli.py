"""The command line beyond create/remove: --version, list, prune, doctor; and interpreters
found or downloaded by uv."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from comfy_env.envs import Env, InterpreterNotFound, builder, interpreters, locks
from comfy_env.envs.interpreters import find_interpreters
from test_envs_helpers import cache, demo_spec, uv_calls, uv_wrapper, wheels, write_spec  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(90)

SRC = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(builder.__file__))))


def _age(path, days):
    t = time.time() - days * 86400
    os.utime(path, (t, t))


def test_version_flag():
    from comfy_env import __version__

    out = subprocess.run([sys.executable, "-m", "comfy_env.cli", "--version"], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=SRC))
    assert out.returncode == 0 and out.stdout.strip() == f"comfy-env {__version__}"


def test_list_shows_size_age_and_last_use(tmp_path, wheels, cache, capsys):
    from comfy_env.cli import main

    env = Env.from_toml(demo_spec(tmp_path / "pack", wheels)).create(progress=False)
    assert main(["env", "list"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split()[:6] == ["KEY", "NAME", "PYTHON", "SIZE", "AGE", "USED"]
    assert row.startswith(env.key) and " pack " in row and "KiB" in row and "ago" in row
    fd = locks.hold_in_use(env.path)    # what a live worker holds
    try:
        assert main(["env", "list"]) == 0
        assert "in use" in capsys.readouterr().out
    finally:
        os.close(fd)


def test_prune_removes_unused_envs_and_what_dead_builds_left(tmp_path, wheels, cache, capsys):
    from comfy_env.cli import main

    old = Env.from_toml(demo_spec(tmp_path / "old", wheels)).create(progress=False)
    busy = Env.from_toml(demo_spec(tmp_path / "busy", wheels, extra='exclude_newer = "2030-01-01"')).create(
        progress=False)
    fresh = Env.from_toml(demo_spec(tmp_path / "fresh", wheels, extra='exclude_newer = "2031-01-01"')).create(
        progress=False)
    for env in (old, busy):   # built and last used 40 days ago
        os.close(locks.hold_in_use(env.path))
        _age(locks.use_file(env.path), 40)
        meta_path = os.path.join(env.path, "comfy-env-env.json")
        meta = json.load(open(meta_path))
        meta["created"] -= 40 * 86400
        json.dump(meta, open(meta_path, "w"))
    envs = os.path.join(cache, "envs")
    staging = os.path.join(envs, f".tmp-{'0' * 16}-1-dead")       # a killed builder's remains
    os.makedirs(os.path.join(staging, "bin"))
    open(os.path.join(envs, "f" * 16 + ".lock"), "w").close()       # a lock file an older version left
    held = locks.hold_in_use(busy.path)                              # a live worker
    try:
        assert main(["env", "prune", "--days", "30", "--dry-run"]) == 0
        assert "would remove environment: " + old.path in capsys.readouterr().out and old.is_built
        assert main(["env", "prune", "--days", "30"]) == 0
        out = capsys.readouterr().out
    finally:
        os.close(held)
    assert "removed environment: " + old.path in out and not old.is_built
    assert busy.is_built and fresh.is_built           # in use / recently used
    assert "removed unfinished build: " + staging in out and not os.path.exists(staging)
    assert "removed stale lock" in out and not os.path.exists(os.path.join(envs, "f" * 16 + ".lock"))


def test_doctor_reports_uv_cache_and_usable_interpreters_and_rejects_a_bad_env(cache):
    out = subprocess.run([sys.executable, "-m", "comfy_env.cli", "doctor", "--no-live"], capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=SRC), timeout=60)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"uv: uv " in text and builder.find_uv() in text
    assert f"cache: {cache}" in text
    listed = [line.split() for line in text.splitlines() if line.startswith("  ") and "/" in line]
    versions = [tuple(map(int, v.split("."))) for v, _path in listed[:len(find_interpreters(usable_only=True))]]
    assert versions and versions == sorted(versions, reverse=True) and min(versions) >= (3, 10)
    bad = subprocess.run([sys.executable, "-m", "comfy_env.cli", "doctor", "--env", "/no/such/env"],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=SRC), timeout=60)
    assert bad.returncode == 1 and "comfy-env: error: --env '/no/such/env'" in bad.stderr and bad.stdout == ""


@pytest.fixture
def other():
    """An interpreter of another minor version than the host's (found before only_uv_pythons hides it)."""
    for i in find_interpreters(usable_only=True):
        if i.minor != sys.version_info[:2]:
            return i
    pytest.skip("no second Python (>= 3.10) on this machine")


@pytest.fixture
def only_uv_pythons(other, tmp_path, monkeypatch):
    """Hide every interpreter but the host's and those in a fresh uv python dir."""
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setenv("PYENV_ROOT", str(tmp_path / "no-pyenv"))
    uv_dir = tmp_path / "uv-pythons"
    uv_dir.mkdir()
    monkeypatch.setenv("UV_PYTHON_INSTALL_DIR", str(uv_dir))
    return uv_dir


def test_interpreters_installed_by_uv_are_found(tmp_path, cache, other, only_uv_pythons):
    want = ".".join(map(str, other.minor))
    assert want not in {".".join(map(str, i.minor)) for i in find_interpreters()}
    bin_dir = only_uv_pythons / f"cpython-{other.version_str}-linux-x86_64-gnu" / "bin"
    bin_dir.mkdir(parents=True)
    os.symlink(other.executable, bin_dir / "python3")
    found = interpreters.find_interpreter_for_version(other.minor)
    assert found.path == str(bin_dir / "python3") and found.minor == other.minor


def test_python_download_installs_a_missing_interpreter_with_uv(tmp_path, wheels, cache, other, only_uv_pythons,
                                                                monkeypatch):
    want = "%d.%d" % other.minor
    wrapper, log = uv_wrapper(tmp_path, builder.find_uv())
    monkeypatch.setenv(builder.UV_ENV_VAR, wrapper)
    monkeypatch.setenv("UV_WRAPPER_PYTHON", other.executable)   # what the "download" installs
    spec = demo_spec(tmp_path / "p", wheels, extra=f'python = "{want}"\npython_download = true')
    env = Env.from_toml(spec)
    with pytest.raises(InterpreterNotFound, match="python_download = true: Env.create"):
        env.path                          # a property never downloads
    lines = []
    env.create(progress=lines.append)
    assert f"python install {want}" in uv_calls(log)
    assert env.interpreter.minor == other.minor and str(only_uv_pythons) in env.interpreter.path
    out = subprocess.run([env.python, "-c", "import sys, demo_dep; print(sys.version_info[:2])"],
                         capture_output=True, text=True)
    assert out.stdout.strip() == str(other.minor)
    # Without python_download the same spec fails and says how to get the interpreter.
    p = write_spec(tmp_path / "q", f'python = "{want}.99"\n')
    with pytest.raises(InterpreterNotFound, match="set `python_download = true`"):
        Env.from_toml(p).create(progress=False)


def test_python_download_without_network_is_a_clear_error(tmp_path, cache, other, only_uv_pythons, monkeypatch):
    monkeypatch.setenv("UV_OFFLINE", "1")
    p = write_spec(tmp_path, f'python = "{other.minor[0]}.{other.minor[1]}"\npython_download = true\n')
    with pytest.raises(InterpreterNotFound) as e:
        Env.from_toml(p).create(progress=False)
    msg = str(e.value)
    assert f"{p}, line 1: python_download = true, but uv could not download Python" in msg
    assert "Network connectivity is disabled" in msg   # uv's own explanation
