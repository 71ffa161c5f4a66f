"""Sandboxed workers: bubblewrap (``bwrap``) around the worker command, opt-in.

A :class:`Sandbox` says what a worker may do beyond running its env's code: reach
the network or not, which paths it may write, which it may read, whether it gets
the GPU, which environment variables it sees.  ``launch.spawn`` hands the worker
command to :func:`wrap`, which puts ``bwrap <mounts and namespaces> --`` in front
of it and filters its environment; nothing else of comfy_env knows about the
sandbox.  The transport and the data planes are untouched by design: the
socketpair, the memfd segments and the CUDA pool fds are *inherited or passed*
file descriptors, which cross a mount or network namespace as they are.

What the command line looks like (``readable=None``, the default)::

    bwrap --die-with-parent --new-session --unshare-ipc? --unshare-uts --unshare-cgroup-try
          --unshare-net                    # network=False: a private loopback only
          --ro-bind / /                    # the whole file system, read-only
          --dev /dev                       # a minimal /dev (null, zero, urandom, shm, pts)
          --tmpfs /tmp                     # tmp=True: private, writable, gone with the worker
          --ro-bind <env paths under /tmp> # the env must stay visible under the private /tmp
          --bind <writable> <writable>     # the only host paths it may write
          --dev-bind /dev/nvidia* ...      # gpu=True: device nodes (when present)
          --chdir <dir> -- python -s -m comfy_env.worker --fd N --alive-fd M

With ``readable=[...]`` the root is an empty tmpfs instead of ``/``, and only the
system directories, the interpreter (its real prefix, symlinks resolved), the env,
the bootstrap dir (and what its links point to), the listed paths and, for
``gpu=True``, the driver libraries and ``/sys`` are mounted, read-only.

No pid namespace: a worker's pid must mean the same in the parent (the ComfyUI
adapter kills a worker by the pid it reported, logs name it), and CUDA's legacy
IPC (interprocess events) identifies peers by pid.  For the same reason the IPC
namespace is only unshared when ``gpu=False``.

bwrap stays between the parent and the worker as its monitor: it exits with the
worker's status (``128 + signal`` for a signal), it closes every fd it passed on,
and ``--die-with-parent`` takes the worker down with the parent.  :func:`wrap`
returns a ``Popen`` class that turns ``128 + N`` back into ``-N``, so crash
reports still say "killed by signal SIGSEGV".
"""
from __future__ import annotations

import functools
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

from .ipc.calls import parent_cwd

__all__ = ["Sandbox", "SandboxUnavailable", "sandbox_from_table", "probe", "check_available",
           "for_pack", "TABLE_KEYS"]

# Environment variables a sandboxed worker sees by default (plus the env's own declared
# variables, the device pin, what comfy_env sets to start it, and ``env_passthrough``).
# Everything else (tokens, cloud credentials, SSH agent sockets, proxies) stays out.
DEFAULT_ENV = (
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TERM",
    "PYTHONPATH", "PYTHONUNBUFFERED", "PYTHONIOENCODING", "PYTHONHASHSEED",
    "PYTHONDONTWRITEBYTECODE", "PYTHONFAULTHANDLER", "PYTHONWARNINGS",
    "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "NVIDIA_VISIBLE_DEVICES",
    "NVIDIA_DRIVER_CAPABILITIES", "PYTORCH_CUDA_ALLOC_CONF", "LD_LIBRARY_PATH",
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
)
DEFAULT_ENV_PREFIXES = ("LC_", "COMFY_ENV_")

# System directories mounted read-only when ``readable`` is a list.  Only these parts
# of /etc: name resolution, the dynamic linker, certificates, time zone, users.
_SYSTEM_PATHS = (
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
    "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/alternatives",
    "/etc/passwd", "/etc/group", "/etc/nsswitch.conf", "/etc/hosts", "/etc/resolv.conf",
    "/etc/localtime", "/etc/timezone", "/etc/ssl", "/etc/ca-certificates", "/etc/pki",
    "/etc/mime.types", "/etc/os-release",
)
# GPU: device nodes (bound with --dev-bind: a read-only bind of a device is still a
# device) and what the driver reads.
_GPU_DEVICES = ("/dev/nvidia*", "/dev/nvidia-caps", "/dev/dri")
_GPU_PATHS = ("/sys", "/run/nvidia-persistenced", "/proc/driver/nvidia")
_DRIVER_LIB = re.compile(r"^\s*(libcuda|libnvidia|libnvcuvid|libnvoptix|libvdpau_nvidia|libEGL_nvidia"
                         r"|libGLX_nvidia|libGLESv\d_nvidia|libnvrtc|libcudadebugger)\S*\s.*=>\s*(\S+)")

