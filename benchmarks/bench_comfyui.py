"""comfy-env's ComfyUI adapter in the real ComfyUI: per-node overhead, first run, start time.

    COMFYUI_DIR=../shared/comfyui python benchmarks/bench_comfyui.py [--prompts 15] [--starts 3]

ComfyUI and its python are found as tests/comfyui_harness.py says (COMFYUI_DIR,
COMFYUI_PYTHON, or the cached venv of make-venv.sh).  Packs: tests/comfyui_real_packs.

1. Per-node overhead.  Prompts ``EmptyImage -> Tick0 -> X -> Tick1``: the Tick nodes
   (ordinary in-process nodes) report ``perf_counter_ns`` when they run, so
   ``Tick1 - Tick0`` is X's run plus ComfyUI's own per-node bookkeeping.  X is the
   isolated node (ce_v1, env=None) or the same class loaded in-process (ce_local); the
   overhead is the difference of the medians.  X: a scalar node (``Add``), and a node
   that returns its image (``Passthrough``) at 512² and 2048²; every prompt changes a
   seed so ComfyUI's cache never answers.  The two variants alternate prompt by prompt.
   Reference: one single-threaded copy of the image's bytes (numpy ``copyto`` into
   memory already touched), in this process.
2. First node run after ComfyUI reports ready (``/system_stats`` answers): a prompt
   ``Tick0 -> Add -> Tick1`` is queued at once; ``Tick1 - Tick0`` with the worker
   pre-started (default) and without (``COMFY_ENV_PRESTART=0``), for the pack ComfyUI
   loaded first and the one it loaded last (pre-start warms packs in load order).
3. ComfyUI start (process start to ``/system_stats``) with 0 and 3 isolated packs
   (metadata cached, as on every start after the first), with and without pre-start.

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


def make_base(root, packs, copies=None):
    base = tempfile.mkdtemp(dir=root, prefix="base-")
    nodes = os.path.join(base, "custom_nodes")
    os.makedirs(nodes)
    for name in packs:
        shutil.copytree(os.path.join(PACKS, name), os.path.join(nodes, name))
    for i in range(copies or 0):
        dst = os.path.join(nodes, f"ce_v1_copy{i}")
        shutil.copytree(os.path.join(PACKS, "ce_v1"), dst)
        # Each copy's nodes under their own keys (C<i>_CE_Add, ...), so a prompt picks the pack.
        with open(os.path.join(dst, "nodes.py"), "a") as f:
            f.write(f"\nNODE_CLASS_MAPPINGS = {{'C{i}_' + k: v for k, v in NODE_CLASS_MAPPINGS.items()}}\n"
                    "NODE_DISPLAY_NAME_MAPPINGS = {}\n")
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
    for case, x_iso, x_loc, size in [("scalar", "CE_Add", "LOCAL_CE_Add", 8)] + [
            (f"image {s}x{s}", "CE_Passthrough", "LOCAL_CE_Passthrough", s) for s in sizes]:
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
                                              color=0x808080),
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


WORKER_RSS_MB = []


def worker_rss_mb(comfy_pid):
    """Resident memory of ComfyUI's comfy-env workers (env=None: ComfyUI's interpreter)."""
    out = []
    for p in h.descendants(comfy_pid):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if b"comfy_env.worker" not in f.read():
                    continue
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        out.append(int(line.split()[1]) / 1024)
        except OSError:
            pass
    return out


def start_once(tree, py, root, copies, prestart, cache, first_run, which="last"):
    base = make_base(root, ["ce_probe"], copies=copies)
    env = {"COMFY_ENV_CACHE_DIR": cache, "COMFY_ENV_PRESTART": "1" if prestart else "0"}
    server = h.ComfyUI(tree, py, base, env=env)
    t0 = time.monotonic()
    server.start(timeout=600)
    start_s = server.ready_at - t0
    first_ms = None
    if first_run and copies:
        ws = server.connect()
        seed = int(time.time())
        # The first- or the last-loaded pack: pre-start warms packs in load order.
        order = load_order(server.log())
        pack = order[0] if which == "first" else order[-1]
        prompt = {"4": h.api_node("PrimitiveInt", value=seed),
                  "1": h.api_node("CE_Tick", value=["4", 0], seed=seed),
                  "2": h.api_node(f"C{pack[len('ce_v1_copy'):]}_CE_Add", a=["1", 0], b=1),
                  "3": h.api_node("CE_Tick", value=["2", 0], seed=seed)}
        pid, events = server.run(prompt, ws, timeout=300)
        if events[-1]["type"] != "execution_success":
            raise RuntimeError(f"first run: {events[-1]}\n{server.log()[-3000:]}")
        first_ms = tick_delta_ms(server.history(pid)["outputs"], "1", "3")
        ws.close()
        rss = worker_rss_mb(server.proc.pid)
        if rss:
            WORKER_RSS_MB.extend(rss)
    server.stop()
    shutil.rmtree(base, ignore_errors=True)
    return start_s, first_ms


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=15)
    ap.add_argument("--starts", type=int, default=3)
    ap.add_argument("--sizes", default="512,2048")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "comfyui.json"))
    args = ap.parse_args()
    tree, py = h.locate()
    if tree is None:
        sys.exit(f"bench_comfyui: {py}")
    sizes = [int(s) for s in args.sizes.split(",") if s]
    root = tempfile.mkdtemp(prefix="bench-comfyui-")
    cache = os.path.join(root, "cache")
    out = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                       "load_at_start": os.getloadavg()}, "comfyui": os.path.relpath(tree, os.path.dirname(HERE))}
    try:
        # -- 1. per-node overhead
        base = make_base(root, ["ce_v1", "ce_local", "ce_probe"])
        server = h.ComfyUI(tree, py, base, env={"COMFY_ENV_CACHE_DIR": cache})
        server.start(timeout=600)
        ws = server.connect()
        try:
            per_node = overhead(server, ws, args.prompts, sizes)
        finally:
            ws.close()
            server.stop()
        out["per_node_ms"] = per_node
        out["memcpy_ms"] = {f"image {s}x{s}": memcpy_ms(s) for s in sizes}

        # -- 2 + 3. starts: 0 packs, 3 packs with / without pre-start (metadata cached
        # by one unrecorded start first).
        start_once(tree, py, root, 3, True, cache, first_run=False)
        starts = {"0 packs": [], "3 packs, prestart": [], "3 packs, no prestart": []}
        first = {"prestart, first-loaded pack": [], "prestart, last-loaded pack": [],
                 "no prestart, first-loaded pack": [], "no prestart, last-loaded pack": []}
        for _ in range(args.starts):
            s, _f = start_once(tree, py, root, 0, True, cache, False)
            starts["0 packs"].append(s)
            for which in ("first", "last"):
                s, f = start_once(tree, py, root, 3, True, cache, True, which)
                starts["3 packs, prestart"].append(s)
                first[f"prestart, {which}-loaded pack"].append(f)
                s, f = start_once(tree, py, root, 3, False, cache, True, which)
                starts["3 packs, no prestart"].append(s)
                first[f"no prestart, {which}-loaded pack"].append(f)
        out["start_s"] = starts
        out["worker_rss_mb"] = WORKER_RSS_MB
        out["first_run_ms"] = first
        out["machine"]["load_at_end"] = os.getloadavg()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    # -- table
    print(f"\nComfyUI adapter, {os.cpu_count()}-CPU box (load {out['machine']['load_at_start'][0]:.1f} "
          f"at start), medians")
    print(f"{'per node run':<22}{'in-process ms':>14}{'isolated ms':>13}{'overhead ms':>13}{'memcpy ms':>11}{'ovh/memcpy':>11}")
    summary = {}
    for case, r in out["per_node_ms"].items():
        a, b = med(r["in_process"]), med(r["isolated"])
        mc = out["memcpy_ms"].get(case)
        ratio = (b - a) / mc if mc else None
        summary[case] = {"in_process_ms": a, "isolated_ms": b, "overhead_ms": b - a,
                         "memcpy_ms": mc, "overhead_over_memcpy": ratio, "n": len(r["isolated"])}
        print(f"{case:<22}{a:>14.2f}{b:>13.2f}{b - a:>13.2f}"
              f"{(f'{mc:.2f}' if mc else '-'):>11}{(f'{ratio:.2f}x' if ratio else '-'):>11}")
    print(f"\n{'ComfyUI start':<28}{'median s':>10}   runs")
    for k, v in out["start_s"].items():
        print(f"{k:<28}{med(v):>10.2f}   {', '.join(f'{x:.2f}' for x in v)}")
    print(f"\n{'first node run after ready':<34}{'median ms':>10}   runs")
    for k, v in out["first_run_ms"].items():
        print(f"{k:<34}{med(v):>10.1f}   {', '.join(f'{x:.1f}' for x in v)}")
    if out.get("worker_rss_mb"):
        print(f"\nworker RSS (env=None, after one node run): median {med(out['worker_rss_mb']):.0f} MB "
              f"over {len(out['worker_rss_mb'])} workers")
    out["summary"] = summary
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
