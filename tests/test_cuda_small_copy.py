"""CPU-only tests (torch's CPU build, the CUDA driver faked) of the worker's route for
small tensors and of the per-frame / per-batch CUDA bookkeeping:

* a small tensor sent for the first time is staged (one copy), sent again it goes zero
  copy; a bigger first-seen storage (up to ``COMFY_ENV_CUDA_FRESH_COPY_MIB``) is copied
  too, only the span of the view; ``COMFY_ENV_CUDA_SMALL_COPY_MIB=0`` turns it off;
* the owner asks peers to reclaim a pool block once its own tensor on it died;
* one interprocess event per frame and stream, reserved while encoding and recorded
  when the frame is built (after the copies) or aborted;
* recycled staging blocks: kept by size, the peer's "idle" reports batched (one event
  per stream, one message per peer), and each reported event waited on once per frame.
"""
import types

import pytest

torch = pytest.importorskip("torch")

from comfy_env.ipc import codec, lifetime, planes  # noqa: E402,F401
from comfy_env.ipc.cuda import devices, paths  # noqa: E402
from comfy_env.ipc.cuda import driver as D  # noqa: E402
from comfy_env.ipc.cuda.events import EventRing  # noqa: E402
from comfy_env.ipc.cuda.blocks import OwnedStaging, RemotePool  # noqa: E402
from comfy_env.ipc.cuda.layout import pool_meta, unpack, validate_meta  # noqa: E402
from comfy_env.ipc.cuda.paths import Capabilities, PeerVerdicts, choose  # noqa: E402
from comfy_env.ipc.cuda.plane import CudaPlane  # noqa: E402

from _cuda_fakes import (FakeStorage, FakeT, fake_torch_on_stream, ledger_records_dropped,  # noqa: E402
                        try_call_reader_busy)

pytestmark = pytest.mark.timeout(30)

MiB = 1 << 20
UUID = "0123456789abcdef0123456789abcdef"


class FakeGen:
    def __init__(self, name, log):
        self.key = (name * 16, 1)
        self.fd = -1
        self.log = log
        self._next = 1 << 36

    def alloc(self, nbytes, stream):
        self._next += 64 * MiB
        self.log.append(("alloc", nbytes))
        return self._next

    def export_pointer(self, ptr):
        self.log.append(("export", self.key[0][0], ptr))
        return b"e" * 64


class FakeRing:
    def __init__(self, log):
        self.log = log
        self.reserved = set()
        self.n = 0

    def _slot(self):
        self.n += 1
        return self.n, bytes([self.n % 256]) * 64

    def record(self, stream):
        slot, h = self._slot()
        self.log.append(("record", slot, stream))
        return slot, h

    def reserve(self):
        slot, h = self._slot()
        self.reserved.add(slot)
        self.log.append(("reserve", slot))
        return slot, h

    def record_reserved(self, slot, stream):
        self.reserved.discard(slot)
        self.log.append(("record_reserved", slot, stream))

    def __len__(self):
        return self.n


class FakeEvents:
    def __init__(self, log):
        self.log = log

    def wait(self, event, ordinal, stream):
        self.log.append(("wait", event, stream))
        return True


