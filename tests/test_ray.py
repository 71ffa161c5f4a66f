"""RayExecutor on a local Ray (``ray.init(num_cpus=2)``, one per test session).

Skipped only when Ray is not installed (CI installs the ``ray`` extra).
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, CancelledError, as_completed, wait

import pytest

# comfy_env.ray first: when it is the first to import Ray it turns on Ray's zero-copy
# path for torch tensors, which the local Ray below then passes on to its workers.
pytest.importorskip("comfy_env.ray")
import ray  # noqa: E402

from comfy_env import CallTimeout, Env, WorkerCrashed  # noqa: E402
from comfy_env.errors import InitializerFailed, PicklingFailed, RemoteTraceback  # noqa: E402
from comfy_env.ray import RayExecutor, writable  # noqa: E402
from test_envs_helpers import demo_dep_wheel  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(120)]

SRC = os.path.dirname(os.path.dirname(os.path.abspath(__import__("comfy_env").__file__)))


@pytest.fixture(scope="session", autouse=True)
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def ex():
    with RayExecutor() as e:
        yield e


def _cpus_free(expected=2.0, within=30):
    """Wait until the local Ray has all its CPUs back (no task holds one)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) >= expected:
            return True
        time.sleep(0.1)
    return False


class Boom(Exception):
    def __init__(self, code, detail):
        super().__init__(code, detail)
        self.code = code


def _raise_boom(code):
    raise Boom(code, "detail")


def _sleep_then(x, seconds):
    time.sleep(seconds)
    return x


def _touch_later(path, seconds):
    time.sleep(seconds)
    with open(path, "w") as f:
        f.write("ran")
    return path


def _set_env(key, value):
    os.environ[key] = value


# -- import hygiene ----------------------------------------------------------------------

def test_import_comfy_env_does_not_import_ray():
    code = "import sys, comfy_env; comfy_env.IsolatedExecutor; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=SRC), timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_missing_ray_names_the_extra(tmp_path):
    # A ray that cannot be imported, first on the path.
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "__init__.py").write_text("raise ImportError('no ray here')\n")
    code = "import comfy_env.ray"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), SRC])),
                         timeout=60)
    assert out.returncode != 0
    assert "pip install 'comfy-env[ray]'" in out.stderr


# -- results, errors ------------------------------------------------------------------------

def test_results_callable_and_reference(ex):
    assert ex.submit(pow, 2, 10).result(timeout=60) == 1024
    assert ex.submit("os.path:join", "a", "b").result(timeout=60) == os.path.join("a", "b")
    assert ex.submit(sorted, [3, 1, 2], reverse=True).result(timeout=60) == [3, 2, 1]
    with pytest.raises(ValueError, match="package.module:qualname"):
        ex.submit("no_colon_here")
    with pytest.raises(TypeError):
        ex.submit(42)


async def _async_double(x):
    import asyncio
    await asyncio.sleep(0.01)
    return 2 * x


def test_an_async_function_runs_to_completion_in_the_task(ex):
    assert ex.submit(_async_double, 21).result(timeout=60) == 42
    assert list(ex.map(_async_double, range(3), chunksize=2)) == [0, 2, 4]


def test_exception_keeps_type_args_and_remote_traceback(ex):
    f = ex.submit(_raise_boom, 7)
    with pytest.raises(Boom) as info:
        f.result(timeout=60)
    err = info.value
    assert type(err) is Boom and err.args == (7, "detail") and err.code == 7
    assert isinstance(err.__cause__, RemoteTraceback)
    assert "_raise_boom" in str(err.__cause__)
    assert isinstance(f.exception(), Boom)


def _raise_it(exc):
    raise exc


def _raise_it_at(exc, at, x):
    if x == at:
        raise exc
    return x


@pytest.mark.parametrize("exc", [KeyboardInterrupt("kbi"), StopIteration(5)], ids=["KeyboardInterrupt", "StopIteration"])
def test_keyboard_interrupt_and_stop_iteration_from_a_call_keep_their_type(ex, exc):
    """Ray takes a task's KeyboardInterrupt for its own cancellation and a StopIteration
    breaks a generator of its own in the driver; a call's keep their type and args, as
    with IsolatedExecutor, in submit, in map with chunks and through a chain."""
    f = ex.submit(_raise_it, exc)
    err = f.exception(timeout=60)
    assert type(err) is type(exc) and err.args == exc.args and not f.cancelled()
    assert isinstance(err.__cause__, RemoteTraceback) and "_raise_it" in str(err.__cause__)
    # map's iterator is a generator, as the standard library's: a StopIteration leaving
    # it becomes RuntimeError (PEP 479), its cause the call's.
    with pytest.raises(RuntimeError if isinstance(exc, StopIteration) else type(exc)) as info:
        list(ex.map(_raise_it_at, [exc] * 4, [2] * 4, range(4), chunksize=2, timeout=60))
    assert type(info.value if type(info.value) is type(exc) else info.value.__cause__) is type(exc)
    chained = ex.submit(_identity, ex.submit(_raise_it, exc))
    assert type(chained.exception(timeout=60)) is type(exc)


