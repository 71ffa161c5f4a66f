"""The import graph keeps its layers (docs/architecture.md, "Layers").

A static walk of every ``import`` in src/comfy_env, the ones inside functions
included: a lazy import is still a dependency, and the cycles this guards
against ran through lazy imports.

* nothing in ``comfy_env.ipc`` imports upward (the executor, the worker, the
  environments, diagnostics, or the ``comfy_env`` package itself);
* ``comfy_env.ipc`` has no import cycle;
* the parent (``comfy_env.executor``) and the worker (``comfy_env.worker``)
  share ``comfy_env.ipc``, never each other.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "comfy_env"

# What ipc may import of ours: the layers below it.
IPC_MAY_IMPORT = ("comfy_env.ipc", "comfy_env.forksafe", "comfy_env.stdfds", "comfy_env.errors",
                  "comfy_env._version", "comfy_env.settings")


def _modules():
    mods = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(SRC).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        mods[".".join(parts)] = (path, is_pkg)
    return mods


MODULES = _modules()


def _target(name):
    """The module ``name`` refers to: itself, or its package for ``pkg.attr``."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(modname):
    path, is_pkg = MODULES[modname]
    package = modname if is_pkg else modname.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            names = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            if n.split(".")[0] != "comfy_env":
                continue
            t = _target(n)
            if t is not None and t != modname:
                out.add(t)
    return out


GRAPH = {m: _imports(m) for m in MODULES}


def _is_in(mod, pkg):
    return mod == pkg or mod.startswith(pkg + ".")


def test_graph_is_read():
    # The walk sees the edges it is meant to judge (a walk that found nothing would pass).
    assert "comfy_env.ipc.codec" in GRAPH["comfy_env.ipc.arrays"]
    assert "comfy_env.ipc.lifetime" in GRAPH["comfy_env.executor.executor"]


@pytest.mark.parametrize("mod", sorted(m for m in MODULES if _is_in(m, "comfy_env.ipc")))
def test_ipc_imports_nothing_above_it(mod):
    bad = sorted(t for t in GRAPH[mod] if not any(_is_in(t, ok) for ok in IPC_MAY_IMPORT))
    assert not bad, f"{mod} imports {bad}: the data plane must not import the layers above it"


def test_ipc_has_no_import_cycle():
    ipc = {m: {t for t in GRAPH[m] if _is_in(t, "comfy_env.ipc") and t != "comfy_env.ipc"}
           for m in MODULES if _is_in(m, "comfy_env.ipc")}
    # Tarjan-free: a DFS that reports the first back edge with its path.
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(ipc.get(m, ())):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle inside comfy_env.ipc: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(ipc):
        if m not in state:
            visit(m)


def test_parent_and_worker_do_not_import_each_other():
    executor = [m for m in MODULES if _is_in(m, "comfy_env.executor")]
    bad = sorted((m, t) for m in executor for t in GRAPH[m] if t == "comfy_env.worker")
    bad += sorted(("comfy_env.worker", t) for t in GRAPH["comfy_env.worker"]
                  if _is_in(t, "comfy_env.executor"))
    assert not bad, f"parent and worker must share comfy_env.ipc, not import each other: {bad}"
