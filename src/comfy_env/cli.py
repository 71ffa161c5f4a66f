"""The ``comfy-env`` command: a dispatcher for subcommand groups.

Each group lives with the code it drives and provides ``add_parser(subparsers)``, which
registers its parser and sets ``func`` (called with the parsed namespace, returns an
exit code).  To add a group (e.g. ``doctor``), append its module to ``_GROUPS``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Modules that define a subcommand group; imported lazily so `comfy-env --help` is quick
# and a broken group cannot take the others down.
_GROUPS = (
    "comfy_env.envs.cli",      # comfy-env env create|list|path|remove
    "comfy_env.doctor",        # comfy-env doctor
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="comfy-env",
        description="Run Python callables in isolated worker processes, each in its own environment.",
    )
    from ._version import __version__

    parser.add_argument("--version", action="version", version=f"comfy-env {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for modname in _GROUPS:
        importlib.import_module(modname).add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        # A group given without its subcommand prints that group's help.
        (getattr(args, "group_parser", None) or parser).print_help(sys.stderr)
        return 2
    try:
        return int(func(args) or 0)
    except OSError as e:
        # What the file system refused (a read-only or full cache): said in one line.
        print(f"comfy-env: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # What was interrupted cleaned up after itself (a build leaves no staging
        # directory or lock behind); a traceback would only hide that.
        print("comfy-env: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