class Unpicklable(Exception):
    def __init__(self, msg):
        super().__init__(msg)
        self.lock = threading.Lock()


def _raise_unpicklable():
    raise Unpicklable("holds a lock")


def test_unpicklable_exception_becomes_remote_error_naming_it(ex):
    from comfy_env import RemoteError
    with pytest.raises(RemoteError) as info:
        ex.submit(_raise_unpicklable).result(timeout=60)
    assert "Unpicklable" in info.value.type_name
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "_raise_unpicklable" in str(info.value.__cause__)


class NeedsTwo(Exception):
    """Pickles, but cannot be rebuilt from its args (its __init__ takes two)."""

    def __init__(self, what, where):
        super().__init__(what)
        self.where = where


def _raise_needs_two():
    raise NeedsTwo("disk full", "/dev/sda")


def _raise_needs_two_at(i):
    if i == 1:
        _raise_needs_two()
    return i


def test_an_exception_whose_init_does_not_take_its_args_keeps_its_type(ex):
    # NeedsTwo(what, where) calls super().__init__(what): pickle's NeedsTwo(*args) fails
    # in the driver (a RemoteError naming it before), as with IsolatedExecutor.
    f = ex.submit(_raise_needs_two)
    err = f.exception(timeout=60)
    assert type(err) is NeedsTwo and err.args == ("disk full",) and err.where == "/dev/sda"
    assert isinstance(err.__cause__, RemoteTraceback) and "_raise_needs_two" in str(err.__cause__)
    with pytest.raises(NeedsTwo):
        f.result()
    with pytest.raises(NeedsTwo):
        list(ex.map(_raise_needs_two_at, range(4), chunksize=2, timeout=60))


class _Unloadable:
    def __reduce__(self):
        return (int, ("not a number",))


def _return_unloadable():
    return _Unloadable()


def test_a_result_that_cannot_be_unpickled_raises_the_unpicklings_error(ex):
    """As IsolatedExecutor: the error of unpickling the value, not Ray's wrapper of it."""
    with pytest.raises(ValueError, match="invalid literal for int"):
        ex.submit(_return_unloadable).result(timeout=60)


def test_a_chained_value_the_next_worker_cannot_unpickle_fails_that_call_with_the_unpicklings_error(ex):
    """As IsolatedExecutor: the call taking the value fails with the unpickling's own
    error (top-level or nested), not with Ray's RaySystemError text in a RemoteError."""
    value = ex.submit(_return_unloadable)
    for arg in (value, [value]):
        err = ex.submit(_identity, arg).exception(timeout=60)
        assert type(err) is ValueError and "not a number" in str(err), repr(err)


def _return_from_a_module_only_the_worker_has():
    import types
    mod = types.ModuleType("comfy_env_test_only_in_the_ray_worker")
    mod.__file__ = "<only in the Ray worker>"     # not a dynamic module: pickled by reference
    sys.modules[mod.__name__] = mod
    exec("class Thing:\n    pass\n", mod.__dict__)
    mod.Thing.__module__ = mod.__name__
    return mod.Thing()


class _ExitsWhenUnpickled:
    def __reduce__(self):
        return (sys.exit, (3,))


def _return_exiting():
    return _ExitsWhenUnpickled()


@pytest.mark.parametrize("fn, error", [(_return_unloadable, ValueError),
                                       (_return_from_a_module_only_the_worker_has, ModuleNotFoundError),
                                       (_return_exiting, PicklingFailed)])
@pytest.mark.parametrize("first", ["exception", "result"])
def test_exception_of_a_result_that_cannot_be_unpickled_is_the_error_result_raises(ex, fn, error, first):
    """As IsolatedFuture: the first of exception() or result() to look fetches the value;
    one that does not unpickle here is the future's exception from then on, the same
    object for both accessors and every call (an unpickling that calls sys.exit included,
    as PicklingFailed)."""
    f = ex.submit(fn)
    wait([f], timeout=60)
    assert f.done() and f.fetches == 0        # done() and wait() do not fetch
    if first == "exception":
        err = f.exception(timeout=60)
        assert isinstance(err, error)
        with pytest.raises(error) as raised:
            f.result(timeout=60)
        assert raised.value is err
    else:
        with pytest.raises(error) as raised:
            f.result(timeout=60)
        err = raised.value
    assert f.exception() is err and f.exception(0) is err
    with pytest.raises(error) as again:
        f.result()
    assert again.value is err
    assert f.fetches == 1


