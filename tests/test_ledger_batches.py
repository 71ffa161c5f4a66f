"""CPU-only tests of the ledger's batched paths and of deferred CUDA frees (driver faked):
frees complete before releases leave, all-or-nothing lease taking, one stream synchronise
per batch of freed imports, and no import of a pointer whose free is still pending."""
import threading
import time

import pytest

from comfy_env.ipc import codec, lifetime, planes  # noqa: F401
from comfy_env.ipc.lifetime import Ledger, Link

pytestmark = pytest.mark.timeout(30)


class _Log:
    def __init__(self, uid="up"):
        self.events = []
        self.link = Link(lambda msgs: self.events.extend(("sent",) + tuple(m) for m in msgs), name=uid)
        self.link.uid = uid

    def released(self):
        """Keys released so far (links post through the process's ledger flusher)."""
        time.sleep(0.05)
        lifetime.LEDGER.drain()
        msgs = [e[1:] for e in self.events if e[0] == "sent"] + self.link.take_posts()
        return sorted(m[1] for m in msgs if m[0] == "release")


def _remote(ledger, log, key, on_zero):
    rec = ledger.accept_lease(key, log.link, lambda: object(), on_zero)
    ledger.hold(rec)
    return rec


def test_free_many_runs_each_finisher_once_after_every_free_and_before_any_release():
    ledger, log = Ledger(), _Log()

    def finish():
        log.events.append(("finish",))
        # nothing may have been released yet
        assert not [e for e in log.events if e[0] == "sent"] and not log.link._posts

    def on_zero(rec):
        log.events.append(("free", rec.key))
        return finish                       # the same finisher for the whole batch

    recs = [_remote(ledger, log, ("p", "up", i), on_zero) for i in range(3)]
    ledger.unhold_all(recs)
    assert log.released() == [("p", "up", i) for i in range(3)]
    kinds = [e[0] for e in log.events]
    assert kinds[:4] == ["free", "free", "free", "finish"] and kinds.count("finish") == 1


def test_finishers_run_even_when_a_later_free_raises():
    ledger, log = Ledger(), _Log()
    finished = []

    def on_zero(rec):
        if rec.key[2] == 1:
            raise RuntimeError("this plane failed to free")
        return lambda: finished.append(rec.key)

    recs = [_remote(ledger, log, ("p", "up", i), on_zero) for i in range(2)]
    with pytest.raises(RuntimeError, match="failed to free"):
        ledger.unhold_all(recs)
    assert finished == [("p", "up", 0)]      # the free started before the error completed


def test_a_free_without_a_finisher_releases_at_once():
    ledger, log = Ledger(), _Log()
    rec = _remote(ledger, log, ("p", "up", 1), lambda rec: None)
    ledger.unhold(rec)
    assert log.released() == [("p", "up", 1)]


def test_unhold_all_runs_idle_hooks_and_keeps_records_still_used():
    ledger, log = Ledger(), _Log()
    idle = []
    a = _remote(ledger, log, ("p", "up", 1), None)
    b = _remote(ledger, log, ("p", "up", 2), None)
    ledger.hold(b)                          # b: a cache's hold plus one user
    b.on_idle = idle.append
    ledger.unhold_all([a, b])
    assert ledger.get(a.key) is None and ledger.get(b.key) is b and idle == [b]


class _BadPlane(codec.Plane):
    name = "test-bad-open"
    types = ()

    def open_remote(self, key, meta, fd):
        if meta == "bad":
            raise ValueError("cannot open this block")
        return object()


def test_accept_part_leases_is_all_or_nothing():
    codec.register_plane(_BadPlane())
    log = _Log("w")
    link = log.link
    refs = [("test-bad-open", ("b", "w", 1), -1, "ok"), ("test-bad-open", ("b", "w", 2), -1, "bad"),
            ("test-bad-open", ("b", "w", 3), -1, "ok")]
    frame = codec.Frame.__new__(codec.Frame)
    frame.envelope, frame.parts, frame.fds = None, [codec.Part(b"", refs)], []
    with pytest.raises(ValueError, match="cannot open"):
        codec.accept_part_leases(frame, 0, link)
    # the lease taken (1) is given back as its record goes, the ones not reached (2, 3) at once
    assert log.released() == [("b", "w", 1), ("b", "w", 2), ("b", "w", 3)]
    assert all(lifetime.LEDGER.get(r[1]) is None for r in refs)


