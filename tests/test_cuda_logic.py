"""CPU-only tests of the CUDA plane: descriptors, route choice with injected probe results,
the fallback, and import hygiene (no CUDA, no torch touched by importing comfy_env)."""
import os
import subprocess
import sys
import textwrap

import pytest

from comfy_env.ipc.cuda.layout import (CudaTensorDesc, DescriptorError, VERSION, pack, pool_meta, span_bytes,
                                       unpack, validate, validate_meta, vmm_meta)
from comfy_env.ipc.cuda.paths import (DEFAULT_IMPORT_LIMIT, Capabilities, PeerVerdicts, choose,
                                      import_limit)

UUID = "0123456789abcdef0123456789abcdef"
GiB = 1 << 30
FULL = Capabilities(driver=True, pools=True, vmm=True, events=True)


def desc(**kw):
    base = dict(version=VERSION, route="pool", ref=0, dtype="float32", shape=(2, 3), strides=(3, 1),
                offset=0, device_uuid=UUID, device_index=0, event=None, requires_grad=False)
    base.update(kw)
    return CudaTensorDesc(**base)


# -- descriptor arithmetic ------------------------------------------------------------
def test_span_of_contiguous_view_and_transposed_view():
    assert span_bytes((2, 3), (3, 1), 4) == 24
    assert span_bytes((3, 2), (1, 3), 4) == 24          # a transpose covers the same bytes
    assert span_bytes((2,), (3,), 2) == 8               # t[::3] of 4 elements: elements 0 and 3


def test_span_of_empty_and_broadcast_tensors():
    assert span_bytes((0, 5), (5, 1), 4) == 0
    assert span_bytes((4, 4), (0, 1), 2) == 8           # expand(): one row shared
    assert span_bytes((), (), 8) == 8                   # a 0-d tensor holds one element


def test_negative_strides_are_refused():
    with pytest.raises(DescriptorError, match="negative"):
        span_bytes((2,), (-1,), 4)


def test_valid_descriptor_passes_for_every_dtype_incl_bfloat16():
    for dt in ("bfloat16", "float16", "float32", "int64", "bool", "complex64", "float8_e4m3fn", "uint8"):
        assert validate(desc(dtype=dt)).dtype == dt


@pytest.mark.parametrize("bad, match", [
    (dict(version=99), "version"),
    (dict(route="teleport"), "route"),
    (dict(dtype="float128"), "dtype"),
    (dict(shape=(2, 3), strides=(1,)), "one length"),
    (dict(shape=[2, 3]), "tuples"),
    (dict(shape=(2, -3)), "non-negative"),
    (dict(offset=-4), "offset"),
    (dict(offset=2), "multiple"),
    (dict(device_uuid="GPU-0"), "uuid"),
    (dict(ref=-1), "ref"),
    (dict(route="empty", ref=0), "ref"),
    (dict(event=("uid", 0, 1, b"short")), "event"),
    (dict(route="cpu", ref=-1, host=None), "host"),
])
def test_malformed_descriptors_get_clear_errors(bad, match):
    with pytest.raises(DescriptorError, match=match):
        validate(desc(**bad))


def test_validate_rejects_other_objects():
    with pytest.raises(DescriptorError, match="CudaTensorDesc"):
        validate(("pool", 0))


def test_block_meta_roundtrip_and_errors():
    m = pool_meta(("owner", 3), b"x" * 64, UUID, 1024)
    assert validate_meta(m) == m
    assert validate_meta(vmm_meta(2 << 20, UUID))[0] == "vmm"
    # The wire form is a plain tuple (the envelope is a plain pickle); the receiver reads names.
    assert type(m) is tuple and type(vmm_meta(1, UUID)) is tuple
    p = validate_meta(m)
    assert (p.kind, p.pool_key, p.owner, p.export, p.device_uuid, p.alloc_size) == \
        ("pool", ("owner", 3), "owner", b"x" * 64, UUID, 1024)
    v = validate_meta(vmm_meta(2 << 20, UUID))
    assert (v.kind, v.size, v.device_uuid) == ("vmm", 2 << 20, UUID)
    with pytest.raises(DescriptorError):
        validate_meta(pool_meta(("owner", 3), b"x" * 63, UUID, 1024))
    with pytest.raises(DescriptorError):
        validate_meta(("ipc", 1))
    with pytest.raises(DescriptorError):
        validate_meta(vmm_meta(0, UUID))


def test_descriptor_is_small_when_pickled():
    import pickle
    d = desc(event=("0123456789abcdef", 0, 5, b"e" * 64))
    assert len(pickle.dumps(d, 5)) < 400