def test_exception_of_a_result_that_unpickles_is_none_and_result_gives_it(ex):
    f = ex.submit(pow, 2, 10)
    assert f.exception(timeout=60) is None
    assert f.result(timeout=0) == 1024 and f.exception(0) is None
    assert f.fetches == 1


def test_exception_of_a_result_that_cannot_be_unpickled_agrees_across_threads(ex):
    f = ex.submit(_return_unloadable)
    wait([f], timeout=60)
    seen = [None] * 8
    go = threading.Barrier(len(seen))

    def look(i):
        go.wait()
        if i % 2:
            seen[i] = f.exception(timeout=60)
        else:
            try:
                f.result(timeout=60)
            except ValueError as e:
                seen[i] = e

    threads = [threading.Thread(target=look, args=(i,)) for i in range(len(seen))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert isinstance(seen[0], ValueError) and all(s is seen[0] for s in seen)
    assert f.fetches == 1


def test_exception_still_times_out_while_the_call_runs(ex):
    f = ex.submit(_sleep_then, 5, 2)
    with pytest.raises(TimeoutError):
        f.exception(timeout=0.2)
    assert f.exception(timeout=60) is None and f.result() == 5


def test_a_chain_forwards_a_value_the_driver_cannot_unpickle_even_after_exception(ex):
    """The driver's failure to unpickle is not the call's: a chained call gets the
    ObjectRef, and its worker unpickles the value."""
    a = ex.submit(_OnlyInWorkers, os.getpid())
    assert isinstance(a.exception(timeout=60), ModuleNotFoundError)
    b = ex.submit(_type_name, a)
    assert b.result(timeout=60) == "_OnlyInWorkers"
    assert a.fetches == 1


class _OnlyInWorkers:
    """Unpickles in any process but the driver (whose pid it carries): what a class
    only the workers' env can import does."""

    def __init__(self, driver_pid):
        self.driver_pid = driver_pid

    def __reduce__(self):
        return (_rebuild_in_a_worker, (self.driver_pid,))


def _rebuild_in_a_worker(driver_pid):
    if os.getpid() == driver_pid:
        raise ModuleNotFoundError("No module named 'only_in_the_workers_env'", name="only_in_the_workers_env")
    return _OnlyInWorkers(driver_pid)


def _type_name(x):
    return type(x).__name__


def test_bad_reference_raises_in_the_future(ex):
    with pytest.raises(AttributeError, match="no attribute"):
        ex.submit("os.path:no_such_function").result(timeout=60)


def test_crash_is_worker_crashed_and_executor_recovers(ex):
    f = ex.submit(os._exit, 3)
    with pytest.raises(WorkerCrashed):
        f.result(timeout=60)
    assert ex.submit(pow, 3, 3).result(timeout=60) == 27


def test_call_timeout_kills_the_task_and_executor_goes_on(tmp_path):
    marker = tmp_path / "finished"
    with RayExecutor(call_timeout=4.0) as e:
        # Two workers started first: the clock of a call starts when it is handed to
        # Ray (docs/ray.md), so the next call should not wait for a worker to start.
        assert [x.result(timeout=60) for x in [e.submit(_sleep_then, i, 0.5) for i in (1, 2)]] == [1, 2]
        f = e.submit(_touch_later, str(marker), 15)
        with pytest.raises(CallTimeout):
            f.result(timeout=60)
        assert _cpus_free()              # the killed task gave its CPU back
        assert e.submit(pow, 2, 5).result(timeout=60) == 32
    assert _cpus_free()
    time.sleep(0.5)
    assert not marker.exists()       # the task was killed, not left to finish


def test_map_results_chunksize_and_timeout(ex):
    assert list(ex.map(pow, range(6), [2] * 6)) == [x ** 2 for x in range(6)]
    assert list(ex.map(pow, range(7), [2] * 7, chunksize=3)) == [x ** 2 for x in range(7)]
    it = ex.map(_sleep_then, [1, 2], [2, 2], timeout=0.5)
    with pytest.raises(TimeoutError):
        list(it)
    assert _cpus_free()


def test_cancel_pending_call_never_runs(tmp_path):
    marker = tmp_path / "ran"
    with RayExecutor(max_workers=1) as e:
        first = e.submit(_sleep_then, 1, 1.0)
        second = e.submit(_touch_later, str(marker), 0)
        assert second.cancel()
        assert second.cancelled()
        assert not first.cancel()       # handed to Ray: running, as in the standard library
        assert first.result(timeout=60) == 1
        with pytest.raises(CancelledError):
            second.result()
    assert not marker.exists()


def test_wait_and_as_completed(ex):
    fs = [ex.submit(_sleep_then, i, 0.05 * i) for i in range(4)]
    assert sorted(f.result() for f in as_completed(fs, timeout=60)) == [0, 1, 2, 3]
    bad = ex.submit(_raise_boom, 1)
    slow = ex.submit(_sleep_then, 1, 3)
    done, not_done = wait([bad, slow], timeout=60, return_when=FIRST_EXCEPTION)
    assert bad in done and slow in not_done
    slow.result(timeout=60)


def test_shutdown_cancel_futures_leaves_no_task_running(tmp_path):
    e = RayExecutor(max_workers=1)
    running = e.submit(_sleep_then, "a", 1.0)
    queued = [e.submit(_touch_later, str(tmp_path / f"q{i}"), 0) for i in range(3)]
    e.shutdown(wait=True, cancel_futures=True)
    assert running.done() and running.result() == "a"
    assert all(q.cancelled() for q in queued)
    assert _cpus_free(within=5)        # nothing of ours holds a CPU any more
    assert not list(tmp_path.iterdir())
    with pytest.raises(RuntimeError, match="after shutdown"):
        e.submit(pow, 1, 1)


def test_initializer_runs_once_per_worker_and_failure_breaks():
    with RayExecutor(initializer=_set_env, initargs=("COMFY_RAY_INIT", "yes")) as e:
        assert e.submit("os:getenv", "COMFY_RAY_INIT").result(timeout=60) == "yes"
    with RayExecutor(initializer=_raise_boom, initargs=(5,)) as e:
        with pytest.raises(InitializerFailed):
            e.submit(pow, 1, 1).result(timeout=60)
        from concurrent.futures import BrokenExecutor
        with pytest.raises(BrokenExecutor):
            e.submit(pow, 1, 1)


_INIT_STATE = {}


def _init_state(value):
    _INIT_STATE["v"] = value


def _read_state(_=None):
    return _INIT_STATE.get("v"), os.getpid()


def test_executors_with_initializers_never_share_a_worker_process():
    """Ray gives a worker process to any task of the same runtime_env: two executors
    whose initializers set up different state (a model each) must each see their own,
    as two IsolatedExecutors do; an executor without one keeps Ray's shared workers."""
    with RayExecutor(initializer=_init_state, initargs=("A",)) as a, \
            RayExecutor(initializer=_init_state, initargs=("B",)) as b:
        for _ in range(3):
            va, pa = a.submit(_read_state).result(timeout=60)
            vb, pb = b.submit(_read_state).result(timeout=60)
            assert (va, vb) == ("A", "B") and pa != pb
        assert a.runtime_env["env_vars"]["COMFY_ENV_RAY_EXECUTOR"] != b.runtime_env["env_vars"][
            "COMFY_ENV_RAY_EXECUTOR"]
    with RayExecutor() as plain:
        assert "COMFY_ENV_RAY_EXECUTOR" not in plain.runtime_env.get("env_vars", {})


# -- data ------------------------------------------------------------------------------------

def test_numpy_round_trip_exact_dtypes_and_views(ex):
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(0)
    base = rng.standard_normal((64, 48)).astype(np.float64)
    arrays = [
        base, base[1:], base[:, ::3], base.T, base[5:20, 7:30],
        np.arange(300_000, dtype=np.int64)[::7],
        (rng.standard_normal(200_000) > 0),
        rng.standard_normal((100, 100)).astype(np.float16),
        rng.integers(0, 255, (512, 512, 3), dtype=np.uint8),
        np.array([1 + 2j, 3 - 4j], dtype=np.complex128),
        np.zeros((0, 3), dtype=np.float32),
        np.asfortranarray(rng.standard_normal((300, 200)).astype(np.float32)),
    ]
    out = ex.submit(_identity, arrays).result(timeout=60)
    for a, b in zip(arrays, out):
        assert b.dtype == a.dtype and b.shape == a.shape
        assert np.array_equal(a, b)
    big = out[8]
    assert not big.flags.writeable          # Ray's object store view (documented)
    w = writable(out)
    assert all(x.flags.writeable for x in w)
    w[8][0, 0, 0] = 7
    assert big[0, 0, 0] == arrays[8][0, 0, 0]


def _identity(x):
    return x


def test_torch_cpu_tensor_round_trip(ex):
    torch = pytest.importorskip("torch")
    assert os.environ.get("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS") == "1"
    t = torch.arange(1_000_000, dtype=torch.float32).reshape(1000, 1000)
    views = [t, t[1:], t[:, ::2], t.to(torch.bfloat16), torch.tensor([True, False])]
    out = ex.submit(_identity, views).result(timeout=60)
    for a, b in zip(views, out):
        assert isinstance(b, torch.Tensor) and b.dtype == a.dtype and b.shape == a.shape
        assert torch.equal(a, b)


def _make_big(mib):
    import numpy as np
    a = np.empty(mib << 20, dtype=np.uint8)
    a[::4096] = 1
    return a


def _checksum(a):
    return int(a[::4096].sum()), a.nbytes


def _driver_rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_chain_goes_worker_to_worker_without_the_driver(ex):
    with RayExecutor() as other:
        rss0 = _driver_rss()
        a = ex.submit(_make_big, 256)
        b = other.submit(_checksum, a)
        assert b.result(timeout=60) == (65536, 256 << 20)
        grew = _driver_rss() - rss0
        assert a.fetches == 0                    # the driver never asked Ray for a's value
        assert grew < 64 << 20, f"driver RSS grew by {grew >> 20} MiB"
        nested = other.submit(_checksum_of_first, [a, 1])   # a ref below the top level
        assert nested.result(timeout=60) == (65536, 256 << 20)
        assert a.fetches == 0


def _checksum_of_first(items):
    return _checksum(items[0])


def test_chain_error_propagates(ex):
    a = ex.submit(_raise_boom, 3)
    b = ex.submit(_identity, a)
    with pytest.raises(Boom):
        b.result(timeout=60)


@pytest.mark.parametrize("how", ["crash", "timeout", "crash nested"])
def test_a_chained_call_fails_as_its_producer_did(ex, how):
    """A producer that crashed or ran past its call_timeout: Ray reports the consumer's
    failure by its own error type (WorkerCrashedError, TaskCancelledError), which was a
    RemoteError; the consumer fails as the producer did (WorkerCrashed, CallTimeout),
    whether the future is an argument or nested in one, and the consumer's executor
    stays usable."""
    with RayExecutor(call_timeout=1.0 if how == "timeout" else None) as producer:
        a = producer.submit(_sleep_then, 1, 30) if how == "timeout" else producer.submit(os._exit, 3)
        b = ex.submit(_identity, [a] if how.endswith("nested") else a)
        want = CallTimeout if how == "timeout" else WorkerCrashed
        assert type(a.exception(timeout=60)) is want
        assert type(b.exception(timeout=60)) is want, repr(b.exception())
    assert ex.submit(_identity, 5).result(timeout=60) == 5


def test_chain_from_a_foreign_future(ex):
    from concurrent.futures import Future
    f = Future()
    g = ex.submit(pow, f, 2)
    time.sleep(0.2)
    assert not g.done()
    f.set_result(9)
    assert g.result(timeout=60) == 81


# -- environments -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_envs(tmp_path_factory):
    wheels = tmp_path_factory.mktemp("wheels")
    demo_dep_wheel(wheels, "1.0")
    demo_dep_wheel(wheels, "2.0")
    cache = str(tmp_path_factory.mktemp("cache"))
    envs = []
    for version in ("1.0", "2.0"):
        envs.append(Env.from_dict({
            "name": f"ray-demo-{version[0]}",
            "requirements": [f"demo_dep=={version}"],
            "find_links": [str(wheels)],
            "no_index": True,
            "environment": {"COMFY_RAY_ENV": f"v{version}"},
        }, cache_dir=cache).create(progress=False))
    return envs


def _versions():
    import demo_dep
    return demo_dep.VERSION, os.environ.get("COMFY_RAY_ENV"), sys.executable


def test_two_envs_each_run_their_own_packages(two_envs):
    e1, e2 = (RayExecutor(env=e) for e in two_envs)
    try:
        assert e1.runtime_env["py_executable"] == two_envs[0].python
        v1 = e1.submit("demo_dep:describe", 1).result(timeout=120)
        v2 = e2.submit("demo_dep:describe", 2).result(timeout=120)
        assert v1["version"] == "1.0" and v2["version"] == "2.0"
        # A function of this test module travels by value; env vars come from the spec.
        ver, var, exe = e1.submit(_versions).result(timeout=60)
        assert (ver, var) == ("1.0", "v1.0") and exe == two_envs[0].python
        # Host packages stay invisible (Ray's own closure is shared, numpy is not in it).
        assert e2.submit(_can_import, "numpy").result(timeout=60) is False
        # A chain across the two envs.
        t = e2.submit("demo_dep:transform", e1.submit("demo_dep:transform", 3.0))
        assert t.result(timeout=60) == 6.0
    finally:
        e1.shutdown()
        e2.shutdown()


def _can_import(name):
    import importlib
    try:
        importlib.import_module(name)
        return True
    except ImportError:
        return False


def test_cluster_mapping_of_an_env(tmp_path):
    from comfy_env.envs import EnvSpecError
    from comfy_env.ray import cluster_runtime_env
    env = Env.from_dict({"name": "c", "requirements": ["demo_dep==1.0"],
                         "index_url": "https://pypi.example/simple",
                         "environment": {"A": "1"}})
    rt = cluster_runtime_env(env)
    assert rt["uv"] == {"packages": ["demo_dep==1.0"],
                        "uv_pip_install_options": ["--index-url", "https://pypi.example/simple"]}
    assert rt["env_vars"]["A"] == "1"
    local = Env.from_dict({"name": "l", "requirements": ["demo_dep==1.0"],
                           "find_links": [str(tmp_path)], "no_index": True})
    with pytest.raises(EnvSpecError, match="other nodes"):
        cluster_runtime_env(local)


def test_bad_env_fails_at_construction_not_in_a_hang(tmp_path):
    from comfy_env.envs import EnvError
    with pytest.raises(EnvError):
        RayExecutor(env=str(tmp_path / "no-such-env"))


def test_keyword_arguments_named_like_the_task_parameters(ex):
    assert ex.submit(dict, fn=1, nested=2, setup=3).result(timeout=60) == {"fn": 1, "nested": 2, "setup": 3}
    assert ex.submit(lambda **kw: kw, fn=1, nested=2).result(timeout=60) == {"fn": 1, "nested": 2}


def test_ray_env_setup_failure_is_env_build_error(monkeypatch):
    # A runtime_env Ray cannot build (offline, a package that exists nowhere): the
    # call fails with comfy_env's EnvBuildError carrying Ray's message, never hangs.
    from comfy_env.envs import EnvBuildError
    from comfy_env.ray import executor as rx
    bad = {"uv": {"packages": ["no-such-package-comfy-env-test==1.0"],
                  "uv_pip_install_options": ["--no-index"]}}
    monkeypatch.setattr(rx, "local_runtime_env", lambda env: bad)
    with RayExecutor() as e:
        with pytest.raises(EnvBuildError, match="Ray could not set up"):
            e.submit(pow, 2, 2).result(timeout=100)


def test_interpreter_exit_runs_calls_still_waiting_in_the_executor(tmp_path):
    # As concurrent.futures: a script that exits without shutdown() still gets every
    # call it submitted run, including those waiting in the executor (max_workers).
    script = tmp_path / "script.py"
    script.write_text(
        "import sys, time, ray\n"
        "from comfy_env.ray import RayExecutor\n"
        "ray.init(address=sys.argv[1], log_to_driver=False)\n"
        "def touch(path):\n"
        "    time.sleep(0.5)\n"
        "    open(path, 'w').close()\n"
        "ex = RayExecutor(max_workers=1)\n"
        "for i in range(5):\n"
        "    ex.submit(touch, sys.argv[2] + f'/done{i}')\n"
        "print('exiting', flush=True)\n"
    )
    address = ray.get_runtime_context().gcs_address
    out = subprocess.run([sys.executable, str(script), address, str(tmp_path)], capture_output=True,
                         text=True, timeout=100, env=dict(os.environ, PYTHONPATH=SRC))
    assert out.returncode == 0, out.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.glob("done*")) == [f"done{i}" for i in range(5)]


