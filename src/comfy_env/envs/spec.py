"""``comfy-env.toml``: reading, validating and normalising an environment spec.

Example (every key is optional)::

    name = "sam3d"                      # a label for logs and `comfy-env env list`
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
    exclude_newer = "2025-06-01"        # resolve as if it were that date (uv's --exclude-newer)
    python_download = false             # true: let uv download `python` if it is not found

    [environment]                       # variables set in the worker's environment
    OMP_NUM_THREADS = "4"

    [sandbox]                           # run the workers in a bubblewrap sandbox (docs/sandbox.md)
    network = false                     # keys: network, writable, readable, tmp, gpu, env_passthrough
    writable = ["./output"]             # paths relative to this file; they must exist

Errors name the file, the line (found by scanning the text: tomllib gives none for
keys) and what was expected.  Unknown keys are errors rather than warnings: a typo
like ``requirement =`` would otherwise build an empty env silently.
"""
from __future__ import annotations

import datetime
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
    "exclude_newer": ((str, datetime.date), 'a date such as "2025-06-01" or an RFC 3339 timestamp'),
    "python_download": (bool, "true or false"),
    "environment": (dict, "a table of NAME = \"value\" pairs"),
    "sandbox": (dict, "a table: network = false, writable = [...], readable = [...]"),
}
_LIST_KEYS = ("requirements", "extra_index_urls", "find_links", "share")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_DIST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
_ENV_VAR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2})?)?$")


def _real_date(text):
    """Whether the date (and time) ``_DATE_RE`` matched exists ("2025-02-30" does not)."""
    try:
        datetime.datetime.fromisoformat(text.replace("Z", "+00:00").replace(" ", "T"))
    except ValueError:
        try:                          # Python < 3.11 takes no fraction of other than 3/6 digits
            datetime.date.fromisoformat(text[:10])
            datetime.time.fromisoformat(text[11:19]) if len(text) > 10 else None
        except ValueError:
            return False
    return True


# The worker's start-up needs these as comfy-env sets them (PYTHONPATH holds the bootstrap dir).
_RESERVED_VARS = ("PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH", "PYTHONNOUSERSITE")


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
    exclude_newer: str | None = None            # uv's --exclude-newer (a date or timestamp)
    python_download: bool = False               # let uv download the interpreter if missing
    environment: dict = field(default_factory=dict)
    python_line: int | None = None              # where `python =` was, for error messages
    sandbox: object = None                      # a comfy_env.Sandbox from [sandbox], or None

    def key_material(self) -> dict:
        """What decides the built env's content: the cache key hashes this (plus interpreter, platform).

        ``environment``, ``name`` and ``python_download`` are left out: they change nothing
        that is installed (the interpreter itself is part of the key, see cache.env_key).
        Local files are stamped with size and mtime so a rebuilt wheel gives a new env.
        """
        return {
            "requirements": [_stamp(r) for r in self.requirements],
            "index_url": self.index_url,
            "extra_index_urls": list(self.extra_index_urls),
            "find_links": [_stamp(f) for f in self.find_links],
            "no_index": self.no_index,
            "share": sorted(self.share),
            "exclude_newer": self.exclude_newer,
        }

    def to_json(self) -> str:
        d = dict(self.__dict__)
        d.pop("python_line")
        d["sandbox"] = repr(self.sandbox) if self.sandbox is not None else None
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


def _unclosed_bracket(text: str):
    """("array"|"inline table", 1-based line) of the first value bracket never closed, or None.

    A small scanner (strings, comments, table headers); only used to explain an error
    tomllib already found, so it needs to be right for what ends up unclosed only.
    """
    stack = []
    quote = None                      # the open string's delimiter
    for lineno, line in enumerate(text.splitlines(), 1):
        i = 0
        if quote is None and not stack and line.lstrip().startswith("["):
            continue                  # a [table] or [[array of tables]] header
        while i < len(line):
            c = line[i]
            if quote is not None:
                if c == "\\" and quote in ('"', '"""'):
                    i += 2
                    continue
                if line.startswith(quote, i):
                    i += len(quote)
                    quote = None
                    continue
                i += 1
                continue
            if c == "#":
                break
            if line.startswith('"""', i) or line.startswith("'''", i):
                quote = line[i:i + 3]
                i += 3
                continue
            if c in "\"'":
                quote = c
            elif c in "[{":
                stack.append((c, lineno))
            elif c in "]}" and stack:
                stack.pop()
            i += 1
        if quote in ('"', "'"):
            quote = None              # single-line strings end with their line
    if not stack:
        return None
    c, lineno = stack[0]
    return ("array" if c == "[" else "inline table"), lineno


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


