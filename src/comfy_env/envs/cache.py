"""Where built environments live, and how a spec maps to a directory.

Layout under the cache root (``$COMFY_ENV_CACHE_DIR``, else the platform's user cache
dir, e.g. ``~/.cache/comfy-env``)::

    envs/<name>-<key>/          a finished env (exists only once fully built: it is renamed in)
    envs/<name>-<key>.lock      the file lock its builders take
    envs/.tmp-<name>-<key>-*    a build in progress (or the remains of a killed one)
    bootstrap/<hash>/           comfy_env + cloudpickle, linked for foreign workers
    share/<hash>/               links to host packages shared into envs

``<key>`` hashes the normalised spec, the interpreter (path and full version) and the
platform, so the same spec on the same machine always lands in the same directory and
a second ``create`` is a directory lookup.
"""
from __future__ import annotations

import hashlib
import json
import os

__all__ = ["CACHE_ENV_VAR", "META_FILENAME", "cache_root", "env_key", "envs_dir"]

CACHE_ENV_VAR = "COMFY_ENV_CACHE_DIR"
META_FILENAME = "comfy-env-env.json"   # written into every finished env; `env list` reads it
_KEY_FORMAT = 1                         # bump when the layout of a built env changes


def cache_root(cache_dir=None) -> str:
    """The cache root: the argument, else ``$COMFY_ENV_CACHE_DIR``, else the user cache dir."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV_VAR) or None
    if cache_dir is None:
        import platformdirs

        cache_dir = platformdirs.user_cache_dir("comfy-env", appauthor=False)
    return os.path.abspath(os.path.expanduser(os.fspath(cache_dir)))


def envs_dir(root: str) -> str:
    return os.path.join(root, "envs")


def short_hash(obj) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def env_key(spec, interp) -> str:
    """Content key of a built env: spec + interpreter + platform."""
    return short_hash({
        "format": _KEY_FORMAT,
        "spec": spec.key_material(),
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


def list_envs(root: str) -> list:
    """Finished envs under ``root``: a list of (directory, meta dict)."""
    d = envs_dir(root)
    out = []
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return out
    for n in names:
        p = os.path.join(d, n)
        if n.startswith(".") or not os.path.isdir(p):
            continue
        meta = read_meta(p)
        if meta is not None:
            out.append((p, meta))
    return out
