"""What a worker runs for one isolated test: ``run_test(request)``.

The parent sends a plain request (the test's module file and name, capture and
reporting settings) and the fixture values and gets back a plain
outcome tuple; nothing of pytest's session crosses the boundary.  In the worker:

1. the test module is imported from its file with pytest's assertion rewriting
   (once per worker; a meta-path finder rewrites conftest files and modules that
   match ``python_files`` too, as pytest's own import hook does);
2. the fixture values are the call's own arguments (the executor's codec: arrays
   by shared memory); the rewriting finder is installed by the executor's
   initializer, before any argument is decoded, so a class defined in a test module
   imports that module rewritten;
3. the body runs with fd 1/2 redirected into files the parent named (the parent
   reads them even when the worker dies mid-test), log records and warnings
   recorded, to be re-emitted in the parent inside the test's call phase;
4. a failure is formatted here, with pytest's own ``ExceptionInfo.getrepr``, the
   traceback cut at the test function as ``Function._traceback_filter`` does:
   the frames only exist in this process.

Runs on any Python >= 3.10 with the *host's* pytest (shared into foreign envs by
``executors``); it must not import pytest at module level, so that a missing
pytest gives a clear error instead of a failed call reference.
"""
from __future__ import annotations

import ast
import contextlib
import fnmatch
import hashlib
import io
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import sys
import threading
import traceback
import types
import warnings
import zlib

_finder = None          # the rewriting finder, installed on first use
_shim = None            # the assertion-explanation config stand-in


def prepare(settings, roots):
    """The executor's initializer: before any call's arguments are decoded, so that a
    fixture value whose class lives in a test module imports that module rewritten."""
    try:
        import pytest  # noqa: F401  (the test modules need it, and so do the outcomes)
        from _pytest.assertion.rewrite import rewrite_asserts  # noqa: F401
    except Exception as exc:
        raise ImportError(
            f"pytest cannot be imported in the worker ({sys.executable}, Python "
            f"{sys.version.split()[0]}): {type(exc).__name__}: {exc}.  The plugin shares the "
            f"host's pytest with the worker; if the host's pytest cannot run on this Python, "
            f"add pytest to the environment's requirements.") from exc
    for root in reversed(roots):
        if root not in sys.path:
            sys.path.insert(0, root)    # pytest's "prepend" import mode, for foreign envs
    _install_rewriting(settings)


def run_test(req, /, **fixtures):
    """Run one test; return ``(kind, detail, logs, warnings)``.

    ``fixtures`` arrive as the call's own arguments, through the executor's codec
    (arrays by shared memory, readable by another numpy version too).
    """
    capture = _FdCapture(*req["capture"]) if req.get("capture") else None
    logs = _LogRecorder(req["log_level"], req.get("log_levels"))
    recorded = []
    synced = []         # (path, namespace) the request's changes were applied to
    if capture is not None:
        capture.start()
    try:
        with logs, _no_stdin(capture is not None), warnings.catch_warnings(record=True) as recorded:
            # The test's filters, as pytest sets them for it in its own process: an
            # "error" one raises here, where the warning is issued; what is recorded
            # is re-emitted in the pytest process for its report.
            _warning_filters(req.get("warnings"))
            outcome = _run(req, fixtures, synced)
    finally:
        if capture is not None:
            capture.stop()
    return outcome + (logs.records, _plain_warnings(recorded), _changed_by_test(synced))


def check_values(blobs):
    """Which of ``blobs`` (``{key: pickled value}``) do not unpickle here: ``{key: why}``.
    The parent asks when a test's call could not even start (its arguments failed to
    unpickle), to name the fixture, or to leave out the module global, that did it."""
    import pickle

    bad = {}
    for key, blob in blobs.items():
        try:
            pickle.loads(blob)
        except BaseException as exc:            # RecursionError too (a Mock's __getattr__)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            bad[key] = f"{type(exc).__name__}: {exc}"[:500]
    return bad


def import_test_module(req):
    """The call before each test's own: import its module here (once per worker), as
    collection did in the pytest process, so the test's call neither pays for the import
    (its time limit) nor reports what the import printed or warned (pytest showed the
    warnings of collection already).  Its output goes into the capture files, which the
    parent then drops.  An import that fails is reported by the test's own call."""
    capture = _FdCapture(*req["capture"]) if req.get("capture") else None
    if capture is not None:
        capture.start()
    try:
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            _where(req)
            _import_test_module(*req["module"])
    except BaseException:
        pass
    finally:
        if capture is not None:
            capture.stop()


