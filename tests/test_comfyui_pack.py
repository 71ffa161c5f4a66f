"""ComfyUI adapter: pack loading, metadata cache, refusals, worker lifetime, worker shim."""
import importlib
import importlib.util
import inspect
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "comfy_stub"))
import conftest_helpers  # noqa: E402
from procstate import alive  # noqa: E402
from pythons import ALL_PYTHONS  # noqa: E402

conftest_helpers.setup_paths()

from comfy_env.comfyui import IsolatedPack, PackLoadError, encoding, metadata_cache  # noqa: E402

pytestmark = pytest.mark.timeout(60)
PACKS = conftest_helpers.PACKS


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("COMFY_ENV_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def copy_pack(tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(os.path.join(PACKS, name), dst)
    return dst


def test_metadata_cache_hit_starts_no_worker_and_edits_invalidate(tmp_path, cache_dir, monkeypatch):
    pack_dir = copy_pack(tmp_path, "mixed_pack")
    first = IsolatedPack(pack_dir, ["nodes"])
    classes, _ = first.node_mappings()
    assert first.metadata_source == "worker" and first._executor is None
    files = list((cache_dir / "comfyui-metadata").iterdir())
    assert len(files) == 1 and json.loads(files[0].read_text())["pack"] == "mixed_pack"

    # "Restart": no executor may even be constructed for a cache hit.
    import comfy_env
    monkeypatch.setattr(comfy_env, "IsolatedExecutor", None, raising=False)
    second = IsolatedPack(pack_dir, ["nodes"])
    classes2, _ = second.node_mappings()
    assert second.metadata_source == "cache"
    assert classes2["MixedV1"].INPUT_TYPES() == classes["MixedV1"].INPUT_TYPES()
    monkeypatch.undo()
    monkeypatch.setenv("COMFY_ENV_CACHE_DIR", str(cache_dir))

    # Any source edit gives a new key (and replaces the stale entry).
    (pack_dir / "nodes.py").write_text((pack_dir / "nodes.py").read_text().replace('"mixed"', '"mixed/edited"'))
    third = IsolatedPack(pack_dir, ["nodes"])
    classes3, _ = third.node_mappings()
    assert third.metadata_source == "worker" and classes3["MixedV1"].CATEGORY == "mixed/edited"
    assert len(list((cache_dir / "comfyui-metadata").iterdir())) == 1


def test_cache_key_covers_sources_and_env_spec(tmp_path):
    pack_dir = copy_pack(tmp_path, "mixed_pack")
    spec = pack_dir / "comfy-env.toml"
    spec.write_text('python = "3.11"\n')
    from comfy_env.comfyui.pack import _env_fingerprint
    k1 = metadata_cache.pack_key(str(pack_dir), ["nodes"], _env_fingerprint(str(spec)))
    spec.write_text('python = "3.12"\n')
    k2 = metadata_cache.pack_key(str(pack_dir), ["nodes"], _env_fingerprint(str(spec)))
    (pack_dir / "__pycache__").mkdir(exist_ok=True)
    (pack_dir / "__pycache__" / "x.py").write_text("ignored")
    k3 = metadata_cache.pack_key(str(pack_dir), ["nodes"], _env_fingerprint(str(spec)))
    k4 = metadata_cache.pack_key(str(pack_dir), ["nodes", "more"], _env_fingerprint(str(spec)))
    assert k1 != k2 and k2 == k3 and k3 != k4
    # The prestartup script is host-only: adding one keeps the cached node definitions.
    (pack_dir / "prestartup_script.py").write_text("from comfy_env.comfyui import prestart_pack\n")
    assert metadata_cache.pack_key(str(pack_dir), ["nodes"], _env_fingerprint(str(spec))) == k3


def test_corrupt_cache_file_is_ignored(tmp_path, cache_dir):
    pack_dir = copy_pack(tmp_path, "mixed_pack")
    IsolatedPack(pack_dir, ["nodes"]).node_mappings()
    [f] = list((cache_dir / "comfyui-metadata").iterdir())
    f.write_text("{not json")
    again = IsolatedPack(pack_dir, ["nodes"])
    again.node_mappings()
    assert again.metadata_source == "worker"


@pytest.fixture
def progress_recorder():
    import comfy.model_management as mm
    import execution_loop as el
    mm.interrupt_current_processing(False)
    yield el.ProgressRecorder().install()
    mm.interrupt_current_processing(False)


@pytest.mark.parametrize("comfy_api", ["auto", "shim"])
def test_v3_pack_from_comfy_entrypoint(tmp_path, comfy_api, progress_recorder):
    from comfy_api.latest import io
    from comfy_execution.utils import CurrentNodeContext
    pack = IsolatedPack(copy_pack(tmp_path, "v3_pack"), ["nodes"], comfy_api=comfy_api)
    try:
        classes, names = pack.node_mappings()
        assert sorted(classes) == ["V3Add", "V3Lazy"] and names == {"V3Add": "Add (V3)"}
        add = classes["V3Add"]
        assert issubclass(add, io.ComfyNode) and add.__qualname__ == "AddV3"
        schema = add.GET_SCHEMA()
        assert (schema.node_id, schema.category, schema.is_output_node) == ("V3Add", "tests/v3", True)
        assert [i.id for i in schema.inputs] == ["a", "b", "mode"]
        assert schema.inputs[0].get_io_type() == "INT"
        assert schema.inputs[0].as_dict() == {"default": 1, "min": 0, "max": 100, "optional": False}
        assert schema.inputs[1].optional is True
        assert schema.inputs[2].as_dict()["options"] == ["plus", "minus"]
        assert [(o.id, o.io_type) for o in schema.outputs] == [("sum", "INT"), ("_1_STRING_", "STRING")]
        # The finalized hidden list (output node: PROMPT, EXTRA_PNGINFO added).
        assert [h.value for h in schema.hidden] == ["UNIQUE_ID", "PROMPT", "EXTRA_PNGINFO"]

        # execute, the way execution.py calls it: on a clone carrying the hidden inputs.
        clone = add.PREPARE_CLASS_CLONE({"hidden_inputs": {io.Hidden.unique_id: "7"}})
        with CurrentNodeContext("prompt-1", "7"):
            out = add.execute.__func__(clone, a=3, mode="plus", b=4)
        assert isinstance(out, io.NodeOutput)
        total, who = out.args
        assert total == 7 and who.startswith("7:") and int(who.split(":")[1]) != os.getpid()
        assert out.ui == {"text": ("sum=7",)}
        # The V3 progress API (set_progress 1/2 then 2/2 at once): first and last arrive.
        assert [(e[0], e[1], e[2]) for e in progress_recorder.events] == [("7", 1, 2), ("7", 2, 2)]

        # validate_inputs / fingerprint_inputs: forwarded, with the original's signature.
        assert inspect.getfullargspec(add.validate_inputs).args == ["cls", "a", "mode"]
        assert add.validate_inputs(a=13) == "13 is unlucky" and add.validate_inputs(a=1) is True
        assert add.fingerprint_inputs(a=5) == 5

        lazy = classes["V3Lazy"]
        assert lazy.check_lazy_status(use_b=True) == ["b"]
        assert lazy.execute(use_b=True, b=9).args == (9,)          # async execute
        assert "fingerprint_inputs" not in lazy.__dict__            # not overridden: not forwarded
    finally:
        pack.shutdown()


def test_mixed_v1_v3_pack(tmp_path):
    pack = IsolatedPack(copy_pack(tmp_path, "mixed_pack"), ["nodes"])
    try:
        classes, _ = pack.node_mappings()
        assert sorted(classes) == ["MixedV1", "MixedV3"]
        assert classes["MixedV3"].execute(x=4).args == (40,)
        assert classes["MixedV1"]().run(x=4) == (5,)
    finally:
        pack.shutdown()


def test_pack_failure_is_cached_and_logged_briefly(tmp_path, monkeypatch, caplog):
    pack_dir = copy_pack(tmp_path, "broken_pack")
    caplog.set_level(logging.DEBUG, logger="comfy_env")
    with pytest.raises(PackLoadError, match="a_dependency_nobody_installed") as first:
        IsolatedPack(pack_dir, ["nodes"]).node_mappings()
    assert first.value.__cause__ is None and first.value.__suppress_context__
    assert "Traceback" not in str(first.value)
    assert any("Traceback" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)
    # Unchanged pack: the same failure, from the cache, and no executor at all.
    import comfy_env
    real_executor = comfy_env.IsolatedExecutor
    monkeypatch.setattr(comfy_env, "IsolatedExecutor", None, raising=False)
    again = IsolatedPack(pack_dir, ["nodes"])
    with pytest.raises(PackLoadError, match="a_dependency_nobody_installed.*cached"):
        again.node_mappings()
    assert again.metadata_source == "cache"
    monkeypatch.setattr(comfy_env, "IsolatedExecutor", real_executor)
    # Edited: tried again.
    (pack_dir / "nodes.py").write_text("raise RuntimeError('still broken')\n")
    with pytest.raises(PackLoadError, match="still broken") as third:
        IsolatedPack(pack_dir, ["nodes"]).node_mappings()
    assert "cached" not in str(third.value)


def test_prestart_starts_the_worker_without_a_call(tmp_path):
    from comfy_env.comfyui import isolated_nodes
    classes, _ = isolated_nodes(str(copy_pack(tmp_path, "mixed_pack")), "nodes", prestart=True)
    pack = classes["MixedV1"]._comfy_env_pack
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (pack._executor and pack._executor.worker_pids()):
            time.sleep(0.05)
        assert pack._executor is not None and pack._executor.worker_pids()
        [pid] = pack._executor.worker_pids()
        assert classes["MixedV3"].execute(x=1).args == (10,)
        assert pack._executor.worker_pids() == [pid]     # the pre-started worker ran it
    finally:
        pack.shutdown()
    classes, _ = isolated_nodes(str(copy_pack(tmp_path / "b", "mixed_pack")), "nodes", prestart=False)
    time.sleep(0.3)
    assert classes["MixedV1"]._comfy_env_pack._executor is None


def test_progress_coalescing_keeps_first_and_last():
    from comfy_env.comfyui.pack import _coalesce

    def upd(v, preview=None):
        return ("progress", "t", v, 10, preview, None)
    first = [True]
    assert [m[2] for m in _coalesce([upd(1), upd(2), upd(3)], first)] == [1, 3]
    assert [m[2] for m in _coalesce([upd(4), upd(5, "img"), upd(6), upd(7)], first)] == [5, 7]
    assert _coalesce([("end",)], first) == []


def test_shim_progress_bar_throttles_like_comfyui(monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "shim_utils", os.path.join(conftest_helpers.SRC, "comfy_env", "comfyui", "shim", "comfy", "utils.py"))
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    sent = []
    utils.set_progress_bar_global_hook(lambda v, t, p, node_id=None: sent.append((v, p)))
    bar = utils.ProgressBar(1000)
    for i in range(1, 1001):
        bar.update(1)
        if i == 500:
            bar.update_absolute(500, preview="img")
    # First, the preview and the last; the rest fall inside 0.1 s.
    assert sent[0] == (1, None) and (500, "img") in sent and sent[-1] == (1000, None)
    assert len(sent) < 10


def test_shim_model_management_has_oom_exception_and_names_what_it_lacks():
    """Packs write ``except mm.OOM_EXCEPTION:``; without it any error inside such a try
    became an AttributeError naming OOM_EXCEPTION, hiding the real one."""
    import torch
    spec = importlib.util.spec_from_file_location(
        "shim_mm", os.path.join(conftest_helpers.SRC, "comfy_env", "comfyui", "shim", "comfy",
                                "model_management.py"))
    mm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mm)
    assert mm.OOM_EXCEPTION is torch.cuda.OutOfMemoryError
    try:
        raise ValueError("the real error")
    except mm.OOM_EXCEPTION:
        raise AssertionError("not an out-of-memory error")
    except ValueError as exc:
        assert str(exc) == "the real error"
    with pytest.raises(AttributeError, match="load_models_gpu.*stand-in.*env=None"):
        mm.load_models_gpu


