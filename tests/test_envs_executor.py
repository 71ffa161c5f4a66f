"""Workers in foreign environments, through IsolatedExecutor.

Functions defined in this test module cannot be imported by reference inside a foreign
env, so calls go through ``"module:qualname"`` strings of the fixture package
(``demo_dep``) or the standard library.
"""
from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import sys
import tempfile
import textwrap

import numpy as np
import pytest

from comfy_env.envs import Env, resolve_env
from comfy_env.errors import PicklingFailed
from comfy_env.envs.interpreters import find_interpreters
from test_envs_helpers import demo_dep_wheel

IsolatedExecutor = pytest.importorskip("comfy_env.executor").IsolatedExecutor

pytestmark = pytest.mark.timeout(90)

_COLLECT_CACHE = tempfile.mkdtemp(prefix="comfy-env-test-cache-")
atexit.register(shutil.rmtree, _COLLECT_CACHE, True)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True)
def _cache_env(cache_dir, monkeypatch):
    # env="path/to/comfy-env.toml" uses the env var: keep builds off the user's cache.
    monkeypatch.setenv("COMFY_ENV_CACHE_DIR", cache_dir)


@pytest.fixture(scope="module")
def demo_envs(tmp_path_factory, cache_dir):
    """Two envs with conflicting demo_dep versions; numpy is shared from the host."""
    wheels = tmp_path_factory.mktemp("wheels")
    demo_dep_wheel(wheels, "1.0")
    demo_dep_wheel(wheels, "2.0")
    envs = []
    for version in ("1.0", "2.0"):
        d = tmp_path_factory.mktemp(f"demo-{version}")
        (d / "comfy-env.toml").write_text(textwrap.dedent(f"""
            name = "demo-{version}"
            requirements = ["demo_dep=={version}"]
            find_links = ["{wheels}"]
            no_index = true
            share = ["numpy"]
            [environment]
            DEMO_ENV_NAME = "demo-{version}"
        """))
        envs.append(Env.from_toml(d, cache_dir=cache_dir).create(progress=False))
    return envs


def test_two_envs_with_conflicting_versions_run_at_once(demo_envs):
    assert importlib.util.find_spec("demo_dep") is None  # the parent sees neither version
    env1, env2 = demo_envs
    with IsolatedExecutor(env=env1) as ex1, IsolatedExecutor(env=env2) as ex2:
        f1 = ex1.submit("demo_dep:describe", "a")
        f2 = ex2.submit("demo_dep:describe", "b")
        assert f1.result(30)["version"] == "1.0" and f1.result()["x"] == "a"
        assert f2.result(30)["version"] == "2.0" and f2.result()["x"] == "b"
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        y1 = ex1.submit("demo_dep:transform", x)
        y2 = ex2.submit("demo_dep:transform", x)
        np.testing.assert_array_equal(y1.result(30), x)
        np.testing.assert_array_equal(y2.result(30), x * 2)
        assert ex1.submit("os:getenv", "DEMO_ENV_NAME").result(30) == "demo-1.0"
        # Host packages that were not shared stay invisible in the worker.
        assert ex2.submit("importlib.util:find_spec", "pytest").result(30) is None
    assert importlib.util.find_spec("demo_dep") is None


def test_env_given_as_toml_path_and_as_env_dir(demo_envs):
    env1 = demo_envs[0]
    with IsolatedExecutor(env=env1.spec.source) as ex:
        assert ex.submit("demo_dep:describe").result(30)["version"] == "1.0"
    with IsolatedExecutor(env=env1.path) as ex:  # a plain venv dir: no bootstrap of numpy, no env vars
        assert ex.submit("demo_dep:describe").result(30)["version"] == "1.0"


def _other_python():
    # Also called at collection time (skipif): keep the probe cache out of the user's cache dir.
    saved = os.environ.get("COMFY_ENV_CACHE_DIR")
    os.environ["COMFY_ENV_CACHE_DIR"] = saved or _COLLECT_CACHE
    try:
        for interp in find_interpreters():
            if interp.minor != sys.version_info[:2] and interp.minor >= (3, 10):
                return interp
        return None
    finally:
        if saved is None:
            del os.environ["COMFY_ENV_CACHE_DIR"]


@pytest.mark.skipif(_other_python() is None, reason="no second Python (>= 3.10) on this machine")
def test_worker_with_another_python_minor_version(tmp_path):
    other = _other_python()
    wenv = resolve_env(other.executable)
    assert wenv.python_version == other.minor
    with IsolatedExecutor(env=other.executable) as ex:
        # By reference works across versions.
        assert ex.submit("platform:python_version").result(60) == other.version_str
        assert ex.submit("math:hypot", 3, 4).result(30) == 5.0
        # Functions of modules compiled into the interpreter go by reference too.
        import operator
        import time
        assert ex.submit(sum, [1, 2, 3]).result(30) == 6
        assert ex.submit(operator.add, 2, 3).result(30) == 5
        assert ex.submit(time.sleep, 0).result(30) is None
        assert isinstance(ex.submit(os.getpid).result(30), int)
        # By value is refused, naming both versions.
        with pytest.raises(Exception) as e:
            ex.submit(lambda: 1).result(30)
        msg = str(e.value)
        assert "%d.%d" % sys.version_info[:2] in msg and "%d.%d" % other.minor in msg
        assert "module:qualname" in msg or "qualname" in msg


def _python_310():
    saved = os.environ.get("COMFY_ENV_CACHE_DIR")
    os.environ["COMFY_ENV_CACHE_DIR"] = saved or _COLLECT_CACHE
    try:
        return next((i for i in find_interpreters() if i.minor == (3, 10)), None)
    finally:
        if saved is None:
            del os.environ["COMFY_ENV_CACHE_DIR"]


@pytest.mark.skipif(sys.version_info[:2] == (3, 10) or _python_310() is None,
                    reason="needs a Python 3.10 beside a newer parent")
def test_an_argument_of_a_class_of_the_parents_script_says_the_versions_differ():
    """An instance of a class defined in the parent's script travels as code (by
    value); Python 3.10 cannot load a newer version's code objects, and the bare error
    was ``TypeError: code expected at most 16 arguments, got 18``.  It now names both
    versions and what to pass instead; a module missing in the env still says so."""
    other = _python_310()
    Thing = type("Thing", (), {"__module__": "__main__", "size": lambda self: 1})
    with IsolatedExecutor(env=other.executable) as ex:
        with pytest.raises(PicklingFailed) as e:
            ex.submit("builtins:repr", Thing()).result(60)
        msg = str(e.value)
        assert "%d.%d" % sys.version_info[:2] in msg and "3.10" in msg and "plain data" in msg, msg
        assert ex.submit("builtins:len", [1, 2]).result(30) == 2       # the worker is fine


@pytest.mark.skipif(_other_python() is None, reason="no second Python (>= 3.10) on this machine")
def test_toml_env_on_another_python_runs_its_own_packages(tmp_path, cache_dir):
    other = _other_python()
    wheels = tmp_path / "wheels"
    demo_dep_wheel(wheels, "2.0")
    (tmp_path / "comfy-env.toml").write_text(textwrap.dedent(f"""
        python = "{other.minor[0]}.{other.minor[1]}"
        requirements = ["demo_dep==2.0"]
        find_links = ["{wheels}"]
        no_index = true
    """))
    with IsolatedExecutor(env=Env.from_toml(tmp_path, cache_dir=cache_dir)) as ex:
        out = ex.submit("demo_dep:describe", [1, 2]).result(60)
    assert out == {"version": "2.0", "python": other.minor, "x": [1, 2]}