@pytest.fixture
def worker(monkeypatch):
    """A worker-role plane on a fake GPU 0 with an export heap; returns (plane, log, link, heap_gen)."""
    log = []

    def call(name, *args, detail=""):
        log.append((name,) + args[:1])

    monkeypatch.setattr(D, "call", call)
    monkeypatch.setattr(D, "try_call", try_call_reader_busy)
    monkeypatch.setattr(D, "address_range", lambda ptr: (log.append(("address_range", ptr)), (ptr, 2 * MiB))[1])
    monkeypatch.setattr(D, "pointer_pool", lambda ptr: 99)
    monkeypatch.setattr(D, "copy_batch", lambda dsts, srcs, sizes, stream, ordinal:
                        log.append(("copy_batch", len(dsts), stream)))
    monkeypatch.setattr(devices, "use", lambda o: None)
    monkeypatch.setattr(devices, "uuid_of", lambda o: UUID)
    monkeypatch.delenv("COMFY_ENV_CUDA_SMALL_COPY_MIB", raising=False)
    monkeypatch.delenv("COMFY_ENV_CUDA_FRESH_COPY_MIB", raising=False)
    pl = CudaPlane()
    pl.local.t()
    pl.local.torch = fake_torch_on_stream()
    pl.role = "worker"
    pl.local.probed[0] = Capabilities(driver=True, pools=True, vmm=True, events=True)
    heap_gen = FakeGen("h", log)
    pl.local.heap[0] = types.SimpleNamespace(old=[], ordinal=0, owner_of=lambda pool: heap_gen if pool == 99 else None)
    pl.local.staging[0] = types.SimpleNamespace(old=[], ordinal=0, current=FakeGen("s", log))
    pl.local.rings[0] = FakeRing(log)
    pl.local.events = FakeEvents(log)
    monkeypatch.setitem(codec._DISPATCH, FakeT, (pl,))
    link = lifetime.Link(lambda msgs: None, "parent")
    link.uid = "p" * 16
    with ledger_records_dropped():
        yield pl, log, link, heap_gen


def _copies(log):
    """Copies enqueued: one per cuMemcpyDtoDAsync, n per batch."""
    return sum(e[1] if e[0] == "copy_batch" else 1 for e in log if e[0] in ("copy_batch", "cuMemcpyDtoDAsync_v2"))


def _sent(link, objs):
    """Encode one frame carrying ``objs``; returns its descriptors, in order."""
    fb, _chunks = codec.encode_message(("result", 1, True), link, [objs])
    fb._lends.clear()                # nobody will release them: the fixture drops the records
    part = fb.parts[0]
    descs = []

    class _D(codec.pickle.Unpickler):
        def persistent_load(self, pid):
            descs.append(unpack(pid[2]))
            return None

    _D(codec.io.BytesIO(part.data)).load()
    return descs


def _send(link, objs):
    """Encode one frame carrying ``objs``; returns the descriptors' routes, in order."""
    return [d.route for d in _sent(link, objs)]


