"""Zero-copy chains: ``fb = ex_b.submit(g, fa)`` with ``fa`` a future of another executor.

The parent forwards ``fa``'s undecoded result (pickle bytes + shared-memory
refs + fds) to B's worker; it never maps or copies the payload unless someone
calls ``fa.result()``.  ``shm.STATS`` counts the parent's maps and copies.

Worker functions live in ``tests/_chain_funcs.py``.  Most tests use env=None
executors; the 256 MiB chain also crosses into a *different* environment built
from a comfy-env.toml with no requirements (numpy shared from the host) in a
temporary cache dir -- a real foreign env, built in well under a second.
"""
from __future__ import annotations

import gc
import os
import signal
import sys
import textwrap
import threading
import time
from concurrent.futures import CancelledError, Future, wait

import numpy as np
import pytest

import _chain_funcs as cf
from comfy_env import IsolatedExecutor, WorkerCrashed
from comfy_env.ipc import lifetime, shm

MiB = 1 << 20


# -- helpers ------------------------------------------------------------------------------
def _rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _stats():
    return dict(shm.STATS)


def _parent_ledger_settles(baseline, within=3.0):
    """``len(LEDGER)`` in the parent, polled until it reaches ``baseline`` (releases are
    posted to the ledger's flusher thread; the spec allows ~0.5 s, a loaded box more)."""
    deadline = time.monotonic() + within
    while True:
        gc.collect()
        lifetime.LEDGER.drain()
        n = len(lifetime.LEDGER)
        if n <= baseline or time.monotonic() > deadline:
            return n
        time.sleep(0.05)


def _worker_ledger_settles(ex, baseline, within=3.0):
    deadline = time.monotonic() + within
    while True:
        n = ex.submit(cf.ledger_size).result(30)
        if n <= baseline or time.monotonic() > deadline:
            return n
        time.sleep(0.1)


def _wait_dead(ex, pid, within=15.0):
    """Until the executor has processed the death of worker ``pid``."""
    deadline = time.monotonic() + within
    while pid in ex.worker_pids():
        assert time.monotonic() < deadline, f"worker {pid} still listed after SIGKILL"
        time.sleep(0.02)


@pytest.fixture
def pair():
    a = IsolatedExecutor(name="chain-a")
    b = IsolatedExecutor(name="chain-b")
    # Start both workers (and import numpy there) outside the measured part.
    a.submit(cf.summary, np.zeros(4)).result(30)
    b.submit(cf.summary, np.zeros(4)).result(30)
    try:
        yield a, b
    finally:
        a.shutdown(cancel_futures=True)
        b.shutdown(cancel_futures=True)


@pytest.fixture(scope="module")
def foreign_env(tmp_path_factory):
    """A tiny env of its own (no requirements, numpy shared) in a temporary cache."""
    from comfy_env.envs import Env

    spec = tmp_path_factory.mktemp("chain-env")
    cache = tmp_path_factory.mktemp("chain-cache")
    (spec / "comfy-env.toml").write_text(textwrap.dedent("""
        name = "chain-foreign"
        requirements = []
        share = ["numpy"]
    """))
    return Env.from_toml(spec, cache_dir=str(cache)).create(progress=False)