def test_shim_names_what_it_provides_when_a_comfyui_module_is_missing(tmp_path):
    pack_dir = tmp_path / "gap_pack"
    pack_dir.mkdir()
    (pack_dir / "nodes.py").write_text(textwrap.dedent("""
        class Gap:
            @classmethod
            def INPUT_TYPES(cls):
                return {"required": {}}
            RETURN_TYPES = ("INT",)
            FUNCTION = "run"
            def run(self):
                import comfy.sd
        NODE_CLASS_MAPPINGS = {"Gap": Gap}
    """))
    pack = IsolatedPack(pack_dir, ["nodes"], comfy_api="shim")
    try:
        classes, _ = pack.node_mappings()
        with pytest.raises(ModuleNotFoundError, match="comfy.sd.*shim.*comfy.utils") as info:
            classes["Gap"]().run()
        assert "comfy_api.latest" in str(info.value)
    finally:
        pack.shutdown()


def test_failed_import_makes_the_pack_fail_not_comfyui(tmp_path):
    pack_dir = copy_pack(tmp_path, "broken_pack")
    sys.path.insert(0, str(tmp_path))
    try:
        # What ComfyUI's load_custom_node does: exec the pack's __init__.py, catch Exception.
        spec = importlib.util.spec_from_file_location("broken_pack_x", pack_dir / "__init__.py")
        module = importlib.util.module_from_spec(spec)
        with pytest.raises(Exception) as info:
            spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(tmp_path))
    assert isinstance(info.value, PackLoadError) and isinstance(info.value, ImportError)
    assert "a_dependency_nobody_installed" in str(info.value) and "broken_pack" in str(info.value)


