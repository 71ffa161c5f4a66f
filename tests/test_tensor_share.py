"""Torch CPU tensors shared in place: the first send moves the storage into shared memory
(``Tensor.share_memory_()`` semantics), later sends copy nothing.

Costs are counted (copies, moved bytes, arena segments), never timed.
"""
from __future__ import annotations

import gc

import numpy as np
import pytest

import _dataplane_funcs as F
from comfy_env import IsolatedExecutor
from comfy_env.ipc import arrays, lifetime, shm

torch = pytest.importorskip("torch")

N = 1 << 20                    # 4 MiB of float32: above the move threshold


@pytest.fixture(scope="module")
def ex():
    with IsolatedExecutor(max_workers=1, name="tshare") as e:
        e.submit(F.warm).result(timeout=60)
        yield e


@pytest.fixture(scope="module")
def ex_off():
    with IsolatedExecutor(max_workers=1, name="tshare-off", share_tensors_in_place=False) as e:
        e.submit(F.warm).result(timeout=60)
        yield e


def in_segment(t):
    return shm.find_segment(t.data_ptr(), 1) is not None


def counts():
    return dict(shm.STATS)


def delta(before):
    now = shm.STATS
    return {k: now.get(k, 0) - before.get(k, 0) for k in ("copies", "copied_bytes", "moves", "moved_bytes")}


@pytest.mark.timeout(60)
def test_the_same_tensor_sent_three_times_is_moved_once_then_never_copied(ex):
    t = torch.arange(N, dtype=torch.float32)
    ident, expect = id(t), t.clone()
    assert not in_segment(t)
    before = counts()
    backs = [ex.submit(F.echo, t).result(timeout=30) for _ in range(3)]
    d = delta(before)
    assert d == {"copies": 0, "copied_bytes": 0, "moves": 1, "moved_bytes": N * 4}
    assert id(t) == ident and torch.equal(t, expect) and in_segment(t)
    # The results are the caller's memory itself: nothing was copied back either.
    for b in backs:
        assert b.data_ptr() == t.data_ptr() and torch.equal(b, expect)