@pytest.mark.parametrize("grace", [None, 0.0], ids=["ray-callback-thread", "ray-callback-late"])
def test_done_callbacks_never_run_inside_the_callers_result(ex, grace, monkeypatch):
    """As the standard library: the caller is woken, then the callbacks run on the
    executor's own thread (Ray's), so one that takes a lock the caller holds while it
    waits in result() does not deadlock.  Also when Ray's callback thread comes late
    (a busy machine; forced here with no grace) and the future is completed for it:
    that hung under load in the full suite."""
    if grace is not None:
        from comfy_env.ray import executor as rx
        monkeypatch.setattr(rx, "_CALLBACK_GRACE_S", grace)
    lock = threading.Lock()
    threads = []

    def cb(_f):
        threads.append(threading.current_thread().name)
        with lock:
            pass

    for i in range(20):
        f = ex.submit(_sleep_then, i, 0.02)
        f.add_done_callback(cb)
        got = []

        def caller():
            with lock:
                got.append(f.result(timeout=60))

        t = threading.Thread(target=caller, name="caller")
        t.start()
        t.join(30)
        assert not t.is_alive() and got == [i], f"call {i}: the caller hung"
    assert "caller" not in threads


def test_shutdown_wait_from_a_done_callback_raises_and_the_other_calls_finish():
    e = RayExecutor(max_workers=2)
    errors = []

    def cb(_f):
        try:
            e.shutdown(wait=True)
        except RuntimeError as exc:
            errors.append(str(exc))

    slow = e.submit(_sleep_then, "slow", 1.0)
    fast = e.submit(_sleep_then, "fast", 0.0)
    fast.add_done_callback(cb)
    assert slow.result(timeout=60) == "slow" and fast.result() == "fast"
    deadline = time.monotonic() + 10
    while not errors and time.monotonic() < deadline:
        time.sleep(0.05)
    assert errors and "would wait for itself" in errors[0]
    with pytest.raises(RuntimeError, match="after shutdown"):
        e.submit(pow, 1, 1)


