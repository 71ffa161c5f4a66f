"""comfy_env environments -> Ray ``runtime_env`` dicts.

Two mappings, chosen by :class:`RayExecutor` from the cluster it is connected to:

* :func:`local_runtime_env` (one node, the driver's): the env is built here as for
  ``IsolatedExecutor`` and Ray starts its workers with that env's interpreter
  (``py_executable``).  A Ray worker runs ``import ray``, so Ray must be importable
  there: if the env does not install Ray itself, the driver's Ray and its dependency
  closure are shared into it exactly as ``share = [...]`` shares host packages
  (links to just those distributions, never the host's whole ``site-packages``).
* :func:`cluster_runtime_env` (several nodes, or a ``ray://`` client): an interpreter
  built on the driver's machine does not exist on the other nodes, so the spec's
  requirements go to Ray (``runtime_env["uv"]``) and every node builds the same env;
  ``[environment]`` becomes ``env_vars``.  Ray layers that env over the node's base
  Python (``--system-site-packages``), which is how ``share`` maps: shared packages
  are the ones installed in the nodes' base environment.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from ..envs import Env, WorkerEnvironment, resolve_env
from ..envs.builder import index_args
from ..envs.errors import EnvSpecError
from ..errors import WorkerStartError

__all__ = ["local_runtime_env", "cluster_runtime_env", "TORCH_ZERO_COPY_VAR"]

# Ray's own switch for passing CPU torch tensors through the object store as a
# uint8 view (pickle-5 out-of-band buffer) instead of pickling their storage.
TORCH_ZERO_COPY_VAR = "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"

_probed = {}

# Run in the env's interpreter: is Ray there (which version), and which
# distributions does the env install itself (those must not be shadowed).
_PROBE = """
import importlib.metadata as m, json, sys
try:
    ray_version = m.version("ray")
except m.PackageNotFoundError:
    ray_version = None