TABLE_KEYS = ("network", "writable", "readable", "tmp", "gpu", "env_passthrough")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SandboxUnavailable(RuntimeError):
    """A sandbox was asked for, but bubblewrap can't run here; the message says what to do.

    Raised when the executor is created, never replaced by an unsandboxed run.
    """


class Sandbox:
    """What a sandboxed worker may do (see docs/sandbox.md for the threat model).

    ``network``: False cuts the worker off the network (its own network namespace:
    loopback only).  ``writable``: the host paths it may write (files or directories
    that exist); everything else is read-only.  ``readable``: None, the whole file
    system is readable; a list: only those paths plus what the worker needs to run
    (its env and interpreter, comfy_env's bootstrap dir, system libraries).  ``tmp``:
    a private, empty, writable ``/tmp`` (``TMPDIR``) that disappears with the worker.
    ``gpu``: NVIDIA device nodes, ``/dev/dri`` and the driver libraries are made
    available so CUDA works.  ``env_passthrough``: environment variables passed on
    besides the small default allow-list (``DEFAULT_ENV``).
    """

    __slots__ = ("network", "writable", "readable", "tmp", "gpu", "env_passthrough", "_also")

    def __init__(self, network=False, writable=(), readable=None, tmp=True, gpu=True,
                 env_passthrough=None):
        for name, value in (("network", network), ("tmp", tmp), ("gpu", gpu)):
            if not isinstance(value, bool):
                raise TypeError(f"Sandbox({name}=...) must be True or False, not {value!r}")
        _set(self, "network", network)
        _set(self, "tmp", tmp)
        _set(self, "gpu", gpu)
        _set(self, "writable", _paths("writable", writable))
        _set(self, "readable", None if readable is None else _paths("readable", readable))
        _set(self, "env_passthrough", _env_names(env_passthrough))
        _set(self, "_also", ())

    def __setattr__(self, name, value):
        raise AttributeError(f"Sandbox is immutable; make a new one (cannot set {name!r})")

    def also_readable(self, *paths):
        """A copy that can also read ``paths``, whatever ``readable`` says.

        For what comfy_env itself needs visible in the sandbox (e.g. the directory of
        the ComfyUI adapter's progress socket, which lives under the host's /tmp).
        """
        new = object.__new__(Sandbox)
        for name in self.__slots__:
            _set(new, name, getattr(self, name))
        _set(new, "_also", self._also + _paths("also_readable", paths))
        return new

    def _key(self):
        return tuple(getattr(self, n) for n in self.__slots__)

    def __eq__(self, other):
        return isinstance(other, Sandbox) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        return (f"Sandbox(network={self.network!r}, writable={list(self.writable)!r}, "
                f"readable={None if self.readable is None else list(self.readable)!r}, "
                f"tmp={self.tmp!r}, gpu={self.gpu!r}, env_passthrough="
                f"{None if self.env_passthrough is None else list(self.env_passthrough)!r})")

    def __reduce__(self):
        return (_rebuild, (self._key(),))


def _rebuild(key):
    new = object.__new__(Sandbox)
    for name, value in zip(Sandbox.__slots__, key):
        _set(new, name, value)
    return new


def _set(obj, name, value):
    object.__setattr__(obj, name, value)


def _paths(what, value, base=None):
    """Absolute, existing paths (a single path or an iterable of them)."""
    if isinstance(value, (str, bytes, os.PathLike)):
        value = [value]
    try:
        items = list(value)
    except TypeError:
        raise TypeError(f"Sandbox({what}=...) must be a path or a list of paths, not {value!r}") from None
    out = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)) or not os.fspath(item):
            raise TypeError(f"Sandbox({what}=...): {item!r} is not a path")
        path = os.path.expanduser(os.fspath(item))
        path = os.path.abspath(os.path.join(base, path) if base else path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"Sandbox({what}=...): {path!r} does not exist; a sandbox can only "
                                    f"mount existing paths (create it first)")
        if path not in out:
            out.append(path)
    return tuple(out)


