"""The ComfyUI adapter in the real, unmodified ComfyUI (headless, over HTTP and websocket).

One ComfyUI start for the module, with four packs in a scratch --base-directory
(tests/comfyui_real_packs): V1 and V3 nodes isolated with env=None, V1 + V3 nodes in
a separate env built offline from a local wheel, and an ordinary probe node that
reports the values it receives.  Skipped, with the reason, when no ComfyUI is given:
see tests/comfyui_harness.py (COMFYUI_DIR, COMFYUI_PYTHON).  The unit tests
(test_comfyui.py, test_comfyui_pack.py) use the stand-in in tests/comfy_stub.
"""
import json
import os
import shutil
import time

import pytest

import comfyui_harness as h
from test_envs_helpers import demo_dep_wheel

pytestmark = [pytest.mark.comfyui_real, pytest.mark.timeout(600)]

PACKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "comfyui_real_packs")
COLOR = 0x336699                      # EmptyImage's color: r, g, b = 0.2, 0.4, 0.6
RGB = (0x33 / 255, 0x66 / 255, 0x99 / 255)
SIZE = 256


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    tree, py = h.locate()
    if tree is None:
        pytest.skip(py)
    base = tmp_path_factory.mktemp("comfyui-base")
    nodes = base / "custom_nodes"
    nodes.mkdir()
    for name in ("ce_v1", "ce_v3", "ce_sep", "ce_probe"):
        shutil.copytree(os.path.join(PACKS, name), nodes / name)
    wheels = tmp_path_factory.mktemp("wheels")
    demo_dep_wheel(str(wheels), "1.0")
    (nodes / "ce_sep" / "comfy-env.toml").write_text(
        'name = "ce-sep-test"\nrequirements = ["demo_dep==1.0"]\n'
        f'find_links = ["{wheels}"]\nno_index = true\nshare = ["torch", "numpy", "pillow"]\n')
    # A pack whose node module can't be imported: listed as failed, briefly.
    (nodes / "ce_broken").mkdir()
    (nodes / "ce_broken" / "__init__.py").write_text(
        "from comfy_env.comfyui import isolated_nodes\n"
        "NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = isolated_nodes(__file__, 'nodes')\n")
    (nodes / "ce_broken" / "nodes.py").write_text("import a_module_nobody_has\n")
    # Folders set by main.py's options, which a worker's fresh folder_paths never saw.
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    (elsewhere / "ckpts").mkdir()
    (elsewhere / "extra_model_paths.yaml").write_text(
        f"extra:\n    base_path: {elsewhere}\n    checkpoints: ckpts\n")
    server = h.ComfyUI(tree, py, str(base),
                       env={"COMFY_ENV_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
                            "COMFY_ENV_INTERRUPT_GRACE": "20"},
                       args=["--output-directory", str(elsewhere / "out"),
                             "--extra-model-paths-config", str(elsewhere / "extra_model_paths.yaml")])
    server.elsewhere = str(elsewhere)
    server.start(timeout=300)
    ws = server.connect()
    server.ws = ws
    yield server
    ws.close()
    server.stop()


def empty_image(color=COLOR, size=SIZE):
    return h.api_node("EmptyImage", width=size, height=size, batch_size=1, color=color)


def probe(src, tag=""):
    return h.api_node("CE_Probe", value=src, tag=tag)


def run(comfy, prompt, **kw):
    pid, events = comfy.run(prompt, comfy.ws, **kw)
    return pid, events, events[-1]


def ok(comfy, prompt, **kw):
    pid, events, last = run(comfy, prompt, **kw)
    assert last["type"] == "execution_success", (last, comfy.log()[-3000:])
    return comfy.history(pid)["outputs"], events


def probed(outputs, node):
    return outputs[node]["probe"][0]


def worker_pid(comfy, seed):
    out, _ = ok(comfy, {"1": h.api_node("CE_Pid", seed=seed), "2": probe(["1", 0])})
    return int(probed(out, "2")["value"])


def test_workers_are_prestarted(comfy):
    # Before any prompt: the three loadable isolated packs each have a worker already.
    deadline = time.monotonic() + 60
    kids = []
    while time.monotonic() < deadline:
        kids = [p for p in h.descendants(comfy.proc.pid) if h.alive(p)]
        cmdlines = []
        for p in kids:
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    cmdlines.append(f.read())
            except OSError:
                pass
        if sum(b"comfy_env" in c for c in cmdlines) >= 3:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"expected 3 pre-started workers under ComfyUI, found {kids}")


