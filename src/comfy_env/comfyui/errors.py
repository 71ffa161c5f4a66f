"""Make a node's error read in ComfyUI as if the node had run in ComfyUI.

ComfyUI's error report (the ``execution_error`` event and the console) is built from
``type(ex)`` (module + qualname), ``str(ex)`` and ``traceback.format_tb(tb)`` of the
exception a node raised.  The executor already keeps the original type and args and
attaches the worker's traceback text as ``__cause__``; but ``format_tb`` only sees
host frames, so the report would end in comfy-env's plumbing.  ``with_worker_frames``
appends the worker's frames (parsed from that text) to the exception's traceback as
real traceback entries, so the report shows the node's own file, line and function,
and source lines where the file also exists on the host (the pack's own files do).
"""
from __future__ import annotations

import os
import re

__all__ = ["PackLoadError", "with_worker_frames", "worker_frames"]


class PackLoadError(ImportError):
    """An isolated pack could not be loaded (env build, import, or metadata failed).

    Raised from the pack's ``__init__.py``; ComfyUI catches it and lists the pack as
    "IMPORT FAILED" with this message, and carries on starting.
    """


_FRAME = re.compile(r'^  File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<name>.+)$')
_PLUMBING = os.sep + os.path.join("comfy_env", "")   # frames of comfy-env itself


def worker_frames(text: str):
    """(file, line, function) of the innermost traceback in a traceback text."""
    blocks = text.split("Traceback (most recent call last):")
    if len(blocks) < 2:
        return []
    frames = []
    for line in blocks[-1].splitlines():
        m = _FRAME.match(line)
        if m:
            frames.append((m["file"], int(m["line"]), m["name"].strip()))
    # The worker's own plumbing (executor loop, worker_side.call_node) is noise to
    # a node author; keep node code and the libraries it called.
    return [f for f in frames if _PLUMBING not in f[0]]


def _raise_line(filename, lineno):
    """A ``raise`` spanning exactly the columns of the real source line.

    Python 3.11+ underlines the failing expression with ``^^^`` unless it covers the
    whole line; a synthetic ``raise`` of another length would underline nonsense.
    """
    import linecache
    text = linecache.getline(filename, lineno).rstrip("\r\n")
    stripped = text.strip()
    indent = text[: len(text) - len(text.lstrip())] if stripped else ""
    if indent.strip(" \t"):
        indent = ""
    pad = max(0, len(stripped) - len("raise(_e)"))
    return indent + "raise(_e" + " " * pad + ")"


def _fake_tb(frames, exc):
    first = prev = None
    for filename, lineno, name in frames:
        line = _raise_line(filename, lineno)
        if line[:1].isspace() and lineno > 1:
            # An indented line needs an enclosing block to compile: open one just above.
            source = "\n" * (lineno - 2) + "if 1:\n" + line
        else:
            source = "\n" * (lineno - 1) + line.lstrip()
        code = compile(source, filename, "exec")
        try:
            code = code.replace(co_name=name)
        except (TypeError, ValueError):
            pass
        exc.__traceback__ = None   # else the old traceback would hang off the last frame
        tb = None
        try:
            exec(code, {"_e": exc, "__name__": "__comfy_env_worker__"})
        except BaseException as raised:   # noqa: B902 - we raised it ourselves
            tb = raised.__traceback__.tb_next    # skip this function's frame
        if tb is None:
            continue
        if prev is None:
            first = tb
        else:
            prev.tb_next = tb
        prev = tb
    return first


def with_worker_frames(exc: BaseException) -> BaseException:
    """Give ``exc`` a traceback made of the worker frames named in its ``__cause__``."""
    cause = exc.__cause__
    text = str(cause) if cause is not None else ""
    frames = worker_frames(text)
    if not frames:
        return exc
    context, suppress = exc.__context__, exc.__suppress_context__
    try:
        tb = _fake_tb(frames, exc)
    except Exception:
        return exc
    finally:
        exc.__context__, exc.__suppress_context__ = context, suppress
        exc.__cause__ = cause
    return exc.with_traceback(tb)


_stand_ins = {}


def named_like_original(exc: BaseException) -> BaseException:
    """Replace the executor's ``RemoteError`` by an exception *named* like the original.

    When the worker's exception type isn't importable on the host (typically one
    defined by the pack or by a library only the worker's env has), the executor
    hands back ``comfy_env.RemoteError(type_name, message)``.  ComfyUI reports
    ``module.qualname`` of the exception's type, so a stand-in class with the
    original module and qualname (a subclass of RemoteError, so nothing is lost)
    makes the report name the real error rather than comfy-env's wrapper.
    """
    try:
        from comfy_env.errors import RemoteError
    except ImportError:
        return exc
    if type(exc) is not RemoteError or not getattr(exc, "type_name", None):
        return exc
    module, _, qualname = exc.type_name.rpartition(".")
    if not qualname.isidentifier():
        return exc
    cls = _stand_ins.get(exc.type_name)
    if cls is None:
        cls = type(qualname, (RemoteError,), {
            "__module__": module or "builtins", "__qualname__": qualname,
            "__str__": lambda self: self.message,
            "__doc__": f"Stands in for {exc.type_name}, which the host can't import."})
        _stand_ins[exc.type_name] = cls
    new = cls(exc.type_name, exc.message, getattr(exc, "tb", ""))
    new.__cause__ = exc.__cause__
    return new
