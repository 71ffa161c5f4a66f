"""The pytest plugin (comfy_env.testing): inner pytest sessions run through ``pytester``.

Each test here runs one inner session holding many small tests, so workers are
started a few times per session, not once per behaviour.  In-process sessions are
safe even for crashes: the crash happens in the worker, never in this process.
"""
from __future__ import annotations

import glob
import importlib.metadata
import os
import re
import shutil
import textwrap
import time

import numpy  # noqa: F401  (loaded before pytester's module snapshots: inner sessions that
#               import numpy must not make it import twice in this process)
try:            # torch likewise: imported again after an inner session dropped it, its
    import torch  # noqa: F401  ctypes state broke (SystemError, then a segfault of pytest)
except ImportError:
    pass
import pytest

pytest_plugins = ["pytester"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _entry_point_installed():
    return any(ep.name == "comfy_env" and ep.value == "comfy_env.testing.plugin"
               for ep in importlib.metadata.entry_points(group="pytest11"))


# With comfy-env installed (pip install -e .) the entry point loads the plugin; from a
# bare checkout on PYTHONPATH it must be named (naming it as well would register it twice).
PLUGIN = () if _entry_point_installed() else ("-p", "comfy_env.testing.plugin")


def run(pytester, *args, subprocess=False):
    runner = pytester.runpytest_subprocess if subprocess else pytester.runpytest
    return runner(*PLUGIN, "-p", "no:cacheprovider", *args)


def outcomes(result):
    """{test id: outcome} from the -rA summary lines."""
    got = {}
    for line in result.outlines:
        m = re.match(r"^(PASSED|FAILED|SKIPPED|XFAIL|XPASS|ERROR) (\S+)", line)
        if m and "::" in m.group(2):
            got[m.group(2).split("::", 1)[1]] = m.group(1)
        m = re.match(r"^SKIPPED \[\d+\] (\S+?):(\d+): (.*)$", line)
        if m:
            got.setdefault("skips", []).append((m.group(1), int(m.group(2)), m.group(3)))
    return got


def line_of(pytester, filename, text):
    """1-based line number of ``text`` in a file written by pytester.makepyfile."""
    return (pytester.path / filename).read_text().splitlines().index(text) + 1


def section(result, title):
    """The text of one test's failure section (between its ____ header and the next)."""
    text = result.stdout.str()
    m = re.search(r"_{3,} " + re.escape(title) + r" _{3,}\n(.*?)(?=\n_{3,} |\n={3,} )", text, re.S)
    assert m, f"no section for {title!r} in:\n{text}"
    return m.group(1)


BASICS = '''
import os, sys
import pytest

PARENT = int(os.environ["PARENT_PID"])

def record(name):
    with open("pids.txt", "a") as f:
        f.write(f"{name} {os.getpid()}\\n")

@pytest.fixture
def data():
    return {"a": [1, 2, 3]}

@pytest.fixture(params=[10, 20])
def num(request):
    return request.param

class Point:
    def __init__(self, x):
        self.x = x

@pytest.fixture
def point():
    return Point(4)

@pytest.mark.isolated
def test_pass(data, tmp_path, point):
    record("pass")
    assert os.getpid() != PARENT
    assert data["a"] == [1, 2, 3] and tmp_path.is_dir()
    assert type(point) is Point and point.x == 4      # the class of the rewritten module

@pytest.mark.isolated
def test_again():
    record("again")

@pytest.mark.isolated
def test_assert(data):
    limit = 3
    assert data["a"] == [1, 2, limit + 1]

def helper(v):
    raise ValueError(f"bad value {v}")

@pytest.mark.isolated
def test_exception():
    helper(42)

@pytest.mark.isolated
def test_skip():
    pytest.skip("not here")

@pytest.mark.isolated
def test_xfail_call():
    pytest.xfail("known bug")

@pytest.mark.xfail(raises=ValueError, strict=True)
@pytest.mark.isolated
def test_xfail_marker():
    raise ValueError("expected")

@pytest.mark.xfail(raises=ValueError, strict=True)
@pytest.mark.isolated
def test_xfail_wrong_type():
    raise KeyError("not what was expected")

@pytest.mark.isolated
def test_raises():
    with pytest.raises(ZeroDivisionError, match="division"):
        1 / 0

@pytest.mark.isolated
def test_fail_call():
    pytest.fail("gave up here")

@pytest.mark.isolated
@pytest.mark.parametrize("n", [1, 2])
def test_param(n, num):
    assert n in (1, 2) and num in (10, 20)

@pytest.mark.isolated
class TestClass:
    @pytest.fixture(autouse=True)
    def setup(self):
        self.value = 5

    def test_method(self):
        record("method")
        assert self.value == 5

    def test_method_fails(self):
        assert self.value == 6
'''


def test_outcomes_match_in_process(pytester, monkeypatch):
    monkeypatch.setenv("PARENT_PID", str(os.getpid()))
    pytester.makepyfile(test_basics=BASICS)
    result = run(pytester, "-rA")
    got = outcomes(result)
    assert got["test_pass"] == "PASSED" and got["test_again"] == "PASSED"
    assert got["test_assert"] == "FAILED" and got["test_exception"] == "FAILED"
    assert got["test_xfail_call"] == "XFAIL" and got["test_xfail_marker"] == "XFAIL"
    assert got["test_xfail_wrong_type"] == "FAILED"
    assert got["test_raises"] == "PASSED" and got["test_fail_call"] == "FAILED"
    params = {k: v for k, v in got.items() if k.startswith("test_param[")}
    assert len(params) == 4 and set(params.values()) == {"PASSED"}
    assert got["TestClass::test_method"] == "PASSED"
    assert got["TestClass::test_method_fails"] == "FAILED"
    # The skip is reported where pytest.skip() was called, as in-process.
    assert got["skips"] == [("test_basics.py",
                             line_of(pytester, "test_basics.py", '    pytest.skip("not here")'),
                             "not here")]
    # Rewritten assertion, with pytest's comparison explanation and the source shown.
    text = section(result, "test_assert")
    assert ">       assert data[\"a\"] == [1, 2, limit + 1]" in text
    assert "E       assert [1, 2, 3] == [1, 2, 4]" in text
    assert "At index 2 diff: 3 != 4" in text
    line = line_of(pytester, "test_basics.py", '    assert data["a"] == [1, 2, limit + 1]')
    assert f"test_basics.py:{line}: AssertionError" in text
    # The worker-side traceback: the test frame and the helper it called.
    text = section(result, "test_exception")
    assert ">       helper(42)" in text and 'raise ValueError(f"bad value {v}")' in text
    assert "E       ValueError: bad value 42" in text
    assert "E       Failed: gave up here" in section(result, "test_fail_call")
    assert "assert 5 == 6" in section(result, "TestClass.test_method_fails")
    # One worker ran them all (reused), and it was not this process.
    pids = dict(line.split() for line in (pytester.path / "pids.txt").read_text().splitlines())
    assert len(set(pids.values())) == 1 and int(pids["pass"]) != os.getpid()


OUTPUT = '''
import ctypes, logging, os, sys, warnings
import pytest

@pytest.mark.isolated
def test_output():
    print("to stdout")
    print("to stderr", file=sys.stderr)
    os.write(1, b"fd-level stdout\\n")
    ctypes.CDLL(None).printf(b"from C printf\\n")
    logging.getLogger("node").warning("a warning record")
    logging.getLogger("node").info("an info record")
    warnings.warn("deprecated thing", DeprecationWarning)
    assert False

@pytest.mark.isolated
def test_next():
    print("second test output")
    assert False
'''


def test_output_lands_in_the_tests_report_sections(pytester):
    pytester.makepyfile(test_out=OUTPUT)
    result = run(pytester, "-rA", "-W", "always::DeprecationWarning")
    text = section(result, "test_output")
    out = text.split("Captured stdout call")[1].split("Captured stderr call")[0]
    assert "to stdout" in out and "fd-level stdout" in out and "from C printf" in out
    assert "to stderr" in text.split("Captured stderr call")[1]
    line = line_of(pytester, "test_out.py", '    logging.getLogger("node").warning("a warning record")')
    assert f"WARNING  node:test_out.py:{line} a warning record" in text
    assert "INFO     node" not in text                 # root level WARNING, as in-process
    assert "second test output" not in text
    assert "second test output" in section(result, "test_next")
    line = line_of(pytester, "test_out.py", '    warnings.warn("deprecated thing", DeprecationWarning)')
    result.stdout.fnmatch_lines([f"*test_out.py:{line}: DeprecationWarning: deprecated thing*"])


def test_log_level_option_reaches_the_worker(pytester):
    pytester.makepyfile(test_out=OUTPUT)
    result = run(pytester, "--log-level=INFO", "-k", "test_output")
    line = line_of(pytester, "test_out.py", '    logging.getLogger("node").info("an info record")')
    assert f"INFO     node:test_out.py:{line} an info record" in section(result, "test_output")


CRASHES = '''
import ctypes, os, time
import pytest

@pytest.mark.isolated(timeout=1)
def test_sleeps():
    print("before the hang")
    time.sleep(30)

@pytest.mark.isolated(timeout=1)
def test_c_call_holding_the_gil():
    ctypes.PyDLL(None).sleep(30)      # PyDLL: the GIL stays held

@pytest.mark.isolated
def test_segfault():
    ctypes.string_at(0)

@pytest.mark.isolated
def test_exit():
    os._exit(3)

@pytest.mark.isolated
def test_goes_on():
    pass
'''


@pytest.mark.timeout(60)
def test_timeouts_and_crashes_fail_only_their_test(pytester):
    pytester.makepyfile(test_crash=CRASHES)
    result = run(pytester, "-rA")
    got = outcomes(result)
    assert got == {"test_sleeps": "FAILED", "test_c_call_holding_the_gil": "FAILED",
                   "test_segfault": "FAILED", "test_exit": "FAILED", "test_goes_on": "PASSED"}
    text = section(result, "test_sleeps")
    assert "timed out after 1 s" in text and "was killed" in text
    assert "before the hang" in text                   # output up to the kill is kept
    assert "timed out after 1 s" in section(result, "test_c_call_holding_the_gil")
    assert "SIGSEGV" in section(result, "test_segfault")
    assert "exited with code 3" in section(result, "test_exit")


LEFTOVERS = '''
import os, subprocess, sys, time
import pytest

def server(name):
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with open(os.path.join(os.path.dirname(__file__), name), "w") as f:
        f.write(str(p.pid))

@pytest.mark.isolated(timeout=1)
def test_hangs_with_a_server():
    server("hang.pid")
    time.sleep(30)

@pytest.mark.isolated
def test_exits_with_a_server():
    server("exit.pid")
    os._exit(3)
'''


@pytest.mark.timeout(60)
def test_a_timed_out_or_crashed_tests_processes_go_with_its_worker(pytester):
    # A test that started a server and then hung or died must not leave it running for
    # the rest of the session (or after it).
    pytester.makepyfile(test_leftovers=LEFTOVERS)
    result = run(pytester, "-rA")
    assert outcomes(result) == {"test_hangs_with_a_server": "FAILED", "test_exits_with_a_server": "FAILED"}
    pids = [int((pytester.path / name).read_text()) for name in ("hang.pid", "exit.pid")]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.05)
    left = [p for p in pids if _running(p)]
    for p in left:
        os.kill(p, 9)
    assert not left, f"left running: {left}"