@pytest.mark.parametrize("kw", [
    {}, dict(route="staging", seq=7, requires_grad=True), dict(route="vmm", shape=(), strides=()),
    dict(route="empty", ref=-1, shape=(0, 5), strides=(5, 1), dtype="bfloat16"),
    dict(event=("0123456789abcdef", 1, 255, bytes(range(64))), device_index=3, offset=8),
    dict(shape=tuple(range(1, 9)), strides=tuple(range(8, 0, -1)), dtype="float8_e4m3fn"),
])
def test_descriptor_packs_to_bytes_and_back(kw):
    d = desc(**kw)
    b = pack(d)
    assert isinstance(b, bytes) and len(b) < 250
    assert unpack(b) == d and validate(unpack(b)) == d


def test_malformed_packed_descriptors_get_clear_errors():
    b = pack(desc(event=("0123456789abcdef", 0, 5, b"e" * 64)))
    for bad in (b[:-1], b + b"x", b[:10], b"", bytes([VERSION + 1]) + b[1:]):
        with pytest.raises(DescriptorError):
            unpack(bad)
    for bad in (desc(offset=2), desc(strides=(-3, 1)), desc(ref=-1), desc(route="empty", ref=0)):
        with pytest.raises(DescriptorError):
            unpack(pack(bad))                      # packed as given, refused when unpacked
    with pytest.raises(DescriptorError, match="route 'cpu'"):
        pack(desc(route="cpu", ref=-1, host=object()))
    with pytest.raises(DescriptorError, match="cannot pack"):
        pack(desc(dtype="float128"))
    with pytest.raises(DescriptorError, match="sequence"):
        validate(desc(seq=-1))


# -- route choice with injected probe results ---------------------------------------------
def route(caps=FULL, peer=None, **kw):
    args = dict(nbytes=1 << 20, in_export_pool=False, alloc_bytes=0, limit=DEFAULT_IMPORT_LIMIT)
    args.update(kw)
    return choose(caps, peer or PeerVerdicts(), **args)


def test_worker_heap_tensor_goes_zero_copy():
    assert route(in_export_pool=True, alloc_bytes=1 << 20)[0] == "pool"


def test_tensor_outside_export_pool_is_staged():
    r, why = route()
    assert r == "staging" and "not allocated from an export pool" in why


def test_big_tensor_takes_vmm_never_a_big_pool_import():
    assert route(nbytes=5 * GiB)[0] == "vmm"
    assert route(nbytes=6 * GiB, in_export_pool=True, alloc_bytes=6 * GiB)[0] == "vmm"
    assert route(nbytes=12 * GiB)[0] == "vmm"


def test_small_view_of_huge_allocation_copies_only_the_view():
    r, why = route(nbytes=1 << 20, in_export_pool=True, alloc_bytes=6 * GiB)
    assert r == "staging" and "above the import limit" in why


def test_peer_that_failed_pool_import_gets_vmm():
    peer = PeerVerdicts()
    peer.record("pool", False, "CUDA_ERROR_NOT_SUPPORTED")
    r, why = route(peer=peer, in_export_pool=True, alloc_bytes=1 << 20)
    assert r == "vmm" and "NOT_SUPPORTED" in why


def test_fallback_to_cpu_only_when_nothing_else_works_and_says_why():
    peer = PeerVerdicts()
    peer.record("pool", False, "pool import refused")
    peer.record("vmm", False, "vmm import refused")
    r, why = route(peer=peer)
    assert r == "cpu" and "pool import refused" in why and "vmm import refused" in why
    no_export = Capabilities(driver=True, reasons={"pools": "no pools", "vmm": "no vmm"})
    r, why = route(caps=no_export)
    assert r == "cpu" and "no pools" in why and "no vmm" in why


def test_big_tensor_without_vmm_falls_back_to_cpu():
    caps = Capabilities(driver=True, pools=True, vmm=False, reasons={"vmm": "old driver"})
    r, why = route(caps=caps, nbytes=6 * GiB)
    assert r == "cpu" and "exceed" in why and "old driver" in why


def test_no_driver_means_cpu_and_empty_means_empty():
    assert route(caps=Capabilities.none("no libcuda"))[0] == "cpu"
    assert route(nbytes=0)[0] == "empty"


def test_untried_peer_is_tried_verified_peer_is_used():
    peer = PeerVerdicts()
    assert peer.ok("pool") is None
    peer.record("pool", True)
    assert route(peer=peer)[0] == "staging"


