"""The public API documents itself: docstrings, type hints, and ``py.typed`` in the package."""
from __future__ import annotations

import inspect
import os
import sys

import pytest

import comfy_env

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

PUBLIC = [n for n in comfy_env.__all__ if n != "__version__"]

# Methods users call (Executor/Future methods inherited unchanged are documented upstream).
METHODS = {
    "IsolatedExecutor": ["__init__", "submit", "map", "shutdown", "worker_pids"],
    "IsolatedFuture": ["result", "lazy_result"],
    "Env": ["from_toml", "from_dict", "create", "remove", "installed"],
}


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_name_has_a_docstring(name):
    obj = getattr(comfy_env, name)
    assert inspect.getdoc(obj), f"comfy_env.{name} has no docstring"


@pytest.mark.parametrize("cls,meth", [(c, m) for c, ms in METHODS.items() for m in ms])
def test_public_methods_are_documented_and_annotated(cls, meth):
    fn = inspect.unwrap(getattr(getattr(comfy_env, cls), meth))
    if isinstance(fn, (classmethod, staticmethod)):
        fn = fn.__func__
    if meth != "__init__":      # __init__'s arguments are documented in the class docstring
        assert fn.__doc__ and fn.__doc__.strip(), f"{cls}.{meth} has no docstring"
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.name not in ("self", "cls")]
    missing = [p.name for p in params if p.annotation is inspect.Parameter.empty]
    assert not missing, f"{cls}.{meth}: parameters without a type hint: {missing}"
    assert sig.return_annotation is not inspect.Signature.empty, f"{cls}.{meth}: no return type"


@pytest.mark.parametrize("name", ["shared_empty", "shared_like", "to_device"])
def test_public_functions_are_annotated(name):
    sig = inspect.signature(getattr(comfy_env, name))
    missing = [p.name for p in sig.parameters.values() if p.annotation is inspect.Parameter.empty]
    assert not missing and sig.return_annotation is not inspect.Signature.empty


def test_executor_docstring_names_every_argument():
    doc = inspect.getdoc(comfy_env.IsolatedExecutor)
    params = [p for p in inspect.signature(comfy_env.IsolatedExecutor.__init__).parameters
              if p != "self"]
    missing = [p for p in params if f"{p}:" not in doc]
    assert not missing, f"IsolatedExecutor's docstring does not describe {missing}"


def test_py_typed_ships_with_the_package():
    pkg = os.path.dirname(comfy_env.__file__)
    assert os.path.isfile(os.path.join(pkg, "py.typed"))
    root = os.path.dirname(os.path.dirname(pkg))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        data = tomllib.load(f)
    assert "py.typed" in data["tool"]["setuptools"]["package-data"]["comfy_env"]
