"""What a worker in a built env sees, and an env's life under a running executor.

Bug 1: the parent's working directory must not leak into a foreign env's worker (a
``nodes.py`` or a package of the same name in ComfyUI's root shadowed the env's own).
Bug 7: an env that live workers use is not removed; an executor whose env was removed
(forcibly, or while no worker ran) rebuilds it when it starts its next worker.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time

import pytest

from comfy_env.envs import Env, EnvInUse, builder
from pythons import ALL_PYTHONS, run_script
from test_envs_helpers import demo_spec, wheels  # noqa: F401 (fixture)

IsolatedExecutor = pytest.importorskip("comfy_env.executor").IsolatedExecutor

pytestmark = pytest.mark.timeout(120)


def _shadowing_cwd(d):
    """A working directory like ComfyUI's root: modules named like the env's."""
    (d / "demo_dep").mkdir()
    (d / "demo_dep" / "__init__.py").write_text("VERSION = 'from the working directory'\n")
    (d / "nodes.py").write_text("X = 1\n")


_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from comfy_env import IsolatedExecutor, Env

    env = Env.from_toml(sys.argv[1], cache_dir=sys.argv[2]).create(progress=False)
    with IsolatedExecutor(env=env) as ex:
        out = {
            "version": ex.submit("demo_dep:describe").result(60)["version"],
            "nodes": ex.submit("importlib.util:find_spec", "nodes").result(30) is not None,
            "cwd": ex.submit("os:getcwd").result(30),
            "path": ex.submit("sys:path.copy").result(30),
        }
    print(json.dumps(out))
""")


@ALL_PYTHONS
def test_the_working_directory_does_not_leak_into_a_foreign_worker(pyver, tmp_path, wheels):
    work = tmp_path / "comfyui-root"
    work.mkdir()
    _shadowing_cwd(work)
    spec = demo_spec(tmp_path / "pack", wheels)
    proc = run_script(pyver, _SCRIPT, cwd=work, timeout=120, args=(spec, str(tmp_path / "cache")),
                      env={builder.UV_ENV_VAR: builder.find_uv()})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["version"] == "1.0"            # the env's demo_dep, not the directory's
    assert out["nodes"] is False              # nodes.py in the working directory is not importable
    assert out["cwd"] == str(work)            # ... yet the worker works in the parent's directory
    assert str(work) not in out["path"] and "" not in out["path"]


def _wait_until_removable(env, timeout=15):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return env.remove()
        except EnvInUse:
            assert time.monotonic() < deadline, "the env stayed in use after its worker died"
            time.sleep(0.05)


def test_an_env_in_use_is_not_removed_and_an_executor_rebuilds_a_removed_env(tmp_path, wheels, capsys):
    from comfy_env.cli import main

    cache = str(tmp_path / "cache")
    spec = demo_spec(tmp_path / "pack", wheels)
    env = Env.from_toml(spec, cache_dir=cache).create(progress=False)
    with IsolatedExecutor(env=env) as ex:
        assert ex.submit("demo_dep:describe").result(60)["version"] == "1.0"
        with pytest.raises(EnvInUse, match="in use by running workers"):
            env.remove()
        assert main(["env", "remove", spec, "--cache-dir", cache]) == 1
        assert "in use" in capsys.readouterr().err
        assert main(["env", "remove", "--all", "--cache-dir", cache]) == 1
        assert env.is_built and ex.submit("demo_dep:describe").result(60)["version"] == "1.0"
        # Once its worker is gone, the env can go; the executor's next worker rebuilds it.
        (pid,) = ex.worker_pids()
        os.kill(pid, signal.SIGKILL)
        assert _wait_until_removable(env) is True and not env.is_built
        assert ex.submit("demo_dep:describe").result(90)["version"] == "1.0"
        assert env.is_built
    assert env.remove() is True   # no worker left: nothing in use


def test_an_env_given_by_its_directory_is_held_in_use_too(tmp_path, wheels):
    env = Env.from_toml(demo_spec(tmp_path / "pack", wheels), cache_dir=str(tmp_path / "cache")).create(progress=False)
    with IsolatedExecutor(env=env.path) as ex:
        assert ex.submit("demo_dep:describe").result(60)["version"] == "1.0"
        with pytest.raises(EnvInUse):
            env.remove()
    assert env.remove() is True


_STDLIB_NAMES_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from comfy_env import IsolatedExecutor
    import helper                      # next to this script: the worker finds it as the parent does

    def where():
        import queue, random
        return [os.getcwd(), queue.__file__, random.__file__, helper.VALUE]

    out = []
    for preload in (None, ["json"]):
        with IsolatedExecutor(preload=preload) as ex:
            out.append(ex.submit(where).result(60))
    print(json.dumps(out))
