"""Lock files (pylock.comfy-env.toml), locked builds and exclude_newer.

Offline: the wheels are written by the tests; "a newer release appears" is a second
wheel dropped into the find-links directory.
"""
from __future__ import annotations

import os
import subprocess

import pytest

from comfy_env.envs import Env, EnvLockError, EnvSpecError, builder
from comfy_env.envs.lockfile import LOCK_FILENAME, read_lock
from test_envs_helpers import cache, demo_dep_wheel, demo_spec, uv_calls, uv_log, write_spec  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def wheels(tmp_path):
    d = tmp_path / "wheels"
    demo_dep_wheel(d, "1.0")
    return str(d)


def version_in(env):
    return subprocess.run([env.python, "-c", "import demo_dep; print(demo_dep.VERSION)"],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_every_build_resolves_once_and_records_its_lock(tmp_path, wheels, cache, uv_log):
    env = Env.from_toml(demo_spec(tmp_path / "p", wheels, "demo_dep>=1")).create(progress=False)
    calls = uv_calls(uv_log)
    assert [c.split()[:2] for c in calls] == [["venv", "--python"], ["pip", "compile"], ["pip", "install"]]
    recorded = os.path.join(env.path, LOCK_FILENAME)
    text = open(recorded).read()
    assert 'name = "demo-dep"' in text and 'version = "1.0"' in text and "sha256" in text
    assert "comfy-env-resolve-" not in text  # uv's header named our temporary files: replaced
    assert read_lock(recorded).python == "%d.%d" % tuple(env.interpreter.minor)


def test_a_locked_build_installs_exactly_the_lock_and_resolves_nothing(tmp_path, wheels, cache, uv_log, capsys):
    from comfy_env.cli import main

    spec = demo_spec(tmp_path / "p", wheels, "demo_dep>=1")
    assert main(["env", "lock", spec, "-q"]) == 0
    lock_path = os.path.join(os.path.dirname(spec), LOCK_FILENAME)
    assert capsys.readouterr().out.startswith(lock_path)
    demo_dep_wheel(wheels, "2.0")            # a newer release appears after locking
    before = len(uv_calls(uv_log))
    assert main(["env", "create", "-q", "--locked", spec]) == 0
    locked = Env.from_toml(spec)
    assert version_in(locked) == "1.0"       # the lock, not the newest release
    assert not [c for c in uv_calls(uv_log)[before:] if c.startswith("pip compile")]
    # The key hashes the lock: another cache ("machine") with the same lock gets the same key.
    other = Env.from_toml(spec, cache_dir=str(tmp_path / "other-machine"))
    assert other.key == locked.key
    # Without the lock the same spec is another env, resolved afresh: 2.0.
    os.unlink(lock_path)
    fresh = Env.from_toml(spec).create(progress=False)
    assert fresh.key != locked.key and version_in(fresh) == "2.0"


def test_a_spec_change_makes_the_lock_stale_with_a_clear_message(tmp_path, wheels, cache):
    spec = demo_spec(tmp_path / "p", wheels, "demo_dep>=1")
    Env.from_toml(spec).lock(progress=False)
    demo_spec(tmp_path / "p", wheels, "demo_dep>=1,<3")   # the author edits the requirements
    with pytest.raises(EnvLockError) as e:
        Env.from_toml(spec).create(progress=False, locked=True)
    msg = str(e.value)
    assert LOCK_FILENAME in msg and "the spec changed since it was written" in msg and "comfy-env env lock" in msg
    lines = []
    env = Env.from_toml(spec).create(progress=lines.append)    # unlocked: resolves, says why
    assert any("not using" in line and "the spec changed" in line for line in lines)
    assert version_in(env) == "1.0"


def test_locked_build_without_a_lock_fails_naming_what_to_do(tmp_path, wheels, cache, capsys):
    from comfy_env.cli import main

    spec = demo_spec(tmp_path / "p", wheels)
    with pytest.raises(EnvLockError, match="there is none. Run `comfy-env env lock` first"):
        Env.from_toml(spec).create(progress=False, locked=True)
    assert main(["env", "create", "--locked", spec]) == 1
    assert "comfy-env env lock" in capsys.readouterr().err
    assert not os.path.isdir(os.path.join(cache, "envs")) or os.listdir(os.path.join(cache, "envs")) == []


def test_a_lock_for_another_python_is_not_used(tmp_path, wheels, cache):
    spec = demo_spec(tmp_path / "p", wheels)
    path = Env.from_toml(spec).lock(progress=False)
    text = open(path).read().replace('comfy-env-python = "', 'comfy-env-python = "9')
    open(path, "w").write(text)
    with pytest.raises(EnvLockError, match=r"resolved for Python 93\.\d+, but the env uses Python"):
        Env.from_toml(spec).create(progress=False, locked=True)


def test_exclude_newer_reaches_the_resolver_and_the_key(tmp_path, wheels, cache, uv_log):
    spec = demo_spec(tmp_path / "p", wheels, extra='exclude_newer = "2025-06-01"')
    env = Env.from_toml(spec).create(progress=False)
    (compile_call,) = [c for c in uv_calls(uv_log) if c.startswith("pip compile")]
    assert "--exclude-newer 2025-06-01" in compile_call
    assert env.key != Env.from_toml(demo_spec(tmp_path / "q", wheels)).key
    # A TOML date works too; anything else is refused with the line.
    assert Env.from_toml(demo_spec(tmp_path / "d", wheels, extra="exclude_newer = 2025-06-01")).spec.exclude_newer \
        == "2025-06-01"
    p = write_spec(tmp_path / "bad", 'exclude_newer = "last tuesday"\n')
    with pytest.raises(EnvSpecError, match=r"line 1: exclude_newer = 'last tuesday' is not a date"):
        Env.from_toml(p)
    assert read_lock(os.path.join(env.path, LOCK_FILENAME)).inputs


def test_locking_a_spec_that_cannot_resolve_names_the_spec(tmp_path, wheels, cache):
    from comfy_env.envs import EnvBuildError

    spec = demo_spec(tmp_path / "p", wheels, "demo_dep==9.9")
    with pytest.raises(EnvBuildError) as e:
        Env.from_toml(spec).lock(progress=False)
    assert str(e.value).startswith(spec) and "unsatisfiable" in str(e.value)
    assert not os.path.exists(os.path.join(os.path.dirname(spec), LOCK_FILENAME))


def test_a_spec_without_requirements_has_nothing_to_lock(tmp_path, cache):
    p = write_spec(tmp_path, 'name = "empty"\n')
    with pytest.raises(EnvLockError, match="no requirements; there is nothing to lock"):
        Env.from_toml(p).lock(progress=False)
    assert Env.from_toml(p).create(progress=False, locked=True).is_built   # nothing to pin: fine
