"""Building envs: what a user sees while it runs, when it fails, and what it leaves behind.

Offline: the packages are wheels written by the tests (test_envs_helpers.py).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from comfy_env.envs import Env, EnvBuildError, EnvSpecError, builder
from test_envs_helpers import cache, demo_spec, uv_calls, uv_log, wheels, write_spec  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(90)

SRC = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(builder.__file__))))


def entries(cache):
    d = os.path.join(cache, "envs")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def _alive(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()   # a zombie has exited already
    except FileNotFoundError:
        return False


# -- bug 2: share is checked before building ------------------------------------------------

def test_share_of_a_missing_host_package_fails_before_anything_is_built(tmp_path, wheels, cache, capsys):
    from comfy_env.cli import main

    spec = demo_spec(tmp_path / "p", wheels, extra='share = ["surely-not-installed-pkg"]')
    assert main(["env", "create", "-q", spec]) == 1
    err = capsys.readouterr().err
    assert "'surely-not-installed-pkg' is not installed in the host" in err and f"{spec}, line 4" in err
    assert entries(cache) == []  # nothing built, nothing cached


# -- bug 3: the installer dies with the builder ----------------------------------------------

def test_killing_only_the_builder_kills_the_installer(tmp_path, wheels, cache, uv_log):
    spec = demo_spec(tmp_path / "p", wheels)
    stall = tmp_path / "installer-pid"
    code = "import sys; from comfy_env.envs import Env; Env.from_toml(sys.argv[1]).create(progress=False)"
    proc = subprocess.Popen([sys.executable, "-c", code, spec],
                            env=dict(os.environ, PYTHONPATH=SRC, UV_WRAPPER_STALL=str(stall)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not stall.exists():
        assert time.monotonic() < deadline and proc.poll() is None, "the installer never started"
        time.sleep(0.05)
    installer = int(stall.read_text())
    assert _alive(installer)
    proc.kill()  # the builder alone, not its process group
    proc.wait(10)
    deadline = time.monotonic() + 10
    while _alive(installer) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = _alive(installer)
    if alive:
        os.kill(installer, signal.SIGKILL)
    assert not alive, "the installer outlived the builder"
    # The next build cleans up and succeeds, and leaves no staging dir behind.
    env = Env.from_toml(spec).create(progress=False)
    assert env.is_built and entries(cache) == [env.key]


# -- progress -----------------------------------------------------------------------------

def test_a_silent_installer_step_gets_heartbeat_lines_and_no_staging_path_is_shown(
        tmp_path, wheels, cache, uv_log, monkeypatch):
    monkeypatch.setattr(builder, "HEARTBEAT_SECONDS", 0.3)
    monkeypatch.setenv("UV_WRAPPER_DELAY", "1.2")
    monkeypatch.chdir(tmp_path)   # the cache lies below: uv shows its paths relative to here
    lines = []
    env = Env.from_toml(demo_spec(tmp_path / "p", wheels)).create(progress=lines.append)
    beats = [line for line in lines if line.startswith("installing the requirements of p: still running after")]
    assert beats and "no output for" in beats[-1]
    assert not [line for line in lines if ".tmp-" in line], lines
    assert any(line.endswith("environment at: " + os.path.relpath(env.path)) for line in lines), lines


def test_a_build_waiting_on_uvs_cache_lock_says_so(tmp_path, wheels, cache, monkeypatch):
    import fcntl

    uv_cache = tmp_path / "uv-cache"
    uv_cache.mkdir()
    monkeypatch.setenv("UV_CACHE_DIR", str(uv_cache))
    monkeypatch.setattr(builder, "HEARTBEAT_SECONDS", 0.3)
    fd = os.open(uv_cache / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)   # as `uv cache clean` in another terminal would
    threading.Timer(1.5, os.close, (fd,)).start()
    lines = []
    Env.from_toml(demo_spec(tmp_path / "p", wheels)).create(progress=lines.append)
    assert any("uv is waiting for its cache lock" in line for line in lines), lines


def test_a_build_waiting_for_another_builder_says_so(tmp_path, wheels, cache):
    from comfy_env.envs import locks

    env = Env.from_toml(demo_spec(tmp_path / "p", wheels))
    lines = []
    with locks.build_lock(env.path):
        t = threading.Thread(target=env.create, kwargs={"progress": lines.append})
        t.start()
        deadline = time.monotonic() + 10
        while not lines and time.monotonic() < deadline:
            time.sleep(0.02)
    t.join(30)
    assert lines[0].startswith("waiting for another process that is building p")
    assert env.is_built


# -- bug 4: one clear error ------------------------------------------------------------------

def test_install_error_names_spec_and_requirement_and_explains_once(tmp_path, wheels, cache, capsys):
    from comfy_env.cli import main

    spec = write_spec(tmp_path / "broken", f"""
        requirements = ["demo_dep==9.9"]
        find_links = ["{wheels}"]
        no_index = true
    """)
    lines = []
    with pytest.raises(EnvBuildError) as e:
        Env.from_toml(spec).create(progress=lines.append)
    msg = str(e.value)
    assert msg.startswith(f"{spec}: ") and "the requirement that failed: 'demo_dep==9.9'" in msg
    assert msg.count("unsatisfiable") == 1 and not [line for line in lines if "unsatisfiable" in line]
    assert ".tmp-" not in msg and "---" not in msg
    assert entries(cache) == []  # no env, no staging dir, no stale .lock
    # The CLI shows the installer's progress and then the error: the explanation once.
    assert main(["env", "create", spec]) == 1
    err = capsys.readouterr().err
    assert err.count("unsatisfiable") == 1 and "comfy-env: error: " + spec in err
    assert entries(cache) == []


# -- bug 5: TOML mistakes get a line and a hint ------------------------------------------------

def test_toml_ending_inside_an_array_names_the_line_it_opened_on(tmp_path):
    p = write_spec(tmp_path, 'name = "x"\nrequirements = [\n  "numpy",\n  "scipy"\n')
    with pytest.raises(EnvSpecError) as e:
        Env.from_toml(p)
    assert e.value.line == 2 and f"{p}, line 2: invalid TOML" in str(e.value)
    assert "the array opened on line 2 is never closed" in str(e.value)


def test_a_key_written_after_the_environment_table_says_where_it_landed(tmp_path):
    p = write_spec(tmp_path, '[environment]\nOMP_NUM_THREADS = "4"\nrequirements = ["numpy"]\n')
    with pytest.raises(EnvSpecError) as e:
        Env.from_toml(p)
    msg = str(e.value)
    assert "line 3" in msg and "written after the [environment] header" in msg and "above [environment]" in msg
    # A string value is no less a mistake (it would silently become an environment variable).
    p = write_spec(tmp_path, '[environment]\npython = "3.11"\n')
    with pytest.raises(EnvSpecError, match="written after the"):
        Env.from_toml(p)


def test_environment_cannot_replace_the_workers_pythonpath(tmp_path):
    p = write_spec(tmp_path, '[environment]\nPYTHONPATH = "/opt/mine"\n')
    with pytest.raises(EnvSpecError, match=r"line 2: \[environment\] PYTHONPATH cannot be set"):
        Env.from_toml(p)


# -- bug 6: the key decides the directory; name is a label --------------------------------------

def test_renaming_or_moving_a_spec_finds_the_same_env(tmp_path, wheels, cache, uv_log):
    first = Env.from_toml(demo_spec(tmp_path / "pack", wheels, extra='name = "one"')).create(progress=False)
    renamed = Env.from_toml(demo_spec(tmp_path / "pack", wheels, extra='name = "two"'))
    moved = Env.from_toml(demo_spec(tmp_path / "elsewhere" / "pack-renamed", wheels))
    assert renamed.path == moved.path == first.path and renamed.is_built and moved.is_built
    n = len([c for c in uv_calls(uv_log) if c.startswith("pip install")])
    renamed.create(progress=False)
    moved.create(progress=False)
    assert len([c for c in uv_calls(uv_log) if c.startswith("pip install")]) == n == 1
