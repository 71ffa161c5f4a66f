"""The CPU data plane's hygiene: no segment outlives its last user, whoever dies.

Leak checks look at the ledger (live blocks), memfd fds and memfd mappings of the parent
and of the workers, /dev/shm and RSS; after garbage collection, shutdown, SIGKILL of a
worker and SIGKILL of the parent.  Plus the arena's bounds, and a 1 GiB array.
"""
from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import _dataplane_funcs as F
from comfy_env import IsolatedExecutor, WorkerCrashed, shared_like
from comfy_env.ipc import lifetime, shm

torch = pytest.importorskip("torch")

MiB = 1 << 20
TESTS = os.path.dirname(os.path.abspath(__file__))


_settle = F.settle


def _keys():
    return {r.key for r in lifetime.LEDGER.records()}


def _parent_memory():
    """(memfd fds, memfd mappings) of this process, with the arena emptied."""
    shm.ARENA.trim()
    return F.memfd_fds_of("self"), F.memfd_maps_of("self")


def _dev_shm():
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


def _rss(pid="self"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _fds():
    """This process's open fds, less the wake-up pipes of the ledger and of the launch
    keeper (each made once, on first use, and kept for the process's life)."""
    from comfy_env.executor.launch import KEEPER

    fds = {int(fd) for fd in os.listdir("/proc/self/fd")}
    return len(fds - {lifetime.LEDGER._wake_r, lifetime.LEDGER._wake_w,
                      KEEPER._wake_r, KEEPER._wake_w})


def _gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def _wait_until(pred, timeout=15.0, what="condition"):
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(0.02)


def _worker_clean(ex, timeout=10.0):
    """A worker's (ledger records, memfd fds, memfd maps) once the parent's releases reached it."""
    end = time.monotonic() + timeout
    while True:
        _settle()
        got = ex.submit(F.hygiene).result(timeout=30)
        if got == (0, 0, 0) or time.monotonic() > end:
            return got
        time.sleep(0.05)


@pytest.fixture
def clean():
    """Baseline of the parent's blocks and memory; checks both are back at the end."""
    _settle()
    state = {"keys": _keys(), "mem": _parent_memory(), "shm": _dev_shm()}
    yield state
    _settle(lambda: _keys() <= state["keys"])
    _wait_until(lambda: _parent_memory() <= state["mem"], 5, "parent memfds released")
    assert not {n for n in _dev_shm() - state["shm"] if "comfy" in n}


def test_an_unpicklable_result_still_releases_the_calls_argument(clean):
    """A call's releases travel in its result's write; a result that cannot be pickled
    loses none of them: the argument's block is released all the same."""
    from comfy_env.errors import PicklingFailed
    a = np.arange(1_000_000, dtype=np.float64)
    with IsolatedExecutor(max_workers=1) as ex:
        for _ in range(3):
            with pytest.raises(PicklingFailed, match="could not be sent"):
                ex.submit(F.unpicklable_of, a).result(timeout=30)
        _wait_until(lambda: _keys() <= clean["keys"], 10, "the argument's block released")
        assert _worker_clean(ex) == (0, 0, 0)


def _round_trips(ex):
    """A mix of transfers both ways; returns nothing that stays alive."""
    a = np.random.default_rng(0).random(300_000)
    s = shared_like(np.arange(200_000, dtype=np.int32))
    t = torch.arange(100_000, dtype=torch.bfloat16)[3:]
    got = ex.submit(F.echo_many, a, s, t, {"v": a[::2]}).result(timeout=30)
    assert np.array_equal(got[0][0], a) and np.shares_memory(got[0][1], s)
    ex.submit(F.keep, a).result(timeout=30)          # held by the worker for a while
    assert ex.submit(F.drop_kept).result(timeout=30) == 0
    made = ex.submit(F.make_range, 500_000).result(timeout=30)
    again = ex.submit(F.echo, made[10:]).result(timeout=30)
    assert np.shares_memory(again, made)
    m = F.make_mesh(5)
    assert ex.submit(F.mesh_report, m).result(timeout=30)[0].endswith("Trimesh")
    del got, made, again, s, t, m


# -- garbage collection and shutdown ------------------------------------------------------

@pytest.mark.timeout(60)
def test_nothing_is_left_after_results_are_dropped_and_after_shutdown(clean):
    fds_before = _fds()
    with IsolatedExecutor(max_workers=2, name="hygiene") as ex:
        for _ in range(3):
            _round_trips(ex)
        # Each worker: no live block, no memfd open or mapped once its arena is emptied.
        # (hygiene() collects garbage first: a Trimesh is a reference cycle, so the worker
        # lets go of a mesh's blocks only when its garbage collector runs.)
        for _ in range(4):
            assert _worker_clean(ex) == (0, 0, 0)
        _settle(lambda: _keys() <= clean["keys"])
        pids = ex.worker_pids()
    for pid in pids:
        _wait_until(lambda: _gone(pid), what=f"worker {pid} exit")
    _settle(lambda: _keys() <= clean["keys"])
    assert _parent_memory() <= clean["mem"]
    _wait_until(lambda: _fds() <= fds_before, 5, "parent fds closed")


@pytest.mark.timeout(60)
def test_received_arrays_outlive_shutdown_and_release_on_gc(clean):
    with IsolatedExecutor(name="producer") as ex:
        r = ex.submit(F.make_range, 1_000_000).result(timeout=30)
        t = ex.submit(F.make_tensor, 300_000, "float16").result(timeout=30)
        pid = ex.worker_pids()[0]
    _wait_until(lambda: _gone(pid), what="worker exit")
    assert np.array_equal(r, np.arange(1_000_000.0))
    assert torch.equal(t, torch.arange(300_000, dtype=torch.float64).to(torch.float16))
    assert F.memfd_maps_of("self") >= 1
    r[0] = 5.0                                        # still writeable memory of ours
    del r, t
    # fixture: ledger, fds and mappings back to the baseline


# -- SIGKILL of a worker -----------------------------------------------------------------

@pytest.mark.timeout(60)
def test_worker_sigkill_releases_its_leases_and_its_arrays_stay_valid(clean):
    with IsolatedExecutor(name="victim") as ex:
        a = shared_like(np.arange(2_000_000, dtype=np.float64))
        made = ex.submit(F.make_range, 1_000_000).result(timeout=30)
        view = ex.submit(F.echo, made[::2]).result(timeout=30)
        assert ex.submit(F.keep, a).result(timeout=30) == 1       # the worker holds a lend of a
        rec = lifetime.LEDGER.get(shm.find_segment(a.__array_interface__["data"][0], a.nbytes).key)
        assert rec.users >= 2                                     # our holder + the lend
        pid = ex.worker_pids()[0]
        os.kill(pid, signal.SIGKILL)
        _wait_until(lambda: _gone(pid), what="worker death")
        _settle(lambda: rec.users == 1)                            # the lend is settled
        assert np.array_equal(made, np.arange(1_000_000.0))
        assert np.array_equal(view, np.arange(0, 1_000_000.0, 2))
        # The executor goes on with a new worker; the dead one's memory is still ours.
        assert ex.submit(F.strided_sum, made, 1).result(timeout=60) == \
            (float(np.arange(1_000_000.0).sum()), 999_999.0)
        assert _worker_clean(ex) == (0, 0, 0)
        del a, made, view, rec


@pytest.mark.timeout(60)
def test_worker_sigkilled_mid_call_releases_the_arguments(clean):
    with IsolatedExecutor(name="crash") as ex:
        a = np.random.default_rng(3).random(400_000)
        s = shared_like(a)
        with pytest.raises(WorkerCrashed):
            ex.submit(F.sigkill_self, (a, s, torch.from_numpy(a))).result(timeout=30)
        _settle(lambda: _keys() <= clean["keys"] | {
            shm.find_segment(s.__array_interface__["data"][0], s.nbytes).key})
        assert ex.submit(F.echo, 1).result(timeout=30) == 1
        del s


# -- SIGKILL of the parent ---------------------------------------------------------------

_PARENT = textwrap.dedent("""
    import json, os, sys, tempfile, time
    sys.path.insert(0, {tests!r})
    import numpy as np
    import _dataplane_funcs as F
    from comfy_env import IsolatedExecutor, shared_like

    ex = IsolatedExecutor(max_workers=2)
    d = tempfile.mkdtemp()
    fa = ex.submit(F.range_at_rendezvous, d, "a", "b", 1 << 20)
    fb = ex.submit(F.range_at_rendezvous, d, "b", "a", 1 << 20)
    ra, rb = fa.result(timeout=60)[1], fb.result(timeout=60)[1]
    a = shared_like(np.arange(1 << 20, dtype=np.float64))
    ex.submit(F.keep, (a, rb)).result(timeout=30)        # one worker holds our memory ...
    busy = ex.submit(F.sleep_holding, (a, ra), 600)       # ... the other is busy with it
    time.sleep(0.5)
    print(json.dumps({{"workers": ex.worker_pids()}}), flush=True)
    time.sleep(600)
""")


@pytest.mark.timeout(60)
def test_parent_sigkill_leaves_no_process_and_no_memory_behind(tmp_path):
    shm_before = _dev_shm()
    proc = subprocess.Popen([sys.executable, "-c", _PARENT.format(tests=TESTS)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        workers = json.loads(line)["workers"]
        assert len(workers) == 2
        # Sanity: the memory is there before the kill (parent and workers map it).
        assert F.memfd_maps_of(proc.pid) > 0
        assert all(F.memfd_maps_of(w) > 0 for w in workers)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        for w in workers:
            _wait_until(lambda: _gone(w), 15, f"worker {w} exits after its parent died")
            assert F.memfd_fds_of(w) == 0 and F.memfd_maps_of(w) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert not {n for n in _dev_shm() - shm_before if "comfy" in n}


# -- the parent lacks torch ----------------------------------------------------------------

_NO_TORCH_PARENT = textwrap.dedent("""
    import gc, json, sys, time
    sys.path.insert(0, {tests!r})
    sys.modules["torch"] = None
    from comfy_env import IsolatedExecutor
    from comfy_env.ipc import lifetime

    out = {{}}
    with IsolatedExecutor() as ex:
        fut = ex.submit("_dataplane_funcs:make_tensor", 100_000)
        try:
            fut.result(timeout=60)
            out["error"] = None
        except ImportError as exc:
            out["error"] = str(exc)
        out["again"] = type(fut.exception()).__name__
        n = ex.submit("_dataplane_funcs:make_range", 100_000).result(timeout=30).shape
        out["numpy_ok"] = list(n)
        for _ in range(200):
            gc.collect(); lifetime.LEDGER.drain()
            if len(lifetime.LEDGER) == 0:
                break
            time.sleep(0.02)
        out["parent_ledger"] = len(lifetime.LEDGER)
        out["worker_ledger"] = ex.submit("_dataplane_funcs:ledger_size").result(timeout=30)
    out["executable"] = sys.executable
    print(json.dumps(out))
""")


@pytest.mark.timeout(60)
def test_parent_without_torch_says_torch_is_missing_here():
    p = subprocess.run([sys.executable, "-c", _NO_TORCH_PARENT.format(tests=TESTS)],
                       capture_output=True, text=True, timeout=50)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["error"] and "torch" in out["error"] and out["executable"] in out["error"], out
    assert out["again"] in ("ModuleNotFoundError", "ImportError")
    assert out["numpy_ok"] == [100_000]
    assert out["parent_ledger"] == 0 and out["worker_ledger"] == 0, out


# -- memory over many big transfers ----------------------------------------------------------

@pytest.mark.timeout(90)
def test_rss_stays_flat_over_many_64mib_round_trips(clean):
    a = np.random.default_rng(0).integers(0, 1 << 62, 8 * MiB)        # 64 MiB
    with IsolatedExecutor(name="rss") as ex:
        wpid = ex.submit(F.pid).result(timeout=30)

        def trip(i):
            a[0] = i
            got = ex.submit(F.copy_of, a).result(timeout=60)     # a copy each way
            assert got[0] == i and got[-1] == a[-1]
            back = ex.submit(F.echo, a).result(timeout=60)        # parent's copy, echoed
            assert back[0] == i

        for i in range(3):
            trip(i)
        _settle()
        created, reused = shm.ARENA.created, shm.ARENA.reused
        rss0, wrss0 = _rss(), _rss(wpid)
        for i in range(3, 25):
            trip(i)
        _settle()
        grow, wgrow = _rss() - rss0, _rss(wpid) - wrss0
        assert grow < 192 * MiB, f"parent RSS grew by {grow / MiB:.0f} MiB over 22 round trips"
        assert wgrow < 192 * MiB, f"worker RSS grew by {wgrow / MiB:.0f} MiB over 22 round trips"
        # The parent's copies recycle their segments.  A worker releases an echoed
        # argument only after the result has left, so the parent's next copy can
        # occasionally find that segment still lent and take one more: at most one.
        assert shm.ARENA.created - created <= 1, (created, shm.ARENA.created)
        assert shm.ARENA.reused >= reused + 2 * 22 - 1
        assert _worker_clean(ex) == (0, 0, 0)
    del a


# -- a 1 GiB array -------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_one_gib_array_both_ways(clean):
    n = (1 << 30) // 8
    with IsolatedExecutor(name="gib") as ex:
        a = np.arange(n, dtype=np.float64)
        want = (float(np.sum(a[::4096])), float(n - 1))
        back = ex.submit(F.echo_and_sample, a).result(timeout=80)
        assert back[1] == want
        assert back[0].shape == (n,) and back[0][123_456_789] == 123_456_789.0
        assert back[0][-1] == n - 1 and back[0].base is not None
        del a
        # worker -> parent
        made = ex.submit(F.make_range, n, "float64").result(timeout=80)
        assert made.nbytes == 1 << 30 and made[-1] == n - 1 and made[777_777_77] == 777_777_77
        # and back again by descriptor: no copy anywhere
        assert ex.submit(F.strided_sum, made).result(timeout=80) == want
        del made, back
        _settle()
        assert _worker_clean(ex) == (0, 0, 0)


# -- the arena ---------------------------------------------------------------------------

def _release(rec):
    holder = shm.holder_for(rec)
    del holder
    _settle()


@pytest.mark.timeout(30)
def test_arena_recycles_within_its_bound_and_gives_idle_memory_back():
    arena = shm.Arena(max_free_bytes=6 * MiB, idle_seconds=-1)      # no timer: trim by hand
    recs = [arena.allocate(2 * MiB) for _ in range(5)]
    assert arena.created == 5 and arena.reused == 0
    for r in recs:
        _release(r)
    assert arena.free_bytes <= 6 * MiB
    assert arena.free_bytes == 3 * shm._size_class(2 * MiB)       # the rest was unmapped
    again = arena.allocate(2 * MiB)
    assert arena.reused == 1 and arena.created == 5
    # A size class bigger than the whole bound is never kept.
    big = arena.allocate(8 * MiB)
    _release(big)
    assert arena.free_bytes <= 6 * MiB
    _release(again)
    assert arena.trim(older_than=3600) == 0
    assert arena.trim() == 3 and arena.free_bytes == 0
    assert not any(arena._free.values())


@pytest.mark.timeout(30)
def test_arena_timer_trims_idle_segments():
    arena = shm.Arena(max_free_bytes=64 * MiB, idle_seconds=1)
    r = arena.allocate(3 * MiB)
    seg = r.resource
    _release(r)
    assert arena.free_bytes == seg.size
    _wait_until(lambda: arena.free_bytes == 0, 10, "idle segment trimmed")
    assert seg.fd == -1 and seg.mm is None
    assert shm.find_segment(seg.addr, 1) is None


@pytest.mark.timeout(30)
def test_arena_bound_and_idle_time_are_configurable_per_process(monkeypatch):
    monkeypatch.setenv("COMFY_ENV_ARENA_BYTES", str(32 * MiB))
    monkeypatch.setenv("COMFY_ENV_ARENA_IDLE_S", "7")
    with IsolatedExecutor(name="arena-cfg") as ex:
        assert ex.submit(F.arena_config).result(timeout=30) == (32 * MiB, 7)


@pytest.mark.timeout(30)
def test_size_classes_waste_at_most_a_quarter():
    for n in [1, 4096, MiB - 1, MiB, MiB + 1, 3 * MiB + 5, 100 * MiB + 3, (1 << 30) + 1]:
        c = shm._size_class(n)
        assert c >= n and c % shm._PAGE == 0
        if n > MiB:
            assert c <= n * 1.25 + shm._PAGE, (n, c)


# -- failures on the way ----------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_failed_encode_and_failed_decode_lend_nothing_for_good(clean):
    import threading

    with IsolatedExecutor(name="failures") as ex:
        a = np.random.default_rng(5).random(300_000)
        # The parent cannot pickle the call: the array's scratch copy goes back to the arena.
        with pytest.raises(Exception, match="pickle"):
            ex.submit(F.echo, (a, threading.Lock())).result(timeout=30)
        # The worker's result holds a class the parent cannot import: the error names the
        # package and this Python, and the worker's lends are released.
        with pytest.raises(ModuleNotFoundError) as info:
            ex.submit(F.with_worker_only_class, 300_000).result(timeout=30)
        assert "only_in_the_worker" in str(info.value) and sys.executable in str(info.value)
        # The worker cannot pickle its result.
        with pytest.raises(Exception, match="could not be sent"):
            ex.submit(F.unpicklable_result, 300_000).result(timeout=30)
        assert _worker_clean(ex) == (0, 0, 0)
        del info


# -- the worker's janitor: arguments caught in reference cycles ----------------------------

def _busy_for(ex, seconds):
    """Calls back to back for ``seconds``; the worker's full-collection count at the end."""
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n = ex.submit(F.full_collections).result(timeout=30)
    return n


@pytest.mark.timeout(60)
def test_an_argument_left_in_a_cycle_is_released_once_calls_pause_not_between_them(clean):
    """Collecting costs tens of ms on a big heap: not while calls keep coming, but
    soon after they pause, and only then is the argument's block released."""
    a = np.ones(200_000)
    with IsolatedExecutor(name="janitor") as ex:
        ex.submit(F.echo, 1).result(timeout=30)
        before = _keys()
        ex.submit(F.keep_in_cycle, a).result(timeout=30)
        lent = _keys() - before
        assert lent, "the argument went through shared memory: the parent lends a block"
        assert _busy_for(ex, 1.5) == 0, "the janitor collected while calls kept coming"
        assert lent <= _keys(), "the block was released without a collection"
        time.sleep(1.2)
        assert ex.submit(F.full_collections).result(timeout=30) == 1
        _wait_until(lambda: not (lent & _keys()), 5, "the argument's block released")


@pytest.mark.timeout(60)
def test_a_worker_kept_busy_still_collects_within_its_cap(clean):
    a = np.ones(200_000)
    with IsolatedExecutor(name="janitor") as ex:
        ex.submit(F.echo, 1).result(timeout=30)
        before = _keys()
        ex.submit(F.keep_in_cycle, a, 1.0).result(timeout=30)
        lent = _keys() - before
        assert lent
        assert _busy_for(ex, 2.5) >= 1, "no collection within the cap while busy"
        _wait_until(lambda: not (lent & _keys()), 5, "the argument's block released")