@pytest.mark.timeout(60)
def test_a_view_moves_its_whole_storage_and_every_view_follows(ex):
    base = torch.arange(N, dtype=torch.float64)
    before_view = base[10:]                       # made before the move
    t = base[N // 4:]
    before = counts()
    back = ex.submit(F.echo, t).result(timeout=30)
    assert delta(before)["moves"] == 1 and delta(before)["moved_bytes"] == N * 8
    assert in_segment(base) and in_segment(before_view)
    assert back.storage_offset() == N // 4 and torch.equal(back, t)
    # Another view of the same storage, and the base: no copy, no move.
    before = counts()
    b2 = ex.submit(F.echo, before_view).result(timeout=30)
    b3 = ex.submit(F.echo, base.t() if base.dim() == 2 else base).result(timeout=30)
    assert delta(before) == {"copies": 0, "copied_bytes": 0, "moves": 0, "moved_bytes": 0}
    assert torch.equal(b2, torch.arange(10, N, dtype=torch.float64))
    assert b3.data_ptr() == base.data_ptr()


@pytest.mark.timeout(60)
def test_requires_grad_leaves_and_parameters_are_moved_and_stay_leaves(ex):
    g = torch.ones(N, requires_grad=True)
    p = torch.nn.Parameter(torch.full((N,), 2.0))
    before = counts()
    gb, pb = ex.submit(F.echo_many, g, p).result(timeout=30)[0]
    assert delta(before)["moves"] == 2 and delta(before)["copies"] == 0
    assert in_segment(g) and in_segment(p)
    assert g.is_leaf and g.requires_grad and type(p) is torch.nn.Parameter
    assert gb.requires_grad and type(pb) is torch.nn.Parameter
    (g * p).sum().backward()            # autograd still works on the moved storage
    assert torch.equal(g.grad, torch.full((N,), 2.0)) and torch.equal(p.grad, torch.ones(N))


@pytest.mark.timeout(60)
def test_tensors_over_numpy_memory_are_copied_not_moved(ex):
    a = np.arange(N, dtype=np.float32)
    t = torch.from_numpy(a)
    before = counts()
    for _ in range(2):
        assert torch.equal(ex.submit(F.echo, t).result(timeout=30), t)
    d = delta(before)
    assert d["moves"] == 0 and d["copies"] == 2
    # numpy and torch still share their memory.
    assert t.data_ptr() == a.ctypes.data and not in_segment(t)
    a[0] = 7
    assert t[0].item() == 7


@pytest.mark.timeout(60)
def test_small_tensors_are_copied_not_moved(ex):
    t = torch.arange(arrays.MOVE_MIN_BYTES // 4 - 1, dtype=torch.float32)   # just below
    assert t.numel() * 4 >= arrays.INLINE_BYTES
    before = counts()
    ex.submit(F.echo, t).result(timeout=30)
    assert delta(before)["moves"] == 0 and not in_segment(t)


@pytest.mark.timeout(60)
def test_a_sparse_view_of_a_much_bigger_storage_is_copied_not_moved(ex):
    base = torch.zeros(64 * N, dtype=torch.uint8)            # 64 MiB
    v = base[:N]                                            # 1 MiB: 1/64 of the storage
    before = counts()
    ex.submit(F.echo, v).result(timeout=30)
    assert delta(before)["moves"] == 0 and delta(before)["copies"] == 1
    assert not in_segment(base)


@pytest.mark.timeout(60)
def test_a_tensor_in_torchs_shared_memory_stays_there(ex):
    """``share_memory_()`` (or a torch.multiprocessing queue) put the storage in torch's
    shared memory, which other processes may map: moving it would cut them off."""
    import mmap
    import struct

    t = torch.zeros(N)
    t.share_memory_()
    ptr = t.data_ptr()
    before = counts()
    for _ in range(2):
        assert torch.equal(ex.submit(F.echo, t).result(timeout=30), t)
    ex.submit(F.add_one_inplace, t).result(timeout=30)
    d = delta(before)
    assert d["moves"] == 0 and d["copies"] == 3        # sent as unmovable storages are
    assert t.data_ptr() == ptr and t.is_shared() and not in_segment(t)
    assert t[0].item() == 0                            # the worker wrote into its copy
    if torch.multiprocessing.get_sharing_strategy() == "file_descriptor":
        # Another mapping of torch's shared memory (what a torch.multiprocessing child
        # has) still sees this process's writes.
        fd, size = t.untyped_storage()._share_fd_cpu_()[:2]
        with mmap.mmap(fd, size) as other:
            t[1] = 42.0
            assert struct.unpack_from("f", other, 4)[0] == 42.0


@pytest.mark.timeout(60)
def test_small_views_of_a_moved_tensor_go_by_descriptor(ex):
    """A view below the inline threshold of a storage that lives in shared memory is sent
    as a descriptor, like a big one: the worker's writes reach the caller's tensor."""
    w = torch.zeros(N)
    ex.submit(F.echo, w).result(timeout=30)            # moves it
    assert in_segment(w)
    before = counts()
    for v in (w[:1000], w[5:6], w[10:20].view(2, 5).t(), w[::4096]):
        assert v.numel() * 4 < arrays.INLINE_BYTES
        assert ex.submit(F.add_one_inplace, v).result(timeout=30) is None
        back = ex.submit(F.echo, v).result(timeout=30)
        assert back.data_ptr() == v.data_ptr() and back.stride() == v.stride()
    assert delta(before) == {"copies": 0, "copied_bytes": 0, "moves": 0, "moved_bytes": 0}
    # Each element in two of the views got two writes, one in one view one write.
    assert [w[i].item() for i in (0, 5, 12, 999, 1000, 4096)] == [2, 2, 2, 1, 0, 1]


@pytest.mark.timeout(60)
def test_option_off_copies_every_call_and_leaves_the_tensor_alone(ex_off):
    t = torch.arange(N, dtype=torch.float32)
    ptr = t.data_ptr()
    before = counts()
    for _ in range(3):
        ex_off.submit(F.echo, t).result(timeout=30)
    d = delta(before)
    assert d["moves"] == 0 and d["copies"] == 3 and d["copied_bytes"] == 3 * N * 4
    assert t.data_ptr() == ptr and not in_segment(t)
    # The worker wrote into a private copy.
    ex_off.submit(F.add_one_inplace, t).result(timeout=30)
    assert t[0].item() == 0


@pytest.mark.timeout(60)
def test_a_worker_writing_into_a_shared_tensor_writes_into_the_callers(ex):
    t = torch.zeros(N)
    ex.submit(F.add_one_inplace, t).result(timeout=30)
    assert t[0].item() == 1 and in_segment(t)


def test_the_option_must_be_a_bool():
    with pytest.raises(TypeError, match="share_tensors_in_place must be True or False"):
        IsolatedExecutor(share_tensors_in_place="no")


def _record_of(t):
    seg = shm.find_segment(t.data_ptr(), 1)
    return lifetime.LEDGER.get(seg.key) if seg is not None else None


@pytest.mark.timeout(60)
def test_dropping_a_moved_tensor_gives_its_block_back(ex):
    t = torch.arange(N, dtype=torch.float32)
    ex.submit(F.echo, t).result(timeout=30)
    rec = _record_of(t)
    assert rec is not None and rec.owned
    key = rec.key
    free_before = shm.ARENA.free_bytes
    del t, rec
    F.settle(lambda: lifetime.LEDGER.get(key) is None or lifetime.LEDGER.get(key).users == 0)
    # Back in the arena's free list (reused by the next copy), not leaked.
    assert shm.ARENA.free_bytes > free_before


@pytest.mark.timeout(60)
def test_the_arenas_trim_never_frees_a_live_tensors_storage(ex):
    t = torch.arange(N, dtype=torch.float32)
    ex.submit(F.echo, t).result(timeout=30)
    gc.collect()
    shm.ARENA.trim(0)
    assert in_segment(t) and _record_of(t).users >= 1
    assert torch.equal(t, torch.arange(N, dtype=torch.float32))
    t += 1                                   # still writable, still ours
    before = counts()
    back = ex.submit(F.echo, t).result(timeout=30)
    assert delta(before)["copies"] == 0 and back[5].item() == 6


@pytest.mark.timeout(60)
def test_a_workers_results_do_not_alias_its_own_tensors(ex):
    r = ex.submit(F.cached_tensor, N).result(timeout=30)
    r += 100                                  # the caller writes into what it got
    assert ex.submit(F.cached_tensor_head).result(timeout=30) == 0.0


@pytest.mark.timeout(60)
def test_a_moved_storage_can_shrink_but_not_grow(ex):
    t = torch.arange(N, dtype=torch.float32)
    ex.submit(F.echo, t).result(timeout=30)
    assert in_segment(t)
    t.resize_(10)
    assert torch.equal(t, torch.arange(10, dtype=torch.float32))
    with pytest.raises(RuntimeError, match="not resizable"):
        t.resize_(2 * N)


@pytest.mark.timeout(60)
def test_two_threads_sending_one_tensor_move_it_once(ex):
    import threading

    t = torch.arange(N, dtype=torch.float32)
    before = counts()
    barrier = threading.Barrier(4)
    out = []

    def send():
        barrier.wait()
        out.append(ex.submit(F.echo, t).result(timeout=30))

    threads = [threading.Thread(target=send) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert delta(before)["moves"] == 1 and delta(before)["copies"] == 0
    assert all(torch.equal(o, torch.arange(N, dtype=torch.float32)) for o in out)


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.timeout(60)
def test_a_moved_tensors_old_memory_is_freed_on_the_releaser_not_the_senders_thread(
        ex, monkeypatch):
    import sys
    import threading

    freed = []
    real = arrays._free

    def spy(box):
        # The box holds the only reference (getrefcount adds its own): emptying it is
        # what frees the old memory, so this records where the free happens.
        freed.append((threading.current_thread().name, box[0].nbytes(),
                      sys.getrefcount(box[0])))
        real(box)

    monkeypatch.setattr(arrays, "_free", spy)
    t = torch.arange(N, dtype=torch.float32)
    ex.submit(F.echo, t).result(timeout=30)
    arrays._RELEASER.join()
    assert in_segment(t)
    assert freed == [("comfy_env-releaser", 4 * N, 2)]
    assert threading.current_thread().name != "comfy_env-releaser"


@pytest.mark.timeout(120)
def test_many_new_tensors_leak_neither_memory_nor_arena_blocks(ex):
    big = 64 << 20                  # over glibc's mmap threshold: a free is an munmap
    ex.submit(F.echo, torch.ones(big, dtype=torch.uint8)).result(timeout=30)
    arrays._RELEASER.join()
    gc.collect()
    rss, users = _rss(), sum(r.users for r in list(lifetime.LEDGER._records.values()))
    before = counts()
    for i in range(16):
        t = torch.full((big,), i, dtype=torch.uint8)
        assert ex.submit(F.echo, t).result(timeout=30)[7].item() == i
        del t
    arrays._RELEASER.join()
    gc.collect()
    assert delta(before)["moves"] == 16
    # 16 x 64 MiB were allocated and moved; neither the old memory nor the blocks stay.
    assert _rss() - rss < 3 * big
    F.settle(lambda: sum(r.users for r in list(lifetime.LEDGER._records.values())) <= users)


@pytest.mark.timeout(120)
def test_freeing_heap_allocations_of_moved_tensors_keeps_the_heap_sound(ex):
    # After big frees glibc serves multi-MiB allocations from its heap, not mmap: the
    # releaser gives their pages back before free() writes its bookkeeping there.
    keep = []
    for i in range(24):
        n = (1 << 20) + (i % 5) * 777_777
        t = torch.full((n,), i % 251, dtype=torch.uint8)
        assert ex.submit(F.echo, t).result(timeout=30)[n - 1].item() == i % 251
        if i % 3 == 0:
            keep.append((i, t))
        del t
        junk = [torch.full((n // 2,), 7, dtype=torch.uint8) for _ in range(2)]
        assert all(int(j.sum()) == 7 * (n // 2) for j in junk)
    arrays._RELEASER.join()
    assert all(int(t[0]) == i % 251 and int(t[-1]) == i % 251 for i, t in keep)


EXIT_SCRIPT = r'''
import atexit, sys, torch
sys.path.insert(0, sys.argv[1])
import _dataplane_funcs as F
from comfy_env import IsolatedExecutor
from comfy_env.ipc import arrays

ex = IsolatedExecutor(max_workers=1, name="exit")

def at_exit():
    # Late in exit a running thread may be frozen and none may start: still moved and freed.
    t = torch.full((8 << 20,), 3, dtype=torch.uint8)
    ok = arrays.move_storage(t.untyped_storage())
    print("atexit", ok, arrays.shm.find_segment(t.data_ptr(), 1) is not None, t[5].item(),
          flush=True)

atexit.register(at_exit)
fs = [ex.submit(F.echo, torch.full((64 << 20,), i, dtype=torch.uint8)) for i in range(4)]
print("results", [f.result(timeout=60)[7].item() for f in fs], flush=True)
# The script ends now, the last frees possibly still pending on the releaser.
'''


@pytest.mark.timeout(120)
def test_a_script_that_exits_with_frees_pending_or_sends_at_exit_ends_cleanly(tmp_path):
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    src = os.path.join(os.path.dirname(here), "src")
    script = tmp_path / "exit_script.py"
    script.write_text(EXIT_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, str(script), here], capture_output=True, text=True,
                       timeout=100, env=env)
    assert p.returncode == 0, p.stderr
    assert "results [0, 1, 2, 3]" in p.stdout and "atexit True True 3" in p.stdout, (
        p.stdout, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
