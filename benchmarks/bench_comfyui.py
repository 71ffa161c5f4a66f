"""comfy-env's ComfyUI adapter in the real ComfyUI: per-node overhead, first run, start time.

    COMFYUI_DIR=../shared/comfyui python benchmarks/bench_comfyui.py [--prompts 15] [--starts 3]
        [--parts overhead,starts,restart]

ComfyUI and its python are found as tests/comfyui_harness.py says (COMFYUI_DIR,
COMFYUI_PYTHON, or the cached venv of make-venv.sh).  Packs: tests/comfyui_real_packs.

1. Per-node overhead (``--parts overhead``).  Prompts ``EmptyImage -> Tick0 -> X -> Tick1``:
   the Tick nodes (ordinary in-process nodes) report ``perf_counter_ns`` when they run,
   so ``Tick1 - Tick0`` is X's run plus ComfyUI's own per-node bookkeeping.  X is the
   isolated node (ce_v1, env=None) or the same class loaded in-process (ce_local); the
   overhead is the difference of the medians.  X: a scalar node (``Add``), and a node
   that returns its image (``Passthrough``) at 512² and 2048², with a new image each
   prompt (EmptyImage's color changes: the tensor is new, as an upstream node's output
   is in a real workflow) and with the same image object again (ComfyUI's cache
   answered EmptyImage: the tensor already lives in shared memory); every prompt
   changes a seed so ComfyUI's cache never answers X.  The two variants alternate
   prompt by prompt.  Reference: one single-threaded copy of the image's bytes (numpy
   ``copyto`` into memory already touched), in this process.
2. First node run after ComfyUI reports ready (``--parts starts``; ``/system_stats``
   answers): a prompt ``Tick0 -> Add -> Tick1`` is queued at once; ``Tick1 - Tick0``
   with the worker started by the pack's ``prestartup_script.py`` (``prestart_pack``),
   pre-started after the pack loads (no prestartup script), and not pre-started
   (``COMFY_ENV_PRESTART=0``), for the pack ComfyUI loaded first and the one it loaded
   last (3 packs); modes interleaved.  Also the memory (RSS, PSS) of the workers and
   zygotes after one node run.
3. ComfyUI start (process start to ``/system_stats``) with 0 and 3 isolated packs
   (metadata cached, as on every start after the first) in each of those modes.
4. Next node run after an interrupt kill (``--parts restart``): a node that ignores
   the interrupt has its worker killed (grace 0.2 s), then ``Tick0 -> Add -> Tick1``
   runs at once, or after a 3 s pause; with the zygote (default ``preload``) and
   without (``preload=[]``).

Writes a table and benchmarks/results/comfyui.json.  Medians; no figure is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
import comfyui_harness as h  # noqa: E402

PACKS = os.path.join(os.path.dirname(HERE), "tests", "comfyui_real_packs")


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def make_base(root, packs, copies=None, script=True, preload=None):
    """A --base-directory with ``packs`` and ``copies`` copies of ce_v1.  script: the
    copies (and ce_v1) keep their prestartup_script.py; preload: passed to both calls."""
    base = tempfile.mkdtemp(dir=root, prefix="base-")
    nodes = os.path.join(base, "custom_nodes")
    os.makedirs(nodes)
    dirs = []
    for name in packs:
        shutil.copytree(os.path.join(PACKS, name), os.path.join(nodes, name))
        if name == "ce_v1":
            dirs.append(os.path.join(nodes, name))
    for i in range(copies or 0):
        dst = os.path.join(nodes, f"ce_v1_copy{i}")
        shutil.copytree(os.path.join(PACKS, "ce_v1"), dst)
        dirs.append(dst)
        # Each copy's nodes under their own keys (C<i>_CE_Add, ...), so a prompt picks the pack.
        with open(os.path.join(dst, "nodes.py"), "a") as f:
            f.write(f"\nNODE_CLASS_MAPPINGS = {{'C{i}_' + k: v for k, v in NODE_CLASS_MAPPINGS.items()}}\n"
                    "NODE_DISPLAY_NAME_MAPPINGS = {}\n")
    for d in dirs:
        script_path = os.path.join(d, "prestartup_script.py")
        if not script:
            os.remove(script_path)
        if preload is not None:
            for f in (os.path.join(d, "__init__.py"), script_path):
                if os.path.exists(f):
                    with open(f) as fh:
                        text = fh.read()
                    with open(f, "w") as fh:
                        fh.write(text.replace('"nodes")', f'"nodes", preload={preload!r})'))
    return base


def load_order(log):
    """The copies' pack names in the order ComfyUI loaded them (from comfy-env's log line)."""
    import re
    return re.findall(r"comfy-env: \[(ce_v1_copy\d+)\] \d+ isolated node", log)


def tick_delta_ms(outputs, t0, t1):
    return (outputs[t1]["tick"][0] - outputs[t0]["tick"][0]) / 1e6


def overhead(server, ws, prompts, sizes):
    """{case: {"isolated": [ms...], "in_process": [ms...]}} from Tick1 - Tick0."""
    results = {}
    seed = int(time.time())
    cases = [("scalar", "CE_Add", "LOCAL_CE_Add", 8, False)]
    for s in sizes:
        # A new image each prompt (an upstream node made it, as in a real workflow), and
        # the same image object again (ComfyUI's cache answered the upstream node).
        cases.append((f"image {s}x{s}", "CE_Passthrough", "LOCAL_CE_Passthrough", s, True))
        cases.append((f"image {s}x{s}, same object", "CE_Passthrough", "LOCAL_CE_Passthrough", s, False))
    for case, x_iso, x_loc, size, fresh in cases:
        res = results[case] = {"isolated": [], "in_process": []}
        for i in range(prompts + 2):            # 2 warm-up rounds, not recorded
            for label, x in (("isolated", x_iso), ("in_process", x_loc)):
                seed += 1
                if case == "scalar":
                    prompt = {"4": h.api_node("PrimitiveInt", value=seed),
                              "1": h.api_node("CE_Tick", value=["4", 0], seed=seed),
                              "2": h.api_node(x, a=["1", 0], b=1),
                              "3": h.api_node("CE_Tick", value=["2", 0], seed=seed)}
                else:
                    prompt = {"0": h.api_node("EmptyImage", width=size, height=size, batch_size=1,
                                              color=(seed % 0xFFFFFF) if fresh else 0x808080),
                              "1": h.api_node("CE_Tick", value=["0", 0], seed=seed),
                              "2": h.api_node(x, image=["1", 0], seed=seed),
                              "3": h.api_node("CE_Tick", value=["2", 0], seed=seed)}
                pid, events = server.run(prompt, ws, timeout=300)
                if events[-1]["type"] != "execution_success":
                    raise RuntimeError(f"{case}/{label}: {events[-1]}\n{server.log()[-3000:]}")
                if i >= 2:
                    res[label].append(tick_delta_ms(server.history(pid)["outputs"], "1", "3"))
    return results


def memcpy_ms(size, reps=31):
    """One single-threaded copy of the image's bytes into memory already touched
    (numpy copyto), the reference the overhead goal is stated against."""
    import numpy as np
    src = np.random.rand(1, size, size, 3).astype(np.float32)
    dst = np.empty_like(src)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append((time.perf_counter() - t0) * 1e3)
    return med(times)


MEMORY = []         # per start: [{"rss_mb", "pss_mb", "role"}] of ComfyUI's comfy-env processes


def comfy_env_memory(comfy_pid):
    """RSS and PSS (forked workers share the zygote's pages: PSS splits them fairly) of
    ComfyUI's comfy-env processes (workers and zygotes)."""
    out = []
    for p in h.descendants(comfy_pid):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read()
            if b"comfy_env" not in cmd:
                continue
            fields = {}
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    k, _, v = line.partition(":")
                    if k in ("Rss", "Pss"):
                        fields[k] = int(v.split()[0]) / 1024
            with open(f"/proc/{p}/stat") as f:
                ppid = int(f.read().rpartition(")")[2].split()[1])
            role = "worker" if b"comfy_env.worker" in cmd or ppid != comfy_pid else "zygote"
            out.append({"rss_mb": fields.get("Rss"), "pss_mb": fields.get("Pss"), "role": role})
        except (OSError, ValueError):
            pass
    return out


MODES = {
    # name: (prestartup_script.py kept, COMFY_ENV_PRESTART)
    "prestartup script": (True, "1"),
    "pre-start after load": (False, "1"),
    "no pre-start": (False, "0"),
}


def first_run_prompt(pack_key, seed):
    return {"4": h.api_node("PrimitiveInt", value=seed),
            "1": h.api_node("CE_Tick", value=["4", 0], seed=seed),
            "2": h.api_node(pack_key + "CE_Add", a=["1", 0], b=1),
            "3": h.api_node("CE_Tick", value=["2", 0], seed=seed)}


def start_once(tree, py, root, copies, mode, cache, first_run, which="last"):
    script, prestart = MODES[mode]
    base = make_base(root, ["ce_probe"], copies=copies, script=script)
    env = {"COMFY_ENV_CACHE_DIR": cache, "COMFY_ENV_PRESTART": prestart}
    server = h.ComfyUI(tree, py, base, env=env)
    t0 = time.monotonic()
    server.start(timeout=600)
    start_s = server.ready_at - t0
    first_ms = None
    if first_run and copies:
        ws = server.connect()
        seed = int(time.time())
        # The first- or the last-loaded pack: pre-start after load warms packs in load order.
        order = load_order(server.log())
        pack = order[0] if which == "first" else order[-1]
        pid, events = server.run(first_run_prompt(f"C{pack[len('ce_v1_copy'):]}_", seed), ws,
                                 timeout=300)
        if events[-1]["type"] != "execution_success":
            raise RuntimeError(f"first run: {events[-1]}\n{server.log()[-3000:]}")
        first_ms = tick_delta_ms(server.history(pid)["outputs"], "1", "3")
        ws.close()
        if mode == "prestartup script":
            MEMORY.append(comfy_env_memory(server.proc.pid))
    server.stop()
    shutil.rmtree(base, ignore_errors=True)
    return start_s, first_ms


def restart_after_kill(tree, py, root, cache, preload, reps, pause_s):
    """Next node run after a node that ignores ComfyUI's interrupt had its worker killed
    (interrupt grace 0.2 s): at once, and after ``pause_s`` (the replacement starts in
    the background meanwhile).  ``preload``: None = the adapter's default (a zygote
    with torch for env=None), [] = no zygote."""
    base = make_base(root, ["ce_v1", "ce_probe"], preload=preload)
    server = h.ComfyUI(tree, py, base, env={"COMFY_ENV_CACHE_DIR": cache,
                                            "COMFY_ENV_INTERRUPT_GRACE": "0.2"})
    server.start(timeout=600)
    ws = server.connect()
    out = {"at once": [], f"after {pause_s:g} s": []}
    seed = int(time.time())
    try:
        server.run(first_run_prompt("", seed), ws, timeout=300)         # warm
        for i in range(2 * reps):
            seed += 1
            sent = []

            def on_event(e):
                if not sent and e["type"] == "executing" and e["data"].get("node") == "1":
                    time.sleep(0.3)
                    server.interrupt()
                    sent.append(1)

            _, events = server.run({"1": h.api_node("CE_Sleep", seed=seed),
                                    "2": h.api_node("CE_Probe", value=["1", 0])}, ws, timeout=120,
                                   on_event=on_event)
            if events[-1]["type"] != "execution_interrupted":
                raise RuntimeError(f"kill: {events[-1]}\n{server.log()[-3000:]}")
            label = "at once" if i % 2 == 0 else f"after {pause_s:g} s"
            if i % 2:
                time.sleep(pause_s)
            pid, events = server.run(first_run_prompt("", seed), ws, timeout=300)
            if events[-1]["type"] != "execution_success":
                raise RuntimeError(f"after kill: {events[-1]}\n{server.log()[-3000:]}")
            out[label].append(tick_delta_ms(server.history(pid)["outputs"], "1", "3"))
    finally:
        ws.close()
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=15)
    ap.add_argument("--starts", type=int, default=3)
    ap.add_argument("--sizes", default="512,2048")
    ap.add_argument("--parts", default="overhead,starts,restart",
                    help="what to run (comma-separated): overhead, starts, restart")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "comfyui.json"))
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    tree, py = h.locate()
    if tree is None:
        sys.exit(f"bench_comfyui: {py}")
    sizes = [int(s) for s in args.sizes.split(",") if s]
    root = tempfile.mkdtemp(prefix="bench-comfyui-")
    cache = os.path.join(root, "cache")
    out = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                       "load_at_start": os.getloadavg()},
           "comfyui": os.path.relpath(tree, os.path.dirname(HERE)), "parts": sorted(parts)}
    try:
        if "overhead" in parts:
            base = make_base(root, ["ce_v1", "ce_local", "ce_probe"])
            server = h.ComfyUI(tree, py, base, env={"COMFY_ENV_CACHE_DIR": cache})
            server.start(timeout=600)
            ws = server.connect()
            try:
                out["per_node_ms"] = overhead(server, ws, args.prompts, sizes)
            finally:
                ws.close()
                server.stop()
            out["memcpy_ms"] = {f"image {s}x{s}": memcpy_ms(s) for s in sizes}
        if "starts" in parts:
            # Metadata cached by one unrecorded start first, as on every start after the first.
            start_once(tree, py, root, 3, "no pre-start", cache, first_run=False)
            starts = {"0 packs": []}
            starts.update({f"3 packs, {m}": [] for m in MODES})
            first = {f"{m}, {w}-loaded pack": [] for m in MODES for w in ("first", "last")}
            for _ in range(args.starts):
                s, _f = start_once(tree, py, root, 0, "no pre-start", cache, False)
                starts["0 packs"].append(s)
                for which in ("first", "last"):
                    for mode in MODES:          # interleaved: the box's load drifts
                        s, f = start_once(tree, py, root, 3, mode, cache, True, which)
                        starts[f"3 packs, {mode}"].append(s)
                        first[f"{mode}, {which}-loaded pack"].append(f)
            out["start_s"] = starts
            out["first_run_ms"] = first
            out["memory"] = MEMORY
        if "restart" in parts:
            out["restart_after_kill_ms"] = {
                "zygote (preload torch, default)": restart_after_kill(tree, py, root, cache, None, args.starts, 3.0),
                "no zygote (preload=[])": restart_after_kill(tree, py, root, cache, [], args.starts, 3.0)}
        out["machine"]["load_at_end"] = os.getloadavg()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report(out)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nwrote {os.path.relpath(args.json, os.path.dirname(HERE))}")


