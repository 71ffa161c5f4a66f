"""comfy_env: run Python callables in isolated worker processes, each in its own
environment, behind ``concurrent.futures``, moving arrays and GPU tensors without copies.

Names are imported lazily so that a worker starts with the standard library and
cloudpickle only, and ``import comfy_env`` never imports numpy or torch.
"""
from ._version import __version__

TYPE_CHECKING = False   # true for type checkers (they know the name); typing stays unimported
if TYPE_CHECKING:       # type checkers see the real names; at run time they load lazily (below)
    from .envs import Env
    from .errors import (CallTimeout, InitializerFailed, PicklingFailed, ProtocolMismatch,
                         RemoteError, WorkerCrashed, WorkerStartError)
    from .executor import IsolatedExecutor, IsolatedFuture
    from .ipc.placement import to_device
    from .ipc.arrays import shared_empty, shared_like
    from .sandbox import Sandbox, SandboxUnavailable

_EXPORTS = {
    "IsolatedExecutor": ("comfy_env.executor", "IsolatedExecutor"),
    "IsolatedFuture": ("comfy_env.executor", "IsolatedFuture"),
    "WorkerCrashed": ("comfy_env.errors", "WorkerCrashed"),
    "CallTimeout": ("comfy_env.errors", "CallTimeout"),
    "WorkerStartError": ("comfy_env.errors", "WorkerStartError"),
    "InitializerFailed": ("comfy_env.errors", "InitializerFailed"),
    "PicklingFailed": ("comfy_env.errors", "PicklingFailed"),
    "RemoteError": ("comfy_env.errors", "RemoteError"),
    "ProtocolMismatch": ("comfy_env.errors", "ProtocolMismatch"),
    "Env": ("comfy_env.envs", "Env"),
    "Sandbox": ("comfy_env.sandbox", "Sandbox"),
    "SandboxUnavailable": ("comfy_env.sandbox", "SandboxUnavailable"),
    "shared_empty": ("comfy_env.ipc.arrays", "shared_empty"),
    "shared_like": ("comfy_env.ipc.arrays", "shared_like"),
    "to_device": ("comfy_env.ipc.placement", "to_device"),
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    try:
        modname, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'comfy_env' has no attribute {name!r}") from None
    import importlib

    value = getattr(importlib.import_module(modname), attr)
    globals()[name] = value
    return value


def __dir__():
    return __all__