def test_bad_sizes_and_limit_override(monkeypatch):
    with pytest.raises(ValueError):
        route(nbytes=-1)
    monkeypatch.setenv("COMFY_ENV_CUDA_POOL_IMPORT_LIMIT_MIB", "1024")
    assert import_limit() == GiB
    monkeypatch.setenv("COMFY_ENV_CUDA_POOL_IMPORT_LIMIT_MIB", "lots")
    with pytest.raises(ValueError, match="integer"):
        import_limit()


# -- the plane without a GPU ------------------------------------------------------------------
def test_cpu_fallback_warns_once_and_keeps_device_identity(monkeypatch):
    torch = pytest.importorskip("torch")
    from comfy_env.ipc.cuda import plane as P
    pl = P.CudaPlane()
    pl.local.t()
    t = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3).t()
    with pytest.warns(P.CudaFallbackWarning, match="no usable CUDA driver"):
        d = pl.sender._encode_cpu(t, "bfloat16", 1, UUID, "no usable CUDA driver here")
    assert d.route == "cpu" and d.device_uuid == UUID and d.device_index == 1
    assert validate(d).host.dtype == torch.bfloat16
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pl.sender._encode_cpu(t, "bfloat16", 1, UUID, "no usable CUDA driver here")   # no second warning


def test_cpu_tensors_are_left_to_the_cpu_plane():
    torch = pytest.importorskip("torch")
    from comfy_env.ipc.cuda.plane import CudaPlane
    assert CudaPlane().encode(torch.ones(3), enc=None) is None


def test_housekeeping_retires_each_closed_peer_once_and_only_looks_after_a_close(monkeypatch):
    """A peer that went away is noticed before the next frame: its pools are forgotten
    and every other open peer is told to retire them, once per close; between closes no
    link is looked at.  A link closed before the plane met it is noticed too, and one
    made at a dead link's address (a reused ``id``) is not taken for the dead one."""
    import gc
    from comfy_env.ipc import lifetime
    from comfy_env.ipc.cuda.plane import CudaPlane
    pl = CudaPlane()
    forgot = []
    monkeypatch.setattr(pl.receiver, "forget_owner", forgot.append)

    def link(uid):
        ln = lifetime.Link(lambda msgs: None, uid)
        ln.uid = uid
        monkeypatch.setattr(ln, "post", lambda m, ln=ln: ln.state.setdefault("posted", []).append(m))
        pl.peers.of(ln)
        return ln

    a, b, c = link("A"), link("B"), link("C")
    pl.housekeeping()
    assert forgot == []
    looked, links = [], pl.peers._links

    class Counted:
        def __iter__(self):
            looked.append(1)
            return iter(links)

        def add(self, link):
            links.add(link)

    monkeypatch.setattr(pl.peers, "_links", Counted())
    pl.housekeeping()
    assert forgot == [] and looked == []
    lifetime.LEDGER.link_closed(b)
    pl.housekeeping()
    n = len(looked)
    pl.housekeeping()                       # the same close again: nothing more
    assert forgot == ["B"] and n and len(looked) == n
    lifetime.LEDGER.link_closed(a)
    pl.housekeeping()
    assert forgot == ["B", "A"]
    retire = [("plane", "cuda", ("retire-owner", x)) for x in ("B", "A")]
    assert c.state["posted"] == retire and a.state["posted"] == retire[:1] and "posted" not in b.state
    # Closed before the plane met it, then met (a late frame from a dead peer).
    d = lifetime.Link(lambda msgs: None, "D")
    d.uid = "D"
    lifetime.LEDGER.link_closed(d)
    pl.housekeeping()
    pl.peers.of(d)
    pl.housekeeping()
    assert forgot == ["B", "A", "D"]
    # Links made and dropped: a later one at a reused address is its own link.
    ids = []
    for i in range(50):
        e = lifetime.Link(lambda msgs: None, f"E{i}")
        e.uid = f"E{i}"
        pl.peers.of(e)
        ids.append(id(e))
        lifetime.LEDGER.link_closed(e)
        pl.housekeeping()
        del e
        gc.collect()
    assert len(set(ids)) < len(ids)         # addresses were reused
    assert forgot[3:] == [f"E{i}" for i in range(50)]
    with pytest.raises(ValueError, match="stays closed"):
        a.closed = False


def test_decoding_for_an_invisible_gpu_is_a_clear_error():
    pytest.importorskip("torch")
    from comfy_env.ipc.cuda.plane import CudaPlane, CudaTransferError
    with pytest.raises(CudaTransferError, match="unavailable|cannot see"):
        CudaPlane().decode(desc(route="empty", ref=-1, shape=(0,), strides=(1,)), dec=None)