# -- the big one ----------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_256mib_chain_across_two_envs_never_touches_the_parent(foreign_env):
    """A (env=None) -> B (a different env built from a toml) -> C (env=None), 256 MiB arrays.

    The parent's RSS does not grow by the array size and it neither maps nor copies
    a byte of the payload; the data arrives intact; only ``fa.result()`` maps it.
    """
    n = 256 * MiB
    with IsolatedExecutor(name="A") as a, IsolatedExecutor(foreign_env, name="B") as b, \
            IsolatedExecutor(name="C") as c:
        assert not b._pool.wenv.is_current
        host = sys.executable
        pids = {}
        for key, ex in (("a", a), ("b", b), ("c", c)):
            pids[key] = ex.submit(cf.summary, np.zeros(4)).result(30)["pid"]
        assert b.submit(getattr, sys, "executable").result(30) != host
        base_ledgers = {k: _worker_ledger_settles(ex, 10**9) for k, ex in (("a", a), ("b", b), ("c", c))}
        base_parent = _parent_ledger_settles(0, within=0.5)
        gc.collect()
        rss0, st0 = _rss(), _stats()

        fa = a.submit(cf.make, n, 3)
        fb = b.submit(cf.add, fa, 2)                 # runs in the foreign env
        fc = c.submit(cf.summary, fb)
        s = fc.result(50)

        assert s == {"shape": (n,), "dtype": "uint8", "first": 5, "last": 5, "sum": 5 * n,
                     "pid": pids["c"]}
        assert fb.done() and fa.done()
        grown = _rss() - rss0
        assert grown < n // 4, f"parent RSS grew by {grown / MiB:.1f} MiB during the chain"
        assert _stats() == st0, "the parent mapped or copied part of the chain's payload"
        # Intermediate results are held, undecoded, while their futures live.
        assert fa.lazy_result() is not None and fb.lazy_result() is not None

        # Lazy materialisation: asking for fb's value maps it in the parent (once).
        y = fb.result()
        assert y.shape == (n,) and y[0] == 5 and y[-1] == 5
        assert _stats()["maps"] == st0["maps"] + 1 and _stats()["copies"] == st0["copies"]
        assert fb.result() is y

        # Memory release: drop every future and value; every ledger returns to baseline.
        del fa, fb, fc, y
        assert _parent_ledger_settles(base_parent) == base_parent
        for k, ex in (("a", a), ("b", b), ("c", c)):
            assert _worker_ledger_settles(ex, base_ledgers[k]) == base_ledgers[k], k


# -- shapes of arguments ------------------------------------------------------------------------
@pytest.mark.timeout(40)
def test_futures_nested_in_lists_tuples_dicts_and_kwargs(pair):
    a, b = pair
    st0 = _stats()
    f1 = a.submit(cf.make, 2 * MiB, 1)
    f2 = a.submit(cf.make, 2 * MiB, 2)
    f3 = a.submit(cf.pid)                      # a plain (non shared-memory) result
    out = b.submit(cf.combine, [f1, (f2, {"deep": [f1]})], f3,
                   kw={"x": f2, "t": (f1,)}, plain=f1).result(30)
    a_pid = f3.result()
    assert out["args"] == [[("arr", 1, 2 * MiB), (("arr", 2, 2 * MiB), {"deep": [("arr", 1, 2 * MiB)]})],
                           a_pid]
    assert out["kwargs"] == {"kw": {"x": ("arr", 2, 2 * MiB), "t": (("arr", 1, 2 * MiB),)},
                             "plain": ("arr", 1, 2 * MiB)}
    assert _stats() == st0
    assert f1.lazy_result() is not None and f2.lazy_result() is not None


def _nest(x, levels):
    for _ in range(levels):
        x = [x]
    return x


@pytest.mark.timeout(40)
def test_futures_anywhere_in_the_arguments_are_waited_for_done_or_not(pair):
    """submit() looks for futures in lists, tuples, sets and dicts up to 20 levels; the
    encoder meets them anywhere (an object's attributes, a container subclass, deeper).
    One it meets that is not done yet is waited for like the others (it used to fail
    the call with EncodeError, while a done one worked)."""
    import collections

    a, b = pair
    NT = collections.namedtuple("NT", "x y")
    wraps = {"dataclass": cf.Box, "list subclass": lambda f: cf.MyList([f]),
             "namedtuple": lambda f: NT(f, 1), "25 levels": lambda f: _nest(f, 25)}
    for fill, (name, wrap) in enumerate(wraps.items(), 1):
        fa = a.submit(cf.slow_make, 0.2, 70000, fill)
        fb = b.submit(cf.arrays_in, wrap(fa))
        assert not fa.done(), name
        assert fb.result(30) == [("arr", fill, 70000)], name
        assert fa.lazy_result() is not None, name      # forwarded, not decoded here
    # A plain Future the caller completes later: the call waits for it.
    plain = Future()
    fb = b.submit(cf.arrays_in, cf.Box(plain))
    time.sleep(0.2)
    assert not fb.done()
    plain.set_result(np.full(8, 7, np.uint8))
    assert fb.result(30) == [("arr", 7, 8)]
    # A failed input found late fails the call without running it, as one found at submit.
    fa = a.submit(cf.slow_fail, 0.2, "late boom")
    exc = b.submit(cf.arrays_in, cf.Box(fa)).exception(30)
    assert type(exc) is ValueError and str(exc) == "late boom", repr(exc)
    assert isinstance(exc.__cause__, ValueError)


