"""pytest plugin (entry point ``comfy_env``): run a test body in a comfy-env worker.

::

    @pytest.mark.isolated(env=None, timeout=None, device=None, fresh=False)
    pytest --isolated --isolated-timeout=SECONDS      (ini: isolated, isolated_timeout)
    def test_x(isolated_executor): ex = isolated_executor(env=None, **kwargs)

Only the *call* phase moves: fixtures are set up and torn down in the pytest
process, their values pickled to the worker (``pytest_pyfunc_call``).  The worker's
outcome comes back as a plain tuple and is raised here as the same pytest outcome
(skip, xfail, fail, exit) or as the test's own exception, whose report is replaced
by the one formatted in the worker, where the frames were
(``pytest_runtest_makereport``).  A timeout or a dead worker fails the test with
the executor's message; the executor starts a new worker for the next test.

This module is imported by every pytest session of a project that installs
comfy-env: it imports pytest and the standard library only; the executor comes
in with the first isolated test.
"""
from __future__ import annotations

import inspect
import logging
import math
import os
import sys
import types
import warnings

import pytest

from .executors import Executors, Isolation, SetupFailed
from .worker_side import IGNORED, RESTORE, digest, fixed

_RUN_TEST = "comfy_env.testing.worker_side:run_test"
_IMPORT_TEST = "comfy_env.testing.worker_side:import_test_module"
_CHECK_VALUES = "comfy_env.testing.worker_side:check_values"
# Importing a test module in a worker is not the test's time: it is bounded by this.
IMPORT_TIMEOUT = 300.0

# pytest-timeout's timer for an isolated test is moved past the isolated timeout by
# this much, so that the worker is killed (with its stack reported) first, and
# pytest-timeout still guards the parent's part (fixtures, the env build).
PYTEST_TIMEOUT_SLACK = 30.0

_STATE = pytest.StashKey()
_ISOLATION = pytest.StashKey()      # Isolation, or a str: what is wrong with the marker
_REPORT = pytest.StashKey()         # what the report of the call phase should show instead
_MARKS = pytest.StashKey()          # the isolated markers _ISOLATION was computed from

# Built-in fixtures whose value cannot do its job in another process.
_REFUSED = {
    "monkeypatch": "its changes would be made in the worker and never undone (the worker runs "
                   "later tests too); patch inside the test with `with pytest.MonkeyPatch.context() "
                   "as mp:`, or set the patch up in a fixture, which runs in the pytest process",
    "capsys": "the worker's output is captured and shown in the report by the plugin; to assert "
              "on output, redirect it inside the test (contextlib.redirect_stdout) or run the "
              "test in-process",
    "capsysbinary": "see capsys",
    "capfd": "see capsys",
    "capfdbinary": "see capsys",
    "caplog": "the worker's log records are shown in the report by the plugin; to assert on "
              "them, attach a logging.Handler inside the test or run the test in-process",
    "recwarn": "use `pytest.warns(...)` or `warnings.catch_warnings(record=True)` inside the test",
    "request": "pass what the test needs through a fixture that returns a picklable value",
    "pytester": "it drives pytest in the pytest process; run the test in-process",
    "isolated_executor": "its executors would be made in the worker and never shut down; "
                         "inside an isolated test use `with IsolatedExecutor() as ex:`",
    "record_property": "it records into the pytest process's report, which the worker cannot "
                       "reach; record from a fixture, or run the test in-process",
    "record_xml_attribute": "see record_property",
    "record_testsuite_property": "see record_property",
    "testdir": "it drives pytest in the pytest process; run the test in-process",
    "capteesys": "see capsys",
    "subtests": "its sub-test reports belong to the pytest process's session, which the worker "
                "cannot reach; parametrize the test instead, or run it in-process",
    "pytestconfig": "the session's config lives in the pytest process; read what the test needs "
                    "(pytestconfig.getoption(...)) in a fixture and pass the value",
    "cache": "pytest's cache is the pytest process's; read or write it in a fixture and pass "
             "the value",
    # pytest-mock's: a MockerFixture (and the mocks it holds) does not cross to another
    # process (unpickling a Mock recurses), and its patches must be undone after the test,
    # in the process where they were made.
    "mocker": "its patches would be made in the worker, where pytest-mock cannot undo them "
              "after the test (and a mocker does not cross processes); patch inside the test "
              "with `with unittest.mock.patch(...):` (or `@unittest.mock.patch` on the test), "
              "which undoes the patch when the test ends",
    "class_mocker": "see mocker",
    "module_mocker": "see mocker",
    "package_mocker": "see mocker",
    "session_mocker": "see mocker",
}

# The packages whose fixtures of those names are refused: pytest's own (``_pytest``,
# and ``pytest`` itself), this plugin's, and pytest-mock's.  A project's fixture of the
# same name, in a module of any other name (``pytest_fixtures.py`` too), is a value.
_REFUSED_FROM = ("_pytest", "pytest", "comfy_env", "pytest_mock", "pytest_subtests")


