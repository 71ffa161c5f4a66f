"""``comfy-env.toml``: reading, validating and normalising an environment spec.

Example (every key is optional)::

    name = "sam3d"                      # label for logs and the cache directory name
    python = "3.11"                     # must match an interpreter on this machine
    requirements = [
        "numpy>=1.26,<3",               # PEP 508 strings
        "./wheels/my_ops-0.1-cp311-cp311-linux_x86_64.whl",  # local wheels/dirs, relative to this file
    ]
    index_url = "https://pypi.org/simple"
    extra_index_urls = ["https://download.pytorch.org/whl/cu128"]
    find_links = ["./wheels"]
    no_index = false
    share = ["torch"]                   # host packages (and their dependency closure) to reuse

    [environment]                       # variables set in the worker's environment
    OMP_NUM_THREADS = "4"

Errors name the file, the line (found by scanning the text: tomllib gives none for
keys) and what was expected.  Unknown keys are errors rather than warnings: a typo
like ``requirement =`` would otherwise build an empty env silently.
"""
from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field

from .errors import EnvSpecError

__all__ = ["EnvSpec", "load_spec", "SPEC_FILENAME"]

SPEC_FILENAME = "comfy-env.toml"

# key -> (python type(s), description used in error messages)
_SCHEMA = {
    "name": (str, "a string"),
    "python": (str, 'a version string such as "3.12"'),
    "requirements": (list, "a list of strings (PEP 508 requirements, local wheel/dir paths)"),
    "index_url": (str, "a URL string"),
    "extra_index_urls": (list, "a list of URL strings"),
    "find_links": (list, "a list of paths or URLs"),
    "no_index": (bool, "true or false"),
    "share": (list, 'a list of host distribution names, e.g. ["torch"]'),
    "environment": (dict, "a table of NAME = \"value\" pairs"),
}
_LIST_KEYS = ("requirements", "extra_index_urls", "find_links", "share")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_DIST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
_ENV_VAR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class EnvSpec:
    """A validated spec.  Paths are absolute; ``source`` is the toml it came from (or None)."""

    source: str | None = None
    name: str = "env"
    python: tuple | None = None                 # (3, 12) or (3, 12, 1); None: the host's version
    requirements: tuple = ()                    # normalised: local paths made absolute
    index_url: str | None = None
    extra_index_urls: tuple = ()
    find_links: tuple = ()
    no_index: bool = False
    share: tuple = ()                           # distribution names, normalised (PEP 503)
    environment: dict = field(default_factory=dict)
    python_line: int | None = None              # where `python =` was, for error messages

    def key_material(self) -> dict:
        """What decides the built env's content: the cache key hashes this (plus interpreter, platform).

        ``environment`` and ``name`` are left out: they change nothing that is installed.
        Local files are stamped with size and mtime so a rebuilt wheel gives a new env.
        """
        return {
            "requirements": [_stamp(r) for r in self.requirements],
            "index_url": self.index_url,
            "extra_index_urls": list(self.extra_index_urls),
            "find_links": [_stamp(f) for f in self.find_links],
            "no_index": self.no_index,
            "share": sorted(self.share),
        }

    def to_json(self) -> str:
        d = dict(self.__dict__)
        d.pop("python_line")
        return json.dumps(d, sort_keys=True, default=list)


def normalize_dist_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _stamp(item: str) -> str:
    if os.path.isfile(item):
        st = os.stat(item)
        return f"{item}|{st.st_size}|{st.st_mtime_ns}"
    return item


def _line_of(text: str, key: str, table: str | None = None) -> int | None:
    """1-based line where ``key =`` is set (inside ``[table]`` if given); None if not found."""
    current = None
    pat = re.compile(r'^\s*["\']?' + re.escape(key) + r'["\']?\s*=')
    for i, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        m = re.match(r"^\[+\s*([^\]]+?)\s*\]+", s)
        if m:
            current = m.group(1).strip("\"'")
            if table is None and current == key:  # `[key]` header for a table-valued key
                return i
            continue
        if current == table and pat.match(line):
            return i
    return None


def _looks_like_path(req: str) -> bool:
    if " @ " in req or req.startswith(("http://", "https://", "git+")):
        return False
    if req.startswith((".", "/", "~", "file:")) or (os.sep in req and not re.search(r"[<>=!;\[]", req)):
        return True
    return req.endswith((".whl", ".tar.gz", ".zip"))


