"""Building directories of links atomically (used for the bootstrap and share dirs).

Both dirs are content-keyed, so once one exists it is never modified: we fill a
temporary sibling and rename it into place.  Two builders racing both succeed — the
loser of the rename throws its copy away.  Where symlinks are not allowed (Windows
without developer mode) we copy instead.
"""
from __future__ import annotations

import os
import shutil
import tempfile

__all__ = ["link_or_copy", "materialise_dir"]


def link_or_copy(src: str, dst: str) -> None:
    try:
        os.symlink(src, dst, target_is_directory=os.path.isdir(src))
    except (OSError, NotImplementedError):
        if os.path.isdir(src):
            shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)


def materialise_dir(final: str, entries: dict) -> str:
    """Make ``final`` hold ``{name: source path}`` as links; return ``final``."""
    if os.path.isdir(final):
        return final
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(final) + "-", dir=parent)
    try:
        for name, src in entries.items():
            link_or_copy(src, os.path.join(tmp, name))
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isdir(final):  # a real failure, not a lost race
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