def _marker_signature(env=None, timeout=None, device=None, *, fresh=False):
    """isolated(env=None, timeout=None, device=None, *, fresh=False)"""


_SIGNATURE = inspect.signature(_marker_signature)


# -- options and configuration ---------------------------------------------------------------


def pytest_addoption(parser):
    group = parser.getgroup("comfy_env", "isolated tests (comfy-env)")
    group.addoption("--isolated", action="store_true", default=None,
                    help="run every test function isolated, in a comfy-env worker of the current "
                         "interpreter's environment unless its isolated marker says otherwise")
    group.addoption("--isolated-timeout", type=float, default=None, metavar="SECONDS",
                    help="default timeout of isolated tests, in seconds (the worker is killed and "
                         "the test fails)")
    parser.addini("isolated", type="bool", default=False,
                  help="run every test function isolated (as --isolated)")
    parser.addini("isolated_timeout", default=None,
                  help="default timeout of isolated tests, in seconds (as --isolated-timeout)")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "isolated(env=None, timeout=None, device=None, fresh=False): run the test body in a "
        "comfy-env worker process, in environment `env` (a comfy-env.toml, an env dir, an "
        "interpreter or an Env; relative to the test file), killed after `timeout` seconds, "
        "pinned to GPU `device`; fresh=True: a new worker for this test")
    state = _State(config)
    config.stash[_STATE] = state
    config.add_cleanup(state.executors.close)


class _State:
    def __init__(self, config):
        self.config = config
        self.executors = Executors()
        self.all = config.getoption("isolated")
        if self.all is None:
            self.all = config.getini("isolated")
        self.timeout = config.getoption("isolated_timeout")
        if self.timeout is None:
            raw = config.getini("isolated_timeout")
            if raw not in (None, ""):
                try:
                    self.timeout = float(raw)
                except ValueError:
                    raise pytest.UsageError(
                        f"ini option isolated_timeout must be a number of seconds, got {raw!r}")
        if self.timeout is not None and (math.isnan(self.timeout) or self.timeout <= 0):
            raise pytest.UsageError(f"--isolated-timeout must be a positive number of seconds, "
                                    f"got {self.timeout}")
        if self.timeout == math.inf:
            self.timeout = None         # no limit, as the executor takes it
        self.capture = config.getoption("capture", "fd") != "no"
        self._settings = None
        self.roots = set()          # sys.path entries of the isolated tests' modules
        # The environment as the session started, and every variable seen to differ
        # from it since (a fixture's monkeypatch.setenv, PYTEST_CURRENT_TEST): each test
        # sends those as they are now (see worker_side._environ).
        self.base_environ = dict(os.environ)
        self.touched_environ = set()
        self.modules = set()        # their names (rewritten even if python_files misses them)
        # id -> (test module or class, its namespace at collection): what setup_module,
        # setup_class, a class fixture's request.cls.x = ... or a fixture's monkeypatch
        # changes in it since is sent with each test (_namespace_changes).
        self.namespaces = {}
        # The fixture functions run (set up or torn down) since the last isolated call:
        # the names they mention are the ones they may have reset (_names_set_up).
        self.ran = set()

    def initargs(self):
        return (self.settings(), sorted(self.roots))

    def settings(self):
        """What the worker needs to import and report like this session (built once,
        after collection: conftests may call register_assert_rewrite while collecting)."""
        if self._settings is None:
            config = self.config
            ini = {}
            for name in ("truncation_limit_lines", "truncation_limit_chars",
                         "assertion_text_diff_style", "enable_assertion_pass_hook"):
                try:
                    ini[name] = config.getini(name)
                except ValueError:
                    pass
            marked = set()
            for finder in sys.meta_path:
                if type(finder).__name__ == "AssertionRewritingHook":
                    marked |= set(getattr(finder, "_must_rewrite", ()))
            get_verbosity = getattr(config, "get_verbosity", None)
            verbose = get_verbosity() if get_verbosity else config.getoption("verbose", 0)
            self._settings = {
                "python_files": list(config.getini("python_files")),
                "rewrite_marked": sorted(marked | self.modules),
                "rewrite": config.getoption("assertmode", "rewrite") == "rewrite",
                "tbstyle": config.getoption("tbstyle", "auto"),
                "fulltrace": bool(config.getoption("fulltrace", False)),
                "showlocals": bool(config.getoption("showlocals", False)),
                "abspath": False,
                "runxfail": bool(config.getoption("runxfail", False)),
                "verbose": verbose,
                "verbose_assertions": get_verbosity("assertions") if get_verbosity else verbose,
                "ini": ini,
            }
        try:
            abspath = os.getcwd() != str(self.config.invocation_params.dir)
        except OSError:
            abspath = True
        if abspath != self._settings["abspath"]:
            self._settings = dict(self._settings, abspath=abspath)
        return self._settings


