"""Sharing host packages into an env (``share = ["torch"]``) without exposing the rest.

torch with its CUDA wheels is several GB; installing it again into every env wastes
disk and minutes.  Instead we compute the dependency closure of the shared
distributions *in the host* (``importlib.metadata``: each distribution's ``Requires-Dist``,
walked recursively; extras' dependencies and dependencies that are not installed are
skipped) and build a directory holding links to just those distributions' top-level
packages/modules and their ``.dist-info``.  That directory goes on the worker's
``PYTHONPATH``; the host's other packages stay invisible (unlike putting the host's
``sys.path`` first, which defeats isolation).

Distributions the env installs itself are left out, so the env's own version wins —
the share dir sits *before* the env's site-packages on ``sys.path``.

Compiled packages only work for the Python version they were built for, so sharing
requires the env's Python minor version to equal the host's (checked in env.py).
"""
from __future__ import annotations

import importlib.metadata as md
import logging
import os
import re

from .cache import short_hash
from .errors import EnvSpecError
from .links import materialise_dir
from .spec import normalize_dist_name

__all__ = ["share_closure", "share_dir", "check_share_roots"]

log = logging.getLogger("comfy_env.envs")

_REQ_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _requirement_applies(req: str) -> str | None:
    """Name of the dependency in ``req`` if it applies without extras, else None."""
    m = _REQ_NAME.match(req)
    if not m:
        return None
    name = m.group(1)
    if ";" not in req:
        return name
    marker = req.split(";", 1)[1].strip()
    try:
        from packaging.markers import Marker  # usually present; not a hard dependency
    except ImportError:
        # Without packaging we cannot evaluate markers: skip extras, keep the rest
        # (a dependency that is installed on the host is almost surely needed there).
        return None if "extra" in marker else name
    try:
        return name if Marker(marker).evaluate({"extra": ""}) else None
    except Exception:
        return None if "extra" in marker else name


def check_share_roots(spec) -> None:
    """Raise EnvSpecError unless every ``share`` root is installed in the host.

    Checked before building, so a spec that cannot work leaves no env in the cache.
    """
    for name in spec.share:
        try:
            md.distribution(name)
        except md.PackageNotFoundError:
            from .spec import _line_of

            line = None
            if spec.source and os.path.isfile(spec.source):
                with open(spec.source, encoding="utf-8") as f:
                    line = _line_of(f.read(), "share")
            raise EnvSpecError(
                f"share: {name!r} is not installed in the host environment ({os.sys.executable}); "
                "only installed distributions can be shared. Install it in the host or move it to "
                "`requirements`.", spec.source, line,
            ) from None


def share_closure(roots, exclude=(), source=None) -> list:
    """Host distributions to share: ``roots`` plus their installed dependency closure.

    ``exclude``: normalised names the env installs itself (they and their own
    dependencies are not walked).  Returns a list of ``importlib.metadata.Distribution``.
    """
    exclude = {normalize_dist_name(n) for n in exclude}
    seen, out = set(), []
    todo = [(normalize_dist_name(r), True) for r in roots]
    while todo:
        name, is_root = todo.pop(0)
        if name in seen:
            continue
        seen.add(name)
        if name in exclude:
            if is_root:
                log.warning("share: %s is installed in the env itself; the env's copy is used, not the host's", name)
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            if is_root:
                raise EnvSpecError(
                    f"share: {name!r} is not installed in the host environment ({os.sys.executable}); "
                    "only installed distributions can be shared. Install it in the host or move it to `requirements`.",
                    source,
                ) from None
            continue  # an optional dependency the host does not have
        out.append(dist)
        for req in dist.requires or ():
            dep = _requirement_applies(req)
            if dep:
                todo.append((normalize_dist_name(dep), False))
    return out


def _entries_of(dist) -> dict:
    """{top-level name: absolute source path} for one installed distribution."""
    base = os.fspath(dist.locate_file(""))
    names = set()
    for f in dist.files or ():
        parts = f.parts
        if not parts or parts[0] in ("..", "__pycache__") or parts[0].endswith(".pth"):
            continue  # scripts outside site-packages, bytecode caches, .pth hooks
        names.add(parts[0])
    if not names:  # no RECORD: fall back to top_level.txt plus the metadata dir
        for line in (dist.read_text("top_level.txt") or "").split():
            for cand in (line, line + ".py"):
                if os.path.exists(os.path.join(base, cand)):
                    names.add(cand)
        meta_dir = getattr(dist, "_path", None)
        if meta_dir is not None:
            names.add(os.path.basename(os.fspath(meta_dir)))
    return {n: os.path.join(base, n) for n in sorted(names) if os.path.exists(os.path.join(base, n))}


def share_dir(root: str, roots, exclude=(), source=None) -> str | None:
    """Create (once) and return the share dir for ``roots`` under cache root ``root``."""
    if not roots:
        return None
    dists = share_closure(roots, exclude, source)
    entries = {}
    for dist in dists:
        for name, src in _entries_of(dist).items():
            # A namespace dir (e.g. nvidia/) shared by several distributions is linked once, whole.
            if name in entries and entries[name] != src:
                log.debug("share: %s provided by more than one location; keeping %s", name, entries[name])
                continue
            entries[name] = src
    key = short_hash({
        "dists": sorted((normalize_dist_name(d.metadata["Name"]), d.version, os.fspath(d.locate_file("")))
                        for d in dists),
        "entries": entries,
    })
    return materialise_dir(os.path.join(root, "share", key), entries)