def _env_names(value):
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if isinstance(value, (bytes, bytearray)):
        raise TypeError(f"Sandbox(env_passthrough=...) takes variable names as str, not bytes "
                        f"({value!r})")
    try:
        names = list(value)
    except TypeError:
        raise TypeError(f"Sandbox(env_passthrough=...) must be a list of variable names, "
                        f"not {value!r}") from None
    for n in names:
        if not isinstance(n, str) or not _ENV_NAME.match(n):
            raise ValueError(f"Sandbox(env_passthrough=...): {n!r} is not an environment variable name")
    return tuple(dict.fromkeys(names))


def sandbox_from_table(table, base_dir):
    """A Sandbox from a ``[sandbox]`` table of comfy-env.toml (paths relative to ``base_dir``).

    Every error is a ``ValueError`` whose ``args`` are ``(message, offending key)``, so
    the spec loader can name the key's line.
    """
    for key in table:
        if key not in TABLE_KEYS:
            raise _TableError(f"[sandbox] has an unknown key {key!r}; the known keys are: "
                              f"{', '.join(TABLE_KEYS)}.", key)
    kw = {}
    for key in ("network", "tmp", "gpu"):
        if key in table:
            if not isinstance(table[key], bool):
                raise _TableError(f"[sandbox] {key} must be true or false, not {table[key]!r}.", key)
            kw[key] = table[key]
    for key in ("writable", "readable", "env_passthrough"):
        if key not in table:
            continue
        v = table[key]
        if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
            raise _TableError(f"[sandbox] {key} must be a list of non-empty strings, not {v!r}.", key)
        if key == "env_passthrough":
            kw[key] = v
        else:
            try:
                kw[key] = _paths(key, v, base=base_dir)
            except (TypeError, FileNotFoundError) as e:
                raise _TableError(f"[sandbox] {key}: {e.args[0].split(': ', 1)[-1]} (relative paths "
                                  f"are taken from the toml's directory).", key) from None
    try:
        return Sandbox(**kw)
    except (TypeError, ValueError) as e:
        raise _TableError(f"[sandbox] {e}", "env_passthrough") from None


class _TableError(ValueError):
    @property
    def key(self):
        return self.args[1]


# -- can bwrap run here? (probed once per bwrap binary) --------------------------------------

_probe_lock = threading.Lock()
_probed = {}


def _bwrap_path():
    """The bwrap binary: ``$COMFY_ENV_BWRAP`` if set, else ``bwrap`` on PATH (None: not found)."""
    from . import settings

    explicit = settings.read().bwrap
    if explicit:
        return explicit if os.access(explicit, os.X_OK) and os.path.isfile(explicit) else None
    return shutil.which("bwrap")


def probe():
    """``(bwrap path or None, None if sandboxing works here else why not and what to do)``."""
    if not sys.platform.startswith("linux"):
        return None, (f"sandboxed workers need Linux (bubblewrap); this is {sys.platform}. "
                      f"Run without sandbox=, or on Linux.")
    bwrap = _bwrap_path()
    if bwrap is None:
        from . import settings

        where = settings.read().bwrap
        return None, ((f"$COMFY_ENV_BWRAP={where!r} is not an executable file. " if where else
                       "bubblewrap (bwrap) is not installed. ") +
                      "Install bubblewrap: `sudo apt-get install bubblewrap` (Debian/Ubuntu), "
                      "`sudo dnf install bubblewrap` (Fedora/RHEL), `sudo pacman -S bubblewrap` (Arch).")
    with _probe_lock:
        if bwrap not in _probed:
            _probed[bwrap] = _run_probe(bwrap)
        return bwrap, _probed[bwrap]


def check_available():
    """Raise :class:`SandboxUnavailable` unless a sandboxed worker can start here."""
    bwrap, problem = probe()
    if problem is not None:
        raise SandboxUnavailable(f"a sandboxed worker was asked for, but {problem}")
    return bwrap