def _resolve_local(item: str, root: str) -> str:
    if item.startswith("file://"):
        item = item[len("file://"):]
    elif item.startswith("file:"):
        item = item[len("file:"):]
    return os.path.normpath(os.path.join(root, os.path.expanduser(item)))


def load_spec(path) -> EnvSpec:
    """Read and validate a ``comfy-env.toml`` (or a directory holding one)."""
    # Imported here, not at module level: workers import comfy_env.envs on Python 3.10
    # with only the stdlib and cloudpickle, and never parse toml.
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.10 hosts only
        import tomli as tomllib

    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.isdir(path):
        path = os.path.join(path, SPEC_FILENAME)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise EnvSpecError(f"no such file; expected a {SPEC_FILENAME} here.", path) from None
    except OSError as e:
        raise EnvSpecError(f"cannot read: {e.strerror}.", path) from None
    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text)
    except UnicodeDecodeError as e:
        raise EnvSpecError(f"not UTF-8 text ({e}).", path) from None
    except tomllib.TOMLDecodeError as e:
        # tomllib's message already ends in "(at line L, column C)".
        raise EnvSpecError(f"invalid TOML: {e}.", path) from None
    return spec_from_dict(data, source=path, text=text)


def spec_from_dict(data: dict, source: str | None = None, text: str = "") -> EnvSpec:
    root = os.path.dirname(source) if source else os.getcwd()

    def fail(msg, key, table=None):
        raise EnvSpecError(msg, source, _line_of(text, key, table) if text else None)

    for key, value in data.items():
        if key not in _SCHEMA:
            known = ", ".join(_SCHEMA)
            fail(f"unknown key {key!r}; the known keys are: {known}.", key)
        typ, desc = _SCHEMA[key]
        if not isinstance(value, typ):
            fail(f"{key!r} must be {desc}, not {type(value).__name__} ({value!r}).", key)
        if key in _LIST_KEYS:
            for i, item in enumerate(value):
                if not isinstance(item, str) or not item.strip():
                    fail(f"{key}[{i}] must be a non-empty string, not {type(item).__name__} ({item!r}).", key)

    kw = {"source": source}
    if "name" in data:
        if not _NAME_RE.match(data["name"]):
            fail(f"name {data['name']!r} may only hold letters, digits, '.', '_' and '-' "
                 "(it becomes a directory name).", "name")
        kw["name"] = data["name"]
    elif source:
        # Default label: the directory holding the toml (usually the node/project name).
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", os.path.basename(root)).strip("-.") or "env"
        kw["name"] = base
    if "python" in data:
        from .interpreters import parse_version

        line = _line_of(text, "python") if text else None
        kw["python"] = parse_version(data["python"], source, line)
        kw["python_line"] = line
    reqs = []
    for r in data.get("requirements", ()):
        r = r.strip()
        if _looks_like_path(r):
            local = _resolve_local(r, root)
            if not os.path.exists(local):
                fail(f"requirement {r!r} looks like a local path but {local!r} does not exist "
                     "(relative paths are taken from the toml's directory).", "requirements")
            reqs.append(local)
        else:
            reqs.append(r)
    kw["requirements"] = tuple(reqs)
    if "index_url" in data:
        kw["index_url"] = data["index_url"]
    kw["extra_index_urls"] = tuple(data.get("extra_index_urls", ()))
    links = []
    for fl in data.get("find_links", ()):
        if re.match(r"^[a-z+]+://", fl) and not fl.startswith("file:"):
            links.append(fl)
        else:
            local = _resolve_local(fl, root)
            if not os.path.exists(local):
                fail(f"find_links entry {fl!r}: {local!r} does not exist.", "find_links")
            links.append(local)
    kw["find_links"] = tuple(links)
    kw["no_index"] = data.get("no_index", False)
    share = []
    for s in data.get("share", ()):
        if not _DIST_RE.match(s):
            fail(f"share entry {s!r} is not a distribution name; expected a bare name such as \"torch\" "
                 "(no version: the host's installed version is what gets shared).", "share")
        share.append(normalize_dist_name(s))
    kw["share"] = tuple(sorted(set(share)))
    env = {}
    for k, v in data.get("environment", {}).items():
        if not _ENV_VAR_RE.match(k):
            fail(f"[environment] key {k!r} is not a valid environment variable name.", k, "environment")
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            fail(f"[environment] {k} must be a string (or a number), not {type(v).__name__} ({v!r}).",
                 k, "environment")
        env[k] = str(v)
    kw["environment"] = env
    return EnvSpec(**kw)