def test_prestartup_script_workers_are_adopted(comfy):
    log = comfy.log()
    # ComfyUI ran both packs' prestartup scripts, before it imported torch.
    assert "PRESTARTUP FAILED" not in log
    assert "Torch already imported" not in log
    lines = log.splitlines()
    for pack in ("ce_v1", "ce_sep"):
        loaded = [ln for ln in lines if f"comfy-env: [{pack}] " in ln and "isolated node(s)" in ln]
        assert loaded and "worker started by prestartup_script.py" in loaded[0], loaded
    assert "started with other options" not in log
    # ce_v3 has no prestartup script: pre-started after loading, as before.
    assert not any("[ce_v3]" in ln and "prestartup_script.py" in ln for ln in lines)


def test_object_info_of_v1_and_v3_proxies(comfy):
    info = comfy.get("/object_info")
    assert info["CE_Invert"]["display_name"] == "Invert (isolated)"
    assert info["CE_Invert"]["input"]["required"]["image"] == ["IMAGE"]
    scale = info["CE3_Scale"]
    assert scale["display_name"] == "Scale (V3, isolated)" and scale["category"] == "ce/v3"
    assert scale["description"] == "multiplies an image" and scale["output_node"] is True
    assert scale["input"]["required"]["factor"] == ["FLOAT", {"default": 0.5, "min": 0.0, "max": 2.0, "step": 0.1}]
    assert scale["input"]["hidden"]["unique_id"] == ["UNIQUE_ID"]
    assert scale["output"] == ["IMAGE", "STRING"] and scale["output_name"] == ["scaled", "who"]
    # Defined with comfy-env's shim of comfy_api in the separate env:
    sep = info["CE3_SepScale"]
    assert sep["input"]["required"] == {"image": ["IMAGE", {}], "factor": ["FLOAT", {"default": 2.0}]}
    assert sep["output_node"] is True
    # Outputs declared without an id are labelled with their type, as in-process (they
    # showed the "_0_IMAGE_" id finalize() gives them).
    assert sep["output_name"] == ["IMAGE"]
    assert info["CE3_Text"]["output_name"] == ["STRING"] and info["CE3_Even"]["output_name"] == ["INT"]
    assert "ce_broken" not in str(info)


def test_node_code_in_the_worker_sees_comfyuis_folders(comfy):
    """env=None: the worker imports ComfyUI's own folder_paths afresh; --base-directory
    (and the other folder options, extra model paths) must reach it."""
    import json
    out, _ = ok(comfy, {"1": h.api_node("CE_Folders", seed=int(time.time()) % 100000), "2": probe(["1", 0])})
    seen = json.loads(probed(out, "2")["value"])
    base, elsewhere = os.path.realpath(comfy.base_dir), os.path.realpath(comfy.elsewhere)
    assert os.path.realpath(seen["output"]) == os.path.join(elsewhere, "out"), seen     # --output-directory
    assert os.path.realpath(seen["input"]) == os.path.join(base, "input"), seen         # --base-directory
    assert os.path.join(elsewhere, "ckpts") in map(os.path.realpath, seen["checkpoints"]), seen   # extra paths
    # ComfyUI's own top-level modules resolve as in the host: its utils package (not
    # comfy/utils.py, first on the path ComfyUI gives custom nodes), so `server` imports.
    assert seen["utils"].endswith(os.path.join("utils", "__init__.py")) and seen["server"] == "server", seen


def test_isolated_nodes_of_two_packs_expanding_in_one_prompt_keep_their_own_subgraphs(comfy):
    """A node that expands names its subgraph's nodes from ComfyUI's per-call prefix
    (GraphBuilder.set_default_prefix): each pack's worker gets the host's, or the two
    subgraphs got the same ids and one replaced the other (a wrong result, no error)."""
    out, _ = ok(comfy, {"1": h.api_node("CE_Expand", a=2, b=3), "2": probe(["1", 0]),
                        "3": h.api_node("CE3_Expand", x=3), "4": probe(["3", 0]),
                        "5": h.api_node("CE_Expand", a=10, b=20), "6": probe(["5", 0])})
    assert probed(out, "2")["value"] == 6
    assert probed(out, "4")["value"] == 12
    assert probed(out, "6")["value"] == 31