def test_a_call_cancelled_while_waiting_for_an_input_counts_as_done(ex):
    from comfy_env import IsolatedExecutor
    with IsolatedExecutor() as iso:
        gate = iso.submit(time.sleep, 1.0)
        waiting = ex.submit(_identity, gate)          # waits here for the foreign future
        assert waiting.cancel()
        done, not_done = wait([waiting], timeout=10)
        assert waiting in done and not not_done
        assert list(as_completed([waiting], timeout=10)) == [waiting]


def test_cancelling_a_queued_input_of_another_executor_fails_the_call_that_takes_it():
    """A call chained on a RayFuture still queued in another executor (beyond its
    max_workers) waits for that future's ObjectRef; cancelling the input must fail the
    call with CancelledError.  It stayed pending for ever, and shutdown(wait=True) and
    the interpreter's exit with it."""
    producer, consumer = RayExecutor(max_workers=1), RayExecutor()
    try:
        busy = producer.submit(_sleep_then, 1, 1.0)
        queued = producer.submit(_sleep_then, 2, 0)
        taker = consumer.submit(_identity, queued)
        assert queued.cancel()
        assert busy.result(timeout=60) == 1
        assert isinstance(taker.exception(timeout=30), CancelledError)
    finally:
        producer.shutdown(wait=True)
        consumer.shutdown(wait=True)