def _environ(changes):
    """The variables the pytest process changed since its session started, as they are
    there now (``{name: value or None}``): a variable a fixture set for one test is
    there for that test only, as in the pytest process."""
    env = os.environ
    for k, v in changes.items():
        if v is None:
            env.pop(k, None)
        elif env.get(k) != v:
            env[k] = v


def _where(req):
    """The parent's ``sys.path`` additions, working directory and environment variables,
    as the request says."""
    if req.get("environ") is not None:
        _environ(req["environ"])
    if req.get("sys_path"):
        missing = [p for p in req["sys_path"] if p not in sys.path]
        sys.path[:0] = missing
    if req.get("cwd") and req["cwd"] != os.getcwd():
        try:
            os.chdir(req["cwd"])
        except OSError:
            pass


def _warning_filters(spec):
    """Apply pytest's filters for the test: ``(ini filterwarnings, -W options, the
    item's filterwarnings marks, whether Python got -W options)``, in pytest's order
    (``Config._catch_configured_warnings`` and ``catch_warnings_for_item``)."""
    if spec is None:
        warnings.simplefilter("always")
        return
    if spec == "off":
        return              # Python's own filters, as the pytest process runs the test
    from _pytest.config import apply_warning_filters, parse_warning_filter

    config_filters, cmdline_filters, mark_filters, warnoptions = spec
    if not warnoptions:
        warnings.filterwarnings("always", category=DeprecationWarning)
        warnings.filterwarnings("always", category=PendingDeprecationWarning)
    apply_warning_filters(config_filters, cmdline_filters)
    for arg in mark_filters:
        warnings.filterwarnings(*parse_warning_filter(arg, escape=False))


def _run(req, kwargs, synced):
    from _pytest.outcomes import Exit, Failed, OutcomeException, Skipped, XFailed

    _where(req)
    settings = req["settings"]
    fn = None
    stage = "import"
    try:
        module = _import_test_module(*req["module"])
        stage = "lookup"
        for path, changes in req.get("namespaces") or ():
            obj = module if path is None else _find_class(module, path)
            _sync_namespace(obj, changes)
            synced.append((path, obj))
        fn, owner = _find_test(module, *req["target"])
        if req.get("instance"):
            owner.__dict__.update(req["instance"])
        stage = "call"
        with _UncaughtErrors(req.get("uncaught", ("thread", "unraisable"))) as uncaught, \
                _run_xfail(settings.get("runxfail")):
            result = fn(**kwargs)
        if hasattr(result, "__await__") or hasattr(result, "__anext__"):
            if hasattr(result, "close"):
                result.close()          # a coroutine never awaited: no warning about it
            raise RuntimeError("async test functions are not supported by the isolated marker: "
                               "call asyncio.run(...) inside a plain test function")
        # What pytest's own plugins warn of after a test's call, in its process.
        uncaught.warn()
        if result is not None:
            _warn_return_not_none(req.get("nodeid") or req["target"][1], result)
    except Exit as exc:
        return ("exit", (str(exc.msg), exc.returncode))
    except XFailed as exc:
        return ("xfailed", (str(exc.msg or ""),))
    except Skipped as exc:
        path, lineno = _raise_site(exc)
        return ("skipped", (str(exc.msg or ""), path, lineno, bool(exc.allow_module_level)))
    except BaseException as exc:
        if isinstance(exc, OutcomeException) and not isinstance(exc, Failed):
            exc = RuntimeError(f"unexpected pytest outcome {type(exc).__name__}: {exc}")
        return _failure(exc, fn if stage == "call" else None, settings, stage)
    return ("passed", ())


@contextlib.contextmanager
def _replaced(obj, name, value):
    """``obj.name`` is ``value`` inside the block, what it was after it."""
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


def _run_xfail(active):
    """``--runxfail``: pytest's skipping plugin makes ``pytest.xfail`` a no-op in its
    process (the test goes on and passes or fails on its own); the same here, for the
    test's call."""
    if not active:
        return contextlib.nullcontext()
    import pytest

    def nop(*args, **kwargs):
        pass

    nop.Exception = pytest.xfail.Exception
    return _replaced(pytest, "xfail", nop)