# -- which tests are isolated, and how -------------------------------------------------------------


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    # trylast: after the other plugins' and conftests' hooks, which may add markers.
    state = config.stash[_STATE]
    for item in items:
        if isinstance(item, pytest.Function):
            _resolve_isolation(item, state, at_collection=True)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    # Markers added after collection (a trylast modifyitems hook of another plugin, one
    # that runs later than ours): read again before the test's setup, and before
    # pytest-timeout's own hook wrapper sets its timer (this one wraps it).
    if isinstance(item, pytest.Function):
        _resolve_isolation(item, item.config.stash[_STATE])
    yield


def _resolve_isolation(item, state, at_collection=False, at_call=False):
    """Set ``item.stash[_ISOLATION]`` from the item's isolated markers as they are now
    (or --isolated): at collection, again when its protocol starts and at its call (a
    fixture's ``request.node.add_marker`` adds one during setup).  Unchanged markers
    are not looked at again."""
    marks = list(item.iter_markers("isolated"))
    if item.stash.get(_MARKS, None) == marks:
        return
    item.stash[_MARKS] = marks
    if not marks and not state.all:
        if _ISOLATION in item.stash:
            del item.stash[_ISOLATION]
        return
    if _is_unittest(item):
        # unittest runs these itself (TestCaseFunction.runtest), never through the
        # function call this plugin moves to a worker: they would run here, with no
        # timeout, as if isolated.  --isolated leaves them in-process; a marker on
        # one is an error at setup, saying so.
        if marks:
            item.stash[_ISOLATION] = (
                "unittest.TestCase tests cannot run isolated: unittest runs them itself, "
                "in the pytest process.  Write the test as a pytest function or plain class "
                "to isolate it, or take the isolated marker off")
        return
    iso = _isolation_of(item, marks, state)
    item.stash[_ISOLATION] = iso
    _register(item, state, known=at_collection)
    if isinstance(iso, Isolation) and iso.timeout is not None and not at_call:
        _extend_pytest_timeout(item, iso.timeout)


def _register(item, state, known):
    """Follow the namespaces of an isolated test's module and classes from now on.
    ``known``: at collection, they are as the worker's import makes them; an item
    marked later finds its module as setup_module and other tests may have left it, so
    every value it holds is sent to the worker (once)."""
    name = item.module.__name__
    if name not in state.modules:
        state.modules.add(name)
        state._settings = None          # rewrite_marked names the test modules
    for obj, path in _namespaces_of(item):
        if id(obj) not in state.namespaces:
            state.namespaces[id(obj)] = (obj, _Snapshot(obj, known), name, path)
    root = _package_root(item.module)
    if root:
        state.roots.add(root)


def _is_unittest(item):
    import unittest
    cls = getattr(item, "cls", None)
    return cls is not None and issubclass(cls, unittest.TestCase)


def _isolation_of(item, marks, state):
    """Merge the item's isolated markers (the closest wins, key by key) with the defaults."""
    given = {}
    for mark in marks:
        try:
            bound = _SIGNATURE.bind(*mark.args, **mark.kwargs)
        except TypeError as exc:
            return (f"bad @pytest.mark.isolated{_call_text(mark)}: {exc}; the marker takes "
                    f"isolated(env=None, timeout=None, device=None, fresh=False)")
        for k, v in bound.arguments.items():
            given.setdefault(k, v)
    timeout = given.get("timeout")
    if timeout is None:
        timeout = state.timeout
    if timeout is None:
        timeout = _pytest_timeout_of(item)
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or math.isnan(timeout) or timeout <= 0):
        return f"isolated(timeout=...) must be a positive number of seconds, got {timeout!r}"
    if timeout == math.inf:
        timeout = None                  # no limit, as the executor takes it
    fresh = given.get("fresh", False)
    if not isinstance(fresh, bool):
        return f"isolated(fresh=...) must be True or False, got {fresh!r}"
    device = given.get("device")
    if device is not None and not isinstance(device, (str, int)):
        return f"isolated(device=...) must be a string such as 'cuda:0', got {device!r}"
    return Isolation(env=given.get("env"), timeout=timeout, device=device, fresh=fresh,
                     base_dir=os.path.dirname(str(item.path)))


def _call_text(mark):
    parts = [repr(a) for a in mark.args] + [f"{k}={v!r}" for k, v in mark.kwargs.items()]
    return f"({', '.join(parts)})"


def _pytest_timeout_of(item):
    """pytest-timeout's timeout for the item (marker, --timeout, ini), or None."""
    if not item.config.pluginmanager.hasplugin("timeout"):
        return None
    mark = item.get_closest_marker("timeout")
    value = None
    if mark is not None:
        value = mark.args[0] if mark.args else mark.kwargs.get("timeout")
    if value is None:
        value = getattr(item.config, "_env_timeout", None)
    try:
        value = float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
    return value if value and value > 0 else None