def _run_probe(bwrap):
    true = shutil.which("true") or "/bin/true"
    cmd = [bwrap] + _namespaces(network=False, gpu=False) + [
        "--ro-bind", "/", "/", "--dev", "/dev", "--tmpfs", "/tmp", "--", true]
    try:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"bubblewrap ({bwrap}) could not be run: {e}."
    if r.returncode == 0:
        return None
    err = r.stderr.decode("utf-8", "replace").strip() or f"exit code {r.returncode}"
    return f"bubblewrap ({bwrap}) cannot create a sandbox here: {err}. " + _userns_advice()


def _read_int(path):
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _userns_advice():
    if _read_int("/proc/sys/user/max_user_namespaces") == 0:
        return ("User namespaces are disabled (user.max_user_namespaces = 0); enable them: "
                "`sudo sysctl -w user.max_user_namespaces=15000` (persist it in /etc/sysctl.d/).")
    if _read_int("/proc/sys/kernel/unprivileged_userns_clone") == 0:
        return ("Unprivileged user namespaces are disabled; enable them: "
                "`sudo sysctl -w kernel.unprivileged_userns_clone=1` (persist it in /etc/sysctl.d/).")
    if _read_int("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == 1:
        return ("AppArmor restricts unprivileged user namespaces (Ubuntu 23.10+); allow them for bwrap: "
                "`sudo apt-get install apparmor-profiles && sudo ln -s "
                "/usr/share/apparmor/extra-profiles/bwrap-userns-restrict /etc/apparmor.d/ && "
                "sudo apparmor_parser -r /etc/apparmor.d/bwrap-userns-restrict`.")
    return ("bubblewrap needs unprivileged user namespaces (or a setuid bwrap); inside a container "
            "they are often disabled: allow them (e.g. docker --security-opt seccomp=unconfined "
            "--security-opt apparmor=unconfined) or run the workers unsandboxed.")


# -- the command line ---------------------------------------------------------------------------

def _namespaces(network, gpu):
    args = ["--die-with-parent",     # the worker dies with the parent (and with bwrap)
            "--new-session",         # no TIOCSTI into the parent's terminal
            "--unshare-uts", "--unshare-cgroup-try"]
    if not gpu:
        args.append("--unshare-ipc")  # CUDA's legacy IPC wants the host's
    if not network:
        args.append("--unshare-net")
    return args


def _real(path):
    return os.path.realpath(path)


def _under(path, root):
    return path == root or path.startswith(root.rstrip("/") + "/")


def _interpreter_paths(python):
    """The interpreter, its venv and its real prefix (pyenv, uv-managed and conda pythons)."""
    out = []
    exe_dir = os.path.dirname(os.path.abspath(python))
    env_root = os.path.dirname(exe_dir)
    cfg = os.path.join(env_root, "pyvenv.cfg")
    if os.path.isfile(cfg):
        out.append(env_root)
        try:
            with open(cfg) as f:
                for line in f:
                    k, _, v = line.partition("=")
                    if k.strip() == "home" and v.strip():
                        out.append(os.path.dirname(_real(v.strip())))
        except OSError:
            pass
    else:
        out.append(env_root)
    real = _real(python)
    out.append(os.path.dirname(os.path.dirname(real)))
    return out


def _followed_links(dirs):
    """Targets of the symlinks directly inside ``dirs`` (bootstrap and share dirs hold links)."""
    out = []
    for d in dirs:
        try:
            entries = os.scandir(d)
        except OSError:
            continue
        with entries:
            for e in entries:
                if e.is_symlink():
                    t = _real(e.path)
                    if os.path.exists(t):
                        out.append(t)
    return out


def _pth_dirs(site_dirs):
    """Directories that ``.pth`` files of ``site_dirs`` add to sys.path (editable installs)."""
    out = []
    for d in site_dirs:
        for pth in glob.glob(os.path.join(glob.escape(d), "*.pth")):
            try:
                with open(pth, encoding="utf-8", errors="replace") as f:
                    for line in f:
                        line = line.strip()
                        if line and not line.startswith(("#", "import ")) and os.path.isabs(line) \
                                and os.path.isdir(line):
                            out.append(line)
            except OSError:
                pass
    return out


def _env_paths(wenv, package_parent):
    """What a worker of ``wenv`` must be able to read to start and import its env."""
    paths = _interpreter_paths(wenv.python)
    if wenv.env_dir:
        paths.append(wenv.env_dir)
    paths += list(wenv.pythonpath)
    if wenv.is_current:
        # The parent's interpreter and its sys.path (the worker gets the parent's sys.path).
        paths += [sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix, package_parent]
        # An empty entry ("python -c", the REPL) is the working directory (none if removed).
        cwd = parent_cwd()
        paths += [p or cwd for p in sys.path if (p or cwd) and os.path.exists(p or cwd)]
        paths += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.exists(p)]
    site = glob.glob(os.path.join(glob.escape(os.path.dirname(os.path.dirname(os.path.abspath(wenv.python)))),
                                  "lib", "python3*", "site-packages"))
    if wenv.is_current:
        site += [p for p in sys.path if p.endswith("-packages")]
    paths += _pth_dirs(site)
    paths += _followed_links(wenv.pythonpath)
    return [_real(p) for p in paths if p and os.path.exists(p)]