class _UncaughtErrors:
    """An exception no code caught during the test: in a thread
    (``threading.excepthook``) or where Python cannot raise it (``sys.unraisablehook``:
    ``__del__``, a callback).  pytest's threadexception and unraisableexception plugins
    turn each into a warning after the test's call; the worker's hooks are pytest's
    stand-ins here, for the test's duration.  ``kinds``: which of the two the pytest
    process runs (``"thread"``, ``"unraisable"``; ``-p no:threadexception`` drops one)."""

    def __init__(self, kinds=("thread", "unraisable")):
        self.kinds = frozenset(kinds)

    def __enter__(self):
        self.events = []
        self._saved = sys.unraisablehook, threading.excepthook
        if "unraisable" in self.kinds:
            sys.unraisablehook = self._unraisable
        if "thread" in self.kinds:
            threading.excepthook = self._thread
        return self

    def __exit__(self, *exc):
        sys.unraisablehook, threading.excepthook = self._saved
        return False

    def _unraisable(self, u):
        err_msg = "Exception ignored in" if u.err_msg is None else u.err_msg
        self._note("PytestUnraisableExceptionWarning", f"{err_msg}: {u.object!r}",
                   u.exc_type, u.exc_value, u.exc_traceback)

    def _thread(self, args):
        name = "<unknown>" if args.thread is None else args.thread.name
        self._note("PytestUnhandledThreadExceptionWarning", f"Exception in thread {name}",
                   args.exc_type, args.exc_value, args.exc_traceback)

    def _note(self, category, summary, exc_type, exc_value, exc_tb):
        try:
            text = "".join(traceback.format_exception(exc_type, exc_value, exc_tb))
            self.events.append((category, summary, text, exc_value))
        except BaseException:
            pass

    def warn(self):
        """One warning each, as pytest words them; under an "error" filter the first one
        raises (with the original exception as its cause), failing the test."""
        import pytest

        for category, summary, text, exc_value in self.events:
            cls = getattr(pytest, category, None)
            if cls is None:       # an older pytest: no such warning there either
                continue
            try:
                warnings.warn(cls(f"{summary}\n\n{text}"))
            except cls as e:
                e.args = (summary,)
                e.__cause__ = exc_value
                raise


def _warn_return_not_none(nodeid, result):
    import pytest

    cls = getattr(pytest, "PytestReturnNotNoneWarning", None)
    if cls is not None:
        warnings.warn(cls(
            f"Test functions should return None, but {nodeid} returned {type(result)!r}.\n"
            "Did you mean to use `assert` instead of `return`?\n"
            "See https://docs.pytest.org/en/stable/how-to/assert.html#return-not-none for more information."))


def _no_stdin(active):
    """While pytest captures output, reading ``sys.stdin`` in a test fails with pytest's
    own error (its ``DontReadFromInput``); the worker's stdin is empty, which would read
    as end of file instead."""
    if active:
        try:
            from _pytest.capture import DontReadFromInput
            return _replaced(sys, "stdin", DontReadFromInput())
        except Exception:
            pass
    return contextlib.nullcontext()


def _failure(exc, fn, settings, stage):
    """``("failed", ...)``: the exception (pickled here, so an unpicklable one cannot
    sink the whole outcome), its pytest-formatted report and a plain-text copy."""
    from _pytest.outcomes import Failed

    kind = "fail" if isinstance(exc, Failed) else "failed"
    qual = f"{type(exc).__module__}.{type(exc).__qualname__}"
    try:
        msg = str(exc)
    except Exception:
        msg = "<str() failed>"
    exc_blob = None
    if kind == "failed":
        saved = exc.__traceback__
        try:
            exc.__traceback__ = None
            exc_blob = _dumps(exc)
        except Exception:
            exc_blob = None
        finally:
            exc.__traceback__ = saved
    longrepr_blob, text = _longrepr(exc, fn, settings)
    pytrace = getattr(exc, "pytrace", True)
    return (kind, (qual, msg, exc_blob, longrepr_blob, text, stage, pytrace))


def _dumps(obj):
    import cloudpickle

    return cloudpickle.dumps(obj)


