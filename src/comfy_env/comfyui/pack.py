"""One isolated node pack on the host: its metadata, its executor, its node calls.

Life of a pack::

    prestart_pack(__file__, "nodes", env=...)          (optional: the pack's
      -> IsolatedPack.start_early() (early.py)          prestartup_script.py, run
         the worker starts on the pre-start thread      before ComfyUI imports torch)
    isolated_nodes(__file__, "nodes", env=...)         (ComfyUI imports the pack)
      -> early.adopt(): the early pack if its worker options are the same
      -> IsolatedPack.node_mappings()
           metadata: cache hit (no worker) | worker: collect_metadata -> cache
                     (a failure of the pack's code is cached too)
           proxy classes (proxy.py: V1 classes, V3 io.ComfyNode subclasses)
             -> NODE_CLASS_MAPPINGS for ComfyUI
      -> prestart() (unless started early): the worker starts in the background
         (one pack at a time) and imports the node modules (worker_side.warm_up)
    ComfyUI runs a node: proxy method -> IsolatedPack.call()
      -> executor (started early or pre-started, else created on first call; one
         worker, forked from a zygote with env=None; replaced after a crash or an
         interrupt kill, and re-warmed at once if the pack was pre-started)
           submit(worker_side:call_node, ..., token)   result/exception via the future
      -> while it runs, in the calling (ComfyUI execution) thread:
           side-channel progress -> ComfyUI's global progress hook (node id, previews)
           ComfyUI interrupt flag -> interrupt in the worker; grace period; kill
    ComfyUI exits -> atexit: executors shut down (the executor also kills workers
                     whose parent died without running atexit)

Progress is relayed from the thread that waits for the call, not from the side
channel's reader thread, because ComfyUI's hook reads the executing node from a
context variable of that thread and raises the interrupt there (it also *resets*
the interrupt flag, so it must not run on a thread that can't act on it).
"""
from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import time

from . import encoding, metadata_cache, proxy, sidechannel
from .errors import PackLoadError, named_like_original, with_worker_frames

__all__ = ["IsolatedPack"]

_log = logging.getLogger(__name__)
_WORKER = "comfy_env.comfyui.worker_side:"
_POLL_S = 0.05          # how often a waiting call checks ComfyUI's interrupt flag
_KILL_WAIT_S = 10.0     # after killing a worker, how long to wait for the executor to notice


def _env_fingerprint(env):
    """What about ``env`` decides the metadata: the spec file's bytes, else its identity."""
    if env is None:
        return "current-interpreter"
    if isinstance(env, (str, os.PathLike)):
        path = os.fspath(env)
        candidates = [path, os.path.join(path, "comfy-env.toml")] if os.path.isdir(path) else [path]
        for c in candidates:
            if os.path.isfile(c) and not os.access(c, os.X_OK):
                with open(c, "rb") as f:
                    return "spec:" + f.read().hex()
        return "path:" + os.path.abspath(path)
    return "object:" + repr(env)


def _host_cli_args():
    """ComfyUI's parsed command line (``--cpu``, VRAM modes, ...), for a worker that
    imports ComfyUI's own ``comfy`` modules: ``comfy.cli_args`` parses no command line
    there, and ``comfy.model_management`` would then, e.g., insist on CUDA on a machine
    that ComfyUI itself runs with ``--cpu``.  Only plain values travel."""
    import sys
    mod = sys.modules.get("comfy.cli_args")
    args = getattr(mod, "args", None)
    if args is None:
        return None
    plain = (str, int, float, bool, type(None))
    out = {}
    for k, v in vars(args).items():
        if isinstance(v, plain) or (isinstance(v, (list, tuple))
                                    and all(isinstance(x, plain) for x in v)):
            out[k] = v
    return out


def _folder_paths_snapshot():
    """ComfyUI's folder configuration, for the worker's read-only folder_paths shim."""
    import sys
    fp = sys.modules.get("folder_paths")
    if fp is None:
        return None
    snap = {}
    for key in ("base_path", "models_dir", "output_directory", "temp_directory",
                "input_directory", "user_directory"):
        value = getattr(fp, key, None)
        if isinstance(value, str):
            snap[key] = value
    fnp = getattr(fp, "folder_names_and_paths", None)
    if isinstance(fnp, dict):
        snap["folder_names_and_paths"] = {
            k: (list(v[0]), sorted(v[1])) for k, v in fnp.items()
            if isinstance(v, tuple) and len(v) == 2}
    # ComfyUI's --disable-metadata: previews saved in a worker leave the prompt out too.
    cli = sys.modules.get("comfy.cli_args")
    snap["disable_metadata"] = bool(getattr(getattr(cli, "args", None), "disable_metadata", False))
    return snap