# -- deferred frees of imported pool pointers (the driver faked) -------------------------------
@pytest.fixture
def imports(monkeypatch):
    from comfy_env.ipc.cuda import devices, pools
    from comfy_env.ipc.cuda import driver as D
    calls = []
    next_ptr = iter(range(1 << 20, 1 << 30, 1 << 20))

    def call(name, *args, detail=""):
        calls.append((name, threading.get_ident()))
        if name == "cuMemPoolImportPointer":
            args[0]._obj.value = next(next_ptr)

    monkeypatch.setattr(D, "call", call)
    monkeypatch.setattr(devices, "use", lambda ordinal: None)
    pi = pools.PoolImports()
    p = pools.ImportedPool(("owner", 1), -1, "u" * 32)
    p.handle, p.ordinal = 1, 0          # "imported" already
    pi._pools[p.key] = p
    return pi, calls


def test_a_batch_of_deferred_frees_costs_one_fence_per_read_stream_and_one_synchronise(imports):
    pi, calls = imports
    exports = [bytes([i]) * 64 for i in range(4)]
    for e in exports:
        pi.import_pointer(("owner", 1), e)
    assert all(pi.release_pointer(("owner", 1), e, stream=7 if i < 3 else 9, defer=True)
               for i, e in enumerate(exports))
    names = [c for c, _ in calls]
    assert names.count("cuStreamSynchronize") == 0 and names.count("cuMemFreeAsync") == 4
    # the frees go to the unmap stream, after a fence on each read stream (7 and 9)
    assert names.count("cuEventRecord") == 2 and names.count("cuStreamWaitEvent") == 2
    assert names.index("cuStreamWaitEvent") < names.index("cuMemFreeAsync")
    assert pi._pools[("owner", 1)].live == 4           # not counted free before the sync
    pi.finish()
    assert [c for c, _ in calls].count("cuStreamSynchronize") == 1   # the unmap stream, once
    assert pi._pools[("owner", 1)].live == 0 and not pi._freeing
    # the next batch fences again
    pi.import_pointer(("owner", 1), exports[0])
    pi.release_pointer(("owner", 1), exports[0], stream=7, defer=True)
    assert [c for c, _ in calls].count("cuEventRecord") == 3
    pi.finish()


def test_an_import_waits_for_a_pending_free_of_the_same_pointer(imports):
    pi, calls = imports
    e = b"x" * 64
    pi.import_pointer(("owner", 1), e)
    assert pi.release_pointer(("owner", 1), e, stream=7, defer=True)
    # Same thread: the import completes our own deferred free first (one synchronise).
    pi.import_pointer(("owner", 1), e)
    names = [c for c, _ in calls]
    assert names.index("cuStreamSynchronize") < len(names) - 1 - names[::-1].index("cuMemPoolImportPointer")
    # Another thread's pending free: the import waits until it completes.
    assert pi.release_pointer(("owner", 1), e, stream=7, defer=True)
    got = []
    th = threading.Thread(target=lambda: got.append(pi.import_pointer(("owner", 1), e)))
    th.start()
    th.join(0.2)
    assert th.is_alive() and not got                   # blocked on our pending free
    pi.finish()
    th.join(5)
    assert got and not th.is_alive()


def test_a_release_without_defer_synchronises_before_it_returns(imports):
    pi, calls = imports
    e = b"y" * 64
    pi.import_pointer(("owner", 1), e)
    assert pi.release_pointer(("owner", 1), e, stream=3) is False
    assert [c for c, _ in calls][-2:] == ["cuMemFreeAsync", "cuStreamSynchronize"]
    assert not pi._freeing and pi._pools[("owner", 1)].live == 0


def test_leased_from_counts_the_records_held_through_each_link():
    ledger, a, b = Ledger(), _Log("a"), _Log("b")
    ra = [_remote(ledger, a, ("p", "a", i), lambda rec: None) for i in range(3)]
    rb = _remote(ledger, b, ("p", "b", 0), lambda rec: None)
    again = ledger.accept_lease(("p", "a", 0), a.link, object, None)     # a second lease, same record
    assert again is ra[0]
    redundant = ledger.accept_lease(("p", "a", 1), b.link, object, None)  # held through a already
    assert redundant is ra[1]
    assert (ledger.leased_from(a.link), ledger.leased_from(b.link)) == (3, 1)
    ledger.unhold(ra[0])
    assert ledger.leased_from(a.link) == 2
    ledger.unhold(ra[0])                      # a record already gone: counted once
    assert ledger.leased_from(a.link) == 2
    ledger.link_closed(a.link)
    assert (ledger.leased_from(a.link), ledger.leased_from(b.link)) == (0, 1)
    ledger.unhold_all(ra[1:])                 # records that outlived their link
    assert (ledger.leased_from(a.link), ledger.leased_from(b.link)) == (0, 1)
    ledger.unhold(rb)
    assert ledger.leased_from(b.link) == 0