def _running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
    except OSError:
        return False
    return st[st.rindex(")") + 2] not in "ZX"


SLOW_IMPORT = '''
import time
import pytest

time.sleep(1.5)                 # a module whose imports take longer than its tests' timeout

@pytest.mark.isolated(timeout=1)
def test_first():
    pass

@pytest.mark.isolated(timeout=1)
def test_hangs():
    time.sleep(30)

@pytest.mark.isolated(timeout=1)
def test_after_the_kill():
    pass
'''


@pytest.mark.timeout(90)
def test_the_timeout_does_not_count_the_workers_import_of_the_test_module(pytester):
    """In the pytest process collection imports the module and pytest-timeout does not
    count it; in the worker the import ran inside the timed call, and a worker replaced
    after a timeout imported again: every test of a slow-to-import module failed."""
    pytester.makepyfile(test_slow_import=SLOW_IMPORT)
    result = run(pytester, "-rA")
    assert outcomes(result) == {"test_first": "PASSED", "test_hangs": "FAILED",
                                "test_after_the_kill": "PASSED"}
    assert "timed out after 1 s" in section(result, "test_hangs")


def _workers_have_faulthandler():
    import faulthandler

    from comfy_env import IsolatedExecutor
    with IsolatedExecutor() as ex:
        return ex.submit(faulthandler.is_enabled).result(60)


needs_worker_stacks = pytest.mark.skipif(
    not _workers_have_faulthandler(),
    reason="workers without faulthandler: the stack on timeout/crash comes with the executor's "
           "faulthandler support")


@needs_worker_stacks
@pytest.mark.timeout(60)
def test_timeout_report_shows_the_workers_stack(pytester):
    """Needs the executor's stack-on-timeout (helper "proc"): fails before that lands."""
    pytester.makepyfile(test_crash=CRASHES)
    result = run(pytester, "-k", "sleeps or gil")
    # makepyfile drops the leading blank line: time.sleep(30) is line 7 of test_crash.py
    assert re.search(r"test_crash\.py\", line 7,? in test_sleeps", section(result, "test_sleeps"))
    assert "in test_c_call_holding_the_gil" in section(result, "test_c_call_holding_the_gil")


