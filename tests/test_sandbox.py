"""Sandboxed workers (bubblewrap): what they can't do, and that everything else still works.

Each restriction is checked against a control: the same call from an unsandboxed
worker (or from inside ``writable``/``readable``) succeeds, so a test fails if the
sandbox stops doing its job *or* if the check itself is broken.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import _funcs
import _sandbox_funcs as SF
from _sandbox_funcs import (connect, echo, environ, fresh_array, fresh_tensor, read, times_two,
                            tmp_roundtrip, write)
from pythons import ALL_PYTHONS, run_script
from comfy_env import (CallTimeout, IsolatedExecutor, Sandbox, SandboxUnavailable, WorkerCrashed,
                       shared_empty)
from comfy_env import sandbox as sbmod
from comfy_env.ipc import shm

pytestmark = pytest.mark.timeout(90)

_BWRAP, _PROBLEM = sbmod.probe()
needs_bwrap = pytest.mark.skipif(_PROBLEM is not None, reason=f"bubblewrap cannot run here: {_PROBLEM}")
SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def in_segment(x):
    if hasattr(x, "data_ptr"):
        addr, n = x.data_ptr(), x.numel() * x.element_size()
    else:
        addr, n = x.__array_interface__["data"][0], x.nbytes
    return shm.find_segment(addr, max(n, 1)) is not None


@pytest.fixture(scope="module")
def server():
    """A TCP server on the host's loopback that answers b"hello" to whoever connects."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except OSError:
                return
            c.sendall(b"hello")
            c.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    srv.close()


@pytest.fixture
def outside_tmp():
    """A fresh directory of ours *outside* /tmp (the sandbox's /tmp is private: a write
    under the host's /tmp lands there, not in the host's)."""
    import tempfile
    for base in (os.path.dirname(SRC), os.path.expanduser("~"), os.getcwd()):
        if not base.startswith("/tmp") and os.access(base, os.W_OK):
            d = tempfile.mkdtemp(prefix=".sandbox-test-", dir=base)
            yield d
            shutil.rmtree(d, ignore_errors=True)
            return
    pytest.skip("no writable directory outside /tmp to test writes against")


@pytest.fixture(scope="module")
def sandboxed():
    with IsolatedExecutor(sandbox=Sandbox()) as ex:
        yield ex


# -- network ---------------------------------------------------------------------------------

@needs_bwrap
def test_network_is_blocked_and_loopback_is_the_sandbox_own(server, sandboxed):
    with IsolatedExecutor() as plain:
        assert plain.submit(connect, server).result(timeout=30) == b"hello"     # the control
    with pytest.raises(OSError):
        sandboxed.submit(connect, server).result(timeout=30)
    with IsolatedExecutor(sandbox=Sandbox(network=True)) as ex:
        assert ex.submit(connect, server).result(timeout=30) == b"hello"


# -- file system -----------------------------------------------------------------------------

@needs_bwrap
def test_writes_only_inside_writable_and_the_private_tmp(tmp_path, outside_tmp):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    home_file = os.path.join(outside_tmp, "no.txt")
    with IsolatedExecutor(sandbox=Sandbox(writable=[out])) as ex:
        assert ex.submit(write, str(out / "ok.txt")).result(timeout=30)
        assert (out / "ok.txt").read_text() == "x"
        for target in (str(elsewhere / "no.txt"), home_file):
            with pytest.raises(OSError):        # PermissionError or "Read-only file system"
                ex.submit(write, target).result(timeout=30)
            assert not os.path.exists(target)
        # The private /tmp: writable, empty, and not the host's.
        d, text = ex.submit(tmp_roundtrip).result(timeout=30)
        assert (d, text) == ("/tmp", "scratch")
        marker = tmp_path / "host-tmp-marker"
        marker.write_text("host")
        with pytest.raises(OSError):
            ex.submit(read, str(marker)).result(timeout=30)


