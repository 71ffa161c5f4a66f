"""Where built environments live, and how a spec maps to a directory.

Layout under the cache root (``$COMFY_ENV_CACHE_DIR``, else the platform's user cache
dir, e.g. ``~/.cache/comfy-env``)::

    envs/<key>/                 a finished env (exists only once fully built: it is renamed in)
    envs/<key>.lock             held by its builder (or remover); deleted when it is done
    envs/<key>.use              held (shared) by its live workers; mtime = last use
    envs/.tmp-<key>-*           a build in progress (or the remains of a killed one)
    bootstrap/<hash>/           comfy_env + cloudpickle, linked for foreign workers
    share/<hash>/               links to host packages shared into envs

``<key>`` hashes what decides the env's content: the normalised spec (or the lock it is
installed from), the interpreter (path and full version) and the platform.  The same
spec on the same machine always lands in the same directory and a second ``create``
is a directory lookup.  ``name`` is only a label (kept in the env's metadata): renaming
a spec, or moving it to another directory, finds the same env.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

from .. import settings

__all__ = ["CACHE_ENV_VAR", "META_FILENAME", "cache_root", "env_key", "envs_dir", "list_envs", "env_usage",
           "remove_env", "prune"]

CACHE_ENV_VAR = "COMFY_ENV_CACHE_DIR"
META_FILENAME = "comfy-env-env.json"   # written into every finished env; `env list` reads it
_KEY_FORMAT = 2                         # bump when the layout of a built env changes


def cache_root(cache_dir=None) -> str:
    """The cache root: the argument, else ``$COMFY_ENV_CACHE_DIR``, else the user cache dir."""
    if cache_dir is None:
        cache_dir = settings.read().cache_dir
    if cache_dir is None:
        import platformdirs

        cache_dir = platformdirs.user_cache_dir("comfy-env", appauthor=False)
    return os.path.abspath(os.path.expanduser(os.fspath(cache_dir)))


def envs_dir(root: str) -> str:
    return os.path.join(root, "envs")


def short_hash(obj) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def env_key(spec, interp, lock=None) -> str:
    """Content key of a built env: spec (or the lock it installs from) + interpreter + platform."""
    material = spec.key_material()
    if lock is not None:
        # Installed from a lock: the lock decides what is installed, not the loose requirements.
        material = {"lock": lock.digest, "share": material["share"]}
    return short_hash({
        "format": _KEY_FORMAT,
        "spec": material,
        "interpreter": os.path.realpath(interp.executable),
        "version": list(interp.version),
        "platform": interp.platform,
    })


def read_meta(env_dir: str) -> dict | None:
    try:
        with open(os.path.join(env_dir, META_FILENAME), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _entries(d: str) -> list:
    """``(name, path)`` of each entry of directory ``d``, sorted; none when ``d`` does not exist."""
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return []
    return [(n, os.path.join(d, n)) for n in names]


def list_envs(root: str) -> list:
    """Finished envs under ``root``: a list of (directory, meta dict)."""
    out = []
    for n, p in _entries(envs_dir(root)):
        if n.startswith(".") or not os.path.isdir(p):
            continue
        meta = read_meta(p)
        if meta is not None:
            out.append((p, meta))
    return out


def dir_size(path: str) -> int:
    """Bytes in the files under ``path`` (links not followed; a hardlinked file counts in full)."""
    total = 0
    stack = [path]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            stack.append(e.path)
                        else:
                            total += e.stat(follow_symlinks=False).st_size
                    except OSError:
                        continue
        except OSError:
            continue
    return total


def env_usage(env_dir: str, meta: dict) -> dict:
    """Size, creation and last use of a built env (last use: a worker started in it)."""
    from .locks import is_in_use, last_use

    created = meta.get("created") or _mtime(env_dir)
    used = last_use(env_dir)
    return {
        "size": dir_size(env_dir),
        "created": created,
        "last_used": max(used, created) if used else created,
        "in_use": is_in_use(env_dir),
    }


def _mtime(path):
    try:
        return os.stat(path).st_mtime
    except OSError:
        return time.time()


def remove_env(env_dir: str) -> bool:
    """Delete a built env; refuse (EnvInUse) while live workers run in it.

    Returns whether something was removed.  Waits for a build of it in progress.
    """
    from .errors import EnvInUse
    from .locks import build_lock, exclusive_use

    with build_lock(env_dir):
        with exclusive_use(env_dir, delete=True) as free:
            if not free:
                raise EnvInUse(
                    f"{env_dir} is in use by running workers (an IsolatedExecutor in this or another "
                    "process); shut them down first. An executor whose env was removed rebuilds it "
                    "when it next starts a worker."
                )
            if not os.path.exists(env_dir):
                return False
            shutil.rmtree(env_dir)
            return True


def prune(root: str, older_than_days: float, dry_run: bool = False) -> list:
    """Remove envs unused for ``older_than_days`` and the remains of dead builds.

    Returns ``(what, path)`` pairs: "env", "staging", "lock", "use".  Envs in use, and
    builds in progress, are left alone.
    """
    from .errors import EnvInUse
    from .locks import exclusive_use, try_build_lock

    d = envs_dir(root)
    cutoff = time.time() - older_than_days * 86400
    removed = []
    for path, meta in list_envs(root):
        if env_usage(path, meta)["last_used"] >= cutoff:
            continue
        if dry_run:
            removed.append(("env", path))
            continue
        try:
            if remove_env(path):
                removed.append(("env", path))
        except EnvInUse:
            continue
    for n, p in _entries(d):
        if n.startswith(".tmp-"):
            final = os.path.join(d, n[len(".tmp-"):].split("-", 1)[0])
            with try_build_lock(final) as ours:   # held while its builder lives
                if ours:
                    removed.append(("staging", p))
                    if not dry_run:
                        shutil.rmtree(p, ignore_errors=True)
        elif n.endswith(".use") and not os.path.isdir(p[: -len(".use")]):
            with exclusive_use(p[: -len(".use")], delete=not dry_run) as free:
                if free:
                    removed.append(("use", p))
        elif n.endswith(".lock") and not os.path.isdir(p[: -len(".lock")]):
            # A lock file left by an older comfy-env (ours delete themselves); held = a build running.
            if dry_run:
                removed.append(("lock", p))
                continue
            with try_build_lock(p[: -len(".lock")]) as ours:  # taking it deletes it on release
                if ours:
                    removed.append(("lock", p))
    return removed