@pytest.mark.parametrize("kwargs, match", [
    (dict(modules=[]), "at least one node module"),
    (dict(modules=["../evil"]), "dotted names"),
    (dict(env="missing-env.toml"), "does not exist"),
    (dict(interrupt_grace=-1), "interrupt_grace"),
    (dict(comfy_api="real"), "comfy_api"),
])
def test_bad_arguments_get_clear_errors(tmp_path, kwargs, match):
    pack_dir = copy_pack(tmp_path, "mixed_pack")
    modules = kwargs.pop("modules", ["nodes"])
    with pytest.raises((ValueError, PackLoadError), match=match):
        IsolatedPack(pack_dir, modules, **kwargs)


def test_encoding_keeps_tuples_lists_and_odd_values():
    import enum

    value = {"required": {"a": (["x", "y"], {"default": "x"}), "b": ("INT", {"min": -1, "max": float("inf")})},
             "weird": {1: "int key", "__tuple__": "tag-like key"}, "e": logging.INFO,
             "t": ("nested", ("tuple",), []), "enum": signal.SIGTERM}
    back = encoding.decode(json.loads(json.dumps(encoding.encode(value))))
    assert back == value
    assert type(back["required"]["a"]) is tuple and type(back["required"]["a"][0]) is list
    assert isinstance(back["enum"], enum.Enum)