def _extend_pytest_timeout(item, timeout):
    """No double handling: the isolated timeout kills the worker; pytest-timeout's timer
    (which would os._exit the whole run, or interrupt only the parent) moves past it."""
    current = _pytest_timeout_of(item)
    if current is None or current >= timeout + PYTEST_TIMEOUT_SLACK:
        return
    mark = item.get_closest_marker("timeout")
    kwargs = {}
    if mark is not None:
        # pytest-timeout's marker is timeout(timeout=None, method=None, func_only=None):
        # positional method and func_only must not be dropped either.
        kwargs.update(zip(("method", "func_only"), mark.args[1:]))
        kwargs.update((k, v) for k, v in mark.kwargs.items() if k != "timeout")
    item.add_marker(pytest.mark.timeout(timeout + PYTEST_TIMEOUT_SLACK, **kwargs), append=False)


# -- running the call phase in a worker -----------------------------------------------------------


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    iso = item.stash.get(_ISOLATION, None)
    if isinstance(iso, str):
        pytest.fail(iso, pytrace=False)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    _resolve_isolation(pyfuncitem, pyfuncitem.config.stash[_STATE], at_call=True)
    iso = pyfuncitem.stash.get(_ISOLATION, None)
    if isinstance(iso, str):
        pytest.fail(iso, pytrace=False)         # a bad marker added during setup
    if not isinstance(iso, Isolation):
        return None
    _run_isolated(pyfuncitem, iso, pyfuncitem.config.stash[_STATE])
    return True


def _run_isolated(item, iso, state):
    fixtures = {}
    for name in item._fixtureinfo.argnames:
        if name in _REFUSED and _builtin_fixture(item, name):
            pytest.fail(f"fixture {name!r} cannot be used by an isolated test (the test body runs "
                        f"in a worker process): {_REFUSED[name]}", pytrace=False)
        fixtures[name] = item.funcargs[name]
    instance = getattr(item, "instance", None)
    instance_state = dict(vars(instance)) if instance is not None and vars(instance) else None
    try:
        slot = state.executors.slot(iso, state.initargs())
    except SetupFailed as exc:
        failure = str(exc)
    else:
        failure = None
    if failure is not None:
        pytest.fail(failure, pytrace=False)     # outside the except: no exception chain shown
    try:
        _call(item, iso, state, slot, fixtures, instance_state)
    finally:
        if iso.fresh:
            slot.close(wait=True)


def _builtin_fixture(item, name):
    """Is fixture ``name`` as the test gets it pytest's own (or this plugin's)?  A
    project's fixture that happens to share the name (a ``testdir`` data directory) is
    an ordinary value."""
    defs = item._fixtureinfo.name2fixturedefs.get(name) or ()
    if not defs:
        return True
    module = getattr(defs[-1].func, "__module__", "") or ""
    return module.partition(".")[0] in _REFUSED_FROM


def _class_path(item):
    """The names the item's class was collected under, dotted (its ``__qualname__`` may
    be another's: a class made by a factory or ``type()``), or None."""
    if getattr(item, "cls", None) is None:
        return None
    return ".".join(n.name for n in item.listchain() if isinstance(n, pytest.Class)) or None


def _namespaces_of(item):
    """``[(object, path)]`` whose namespaces the worker's copies follow: the test module
    (path None), the test's class (the names it was collected under), and the module's
    other classes (helpers whose attributes a ``setup_class`` may set)."""
    module = item.module
    out = [(module, None)]
    if getattr(item, "cls", None) is not None:
        out.append((item.cls, _class_path(item)))
    for name, value in list(vars(module).items()):
        if isinstance(value, type) and getattr(value, "__module__", None) == module.__name__ \
                and getattr(value, "__qualname__", None) == name:
            out.append((value, name))
    return out


class _Snapshot:
    """A namespace as collection left it: each name's object and, for objects whose
    contents can change in place, their digest.  ``known=False``: nothing is known of
    it (the worker's copy may differ in anything): every value counts as changed."""

    def __init__(self, obj, known=True):
        self.values = {k: v for k, v in vars(obj).items() if k not in IGNORED} if known else {}
        self.digests = {name: digest(v) for name, v in self.values.items() if not fixed(v)}

    def token(self, name, value):
        """``"="`` when ``value`` is what collection left under ``name`` (the worker's own
        import has it too), else ``("v", digest)``; None when it does not pickle."""
        same = name in self.values and value is self.values[name]
        if same and fixed(value):
            return "="
        d = digest(value)
        if d is None:
            return None
        return "=" if same and d == self.digests.get(name) else ("v", d)


# A view's value ``(_CHANGED_THERE, token)``: the worker's test changed that name there
# (its copy is its own now), when the pytest process had ``token`` under it.
_CHANGED_THERE = "changed in the worker"