@pytest.mark.timeout(40)
def test_the_same_future_twice_arrives_as_one_object(pair):
    """Like an array passed twice (pickle's memo): one forwarded part, decoded once."""
    a, b = pair
    fa = a.submit(cf.make, MiB, 3)
    fa2 = a.submit(cf.make, MiB, 4)
    assert b.submit(cf.same, fa, fa).result(30) == (True, True)
    assert b.submit(cf.same, fa, fa2).result(30) == (False, False)
    assert b.submit(lambda l, d: l[0] is d["k"], [fa, fa2], {"k": fa}).result(30) is True
    r = fa.result()
    assert b.submit(cf.same, r, r).result(30) == (True, True)


@pytest.mark.timeout(40)
def test_diamond_from_different_executors_and_fan_out(pair):
    a, b = pair
    with IsolatedExecutor(name="chain-a2") as a2, IsolatedExecutor(max_workers=2, name="d") as d:
        st0 = _stats()
        top = a.submit(cf.make, 4 * MiB, 7)
        left = b.submit(cf.add, top, 1)            # 8
        right = a2.submit(cf.add, top, 2)          # 9
        bottom = d.submit(cf.combine, left, right, top=top)
        r = bottom.result(30)
        assert r["args"] == [("arr", 8, 4 * MiB), ("arr", 9, 4 * MiB)]
        assert r["kwargs"] == {"top": ("arr", 7, 4 * MiB)}
        # Fan-out: one result feeds several consumers of one executor at once.
        fans = [d.submit(cf.summary, top) for _ in range(4)]
        assert [f.result(30)["sum"] for f in fans] == [7 * 4 * MiB] * 4
        assert _stats() == st0


@pytest.mark.timeout(40)
def test_plain_and_materialised_inputs_still_work(pair):
    """Inputs that cannot be forwarded travel as values: a plain Future, a future whose
    result had no shared memory, and one already decoded in the parent."""
    a, b = pair
    plain = Future()
    plain.set_result(np.full(2 * MiB, 4, np.uint8))
    small = a.submit(cf.identity, 41)
    decoded = a.submit(cf.make, 2 * MiB, 6)
    decoded.result(30)                         # materialised: forwarded as a value
    r = b.submit(cf.combine, plain, small, decoded).result(30)
    assert r["args"] == [("arr", 4, 2 * MiB), 41, ("arr", 6, 2 * MiB)]
    # Late plain future: the call waits for it.
    late = Future()
    fb = b.submit(cf.summary, late)
    time.sleep(0.2)
    assert not fb.done()
    late.set_result(np.arange(10))
    assert fb.result(30)["sum"] == 45


@pytest.mark.timeout(40)
def test_torch_cpu_tensor_chain(pair):
    torch = pytest.importorskip("torch")
    a, b = pair
    st0 = _stats()
    fa = a.submit(torch.full, (1024, 1024), 3.0)
    fb = b.submit(torch.mul, fa, 2)
    fc = a.submit(torch.sum, fb)
    assert float(fc.result(60)) == 6.0 * 1024 * 1024
    assert _stats() == st0
    t = fb.result()
    assert isinstance(t, torch.Tensor) and float(t[0, 0]) == 6.0


# -- failures -----------------------------------------------------------------------------------
@pytest.mark.timeout(40)
def test_failed_input_fails_the_call_without_running_it(pair, tmp_path):
    a, b = pair
    mark = tmp_path / "called"
    fa = a.submit(cf.fail, "upstream broke")
    fb = b.submit(cf.called, str(mark), fa)
    exc = fb.exception(30)
    assert isinstance(exc, ValueError) and "upstream broke" in str(exc)
    assert exc.__cause__ is fa.exception()
    assert not mark.exists()
    # A call whose input is a chain of a failed call fails the same way, transitively.
    fc = a.submit(cf.called, str(mark), {"x": [fb]})
    exc2 = fc.exception(30)
    assert isinstance(exc2, ValueError) and exc2.__cause__ is exc
    assert not mark.exists()
    # The executors carry on.
    assert b.submit(cf.identity, 5).result(30) == 5