def _longrepr(exc, fn, settings):
    from _pytest._code import ExceptionInfo
    from _pytest.outcomes import Failed

    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        excinfo = ExceptionInfo.from_exc_info((type(exc), exc, exc.__traceback__))
        style = settings["tbstyle"]
        if isinstance(exc, Failed) and not exc.pytrace:
            style = "value"
        tbfilter = True
        if settings["fulltrace"]:
            style, tbfilter = "long", False
        elif fn is not None:
            tbfilter = _traceback_filter(fn, style == "auto")
        if style == "auto":
            style = "long"       # as Function.repr_failure; "line" and "no" are pytest's too
        kwargs = dict(funcargs=True, abspath=settings["abspath"], showlocals=settings["showlocals"],
                      style=style, tbfilter=tbfilter, truncate_locals=settings["verbose"] <= 1)
        try:
            rep = excinfo.getrepr(truncate_args=settings["verbose"] <= 2, **kwargs)
        except TypeError:       # pytest < 8 has no truncate_args
            rep = excinfo.getrepr(**kwargs)
        return _dumps(rep), text
    except Exception:
        return None, text


def _traceback_filter(fn, auto):
    """pytest's ``Function._traceback_filter``: start the traceback at the test function."""
    import _pytest._code
    from _pytest._code.code import Traceback
    from _pytest.compat import get_real_func
    from _pytest.python import filter_traceback

    def filt(excinfo):
        code = _pytest._code.Code.from_function(get_real_func(fn))
        tb = excinfo.traceback
        ntb = tb.cut(path=code.path, firstlineno=code.firstlineno)
        if ntb == tb:
            ntb = ntb.cut(path=code.path)
            if ntb == tb:
                ntb = ntb.filter(filter_traceback) or tb
        ntb = ntb.filter(excinfo)
        if auto and len(ntb) > 2:
            ntb = Traceback((ntb[0], *(t.with_repr_style("short") for t in ntb[1:-1]), ntb[-1]))
        return ntb

    return filt


def _raise_site(exc):
    """Where ``pytest.skip()`` was called: the last frame outside pytest itself."""
    import _pytest

    internal = os.path.dirname(_pytest.__file__)
    site = (None, None)
    for fs in traceback.extract_tb(exc.__traceback__):
        if not fs.filename.startswith(internal) and not fs.filename.startswith(os.path.dirname(__file__)):
            site = (fs.filename, fs.lineno)
    return site


# -- importing the test module with assertion rewriting ----------------------------------


def _import_test_module(modname, path, pkg_root):
    mod = sys.modules.get(modname)
    if mod is not None and _same_file(getattr(mod, "__file__", None), path):
        _remember(mod)          # imported by a fixture value's class, by name
        return mod
    if pkg_root and pkg_root not in sys.path:
        sys.path.insert(0, pkg_root)        # pytest's "prepend" import mode
    parent, _, child = modname.rpartition(".")
    if parent and pkg_root:
        importlib.import_module(parent)
    spec = importlib.util.spec_from_file_location(modname, path, loader=_RewritingLoader(path))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[modname] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(modname, None)
        raise
    if parent and parent in sys.modules:
        setattr(sys.modules[parent], child, mod)
    _remember(mod)
    return mod


def _same_file(a, b):
    if not a or not b:
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _find_class(module, cls_path):
    """The test class at ``cls_path``: the names it was collected under, dotted (the
    module's attribute, then nested classes' attributes), not its ``__qualname__``, which
    a class made by a factory or ``type()`` does not share."""
    owner = module
    for part in cls_path.split("."):
        owner = getattr(owner, part)
    return owner


def _find_test(module, cls_path, name):
    """The callable to run and the object that owns it (module or a fresh instance)."""
    owner = module
    if cls_path:
        cls = _find_class(module, cls_path)
        # pytest makes one instance per test; so do we (its state comes from the parent).
        owner = cls.__new__(cls)
    return getattr(owner, name), owner


_UNSET = object()
# In a namespace change: put the worker's own value back (plugin._namespace_changes).
RESTORE = "\x00comfy_env: the worker's own value"
_own = {}       # id -> (module or class, {name: value}) as the worker's import made it
_seen = {}      # id -> {name: value_key}: the namespace as the last test left it

# Names of a namespace that no test changes and that are costly or meaningless to
# compare (the builtins' dict, the import machinery's objects, class slots).
IGNORED = frozenset(("__builtins__", "__loader__", "__spec__", "__cached__", "__dict__",
                     "__weakref__", "@py_builtins", "@pytest_ar"))