@needs_worker_stacks
def test_segfault_report_shows_the_python_stack(pytester):
    """Needs faulthandler in the worker (helper "proc"): fails before that lands."""
    pytester.makepyfile(test_crash=CRASHES)
    result = run(pytester, "-k", "segfault")
    text = section(result, "test_segfault")
    assert "Segmentation fault" in text and "in test_segfault" in text


BAD = '''
import threading
import pytest

@pytest.fixture
def lock():
    return threading.Lock()

@pytest.mark.isolated(colour="red")
def test_unknown_kwarg():
    pass

@pytest.mark.isolated(timeout="soon")
def test_bad_timeout():
    pass

@pytest.mark.isolated(env="broken/comfy-env.toml")
def test_broken_env():
    pass

@pytest.mark.isolated(env="broken/comfy-env.toml")
def test_broken_env_again():
    pass

@pytest.mark.isolated(env="no/such/env")
def test_missing_env():
    pass

@pytest.mark.isolated
def test_unpicklable(lock):
    pass

@pytest.mark.isolated
def test_monkeypatch(monkeypatch):
    pass

@pytest.mark.isolated
def test_fine():
    pass
'''


@pytest.mark.timeout(60)
def test_bad_input_fails_that_test_clearly(pytester):
    pytester.makepyfile(test_bad=BAD)
    (pytester.path / "broken").mkdir()
    (pytester.path / "broken" / "comfy-env.toml").write_text('name = "x"\nrequirement = ["numpy"]\n')
    result = run(pytester, "-rA")
    got = outcomes(result)
    assert got["test_unknown_kwarg"] == "ERROR" and got["test_bad_timeout"] == "ERROR"
    for t in ("test_broken_env", "test_broken_env_again", "test_missing_env", "test_unpicklable",
              "test_monkeypatch"):
        assert got[t] == "FAILED", t
    assert got["test_fine"] == "PASSED"
    assert "unexpected keyword argument 'colour'" in section(result, "ERROR at setup of test_unknown_kwarg")
    assert "positive number of seconds, got 'soon'" in section(result, "ERROR at setup of test_bad_timeout")
    text = section(result, "test_broken_env")
    assert "could not be prepared" in text and "requirement" in text
    assert "could not be prepared" in section(result, "test_missing_env")
    text = section(result, "test_unpicklable")
    assert "fixture 'lock'" in text and "could not be pickled" in text
    assert "fixture 'monkeypatch' cannot be used" in section(result, "test_monkeypatch")


PLAIN = '''
import os, time
import pytest

def test_plain():
    assert os.getpid() != int(os.environ["PARENT_PID"])

def test_plain_hang():
    time.sleep(30)

@pytest.mark.isolated(timeout=20)
def test_marker_wins():
    time.sleep(2)
'''


@pytest.mark.timeout(60)
def test_isolated_option_and_ini(pytester, monkeypatch):
    monkeypatch.setenv("PARENT_PID", str(os.getpid()))
    pytester.makepyfile(test_opts=PLAIN)
    result = run(pytester, "-rA", "--isolated", "--isolated-timeout=1")
    assert outcomes(result) == {"test_plain": "PASSED", "test_plain_hang": "FAILED",
                                "test_marker_wins": "PASSED"}
    assert "timed out after 1.0 s" in section(result, "test_plain_hang")
    pytester.makeini("[pytest]\nisolated = true\nisolated_timeout = 1\n")
    result = run(pytester, "-rA")
    assert outcomes(result) == {"test_plain": "PASSED", "test_plain_hang": "FAILED",
                                "test_marker_wins": "PASSED"}
    result = run(pytester, "-rA", "-k", "test_plain and not hang", "-o", "isolated=false")
    assert outcomes(result) == {"test_plain": "FAILED"}      # in-process: same pid


def test_pytest_timeout_does_not_double_handle(pytester):
    """pytest-timeout's timeout becomes the isolated timeout; its own timer moves later."""
    pytest.importorskip("pytest_timeout")
    pytester.makepyfile(test_t='''
        import time
        import pytest

        @pytest.mark.isolated
        def test_hang():
            time.sleep(30)

        def test_after():
            pass
    ''')
    result = run(pytester, "-rA", "--timeout=1")
    assert outcomes(result) == {"test_hang": "FAILED", "test_after": "PASSED"}
    text = section(result, "test_hang")
    assert "timed out after 1.0 s" in text and "Timeout >" not in text


def test_fresh_gives_each_test_a_new_worker(pytester):
    pytester.makepyfile(test_fresh='''
        import os
        import pytest

        STATE = []

        @pytest.mark.isolated(fresh=True)
        @pytest.mark.parametrize("i", range(3))
        def test_fresh(i):
            STATE.append(i)
            assert STATE == [i]
            open("fresh.txt", "a").write(f"{os.getpid()}\\n")

        @pytest.mark.isolated
        @pytest.mark.parametrize("i", range(2))
        def test_shared(i):
            STATE.append(i)
            assert STATE == list(range(i + 1))      # module state lives on in a reused worker
    ''')
    result = run(pytester)
    result.assert_outcomes(passed=5)
    assert len(set((pytester.path / "fresh.txt").read_text().split())) == 3


def test_isolated_executor_fixture(pytester):
    pytester.makepyfile(test_fx='''
        import os
        import pytest

        def test_drive(isolated_executor):
            ex = isolated_executor(max_workers=2)
            pid = ex.submit(os.getpid).result(60)
            assert pid != os.getpid()
            open("fx.txt", "w").write(str(pid))

        def test_gone():
            pid = int(open("fx.txt").read())
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    ''')
    run(pytester).assert_outcomes(passed=2)


@pytest.mark.timeout(90)
def test_under_xdist(pytester, monkeypatch):
    pytest.importorskip("xdist")
    monkeypatch.setenv("PARENT_PID", str(os.getpid()))
    pytester.makepyfile(test_basics=BASICS)
    result = run(pytester, "-n", "2", "-rA", subprocess=True)
    got = outcomes(result)
    assert got["test_pass"] == "PASSED" and got["test_assert"] == "FAILED"
    assert got["test_xfail_marker"] == "XFAIL" and got["TestClass::test_method"] == "PASSED"
    result.stdout.fnmatch_lines(["*At index 2 diff: 3 != 4*"])


# -- another environment ----------------------------------------------------------------------

NUMPY1_WHEEL = "/opt/pypi/files/numpy-1.26.4-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"