def test_a_small_tensor_is_copied_the_first_time_and_exported_when_sent_again(worker):
    pl, log, link, _ = worker
    t = FakeT(1 << 40)
    assert _send(link, [t]) == ["staging"]
    assert pl.last_reasons["staging"] == paths.SMALL_COPY_WHY
    assert not [e for e in log if e[0] == "address_range"]        # decided without those driver calls
    assert [e[0] for e in log if e[0].startswith("cuMemcpy")] == ["cuMemcpyDtoDAsync_v2"]
    del log[:]
    assert _send(link, [t]) == ["pool"]                           # the same tensor again: zero copy
    assert ("export", "h", 1 << 40) in log and _copies(log) == 0
    # A new storage at the address of a copied one (a fresh allocation that reused it
    # once the first was freed) is copied too; another view of a storage sent before is not.
    assert _send(link, [FakeT(1 << 41)]) == ["staging"]
    assert _send(link, [FakeT(1 << 41)]) == ["staging"]
    s = FakeStorage(1 << 42, MiB)
    assert _send(link, [FakeT(0, MiB // 2, storage=s)]) == ["staging"]
    assert _send(link, [FakeT(0, MiB // 4, storage=s, offset=MiB // 2)]) == ["pool"]


def test_views_of_one_small_storage_share_one_staged_copy(worker):
    pl, log, link, _ = worker
    s = FakeStorage(1 << 40, MiB)
    views = [FakeT(0, MiB, storage=s), FakeT(0, MiB // 2, storage=s, offset=MiB // 4), FakeT(0, MiB, storage=s)]
    del log[:]
    fb, _ = codec.encode_message(("result", 1, True), link, [views])
    fb._lends.clear()
    descs = []

    class _D(codec.pickle.Unpickler):
        def persistent_load(self, pid):
            descs.append(unpack(pid[2]))

    _D(codec.io.BytesIO(fb.parts[0].data)).load()
    assert [d.route for d in descs] == ["staging"] * 3 and len({d.ref for d in descs}) == 1
    assert [d.offset for d in descs] == [0, MiB // 4, 0]
    assert _copies(log) == 1 and len(fb.parts[0].refs) == 1


def test_a_big_tensor_first_sent_is_copied_span_only_then_exported(worker):
    """A storage bigger than the small-copy limit, first sent, is copied too (a recycled
    staging block the peer keeps mapped instead of a new mapping per call), but only the
    bytes the view spans; sent again it goes zero copy."""
    pl, log, link, _ = worker
    assert pl.sender.fresh_copy == pl.sender.limit
    s = FakeStorage(1 << 41, 64 * MiB)
    view = FakeT(0, 8 * MiB, storage=s, offset=16 * MiB)
    del log[:]
    assert _send(link, [view]) == ["staging"]
    assert pl.last_reasons["staging"] == paths.FRESH_COPY_WHY
    assert ("alloc", 8 * MiB) in log and _copies(log) == 1
    del log[:]
    assert _send(link, [view]) == ["pool"] and _copies(log) == 0
    # A storage bigger than the limit is never copied on first sight (its allocation
    # still may not be importable: choose() decides).
    pl.sender.fresh_copy = 32 * MiB
    assert _send(link, [FakeT(1 << 42, nbytes=64 * MiB)]) == ["pool"]


def test_fresh_copy_limit_from_env(monkeypatch):
    limit = 4096 * MiB
    monkeypatch.delenv("COMFY_ENV_CUDA_FRESH_COPY_MIB", raising=False)
    assert paths.fresh_copy_limit(16 * MiB, limit) == limit
    assert paths.fresh_copy_limit(0, limit) == 0              # small copies off: all off
    monkeypatch.setenv("COMFY_ENV_CUDA_FRESH_COPY_MIB", "0")
    assert paths.fresh_copy_limit(16 * MiB, limit) == 16 * MiB  # small ones only
    monkeypatch.setenv("COMFY_ENV_CUDA_FRESH_COPY_MIB", "9000")
    assert paths.fresh_copy_limit(16 * MiB, limit) == limit     # never above the import limit
    for bad in ("lots", "-1"):
        monkeypatch.setenv("COMFY_ENV_CUDA_FRESH_COPY_MIB", bad)
        with pytest.raises(ValueError, match="COMFY_ENV_CUDA_FRESH_COPY_MIB"):
            paths.fresh_copy_limit(16 * MiB, limit)


def _sent_posts(link, sent):
    """What ``link`` posted: the ledger's flusher may have sent it already."""
    import time
    link.flush()
    deadline = time.monotonic() + 5
    while not sent and time.monotonic() < deadline:
        time.sleep(0.01)
    return list(sent)


def _pool_record(pl, t):
    rec = pl.sender._by_base[t.data_ptr()]
    assert lifetime.LEDGER.get(rec.key) is rec and rec.resource.kind == "pool"
    return rec


def test_the_owner_asks_peers_to_reclaim_a_pool_block_once_its_tensor_died(worker):
    """The peer's import cache keeps our pool blocks with no byte bound; when our last
    tensor on a block dies, the peers it is lent to are asked to let it go."""
    pl, log, link, _ = worker
    sent, other_sent = [], []
    link._send_control = sent.extend
    other = lifetime.Link(other_sent.extend, "other")
    pl.peers.of(other)
    t = FakeT(1 << 40)
    _send(link, [t])
    assert _send(link, [t]) == ["pool"]
    rec = _pool_record(pl, t)
    assert rec.resource.keep is t.untyped_storage()            # the memory, not the tensor
    assert link.lent[rec.key] > 0
    del t
    assert _sent_posts(link, sent) == [("plane", "cuda", ("reclaim", [rec.key]))]
    other.flush()
    assert other_sent == []                                    # not lent there
    lifetime.LEDGER.on_release(link, rec.key, link.lent[rec.key])
    assert lifetime.LEDGER.get(rec.key) is None and rec.resource.keep is None


def test_no_reclaim_while_another_tensor_uses_the_storage(worker, monkeypatch):
    from comfy_env.ipc.cuda import sender
    pl, log, link, _ = worker
    users = {"n": 3}
    monkeypatch.setattr(sender, "_storage_users", lambda storage: users["n"])
    sent = []
    link._send_control = sent.extend
    t = FakeT(1 << 40)
    _send(link, [t])
    _send(link, [t])
    rec = _pool_record(pl, t)
    del t                                                      # a view built apart still uses it
    link.flush()
    assert sent == []
    lifetime.LEDGER.on_release(link, rec.key, link.lent[rec.key])
    assert rec.resource.watch is None                          # freed: the watch (and storage) went


def test_a_lent_tensor_and_big_tensors_go_zero_copy(worker):
    pl, log, link, _ = worker
    big = FakeT(1 << 41, nbytes=pl.sender.fresh_copy + 4)
    assert _send(link, [big]) == ["pool"]
    small = FakeT(1 << 42)
    assert _send(link, [small, small]) == ["staging", "staging"]   # one frame: the block is shared
    assert _copies(log) == 1                                       # ... and copied once


def test_small_copy_off_by_env(worker, monkeypatch):
    monkeypatch.setenv("COMFY_ENV_CUDA_SMALL_COPY_MIB", "0")
    pl = CudaPlane()
    assert pl.sender.small_copy == 0
    monkeypatch.setenv("COMFY_ENV_CUDA_SMALL_COPY_MIB", "0.5")
    assert paths.small_copy_limit() == MiB // 2
    for bad in ("lots", "-1", "5000"):
        monkeypatch.setenv("COMFY_ENV_CUDA_SMALL_COPY_MIB", bad)
        with pytest.raises(ValueError, match="COMFY_ENV_CUDA_SMALL_COPY_MIB"):
            paths.small_copy_limit()
    wpl, log, link, _ = worker
    wpl.sender.small_copy = wpl.sender.fresh_copy = 0
    assert _send(link, [FakeT(1 << 40)]) == ["pool"]


def test_choose_stages_a_small_first_sight_only_where_the_pool_route_works():
    caps = Capabilities(driver=True, pools=True, vmm=True, events=True)
    kw = dict(nbytes=MiB, in_export_pool=True, alloc_bytes=2 * MiB, limit=4 << 30)
    assert choose(caps, PeerVerdicts(), small_copy=True, **kw) == ("staging", paths.SMALL_COPY_WHY)
    assert choose(caps, PeerVerdicts(), small_copy=False, **kw)[0] == "pool"
    failed = PeerVerdicts()
    failed.record("pool", False, "no")
    assert choose(caps, failed, small_copy=True, **kw)[0] == "vmm"
    assert choose(caps, PeerVerdicts(), small_copy=True, **{**kw, "nbytes": 0})[0] == "empty"


def test_one_event_per_frame_recorded_after_the_copies(worker):
    pl, log, link, _ = worker
    _send(link, [FakeT(1 << 40), FakeT(1 << 41), FakeT(1 << 43, nbytes=pl.sender.fresh_copy + 4)])
    names = [e[0] for e in log]
    assert names.count("reserve") == 1 and names.count("record_reserved") == 1 and "record" not in names
    assert ("copy_batch", 2, 7) in log and _copies(log) == 2      # both copies in one call, on the stream
    assert names.index("record_reserved") > names.index("copy_batch")
    assert not pl.local.rings[0].reserved


@pytest.mark.parametrize("settled", [True, False])
def test_tensors_lent_in_place_name_an_event_only_while_their_stream_has_work_queued(worker, monkeypatch, settled):
    """Sent again (zero copy), tensors whose stream has nothing queued any more name no
    event, and the frame reserves and records none; with work queued, every one of them
    names the frame's one event.  The stream is asked once per frame; a copy's frame
    never asks (its copy is queued on the stream when the frame is sent)."""
    pl, log, link, _ = worker
    asked = []
    monkeypatch.setattr(D, "stream_done", lambda stream: asked.append(stream) or settled)
    a, b = FakeT(1 << 40), FakeT(1 << 41)
    assert _send(link, [a, b]) == ["staging", "staging"]
    assert asked == []
    del log[:]
    descs = _sent(link, [a, b])
    assert [d.route for d in descs] == ["pool", "pool"] and asked == [7]
    names = [e[0] for e in log]
    if settled:
        assert [d.event for d in descs] == [None, None]
        assert "reserve" not in names and "record_reserved" not in names
    else:
        assert descs[0].event is not None and descs[0].event == descs[1].event
        assert names.count("reserve") == 1 and names.count("record_reserved") == 1


def test_every_driver_call_of_an_encode_finds_the_senders_context_current(worker, monkeypatch):
    """Each entry into the plane gives the caller its context back on the way out, so
    each driver call made while encoding makes ours current first.  One frame: a tensor
    sent before (no driver call), a new pointer of a storage sent before (its range and
    pool, its export) and a small tensor first seen (a new staging block: allocated,
    exported; its copy when the frame is sent)."""
    pl, log, link, _ = worker
    t0, s = FakeT(1 << 40), FakeStorage(1 << 42, MiB)
    _send(link, [t0, FakeT(0, MiB // 2, storage=s)])      # both copied: first sight
    _send(link, [t0])                                      # exported: t0 is sent before now
    encode, finish = pl.sender.encode, pl.sender._finish_frame_kept
    monkeypatch.setattr(pl.sender, "encode", lambda *a: (log.append(("enter",)), encode(*a))[1])
    monkeypatch.setattr(pl.sender, "_finish_frame_kept", lambda *a: (log.append(("enter",)), finish(*a))[1])
    monkeypatch.setattr(devices, "use", lambda o: log.append(("use", o)))
    monkeypatch.setattr(D, "pointer_pool", lambda ptr: (log.append(("pointer_pool", ptr)), 99)[1])
    monkeypatch.setattr(D, "stream_done", lambda stream: (log.append(("stream_done", stream)), True)[1])
    del log[:]
    assert _send(link, [t0, FakeT(0, MiB // 4, storage=s, offset=MiB // 2), FakeT(1 << 43)]) == [
        "pool", "pool", "staging"]
    driver = {"address_range", "pointer_pool", "export", "alloc", "stream_done", "copy_batch",
              "cuMemcpyDtoDAsync_v2", "cuStreamSynchronize"}
    current, made, wrong = False, [], []
    for entry in log:
        if entry[0] == "enter":
            current = False           # the caller's own context (none here) is back
        elif entry[0] == "use":
            current = True
        elif entry[0] in driver:
            made.append(entry[0])
            if not current:
                wrong.append(entry[0])
    assert {"address_range", "pointer_pool", "export", "alloc", "stream_done", "cuMemcpyDtoDAsync_v2"} <= set(made)
    assert wrong == [], f"driver calls made with no context current: {wrong}"


def test_copies_fall_back_to_one_call_each_when_the_batch_call_fails(worker, monkeypatch):
    pl, log, link, _ = worker

    def no_batch(*a):
        log.append(("copy_batch_failed",))
        raise D.CudaError("cuMemcpyBatchAsync", 500, "this driver has no batch copy")

    monkeypatch.setattr(D, "copy_batch", no_batch)
    _send(link, [FakeT(1 << 40), FakeT(1 << 41)])
    _send(link, [FakeT(1 << 42), FakeT(1 << 43)])
    names = [e[0] for e in log]
    assert names.count("copy_batch_failed") == 1 and names.count("cuMemcpyDtoDAsync_v2") == 4
    assert not pl.local.batch_copies


def test_an_aborted_frame_gives_its_reserved_event_back(worker):
    pl, log, link, _ = worker

    class Boom:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        codec.encode_message(("result", 1, True), link, [[FakeT(1 << 40), Boom()]])
    assert [e[0] for e in log].count("record_reserved") == 1 and not pl.local.rings[0].reserved


def test_frame_hooks_run_once():
    ran = []
    fb = codec.FrameBuilder(lifetime.Link(lambda m: None, "x"))
    fb.before_send(lambda: ran.append(1))
    fb.build(("ping",))
    fb.abort()
    assert ran == [1]


def test_event_ring_never_hands_out_a_reserved_slot(monkeypatch):
    calls = []

    def call(name, *args, detail=""):
        calls.append(name)

    monkeypatch.setattr(D, "call", call)
    monkeypatch.setattr(D, "try_call", lambda name, *a: 0)       # every recording complete
    monkeypatch.setattr(devices, "use", lambda o: None)
    ring = EventRing(0)
    ring._events = [(i + 1, bytes([i]) * 64) for i in range(3)]
    slot, handle = ring.reserve()
    others = {ring.record(5)[0] for _ in range(6)}
    assert slot not in others and others == {0, 1, 2} - {slot}
    ring.record_reserved(slot, 5)
    assert not ring._reserved and calls.count("cuEventRecord") == 7
    assert slot in {ring.record(5)[0] for _ in range(3)}
    # Every slot reserved: a new one, never a reserved one.
    ring._reserved = {0, 1, 2}
    monkeypatch.setattr(ring, "_new", lambda: (ring._events.append((9, b"n" * 64)), len(ring._events) - 1)[1])
    assert ring.reserve()[0] == 3


def _importing_plane(monkeypatch, try_call):
    """A plane on a fake GPU 0 whose event ring logs its recordings, the driver's
    queries answered by ``try_call``: ``(plane, log, a ledger of its own)``."""
    monkeypatch.setattr(devices, "use", lambda o: None)
    monkeypatch.setattr(D, "try_call", try_call)
    log = []
    pl = CudaPlane()
    pl.local.probed[0] = Capabilities(driver=True, pools=True, vmm=True, events=True)
    pl.local.rings[0] = FakeRing(log)
    return pl, log, lifetime.Ledger()


def test_idle_reports_are_batched_one_event_per_stream_one_message_per_peer(monkeypatch):
    pl, log, ledger = _importing_plane(monkeypatch, try_call_reader_busy)
    sent = {"w1": [], "w2": []}           # what the process's flusher may already have sent
    links = [lifetime.Link(lambda msgs, n=n: sent[n].extend(msgs), n) for n in ("w1", "w2")]
    recs = []
    for i in range(5):
        link = links[i % 2]
        res = RemotePool(validate_meta(pool_meta(("o" * 16, 1), b"e" * 64, UUID, MiB)))
        res.ptr, res.ordinal, res.seq, res.read_stream = 1 << 30, 0, i, 7 if i < 4 else 8
        rec = ledger.accept_lease(("cuda", link.name, i), link, lambda: res, None)
        ledger.hold(rec, 2)                 # the import cache's hold and a tensor's
        rec.on_idle = pl.receiver.staging_idle
        recs.append(rec)
    ledger.unhold_all(recs)                 # every tensor died: one batch
    assert sorted(e[2] for e in log) == [7, 8]                     # one event per read stream
    posts = {link.name: link.take_posts() for link in links}
    posts = {name: sent[name] + msgs for name, msgs in posts.items()}
    for name, msgs in posts.items():
        # one message per (peer, event): stream 7 has blocks of both peers, stream 8 one of w1
        for m in msgs:
            assert m[0] == "plane" and m[2][0] == "idle"
    got = {name: sorted((k[2], seq) for m in msgs for k, seq in m[2][1]) for name, msgs in posts.items()}
    assert got == {"w1": [(0, 0), (2, 2), (4, 4)], "w2": [(1, 1), (3, 3)]}
    assert len(posts["w1"]) == 2 and len(posts["w2"]) == 1


def test_an_idle_report_after_reads_that_completed_carries_no_event(monkeypatch):
    """A reader that synchronised (its stream has nothing queued) reports its blocks
    idle without an event: the owner's next copy into them waits for nothing, where an
    event recorded just now could still be pending on the GPU when the owner asks."""
    queries = []
    busy = {8}                              # stream 7 drained, stream 8 still has work

    def try_call(name, *args):
        if name == "cuStreamQuery":
            queries.append(args[0])
            return D.CUDA_ERROR_NOT_READY if args[0] in busy else D.CUDA_SUCCESS
        return D.CUDA_SUCCESS

    pl, log, ledger = _importing_plane(monkeypatch, try_call)
    sent = []                               # what the process's flusher may already have sent
    link = lifetime.Link(sent.extend, "w1")
    recs = []
    for i, stream in enumerate((7, 7, 8)):
        res = RemotePool(validate_meta(pool_meta(("o" * 16, 1), b"e" * 64, UUID, MiB)))
        res.ptr, res.ordinal, res.seq, res.read_stream = 1 << 30, 0, i, stream
        rec = ledger.accept_lease(("cuda", "w1", i), link, lambda: res, None)
        ledger.hold(rec, 2)
        rec.on_idle = pl.receiver.staging_idle
        recs.append(rec)
    ledger.unhold_all(recs)
    assert sorted(queries) == [7, 8]                        # asked once per read stream
    assert [e[2] for e in log] == [8]                       # an event only where reads are pending
    reports = {tuple(k[2] for k, _seq in m[2][1]): m[2][2] for m in sent + link.take_posts()}
    assert reports[(0, 1)] is None and reports[(2,)] is not None


def _idle_block(pl, gen, size, n):
    key = ("cuda", lifetime.PROCESS_UID, 900 + n)
    rec = lifetime.LEDGER.add_owned(key, OwnedStaging(0, (1 << 44) + n * 64 * MiB,
                                                      pool_meta(gen.key, b"e" * 64, UUID, size), gen, None, size),
                                    pl.on_zero)
    return rec


def test_a_peer_event_shared_by_idle_blocks_is_waited_on_once_per_frame(worker):
    pl, log, link, _ = worker
    gen = pl.local.staging[0].current
    blocks = [_idle_block(pl, gen, MiB, i) for i in range(4)]
    ev = ("q" * 16, 0, 5, b"h" * 64)
    pl.sender.on_idle(link, [(b.key, 0) for b in blocks[:2]], ev)                 # one message, one event
    pl.sender.on_idle(link, [(blocks[2].key, 0)], tuple(list(ev)))                 # equal, another message
    pl.sender.on_idle(link, [(blocks[3].key, 0)], tuple(list(ev)))                 # equal, another message
    assert pl.stats()["staging_idle"] == 4
    del log[:]
    assert _send(link, [FakeT((1 << 40) + i * MiB) for i in range(4)]) == ["staging"] * 4
    waits = [e for e in log if e[0] == "wait"]
    assert len(waits) == 3 and pl.recycled == 4 and not [e for e in log if e[0] == "alloc"]
    assert names_before(log, "wait", "copy_batch")           # the peer's reads before our copies


def names_before(log, first, then):
    names = [e[0] for e in log]
    return max(i for i, n in enumerate(names) if n == first) < names.index(then)


def test_idle_blocks_are_taken_by_rounded_size_and_stale_ones_forgotten(worker):
    pl, log, link, _ = worker
    gen = pl.local.staging[0].current
    a = _idle_block(pl, gen, 2 * MiB, 0)
    b = _idle_block(pl, gen, 4 * MiB, 1)
    stale = _idle_block(pl, FakeGen("r", log), 2 * MiB, 2)       # a rolled generation
    pl.sender.on_idle(link, [(a.key, 0), (b.key, 0), (stale.key, 0)], None)
    with lifetime.LEDGER.lock:
        assert pl.sender._take_idle_staging(0, 2 * MiB - 100, gen) is a       # exact rounded size
        assert pl.sender._take_idle_staging(0, 3 * MiB, gen) is b              # 4 MiB: the rounded size of 3 MiB
        assert pl.sender._take_idle_staging(0, 2 * MiB, gen) is None           # only the stale one was left
    assert pl.stats()["staging_idle"] == 0


def test_copy_batch_builds_the_driver_arrays_and_avoids_the_legacy_stream(monkeypatch):
    got = {}

    def v2(dsts, srcs, sizes, n, attrs, idxs, nattrs, stream):
        got.update(dsts=list(dsts[:n]), srcs=list(srcs[:n]), sizes=list(sizes[:n]), n=n, nattrs=nattrs,
                   order=attrs._obj.srcAccessOrder, loc=(attrs._obj.srcLocHint.type, attrs._obj.dstLocHint.id),
                   idx0=idxs._obj.value, stream=stream)
        return 0

    monkeypatch.setattr(D, "lib", lambda: None)
    monkeypatch.setattr(D, "_funcs", {"cuMemcpyBatchAsync_v2": v2})
    D.copy_batch([10, 20], [1, 2], [3, 4], 0, 1)
    assert got == {"dsts": [10, 20], "srcs": [1, 2], "sizes": [3, 4], "n": 2, "nattrs": 1,
                   "order": D.MEMCPY_SRC_ACCESS_ORDER_STREAM, "loc": (D.MEM_LOCATION_DEVICE, 1), "idx0": 0,
                   "stream": D.STREAM_PER_THREAD}
    D.copy_batch([10], [1], [3], 7, 0)
    assert got["stream"] == 7
    monkeypatch.setattr(D, "_funcs", {})
    with pytest.raises(D.CudaError, match="no batch copy"):
        D.copy_batch([10], [1], [3], 7, 0)


def test_a_sent_frame_keeps_no_source_alive(worker):
    """Without the garbage collector: a staged tensor's storage is free to go once the
    frame is built (the frame's context held it, in a cycle through the encoder)."""
    import gc
    import weakref
    pl, log, link, _ = worker
    s = FakeStorage(1 << 40, MiB)
    dead = weakref.ref(s)
    gc.disable()
    try:
        _send(link, [FakeT(0, MiB, storage=s), FakeT(1 << 41)])
        del s
        assert dead() is None
    finally:
        gc.enable()



def test_a_failed_import_is_a_clear_error_and_a_verdict_to_the_sender(monkeypatch):
    """The receiver's first import of a block is the probe: a driver error raises
    CudaTransferError naming it and tells the sender (which then stops using that route
    for this peer, with one warning); nothing stays locked: the next block imports."""
    from comfy_env.ipc.cuda.plane import CudaTransferError
    pl = CudaPlane()
    sent = []
    link = lifetime.Link(sent.extend, "worker-1")

    def remote(i):
        meta = validate_meta(pool_meta(("o" * 16, 1), bytes([i]) * 64, UUID, MiB))
        return lifetime.Record(("cuda", "o" * 16, i), RemotePool(meta), owned=False, upstream=link)

    def refuse(pool_key, export):
        raise D.CudaError("cuMemPoolImportPointer", 1, "invalid argument")

    monkeypatch.setattr(pl.imports, "import_pointer", refuse)
    rec = remote(1)
    with pytest.raises(CudaTransferError, match="could not import a CUDA pool block from worker-1: .*invalid argument"):
        pl.receiver._local_ptr(rec, 0, 7, link)
    posts = _sent_posts(link, sent)
    assert len(posts) == 1 and posts[0][:2] == ("plane", "cuda") and posts[0][2][:3] == ("verdict", "pool", False)
    assert "invalid argument" in posts[0][2][3] and rec.resource.ptr is None
    monkeypatch.setattr(pl.imports, "import_pointer", lambda pool_key, export: 1 << 30)
    ok = remote(2)
    assert pl.receiver._local_ptr(ok, 0, 7, link) == 1 << 30
    assert (ok.resource.ptr, ok.resource.stream, ok.resource.ordinal) == (1 << 30, 7, 0)
    with pytest.warns(RuntimeWarning, match="cannot import CUDA pool blocks"):
        pl.on_control(link, posts[0][2])
    assert pl.peers.of(link).verdicts.ok("pool") is False