@pytest.mark.timeout(40)
def test_failed_branch_of_a_diamond_releases_the_good_branch(pair, tmp_path):
    """One input fails, the other succeeded: g never runs, and the good input's memory
    is released as soon as the caller drops its future (no reference cycle, no GC)."""
    a, b = pair
    mark = tmp_path / "called"
    base = _parent_ledger_settles(0, within=0.5)
    gc.disable()
    try:
        good = a.submit(cf.make, 4 * MiB, 1)
        bad = a.submit(cf.fail, "left")
        fb = b.submit(cf.called, str(mark), good, bad)
        assert isinstance(fb.exception(30), ValueError)
        assert len(lifetime.LEDGER) >= base + 1
        del good, bad, fb
        deadline = time.monotonic() + 3
        while len(lifetime.LEDGER) > base and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(lifetime.LEDGER) == base, "the good input is only freed by the cyclic GC"
    finally:
        gc.enable()
    assert not mark.exists()


@pytest.mark.timeout(40)
def test_cancelled_input_fails_the_call(pair, tmp_path):
    a, b = pair
    mark = tmp_path / "called"
    # An input cancelled before the chained call is submitted.
    plain = Future()
    plain.cancel()
    f1 = b.submit(cf.called, str(mark), plain)
    assert isinstance(f1.exception(30), CancelledError)
    assert not f1.cancelled()                 # it failed; it was not cancelled itself
    # An input cancelled while the chained call waits for it (queued behind a slow call).
    blocker = a.submit(cf.slow, 0.5)
    queued = a.submit(cf.make, MiB, 1)
    f2 = b.submit(cf.called, str(mark), queued)
    assert queued.cancel()
    exc = f2.exception(30)
    assert isinstance(exc, CancelledError)
    blocker.result(30)
    assert not mark.exists()


@pytest.mark.timeout(40)
def test_cancelling_the_chained_call_leaves_its_input_alone(pair, tmp_path):
    a, b = pair
    mark = tmp_path / "called"
    base = _parent_ledger_settles(0, within=0.5)
    fa = a.submit(cf.slow, 0.4, np.full(2 * MiB, 9, np.uint8))
    fb = b.submit(cf.called, str(mark), fa)
    assert fb.cancel() and fb.cancelled()
    assert fa.result(30)[0] == 9 and not fa.cancelled()
    assert b.submit(cf.identity, 1).result(30) == 1
    assert not mark.exists()
    del fa, fb
    assert _parent_ledger_settles(base) == base


@pytest.mark.timeout(40)
def test_shutdown_cancel_futures_cancels_waiting_chained_calls(pair, tmp_path):
    a, b = pair
    mark = tmp_path / "called"
    fa = a.submit(cf.slow, 0.5, np.full(2 * MiB, 1, np.uint8))
    fb = b.submit(cf.called, str(mark), fa)
    b.shutdown(wait=True, cancel_futures=True)
    assert fb.cancelled()
    assert fa.result(30)[0] == 1              # the input is left alone
    with pytest.raises(RuntimeError):
        b.submit(cf.identity, fa)
    assert not mark.exists()


@pytest.mark.timeout(40)
def test_shutdown_waits_for_waiting_chained_calls(pair):
    a, b = pair
    fa = a.submit(cf.slow, 0.5, np.full(2 * MiB, 2, np.uint8))
    fb = b.submit(cf.summary, fa)
    b.shutdown(wait=True)                     # like a queued call: it runs first
    assert fb.result(0)["sum"] == 2 * 2 * MiB
    # shutdown(wait=False) with a waiting call: it still runs, then the worker goes.
    c = IsolatedExecutor(name="chain-c")
    try:
        fa2 = a.submit(cf.slow, 0.3, np.full(MiB, 3, np.uint8))
        fc = c.submit(cf.summary, fa2)
        c.shutdown(wait=False)
        assert fc.result(30)["first"] == 3
    finally:
        c.shutdown(wait=True)