@pytest.fixture(scope="module")
def numpy1_env(tmp_path_factory):
    """A comfy-env.toml for numpy 1.26.4 (offline, a local wheel) and a cache it is built in."""
    import sys
    if sys.version_info[:2] != (3, 11) or not os.path.exists(NUMPY1_WHEEL):
        pytest.skip("needs Python 3.11 and the local numpy 1.26.4 wheel")
    wheels = tmp_path_factory.mktemp("wheels")
    shutil.copy(NUMPY1_WHEEL, wheels)
    spec = tmp_path_factory.mktemp("np1") / "comfy-env.toml"
    spec.write_text(textwrap.dedent(f'''
        name = "numpy1"
        requirements = ["numpy==1.26.4"]
        find_links = ["{wheels}"]
        no_index = true
    '''))
    cache = tmp_path_factory.mktemp("cache")
    from comfy_env import Env
    Env.from_toml(spec, cache_dir=str(cache)).create(progress=False)
    return spec, cache


@pytest.mark.timeout(120)
def test_env_with_another_numpy(pytester, numpy1_env, monkeypatch):
    spec, cache = numpy1_env
    monkeypatch.setenv("COMFY_ENV_CACHE_DIR", str(cache))
    import numpy
    assert numpy.__version__.startswith("2.")
    shutil.copytree(spec.parent, pytester.path / "np1")
    pytester.makepyfile(test_np='''
        import numpy as np
        import pytest

        @pytest.fixture
        def arr():
            return np.arange(1 << 18)

        @pytest.mark.isolated(env="np1/comfy-env.toml")
        def test_old_numpy(arr):
            assert np.__version__ == "1.26.4"
            assert int(arr.sum()) == (1 << 18) * ((1 << 18) - 1) // 2

        @pytest.mark.isolated(env="np1/comfy-env.toml")
        def test_fails_there():
            version = np.__version__
            assert version == "2.0"

        @pytest.mark.isolated(env="np1/comfy-env.toml")
        def test_skip_there():
            pytest.importorskip("torch")

        def test_host():
            assert np.__version__.startswith("2.")
    ''')
    result = run(pytester, "-rA")
    assert outcomes(result) == {"test_old_numpy": "PASSED", "test_fails_there": "FAILED",
                                "test_host": "PASSED",
                                "skips": [("test_np.py", line_of(pytester, "test_np.py",
                                                                 '    pytest.importorskip("torch")'),
                                           "could not import 'torch': No module named 'torch'")]}
    assert "AssertionError: assert '1.26.4' == '2.0'" in section(result, "test_fails_there")


# -- the documentation's examples run -------------------------------------------------------------


def _doc_test_files():
    """``python`` blocks of README.md's and docs/testing.md's isolated-test sections."""
    out = []
    for path in (os.path.join(REPO, "README.md"), os.path.join(REPO, "docs", "testing.md")):
        if not os.path.exists(path):
            continue
        text = open(path, encoding="utf-8").read()
        for block in re.findall(r"```python\n(.*?)```", text, re.S):
            if "pytest.mark.isolated" in block and "def test_" in block:
                out.append((os.path.relpath(path, REPO), block))
    return out


@pytest.mark.timeout(90)
@pytest.mark.parametrize("where,code", _doc_test_files(), ids=lambda v: v if v.endswith(".md") else "")
def test_doc_examples_pass(pytester, where, code):
    pytester.makepyfile(test_example=code)
    result = run(pytester, "-rA")
    assert result.ret == 0, result.stdout.str()


GPU_TEST = '''
import pytest, torch

@pytest.mark.isolated(timeout=120)
def test_cuda_in_the_worker():
    x = torch.arange(1024, device="cuda", dtype=torch.float32)
    assert float(x.sum()) == 1023 * 1024 / 2
    assert torch.cuda.is_initialized()
'''