_IDENTITY = (type(None), bool, int, float, complex, str, bytes, type, types.ModuleType,
             types.FunctionType, types.BuiltinFunctionType, types.MethodDescriptorType,
             types.WrapperDescriptorType, types.MethodWrapperType, types.GetSetDescriptorType,
             types.MemberDescriptorType, staticmethod, classmethod, property)


def fixed(value):
    """Values whose identity says all (nothing in them changes unseen): atoms, modules,
    functions, classes, builtins and descriptors.  A callable *instance* (an nn.Module,
    a functools.partial, a callable config object) is not: its attributes change in
    place, so it is compared by its contents like any other value."""
    return isinstance(value, _IDENTITY)


_Digester = None       # cloudpickle's Pickler, with arrays and tensors taken by checksum


def digest(value):
    """A digest of ``value``'s contents (its pickled bytes), or None when it does not
    pickle.  Arrays and tensors are taken by a checksum of their memory, not pickled:
    a 200 MB module-level array costs a checksum per test, not a copy and a hash."""
    global _Digester
    try:
        mark = _buffer_mark(value)
        if mark is not None:
            return mark
        if _Digester is None:
            import cloudpickle

            class _Digester(cloudpickle.Pickler):
                def reducer_override(self, obj):
                    mark = _buffer_mark(obj)
                    if mark is not None:
                        return tuple, (mark,)
                    return super().reducer_override(obj)

        out = io.BytesIO()
        _Digester(out, protocol=5).dump(value)
        return hashlib.blake2b(out.getbuffer(), digest_size=16).digest()
    except BaseException as exc:        # RecursionError too
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        return None


def _buffer_mark(obj):
    """``(kind, dtype, shape, crc32 of the memory)`` of a numpy array (no objects in it)
    or a torch tensor, else None.  numpy and torch are not imported for this: a value
    can only be one of theirs if its module is loaded."""
    np = sys.modules.get("numpy")
    if np is not None and type(obj) is np.ndarray and not obj.dtype.hasobject:
        flat = np.ascontiguousarray(obj).reshape(-1).view(np.uint8)
        return ("ndarray", obj.dtype.str, obj.shape, zlib.crc32(memoryview(flat)))
    torch = sys.modules.get("torch")
    if torch is not None and type(obj) in (torch.Tensor, torch.nn.Parameter) \
            and obj.layout == torch.strided:
        t = obj.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        flat = t.contiguous().reshape(-1).view(torch.uint8).numpy()
        return ("tensor", type(obj).__name__, str(obj.dtype), str(obj.device), tuple(obj.shape),
                obj.requires_grad, zlib.crc32(memoryview(flat)))
    return None


def value_key(value):
    """What tells whether a namespace's value changed: the object itself (compared by
    identity: an id alone could be a freed object's, reused) and, for a value whose
    contents can change in place, its digest."""
    return (value, None if fixed(value) else digest(value))


def same_key(a, b):
    return a is not None and b is not None and a[0] is b[0] and a[1] == b[1]


def _remember(mod):
    """Keep the test module's namespace, and those of its classes, as this worker's
    import made them: what RESTORE puts back (a test of this worker may have rebound
    or changed them since)."""
    if id(mod) in _own:
        return
    todo = [mod]
    while todo:
        obj = todo.pop()
        if id(obj) in _own:
            continue
        _own[id(obj)] = (obj, dict(vars(obj)))
        for value in list(vars(obj).values()):
            if isinstance(value, type) and getattr(value, "__module__", None) == mod.__name__:
                todo.append(value)


def _sync_namespace(obj, changes):
    """Apply to ``obj`` (the worker's copy of the test module or a class) what the
    pytest process has there now and this worker's copy lacks (``changes``:
    ``(changed, deleted)`` or None; see plugin._namespace_changes).  A value of
    ``RESTORE`` puts back the worker's own (what its import made)."""
    seen = _seen.get(id(obj))
    if changes is None:
        if seen is None:
            _seen[id(obj)] = _keys(obj)
        return
    entry = _own.get(id(obj))
    own = entry[1] if entry is not None and entry[0] is obj else {}
    changed, deleted = changes
    for name, value in changed.items():
        if isinstance(value, str) and value == RESTORE:
            value = own.get(name, _UNSET)
            if value is _UNSET:
                if name in vars(obj):
                    delattr(obj, name)
                continue
        setattr(obj, name, value)
    for name in deleted:
        if name in vars(obj):
            delattr(obj, name)
    if seen is None:
        _seen[id(obj)] = _keys(obj)
    else:
        for name in list(changed) + list(deleted):
            if name in vars(obj):
                seen[name] = value_key(vars(obj)[name])
            else:
                seen.pop(name, None)