def test_a_str_subclass_the_host_cannot_import_arrives_as_its_plain_value():
    """The popular wildcard type ``class AnyType(str)`` of a pack's own module: the host
    can't unpickle it; the type is "*" (ComfyUI's any type), not the repr "'*'"."""
    data = json.loads(json.dumps(encoding.encode(("IMAGE", signal.SIGTERM, "x"))))
    # As the worker would send it for a class only it has: the pickle fails on the host.
    from comfy_env.comfyui import encoding as enc
    any_type = {"__pickle__": "bm90IGEgcGlja2xl", "__repr__": "'*'", "__plain__": "*"}
    assert enc.decode({"__tuple__": [any_type]}) == ("*",)
    assert enc.decode({"__pickle__": "bm90IGEgcGlja2xl", "__repr__": "<X>"}) == "<X>"

    class AnyType(str):
        def __ne__(self, other):
            return False
    encoded = enc.encode(AnyType("*"))
    assert encoded == "*" or encoded["__plain__"] == "*"     # a local class doesn't pickle: plain
    assert enc.decode(data)[1] is signal.SIGTERM


WORKER_LIFETIME_SCRIPT = textwrap.dedent("""
    import os, sys, time
    sys.path[:0] = {paths!r}
    import execution_loop as el
    import demo_pack
    st, out, _ = el.execute_node(demo_pack.NODE_CLASS_MAPPINGS["DemoPid"], {{}})
    print(out[0][0], flush=True)
    if {hang!r}:
        time.sleep(60)
""")


@pytest.mark.parametrize("how", ["clean-exit", "sigkill"])
def test_workers_never_outlive_the_host(tmp_path, how):
    paths = [conftest_helpers.SRC, conftest_helpers.HERE, PACKS]
    script = tmp_path / "host.py"
    script.write_text(WORKER_LIFETIME_SCRIPT.format(paths=paths, hang=(how == "sigkill")))
    env = dict(os.environ, COMFY_ENV_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, env=env, text=True)
    try:
        pid = int(proc.stdout.readline())
        os.kill(pid, 0)                       # the worker is alive while the host is
        if how == "sigkill":
            proc.kill()
        proc.wait(timeout=20)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"worker {pid} outlived its host ({how})")
    finally:
        proc.kill()
        proc.wait()