@needs_bwrap
def test_readable_list_hides_everything_else(tmp_path):
    seen, hidden = tmp_path / "seen", tmp_path / "hidden"
    seen.mkdir()
    hidden.mkdir()
    (seen / "a.txt").write_text("visible")
    (hidden / "b.txt").write_text("secret")
    with IsolatedExecutor(sandbox=Sandbox(readable=[seen], tmp=False)) as ex:
        assert ex.submit(read, str(seen / "a.txt")).result(timeout=30) == "visible"
        with pytest.raises(OSError):
            ex.submit(read, str(hidden / "b.txt")).result(timeout=30)
        with pytest.raises(OSError):
            ex.submit(read, "/root/.bash_history" if os.path.exists("/root/.bash_history")
                      else "/etc/shadow").result(timeout=30)
        with pytest.raises(OSError):            # readable is not writable
            ex.submit(write, str(seen / "a.txt")).result(timeout=30)
        with pytest.raises(OSError):            # nor is the skeleton that holds the mounts
            ex.submit(write, str(tmp_path / "phantom.txt")).result(timeout=30)
    assert (seen / "a.txt").read_text() == "visible"
    # Everything readable (the default) reads it fine: the control.
    with IsolatedExecutor(sandbox=Sandbox(tmp=False)) as ex:
        assert ex.submit(read, str(hidden / "b.txt")).result(timeout=30) == "secret"


@needs_bwrap
def test_readable_and_writable_paths_given_through_a_symlink_work_by_that_name(tmp_path):
    """A ``models`` folder linked to another disk: mounted at its real place, and the
    link recreated, so the name the user gave works too when ``readable`` is a list."""
    real_models, real_out = tmp_path / "disk2" / "models", tmp_path / "disk2" / "out"
    real_models.mkdir(parents=True)
    real_out.mkdir()
    (real_models / "m.txt").write_text("MODEL")
    project = tmp_path / "project"
    project.mkdir()
    models, out = project / "models", project / "out"
    models.symlink_to(real_models)
    out.symlink_to(real_out)
    with IsolatedExecutor(sandbox=Sandbox(readable=[models], writable=[out], tmp=False)) as ex:
        assert ex.submit(read, str(models / "m.txt")).result(timeout=30) == "MODEL"
        assert ex.submit(read, str(real_models / "m.txt")).result(timeout=30) == "MODEL"
        assert ex.submit(write, str(out / "o.txt")).result(timeout=30)
        with pytest.raises(OSError):                # still read-only by either name
            ex.submit(write, str(models / "m.txt")).result(timeout=30)
    assert (real_out / "o.txt").read_text() == "x"


