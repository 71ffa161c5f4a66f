"""Lock files: the exact distributions (versions, files, hashes) an env installs.

A lock is uv's PEP 751 ``pylock.toml`` output (``uv pip compile --format pylock.toml``)
with a comment header of our own::

    # comfy-env-inputs = "<hash of what was resolved>"
    # comfy-env-python = "3.11"
    # comfy-env-platform = "linux-x86_64-CPython"

Every build resolves once, writes the lock into the env (``<env>/pylock.comfy-env.toml``)
and installs from it.  ``comfy-env env lock`` writes the lock next to the spec
(``pylock.comfy-env.toml``); while that lock is fresh, builds install exactly what it
lists and resolve nothing, and the cache key hashes the lock, so two machines with the
same lock build the same thing.  A lock is stale when what it was resolved from changed:
the requirements, indexes, find-links, ``share``, ``exclude_newer``, or the Python
minor version / platform it was resolved for.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

from .cache import short_hash

__all__ = ["LOCK_FILENAME", "LockFile", "spec_lock_path", "inputs_hash", "read_lock", "write_lock", "stale_reason"]

LOCK_FILENAME = "pylock.comfy-env.toml"   # uv insists on pylock.toml or pylock.<name>.toml
_HEADER_RE = re.compile(r'^#\s*comfy-env-(inputs|python|platform)\s*=\s*"([^"]*)"\s*$')


@dataclass(frozen=True)
class LockFile:
    path: str
    inputs: str          # hash of what was resolved (see inputs_hash)
    python: str          # "3.11"
    platform: str
    digest: str          # hash of the locked distributions (comments left out)


def spec_lock_path(spec) -> str | None:
    """Where ``comfy-env env lock`` puts the lock of ``spec``: next to its toml."""
    return os.path.join(os.path.dirname(spec.source), LOCK_FILENAME) if spec.source else None


def _python_of(interp) -> str:
    return "%d.%d" % tuple(interp.minor)


def inputs_hash(spec, interp) -> str:
    """What a resolution depends on (no file stamps: a lock pins files by hash already)."""
    return short_hash({
        "requirements": list(spec.requirements),
        "index_url": spec.index_url,
        "extra_index_urls": list(spec.extra_index_urls),
        "find_links": list(spec.find_links),
        "no_index": spec.no_index,
        "share": sorted(spec.share),
        "exclude_newer": spec.exclude_newer,
        "python": _python_of(interp),
        "platform": interp.platform,
    })


def _body(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")).strip() + "\n"


def read_lock(path: str) -> LockFile | None:
    """The lock at ``path``, or None if there is none.  A file without our header is read as
    a lock that matches nothing (stale), so a hand-written pylock is never trusted blindly."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    fields = {}
    for line in text.splitlines():
        m = _HEADER_RE.match(line)
        if m:
            fields[m.group(1)] = m.group(2)
    return LockFile(path=path, inputs=fields.get("inputs", ""), python=fields.get("python", "?"),
                    platform=fields.get("platform", "?"),
                    digest=hashlib.sha256(_body(text).encode()).hexdigest()[:16])


def write_lock(path: str, uv_output: str, spec, interp) -> LockFile:
    """Write uv's pylock text to ``path`` (atomically) under our header; return it read back."""
    header = (
        f"# comfy-env lock of {spec.source or '<dict spec>'}: the exact distributions its env installs.\n"
        "# Regenerate with `comfy-env env lock` after changing the spec; a stale lock is not used.\n"
        f'# comfy-env-inputs = "{inputs_hash(spec, interp)}"\n'
        f'# comfy-env-python = "{_python_of(interp)}"\n'
        f'# comfy-env-platform = "{interp.platform}"\n'
    )
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(header + _body(uv_output))  # uv's own header names our temporary files
    os.replace(tmp, path)
    return read_lock(path)


def stale_reason(lock: LockFile, spec, interp) -> str | None:
    """Why ``lock`` cannot be used for ``spec`` on ``interp``, or None if it can."""
    if lock.python != _python_of(interp):
        return (f"it was resolved for Python {lock.python}, but the env uses Python "
                f"{_python_of(interp)}")
    if lock.platform != interp.platform:
        return f"it was resolved for {lock.platform}, but this machine is {interp.platform}"
    if lock.inputs != inputs_hash(spec, interp):
        return ("the spec changed since it was written (requirements, indexes, find_links, "
                "share or exclude_newer)")
    return None
