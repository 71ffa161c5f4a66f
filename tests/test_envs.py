"""Environments: comfy-env.toml specs, building with uv, the cache, the lock, sharing host packages.

Everything is offline: the fixture packages are wheels written by the test itself
(tests/test_envs_helpers.py) and installed with ``no_index`` + ``find_links``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from comfy_env.envs import (
    Env, EnvBuildError, EnvNotBuilt, EnvSpecError, InterpreterNotFound, UnsupportedInterpreter, WorkerEnvironment,
    resolve_env,
)
from comfy_env.envs import builder
from comfy_env.envs.interpreters import find_interpreters
from test_envs_helpers import demo_dep_wheel, make_wheel, write_spec

pytestmark = pytest.mark.timeout(60)

SRC = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__import__("comfy_env.envs").envs.__file__))))


# -- fixtures ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    d = tmp_path_factory.mktemp("wheels")
    demo_dep_wheel(d, "1.0")
    demo_dep_wheel(d, "2.0")
    # A stand-in for a host package the env installs itself (see test_share_skips_what_the_env_installs).
    make_wheel(d, "MarkupSafe", "99.0", {"markupsafe/__init__.py": "__version__ = '99.0'\nFAKE = True\n"})
    return str(d)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True)
def _cache_env(cache_dir, monkeypatch):
    # resolve_env(path) and the CLI use the env var; keep them off the user's cache.
    monkeypatch.setenv("COMFY_ENV_CACHE_DIR", cache_dir)


def demo_spec(tmp_path, wheels, version="1.0", name="demo", extra=""):
    return write_spec(tmp_path / name, f"""
        name = "{name}"
        requirements = ["demo_dep=={version}"]
        find_links = ["{wheels}"]
        no_index = true
        {extra}
    """)


@pytest.fixture(scope="module")
def built_env(tmp_path_factory, wheels, cache_dir):
    """One env with demo_dep 1.0, shared by the tests that only read it."""
    spec = demo_spec(tmp_path_factory.mktemp("spec"), wheels, name="shared-demo")
    return Env.from_toml(spec, cache_dir=cache_dir).create(progress=False)


@pytest.fixture
def uv_log(tmp_path, monkeypatch):
    """Route the builder through a uv wrapper that logs every invocation (and can stall)."""
    log = tmp_path / "uv-calls.log"
    wrapper = tmp_path / "uv-wrapper"
    wrapper.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        echo "$*" >> "{log}"
        if [ "$1" = pip ] && [ -n "$UV_WRAPPER_STALL" ]; then
            echo $$ > "$UV_WRAPPER_STALL.tmp" && mv "$UV_WRAPPER_STALL.tmp" "$UV_WRAPPER_STALL"
            exec sleep 60
        fi
        if [ "$1" = pip ] && [ -n "$UV_WRAPPER_DELAY" ]; then sleep "$UV_WRAPPER_DELAY"; fi
        exec "{builder.find_uv()}" "$@"
    """))
    wrapper.chmod(0o755)
    monkeypatch.setenv(builder.UV_ENV_VAR, str(wrapper))
    log.touch()
    return log


def installs(log) -> int:
    return sum(1 for line in log.read_text().splitlines() if line.startswith("pip install"))


