"""Building an env: venv + install, in a staging dir, renamed into place under a file lock.

::

    lock envs/<dir>.lock ──► already built? ──yes──► done (no installer runs)
            │ no
            ▼
    remove stale envs/.tmp-<dir>-* (their builders died: we hold the lock)
    uv venv --relocatable envs/.tmp-<dir>-<pid>-<rand>     (or: python -m venv, with a warning)
    uv pip install --python <staging>/bin/python ...        (or: pip install)
    write comfy-env-env.json; os.rename(staging, envs/<dir>)  ◄── the only step that publishes

A crash, kill or Ctrl-C anywhere before the rename leaves only a staging dir, which
the next builder removes.  The staging dir lives next to the final dir so the rename
stays on one filesystem.  A venv's ``bin/python`` links to the base interpreter by
absolute path and ``pyvenv.cfg`` names the base's directory, so the interpreter keeps
working after the rename; ``--relocatable`` makes uv write relative script shebangs too.

The installer's output is forwarded line by line (``progress``) so a long build shows
movement, and kept so that a failure raises :class:`EnvBuildError` with it.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings

from .cache import META_FILENAME
from .errors import EnvBuildError
from .spec import normalize_dist_name

__all__ = ["UV_ENV_VAR", "find_uv", "build_env", "env_python", "installed_distributions"]

log = logging.getLogger("comfy_env.envs")

UV_ENV_VAR = "COMFY_ENV_UV"   # path to a uv binary to use; set to "" to force the venv+pip fallback
_IS_WINDOWS = sys.platform == "win32"


def find_uv() -> str | None:
    """The uv binary: ``$COMFY_ENV_UV``, else the one shipped by the ``uv`` PyPI package, else PATH."""
    if UV_ENV_VAR in os.environ:
        return os.environ[UV_ENV_VAR] or None
    try:
        import uv

        return uv.find_uv_bin()
    except (ImportError, FileNotFoundError):
        return shutil.which("uv")


def env_python(env_dir: str) -> str:
    return os.path.join(env_dir, "Scripts", "python.exe") if _IS_WINDOWS else os.path.join(env_dir, "bin", "python")


def installed_distributions(env_dir: str) -> list:
    """Normalised names of the distributions installed in the env's site-packages."""
    pattern = (os.path.join(env_dir, "Lib", "site-packages", "*.dist-info") if _IS_WINDOWS
               else os.path.join(env_dir, "lib", "python*", "site-packages", "*.dist-info"))
    names = set()
    for p in glob.glob(pattern):
        names.add(normalize_dist_name(os.path.basename(p)[: -len(".dist-info")].rsplit("-", 1)[0]))
    return sorted(names)


def _make_reporter(progress, label):
    """Turn the ``progress`` argument into a function taking one output line."""
    if callable(progress):
        return progress
    if progress:
        def to_stderr(line):
            sys.stderr.write(f"[comfy-env {label}] {line}\n")
            sys.stderr.flush()
        return to_stderr
    return lambda line: None


def _run(cmd, report, what, env=None) -> str:
    """Run an installer step, forwarding its output line by line; raise EnvBuildError on failure."""
    log.info("comfy-env: %s: %s", what, " ".join(cmd))
    lines = []
    try:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, errors="replace", bufsize=1, env=env,
        )
    except OSError as e:
        raise EnvBuildError(f"{what}: could not start {cmd[0]!r}: {e}") from None
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith("Activate with:"):
                continue  # uv's hint names the staging dir, which is about to be renamed
            lines.append(line)
            log.debug("%s", line)
            report(line)
        rc = proc.wait()
    except BaseException:
        # Ctrl-C or an error in the progress callback: never leave the installer running.
        proc.kill()
        proc.wait()
        raise
    finally:
        proc.stdout.close()
    output = "\n".join(lines)
    if rc != 0:
        how = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
        raise EnvBuildError(f"{what} failed ({how}): {' '.join(cmd)}", output, rc)
    return output


