"""ComfyUI node adapter: proxies, calls, progress, interrupts, errors (with comfy_stub).

The demo pack in comfy_stub/packs/demo_pack is loaded exactly as ComfyUI loads a
pack (its __init__.py calls isolated_nodes), with env=None so no env is built.
Nodes are executed by comfy_stub/execution_loop.py, which calls them the way
ComfyUI's execution.py does.
"""
import inspect
import math
import os
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "comfy_stub"))
import conftest_helpers  # noqa: E402

conftest_helpers.setup_paths()

import torch  # noqa: E402

import comfy.model_management as mm  # noqa: E402
import execution_loop as el  # noqa: E402

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    old = os.environ.get("COMFY_ENV_CACHE_DIR")
    os.environ["COMFY_ENV_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    import demo_pack
    import demo_pack.nodes as originals
    yield demo_pack, originals
    for cls in set(demo_pack.NODE_CLASS_MAPPINGS.values()):
        cls._comfy_env_pack.shutdown()
    if old is None:
        os.environ.pop("COMFY_ENV_CACHE_DIR", None)
    else:
        os.environ["COMFY_ENV_CACHE_DIR"] = old


@pytest.fixture
def recorder():
    mm.interrupt_current_processing(False)
    rec = el.ProgressRecorder().install()
    yield rec
    mm.interrupt_current_processing(False)


def nodes(demo):
    return demo[0].NODE_CLASS_MAPPINGS


def same(a, b):
    """Equal, and of the same container types all the way down (tuple vs list matters)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


# ------------------------------------------------------------------- metadata

def test_every_attribute_matches_the_original_class(demo):
    pack, originals = demo
    for key, orig in originals.NODE_CLASS_MAPPINGS.items():
        prox = pack.NODE_CLASS_MAPPINGS[key]
        assert prox is not orig and prox.__module__ != orig.__module__
        public = lambda c: {n for n in dir(c) if n.isupper() and not n.startswith("_")}  # noqa: E731
        assert public(prox) == public(orig), key
        for name in public(orig):
            if name == "INPUT_TYPES":
                assert same(prox.INPUT_TYPES(), orig.INPUT_TYPES()), key
            elif not callable(getattr(orig, name)):
                assert same(getattr(prox, name), getattr(orig, name)), (key, name)
        for name in ("VALIDATE_INPUTS", "IS_CHANGED", "check_lazy_status"):
            assert hasattr(prox, name) == hasattr(orig, name), (key, name)
            if hasattr(orig, name):
                po, oo = inspect.getfullargspec(getattr(prox, name)), inspect.getfullargspec(getattr(orig, name))
                assert (po.args, po.varargs, po.varkw) == (oo.args, oo.varargs, oo.varkw), (key, name)
                assert type(inspect.getattr_static(prox, name)) is type(inspect.getattr_static(orig, name))
        assert prox.__name__ == orig.__name__ and prox.__doc__ == orig.__doc__
        assert hasattr(prox(), orig.FUNCTION)
    assert pack.NODE_DISPLAY_NAME_MAPPINGS == originals.NODE_DISPLAY_NAME_MAPPINGS


def test_input_types_is_a_fresh_copy_each_call(demo):
    cls = nodes(demo)["DemoInvertImage"]
    cls.INPUT_TYPES()["required"]["mode"][0].append("mutated")
    assert cls.INPUT_TYPES()["required"]["mode"][0] == ["fast", "exact"]


# ---------------------------------------------------------------------- calls

def test_image_and_mask_round_trip_under_inference_mode(demo, recorder):
    img = torch.rand(3, 8, 6, 3)
    mask = torch.rand(2, 8, 6)
    st, out, _ = el.execute_node(nodes(demo)["DemoInvertImage"],
                                 {"image": ("link", [img[1:]]), "strength": 0.5, "mode": "exact",
                                  "mask": ("link", [mask])}, unique_id="12")
    assert st == "success", out
    [images], [where] = out
    expected = (1.0 - img[1:] * 0.5) * mask.unsqueeze(-1)
    assert images.shape == expected.shape and torch.allclose(images, expected)
    assert where == "12:False"          # hidden UNIQUE_ID arrives; DYNPROMPT became None


def test_latent_dict_round_trips_exactly(demo, recorder):
    latent = {"samples": torch.randn(2, 4, 8, 8), "batch_index": [3, 4], "noise_mask": None}
    st, out, _ = el.execute_node(nodes(demo)["DemoLatentDouble"],
                                 {"samples": ("link", [latent]), "factor": 2.0})
    assert st == "success"
    got = out[0][0]
    assert list(got) == ["samples", "batch_index", "noise_mask"]
    assert torch.equal(got["samples"], latent["samples"] * 2)
    assert got["batch_index"] == [3, 4, 99] and got["noise_mask"] is None


def test_list_inputs_and_outputs(demo, recorder):
    st, out, _ = el.execute_node(nodes(demo)["DemoList"],
                                 {"values": ("link", [1, 2, 3]), "repeat": ("link", [2])})
    assert st == "success"
    assert out == [[10, 20, 30, 10, 20, 30], [6]]


def test_node_object_keeps_state_and_ui(demo, recorder):
    cls = nodes(demo)["DemoCounter"]
    obj = cls()
    assert el.execute_node(cls, {"step": 2}, obj=obj)[1:] == ([[2]], {"text": ["2"]})
    assert el.execute_node(cls, {"step": 3}, obj=obj)[1:] == ([[5]], {"text": ["5"]})
    assert el.execute_node(cls, {"step": 3})[1] == [[3]]     # a new node object starts afresh


def test_validate_inputs_and_is_changed_forwarded(demo):
    pack, originals = demo
    cls, orig = pack.NODE_CLASS_MAPPINGS["DemoInvertImage"], originals.InvertImage
    for strength in (0.5, 0.992):
        assert el.validate_node(cls, {"strength": strength}) == el.validate_node(orig, {"strength": strength})
    assert el.validate_node(cls, {"strength": 0.992})[0]["details"] == "strength must not be 0.99..0.995"
    assert el.is_changed(cls, {"strength": 0.5, "mode": "exact"}) == ["0.5-exact"]
    # A plain-function IS_CHANGED called on the class fails in ComfyUI: same here.
    a, b = el.is_changed(pack.NODE_CLASS_MAPPINGS["DemoChatty"], {"text": "x"}), el.is_changed(originals.Chatty, {"text": "x"})
    assert math.isnan(a) and math.isnan(b)


def test_an_interrupt_left_from_idle_does_not_fail_validation_or_is_changed(demo):
    """ComfyUI checks its interrupt flag only around a node's function: an interrupt
    pressed while idle must not fail the validation of the next prompt queued (the
    server's thread), nor be taken by it."""
    pack, originals = demo
    cls = pack.NODE_CLASS_MAPPINGS["DemoInvertImage"]
    mm.interrupt_current_processing(True)
    try:
        assert el.validate_node(cls, {"strength": 0.5}) == el.validate_node(originals.InvertImage, {"strength": 0.5})
        assert el.is_changed(cls, {"strength": 0.5, "mode": "exact"}) == ["0.5-exact"]
        assert mm.processing_interrupted()          # still there for the node that runs next
    finally:
        mm.interrupt_current_processing(False)


def test_lazy_inputs(demo, recorder):
    cls = nodes(demo)["DemoLazy"]
    assert el.execute_node(cls, {"use_b": True, "a": ("link", [None])})[:2] == ("pending", ["b"])
    assert el.execute_node(cls, {"use_b": True, "b": ("link", [7])})[:2] == ("success", [[7]])


def test_async_node(demo, recorder):
    assert el.execute_node(nodes(demo)["DemoAsync"], {"x": 21})[:2] == ("success", [[42]])


# ------------------------------------------------------------------- progress

def test_progress_reaches_the_host_hook_with_node_id_and_previews(demo, recorder):
    st, out, _ = el.execute_node(nodes(demo)["DemoSlowProgress"],
                                 {"steps": 4, "delay": 0.0, "preview": True}, unique_id="5")
    assert st == "success" and out == [[4]]
    assert [(n, v, t) for n, v, t, _ in recorder.events] == [("5", i, 4) for i in range(1, 5)]
    assert recorder.events[-1][3] == ("JPEG", [3, "preview"], 512)


# ------------------------------------------------------------------ interrupt

def _interrupt_when_progress_starts(recorder, delay=0.0):
    def go():
        deadline = time.monotonic() + 20
        while not recorder.events and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        mm.interrupt_current_processing(True)      # what ComfyUI's /interrupt does
    t = threading.Thread(target=go)
    t.start()
    return t


def _pid(demo):
    return el.execute_node(nodes(demo)["DemoPid"], {})[1][0][0]


def test_interrupt_reaches_a_node_that_checks(demo, recorder):
    pid = _pid(demo)
    t = _interrupt_when_progress_starts(recorder)
    start = time.monotonic()
    st, info, _ = el.execute_node(nodes(demo)["DemoSlowProgress"],
                                  {"steps": 2000, "delay": 0.01, "preview": False}, unique_id="9")
    t.join()
    assert st == "interrupted" and info == {"node_id": "9"}
    assert time.monotonic() - start < 4
    assert not mm.processing_interrupted()       # ComfyUI's flag was consumed, like its hook does
    assert _pid(demo) == pid                     # the worker stopped the node itself: not killed


def test_interrupt_seen_by_worker_progress_update(demo):
    # No host hook at all: only the worker's own progress hook can notice the interrupt.
    import comfy.utils
    comfy.utils.set_progress_bar_global_hook(None)
    mm.interrupt_current_processing(False)
    pid = _pid(demo)
    threading.Timer(0.5, mm.interrupt_current_processing).start()
    start = time.monotonic()
    st, _, _ = el.execute_node(nodes(demo)["DemoProgressOnly"], {"steps": 3000})
    assert st == "interrupted" and time.monotonic() - start < 4
    assert _pid(demo) == pid


def test_node_that_never_checks_is_killed_after_the_grace_period(demo, recorder):
    from comfy_env.comfyui import IsolatedPack
    pack = IsolatedPack(demo[0].NODE_CLASS_MAPPINGS["DemoPid"]._comfy_env_pack.pack_dir, ["nodes"],
                        interrupt_grace=0.5, name="demo_pack")
    classes, _ = pack.node_mappings()
    assert pack.metadata_source == "cache"
    try:
        pid = el.execute_node(classes["DemoPid"], {})[1][0][0]
        threading.Timer(0.5, mm.interrupt_current_processing).start()
        start = time.monotonic()
        st, _, _ = el.execute_node(classes["DemoStubborn"], {"seconds": 60.0})
        assert st == "interrupted" and time.monotonic() - start < 5
        assert not mm.processing_interrupted()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert el.execute_node(classes["DemoPid"], {})[1][0][0] != pid   # a fresh worker
    finally:
        pack.shutdown()


def test_a_node_that_finishes_within_the_grace_keeps_its_output(demo, recorder):
    """Interrupted while it runs, a node that never looks at the interrupt but finishes
    within the grace period keeps its output (ComfyUI's own run would, and cache it);
    the interrupt then stops the next node, as ComfyUI's flag does."""
    from comfy_env.comfyui import IsolatedPack
    pack = IsolatedPack(demo[0].NODE_CLASS_MAPPINGS["DemoPid"]._comfy_env_pack.pack_dir, ["nodes"],
                        interrupt_grace=10.0, name="demo_pack")
    classes, _ = pack.node_mappings()
    try:
        pid = el.execute_node(classes["DemoPid"], {})[1][0][0]
        threading.Timer(0.3, mm.interrupt_current_processing).start()
        st, out, _ = el.execute_node(classes["DemoStubborn"], {"seconds": 1.0})
        assert st == "success" and out[0][0] == 1, (st, out)
        assert mm.processing_interrupted()              # for the next node
        st, _, _ = el.execute_node(classes["DemoPid"], {})
        assert st == "interrupted" and not mm.processing_interrupted()
        assert el.execute_node(classes["DemoPid"], {})[1][0][0] == pid      # not killed
    finally:
        mm.interrupt_current_processing(False)
        pack.shutdown()


def test_a_killed_pre_started_worker_is_replaced_at_once(demo, recorder):
    # Pre-started pack: after the interrupt kill, the replacement worker starts in the
    # background (forked from the zygote) instead of when the next node runs.
    from comfy_env.comfyui import IsolatedPack
    pack = IsolatedPack(demo[0].NODE_CLASS_MAPPINGS["DemoPid"]._comfy_env_pack.pack_dir, ["nodes"],
                        interrupt_grace=0.5, name="demo_pack")
    classes, _ = pack.node_mappings()
    pack.prestart()
    try:
        pid = el.execute_node(classes["DemoPid"], {})[1][0][0]
        threading.Timer(0.5, mm.interrupt_current_processing).start()
        st, _, _ = el.execute_node(classes["DemoStubborn"], {"seconds": 60.0})
        assert st == "interrupted"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (pack._warm and pack._executor.worker_pids()
                                                   and pack._executor.worker_pids() != [pid]):
            time.sleep(0.05)
        [new] = pack._executor.worker_pids()      # started without a node run
        assert new != pid
        # ... and it has imported the pack's node modules already (the executor
        # replaces a dead worker by itself, but only the pack knows what to import).
        assert pack._executor.submit("sys:modules.__contains__", pack._spec["package"] + ".nodes").result()
        assert el.execute_node(classes["DemoPid"], {})[1][0][0] == new
    finally:
        pack.shutdown()


# --------------------------------------------------------------------- errors

def test_error_report_has_worker_traceback_and_type(demo, recorder):
    st, err, _ = el.execute_node(nodes(demo)["DemoFailing"], {"kind": "value"}, unique_id="3")
    assert st == "error" and err["node_id"] == "3"
    assert err["exception_type"] == "ValueError"
    assert err["exception_message"] == "bad value from the worker"
    tb = "".join(err["traceback"])
    assert "nodes.py" in tb and "in _deeper" in tb and 'raise ValueError("bad value' in tb
    assert err["traceback"][-1].strip().endswith('raise ValueError("bad value from the worker")')
    assert "worker" in str(err["exception"].__cause__) or "Traceback" in str(err["exception"].__cause__)


def test_error_types_from_the_pack(demo, recorder):
    st, err, _ = el.execute_node(nodes(demo)["DemoFailing"], {"kind": "custom"})
    assert err["exception_type"] == "demo_pack.helpers.DemoNodeError"
    assert err["exception"].args == ("custom failure", 42)
    # A type the host can't rebuild still reports its original name and message.
    st, err, _ = el.execute_node(nodes(demo)["DemoFailing"], {"kind": "local"})
    assert st == "error"
    assert err["exception_type"].endswith("LocalError"), err["exception_type"]
    assert err["exception_message"] == "only the worker knows this type"   # as in-process
    assert "in _deeper" in "".join(err["traceback"])


def test_worker_output_is_logged_with_the_pack_name(demo, recorder, caplog):
    caplog.set_level("INFO", logger="comfy_env.worker")
    assert el.execute_node(nodes(demo)["DemoChatty"], {"text": "hello"})[1] == [["HELLO"]]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        text = "\n".join(r.getMessage() for r in caplog.records)
        if "chatty says hello" in text and "chatty logs hello" in text:
            break
        time.sleep(0.05)
    lines = [r.getMessage() for r in caplog.records if "chatty" in r.getMessage()]
    assert any("chatty says hello" in m for m in lines) and any("chatty logs hello" in m for m in lines)
    assert all("[demo_pack]" in m for m in lines), lines


def test_host_command_line_reaches_a_worker_running_comfyuis_own_modules(monkeypatch):
    """comfy.cli_args parses no command line in a worker: the host's plain values travel."""
    import argparse
    import enum
    import types

    from comfy_env.comfyui import pack

    class Method(enum.Enum):
        AUTO = "auto"

    fake = types.ModuleType("comfy.cli_args")
    fake.args = argparse.Namespace(cpu=True, reserve_vram=1.5, output_directory=None,
                                   fast=["fp16"], preview_method=Method.AUTO)
    monkeypatch.setitem(sys.modules, "comfy.cli_args", fake)
    assert pack._host_cli_args() == {"cpu": True, "reserve_vram": 1.5,
                                     "output_directory": None, "fast": ["fp16"]}


def test_a_packs_executor_stops_at_interpreter_exit_instead_of_waiting(demo):
    """ComfyUI catches Ctrl-C itself and then exits normally: the exit must not wait
    for a node still running in a worker (it waited for the node to finish)."""
    pack = demo[0].NODE_CLASS_MAPPINGS["DemoPid"]._comfy_env_pack
    _pid(demo)
    assert pack.executor()._pool.stop_at_exit is True


@pytest.mark.parametrize("name", ["comfy.sd", "nodes", "server", "comfy_extras.nodes_mask", "node_helpers",
                                  "latent_preview"])
def test_a_comfyui_module_the_shim_lacks_is_explained(name):
    """In a shim worker, importing a ComfyUI module the shim has no stand-in for says why
    (the shim, what it provides, env=None), not a bare "No module named"; a module of
    any other name is left to the usual error."""
    from comfy_env.comfyui.worker_side import _ShimGapFinder
    with pytest.raises(ModuleNotFoundError, match="shim of ComfyUI") as info:
        _ShimGapFinder().find_spec(name)
    assert info.value.name == name and "env=None" in str(info.value)
    assert _ShimGapFinder().find_spec("some_pack_dependency") is None
    assert _ShimGapFinder().find_spec("comfy") is None       # the shim's own package: found earlier


def _graph_utils_of_comfyui():
    """ComfyUI's own comfy_execution/graph_utils.py (a module of plain Python), loaded
    from the tree the real-ComfyUI tests use; None where there is none."""
    import importlib.util

    import comfyui_harness
    found = comfyui_harness._tree(os.environ.get("COMFYUI_DIR")
                                  or os.path.join(comfyui_harness.REPO, "..", "shared", "comfyui"))
    if found is None:
        return None
    spec = importlib.util.spec_from_file_location(
        "_comfyui_graph_utils", os.path.join(found[0], "comfy_execution", "graph_utils.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _shim_graph_utils():
    import importlib.util

    from comfy_env.comfyui import shim
    spec = importlib.util.spec_from_file_location(
        "_shim_graph_utils", os.path.join(os.path.dirname(shim.__file__), "comfy_execution", "graph_utils.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _build_a_graph(gu):
    """The same GraphBuilder work on either module: what it produced."""
    gu.GraphBuilder.set_default_prefix("12", 3)
    g = gu.GraphBuilder()
    a = g.node("CE_Add", a=1, b=2)
    b = g.node("CE_Add", a=a.out(0), b=a.out(0))
    named = g.node("KSampler", id="named", model=b.out(0), seed=5, steps=b.out(1))
    again = g.node("Other", id="named", seed=6)
    named.set_input("seed", None)
    named.set_input("missing", None)
    named.set_input("cfg", 7.5)
    named.set_override_display_id("12")
    d = g.node("CE_Add", a=b.out(0), b=named.out(0))
    g.node("Dropped")
    g.replace_node_output("2", 1, 9)
    g.replace_node_output("named", 0, None)
    g.remove_node("4")
    second = gu.GraphBuilder()                      # the next graph index
    second.node("X", id="x")
    explicit = gu.GraphBuilder(prefix="mine.")
    explicit.node("Y")
    allocated = gu.GraphBuilder.alloc_prefix(root="r", call_index=1)
    graph, outs = gu.add_graph_prefix(g.finalize(), (d.out(0), 5, "text"), "pre.")
    links = [gu.is_link(v) for v in (["1", 0], ["1", 0.0], ("1", 0), ["1", "0"], [1, 0], ["1", 0, 1], "x")]
    return (again is named, g.prefix, g.finalize(), second.prefix, second.finalize(), explicit.finalize(),
            allocated, gu.GraphBuilder.alloc_prefix(), graph, outs, links,
            g.lookup_node("named").get_input("cfg"), g.lookup_node("absent"), vars(gu.ExecutionBlocker("why")))


def test_the_shims_graph_builder_builds_what_comfyuis_builds():
    """A node in a shim worker expands into a subgraph with the shim's GraphBuilder: the
    ids, links and serialised nodes must be ComfyUI's own, or the host runs another graph."""
    real = _graph_utils_of_comfyui()
    if real is None:
        pytest.skip("no ComfyUI tree to compare with (tests/comfyui_harness.py: COMFYUI_DIR)")
    ours = _build_a_graph(_shim_graph_utils())
    assert ours == _build_a_graph(real)
    assert ours[1] == "12.3.0." and ours[3] == "12.3.1." and ours[6] == "r.1.2."