def _module_namespaces(state, item, views):
    """``[(class path or None for the module, changes)]`` for the test module and its
    classes, as far as the worker's copies (``views``: what this worker was told, and
    what its tests changed there) differ from the pytest process's now.  A value sent
    once is not sent again while neither side changes it.  What an earlier test changed
    in the worker stays there (a lazily loaded model, a count, as in-process) unless
    this process changed it since or the code it ran for this test's setup names it: a
    fixture's reset (``CACHE.clear()``, ``COUNT = 0``) gives the worker this process's
    value, though that looks like no change here."""
    mentioned = _names_set_up(state)
    return [(path, _namespace_changes(obj, snap, views.setdefault(key, {}), mentioned))
            for key, (obj, snap, mod, path) in state.namespaces.items()
            if mod == item.module.__name__]


_NAMES_OF = {}      # function -> the global and attribute names its code may set


@pytest.hookimpl(tryfirst=True)
def pytest_fixture_setup(fixturedef, request):
    request.config.stash[_STATE].ran.add(fixturedef.func)


def pytest_fixture_post_finalizer(fixturedef, request):
    request.config.stash[_STATE].ran.add(fixturedef.func)


def _names_set_up(state):
    """The names that the fixtures set up or torn down since the last isolated call (the
    xunit setup/teardown functions among them) mention in their code, in the code of
    the functions they close over and of the module-level functions they call by name:
    those they may have set in the test module or its classes."""
    names = set()
    for func in state.ran:
        if func not in _NAMES_OF:
            _NAMES_OF[func] = frozenset(_names_of(func, set()))
        names |= _NAMES_OF[func]
    state.ran.clear()
    return names


def _names_of(func, seen, depth=0):
    func = getattr(func, "__func__", func)          # a bound method (a class's fixture)
    code = getattr(func, "__code__", None)
    if code is None or id(func) in seen or depth > 4:
        return set()
    seen.add(id(func))
    names = set()
    # pytest's own fixtures touch no test module; its xunit wrappers (setup_function,
    # setup_method) hold the user's function in their closure.
    if not (getattr(func, "__module__", "") or "").partition(".")[0] in _REFUSED_FROM:
        todo = [code]
        while todo:
            c = todo.pop()
            names.update(c.co_names)
            todo.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
        glob = getattr(func, "__globals__", {})
        for name in list(names):
            helper = glob.get(name)
            if isinstance(helper, types.FunctionType) and helper.__module__ == func.__module__:
                names |= _names_of(helper, seen, depth + 1)
    for cell in getattr(func, "__closure__", None) or ():
        try:
            inner = cell.cell_contents
        except ValueError:
            continue
        if callable(inner):
            names |= _names_of(inner, seen, depth + 1)
    return names


def _changed_in_worker(state, module_name, views, changed):
    """Note in ``views`` the names the worker reported its test changed (``changed``:
    ``[(class path or None, [names])]``): the next test gets the pytest process's values
    of them, a fixture's reset (``CACHE.clear()``, ``COUNT = 0``) included."""
    keys = {path: key for key, (obj, snap, mod, path) in state.namespaces.items()
            if mod == module_name}
    for path, names in changed or ():
        key = keys.get(path)
        if key is not None:
            view = views.setdefault(key, {})
            for name in names:
                told = view.get(name, "=")
                if not (isinstance(told, tuple) and told[0] == _CHANGED_THERE):
                    view[name] = (_CHANGED_THERE, told)


def _namespace_changes(obj, snap, view, mentioned=frozenset()):
    """``(changed, deleted)`` in ``obj``'s namespace (the test module, or a class) that
    this worker's copy lacks (``view``: name -> what it was told, or what its test
    changed there: see _module_namespaces; ``mentioned``: the names this test's setup
    code may have set), or None.

    What setup_module/setup_class, ``request.cls.x = ...`` in a class fixture, a
    fixture's monkeypatch or an in-place change (``STATE["db"] = ...``) did here, which
    the worker's own copy (imported there) lacks, and the pytest process's value of
    what an earlier test changed in the worker.  A function, class or atom back as
    collection left it (a teardown's undo) is :data:`RESTORE`: the worker puts its own
    back; other values are sent themselves (the worker's own may have been changed in
    place).  Values that cannot be pickled are left out (the worker keeps its own)."""
    now = vars(obj)
    changed = {}
    deleted = []
    for name in set(now) | set(snap.values) | set(view):
        if name in IGNORED:
            continue
        if name in now:
            tok = snap.token(name, now[name])
            if tok is None:
                continue
        else:
            tok = "-" if name in snap.values else "="
        told = view.get(name, "=")
        if isinstance(told, tuple) and told[0] == _CHANGED_THERE:
            if told[1] == tok and name not in mentioned:
                continue        # the worker's own change stays, as in-process
        elif told == tok:
            continue
        view[name] = tok
        if name not in now:
            deleted.append(name)
        elif tok == "=" and fixed(now[name]):
            changed[name] = RESTORE
        else:
            changed[name] = now[name]
    return (changed, deleted) if changed or deleted else None