@pytest.mark.gpu
@pytest.mark.timeout(150)
def test_an_isolated_gpu_test_uses_cuda_in_its_worker(pytester):
    """Workers are spawned, never forked, so CUDA initialises in them (device machine only)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytester.makepyfile(test_gpu=GPU_TEST)
    result = run(pytester, "-rA")
    assert outcomes(result) == {"test_cuda_in_the_worker": "PASSED"}, result.stdout.str()


SESSION_DETAILS = '''
import os
import unittest
import pytest

@pytest.fixture
def flag(monkeypatch):
    monkeypatch.setenv("MY_FLAG", "on")
    return "on"

@pytest.mark.isolated
def test_env_from_a_fixture(flag):
    assert os.getpid() != int(os.environ["PARENT_PID"])
    assert os.environ["MY_FLAG"] == "on"
    assert os.environ["PYTEST_CURRENT_TEST"].endswith("test_env_from_a_fixture (call)")

@pytest.mark.isolated
def test_env_is_gone_for_the_next_test():
    assert "MY_FLAG" not in os.environ

@pytest.mark.isolated
def test_refused_executor_fixture(isolated_executor):
    pass

@pytest.mark.isolated
def test_refused_record_property(record_property):
    pass

@pytest.mark.isolated(env="no/such/env")
def test_missing_env_setup():
    pass

@pytest.mark.isolated(timeout=1)
class TestCaseMarked(unittest.TestCase):
    def test_method(self):
        pass

@pytest.mark.isolated(timeout=1)
@pytest.mark.timeout(2, "thread")
def test_positional_timeout_method_kept():
    pass
'''


@pytest.mark.timeout(90)
def test_fixture_environment_refused_fixtures_unittest_and_setup_messages(pytester, monkeypatch):
    monkeypatch.setenv("PARENT_PID", str(os.getpid()))
    pytester.makepyfile(test_details=SESSION_DETAILS)
    result = run(pytester, "-rA", "-p", "timeout")
    got = outcomes(result)
    assert got["test_env_from_a_fixture"] == "PASSED"
    assert got["test_env_is_gone_for_the_next_test"] == "PASSED"
    assert got["test_refused_executor_fixture"] in ("FAILED", "ERROR")
    assert "isolated_executor" in result.stdout.str() and "IsolatedExecutor() as ex" in result.stdout.str()
    assert got["test_refused_record_property"] in ("FAILED", "ERROR")
    assert got["TestCaseMarked::test_method"] == "ERROR"
    assert "unittest.TestCase tests cannot run isolated" in result.stdout.str()
    assert got["test_positional_timeout_method_kept"] == "PASSED"
    text = result.stdout.str()
    assert "no/such/env" in text and "During handling of the above exception" not in text


WARNING_FILTERS = '''
import warnings
import pytest

@pytest.mark.isolated
@pytest.mark.filterwarnings("error")
def test_error_filter_raises_where_the_warning_is_issued(tmp_path):
    with pytest.raises(UserWarning):
        warnings.warn("boom")
    warnings.warn("stops here")
    (tmp_path / "after").write_text("x")

@pytest.mark.isolated
def test_repeated_warning_counts_as_in_process():
    for _ in range(10):
        warnings.warn("same place", UserWarning)
'''


@pytest.mark.timeout(90)
def test_warning_filters_apply_in_the_worker_as_in_process(pytester):
    pytester.makepyfile(test_warn=WARNING_FILTERS)
    isolated = run(pytester, "-rA")
    plain = pytester.runpytest("-p", "no:cacheprovider", "-rA", "-p", "no:comfy_env")
    assert outcomes(isolated) == outcomes(plain) == {
        "test_error_filter_raises_where_the_warning_is_issued": "FAILED",
        "test_repeated_warning_counts_as_in_process": "PASSED"}
    assert "UserWarning: stops here" in section(isolated, "test_error_filter_raises_where_the_warning_is_issued")
    assert not list(pytester.path.rglob("after"))          # it stopped at the warning

    def warnings_in(result):
        return re.search(r"(\d+) warnings?", result.outlines[-1]).group(1)

    assert warnings_in(isolated) == warnings_in(plain), (isolated.outlines[-1], plain.outlines[-1])


ODD_EXCEPTIONS = '''
import threading
import pytest

class TwoArgs(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a}/{b}")

class HoldsALock(Exception):
    def __init__(self):
        super().__init__("locked")
        self.lock = threading.Lock()

@pytest.mark.isolated
@pytest.mark.xfail(raises=TwoArgs, strict=True)
def test_two_args():
    raise TwoArgs(1, 2)

@pytest.mark.isolated
@pytest.mark.xfail(raises=HoldsALock, strict=True)
def test_holds_a_lock():
    raise HoldsALock()

@pytest.mark.isolated
@pytest.mark.xfail(raises=KeyError, strict=True)
def test_other_type_still_fails():
    raise TwoArgs(3, 4)
'''


@pytest.mark.timeout(90)
def test_xfail_raises_matches_exceptions_that_cannot_cross_as_they_are(pytester):
    pytester.makepyfile(test_odd=ODD_EXCEPTIONS)
    result = run(pytester, "-rA")
    assert outcomes(result) == {"test_two_args": "XFAIL", "test_holds_a_lock": "XFAIL",
                                "test_other_type_still_fails": "FAILED"}
    assert "1/2" not in section(result, "test_other_type_still_fails") and \
        "3/4" in section(result, "test_other_type_still_fails")


AS_IN_PROCESS = '''
import gc
import logging
import sys
import threading
import warnings
import pytest

print("MODULE-LEVEL PRINT")
warnings.warn("warned at import")

logging.getLogger("noisy").setLevel(logging.ERROR)


@pytest.fixture(autouse=True)
def app_debug():
    logging.getLogger("app").setLevel(logging.DEBUG)
    yield
    logging.getLogger("app").setLevel(logging.NOTSET)


@pytest.mark.isolated
@pytest.mark.filterwarnings("error")
def test_import_warning_is_not_this_tests():
    print("mine")


@pytest.mark.isolated
def test_logger_levels_as_here():
    logging.getLogger("noisy").warning("NOISY-WARNING")
    logging.getLogger("app").debug("APP-DEBUG")
    assert False


@pytest.mark.isolated
@pytest.mark.filterwarnings("error")
def test_thread_exception():
    t = threading.Thread(target=lambda: 1 / 0)
    t.start()
    t.join()


class _Bad:
    def __del__(self):
        raise ValueError("in del")


@pytest.mark.isolated
@pytest.mark.filterwarnings("error")
def test_unraisable():
    _Bad()
    gc.collect()


@pytest.mark.isolated
@pytest.mark.filterwarnings("error")
def test_returns_a_value():
    return 1


@pytest.mark.isolated
def test_reading_stdin_fails_while_captured():
    sys.stdin.read()


class _Base:
    def test_in_class(self):
        assert type(self).__name__ in ("Renamed", "Made")


def _factory():
    class Made(_Base):
        pass
    return Made


TestRenamed = pytest.mark.isolated(type("Renamed", (_Base,), {}))
TestMade = pytest.mark.isolated(_factory())
'''


@pytest.mark.timeout(120)
def test_outcomes_output_logs_and_warnings_as_in_process(pytester):
    """What pytest itself does around a test's call happens for an isolated test too:
    the warnings of an uncaught thread exception, an unraisable exception and a returned
    value (under an "error" filter: failures); the module's import is not the first
    test's (its print and warning stay out of it); named loggers' levels apply; stdin
    cannot be read while output is captured; classes are found by the name they were
    collected under."""
    pytester.makepyfile(test_as_in_process=AS_IN_PROCESS)
    isolated = run(pytester, "-rA", "-p", "no:randomly")
    plain = pytester.runpytest("-p", "no:cacheprovider", "-rA", "-p", "no:comfy_env", "-p", "no:randomly")
    expected = {
        "test_import_warning_is_not_this_tests": "PASSED",
        "test_logger_levels_as_here": "FAILED",
        "test_thread_exception": "FAILED",
        "test_unraisable": "FAILED",
        "test_returns_a_value": "FAILED",
        "test_reading_stdin_fails_while_captured": "FAILED",
        "TestRenamed::test_in_class": "PASSED",
        "TestMade::test_in_class": "PASSED",
    }
    assert outcomes(plain) == expected, plain.stdout.str()
    assert outcomes(isolated) == expected, isolated.stdout.str()
    for result in (isolated, plain):
        logs = section(result, "test_logger_levels_as_here").split("Captured log call")[1]
        assert "APP-DEBUG" in logs and "NOISY-WARNING" not in logs
        assert "PytestUnhandledThreadExceptionWarning" in section(result, "test_thread_exception")
        assert "PytestUnraisableExceptionWarning" in section(result, "test_unraisable")
        assert "PytestReturnNotNoneWarning" in section(result, "test_returns_a_value")
        assert "reading from stdin while output is captured" in section(
            result, "test_reading_stdin_fails_while_captured")
    text = isolated.stdout.str()
    assert text.count("MODULE-LEVEL PRINT") == 0, text
    assert text.count("UserWarning: warned at import") == plain.stdout.str().count(
        "UserWarning: warned at import") == 1, text



AS_IN_PROCESS_2 = '''
import logging, threading
import pytest

log = logging.getLogger("app")


@pytest.fixture
def testdir(tmp_path):                # a project's own fixture that shares a built-in's name
    return str(tmp_path)


@pytest.fixture
def audit_log(caplog):
    yield
    recs = caplog.get_records("call")
    assert [getattr(r, "request_id", None) for r in recs] == ["r-1", "r-1"]
    assert [r.exc_info is not None for r in recs] == [False, True]
    assert recs[0].args == ("job",) and recs[0].getMessage() == "start job"


@pytest.mark.isolated
def test_own_fixture_named_like_a_builtin(testdir):
    assert isinstance(testdir, str)


@pytest.mark.isolated
def test_log_records_keep_extra_args_and_exc_info(audit_log):
    log.warning("start %s", "job", extra={"request_id": "r-1"})
    try:
        1 / 0
    except ZeroDivisionError:
        log.exception("failed", extra={"request_id": "r-1"})


@pytest.mark.isolated
def test_thread_exception_without_its_plugin():
    t = threading.Thread(target=lambda: 1 / 0)
    t.start()
    t.join()
'''


@pytest.mark.timeout(120)
def test_more_outcomes_as_in_process(pytester):
    """A project fixture named like a refused built-in (``testdir``) is an ordinary value;
    replayed log records keep their ``extra`` fields, args and exc_info (a
    ``%(request_id)s`` log format failed); ``-p no:threadexception`` is honoured."""
    pytester.makepyfile(test_more=AS_IN_PROCESS_2)
    args = ("-rA", "-W", "error", "-p", "no:threadexception", "-o", "log_format=%(levelname)s [%(request_id)s] %(message)s")
    isolated = run(pytester, *args)
    # In a subprocess: in this one the thread's exception would reach this session's own plugin.
    plain = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:comfy_env", *args,
                                          "-W", "ignore::pytest.PytestUnknownMarkWarning")
    expected = {"test_own_fixture_named_like_a_builtin": "PASSED",
                "test_log_records_keep_extra_args_and_exc_info": "PASSED",
                "test_thread_exception_without_its_plugin": "PASSED"}
    assert outcomes(plain) == expected, plain.stdout.str()
    assert outcomes(isolated) == expected, isolated.stdout.str()
    assert "WARNING [r-1] start job" in isolated.stdout.str()

BAD_TIMEOUTS = '''
import pytest

@pytest.mark.isolated(timeout=float("nan"))
def test_nan():
    pass

@pytest.mark.isolated(timeout=float("inf"))
def test_inf_is_no_limit():
    pass

@pytest.mark.isolated
def test_refused_capteesys(capteesys):
    pass

@pytest.mark.isolated
def test_refused_pytestconfig(pytestconfig):
    pass
'''


@pytest.mark.timeout(90)
def test_bad_timeouts_and_more_refused_fixtures(pytester):
    pytester.makepyfile(test_bad=BAD_TIMEOUTS)
    result = run(pytester, "-rA")
    got = outcomes(result)
    assert got["test_nan"] == "ERROR" and "must be a positive number of seconds, got nan" in result.stdout.str()
    assert got["test_inf_is_no_limit"] == "PASSED"
    if "test_refused_capteesys" in got:                  # pytest >= 8.4 has the fixture
        assert got["test_refused_capteesys"] in ("FAILED", "ERROR")
        assert "fixture 'capteesys' cannot be used by an isolated test" in result.stdout.str()
    # Said why, not "could not be pickled (EncodedFile)" (``cache`` the same way; these
    # runs have no cacheprovider).
    assert got["test_refused_pytestconfig"] == "FAILED"
    assert "fixture 'pytestconfig' cannot be used by an isolated test" in result.stdout.str()
    usage = run(pytester, "--isolated-timeout=nan")
    assert usage.ret == pytest.ExitCode.USAGE_ERROR
    assert "--isolated-timeout must be a positive number of seconds, got nan" in usage.stderr.str()


NAMESPACES = """
import pytest