""")


@ALL_PYTHONS
def test_files_named_like_the_standard_library_in_the_working_directory_do_not_stop_workers(pyver, tmp_path):
    """``python tools/run.py`` from a project holding a queue.py or random.py: the parent
    never imports them (its path starts at the script's directory), and a worker of the
    same interpreter must not either (it started with the working directory first on its
    path, imported queue.py while comfy_env loaded, and no worker could start)."""
    from pythons import script_env, user_python

    project = tmp_path / "project"
    (project / "tools").mkdir(parents=True)
    for name in ("queue", "random", "types", "runpy", "selectors", "signal"):
        (project / f"{name}.py").write_text(f"raise ImportError('the project\\'s {name}.py was imported')\n")
    (project / "tools" / "helper.py").write_text("VALUE = 42\n")
    (project / "tools" / "run.py").write_text(_STDLIB_NAMES_SCRIPT)
    proc = subprocess.run([user_python(pyver), "tools/run.py"], cwd=str(project), env=script_env(),
                          capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for cwd, queue_file, random_file, value in json.loads(proc.stdout.strip().splitlines()[-1]):
        assert cwd == str(project) and value == 42
        assert not queue_file.startswith(str(project)) and not random_file.startswith(str(project))


@pytest.mark.parametrize("preload", [None, ["json"]], ids=["spawned", "forked-from-zygote"])
def test_a_working_directory_removed_under_the_parent_does_not_stop_workers(tmp_path, monkeypatch, preload):
    """The parent's cwd was deleted (a build directory cleaned under a running script):
    workers start and stay where they started, instead of every start failing with a
    bare FileNotFoundError."""
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    with IsolatedExecutor(preload=preload, start_timeout=60) as ex:
        assert os.path.isdir(ex.submit(os.getcwd).result(60))
        assert ex.submit(sum, [1, 2]).result(60) == 3


_ARGV_SCRIPT = textwrap.dedent("""
    import json, sys
    from comfy_env import IsolatedExecutor
    import config                      # parses the command line at import, as many scripts' do

    def seen(x):
        return [x * config.ARGS.scale, sys.argv]

    if __name__ == "__main__":
        out = []
        for preload in (None, ["config"]):
            with IsolatedExecutor(preload=preload) as ex:
                out.append(ex.submit(seen, 10).result(60))
        print(json.dumps(out))
""")


@ALL_PYTHONS
def test_workers_see_the_parents_command_line(pyver, tmp_path):
    """A module that parses ``sys.argv`` at import (argparse in a config module) works in
    a worker, spawned or forked from a zygote whose preload imports it: the worker's
    ``sys.argv`` is the parent's, as multiprocessing's spawn gives its children, not its
    own internal command line (argparse exited the worker with code 2 on its fds)."""
    (tmp_path / "config.py").write_text(
        "import argparse\np = argparse.ArgumentParser()\np.add_argument('--scale', type=float, default=1.0)\n"
        "ARGS = p.parse_args()\n")
    proc = run_script(pyver, _ARGV_SCRIPT, cwd=tmp_path, timeout=100, args=("--scale", "3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = [30.0, [str(tmp_path / "user_script.py"), "--scale", "3"]]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [want, want], proc.stdout


_FLAGS_SCRIPT = textwrap.dedent("""
    import json, sys, warnings
    from comfy_env import IsolatedExecutor

    def seen():
        try:
            warnings.warn("deprecated thing")
            raised = False
        except UserWarning:
            raised = True
        return [sys.warnoptions, sys.flags.optimize, sys.flags.utf8_mode, sys.flags.dont_write_bytecode, raised]

    if __name__ == "__main__":
        out = []
        for preload in (None, ["json"]):
            with IsolatedExecutor(preload=preload) as ex:
                out.append(ex.submit(seen).result(60))
        print(json.dumps(out))
""")


@ALL_PYTHONS
def test_workers_of_the_same_interpreter_take_its_flags(pyver, tmp_path):
    """``python -W error::UserWarning -O -B -X utf8 script.py``: workers of the parent's
    interpreter (spawned, or forked from a zygote) run with the same flags, as
    multiprocessing's spawned children do; the flags that would hide the worker's own
    imports (-E, -I, -S) are not passed."""
    proc = run_script(pyver, _FLAGS_SCRIPT, cwd=tmp_path, timeout=100,
                      flags=("-W", "error::UserWarning", "-O", "-B", "-X", "utf8"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = [["error::UserWarning"], 1, 1, 1, True]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [want, want], proc.stdout
