"""ComfyUI adapter: pack loading, metadata cache, refusals, worker lifetime, worker shim."""
import importlib
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


def test_corrupt_cache_file_is_ignored(tmp_path, cache_dir):
    pack_dir = copy_pack(tmp_path, "mixed_pack")
    IsolatedPack(pack_dir, ["nodes"]).node_mappings()
    [f] = list((cache_dir / "comfyui-metadata").iterdir())
    f.write_text("{not json")
    again = IsolatedPack(pack_dir, ["nodes"])
    again.node_mappings()
    assert again.metadata_source == "worker"


def test_v3_nodes_are_refused_clearly(tmp_path, caplog):
    with pytest.raises(PackLoadError, match="V3 node"):
        IsolatedPack(copy_pack(tmp_path, "v3_pack"), ["nodes"]).node_mappings()
    caplog.set_level(logging.ERROR)
    classes, _ = IsolatedPack(copy_pack(tmp_path, "mixed_pack"), ["nodes"]).node_mappings()
    assert list(classes) == ["MixedV1"]
    assert any("MixedV3" in r.getMessage() and "V3" in r.getMessage() for r in caplog.records)


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