SHIM_SCRIPT = textwrap.dedent("""
    import sys
    sys.path[:0] = [{src!r}]
    from comfy_env.comfyui import worker_side
    worker_side.initialize("p", "auto", None, {{"output_directory": "/out",
        "folder_names_and_paths": {{"checkpoints": (["/models/ckpt"], [".safetensors"])}}}})
    import comfy, comfy.utils, comfy.model_management as mm, folder_paths
    assert comfy.COMFY_ENV_SHIM
    assert folder_paths.get_output_directory() == "/out"
    assert folder_paths.get_folder_paths("checkpoints") == ["/models/ckpt"]
    comfy.utils.ProgressBar(3).update(1)        # no call running: nowhere to send, no error
    mm.interrupt_current_processing()
    try:
        comfy.utils.ProgressBar(3).update(1)
    except mm.InterruptProcessingException:
        print("interrupt seen at progress update")
    assert not mm.processing_interrupted()
    from comfy_env.comfyui import isolated_nodes
    assert isolated_nodes(__file__, "nodes") == ({{}}, {{}})   # inert inside a worker
""")


def test_worker_shim_when_comfyui_is_not_importable(tmp_path):
    script = tmp_path / "w.py"
    script.write_text(SHIM_SCRIPT.format(src=conftest_helpers.SRC))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=30,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0, out.stderr
    assert "interrupt seen at progress update" in out.stdout


PRESTART_EXIT_SCRIPT = textwrap.dedent("""
    import os, sys, time
    sys.path[:0] = {paths!r}
    from comfy_env.comfyui import isolated_nodes
    a, _ = isolated_nodes({pack_a!r}, "nodes", prestart=True)
    b, _ = isolated_nodes({pack_b!r}, "nodes", prestart=True)   # queued behind a
    pack = a["MixedV3"]._comfy_env_pack
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (pack._executor and pack._executor.worker_pids()):
        time.sleep(0.02)
    print(*pack._executor.worker_pids(), flush=True)
    # Exit now, while b may still be pre-starting: no hang, no process left.
""")


