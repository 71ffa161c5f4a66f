"""On-disk cache of a pack's node metadata, so a ComfyUI restart starts no worker.

Key: a hash of everything the metadata can depend on that we can see without
running the pack: the pack's Python sources (and requirement files), the env
spec, the node module names, the comfy-env metadata format, and the Python
version of the worker env when it is known.  Any edit to the pack or its env spec
gives a new key; stale entries for the same pack are removed when a new one is
written.

Location: ``$COMFY_ENV_CACHE_DIR/comfyui-metadata`` if set, else the user cache dir
(platformdirs) ``.../comfy-env/comfyui-metadata``.  One JSON file per pack
(``<pack>-<key>.json``), written atomically (temp file + rename), so a crash
leaves either the old file or the new one.

What it does not see: INPUT_TYPES that change without a source change (e.g. a
combo listing the files of a models folder).  Those are computed once; see
docs/comfyui.md.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile

from .. import settings

__all__ = ["cache_dir", "pack_key", "load", "store", "FORMAT"]

FORMAT = 2                    # bump when the metadata layout changes (2: V3 nodes, cached failures)
_log = logging.getLogger(__name__)

_SOURCE_SUFFIXES = (".py", ".pyi", ".toml", ".cfg")
_SOURCE_NAMES_RE = re.compile(r"^requirements.*\.txt$")
_SKIP_DIRS = {"__pycache__", "node_modules", "site-packages", "web", "js"}


def cache_dir() -> str:
    root = settings.read().cache_dir
    if not root:
        import platformdirs
        root = platformdirs.user_cache_dir("comfy-env", appauthor=False)
    return os.path.join(root, "comfyui-metadata")


def _source_files(pack_dir):
    for dirpath, dirnames, filenames in os.walk(pack_dir):
        # Skip hidden dirs (.git, .venv), caches and any virtual env inside the pack.
        dirnames[:] = sorted(
            d for d in dirnames
            if not d.startswith(".") and d not in _SKIP_DIRS
            and not os.path.exists(os.path.join(dirpath, d, "pyvenv.cfg")))
        for f in sorted(filenames):
            if dirpath == pack_dir and f == "prestartup_script.py":
                # Host-only (ComfyUI runs it at start; the worker never imports it):
                # adding or editing it must not cost a worker start to re-read the nodes.
                continue
            if f.endswith(_SOURCE_SUFFIXES) or _SOURCE_NAMES_RE.match(f):
                yield os.path.join(dirpath, f)


def pack_key(pack_dir, modules, env_fingerprint) -> str:
    """Content hash of a pack's sources plus its env spec (see module docstring)."""
    h = hashlib.sha256()
    h.update(f"comfy-env-metadata-{FORMAT}\0".encode())
    h.update(("\0".join(modules) + "\0").encode())
    h.update(str(env_fingerprint).encode() + b"\0")
    for path in _source_files(pack_dir):
        rel = os.path.relpath(path, pack_dir).replace(os.sep, "/")
        try:
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
        except OSError:
            continue
        h.update(f"{rel}\0{digest}\0".encode())
    return h.hexdigest()[:32]


def _safe(name):
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:80] or "pack"


def _path(pack_name, key):
    return os.path.join(cache_dir(), f"{_safe(pack_name)}-{key}.json")


def load(pack_name, key):
    """The cached metadata for this key, or None (missing, unreadable or mismatched)."""
    path = _path(pack_name, key)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        _log.warning("comfy-env: ignoring unreadable metadata cache %s: %s", path, exc)
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("key") != key:
        return None
    return data.get("metadata")


def store(pack_name, key, metadata):
    """Write the metadata for this key; a failure to write only costs a worker start later."""
    directory = cache_dir()
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"format": FORMAT, "key": key, "pack": pack_name, "metadata": metadata}, f)
        os.replace(tmp, _path(pack_name, key))
    except OSError as exc:
        _log.warning("comfy-env: could not write metadata cache in %s: %s", directory, exc)
        return
    prefix = _safe(pack_name) + "-"
    keep = os.path.basename(_path(pack_name, key))
    for name in os.listdir(directory):
        if name.startswith(prefix) and name.endswith(".json") and name != keep \
                and re.fullmatch(re.escape(prefix) + r"[0-9a-f]{32}\.json", name):
            try:
                os.remove(os.path.join(directory, name))
            except OSError:
                pass