LIMIT = 1
SEEN = None
STATE = {}
COUNTER = None


def setup_module(module):
    global SEEN, COUNTER
    SEEN = "set up"
    COUNTER = 0
    STATE["db"] = "ready"              # changed in place, not rebound


@pytest.fixture
def patched(monkeypatch):
    monkeypatch.setattr(__import__(__name__), "LIMIT", 5)


def test_module_state(patched):
    assert SEEN == "set up" and LIMIT == 5


def test_monkeypatch_undone():
    assert LIMIT == 1            # the same worker: the fixture's patch did not stay


class TestSetupClass:
    def setup_class(cls):
        cls.shared = {"db": 42}

    def test_a(self):
        assert self.shared == {"db": 42}


@pytest.fixture(scope="class")
def db_class(request):
    request.cls.db = "connected"
    yield
    del request.cls.db


@pytest.mark.usefixtures("db_class")
class TestRequestCls:
    def test_db(self):
        assert self.db == "connected"


class TestAfter(TestRequestCls):
    pass


def test_class_attribute_gone_after_teardown():
    assert not hasattr(TestRequestCls, "db")


class Helper:
    shared = None


class TestHelperSetUp:
    def setup_class(cls):
        Helper.shared = "configured"   # a class of the module that is not a test class

    def test_helper(self):
        assert Helper.shared == "configured"


def test_in_place_change_reaches_the_worker():
    assert STATE == {"db": "ready"}


def test_counts_in_the_worker():
    global COUNTER
    COUNTER += 1


def test_the_workers_count_stays():
    assert COUNTER == 1          # the parent's unchanged 0 is not sent again over it
"""


def test_setup_class_request_cls_setup_module_and_fixture_patches_reach_the_worker(pytester):
    """What setup_module, setup_class, a class fixture's ``request.cls.x = ...`` and a
    fixture's monkeypatch change in the test module or its classes since collection (in
    place too, and in a class that is not a test class) is the worker's too for that
    test, and undone for the next; each change is sent to a worker once, so what the
    tests change in the worker's module stays for the next, as in-process."""
    pytester.makepyfile(test_ns=NAMESPACES)
    pytester.makeini("[pytest]\nisolated = true\n")
    result = run(pytester, "-rA", "-p", "no:randomly")
    got = outcomes(result)
    want = {"test_module_state": "PASSED", "test_monkeypatch_undone": "PASSED",
            "TestSetupClass::test_a": "PASSED", "TestRequestCls::test_db": "PASSED",
            "TestAfter::test_db": "PASSED", "test_class_attribute_gone_after_teardown": "PASSED",
            "TestHelperSetUp::test_helper": "PASSED", "test_in_place_change_reaches_the_worker": "PASSED",
            "test_counts_in_the_worker": "PASSED", "test_the_workers_count_stays": "PASSED"}
    assert got == want, result.stdout.str()
    plain = pytester.runpytest("-p", "no:cacheprovider", "-rA", "-p", "no:comfy_env", "-p", "no:randomly")
    assert outcomes(plain) == want, plain.stdout.str()


ASYNC_AND_STYLES = """
import warnings
import pytest


async def test_agen():
    yield 1


def test_eq():
    assert {"a": 1} == {"a": 2}


@pytest.mark.filterwarnings("error")
def test_warns():
    warnings.warn("careful", UserWarning)
"""