class IsolatedPack:
    """A custom-node pack whose node modules run in a worker in their own env."""

    def __init__(self, pack_dir, modules, env=None, *, name=None, module_name=None,
                 interrupt_grace=5.0, call_timeout=None, comfy_api="auto", sandbox=None,
                 preload=None):
        self.pack_dir = os.path.abspath(pack_dir)
        if not os.path.isdir(self.pack_dir):
            raise PackLoadError(f"comfy-env: pack directory {self.pack_dir!r} does not exist")
        if not modules:
            raise ValueError("isolated_nodes() needs at least one node module, e.g. \"nodes\"")
        for m in modules:
            if not isinstance(m, str) or not all(p.isidentifier() for p in m.split(".")):
                raise ValueError(f"node module names are dotted names relative to the pack, "
                                 f"like \"nodes\" or \"nodes.image\"; got {m!r}")
        if isinstance(env, (str, os.PathLike)) and not os.path.isabs(env):
            env = os.path.join(self.pack_dir, env)   # relative to the pack, not the cwd
        if isinstance(env, (str, os.PathLike)) and not os.path.exists(env):
            raise PackLoadError(f"comfy-env: env {os.fspath(env)!r} of pack "
                                f"{os.path.basename(self.pack_dir)!r} does not exist")
        if interrupt_grace is None or interrupt_grace < 0:
            raise ValueError(f"interrupt_grace must be a number of seconds >= 0, not {interrupt_grace!r}")
        if comfy_api not in ("auto", "shim", "comfyui"):
            raise ValueError(f"comfy_api must be 'auto', 'shim' or 'comfyui', not {comfy_api!r}")
        self.env = env
        self.modules = tuple(modules)
        self.name = name or os.path.basename(self.pack_dir)
        self.module_name = module_name or self.name
        self.interrupt_grace = float(interrupt_grace)
        self.call_timeout = call_timeout
        self.comfy_api = comfy_api
        self.sandbox = sandbox
        if isinstance(preload, str):
            raise TypeError(f"preload must be a list of module names, got the string "
                            f"{preload!r} (write preload=[{preload!r}])")
        self.preload = _default_preload(env) if preload is None else list(preload)
        from .worker_side import _package_name
        self._spec = {"pack_dir": self.pack_dir, "package": _package_name(self.pack_dir),
                      "modules": list(self.modules)}
        self._link_id = sidechannel.SideChannelHub.new_link_id()
        self._executor = None
        self._lock = threading.Lock()
        self._closed = False
        self._warm = False          # the worker has imported the pack (warm-up or a call)
        self._creating = None       # an Event while start_early() constructs the executor
        self.started_early = False  # by prestart_pack() (from the pack's prestartup_script.py)
        self._prestarted = False    # pre-started (either way): a killed worker is replaced at once
        # ComfyUI's folder configuration as the worker's initializer gets it; updated in
        # place when it changes (the executor pickles initargs anew at each worker start).
        self._host_folders = {}
        self.metadata_source = None        # "cache" or "worker", for tests and logs

    def worker_options(self):
        """What decides the worker a pack gets: two packs with equal options can share it."""
        return {"pack_dir": self.pack_dir, "modules": self.modules, "env": self.env,
                "name": self.name, "comfy_api": self.comfy_api,
                "call_timeout": self.call_timeout, "sandbox": self.sandbox,
                "preload": self.preload}

    # ------------------------------------------------------------------ metadata
    def metadata(self, keep_worker=False):
        key = metadata_cache.pack_key(self.pack_dir, self.modules, _env_fingerprint(self.env))
        meta = metadata_cache.load(self.name, key)
        if meta is not None and "failed" in meta:
            # The same pack content failed before: fail the same way, without a worker.
            self.metadata_source = "cache"
            _log.debug("comfy-env: [%s] cached failure; worker traceback:\n%s",
                       self.name, meta.get("traceback", ""))
            raise PackLoadError(meta["failed"] + " (cached: this pack's sources are unchanged "
                                "since it failed; edit them or clear the cache in "
                                f"{metadata_cache.cache_dir()} to retry)")
        if meta is not None:
            self.metadata_source = "cache"
            return meta
        try:
            # The worker that described the pack has imported it: it becomes the pack's
            # worker when the pack is to be pre-started (keep_worker), else it is
            # stopped, so that a pack nobody uses costs nothing after start-up.  A
            # worker started early (prestart_pack) is the pack's worker already.
            if self.started_early:
                try:
                    meta = self.executor().submit(_WORKER + "collect_metadata", self._spec).result()
                except BaseException:
                    self.shutdown(wait=False)       # the pack fails to load: no use for it
                    raise
                self._warm = True           # it has imported the pack to describe it
                keep_worker, ex = False, None
            else:
                ex = self._make_executor()
                try:
                    meta = ex.submit(_WORKER + "collect_metadata", self._spec).result()
                except BaseException:
                    ex.shutdown(wait=True)
                    raise
            if keep_worker and meta.get("nodes"):
                with self._lock:
                    if self._executor is None and not self._closed:
                        self._executor, ex = ex, None
                        self._warm = True
                        _register_for_exit(self)
            if ex is not None:
                ex.shutdown(wait=True)
        except Exception as exc:
            self.metadata_source = "worker"
            cause = getattr(exc, "__cause__", None)
            reason = (f"comfy-env: can't load isolated pack {self.name!r} (env {self.env!r}): "
                      f"{type(exc).__name__}: {exc}")
            tb = str(cause) if cause is not None else ""
            # Only what the pack's own code did is cached: an env that couldn't be built
            # or a worker that couldn't start may work next time.
            if _raised_by_pack_code(exc):
                metadata_cache.store(self.name, key, {"failed": reason, "traceback": tb})
            _log.debug("comfy-env: [%s] worker traceback:\n%s", self.name, tb)
            raise PackLoadError(reason) from None
        self.metadata_source = "worker"
        metadata_cache.store(self.name, key, meta)
        return meta

    def cached_failure(self):
        """The cached reason this pack's content failed to load before, or None."""
        key = metadata_cache.pack_key(self.pack_dir, self.modules, _env_fingerprint(self.env))
        meta = metadata_cache.load(self.name, key)
        return meta.get("failed") if meta is not None and "failed" in meta else None

    def node_mappings(self, keep_worker=False):
        """(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS) of proxy classes.

        keep_worker: a worker started to read the metadata (cache miss) stays as the
        pack's worker instead of being stopped (used with prestart)."""
        meta = self.metadata(keep_worker)
        for key, reason in meta.get("refused", {}).items():
            _log.error("comfy-env: [%s] node %r not loaded: %s", self.name, key, reason)
        if not meta["nodes"] and meta.get("refused"):
            raise PackLoadError(f"comfy-env: no node of pack {self.name!r} can be loaded: "
                                + "; ".join(f"{k}: {v}" for k, v in meta["refused"].items()))
        classes = {}
        for key, m in meta["nodes"].items():
            if m.get("api") != "v3":
                classes[key] = proxy.build_proxy_class(self, key, m, self.module_name)
                continue
            try:
                classes[key] = proxy.build_v3_proxy_class(self, key, m, self.module_name)
            except ImportError as exc:
                # A ComfyUI without comfy_api.latest can't run V3 nodes in-process either.
                _log.error("comfy-env: [%s] V3 node %r not loaded: this ComfyUI has no "
                           "usable comfy_api.latest (%s)", self.name, key, exc)
        if meta["nodes"] and not classes:
            raise PackLoadError(f"comfy-env: no node of pack {self.name!r} can be loaded "
                                f"in this ComfyUI (see the errors above)")
        names = dict(meta.get("display_names", {}))
        return classes, names

    def prestart(self):
        """Start the pack's worker in the background and import its node modules there,
        so that the first node run doesn't wait for either.  Returns at once.

        Packs are pre-started one after another, in load order, by one thread: on a
        small machine several workers importing torch at once would each take as long
        as all of them together, delaying every pack's first run.  A node run that
        comes first starts its pack's worker itself, and no further pack is
        pre-started while it waits.  A failure here is only logged; the first node
        run reports it."""
        self._prestarted = True
        _prestart_queue().put(self)

    def start_early(self):
        """Start the worker in the background and import the node modules there
        (prestart_pack: ComfyUI runs prestartup scripts before it imports torch, so the
        worker's start overlaps ComfyUI's own).  Returns at once.  Early starts share
        the pre-start thread with prestart(): one worker starts at a time, so that on a
        small machine they don't all slow ComfyUI's start (and each other) at once.  A
        failure is logged once, and the pack's worker is then started the usual way."""
        self.started_early = self._prestarted = True
        _register_for_exit(self)
        _prestart_queue().put(self)

    def _start_in_background(self):
        """The pre-start thread's turn for this pack."""
        if self._warm or self._closed:
            return
        if self.started_early and self._executor is None:
            self._early()
        else:
            self._warm_up()

    def _early(self):
        t0 = time.monotonic()
        with self._lock:
            if self._closed or self._executor is not None:
                return
            creating = self._creating = threading.Event()
        ex = None
        try:
            try:
                # Outside the lock: building a separate env can take minutes, and
                # shutdown() (at exit) must not wait for that; executor() waits for
                # ``creating`` instead, so there is one executor.
                ex = self._make_executor()
            finally:
                with self._lock:
                    if ex is not None and not self._closed and self._executor is None:
                        self._executor, ex = ex, None
                    own = self._executor
                    self._creating = None
                creating.set()
            if ex is not None:      # shut down meanwhile
                ex.shutdown(wait=False)
                return
            own.submit(_WORKER + "warm_up", self._spec).result()
            self._warm = True
            _log.info("comfy-env: [%s] worker ready (started by prestartup_script.py, "
                      "%.1f s)", self.name, time.monotonic() - t0)
        except Exception as exc:
            if self._closed:
                return
            if _raised_by_pack_code(exc):
                # The pack's own code failed in a live worker: loading the pack
                # reports it (and caches it); one report is enough.
                _log.debug("comfy-env: [%s] early worker: the pack failed to import: %s: %s",
                           self.name, type(exc).__name__, exc)
                return
            _log.warning("comfy-env: [%s] starting the worker early (prestartup_script.py) "
                         "failed: %s: %s; it is started when the pack loads instead",
                         self.name, type(exc).__name__, exc)
            with self._lock:
                broken, self._executor = self._executor, None
            if broken is not None:
                broken.shutdown(wait=False)

    def adopt_host_state(self):
        """ComfyUI has loaded the pack: what the early worker was started with may have
        changed since (other packs add model folders; --temp-directory is applied
        later).  The running worker and any later one get ComfyUI's folders as they
        are now."""
        snap = _folder_paths_snapshot()
        if snap is None or snap == self._host_folders:
            return
        _replace(self._host_folders, snap)
        ex = self._executor
        if ex is None:
            return
        try:
            fut = ex.submit(_WORKER + "configure_folder_paths", snap)
        except Exception:
            return          # no worker: the next one starts with the new state
        fut.add_done_callback(_log_refresh_failure)

    def _warm_up(self):
        t0 = time.monotonic()
        try:
            self.executor().submit(_WORKER + "warm_up", self._spec).result()
            self._warm = True
            _log.info("comfy-env: [%s] worker ready (pre-started in %.1f s)",
                      self.name, time.monotonic() - t0)
        except Exception as exc:
            if not self._closed:
                _log.info("comfy-env: [%s] pre-starting the worker failed (%s: %s); "
                          "the first node run will try again", self.name,
                          type(exc).__name__, exc)

    # ------------------------------------------------------------------ executor
    def _make_executor(self):
        import inspect
        try:
            from comfy_env import IsolatedExecutor
        except ImportError as exc:
            raise PackLoadError(f"comfy-env's executor is not importable: {exc}") from exc
        hub = sidechannel.hub()
        _replace(self._host_folders, _folder_paths_snapshot() or {})
        kwargs = dict(initializer=_initializer_ref(),
                      initargs=(self.name, self.comfy_api, (hub.address, hub.authkey, self._link_id),
                                self._host_folders, _host_cli_args(), _host_top_modules()),
                      call_timeout=self.call_timeout)
        params = inspect.signature(IsolatedExecutor).parameters
        if "name" in params:
            kwargs["name"] = self.name       # worker output is logged under this name
        if "worker_output" in params:
            kwargs["worker_output"] = "logging"     # ComfyUI's console and log view read logging
        if self.preload and "preload" in params:
            kwargs["preload"] = self.preload        # workers fork from a zygote (below)
        # A sandboxed worker must still see the pack and the progress socket's directory.
        from ..sandbox import for_pack
        env, kwargs["sandbox"] = for_pack(self.env, self.sandbox, self.pack_dir, hub.address)
        ex = IsolatedExecutor(env, 1, **kwargs)
        # ComfyUI ending (Ctrl-C, which it catches itself and then exits normally) must
        # not wait for a node still running: its result has nowhere to go.
        ex._pool.stop_at_exit = True
        return ex

    def executor(self):
        while True:
            with self._lock:
                if self._closed:
                    raise RuntimeError(f"comfy-env: pack {self.name!r} was shut down")
                creating = self._creating
                if creating is None:
                    if self._executor is None:
                        self._executor = self._make_executor()
                        _register_for_exit(self)
                    return self._executor
            creating.wait()         # _early() is constructing it: one executor only

    def shutdown(self, wait=True):
        with self._lock:
            self._closed = True
            ex, self._executor = self._executor, None
        if ex is not None:
            ex.shutdown(wait=wait, cancel_futures=True)

    def drop_instance(self, instance_id):
        ex = self._executor
        if ex is None or self._closed:
            return
        try:
            ex.submit(_WORKER + "drop_instance", instance_id)
        except Exception:
            pass    # best effort: the worker may be gone or shutting down

    # ------------------------------------------------------------------ calls
    def call(self, key, method, instance_id, args, kwargs, drop=frozenset(), hidden=None):
        """Run a node method in the worker, relaying progress and interrupts meanwhile."""
        import comfy.model_management as mm

        for name in drop:
            if name in kwargs:
                kwargs[name] = None
        ch = sidechannel.hub().open_call(self._link_id)
        cold = not self._warm
        if cold:
            _cold_calls.enter()     # pre-starts of other packs wait: they'd slow this one
        try:
            executing = _executing_context()
            fut = self.executor().submit(_WORKER + "call_node", self._spec, key, method,
                                         instance_id, tuple(args), dict(kwargs), ch.token,
                                         executing, hidden, _graph_prefix())
            fut.add_done_callback(lambda _f: ch.queue.put(sidechannel.DONE))
            try:
                # ComfyUI's interrupt is for the node it executes (it checks the flag
                # only around the node's function and check_lazy_status): a validation
                # or IS_CHANGED call (a prompt being queued, on the server's thread)
                # must not take the flag, nor fail on one left from an interrupt while idle.
                self._wait(ch, fut, mm, interruptible=method not in _NOT_INTERRUPTIBLE)
            except mm.InterruptProcessingException:
                if self._stop(ch, fut):
                    self._rewarm()
                    raise
                if not (fut.done() and not fut.cancelled() and fut.exception() is None):
                    raise
                # The node finished within the grace without looking at the interrupt:
                # its output stands, as in ComfyUI, whose flag then stops the next node.
                mm.interrupt_current_processing(True)
            self._warm = True
            return self._result(fut, mm)
        finally:
            if cold:
                _cold_calls.leave()
            ch.close()

    def _wait(self, ch, fut, mm, interruptible=True):
        """Until the future is done: relay progress; turn ComfyUI's interrupt into ours."""
        first = [True]      # the call's first update always goes out, like ComfyUI's
        while True:
            msgs = _drain(ch.queue, timeout=_POLL_S)
            done = fut.done() or sidechannel.DONE in msgs
            for msg in _coalesce(msgs, first):
                self._relay(msg)
            if interruptible and mm.processing_interrupted():
                mm.throw_exception_if_processing_interrupted()   # resets the flag, raises
            if done:
                break
        # The result and the side channel are different sockets: progress (even the
        # "start") may still be in flight when the result is here.  A call that
        # reported progress says so in its result, and its worker sends "end" before
        # returning (a dead worker's connection closing sets it too), so this wait is
        # normally immediate; it is bounded in case the link broke.  A call that
        # reported none sent nothing to wait for.
        if _progressed(fut, ch):
            ch.ended.wait(1.0)
        try:
            for msg in _coalesce(_drain(ch.queue, timeout=0), first):
                self._relay(msg)
        except mm.InterruptProcessingException:
            pass        # the node finished anyway: its result stands

    def _relay(self, msg):
        import comfy.utils
        _, _token, value, total, preview, node_id = msg
        hook = comfy.utils.PROGRESS_BAR_HOOK
        if hook is None:
            return
        if node_id is None:
            # ComfyUI's hook finds the executing node from this thread's context.
            hook(value, total, preview)
        else:
            hook(value, total, preview, node_id=node_id)

    def _stop(self, ch, fut):
        """The host was interrupted: stop the worker's call, by killing it if need be.
        True when the worker was killed."""
        ch.interrupt()
        deadline = time.monotonic() + self.interrupt_grace
        while not fut.done() and time.monotonic() < deadline:
            time.sleep(_POLL_S)
        if fut.done() or fut.cancel():      # stopped by itself, or never started
            return False
        pid = ch.pid
        wait_until = max(deadline, time.monotonic()) + 1.0
        while pid is None and not fut.done() and time.monotonic() < wait_until:
            time.sleep(_POLL_S)         # the worker has not said hello yet
            pid = ch.pid
        if pid is None or fut.done():
            return False
        _log.warning("comfy-env: [%s] node did not stop %.1fs after the interrupt; "
                     "killing its worker (pid %d)", self.name, self.interrupt_grace, pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            fut.exception(timeout=_KILL_WAIT_S)
        except Exception:
            pass
        return True

    def _rewarm(self):
        """The worker was killed or died: start its replacement now, in the background,
        like the pre-start did (a fork of the zygote with env=None), rather than when
        the next node runs."""
        self._warm = False
        if self._prestarted and not self._closed:
            _prestart_queue().put(self)

    def _result(self, fut, mm):
        try:
            return fut.result()[2]          # (RESULT_TAG, progressed, value)
        except mm.InterruptProcessingException:
            # The node noticed the interrupt itself: ComfyUI's flag may still be set.
            mm.interrupt_current_processing(False)
            raise
        except Exception as exc:
            if type(exc).__name__ == "InterruptProcessingException":
                # The worker's own (shim) class when the host can't map it to ComfyUI's.
                mm.interrupt_current_processing(False)
                raise mm.InterruptProcessingException() from exc
            if _worker_died(exc):
                self._rewarm()
            exc = named_like_original(exc)
            raise with_worker_frames(exc) from exc.__cause__


def _default_preload(env):
    """What a pack's zygote imports when the pack doesn't say (``preload=None``).

    With ``env=None`` the worker runs ComfyUI's interpreter, which has torch: workers
    fork from a zygote that has imported it, so a worker that replaces one killed
    after an interrupt or a crash skips that import.  Only torch: ComfyUI's own
    ``comfy`` modules read ComfyUI's command line and probe the GPU when imported
    (``comfy.model_management`` initialises CUDA where there is one), and a process
    that has touched CUDA cannot fork workers that use it; the pack's node modules
    may do anything at import.  A separate env may have no torch at all: no zygote
    unless the pack names what to preload."""
    if env is not None:
        return []
    import importlib.util
    try:
        return ["torch"] if importlib.util.find_spec("torch") is not None else []
    except (ImportError, ValueError):
        return []


def _replace(d, new):
    """Make ``d`` equal to ``new`` without ever leaving it empty (another thread may be
    pickling it for a worker start)."""
    d.update(new)
    for k in [k for k in d if k not in new]:
        del d[k]


def _log_refresh_failure(fut):
    exc = fut.exception()
    if exc is not None:
        _log.debug("comfy-env: updating a worker's folder configuration failed: %s", exc)


def _drain(q, timeout):
    """Everything in the queue, waiting up to ``timeout`` for the first item."""
    import queue
    items = []
    try:
        items.append(q.get(timeout=timeout) if timeout else q.get_nowait())
        while True:
            items.append(q.get_nowait())
    except queue.Empty:
        pass
    return items


def _coalesce(msgs, first):
    """A backlog of updates, thinned like ComfyUI's ProgressBar does: the call's first
    update (``first[0]`` still True) and the newest always go out, previews all go out,
    plain updates in between only as the newest.  The newest of the last backlog is
    the call's last update, so first and last are never lost."""
    progress = [m for m in msgs if m[0] == "progress"]
    if not progress:
        return []
    keep = set()
    if first[0]:
        keep.add(0)
        first[0] = False
    keep.add(len(progress) - 1)
    keep.update(i for i, m in enumerate(progress) if m[4] is not None)
    return [m for i, m in enumerate(progress) if i in keep]


# Node methods ComfyUI calls without checking its interrupt flag (allow_interrupt=False).
_NOT_INTERRUPTIBLE = frozenset({"VALIDATE_INPUTS", "IS_CHANGED", "validate_inputs", "fingerprint_inputs"})


def _executing_context():
    """ComfyUI's executing-node context of this thread, as (prompt_id, node_id, list_index)."""
    import sys
    mod = sys.modules.get("comfy_execution.utils")
    get = getattr(mod, "get_executing_context", None)
    ctx = get() if get is not None else None
    if ctx is None:
        return None
    return (ctx.prompt_id, ctx.node_id, ctx.list_index)


def _graph_prefix():
    """ComfyUI's default prefix for node ids of graphs a node expands into, as its
    execution set it for this call (``GraphBuilder.set_default_prefix(unique_id,
    call_index)``): ``(root, call_index, graph_index)``, or None outside ComfyUI."""
    import sys
    mod = sys.modules.get("comfy_execution.graph_utils")
    gb = getattr(mod, "GraphBuilder", None)
    if gb is None:
        return None
    try:
        return (gb._default_prefix_root, gb._default_prefix_call_index, gb._default_prefix_graph_index)
    except AttributeError:
        return None


def _progressed(fut, ch):
    """Whether the finished call reported progress (so its "end" is to be waited for)."""
    exc = fut.exception()
    if exc is None:
        return bool(fut.result()[1])
    # Set by the worker; a type that lost it on the way (a stand-in) falls back to
    # whether a "start" arrived.
    return bool(getattr(exc, "_comfy_env_progressed", ch.started.is_set()))


def _worker_died(exc):
    try:
        from comfy_env.errors import WorkerCrashed
    except ImportError:
        return False
    return isinstance(exc, WorkerCrashed)


def _raised_by_pack_code(exc):
    """Whether a metadata failure came from the pack's code in a running worker."""
    try:
        from concurrent.futures import BrokenExecutor
        from comfy_env.errors import RemoteTraceback
    except ImportError:
        return False
    return (not isinstance(exc, BrokenExecutor)
            and isinstance(getattr(exc, "__cause__", None), RemoteTraceback))


_prestarts = None


def _prestart_queue():
    global _prestarts
    with _prestart_lock:
        if _prestarts is None:
            import queue
            _prestarts = queue.Queue()
            threading.Thread(target=_prestart_loop, args=(_prestarts,),
                             name="comfy-env-prestart", daemon=True).start()
        return _prestarts


def _prestart_loop(q):
    while True:
        pack = q.get()
        _cold_calls.wait_idle()
        pack._start_in_background()


class _ColdCalls:
    """How many node calls are waiting for their pack's worker to start.

    While any is, no further pack is pre-started: on a small machine a second worker
    importing torch at the same time would delay the one a user is waiting for."""

    def __init__(self):
        self._n = 0
        self._cond = threading.Condition()

    def enter(self):
        with self._cond:
            self._n += 1

    def leave(self):
        with self._cond:
            self._n -= 1
            self._cond.notify_all()

    def wait_idle(self):
        with self._cond:
            self._cond.wait_for(lambda: self._n == 0)


_cold_calls = _ColdCalls()


_prestart_lock = threading.Lock()


def _host_top_modules():
    """ComfyUI's own top-level modules the host imported, by file (name -> path): the
    files directly in ComfyUI's directory (``server.py``, ``utils/``...).  ComfyUI puts
    ``comfy/`` first on ``sys.path`` when it loads custom nodes, after it imported its
    ``utils`` package: a worker of the host's interpreter importing ``utils`` got
    ``comfy/utils.py`` instead, and ``from server import PromptServer`` failed.  The
    worker resolves these names as the host did (worker_side._HostModules)."""
    where = getattr(sys.modules.get("folder_paths"), "__file__", None)
    if not isinstance(where, str):
        return None             # not inside ComfyUI (or a stand-in without a file)
    base = os.path.dirname(os.path.abspath(where))
    out = {}
    for name, mod in list(sys.modules.items()):
        path = getattr(mod, "__file__", None)
        if "." in name or name.startswith("__") or not isinstance(path, str):
            continue
        path = os.path.abspath(path)
        where = os.path.dirname(path)
        if os.path.basename(path) == "__init__.py":
            where = os.path.dirname(where)
        if where == base:
            out[name] = path
    return out


def _initializer_ref():
    from . import worker_side
    return worker_side.initialize


_live_packs = []
_exit_registered = False


def _register_for_exit(pack):
    global _exit_registered
    _live_packs.append(pack)
    if not _exit_registered:
        _exit_registered = True
        atexit.register(_shutdown_all)


def _shutdown_all():
    for pack in list(_live_packs):
        try:
            pack.shutdown(wait=False)
        except Exception:
            pass