def _keywords(**kw):
    return kw


def test_a_keyword_argument_named_self(ex):
    assert ex.submit(_keywords, self=1, x=2).result(timeout=60) == {"self": 1, "x": 2}
    first = ex.submit(_identity, 5)
    assert ex.submit(_keywords, self=first).result(timeout=60) == {"self": 5}   # a chained one


def test_ray_shut_down_under_calls_fails_them_and_shutdown_returns(tmp_path):
    """ray.shutdown() while a call runs: its outcome can never arrive, so the future
    fails (BrokenExecutor, as a broken ProcessPoolExecutor's calls do) instead of staying
    RUNNING, and shutdown(wait=True) and the interpreter's exit return, also after Ray
    was started again."""
    script = tmp_path / "script.py"
    script.write_text(
        "import sys, time, ray\n"
        "from concurrent.futures import BrokenExecutor, wait\n"
        "from comfy_env.ray import RayExecutor\n"
        "ray.init(address=sys.argv[1], log_to_driver=False)\n"
        "ex = RayExecutor(max_workers=1)\n"
        "f = ex.submit(time.sleep, 30)\n"
        "queued = ex.submit(time.sleep, 0)\n"
        "time.sleep(1.0)\n"
        "ray.shutdown()\n"
        "done, _ = wait([f, queued], timeout=10)\n"
        "print('done', len(done), type(f.exception(0)).__name__, type(queued.exception(0)).__name__, flush=True)\n"
        "ray.init(address=sys.argv[1], log_to_driver=False)\n"
        "t = time.monotonic(); ex.shutdown(wait=True)\n"
        "print('shutdown', round(time.monotonic() - t), flush=True)\n"
        "try:\n"
        "    ex.submit(pow, 1, 1)\n"
        "except BrokenExecutor:\n"
        "    print('broken', flush=True)\n"
    )
    address = ray.get_runtime_context().gcs_address
    out = subprocess.run([sys.executable, str(script), address], capture_output=True,
                         text=True, timeout=100, env=dict(os.environ, PYTHONPATH=SRC))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "done 2 BrokenExecutor BrokenExecutor" in out.stdout, out.stdout + out.stderr[-2000:]
    assert "shutdown 0" in out.stdout and "broken" in out.stdout, out.stdout