def test_async_generators_fail_tb_line_and_no_warnings_plugin_as_in_process(pytester):
    pytester.makepyfile(test_more=ASYNC_AND_STYLES)
    for args in (("--tb=line",), ("--tb=line", "--isolated")):
        result = run(pytester, "-rA", *args)
        got = outcomes(result)
        assert got["test_agen"] == "FAILED" and got["test_eq"] == "FAILED", result.stdout.str()
        text = result.stdout.str()
        assert "test_more.py:10: AssertionError" in text and "def test_eq" not in text, text
    # Without pytest's warnings plugin its filterwarnings marks do not apply.
    for args in (("-p", "no:warnings"), ("-p", "no:warnings", "--isolated")):
        # In a subprocess: in this one the inner session's warning would reach our report.
        assert outcomes(run(pytester, "-rA", *args, subprocess=True))["test_warns"] == "PASSED"


RESETS = """
import pytest

REGISTRY = {}
CACHE = {}
COUNT = 0
_LOADED = None              # a lazily made resource: a test's change that stays


@pytest.fixture(autouse=True)
def fresh_state():
    global REGISTRY, COUNT
    REGISTRY = {}           # rebound to a new dict equal to the one sent before
    CACHE.clear()           # emptied in place: no change at all in the pytest process
    COUNT = 0               # the same int as before
    yield


def load():
    global _LOADED
    if _LOADED is None:
        _LOADED = {"loads": 0}
    _LOADED["loads"] += 1
    return _LOADED


def register(name):
    global COUNT
    REGISTRY[name] = True
    CACHE[name] = 1
    COUNT += 1


@pytest.mark.parametrize("name", ["one", "two", "three"])
def test_reset_before_each(name):
    register(name)
    assert REGISTRY == {name: True} and CACHE == {name: 1} and COUNT == 1
    assert load()["loads"] == ["one", "two", "three"].index(name) + 1
"""


@pytest.mark.timeout(90)
def test_a_fixtures_reset_of_module_globals_reaches_the_worker(pytester):
    """A fixture that resets module globals to values equal to those the worker was
    sent before (``REGISTRY = {}``, ``CACHE.clear()``, ``COUNT = 0``) resets them in the
    worker too, after a test changed them there; what no fixture touches (a lazily
    loaded resource) stays in the worker, as in-process."""
    pytester.makepyfile(test_resets=RESETS)
    want = {f"test_reset_before_each[{n}]": "PASSED" for n in ("one", "two", "three")}
    for args in (("--isolated",), ("-p", "no:comfy_env")):
        result = run(pytester, "-rA", "-p", "no:randomly", *args)
        assert outcomes(result) == want, result.stdout.str()


UNPICKLING = """
import os
import pytest


class Client:
    def __init__(self, addr):
        self.addr = addr

    def __reduce__(self):
        return (Client._reconnect, (self.addr,))

    @staticmethod
    def _reconnect(addr):
        if os.environ.get("IN_PARENT") != str(os.getpid()):
            raise ConnectionRefusedError(f"cannot reconnect to {addr}")
        return Client(addr)


class Fragile:
    def __init__(self):
        self.v = 1

    def __setstate__(self, state):
        raise RuntimeError("cannot restore Fragile here")


CLIENT = None


def setup_module(module):
    os.environ["IN_PARENT"] = str(os.getpid())
    module.CLIENT = Client("127.0.0.1:1")


@pytest.fixture
def fragile():
    return Fragile()


class Proxy:
    # Unpickling recurses (as a MockerFixture's does): __getattr__ reads an attribute
    # that is not set yet when pickle looks for __setstate__.
    def __init__(self, target):
        self._target = target

    def __getattr__(self, name):
        return getattr(self._target, name)


@pytest.fixture
def a_proxy():
    return Proxy([1, 2])


def test_uses_client():
    assert CLIENT is not None


def test_other():
    assert 1 + 1 == 2


def test_fragile(fragile):
    pass


def test_proxy(a_proxy):
    pass


def test_last():
    pass
"""


@pytest.mark.timeout(90)
def test_values_that_do_not_unpickle_in_the_worker(pytester):
    """A module global that pickles here but does not unpickle in the worker is left
    out (a warning names it) and fails only the test that uses it; a fixture value
    that does not fails its test with a message naming the fixture, never an internal
    traceback or a RecursionError."""
    pytester.makepyfile(test_unpickling=UNPICKLING)
    result = run(pytester, "-rA", "-p", "no:randomly", "--isolated")
    got = outcomes(result)
    assert got == {"test_uses_client": "FAILED", "test_other": "PASSED", "test_fragile": "FAILED",
                   "test_proxy": "FAILED", "test_last": "PASSED"}, result.stdout.str()
    text = result.stdout.str()
    assert "assert None is not None" in section(result, "test_uses_client")
    assert "test_unpickling.CLIENT is not sent to the isolated worker" in text
    assert "ConnectionRefusedError: cannot reconnect to 127.0.0.1:1" in text
    assert "the value of fixture 'fragile' (Fragile) could not be unpickled in the isolated worker: " \
           "RuntimeError: cannot restore Fragile here" in section(result, "test_fragile")
    assert "the value of fixture 'a_proxy' (Proxy) could not be unpickled in the isolated worker: " \
           "RecursionError" in section(result, "test_proxy")
    assert "Traceback" not in text and "plugin.py" not in text, text


