"""Building an env: venv + install, in a staging dir, renamed into place under a file lock.

::

    lock envs/<key>.lock ──► already built? ──yes──► done (no installer runs)
            │ no
            ▼
    remove stale envs/.tmp-<key>-* (their builders died: we hold the lock)
    uv venv --relocatable envs/.tmp-<key>-<pid>-<rand>     (or: python -m venv, with a warning)
    uv pip compile --format pylock.toml  ──► <staging>/pylock.comfy-env.toml
                                             (skipped when the spec's own lock is fresh: copied)
    uv pip install -r <staging>/pylock.comfy-env.toml      (or: pip install)
    write comfy-env-env.json; os.rename(staging, envs/<key>)  ◄── the only step that publishes
    delete envs/<key>.lock

A crash, kill or Ctrl-C anywhere before the rename leaves only a staging dir, which
the next builder removes.  The staging dir lives next to the final dir so the rename
stays on one filesystem.  A venv's ``bin/python`` links to the base interpreter by
absolute path and ``pyvenv.cfg`` names the base's directory, so the interpreter keeps
working after the rename; ``--relocatable`` makes uv write relative script shebangs too.

Each installer step runs under ``installer_guard.py`` in its own process group, so
killing the builder (even with SIGKILL) takes uv and its build backends along.  Its
output is forwarded line by line (``progress``), with the staging path shown as the
final one and a heartbeat line while it is silent; the installer's explanation of a
failure goes into the :class:`EnvBuildError` (once) instead of the progress stream.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import warnings

from .. import settings, stdfds
from .cache import META_FILENAME
from .errors import EnvBuildError
from .spec import normalize_dist_name

__all__ = ["UV_ENV_VAR", "find_uv", "build_env", "env_python", "installed_distributions", "resolve_lock",
           "HEARTBEAT_SECONDS"]

log = logging.getLogger("comfy_env.envs")

UV_ENV_VAR = "COMFY_ENV_UV"   # path to a uv binary to use; set to "" to force the venv+pip fallback
_IS_WINDOWS = sys.platform == "win32"
HEARTBEAT_SECONDS = 10.0      # a silent installer step gets a "still running" line this often


def find_uv() -> str | None:
    """The uv binary: ``$COMFY_ENV_UV``, else the one shipped by the ``uv`` PyPI package, else PATH."""
    uv = settings.read().uv
    if uv is not None:
        return uv or None
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


_GUARD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "installer_guard.py")
# Lines where an installer starts explaining a failure: from there on, lines go into the
# error (once) instead of the progress stream.
_ERROR_START = ("error:", "ERROR:", "\u00d7 ")


def _spawn(cmd, env):
    """Start ``cmd`` so that it and everything it starts die with this process.

    Returns (Popen, alive_w or None).  With the guard (POSIX), the Popen is the guard,
    leader of a new process group holding the installer and its children.
    """
    popen = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    if _IS_WINDOWS or not (sys.executable and os.path.isfile(sys.executable)):
        return subprocess.Popen(cmd, **popen), None  # pragma: no cover - no guard there
    alive_r, alive_w = os.pipe()  # non-inheritable: only the guard gets the read end
    moved = ()
    try:
        (passed,), moved = stdfds.above((alive_r,))   # the child's stdin/stdout would replace 0-2
        proc = subprocess.Popen([sys.executable, "-I", _GUARD, str(passed), "--", *cmd],
                                pass_fds=(passed,), start_new_session=True, **popen)
    except BaseException:
        os.close(alive_w)
        raise
    finally:
        stdfds.close_all(moved)
        os.close(alive_r)
    return proc, alive_w


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, AttributeError):
        pass


def _reap(proc, guarded):
    """Wait for the installer; then kill whatever it left in its group (a killed uv's backend)."""
    if guarded and hasattr(os, "waitid"):
        # Wait without reaping, so the group id cannot be reused before we kill the rest.
        while True:
            try:
                os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
                break
            except InterruptedError:
                continue
            except ChildProcessError:
                break
        _kill_group(proc)
    return proc.wait()


def _uv_lock_hint(uv):
    """Say so if uv's cache is locked by another uv (uv itself waits silently)."""
    try:
        import fcntl

        cache = os.environ.get("UV_CACHE_DIR") or subprocess.run(
            [uv, "cache", "dir"], capture_output=True, text=True, timeout=10).stdout.strip()
        fd = os.open(os.path.join(cache, ".lock"), os.O_RDONLY | os.O_CLOEXEC)
    except Exception:
        return ""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return ""
    except OSError:
        return f"; uv is waiting for its cache lock ({cache}), held by another uv process"
    finally:
        os.close(fd)


def _run(cmd, report, what, env=None, *, hide=None, uv=None) -> str:
    """Run an installer step, forwarding its output line by line; raise EnvBuildError on failure.

    ``hide``: (staging dir, final dir): the staging path is never shown, the final one is.
    While the step prints nothing, a heartbeat line says what it is doing and for how long.
    """
    log.info("comfy-env: %s: %s", what, " ".join(cmd))
    lines, explanation = [], []

    def handle(raw):
        line = raw.decode("utf-8", "replace").rstrip("\r")
        if hide:
            # By name: uv shows the path relative to the working directory where it can.
            line = line.replace(os.path.basename(hide[0]), os.path.basename(hide[1]))
        if line.startswith("Activate with:") or "The `--pylock` option is experimental" in line:
            return  # uv's hints: the staging dir's activation, a preview notice
        lines.append(line)
        log.debug("%s", line)
        if explanation or line.lstrip().startswith(_ERROR_START):
            explanation.append(line)
        else:
            report(line)

    try:
        proc, alive_w = _spawn(cmd, env)
    except OSError as e:
        raise EnvBuildError(f"{what}: could not start {cmd[0]!r}: {e}") from None
    t0 = last = time.monotonic()
    next_beat = t0 + HEARTBEAT_SECONDS
    try:
        fd = proc.stdout.fileno()
        buf = b""
        if not _IS_WINDOWS:
            # poll, not select: this process's fds may be numbered above select's 1024.
            poller = select.poll()
            poller.register(fd, select.POLLIN)
        while True:
            if _IS_WINDOWS:  # pragma: no cover - no poll() on pipes there
                chunk = proc.stdout.readline()
            else:
                ready = poller.poll(max(0.0, next_beat - time.monotonic()) * 1000)
                if not ready:
                    now = time.monotonic()
                    report(f"{what}: still running after {_secs(now - t0)} (no output for {_secs(now - last)}"
                           f"{_uv_lock_hint(uv) if uv else ''})")
                    next_beat = now + HEARTBEAT_SECONDS
                    continue
                chunk = os.read(fd, 65536)
            if not chunk:
                break
            last = time.monotonic()
            next_beat = last + HEARTBEAT_SECONDS
            *complete, buf = (buf + chunk).split(b"\n")
            for raw in complete:
                handle(raw)
        if buf:
            handle(buf)
        rc = _reap(proc, alive_w is not None)
    except BaseException:
        # Ctrl-C or an error in the progress callback: never leave the installer running.
        if alive_w is not None:
            _kill_group(proc)
        else:
            proc.kill()
        proc.wait()
        raise
    finally:
        proc.stdout.close()
        if alive_w is not None:
            os.close(alive_w)
    output = "\n".join(lines)
    if rc != 0:
        how = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
        detail = "\n".join(explanation) if explanation else _tail_lines(lines, 20)
        raise EnvBuildError(f"{what} failed ({how})", output, rc, detail=detail)
    return output


def _secs(s):
    return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"


def _tail_lines(lines, n):
    return "\n".join(lines[-n:])


def index_args(spec) -> list:
    """uv's index options (--index-url, --extra-index-url, --find-links, --no-index) of ``spec``."""
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


def resolve_lock(uv, python, spec, report, label, env, hide=None) -> str:
    """``uv pip compile`` the spec's requirements for ``python`` into the pylock ``out_path``.

    Returns the lock text as uv wrote it.  Shared distributions are left out of the
    resolution (they come from the host).
    """
    work = tempfile.mkdtemp(prefix="comfy-env-resolve-")
    try:
        req_in = os.path.join(work, "requirements.in")
        with open(req_in, "w", encoding="utf-8") as f:
            f.write("\n".join(spec.requirements) + "\n")
        out = os.path.join(work, "pylock.toml")
        cmd = [uv, "pip", "compile", "--quiet", "--python", python, "--no-python-downloads",
               "--format", "pylock.toml", "--output-file", out, *index_args(spec)]
        if spec.exclude_newer:
            cmd += ["--exclude-newer", spec.exclude_newer]
        if spec.share:
            excludes = os.path.join(work, "excludes.txt")
            with open(excludes, "w", encoding="utf-8") as f:
                f.write("\n".join(spec.share) + "\n")
            cmd += ["--excludes", excludes]
        _run(cmd + [req_in], report, f"resolving the requirements of {label}", env, hide=hide, uv=uv)
        with open(out, encoding="utf-8") as f:
            return f.read()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _child_env():
    child_env = dict(os.environ)
    child_env.pop("VIRTUAL_ENV", None)  # installers must target the staging env only
    child_env.pop("PYTHONPATH", None)
    return child_env


def _build_into(staging, final, spec, interp, report, label, lock) -> tuple:
    """Create the venv at ``staging`` and install; return (installer name, lock source)."""
    from .lockfile import LOCK_FILENAME, write_lock

    uv = find_uv()
    child_env = _child_env()
    py = env_python(staging)
    hide = (staging, final)
    if uv:
        _run([uv, "venv", "--python", interp.executable, "--relocatable", "--no-project",
              "--no-python-downloads", staging], report, f"creating the venv of {label}", child_env,
             hide=hide, uv=uv)
        if not spec.requirements:
            return "uv", None
        recorded = os.path.join(staging, LOCK_FILENAME)
        if lock is not None:
            shutil.copyfile(lock.path, recorded)
            how = "lock"
        else:
            # Resolve once, record the result in the env, install exactly that.
            write_lock(recorded, resolve_lock(uv, py, spec, report, label, child_env, hide),
                       spec, interp)
            how = "resolved"
        _run([uv, "pip", "install", "--python", py, "--preview-features", "pylock", "-r", recorded],
             report, f"installing the requirements of {label}", child_env, hide=hide, uv=uv)
        return "uv", how
    if lock is not None or spec.exclude_newer:
        raise EnvBuildError(f"{label}: installing from a lock file and exclude_newer need uv, which was "
                            "not found; install the `uv` package or set COMFY_ENV_UV.")
    warnings.warn(
        "comfy-env: uv not found (install the `uv` package or set COMFY_ENV_UV); "
        "falling back to `python -m venv` + pip, which is slower, writes no lock and cannot "
        "keep shared packages out of the env",
        RuntimeWarning, stacklevel=5,
    )
    _run([interp.executable, "-m", "venv", staging], report, f"creating the venv of {label}", child_env,
         hide=hide)
    if spec.requirements:
        _run([py, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
              *index_args(spec), *spec.requirements],
             report, f"installing the requirements of {label}", child_env, hide=hide)
    return "pip", None


def failed_requirements(spec, text: str) -> list:
    """The spec's requirements that the installer's explanation names (best effort)."""
    said = normalize_dist_name(text)
    out = []
    for r in spec.requirements:
        name = os.path.basename(r) if os.sep in r else r
        m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)", name)
        if m and re.search(r"(?<![a-z0-9-])" + re.escape(normalize_dist_name(m.group(1))) + r"(?![a-z0-9])", said):
            out.append(r)
    return out