_CALLBACK_SHUTS_DOWN_ANOTHER = r"""
import os, sys, threading
import ray
from comfy_env.ray import RayExecutor
from cb_funcs import add, sleep_ret     # by reference, as a user's module

if __name__ == "__main__":
    ray.init(num_cpus=2, include_dashboard=False)
    a, b = RayExecutor(), RayExecutor()
    a.submit(add, 0, 0).result(60); b.submit(add, 0, 0).result(60)
    slow = b.submit(sleep_ret, 1, "slow")
    returned = threading.Event()

    def cb(_f):
        b.shutdown(wait=True)
        returned.set()

    a.submit(add, 1, 2).add_done_callback(cb)
    print("returned", returned.wait(20), "slow done", slow.done(), flush=True)
    os._exit(0)
"""


@pytest.mark.timeout(120)
def test_a_done_callback_that_waits_for_another_executor_holds_up_nothing_else(tmp_path):
    """Ray has one callback thread for the whole process; each executor completes its
    calls (and runs their done-callbacks) on its own thread, so a callback of one
    executor's call that shuts down another executor, waiting for that one's running
    call, returns once that call ends (it hung for ever: the other call was to be
    completed on the very thread the callback held).  In a script of its own: a fresh
    Ray, as a user's program has."""
    script = tmp_path / "cb.py"
    script.write_text(_CALLBACK_SHUTS_DOWN_ANOTHER)
    (tmp_path / "cb_funcs.py").write_text("import time\n\ndef add(a, b):\n    return a + b\n\n\n"
                                          "def sleep_ret(s, v=None):\n    time.sleep(s)\n    return v\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=100, cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), SRC])))
    assert "returned True slow done True" in out.stdout, out.stdout + out.stderr[-2000:]


def test_calls_cancelled_by_shutdown_count_as_done_for_wait():
    """shutdown(cancel_futures=True): the calls it cancels are done for wait() and
    as_completed() at once (they stayed CANCELLED, never notified: wait() ran out its
    timeout), as IsolatedExecutor's are."""
    e = RayExecutor(max_workers=1)
    assert e.submit(_sleep_then, 0, 0).result(60) == 0
    fs = [e.submit(_sleep_then, i, 1.0) for i in range(4)]
    dep = e.submit(_sleep_then, fs[3], 0)
    e.shutdown(wait=False, cancel_futures=True)
    t0 = time.monotonic()
    done, not_done = wait(fs + [dep], timeout=20)
    assert not not_done and time.monotonic() - t0 < 10
    assert sum(f.cancelled() for f in fs + [dep]) >= 3


_READ_AFTER_RAY_SHUTDOWN = r"""
import ray
from comfy_env.ray import RayExecutor
from cb_funcs import add

if __name__ == "__main__":
    ray.init(num_cpus=2, include_dashboard=False)
    with RayExecutor() as ex:
        read, unread = ex.submit(add, 1, 2), ex.submit(add, 3, 4)
        print("read", read.result(60), flush=True)
    ray.shutdown()
    print("again", read.result(), flush=True)
    try:
        unread.result(10)
    except RuntimeError as e:
        print("unread:", e, flush=True)
    print("ray restarted:", ray.is_initialized(), flush=True)
"""


@pytest.mark.timeout(120)
def test_a_value_never_read_before_ray_shutdown_is_a_clear_error_not_a_new_ray(tmp_path):
    """After ray.shutdown() a finished call's value is gone with the object store: a value
    read before stays readable, one never read raises an error that says so (ray.get
    started a new local Ray and raised Ray's 'owner is unknown')."""
    script = tmp_path / "after.py"
    script.write_text(_READ_AFTER_RAY_SHUTDOWN)
    (tmp_path / "cb_funcs.py").write_text("def add(a, b):\n    return a + b\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=100, cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), SRC])))
    text = out.stdout + out.stderr[-2000:]
    assert "read 3" in out.stdout and "again 3" in out.stdout, text
    assert "unread: this call's value was in the object store of a Ray session that has ended" in out.stdout, text
    assert "ray restarted: False" in out.stdout, text
