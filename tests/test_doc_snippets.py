"""Every ```python block of the docs runs as shown, as a real user's script.

Each block of README.md, docs/*.md and examples/*/README.md is written to a
fresh directory as ``user_script.py`` and run with ``python user_script.py``
(``tests/pythons.py``): it must exit 0 within a time bound, with nothing on
stderr.  New docs are picked up by themselves.  Every snippet runs on Python
3.11, the README's on 3.10-3.13 too (``COMFY_ENV_DOC_SNIPPETS=all``: all on all).

A block that genuinely cannot run here says so in the markdown, visibly, with an
HTML comment on the line right above its opening fence (blank lines between are
allowed)::

    <!-- snippet: skip (needs a CUDA GPU) -->
    <!-- snippet: stderr-ok (uv prints the build to stderr) -->
    <!-- snippet: needs-bwrap (runs its workers in a sandbox) -->

``skip (reason)`` skips it and reports the reason; ``stderr-ok (reason)`` still runs it
and requires exit code 0, but accepts output on stderr; ``needs-bwrap (reason)`` runs it
where bubblewrap can run (``comfy_env.sandbox.probe()``, as tests/test_sandbox.py asks)
and skips it elsewhere, saying why.  A reason is required.
Keep skips rare: a snippet that needs files should create them itself.
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass

import pytest

from pythons import REPO, VERSIONS, run_script

FULL_ON = "3.11"      # every snippet runs on this version; the README's on all (see _runs)
TIMEOUT = 30          # per snippet run: generous for a loaded 2-core box (they take 1-3 s); a hang fails here

_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
_DIRECTIVE = re.compile(r"^\s*<!--\s*snippet:\s*([\w-]+)\s*(?:\((.*)\))?\s*-->\s*$")
_KNOWN = {"skip", "stderr-ok", "needs-bwrap"}


@dataclass(frozen=True)
class Snippet:
    path: str           # relative to the repository
    line: int           # 1-based line of the opening fence
    code: str
    directive: str | None = None
    reason: str | None = None

    @property
    def id(self):
        return f"{self.path}:{self.line}"


def doc_files(repo=REPO):
    files = [os.path.join(repo, "README.md")]
    files += sorted(glob.glob(os.path.join(repo, "docs", "*.md")))
    files += sorted(glob.glob(os.path.join(repo, "examples", "*", "README.md")))
    return [f for f in files if os.path.isfile(f)]


def extract(text, path="<doc>"):
    """The ```python blocks of a markdown text, with the directive above each."""
    lines = text.splitlines()
    out = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        start = i
        i += 1
        body = []
        while i < len(lines) and not (lines[i].strip().startswith(fence)
                                      and lines[i].strip().strip(fence[0]) == ""):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1      # the closing fence
        if lang.lower() not in ("python", "py", "python3"):
            continue
        directive = reason = None
        j = start - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        if j >= 0:
            d = _DIRECTIVE.match(lines[j])
            if d:
                directive, reason = d.group(1), (d.group(2) or "").strip()
                if directive not in _KNOWN:
                    raise ValueError(f"{path}:{j + 1}: unknown snippet directive {directive!r} "
                                     f"(known: {sorted(_KNOWN)})")
                if not reason:
                    raise ValueError(f"{path}:{j + 1}: snippet directive {directive!r} needs a "
                                     f"reason in parentheses")
        out.append(Snippet(path, start + 1, "\n".join(body) + "\n", directive, reason))
    return out


def all_snippets():
    snippets = []
    for f in doc_files():
        with open(f, encoding="utf-8") as fh:
            snippets += extract(fh.read(), os.path.relpath(f, REPO))
    return snippets


SNIPPETS = all_snippets()


def test_extract_finds_blocks_and_directives():
    text = "\n".join([
        "# t", "```sh", "echo no", "```",
        "```python", "print(1)", "```",
        "<!-- snippet: skip (needs a CUDA GPU) -->", "", "```python", "import torch", "```",
        "<!-- snippet: stderr-ok (uv's progress) -->", "```py", "x = 1", "  y = 2", "```",
        "````python", "s = '''", "```", "'''", "````",
        "<!-- snippet: needs-bwrap (a sandbox) -->", "```python", "pass", "```",
    ])
    got = extract(text)
    assert [(s.line, s.directive, s.reason) for s in got] == [
        (5, None, None), (10, "skip", "needs a CUDA GPU"), (14, "stderr-ok", "uv's progress"),
        (18, None, None), (24, "needs-bwrap", "a sandbox")]
    assert got[0].code == "print(1)\n"
    assert got[2].code == "x = 1\n  y = 2\n"
    assert got[3].code == "s = '''\n```\n'''\n"
    with pytest.raises(ValueError, match="needs a reason"):
        extract("<!-- snippet: skip -->\n```python\npass\n```")
    with pytest.raises(ValueError, match="unknown snippet directive"):
        extract("<!-- snippet: skp (x) -->\n```python\npass\n```")


def test_readme_has_snippets():
    assert any(s.path == "README.md" for s in SNIPPETS)


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.id for s in SNIPPETS])
def test_snippet_compiles(snippet):
    """Skipped snippets included: at least their syntax is checked here."""
    compile(snippet.code, snippet.id, "exec")


def _bwrap_problem():
    from comfy_env import sandbox
    return sandbox.probe()[1]


def _check(snippet, pyver, tmp_path):
    if snippet.directive == "skip":
        pytest.skip(f"{snippet.id}: {snippet.reason}")
    if snippet.directive == "needs-bwrap":
        problem = _bwrap_problem()
        if problem is not None:
            pytest.skip(f"{snippet.id} ({snippet.reason}): bubblewrap cannot run here: {problem}")
    proc = run_script(pyver, snippet.code, cwd=tmp_path, timeout=TIMEOUT)
    where = f"{snippet.id} on Python {pyver}"
    assert proc.returncode == 0, (f"{where} exited with {proc.returncode}\n--- stdout:\n{proc.stdout}"
                                  f"\n--- stderr:\n{proc.stderr}")
    if snippet.directive != "stderr-ok":
        assert proc.stderr.strip() == "", f"{where} wrote to stderr:\n{proc.stderr}"


def _runs():
    """(snippet, Python version) pairs: every snippet on FULL_ON, the README's on every version.

    Each run is a fresh interpreter plus worker processes, 1-3 s on a busy 2-core box;
    all snippets on all four versions took over a minute there.  The README's snippets
    (the first thing users run) cover the version differences of start-up and exit.
    ``COMFY_ENV_DOC_SNIPPETS=all`` runs every snippet on every version.
    """
    every = os.environ.get("COMFY_ENV_DOC_SNIPPETS") == "all"
    return [pytest.param(s, v, id=f"{s.id}-{v}") for v in VERSIONS for s in SNIPPETS
            if every or v == FULL_ON or s.path == "README.md"]


@pytest.mark.timeout(TIMEOUT + 60)
@pytest.mark.parametrize("snippet,pyver", _runs())
def test_snippet_runs_as_shown(snippet, pyver, tmp_path):
    _check(snippet, pyver, tmp_path)