def _install_args(spec) -> list:
    args = []
    if spec.index_url:
        args += ["--index-url", spec.index_url]
    for u in spec.extra_index_urls:
        args += ["--extra-index-url", u]
    for f in spec.find_links:
        args += ["--find-links", f]
    if spec.no_index:
        args.append("--no-index")
    return args


def _build_into(staging, spec, interp, report, label) -> str:
    """Create the venv at ``staging`` and install; return the installer name."""
    uv = find_uv()
    child_env = dict(os.environ)
    child_env.pop("VIRTUAL_ENV", None)  # installers must target the staging env only
    child_env.pop("PYTHONPATH", None)
    py = env_python(staging)
    if uv:
        _run([uv, "venv", "--python", interp.executable, "--relocatable", "--no-project",
              "--no-python-downloads", staging], report, f"creating venv for {label}", child_env)
        if spec.requirements:
            cmd = [uv, "pip", "install", "--python", py, *_install_args(spec)]
            excludes = None
            if spec.share:
                # Shared distributions come from the host: never let the resolver install them.
                fd, excludes = tempfile.mkstemp(prefix="comfy-env-excludes-", suffix=".txt")
                with os.fdopen(fd, "w") as f:
                    f.write("\n".join(spec.share) + "\n")
                cmd += ["--excludes", excludes]
            try:
                _run(cmd + list(spec.requirements), report, f"installing requirements for {label}", child_env)
            finally:
                if excludes:
                    os.unlink(excludes)
        return "uv"
    warnings.warn(
        "comfy-env: uv not found (install the `uv` package or set COMFY_ENV_UV); "
        "falling back to `python -m venv` + pip, which is slower and cannot keep shared "
        "packages out of the env",
        RuntimeWarning, stacklevel=4,
    )
    _run([interp.executable, "-m", "venv", staging], report, f"creating venv for {label}", child_env)
    if spec.requirements:
        _run([py, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
              *_install_args(spec), *spec.requirements],
             report, f"installing requirements for {label}", child_env)
    return "pip"


def _remove_stale_staging(final: str) -> None:
    for p in glob.glob(os.path.join(os.path.dirname(final), ".tmp-" + os.path.basename(final) + "-*")):
        log.info("comfy-env: removing remains of an interrupted build: %s", p)
        shutil.rmtree(p, ignore_errors=True)


def build_env(final: str, spec, interp, *, progress=True, label=None, key=None) -> bool:
    """Make sure the env at ``final`` exists; build it if not.  Returns True if this call built it."""
    label = label or os.path.basename(final)
    if os.path.isfile(os.path.join(final, META_FILENAME)):
        return False  # fast path: no lock needed to read a published env
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    report = _make_reporter(progress, label)
    import filelock  # imported here: workers import comfy_env.envs with only the stdlib around

    lock = filelock.FileLock(final + ".lock")
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        report(f"waiting for another process building {label} ...")
        lock.acquire()
    try:
        if os.path.isfile(os.path.join(final, META_FILENAME)):
            return False  # someone else built it while we waited
        if os.path.exists(final):
            # A dir without metadata cannot come from us (we rename only finished envs):
            # refuse rather than delete something we do not own.
            raise EnvBuildError(f"{final!r} exists but is not a finished comfy-env env; remove it "
                                "(`comfy-env env remove`) and try again.")
        _remove_stale_staging(final)
        staging = os.path.join(parent, f".tmp-{os.path.basename(final)}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        t0 = time.perf_counter()
        report(f"building {label} (Python {interp.version_str}) in {final}")
        try:
            installer = _build_into(staging, spec, interp, report, label)
            meta = {
                "name": spec.name,
                "key": key,
                "source": spec.source,
                "python_version": list(interp.version),
                "base_interpreter": interp.executable,
                "installer": installer,
                "installed": installed_distributions(staging),
                "spec": json.loads(spec.to_json()),
                "created": time.time(),
                "build_seconds": round(time.perf_counter() - t0, 3),
            }
            with open(os.path.join(staging, META_FILENAME), "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=2, sort_keys=True)
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        report(f"built {label} in {time.perf_counter() - t0:.1f} s")
        return True
    finally:
        lock.release()