@pytest.mark.timeout(90)
def test_mocker_is_refused_and_a_projects_fixture_named_like_a_builtin_is_a_value(pytester):
    """pytest-mock's ``mocker`` is refused with its reason (as monkeypatch is); a
    project's ``cache`` fixture from a module named ``pytest_*`` is an ordinary value."""
    pkg = pytester.mkpydir("pytest_mock")
    (pkg / "plugin.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.fixture
        def mocker():
            return object()
    """))
    pytester.makepyfile(pytest_fixtures="""
        import pytest

        @pytest.fixture
        def cache():
            return {"warm": True}      # the project's own data cache, not pytest's
    """)
    pytester.makeconftest('pytest_plugins = ["pytest_mock.plugin", "pytest_fixtures"]')
    pytester.makepyfile(test_plugins="""
        def test_mocker(mocker):
            pass

        def test_project_cache(cache):
            assert cache == {"warm": True}
    """)
    result = run(pytester, "-rA", "--isolated")
    assert outcomes(result) == {"test_mocker": "FAILED", "test_project_cache": "PASSED"}, \
        result.stdout.str()
    assert "fixture 'mocker' cannot be used by an isolated test" in section(result, "test_mocker")
    assert "unittest.mock.patch" in section(result, "test_mocker")


CALLABLES = """
import functools

import numpy as np
import pytest


class Scorer:
    def __init__(self):
        self.threshold = 1

    def __call__(self, x):
        return x > self.threshold


scorer = Scorer()
scaled = functools.partial(pow, 2)
DATA = np.zeros((600, 600))


def setup_module(module):
    scorer.threshold = 10                   # in place, in a callable instance
    module.scaled.__dict__["note"] = "set"  # in place, in a partial
    DATA[300, 300] = 7                      # in place, in a big array


@pytest.fixture
def bump():
    DATA[599, 599] += 1                     # in place again, before each test using it


def test_callable_changed_in_place():
    assert scorer.threshold == 10 and not scorer(5)
    assert scaled.__dict__.get("note") == "set"


def test_array_changed_in_place(bump):
    assert DATA[300, 300] == 7 and DATA[599, 599] == 1


def test_array_again(bump):
    assert DATA[599, 599] == 2
"""


@pytest.mark.timeout(90)
def test_callable_instances_and_arrays_changed_in_place_reach_the_worker(pytester):
    pytester.makepyfile(test_callables=CALLABLES)
    want = {"test_callable_changed_in_place": "PASSED", "test_array_changed_in_place": "PASSED",
            "test_array_again": "PASSED"}
    for args in (("--isolated",), ("-p", "no:comfy_env")):
        result = run(pytester, "-rA", "-p", "no:randomly", *args)
        assert outcomes(result) == want, result.stdout.str()


def test_arrays_are_digested_by_checksum_not_pickled(monkeypatch):
    """The change detection of a module-level array hashes its memory: no pickling of
    200 MB per test (and an in-place change of one element still shows)."""
    import numpy as np

    from comfy_env.testing import worker_side

    class NoPickling:
        def __init__(self, *args, **kwargs):
            raise AssertionError("an array was pickled to be digested")

    a = np.zeros((1000, 1000))
    before = worker_side.digest(a)
    monkeypatch.setattr(worker_side, "_Digester", NoPickling)
    a[500, 321] = 1
    after = worker_side.digest(a)
    assert before is not None and after is not None and before != after
    assert worker_side.digest(a) == after
    assert worker_side.digest(a.T) != after                 # another layout
    monkeypatch.undo()
    inside = worker_side.digest({"data": a})
    a[0, 0] = 5
    assert worker_side.digest({"data": a}) != inside       # an array inside a value too


@pytest.mark.timeout(90)
def test_runxfail_makes_pytest_xfail_a_no_op_in_the_worker(pytester):
    pytester.makepyfile(test_rx="""
        import pytest

        def test_imperative_xfail():
            pytest.xfail("known bug")
            assert 1 + 1 == 2

        def test_imperative_xfail_then_fails():
            pytest.xfail("known bug")
            assert 0

        @pytest.mark.xfail(reason="marked")
        def test_marked_xfail():
            assert 0

        def test_xfail_without_runxfail_elsewhere():
            pass
    """)
    want = {"test_imperative_xfail": "PASSED", "test_imperative_xfail_then_fails": "FAILED",
            "test_marked_xfail": "FAILED", "test_xfail_without_runxfail_elsewhere": "PASSED"}
    for args in (("--isolated",), ("-p", "no:comfy_env")):
        result = run(pytester, "-rA", "--runxfail", *args)
        assert outcomes(result) == want, result.stdout.str()
        assert "plugin.py" not in result.stdout.str()
    # Without --runxfail the same worker-side code leaves pytest.xfail alone.
    got = outcomes(run(pytester, "-rA", "--isolated"))
    assert got["test_imperative_xfail"] == "XFAIL", got


@pytest.mark.timeout(90)
def test_markers_added_after_collection_are_honoured(pytester):
    """An isolated marker added by another plugin's trylast modifyitems hook, or by a
    fixture's request.node.add_marker during setup, isolates the test."""
    pytester.makeconftest("""
        import pytest

        @pytest.hookimpl(trylast=True)
        def pytest_collection_modifyitems(config, items):
            for item in items:
                if "hook" in item.name:
                    item.add_marker(pytest.mark.isolated(timeout=1))

        @pytest.fixture
        def isolate_me(request):
            request.node.add_marker(pytest.mark.isolated(timeout=1))
    """)
    pytester.makepyfile(test_late="""
        import os
        import time

        PARENT = os.getpid()
        STATE = {"n": 0}

        def test_by_hook():
            time.sleep(30)

        def test_by_hook_pid():
            assert os.getpid() != PARENT

        def test_by_fixture(isolate_me):
            assert os.getpid() != PARENT
            time.sleep(30)

        def test_by_fixture_state(isolate_me):
            STATE["n"] += 1
            assert STATE["n"] == 1 and os.getpid() != PARENT

        def test_not_isolated():
            assert os.getpid() == PARENT
    """)
    result = run(pytester, "-rA", "-p", "no:randomly")
    assert outcomes(result) == {"test_by_hook": "FAILED", "test_by_hook_pid": "PASSED",
                                "test_by_fixture": "FAILED", "test_by_fixture_state": "PASSED",
                                "test_not_isolated": "PASSED"}, result.stdout.str()
    assert "the isolated test timed out after 1 s" in section(result, "test_by_hook")
    assert "the isolated test timed out after 1 s" in section(result, "test_by_fixture")


def _python310():
    import sys

    if sys.version_info < (3, 11):
        return None
    from pythons import find_interpreter
    return find_interpreter("3.10")


@pytest.mark.timeout(120)
@pytest.mark.skipif(_python310() is None, reason="needs a Python 3.10 interpreter and a 3.11+ host")
def test_a_python_310_env_gets_pytests_dependencies_below_311_or_says_what_to_add(pytester):
    """pytest needs exceptiongroup and tomli on 3.10 only: a host on 3.11+ shares them
    when it has them; when neither it nor the env has them, every test of that env
    fails at once with a message saying what to install (no worker is started)."""
    import importlib.metadata as md

    py = _python310()
    pytester.makepyfile(test_foreign=f"""
        import sys
        import pytest

        pytestmark = pytest.mark.isolated(env={py!r}, timeout=60)

        def test_version():
            assert sys.version_info[:2] == (3, 10)

        def test_second():
            pass
    """)
    result = run(pytester, "-rA")
    text = result.stdout.str()
    missing = []
    for name in ("exceptiongroup", "tomli"):
        try:
            md.distribution(name)
        except md.PackageNotFoundError:
            missing.append(name)
    if not missing:
        assert outcomes(result) == {"test_version": "PASSED", "test_second": "PASSED"}, text
        return
    assert outcomes(result) == {"test_version": "FAILED", "test_second": "FAILED"}, text
    for name in missing:
        assert name in section(result, "test_version") and name in section(result, "test_second")
    assert f"{py} -m pip install" in section(result, "test_second")
    assert "No module named" not in text, text