def run_in(wenv: WorkerEnvironment, code: str) -> subprocess.CompletedProcess:
    """Start the env's interpreter the way the executor starts a worker."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(wenv.env_vars)
    env["PYTHONPATH"] = os.pathsep.join(wenv.pythonpath)
    return subprocess.run([wenv.python, "-s", "-c", code], env=env, capture_output=True, text=True, timeout=60)


# -- spec errors ------------------------------------------------------------------------

def test_invalid_toml_names_file_and_line(tmp_path):
    p = write_spec(tmp_path, 'requirements = ["a"\npython = \n')
    with pytest.raises(EnvSpecError) as e:
        Env.from_toml(p)
    assert str(p) in str(e.value) and "invalid TOML" in str(e.value) and "line" in str(e.value)


def test_unknown_key_names_file_line_and_known_keys(tmp_path):
    p = write_spec(tmp_path, 'name = "x"\nrequirement = ["numpy"]\n')
    with pytest.raises(EnvSpecError) as e:
        Env.from_toml(p)
    msg = str(e.value)
    assert f"{p}, line 2" in msg and "'requirement'" in msg and "requirements" in msg
    assert e.value.line == 2


@pytest.mark.parametrize("toml,error", [
    ('python = "3.11"\nrequirements = "numpy"\n', r"line 2: 'requirements' must be a list of strings.*not str"),
    ('[environment]\nOMP_NUM_THREADS = ["4"]\n', r"line 2: \[environment\] OMP_NUM_THREADS must be a string"),
    ('[environment]\nFLAG = "a\\u0000b"\n', r"line 2: \[environment\] FLAG holds a NUL character"),
    ('exclude_newer = "2025-02-30"\n', r"line 1: exclude_newer = '2025-02-30' is not a date"),
    ('share = ["torch>=2"]\n', "not a distribution name"),
    ('python = "3.8"\n', r"line 1: python = '3.8': comfy-env workers need Python 3.10 or newer"),
    ('python = "three"\n', r"line 1: python = 'three' is not a version"),
    ('name = "x"\nrequirements = ["demo_dep>>1.0"]\n',
     r"comfy-env.toml, line 2: requirement .*is not a valid requirement"),
    ('name = "x"\nrequirements = ["--no-deps"]\n',
     r"comfy-env.toml, line 2: requirement .*is not one requirement: installer options"),
    ('name = "x"\nrequirements = ["demo_dep>=1\\n--find-links=/elsewhere"]\n',
     r"comfy-env.toml, line 2: requirement .*is not one requirement: installer options and line breaks"),
    ('name = "x"\nrequirements = ["demo_dep @ ./no/such.whl"]\n',
     r"comfy-env.toml, line 2: requirement .*names a local path, but .* does not exist"),
], ids=["wrong-type", "env-type", "env-nul", "bad-date", "share-specifier", "old-python", "bad-python",
        "bad-specifier", "installer-option", "line-break", "missing-direct-path"])
def test_a_spec_mistake_names_its_line_and_what_was_expected(tmp_path, toml, error):
    p = write_spec(tmp_path, toml)
    with pytest.raises(EnvSpecError, match=error):
        Env.from_toml(p)


def test_missing_spec_file_and_missing_local_requirement(tmp_path):
    with pytest.raises(EnvSpecError, match="no such file; expected a comfy-env.toml"):
        Env.from_toml(tmp_path / "nope")
    p = write_spec(tmp_path, 'requirements = ["./wheels/x-1.0-py3-none-any.whl"]\n')
    with pytest.raises(EnvSpecError, match=r"line 1: requirement .* does not exist"):
        Env.from_toml(p)


def test_local_paths_in_requirements_are_taken_from_the_tomls_directory(tmp_path, wheels, monkeypatch):
    """``name @ ./wheel.whl``, a bare ``./wheel.whl`` and either with a marker: made absolute
    from the toml's directory (a relative direct reference was resolved against the
    working directory, then the env's), whatever the working directory is."""
    node = tmp_path / "node"
    (node / "wheels").mkdir(parents=True)
    whl = [f for f in os.listdir(wheels) if f.startswith("demo_dep-1.0")][0]
    os.link(os.path.join(wheels, whl), node / "wheels" / whl)
    p = write_spec(node, f'requirements = ["demo_dep @ ./wheels/{whl} ; python_version >= \'3.8\'", '
                         f'"./wheels/{whl}"]\n')
    monkeypatch.chdir(tmp_path)
    direct, bare = Env.from_toml(p).spec.requirements
    local = os.path.join(str(node), "wheels", whl)
    assert direct == f"demo_dep @ file://{local} ; python_version >= '3.8'", direct
    assert bare == local
    p = write_spec(node, f'requirements = ["demo_dep @ ./wheels/{whl}"]\nno_index = true\n')
    env = Env.from_toml(p, cache_dir=str(tmp_path / "c"))
    env.create(progress=False)
    out = subprocess.run([env.python, "-c", "import demo_dep; print(demo_dep.VERSION)"], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "1.0"


def test_a_byte_order_mark_is_not_an_error(tmp_path):
    p = tmp_path / "comfy-env.toml"
    p.write_bytes("\ufeffname = \"bom\"\n".encode("utf-8"))
    assert Env.from_toml(p).spec.name == "bom"


def test_missing_interpreter_lists_the_ones_found(tmp_path):
    p = write_spec(tmp_path, 'python = "3.99"\n')
    env = Env.from_toml(p)
    with pytest.raises(InterpreterNotFound) as e:
        env.path
    msg = str(e.value)
    assert "no Python 3.99 interpreter" in msg and str(p) in msg
    assert "%d.%d" % sys.version_info[:2] in msg  # the host's own version is listed


def test_share_of_a_package_the_host_lacks(tmp_path, cache_dir):
    p = write_spec(tmp_path, 'share = ["surely-not-installed-pkg"]\n')
    with pytest.raises(EnvSpecError, match="'surely-not-installed-pkg' is not installed in the host"):
        resolve_env(Env.from_toml(p, cache_dir=cache_dir), progress=False)


def test_example_spec_parses(tmp_path):
    p = write_spec(tmp_path / "node", """
        name = "sam3d"
        python = "%d.%d"
        requirements = ["numpy>=1.26,<3", "requests[socks] ; python_version >= '3.8'"]
        index_url = "https://pypi.org/simple"
        extra_index_urls = ["https://download.pytorch.org/whl/cpu"]
        share = ["torch", "Typing_Extensions"]
        [environment]
        OMP_NUM_THREADS = 4
        HF_HUB_OFFLINE = "1"
    """ % sys.version_info[:2])
    spec = Env.from_toml(tmp_path / "node").spec  # a directory holding the toml works too
    assert spec.name == "sam3d" and spec.share == ("torch", "typing-extensions")
    assert spec.environment == {"OMP_NUM_THREADS": "4", "HF_HUB_OFFLINE": "1"}
    assert spec.requirements[0] == "numpy>=1.26,<3"


# -- building and the cache ----------------------------------------------------------

def test_built_env_has_its_package_and_works_after_the_rename(built_env):
    assert built_env.is_built and os.path.basename(built_env.path) == built_env.key
    out = subprocess.run([built_env.python, "-c", "import sys, demo_dep; print(demo_dep.VERSION); print(sys.prefix)"],
                         capture_output=True, text=True, check=True)
    version, prefix = out.stdout.split()
    # Built at a staging name, then renamed: the interpreter must know its final home.
    assert version == "1.0" and os.path.realpath(prefix) == os.path.realpath(built_env.path)
    staging = [n for n in os.listdir(os.path.dirname(built_env.path)) if n.startswith(".tmp-")]
    assert staging == []


def test_second_create_is_a_cache_hit_and_runs_no_installer(built_env, uv_log, cache_dir):
    again = Env.from_toml(built_env.spec.source, cache_dir=cache_dir)
    t0 = time.perf_counter()
    again.create(progress=False)
    elapsed = time.perf_counter() - t0
    assert installs(uv_log) == 0 and uv_log.read_text() == ""
    assert again.path == built_env.path
    assert elapsed < 0.5, f"cache-hit create took {elapsed:.3f} s"
    print(f"cache-hit create: {elapsed * 1000:.1f} ms")


def test_python_before_create_raises_env_not_built(tmp_path, wheels, cache_dir):
    env = Env.from_toml(demo_spec(tmp_path, wheels, version="2.0", name="unbuilt"), cache_dir=cache_dir)
    with pytest.raises(EnvNotBuilt, match="not built yet; call Env.create"):
        env.python


def test_progress_lines_are_forwarded(tmp_path, wheels):
    lines = []
    env = Env.from_toml(demo_spec(tmp_path, wheels, name="progress"), cache_dir=str(tmp_path / "c"))
    env.create(progress=lines.append)
    text = "\n".join(lines)
    assert "building progress" in text and "demo-dep==1.0" in text


def test_failed_install_raises_with_installer_output(tmp_path, wheels, cache_dir):
    env = Env.from_toml(demo_spec(tmp_path, wheels, version="9.9", name="broken"), cache_dir=cache_dir)
    with pytest.raises(EnvBuildError) as e:
        env.create(progress=False)
    assert "resolving the requirements of broken failed" in str(e.value)
    assert "demo-dep" in e.value.output and "9.9" in e.value.output  # uv's own explanation
    assert not os.path.exists(env.path)
    assert not [n for n in os.listdir(os.path.dirname(env.path)) if n.startswith(".tmp-broken")]


def test_two_processes_creating_the_same_env_build_it_once(tmp_path, wheels, uv_log, monkeypatch):
    spec = demo_spec(tmp_path, wheels, name="race")
    cache = str(tmp_path / "race-cache")
    monkeypatch.setenv("UV_WRAPPER_DELAY", "1")  # hold the lock long enough for the other to queue
    code = ("import sys; from comfy_env.envs import Env; "
            "e = Env.from_toml(sys.argv[1], cache_dir=sys.argv[2]).create(progress=False); print(e.path)")
    env = dict(os.environ, PYTHONPATH=SRC)
    procs = [subprocess.Popen([sys.executable, "-c", code, spec, cache], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0] == outs[1][0]
    assert installs(uv_log) == 1


def test_two_threads_creating_the_same_env_build_it_once(tmp_path, wheels, uv_log, monkeypatch):
    spec = demo_spec(tmp_path, wheels, name="threads")
    cache = str(tmp_path / "thread-cache")
    monkeypatch.setenv("UV_WRAPPER_DELAY", "0.5")
    errors = []

    def create():
        try:
            Env.from_toml(spec, cache_dir=cache).create(progress=False)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=create) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and installs(uv_log) == 1


def test_killing_the_build_leaves_nothing_broken(tmp_path, wheels, uv_log, monkeypatch):
    spec = demo_spec(tmp_path, wheels, name="killed")
    cache = str(tmp_path / "kill-cache")
    stall = tmp_path / "installer-started"
    code = "import sys; from comfy_env.envs import Env; Env.from_toml(sys.argv[1], cache_dir=sys.argv[2]).create()"
    env = dict(os.environ, PYTHONPATH=SRC, UV_WRAPPER_STALL=str(stall))
    proc = subprocess.Popen([sys.executable, "-c", code, spec, cache], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not stall.exists():
        assert time.monotonic() < deadline and proc.poll() is None, "installer never started"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # builder and installer die mid-install
    proc.wait(10)
    target = Env.from_toml(spec, cache_dir=cache)
    assert not target.is_built and not os.path.exists(target.path)
    # The next create cleans up the remains and succeeds.
    target.create(progress=False)
    assert target.is_built
    assert not [n for n in os.listdir(os.path.dirname(target.path)) if n.startswith(".tmp-")]
    out = subprocess.run([target.python, "-c", "import demo_dep; print(demo_dep.VERSION)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1.0"


def test_installer_killed_raises_build_error_and_cleans_up(tmp_path, wheels, uv_log, monkeypatch):
    spec = demo_spec(tmp_path, wheels, name="installer-killed")
    cache = str(tmp_path / "ik-cache")
    stall = tmp_path / "installer-started"
    monkeypatch.setenv("UV_WRAPPER_STALL", str(stall))
    env = Env.from_toml(spec, cache_dir=cache)
    errors = []
    t = threading.Thread(target=lambda: errors.append(pytest.raises(EnvBuildError, env.create, progress=False)))
    t.start()
    deadline = time.monotonic() + 30
    while not stall.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # Kill only the installer: the wrapper wrote its pid, then exec'd into a long sleep.
    os.kill(int(stall.read_text()), signal.SIGKILL)
    t.join(30)
    assert errors and "killed by signal" in str(errors[0].value)
    assert not os.path.exists(env.path)
    monkeypatch.delenv("UV_WRAPPER_STALL")
    env.create(progress=False)
    assert env.is_built



# -- what a foreign worker sees ----------------------------------------------------------

def test_foreign_worker_sees_this_comfy_env_and_cloudpickle_but_no_host_packages(built_env):
    wenv = resolve_env(built_env, progress=False)
    assert wenv.python == built_env.python and not wenv.is_current
    assert wenv.python_version == sys.version_info[:2] and wenv.label == "shared-demo"
    boot = wenv.pythonpath[0]
    assert sorted(os.listdir(boot)) == ["cloudpickle", "comfy_env"]
    out = run_in(wenv, textwrap.dedent("""
        import comfy_env.envs, cloudpickle, demo_dep, importlib.util
        print(comfy_env.envs.__file__)
        print([m for m in ("numpy", "pytest", "filelock", "platformdirs") if importlib.util.find_spec(m)])
    """))
    assert out.returncode == 0, out.stderr
    envs_file, visible = out.stdout.splitlines()
    # The very same source file as the parent's (through the link), not a copy.
    assert os.path.realpath(envs_file) == os.path.realpath(__import__("comfy_env.envs").envs.__file__)
    assert visible == "[]"


def test_share_torch_makes_torch_importable_and_nothing_else(tmp_path, wheels, cache_dir):
    pytest.importorskip("torch")
    env = Env.from_toml(demo_spec(tmp_path, wheels, name="torch-shared", extra='share = ["torch"]'),
                        cache_dir=cache_dir)
    wenv = resolve_env(env, progress=False)
    assert len(wenv.pythonpath) == 2
    share = wenv.pythonpath[1]
    assert "torch" in os.listdir(share) and not any(n.startswith(("pytest", "numpy")) for n in os.listdir(share))
    out = run_in(wenv, textwrap.dedent("""
        import importlib.util, importlib.metadata, torch, demo_dep
        print(torch.ones(3).sum().item(), importlib.metadata.version("torch"))
        print(importlib.util.find_spec("pytest") is None, importlib.util.find_spec("_pytest") is None)
    """))
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    import torch

    assert first == f"3.0 {torch.__version__}"
    assert second == "True True"
    assert "torch" not in env.installed()  # shared, not installed: the env stays small


def test_share_skips_what_the_env_installs(tmp_path, wheels, cache_dir):
    pytest.importorskip("jinja2")
    # jinja2 depends on MarkupSafe; the env installs its own (fake 99.0) MarkupSafe.
    p = write_spec(tmp_path / "j", f"""
        requirements = ["markupsafe==99.0"]
        find_links = ["{wheels}"]
        no_index = true
        share = ["jinja2"]
    """)
    wenv = resolve_env(Env.from_toml(p, cache_dir=cache_dir), progress=False)
    names = os.listdir(wenv.pythonpath[1])
    assert "jinja2" in names and "markupsafe" not in names
    out = run_in(wenv, "import importlib.util, markupsafe; print(markupsafe.__version__); "
                       "print(importlib.util.find_spec('jinja2').origin)")
    version, jinja_origin = out.stdout.split()
    assert version == "99.0", out.stderr  # the env's own copy wins
    assert jinja_origin.startswith(wenv.pythonpath[1])


def test_share_needs_the_hosts_python_version(tmp_path, cache_dir):
    other = [i for i in find_interpreters() if i.minor != sys.version_info[:2] and i.minor >= (3, 10)]
    if not other:
        pytest.skip("no second Python version on this machine")
    p = write_spec(tmp_path, f'python = "{other[0].minor[0]}.{other[0].minor[1]}"\nshare = ["torch"]\n')
    with pytest.raises(EnvSpecError, match="needs the env's Python to match the host's"):
        Env.from_toml(p, cache_dir=cache_dir).path


def test_env_vars_reach_the_worker_environment(tmp_path, wheels, cache_dir):
    p = demo_spec(tmp_path, wheels, name="vars", extra='[environment]\nDEMO_FLAG = "on"\nTHREADS = 2')
    wenv = resolve_env(p, progress=False)
    assert wenv.env_vars == {"DEMO_FLAG": "on", "THREADS": "2"}
    assert run_in(wenv, "import os; print(os.environ['DEMO_FLAG'])").stdout.strip() == "on"


# -- resolve_env with paths ---------------------------------------------------------------

def test_resolve_interpreter_and_env_directories(built_env, tmp_path):
    by_dir = resolve_env(built_env.path)  # a venv directory
    by_exe = resolve_env(built_env.python)  # an interpreter
    assert by_dir.python == by_exe.python == built_env.python
    assert by_dir.python_version == sys.version_info[:2] and not by_dir.is_current
    assert sorted(os.listdir(by_dir.pythonpath[0])) == ["cloudpickle", "comfy_env"]
    # A pixi project directory: the interpreter sits in .pixi/envs/default/bin.
    pixi_bin = tmp_path / "proj" / ".pixi" / "envs" / "default" / "bin"
    pixi_bin.mkdir(parents=True)
    os.symlink(built_env.python, pixi_bin / "python")
    assert resolve_env(tmp_path / "proj").python == str(pixi_bin / "python")
    # A directory holding a comfy-env.toml is resolved as that spec.
    assert resolve_env(os.path.dirname(built_env.spec.source)).python == built_env.python


def test_resolve_bad_paths_and_types(tmp_path):
    with pytest.raises(InterpreterNotFound, match=r"does not exist \(nor is it a command on PATH\); expected a"):
        resolve_env(tmp_path / "missing")
    with pytest.raises(InterpreterNotFound, match="nor is it a command on PATH"):
        resolve_env("python3.99")

    with pytest.raises(InterpreterNotFound, match=r"holds no Python interpreter \(looked for bin/python"):
        resolve_env(tmp_path)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(InterpreterNotFound, match="not executable"):
        resolve_env(tmp_path / "notes.txt")
    old = [i for i in find_interpreters() if (3, 0) <= i.minor < (3, 10)]
    if old:
        with pytest.raises(UnsupportedInterpreter, match=r"workers need Python 3.10 or newer"):
            resolve_env(old[0].executable)
    with pytest.raises(TypeError, match="env must be None, a path"):
        resolve_env(42)
    assert resolve_env(None).is_current


def test_env_with_another_python_version(tmp_path, wheels, cache_dir):
    other = [i for i in find_interpreters() if i.minor != sys.version_info[:2] and i.minor >= (3, 10)]
    if not other:
        pytest.skip("no second Python version on this machine")
    minor = other[0].minor
    p = demo_spec(tmp_path, wheels, name="other-python", extra=f'python = "{minor[0]}.{minor[1]}"')
    wenv = resolve_env(p, progress=False)
    assert wenv.python_version == minor
    out = run_in(wenv, "import sys, comfy_env.envs, cloudpickle, demo_dep; print(sys.version_info[:2])")
    assert out.stdout.strip() == str(minor), out.stderr


# -- fallback without uv ------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(120)
def test_without_uv_falls_back_to_venv_and_pip_with_a_warning(tmp_path, wheels, monkeypatch):
    monkeypatch.setenv(builder.UV_ENV_VAR, "")
    env = Env.from_toml(demo_spec(tmp_path, wheels, name="pip-built"), cache_dir=str(tmp_path / "c"))
    with pytest.warns(RuntimeWarning, match="uv not found"):
        env.create(progress=False)
    out = subprocess.run([env.python, "-c", "import demo_dep; print(demo_dep.VERSION)"],
                         capture_output=True, text=True)
    assert out.stdout.strip() == "1.0"


# -- the CLI --------------------------------------------------------------------------------

def test_cli_create_list_path_remove(tmp_path, wheels, capsys):
    from comfy_env.cli import main

    cache = str(tmp_path / "cli-cache")
    spec = demo_spec(tmp_path, wheels, name="cli")
    assert main(["env", "path", spec, "--cache-dir", cache]) == 1
    assert "not built yet" in capsys.readouterr().err
    assert main(["env", "create", spec, "--cache-dir", cache]) == 0
    out = capsys.readouterr()
    assert "built in" in out.out and "demo-dep==1.0" in out.err  # installer output was shown
    assert main(["env", "create", "-q", spec, "--cache-dir", cache]) == 0
    assert "(cached)" in capsys.readouterr().out
    assert main(["env", "list", "--cache-dir", cache]) == 0
    assert " cli " in capsys.readouterr().out
    assert main(["env", "path", "--python", spec, "--cache-dir", cache]) == 0
    py = capsys.readouterr().out.strip()
    assert os.path.isfile(py)
    assert main(["env", "remove", spec, "--cache-dir", cache]) == 0
    assert not os.path.exists(py)
    assert main(["env", "create", "-q", spec, "--cache-dir", cache]) == 0
    assert main(["env", "remove", "--all", "--cache-dir", cache]) == 0
    assert "removed 1 environment" in capsys.readouterr().out
    assert main(["env", "remove", "--cache-dir", cache]) == 1
    assert main(["env", "create", str(tmp_path / "nope.toml")]) == 1
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("args,why", [
    (["env", "prune", "--days", "nan"], "--days: must be a number of days >= 0, not 'nan'"),
    (["env", "prune", "--days", "-1"], "--days: must be a number of days >= 0, not '-1'"),
    (["env", "list", "--cache-dir", ""], "--cache-dir: must name a directory"),
    (["env", "list", "--cache-dir", __file__], "exists and is not a directory"),
])
def test_cli_refuses_bad_option_values(capsys, args, why):
    from comfy_env.cli import main
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and why in capsys.readouterr().err


def test_cli_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    from comfy_env import cli
    from comfy_env.envs import cli as env_cli

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(env_cli, "_list", interrupted)
    assert cli.main(["env", "list"]) == 130
    assert capsys.readouterr().err == "comfy-env: interrupted\n"


def test_cli_a_process_that_waited_for_anothers_build_says_cached(tmp_path, wheels, capsys, monkeypatch):
    """The build lock was held by another process, which built it: this one built nothing."""
    from comfy_env.cli import main
    from comfy_env.envs import builder as b
    cache = str(tmp_path / "cli-cache")
    spec = demo_spec(tmp_path, wheels, name="waiter")
    real = b.build_env

    def built_meanwhile(final, spec, interp, **kw):
        real(final, spec, interp, progress=False, label=kw.get("label"), key=kw.get("key"), lock=kw.get("lock"))
        return False            # what build_env says when it found the env built after its wait
    monkeypatch.setattr("comfy_env.envs.env.build_env", built_meanwhile)
    assert main(["env", "create", "-q", spec, "--cache-dir", cache]) == 0
    assert "(cached)" in capsys.readouterr().out


def test_cli_entry_point_runs_as_a_program(tmp_path):
    out = subprocess.run([sys.executable, "-m", "comfy_env.cli", "env", "--help"], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=SRC))
    assert out.returncode == 0 and "create" in out.stdout and "remove" in out.stdout


def test_ctrl_c_during_the_install_leaves_no_env_and_no_staging(tmp_path, wheels):
    env = Env.from_toml(demo_spec(tmp_path, wheels, name="interrupted"), cache_dir=str(tmp_path / "c"))

    def interrupt_during_install(line):
        if "environment at" in line:  # uv's install step has started
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        env.create(progress=interrupt_during_install)
    envs_dir = os.path.dirname(env.path)
    assert os.listdir(envs_dir) == []  # no staging dir, and the build lock deleted itself
    env.create(progress=False)
    assert env.is_built


def test_interpreter_probes_are_cached_on_disk(cache_dir):
    from comfy_env.envs import interpreters

    other = [i for i in find_interpreters() if i.minor != sys.version_info[:2]]
    if not other:
        pytest.skip("no second Python on this machine")
    interpreters._probe_cache.clear()
    interpreters.probe(other[0].path)  # started once, written to <cache>/interpreters.json
    data = json.loads(open(os.path.join(cache_dir, "interpreters.json")).read())
    assert other[0].path in data
    interpreters._probe_cache.clear()
    t0 = time.perf_counter()
    assert interpreters.probe(other[0].path) == other[0]
    assert time.perf_counter() - t0 < 0.01  # read back, not started again


def test_a_bare_interpreter_name_is_found_on_path():
    import shutil
    name = "python%d.%d" % sys.version_info[:2]
    if not shutil.which(name):
        pytest.skip(f"no {name} on PATH")
    wenv = resolve_env(name)
    assert wenv.python_version[:2] == sys.version_info[:2]
    assert os.path.realpath(wenv.python) == os.path.realpath(shutil.which(name))


_READ_ONLY_SCRIPT = r"""
set -e
mount --bind -o ro "$CACHE" "$CACHE"
"$PY" -m comfy_env.cli env list --cache-dir "$CACHE"
"$PY" -m comfy_env.cli env prune --dry-run --cache-dir "$CACHE"
"$PY" -c "
from comfy_env import IsolatedExecutor
from comfy_env.envs import Env
with IsolatedExecutor(env=Env.from_toml('$SPEC', cache_dir='$CACHE')) as ex:
    print('worker says', ex.submit('sys:getrecursionlimit').result(60))
"
set +e
"$PY" -m comfy_env.cli env remove "$SPEC" --cache-dir "$CACHE"
echo "remove rc=$?"
"""


@pytest.mark.timeout(180)
def test_a_read_only_cache_still_lists_and_runs_its_built_envs(tmp_path, wheels):
    """A cache mounted read-only (shared between users, a container image): listing,
    a dry-run prune and workers of an env built there work; what would write fails with
    one line, not a traceback."""
    import shutil as sh
    if sh.which("unshare") is None or sh.which("mount") is None:
        pytest.skip("needs unshare and mount")
    cache = str(tmp_path / "ro-cache")
    spec = demo_spec(tmp_path, wheels, name="ro")
    env = Env.from_toml(spec, cache_dir=cache).create(progress=False)
    from comfy_env import IsolatedExecutor
    with IsolatedExecutor(env=env) as ex:      # its bootstrap dir and lease file exist now
        assert ex.submit("sys:getrecursionlimit").result(60) > 0
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a mount namespace here: {probe.stderr.decode()[:200]}")
    out = subprocess.run(["unshare", "-m", "sh", "-c", _READ_ONLY_SCRIPT], capture_output=True, text=True,
                         timeout=150, env=dict(os.environ, CACHE=cache, SPEC=spec, PY=sys.executable,
                                               PYTHONPATH=SRC))
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert " ro " in out.stdout and "nothing to prune" in out.stdout and "worker says" in out.stdout, text
    assert "remove rc=1" in out.stdout and "Read-only file system" in out.stderr, text
    assert "Traceback" not in text, text
