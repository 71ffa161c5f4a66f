"""``comfy-env doctor``'s CUDA section: what was found, which route each direction takes, why."""
from __future__ import annotations

__all__ = ["report"]


def _fmt_routes(d):
    return ", ".join(f"{k}×{v}" for k, v in sorted(d.items())) or "none"


def report(env=None, live=True) -> str:
    """A human-readable report.  ``live``: also run the two-process probe (starts a worker)."""
    lines = ["CUDA data plane"]
    try:
        import torch
    except ImportError:
        return "CUDA data plane\n  torch is not installed here: CUDA tensors cannot occur, nothing to check."
    if not torch.cuda.is_available():
        from .ipc.cuda import driver as D
        try:
            D.lib()
            why = "torch sees no GPU"
        except D.CudaError as exc:
            why = str(exc)
        return f"CUDA data plane\n  no usable GPU ({why}): CUDA tensors cannot occur here."
    from .cuda_probe import local_report, pair_probe
    from .ipc.cuda.paths import import_limit
    if live:
        res = pair_probe(env=env)
        parent = res["parent"]
    else:
        res, parent = None, local_report()
    lines.append(f"  torch {parent['torch']}, driver {parent.get('driver_version')}, "
                 f"parent allocator: {parent.get('backend')} (PYTORCH_CUDA_ALLOC_CONF={parent['alloc_conf']!r}), "
                 f"export pool as torch heap: {parent.get('heap_pool')}")
    for i, name, uuid in parent.get("devices", []):
        lines.append(f"  GPU {i}: {name}  uuid {uuid}")
    caps = parent.get("caps", {})
    lines.append(f"  this process can export: pools={caps.get('pools')} vmm={caps.get('vmm')} "
                 f"interprocess events={caps.get('events')}")
    for k, why in caps.get("reasons", {}).items():
        lines.append(f"    {k}: {why}")
    lines.append(f"  pool import limit: {import_limit() >> 20} MiB per allocation "
                 "(bigger tensors take the VMM route: importing one pool allocation above ~5.1 GiB "
                 "kills the importer)")
    if res is None:
        return "\n".join(lines)
    ok, why = res["legacy_ipc_parent"]
    lines.append(f"  torch legacy CUDA IPC in the parent: {'works' if ok else 'refused'} ({why})")
    if res["error"]:
        lines.append(f"  live probe FAILED: {res['error']}")
        return "\n".join(lines)
    w = res["worker"]
    lines.append(f"  worker: allocator {w.get('backend')}, export pool as torch heap: {w.get('heap_pool')}")
    tw, tp = res["to_worker"], res["to_parent"]
    lines.append(f"  parent → worker: {'ok' if tw['ok'] else 'WRONG VALUES'}, route {_fmt_routes(tw['route'])}")
    for route in tw["route"]:
        lines.append(f"    why: {tw['why'].get(route, '')}")
    lines.append(f"  worker → parent: {'ok' if tp['ok'] else 'WRONG VALUES'} on {tp['device']}, "
                 f"route {_fmt_routes(tp['route'])}")
    for route in tp["route"]:
        lines.append(f"    why: {tp['why'].get(route, '')}")
    lines.append("  worker → worker (chains): the worker's pool fd is forwarded; same route as worker → parent")
    lines.append(f"  tensors above {import_limit() >> 20} MiB: vmm (one device copy), either direction")
    return "\n".join(lines)