def test_driver_unavailable_is_a_clear_cached_error():
    from comfy_env.ipc.cuda import driver as D
    try:
        D.lib()
    except D.CudaUnavailable as exc:
        assert "CUDA driver unavailable" in str(exc)
        with pytest.raises(D.CudaUnavailable):
            D.call("cuCtxSynchronize")
    else:
        pytest.skip("a CUDA driver is present")


def test_importing_and_installing_touches_neither_cuda_nor_torch_init():
    code = textwrap.dedent("""
        import sys
        import comfy_env, comfy_env.ipc.cuda as c
        from comfy_env.ipc.cuda import layout, paths
        from comfy_env import cuda_doctor
        assert 'torch' not in sys.modules, 'torch imported by comfy_env'
        assert 'comfy_env.ipc.cuda.driver' not in sys.modules or \\
            sys.modules['comfy_env.ipc.cuda.driver']._lib is None
        try:
            import torch
        except ImportError:
            print('ok'); raise SystemExit
        c.install()
        from comfy_env.ipc.cuda import driver
        assert driver._lib is None, 'libcuda loaded at install'
        assert not torch.cuda.is_initialized(), 'CUDA initialised at install'
        print('ok')
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_doctor_report_without_gpu_says_so():
    from comfy_env import cuda_doctor as doctor
    try:
        import torch
        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    except ImportError:
        pass
    text = doctor.report()
    assert text.startswith("CUDA data plane") and ("no usable GPU" in text or "not installed" in text)


# -- import cache: lifetime protocol (pure Python, the real ledger) ------------------------
class _Trace:
    """A link and an on_zero that log, in order, frees and the releases queued upstream."""

    def __init__(self):
        from comfy_env.ipc import lifetime
        self.log = []
        self.sent = []                 # what the ledger's flusher thread already sent
        self.link = lifetime.Link(self.sent.extend, name="exporter")
        self.link.uid = "owner"

    def on_zero(self, rec):
        queued = [m for m in list(self.link._posts) + self.sent if m[0] == "release" and m[1] == rec.key]
        assert not queued, "a release was queued before the import was freed"
        self.log.append(("free", rec.key))

    def releases(self):
        import time
        time.sleep(0.05)
        msgs, self.sent[:] = self.sent + self.link.take_posts(), []
        out = [m for m in msgs if m[0] == "release"]
        self.log += out
        return out


def _decode(ledger, trace, key, cache, nbytes=1 << 20):
    """What CudaPlane.decode does for a pool block: lease, one holder, cache.keep."""
    rec = ledger.accept_lease(key, trace.link, lambda: object(), trace.on_zero)
    holder = type("Holder", (), {})()
    ledger.holder(rec, holder)
    hit = cache.keep(rec, nbytes, key[1])
    return rec, holder, hit


def _settle(ledger):
    import gc
    gc.collect()
    ledger.drain()


def test_import_cache_keeps_the_import_and_sends_no_release_until_evicted():
    from comfy_env.ipc.lifetime import Ledger
    from comfy_env.ipc.cuda.importcache import ImportCache
    ledger, t = Ledger(), _Trace()
    cache = ImportCache(ledger, max_bytes=1 << 30, max_count=100, max_idle_s=1000, background=False)
    key = ("cuda", "owner", 1)
    rec, h, hit = _decode(ledger, t, key, cache)
    assert not hit and len(cache) == 1
    h = None; _settle(ledger)
    assert ledger.get(key) is rec and t.log == [] and t.releases() == []   # still mapped, no release
    rec2, h2, hit = _decode(ledger, t, key, cache)                          # the same block again
    assert hit and rec2 is rec and rec.leases_in == 2
    h2 = None; _settle(ledger)
    assert cache.sweep() == 0                                               # not idle long enough
    assert cache.flush() == 1
    assert t.log == [("free", key)]                                         # freed first ...
    assert t.releases() == [("release", key, 2)]                            # ... then both leases
    assert ledger.get(key) is None and len(cache) == 0


def test_import_cache_evicts_idle_entries_after_their_time():
    from comfy_env.ipc.lifetime import Ledger
    from comfy_env.ipc.cuda.importcache import ImportCache
    ledger, t = Ledger(), _Trace()
    cache = ImportCache(ledger, max_bytes=1 << 30, max_count=100, max_idle_s=0.5, background=False)
    key = ("cuda", "owner", 7)
    rec, h, _ = _decode(ledger, t, key, cache)
    assert cache.sweep(now=0.0) == 0 and t.log == []                        # in use: kept, no timer
    h = None; _settle(ledger)
    assert cache.sweep(now=10.0) == 0                                       # idle from now on
    assert cache.sweep(now=10.4) == 0
    assert cache.sweep(now=10.6) == 1 and t.log == [("free", key)]
    assert t.releases() == [("release", key, 1)]


def test_import_cache_never_evicts_a_block_with_a_lease_not_yet_decoded():
    from comfy_env.ipc.lifetime import Ledger
    from comfy_env.ipc.cuda.importcache import ImportCache
    ledger, t = Ledger(), _Trace()
    cache = ImportCache(ledger, max_bytes=1 << 30, max_count=100, max_idle_s=1000, background=False)
    key = ("cuda", "owner", 2)
    rec, h, _ = _decode(ledger, t, key, cache)
    h = None; _settle(ledger)
    # A new message leased the block; its decode has not added a user yet.
    assert ledger.accept_lease(key, t.link, lambda: object(), t.on_zero) is rec
    assert cache.flush() == 0 and ledger.get(key) is rec and t.log == []
    h2 = type("Holder", (), {})()
    ledger.holder(rec, h2)
    assert cache.keep(rec, 1 << 20, "owner")
    h2 = None; _settle(ledger)
    assert cache.flush() == 1 and t.releases() == [("release", key, 2)]


def test_import_cache_bounds_idle_entries_by_count_and_bytes_lru_first():
    from comfy_env.ipc.lifetime import Ledger
    from comfy_env.ipc.cuda.importcache import ImportCache
    ledger, t = Ledger(), _Trace()
    cache = ImportCache(ledger, max_bytes=3 << 20, max_count=2, max_idle_s=1000, background=False)
    keys = [("cuda", "owner", i) for i in range(4)]
    held = []
    for k in keys[:3]:
        rec, h, _ = _decode(ledger, t, k, cache)
        held.append(h)
    held[0] = None; _settle(ledger)                     # key 0 idle
    cache.sweep()
    assert len(cache) == 3                         # one idle entry: within bounds
    held = h = None
    _settle(ledger)                                # keys 1, 2 idle too: 3 idle > 2
    cache.sweep()
    assert [e for e in t.log if e[0] == "free"] == [("free", keys[0])]
    # A block forwarded by the link (its owner is a third process, who cannot say when
    # it stops using it): bigger than the byte bound, never kept.
    assert not cache.keep(ledger.accept_lease(keys[3], t.link, lambda: object(), t.on_zero), 4 << 20, "third")
    assert len(cache) == 2


def test_import_cache_keeps_owner_blocks_of_any_size_until_the_owner_reclaims_them():
    """A block from its owner is kept whatever its size (a 1 GiB result the worker keeps
    would otherwise be mapped again every call); the owner's "reclaim" evicts it when idle,
    later when still in use, and refuses a keep whose decode comes after the reclaim."""
    from comfy_env.ipc.lifetime import Ledger
    from comfy_env.ipc.cuda.importcache import ImportCache
    ledger, t = Ledger(), _Trace()
    cache = ImportCache(ledger, max_bytes=1 << 20, max_count=100, max_idle_s=1000, background=False)
    a, b, c = ("cuda", "owner", 1), ("cuda", "owner", 2), ("cuda", "owner", 3)
    big = 4 << 30
    ra = ledger.accept_lease(a, t.link, lambda: object(), t.on_zero)
    ha = type("Holder", (), {})()
    ledger.holder(ra, ha)
    assert not cache.keep(ra, big, "owner") and len(cache) == 1          # kept, over the byte bound
    ha = None; _settle(ledger)
    assert cache.sweep() == 0 and len(cache) == 1 and t.log == []       # idle, still kept
    assert cache.reclaim([a]) == 1 and t.log == [("free", a)]           # reclaimed: freed, released
    assert t.releases() == [("release", a, 1)]
    rb = ledger.accept_lease(b, t.link, lambda: object(), t.on_zero)
    hb = type("Holder", (), {})()
    ledger.holder(rb, hb)
    cache.keep(rb, big, "owner")
    assert cache.reclaim([b]) == 0 and ledger.get(b) is rb              # in use here: kept for now
    hb = None; _settle(ledger)
    assert cache.sweep() == 1 and t.log[-1] == ("free", b)              # ... and evicted once idle
    assert cache.reclaim([c]) == 0                                      # not decoded yet
    rc = ledger.accept_lease(c, t.link, lambda: object(), t.on_zero)
    hc = type("Holder", (), {})()
    ledger.holder(rc, hc)
    assert not cache.keep(rc, 1 << 10, "owner") and len(cache) == 0     # never kept
    hc = None; _settle(ledger)
    assert t.log[-1] == ("free", c) and len(ledger) == 0


def test_import_cache_flush_by_owner_and_after_link_closed():
    from comfy_env.ipc.lifetime import Ledger
    from comfy_env.ipc.cuda.importcache import ImportCache
    ledger, t = Ledger(), _Trace()
    cache = ImportCache(ledger, max_bytes=1 << 30, max_count=100, max_idle_s=1000, background=False)
    a, b = ("cuda", "A", 1), ("cuda", "B", 1)
    for k in (a, b):
        _, h, _ = _decode(ledger, t, k, cache)
        h = None; _settle(ledger)
    assert cache.flush(owner="A") == 1 and t.log == [("free", a)] and len(cache) == 1
    assert t.releases() == [("release", a, 1)]
    ledger.link_closed(t.link)                     # the owner died: no release to send
    assert cache.sweep() == 1 and t.log[-1] == ("free", b) and t.releases() == []
    assert len(ledger) == 0


def test_import_cache_disabled_by_env(monkeypatch):
    from comfy_env.ipc.lifetime import Ledger
    from comfy_env.ipc.cuda.importcache import ImportCache
    monkeypatch.setenv("COMFY_ENV_CUDA_IMPORT_CACHE_MIB", "0")
    ledger, t = Ledger(), _Trace()
    cache = ImportCache(ledger)
    assert not cache.enabled
    key = ("cuda", "owner", 3)
    _, h, _ = _decode(ledger, t, key, cache)
    h = None; _settle(ledger)
    assert t.log == [("free", key)] and t.releases() == [("release", key, 1)]


# -- recycled staging blocks: the importer's idle hook, the exporter's bookkeeping ----------
def test_idle_hook_runs_when_only_the_cache_holds_a_staging_block():
    from comfy_env.ipc.lifetime import Ledger
    from comfy_env.ipc.cuda.importcache import ImportCache
    ledger, t = Ledger(), _Trace()
    cache = ImportCache(ledger, max_bytes=0, max_count=100, max_idle_s=1000, background=False,
                        max_staging_bytes=4 << 20)
    idles = []
    key = ("cuda", "owner", 1)
    rec = ledger.accept_lease(key, t.link, lambda: object(), t.on_zero)
    h = type("Holder", (), {})()
    ledger.holder(rec, h)
    assert not cache.keep(rec, 1 << 20, "owner", on_idle=idles.append) and idles == []
    h = None; _settle(ledger)
    assert idles == [rec] and ledger.get(key) is rec and t.log == [] and t.releases() == []
    # The owner lends it again: same record, no new import; idle again once the tensor died.
    rec2, h, hit = _decode(ledger, t, key, cache)
    assert rec2 is rec and rec.leases_in == 2 and idles == [rec]
    cache.keep(rec, 1 << 20, "owner", on_idle=idles.append)
    h = None; _settle(ledger)
    assert idles == [rec, rec]
    # Eviction unhooks it, frees, then releases both leases.
    assert cache.flush() == 1 and rec.on_idle is None
    assert t.log == [("free", key)] and t.releases() == [("release", key, 2)]
    # Over the staging bound (or a pool block with max_bytes=0): not kept at all.
    rec3, h, _ = _decode(ledger, t, ("cuda", "owner", 2), cache, nbytes=1 << 20)   # pool kind
    assert len(cache) == 0
    big = ledger.accept_lease(("cuda", "owner", 3), t.link, lambda: object(), t.on_zero)
    assert not cache.keep(big, 8 << 20, "owner", on_idle=idles.append) and len(cache) == 0


def test_exporter_recycles_only_idle_fitting_blocks_of_the_current_generation():
    from comfy_env.ipc import lifetime
    from comfy_env.ipc.cuda.blocks import OwnedStaging
    from comfy_env.ipc.cuda.plane import CudaPlane
    pl = CudaPlane()
    gen, MiB = object(), 1 << 20
    recs = []

    def block(size):
        key = ("cuda", "test-exporter", len(recs))
        recs.append(lifetime.LEDGER.add_owned(key, OwnedStaging(0, 0x1000, None, gen, None, size),
                                              None))
        return recs[-1]

    try:
        small, big = block(2 * MiB), block(8 * MiB)
        ev = ("0123456789abcdef", 0, 1, b"e" * 64)
        pl.sender.on_idle(None, [(small.key, 1)], ev)            # answers a lend that never happened
        assert pl.stats()["staging_idle"] == 0
        pl.sender.on_idle(None, [(small.key, 0)], ev)
        pl.sender.on_idle(None, [(big.key, 0)], None)
        assert pl.stats()["staging_idle"] == 2 and small.resource.ready == ev
        with lifetime.LEDGER.lock:
            got = pl.sender._take_idle_staging(0, MiB, gen)   # best fit, not the 8 MiB one
            assert got is small and small.resource.busy and small.resource.seq == 1
            assert pl.sender._take_idle_staging(0, MiB, gen) is None        # 8 MiB is too big for 1 MiB
        pl.sender.on_idle(None, [(small.key, 0)], ev)            # late answer to the previous lend
        assert small.resource.busy and pl.stats()["staging_idle"] == 1
        with lifetime.LEDGER.lock:                     # a rolled generation is never lent again
            assert pl.sender._take_idle_staging(0, 8 * MiB, object()) is None
        assert pl.stats()["staging_idle"] == 0 and pl.recycled == 1
        assert pl.sender._staging_size(1000) == 1024 and pl.sender._staging_size(3 * MiB + 1) == 4 * MiB
    finally:
        for r in recs:
            lifetime.LEDGER._records.pop(r.key, None)


def test_the_sender_guards_its_blocks_with_its_own_lock_not_the_ledgers():
    """An idle report and the bookkeeping of a freed staging block need only the sender's
    lock (docs/architecture.md, "Locks"): they go on while another thread holds the
    ledger's lock, e.g. a frame lending blocks."""
    import threading
    from comfy_env.ipc import lifetime
    from comfy_env.ipc.cuda.blocks import OwnedStaging
    from comfy_env.ipc.cuda.plane import CudaPlane
    pl = CudaPlane()
    gen = object()
    key = ("cuda", "test-lock-order", 1)
    rec = lifetime.LEDGER.add_owned(key, OwnedStaging(0, 0x1000, None, gen, None, 1 << 20), None)
    held, done = threading.Event(), threading.Event()

    def hold_the_ledger():
        with lifetime.LEDGER.lock:
            held.set()
            done.wait(10)

    t = threading.Thread(target=hold_the_ledger)
    t.start()
    try:
        assert held.wait(10)
        reported = threading.Thread(target=pl.sender.on_idle, args=(None, [(key, 0)], None))
        reported.start()
        reported.join(5)
        assert not reported.is_alive(), "on_idle waited for the ledger's lock"
    finally:
        done.set()
        t.join(10)
    try:
        assert pl.stats()["staging_idle"] == 1
    finally:
        lifetime.LEDGER._records.pop(key, None)


# -- the parent's heap (COMFY_ENV_CUDA_PARENT_HEAP) ---------------------------------------------
@pytest.mark.parametrize("role,worker_heap,parent_heap,wants", [
    ("parent", "pool", "torch", False),      # a worker's policy is not the parent's
    ("parent", "native", "pool", True),
    ("worker", "pool", "torch", True),
    ("worker", "native", "pool", False),     # nor the other way round
    ("worker", "staging", "pool", False),
])
def test_which_process_takes_an_export_heap(role, worker_heap, parent_heap, wants):
    from comfy_env.ipc.cuda.local import LocalGpus
    local = LocalGpus(worker_heap, None, parent_heap)
    local.role = role
    assert local.wants_heap() is wants
    if not wants:
        assert local.ensure_heap(0) is None and local.heap == {}   # no driver, no torch touched


class _FakeGen:
    def __init__(self, used, reserved, imported=0):
        self.u, self.r = used, reserved
        self.imported = imported         # free bytes a peer imported: a trim leaves them
        self.destroyed = False
        self.trims = 0

    def used(self):
        return self.u

    def reserved(self):
        return self.r

    def trim(self):
        self.trims += 1
        self.r = min(self.r, self.u + self.imported)
        return True


def _pools_of(gen):
    import threading
    from comfy_env.ipc.cuda.pools import Pools
    p = object.__new__(Pools)
    p.ordinal, p.kind, p._lock, p.current, p.old = 0, "heap", threading.Lock(), gen, []

    def roll():
        p.old.append(p.current)
        p.current = _FakeGen(0, 0)
    p._roll = roll
    return p


def test_the_parents_heap_rolls_only_when_nothing_in_it_is_used():
    """A generation pinned by a long-lived tensor is not rolled (the new one would draw
    fresh memory while the old keeps its idle bytes); a drained one is."""
    MiB = 1 << 20
    busy = _pools_of(_FakeGen(used=4 * MiB, reserved=1024 * MiB))
    assert busy.roll(64 * MiB) is True                                 # a worker's heap: rolls
    busy = _pools_of(_FakeGen(used=4 * MiB, reserved=1024 * MiB))
    assert busy.roll(64 * MiB, only_unused=True) is False and busy.old == []
    drained = _pools_of(_FakeGen(used=0, reserved=1024 * MiB))
    assert drained.roll(64 * MiB, only_unused=True) is True and len(drained.old) == 1
    small = _pools_of(_FakeGen(used=0, reserved=32 * MiB))
    assert small.roll(64 * MiB, only_unused=True) is False             # under the idle bound


@pytest.mark.parametrize("role", ["parent", "worker"])
def test_empty_cache_trims_every_generation_before_deciding_to_roll(role, monkeypatch):
    """``empty_cache`` (``roll_and_reap``) first trims every live generation: what a
    trim gives back is never a reason to roll.  Only idle memory a peer imported (which
    a trim cannot give back) above the bound rolls a worker's heap; the parent's rolls
    only once nothing in it is used."""
    from comfy_env.ipc.cuda import devices
    from comfy_env.ipc.cuda.local import LocalGpus
    monkeypatch.setattr(devices, "use", lambda ordinal: None)
    MiB = 1 << 20
    old = _FakeGen(used=2 * MiB, reserved=512 * MiB)
    never_sent = _pools_of(_FakeGen(used=4 * MiB, reserved=1024 * MiB, imported=0))
    never_sent.old = [old]
    sent = _pools_of(_FakeGen(used=4 * MiB, reserved=1024 * MiB, imported=256 * MiB))
    for pools, rolls in ((never_sent, False), (sent, role == "worker")):
        local = LocalGpus("pool", None, "pool")
        local.role = role
        local.heap[0] = pools
        gen = pools.current
        local.roll_and_reap(64 * MiB)
        assert gen.trims == 1 and gen.reserved() == gen.used() + gen.imported
        assert (pools.current is not gen) is rolls
    assert old.trims == 1 and old.reserved() == old.used()     # rolled generations too


@pytest.mark.parametrize("policy", ["pool", "torch"])
def test_parent_heap_policy_installs_the_heap_hooks_without_touching_cuda(policy):
    """Under ``COMFY_ENV_CUDA_PARENT_HEAP=pool`` (the default) making an executor installs
    the plane (torch imported), which queues the heap for CUDA init and makes torch's
    memory figures count it, without initialising CUDA or loading libcuda; the figures get
    the heap's bytes added.  Under ``torch`` nothing is installed or hooked."""
    code = textwrap.dedent("""
        import torch
        figures = {"allocated_bytes.all.current": 10, "active_bytes.all.current": 10,
                   "reserved_bytes.all.current": 20, "allocated_bytes.all.peak": 30,
                   "active_bytes.all.peak": 30, "reserved_bytes.all.peak": 40, "num_ooms": 0}
        # Stands in for torch's figures of a GPU (none here): the hook wraps it.
        torch.cuda.memory.memory_stats = lambda device=None: dict(figures)
        from comfy_env import IsolatedExecutor
        import comfy_env.ipc.cuda as c
        from comfy_env.ipc.cuda import driver
        from comfy_env.ipc.cuda.plane import PLANE
        with IsolatedExecutor(env=None, max_workers=1):
            pass
        hooked = getattr(torch.cuda.memory_stats, "_comfy_env_hook", False)
        print("installed", c._installed, "hooked", hooked)
        assert driver._lib is None and not torch.cuda.is_initialized()
        if hooked:
            assert torch.cuda.memory_stats(0) == figures              # no heap yet: as torch says
            class Heap:
                def bytes_held(self):
                    return (1, 2, 3, 4)       # used, reserved, used peak, reserved peak
            PLANE.local.heap[0] = Heap()
            print("with heap", torch.cuda.memory_stats(0), torch.cuda.memory_reserved(0))
    """)
    env = {**os.environ, "COMFY_ENV_CUDA_PARENT_HEAP": policy}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    if policy == "torch":
        assert out.stdout.strip() == "installed False hooked False", out.stdout
        return
    assert "installed True hooked True" in out.stdout, out.stdout
    want = {"allocated_bytes.all.current": 11, "active_bytes.all.current": 11, "reserved_bytes.all.current": 22,
            "allocated_bytes.all.peak": 33, "active_bytes.all.peak": 33, "reserved_bytes.all.peak": 44,
            "num_ooms": 0}
    assert f"with heap {want} 22" in out.stdout, out.stdout