def report(out):
    print(f"\nComfyUI adapter, {os.cpu_count()}-CPU box (load {out['machine']['load_at_start'][0]:.1f} "
          f"at start, {out['machine'].get('load_at_end', [float('nan')])[0]:.1f} at end), medians")
    if "per_node_ms" in out:
        print(f"{'per node run':<30}{'in-process ms':>14}{'isolated ms':>13}{'overhead ms':>13}"
              f"{'memcpy ms':>11}{'ovh/memcpy':>11}")
        summary = {}
        for case, r in out["per_node_ms"].items():
            a, b = med(r["in_process"]), med(r["isolated"])
            mc = out["memcpy_ms"].get(case.split(",")[0])
            ratio = (b - a) / mc if mc else None
            summary[case] = {"in_process_ms": a, "isolated_ms": b, "overhead_ms": b - a,
                             "memcpy_ms": mc, "overhead_over_memcpy": ratio, "n": len(r["isolated"])}
            print(f"{case:<30}{a:>14.2f}{b:>13.2f}{b - a:>13.2f}"
                  f"{(f'{mc:.2f}' if mc else '-'):>11}{(f'{ratio:.2f}x' if ratio else '-'):>11}")
        out["summary"] = summary
    if "start_s" in out:
        print(f"\n{'ComfyUI start':<40}{'median s':>10}   runs")
        for k, v in out["start_s"].items():
            print(f"{k:<40}{med(v):>10.2f}   {', '.join(f'{x:.2f}' for x in v)}")
        print(f"\n{'first node run after ready':<48}{'median ms':>10}   runs")
        for k, v in out["first_run_ms"].items():
            print(f"{k:<48}{med(v):>10.1f}   {', '.join(f'{x:.1f}' for x in v)}")
        procs = [p for start in out.get("memory", []) for p in start]
        for role in ("worker", "zygote"):
            xs = [p for p in procs if p["role"] == role]
            if xs:
                print(f"{role} memory (env=None, after one node run): median RSS "
                      f"{med([p['rss_mb'] for p in xs]):.0f} MB, PSS {med([p['pss_mb'] for p in xs]):.0f} MB "
                      f"over {len(xs)}")
    if "restart_after_kill_ms" in out:
        print(f"\n{'next node run after an interrupt kill':<48}{'median ms':>10}   runs")
        for variant, r in out["restart_after_kill_ms"].items():
            for when, v in r.items():
                k = f"{variant}, {when}"
                print(f"{k:<48}{med(v):>10.1f}   {', '.join(f'{x:.1f}' for x in v)}")


if __name__ == "__main__":
    main()
