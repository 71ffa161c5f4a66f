"""``comfy-env doctor``: what this machine offers and which path each direction will use."""
from __future__ import annotations

import platform
import sys


def add_parser(sub):
    p = sub.add_parser("doctor", help="report the data planes available here and the paths chosen")
    p.add_argument("--env", default=None,
                   help="an environment (toml, env dir or interpreter) whose worker to probe")
    p.add_argument("--no-live", action="store_true",
                   help="skip the live probes that start a worker (report static facts only)")
    p.set_defaults(func=run)


def run(args):
    from ._version import PROTOCOL_VERSION, __version__
    from .envs import doctor as envs_doctor
    from .ipc import arrays, shm

    if args.env is not None:
        problem = envs_doctor.check_env_arg(args.env)
        if problem:
            print(f"comfy-env: error: --env {args.env!r}: {problem}", file=sys.stderr)
            return 1

    print(f"comfy_env {__version__} (protocol {PROTOCOL_VERSION}), Python "
          f"{platform.python_version()} at {sys.executable}")
    print(envs_doctor.report())
    from .sandbox import report as sandbox_report
    print(sandbox_report())
    print(f"CPU plane: memfd segments, inline below {arrays.INLINE_BYTES} bytes, arena keeps at "
          f"most {shm.ARENA.max_free_bytes >> 20} MiB free, gives back after "
          f"{shm.ARENA.idle_seconds} s idle")
    try:
        from . import cuda_doctor
    except ImportError as exc:
        print(f"CUDA plane: not available ({exc})")
        return 0
    print(cuda_doctor.report(env=args.env, live=not args.no_live))
    return 0
