"""``RayExecutor``: the ``concurrent.futures`` interface of comfy_env on a Ray cluster.

Ray does the scheduling, the worker processes, the object store and the
cluster; this package only maps comfy_env's ideas onto it: an ``env`` becomes a
``runtime_env`` (:mod:`.runtime_env`), a call becomes a Ray task running
:func:`.task.run_call`, a Ray ``ObjectRef`` completes a
``concurrent.futures.Future`` (:mod:`.executor`).

``import comfy_env`` never imports Ray; importing this package does, and says
which extra to install when Ray is missing.
"""
from __future__ import annotations

import os
import sys

if "ray" not in sys.modules:
    # Ray reads this once, when it is imported: CPU torch tensors then travel through
    # the object store as a byte view instead of a pickled copy.  A local Ray started
    # from here passes it on to its workers; RayExecutor sets it for env workers too.
    os.environ.setdefault("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1")

try:
    import ray as _ray  # noqa: F401  (fail here, with the extra's name, not deep inside a call)
except ImportError as exc:  # exercised by a subprocess test
    raise ModuleNotFoundError(
        "comfy_env.ray needs Ray, which could not be imported in this environment "
        f"({exc}). Install the extra: pip install 'comfy-env[ray]'",
        name="ray",
    ) from exc

from .executor import RayExecutor, RayFuture, writable  # noqa: E402
from .runtime_env import cluster_runtime_env, local_runtime_env  # noqa: E402

__all__ = ["RayExecutor", "RayFuture", "writable", "local_runtime_env", "cluster_runtime_env"]