def _unpicklable(fixtures, instance_state):
    """Name the fixture (or instance attribute) that does not pickle, with why."""
    import cloudpickle

    for what, values in (("fixture", fixtures), ("test class instance attribute",
                                                 instance_state or {})):
        for name, value in values.items():
            try:
                cloudpickle.dumps(value)
            except Exception as exc:        # RecursionError too
                return (f"the value of {what} {name!r} ({type(value).__qualname__}) could not be "
                        f"pickled for the isolated worker: {type(exc).__name__}: {exc}.  Fixture "
                        f"values are made in the pytest process and sent to the worker; return "
                        f"something picklable, or create the object inside the test.")
    return None


def _unloadable(slot, req, fixtures, instance_state):
    """The test's call failed before the test ran (its arguments did not unpickle in
    the worker): find out which value did it, each unpickled on its own there.  Returns
    ``(message, globals)``: a message naming the fixture (or instance attribute) that
    cannot be unpickled, or None; and ``[(namespace index, name, why)]`` of the test
    module's globals that cannot (left out of the request by the caller)."""
    import cloudpickle

    blobs = {}
    values = [("fixture", name, value) for name, value in fixtures.items()]
    values += [("instance", name, value) for name, value in (instance_state or {}).items()]
    for index, (path, changes) in enumerate(req["namespaces"]):
        for name, value in (changes[0] if changes else {}).items():
            if not (isinstance(value, str) and value == RESTORE):
                values.append((index, name, value))
    for where, name, value in values:
        try:
            blobs[(where, name)] = cloudpickle.dumps(value)
        except Exception:
            pass            # it did pickle with the call; this copy cannot tell more
    try:
        bad = slot.executor.submit(_CHECK_VALUES, blobs).result()
    except Exception:
        return None, []
    for (where, name), why in bad.items():
        if where in ("fixture", "instance"):
            what = "fixture" if where == "fixture" else "test class instance attribute"
            value = (fixtures if where == "fixture" else instance_state)[name]
            return (f"the value of {what} {name!r} ({type(value).__qualname__}) could not be "
                    f"unpickled in the isolated worker: {why}.  Fixture values are made in the "
                    f"pytest process and sent to the worker as pickles; return something that "
                    f"unpickles there (plain data), or create the object inside the test."), []
    return None, [(where, name, why) for (where, name), why in bad.items()]


def _leave_out(item, req, bad):
    """Take the globals that do not unpickle in the worker out of the request: the
    worker keeps its own value of each (the docs' "values that cannot cross are left
    out"), which tests that use it may trip on; a warning says which and why.  The
    worker was told of them all the same (``views``), so they are not tried again
    while their value here stays as it is."""
    for index, name, why in bad:
        path, changes = req["namespaces"][index]
        changes[0].pop(name, None)
        where = f"{item.module.__name__}.{path + '.' if path else ''}{name}"
        lineno = (item.location[1] or 0) + 1
        warnings.warn_explicit(pytest.PytestWarning(
            f"{where} is not sent to the isolated worker: its value here could not be "
            f"unpickled there ({why}); the worker keeps its own value of it"),
            pytest.PytestWarning, str(item.path), lineno)