names = sorted({(d.metadata["Name"] or "").lower() for d in m.distributions()} - {""})
print(json.dumps({"ray": ray_version, "dists": names}))
"""


def _ray_version():
    import ray
    return ray.__version__


def _run(python, code, pythonpath, timeout=120):
    env = dict(os.environ)
    env.pop("PYTHONHOME", None)
    env["PYTHONPATH"] = os.pathsep.join(pythonpath)
    return subprocess.run([python, "-c", code], capture_output=True, text=True, env=env,
                          timeout=timeout)


def _base_env_vars(extra=None):
    out = {TORCH_ZERO_COPY_VAR: os.environ.get(TORCH_ZERO_COPY_VAR, "1")}
    out.update(extra or {})
    return out


def local_runtime_env(env=None, *, progress=True) -> dict:
    """``runtime_env`` that runs Ray workers on this machine in ``env``.

    ``env``: as for ``IsolatedExecutor`` (None, an ``Env``, a ``comfy-env.toml``, an
    interpreter or an environment directory); an Env is built first if needed.
    Raises :class:`~comfy_env.envs.EnvError` subclasses for bad envs and
    :class:`~comfy_env.errors.WorkerStartError` when Ray cannot run there (checked
    here, by importing it in that interpreter, so a bad env fails now and never
    leaves a task waiting for a worker that cannot start).
    """
    wenv = env if isinstance(env, WorkerEnvironment) else resolve_env(env, progress=progress)
    if wenv.is_current:
        return _driver_runtime_env()
    key = (wenv.python, wenv.pythonpath)
    if key not in _probed:
        _probed[key] = _foreign_pythonpath(wenv)
    pythonpath = _probed[key]
    env_vars = _base_env_vars(wenv.env_vars)
    env_vars["PYTHONPATH"] = os.pathsep.join(pythonpath)
    return {"py_executable": wenv.python, "env_vars": env_vars}


def _default_worker_path():
    import sys as _sys
    return list(_sys.path)


def _driver_runtime_env() -> dict:
    """Workers in the driver's interpreter, seeing the driver's ``sys.path``.

    As IsolatedExecutor's env=None workers, they must import the user's modules
    (functions and argument classes pickled by reference) *before* a task's
    arguments are unpickled, so the path must be set when the worker starts.  Ray's
    default workers already see site-packages, ``PYTHONPATH``, the script's directory
    and the cwd; only when the driver's path has more (a ``sys.path.insert``, pytest's
    rootdir) does the executor need a runtime_env, which costs workers of its own.
    Otherwise none is used, and calls share Ray's pool of started workers with every
    plain ``ray.remote`` task.
    """
    import ray

    seen = set(ray.get(ray.remote(_default_worker_path).options(num_cpus=0).remote()))
    extra = [p for p in sys.path if p and p not in seen and os.path.isdir(p)]
    if not extra:
        return {}
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(extra + inherited)}}


def _foreign_pythonpath(wenv) -> tuple:
    from ..envs.cache import cache_root
    from ..envs.share import share_dir

    pythonpath = list(wenv.pythonpath)
    ours = _ray_version()
    res = _run(wenv.python, _PROBE, pythonpath)
    if res.returncode != 0:
        raise WorkerStartError(f"could not run {wenv.python} to inspect env {wenv.label!r}:\n"
                               f"{res.stderr.strip()[-2000:]}")
    info = json.loads(res.stdout.strip().splitlines()[-1])
    if info["ray"] is not None and info["ray"] != ours:
        raise WorkerStartError(
            f"env {wenv.label!r} installs ray {info['ray']}, the driver runs ray {ours}: Ray needs "
            f"the same version everywhere. Pin 'ray=={ours}' in the env's requirements (or drop it "
            f"there and the driver's Ray is shared into the env).")
    if info["ray"] is None:
        if tuple(wenv.python_version[:2]) != tuple(sys.version_info[:2]):
            raise EnvSpecError(
                f"env {wenv.label!r} runs Python {'.'.join(map(str, wenv.python_version[:2]))} and "
                f"has no Ray; the driver's Ray (Python {sys.version_info[0]}.{sys.version_info[1]}) "
                f"is compiled for another Python and cannot be shared. Add 'ray=={ours}' to the "
                f"env's requirements.")
        # The env's own distributions win over the host's copies (share.py's rule).
        shared = share_dir(cache_root(), ["ray"], exclude=info["dists"])
        if shared:
            pythonpath.append(shared)
    check = _run(wenv.python, "import ray, comfy_env.ray", pythonpath)
    if check.returncode != 0:
        raise WorkerStartError(
            f"Ray workers cannot start in env {wenv.label!r} ({wenv.python}): importing ray "
            f"and comfy_env.ray there failed:\n{check.stderr.strip()[-2000:]}")
    return tuple(pythonpath)


def cluster_runtime_env(env) -> dict:
    """``runtime_env`` that makes every node of a cluster build ``env`` (an Env or a toml).

    Uses Ray's ``uv`` field (Ray creates a virtualenv per node over the node's base
    Python and installs the requirements with uv).  Local files in ``requirements`` or
    ``find_links`` exist only on this machine: they are refused with a message.
    """
    if env is None:
        return {}
    if isinstance(env, (str, os.PathLike)):
        path = os.fspath(env)
        if path.endswith(".toml") or os.path.isdir(path) and os.path.isfile(
                os.path.join(path, "comfy-env.toml")):
            env = Env.from_toml(path)
        else:
            # An interpreter path: usable when every node has it at the same place
            # (a shared filesystem or identical images); Ray cannot check that for us.
            return {"py_executable": os.path.abspath(path), "env_vars": _base_env_vars()}
    if not isinstance(env, Env):
        raise TypeError(f"env must be None, an Env, a comfy-env.toml or an interpreter path, "
                        f"not {type(env).__name__}")
    spec = env.spec
    if spec.python is not None and tuple(spec.python[:2]) != tuple(sys.version_info[:2]):
        raise EnvSpecError(
            f"env {spec.name!r} asks for Python {'.'.join(map(str, spec.python))}, but Ray runs "
            f"every worker of a job on the driver's Python ({sys.version_info[0]}."
            f"{sys.version_info[1]}): on a cluster, use that version.", spec.source, spec.python_line)
    local = [r for r in spec.requirements if os.path.isabs(r.split("@")[-1].strip())]
    local += [f for f in spec.find_links if os.path.exists(f)]
    if local:
        raise EnvSpecError(
            f"env {spec.name!r} names local files {local}: other nodes of the cluster cannot "
            "install from them. Publish them to an index every node can reach (index_url / "
            "extra_index_urls) or use a shared filesystem path.", spec.source)
    options = index_args(spec)
    uv = {"packages": list(spec.requirements)}
    if options:
        uv["uv_pip_install_options"] = options
    return {"uv": uv, "env_vars": _base_env_vars(spec.environment)}
