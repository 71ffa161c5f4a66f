"""``comfy-env doctor``'s environments section: the installer, the cache, the interpreters."""
from __future__ import annotations

import subprocess

__all__ = ["report", "check_env_arg"]


def report() -> str:
    from .builder import find_uv
    from .cache import cache_root, envs_dir, list_envs
    from .interpreters import find_interpreters, uv_python_dir

    lines = []
    uv = find_uv()
    if uv:
        try:
            version = subprocess.run([uv, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            version = f"does not run ({e})"
        lines.append(f"uv: {version or '?'} at {uv}")
    else:
        lines.append("uv: not found (envs fall back to venv + pip: slower, no locks, `share` not enforced); "
                     "install the `uv` package or set COMFY_ENV_UV")
    root = cache_root()
    lines.append(f"cache: {root} ({len(list_envs(root))} environment(s) in {envs_dir(root)})")
    found = find_interpreters(usable_only=True)
    lines.append(f"interpreters a worker can run on (Python >= 3.10; uv installs into {uv_python_dir()}):")
    lines += [f"  {i.version_str:8s} {i.path}" for i in found] or ["  (none)"]
    return "\n".join(lines)


def check_env_arg(env) -> str | None:
    """None if ``env`` (doctor's --env) names a usable environment, else why not."""
    from . import resolve_env
    from .errors import EnvError

    try:
        resolve_env(env)
    except (EnvError, TypeError) as e:
        return str(e)
    return None