def _call(item, iso, state, slot, fixtures, instance_state):
    from ..errors import CallTimeout, PicklingFailed, WorkerCrashed

    module = item.module
    wenv = slot.executor.env
    sys_path = None
    if wenv.is_current and slot.sent_sys_path != sys.path:
        sys_path = list(sys.path)
        slot.sent_sys_path = sys_path
    views = slot.namespace_views()
    req = {
        "module": (module.__name__, module.__file__, _package_root(module)),
        # The names the class was collected under (its __qualname__ may be another's).
        "target": (_class_path(item), item.originalname),
        "nodeid": item.nodeid,
        "instance": instance_state,
        "namespaces": _module_namespaces(state, item, views),
        "capture": slot.capture_paths if state.capture else None,
        "log_level": logging.getLogger().level,
        "log_levels": _logger_levels(),
        "sys_path": sys_path,
        "cwd": os.getcwd(),
        "settings": state.settings(),
        "environ": _environ_changes(state),
        # pytest's plugins that turn uncaught thread / unraisable exceptions into warnings
        # (-p no:threadexception drops one): the worker does what they would.
        "uncaught": [kind for kind, plugin in (("thread", "threadexception"),
                                                ("unraisable", "unraisableexception"))
                     if item.config.pluginmanager.has_plugin(plugin)],
        # "off": pytest's warnings plugin is not running (-p no:warnings), so neither
        # its filters nor the filterwarnings marks apply, as in this process.
        "warnings": (item.config.getini("filterwarnings"),
                     item.config.known_args_namespace.pythonwarnings or [],
                     [arg for mark in item.iter_markers("filterwarnings") for arg in mark.args],
                     bool(sys.warnoptions))
                    if item.config.pluginmanager.has_plugin("warnings") else "off",
    }
    fut = None
    failure = None
    result = None
    try:
        if slot.needs_import(module.__name__):
            # The module's import first, as a call of its own: outside the test's timeout
            # (a worker replaced after a timeout imports it again: heavy imports failed
            # every test), and what it prints or warns is not the test's (collection
            # showed it in this process).  Without the values to send: one that does not
            # unpickle there is found by the test's call.
            prep = slot.executor._submit_timed(
                IMPORT_TIMEOUT, _IMPORT_TEST,
                {k: v for k, v in req.items() if k not in ("namespaces", "instance")})
            prep_error = prep.exception()
            if prep_error is None:
                slot.imported(module.__name__)
            if isinstance(prep_error, CallTimeout):
                failure = (f"importing the test module in the isolated worker took longer than "
                           f"{IMPORT_TIMEOUT:g} s; {prep_error}")
        # Each round that fails before the test ran leaves out at least one global that
        # does not unpickle in the worker; a fixture that does not fails the test.
        for _ in range(1 + sum(len(c[0]) for _, c in req["namespaces"] if c)):
            if failure is not None:
                break
            fut = slot.executor.submit(_RUN_TEST, req, **fixtures)
            try:
                result = fut.result()
                break
            except (CallTimeout, WorkerCrashed):
                raise
            except Exception:
                # run_test returns the test's own outcome: an exception here means the
                # call did not run, most likely its arguments did not unpickle there.
                failure, bad = _unloadable(slot, req, fixtures, instance_state)
                if failure is None and not bad:
                    raise
                _leave_out(item, req, bad)
                fut = None
        if result is not None:
            # The worker applied this test's namespace changes, and its test changed
            # what it reports (result[4]) there.
            _changed_in_worker(state, module.__name__, views, result[4])
            slot.told(views)
    except CallTimeout as exc:
        stack = getattr(exc, "worker_stack", None)
        failure = f"Timeout: the isolated test timed out after {iso.timeout} s; {exc}"
        if stack and stack not in failure:
            failure += f"\n\nthe worker's threads at the timeout:\n{stack}"
    except WorkerCrashed as exc:
        failure = f"the isolated test's worker died: {exc}"
    except PicklingFailed as exc:
        failure = _unpicklable(fixtures, instance_state) or (
            f"the isolated test's arguments could not be sent to the worker: {exc}")
    except BaseException as exc:
        if fut is not None and fut.done():
            failure = (f"the isolated test could not run in a worker of {wenv.label!r}: "
                       f"{type(exc).__name__}: {exc}")
            cause = exc.__cause__
            if cause is not None and str(cause) not in failure:
                failure += f"\n{cause}"
        elif fut is None and isinstance(exc, Exception):
            failure = _unpicklable(fixtures, instance_state) or (
                f"the isolated test could not be sent to a worker of {wenv.label!r}: "
                f"{type(exc).__name__}: {exc}")
        else:
            # A wait was interrupted (Ctrl-C, pytest-timeout's signal): the worker must
            # not keep running the abandoned test (or import).
            slot.kill_workers()
            raise
    if failure is not None:
        # Outside the except blocks: the report shows the message, not a chain.
        _replay_output(slot, state)
        pytest.fail(failure, pytrace=False)
    kind, detail, logs, warns, _ = result
    _replay_output(slot, state)
    _replay_logs(logs)
    _replay_warnings(warns)
    _raise_outcome(item, kind, detail)


def _environ_changes(state):
    """``{name: value, or None if unset}`` of every variable that differs from the
    session's start now or did before: a worker started while a fixture had set one
    inherited it, and must lose it again when the pytest process has."""
    env, base, touched = os.environ, state.base_environ, state.touched_environ
    touched.update(k for k, v in env.items() if base.get(k) != v)
    touched.update(k for k in base if k not in env)
    return {k: env.get(k) for k in touched}


def _package_root(module):
    """The sys.path entry the module was imported from (pytest's prepend/append modes),
    or None when its name does not follow its path (importlib mode)."""
    path = os.path.splitext(os.path.abspath(module.__file__))[0]
    parts = module.__name__.split(".")
    if os.path.basename(path) == "__init__":
        path = os.path.dirname(path)
    segs = path.split(os.sep)
    if segs[-len(parts):] != parts:
        return None
    return os.sep.join(segs[:-len(parts)]) or os.sep


def _replay_output(slot, state):
    """The worker's captured output goes to this process's streams inside the call phase,
    where pytest's own capture takes it into the test's report sections."""
    if not state.capture:
        return
    out, err = slot.read_capture()
    if out:
        sys.stdout.write(out)
        sys.stdout.flush()
    if err:
        sys.stderr.write(err)
        sys.stderr.flush()