@functools.lru_cache(maxsize=1)
def _driver_lib_dirs():
    """Directories holding the NVIDIA driver's user-space libraries (from ``ldconfig -p``).

    Asked once per process: the driver does not change under a running parent.
    """
    ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
    try:
        out = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    dirs = []
    for line in out.splitlines():
        m = _DRIVER_LIB.match(line)
        if m:
            for p in (m.group(2), _real(m.group(2))):
                d = os.path.dirname(p)
                if d not in dirs:
                    dirs.append(d)
    return tuple(dirs)


def _minimal(paths):
    """Drop paths inside another path of the list (one mount covers them)."""
    out = []
    for p in sorted(set(paths), key=lambda p: (p.count("/"), p)):
        if not any(_under(p, q) for q in out):
            out.append(p)
    return out


def bwrap_args(sb, wenv, cwd, package_parent):
    """bwrap's options (without the binary and the command) for a worker of ``wenv``.

    Order matters (later mounts cover earlier ones): the base (``/`` or the system
    directories), read-only paths outside /tmp, the fresh /dev and the private /tmp,
    read-only paths inside /tmp (they would be hidden otherwise), the writable paths,
    the GPU devices.
    """
    args = _namespaces(sb.network, sb.gpu)
    needed = _env_paths(wenv, package_parent) + [_real(p) for p in sb._also]
    if sb.readable is None:
        args += ["--ro-bind", "/", "/"]
        # Everything is readable already, except what the private /tmp will hide.
        ro = [p for p in needed + [_real(cwd)] if sb.tmp and _under(p, "/tmp") and p != "/tmp"]
    else:
        for p in _SYSTEM_PATHS:
            if os.path.islink(p):
                args += ["--symlink", os.readlink(p), p]
            elif os.path.exists(p):
                args += ["--ro-bind", p, p]
        ro = needed + [_real(p) for p in sb.readable]
        if sb.gpu:
            ro += [p for p in _GPU_PATHS if os.path.exists(p)] + list(_driver_lib_dirs())
        ro = [p for p in ro if not _under(p, "/usr") and not _under(p, "/proc")]
    ro = _minimal(ro)
    in_tmp = [p for p in ro if sb.tmp and _under(p, "/tmp") and p != "/tmp"]
    for p in ro:
        if p not in in_tmp:
            args += ["--ro-bind", p, p]
    if sb.readable is not None:
        args += ["--ro-bind", "/proc", "/proc"]
    args += ["--dev", "/dev"]
    if sb.tmp:
        args += ["--tmpfs", "/tmp"]
    for p in in_tmp:
        args += ["--ro-bind", p, p]
    for p in _minimal([_real(p) for p in sb.writable]):
        args += ["--bind", p, p]
    if sb.readable is not None:
        args += _given_names(sb, ro)
    if sb.gpu:
        for pattern in _GPU_DEVICES:
            for dev in sorted(glob.glob(pattern)):
                args += ["--dev-bind", dev, dev]
    if sb.readable is not None:
        # bwrap's root is a tmpfs holding the mount points: writes there would "work"
        # and vanish; make them fail like any other write outside ``writable``.
        args += ["--remount-ro", "/"]
    args += ["--chdir", cwd if _visible(cwd, sb, ro) else "/"]
    return args


