"""numpy 1 <-> numpy 2: every dtype, layout, scalar, dtype object and masked array crosses
exactly, both ways, on the inline route (< 64 KiB) and the shared-memory route.

The headline use is a ComfyUI node env pinned to ``numpy<2`` beside a host on numpy 2.
numpy's own pickle names ``numpy._core`` (numpy 2) or ``numpy.core`` (numpy 1), so the
data plane describes arrays, scalars and dtypes in builtins only (``ipc/arrays.py``).

numpy-1 envs are real comfy-env environments built with uv (offline wheels from
/opt/pypi/files first, the package index after; wheels only), cached across runs under
~/.cache/comfy-env-tests/numpy1 like tests/pythons.py's venvs.  Directions:

* this process (numpy 2) -> a numpy-1 worker, and worker-to-worker chains between a
  numpy-1 and a numpy-2 worker, both ways;
* user scripts on Python 3.10-3.13: a numpy-2 script with a numpy-1 node env (its
  comfy-env.toml), and a numpy-1 script (the env's interpreter) with a numpy-2 worker.
  numpy 1 has no wheels for Python 3.13: those two are skipped, saying so.

What is compared is a version-neutral fingerprint (``_numpy_compat_funcs.fp``): dtype
(byte order, fields, offsets, alignment, metadata), shape, strides, flags, and a hash of
the bytes as they lie (NaN payloads, padding); no numpy module of the other major
version may be imported on either side, and no DeprecationWarning raised.
"""
from __future__ import annotations

import json
import os
import pickle
import pickletools
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import _numpy_compat_funcs as F
from comfy_env import IsolatedExecutor
from comfy_env.ipc import codec, lifetime, planes, shm  # noqa: F401
from pythons import ALL_PYTHONS, DEPENDENCIES, TESTS, run_script, user_python