def _logger_levels():
    """``{name: level}`` of the named loggers whose level is set here (comfy_env's own
    excepted): the worker applies them for the test, as they decide which records it makes."""
    out = {}
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if (isinstance(logger, logging.Logger) and logger.level != logging.NOTSET
                and not name.startswith("comfy_env")):
            out[name] = logger.level
    return out


def _replay_logs(records):
    for rec in records:
        logger = logging.getLogger(rec["name"])
        if logger.isEnabledFor(rec["levelno"]):       # as Logger.log would have checked here
            logger.handle(logging.makeLogRecord(rec))


def _replay_warnings(warns):
    # The worker applied the test's filters already: an "error" there raised where the
    # warning was issued.  These are the ones it recorded, for the report, each once.
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        _reemit(warns)


def _reemit(warns):
    for modname, qualname, message, filename, lineno in warns:
        category = sys.modules.get(modname)
        for part in qualname.split("."):
            category = getattr(category, part, None)
        if not (isinstance(category, type) and issubclass(category, Warning)):
            message = f"{modname}.{qualname}: {message}"
            category = UserWarning
        warnings.warn_explicit(message, category, filename, lineno)


def _raise_outcome(item, kind, detail):
    if kind == "passed":
        return
    if kind == "skipped":
        msg, path, lineno, allow_module_level = detail
        if path is not None:
            item.stash[_REPORT] = ("skip", (path, lineno))
        raise pytest.skip.Exception(msg, allow_module_level=allow_module_level)
    if kind == "xfailed":
        raise pytest.xfail.Exception(detail[0])
    if kind == "exit":
        raise pytest.exit.Exception(detail[0], returncode=detail[1])
    if kind == "error":
        pytest.fail(detail[0], pytrace=False)
    qual, msg, exc_blob, longrepr_blob, text, stage, pytrace = detail
    longrepr = _loads(longrepr_blob) if longrepr_blob is not None else None
    if stage != "call":
        what = {"import": "importing the test module", "lookup": "finding the test function",
                "fixtures": "receiving the fixture values"}.get(stage, stage)
        if longrepr is not None:
            try:
                longrepr.addsection("comfy_env", f"the isolated test failed in the worker while "
                                                 f"{what}")
            except Exception:
                pass
    item.stash[_REPORT] = ("longrepr", longrepr if longrepr is not None else text)
    if kind == "fail":
        raise pytest.fail.Exception(msg, pytrace=pytrace)
    exc = _loads(exc_blob) if exc_blob is not None else None
    if not isinstance(exc, BaseException):
        exc = _stand_in(qual, msg)
    if not isinstance(exc, BaseException):
        from ..errors import RemoteError
        exc = RemoteError(qual, msg, text)
    raise exc


def _stand_in(qual, msg):
    """An instance of the worker's exception class, found here by name, when the exception
    itself could not cross (its __init__ takes other arguments than its args, it holds a
    lock): ``xfail(raises=...)`` and ``pytest.raises`` around the test match its type.
    Built without __init__, with ``msg`` as its only argument; None if there is no such class."""
    parts = qual.split(".")
    for i in range(len(parts) - 1, 0, -1):
        obj = sys.modules.get(".".join(parts[:i]))
        if obj is None:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name, None)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            try:
                exc = obj.__new__(obj)
                exc.args = (msg,)
                return exc
            except Exception:
                return None
        return None
    return None


def _loads(blob):
    import pickle

    try:
        return pickle.loads(blob)
    except Exception:
        return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if call.when != "call":
        return
    replacement = item.stash.get(_REPORT, None)
    if replacement is None:
        return
    del item.stash[_REPORT]
    rep = outcome.get_result()
    kind, value = replacement
    if kind == "longrepr" and rep.failed:
        rep.longrepr = value
    elif kind == "skip" and rep.skipped and isinstance(rep.longrepr, tuple):
        rep.longrepr = (value[0], value[1], rep.longrepr[2])


# -- the fixture -----------------------------------------------------------------------------------


@pytest.fixture
def isolated_executor(request):
    """A factory: ``isolated_executor(env=None, **kwargs)`` -> an ``IsolatedExecutor``
    (relative env paths are taken from the test file's directory) that is shut down at
    the end of the test; calls still running then are killed."""
    from ..executor import IsolatedExecutor
    from .executors import _Slot

    made = []
    base = os.path.dirname(str(request.path))

    def factory(env=None, **kwargs):
        if isinstance(env, (str, os.PathLike)):
            env = Isolation(env=env, base_dir=base).resolved_path()
        ex = IsolatedExecutor(env, **kwargs)
        made.append(_Slot(ex, ()))
        return ex

    yield factory
    for slot in made:
        slot.close(wait=True)
