"""CPU-only tests (the CUDA driver faked) of ``devices.CALLER``: the plane may make any
GPU's context current for its driver calls, but the caller's thread gets back the
context (so torch's current device) it had — the multi-GPU case where decoding a
``cuda:1`` tensor left a ``cuda:0`` caller on ``cuda:1``."""
import ctypes as C
import threading

import pytest

from comfy_env.ipc.cuda import devices
from comfy_env.ipc.cuda import driver as D
from comfy_env.ipc.cuda.plane import CudaPlane

pytestmark = pytest.mark.timeout(30)

CTX = {0: 0x1000, 1: 0x2000}          # device ordinal -> its (fake) primary context


class FakeDriver:
    """Per-thread current context, as the driver keeps it; logs every switch."""

    def __init__(self):
        self.tls = threading.local()
        self.sets = []

    def current(self):
        return getattr(self.tls, "ctx", None)

    def make_current(self, ctx):
        self.tls.ctx = ctx

    def call(self, name, *args, detail=""):
        if self.try_call(name, *args) != 0:
            raise D.CudaError(name, 1, detail)

    def try_call(self, name, *args):
        if name == "cuCtxGetCurrent":
            args[0]._obj.value = self.current()
        elif name == "cuCtxSetCurrent":
            self.sets.append(args[0])
            self.tls.ctx = args[0]
        elif name == "cuDevicePrimaryCtxRetain":
            args[0]._obj.value = CTX[args[1]]
        else:
            raise AssertionError(f"unexpected driver call {name}")
        return 0


@pytest.fixture
def drv(monkeypatch):
    d = FakeDriver()
    monkeypatch.setattr(D, "call", d.call)
    monkeypatch.setattr(D, "try_call", d.try_call)
    monkeypatch.setattr(devices, "_contexts", {})
    return d


def test_a_scope_puts_back_the_context_use_displaced(drv):
    drv.make_current(CTX[0])
    with devices.CALLER:
        devices.use(1)
        assert drv.current() == CTX[1]
        devices.use(0)
        devices.use(1)
    assert drv.current() == CTX[0]


def test_no_context_before_means_none_after(drv):
    with devices.CALLER:
        devices.use(0)
    assert drv.current() is None
    assert drv.sets == [CTX[0], None]


def test_no_switch_means_no_driver_call_on_exit(drv):
    drv.make_current(CTX[1])
    with devices.CALLER:
        devices.use(1)
    assert drv.sets == []


def test_nested_scopes_restore_once_at_the_outermost(drv):
    drv.make_current(CTX[0])
    with devices.CALLER:
        with devices.CALLER:
            devices.use(1)
        assert drv.current() == CTX[1]          # still inside the outer scope
        devices.use(0)
        devices.use(1)
    assert drv.current() == CTX[0]
    with devices.CALLER:                        # and the next scope starts afresh
        devices.use(1)
    assert drv.current() == CTX[0]


def test_an_error_in_the_scope_still_restores(drv):
    drv.make_current(CTX[0])
    with pytest.raises(RuntimeError, match="boom"):
        with devices.CALLER:
            devices.use(1)
            raise RuntimeError("boom")
    assert drv.current() == CTX[0]


def test_the_decorator_restores_on_return_and_on_error_and_nests_with_scopes(drv):
    @devices.keeps_caller_context
    def visit(ordinal, fail=False):
        devices.use(ordinal)
        if fail:
            raise RuntimeError("boom")
        return ordinal

    drv.make_current(CTX[0])
    assert visit(1) == 1 and drv.current() == CTX[0]
    with pytest.raises(RuntimeError, match="boom"):
        visit(1, fail=True)
    assert drv.current() == CTX[0]
    with devices.CALLER:                        # inside a scope: the outermost restores
        visit(1)
        assert drv.current() == CTX[1]
    assert drv.current() == CTX[0]

    @devices.keeps_caller_context
    def outer():
        visit(1)
        assert drv.current() == CTX[1]          # the inner call is not the outermost
        return visit(0)

    drv.make_current(None)
    assert outer() == 0 and drv.current() is None


def test_use_outside_a_scope_stays(drv):
    """Our own threads (the ledger's flusher) switch without a scope: nobody to restore for."""
    drv.make_current(CTX[0])
    devices.use(1)
    assert drv.current() == CTX[1]


def test_scopes_of_threads_do_not_mix(drv):
    drv.make_current(CTX[0])
    inside, go_on, seen = threading.Event(), threading.Event(), {}

    def other():
        drv.make_current(CTX[1])
        with devices.CALLER:
            devices.use(0)
            inside.set()
            go_on.wait(10)
        seen["other"] = drv.current()

    t = threading.Thread(target=other)
    t.start()
    assert inside.wait(10)
    with devices.CALLER:
        devices.use(1)
    seen["main"] = drv.current()
    go_on.set()
    t.join(10)
    assert seen == {"main": CTX[0], "other": CTX[1]}


def test_the_plane_entry_points_keep_the_callers_context(drv, monkeypatch):
    pl = CudaPlane()
    drv.make_current(CTX[0])

    def visits_gpu1(*args, **kwargs):
        devices.use(1)
        return "done"

    for side, name in [(pl.receiver, "decode"), (pl.sender, "encode"), (pl.receiver, "open_remote"),
                       (pl.receiver, "on_reclaim"), (pl.sender, "trim"), (pl.local, "ensure_heap")]:
        monkeypatch.setattr(side, name, visits_gpu1)
    assert pl.decode(object(), None) == "done"
    assert drv.current() == CTX[0]
    assert pl.encode(object(), None) == "done"
    assert pl.open_remote(("cuda", 1), {}, -1) == "done"
    pl.on_control(None, ("reclaim", []))
    pl.ensure_heap(1)
    assert drv.current() == CTX[0]
    monkeypatch.setattr(pl.receiver.import_cache, "flush", lambda: None)
    monkeypatch.setattr(pl.receiver.ipc, "flush", lambda: None)
    monkeypatch.setattr(pl.local, "roll_and_reap", lambda idle: [])
    monkeypatch.setattr(pl.sender, "post_retired", lambda retired: None)
    pl.trim()
    assert drv.current() == CTX[0]


def test_the_frees_finisher_keeps_the_callers_context_and_is_one_object(drv, monkeypatch):
    """The ledger runs a finisher once per batch by comparing them: the plane hands out
    the same wrapped one each time."""
    import types
    from comfy_env.ipc.cuda.receiver import Receiver
    ran = []
    monkeypatch.setattr(Receiver, "finish_frees", lambda self: ran.append(devices.use(1)))
    monkeypatch.setattr(Receiver, "free_remote", lambda self, rec: True)
    pl = CudaPlane()
    record = types.SimpleNamespace(owned=False, key=("cuda", 1))
    fin = pl.on_zero(record)
    assert fin is pl.on_zero(record)
    drv.make_current(CTX[0])
    fin()
    assert ran == [None] and drv.current() == CTX[0]
