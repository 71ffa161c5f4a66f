"""Helpers for the env tests: tiny wheels written directly (no build backend, no network)."""
from __future__ import annotations

import base64
import hashlib
import os
import zipfile

# Nothing to collect here; pytest imports this module because of its name.
__test__ = False


def make_wheel(outdir, name: str, version: str, files: dict, requires=()) -> str:
    """Write ``<name>-<version>-py3-none-any.whl`` holding ``files`` ({relpath: text})."""
    os.makedirs(outdir, exist_ok=True)
    dist_info = f"{name}-{version}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    contents = dict(files)
    contents[f"{dist_info}/METADATA"] = meta
    contents[f"{dist_info}/WHEEL"] = ("Wheel-Version: 1.0\nGenerator: comfy-env-tests\n"
                                      "Root-Is-Purelib: true\nTag: py3-none-any\n")
    record = []
    for path, text in contents.items():
        data = text.encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    contents[f"{dist_info}/RECORD"] = "\n".join(record) + "\n"
    whl = os.path.join(outdir, f"{name}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(whl, "w") as z:
        for path, text in contents.items():
            z.writestr(path, text)
    return whl


def demo_dep_wheel(outdir, version: str) -> str:
    """``demo_dep`` at ``version``: ``demo_dep.VERSION`` and a function that reports it."""
    code = (
        f"VERSION = {version!r}\n"
        "def describe(x=None):\n"
        "    import sys\n"
        "    return {'version': VERSION, 'python': sys.version_info[:2], 'x': x}\n"
        "def where():\n"
        "    return __file__\n"
        "def transform(a):\n"
        "    # 1.x and 2.x disagree on purpose: the result tells which one ran.\n"
        "    return a * float(VERSION.split('.')[0])\n"
    )
    return make_wheel(outdir, "demo_dep", version, {"demo_dep/__init__.py": code})