# -- crashes ------------------------------------------------------------------------------------
@pytest.mark.timeout(40)
def test_producer_killed_after_its_result_the_consumer_still_gets_it(pair):
    """memfd segments outlive their creator: the parent holds the fd, not a name."""
    a, b = pair
    base = _parent_ledger_settles(0, within=0.5)
    st0 = _stats()
    fa = a.submit(cf.make, 16 * MiB, 4)
    assert fa in wait([fa], 30).done           # exception() would decode fa here
    pid = a.worker_pids()[0]
    os.kill(pid, signal.SIGKILL)
    _wait_dead(a, pid)
    fb = b.submit(cf.summary, fa)
    assert fb.result(30)["sum"] == 4 * 16 * MiB
    fc = b.submit(cf.add, fa, 1)              # and again, into a new result
    assert fc.result(30)[0] == 5              # (materialises fc, not fa)
    assert _stats()["maps"] == st0["maps"] + 1
    assert fa.result()[-1] == 4               # materialising fa still works
    # The executor replaces its worker; the dead one's memory goes with the futures.
    assert a.submit(cf.identity, 3).result(30) == 3
    del fa, fb, fc
    assert _parent_ledger_settles(base) == base


@pytest.mark.timeout(40)
def test_producer_killed_while_running_fails_the_chained_call(pair, tmp_path):
    a, b = pair
    mark = tmp_path / "called"
    fa = a.submit(cf.slow, 30)
    time.sleep(0.3)
    fb = b.submit(cf.called, str(mark), fa)
    pid = a.worker_pids()[0]
    os.kill(pid, signal.SIGKILL)
    exc = fb.exception(30)
    assert isinstance(fa.exception(), WorkerCrashed)
    assert exc is not None and exc.__cause__ is fa.exception()
    assert "died" in str(exc)
    assert not mark.exists()


@pytest.mark.timeout(40)
def test_consumer_killed_mid_call_keeps_the_input_usable(pair):
    a, b = pair
    base = _parent_ledger_settles(0, within=0.5)
    fa = a.submit(cf.make, 8 * MiB, 2)
    fb = b.submit(cf.slow, 30, fa)
    time.sleep(0.5)
    pid = b.worker_pids()[0]
    os.kill(pid, signal.SIGKILL)
    assert isinstance(fb.exception(30), WorkerCrashed)
    # The dead consumer's lease is settled; the input still forwards and decodes.
    assert b.submit(cf.summary, fa).result(30)["sum"] == 2 * 8 * MiB
    assert fa.result()[0] == 2
    del fa, fb
    assert _parent_ledger_settles(base) == base


# -- memory -------------------------------------------------------------------------------------
@pytest.mark.timeout(40)
def test_intermediate_memory_released_when_dropped_and_consumed(pair):
    """Dropping fa while the consumer still runs must not free the consumer's data;
    once both are done, every ledger returns to its baseline."""
    a, b = pair
    base_p = _parent_ledger_settles(0, within=0.5)
    base_a = _worker_ledger_settles(a, 10**9)
    base_b = _worker_ledger_settles(b, 10**9)
    fa = a.submit(cf.make, 8 * MiB, 1)
    fb = b.submit(cf.slow, 0.3)               # keeps b busy: the chained call queues
    fc = b.submit(cf.add, fa, 1)
    del fa                                    # the caller lets go before fc even ran
    gc.collect()
    time.sleep(0.1)
    assert fc.result(30)[0] == 2 and fc.result()[-1] == 2
    fb.result(30)
    # Several rounds: nothing accumulates.
    for i in range(3):
        x = a.submit(cf.make, 4 * MiB, i)
        y = b.submit(cf.add, x, 1)
        z = a.submit(cf.summary, y)
        assert z.result(30)["first"] == i + 1
        del x, y, z
    del fb, fc
    assert _parent_ledger_settles(base_p) == base_p
    assert _worker_ledger_settles(a, base_a) == base_a
    assert _worker_ledger_settles(b, base_b) == base_b


