"""``comfy-env env ...``: create, list, locate and remove cached environments."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

from . import cache
from .errors import EnvError

__all__ = ["add_parser"]


def add_parser(subparsers) -> None:
    env = subparsers.add_parser("env", help="manage environments built from comfy-env.toml files")
    env.set_defaults(group_parser=env)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cache-dir", default=None,
                        help=f"cache root (default: ${cache.CACHE_ENV_VAR} or the user cache dir)")
    sub = env.add_subparsers(dest="env_command", metavar="SUBCOMMAND")

    p = sub.add_parser("create", parents=[common], help="build the env for a comfy-env.toml (no-op if cached)")
    p.add_argument("path", help="a comfy-env.toml or a directory holding one")
    p.add_argument("-q", "--quiet", action="store_true", help="do not print the installer's output")
    p.set_defaults(func=_create)

    p = sub.add_parser("list", parents=[common], help="list built envs")
    p.set_defaults(func=_list)

    p = sub.add_parser("path", parents=[common], help="print the env directory for a comfy-env.toml")
    p.add_argument("path", help="a comfy-env.toml or a directory holding one")
    p.add_argument("--python", action="store_true", help="print the env's interpreter instead")
    p.set_defaults(func=_path)

    p = sub.add_parser("remove", parents=[common], help="delete the built env of a comfy-env.toml, or all")
    p.add_argument("path", nargs="?", help="a comfy-env.toml or a directory holding one")
    p.add_argument("--all", action="store_true", help="remove every env (and helper dirs) in the cache")
    p.set_defaults(func=_remove)


def _fail(msg: str) -> int:
    print(f"comfy-env: error: {msg}", file=sys.stderr)
    return 1


def _load(args):
    from .env import Env

    return Env.from_toml(args.path, cache_dir=args.cache_dir)


def _create(args) -> int:
    try:
        env = _load(args)
        t0 = time.perf_counter()
        was_built = env.is_built
        env.create(progress=not args.quiet)
    except EnvError as e:
        return _fail(str(e))
    state = "cached" if was_built else f"built in {time.perf_counter() - t0:.1f} s"
    print(f"{env.path}  ({state})")
    return 0


def _list(args) -> int:
    root = cache.cache_root(args.cache_dir)
    envs = cache.list_envs(root)
    if not envs:
        print(f"no environments in {cache.envs_dir(root)}")
        return 0
    for path, meta in envs:
        py = ".".join(map(str, meta.get("python_version", ())))
        print(f"{os.path.basename(path):40s} python {py:8s} {meta.get('source') or '-'}")
    return 0


def _path(args) -> int:
    try:
        env = _load(args)
        if not env.is_built:
            return _fail(f"{env.name!r} is not built yet ({env.path}); run `comfy-env env create {args.path}`.")
        print(env.python if args.python else env.path)
    except EnvError as e:
        return _fail(str(e))
    return 0


def _remove(args) -> int:
    if args.all == bool(args.path):
        return _fail("give either a comfy-env.toml PATH or --all.")
    if args.all:
        root = cache.cache_root(args.cache_dir)
        n = len(cache.list_envs(root))
        for sub in ("envs", "bootstrap", "share"):
            shutil.rmtree(os.path.join(root, sub), ignore_errors=True)
        print(f"removed {n} environment(s) from {root}")
        return 0
    try:
        env = _load(args)
        removed = env.remove()
    except EnvError as e:
        return _fail(str(e))
    print(f"removed {env.path}" if removed else f"{env.name!r} was not built; nothing to remove")
    return 0