def test_a_node_in_a_shim_env_expands_with_the_shims_graph_builder_and_blocks_with_its_blocker(comfy):
    """A pack in its own env (the shim of ComfyUI) builds its subgraph with the shim's
    GraphBuilder, beside a pack with ComfyUI's own: both subgraphs run, each under its own
    ids; an ExecutionBlocker it returns is ComfyUI's own in the host (the nodes that use
    the output are blocked and the message reported)."""
    out, _ = ok(comfy, {"1": h.api_node("CE_SepExpand", a=2, b=3), "2": probe(["1", 0]),
                        "3": h.api_node("CE_Expand", a=2, b=3), "4": probe(["3", 0]),
                        "5": h.api_node("CE_SepExpand", a=10, b=20), "6": probe(["5", 0])})
    assert probed(out, "2")["value"] == 10
    assert probed(out, "4")["value"] == 6
    assert probed(out, "6")["value"] == 60
    _, events, _ = run(comfy, {"1": h.api_node("CE_SepBlock", why="no input today"), "2": probe(["1", 0], tag="b")})
    errors = [e["data"] for e in events if e["type"] == "execution_error"]
    assert [(e["exception_type"], e["node_id"]) for e in errors] == [("ExecutionBlocked", "2")], errors
    assert "no input today" in errors[0]["exception_message"]


def test_images_pass_through_isolated_nodes_exactly(comfy):
    out, _ = ok(comfy, {
        "1": empty_image(),
        "2": h.api_node("CE_Invert", image=["1", 0]), "3": probe(["2", 0]),        # V1, env=None
        "4": h.api_node("CE3_Scale", image=["2", 0], factor=0.5), "5": probe(["4", 0]),  # V3, env=None
        "6": h.api_node("CE3_SepScale", image=["1", 0], factor=2.0), "7": probe(["6", 0]),  # V3, own env
    })
    n = SIZE * SIZE
    inv = [1 - c for c in RGB]
    assert probed(out, "3")["shape"] == [1, SIZE, SIZE, 3]
    assert probed(out, "3")["first"] == pytest.approx(inv + inv[:1], abs=1e-6)
    assert probed(out, "3")["sum"] == pytest.approx(n * sum(inv), rel=1e-5)
    assert probed(out, "5")["sum"] == pytest.approx(n * sum(inv) / 2, rel=1e-5)
    assert probed(out, "7")["first"] == pytest.approx([min(1, 2 * c) for c in RGB] + [2 * RGB[0]], abs=1e-6)


def test_ui_outputs_v1_and_v3(comfy):
    out, _ = ok(comfy, {
        "1": h.api_node("CE_Text", text="hello"),
        "2": h.api_node("CE3_Text", value="stressed"),                 # async execute
        "3": empty_image(size=16), "4": h.api_node("CE3_Scale", image=["3", 0], factor=1.0),
        "5": h.api_node("CE3_SepScale", image=["3", 0], factor=1.0),
    })
    assert out["1"] == {"text": ["HELLO"]}
    assert out["2"] == {"text": ["desserts"]}
    [img] = out["4"]["images"]
    assert img["type"] == "temp" and os.path.isfile(os.path.join(comfy.base_dir, "temp", img["filename"]))
    assert out["5"] == {"text": ["demo_dep 1.0"]}


def _png_text(path):
    """A PNG's tEXt chunks (this test's venv has no Pillow): {key: text}."""
    import struct
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    out, pos = {}, 8
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        if kind == b"tEXt":
            key, _, value = body.partition(b"\0")
            out[key.decode("latin-1")] = value.decode("latin-1")
        pos += 12 + n
    return out


def test_a_preview_saved_by_the_shim_is_numbered_and_carries_the_workflow_as_comfyuis(comfy):
    """The shim's ui.PreviewImage (a separate env) saves as ComfyUI's own does: the
    prompt and extra_pnginfo as PNG text (dragging the preview back into ComfyUI loads
    the workflow), numbered after the files already there (from _00001_, never
    overwriting one)."""
    prompt = {"1": empty_image(size=16), "2": h.api_node("CE3_SepPreview", image=["1", 0])}
    names = []
    for _ in range(2):
        out, _ = ok(comfy, prompt, extra_data={"extra_pnginfo": {"workflow": {"nodes": [1, 2]}}})
        [img] = out["2"]["images"]
        assert img["type"] == "temp" and img["subfolder"] == ""
        names.append(img["filename"])
        text = _png_text(os.path.join(comfy.base_dir, "temp", img["filename"]))
        assert json.loads(text["prompt"])["2"]["class_type"] == "CE3_SepPreview", text
        assert json.loads(text["workflow"]) == {"nodes": [1, 2]}, text
    assert all(n.endswith("_00001_.png") for n in names), names