def _keys(obj):
    return {name: value_key(value) for name, value in list(vars(obj).items())
            if name not in IGNORED}


def _changed_by_test(synced):
    """``[(path, [names])]``: what the test rebound, deleted or changed in place in the
    namespaces it ran with.  The pytest process sends its own values of those names
    with the next test (a fixture's reset ``CACHE.clear()`` reads as no change there)."""
    out = []
    for path, obj in synced:
        before = _seen.get(id(obj))
        if before is None:
            continue
        now = _keys(obj)
        names = [n for n in set(before) | set(now) if not same_key(before.get(n), now.get(n))]
        _seen[id(obj)] = now
        if names:
            out.append((path, sorted(names)))
    return out


class _RewritingLoader(importlib.machinery.SourceFileLoader):
    """Executes a source file with pytest's assertions rewritten (no pyc cache: a test
    module is rewritten once per worker, and the rewritten pyc belongs to pytest)."""

    def __init__(self, path, fullname=None):
        super().__init__(fullname or "", path)

    def exec_module(self, module):
        from _pytest.assertion.rewrite import rewrite_asserts

        path = self.path
        with open(path, "rb") as f:
            source = f.read()
        tree = ast.parse(source, filename=path)
        if _finder is None or _finder.enabled:       # --assert=plain: no rewriting
            rewrite_asserts(tree, source, path, None)
        exec(compile(tree, path, "exec", dont_inherit=True), module.__dict__)


class _RewritingFinder(importlib.abc.MetaPathFinder):
    """Rewrites what pytest's import hook would: conftest files, modules matching
    ``python_files`` and those named with ``pytest.register_assert_rewrite``."""

    def __init__(self, patterns, marked):
        self.patterns = list(patterns)
        self.marked = tuple(marked)
        self.enabled = True
        self._busy = False

    def _candidate(self, name):
        last = name.rpartition(".")[2]
        if last == "conftest" or any(name == m or name.startswith(m + ".") for m in self.marked):
            return True
        return any(os.sep in p or "/" in p or fnmatch.fnmatch(last + ".py", p) for p in self.patterns)

    def find_spec(self, name, path=None, target=None):
        if self._busy or not self._candidate(name):
            return None
        self._busy = True
        try:
            spec = importlib.machinery.PathFinder.find_spec(name, path)
        finally:
            self._busy = False
        if spec is None or spec.origin is None or \
                not isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            return None
        base = os.path.basename(spec.origin)
        if not (base == "conftest.py" or any(name == m or name.startswith(m + ".") for m in self.marked)
                or any(fnmatch.fnmatch(base, p) or fnmatch.fnmatch(spec.origin, p)
                       for p in self.patterns)):
            return None
        return importlib.util.spec_from_file_location(
            name, spec.origin, loader=_RewritingLoader(spec.origin, name),
            submodule_search_locations=spec.submodule_search_locations)


def _install_rewriting(settings):
    global _finder, _shim
    if _finder is None:
        _finder = _RewritingFinder(settings["python_files"], settings["rewrite_marked"])
        _finder.enabled = settings["rewrite"]
        sys.meta_path.insert(0, _finder)
        _shim = _ConfigShim(settings)
        try:
            from _pytest.assertion import util
            util._reprcompare = _callbinrepr
            util._config = _shim
        except Exception:
            pass        # plain rewritten messages still work


class _ConfigShim:
    """The few things pytest's assertion explanations ask a Config for."""

    class _Plugins:
        @staticmethod
        def has_plugin(name):
            return False

    pluginmanager = _Plugins()

    def __init__(self, settings):
        self._verbose = settings["verbose_assertions"]
        self._ini = dict(settings["ini"])
        self.option = type("Option", (), {"verbose": settings["verbose"]})()

    def get_verbosity(self, verbosity_type=None):
        return self._verbose

    def getini(self, name):
        try:
            return self._ini[name]
        except KeyError:
            raise ValueError(f"unknown configuration value: {name!r}") from None

    def getoption(self, name, default=None, skip=False):
        return getattr(self.option, name, default)

    getvalue = getoption