@ALL_PYTHONS
def test_prestart_then_exit_leaves_no_process(pyver, tmp_path):
    from pythons import run_script
    script = PRESTART_EXIT_SCRIPT.format(
        paths=[conftest_helpers.HERE, PACKS], pack_a=str(copy_pack(tmp_path / "a", "mixed_pack")),
        pack_b=str(copy_pack(tmp_path / "b", "mixed_pack")))
    proc = run_script(pyver, script, cwd=tmp_path, timeout=90,
                      env={"COMFY_ENV_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    pids = [int(p) for p in proc.stdout.split()]
    assert pids
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    assert not [p for p in pids if alive(p)]


def test_prestart_waits_while_a_node_call_waits_for_its_worker():
    import threading
    from comfy_env.comfyui import pack as pack_mod

    class FakePack:
        _warm = False
        _closed = False
        started_early = False
        _executor = None
        _start_in_background = IsolatedPack._start_in_background

        def __init__(self):
            self.started = threading.Event()

        def _warm_up(self):
            self.started.set()

    pack_mod._cold_calls.enter()          # a node call is waiting for its worker
    fake = FakePack()
    try:
        pack_mod._prestart_queue().put(fake)
        assert not fake.started.wait(0.5)  # not while that call waits
    finally:
        pack_mod._cold_calls.leave()
    assert fake.started.wait(10)
    warm = FakePack()
    warm._warm = True                      # already warm (a call came first): skipped
    pack_mod._prestart_queue().put(warm)
    last = FakePack()
    pack_mod._prestart_queue().put(last)
    assert last.started.wait(10) and not warm.started.is_set()


def test_v3_nodes_need_the_hosts_comfy_api(tmp_path, monkeypatch, caplog):
    from comfy_env.comfyui import proxy
    pack_dir = copy_pack(tmp_path, "mixed_pack")
    IsolatedPack(pack_dir, ["nodes"]).node_mappings()        # metadata cached
    monkeypatch.setattr(proxy, "_record_types", None)
    monkeypatch.setitem(sys.modules, "comfy_api.latest", None)   # a ComfyUI without it
    caplog.set_level(logging.ERROR)
    classes, _ = IsolatedPack(pack_dir, ["nodes"]).node_mappings()
    assert list(classes) == ["MixedV1"]
    assert any("MixedV3" in r.getMessage() and "comfy_api" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- prestart_pack (prestartup_script.py)

def _wait_for_worker(pack, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ex = pack._executor
        if ex is not None and ex.worker_pids() and pack._warm:
            return ex.worker_pids()
        time.sleep(0.05)
    raise AssertionError(f"no warm worker for {pack.name} after {timeout}s")


@pytest.mark.parametrize("cached", [False, True])
def test_prestart_pack_worker_is_adopted_by_isolated_nodes(tmp_path, cached):
    from comfy_env.comfyui import early, isolated_nodes, prestart_pack
    pack_dir = copy_pack(tmp_path, "mixed_pack")
    if cached:
        IsolatedPack(pack_dir, ["nodes"]).node_mappings()      # metadata cached, no worker kept
    assert prestart_pack(str(pack_dir / "prestartup_script.py"), "nodes") is None
    started = early._early[str(pack_dir)]
    [pid] = _wait_for_worker(started)
    classes, _ = isolated_nodes(str(pack_dir / "__init__.py"), "nodes")
    pack = classes["MixedV1"]._comfy_env_pack
    try:
        assert pack is started and pack.started_early and str(pack_dir) not in early._early
        assert pack.metadata_source == ("cache" if cached else "worker")
        assert classes["MixedV3"].execute(x=1).args == (10,)
        assert pack._executor.worker_pids() == [pid]      # the early worker ran it
    finally:
        pack.shutdown()


def test_prestart_pack_with_other_options_is_replaced_and_said(tmp_path, caplog):
    from comfy_env.comfyui import early, isolated_nodes, prestart_pack
    pack_dir = copy_pack(tmp_path, "mixed_pack")
    prestart_pack(str(pack_dir), "nodes", comfy_api="shim")
    started = early._early[str(pack_dir)]
    [pid] = _wait_for_worker(started)
    caplog.set_level(logging.WARNING, logger="comfy_env.comfyui")
    classes, _ = isolated_nodes(str(pack_dir), "nodes")
    pack = classes["MixedV1"]._comfy_env_pack
    try:
        assert pack is not started and started._closed
        [msg] = [r.getMessage() for r in caplog.records if "prestartup_script.py" in r.getMessage()]
        assert "comfy_api='shim' in prestartup_script.py vs 'auto' in isolated_nodes()" in msg
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and alive(pid):
            time.sleep(0.05)
        assert not alive(pid)
        assert classes["MixedV3"].execute(x=2).args == (20,)
    finally:
        pack.shutdown()


def test_prestart_pack_can_be_turned_off(tmp_path, monkeypatch):
    from comfy_env.comfyui import early, prestart_pack
    pack_dir = copy_pack(tmp_path, "mixed_pack")
    prestart_pack(str(pack_dir), "nodes", prestart=False)
    monkeypatch.setenv("COMFY_ENV_PRESTART", "0")
    prestart_pack(str(pack_dir), "nodes")
    assert str(pack_dir) not in early._early


def test_prestart_pack_failures_are_logged_once_and_loading_takes_over(tmp_path, caplog):
    from comfy_env.comfyui import early, isolated_nodes, prestart_pack
    caplog.set_level(logging.DEBUG, logger="comfy_env.comfyui")
    # A bad argument: logged, never raised (ComfyUI would report a failed prestartup script).
    prestart_pack(str(tmp_path / "nowhere" / "prestartup_script.py"), "nodes")
    assert [r.levelno for r in caplog.records if "prestart_pack" in r.getMessage()] == [logging.WARNING]
    # The pack's own code fails: reported once, by isolated_nodes (which caches it).
    pack_dir = copy_pack(tmp_path, "broken_pack")
    prestart_pack(str(pack_dir), "nodes")
    started = early._early[str(pack_dir)]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any("early worker" in r.getMessage() for r in caplog.records):
        time.sleep(0.05)
    caplog.clear()
    with pytest.raises(PackLoadError):
        isolated_nodes(str(pack_dir), "nodes")
    assert started._closed and started._executor is None
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
    # Cached failure: no early worker at all next time.
    prestart_pack(str(pack_dir), "nodes")
    assert str(pack_dir) not in early._early


PRESTART_PACK_EXIT_SCRIPT = textwrap.dedent("""
    import os, sys, time
    sys.path[:0] = {paths!r}
    from comfy_env.comfyui import early, prestart_pack
    prestart_pack({pack!r}, "nodes")
    pack = early._early[{pack!r}]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (pack._executor and pack._executor.worker_pids()):
        time.sleep(0.02)
    # The worker is up: nothing in this process imported torch for it.
    print("torch imported:", "torch" in sys.modules, flush=True)
    ex = pack._executor
    z = getattr(ex._pool, "zygote", None)
    print(*ex.worker_pids(), *([z._proc.pid] if z is not None and z._proc else []), flush=True)
    # Exit without the pack ever being loaded (isolated_nodes never called).
""")


@ALL_PYTHONS
def test_prestart_pack_never_adopted_leaves_no_process(pyver, tmp_path):
    from pythons import run_script
    pack = str(copy_pack(tmp_path, "mixed_pack"))
    proc = run_script(pyver, PRESTART_PACK_EXIT_SCRIPT.format(
        paths=[conftest_helpers.HERE, PACKS], pack=pack), cwd=tmp_path, timeout=90,
        env={"COMFY_ENV_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.splitlines()[:2]
    assert first == "torch imported: False"      # ComfyUI imports torch after prestartup scripts
    pids = [int(p) for p in second.split()]
    assert pids
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    assert not [p for p in pids if alive(p)]


def test_env_none_workers_fork_from_a_zygote_that_preloads_torch(tmp_path):
    pytest.importorskip("torch")
    pack_dir = copy_pack(tmp_path, "mixed_pack")
    pack = IsolatedPack(pack_dir, ["nodes"])
    assert pack.preload == ["torch"]
    assert IsolatedPack(pack_dir, ["nodes"], preload=[]).preload == []
    classes, _ = pack.node_mappings()
    try:
        assert classes["MixedV3"].execute(x=1).args == (10,)
        ex = pack._executor
        zygote = ex._pool.zygote
        [pid] = ex.worker_pids()
        with open(f"/proc/{pid}/stat") as f:
            ppid = int(f.read().rpartition(")")[2].split()[1])
        assert zygote is not None and ppid == zygote._proc.pid
        os.kill(pid, signal.SIGKILL)           # as after an interrupt that the node ignored
        deadline = time.monotonic() + 30
        while True:
            try:
                assert classes["MixedV3"].execute(x=3).args == (30,)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
        [new] = ex.worker_pids()
        assert new != pid and ex._pool.zygote._proc.pid == ppid    # forked by the same zygote
    finally:
        pack.shutdown()


def test_adopted_worker_gets_comfyuis_folders_as_they_are_at_load(tmp_path, monkeypatch):
    # The early worker started before other packs added folders (or --temp-directory
    # was applied): adopting it updates the running worker and any replacement.
    import types
    from comfy_env.comfyui import isolated_nodes, prestart_pack
    fp = types.ModuleType("folder_paths")
    fp.output_directory = str(tmp_path / "early")
    fp.folder_names_and_paths = {}
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    pack_dir = copy_pack(tmp_path, "mixed_pack")
    prestart_pack(str(pack_dir), "nodes", comfy_api="shim")
    from comfy_env.comfyui import early
    started = early._early[str(pack_dir)]
    _wait_for_worker(started)
    ask = "folder_paths:get_output_directory"
    assert started._executor.submit(ask).result() == str(tmp_path / "early")
    fp.output_directory = str(tmp_path / "loaded")
    fp.folder_names_and_paths = {"loras": ([str(tmp_path / "loras")], {".safetensors"})}
    classes, _ = isolated_nodes(str(pack_dir), "nodes", comfy_api="shim")
    pack = classes["MixedV1"]._comfy_env_pack
    try:
        assert pack is started
        assert pack._executor.submit(ask).result() == str(tmp_path / "loaded")
        assert pack._executor.submit("folder_paths:get_folder_paths", "loras").result() == \
            [str(tmp_path / "loras")]
        [pid] = pack._executor.worker_pids()
        os.kill(pid, signal.SIGKILL)              # a replacement starts from initargs
        deadline = time.monotonic() + 30
        while True:
            try:
                got = pack._executor.submit(ask).result()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
        assert got == str(tmp_path / "loaded") and pack._executor.worker_pids() != [pid]
    finally:
        pack.shutdown()
