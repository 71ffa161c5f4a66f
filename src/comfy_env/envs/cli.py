"""``comfy-env env ...``: create, lock, list, locate, remove and prune cached environments."""
from __future__ import annotations

import argparse
import math
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
    common.add_argument("--cache-dir", default=None, type=_cache_dir_arg,
                        help=f"cache root (default: ${cache.CACHE_ENV_VAR} or the user cache dir)")
    sub = env.add_subparsers(dest="env_command", metavar="SUBCOMMAND")

    p = sub.add_parser("create", parents=[common], help="build the env for a comfy-env.toml (no-op if cached)")
    p.add_argument("path", help="a comfy-env.toml or a directory holding one")
    p.add_argument("-q", "--quiet", action="store_true", help="do not print the installer's output")
    p.add_argument("--locked", action="store_true",
                   help="install exactly what the lock next to the spec lists; fail if it is missing or stale")
    p.set_defaults(func=_create)

    p = sub.add_parser("lock", parents=[common],
                       help="resolve a comfy-env.toml and write pylock.comfy-env.toml next to it")
    p.add_argument("path", help="a comfy-env.toml or a directory holding one")
    p.add_argument("-q", "--quiet", action="store_true", help="do not print the installer's output")
    p.set_defaults(func=_lock)

    p = sub.add_parser("list", parents=[common], help="list built envs with size, age and last use")
    p.set_defaults(func=_list)

    p = sub.add_parser("path", parents=[common], help="print the env directory for a comfy-env.toml")
    p.add_argument("path", help="a comfy-env.toml or a directory holding one")
    p.add_argument("--python", action="store_true", help="print the env's interpreter instead")
    p.set_defaults(func=_path)

    p = sub.add_parser("remove", parents=[common], help="delete the built env of a comfy-env.toml, or all")
    p.add_argument("path", nargs="?", help="a comfy-env.toml or a directory holding one")
    p.add_argument("--all", action="store_true", help="remove every env not in use (and helper dirs)")
    p.set_defaults(func=_remove)

    p = sub.add_parser("prune", parents=[common],
                       help="remove envs unused for N days and what dead builds left behind")
    p.add_argument("--days", type=_days_arg, default=30.0,
                   help="remove envs not used for this many days (default 30)")
    p.add_argument("--dry-run", action="store_true", help="only print what would be removed")
    p.set_defaults(func=_prune)


def _days_arg(raw):
    try:
        days = float(raw)
    except ValueError:
        days = math.nan
    if not (math.isfinite(days) and days >= 0):
        raise argparse.ArgumentTypeError(f"must be a number of days >= 0, not {raw!r}")
    return days


def _cache_dir_arg(raw):
    if not raw.strip():
        raise argparse.ArgumentTypeError("must name a directory (leave the option out for the default)")
    path = os.path.abspath(os.path.expanduser(raw))
    if os.path.exists(path) and not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path} exists and is not a directory")
    return raw


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
        env.create(progress=not args.quiet, locked=args.locked)
    except EnvError as e:
        return _fail(str(e))
    # "cached" too when another process built it while this one waited for it.
    state = f"built in {time.perf_counter() - t0:.1f} s" if env.built_here else "cached"
    print(f"{env.path}  ({state})")
    return 0


def _lock(args) -> int:
    try:
        env = _load(args)
        t0 = time.perf_counter()
        path = env.lock(progress=not args.quiet)
    except EnvError as e:
        return _fail(str(e))
    print(f"{path}  (resolved in {time.perf_counter() - t0:.1f} s)")
    return 0


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def human_age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} d"


def _list(args) -> int:
    root = cache.cache_root(args.cache_dir)
    envs = cache.list_envs(root)
    if not envs:
        print(f"no environments in {cache.envs_dir(root)}")
        return 0
    now = time.time()
    print(f"{'KEY':16s}  {'NAME':20s} {'PYTHON':8s} {'SIZE':>10s} {'AGE':>7s} {'USED':>9s}  SOURCE")
    for path, meta in envs:
        use = cache.env_usage(path, meta)
        py = ".".join(map(str, meta.get("python_version", ())))
        used = "in use" if use["in_use"] else human_age(now - use["last_used"]) + " ago"
        print(f"{os.path.basename(path):16s}  {meta.get('name', '-')[:20]:20s} {py:8s} "
              f"{human_size(use['size']):>10s} {human_age(now - use['created']):>7s} {used:>9s}  "
              f"{meta.get('source') or '-'}")
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
        from .errors import EnvInUse

        root = cache.cache_root(args.cache_dir)
        removed, busy = 0, []
        for path, _meta in cache.list_envs(root):
            try:
                removed += cache.remove_env(path)
            except EnvInUse:
                busy.append(path)
        subs = ("envs", "bootstrap", "share") if not busy else ()  # live workers need the helper dirs
        for sub in subs:
            shutil.rmtree(os.path.join(root, sub), ignore_errors=True)
        print(f"removed {removed} environment(s) from {root}")
        if busy:
            return _fail(f"{len(busy)} environment(s) in use by running workers were kept: " + ", ".join(busy))
        return 0
    try:
        env = _load(args)
        removed = env.remove()
    except EnvError as e:
        return _fail(str(e))
    print(f"removed {env.path}" if removed else f"{env.name!r} was not built; nothing to remove")
    return 0


def _prune(args) -> int:
    root = cache.cache_root(args.cache_dir)
    done = cache.prune(root, args.days, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    labels = {"env": "environment", "staging": "unfinished build", "lock": "stale lock", "use": "stale use marker"}
    for what, path in done:
        print(f"{verb} {labels[what]}: {path}")
    if not done:
        print(f"nothing to prune in {cache.envs_dir(root)} (envs unused for {args.days:g} days, dead builds)")
    return 0