def _given_names(sb, ro):
    """``--symlink`` options that make each readable or writable path given through a
    symlink (a ``models`` folder linked to another disk) work by that name too: paths
    are mounted at their real place, and with a ``readable`` list nothing else holds
    the link.  Not where a mounted directory already shows the link itself."""
    mounted = list(ro) + [_real(p) for p in sb.writable] + list(_SYSTEM_PATHS)
    out = []
    for given in dict.fromkeys(sb.readable + sb.writable):     # a path may be in both
        real = _real(given)
        if given != real and not any(_under(os.path.dirname(given), m) for m in mounted):
            out += ["--symlink", real, given]
    return out


def _visible(path, sb, ro):
    path = _real(path)
    if any(_under(path, p) for p in [_real(p) for p in sb.writable]):
        return True
    if sb.tmp and _under(path, "/tmp"):
        return any(_under(path, p) for p in ro if p != "/tmp")
    if sb.readable is None:
        return True
    return any(_under(path, p) for p in list(ro) + ["/usr"])


def worker_env(sb, env, declared=()):
    """The worker's environment: the allow-list, ``env_passthrough``, and what comfy_env set."""
    keep = set(DEFAULT_ENV) | set(sb.env_passthrough or ()) | set(declared)
    out = {k: v for k, v in env.items() if k in keep or k.startswith(DEFAULT_ENV_PREFIXES)}
    if sb.tmp:
        out["TMPDIR"] = "/tmp"
    return out


class SandboxedPopen(subprocess.Popen):
    """A worker behind bwrap: ``returncode`` says ``-N`` for a worker killed by signal N.

    bwrap, the monitor between us and the worker, exits with ``128 + N`` when the worker
    is killed by signal N.  (A worker that itself exits with such a code, 129-159, is
    reported as killed by that signal too; comfy_env's worker never does.)

    bwrap starts in a session of its own: a Ctrl-C in the parent's terminal signals the
    whole foreground process group, and bwrap, which does not ignore SIGINT as the
    worker does, would die of it and take the worker with it.  The parent decides
    what a Ctrl-C means for its calls; bwrap still dies with the parent.
    """

    def __init__(self, *args, **kwargs):
        kwargs["start_new_session"] = True
        super().__init__(*args, **kwargs)

    @property
    def returncode(self):
        code = self.__dict__.get("_rc")
        if code is not None and 128 < code < 128 + signal.NSIG:
            return -(code - 128)
        return code

    @returncode.setter
    def returncode(self, value):
        self.__dict__["_rc"] = value


def wrap(sb, wenv, cmd, env, package_parent):
    """``(command, environment, Popen class)`` that start ``cmd`` inside the sandbox ``sb``.

    Called by ``launch.spawn`` for every sandboxed worker.  Raises SandboxUnavailable
    (a clear message, never an unsandboxed start) if bwrap can't run here.
    """
    bwrap = check_available()
    cwd = wenv.start_cwd or os.getcwd()
    declared = set(wenv.env_vars or ()) | {"PYTHONPATH", "PYTHONUNBUFFERED"}
    full = [bwrap] + bwrap_args(sb, wenv, cwd, package_parent) + ["--"] + list(cmd)
    return full, worker_env(sb, env, declared), SandboxedPopen


def for_pack(env, sandbox, pack_dir, socket_path):
    """``(env, sandbox)`` for the ComfyUI adapter's executor.

    The effective sandbox is ``sandbox`` or, when None, the env's ``[sandbox]`` table
    (the env is resolved here for that; the executor takes the result as is).  It is
    widened to read the pack's directory and the directory of the adapter's progress
    socket (under the host's /tmp, which a private /tmp hides).  ``sandbox=False``
    passes through: the executor then runs the pack unsandboxed.
    """
    if sandbox is False:
        return env, False
    if sandbox is None:
        from .envs import resolve_env
        env = resolve_env(env)
        sandbox = env.sandbox
        if sandbox is None:
            return env, None
    elif not isinstance(sandbox, Sandbox):
        raise TypeError(f"sandbox must be a comfy_env.Sandbox, False or None, not {sandbox!r}")
    paths = [pack_dir]
    if socket_path and not socket_path.startswith("\0"):
        paths.append(os.path.dirname(socket_path))
    return env, sandbox.also_readable(*[p for p in paths if os.path.exists(p)])


def report():
    """``comfy-env doctor``'s sandbox line."""
    bwrap, problem = probe()
    if problem is None:
        return f"sandbox: works (bubblewrap at {bwrap}; IsolatedExecutor(sandbox=Sandbox(...)))"
    return f"sandbox: not available: {problem}"