@needs_bwrap
def test_an_empty_sys_path_entry_makes_the_working_directory_readable(tmp_path, monkeypatch):
    """``python -c`` or the REPL put "" (the working directory) on sys.path: with a
    readable list the worker must still read that directory, as the parent's sys.path."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "cwd_module_for_sandbox.py").write_text("def f(x):\n    return 2 * x\n")
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "path", [""] + [p for p in sys.path if p])
    with IsolatedExecutor(sandbox=Sandbox(readable=[])) as ex:
        assert ex.submit("cwd_module_for_sandbox:f", 21).result(timeout=30) == 42


# -- environment variables -------------------------------------------------------------------

@needs_bwrap
def test_environment_is_an_allow_list_plus_passthrough(monkeypatch):
    monkeypatch.setenv("SANDBOX_TEST_SECRET", "hunter2")
    monkeypatch.setenv("SANDBOX_TEST_WANTED", "yes")
    with IsolatedExecutor(sandbox=Sandbox(env_passthrough=["SANDBOX_TEST_WANTED"])) as ex:
        assert ex.submit(environ, "SANDBOX_TEST_SECRET").result(timeout=30) is None
        assert ex.submit(environ, "SANDBOX_TEST_WANTED").result(timeout=30) == "yes"
        assert ex.submit(environ, "PATH").result(timeout=30) == os.environ["PATH"]
    with IsolatedExecutor() as plain:
        assert plain.submit(environ, "SANDBOX_TEST_SECRET").result(timeout=30) == "hunter2"


# -- data planes, chains, output -------------------------------------------------------------

@needs_bwrap
def test_numpy_arrays_still_cross_zero_copy(sandboxed):
    x = shared_empty((1000, 300), np.float32)
    x[...] = 1.5
    back = sandboxed.submit(echo, x).result(timeout=30)
    assert np.shares_memory(back, x)            # by descriptor: the very same memory
    fresh = sandboxed.submit(fresh_array, 100_000).result(timeout=30)
    assert in_segment(fresh) and fresh[-1] == 99_999     # the worker's memfd, mapped here


@needs_bwrap
def test_torch_cpu_tensors_still_cross_zero_copy(sandboxed):
    torch = pytest.importorskip("torch")
    t = sandboxed.submit(fresh_tensor, 100_000).result(timeout=30)
    assert isinstance(t, torch.Tensor) and in_segment(t) and t[-1].item() == 99_999
    back = sandboxed.submit(echo, t).result(timeout=30)
    assert back.data_ptr() == t.data_ptr()


@needs_bwrap
def test_chains_between_a_sandboxed_and_an_unsandboxed_worker(sandboxed):
    with IsolatedExecutor() as plain:
        a = sandboxed.submit(fresh_array, 50_000)
        b = plain.submit(times_two, a)
        c = sandboxed.submit(times_two, b)
        got = c.result(timeout=30)
    assert in_segment(got) and np.array_equal(got, np.arange(50_000) * 4.0)


@needs_bwrap
def test_output_and_logging_are_forwarded(sandboxed, capsys, caplog):
    # print() streams to this process's stdout (worker_output="stream", the default),
    # logging records reach the comfy_env.worker logger at their level.
    with caplog.at_level(logging.INFO, logger="comfy_env.worker"):
        sandboxed.submit(_funcs.print_lines, 3, "sandboxed").result(timeout=30)
        sandboxed.submit(_funcs.log_message, logging.WARNING, "from the sandbox").result(timeout=30)
        out = ""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (
                out.count("sandboxed") >= 3
                and any("from the sandbox" in r.getMessage() for r in caplog.records)):
            time.sleep(0.05)
            out += capsys.readouterr().out
    assert out.count("sandboxed") >= 3, out
    assert any("from the sandbox" in r.getMessage() for r in caplog.records)


# -- failures --------------------------------------------------------------------------------

@needs_bwrap
def test_crash_is_reported_with_its_signal_and_the_next_call_gets_a_fresh_worker():
    with IsolatedExecutor(sandbox=Sandbox()) as ex:
        first = ex.submit(_funcs.getpid).result(timeout=30)
        with pytest.raises(WorkerCrashed) as info:
            ex.submit(_funcs.kill_self, signal.SIGKILL).result(timeout=30)
        assert "SIGKILL" in str(info.value)
        with pytest.raises(WorkerCrashed) as info:
            ex.submit(_funcs.segfault).result(timeout=30)
        assert "SIGSEGV" in str(info.value)
        assert ex.submit(_funcs.getpid).result(timeout=30) not in (first, None)


@needs_bwrap
def test_timeout_kills_the_sandboxed_worker_and_the_executor_carries_on():
    with IsolatedExecutor(sandbox=Sandbox(), call_timeout=1.0) as ex:
        pid = ex.submit(_funcs.getpid).result(timeout=30)
        with pytest.raises(CallTimeout):
            ex.submit(_funcs.sleep_then, 60).result(timeout=30)
        _gone(pid)
        assert ex.submit(_funcs.add, 1, 2).result(timeout=30) == 3


def _gone(pid, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        with open(f"/proc/{pid}/stat") as f:        # a zombie is dead too
            if f.read().split(")")[-1].split()[0] == "Z":
                return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} is still alive")


@needs_bwrap
def test_the_sandboxed_worker_dies_with_its_parent(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent("""
        import os, sys, time
        from comfy_env import IsolatedExecutor, Sandbox
        ex = IsolatedExecutor(sandbox=Sandbox())
        print(ex.submit(os.getpid).result(timeout=60), ex.worker_pids()[0], flush=True)
        time.sleep(120)
    """))
    env = dict(os.environ, PYTHONPATH=SRC)
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, env=env, cwd=tmp_path)
    try:
        worker, monitor = map(int, p.stdout.readline().split())
        assert worker != monitor            # bwrap stands between the parent and the worker
        p.kill()
        p.wait(timeout=10)
        _gone(worker)
        _gone(monitor)
    finally:
        p.kill()
        p.wait()


@needs_bwrap
@ALL_PYTHONS
@pytest.mark.timeout(180)
def test_a_user_script_runs_sandboxed_workers_on_every_python(pyver, tmp_path):
    """Start-up (interpreter prefix, venv, bootstrap), calls, arrays, a crash and a clean exit."""
    (tmp_path / "out").mkdir()
    proc = run_script(pyver, textwrap.dedent("""
        import os, signal, sys
        import numpy as np
        from comfy_env import IsolatedExecutor, Sandbox, WorkerCrashed

        def work(path):
            with open(path, "w") as f:
                f.write(sys.version)
            return np.arange(100_000.0), os.getpid()

        def die():
            os.kill(os.getpid(), signal.SIGSEGV)

        # A readable list: the strictest mounts; the worker must still find its interpreter.
        with IsolatedExecutor(sandbox=Sandbox(readable=[], writable=["out"])) as ex:
            arr, pid = ex.submit(work, os.path.abspath("out/v.txt")).result(timeout=60)
            assert pid != os.getpid() and arr[-1] == 99_999.0
            try:
                ex.submit(die).result(timeout=60)
            except WorkerCrashed as e:
                assert "SIGSEGV" in str(e), e
            else:
                raise AssertionError("no crash")
            assert ex.submit(work, os.path.abspath("out/v.txt")).result(timeout=60)[0][1] == 1.0
        print("OK")
    """), cwd=tmp_path, timeout=150)
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stderr[-3000:]
    assert (tmp_path / "out" / "v.txt").read_text().startswith(pyver)


@needs_bwrap
def test_ctrl_c_in_the_terminal_does_not_kill_the_sandboxed_worker(tmp_path):
    """SIGINT to the parent's process group is the parent's to handle (as without a sandbox)."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent("""
        import os, signal, time
        from comfy_env import IsolatedExecutor, Sandbox
        # This parent handles Ctrl-C by carrying on.  A handler, not SIG_IGN: an ignored
        # signal would stay ignored in every child, which hides the problem.
        signal.signal(signal.SIGINT, lambda *a: None)
        with IsolatedExecutor(sandbox=Sandbox()) as ex:
            pid = ex.submit(os.getpid).result(timeout=60)
            f = ex.submit(time.sleep, 1.0)
            time.sleep(0.3)
            os.killpg(os.getpgrp(), signal.SIGINT)          # what Ctrl-C in a terminal does
            f.result(timeout=60)
            assert ex.submit(os.getpid).result(timeout=60) == pid
        print("OK")
    """))
    env = dict(os.environ, PYTHONPATH=SRC)
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=60, start_new_session=True)   # its own group
    assert p.returncode == 0 and p.stdout.strip() == "OK", p.stderr[-3000:]


# -- comfy-env.toml [sandbox] ----------------------------------------------------------------

@needs_bwrap
@pytest.mark.timeout(180)
def test_toml_sandbox_table_is_honoured(tmp_path, monkeypatch, server, outside_tmp):
    from comfy_env.envs import Env
    monkeypatch.setenv("COMFY_ENV_CACHE_DIR", str(tmp_path / "cache"))
    proj = tmp_path / "proj"
    (proj / "output").mkdir(parents=True)
    (proj / "comfy-env.toml").write_text(textwrap.dedent("""
        name = "sandboxed"
        share = ["numpy"]
        [sandbox]
        network = false
        writable = ["./output"]
    """))
    env = Env.from_toml(proj / "comfy-env.toml")
    assert env.spec.sandbox == Sandbox(writable=[proj / "output"])
    with IsolatedExecutor(str(proj / "comfy-env.toml")) as ex:
        assert ex.submit(write, str(proj / "output" / "ok.txt")).result(timeout=60)
        outside = os.path.join(outside_tmp, "no.txt")
        with pytest.raises(OSError):
            ex.submit(write, outside).result(timeout=60)
        assert not os.path.exists(outside)
        # Under /tmp a write lands in the worker's private /tmp, never in the host's.
        try:
            ex.submit(write, str(proj / "not-here.txt")).result(timeout=60)
        except OSError:
            pass
        assert not (proj / "not-here.txt").exists()
        with pytest.raises(OSError):
            ex.submit(connect, server).result(timeout=60)
        assert np.array_equal(ex.submit(fresh_array, 10).result(timeout=60), np.arange(10.0))
    # sandbox=False runs that env unsandboxed, on purpose.
    with IsolatedExecutor(str(proj / "comfy-env.toml"), sandbox=False) as ex:
        assert ex.submit(connect, server).result(timeout=60) == b"hello"


# -- the ComfyUI adapter ---------------------------------------------------------------------

@needs_bwrap
def test_comfyui_pack_runs_sandboxed_with_progress(tmp_path, monkeypatch):
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.join(here, "comfy_stub"))
    try:
        import conftest_helpers
        conftest_helpers.setup_paths()
        import execution_loop as el
        from comfy_env.comfyui import IsolatedPack
    finally:
        sys.path.remove(os.path.join(here, "comfy_stub"))
    monkeypatch.setenv("COMFY_ENV_CACHE_DIR", str(tmp_path / "cache"))
    pack_dir = tmp_path / "demo_pack"            # under /tmp: hidden unless the adapter binds it
    shutil.copytree(os.path.join(conftest_helpers.PACKS, "demo_pack"), pack_dir)
    pack = IsolatedPack(pack_dir, ["nodes"], sandbox=Sandbox())
    try:
        classes, _ = pack.node_mappings()
        rec = el.ProgressRecorder().install()
        # Progress travels over the adapter's side channel: a unix socket under the host's /tmp.
        st, out, _ = el.execute_node(classes["DemoSlowProgress"], {"steps": 3, "delay": 0.0,
                                                                   "preview": True}, unique_id="7")
        assert (st, out) == ("success", [[3]])
        assert [(n, v, t) for n, v, t, _ in rec.events] == [("7", i, 3) for i in (1, 2, 3)]
        assert rec.events[-1][3] == ("JPEG", [2, "preview"], 512)
        st, out, _ = el.execute_node(classes["DemoPid"], {})
        worker_pid = out[0][0]
        assert st == "success" and worker_pid != os.getpid()
        assert pack.executor().env.sandbox is not None
    finally:
        pack.shutdown()


# -- GPU (CUDA pool IPC through the sandbox; runs on a GPU machine only) ----------------------

def _cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (the CUDA plane through a sandboxed worker)")
    return torch


@needs_bwrap
@pytest.mark.gpu
@pytest.mark.timeout(300)
@pytest.mark.parametrize("readable", [None, []], ids=["whole-fs", "readable-list"])
def test_cuda_tensors_cross_a_sandboxed_worker_by_pool_ipc(readable, monkeypatch):
    torch = _cuda()
    from comfy_env.ipc.cuda import install
    install()
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync")   # the worker's
    monkeypatch.setenv("COMFY_ENV_CUDA_HEAP", "pool")                        # (not the native default)
    monkeypatch.setenv("COMFY_ENV_CUDA_SMALL_COPY_MIB", "0")                 # zero copy only
    n = 1 << 22
    ref = (torch.arange(n, device="cuda") % 251).float()
    with IsolatedExecutor(sandbox=Sandbox(readable=readable), initializer=install) as ex, \
            IsolatedExecutor(initializer=install) as plain:
        assert ex.submit(SF.cuda_backend).result(timeout=120) == "cudaMallocAsync"
        t = ex.submit(SF.cuda_make, n).result(timeout=120)           # worker -> parent
        assert t.device.type == "cuda" and torch.equal(t, ref)
        assert ex.submit(SF.cuda_routes).result(timeout=60).get("pool", 0) >= 1
        s, dev = ex.submit(SF.cuda_sum, ref).result(timeout=120)     # parent -> worker
        assert s == float(ref.double().sum()) and dev == "cuda:0"
        # Chains both ways between the sandboxed worker and an unsandboxed one.
        assert plain.submit(SF.cuda_sum, ex.submit(SF.cuda_make, n)).result(timeout=120)[0] == s
        assert ex.submit(SF.cuda_sum, plain.submit(SF.cuda_make, n)).result(timeout=120)[0] == s


# -- bad input and missing bubblewrap --------------------------------------------------------

def test_bad_constructor_input_gets_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Sandbox(writable=[tmp_path / "missing"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Sandbox(readable=str(tmp_path / "missing"))
    with pytest.raises(TypeError):
        Sandbox(netwrk=False)
    with pytest.raises(TypeError, match="network"):
        Sandbox(network="no")
    with pytest.raises(ValueError, match="not an environment variable name"):
        Sandbox(env_passthrough=["BAD NAME"])
    with pytest.raises(TypeError, match="as str, not bytes"):
        Sandbox(env_passthrough=b"HOME")
    assert Sandbox(env_passthrough="HOME").env_passthrough == ("HOME",)
    with pytest.raises(TypeError, match="sandbox must be"):
        IsolatedExecutor(sandbox={"network": False})
    assert Sandbox(writable=str(tmp_path)).writable == (str(tmp_path),)     # one path is fine


@pytest.mark.parametrize("table, key, message", [
    ('network = false\nwritabel = ["."]', "writabel", "unknown key 'writabel'"),
    ('writable = ["./missing"]', "writable", "does not exist"),
    ('network = "off"', "network", "true or false"),
    ('readable = "."', "readable", "list of non-empty strings"),
])
def test_bad_toml_sandbox_table_names_the_key_and_line(tmp_path, table, key, message):
    from comfy_env.envs import EnvSpecError
    from comfy_env.envs.spec import load_spec
    (tmp_path / "comfy-env.toml").write_text(f'name = "x"\n\n[sandbox]\n{table}\n')
    with pytest.raises(EnvSpecError, match=message) as info:
        load_spec(tmp_path / "comfy-env.toml")
    text = str(info.value)
    assert "line" in text and "comfy-env.toml" in text


def test_missing_bubblewrap_is_a_clear_error_at_executor_creation(monkeypatch):
    monkeypatch.setenv("COMFY_ENV_BWRAP", "/nonexistent/bwrap")
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        IsolatedExecutor(sandbox=Sandbox())


def test_bwrap_that_cannot_create_namespaces_is_a_clear_error(tmp_path, monkeypatch):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: setting up uid map: Permission denied' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("COMFY_ENV_BWRAP", str(fake))
    with pytest.raises(SandboxUnavailable, match="uid map: Permission denied") as info:
        IsolatedExecutor(sandbox=Sandbox())
    assert "namespaces" in str(info.value)


@needs_bwrap
def test_doctor_reports_that_sandboxing_works(capsys):
    from comfy_env import doctor
    doctor.run(type("A", (), {"env": None, "no_live": True})())
    assert "sandbox: works" in capsys.readouterr().out