def test_hidden_inputs_and_worker_identity(comfy):
    out, _ = ok(comfy, {"1": empty_image(size=8), "2": h.api_node("CE3_Scale", image=["1", 0], factor=0.3),
                        "3": probe(["2", 1]),
                        "4": h.api_node("CE_SepInfo", seed=1), "5": probe(["4", 0])})
    node, pid = probed(out, "3")["value"].split(":")
    assert node == "2" and int(pid) != comfy.proc.pid
    dep, shim, sep_pid = probed(out, "5")["value"].split()
    assert (dep, shim) == ("demo_dep=1.0", "shim=True")
    assert int(sep_pid.split("=")[1]) not in (comfy.proc.pid, int(pid))


def test_progress_first_and_last_never_dropped(comfy):
    for seed in range(1, 7):
        _, events = ok(comfy, {"1": h.api_node("CE_FastProgress", seed=seed), "2": probe(["1", 0])})
        got = [(e["data"]["value"], e["data"]["max"]) for e in events
               if e["type"] == "progress" and e["data"]["node"] == "1"]
        assert got == [(1, 2), (2, 2)], (seed, got)
    for prompt, node in (({"1": empty_image(size=8), "2": h.api_node("CE3_Scale", image=["1", 0], factor=0.7)}, "2"),
                         ({"1": h.api_node("CE_SepInfo", seed=7), "2": probe(["1", 0])}, "1")):
        _, events = ok(comfy, prompt)
        got = [(e["data"]["value"], e["data"]["max"]) for e in events
               if e["type"] == "progress" and e["data"]["node"] == node]
        assert got == [(1, 2), (2, 2)], (node, got)


def test_node_error_reaches_comfyui_with_the_node_traceback(comfy):
    _, _, last = run(comfy, {"1": h.api_node("CE_Fail", x=42), "2": probe(["1", 0])})
    assert last["type"] == "execution_error"
    data = last["data"]
    assert data["node_id"] == "1" and data["exception_type"] == "ValueError"
    assert data["exception_message"].strip() == "bad value 42"     # ComfyUI appends "\n<tips>"
    tb = "".join(data["traceback"])
    assert os.path.join("ce_v1", "nodes.py") in tb and "_check" in tb


def test_missing_comfyui_module_in_the_shim_is_explained(comfy):
    _, _, last = run(comfy, {"1": h.api_node("CE_SepGap", seed=1), "2": probe(["1", 0])})
    assert last["type"] == "execution_error"
    assert "comfy.sd" in last["data"]["exception_message"]
    assert "shim" in last["data"]["exception_message"]


def test_v3_validate_inputs_rejects_the_prompt(comfy):
    with pytest.raises(h.PromptRejected) as info:
        comfy.queue({"1": h.api_node("CE3_Even", x=3), "2": probe(["1", 0])})
    assert "x must be even, got 3" in str(info.value.body)
    out, _ = ok(comfy, {"1": h.api_node("CE3_Even", x=8), "2": probe(["1", 0])})
    assert probed(out, "2")["value"] == 4
    # V1's VALIDATE_INPUTS the same way (both run off ComfyUI's event loop).
    with pytest.raises(h.PromptRejected) as info:
        comfy.queue({"1": h.api_node("CE_Validated", x=3), "2": probe(["1", 0])})
    assert "x must be even, got 3" in str(info.value.body)
    out, _ = ok(comfy, {"1": h.api_node("CE_Validated", x=6), "2": probe(["1", 0])})
    assert probed(out, "2")["value"] == 6


@pytest.mark.parametrize("node", ["CE_WaitProgress", "CE_WaitFlag"])
def test_interrupt(comfy, node):
    before = worker_pid(comfy, seed=hash(node) % 1000)
    sent = []

    def on_event(e):
        if not sent and e["type"] == "executing" and e["data"].get("node") == "1":
            time.sleep(0.3)             # let the node start in the worker
            comfy.interrupt()
            sent.append(time.monotonic())

    _, _, last = run(comfy, {"1": h.api_node(node, seed=int(time.time()) % 100000), "2": probe(["1", 0])},
                     timeout=60, on_event=on_event)
    assert sent and last["type"] == "execution_interrupted", last
    # Stopped by the node itself (progress hook / its own check), well inside the 20 s
    # grace: the worker was not killed.
    assert worker_pid(comfy, seed=hash(node) % 1000 + 1) == before