pytestmark = [
    pytest.mark.skipif(int(np.__version__.split(".")[0]) < 2, reason="the host must run numpy 2"),
    pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

OFFLINE_WHEELS = "/opt/pypi/files"
NUMPY1 = "numpy==1.26.4"
SIZES = pytest.mark.parametrize("big", [False, True], ids=["inline", "shm"])
HOST = "%d.%d" % sys.version_info[:2]


def _cache_root():
    return os.environ.get("COMFY_ENV_TEST_NUMPY1",
                          os.path.join(os.path.expanduser("~"), ".cache", "comfy-env-tests", "numpy1"))


def _cache_dir():
    return os.path.join(_cache_root(), "cache")


_ENVS = {}


def numpy1_env(ver):
    """A comfy-env env of Python ``ver`` with numpy 1 (and comfy_env's own dependencies,
    so that its interpreter can also run a parent script); built once per machine, from
    the offline wheels if they have it, else from the package index (wheels only)."""
    if ver in _ENVS:
        if _ENVS[ver] is None:
            pytest.skip(f"no {NUMPY1} wheel for Python {ver} (see the first test that tried)")
        return _ENVS[ver]
    from filelock import FileLock

    from comfy_env.envs import Env

    root = _cache_root()
    os.makedirs(root, exist_ok=True)
    reqs = [NUMPY1] + [d for d in DEPENDENCIES if not d.startswith("numpy")]
    attempts = []
    if os.path.isdir(OFFLINE_WHEELS):
        attempts.append(("offline", {"find_links": [OFFLINE_WHEELS], "no_index": True}))
    too_new = tuple(map(int, ver.split("."))) >= (3, 13)
    if not too_new:     # on 3.13+ uv would compile numpy 1 from source, for many minutes
        attempts.append(("index", {}))
    errors = []
    with FileLock(os.path.join(root, "build.lock"), timeout=900):
        for label, where in attempts:
            spec_dir = os.path.join(root, f"py{ver}-{label}")
            os.makedirs(spec_dir, exist_ok=True)
            lines = [f'name = "numpy1-py{ver}-{label}"', f'python = "{ver}"',
                     f"requirements = {json.dumps(reqs)}"]
            lines += [f"{k} = {json.dumps(v)}" for k, v in where.items()]
            with open(os.path.join(spec_dir, "comfy-env.toml"), "w") as f:
                f.write("\n".join(lines) + "\n")
            try:
                env = Env.from_toml(spec_dir, cache_dir=_cache_dir()).create(progress=False)
                break
            except Exception as e:              # no wheel there: try the next source
                errors.append(f"{label}: {type(e).__name__}: {str(e)[-300:]}")
        else:
            env = None
    if env is None:
        _ENVS[ver] = None
        why = ("numpy 1.x publishes no wheels for CPython 3.13 and later" if too_new
               else "none could be installed")
        pytest.skip(f"no {NUMPY1} wheel for Python {ver}: {why}: " + " | ".join(errors))
    out = subprocess.run([env.python, "-c", "import numpy; print(numpy.__version__)"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().startswith("1."), out
    _ENVS[ver] = env
    return env


# Fresh workers per test: a worker that once loaded the other numpy's aliases (object
# arrays do) keeps them, and the checks look for them.
@pytest.fixture
def np1_worker():
    with IsolatedExecutor(env=numpy1_env(HOST), name="numpy1") as ex:
        assert ex.submit(F.numpy_version).result(120).startswith("1.")
        yield ex


@pytest.fixture
def np2_worker():
    with IsolatedExecutor(name="numpy2") as ex:
        ex.submit(F.numpy_version).result(60)
        yield ex


def _fail_report(fails):
    return f"{len(fails)} failures:\n" + "\n".join(fails[:40])


# -- numpy 2 parent (this process) -> numpy 1 worker, and worker <-> worker -----------------

@pytest.mark.timeout(300)
@SIZES
def test_numpy2_parent_and_numpy1_worker_exchange_everything_exactly(np1_worker, np2_worker, big):
    fails = F.check_round_trips(np1_worker, big, other=np2_worker)
    assert not fails, _fail_report(fails)


# -- user scripts on every Python: numpy 2 host + numpy 1 node env, and the reverse ---------

_USER_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import numpy as np
    import _numpy_compat_funcs as F
    from comfy_env import IsolatedExecutor

    LUT = np.linspace(0, 1, 5, dtype=">f4")
    UNIT = np.dtype("M8[ms]")

    def node(image, gain):
        # a function of this script, pickled by value with the globals it uses
        return image * gain + LUT[1], image.dtype, image.sum(), LUT, UNIT

    fails = []
    for big in (False, True):       # fresh workers: object arrays load the other's aliases
        with IsolatedExecutor(env=sys.argv[2], name="other-numpy") as ex, \\
                IsolatedExecutor(name="this-numpy") as mine:
            theirs = ex.submit(F.numpy_version).result(120)
            assert theirs[0] != np.__version__[0], (theirs, np.__version__)
            fails += F.check_round_trips(ex, big, other=mine)
    with IsolatedExecutor(env=sys.argv[2], name="other-numpy") as ex:
        image = np.ones((4, 5, 3), np.float32)[:, ::-1]
        out = ex.submit(node, image, np.float32(0.5)).result(60)
        want = (image * np.float32(0.5) + LUT[1], image.dtype, image.sum(), LUT, UNIT)
        if F.fp(list(out)) != F.expected(list(want), False):
            fails.append(f"node(): got {out!r}")
    print("RESULT " + json.dumps(fails))
""")


def _run_user_script(pyver, python, other_env, tmp_path):
    proc = run_script(pyver, _USER_SCRIPT, cwd=tmp_path, timeout=300, python=python,
                      args=(TESTS, other_env), env={"COMFY_ENV_CACHE_DIR": _cache_dir()})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    fails = json.loads(lines[-1][len("RESULT "):])
    assert not fails, _fail_report(fails)
    assert proc.stderr.strip() == "", proc.stderr[-3000:]


@pytest.mark.timeout(400)
@ALL_PYTHONS
def test_user_script_on_numpy2_with_a_numpy1_node_env(pyver, tmp_path):
    """The headline use: the host runs numpy 2, a node env pins numpy<2 (a comfy-env.toml)."""
    env = numpy1_env(pyver)
    _run_user_script(pyver, user_python(pyver), env.spec.source, tmp_path)


@pytest.mark.timeout(400)
@ALL_PYTHONS
def test_user_script_on_numpy1_with_a_numpy2_worker(pyver, tmp_path):
    """The reverse: a parent on numpy 1 (the numpy-1 env's interpreter) and a worker on
    numpy 2 (the interpreter of tests/pythons.py's venv for the same Python)."""
    env = numpy1_env(pyver)
    _run_user_script(pyver, env.python, user_python(pyver), tmp_path)


# -- what goes on the wire (this process only) ----------------------------------------------

def _encode(obj):
    link = lifetime.Link(lambda msgs: None, name="loopback")
    fb, chunks = codec.encode_message(("result", 1, True), link, [obj])
    frame = codec.decode_envelope(b"".join(bytes(c) for c in chunks), [])
    try:
        return bytes(frame.parts[0].data), codec.decode_part(frame, 0, link)
    finally:
        fb.abort()


def _globals_named(data):
    """Module names of the globals a pickle imports on load."""
    names, strings = set(), []
    for op, arg, _pos in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL":
            names.add(strings[-2])
        elif op.name == "GLOBAL":
            names.add(arg.split(" ")[0])
    return names


@SIZES
def test_nothing_sent_names_a_numpy_internal_module(big):
    """Neither numpy._core (numpy 2 only) nor numpy.core (deprecated there) may appear in a
    message, whatever numpy object it holds (object arrays aside: numpy's pickle)."""
    for name, obj in F.cases(big).items():
        data, back = _encode(obj)
        internal = sorted(m for m in _globals_named(data)
                          if m.startswith(("numpy._core", "numpy.core")) or m == "numpy.rec")
        assert not internal, f"{name}: the message imports {internal}"
        assert F.fp(back) == F.expected(obj, big), name


def test_an_object_pickled_by_another_numpy_gets_an_error_that_says_so():
    """Object arrays still take numpy's pickle; where that names a module this numpy lacks,
    the error says numpy *is* installed and the versions differ, not "install numpy"."""
    link = lifetime.Link(lambda msgs: None, name="loopback")
    data = b"\x80\x05\x95\x00\x00\x00\x00\x00\x00\x00\x00cnumpy._core.no_such_module\nthing\n\x94."
    env = pickle.dumps((("result", 1, True), [(len(data), None)]), 5)
    frame = codec.decode_envelope(len(env).to_bytes(4, "little") + env + data, [])
    with pytest.raises(ModuleNotFoundError) as e:
        codec.decode_part(frame, 0, link)
    msg = str(e.value)
    assert np.__version__ in msg and "numpy._core.no_such_module" in msg
    assert "install numpy" not in msg and "version" in msg


def test_small_array_encoding_is_one_copy_into_the_message():
    """The inline route pickles the array's memory straight into the message: no bytes
    object of the data is made on the way (a.tobytes() would be a second copy)."""
    a = np.arange(1000.0)
    data, back = _encode(a)
    ops = [op.name for op, _arg, _pos in pickletools.genops(data)]
    assert "BYTEARRAY8" in ops and back.flags.writeable and back.base is not None
    ro = a.copy()
    ro.flags.writeable = False
    data, back = _encode(ro)
    assert not back.flags.writeable and np.array_equal(back, ro)
    back.flags.writeable = True           # a private copy, as before: the flag may be set back
    back[0] = 7
    assert ro[0] == 0


def test_fingerprints_see_what_they_must():
    """The comparisons above would catch a changed byte, byte order, stride or flag."""
    a = F.sample(np, ">f8", 16, 1)
    b = a.copy()
    b.view(np.uint8)[5] ^= 1
    assert F.fp(a) != F.fp(b)
    assert F.fp(a) != F.fp(a.astype("<f8"))
    assert F.fp(a) != F.fp(a.reshape(4, 4).T.copy().T)           # same values, other strides
    ro = a.copy()
    ro.flags.writeable = False
    assert F.fp(ro) != F.fp(a.copy())
    s = np.dtype([("a", "i4"), ("b", "f8")])
    assert F.fp(s) != F.fp(np.dtype([("a", "i4"), ("b", "f8")], align=True))
    assert F.fp(np.float32(np.nan)) != F.fp(np.frombuffer(b"\x01\x00\xc0\x7f", "<f4")[0])


# -- numpy objects inside a function pickled by value ----------------------------------------

_LUT = F.sample(np, ">f8", 16, 3)
_UNIT = np.dtype("M8[ns]")
_GAIN = np.float32(2.0)


def _uses_captured_numpy(x):
    """A function of a user's script: its globals (arrays, a dtype, a scalar) travel with it."""
    return x * _GAIN + _LUT[1], _LUT, _UNIT, _GAIN


@pytest.mark.timeout(120)
def test_numpy_objects_a_function_captures_cross_too(np1_worker):
    y, lut, unit, gain = np1_worker.submit(_uses_captured_numpy, np.ones(3)).result(60)
    assert F.fp(lut) == F.fp(_LUT) and unit == _UNIT and F.fp(gain) == F.fp(_GAIN)
    assert F.fp(y) == F.fp(np.ones(3) * _GAIN + _LUT[1])
    assert np1_worker.submit(F.shims_loaded).result(60) == []


@pytest.mark.timeout(60)
def test_big_masked_arrays_take_shared_memory_both_ways(np2_worker):
    """Data and mask of a masked array travel as arrays: above the threshold they go
    through a segment (numpy's pickle put all the data in the message)."""
    import _dataplane_funcs as DF

    m = np.ma.masked_array(F.sample(np, "f8", 80_000, 1), mask=F.sample(np, "?", 80_000, 2),
                           fill_value=-1.5, hard_mask=True)
    assert np2_worker.submit(DF.in_segment, m).result(30) is True
    assert np2_worker.submit(DF.in_segment, m.mask).result(30) is True
    back = np2_worker.submit(F.echo, m).result(30)
    assert type(back) is np.ma.MaskedArray and F.fp(back) == F.fp(m)
    assert shm.find_segment(back.data.__array_interface__["data"][0], back.nbytes) is not None


def _random_objects():
    return {"Generator": np.random.default_rng(7), "RandomState": np.random.RandomState(7),
            "PCG64": np.random.PCG64(7), "MT19937": np.random.MT19937(7), "Philox": np.random.Philox(7),
            "SFC64": np.random.SFC64(7), "Generator(MT19937)": np.random.Generator(np.random.MT19937(3))}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("direction", ["numpy1-worker", "numpy2-worker"])
def test_numpy_types_random_generators_and_numpy_errors_cross_numpy_versions(np1_worker, np2_worker, direction):
    """What still takes numpy's own pickle: ``np.bool_`` (numpy 2 names it numpy.bool),
    numpy's exception classes (numpy._core / numpy.core), and random generators (numpy 2
    pickles them with the class where numpy 1 wants a name, and its own state layout).
    Each arrives as it left: the same draws from a generator, a ``TypeError`` subclass
    from numpy's ufunc error.  The numpy-2 worker is the same-version reference."""
    ex = np1_worker if direction == "numpy1-worker" else np2_worker
    arr, tp = ex.submit(F.zeros_of, np.bool_).result(60)
    assert arr.dtype == np.bool_ and arr.tolist() == [False, False] and tp is np.bool_
    assert ex.submit(F.bool_type).result(60) is np.bool_
    for name, rng in _random_objects().items():
        ref = _random_objects()[name]
        want, _ = F.draws(ref)
        got, back = ex.submit(F.draws, rng).result(60)
        assert got == want and type(back) is type(rng), name    # the generator's state crossed
        assert F.draws(back)[0] == F.draws(ref)[0], name        # and came back as the worker left it
    with pytest.raises(TypeError) as e:
        ex.submit(F.ufunc_type_error).result(60)
    assert "UFunc" in type(e.value).__name__, type(e.value)


@pytest.mark.timeout(120)
def test_a_numpy2_only_dtype_sent_to_numpy1_says_the_versions_differ(np1_worker):
    with pytest.raises(AttributeError) as e:
        np1_worker.submit(len, F.string_dtype_array()).result(60)
    msg = str(e.value)
    assert "same major version of numpy" in msg and "1.26" in msg, msg
