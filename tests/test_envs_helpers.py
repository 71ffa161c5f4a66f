"""Helpers for the env tests: tiny wheels written directly (no build backend, no network)."""
from __future__ import annotations

import base64
import hashlib
import os
import zipfile

import pytest

# Nothing to collect here; pytest imports this module because of its name.
__test__ = False


def make_wheel(outdir, name: str, version: str, files: dict, requires=()) -> str:
    """Write ``<name>-<version>-py3-none-any.whl`` holding ``files`` ({relpath: text})."""
    os.makedirs(outdir, exist_ok=True)
    dist_info = f"{name}-{version}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    contents = dict(files)
    contents[f"{dist_info}/METADATA"] = meta
    contents[f"{dist_info}/WHEEL"] = ("Wheel-Version: 1.0\nGenerator: comfy-env-tests\n"
                                      "Root-Is-Purelib: true\nTag: py3-none-any\n")
    record = []
    for path, text in contents.items():
        data = text.encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    contents[f"{dist_info}/RECORD"] = "\n".join(record) + "\n"
    whl = os.path.join(outdir, f"{name}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(whl, "w") as z:
        for path, text in contents.items():
            z.writestr(path, text)
    return whl


def demo_dep_wheel(outdir, version: str) -> str:
    """``demo_dep`` at ``version``: ``demo_dep.VERSION`` and a function that reports it."""
    code = (
        f"VERSION = {version!r}\n"
        "def describe(x=None):\n"
        "    import sys\n"
        "    return {'version': VERSION, 'python': sys.version_info[:2], 'x': x}\n"
        "def where():\n"
        "    return __file__\n"
        "def transform(a):\n"
        "    # 1.x and 2.x disagree on purpose: the result tells which one ran.\n"
        "    return a * float(VERSION.split('.')[0])\n"
    )
    return make_wheel(outdir, "demo_dep", version, {"demo_dep/__init__.py": code})


def write_spec(directory, body: str) -> str:
    """Write ``comfy-env.toml`` (dedented) into ``directory``; return its path."""
    import textwrap

    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "comfy-env.toml")
    with open(path, "w") as f:
        f.write(textwrap.dedent(body).lstrip())
    return path


def demo_spec(directory, wheels, requirement="demo_dep==1.0", extra="") -> str:
    """A spec installing ``requirement`` offline from the wheels dir ``wheels``."""
    return write_spec(directory, f"""
        requirements = ["{requirement}"]
        find_links = ["{wheels}"]
        no_index = true
        {extra}
    """)


def uv_wrapper(tmp_path, real_uv) -> tuple:
    """A uv stand-in that logs each invocation and obeys a few test knobs (env vars):

    UV_WRAPPER_STALL=FILE   ``pip install``: write its pid to FILE, then sleep (the "installer" hangs)
    UV_WRAPPER_DELAY=S      ``pip install``: sleep S seconds first, silently
    UV_WRAPPER_PYTHON=EXE   ``python install X``: "download" by linking EXE into uv's python dir

    Returns (wrapper path, log path).
    """
    log = os.path.join(str(tmp_path), "uv-calls.log")
    wrapper = os.path.join(str(tmp_path), "uv-wrapper")
    with open(wrapper, "w") as f:
        f.write(f"""#!/bin/sh
echo "$*" >> "{log}"
if [ "$1" = pip ] && [ "$2" = install ] && [ -n "$UV_WRAPPER_STALL" ]; then
    echo $$ > "$UV_WRAPPER_STALL.tmp" && mv "$UV_WRAPPER_STALL.tmp" "$UV_WRAPPER_STALL"
    exec sleep 60
fi
if [ "$1" = pip ] && [ "$2" = install ] && [ -n "$UV_WRAPPER_DELAY" ]; then sleep "$UV_WRAPPER_DELAY"; fi
if [ "$1" = python ] && [ "$2" = install ] && [ -n "$UV_WRAPPER_PYTHON" ]; then
    d="$UV_PYTHON_INSTALL_DIR/cpython-$3.99-linux-x86_64-gnu/bin"
    mkdir -p "$d" && ln -s "$UV_WRAPPER_PYTHON" "$d/python3" && echo "Installed Python $3" && exit 0
fi
exec "{real_uv}" "$@"
""")
    os.chmod(wrapper, 0o755)
    open(log, "w").close()
    return wrapper, log


def uv_calls(log) -> list:
    with open(log) as f:
        return f.read().splitlines()


# Fixtures the env test modules share: a test module takes one by importing its name.

@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    """A find-links directory holding demo_dep 1.0, one per test module."""
    d = tmp_path_factory.mktemp("wheels")
    demo_dep_wheel(d, "1.0")
    return str(d)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh env cache (COMFY_ENV_CACHE_DIR) for one test."""
    d = str(tmp_path / "cache")
    monkeypatch.setenv("COMFY_ENV_CACHE_DIR", d)
    return d


@pytest.fixture
def uv_log(tmp_path, monkeypatch):
    """Builds go through :func:`uv_wrapper` around the real uv; its call log (see :func:`uv_calls`)."""
    from comfy_env.envs import builder

    wrapper, log = uv_wrapper(tmp_path, builder.find_uv())
    monkeypatch.setenv(builder.UV_ENV_VAR, wrapper)
    return log