def _requirement(req: str, root: str, fail) -> str:
    """One ``requirements`` entry as the installer gets it: a PEP 508 requirement (checked
    where ``packaging`` is importable), a local wheel/directory path, or ``name @ path``,
    local paths made absolute from the toml's directory (a marker after ``;`` kept)."""
    if any(c in req for c in "\n\r\t\x00") or req.startswith("-"):
        fail(f"requirement {req!r} is not one requirement: installer options and line breaks have no place "
             "here. List one requirement per string; index options are keys of their own (index_url, "
             "extra_index_urls, find_links, no_index).")
    spec, marker = (req.split(";", 1) + [None])[:2] if ";" in req else (req, None)
    spec = spec.strip()
    path, prefix = None, ""
    if " @ " in spec:
        name, _, url = (part.strip() for part in spec.partition(" @ "))
        if url.startswith((".", "/", "~")) or (url.startswith("file:") and not url.startswith("file:///")):
            path, prefix = url, f"{name} @ file://"
    elif _looks_like_path(spec):
        path = spec
    if path is not None:
        local = _resolve_local(path, root)
        if not os.path.exists(local):
            fail(f"requirement {req!r} names a local path, but {local!r} does not exist (relative "
                 "paths are taken from the toml's directory).")
        return prefix + local + (f" ; {marker.strip()}" if marker is not None else "")
    try:
        from packaging.requirements import InvalidRequirement, Requirement
    except ImportError:
        return req                # the installer checks it
    try:
        Requirement(req)
    except InvalidRequirement as e:
        fail(f"requirement {req!r} is not a valid requirement: {e}.")
    return req


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
        if text.startswith("\ufeff"):
            text = text[1:]            # a byte order mark (Windows editors write one): not TOML
        data = tomllib.loads(text)
    except UnicodeDecodeError as e:
        raise EnvSpecError(f"not UTF-8 text ({e}).", path) from None
    except tomllib.TOMLDecodeError as e:
        # tomllib's message ends in "(at line L, column C)", or "(at end of document)" for
        # an array or table left open: then name the line where it was opened.
        msg = str(e)
        opened = _unclosed_bracket(text)
        line = None
        if opened is not None:
            kind, line = opened
            msg += f"; the {kind} opened on line {line} is never closed"
        raise EnvSpecError(f"invalid TOML: {msg}.", path, line if "end of document" in str(e) else None) from None
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
        reqs.append(_requirement(r.strip(), root, lambda msg: fail(msg, "requirements")))
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
    if "exclude_newer" in data:
        v = data["exclude_newer"]
        if isinstance(v, datetime.datetime):
            v = v.isoformat() if v.tzinfo else v.isoformat() + "Z"   # a local time is taken as UTC
        elif isinstance(v, datetime.date):
            v = v.isoformat()
        elif not _DATE_RE.match(v.strip()) or not _real_date(v.strip()):
            fail(f"exclude_newer = {v!r} is not a date; expected \"YYYY-MM-DD\" or an RFC 3339 timestamp "
                 "such as \"2025-06-01T00:00:00Z\".", "exclude_newer")
        kw["exclude_newer"] = v.strip()
    kw["python_download"] = data.get("python_download", False)
    env = {}
    for k, v in data.get("environment", {}).items():
        if k in _SCHEMA:
            fail(f"[environment] has a key {k!r}, which is a top-level key of {SPEC_FILENAME}: it was "
                 f"written after the [environment] header, so TOML put it into that table. Move "
                 f"`{k} = ...` above [environment] (an environment variable of that name would be "
                 f"written {k.upper()!r}).", k, "environment")
        if k.upper() in _RESERVED_VARS:
            fail(f"[environment] {k} cannot be set: comfy-env sets it to start the worker in this env "
                 "(its bootstrap dir). Make your code importable through `requirements` instead "
                 "(a local project directory or wheel).", k, "environment")
        if not _ENV_VAR_RE.match(k):
            fail(f"[environment] key {k!r} is not a valid environment variable name.", k, "environment")
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            fail(f"[environment] {k} must be a string (or a number), not {type(v).__name__} ({v!r}).",
                 k, "environment")
        if "\0" in str(v):
            fail(f"[environment] {k} holds a NUL character, which no environment variable can hold.",
                 k, "environment")
        env[k] = str(v)
    kw["environment"] = env
    if "sandbox" in data:
        from ..sandbox import sandbox_from_table

        try:
            kw["sandbox"] = sandbox_from_table(data["sandbox"], root)
        except ValueError as e:
            fail(e.args[0], e.args[1] if len(e.args) > 1 else "sandbox", "sandbox")
    return EnvSpec(**kw)