def _remove_stale_staging(final: str) -> None:
    for p in glob.glob(os.path.join(os.path.dirname(final), ".tmp-" + os.path.basename(final) + "-*")):
        log.info("comfy-env: removing remains of an interrupted build: %s", p)
        shutil.rmtree(p, ignore_errors=True)


def build_env(final: str, spec, interp, *, progress=True, label=None, key=None, lock=None) -> bool:
    """Make sure the env at ``final`` exists; build it if not.  Returns True if this call built it.

    ``lock``: a fresh :class:`~.lockfile.LockFile` to install from; None resolves the spec.
    """
    from .locks import build_lock

    label = label or os.path.basename(final)
    if os.path.isfile(os.path.join(final, META_FILENAME)):
        return False  # fast path: no lock needed to read a published env
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    report = _make_reporter(progress, label)

    def waiting(seconds):
        report(f"waiting for another process that is building {label} ({_secs(seconds)} so far)")

    with build_lock(final, on_wait=waiting, heartbeat=HEARTBEAT_SECONDS):
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
        report(f"building {label} (Python {interp.version_str}"
               f"{', from ' + os.path.basename(lock.path) if lock else ''}) in {final}")
        try:
            installer, how = _build_into(staging, final, spec, interp, report, label, lock)
            meta = {
                "name": spec.name,
                "key": key,
                "source": spec.source,
                "python_version": list(interp.version),
                "base_interpreter": interp.executable,
                "installer": installer,
                "lock": how,
                "installed": installed_distributions(staging),
                "spec": json.loads(spec.to_json()),
                "created": time.time(),
                "build_seconds": round(time.perf_counter() - t0, 3),
            }
            with open(os.path.join(staging, META_FILENAME), "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=2, sort_keys=True)
            os.rename(staging, final)
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(exc, EnvBuildError):
                raise _with_spec(exc, spec) from None
            raise
        report(f"built {label} in {time.perf_counter() - t0:.1f} s")
        return True


def _with_spec(exc, spec):
    """The error a user sees: which spec, which requirement, the installer's explanation once."""
    msg = exc.summary
    named = failed_requirements(spec, exc.detail or exc.output or "")
    if named:
        msg += "; the requirement that failed: " + ", ".join(repr(r) for r in named)
    if spec.source:
        msg = f"{spec.source}: {msg}"
    return EnvBuildError(msg, exc.output, exc.returncode, detail=exc.detail)