@pytest.mark.timeout(40)
def test_concurrent_result_and_forwarding(pair):
    """``fa.result()`` in one thread while ``fa`` is forwarded by another: both see the
    data (the forwarder holds the blocks while it lends them)."""
    a, b = pair
    for i in range(15):
        fa = a.submit(cf.make, MiB, i)
        wait([fa], 30)                         # done, not decoded (exception() decodes)
        seen = []
        t = threading.Thread(target=lambda f=fa: seen.append(int(f.result()[0])))
        t.start()
        fb = b.submit(cf.summary, fa)
        t.join(30)
        del fa
        gc.collect()
        assert fb.result(30)["first"] == i and seen == [i]


@pytest.mark.timeout(40)
def test_chain_memory_freed_without_the_cyclic_gc(pair):
    """Dropping fa frees its blocks by reference counting alone: the waiting-call
    callback that stays in fa's done-callbacks must not keep fa reachable."""
    a, b = pair
    base = _parent_ledger_settles(0, within=0.5)
    gc.collect()
    gc.disable()
    try:
        a.submit(cf.slow, 0.2)                 # fa surely is not done when fb is submitted
        fa = a.submit(cf.make, 4 * MiB, 1)
        fb = b.submit(cf.summary, fa)          # waits for fa: callback registered
        assert not fa.done()
        fc = b.submit(cf.summary, fa)
        assert fb.result(30)["first"] == 1 and fc.result(30)["first"] == 1
        del fa, fb, fc
        deadline = time.monotonic() + 3
        while len(lifetime.LEDGER) > base and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(lifetime.LEDGER) == base, "fa's blocks are only freed by the cyclic GC"
    finally:
        gc.enable()


@pytest.mark.timeout(40)
def test_more_blocks_than_one_sendmsg_takes_travel_both_ways_and_through_chains(pair):
    """A message may refer to any number of blocks: their fds cross in batches of at most
    MAX_FDS per sendmsg.  It used to fail past 250 (PicklingFailed), e.g. a model of 256
    weight tensors, each moved into a segment of its own."""
    from comfy_env.ipc.transport import MAX_FDS

    a, b = pair
    n = MAX_FDS + 50
    base_p = _parent_ledger_settles(0, within=0.5)
    base_a = _worker_ledger_settles(a, 10**9)
    fills = [("arr", i % 256, 70000) for i in range(n)]
    many = a.submit(cf.make_many, n, 70000)                 # worker -> parent: n fds
    assert b.submit(cf.combine, many).result(30)["args"] == [fills]   # forwarded undecoded
    held = many.result(30)                                  # decoded in the parent
    assert [int(x[0]) for x in held] == [f[1] for f in fills]
    assert b.submit(cf.combine, *held).result(30)["args"] == fills    # parent -> worker
    fs = [a.submit(cf.make, 70000, i % 256) for i in range(n)]         # one block each
    assert b.submit(cf.combine, fs).result(30)["args"] == [fills]
    del many, held, fs
    gc.collect()
    assert _parent_ledger_settles(base_p) == base_p
    assert _worker_ledger_settles(a, base_a) == base_a


@pytest.mark.timeout(40)
def test_more_blocks_than_the_receiver_can_open_fail_cleanly_and_leak_nothing(pair, monkeypatch):
    """More fds than the receiving process could open (its RLIMIT_NOFILE): a clear error
    before anything is sent, either way, and the refused message's lends are undone (they
    used to leak in the parent and the producer)."""
    from comfy_env import PicklingFailed
    from comfy_env.ipc import transport

    a, b = pair
    n = transport.MAX_FDS + 5
    base_p = _parent_ledger_settles(0, within=0.5)
    base_a = _worker_ledger_settles(a, 10**9)
    fs = [a.submit(cf.make, 70000, 1) for _ in range(n)]   # one segment each
    wait(fs)
    monkeypatch.setattr(transport, "fd_room", lambda: n - 1)
    exc = b.submit(cf.combine, fs).exception(30)
    assert isinstance(exc, PicklingFailed), repr(exc)
    assert f"span {n} shared blocks" in str(exc) and "RLIMIT_NOFILE" in str(exc), str(exc)
    monkeypatch.undo()
    assert b.submit(cf.combine, fs[:10]).result(30)["args"][0][0] == ("arr", 1, 70000)
    # The other way: a worker's result with too many blocks for the parent.
    exc = a.submit(cf.make_many, n, 70000, fd_room=n - 1).exception(30)
    assert isinstance(exc, PicklingFailed) and "RLIMIT_NOFILE" in str(exc), repr(exc)
    del fs, exc
    gc.collect()
    assert _parent_ledger_settles(base_p) == base_p
    assert _worker_ledger_settles(a, base_a) == base_a


