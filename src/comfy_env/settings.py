"""comfy_env's environment variables: every ``COMFY_ENV_*`` a user may set, read by one parser.

:func:`read` parses them all into a frozen :class:`Settings`, so each variable has
one default, one accepted form and one error: a bad value raises
:class:`SettingsError` naming the variable, what it was set to and what is
accepted.  The table in docs/architecture.md ("Configuration") lists them; a test
keeps it equal to :data:`VARIABLES`.

Modules read their setting where they read the variable before (an arena when it
is made, the CUDA plane when it is installed, an environment build when it starts),
so a variable set before that point still counts, as it always has.

Parent and workers: an executor reads the settings once when it is made (a bad
value fails there, before any worker starts) and sends them to each worker in the
handshake's init config; the worker installs them (:func:`install`), and from then on
:func:`read` in the worker returns the parent's values, whatever the worker's own
environment holds (an env's ``env_vars``, a sandbox).  The few values a worker
reads before its handshake (:mod:`comfy_env.ipc.arrays`' inline bound, read at
import) follow through :func:`on_install`.

Variables comfy_env sets for its own workers (``COMFY_ENV_ROLE``, ``COMFY_ENV_PACK``,
``COMFY_ENV_SHIM``) are markers, not settings: they are not read here.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

__all__ = ["Settings", "SettingsError", "VARIABLES", "default", "install", "on_install",
           "read", "to_wire"]


class SettingsError(ValueError):
    """A ``COMFY_ENV_*`` variable holds a value comfy_env does not accept."""


def _int(lo=None, hi=None):
    def parse(raw):
        v = int(raw)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ValueError
        return v
    parse.accepts = ("an integer" if lo is None else f"an integer >= {lo}" if hi is None
                     else f"an integer from {lo} to {hi}")
    return parse


def _number(lo, hi=None):
    def parse(raw):
        v = float(raw)
        if not (v >= lo and (hi is None or v <= hi)):
            raise ValueError
        return v
    parse.accepts = f"a number >= {lo:g}" if hi is None else f"a number from {lo:g} to {hi:g}"
    return parse


def _choice(*choices):
    def parse(raw):
        if raw not in choices:
            raise ValueError
        return raw
    parse.accepts = " or ".join(repr(c) for c in choices)
    return parse


def _flag(raw):
    return raw.strip().lower() not in ("0", "false", "no", "")


_flag.accepts = "0/false/no (off) or anything else (on)"


def _text(raw):
    return raw


_text.accepts = "any text"


@dataclass(frozen=True)
class Variable:
    name: str           # the environment variable
    field: str          # the Settings attribute
    default: object     # the value when the variable is unset (or empty, see empty_is_unset)
    parse: object       # raw string -> value; raises ValueError on a bad value
    meaning: str
    empty_is_unset: bool = True


# Where each is read: the module named in ``meaning``'s last words.
VARIABLES = (
    Variable("COMFY_ENV_INLINE_BYTES", "inline_bytes", 64 * 1024, _int(0),
             "arrays and tensors below this many bytes travel inside the pickle (ipc/arrays.py)"),
    Variable("COMFY_ENV_ARENA_BYTES", "arena_bytes", 1 << 30, _int(0),
             "bytes of unused shared-memory segments the arena keeps for reuse (ipc/shm.py)"),
    Variable("COMFY_ENV_ARENA_IDLE_S", "arena_idle_s", 30, _int(0),
             "seconds before an unused arena segment is given back (ipc/shm.py)"),
    Variable("COMFY_ENV_CUDA_HEAP", "cuda_heap", "native", _choice("native", "pool", "staging"),
             "where a worker's CUDA results live: torch's native caching allocator in the worker "
             "whatever the parent runs (results zero copy by legacy IPC handle), torch's "
             "allocations in an exportable pool under cudaMallocAsync (zero copy), or copies in "
             "a staging pool (ipc/cuda/local.py, sender.py, executor/worker_allocator.py)"),
    Variable("COMFY_ENV_CUDA_PARENT_HEAP", "cuda_parent_heap", "pool", _choice("torch", "pool"),
             "where the parent's own CUDA tensors live when its torch runs cudaMallocAsync "
             "(ComfyUI): an exportable pool made torch's current pool (sent zero copy from a "
             "tensor's second send on; empty_cache gives its free memory back, except memory a "
             "worker imported, which stays for the parent's own reuse until nothing in that "
             "pool is in use), or torch's default pool, untouched (what the parent sends a "
             "worker is copied once into a staging pool) (ipc/cuda/local.py, ipc/cuda/__init__.py)"),
    Variable("COMFY_ENV_CUDA_FORCE_CPU", "cuda_force_cpu", False, lambda raw: raw == "1",
             "1: send every CUDA tensor through host memory (diagnostics, benchmarks) "
             "(ipc/cuda/sender.py)"),
    Variable("COMFY_ENV_CUDA_ROLL_MIN_IDLE_MIB", "cuda_roll_min_idle_mib", 64, _int(0),
             "MiB of idle staging memory before a sender rolls to a fresh staging block "
             "(ipc/cuda/local.py)"),
    Variable("COMFY_ENV_CUDA_POOL_IMPORT_LIMIT_MIB", "cuda_pool_import_limit_mib", 4096, _int(1),
             "largest single pool allocation a peer may import, in MiB; bigger tensors take "
             "the VMM route (ipc/cuda/paths.py)"),
    Variable("COMFY_ENV_CUDA_SMALL_COPY_MIB", "cuda_small_copy_mib", 16.0, _number(0, 4096),
             "MiB up to which a CUDA tensor sent the first time is copied, not exported; "
             "0: never (ipc/cuda/paths.py)"),
    Variable("COMFY_ENV_CUDA_FRESH_COPY_MIB", "cuda_fresh_copy_mib", None, _number(0),
             "MiB of storage up to which a CUDA tensor a worker sends for the first time is "
             "copied into a recycled staging block rather than exported (default: the pool "
             "import limit; 0: small ones only) (ipc/cuda/paths.py)"),
    Variable("COMFY_ENV_CUDA_IPC_MIN_MIB", "cuda_ipc_min_mib", 16.0, _number(0),
             "MiB of storage above which a CUDA tensor of a process on torch's native allocator "
             "is lent zero copy by a legacy CUDA IPC handle when sent for the first time (any "
             "size when sent again); at or above the pool import limit: never (ipc/cuda/paths.py)"),
    Variable("COMFY_ENV_CUDA_IMPORT_CACHE_MIB", "cuda_import_cache_mib", 256.0, _number(0),
             "MiB of imported pool blocks kept mapped while idle (ipc/cuda/importcache.py)"),
    Variable("COMFY_ENV_CUDA_IMPORT_CACHE_COUNT", "cuda_import_cache_count", 256, _int(0),
             "idle imported blocks kept mapped, and idle peer allocations opened by IPC handle; 0 disables "
             "the cache (ipc/cuda/importcache.py, ipchandles.py)"),
    Variable("COMFY_ENV_CUDA_IMPORT_CACHE_S", "cuda_import_cache_s", 1.0, _number(0),
             "seconds an idle imported block (or IPC mapping) stays mapped; 0 disables the cache "
             "(ipc/cuda/importcache.py, ipchandles.py)"),
    Variable("COMFY_ENV_CUDA_STAGING_CACHE_MIB", "cuda_staging_cache_mib", 4096.0, _number(0),
             "MiB of a peer's staging blocks kept mapped for recycling; 0: no recycling "
             "(ipc/cuda/importcache.py)"),
    Variable("COMFY_ENV_CACHE_DIR", "cache_dir", None, _text,
             "where built environments and the ComfyUI metadata cache live (default: the "
             "user cache directory) (envs/cache.py, comfyui/metadata_cache.py)"),
    Variable("COMFY_ENV_UV", "uv", None, _text,
             "the uv binary to build environments with; empty: no uv, use venv + pip "
             "(envs/builder.py)", empty_is_unset=False),
    Variable("COMFY_ENV_BWRAP", "bwrap", None, _text,
             "the bubblewrap binary for sandboxed workers (default: bwrap on PATH) (sandbox.py)"),
    Variable("COMFY_ENV_INTERRUPT_GRACE", "interrupt_grace", 5.0, _number(0),
             "seconds a ComfyUI node gets to stop after an interrupt before its worker is "
             "killed (comfyui/__init__.py)"),
    Variable("COMFY_ENV_WORKER_SPIN_US", "worker_spin_us", 300, _int(0, 100_000),
             "microseconds a worker polls for its next call after sending a result, while "
             "calls follow results that fast, in pools with fewer workers than CPUs; 0: it "
             "always sleeps (worker.py)"),
    Variable("COMFY_ENV_PRESTART", "prestart", True, _flag,
             "start a ComfyUI pack's worker in the background at load (comfyui/__init__.py)",
             empty_is_unset=False),
)


@dataclass(frozen=True)
class Settings:
    """The values of :data:`VARIABLES`, parsed (see each one's ``meaning``)."""
    inline_bytes: int
    arena_bytes: int
    arena_idle_s: int
    cuda_heap: str
    cuda_parent_heap: str
    cuda_force_cpu: bool
    cuda_roll_min_idle_mib: int
    cuda_pool_import_limit_mib: int
    cuda_small_copy_mib: float
    cuda_fresh_copy_mib: float | None
    cuda_ipc_min_mib: float
    cuda_import_cache_mib: float
    cuda_import_cache_count: int
    cuda_import_cache_s: float
    cuda_staging_cache_mib: float
    cache_dir: str | None
    uv: str | None
    bwrap: str | None
    interrupt_grace: float
    worker_spin_us: int
    prestart: bool


def default(name):
    """The default of variable ``name`` (modules that name it keep no copy of their own)."""
    for var in VARIABLES:
        if var.name == name:
            return var.default
    raise KeyError(name)


_installed: Settings | None = None     # a worker's: the parent's values (install())
_listeners = []


def to_wire(values: Settings) -> dict:
    """``values`` as the plain dict the handshake carries (field -> value)."""
    return dataclasses.asdict(values)


def install(wire: dict) -> Settings:
    """In a worker: make the parent's settings (:func:`to_wire`'s dict) this process's.

    Raises:
        SettingsError: the dict does not hold exactly the fields of :class:`Settings`
            (parent and worker import different comfy_env versions).
    """
    global _installed
    fields = {f.name for f in dataclasses.fields(Settings)}
    if not isinstance(wire, dict) or set(wire) != fields:
        got = sorted(wire) if isinstance(wire, dict) else type(wire).__name__
        raise SettingsError(f"the parent sent settings {got}, this comfy_env expects "
                            f"{sorted(fields)}: parent and worker must import the same comfy_env")
    _installed = Settings(**wire)
    for listener in list(_listeners):
        listener(_installed)
    return _installed


def on_install(listener) -> None:
    """Call ``listener(settings)`` when :func:`install` runs (for values read at import)."""
    _listeners.append(listener)


def read(environ=None) -> Settings:
    """Parse every ``COMFY_ENV_*`` setting from ``environ`` (default ``os.environ``).

    In a worker whose parent sent its settings (:func:`install`), ``read()`` with no
    argument returns those instead.

    Raises:
        SettingsError: a variable holds a value its parser rejects; the message names
            the variable, the value, and what is accepted.
    """
    if environ is None:
        if _installed is not None:
            return _installed
        environ = os.environ
    values = {}
    for var in VARIABLES:
        raw = environ.get(var.name)
        if raw is None or (raw.strip() == "" and var.empty_is_unset):
            values[var.field] = var.default
            continue
        try:
            values[var.field] = var.parse(raw.strip() if var.parse is not _text else raw)
        except (ValueError, OverflowError):
            raise SettingsError(
                f"{var.name}={raw!r} is not valid: it must be {var.parse.accepts} "
                f"({var.meaning}); unset it for the default, {var.default!r}"
            ) from None
    return Settings(**values)