def _callbinrepr(op, left, right):
    """pytest's ``callbinrepr`` over its built-in ``pytest_assertrepr_compare``
    (conftest hooks of that name run in the pytest process only)."""
    try:
        from _pytest.assertion import pytest_assertrepr_compare

        lines = pytest_assertrepr_compare(config=_shim, op=op, left=left, right=right)
    except Exception:
        return None
    if not lines:
        return None
    return "\n~".join(line.replace("\n", "\\n") for line in lines).replace("%", "%%")


# -- output, logging, warnings ----------------------------------------------------------------


class _FdCapture:
    """fd 1 and 2 into the files the parent named, for the test's duration.

    fd-level, so output of C code and subprocesses is caught too; files rather
    than pipes, so what was written survives the worker's death (the parent
    reads them after a crash or a timeout: faulthandler writes to fd 2).
    """

    def __init__(self, out_path, err_path):
        self.paths = (out_path, err_path)
        self.saved = None

    def start(self):
        _flush_all()
        self.streams = (sys.stdout, sys.stderr)
        self.saved = []
        for fd, path in zip((1, 2), self.paths):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            self.saved.append(os.dup(fd))
            os.dup2(target, fd)
            os.close(target)

    def stop(self):
        _flush_all()
        sys.stdout, sys.stderr = self.streams        # a test that swapped them leaks nothing
        for fd, saved in zip((1, 2), self.saved):
            os.dup2(saved, fd)
            os.close(saved)


def _flush_all():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    try:        # C stdio buffers (printf from an extension), as the process exit would
        import ctypes
        ctypes.CDLL(None).fflush(None)
    except Exception:
        pass


class _LogRecorder(logging.Handler):
    """Takes the root logger's place during the test; the parent re-emits the records.

    The worker's usual handler (which forwards records to the parent's
    ``comfy_env.worker.*`` logger) is set aside meanwhile, or each record would
    arrive twice.  The root level mirrors the parent's (pytest's ``log_level``).
    """

    def __init__(self, level, levels=None):
        super().__init__(logging.NOTSET)
        self.level_wanted = level
        self.levels = levels or {}      # named loggers' levels in the pytest process
        self.records = []

    def __enter__(self):
        root = logging.getLogger()
        self._saved = root.handlers[:], root.level
        root.handlers[:] = [self]
        root.setLevel(self.level_wanted)
        # The named loggers' levels as the pytest process has them now (a conftest's
        # setLevel, caplog.set_level in a fixture): which records a test makes depends
        # on them.  Put back afterwards: the worker runs other tests.
        self._saved_levels = {}
        for name, level in self.levels.items():
            logger = logging.getLogger(name)
            self._saved_levels[name] = logger.level
            logger.setLevel(level)
        return self

    def __exit__(self, *exc):
        root = logging.getLogger()
        root.handlers[:], level = self._saved
        root.setLevel(level)
        for name, level in self._saved_levels.items():
            logging.getLogger(name).setLevel(level)

    def emit(self, record):
        """Keep the record as the parent re-makes it (``logging.makeLogRecord``): every
        attribute, a handler's or formatter's ``extra`` fields included; the message with
        its args when they pickle, else formatted here; the exception's traceback as
        text (a traceback does not pickle), the exception itself where it pickles."""
        try:
            out = {}
            for key, value in vars(record).items():
                if key in ("msg", "args", "exc_info"):
                    continue
                out[key] = value if _pickles(value) else repr(value)
            if _pickles((record.msg, record.args)):
                out["msg"], out["args"] = record.msg, record.args
            else:
                out["msg"], out["args"] = record.getMessage(), None
            if record.exc_info and not out.get("exc_text"):
                out["exc_text"] = logging.Formatter().formatException(record.exc_info)
            if record.exc_info and record.exc_info[0] is not None:
                exc = (record.exc_info[0], record.exc_info[1], None)
                out["exc_info"] = exc if _pickles(exc) else None
            self.records.append(out)
        except Exception:
            pass


def _pickles(value) -> bool:
    import pickle
    try:
        pickle.dumps(value)
        return True
    except Exception:
        return False


def _plain_warnings(recorded):
    out = []
    for w in recorded[:1000]:
        cat = w.category
        out.append((cat.__module__, cat.__qualname__, str(w.message), w.filename, w.lineno))
    return out