@pytest.mark.timeout(40)
def test_unpicklable_function_with_a_chained_input_names_the_function(pair):
    from comfy_env import PicklingFailed

    a, b = pair
    lock = threading.Lock()
    fa = a.submit(cf.make, MiB, 1)
    exc = b.submit(lambda x: lock, fa).exception(30)
    assert isinstance(exc, PicklingFailed)
    assert "function" in str(exc) and "IsolatedFuture" not in str(exc), str(exc)
    assert fa.result()[0] == 1


@pytest.mark.timeout(40)
def test_views_bounce_between_workers_and_back_to_the_owner(pair):
    """B and A return the very array they received (a view of A's segment): the lease
    tree absorbs the redundant leases; the data stays put and everything is released."""
    a, b = pair
    base_p = _parent_ledger_settles(0, within=0.5)
    base_a = _worker_ledger_settles(a, 10**9)
    base_b = _worker_ledger_settles(b, 10**9)
    st0 = _stats()
    fa = a.submit(cf.make, 4 * MiB, 6)
    x = fa
    for i in range(6):
        x = (a if i % 2 else b).submit(cf.identity, x)
    back_home = a.submit(cf.summary, fa)       # to the worker that owns the block
    assert a.submit(cf.summary, x).result(30)["sum"] == 6 * 4 * MiB
    assert back_home.result(30)["sum"] == 6 * 4 * MiB
    assert _stats() == st0
    del fa, x, back_home
    assert _parent_ledger_settles(base_p) == base_p
    assert _worker_ledger_settles(a, base_a) == base_a
    assert _worker_ledger_settles(b, base_b) == base_b


@pytest.mark.timeout(40)
def test_shutdown_waits_for_a_chained_call_being_handed_to_its_worker(pair, monkeypatch):
    """A call taken from the queue and still being encoded is neither queued nor a
    worker's yet: shutdown(wait=True) must not ask the worker to exit meanwhile."""
    import time
    from comfy_env.executor import executor as ex_mod
    a, b = pair
    real = ex_mod._Pool._encode
    slowed = []

    def slow_encode(self, item, worker):
        if item.fn is cf.summary:
            slowed.append(1)
            time.sleep(0.3)             # the window: popped from the queue, not sent yet
        return real(self, item, worker)

    monkeypatch.setattr(ex_mod._Pool, "_encode", slow_encode)
    fa = a.submit(cf.slow, 0.2, np.full(MiB, 5, np.uint8))
    fb = b.submit(cf.summary, fa)
    b.shutdown(wait=True)
    assert slowed and fb.result(0)["first"] == 5


@pytest.mark.timeout(60)
def test_a_chained_failure_is_a_copy_of_the_inputs_exception_type_and_attributes(tmp_path):
    """Not RuntimeError for an exception whose __init__ takes other arguments, nor an
    OSError without its filename: type, args, attributes and notes, own traceback."""
    missing = str(tmp_path / "nope.txt")
    with IsolatedExecutor(name="A") as a, IsolatedExecutor(name="B") as b:
        fa = a.submit(cf.raise_coded, 7, "disk full")
        fb = b.submit(cf.identity, fa)
        ea, eb = fa.exception(timeout=30), fb.exception(timeout=30)
        assert type(eb) is cf.Coded and eb is not ea and eb.__cause__ is ea
        assert (eb.code, eb.msg, eb.args) == (7, "disk full", ("7: disk full",))
        assert getattr(eb, "__notes__", None) == getattr(ea, "__notes__", None)
        fo = b.submit(cf.identity, a.submit(cf.open_missing, missing))
        eo = fo.exception(timeout=30)
        assert type(eo) is FileNotFoundError and (eo.errno, eo.filename) == (2, missing)
        assert missing in str(eo)