def test_validating_a_prompt_while_the_packs_worker_runs_a_node_leaves_the_server_responsive(comfy):
    """VALIDATE_INPUTS waits for the pack's worker, busy with a running node: on
    ComfyUI's event loop that wait froze the whole HTTP server (/system_stats, /interrupt)."""
    import threading
    started = []

    def on_event(e):
        if not started and e["type"] == "executing" and e["data"].get("node") == "1":
            started.append(1)
            queued = []
            t = threading.Thread(target=lambda: queued.append(comfy.queue(
                {"1": h.api_node("CE_Validated", x=4), "2": probe(["1", 0])})), daemon=True)
            t.start()
            time.sleep(0.5)             # the validation waits for the worker now
            t0 = time.monotonic()
            comfy.get("/system_stats", timeout=20)
            started.append(time.monotonic() - t0)
            comfy.interrupt()
            t.join(30)
            started.append(queued)

    _, _, last = run(comfy, {"1": h.api_node("CE_WaitFlag", seed=int(time.time()) % 100000),
                             "2": probe(["1", 0])}, timeout=90, on_event=on_event)
    assert last["type"] == "execution_interrupted", last
    assert started[1] < 2, started          # answered while the validation waited
    assert started[2], started              # and the prompt was queued once the worker was free


def ppid(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rpartition(")")[2].split()[1])


def test_crashing_node_fails_and_the_next_run_gets_a_new_worker(comfy):
    before = worker_pid(comfy, seed=11)
    zygote = ppid(before)
    _, _, last = run(comfy, {"1": h.api_node("CE_Crash", seed=1), "2": probe(["1", 0])})
    assert last["type"] == "execution_error"
    assert "WorkerCrashed" in last["data"]["exception_type"]
    assert "SIGKILL" in last["data"]["exception_message"] or "-9" in last["data"]["exception_message"]
    after = worker_pid(comfy, seed=12)
    assert after != before and not h.alive(before)
    # env=None: the new worker was forked from the pack's zygote (it preloads torch),
    # the same one as before, instead of starting from scratch.
    assert zygote != comfy.proc.pid and ppid(zygote) == comfy.proc.pid
    assert ppid(after) == zygote


def test_failed_pack_is_reported_briefly(comfy):
    log = comfy.log().partition("Starting server")[0]
    assert "IMPORT FAILED" in log and "ce_broken" in log
    lines = [ln for ln in log.splitlines() if "a_module_nobody_has" in ln]
    # comfy-env's line and ComfyUI's own report, not the worker traceback over and over.
    assert 1 <= len(lines) <= 4, lines
    assert "worker.py" not in log


def _comfy_env_descendants(pid):
    out = []
    for p in h.descendants(pid):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if b"comfy_env" in f.read():
                    out.append(p)
        except OSError:
            pass
    return out


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGINT"])
def test_comfyui_stopped_during_start_leaves_no_process(tmp_path, sig):
    # ComfyUI is stopped while the worker a prestartup script started is still
    # starting (SIGKILL: no atexit, the executor's parent-death watch; SIGINT: atexit).
    import signal as signal_mod
    tree, py = h.locate()
    if tree is None:
        pytest.skip(py)
    nodes = tmp_path / "custom_nodes"
    nodes.mkdir()
    shutil.copytree(os.path.join(PACKS, "ce_v1"), nodes / "ce_v1")
    server = h.ComfyUI(tree, py, str(tmp_path), env={"COMFY_ENV_CACHE_DIR": str(tmp_path / "cache")})
    server.start(wait=False)
    deadline = time.monotonic() + 120
    seen = set()
    while time.monotonic() < deadline and server.proc.poll() is None:
        seen.update(_comfy_env_descendants(server.proc.pid))
        if seen:
            break
        time.sleep(0.02)
    assert seen, "no comfy-env process was started from the prestartup script:\n" + server.log()[-3000:]
    time.sleep(0.3)
    seen.update(h.descendants(server.proc.pid))
    server.stop(sig=getattr(signal_mod, sig), timeout=60)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(h.alive(p) for p in seen):
        time.sleep(0.1)
    assert not [p for p in seen if h.alive(p)], server.log()[-3000:]


def test_zz_no_process_outlives_comfyui(comfy):
    # Stopped with Ctrl-C (SIGINT, which ComfyUI catches before it exits normally) while
    # an isolated node sleeps 60 s: the exit does not wait for it.
    comfy.queue({"1": h.api_node("CE_Sleep", seed=int(time.time()) % 100000), "2": probe(["1", 0])})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        msg = comfy.ws.recv(timeout=1)
        if isinstance(msg, dict) and msg.get("type") == "executing" and \
                (msg.get("data") or {}).get("node") == "1":
            break
    time.sleep(1)                   # the node runs in its worker now
    comfy.ws.close()
    t0 = time.monotonic()
    kids = comfy.stop(timeout=50)
    assert time.monotonic() - t0 < 20, comfy.log()[-3000:]
    assert kids, "ComfyUI had no worker processes to check"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(h.alive(p) for p in kids):
        time.sleep(0.1)
    assert not [p for p in kids if h.alive(p)]