def test_holders_dying_while_hushed_wake_no_flusher_and_drain_with_the_hush():
    """The worker hushes the ledger while a call's arguments die and drains inline right
    after: no wake-up of the flusher (a syscall and a thread switch per call), nothing
    left queued, and the next death wakes it as before."""
    ledger, log = Ledger(), _Log()
    freed = []

    class Keeper:
        pass

    def on_zero(rec):
        freed.append(rec.key)

    rec = ledger.accept_lease(("p", "up", 1), log.link, object, on_zero)
    rec2 = ledger.accept_lease(("p", "up", 2), log.link, object, on_zero)
    k, k2 = Keeper(), Keeper()
    ledger.holder(rec, k)
    ledger.holder(rec2, k2)
    ledger.hush()
    del k
    assert ledger._thread is None and not ledger._wake_pending, "a hushed death woke the flusher"
    assert freed == []
    ledger.drain_hushed()
    assert freed == [("p", "up", 1)] and not ledger._dirty
    del k2                                    # after the hush: the flusher drains it
    deadline = time.monotonic() + 5
    while freed != [("p", "up", 1), ("p", "up", 2)] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert freed == [("p", "up", 1), ("p", "up", 2)]
    assert ledger._thread is not None


def test_an_inline_drain_waits_for_the_flushers_drain_in_progress():
    """The executor drains inline before it sends a call (the worker before a result) so
    that releases go first.  When the flusher has already taken a dead holder and is
    still freeing it, the inline drain must wait for it: returning at once let the call
    overtake its release (a native worker then allocated a second segment)."""
    ledger, log = Ledger(), _Log()
    entered, go, freed = threading.Event(), threading.Event(), []

    class Keeper:
        pass

    def on_zero(rec):
        if threading.current_thread() is ledger._thread:
            entered.set()
            go.wait(5)
        freed.append(rec.key)

    rec = ledger.accept_lease(("p", "up", 1), log.link, object, on_zero)
    k = Keeper()
    ledger.holder(rec, k)
    del k                                     # wakes the flusher, which blocks in the free
    assert entered.wait(5), "the flusher never took the dead holder"
    seen = []

    def inline():
        ledger.drain()
        seen.append(list(freed))
    t = threading.Thread(target=inline)
    t.start()
    t.join(0.3)
    go.set()
    t.join(5)
    assert seen == [[("p", "up", 1)]], "the inline drain returned before the flusher's free"


def test_a_hushed_drain_sends_the_releases_it_frees_without_waking_the_flusher(monkeypatch):
    """The worker's drain after a call frees the arguments' blocks, which posts their
    releases: that drain sends them itself, so no wake-up of the flusher (a pipe write,
    a thread switch) per call."""
    ledger, log = lifetime.LEDGER, _Log()
    woke = []
    real = ledger._wake

    def wake():
        if not ledger._hushed:
            woke.append(1)
        real()
    monkeypatch.setattr(ledger, "_wake", wake)

    class Keeper:
        pass

    rec = ledger.accept_lease(("p", "hushed-release", 1), log.link, object, None)
    k = Keeper()
    ledger.holder(rec, k)
    ledger.hush()
    del k
    ledger.drain_hushed()
    assert [e[1:3] for e in log.events if e[0] == "sent"] == [("release", ("p", "hushed-release", 1))]
    assert woke == [], "the drain's own releases woke the flusher"
    assert not ledger._hushed


def test_requeued_messages_stay_queued_when_waking_the_flusher_fails(monkeypatch):
    """A worker whose result failed to encode puts the call's releases back for its next
    send.  The failure may be EMFILE, and the flusher's first wake-up (a new pipe) then
    fails too: the messages must stay queued and nothing raise (they were dropped)."""
    sent = []
    link = Link(sent.extend, "parent")

    def no_pipe(self, link):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(Ledger, "poke", no_pipe)
    msgs = [("release", i) for i in range(3)]
    link.requeue(msgs)
    assert link.take_posts() == msgs and not sent
    link.closed = True
    link.requeue(msgs)                      # a closed peer needs no releases
    assert link.take_posts() == []
